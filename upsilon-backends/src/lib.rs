//! Lock and store backends for [Upsilon](upsilon), one module per backend
//! behind one feature each:
//!
//! | feature | backend | lease | wake-up |
//! |---|---|---|---|
//! | `sqlite` (default) | [`sqlite::SqliteBackend`]: one database file, one host | row, `BEGIN IMMEDIATE` | poll |
//! | `kubernetes` | [`kubernetes::KubernetesBackend`]: a Lease and ConfigMaps in one namespace, through the API server | `coordination.k8s.io/v1` Lease written with `resourceVersion` preconditions, expiry measured on each node's monotonic clock | watch |
//! | `postgres` | [`postgres::PostgresBackend`]: the service's own PostgreSQL, any number of hosts; works behind PgBouncer in transaction mode | row judged by the database clock, fence checked under `SELECT ... FOR UPDATE` | `LISTEN`/`NOTIFY`, poll behind a pooler |
//! | `redis` | [`redis::RedisBackend`]: a Redis the service already runs (TLS included); as the store only with `appendonly yes` and `appendfsync always` (docs/REDIS.md) | hash expiring on the server's clock, granted and written by Lua scripts that compare a revision | pub/sub, poll while it is down |
//! | `etcd` | [`etcd::EtcdBackend`]: keys under a prefix of an etcd v3 cluster (3.4+), TLS and user/password included | key attached to an etcd lease (TTL at least 2 s), created by a transaction; fence from its create revision | watch, poll while it is down |
//!
//! Feature `postgres-rustls` adds TLS to PostgreSQL with rustls (`etcd`
//! always has it); `all-backends` turns every backend on.
//!
//! [`connect`] opens a backend from a URL.
#![warn(missing_docs)]
#![deny(unreachable_pub)]

use std::sync::Arc;

use upsilon::backend::{Backend, BackendError};

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod wakeups;

/// Opens the backend a URL names:
/// - `sqlite:PATH` or `sqlite://PATH` (`sqlite:///abs/path.db`), feature `sqlite`;
/// - `kubernetes://NAMESPACE`, feature `kubernetes` (see
///   [`kubernetes::KubernetesOptions::from_url`]);
/// - `postgres://` or `postgresql://` URLs, feature `postgres` (see
///   [`postgres::PostgresOptions::from_url`] for the options they may carry),
///   and libpq `key=value` strings (`host=db user=app sslmode=require`);
/// - `redis://`, `rediss://` (TLS) or `redis+unix://` URLs, feature `redis`
///   (see [`redis::RedisOptions::from_url`]);
/// - `etcd://host:port,host2:port2/prefix` URLs, and `etcds://` for TLS,
///   feature `etcd` (see [`etcd::EtcdOptions::from_url`]).
///
/// Errors show the URL with its password replaced.
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>, BackendError> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
    match scheme {
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let path = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .unwrap_or_default();
            Ok(Arc::new(sqlite::SqliteBackend::open(path).await?))
        }
        #[cfg(feature = "etcd")]
        "etcd" | "etcds" => Ok(Arc::new(etcd::EtcdBackend::connect_url(url).await?)),
        #[cfg(feature = "kubernetes")]
        "kubernetes" => Ok(Arc::new(
            kubernetes::KubernetesBackend::connect_url(url).await?,
        )),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            Ok(Arc::new(postgres::PostgresBackend::connect_url(url).await?))
        }
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+unix" => Ok(Arc::new(redis::RedisBackend::connect(url).await?)),
        // A libpq `key=value` string (`host=db user=app`) has no scheme.
        #[cfg(feature = "postgres")]
        _ if !url.contains("://") && url.contains('=') => {
            Ok(Arc::new(postgres::PostgresBackend::connect_url(url).await?))
        }
        _ => Err(BackendError::other(format!(
            "no backend for {:?}: expected a URL starting with one of {}",
            redact(url),
            enabled_schemes().join(", ")
        ))),
    }
}

// One push per enabled feature, so `vec![]` does not fit.
#[allow(clippy::vec_init_then_push, unused_mut)]
fn enabled_schemes() -> Vec<&'static str> {
    let mut schemes = Vec::new();
    #[cfg(feature = "sqlite")]
    schemes.push("`sqlite:`");
    #[cfg(feature = "postgres")]
    schemes.push("`postgres://`");
    #[cfg(feature = "etcd")]
    schemes.push("`etcd://`");
    #[cfg(feature = "redis")]
    schemes.extend(["`redis://`", "`rediss://`", "`redis+unix://`"]);
    #[cfg(feature = "kubernetes")]
    schemes.push("`kubernetes://`");
    schemes
}

/// The URL (or key=value connection string) with every password replaced,
/// for messages: the URL's user info, `password=` query parameters and
/// `password=` key=value pairs.
pub fn redact(url: &str) -> String {
    let masked = match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, tail) = match rest.find(['/', '?']) {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}:***@{host}{tail}")
                }
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    };
    mask_password_values(&masked)
}

/// Replaces the value after every `password=` (case-insensitive), up to the
/// next `&`, white space, or the closing quote of a quoted value.
fn mask_password_values(text: &str) -> String {
    const KEY: &str = "password=";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(found) = lower[at..].find(KEY) {
        let value = at + found + KEY.len();
        out.push_str(&text[at..value]);
        out.push_str("***");
        let rest = &text[value..];
        let len = match rest.strip_prefix('\'') {
            Some(quoted) => quoted.find('\'').map_or(rest.len(), |end| end + 2),
            None => rest.find(['&', ' ', '\t', '\n']).unwrap_or(rest.len()),
        };
        at = value + len;
    }
    out.push_str(&text[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
        assert_eq!(
            redact("postgres://db/x?user=app&password=s3cret&sslmode=require"),
            "postgres://db/x?user=app&password=***&sslmode=require"
        );
        assert_eq!(
            redact("host=db password='s3 cret' user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(redact("host=db PASSWORD=s3cret"), "host=db PASSWORD=***");
    }

    #[tokio::test]
    async fn a_key_value_string_is_not_echoed_with_its_password() {
        for bad in [
            "host=127.0.0.1 port=1 password=s3cret user=app connect_timeout=2",
            "mysql://db/x?password=s3cret",
        ] {
            let err = connect(bad).await.err().unwrap().to_string();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[tokio::test]
    async fn unknown_schemes_are_named() {
        let err = connect("mysql://u:pw@h/db")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("\"mysql://u:***@h/db\""), "{err}");
        assert!(!err.contains("pw"), "{err}");
    }

    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn etcd_urls_reach_the_etcd_backend() {
        let err = connect("mysql://h").await.err().unwrap().to_string();
        assert!(err.contains("`etcd://`"), "{err}");
        for url in ["etcd://app:s3cret@h:0/x", "etcds://app:s3cret@h:0/x"] {
            let err = connect(url).await.err().unwrap().to_string();
            assert!(err.starts_with("invalid etcd URL"), "{err}");
            assert!(err.contains("app:***@h:0/x"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }
}
