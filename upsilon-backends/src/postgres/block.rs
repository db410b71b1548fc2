//! A waiting node's block on an advisory lock of the lease it waits for
//! (see `takeover.rs`): on its listening session, on one of the wake locks
//! of the store's stage, when the node holds no lease; otherwise on the
//! lease's own lock, on a pooled connection that a task of its own owns, so
//! that a notification ends the wait at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{CancelToken, NoTls, Row};
use tracing::debug;

use super::error::describe;
use super::listener::Session;
use super::pool::Detached;
use super::takeover::{CancelOnSession, BLOCK};
use super::tls::Connector;
use super::{Inner, PostgresBackend};

impl PostgresBackend {
    /// Blocks on the advisory lock of the lease of `service` with `fence`
    /// until it is free, a notification for `service` after `since` comes,
    /// or `deadline`; on a pooled connection, so that the listening session
    /// goes on receiving notifications (a session blocked in a statement
    /// receives none until it ends). At most all pooled connections but one
    /// block at once (one when the pool has one connection and this node
    /// holds no lease), so that the node's other operations find one.
    pub(super) async fn block(
        &self,
        service: &str,
        fence: u64,
        since: u64,
        deadline: Instant,
    ) -> Blocked {
        let o = &self.inner.options;
        let most = match o.pool_size {
            1 if self.inner.holding.is_empty() => 1,
            n => n - 1,
        };
        let Some(_blocking) = self.inner.waiting.start_blocking(most) else {
            return Blocked::Busy;
        };
        let Ok(mut conn) = self.conn().await else {
            return Blocked::Failed;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            conn.done();
            return Blocked::Woken;
        }
        let key = self.lease_key(service, fence);
        // Whole milliseconds, rounded up: `lock_timeout = 0` would mean none.
        let timeout = format!("{}ms", left.as_micros().div_ceil(1000).max(1));
        let bound = left + o.op_timeout;
        // The statement runs on a task of its own, which owns the connection:
        // a notification ends this wait at once, and the task lets the
        // statement end (or cancels it) and returns the connection after.
        let (ended, end) = tokio::sync::oneshot::channel();
        let (moved_on, abandoned) = tokio::sync::oneshot::channel::<()>();
        let inner = self.inner.clone();
        let conn = conn.detach();
        tokio::spawn(async move {
            let end = finish_block(&inner, conn, key, timeout, bound, abandoned).await;
            let _ = ended.send(end);
        });
        let end = tokio::select! {
            end = end => end.unwrap_or(BlockEnd::Broken),
            _ = self.inner.wakeups.wait_since(service, since, bound) => {
                drop(moved_on);
                return Blocked::Woken;
            }
        };
        match end {
            BlockEnd::Granted => Blocked::Free,
            BlockEnd::TimedOut => Blocked::Woken,
            BlockEnd::Cancelled | BlockEnd::Refused | BlockEnd::Broken => Blocked::Failed,
        }
    }
}

impl PostgresBackend {
    /// Blocks on the wake lock `key` (see `takeover.rs`) on the listening
    /// `session` itself, until the lock is free or `deadline`; `None`, doing
    /// nothing, when this backend holds a lease (the session answers its
    /// pings) or another wait blocks on the session. A session blocked in a
    /// statement is sent no notification until the statement ends: the
    /// holder lets the lock go after every write that wakes waiting nodes,
    /// and the notification follows the statement's answer.
    pub(super) async fn block_on_session(
        &self,
        session: &Session,
        key: i64,
        since: u64,
        service: &str,
        deadline: Instant,
    ) -> Option<Blocked> {
        let waiting = &self.inner.waiting;
        let _on_session = waiting.on_session.try_lock().ok()?;
        // The token first: a grant ties its lease, then cancels with it.
        let mut block = OnSession::start(&self.inner, session);
        let left = deadline.saturating_duration_since(Instant::now());
        if !self.inner.holding.is_empty() {
            block.ended();
            return None;
        }
        if left.is_zero()
            || self
                .inner
                .wakeups
                .wait_since(service, since, Duration::ZERO)
                .await
        {
            block.ended();
            return Some(Blocked::Woken);
        }
        let timeout = format!("{}ms", left.as_micros().div_ceil(1000).max(1));
        let bound = left + self.inner.options.op_timeout;
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(&key, Type::INT8), (&timeout, Type::TEXT)];
        let ended = tokio::time::timeout(bound, session.client.query_typed(BLOCK, &params)).await;
        block.ended();
        Some(match BlockEnd::of(ended) {
            BlockEnd::Granted => Blocked::Free,
            // The wait's end, or a grant of this node's that needs the session.
            BlockEnd::TimedOut | BlockEnd::Cancelled => Blocked::Woken,
            BlockEnd::Refused => Blocked::Failed,
            BlockEnd::Broken => {
                session
                    .health
                    .lose("a wait on a lease's wake lock got no answer in time");
                Blocked::Failed
            }
        })
    }

    /// Ends the wait that blocks on the listening session, if one does, and
    /// returns once it has: a lease about to be tied to the session needs it
    /// to answer.
    pub(super) async fn end_session_block(&self) {
        let waiting = &self.inner.waiting;
        let started = Instant::now();
        loop {
            // A cancel that reaches the session before its statement does
            // is ignored: it is sent again until the wait has ended.
            let token = lock(&waiting.on_session_cancel)
                .as_ref()
                .map(|c| c.0.clone());
            if let Some(token) = token {
                if let Err(e) = cancel(&self.inner, &token).await {
                    debug!(error = %describe(&e), "cancelling a wait on the listening session failed");
                }
            }
            let ended = tokio::time::timeout(CANCEL_AGAIN, waiting.on_session.lock()).await;
            if ended.is_ok() {
                return;
            }
            if started.elapsed() >= self.inner.options.op_timeout {
                debug!("a wait on the listening session did not end when cancelled; the lease's pings may find the session lost");
                return;
            }
        }
    }
}

