//! The lease: [`Lock`] for [`PostgresBackend`], and the operator's forced
//! release.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;
use tracing::{debug, info};
use upsilon::backend::{
    decide_acquire, fence_from_column, fence_to_column, jitter, ttl_ms, Acquire, BackendError,
    Lease, LeaseInfo, Lock, StateColumns, StoredLease,
};
use upsilon::Holder;

use super::block::Blocked;
use super::error::driver;
use super::listener::{Session, SessionId};
use super::pipeline::{first_error, int8, int8_array, opt_int4, opt_int8, text, Stmt};
use super::pool::Conn;
use super::takeover::{lease_key, wake_keys, Stage, CANCEL_WAITERS, TAKE};
use super::{format_of, format_row, get, sql, PostgresBackend};

/// The state row as `Sql::acquire_read` reads it under its lock.
struct LeaseRow {
    /// The stored lease, if any.
    lease: Option<StoredLease>,
    /// Whether the session the row names has ended (the server's answer).
    gone: bool,
    /// The database's clock.
    now_ms: i64,
    /// The grant counter, the store's fence, the history's newest fence and
    /// the floor in the meta table.
    fences: [u64; 4],
    /// The holder's listening session, if its lease row names one.
    session: Option<SessionId>,
    /// The store's data version, baseline and fence.
    state: StateColumns,
}

impl LeaseRow {
    fn decode(row: &Row) -> Result<LeaseRow, BackendError> {
        format_of(row, 0)?;
        let lease = StoredLease::from_columns(
            get(row, 3, "the lease holder")?,
            get(row, 4, "the lease fence")?,
            get(row, 5, "the lease expiry")?,
        )?;
        let fences = [
            fence_from_column(get(row, 1, "the granted fence")?, "the granted fence")?,
            fence_from_column(get(row, 2, "the store fence")?, "the store's fence")?,
            fence_from_column(get(row, 8, "the history's fence")?, "the history's fence")?,
            floor(get(row, 11, "the fence floor")?)?,
        ];
        Ok(LeaseRow {
            lease,
            gone: get(row, 7, "the holder's session")?,
            now_ms: get(row, 6, "the clock")?,
            fences,
            session: session_of(row, 9)?,
            state: StateColumns {
                data_version: get(row, 13, "the data version")?,
                baseline: get(row, 14, "the baseline")?,
                store_fence: get(row, 2, "the store fence")?,
            },
        })
    }
}

/// The session named in columns `first` (pid) and `first + 1` (server start).
fn session_of(row: &Row, first: usize) -> Result<Option<SessionId>, BackendError> {
    Ok(
        match (
            get(row, first, "the holder's session")?,
            get(row, first + 1, "the holder's session")?,
        ) {
            (Some(pid), Some(server_start)) => Some(SessionId { pid, server_start }),
            _ => None,
        },
    )
}

impl PostgresBackend {
    /// Whether holders take their leases' advisory locks and waiting nodes
    /// block on them.
    fn lease_locks(&self) -> bool {
        let o = &self.inner.options;
        o.lease_locks && !o.transaction_pooling
    }

    pub(super) fn lease_key(&self, service: &str, fence: u64) -> i64 {
        let o = &self.inner.options;
        lease_key(&o.schema, &o.state_table, service, fence)
    }

    /// The wake locks of the lease of `service` with `fence` while the store
    /// is at `stage` (see `takeover.rs`).
    pub(super) fn wake_keys(&self, service: &str, fence: u64, stage: &Stage) -> Vec<i64> {
        let o = &self.inner.options;
        wake_keys(&o.schema, &o.state_table, service, fence, stage)
    }

