//! Workspace-level tests live in tests/. This library holds what the fault
//! test (`tests/chaos.rs`) shares with its node binary (`src/bin/node.rs`):
//! the host clock both read, the audit log the nodes write and the checker
//! reads, the backfill task and its tables, the node's recording backend wrapper,
//! and the fault proxy between nodes and their server; and the cost model
//! the simulated rollout (`tests/rollout.rs`) runs its nodes' calls through.

pub mod audit;
pub mod backfill;
pub mod clock;
pub mod costed;
pub mod fault_proxy;
pub mod watched;
