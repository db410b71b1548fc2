//! The protocol model (docs/MODEL.md), checked exhaustively: three nodes,
//! three tasks, crashes with restarts, a holder paused past its margin, the
//! end of a holder's session, a lost reply to a grant. The negative controls
//! turn a part of the protocol off and must produce a counterexample, whose
//! trace they print (`-- --nocapture`).

#[path = "model/protocol.rs"]
mod protocol;

use std::collections::BTreeSet;
use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model};

use protocol::{Action, Faults, Grace, Outcome, Protocol, Refusal, Switches, E1, EXCUSED_OVERLAP};

/// Crashes and pauses: the first default check, and the budget of the
/// controls of the fence check and the re-read.
const CRASHES_AND_PAUSES: Faults = Faults {
    crashes: 2,
    expiries: 2,
    session_ends: 0,
    lost_replies: 0,
};

/// A session's end and a lost reply, with pauses and a crash: the second
/// default check, and the budget of the E1 controls.
const SESSIONS_AND_REPLIES: Faults = Faults {
    crashes: 1,
    expiries: 2,
    session_ends: 1,
    lost_replies: 1,
};

/// Every fault at once: the larger run (`-- --ignored`).
const ALL: Faults = Faults {
    crashes: 2,
    expiries: 2,
    session_ends: 1,
    lost_replies: 1,
};

const S2: &str = "S2 a write commits only under the store's newest fence";
const S3: &str = "S3 at most one committed completion per task";
const FAULT_FREE_READY: &str = "L2 without faults, once no step is left every node is READY";
const S7: &str = "S7 a READY node read a data version with every task above it complete";

/// Checks the correct protocol with `faults`, up to node symmetry, and
/// asserts every property.
fn check(faults: Faults) {
    let started = Instant::now();
    let model = Protocol {
        symmetry: true,
        ..Protocol::new(faults)
    };
    let checker = model.checker().spawn_bfs().join();
    println!(
        "correct protocol, {} nodes, {} tasks, faults {faults:?}: \
         {} states up to node symmetry, {} transitions, depth {}, {:.1?}",
        protocol::NODES,
        protocol::TASKS,
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    assert!(checker.is_done());
    checker.assert_properties();
}

#[test]
fn the_protocol_keeps_its_invariants_with_crashes_and_pauses() {
    check(CRASHES_AND_PAUSES);
}

#[test]
fn the_protocol_keeps_its_invariants_with_a_session_end_and_a_lost_reply() {
    check(SESSIONS_AND_REPLIES);
}

/// Every fault at once (`-- --ignored`).
#[test]
#[ignore = "explores about 6 million states; run with -- --ignored"]
fn the_protocol_keeps_its_invariants_with_every_fault() {
    check(ALL);
}

/// E1's exception: the shortest run in which a holder paused past its
/// margin still runs its task when the next holder starts it. Then the
/// paused node goes on, and its next write is refused for its stale fence
/// (S2): it writes nothing once the next holder has claimed the store.
#[test]
fn a_paused_holder_overlaps_the_next_one_and_its_writes_are_refused() {
    let model = Protocol::new(CRASHES_AND_PAUSES);
    let checker = model
        .clone()
        .checker()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([EXCUSED_OVERLAP])))
        .spawn_bfs()
        .join();
    let path = checker.discovery(EXCUSED_OVERLAP).expect("an example");
    let mut trace = model.trace(&path);
    let mut state = path.last_state().clone();
    let paused = state
        .nodes
        .iter()
        .position(|n| n.paused)
        .expect("a paused node") as u8;
    let mut outcome = Outcome::Done;
    // Its task ends, then comes its next write: the start of the next task,
    // or the completion of a version's last one.
    for next in [
        &[Action::EndTask(paused)][..],
        &[Action::StartTask(paused), Action::FinishTask(paused)],
    ] {
        let enabled = model.actions_of(&state);
        let action = *next
            .iter()
            .find(|a| enabled.contains(a))
            .expect("the paused node goes on");
        (state, outcome) = model.step(&state, action);
        trace.push_str(&format!("    then {action}: {outcome:?}\n    {state}\n"));
    }
    println!(
        "{EXCUSED_OVERLAP} ({} states explored):\n{trace}",
        checker.unique_state_count()
    );
    assert_eq!(outcome, Outcome::Refused(Refusal::StaleFence));
}