    /// Has `session` take the advisory locks of the lease of `service` with
    /// `fence`, which is tied to it, before the grant commits: the lease's
    /// own, and the wake locks of the store's `stage`. Without the lease's
    /// own (the lock is taken: a lock from another lease of the same key,
    /// which a 64-bit hash makes unlikely), waiting nodes check the session
    /// periodically.
    async fn take_lease_lock(
        &self,
        service: &str,
        fence: u64,
        stage: Stage,
        session: &Arc<Session>,
    ) {
        let key = self.lease_key(service, fence);
        let wake = self.wake_keys(service, fence, &stage);
        let keys: Vec<i64> = std::iter::once(key).chain(wake.iter().copied()).collect();
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(&keys, Type::INT8_ARRAY)];
        let take = session.client.query_typed(TAKE, &params);
        let got: Option<Vec<bool>> =
            match tokio::time::timeout(self.inner.options.ping_timeout, take).await {
                Ok(Ok(rows)) => rows.iter().map(|r| r.try_get::<_, bool>(0).ok()).collect(),
                _ => None,
            };
        let got = got.filter(|g| g.len() == keys.len());
        let taken = |i: usize| got.as_ref().map(|g| g[i]);
        if taken(0) == Some(false) {
            debug!(%service, fence, "the lease's advisory lock is taken; waiting nodes check this session periodically");
        }
        let wake_held = (1..keys.len()).all(|i| taken(i) != Some(false));
        let held = (0..keys.len())
            .filter(|&i| taken(i) != Some(false))
            .map(|i| keys[i])
            .collect();
        let wake = wake_held.then_some((stage, wake));
        // Taken, or perhaps: let them go with the lease in either case.
        self.inner
            .holding
            .locked(service, fence, session, held, wake);
    }

    /// Ends the waits of the nodes that block on their sessions on the wake
    /// lock of the lease of `service` with `fence` at `stage`, after an
    /// operator released it: its holder lets the lock go only once it learns
    /// of that. Best effort: a role that may not cancel the waiting nodes'
    /// statements leaves them to the holder's next renewal.
    async fn cancel_waiters(&self, c: &Conn<'_>, service: &str, fence: u64, stage: &Stage) {
        let keys = self.wake_keys(service, fence, stage);
        let cancel = [Stmt::Typed(CANCEL_WAITERS, vec![int8_array(keys)])];
        if let Err(e) = first_error(c.pipeline(&cancel).await) {
            debug!(error = %super::error::describe(&e), %service,
                "cancelling the waits on a released lease's wake locks failed; they end at the holder's next renewal");
        }
    }

    /// The server's answer whether the session `h` has ended; `None` if
    /// the check failed.
    async fn session_gone(&self, session: &Session, h: SessionId) -> Option<bool> {
        let params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&h.pid, Type::INT4), (&h.server_start, Type::INT8)];
        let check = session
            .client
            .query_typed(&self.inner.sql.session_gone, &params);
        match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(rows)) => rows.first().and_then(|r| r.try_get::<_, bool>(0).ok()),
            _ => None,
        }
    }

    /// The lease that stands in the way of a grant, as `found` shows it:
    /// `None` when there is none, or when its holder's session has been seen
    /// gone for the takeover grace (then the holder has stopped, see
    /// `holding.rs`). An answer that shows the session gone for the first
    /// time starts the grace.
    fn standing<'r>(&self, service: &str, found: &'r LeaseRow) -> Option<&'r StoredLease> {
        let lease = found.lease.as_ref()?;
        if lease.live(found.now_ms).is_none() {
            self.inner.waiting.forget(service);
            return Some(lease);
        }
        let waiting = &self.inner.waiting;
        if waiting.observe(service, lease.fence, found.session, found.gone) {
            info!(%service, holder = %lease.holder, fence = lease.fence,
                "the lease holder's session has been gone for the takeover grace; taking the lease over");
            return None;
        }
        Some(lease)
    }
}

impl PostgresBackend {
    /// What a read of the lease row (`Sql::acquire_read` or
    /// `Sql::peek_read`) decides for `holder`'s request. A lease that is
    /// free is not granted when the store moved since this handle read it
    /// (`Acquire::StoreMoved`): the request may rest on a read from before
    /// another node finished the upgrade (the node's session was opened in
    /// between, or the node stalled), and the node would be granted the
    /// lease only to find nothing left to do.
    fn decide(
        &self,
        row: &Row,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.learn_idle_timeout(row, sql::ACQUIRE_IDLE_TIMEOUT);
        let found = LeaseRow::decode(row)?;
        let standing = self.standing(service, &found);
        if let Some(lease) = standing {
            let stage = (
                found.state.data_version.clone(),
                found.state.baseline.clone(),
            );
            self.inner.waiting.saw_stage(service, lease.fence, stage);
        }
        let decision = decide_acquire(service, standing, found.now_ms, found.fences, holder, ttl)?;
        if matches!(decision, Acquire::Granted(_)) && self.inner.reads.moved(service, &found.state)
        {
            debug!(%service, "the lease is free, but the store moved since this node read it");
            return Ok(Acquire::StoreMoved);
        }
        Ok(decision)
    }
}

/// Once a lease's lock came free, how long a waiting node waits for the
/// notification of a release (sent before the lock was let go, on another
/// connection) before it checks the holder's session: a holder that died
/// sends none, and its lease is taken over this much later.
const NOTIFY_WINDOW: Duration = Duration::from_millis(50);

