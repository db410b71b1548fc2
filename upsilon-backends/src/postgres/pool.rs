//! A small pool of connections for the lease and store operations, and how
//! an operation takes one and gives it back.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client};
use tracing::debug;
use upsilon::backend::BackendError;

use super::connection::{open, OnMessage};
use super::error::{driver_in, timed_out, PgError};
use super::holding::Health;
use super::options::PostgresOptions;
use super::pipeline::{pipeline_prepared, Prepared, Stmt};
use super::tls::Connector;
use super::PostgresBackend;
use crate::wakeups::Wakeups;

/// What the task that drives a connection knows of it: its health, and
/// whether it became the listening session (see
/// [`Pool::take_idle`]), whose notifications it forwards and whose end
/// it reports.
pub(super) struct Link {
    pub(super) health: Arc<Health>,
    listening: AtomicBool,
}

impl Link {
    /// The connection is the listening session from now on.
    pub(super) fn listen(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }
}

/// An idle client, the statements prepared on it, since when it is idle,
/// and its [`Link`].
type Idle = (Client, Prepared, Instant, Arc<Link>);

/// A small pool: idle clients, at most `size` checked out at once. Every
/// connection can become the listening session: the task that drives it
/// forwards notifications on `channel` to `wakeups` (only a connection
/// that `LISTEN`s gets any), and tells `wakeups` when a listening one ends.
pub(super) struct Pool {
    options: PostgresOptions,
    connector: Connector,
    channel: String,
    wakeups: Arc<Wakeups>,
    idle: Mutex<Vec<Idle>>,
    permits: Arc<Semaphore>,
    /// How long a client may stay idle and still be reused, in ms (0: no
    /// limit): half the server's `idle_session_timeout`, so that a client
    /// is not handed out just as the server closes it for idleness.
    max_idle_ms: AtomicU64,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.options.target())
            .field("size", &self.options.pool_size)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(super) fn new(
        options: PostgresOptions,
        connector: Connector,
        channel: String,
        wakeups: Arc<Wakeups>,
    ) -> Pool {
        let size = options.pool_size;
        Pool {
            options,
            connector,
            channel,
            wakeups,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size)),
            max_idle_ms: AtomicU64::new(0),
        }
    }

    /// Returns a [`Detached`] connection that is fit for reuse.
    pub(super) fn put_back(&self, d: Detached) {
        if !d.client.is_closed() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push((
                d.client,
                d.prepared,
                Instant::now(),
                d.link,
            ));
        }
    }

    /// Opens a connection whose driver forwards notifications and reports
    /// its end through its [`Link`].
    pub(super) async fn open(&self) -> Result<(Client, Arc<Link>), BackendError> {
        let link = Arc::new(Link {
            health: Health::new(),
            listening: AtomicBool::new(false),
        });
        let on_message: OnMessage = {
            let wakeups = self.wakeups.clone();
            let channel = self.channel.clone();
            Box::new(move |m| match m {
                AsyncMessage::Notification(n) if n.channel() == channel => {
                    wakeups.bump(n.payload())
                }
                AsyncMessage::Notice(n) => debug!(notice = %n.message(), "PostgreSQL notice"),
                _ => {}
            })
        };
        let on_close: Box<dyn FnOnce() + Send> = {
            let link = link.clone();
            let wakeups = self.wakeups.clone();
            Box::new(move || {
                link.health.lose("the connection closed");
                if link.listening.load(Ordering::SeqCst) {
                    wakeups.set_up(false);
                }
            })
        };
        let client = open(
            &self.options,
            &self.connector,
            Some(on_message),
            Some(on_close),
        )
        .await?;
        Ok((client, link))
    }

    /// Takes an idle connection out of the pool for good (it becomes the
    /// listening session), if there is one fit for reuse.
    pub(super) fn take_idle(&self) -> Option<(Client, Arc<Link>)> {
        self.pop_idle().map(|(c, _, _, link)| (c, link))
    }

    /// Whether an idle connection fit for reuse is there.
    pub(super) fn has_idle(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        self.prune(&mut idle);
        !idle.is_empty()
    }

    /// Drops the idle clients that closed or stayed idle too long.
    fn prune(&self, idle: &mut Vec<Idle>) {
        let max_idle = Duration::from_millis(self.max_idle_ms.load(Ordering::Relaxed));
        idle.retain(|(c, _, since, _)| {
            !c.is_closed() && (max_idle.is_zero() || since.elapsed() < max_idle)
        });
    }

    fn pop_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        self.prune(&mut idle);
        idle.pop()
    }

    /// The server closes sessions idle for `timeout_ms` (0: never).
    pub(super) fn server_idle_timeout(&self, timeout_ms: u64) {
        self.max_idle_ms.store(timeout_ms / 2, Ordering::Relaxed);
    }

    /// A connection: an idle one that is still open, or a new one.
    pub(super) async fn get(&self) -> Result<Conn<'_>, BackendError> {
        let permit = tokio::time::timeout(
            self.options.op_timeout,
            self.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| {
            BackendError::unavailable(PgError::new(format!(
                "no pooled connection to {} came free within {:?}",
                self.options.target(),
                self.options.op_timeout
            )))
        })?
        .map_err(BackendError::other)?;
        let (client, prepared, link) = match self.pop_idle() {
            Some((c, p, _, link)) => (c, p, link),
            None => {
                let (c, link) = self.open().await?;
                (c, Prepared::default(), link)
            }
        };
        Ok(Conn {
            client: Some(client),
            link,
            prepared: Mutex::new(prepared),
            pool: self,
            clean: false,
            permit: Some(permit),
        })
    }
}

