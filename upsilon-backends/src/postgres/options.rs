//! How to reach the server and where Upsilon's tables live.

use std::fmt;
#[cfg(feature = "postgres-rustls")]
use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::Config;
use upsilon::backend::BackendError;

use super::conninfo;

/// Options of a [`PostgresBackend`](super::PostgresBackend): the server (from
/// a URL or from parts), the schema and table names, TLS, the pool, and
/// whether session state may be used.
///
/// ```
/// use upsilon_backends::postgres::PostgresOptions;
/// let from_url = PostgresOptions::from_url("postgres://app:secret@db:5432/app?schema=ops")?;
/// let from_parts = PostgresOptions::new()
///     .host("db")
///     .port(5432)
///     .user("app")
///     .password("secret")
///     .dbname("app")
///     .schema("ops");
/// # Ok::<(), upsilon::backend::BackendError>(())
/// ```
#[derive(Clone)]
pub struct PostgresOptions {
    pub(crate) config: Config,
    pub(crate) schema: String,
    pub(crate) meta_table: String,
    pub(crate) state_table: String,
    pub(crate) history_table: String,
    pub(crate) pool_size: usize,
    pub(crate) op_timeout: Duration,
    pub(crate) transaction_pooling: bool,
    pub(crate) holder_check: Duration,
    pub(crate) ping_every: Duration,
    pub(crate) ping_timeout: Duration,
    pub(crate) takeover_grace: Duration,
    pub(crate) lease_locks: bool,
    pub(crate) tls: TlsChoice,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TlsChoice {
    /// Plain TCP (or a Unix socket).
    Off,
    /// TLS with rustls, verifying the server's certificate and host name
    /// against the system's roots and `ca_file`.
    #[cfg(feature = "postgres-rustls")]
    Rustls { ca_file: Option<PathBuf> },
    /// The URL asked for TLS, and this build has no TLS: refused at connect.
    #[cfg_attr(feature = "postgres-rustls", allow(dead_code))]
    Unavailable,
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("target", &self.target())
            .field("schema", &self.schema)
            .field("meta_table", &self.meta_table)
            .field("state_table", &self.state_table)
            .field("history_table", &self.history_table)
            .field("pool_size", &self.pool_size)
            .field("op_timeout", &self.op_timeout)
            .field("transaction_pooling", &self.transaction_pooling)
            .field("holder_check", &self.holder_check)
            .field("ping_every", &self.ping_every)
            .field("ping_timeout", &self.ping_timeout)
            .field("takeover_grace", &self.takeover_grace)
            .field("lease_locks", &self.lease_locks)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions::new()
    }
}

impl PostgresOptions {
    /// Options from parts, all defaults: host `localhost`, port 5432, user and
    /// database `postgres`, schema `public`, tables `upsilon_meta`,
    /// `upsilon_state` and `upsilon_history`, no TLS.
    pub fn new() -> PostgresOptions {
        let mut config = Config::new();
        config
            .user("postgres")
            .application_name("upsilon")
            .connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        PostgresOptions {
            config,
            schema: "public".into(),
            meta_table: "upsilon_meta".into(),
            state_table: "upsilon_state".into(),
            history_table: "upsilon_history".into(),
            pool_size: 4,
            op_timeout: Duration::from_secs(10),
            transaction_pooling: false,
            holder_check: Duration::from_secs(1),
            ping_every: Duration::from_millis(100),
            ping_timeout: Duration::from_millis(200),
            takeover_grace: Duration::from_millis(600),
            lease_locks: true,
            tls: TlsChoice::Off,
        }
    }

