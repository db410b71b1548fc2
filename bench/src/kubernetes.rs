//! Scenario 6: the Kubernetes backend, against the in-process stand-in for
//! the API server (`upsilon_test_servers::kube_api`) on a loopback port:
//!
//! - 6a, start-up of a node already at its version, connect included,
//!   beside a bare kube client that reads one ConfigMap;
//! - 6b, convergence: N nodes wait (each its own client and watches) while
//!   a canary runs the new release's task; how long after the canary's
//!   final commit (the write of the new data version, when the stand-in
//!   committed it) is the last node READY?
//! - 6c, failover: the canary process is SIGKILLed mid-task while waiting
//!   node processes wait; how long until another node holds the lease, and
//!   until every node is READY? A dead holder's lease is taken over only
//!   once it has expired on the waiting nodes' own clocks (a TTL after the
//!   last renewal they saw).
//!
//! The stand-in answers in microseconds where an API server over a network
//! answers in milliseconds, so these figures are what Upsilon adds, not what
//! a cluster costs: each row's request count says how many round trips a
//! real cluster would add.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use upsilon::backend::{Backend, Lock};
use upsilon::{Outcome, Status, Upsilon};
use upsilon_backends::kubernetes::{
    k8s_openapi::api::core::v1::ConfigMap, kube, KubernetesBackend, KubernetesOptions,
};
use upsilon_test_servers::kube_api::{KubeApi, Resource, TOKEN};

use crate::common::{released_tasks, runner};
use crate::convergence::gated_task;
use crate::report::{Report, Row, Unit};
use crate::stats::{ms, summary};
use crate::Options;

const NAMESPACE: &str = "bench";

fn config(api: &KubeApi) -> kube::Config {
    let mut c = kube::Config::new(api.url().parse().expect("the stand-in's URL"));
    c.default_namespace = NAMESPACE.to_owned();
    c.auth_info.token = Some(TOKEN.to_owned().into());
    c
}

async fn backend(api: &KubeApi) -> anyhow::Result<Arc<KubernetesBackend>> {
    Ok(Arc::new(
        KubernetesBackend::connect(KubernetesOptions::new().config(config(api))).await?,
    ))
}

async fn at_released(service: &str, backend: Arc<dyn Backend>) -> anyhow::Result<()> {
    let outcome = runner(service, "1.0", backend, released_tasks())?
        .run()
        .await?;
    ensure!(
        matches!(outcome, Outcome::Upgraded { .. }),
        "setting up {service}: {outcome}"
    );
    Ok(())
}

fn requests(api: &KubeApi) -> u64 {
    api.requests().values().sum()
}

/// 6a.
async fn startup(api: &KubeApi, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let service = "k8s-startup";
    at_released(service, backend(api).await?).await?;
    let name = backend(api).await?.object_name(service);
    let (mut up, mut bare) = (Vec::new(), Vec::new());
    let mut counted = Vec::new();
    let warm = (o.startup_iters / 10).max(1);
    for i in 0..o.startup_iters + warm {
        let before = api.requests();
        let t = Instant::now();
        let b = KubernetesBackend::connect(KubernetesOptions::new().config(config(api))).await?;
        let outcome = runner(service, "1.0", Arc::new(b.clone()), released_tasks())?
            .run()
            .await?;
        let took = t.elapsed();
        ensure!(matches!(outcome, Outcome::UpToDate { .. }), "{outcome}");
        let after = api.requests();
        let blocking: u64 = ["get configmaps", "get leases"]
            .iter()
            .map(|k| after.get(*k).unwrap_or(&0) - before.get(*k).unwrap_or(&0))
            .sum();
        drop(b);
        let t = Instant::now();
        let client = kube::Client::try_from(config(api))?;
        let cms: kube::Api<ConfigMap> = kube::Api::namespaced(client, NAMESPACE);
        cms.get(&name).await?;
        let bare_took = t.elapsed();
        if i >= warm {
            up.push(ms(took));
            bare.push(ms(bare_took));
            counted.push(blocking as f64);
        }
    }
    let (u, b) = (summary(&up), summary(&bare));
    let baseline = "kube client + GET of one ConfigMap";
    report.push(
        Row::new(
            "6a",
            "K8s start-up to READY, connect included, p50",
            Unit::Ms,
            u.p50,
        )
        .vs(baseline, b.p50),
    );
    report.push(
        Row::new(
            "6a",
            "K8s start-up to READY, connect included, p99",
            Unit::Ms,
            u.p99,
        )
        .vs(baseline, b.p99),
    );
    report.push(
        Row::new(
            "6a",
            "K8s requests a start-up waits for (GETs; the watches start beside them)",
            Unit::Count,
            summary(&counted).p50,
        )
        .vs("one GET", 1.0),
    );
    report.detail("6a", json!({"upsilon_ms": up, "bare_ms": bare}));
    Ok(())
}

