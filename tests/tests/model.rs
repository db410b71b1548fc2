//! The protocol model (docs/MODEL.md), checked exhaustively: three nodes,
//! three tasks, crashes with restarts, lease expiry. The negative controls
//! turn a part of the protocol off and must produce a counterexample, whose
//! trace they print (`-- --nocapture`).

#[path = "model/protocol.rs"]
mod protocol;

use std::collections::BTreeSet;
use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model};

use protocol::{Protocol, Switches};

const CRASHES: u8 = 2;
const EXPIRIES: u8 = 2;

const S2: &str = "S2 a write commits only under the store's newest fence";
const S3: &str = "S3 at most one committed completion per task";
const FAULT_FREE_READY: &str = "L2 without faults, once no step is left every node is READY";

#[test]
fn the_protocol_keeps_its_invariants() {
    let started = Instant::now();
    let model = Protocol {
        symmetry: true,
        ..Protocol::new(CRASHES, EXPIRIES)
    };
    let checker = model.checker().spawn_bfs().join();
    println!(
        "correct protocol, {} nodes, {} tasks, up to {CRASHES} crashes and {EXPIRIES} expiries: \
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

/// Checks `model` until `property` is broken, prints the counterexample, and
/// returns every property broken by then.
fn counterexample(model: Protocol, property: &'static str) -> Vec<&'static str> {
    let started = Instant::now();
    let label = format!(
        "{:?}, up to {} crashes and {} expiries",
        model.switches, model.max_crashes, model.max_expiries
    );
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
        ..Protocol::new(CRASHES, EXPIRIES)
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
        ..Protocol::new(0, 0)
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
        ..Protocol::new(0, 0)
    };
    let broken = counterexample(fault_free, FAULT_FREE_READY);
    assert!(broken.contains(&FAULT_FREE_READY));
}

/// The correct protocol without the symmetry reduction: the same verdict
/// on six times as many states (`-- --ignored`).
#[test]
#[ignore = "explores about 3 million states; run with -- --ignored"]
fn the_protocol_keeps_its_invariants_without_symmetry_reduction() {
    let started = Instant::now();
    let checker = Protocol::new(CRASHES, EXPIRIES)
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

/// With one part off, the other keeps safety: the full state spaces, which
/// take a few minutes (`-- --ignored`).
#[test]
#[ignore = "explores about 5 million states; run with -- --ignored"]
fn one_part_off_the_other_keeps_safety() {
    let cases = [
        (
            Switches {
                fence_check: false,
                ..Switches::CORRECT
            },
            vec![S2],
        ),
        (
            Switches {
                reread_after_acquire: false,
                ..Switches::CORRECT
            },
            vec![FAULT_FREE_READY],
        ),
    ];
    for (switches, expected) in cases {
        let started = Instant::now();
        let model = Protocol {
            symmetry: true,
            ..with(switches)
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
            "{switches:?}: {} states up to node symmetry, {:.1?}, broken: {broken:?}",
            checker.unique_state_count(),
            started.elapsed()
        );
        assert_eq!(broken, expected);
    }
}