/// Checks `model` until `property` is broken, prints the counterexample, and
/// returns every property broken by then.
fn counterexample(model: Protocol, property: &'static str) -> Vec<&'static str> {
    let started = Instant::now();
    let label = format!("{:?}, faults {:?}", model.switches, model.budget);
    let checker = model
        .checker()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([property])))
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("{label}: no counterexample to {property:?}"));
    let broken: Vec<&'static str> = checker
        .model()
        .properties()
        .iter()
        .filter(|p| p.expectation.discovery_is_failure() && checker.discovery(p.name).is_some())
        .map(|p| p.name)
        .collect();
    println!(
        "{label}\ncounterexample to {property:?} ({} states explored, {:.1?}):\n{}\
         broken so far: {broken:?}\n",
        checker.unique_state_count(),
        started.elapsed(),
        checker.model().trace(&path),
    );
    broken
}

fn with(switches: Switches) -> Protocol {
    Protocol {
        switches,
        ..Protocol::new(CRASHES_AND_PAUSES)
    }
}

/// An E1 control: `switches` with a session's end and a lost reply.
fn e1_control(switches: Switches) -> Protocol {
    Protocol {
        switches,
        ..Protocol::new(SESSIONS_AND_REPLIES)
    }
}

/// Control (a): a paused holder whose lease expired writes after the next
/// holder claimed the store.
#[test]
fn without_the_fence_check_a_stale_holder_writes() {
    let broken = counterexample(
        with(Switches {
            fence_check: false,
            ..Switches::CORRECT
        }),
        S2,
    );
    assert!(broken.contains(&S2));
}

/// Control (a) with the store's duplicate rule off too: the stale holder's
/// completion lands beside the new holder's.
#[test]
fn without_the_fence_check_and_the_duplicate_rule_a_task_completes_twice() {
    let broken = counterexample(
        with(Switches {
            fence_check: false,
            store_rejects_duplicates: false,
            ..Switches::CORRECT
        }),
        S3,
    );
    assert!(broken.contains(&S3));
}

/// Control (notice): every write that records a data version carries the
/// holder's notice, not only the last of a finished plan. A waiting node
/// takes the notice of version 1.1 for its own and reports READY while
/// task t3 of 1.2 is not complete, even without any fault.
#[test]
fn with_a_notice_on_every_data_version_a_node_is_ready_too_early() {
    let fault_free = Protocol {
        switches: Switches {
            notice_only_when_settled: false,
            ..Switches::CORRECT
        },
        ..Protocol::new(Faults::NONE)
    };
    let broken = counterexample(fault_free, S7);
    assert!(broken.contains(&S7));
}

/// Control (b): a node plans from what it read before the lease. The store's
/// refusal of a second completion is off, so that the control shows the
/// re-read itself is needed; it is needed even without any fault.
#[test]
fn without_the_reread_after_acquire_a_task_completes_twice() {
    let switches = Switches {
        reread_after_acquire: false,
        store_rejects_duplicates: false,
        ..Switches::CORRECT
    };
    let broken = counterexample(with(switches), S3);
    assert!(broken.contains(&S3));
    let fault_free = Protocol {
        switches,
        ..Protocol::new(Faults::NONE)
    };
    let broken = counterexample(fault_free, S3);
    assert!(broken.contains(&S3));
}

/// Control (b) with the store's duplicate rule on: the store refuses the
/// stale plan's first write, and a rollout without any fault fails.
#[test]
fn without_the_reread_after_acquire_a_fault_free_rollout_fails() {
    let fault_free = Protocol {
        switches: Switches {
            reread_after_acquire: false,
            ..Switches::CORRECT
        },
        ..Protocol::new(Faults::NONE)
    };
    let broken = counterexample(fault_free, FAULT_FREE_READY);
    assert!(broken.contains(&FAULT_FREE_READY));
}

/// Control (E1-1): the holder never learns that its session ended. A
/// waiting node takes the lease over after the grace while the holder still
/// runs its task.
#[test]
fn without_loss_detection_two_nodes_run_task_code_at_once() {
    let broken = counterexample(
        e1_control(Switches {
            loss_detection: false,
            ..Switches::CORRECT
        }),
        E1,
    );
    assert!(broken.contains(&E1));
}

