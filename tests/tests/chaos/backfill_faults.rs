//! The backfill trials' faults: the holder of the backfill (task t1) hit
//! again and again in the middle of it, each time once its checkpoint has
//! moved on by 1 to 3 batches since the last fault, so that every fault
//! lands after some batch committed and before the backfill ends.

use std::time::Duration;

use upsilon::backend::AttemptState;
use upsilon::BatchPosition;
use upsilon_tests::clock::now_us;

use super::{Harness, Kind, Rng, MS};

/// What the harness sees of the backfill in the store.
enum Seen {
    /// Running, with this many batches done by its checkpoint (0: none yet).
    Running(u64),
    /// t1 is completed (or the store did not answer: `Unknown`).
    Completed,
    Unknown,
}

impl Harness<'_> {
    async fn backfill_seen(&self) -> Seen {
        let store = self.env.store();
        let Ok(Ok(snapshot)) =
            tokio::time::timeout(Duration::from_millis(500), store.load("cluster")).await
        else {
            return Seen::Unknown;
        };
        match snapshot.tasks.iter().find(|(k, _)| k.id == "t1") {
            Some((_, t)) if t.completed => Seen::Completed,
            Some((_, t)) if t.last.state == AttemptState::Running => {
                let batches = t
                    .checkpoint
                    .as_ref()
                    .and_then(|c| serde_json::from_str::<BatchPosition<i64>>(&c.position).ok());
                Seen::Running(batches.map_or(0, |p| p.batches))
            }
            _ => Seen::Unknown,
        }
    }

    /// Injects `faults` faults at the backfill's holder, taking turns
    /// through SIGKILL, SIGSTOP past the TTL and the backend's session
    /// faults (PostgreSQL: the lease session and the node's sessions
    /// terminated), each once the checkpoint has moved on by 1 to 3 batches
    /// (a paused holder is left alone: its lease runs out and another node
    /// takes over), and lets the last pause end when it is due. Gives up
    /// after 60 s, or when the backfill ends first.
    pub(super) async fn backfill_faults(&mut self, faults: usize, rng: &mut Rng) {
        let mut kinds = vec![Kind::Kill, Kind::Stop];
        kinds.extend(
            self.env
                .kinds()
                .iter()
                .filter(|k| matches!(k, Kind::LeaseSession | Kind::NodeSessions)),
        );
        let deadline = now_us() + 60_000 * MS;
        // The checkpoint's batches at the last fault, and how many more
        // batches the next fault waits for (1 to 3).
        let mut last = 0;
        let mut wait = rng.range(1, 4);
        let mut done = 0;
        while done < faults && now_us() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.run_later(now_us()).await;
            self.tend(rng);
            let batches = match self.backfill_seen().await {
                Seen::Completed => break,
                Seen::Unknown => continue,
                Seen::Running(b) => b,
            };
            if batches < last + wait {
                continue;
            }
            let Some(holder) = self
                .holder()
                .await
                .filter(|h| self.procs[*h].stopped.is_none())
            else {
                continue;
            };
            let kind = kinds[done % kinds.len()];
            if kind == Kind::Stop && (!self.alive(holder) || self.procs[holder].stopped.is_some()) {
                continue;
            }
            let before = self.events.len();
            self.inject(kind, holder, rng).await;
            if self.events.len() > before {
                self.events[before].detail += &format!(" after batch {batches}");
                done += 1;
                last = batches;
                wait = rng.range(1, 4);
            }
        }
        // Let the last pause run its course: healing sends SIGCONT at once.
        while !self.later.is_empty() && now_us() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.run_later(now_us()).await;
            self.tend(rng);
        }
    }
}