/// The fence floor as the meta table keeps it (text); none is 0.
fn floor(value: Option<&str>) -> Result<u64, BackendError> {
    let Some(text) = value else { return Ok(0) };
    let n = text
        .parse::<i64>()
        .map_err(|_| BackendError::corrupt(format!("the fence floor {text:?} is not a number")))?;
    fence_from_column(n, "the fence floor")
}

#[async_trait]
impl Lock for PostgresBackend {
    async fn try_acquire(
        &self,
        service: &str,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.with_tables(|| async move {
            self.inner.wakeups.mark_seen(service);
            let sql = &self.inner.sql;
            // A node that opens its session here reads the lease row in the
            // same flight, without its lock: held by another node, that is
            // the answer, with no transaction.
            let (session, peeked) = self.session_with(Some((&sql.peek_read, service))).await;
            if let Some(row) = peeked.as_ref().and_then(|rows| rows.first()) {
                match self.decide(row, service, holder, ttl)? {
                    Acquire::Granted(_) => {}
                    other => return Ok(other),
                }
            }
            let session_id = session.as_ref().map(|s| s.id);
            let mut conn = self.conn().await?;
            let read = [
                Stmt::Simple("BEGIN"),
                Stmt::Typed(&sql.ensure_row, vec![text(service)]),
                Stmt::Typed(&sql.acquire_read, vec![text(service)]),
            ];
            let op = async {
                let c = &conn;
                let rows = first_error(c.pipeline(&read).await).map_err(driver)?;
                let row = rows[2].first().ok_or_else(|| {
                    BackendError::corrupt("the state row vanished under its lock")
                })?;
                let lease = match self.decide(row, service, holder, ttl)? {
                    Acquire::Granted(lease) => lease,
                    other => {
                        first_error(c.pipeline(&[Stmt::Simple("COMMIT")]).await).map_err(driver)?;
                        return Ok(other);
                    }
                };
                // Watched from before any other node can read the row that
                // names the session.
                let tie = session.as_ref().map(|s| self.inner.holding.tie(&lease, s));
                // Held before any other node can read the row, so that a
                // waiting node that blocks on it wakes only when this
                // session ends or lets it go.
                if let Some(s) = session.as_ref().filter(|_| self.lease_locks()) {
                    // A wait of this node's (another service's) must not
                    // hold the session up from now on.
                    self.end_session_block().await;
                    let state = LeaseRow::decode(row)?.state;
                    let stage = (state.data_version, state.baseline);
                    self.take_lease_lock(service, lease.fence, stage, s).await;
                }
                let write = [
                    Stmt::Typed(
                        &sql.grant,
                        vec![
                            text(service),
                            int8(fence_to_column(lease.fence)?),
                            text(holder.encode()),
                            int8(lease.expires_at_ms),
                            opt_int4(session_id.map(|s| s.pid)),
                            opt_int8(session_id.map(|s| s.server_start)),
                        ],
                    ),
                    Stmt::Typed(
                        &sql.raise_floor,
                        vec![text(service), text(lease.fence.to_string())],
                    ),
                    Stmt::Simple("COMMIT"),
                ];
                let rows = first_error(c.pipeline(&write).await).map_err(driver)?;
                if rows[0].is_empty() {
                    return Err(BackendError::corrupt(
                        "the state row vanished under its lock",
                    ));
                }
                if let Some(t) = tie {
                    t.keep();
                }
                self.inner.waiting.forget(service);
                Ok(Acquire::Granted(lease))
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "acquiring the lease", result).await
        })
        .await
    }