    /// Options from a `postgres://` or `postgresql://` URL, or a libpq
    /// `key=value` string (`host=db user=app sslmode=require`). Besides what
    /// libpq knows, both may carry:
    /// - `schema=NAME`: the schema of Upsilon's tables (default `public`);
    /// - `pgbouncer=true`: the server is reached through a pooler in
    ///   transaction mode; see [`PostgresOptions::transaction_pooling`].
    ///
    /// TLS (feature `postgres-rustls`) follows `sslmode`: `disable` (or no
    /// `sslmode`) connects without TLS; `prefer` tries TLS and falls back to
    /// plaintext only when the server refuses TLS; `require`, `verify-ca`
    /// and `verify-full` insist on it. Whenever TLS is used the server's
    /// certificate is verified, chain and host name, against the system's
    /// roots and `sslrootcert=PATH` (PEM), which alone also asks for TLS.
    /// `sslmode=allow` is refused: use `prefer` or `disable`.
    ///
    /// Errors show the string with its password replaced.
    pub fn from_url(url: &str) -> Result<PostgresOptions, BackendError> {
        let bad = |why: String| {
            let what = if url.contains("://") {
                "URL"
            } else {
                "connection string"
            };
            BackendError::other(format!(
                "invalid PostgreSQL {what} {:?}: {why}",
                conninfo::redact(url)
            ))
        };
        let info = conninfo::parse(url).map_err(&bad)?;
        let mut options = PostgresOptions::new();
        if let Some(schema) = info.schema {
            options.schema = schema;
        }
        if let Some(value) = info.pgbouncer {
            options.transaction_pooling = parse_bool(&value)
                .ok_or_else(|| bad(format!("pgbouncer={value:?} is not true or false")))?;
        }
        let mut config = info.config;
        if config.get_application_name().is_none() {
            config.application_name("upsilon");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        options.config = config;
        let rootcert = info.sslrootcert;
        let (tls, mode) = match (info.sslmode.as_deref(), &rootcert) {
            (None, None) | (Some("disable"), None) => (TlsChoice::Off, SslMode::Disable),
            (Some("disable"), Some(_)) => {
                return Err(bad(
                    "sslmode=disable turns TLS off and sslrootcert asks for it: drop one of them"
                        .into(),
                ))
            }
            (Some("allow"), _) => {
                return Err(bad(
                    "sslmode=allow is not supported: use sslmode=prefer (TLS when the server offers it) or sslmode=disable".into(),
                ))
            }
            (Some("prefer"), _) => (tls_choice(rootcert), SslMode::Prefer),
            (None, Some(_)) | (Some("require" | "verify-ca" | "verify-full"), _) => {
                (tls_choice(rootcert), SslMode::Require)
            }
            (Some(other), _) => {
                return Err(bad(format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        };
        options.tls = tls;
        options.config.ssl_mode(mode);
        Ok(options)
    }

    /// The server's host name, IP address or Unix socket directory.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config.host(host.into());
        self
    }

    /// The server's port. Default 5432.
    pub fn port(mut self, port: u16) -> Self {
        self.config.port(port);
        self
    }

    /// The user to connect as. Default `postgres`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.config.user(user.into());
        self
    }

    /// The user's password. Never shown in messages or logs.
    pub fn password(mut self, password: impl AsRef<[u8]>) -> Self {
        self.config.password(password.as_ref());
        self
    }

    /// The database. Default: the user's name.
    pub fn dbname(mut self, dbname: impl Into<String>) -> Self {
        self.config.dbname(dbname.into());
        self
    }

    /// The `application_name` of Upsilon's connections, as
    /// `pg_stat_activity` shows it. Default `upsilon`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.config.application_name(name.into());
        self
    }

    /// How long to wait for a connection. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout(timeout);
        self
    }

    /// The schema of Upsilon's tables. Default `public`. Created if missing
    /// (which needs the `CREATE` privilege on the database).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The names of Upsilon's three tables: the format marker, the per-service
    /// state (lease, fence, data version) and the task history. Defaults
    /// `upsilon_meta`, `upsilon_state`, `upsilon_history`.
    pub fn tables(
        mut self,
        meta: impl Into<String>,
        state: impl Into<String>,
        history: impl Into<String>,
    ) -> Self {
        self.meta_table = meta.into();
        self.state_table = state.into();
        self.history_table = history.into();
        self
    }

