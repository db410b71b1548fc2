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
    result.map_err(|e| refused(e, &context()))
}

/// A failed connect as a [`BackendError`], with what to do about it.
fn refused(e: tokio_postgres::Error, context: &str) -> BackendError {
    let text = describe(&e);
    let code = e.code().map(|c| c.code().to_owned());
    let db_message = e.as_db_error().map(|d| d.message().to_owned());
    let err = driver_in(e, context);
    let hint = match code.as_deref() {
        // pg_hba.conf has no line for a connection without TLS.
        Some("28000") if db_message.is_some_and(|m| m.contains("no encryption")) => {
            "the server accepts only TLS connections from here: use sslmode=require or verify-full, \
             with sslrootcert=PATH for a private CA (feature `postgres-rustls`)"
        }
        Some(c) if c.starts_with("28") => "check the user name and password",
        Some(_) => return err,
        // The driver's TLS errors have no kind of their own to match on.
        None if text.contains("server does not support TLS") => {
            "the server does not accept TLS connections: turn `ssl` on in the server, \
             or use sslmode=prefer or sslmode=disable"
        }
        None if text.contains("TLS") => {
            "check that the server's certificate is signed by a trusted CA (`sslrootcert`) and names \
             the host connected to; Upsilon verifies it whenever it uses TLS, with sslmode=prefer too"
        }
        None => return err,
    };
    BackendError::other(PgError::new(format!("{err}; {hint}")))
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
