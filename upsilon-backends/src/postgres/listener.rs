//! The listening session: one connection per backend, taken from the pool,
//! that `LISTEN`s for releases and data version changes, and whose server
//! process id marks a lease holder as alive.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage};
use tracing::{debug, warn};
use upsilon::backend::BackendError;

use super::error::{driver, PgError};
use super::holding::{ping, Health};
use super::options::PostgresOptions;
use super::pool::Link;
use super::PostgresBackend;

/// The listening session: its server process id and the server's start time,
/// kept in the lease row so that others can tell when it is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SessionId {
    pub(super) pid: i32,
    pub(super) server_start: i64,
}

pub(super) struct Session {
    pub(super) id: SessionId,
    /// The listening connection; between notifications it also answers
    /// the waiting node's checks on the lease holder's session, and the
    /// holder's pings.
    pub(super) client: Client,
    /// Lost when the connection closes or a ping goes unanswered.
    pub(super) health: Arc<Health>,
}

impl Session {
    pub(super) fn is_open(&self) -> bool {
        !self.health.is_lost() && !self.client.is_closed()
    }

    /// Makes `client`, a connection of the pool (see [`Link`]), the
    /// listening session: it `LISTEN`s on `channel` and reads its id. A
    /// `peek` (a statement and the service it reads) is sent in the same
    /// flight, after the `LISTEN`, so that a change it does not see is
    /// notified to the session; its rows come back if it succeeded.
    pub(super) async fn promote(
        client: Client,
        link: Arc<Link>,
        options: &PostgresOptions,
        channel: &str,
        peek: Option<(&str, &str)>,
    ) -> (Result<Session, BackendError>, Option<Vec<Row>>) {
        link.listen();
        let sql = format!(
            "LISTEN \"{channel}\"; SELECT pg_backend_pid(), {}",
            super::sql::SERVER_START
        );
        let listen = client.simple_query(&sql);
        let peeked = async {
            let (peek, service) = peek?;
            let params: [(&(dyn ToSql + Sync), Type); 1] = [(&service, Type::TEXT)];
            client.query_typed(peek, &params).await.ok()
        };
        let both = async { tokio::join!(biased; listen, peeked) };
        let Ok((listened, peeked)) = tokio::time::timeout(options.op_timeout, both).await else {
            let e = PgError::new("opening the listening session timed out");
            return (Err(BackendError::unavailable(e)), None);
        };
        let id = listened.map_err(driver).and_then(|rows| {
            let row = rows
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(r),
                    _ => None,
                })
                .ok_or_else(|| BackendError::other("the session's id did not come back"))?;
            let pid = row.get(0).and_then(|p| p.parse().ok());
            let server_start = row.get(1).and_then(|s| s.parse().ok());
            let (Some(pid), Some(server_start)) = (pid, server_start) else {
                warn!(
                    "the session's id did not parse; dead holders are taken over after their TTL"
                );
                return Err(BackendError::other("the session's id did not parse"));
            };
            Ok(SessionId { pid, server_start })
        });
        let session = id.map(|id| Session {
            id,
            client,
            health: link.health.clone(),
        });
        (session, peeked)
    }
}

impl PostgresBackend {
    /// The session, opening it if needed; `None` when sessions are off
    /// (transaction pooling) or it cannot be opened (then dead holders are
    /// taken over after their TTL, and waiting nodes poll).
    pub(super) async fn session(&self) -> Option<Arc<Session>> {
        self.session_with(None).await.0
    }

    /// [`PostgresBackend::session`], with the rows of `peek` (see
    /// [`Session::promote`]) when the session was opened for it. An idle
    /// connection of the pool becomes the session if there is one, so that
    /// a waiting node holds one connection, and opening the session costs
    /// no new one.
    pub(super) async fn session_with(
        &self,
        peek: Option<(&str, &str)>,
    ) -> (Option<Arc<Session>>, Option<Vec<Row>>) {
        let inner = &self.inner;
        if inner.options.transaction_pooling {
            return (None, None);
        }
        if let Some(s) = self.open_session() {
            return (Some(s), None);
        }
        let mut failed_at = inner.opening.lock().await;
        if let Some(s) = self.open_session() {
            return (Some(s), None);
        }
        if failed_at.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return (None, None);
        }
        let connected = match inner.pool.take_idle() {
            Some(idle) => Ok(idle),
            None => inner.pool.open().await,
        };
        let (opened, peeked) = match connected {
            Ok((client, link)) => {
                let channel = &inner.sql.channel;
                Session::promote(client, link, &inner.options, channel, peek).await
            }
            Err(e) => (Err(e), None),
        };
        match opened {
            Ok(s) => {
                let s = Arc::new(s);
                tokio::spawn(ping(
                    Arc::downgrade(&s),
                    s.health.clone(),
                    inner.options.ping_every,
                    inner.options.ping_timeout,
                ));
                *inner.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                *failed_at = None;
                (Some(s), peeked)
            }
            Err(e) => {
                debug!(error = %e, "no listening session; polling, and dead holders expire by TTL");
                *failed_at = Some(Instant::now());
                (None, None)
            }
        }
    }

    /// The listening session, if one is open. A session that is no longer
    /// open is let go, so that its connection closes.
    pub(super) fn open_session(&self) -> Option<Arc<Session>> {
        let mut slot = self.inner.session.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|s| !s.is_open()) {
            *slot = None;
        }
        slot.clone()
    }
}