/// Control (E1-2): the grace is no longer than the detection time, so a
/// takeover may come before the holder has learnt of its session's end.
#[test]
fn with_a_grace_no_longer_than_detection_two_nodes_run_task_code_at_once() {
    let broken = counterexample(
        e1_control(Switches {
            grace: Grace::NotPastDetection,
            ..Switches::CORRECT
        }),
        E1,
    );
    assert!(broken.contains(&E1));
}

/// A grace longer than the detection time but not by the margin: a holder
/// paused around its detection for less than its margin (which E1 does not
/// excuse) learns of its session's end after the takeover.
#[test]
fn with_a_grace_past_detection_but_within_the_margin_a_short_pause_breaks_e1() {
    let broken = counterexample(
        e1_control(Switches {
            grace: Grace::PastDetection,
            ..Switches::CORRECT
        }),
        E1,
    );
    assert!(broken.contains(&E1));
}

/// Control (E1-3): the local deadline counts from the reply to the grant
/// or renewal. A reply that comes later than the margin puts the deadline
/// after the lease's expiry, and the holder runs on, not paused, after a
/// takeover.
#[test]
fn with_the_deadline_counted_from_the_reply_two_nodes_run_task_code_at_once() {
    let broken = counterexample(
        e1_control(Switches {
            deadline_from_request: false,
            ..Switches::CORRECT
        }),
        E1,
    );
    assert!(broken.contains(&E1));
}

/// The correct protocol without the symmetry reduction: the same verdict
/// on six times as many states (`-- --ignored`).
#[test]
#[ignore = "explores about 3 million states; run with -- --ignored"]
fn the_protocol_keeps_its_invariants_without_symmetry_reduction() {
    let started = Instant::now();
    let checker = Protocol::new(CRASHES_AND_PAUSES)
        .checker()
        .spawn_bfs()
        .join();
    println!(
        "correct protocol without symmetry reduction: {} states, {} transitions, {:.1?}",
        checker.unique_state_count(),
        checker.state_count(),
        started.elapsed()
    );
    assert!(checker.is_done());
    checker.assert_properties();
}

/// With one part off, the others keep safety: the full state spaces, which
/// take several minutes (`-- --ignored`). Without the fence check only S2
/// breaks, without the re-read only fault-free L2; without what keeps task
/// code exclusive, only E1: the fences still keep the store safe.
#[test]
#[ignore = "explores about 9 million states; run with -- --ignored"]
fn one_part_off_the_others_keep_safety() {
    let cases = [
        (
            Switches {
                fence_check: false,
                ..Switches::CORRECT
            },
            CRASHES_AND_PAUSES,
            vec![S2],
        ),
        (
            Switches {
                reread_after_acquire: false,
                ..Switches::CORRECT
            },
            CRASHES_AND_PAUSES,
            vec![FAULT_FREE_READY],
        ),
        (
            Switches {
                loss_detection: false,
                ..Switches::CORRECT
            },
            SESSIONS_AND_REPLIES,
            vec![E1],
        ),
        (
            Switches {
                grace: Grace::NotPastDetection,
                ..Switches::CORRECT
            },
            SESSIONS_AND_REPLIES,
            vec![E1],
        ),
        (
            Switches {
                deadline_from_request: false,
                ..Switches::CORRECT
            },
            SESSIONS_AND_REPLIES,
            vec![E1],
        ),
    ];
    for (switches, faults, expected) in cases {
        let started = Instant::now();
        let model = Protocol {
            symmetry: true,
            switches,
            ..Protocol::new(faults)
        };
        let checker = model.checker().spawn_bfs().join();
        assert!(checker.is_done());
        let broken: Vec<&'static str> = checker
            .model()
            .properties()
            .iter()
            .filter(|p| p.expectation.discovery_is_failure() && checker.discovery(p.name).is_some())
            .map(|p| p.name)
            .collect();
        println!(
            "{switches:?}, faults {faults:?}: {} states up to node symmetry, {:.1?}, broken: {broken:?}",
            checker.unique_state_count(),
            started.elapsed()
        );
        assert_eq!(broken, expected);
    }
}