/// A checked-out connection. It goes back to the pool only when the
/// operation marked it clean (no transaction open, nothing in flight);
/// otherwise it is closed.
pub(super) struct Conn<'p> {
    client: Option<Client>,
    link: Arc<Link>,
    /// The statements prepared on this connection's session.
    prepared: Mutex<Prepared>,
    pool: &'p Pool,
    clean: bool,
    /// The pool slot; taken by [`Conn::detach`].
    permit: Option<OwnedSemaphorePermit>,
}

impl Conn<'_> {
    pub(super) fn client(&self) -> &Client {
        self.client.as_ref().expect("a checked-out client")
    }

    /// Sends `stmts` together (see [`pipeline`](super::pipeline::pipeline)),
    /// as statements prepared on this connection where no transaction
    /// pooler is in the way: there each statement may run on another server
    /// session, which would not have it.
    pub(super) async fn pipeline<'a>(
        &'a self,
        stmts: &'a [Stmt<'a>],
    ) -> Vec<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> {
        let prepared = (!self.pool.options.transaction_pooling).then_some(&self.prepared);
        pipeline_prepared(self.client(), prepared, stmts).await
    }

    pub(super) fn client_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("a checked-out client")
    }

    /// The operation ended with no transaction open: the connection may be
    /// reused.
    pub(super) fn done(&mut self) {
        self.clean = true;
    }

    /// After [`commit_and_reset`] reset the session: marks the connection
    /// reusable. Without the reset it is closed instead of pooled.
    pub(super) fn reset_done(&mut self) {
        // `DISCARD ALL` also dropped the statements the driver prepared to
        // look types up, and Upsilon's own.
        self.client().clear_type_cache();
        self.prepared
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.done();
    }
}

/// The end of a transaction in which a task's own statements ran (in
/// `complete_with` or a batch): `COMMIT`, and in the same flight a reset of
/// the session (`DISCARD ALL`), so that nothing the task changed (`SET`,
/// `SET ROLE`, temporary tables, advisory locks, `LISTEN`) reaches
/// Upsilon's own later statements on the pooled connection. The reset runs
/// whether the commit succeeds or not (a failed `COMMIT` ends the
/// transaction too). Returns whether the reset went through (then
/// [`Conn::reset_done`]); an error, `context` named, when the commit failed
/// or the replies took longer than `timeout`.
pub(super) async fn commit_and_reset(
    tx: tokio_postgres::Transaction<'_>,
    timeout: std::time::Duration,
    context: &str,
) -> Result<bool, BackendError> {
    let c = tx.client();
    let both = async {
        tokio::join!(
            biased;
            c.batch_execute("COMMIT"),
            c.batch_execute("DISCARD ALL")
        )
    };
    let replies = tokio::time::timeout(timeout, both).await;
    // The transaction ended with the `COMMIT` sent above; dropped, it would
    // send a `ROLLBACK` after it. A top-level transaction holds nothing
    // else (no savepoint name).
    std::mem::forget(tx);
    let (commit, reset) = replies.map_err(|_| timed_out("committing", timeout))?;
    commit.map_err(|e| driver_in(e, context))?;
    Ok(reset.is_ok())
}

/// A connection taken out of its pool with its slot, to finish on a task of
/// its own ([`Conn::detach`]); [`Pool::put_back`] returns it.
pub(super) struct Detached {
    pub(super) client: Client,
    link: Arc<Link>,
    prepared: Prepared,
    _permit: OwnedSemaphorePermit,
}

impl Conn<'_> {
    /// Takes the connection out, keeping its pool slot until it is put back
    /// or dropped.
    pub(super) fn detach(mut self) -> Detached {
        Detached {
            client: self.client.take().expect("a checked-out client"),
            link: self.link.clone(),
            prepared: std::mem::take(self.prepared.get_mut().unwrap_or_else(|p| p.into_inner())),
            _permit: self.permit.take().expect("a checked-out slot"),
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if self.clean && !client.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((
                        client,
                        std::mem::take(self.prepared.get_mut().unwrap_or_else(|p| p.into_inner())),
                        Instant::now(),
                        self.link.clone(),
                    ));
            }
        }
    }
}

impl PostgresBackend {
    /// A pooled connection, within the operation timeout.
    pub(super) async fn conn(&self) -> Result<Conn<'_>, BackendError> {
        let timeout = self.inner.options.op_timeout;
        match tokio::time::timeout(timeout, self.inner.pool.get()).await {
            Ok(r) => r,
            Err(_) => Err(timed_out("connecting", timeout)),
        }
    }

    /// Ends one operation that ran under the operation timeout: on success
    /// the connection goes back to the pool; on an error any open transaction
    /// is rolled back first (or the connection closed if that fails); on a
    /// timeout the connection is closed.
    pub(super) async fn settle<T>(
        &self,
        conn: &mut Conn<'_>,
        what: &str,
        result: Result<Result<T, BackendError>, tokio::time::error::Elapsed>,
    ) -> Result<T, BackendError> {
        match result {
            Err(_) => Err(timed_out(what, self.inner.options.op_timeout)),
            Ok(Ok(v)) => {
                conn.done();
                Ok(v)
            }
            Ok(Err(e)) => {
                let rollback = conn.client().batch_execute("ROLLBACK");
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), rollback).await {
                    conn.done();
                }
                Err(e)
            }
        }
    }

    /// `op` under the operation timeout.
    pub(super) async fn timed<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<Result<T, BackendError>, tokio::time::error::Elapsed> {
        tokio::time::timeout(self.inner.options.op_timeout, op).await
    }
}
