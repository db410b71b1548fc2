//! Connections: opening them (plain or TLS), a small pool, pipelined
//! statements, the error mapping, and the session that listens for
//! notifications and marks a lease holder as alive.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls, Row};
use tracing::{debug, warn};
use upsilon::backend::BackendError;

use super::options::{PostgresOptions, TlsChoice};

/// What went wrong, with the server's own words where it gave them, and the
/// target without credentials.
#[derive(Debug)]
pub(crate) struct PgError {
    message: String,
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PgError {}

/// The server's words for a driver error: the database error's message,
/// detail, hint and SQLSTATE, or the driver's error and its causes.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; hint: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    s
}

/// Maps a driver error: lost connections, timeouts, shutdowns, lock and
/// serialisation conflicts are worth retrying; the rest is not.
pub(crate) fn driver(e: tokio_postgres::Error) -> BackendError {
    driver_in(e, "")
}

pub(crate) fn driver_in(e: tokio_postgres::Error, context: &str) -> BackendError {
    let mut message = describe(&e);
    if !context.is_empty() {
        message = format!("{context}: {message}");
    }
    let transient = match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("57P")
                || [
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::LOCK_NOT_AVAILABLE,
                    SqlState::TOO_MANY_CONNECTIONS,
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::QUERY_CANCELED,
                ]
                .contains(code)
        }
        // No SQLSTATE: the connection failed, closed or timed out.
        None => true,
    };
    if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        message.push_str(
            "; Upsilon's user needs USAGE on the schema and SELECT, INSERT, UPDATE on its tables (and CREATE the first time, to create them)",
        );
    }
    let err = PgError { message };
    if transient {
        BackendError::unavailable(err)
    } else {
        BackendError::other(err)
    }
}

/// A connector for plain or TLS connections.
#[derive(Clone)]
pub(crate) enum Connector {
    Plain,
    #[cfg(feature = "postgres-rustls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Connector::Plain => f.write_str("Plain"),
            #[cfg(feature = "postgres-rustls")]
            Connector::Rustls(_) => f.write_str("Rustls"),
        }
    }
}

impl Connector {
    pub(crate) fn new(options: &PostgresOptions) -> Result<Connector, BackendError> {
        match &options.tls {
            TlsChoice::Off => Ok(Connector::Plain),
            #[cfg(feature = "postgres-rustls")]
            TlsChoice::Rustls { ca_file } => rustls_connector(ca_file.as_deref()),
            TlsChoice::Unavailable => Err(BackendError::other(
                "TLS was asked for, and this build of upsilon-backends has no TLS: enable its `postgres-rustls` feature",
            )),
        }
    }
}

#[cfg(feature = "postgres-rustls")]
fn rustls_connector(ca_file: Option<&std::path::Path>) -> Result<Connector, BackendError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| {
                BackendError::other(format!(
                    "cannot read the CA certificates in {}: {e}",
                    path.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(BackendError::other(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                BackendError::other(format!(
                    "a CA certificate in {} is not usable: {e}",
                    path.display()
                ))
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::other(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(
        tokio_postgres_rustls::MakeRustlsConnect::new(config),
    ))
}

/// What a new connection's driver task should do with notifications.
pub(crate) type OnMessage = Box<dyn FnMut(AsyncMessage) + Send>;

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
pub(crate) async fn open(
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
            BackendError::other(PgError {
                message: format!("{err}; check the user name and password"),
            })
        } else if tls {
            BackendError::other(PgError {
                message: format!(
                    "{err}; check that the server's certificate is signed by a trusted CA (`sslrootcert`) and names the host connected to"
                ),
            })
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

/// A small pool: idle clients, at most `size` checked out at once.
pub(crate) struct Pool {
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
    pub(crate) fn new(options: PostgresOptions, connector: Connector) -> Pool {
        let size = options.pool_size;
        Pool {
            options,
            connector,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size)),
        }
    }

    /// A connection: an idle one that is still open, or a new one.
    pub(crate) async fn get(&self) -> Result<Conn<'_>, BackendError> {
        let permit = tokio::time::timeout(
            self.options.op_timeout,
            self.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| {
            BackendError::unavailable(PgError {
                message: format!(
                    "no pooled connection to {} came free within {:?}",
                    self.options.target(),
                    self.options.op_timeout
                ),
            })
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
pub(crate) struct Conn<'p> {
    client: Option<Client>,
    pool: &'p Pool,
    clean: bool,
    _permit: OwnedSemaphorePermit,
}

impl Conn<'_> {
    pub(crate) fn client(&self) -> &Client {
        self.client.as_ref().expect("a checked-out client")
    }

    pub(crate) fn client_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("a checked-out client")
    }

    /// The operation ended with no transaction open: the connection may be
    /// reused.
    pub(crate) fn done(&mut self) {
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

/// One statement of a pipeline: simple-protocol text (no parameters), or a
/// statement with typed, bound parameters (the unnamed prepared statement,
/// so it works behind a transaction-mode pooler).
pub(crate) enum Stmt<'a> {
    Simple(&'static str),
    Typed(&'a str, Vec<(Param, Type)>),
}

/// A bound value.
pub(crate) type Param = Box<dyn ToSql + Sync + Send>;

pub(crate) fn text(s: impl Into<String>) -> (Param, Type) {
    (Box::new(s.into()), Type::TEXT)
}

pub(crate) fn text_array(v: Vec<String>) -> (Param, Type) {
    (Box::new(v), Type::TEXT_ARRAY)
}

pub(crate) fn opt_text(s: Option<String>) -> (Param, Type) {
    (Box::new(s), Type::TEXT)
}

pub(crate) fn int8(v: i64) -> (Param, Type) {
    (Box::new(v), Type::INT8)
}

pub(crate) fn opt_int8(v: Option<i64>) -> (Param, Type) {
    (Box::new(v), Type::INT8)
}

pub(crate) fn opt_int4(v: Option<i32>) -> (Param, Type) {
    (Box::new(v), Type::INT4)
}

pub(crate) fn int4(v: i32) -> (Param, Type) {
    (Box::new(v), Type::INT4)
}

type Pending<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

/// Sends every statement at once, in order, and collects every answer: one
/// round trip for the lot. The server runs them one after the other, so a
/// statement sees the effects (and the locks) of those before it.
pub(crate) async fn pipeline<'a>(
    client: &'a Client,
    stmts: &'a [Stmt<'a>],
) -> Vec<Result<Vec<Row>, tokio_postgres::Error>> {
    let mut pending: Vec<Option<Pending<'a>>> = stmts
        .iter()
        .map(|s| {
            let fut: Pending<'a> = match s {
                Stmt::Simple(sql) => {
                    Box::pin(async move { client.batch_execute(sql).await.map(|()| Vec::new()) })
                }
                Stmt::Typed(sql, params) => Box::pin(async move {
                    let refs: Vec<(&(dyn ToSql + Sync), Type)> = params
                        .iter()
                        .map(|(p, t)| (&**p as &(dyn ToSql + Sync), t.clone()))
                        .collect();
                    client.query_typed(sql, &refs).await
                }),
            };
            Some(fut)
        })
        .collect();
    let mut results: Vec<Option<Result<Vec<Row>, tokio_postgres::Error>>> =
        stmts.iter().map(|_| None).collect();
    // Each future sends its request on its first poll, so polling them in
    // order sends them in order.
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(r) => {
                        *result = Some(r);
                        *slot = None;
                    }
                    Poll::Pending => all = false,
                }
            }
        }
        if all {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("every statement answered"))
        .collect()
}