    async fn prepare_wait(&self, _service: &str) -> Result<(), BackendError> {
        // The listening session is an idle connection of the pool, made the
        // session in the flight of the first `try_acquire`. With none idle,
        // it takes a new connection (tens of milliseconds with password
        // authentication): opened here, after which the runner reads the
        // store again, rather than between the runner's read and the lease
        // row's, by when another node may have finished the upgrade.
        let o = &self.inner.options;
        if o.transaction_pooling || self.open_session().is_some() || self.inner.pool.has_idle() {
            return Ok(());
        }
        self.session().await;
        Ok(())
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        let result = self
            .with_tables(|| async move {
                let sql = &self.inner.sql;
                let mut conn = self.conn().await?;
                let stmt = [Stmt::Typed(
                    &sql.renew,
                    vec![
                        text(lease.service.clone()),
                        text(lease.holder.encode()),
                        int8(fence_to_column(lease.fence)?),
                        int8(ttl_ms(lease.ttl)?),
                    ],
                )];
                let op = async {
                    let rows = first_error(conn.pipeline(&stmt).await).map_err(driver)?;
                    match rows[0].first() {
                        Some(r) => Ok(Lease {
                            expires_at_ms: get(r, 0, "the lease expiry")?,
                            ..lease.clone()
                        }),
                        None => Err(BackendError::lease_lost("renew", lease)),
                    }
                };
                let result = self.timed(op).await;
                self.settle(&mut conn, "renewing the lease", result).await
            })
            .await;
        match &result {
            Ok(renewed) => self.inner.holding.renewed(renewed),
            Err(BackendError::LeaseLost(_)) => {
                if let Some(let_go) = self.inner.holding.untie(lease) {
                    let_go.run().await;
                }
            }
            Err(_) => {}
        }
        result
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        let result = self
            .with_tables(|| async move {
                let sql = &self.inner.sql;
                let mut conn = self.conn().await?;
                let stmt = [Stmt::Typed(
                    &sql.release,
                    vec![
                        text(lease.service.clone()),
                        text(lease.holder.encode()),
                        int8(fence_to_column(lease.fence)?),
                        text(sql.channel.clone()),
                    ],
                )];
                let op = async {
                    let rows = first_error(conn.pipeline(&stmt).await).map_err(driver)?;
                    if rows[0].len() == 1 {
                        Ok(())
                    } else {
                        Err(BackendError::lease_lost("release", lease))
                    }
                };
                let result = self.timed(op).await;
                self.settle(&mut conn, "releasing the lease", result).await
            })
            .await;
        if matches!(result, Ok(()) | Err(BackendError::LeaseLost(_))) {
            // After the release committed (and notified): a waiting node
            // woken by the lock finds the lease free.
            if let Some(let_go) = self.inner.holding.untie(lease) {
                let_go.run().await;
            }
        }
        result
    }

    async fn force_release(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        // The grant counter and the fence floor stay: the next grant gets a
        // higher fence. Waiting nodes are notified.
        self.with_tables(|| async move {
            let mut conn = self.conn().await?;
            let sql = &self.inner.sql;
            let stmts = [
                Stmt::Simple("BEGIN"),
                Stmt::Typed(&sql.format, vec![]),
                Stmt::Typed(
                    &sql.force_release,
                    vec![text(service), text(sql.channel.clone())],
                ),
            ];
            let op = async {
                let c = &conn;
                let rows = first_error(c.pipeline(&stmts).await).map_err(driver)?;
                // A store of another format is left as it was (rolled back).
                format_row(&rows[1])?;
                first_error(c.pipeline(&[Stmt::Simple("COMMIT")]).await).map_err(driver)?;
                let Some(r) = rows[2].first() else {
                    return Ok(None);
                };
                let stored = StoredLease::from_columns(
                    get(r, 0, "the lease holder")?,
                    get(r, 1, "the lease fence")?,
                    get(r, 2, "the lease expiry")?,
                )?;
                let now = get(r, 3, "the clock")?;
                if let Some(s) = &stored {
                    let stage = (get(r, 4, "the data version")?, get(r, 5, "the baseline")?);
                    self.cancel_waiters(c, service, s.fence, &stage).await;
                }
                Ok(stored.and_then(|s| s.live(now)))
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "force-releasing the lease", result)
                .await
        })
        .await
    }