    /// How many pooled connections one backend keeps at most. Default 4.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// The longest one operation (one transaction) may take before it is
    /// abandoned as unavailable and its connection dropped. Default 10 s.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// The server is reached through a pooler in transaction mode (PgBouncer
    /// `pool_mode = transaction`), where a connection is not the same server
    /// session from one transaction to the next. Then Upsilon keeps no session
    /// of its own: waiting nodes poll instead of `LISTEN`, and a dead holder's
    /// lease is taken over once its TTL has run out (not as soon as its session
    /// ends). Default off; `pgbouncer=true` in the URL turns it on.
    pub fn transaction_pooling(mut self, on: bool) -> Self {
        self.transaction_pooling = on;
        self
    }

    /// How often a waiting node checks whether the lease holder's session
    /// still exists (one light query on its listening connection) when it
    /// cannot block on the lease's advisory lock (see
    /// [`lease_locks`](PostgresOptions::lease_locks)), so that a dead holder
    /// is taken over this soon (plus
    /// [`takeover_grace`](PostgresOptions::takeover_grace)) rather than when
    /// its lease runs out. Jittered ±50 %. Default 1 s. Not used behind a
    /// transaction pooler.
    pub fn holder_check_every(mut self, every: Duration) -> Self {
        self.holder_check = every;
        self
    }

    /// Whether a lease holder's listening session holds an advisory lock of
    /// the lease while it holds the lease, and waiting nodes block on it
    /// (on a pooled connection, with `lock_timeout` at the end of the wait)
    /// instead of checking the holder's session every
    /// [`holder_check_every`](PostgresOptions::holder_check_every): the
    /// lock comes free the moment the server sees the holder's session end,
    /// or after its release. The lock only wakes a waiting node sooner; it
    /// then checks the session and takes the lease over exactly as it
    /// would after a periodic check. A waiting node checks periodically
    /// for a lease whose holder holds no such lock (a node of an older
    /// version, or one with this off), and when its pool has no connection
    /// to spare for the wait (see docs/POSTGRES.md). Default on; off
    /// behind a transaction pooler, where a session's locks do not last.
    pub fn lease_locks(mut self, on: bool) -> Self {
        self.lease_locks = on;
        self
    }

    /// How often a lease holder pings its listening session (`SELECT 1`)
    /// while it holds a lease tied to it, so that it learns within
    /// `holder_ping_every + holder_ping_timeout` that the session ended and
    /// stops its task ([`Lock::until_lost`](upsilon::backend::Lock::until_lost))
    /// before another node may take the lease over. The pings also keep the
    /// session from being closed as idle. Default 100 ms. Only holders ping.
    pub fn holder_ping_every(mut self, every: Duration) -> Self {
        self.ping_every = every;
        self
    }

    /// How long a holder's ping may go unanswered before the holder takes
    /// its session, and so its lease, as lost. Default 200 ms. A server or
    /// host that stalls for longer makes a holder stop its task although
    /// its session lives (safe, but the upgrade then fails and is retried):
    /// where that happens, raise this and the takeover grace together.
    pub fn holder_ping_timeout(mut self, timeout: Duration) -> Self {
        self.ping_timeout = timeout;
        self
    }

    /// How long a waiting node waits, from the moment it first sees the
    /// holder's session gone, before it takes the lease over (before the
    /// lease's expiry). It must be longer than `holder_ping_every +
    /// holder_ping_timeout`, so that the old holder has stopped its task by
    /// then. Default 600 ms. **Every node of a service must use the same
    /// three settings**: a waiter's grace covers the holder's pings only if
    /// both use the same values (see docs/POSTGRES.md).
    pub fn takeover_grace(mut self, grace: Duration) -> Self {
        self.takeover_grace = grace;
        self
    }

