//! The lease: [`Lock`] for [`PostgresBackend`], and the operator's forced
//! release.

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;
use tracing::info;
use upsilon::backend::{
    decide_acquire, fence_from_column, fence_to_column, jitter, ttl_ms, Acquire, BackendError,
    Lease, LeaseInfo, Lock, StoredLease,
};
use upsilon::Holder;

use super::error::driver;
use super::listener::SessionId;
use super::pipeline::{first_error, int8, opt_int4, opt_int8, pipeline, text, Stmt};
use super::{format_of, get, PostgresBackend};

impl PostgresBackend {
    /// Clears the lease of `service`, whoever holds it: an operator's tool for
    /// a holder known to be dead. The fence stays: the next grant gets a
    /// higher one. The old holder can no longer renew or release, and its
    /// store writes are refused once the next holder has claimed the store.
    /// Returns the holder and fence that were cleared, if any.
    pub async fn force_release(
        &self,
        service: &str,
    ) -> Result<Option<(Holder, u64)>, BackendError> {
        let mut conn = self.conn().await?;
        let sql = &self.inner.sql;
        let stmt = [Stmt::Typed(
            &sql.force_release,
            vec![text(service), text(sql.channel.clone())],
        )];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
            match rows[0].first() {
                Some(r) => {
                    let h: String = get(r, 0, "the lease holder")?;
                    let f = fence_from_column(get(r, 1, "the lease fence")?, "the lease's fence")?;
                    Ok(Some((Holder::decode(&h)?, f)))
                }
                None => Ok(None),
            }
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "force-releasing the lease", result)
            .await
    }
}

/// The state row as `Sql::acquire_read` reads it under its lock.
struct LeaseRow {
    /// The stored lease; `None` when there is none or its holder's session
    /// is gone.
    lease: Option<StoredLease>,
    /// The database's clock.
    now_ms: i64,
    /// The grant counter, the store's fence, the history's newest fence and
    /// the floor in the meta table.
    fences: [u64; 4],
    /// The holder's listening session, if its lease row names one.
    session: Option<SessionId>,
}

