//! How to reach the server, and the prefix of Upsilon's keys.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use upsilon::backend::BackendError;

/// The query parameters Upsilon reads from a Redis URL (the driver's own,
/// `protocol`, and for `redis+unix://` also `db`, `user` and `pass`, are
/// passed on).
const OURS: &[&str] = &["prefix", "ca_file", "timeout_ms", "connect_timeout_ms"];
const DRIVER_TCP: &[&str] = &["protocol"];
const DRIVER_UNIX: &[&str] = &["protocol", "db", "user", "pass"];

/// Options of a [`RedisBackend`](super::RedisBackend): the server (from a
/// URL or from parts), TLS, the prefix of Upsilon's keys, and timeouts.
///
/// ```
/// use upsilon_backends::redis::RedisOptions;
/// let from_url = RedisOptions::from_url("redis://:secret@cache:6379/2?prefix=ops")?;
/// let from_parts = RedisOptions::new()
///     .host("cache")
///     .port(6379)
///     .password("secret")
///     .db(2)
///     .prefix("ops");
/// # Ok::<(), upsilon::backend::BackendError>(())
/// ```
#[derive(Clone)]
pub struct RedisOptions {
    pub(crate) info: ConnectionInfo,
    pub(crate) prefix: String,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) op_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) subscription_check: Duration,
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("target", &self.target())
            .field("prefix", &self.prefix)
            .field("ca_file", &self.ca_file)
            .field("op_timeout", &self.op_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("subscription_check", &self.subscription_check)
            .finish_non_exhaustive()
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions::new()
    }
}

impl RedisOptions {
    /// Options from parts, all defaults: `127.0.0.1:6379`, database 0, no
    /// user or password, no TLS, prefix `upsilon`.
    pub fn new() -> RedisOptions {
        RedisOptions {
            info: ConnectionAddr::Tcp("127.0.0.1".into(), 6379)
                .into_connection_info()
                .expect("a TCP address is a connection info"),
            prefix: "upsilon".into(),
            ca_file: None,
            op_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            subscription_check: Duration::from_secs(1),
        }
    }

