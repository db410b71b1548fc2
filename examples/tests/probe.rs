//! The probe example, asked with a real HTTP client: `/readyz` is 503 with
//! the upgrade's status while it runs and 200 after, `/livez` (and
//! `/healthz`) 200 throughout, and `/metrics` has the `upsilon_` metrics of
//! the service; SIGTERM in the middle of the upgrade stops it cleanly.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Stops the probe server however the test ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the example on a free loopback port; returns it, its base URL,
/// and the rest of what it prints (read on, so that its prints never meet a
/// closed pipe).
fn start(db: &Path) -> (Server, String, mpsc::Receiver<String>) {
    let mut child = Server(
        Command::new(env!("CARGO_BIN_EXE_probe"))
            .arg("127.0.0.1:0")
            .arg(db)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.strip_prefix("listening on ").unwrap().to_owned();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, format!("http://{addr}"), rx)
}

async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
    let response = client.get(&url).send().await.unwrap();
    let code = response.status().as_u16();
    (code, response.text().await.unwrap())
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The value of the sample `name{labels}` in a Prometheus scrape.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let head = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&head))
        .map(|v| v.parse().unwrap())
}

/// Polls `/readyz` until it is 200; returns the 503 bodies seen before and
/// the 200 body. Checks the liveness routes on every round.
async fn until_ready(client: &reqwest::Client, base: &str) -> (Vec<Value>, Value) {
    let mut not_ready = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for live in ["/livez", "/healthz"] {
            let (code, body) = get(client, format!("{base}{live}")).await;
            assert_eq!(
                (code, body.as_str()),
                (200, "live\n"),
                "{live} while upgrading"
            );
        }
        match get(client, format!("{base}/readyz")).await {
            (503, body) => not_ready.push(parse(&body)),
            (200, body) => return (not_ready, parse(&body)),
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "never ready: {not_ready:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn readyz_turns_200_when_the_upgrade_is_done_and_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (child, base, printed) = start(&dir.path().join("probe.db"));
    let client = reqwest::Client::new();
    assert_eq!(get(&client, format!("{base}/nope")).await.0, 404);

    // Scrape once while the task runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let during = loop {
        let (code, body) = get(&client, format!("{base}/upsilon/status")).await;
        assert_eq!(code, 200);
        if parse(&body)["phase"] == "upgrading" {
            break get(&client, format!("{base}/metrics")).await;
        }
        assert!(Instant::now() < deadline, "never upgrading: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(during.0, 200);
    let svc = r#"service="probe-demo""#;
    assert_eq!(
        sample(&during.1, "upsilon_lease_grants_total", svc),
        Some(1.0),
        "{}",
        during.1
    );

    let (not_ready, ready) = until_ready(&client, &base).await;
    let upgrading: Vec<&Value> = not_ready
        .iter()
        .filter(|s| s["phase"] == "upgrading")
        .collect();
    assert!(!upgrading.is_empty(), "{not_ready:?}");
    for s in &upgrading {
        assert_eq!(s["task"], "slow_backfill");
        assert_eq!(s["version"], "2.0.0");
        assert_eq!((&s["index"], &s["total"]), (&json!(1), &json!(1)));
    }
    assert!(
        upgrading
            .iter()
            .any(|s| s["progress"]["message"] == "batches"),
        "{upgrading:?}"
    );
    let at_2 = json!({"phase": "ready", "data_version": "2.0.0"});
    assert_eq!(ready, at_2);
    let (code, status) = get(&client, format!("{base}/upsilon/status")).await;
    assert_eq!((code, parse(&status)), (200, at_2));

    let (code, after) = get(&client, format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    let task = format!(r#"{svc},task="slow_backfill",version="2.0.0",outcome="completed""#);
    assert_eq!(
        sample(&after, "upsilon_task_duration_seconds_count", &task),
        Some(1.0),
        "{after}"
    );
    let upgraded = format!(r#"{svc},outcome="upgraded""#);
    assert_eq!(sample(&after, "upsilon_runs_total", &upgraded), Some(1.0));
    assert_eq!(
        sample(&after, "upsilon_upgrade_duration_seconds_count", &upgraded),
        Some(1.0)
    );
    assert!(
        after.contains("# TYPE upsilon_task_duration_seconds histogram"),
        "{after}"
    );
    let line = printed.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(line.starts_with("ready: upgraded"), "{line}");
    drop(child);
}

#[tokio::test]
async fn sigterm_mid_upgrade_stops_cleanly_and_the_next_start_takes_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("probe.db");
    let (mut child, base, printed) = start(&db);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = get(&client, format!("{base}/upsilon/status")).await;
        if parse(&body)["phase"] == "upgrading" {
            break;
        }
        assert!(Instant::now() < deadline, "never upgrading: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let said: Vec<String> = printed.iter().collect();
    assert_eq!(said, ["stopped before the upgrade completed"]);

    // The lease was released: the next start does not wait out its 15 s TTL.
    let started = Instant::now();
    let (_next, base, _) = start(&db);
    let (_, ready) = until_ready(&client, &base).await;
    assert_eq!(ready, json!({"phase": "ready", "data_version": "2.0.0"}));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
