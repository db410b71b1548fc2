//! How to reach the etcd cluster and where Upsilon's keys live.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use upsilon::backend::BackendError;

/// The port etcd serves clients on unless told otherwise.
pub const DEFAULT_PORT: u16 = 2379;

/// The key prefix unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/upsilon";

/// Options of an [`EtcdBackend`](super::EtcdBackend): the cluster's
/// endpoints, the key prefix, credentials, TLS and timeouts.
///
/// ```
/// use std::time::Duration;
/// use upsilon_backends::etcd::EtcdOptions;
///
/// let from_url = EtcdOptions::from_url("etcd://app:secret@etcd-0:2379,etcd-1:2379/ops/upsilon")?;
/// let from_parts = EtcdOptions::new()
///     .endpoints(["etcd-0:2379", "etcd-1:2379"])
///     .prefix("/ops/upsilon")
///     .user("app")
///     .password("secret")
///     .connect_timeout(Duration::from_secs(3));
/// # Ok::<(), upsilon::backend::BackendError>(())
/// ```
#[derive(Clone)]
pub struct EtcdOptions {
    pub(crate) endpoints: Vec<String>,
    pub(crate) prefix: String,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) tls: bool,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) connect_timeout: Duration,
    pub(crate) op_timeout: Duration,
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions::new()
    }
}

impl EtcdOptions {
    /// The defaults: endpoint `127.0.0.1:2379`, prefix `/upsilon`, no
    /// credentials, no TLS, a 5 s connect timeout and a 10 s operation
    /// timeout.
    pub fn new() -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![format!("127.0.0.1:{DEFAULT_PORT}")],
            prefix: DEFAULT_PREFIX.to_owned(),
            user: None,
            password: None,
            tls: false,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(10),
        }
    }

    /// Options from a URL:
    ///
    /// ```text
    /// etcd://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]...][/PREFIX][?PARAM=VALUE&...]
    /// etcds://...                      the same over TLS
    /// ```
    ///
    /// - several endpoints are separated by commas; the port defaults to
    ///   2379; IPv6 addresses go in brackets (`[::1]:2379`);
    /// - the path is the key prefix (default `/upsilon`);
    /// - parameters: `cacert=PATH` (a CA certificate file, PEM, trusted
    ///   besides the system's roots; implies TLS), `tls=true|false`,
    ///   `connect_timeout=SECONDS`, `timeout=SECONDS` (of each operation),
    ///   `user=NAME` and `password=SECRET` (instead of the user info).
    ///
    /// User, password and prefix are percent-decoded. Errors show the URL
    /// with its password replaced.
    pub fn from_url(url: &str) -> Result<EtcdOptions, BackendError> {
        parse_url(url).map_err(|why| {
            BackendError::other(format!("invalid etcd URL {:?}: {why}", crate::redact(url)))
        })
    }

    /// One endpoint, `HOST:PORT`, in place of the endpoints so far.
    pub fn endpoint(self, endpoint: impl Into<String>) -> Self {
        self.endpoints([endpoint.into()])
    }

    /// The cluster's client endpoints, `HOST:PORT` each. The client spreads
    /// requests over those that answer, so a dead member does not stop it.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// The prefix of every key Upsilon keeps, `/upsilon` by default: one
    /// `/`-separated path of letters, digits, `_`, `-` and `.`, starting with
    /// `/` and not ending with one.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The etcd user to authenticate as (etcd's user/password
    /// authentication).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The user's password. Never shown in messages or logs.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Connect with TLS (rustls), verifying the servers' certificates and
    /// host names against the system's root certificates and, if given, the
    /// CA certificates in `ca_file` (PEM).
    pub fn tls(mut self, ca_file: Option<impl Into<PathBuf>>) -> Self {
        self.tls = true;
        self.ca_file = ca_file.map(Into::into);
        self
    }

    /// How long to wait for a connection to an endpoint. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest one operation (a read, a transaction, a keep-alive) may
    /// take before it is given up as unavailable. Default 10 s.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// The endpoints, the prefix and the user, for messages: never the
    /// password.
    pub(crate) fn target(&self) -> String {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        let mut s = format!("{scheme}://{}{}", self.endpoints.join(","), self.prefix);
        if let Some(user) = &self.user {
            s.push_str(&format!(" as user `{user}`"));
        }
        s
    }

    /// The endpoints as the client takes them: `http://` or `https://` URLs.
    pub(crate) fn endpoint_urls(&self) -> Vec<String> {
        let scheme = if self.tls { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }

    /// Checks everything that can be checked without connecting; the first
    /// problem is named.
    pub(crate) fn validate(&self) -> Result<(), BackendError> {
        let bad = |why: String| BackendError::other(format!("etcd options: {why}"));
        if self.endpoints.is_empty() {
            return Err(bad(
                "no endpoint: give at least one `HOST:PORT` of the cluster".into(),
            ));
        }
        for e in &self.endpoints {
            check_endpoint(e).map_err(bad)?;
        }
        check_prefix(&self.prefix).map_err(bad)?;
        if self.password.is_some() && self.user.is_none() {
            return Err(bad("a password without a user: give the user too".into()));
        }
        if self.user.as_deref() == Some("") {
            return Err(bad("the user name is empty".into()));
        }
        if self.user.is_some() && self.password.is_none() {
            return Err(bad(
                "a user without a password: etcd's authentication needs both".into(),
            ));
        }
        if self.connect_timeout.is_zero() || self.op_timeout.is_zero() {
            return Err(bad(
                "the connect and operation timeouts must not be zero".into()
            ));
        }
        if self.ca_file.is_some() && !self.tls {
            return Err(bad("a CA file is given and TLS is off".into()));
        }
        Ok(())
    }
}