/// 6b: one upgrade with `n` waiting nodes; ms from the canary's final
/// commit to the last node READY, and the requests the waiters made.
async fn round(
    api: &KubeApi,
    service: &str,
    nodes: &[Arc<KubernetesBackend>],
    canary: &Arc<KubernetesBackend>,
    task: Duration,
) -> anyhow::Result<(f64, u64)> {
    at_released(service, canary.clone()).await?;
    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = released_tasks();
    tasks.push(gated_task(go_rx, task));
    let canary_up = Upsilon::builder()
        .service(service)
        .app_version("1.1")
        .backend(canary.clone())
        .tasks(tasks)
        .build()?;
    let mut status = canary_up.status();
    let canary_run = tokio::spawn(async move { canary_up.run().await });
    tokio::time::timeout(
        Duration::from_secs(60),
        status.wait_for(|s| matches!(s, Status::Upgrading { .. })),
    )
    .await
    .context("the canary never upgraded")??;
    let mut runs = Vec::new();
    let mut statuses = Vec::new();
    for node in nodes {
        let (_never_tx, never_rx) = watch::channel(false);
        let mut tasks = released_tasks();
        tasks.push(gated_task(never_rx, Duration::ZERO));
        let up = Upsilon::builder()
            .service(service)
            .app_version("1.1")
            .backend(node.clone())
            .tasks(tasks)
            .max_wait(Duration::from_secs(120))
            .build()?;
        statuses.push(up.status());
        runs.push(tokio::spawn(async move {
            let r = up.run().await;
            (r, Instant::now())
        }));
    }
    for s in &mut statuses {
        tokio::time::timeout(
            Duration::from_secs(60),
            s.wait_for(|s| matches!(s, Status::Waiting { .. })),
        )
        .await
        .context("a node never waited")??;
    }
    let before = requests(api);
    go_tx.send(true)?;
    let outcome = canary_run.await??;
    ensure!(matches!(outcome, Outcome::Upgraded { .. }), "{outcome}");
    // The write that recorded the new data version, as the API server
    // committed it (the canary then copies the history to its page).
    let commit = api
        .written_at(
            Resource::ConfigMaps,
            NAMESPACE,
            &canary.object_name(service),
        )
        .context("the canary wrote nothing")?;
    let mut last = commit;
    for r in runs {
        let (result, at) = r.await?;
        let outcome = result?;
        ensure!(
            matches!(outcome, Outcome::WaitedForOther { .. }),
            "a waiting node: {outcome}"
        );
        last = last.max(at);
    }
    Ok((ms(last - commit), requests(api) - before))
}

async fn convergence(api: &KubeApi, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let task = Duration::from_millis(o.task_ms);
    let canary = backend(api).await?;
    for &n in &o.kube_nodes {
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(backend(api).await?);
        }
        // Every waiting node's watches up before the first round.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !nodes.iter().all(|n| n.notifies()) {
            ensure!(Instant::now() < deadline, "the watches did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (mut lasts, mut counts) = (Vec::new(), Vec::new());
        for r in 0..o.repeats {
            let service = format!("k8s-converge-{n}-{r}");
            let (last, count) = round(api, &service, &nodes, &canary, task).await?;
            lasts.push(last);
            counts.push(count as f64 / n as f64);
        }
        let s = summary(&lasts);
        report.push(Row::new(
            "6b",
            format!("K8s, {n} nodes: canary's final commit to last node READY, p50"),
            Unit::Ms,
            s.p50,
        ));
        report.push(Row::new(
            "6b",
            format!(
                "K8s, {n} nodes: canary's final commit to last node READY, p99 of {}",
                s.n
            ),
            Unit::Ms,
            s.p99,
        ));
        report.push(Row::new(
            "6b",
            format!("K8s, {n} nodes: requests per waiting node from the canary's go to READY, p50"),
            Unit::Count,
            summary(&counts).p50,
        ));
        report.detail(
            &format!("6b_{n}"),
            json!({"last_ready_ms": lasts, "requests_per_node": counts}),
        );
    }
    Ok(())
}

