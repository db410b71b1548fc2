//! A small pool of connections for the lease and store operations.

use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::Client;
use upsilon::backend::BackendError;

use super::connection::open;
use super::error::PgError;
use super::options::PostgresOptions;
use super::tls::Connector;

/// A small pool: idle clients, at most `size` checked out at once.
pub(super) struct Pool {
    options: PostgresOptions,
    connector: Connector,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
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
    pub(super) fn new(options: PostgresOptions, connector: Connector) -> Pool {
        let size = options.pool_size;
        Pool {
            options,
            connector,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size)),
        }
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
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match idle {
            Some(c) => c,
            None => open(&self.options, &self.connector, None, None).await?,
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            clean: false,
            _permit: permit,
        })
    }
}

/// A checked-out connection. It goes back to the pool only when the
/// operation marked it clean (no transaction open, nothing in flight);
/// otherwise it is closed.
pub(super) struct Conn<'p> {
    client: Option<Client>,
    pool: &'p Pool,
    clean: bool,
    _permit: OwnedSemaphorePermit,
}

impl Conn<'_> {
    pub(super) fn client(&self) -> &Client {
        self.client.as_ref().expect("a checked-out client")
    }

    pub(super) fn client_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("a checked-out client")
    }

    /// The operation ended with no transaction open: the connection may be
    /// reused.
    pub(super) fn done(&mut self) {
        self.clean = true;
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
                    .push(client);
            }
        }
    }
}