/// `HOST:PORT`, with a bracketed IPv6 address allowed.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let (host, port) = split_host_port(endpoint)
        .ok_or_else(|| format!("endpoint {endpoint:?} is not `HOST:PORT`"))?;
    if host.is_empty() {
        return Err(format!("endpoint {endpoint:?} has no host"));
    }
    let ok_host = host.starts_with('[')
        || host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if !ok_host {
        return Err(format!(
            "endpoint {endpoint:?}: {host:?} is not a host name or address"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "endpoint {endpoint:?}: the port {port:?} is not 1 to 65535"
        )),
    }
}

fn split_host_port(endpoint: &str) -> Option<(&str, &str)> {
    if endpoint.starts_with('[') {
        let close = endpoint.find(']')?;
        let port = endpoint[close + 1..].strip_prefix(':')?;
        Some((&endpoint[..=close], port))
    } else {
        endpoint.rsplit_once(':')
    }
}

/// A prefix like `/upsilon` or `/ops/upsilon`.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    let why = || {
        format!(
            "the key prefix {prefix:?} is not allowed: use `/`-separated names of a-z, A-Z, 0-9, `_`, `-` and `.`, \
             starting with `/` and not ending with one, like `/upsilon`"
        )
    };
    let rest = prefix.strip_prefix('/').ok_or_else(why)?;
    if rest.is_empty() || prefix.len() > 200 {
        return Err(why());
    }
    for segment in rest.split('/') {
        let ok = !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !ok {
            return Err(why());
        }
    }
    Ok(())
}

fn parse_url(url: &str) -> Result<EtcdOptions, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("expected `etcd://HOST:PORT/PREFIX` or `etcds://...`")?;
    let mut options = EtcdOptions::new();
    options.tls = match scheme {
        "etcd" => false,
        "etcds" => true,
        other => return Err(format!("the scheme {other:?} is not `etcd` or `etcds`")),
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            let user = percent_decode(user).ok_or("the user name is not valid percent-encoding")?;
            if !user.is_empty() {
                options.user = Some(user);
            }
            if let Some(p) = password {
                options.password =
                    Some(percent_decode(p).ok_or("the password is not valid percent-encoding")?);
            }
            hosts
        }
        None => authority,
    };
    if hosts.is_empty() {
        return Err("no endpoint: expected `HOST:PORT` after `://`".into());
    }
    options.endpoints = hosts
        .split(',')
        .map(|h| {
            if h.is_empty() {
                return Err("an empty endpoint between commas".to_owned());
            }
            let has_port = if h.starts_with('[') {
                h.contains("]:")
            } else {
                h.contains(':')
            };
            Ok(if has_port {
                h.to_owned()
            } else {
                format!("{h}:{DEFAULT_PORT}")
            })
        })
        .collect::<Result<_, _>>()?;
    if !path.is_empty() && path != "/" {
        let decoded = percent_decode(path).ok_or("the prefix is not valid percent-encoding")?;
        options.prefix = decoded.strip_suffix('/').unwrap_or(&decoded).to_owned();
    }
    let mut tls_param = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            format!(
                "the parameter {:?} has no `=VALUE`",
                pair.split('=').next().unwrap_or_default()
            )
        })?;
        let value = || {
            percent_decode(value).ok_or(format!(
                "the value of `{key}` is not valid percent-encoding"
            ))
        };
        match key {
            "cacert" => options.ca_file = Some(PathBuf::from(value()?)),
            "tls" => {
                tls_param = Some(
                    parse_bool(&value()?)
                        .ok_or_else(|| format!("tls={:?} is not true or false", value().unwrap_or_default()))?,
                )
            }
            "connect_timeout" => options.connect_timeout = seconds(key, &value()?)?,
            "timeout" => options.op_timeout = seconds(key, &value()?)?,
            "user" => options.user = Some(value()?),
            "password" => options.password = Some(value()?),
            other => {
                return Err(format!(
                    "unknown parameter `{other}`: expected cacert, tls, connect_timeout, timeout, user or password"
                ))
            }
        }
    }
    match (scheme, tls_param) {
        ("etcds", Some(false)) => {
            return Err(
                "`etcds://` asks for TLS and tls=false turns it off: drop one of them".into(),
            )
        }
        ("etcd", Some(false)) if options.ca_file.is_some() => {
            return Err("tls=false turns TLS off and cacert asks for it: drop one of them".into())
        }
        (_, Some(true)) => options.tls = true,
        _ => {}
    }
    if options.ca_file.is_some() {
        options.tls = true;
    }
    options.validate().map_err(|e| {
        e.to_string()
            .trim_start_matches("etcd options: ")
            .to_owned()
    })?;
    Ok(options)
}

/// `5`, `2.5` (seconds) or `500ms`.
fn seconds(key: &str, value: &str) -> Result<Duration, String> {
    let parsed = match value.strip_suffix("ms") {
        Some(ms) => ms.parse::<u64>().ok().map(Duration::from_millis),
        None => value
            .strip_suffix('s')
            .unwrap_or(value)
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
            .map(Duration::from_secs_f64),
    };
    parsed.filter(|d| !d.is_zero()).ok_or_else(|| {
        format!("{key}={value:?} is not a positive number of seconds (like 5, 2.5 or 500ms)")
    })
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" | "on" | "yes" => Some(true),
        "false" | "0" | "off" | "no" => Some(false),
        _ => None,
    }
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests;