/// The first error of a pipeline's answers (later ones only say that the
/// transaction was aborted), or every answer.
pub(crate) fn first_error(
    results: Vec<Result<Vec<Row>, tokio_postgres::Error>>,
) -> Result<Vec<Vec<Row>>, tokio_postgres::Error> {
    results.into_iter().collect()
}

/// Wake-ups for waiting nodes: a counter per service, bumped by each
/// notification, and by every loss of the listening session (notifications
/// may have been missed then).
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    per_service: Mutex<HashMap<String, u64>>,
    seen: Mutex<HashMap<String, u64>>,
    resets: AtomicU64,
    notify: Notify,
}

impl Wakeups {
    pub(crate) fn bump(&self, service: &str) {
        *self
            .per_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service.to_owned())
            .or_default() += 1;
        self.notify.notify_waiters();
    }

    pub(crate) fn reset_all(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn generation(&self, service: &str) -> u64 {
        let own = self
            .per_service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .copied()
            .unwrap_or(0);
        own.wrapping_add(self.resets.load(Ordering::SeqCst) << 32)
    }

    /// Remembers what the caller has seen of `service`: a wake-up after this
    /// ends the next wait at once, so none falls between a read and the wait
    /// that follows it.
    pub(crate) fn mark_seen(&self, service: &str) {
        let g = self.generation(service);
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_owned(), g);
    }

    /// The generation the caller last saw of `service` (the current one if it
    /// never marked any).
    pub(crate) fn take_seen(&self, service: &str) -> u64 {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service)
            .unwrap_or_else(|| self.generation(service))
    }

    /// Until a wake-up for `service` after generation `seen` (`true`), or
    /// `timeout` (`false`).
    pub(crate) async fn wait_since(&self, service: &str, seen: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.generation(service) != seen {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// The listening session: its server process id and the server's start time,
/// kept in the lease row so that others can tell when it is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionId {
    pub(crate) pid: i32,
    pub(crate) server_start: i64,
}

pub(crate) struct Session {
    pub(crate) id: SessionId,
    /// The listening connection; between notifications it also answers
    /// the waiting node's checks on the lease holder's session.
    pub(crate) client: Client,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Session {
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && !self.client.is_closed()
    }
}

/// Opens the session: one connection that `LISTEN`s on `channel`, forwards
/// notifications to `wakeups`, and tells `wakeups` when it ends.
pub(crate) async fn open_session(
    options: &PostgresOptions,
    connector: &Connector,
    channel: &str,
    wakeups: Arc<Wakeups>,
) -> Result<Session, BackendError> {
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_message: OnMessage = {
        let wakeups = wakeups.clone();
        let channel = channel.to_owned();
        Box::new(move |m| match m {
            AsyncMessage::Notification(n) if n.channel() == channel => wakeups.bump(n.payload()),
            AsyncMessage::Notice(n) => debug!(notice = %n.message(), "PostgreSQL notice"),
            _ => {}
        })
    };
    let on_close: Box<dyn FnOnce() + Send> = {
        let closed = closed.clone();
        let wakeups = wakeups.clone();
        Box::new(move || {
            closed.store(true, Ordering::SeqCst);
            wakeups.reset_all();
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
            BackendError::unavailable(PgError {
                message: "opening the listening session timed out".into(),
            })
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
        closed,
    })
}