    async fn raise_fence(&self, service: &str, floor: u64) -> Result<(), BackendError> {
        self.with_tables(|| async move {
            let sql = &self.inner.sql;
            let mut conn = self.conn().await?;
            // The floor is one of the fences every grant rises above.
            let stmts = [
                Stmt::Simple("BEGIN"),
                Stmt::Typed(&sql.format, vec![]),
                Stmt::Typed(
                    &sql.lift_floor,
                    vec![text(service), text(floor.to_string())],
                ),
            ];
            let op = async {
                let c = &conn;
                let rows = first_error(c.pipeline(&stmts).await).map_err(driver)?;
                format_row(&rows[1])?;
                first_error(c.pipeline(&[Stmt::Simple("COMMIT")]).await).map_err(driver)?;
                Ok(())
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "raising the fence floor", result)
                .await
        })
        .await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        self.with_tables(|| async move {
            let sql = &self.inner.sql;
            let mut conn = self.conn().await?;
            let stmt = [Stmt::Typed(&sql.current, vec![text(service)])];
            let op = async {
                let rows = first_error(conn.pipeline(&stmt).await).map_err(driver)?;
                let Some(r) = rows[0].first() else {
                    return Ok(None);
                };
                format_of(r, 7)?;
                let stored = StoredLease::from_columns(
                    get(r, 0, "the lease holder")?,
                    get(r, 1, "the lease fence")?,
                    get(r, 2, "the lease expiry")?,
                )?;
                let now = get(r, 3, "the clock")?;
                let Some(info) = stored.and_then(|s| s.live(now)) else {
                    return Ok(None);
                };
                let gone = get::<bool>(r, 4, "the holder's session")?;
                // Free only once a takeover would be granted.
                let taken =
                    self.inner
                        .waiting
                        .observe(service, info.fence, session_of(r, 5)?, gone);
                Ok((!taken).then_some(info))
            };
            let result = self.timed(op).await;
            self.settle(&mut conn, "reading the lease", result).await
        })
        .await
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let waiting = &self.inner.waiting;
        // Once the holder's session was seen gone, the runner is to ask again
        // when the takeover grace has passed.
        let mut deadline = Instant::now() + timeout;
        if let Some(at) = waiting.takeover_at(service, seen.fence) {
            deadline = deadline.min(at);
        }
        let Some(session) = self
            .open_session()
            .filter(|_| !self.inner.options.transaction_pooling)
        else {
            tokio::time::sleep_until(deadline).await;
            return Ok(());
        };
        let since = self.inner.wakeups.take_seen(service);
        let mut holder = waiting.live_session(service, seen.fence);
        let mut may_block = self.lease_locks();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            // While the holder's session lives, the lease's advisory lock
            // comes free when it ends (or the holder lets go): block on it,
            // and check the session once it is free.
            let mut checked = false;
            if holder.is_some() && may_block && waiting.may_block(service, seen.fence) {
                let on_session = match waiting.stage(service, seen.fence) {
                    Some(stage) => {
                        let keys = self.wake_keys(service, seen.fence, &stage);
                        let key = keys[session.id.pid.unsigned_abs() as usize % keys.len()];
                        self.block_on_session(&session, key, since, service, deadline)
                            .await
                    }
                    None => None,
                };
                let blocked = match on_session {
                    Some(blocked) => blocked,
                    None => self.block(service, seen.fence, since, deadline).await,
                };
                match blocked {
                    Blocked::Woken => return Ok(()),
                    Blocked::Busy => may_block = false,
                    Blocked::Failed => {
                        waiting.lock_not_held(service, seen.fence);
                        return Ok(());
                    }
                    Blocked::Free => {
                        // A release notified as it committed, before its
                        // holder let the lock go: that notification is on
                        // its way on the other connection.
                        let wakeups = &self.inner.wakeups;
                        if wakeups.wait_since(service, since, NOTIFY_WINDOW).await {
                            return Ok(());
                        }
                        checked = true;
                    }
                }
            }
            if !checked {
                // A notification ends the wait; the holder's session ending,
                // which no notification reports, is checked now and then.
                let slice = match holder {
                    Some(_) => jitter(self.inner.options.holder_check).min(left),
                    None => left,
                };
                if self.inner.wakeups.wait_since(service, since, slice).await {
                    return Ok(());
                }
            }
            let Some(h) = holder.filter(|_| Instant::now() < deadline) else {
                continue;
            };
            match self.session_gone(&session, h).await {
                Some(gone) => {
                    waiting.observe(service, seen.fence, Some(h), gone);
                    if gone {
                        debug!(%service, holder = %seen.holder, fence = seen.fence,
                            "the lease holder's session is gone; taking the lease over after the takeover grace");
                        holder = None;
                        if let Some(at) = waiting.takeover_at(service, seen.fence) {
                            deadline = deadline.min(at);
                        }
                    } else if checked {
                        // Free while the session lives: its holder does not
                        // hold it. Check periodically from now on.
                        debug!(%service, holder = %seen.holder, fence = seen.fence,
                            "the lease holder's session holds no lock of the lease; checking it periodically");
                        waiting.lock_not_held(service, seen.fence);
                    }
                }
                // The check failed: let the runner ask for the lease.
                None => return Ok(()),
            }
        }
    }

    fn notifies(&self) -> bool {
        !self.inner.options.transaction_pooling && self.open_session().is_some()
    }

    async fn until_lost(&self, lease: &Lease) -> BackendError {
        self.inner
            .holding
            .until_lost(lease, || self.open_session().map(|s| s.id))
            .await
    }
}
