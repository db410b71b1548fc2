//! One trial: the nodes (the real runner, restarted as an orchestrator
//! would), the tasks they run, and the seeded chaos around them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use upsilon::backend::{Lock, Store};
use upsilon::testing::{self, Fault, MemoryBackend, SessionModel};
use upsilon::{Error, Holder, LeaseLoss, RetryPolicy, Task, TaskContext, TaskFuture, Upsilon};

use crate::check::check;
use crate::link::Link;
use crate::world::{lock, Amnesia, Code, Controls, Count, Counts, World};
use crate::{key, APP, CONVERGE_BY, FAULTS_UNTIL, MARGIN, SERVICE, TASKS, TTL};

/// The result of one trial.
pub struct Trial {
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    pub counts: Counts,
    /// When the first E1 or deadline violation happened.
    pub focus: Option<Duration>,
}

/// The body of a task and of its rollback: records when it runs, takes a
/// while, and fails as the seed says while the faults last.
fn code(
    world: &Arc<World>,
) -> impl for<'a> Fn(&'a mut TaskContext) -> TaskFuture<'a> + Send + Sync {
    let world = world.clone();
    move |ctx: &mut TaskContext| -> TaskFuture<'_> {
        let world = world.clone();
        Box::pin(async move {
            let run = world.begin(ctx);
            let rollback = ctx.task().rollback;
            let id = ctx.task().id.clone();
            let faults = world.faults_on.load(Ordering::SeqCst);
            let flaky = world.flaky == Some(id.as_str()) && !rollback;
            let (took, fail) = world.rng(|r| {
                let odds = match (rollback, flaky) {
                    (true, _) => 10,
                    (false, true) => 85,
                    (false, false) => 5,
                };
                let fail = faults && r.chance(odds);
                // A failing attempt fails early, as most do.
                let took = r.ms(match (fail, rollback) {
                    (true, _) => 300,
                    (false, true) => 800,
                    (false, false) => 1500,
                });
                (took, fail)
            });
            let node = ctx.holder().host.clone();
            let what = if rollback { "rolls back" } else { "runs" };
            world.log(format!(
                "{node} {what} {id} under fence {} ({took:?})",
                ctx.fence()
            ));
            tokio::time::sleep(took).await;
            run.returned();
            if fail {
                let (count, what) = if rollback {
                    (Count::RollbackFailures, "rollback of")
                } else {
                    (Count::TaskFailures, "task")
                };
                world.count(count);
                world.log(format!("{node} FAILS {what} {id} (injected)"));
                return Err("injected failure".into());
            }
            Ok(())
        })
    }
}

fn tasks(world: &Arc<World>) -> Vec<Task> {
    TASKS
        .iter()
        .map(|(version, order, id)| {
            Task::new(version, *order, id, code(world))
                .unwrap()
                .with_rollback(code(world))
        })
        .collect()
}

/// Runs one node until it is READY: restarted after an error (as Kubernetes
/// would) or after a crash, with a new run id each time.
#[cfg_attr(not(feature = "negative-controls"), allow(unused_variables))]
async fn drive(world: Arc<World>, node: usize, controls: Controls) {
    let name = format!("node-{node}");
    for incarnation in 0.. {
        let link = Link {
            world: world.clone(),
            node: name.clone(),
            dead: Arc::new(AtomicBool::new(false)),
        };
        let holder = Holder {
            host: name.clone(),
            pod: None,
            pid: incarnation,
            run_id: format!("{node}-{incarnation}"),
        };
        #[allow(unused_mut)]
        let mut builder = Upsilon::builder()
            .service(SERVICE)
            .app_version(APP)
            .lock(Arc::new(link.clone()))
            .store(Arc::new(link.clone()))
            .holder(holder)
            .tasks(tasks(&world))
            .ttl(TTL)
            .safety_margin(MARGIN)
            .poll_interval(Duration::from_millis(100))
            .retry(RetryPolicy::attempts(3, Duration::from_millis(100)))
            .rollback_on_failure(true);
        #[cfg(feature = "negative-controls")]
        if controls.skip_reread {
            builder = builder.skip_reread_after_acquire();
        }
        #[cfg(feature = "negative-controls")]
        if controls.skip_wait_out {
            builder = builder.skip_waiting_out_a_forgetful_lock();
        }
        let up = builder.build().unwrap();
        let w = world.clone();
        let run = tokio::spawn(async move {
            let result = up.run().await;
            if result.is_ok() {
                // S7, checked at the instant of READY (the backend does not
                // yield, so nothing runs in between).
                let snap = w.backend.load(SERVICE).await.unwrap();
                let app = upsilon::parse_version(APP).unwrap();
                for (v, _, id) in TASKS {
                    let key = key(v, id);
                    let covered = snap
                        .data_version
                        .as_ref()
                        .is_some_and(|d| &key.version <= d)
                        && snap.is_completed(&key);
                    if key.version <= app && !snap.is_completed(&key) && !covered {
                        lock(&w.ready_violations).push(format!(
                            "S7: a node reported READY at {APP} while {id}@{v} was not complete"
                        ));
                    }
                }
            }
            result
        });
        lock(&world.running).insert(node, (link.clone(), run.abort_handle()));
        match run.await {
            Ok(Ok(outcome)) => {
                world.log(format!("{name} READY: {outcome}"));
                lock(&world.running).remove(&node);
                return;
            }
            Ok(Err(e)) => {
                match &e {
                    Error::LeaseLost {
                        reason: LeaseLoss::Signalled { .. },
                        ..
                    } => world.count(Count::StoppedSignalled),
                    Error::LeaseLost {
                        reason: LeaseLoss::Deadline { .. },
                        ..
                    } => world.count(Count::StoppedDeadline),
                    Error::TaskFailed { .. } => world.count(Count::FailedForGood),
                    _ => {}
                }
                world.log(format!("{name} failed: {e}"))
            }
            Err(_) => world.log(format!("{name} crashed")),
        }
        let pause = world.rng(|r| r.ms(500)) + Duration::from_millis(50);
        tokio::time::sleep(pause).await;
    }
}

