//! The holder's notice: the last write of a finished upgrade tells the
//! waiting nodes that their plan is done, so that one whose plan inputs are
//! the holder's becomes READY without reading the store, and any other reads
//! it and does what is left.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use upsilon::backend::Store;
use upsilon::testing::{self, MemoryBackend, Op};
use upsilon::{Outcome, Status, Task, TaskContext, TaskFuture, Upsilon, Version};

const SERVICE: &str = "svc";

fn quick(version: &str, name: &str) -> Task {
    Task::new(version, 2, name, |_: &mut TaskContext| -> TaskFuture<'_> {
        Box::pin(async { Ok(()) })
    })
    .unwrap()
}

fn runner(n: usize, backend: &Arc<MemoryBackend>, tasks: &[Task]) -> Upsilon {
    builder(n, backend, tasks).build().unwrap()
}

fn builder(n: usize, backend: &Arc<MemoryBackend>, tasks: &[Task]) -> upsilon::Builder {
    Upsilon::builder()
        .service(SERVICE)
        .app_version("1.1")
        .holder(testing::holder(n))
        .ttl(Duration::from_secs(5))
        .backend(backend.clone())
        .tasks(tasks.to_vec())
}

/// Until `node` reports that it waits for another node's lease.
async fn waiting(node: &Upsilon) {
    let mut status = node.status();
    status
        .wait_for(|s| matches!(s, Status::Waiting { .. }))
        .await
        .unwrap();
}

type Run = tokio::task::JoinHandle<Result<Outcome, upsilon::Error>>;

/// A canary at 1.1 whose task is parked, and a waiting node with the
/// canary's task and `tasks`, built by `build`; returns both runs once the
/// waiting node waits, and the gate.
async fn behind_a_canary(
    backend: &Arc<MemoryBackend>,
    tasks: &[Task],
    build: impl FnOnce(upsilon::Builder) -> upsilon::Builder,
) -> (Run, Run, Arc<Notify>) {
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let task = common::parked_at("1.1", "backfill", &gate, &entered);
    let canary = runner(0, backend, std::slice::from_ref(&task));
    let canary = tokio::spawn(async move { canary.run().await });
    entered.notified().await;
    let mut tasks = tasks.to_vec();
    tasks.insert(0, task);
    let node = build(builder(1, backend, &tasks)).build().unwrap();
    let run = {
        let node = node.clone();
        tokio::spawn(async move { node.run().await })
    };
    waiting(&node).await;
    (canary, run, gate)
}

#[tokio::test]
async fn a_waiting_node_with_the_holders_plan_is_ready_from_its_notice_without_a_read() {
    let backend = MemoryBackend::new();
    let (canary, node, gate) = behind_a_canary(&backend, &[], |b| b).await;
    let reads = backend.faults().calls(Op::Load);
    gate.notify_one();
    assert!(matches!(
        canary.await.unwrap().unwrap(),
        Outcome::Upgraded { .. }
    ));
    match node.await.unwrap().unwrap() {
        Outcome::WaitedForOther {
            holder,
            data_version,
            ..
        } => {
            assert_eq!(holder, Some(testing::holder(0)));
            assert_eq!(data_version, Some(Version::new(1, 1, 0)));
        }
        other => panic!("the waiting node ended with {other:?}"),
    }
    assert_eq!(
        backend.faults().calls(Op::Load),
        reads,
        "the waiting node read the store after the canary's notice"
    );
    let notice = backend.notice(SERVICE).expect("the canary's notice");
    assert_eq!(notice.fence, 1);
    assert_eq!(notice.data_version, Some(Version::new(1, 1, 0)));
}

#[tokio::test]
async fn a_waiting_node_with_another_plan_reads_and_runs_what_is_left() {
    let backend = MemoryBackend::new();
    // Same app version, one task more, and tasks added out of order run:
    // once the canary is done, this node's plan still holds `extra`.
    let (canary, node, gate) = behind_a_canary(&backend, &[quick("1.1", "extra")], |b| {
        b.run_out_of_order(true)
    })
    .await;
    gate.notify_one();
    assert!(matches!(
        canary.await.unwrap().unwrap(),
        Outcome::Upgraded { .. }
    ));
    match node.await.unwrap().unwrap() {
        Outcome::Upgraded { report } => {
            let ran: Vec<&str> = report.completed.iter().map(|t| t.key.id.as_str()).collect();
            assert_eq!(ran, ["extra"]);
        }
        other => panic!("the node with one task more ended with {other:?}"),
    }
}
