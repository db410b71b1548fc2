//! A simulated rollout in virtual time: one canary at version 1.1 runs a
//! 2 s task while every other node, at 1.1 too, starts and waits; every
//! node is the real runner, on one in-memory backend reached through a
//! modelled store server that gives each call a cost
//! ([`upsilon_tests::costed`], the model in docs/BENCHMARKS.md, "Simulated
//! rollout"). Checks that every node ends READY, that the task ran once
//! under one lease, that each waiting node makes a constant number of store
//! calls whatever the number of nodes, and that each is woken exactly once,
//! by the canary's commit, and is READY from the canary's notice without a
//! read, within the time the server takes to deliver every wake-up. Prints the
//! figures as the table of docs/BENCHMARKS.md.
//!
//! ```text
//! cargo test -p upsilon-tests --test rollout -- --nocapture                          # N = 100, 1,000 and 10,000
//! UPSILON_ROLLOUT_NODES=2,50000 cargo test -p upsilon-tests --test rollout -- --nocapture   # other sizes
//! ```

#[path = "rollout/sim.rs"]
mod sim;

use sim::{check, simulate, table, CALLS_PER_WAITER};
use upsilon_tests::costed::{CostModel, Wakeups};

/// The rollout sizes: `UPSILON_ROLLOUT_NODES`, a comma-separated list, or
/// 100, 1,000 and 10,000 (about 1.5 s in all in the dev profile).
fn sizes() -> Vec<usize> {
    match std::env::var("UPSILON_ROLLOUT_NODES") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim().replace('_', "").parse().unwrap_or_else(|_| {
                    panic!("UPSILON_ROLLOUT_NODES must list node counts, got {list:?}")
                })
            })
            .collect(),
        Err(_) => vec![100, 1000, 10_000],
    }
}

#[test]
fn every_waiting_node_is_ready_one_wake_up_after_the_canarys_commit() {
    let runs: Vec<_> = sizes()
        .into_iter()
        .map(|n| simulate(n, CostModel::default(), Wakeups::Delivered))
        .collect();
    println!("{:?}\n\n{}", CostModel::default(), table(&runs));
    for run in &runs {
        let broken = check(run);
        assert!(
            broken.is_empty(),
            "{} nodes:\n{}",
            run.nodes,
            broken.join("\n")
        );
    }
    // Linear in N: the same calls per waiting node at every size.
    let most: Vec<_> = runs.iter().map(|r| (r.nodes, r.waiter_max())).collect();
    assert!(
        most.windows(2).all(|w| w[0].1 == w[1].1),
        "calls per waiting node change with N: {most:?}"
    );
    assert!(most
        .iter()
        .all(|(_, m)| m.store_calls() <= CALLS_PER_WAITER));
}

/// The negative control: with the wake-ups dropped, the nodes fall back to
/// polling (every second, jittered), and the check says so.
#[test]
fn the_check_catches_waiting_nodes_that_poll() {
    caught(
        Wakeups::Dropped,
        &[
            "waited more than once before the commit (polling, or woken early): 99 of 99 waiting nodes",
            "not woken exactly once by the commit: 99 of 99 waiting nodes",
            "store calls per waiting node: 99 of 99 waiting nodes",
        ],
    );
}

/// The negative control of the notice: with wake-ups that carry none, every
/// woken node reads the store once more, and the check says so.
#[test]
fn the_check_catches_waiting_nodes_that_read_after_the_wake_up() {
    caught(
        Wakeups::WithoutNotices,
        &[
            "a store call after the wake-up: 99 of 99 waiting nodes",
            "store calls per waiting node: 99 of 99 waiting nodes",
        ],
    );
}

/// Runs 100 nodes with `wakeups` and asserts that the check reports each of
/// `rules` broken, and every node READY all the same (slow, not wrong).
fn caught(wakeups: Wakeups, rules: &[&str]) {
    let run = simulate(100, CostModel::default(), wakeups);
    let broken = check(&run);
    println!(
        "{}\n{}",
        table(std::slice::from_ref(&run)),
        broken.join("\n")
    );
    for rule in rules {
        assert!(
            broken.iter().any(|b| b.starts_with(rule)),
            "the check missed `{rule}`:\n{}",
            broken.join("\n")
        );
    }
    assert!(
        !broken.iter().any(|b| b.starts_with("not READY")),
        "{}",
        broken.join("\n")
    );
}
