//! Fault injection for the in-memory backend: which call fails, and how.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::memory::lock;
#[cfg(doc)]
use crate::backend::{Lock, Store};

/// A backend operation, for fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Lock::try_acquire`].
    Acquire,
    /// [`Lock::renew`].
    Renew,
    /// [`Lock::release`].
    Release,
    /// [`Store::load`].
    Load,
    /// [`Store::claim`].
    Claim,
    /// [`Store::apply`].
    Apply,
}

/// What an injected fault does to a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with a transient error and has no effect.
    Unavailable,
    /// The call fails with a permanent error and has no effect.
    Broken,
    /// The call waits this long (tokio time) first, then proceeds.
    Delay(Duration),
    /// The call takes effect, then fails with a transient error: a lost reply.
    LoseReply,
    /// The call takes effect, then its reply is this late: a slow network
    /// on the way back.
    DelayReply(Duration),
}

/// What an injected fault does after the call took effect.
pub(super) enum After {
    Reply,
    LoseReply,
    DelayReply(Duration),
}

#[derive(Debug)]
struct Rule {
    op: Op,
    /// Calls of `op` still to let through before the fault fires.
    skip: u64,
    /// Times it fires (`u64::MAX`: for ever).
    times: u64,
    fault: Fault,
}

/// The faults armed on a [`MemoryBackend`](super::MemoryBackend).
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    calls: Mutex<HashMap<Op, u64>>,
}

impl Faults {
    /// The `nth` call of `op` from now on (1-based) gets `fault`, once.
    pub fn nth(&self, op: Op, nth: u64, fault: Fault) {
        assert!(nth >= 1, "calls are counted from 1");
        lock(&self.rules).push(Rule {
            op,
            skip: nth - 1,
            times: 1,
            fault,
        });
    }

    /// Every call of `op` from now on gets `fault`, until [`Faults::clear`].
    pub fn always(&self, op: Op, fault: Fault) {
        lock(&self.rules).push(Rule {
            op,
            skip: 0,
            times: u64::MAX,
            fault,
        });
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        lock(&self.rules).clear();
    }

    /// How many calls of `op` the backend has served (faulted ones included).
    pub fn calls(&self, op: Op) -> u64 {
        lock(&self.calls).get(&op).copied().unwrap_or(0)
    }

    pub(super) fn take(&self, op: Op) -> Option<Fault> {
        *lock(&self.calls).entry(op).or_insert(0) += 1;
        let mut rules = lock(&self.rules);
        let mut fired = None;
        for rule in rules.iter_mut().filter(|r| r.op == op) {
            if rule.skip > 0 {
                rule.skip -= 1;
            } else if fired.is_none() && rule.times > 0 {
                rule.times -= 1;
                fired = Some(rule.fault.clone());
            }
        }
        rules.retain(|r| r.times > 0);
        fired
    }
}
