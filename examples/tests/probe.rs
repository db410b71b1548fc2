//! The probe example answers `/readyz` with 503 while the upgrade runs and
//! 200 after, and `/healthz` with 200 throughout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

/// Stops the probe server however the test ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readyz_turns_200_when_the_upgrade_is_done() {
    let mut child = Server(
        Command::new(env!("CARGO_BIN_EXE_probe"))
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.strip_prefix("listening on ").unwrap().to_owned();
    assert_eq!(get(&addr, "/nope").0, 404);
    let mut saw_503 = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready_body = loop {
        let (health, _) = get(&addr, "/healthz");
        assert_eq!(health, 200, "/healthz is 200 while upgrading");
        match get(&addr, "/readyz") {
            (503, body) => saw_503 = Some(body),
            (200, body) => break body,
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(child);
    let not_ready = saw_503.expect("/readyz was 503 before the upgrade finished");
    assert!(
        not_ready.starts_with("upgrading: task 1 of 1 (slow_backfill@2.0.0)")
            || not_ready == "starting",
        "{not_ready}"
    );
    assert_eq!(ready_body, "ready at data version 2.0.0");
}