    /// Connect with TLS (rustls), verifying the server's certificate and host
    /// name against the system's root certificates and, if given, the CA
    /// certificates in `ca_file` (PEM).
    #[cfg(feature = "postgres-rustls")]
    pub fn tls(mut self, ca_file: Option<impl Into<PathBuf>>) -> Self {
        self.tls = TlsChoice::Rustls {
            ca_file: ca_file.map(Into::into),
        };
        self.config.ssl_mode(SslMode::Require);
        self
    }

    /// `host:port/db as user`, for messages: never the password.
    pub(crate) fn target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        match self.config.get_user() {
            Some(user) => {
                let db = self.config.get_dbname().unwrap_or(user);
                format!("{host}:{port}/{db} as user `{user}`")
            }
            // The driver then connects as the operating system's user, to
            // the database of that name, as libpq does.
            None => match self.config.get_dbname() {
                Some(db) => format!("{host}:{port}/{db} as this process's operating-system user"),
                None => format!("{host}:{port} as this process's operating-system user"),
            },
        }
    }

    /// Checks every identifier; the first bad one is named.
    pub(crate) fn validate(&self) -> Result<(), BackendError> {
        check_identifier("schema", &self.schema)?;
        if self.schema.starts_with("pg_") {
            return Err(BackendError::other(format!(
                "schema {:?}: names starting with `pg_` are reserved by PostgreSQL",
                self.schema
            )));
        }
        check_identifier("meta table", &self.meta_table)?;
        check_identifier("state table", &self.state_table)?;
        check_identifier("history table", &self.history_table)?;
        let names = [&self.meta_table, &self.state_table, &self.history_table];
        if names[0] == names[1] || names[1] == names[2] || names[0] == names[2] {
            return Err(BackendError::other(format!(
                "the meta, state and history tables need three different names, got {:?}, {:?} and {:?}",
                names[0], names[1], names[2]
            )));
        }
        if self.pool_size == 0 {
            return Err(BackendError::other("the pool size must be at least 1"));
        }
        if self.holder_check.is_zero() {
            return Err(BackendError::other(
                "the holder check interval must not be zero",
            ));
        }
        if self.ping_every.is_zero() || self.ping_timeout.is_zero() {
            return Err(BackendError::other(
                "the holder ping interval and timeout must not be zero",
            ));
        }
        let budget = self.ping_every.saturating_add(self.ping_timeout);
        if self.takeover_grace <= budget {
            return Err(BackendError::other(format!(
                "the takeover grace ({:?}) must be longer than the holder ping interval plus its timeout ({:?} + {:?}): \
                 otherwise a waiting node may take a lease over before its holder has noticed that its session ended",
                self.takeover_grace, self.ping_every, self.ping_timeout
            )));
        }
        if self.op_timeout.is_zero() {
            return Err(BackendError::other(
                "the operation timeout must not be zero",
            ));
        }
        if self.tls == TlsChoice::Unavailable {
            return Err(BackendError::other(
                "the connection string asks for TLS (sslmode or sslrootcert), and this build of upsilon-backends has no TLS: enable its `postgres-rustls` feature, or use sslmode=disable to connect without TLS",
            ));
        }
        Ok(())
    }
}

#[cfg(feature = "postgres-rustls")]
fn tls_choice(ca_file: Option<String>) -> TlsChoice {
    TlsChoice::Rustls {
        ca_file: ca_file.map(PathBuf::from),
    }
}

#[cfg(not(feature = "postgres-rustls"))]
fn tls_choice(_ca_file: Option<String>) -> TlsChoice {
    TlsChoice::Unavailable
}

/// `^[a-z_][a-z0-9_]{0,62}$`: an identifier that needs no quoting, though it
/// is always quoted, and fits PostgreSQL's 63-byte limit untruncated.
pub(crate) fn check_identifier(what: &str, name: &str) -> Result<(), BackendError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BackendError::other(format!(
            "{what} name {name:?} is not allowed: use 1 to 63 characters of a-z, 0-9 and `_`, not starting with a digit"
        )))
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" | "on" | "yes" => Some(true),
        "false" | "0" | "off" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
