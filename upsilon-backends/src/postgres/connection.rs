//! Opening one connection: durable settings, plain or TLS, and the task that
//! drives it.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};
use tracing::debug;
use upsilon::backend::BackendError;

use super::error::{describe, driver_in, PgError};
use super::options::PostgresOptions;
use super::tls::Connector;

/// What a new connection's driver task should do with notifications.
pub(super) type OnMessage = Box<dyn FnMut(AsyncMessage) + Send>;

/// The connection settings with `synchronous_commit` forced on: a fence or a
/// completion acknowledged to the runner must survive a server crash, or a
/// fence could be granted twice and a data version could go back. Sent in the
/// startup packet, so it costs no round trip. A transaction-mode pooler does
/// not pass startup options through; there the database's own setting
/// applies (see docs/POSTGRES.md).
fn durable(options: &PostgresOptions) -> std::borrow::Cow<'_, tokio_postgres::Config> {
    if options.transaction_pooling {
        return std::borrow::Cow::Borrowed(&options.config);
    }
    let mut config = options.config.clone();
    let extra = "-c synchronous_commit=on";
    let all = match options.config.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {extra}"),
        _ => extra.to_owned(),
    };
    config.options(all);
    std::borrow::Cow::Owned(config)
}

/// Opens one connection and spawns the task that drives it. `on_message`
/// gets its notifications and notices; `on_close` runs when it ends.
pub(super) async fn open(
    options: &PostgresOptions,
    connector: &Connector,
    on_message: Option<OnMessage>,
    on_close: Option<Box<dyn FnOnce() + Send>>,
) -> Result<Client, BackendError> {
    let context = || format!("cannot connect to PostgreSQL at {}", options.target());
    let config = durable(options);
    let result = match connector {
        Connector::Plain => config.connect(NoTls).await.map(|(client, conn)| {
            spawn_driver(conn, on_message, on_close);
            client
        }),
        #[cfg(feature = "postgres-rustls")]
        Connector::Rustls(tls) => config.connect(tls.clone()).await.map(|(client, conn)| {
            spawn_driver(conn, on_message, on_close);
            client
        }),
    };
    result.map_err(|e| {
        let auth = e.code().is_some_and(|c| c.code().starts_with("28"));
        // The driver's TLS errors have no kind of their own to match on.
        let tls = e.code().is_none() && e.to_string().contains("TLS");
        let err = driver_in(e, &context());
        if auth {
            BackendError::other(PgError::new(format!(
                "{err}; check the user name and password"
            )))
        } else if tls {
            BackendError::other(PgError::new(format!(
                "{err}; check that the server's certificate is signed by a trusted CA (`sslrootcert`) and names the host connected to"
            )))
        } else {
            err
        }
    })
}

fn spawn_driver<S, T>(
    mut conn: Connection<S, T>,
    mut on_message: Option<OnMessage>,
    on_close: Option<Box<dyn FnOnce() + Send>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let message = std::future::poll_fn(|cx| conn.poll_message(cx)).await;
            match message {
                Some(Ok(m)) => {
                    if let Some(f) = on_message.as_mut() {
                        f(m)
                    }
                }
                Some(Err(e)) => {
                    debug!(error = %describe(&e), "PostgreSQL connection ended");
                    break;
                }
                None => break,
            }
        }
        if let Some(f) = on_close {
            f()
        }
    });
}