    /// Options from a URL:
    /// - `redis://[user][:password@]host[:port][/db]`: plain TCP;
    /// - `rediss://...`: the same with TLS, the server's certificate verified
    ///   (chain and host name) against the system's roots, or only against
    ///   the CA certificates in `ca_file=PATH` (PEM) when it is given;
    /// - `redis+unix:///path/to/redis.sock[?db=N&user=U&pass=P]`: a Unix
    ///   socket.
    ///
    /// Each may carry `prefix=NAME` (the first part of every key, default
    /// `upsilon`), `timeout_ms=N` (the longest one command may take, default
    /// 5000), `connect_timeout_ms=N` (default 5000), and the driver's
    /// `protocol=resp2|resp3`. Any other parameter, and `#insecure`, are
    /// refused.
    ///
    /// Errors show the URL with its password replaced.
    pub fn from_url(url: &str) -> Result<RedisOptions, BackendError> {
        let bad = |why: String| {
            BackendError::other(format!("invalid Redis URL {:?}: {why}", redact(url)))
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let scheme = parsed.scheme();
        let (tls, unix) = match scheme {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+unix" => (false, true),
            other => {
                return Err(bad(format!(
                    "the scheme is `{other}://`; use redis://, rediss:// (TLS) or redis+unix:// (a Unix socket)"
                )))
            }
        };
        if let Some(fragment) = parsed.fragment() {
            return Err(bad(if fragment == "insecure" {
                "#insecure turns certificate verification off, which Upsilon does not do; \
                 give the server's CA with ca_file=PATH"
                    .to_owned()
            } else {
                format!("the fragment #{fragment} means nothing here")
            }));
        }
        let mut options = RedisOptions::new();
        let driver = if unix { DRIVER_UNIX } else { DRIVER_TCP };
        for (key, value) in parsed.query_pairs() {
            match &*key {
                "prefix" => options.prefix = value.into_owned(),
                "ca_file" if tls => options.ca_file = Some(PathBuf::from(&*value)),
                "ca_file" => {
                    return Err(bad(
                        "ca_file is for TLS: use the rediss:// scheme with it".to_owned()
                    ))
                }
                "timeout_ms" => options.op_timeout = millis(&key, &value).map_err(&bad)?,
                "connect_timeout_ms" => {
                    options.connect_timeout = millis(&key, &value).map_err(&bad)?
                }
                k if driver.contains(&k) => {}
                other => {
                    let known: Vec<&str> = OURS.iter().chain(driver).copied().collect();
                    return Err(bad(format!(
                        "unknown parameter `{other}`; known: {}",
                        known.join(", ")
                    )));
                }
            }
        }
        if !unix && parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("it names no host".to_owned()));
        }
        if unix && parsed.path().is_empty() {
            return Err(bad(
                "it names no socket: redis+unix:///path/to/redis.sock".to_owned()
            ));
        }
        // The driver reads the address, user, password, database and
        // protocol; the parameters above are ignored by it.
        options.info = parsed
            .as_str()
            .into_connection_info()
            .map_err(|e| bad(e.to_string()))?;
        Ok(options)
    }

    /// The server's host name or IP address, on the same port and with the
    /// same TLS choice.
    pub fn host(self, host: impl Into<String>) -> Self {
        let host = host.into();
        let addr = match self.info.addr().clone() {
            ConnectionAddr::Tcp(_, port) => ConnectionAddr::Tcp(host, port),
            ConnectionAddr::TcpTls { port, .. } => tls_addr(host, port),
            _ => ConnectionAddr::Tcp(host, 6379),
        };
        self.addr(addr)
    }

    /// The server's port. Default 6379.
    pub fn port(self, port: u16) -> Self {
        let addr = match self.info.addr().clone() {
            ConnectionAddr::Tcp(host, _) => ConnectionAddr::Tcp(host, port),
            ConnectionAddr::TcpTls { host, .. } => tls_addr(host, port),
            _ => ConnectionAddr::Tcp("127.0.0.1".into(), port),
        };
        self.addr(addr)
    }

    /// Connect through the Unix socket at `path` instead of TCP.
    pub fn unix_socket(self, path: impl Into<PathBuf>) -> Self {
        self.addr(ConnectionAddr::Unix(path.into()))
    }

    /// Connect with TLS, verifying the server's certificate and host name
    /// against the system's root certificates, or, if `ca_file` is given,
    /// only against the CA certificates in it (PEM).
    pub fn tls(mut self, ca_file: Option<impl Into<PathBuf>>) -> Self {
        self.ca_file = ca_file.map(Into::into);
        let addr = match self.info.addr().clone() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                tls_addr(host, port)
            }
            _ => tls_addr("127.0.0.1".into(), 6379),
        };
        self.addr(addr)
    }

    /// The user to log in as (Redis 6 ACLs). Default: none (`default`).
    pub fn username(self, user: impl AsRef<str>) -> Self {
        let redis = self.info.redis_settings().clone().set_username(user);
        self.redis(redis)
    }

    /// The password. Never shown in messages or logs.
    pub fn password(self, password: impl AsRef<str>) -> Self {
        let redis = self.info.redis_settings().clone().set_password(password);
        self.redis(redis)
    }

    /// The database number. Default 0.
    pub fn db(self, db: i64) -> Self {
        let redis = self.info.redis_settings().clone().set_db(db);
        self.redis(redis)
    }

    /// The first part of every key Upsilon writes (`PREFIX:{SERVICE}:...`).
    /// Default `upsilon`. 1 to 64 characters of `A-Z a-z 0-9 _ - . :`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one command (or script) may take before it is abandoned
    /// as unavailable. Default 5 s.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// How long to wait for a connection. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often the subscription that wakes waiting nodes is pinged, so that
    /// a connection that died silently is noticed (waiting nodes then poll
    /// until it is back). Default 1 s.
    pub fn subscription_check_every(mut self, every: Duration) -> Self {
        self.subscription_check = every;
        self
    }

    /// The prefix of Upsilon's keys.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    fn addr(mut self, addr: ConnectionAddr) -> Self {
        self.info = self.info.set_addr(addr);
        self
    }

    fn redis(mut self, redis: RedisConnectionInfo) -> Self {
        self.info = self.info.set_redis_settings(redis);
        self
    }

    /// `host:port db N as user U`, for messages: never the password.
    pub(crate) fn target(&self) -> String {
        let addr = match self.info.addr() {
            ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (TLS)"),
            ConnectionAddr::Unix(path) => path.display().to_string(),
            other => format!("{other}"),
        };
        let redis = self.info.redis_settings();
        let user = redis.username().unwrap_or("default");
        format!("{addr} db {} as user `{user}`", redis.db())
    }

    /// Checks the options before any connection is made.
    pub(crate) fn validate(&self) -> Result<(), BackendError> {
        check_prefix(&self.prefix)?;
        for (what, d) in [
            ("the operation timeout", self.op_timeout),
            ("the connect timeout", self.connect_timeout),
            ("the subscription check interval", self.subscription_check),
        ] {
            if d.is_zero() {
                return Err(BackendError::other(format!("{what} must not be zero")));
            }
        }
        if self.ca_file.is_some() && !matches!(self.info.addr(), ConnectionAddr::TcpTls { .. }) {
            return Err(BackendError::other(
                "a CA file is given, and the connection does not use TLS: use rediss:// or RedisOptions::tls",
            ));
        }
        Ok(())
    }

    pub(crate) fn uses_tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
    }

    pub(crate) fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }
}

fn tls_addr(host: String, port: u16) -> ConnectionAddr {
    ConnectionAddr::TcpTls {
        host,
        port,
        insecure: false,
        tls_params: None,
    }
}

fn millis(key: &str, value: &str) -> Result<Duration, String> {
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "{key}={value:?} is not a positive number of milliseconds"
        )),
    }
}

/// `^[A-Za-z0-9_.:-]{1,64}$`: no glob characters (the prefix is matched
/// with `SCAN MATCH`) and no braces (they would move the hash tag).
pub(crate) fn check_prefix(prefix: &str) -> Result<(), BackendError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BackendError::other(format!(
            "key prefix {prefix:?} is not allowed: use 1 to 64 characters of A-Z, a-z, 0-9, `_`, `-`, `.` and `:`"
        )))
    }
}

/// A Redis URL with every password replaced: the user info's, and the
/// `pass=` and `password=` query parameters (`redis+unix://`). Of a string
/// without `://`, where a password cannot be told apart, only the scheme is
/// kept.
pub fn redact(url: &str) -> String {
    if !url.contains("://") {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        return format!("{scheme}:***");
    }
    let masked = crate::redact(url);
    mask_query(&masked, "pass=")
}

fn mask_query(text: &str, key: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let found = [format!("?{key}"), format!("&{key}")]
            .iter()
            .filter_map(|k| rest.find(k.as_str()).map(|i| i + k.len()))
            .min();
        let Some(value) = found else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..value]);
        out.push_str("***");
        let tail = &rest[value..];
        rest = &tail[tail.find(['&', '#']).unwrap_or(tail.len())..];
    }
}

#[cfg(test)]
mod tests;
