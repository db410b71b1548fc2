//! The blocking thread a backend's calls run on. One thread takes the calls
//! in turn while they keep coming (an upgrade's writes come one after
//! another), and goes back to tokio's blocking pool once none has come for
//! [`LINGER`]: handing a call to a thread that waits for it costs less than
//! a `spawn_blocking` per call.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::Shared;

/// How long the thread waits for the next call before it leaves.
const LINGER: Duration = Duration::from_millis(100);

/// One call, given the backend to run on; it answers once it has let go of
/// it, so that a caller who then drops the backend closes the connection.
pub(super) type Call = Box<dyn FnOnce(Arc<Shared>) + Send>;

/// The calls waiting for the thread.
#[derive(Debug, Default)]
pub(super) struct Queue {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    calls: VecDeque<Call>,
    /// A thread takes the calls.
    serving: bool,
    /// The backend is gone: the thread leaves at once.
    closed: bool,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("calls", &self.calls.len())
            .field("serving", &self.serving)
            .field("closed", &self.closed)
            .finish()
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `call` for the thread of `shared`, and starts one on tokio's
    /// blocking pool if none is serving.
    pub(super) fn push(shared: &Arc<Shared>, call: Call) {
        let queue = &shared.queue;
        let mut pending = queue.lock();
        pending.calls.push_back(call);
        if pending.serving {
            drop(pending);
            queue.wake.notify_one();
            return;
        }
        pending.serving = true;
        drop(pending);
        let server = Server {
            queue: queue.clone(),
            shared: Arc::downgrade(shared),
            ran: false,
        };
        tokio::task::spawn_blocking(move || server.run());
    }

    /// Marks the queue as serving, for a thread that goes on to
    /// [`serve`] it.
    pub(super) fn serving(&self) {
        self.lock().serving = true;
    }

    /// Whether no call waits for the thread.
    pub(super) fn is_empty(&self) -> bool {
        self.lock().calls.is_empty()
    }

    /// The backend is gone: its thread leaves.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// The next call, or `None` once none has come for [`LINGER`] or the
    /// backend is gone (the queue is then no longer served).
    fn next(&self) -> Option<Call> {
        let deadline = Instant::now() + LINGER;
        let mut pending = self.lock();
        loop {
            if let Some(call) = pending.calls.pop_front() {
                return Some(call);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if pending.closed || left.is_zero() {
                pending.serving = false;
                return None;
            }
            pending = self
                .wake
                .wait_timeout(pending, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A thread to come for a queue. If tokio drops it before it runs (its
/// runtime shuts down), the calls queued fail and the next call starts
/// another.
struct Server {
    queue: Arc<Queue>,
    shared: Weak<Shared>,
    ran: bool,
}

impl Server {
    fn run(mut self) {
        self.ran = true;
        serve(&self.queue, &self.shared);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.ran {
            let calls = {
                let mut pending = self.queue.lock();
                pending.serving = false;
                std::mem::take(&mut pending.calls)
            };
            drop(calls);
        }
    }
}

/// Runs the calls of `queue` on this thread until none comes for
/// [`LINGER`]. Holds the backend only while a call runs, so that dropping
/// the backend closes its connection there and then, as long as no call
/// runs.
pub(super) fn serve(queue: &Queue, shared: &Weak<Shared>) {
    while let Some(call) = queue.next() {
        // Gone: a call queued by a future that was dropped with it.
        if let Some(shared) = shared.upgrade() {
            call(shared);
        }
    }
}
