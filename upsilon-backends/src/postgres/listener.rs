//! The listening session: one connection per backend that `LISTEN`s for
//! releases and data version changes, and whose server process id marks a
//! lease holder as alive.

use std::sync::Arc;
use std::time::Duration;

use crate::wakeups::Wakeups;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client};
use tracing::{debug, warn};
use upsilon::backend::BackendError;

use super::connection::{open, OnMessage};
use super::error::{driver, PgError};
use super::holding::{ping, Health};
use super::options::PostgresOptions;
use super::tls::Connector;
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

    /// Opens the session: one connection that `LISTEN`s on `channel`, forwards
    /// notifications to `wakeups`, and tells `wakeups` when it ends.
    pub(super) async fn open(
        options: &PostgresOptions,
        connector: &Connector,
        channel: &str,
        wakeups: Arc<Wakeups>,
    ) -> Result<Session, BackendError> {
        let health = Health::new();
        let on_message: OnMessage = {
            let wakeups = wakeups.clone();
            let channel = channel.to_owned();
            Box::new(move |m| match m {
                AsyncMessage::Notification(n) if n.channel() == channel => {
                    wakeups.bump(n.payload())
                }
                AsyncMessage::Notice(n) => debug!(notice = %n.message(), "PostgreSQL notice"),
                _ => {}
            })
        };
        let on_close: Box<dyn FnOnce() + Send> = {
            let health = health.clone();
            let wakeups = wakeups.clone();
            Box::new(move || {
                health.lose("the connection closed");
                wakeups.set_up(false);
            })
        };
        let client = open(options, connector, Some(on_message), Some(on_close)).await?;
        let sql = format!(
            "LISTEN \"{channel}\"; SELECT pg_backend_pid(), {}",
            super::sql::SERVER_START
        );
        let rows = tokio::time::timeout(options.op_timeout, client.simple_query(&sql))
            .await
            .map_err(|_| {
                BackendError::unavailable(PgError::new("opening the listening session timed out"))
            })?
            .map_err(driver)?;
        let row = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or_else(|| BackendError::other("the session's id did not come back"))?;
        let pid = row.get(0).and_then(|p| p.parse().ok());
        let server_start = row.get(1).and_then(|s| s.parse().ok());
        let (Some(pid), Some(server_start)) = (pid, server_start) else {
            warn!("the session's id did not parse; dead holders are taken over after their TTL");
            return Err(BackendError::other("the session's id did not parse"));
        };
        Ok(Session {
            id: SessionId { pid, server_start },
            client,
            health,
        })
    }
}

impl PostgresBackend {
    /// The session, opening it if needed; `None` when sessions are off
    /// (transaction pooling) or it cannot be opened (then dead holders are
    /// taken over after their TTL, and waiting nodes poll).
    pub(super) async fn session(&self) -> Option<Arc<Session>> {
        let inner = &self.inner;
        if inner.options.transaction_pooling {
            return None;
        }
        if let Some(s) = self.open_session() {
            return Some(s);
        }
        let mut failed_at = inner.opening.lock().await;
        if let Some(s) = self.open_session() {
            return Some(s);
        }
        if failed_at.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        let opened = Session::open(
            &inner.options,
            &inner.connector,
            &inner.sql.channel,
            inner.wakeups.clone(),
        )
        .await;
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
                Some(s)
            }
            Err(e) => {
                debug!(error = %e, "no listening session; polling, and dead holders expire by TTL");
                *failed_at = Some(Instant::now());
                None
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