/// A wait blocking on the listening session: its statement's cancel token,
/// kept where a grant finds it. A wait dropped before its statement ended
/// (its caller gave up) cancels the statement, so that the session answers
/// again.
struct OnSession {
    inner: Arc<Inner>,
    running: bool,
}

impl OnSession {
    fn start(inner: &Arc<Inner>, session: &Session) -> OnSession {
        let token = CancelOnSession(session.client.cancel_token());
        *lock(&inner.waiting.on_session_cancel) = Some(token);
        OnSession {
            inner: inner.clone(),
            running: true,
        }
    }

    fn ended(&mut self) {
        self.running = false;
        *lock(&self.inner.waiting.on_session_cancel) = None;
    }
}

impl Drop for OnSession {
    fn drop(&mut self) {
        let token = lock(&self.inner.waiting.on_session_cancel).take();
        let (Some(CancelOnSession(token)), true) = (token, self.running) else {
            return;
        };
        let inner = self.inner.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = cancel(&inner, &token).await {
                    debug!(error = %describe(&e), "cancelling an abandoned wait on the listening session failed");
                }
            });
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends the server a cancel of the statement `token`'s session runs.
async fn cancel(inner: &Inner, token: &CancelToken) -> Result<(), tokio_postgres::Error> {
    match &inner.connector {
        Connector::Plain => token.cancel_query(NoTls).await,
        #[cfg(feature = "postgres-rustls")]
        Connector::Rustls(tls) => token.cancel_query(tls.clone()).await,
    }
}

/// Runs the blocking statement on `conn` (the lease's lock `key`, with
/// `lock_timeout` = `timeout`, answered within `bound`) and returns the
/// connection to the pool if it is fit for reuse. Once `abandoned` resolves
/// (the waiting node moved on after a notification), the statement is let
/// end by itself for [`LET_GO_WINDOW`], then cancelled.
async fn finish_block(
    inner: &Inner,
    conn: Detached,
    key: i64,
    timeout: String,
    bound: Duration,
    abandoned: tokio::sync::oneshot::Receiver<()>,
) -> BlockEnd {
    let token = conn.client.cancel_token();
    let mut cancelled = false;
    let ended = {
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(&key, Type::INT8), (&timeout, Type::TEXT)];
        let query = tokio::time::timeout(bound, conn.client.query_typed(BLOCK, &params));
        tokio::pin!(query);
        tokio::select! {
            ended = &mut query => ended,
            _ = abandoned => match tokio::time::timeout(LET_GO_WINDOW, &mut query).await {
                Ok(ended) => ended,
                Err(_) => {
                    if let Err(e) = &cancel(inner, &token).await {
                        debug!(error = %describe(e), "cancelling a wait on a lease's advisory lock failed");
                    }
                    cancelled = true;
                    tokio::time::timeout(Duration::from_secs(2), &mut query)
                        .await
                        .unwrap_or_else(Err)
                }
            },
        }
    };
    let end = BlockEnd::of(ended);
    // A cancel that did not end the statement may still reach the
    // session's next one: such a connection is not reused.
    let reusable = match end {
        BlockEnd::Cancelled => true,
        BlockEnd::Granted | BlockEnd::TimedOut | BlockEnd::Refused => !cancelled,
        BlockEnd::Broken => false,
    };
    if reusable {
        inner.pool.put_back(conn);
    }
    end
}

/// How a wait that blocked on a lease's advisory lock ended.
pub(super) enum Blocked {
    /// The lock is free: the holder let it go, or its session ended.
    Free,
    /// A notification came, or the wait's end: the runner is to look.
    Woken,
    /// Every pooled connection a wait may take is blocking already.
    Busy,
    /// The blocking statement failed: the runner is to ask.
    Failed,
}

/// How the blocking statement ended.
enum BlockEnd {
    /// The lock was granted (and let go with the statement's transaction).
    Granted,
    /// `lock_timeout`: the wait's end.
    TimedOut,
    /// Cancelled by this node.
    Cancelled,
    /// Another error from the server: the connection is still usable.
    Refused,
    /// The connection failed, or no answer came in time.
    Broken,
}

impl BlockEnd {
    fn of(
        ended: Result<Result<Vec<Row>, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> BlockEnd {
        match ended {
            Ok(Ok(_)) => BlockEnd::Granted,
            Ok(Err(e)) => match e.code() {
                Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => BlockEnd::TimedOut,
                Some(c) if *c == SqlState::QUERY_CANCELED => BlockEnd::Cancelled,
                Some(_) => {
                    debug!(error = %describe(&e), "blocking on a lease's advisory lock failed");
                    BlockEnd::Refused
                }
                None => BlockEnd::Broken,
            },
            Err(_) => BlockEnd::Broken,
        }
    }
}

/// How long a grant waits for a wait on the listening session to end once
/// cancelled, before it cancels it again.
const CANCEL_AGAIN: Duration = Duration::from_millis(100);

/// After a notification, how long a blocked wait lets its statement end by
/// itself before it cancels it: a release notifies as it commits, and the
/// holder lets the lease's lock go right after, one round trip later; a
/// data version written mid-plan leaves the lock held, and the statement
/// is cancelled after this (on a connection of its own, a few
/// milliseconds).
const LET_GO_WINDOW: Duration = Duration::from_millis(100);