/// The fence of the lease the backend holds live now, if any.
async fn live_fence(world: &World) -> Option<u64> {
    world
        .backend
        .current(SERVICE)
        .await
        .ok()
        .flatten()
        .map(|l| l.fence)
}

/// Ends the lease holder's session, preferably under running task code:
/// waits up to 2 s for some to run, then up to 300 ms more.
async fn end_session(world: &World) {
    for _ in 0..40 {
        if !world.in_progress().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let extra = world.rng(|r| r.ms(300));
    tokio::time::sleep(extra).await;
    if world.now() >= FAULTS_UNTIL {
        return;
    }
    let Some(fence) = live_fence(world).await else {
        return;
    };
    if !lock(&world.sessions_ended).insert(fence) {
        return; // Already ended: a second end changes nothing.
    }
    let under: Vec<Code> = world
        .in_progress()
        .iter()
        .filter(|r| r.fence == fence)
        .map(|r| r.code)
        .collect();
    if !world.backend.end_session(SERVICE) {
        return;
    }
    let (count, what) = match under.first() {
        Some(Code::Task) => (Count::SessionEndsUnderTask, "under a running task"),
        Some(Code::Rollback) => (Count::SessionEndsUnderRollback, "under a running rollback"),
        None => (Count::SessionEndsIdle, "with no task code running"),
    };
    world.count(count);
    world.log(format!("END SESSION of fence {fence} {what}"));
}

/// Crashes, lease expiries, clock jumps, session ends, late and lost grant
/// replies and renewal outages, at seeded times, until the faults heal.
async fn chaos(world: Arc<World>, nodes: usize) {
    loop {
        let wait = world.rng(|r| r.ms(2000));
        tokio::time::sleep(wait).await;
        if world.now() >= FAULTS_UNTIL {
            world.faults_on.store(false, Ordering::SeqCst);
            *lock(&world.armed) = None;
            *lock(&world.renew_outage_until) = None;
            world.log("faults healed");
            return;
        }
        let (what, node) = world.rng(|r| (r.below(20), r.below(nodes as u64) as usize));
        match what {
            0..=5 => {
                let victim = lock(&world.running).get(&node).cloned();
                if let Some((link, abort)) = victim {
                    world.count(Count::Crashes);
                    world.log(format!("CRASH node-{node}"));
                    link.dead.store(true, Ordering::SeqCst);
                    abort.abort();
                }
            }
            6..=7 => {
                if let Some(fence) = live_fence(&world).await {
                    lock(&world.cut_short).insert(
                        fence,
                        format!("forced expiry at {} ms", world.now().as_millis()),
                    );
                }
                world.count(Count::Expiries);
                world.log("EXPIRE the lease");
                world.backend.expire_lease(SERVICE);
            }
            8..=9 => {
                let jump = world.rng(|r| r.below(3000) as i64 - 1000);
                if let (Some(fence), true) = (live_fence(&world).await, jump > 0) {
                    let mut jumped = lock(&world.jumped);
                    let total = jumped.entry(fence).or_default();
                    *total += jump;
                    if *total > MARGIN.as_millis() as i64 {
                        lock(&world.cut_short).insert(
                            fence,
                            format!("the backend clock jumped {total} ms forward in all"),
                        );
                    }
                }
                world.count(Count::ClockJumps);
                world.log(format!("CLOCK jumps {jump} ms"));
                world.backend.jump_clock(jump);
            }
            10..=12 => end_session(&world).await,
            13..=14 => {
                let late = world.rng(|r| r.ms(2500));
                world.log(format!("ARM the next grant request: reply {late:?} late"));
                *lock(&world.armed) = Some(Fault::DelayReply(late));
            }
            15..=16 => {
                world.log("ARM the next grant request: reply lost");
                *lock(&world.armed) = Some(Fault::LoseReply);
            }
            17..=18 => {
                let length = TTL + world.rng(|r| r.ms(1000));
                world.count(Count::RenewalOutages);
                world.log(format!("RENEWALS fail for {length:?}"));
                *lock(&world.renew_outage_until) = Some(world.now() + length);
            }
            // Not before the store's first claim: then there is no fence to
            // tell that the lock forgot (docs/DESIGN.md says so).
            _ if world.lock_apart && world.backend.store_fence(SERVICE) > 0 => {
                let amnesia = Amnesia {
                    grants: world.backend.grants().len(),
                    store_fence: world.backend.store_fence(SERVICE),
                };
                let forgot = world.backend.forget_lock(SERVICE);
                lock(&world.amnesias).push(amnesia);
                world.count(Count::LockAmnesias);
                world.log(format!(
                    "LOCK FORGETS its state ({})",
                    if forgot {
                        "a live lease with it"
                    } else {
                        "no live lease"
                    }
                ));
            }
            _ => {}
        }
    }
}

pub fn trial(seed: u64, controls: Controls) -> Trial {
    testing::seed_thread_rng(Some(seed ^ 0x5eed));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let trial = rt.block_on(async {
        let backend = MemoryBackend::new();
        #[cfg(feature = "negative-controls")]
        if controls.skip_fence_check {
            backend.skip_fence_check();
        }
        let mut model = SessionModel::default();
        if !controls.loss_detection {
            model.detection = None;
        }
        backend.set_session_model(model);
        // Half the trials have a task that fails 85 % of its attempts while the
        // faults last, so that it fails for good and is rolled back.
        let mut rng = crate::world::Rng(seed ^ 0xf1a4);
        let flaky = rng
            .chance(50)
            .then(|| TASKS[rng.below(TASKS.len() as u64) as usize].2);
        // Half the trials keep the lock apart from the store, a lock that
        // may forget its state (a Redis restarted without its data).
        let lock_apart = rng.chance(50);
        backend.set_lock_apart(lock_apart);
        // Half the others have a lock that answers, as PostgreSQL's does,
        // that the store moved since it was read instead of granting the
        // free lease (a generator of its own, so that the draws above keep
        // their seeds).
        let store_moved = !lock_apart && crate::world::Rng(seed ^ 0x5707e).chance(50);
        backend.set_store_moved_answers(store_moved);
        let world = Arc::new(World::new(seed, backend, flaky, lock_apart));
        let nodes = 2 + world.rng(|r| r.below(3)) as usize;
        world.log(format!(
            "seed {seed}: {nodes} nodes, flaky task {flaky:?}, lock apart {lock_apart}, store-moved answers {store_moved}, {model:?}, controls {controls:?}"
        ));
        let chaos = tokio::spawn(chaos(world.clone(), nodes));
        let drivers: Vec<_> = (0..nodes)
            .map(|n| {
                let w = world.clone();
                tokio::spawn(async move {
                    // Nodes start within a second of each other, as a rollout does.
                    let delay = w.rng(|r| r.ms(1000));
                    tokio::time::sleep(delay).await;
                    drive(w, n, controls).await
                })
            })
            .collect();
        let converged = tokio::time::timeout(CONVERGE_BY, async {
            for d in drivers {
                d.await.unwrap();
            }
        })
        .await
        .is_ok();
        chaos.abort();
        let (mut violations, tally) = check(&world);
        if !converged {
            violations.push(format!(
                "L2/L3: the cluster did not converge within {CONVERGE_BY:?} of virtual time"
            ));
        }
        let mut counts = lock(&world.counts).clone();
        counts.0.insert(Count::Excused, tally.excused);
        counts.0.insert(Count::BehindGrants, tally.behind);
        let rollbacks = lock(&world.runs)
            .iter()
            .filter(|r| r.code == Code::Rollback)
            .count() as u64;
        counts.0.insert(Count::RollbackRuns, rollbacks);
        let trace = std::mem::take(&mut *lock(&world.trace));
        Trial {
            violations,
            trace,
            counts,
            focus: tally.focus,
        }
    });
    testing::seed_thread_rng(None);
    trial
}