/// A node process of this binary on the stand-in; its printed lines go to
/// `tx` with the instant each arrived.
fn spawn_node(
    url: &str,
    service: &str,
    name: &str,
    task_ms: u64,
    ttl_ms: u64,
    tx: tokio::sync::mpsc::UnboundedSender<(String, String, Instant)>,
) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "node",
            "upsilon",
            "--url",
            url,
            "--service",
            service,
            "--name",
            name,
        ])
        .args([
            "--task-ms",
            &task_ms.to_string(),
            "--ttl-ms",
            &ttl_ms.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().context("the node's stdout")?;
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send((name.clone(), line, Instant::now()));
        }
    });
    Ok(child)
}

async fn failover(
    api: &KubeApi,
    dir: &Path,
    o: &Options,
    report: &mut Report,
) -> anyhow::Result<()> {
    let kubeconfig = dir.join("bench.kubeconfig");
    api.write_kubeconfig(&kubeconfig, NAMESPACE);
    let url = format!(
        "kubernetes://{NAMESPACE}?kubeconfig={}",
        kubeconfig.display()
    );
    let watcher = backend(api).await?;
    let (mut taken, mut ready) = (Vec::new(), Vec::new());
    for r in 0..o.failover_repeats {
        let service = format!("k8s-failover-{r}");
        at_released(&service, watcher.clone()).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut seen: Vec<(String, String, Instant)> = Vec::new();
        let mut canary = spawn_node(&url, &service, "canary", 60_000, o.ttl_ms, tx.clone())?;
        while !seen
            .iter()
            .any(|(n, l, _)| n == "canary" && l == "upgrading")
        {
            let e = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .context("the canary never upgraded")?
                .context("the canary's output ended")?;
            ensure!(e.1 != "failed", "the canary failed");
            seen.push(e);
        }
        let mut waiters = Vec::new();
        for w in 0..o.failover_waiters {
            waiters.push(spawn_node(
                &url,
                &service,
                &format!("waiter{w}"),
                100,
                o.ttl_ms,
                tx.clone(),
            )?);
        }
        for w in 0..o.failover_waiters {
            let name = format!("waiter{w}");
            while !seen.iter().any(|(n, l, _)| *n == name && l == "waiting") {
                let e = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                    .await
                    .context("a waiter never waited")?
                    .context("output ended")?;
                seen.push(e);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = Instant::now();
        canary.start_kill()?;
        let new_holder = loop {
            if let Some(l) = watcher.current(&service).await? {
                if l.holder.pod.as_deref() != Some("canary") {
                    break Instant::now();
                }
            }
            ensure!(killed.elapsed() < Duration::from_secs(120), "no takeover");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let mut last_ready = killed;
        let mut done = 0;
        while done < o.failover_waiters {
            let (_, line, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .context("a waiter never became READY")?
                .context("output ended")?;
            if line.starts_with("ready") {
                done += 1;
                last_ready = last_ready.max(at);
            }
            ensure!(line != "failed", "a waiter failed");
        }
        for mut w in waiters {
            let _ = w.wait().await;
        }
        let _ = canary.wait().await;
        taken.push((new_holder - killed).as_secs_f64());
        ready.push((last_ready - killed).as_secs_f64());
    }
    let ttl = o.ttl_ms as f64 / 1000.0;
    let (t, r) = (summary(&taken), summary(&ready));
    report.push(
        Row::new(
            "6c",
            format!("K8s, TTL {ttl} s: kill to new lease holder, p50"),
            Unit::S,
            t.p50,
        )
        .at_most(ttl + 0.5, format!("<= TTL + 0.5 s = {} s", ttl + 0.5)),
    );
    report.push(
        Row::new(
            "6c",
            format!("K8s, TTL {ttl} s: kill to new lease holder, max of {}", t.n),
            Unit::S,
            t.max,
        )
        .at_most(ttl + 0.5, format!("<= TTL + 0.5 s = {} s", ttl + 0.5)),
    );
    report.push(
        Row::new(
            "6c",
            format!("K8s, TTL {ttl} s: kill to every node READY, max of {}", r.n),
            Unit::S,
            r.max,
        )
        .at_most(
            ttl + 0.6,
            format!("<= TTL + 0.5 s + 0.1 s re-run = {} s", ttl + 0.6),
        ),
    );
    report.detail("6c", json!({"taken_s": taken, "ready_s": ready}));
    Ok(())
}

pub async fn run(dir: &Path, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let api = KubeApi::start().await;
    startup(&api, o, report).await.context("6a")?;
    convergence(&api, o, report).await.context("6b")?;
    failover(&api, dir, o, report).await.context("6c")?;
    report.detail("6_requests", json!(api.requests()));
    Ok(())
}