impl LeaseRow {
    fn decode(row: &Row, service: &str) -> Result<LeaseRow, BackendError> {
        format_of(row, 0)?;
        let lease = StoredLease::from_columns(
            get(row, 3, "the lease holder")?,
            get(row, 4, "the lease fence")?,
            get(row, 5, "the lease expiry")?,
        )?;
        let now_ms = get(row, 6, "the clock")?;
        let gone: bool = get(row, 7, "the holder's session")?;
        let fences = [
            fence_from_column(get(row, 1, "the granted fence")?, "the granted fence")?,
            fence_from_column(get(row, 2, "the store fence")?, "the store's fence")?,
            fence_from_column(get(row, 8, "the history's fence")?, "the history's fence")?,
            floor(get(row, 11, "the fence floor")?)?,
        ];
        let session = match (
            get(row, 9, "the holder's session")?,
            get(row, 10, "the holder's session")?,
        ) {
            (Some(pid), Some(server_start)) => Some(SessionId { pid, server_start }),
            _ => None,
        };
        let lease = match lease {
            Some(l) if gone => {
                if l.live(now_ms).is_some() {
                    info!(%service, holder = %l.holder, "the lease holder's session is gone; taking the lease over");
                }
                None
            }
            other => other,
        };
        Ok(LeaseRow {
            lease,
            now_ms,
            fences,
            session,
        })
    }
}

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
        self.inner.wakeups.mark_seen(service);
        let session = self.session_id().await;
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let read = [
            Stmt::Simple("BEGIN"),
            Stmt::Typed(&sql.ensure_row, vec![text(service)]),
            Stmt::Typed(&sql.acquire_read, vec![text(service)]),
        ];
        let op = async {
            let c = conn.client();
            let rows = first_error(pipeline(c, &read).await).map_err(driver)?;
            let row = rows[2]
                .first()
                .ok_or_else(|| BackendError::corrupt("the state row vanished under its lock"))?;
            let found = LeaseRow::decode(row, service)?;
            let decision = decide_acquire(
                service,
                found.lease.as_ref(),
                found.now_ms,
                found.fences,
                holder,
                ttl,
            )?;
            let lease = match decision {
                Acquire::Granted(lease) => lease,
                Acquire::Held(info) => {
                    first_error(pipeline(c, &[Stmt::Simple("COMMIT")]).await).map_err(driver)?;
                    self.inner
                        .held_by
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(service.to_owned(), (info.fence, found.session));
                    return Ok(Acquire::Held(info));
                }
            };
            let write = [
                Stmt::Typed(
                    &sql.grant,
                    vec![
                        text(service),
                        int8(fence_to_column(lease.fence)?),
                        text(holder.encode()),
                        int8(lease.expires_at_ms),
                        opt_int4(session.map(|s| s.pid)),
                        opt_int8(session.map(|s| s.server_start)),
                    ],
                ),
                Stmt::Typed(
                    &sql.raise_floor,
                    vec![text(service), text(lease.fence.to_string())],
                ),
                Stmt::Simple("COMMIT"),
            ];
            let rows = first_error(pipeline(c, &write).await).map_err(driver)?;
            if rows[0].is_empty() {
                return Err(BackendError::corrupt(
                    "the state row vanished under its lock",
                ));
            }
            Ok(Acquire::Granted(lease))
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "acquiring the lease", result).await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, BackendError> {
        // A renewal must not wait long for a session: without one the lease
        // row names none, and a dead holder is then taken over by its TTL.
        let session = tokio::time::timeout(Duration::from_millis(500), self.session_id())
            .await
            .ok()
            .flatten();
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let stmt = [Stmt::Typed(
            &sql.renew,
            vec![
                text(lease.service.clone()),
                text(lease.holder.encode()),
                int8(fence_to_column(lease.fence)?),
                int8(ttl_ms(lease.ttl)?),
                opt_int4(session.map(|s| s.pid)),
                opt_int8(session.map(|s| s.server_start)),
            ],
        )];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
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
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
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
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
            if rows[0].len() == 1 {
                Ok(())
            } else {
                Err(BackendError::lease_lost("release", lease))
            }
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "releasing the lease", result).await
    }

    async fn current(&self, service: &str) -> Result<Option<LeaseInfo>, BackendError> {
        let sql = &self.inner.sql;
        let mut conn = self.conn().await?;
        let stmt = [Stmt::Typed(&sql.current, vec![text(service)])];
        let op = async {
            let rows = first_error(pipeline(conn.client(), &stmt).await).map_err(driver)?;
            let Some(r) = rows[0].first() else {
                return Ok(None);
            };
            if get::<bool>(r, 4, "the holder's session")? {
                return Ok(None);
            }
            let stored = StoredLease::from_columns(
                get(r, 0, "the lease holder")?,
                get(r, 1, "the lease fence")?,
                get(r, 2, "the lease expiry")?,
            )?;
            let now = get(r, 3, "the clock")?;
            Ok(stored.and_then(|s| s.live(now)))
        };
        let result = self.timed(op).await;
        self.settle(&mut conn, "reading the lease", result).await
    }

    async fn wait(
        &self,
        service: &str,
        seen: &LeaseInfo,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let Some(session) = self
            .open_session()
            .filter(|_| !self.inner.options.transaction_pooling)
        else {
            tokio::time::sleep(timeout).await;
            return Ok(());
        };
        let since = self.inner.wakeups.take_seen(service);
        let holder = self
            .inner
            .held_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .filter(|(fence, _)| *fence == seen.fence)
            .and_then(|(_, s)| *s);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // A notification ends the wait; so does the holder's session
            // ending, which no notification reports: check it now and then.
            let slice = match holder {
                Some(_) => jitter(self.inner.options.holder_check).min(left),
                None => left,
            };
            if self.inner.wakeups.wait_since(service, since, slice).await {
                return Ok(());
            }
            let Some(h) = holder.filter(|_| Instant::now() < deadline) else {
                return Ok(());
            };
            let params: [(&(dyn ToSql + Sync), Type); 2] =
                [(&h.pid, Type::INT4), (&h.server_start, Type::INT8)];
            let check = session
                .client
                .query_typed(&self.inner.sql.session_gone, &params);
            match tokio::time::timeout(Duration::from_secs(2), check).await {
                Ok(Ok(rows)) if rows.first().is_some_and(|r| !r.get::<_, bool>(0)) => {}
                // Gone, or the check failed: let the runner ask for the lease.
                _ => return Ok(()),
            }
        }
    }

    fn notifies(&self) -> bool {
        !self.inner.options.transaction_pooling && self.open_session().is_some()
    }
}
