//! Redis: lease, fences, state and history in a Redis the service already
//! runs, with pub/sub to wake waiting nodes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use upsilon_backends::redis::RedisBackend;
//!
//! let backend = RedisBackend::connect("redis://:secret@cache:6379/0").await?;
//! let upsilon = upsilon::Upsilon::builder()
//!     .service("billing")
//!     .app_version(env!("CARGO_PKG_VERSION"))
//!     .backend(Arc::new(backend))
//!     .build()?;
//! upsilon.run().await?;
//! # Ok(()) }
//! ```
//!
//! How it works (docs/REDIS.md says more):
//! - Every operation is one or two Lua scripts, each atomic on the server.
//!   The kit decides: a grant reads the lease, the server's clock (`TIME`),
//!   the grant counter, the store's fence and the newest history row in one
//!   script, [`decide_acquire`](upsilon::backend::decide_acquire) decides, and
//!   a second script writes the grant only if the service's revision has not
//!   moved since the read (else it reads again). Store writes do the same
//!   with [`Snapshot::check`](upsilon::backend::Snapshot::check). Renewals and
//!   releases compare (holder, fence, unexpired) in one script.
//! - The lease expires on the server's clock: its hash carries its expiry and
//!   the key is set to expire then (`PEXPIREAT`). Redis has no session to
//!   tie a lease to, so a lease is only ever granted again after its expiry;
//!   [`Lock::until_lost`](upsilon::backend::Lock::until_lost) keeps its
//!   default.
//! - The fences live in a hash of their own, apart from the lease and the
//!   state, so neither a forced release nor deleting those keys takes them
//!   back; a grant is also above the newest fence in the history.
//! - Waiting nodes subscribe to `PREFIX:wake`; releases, forced releases and
//!   data version changes publish the service's name on it from the same
//!   script that makes the change. While the subscription is down, they poll.
//!
//! Keys, for service `S` (all in the slot of the hash tag `{S}`):
//! - `PREFIX:{S}:meta`: hash of the stored format (`format` = 1), the grant
//!   counter (`granted`), the store's fence (`store`) and the revision every
//!   grant and store write raises (`rev`);
//! - `PREFIX:{S}:lease`: hash of `holder`, `fence`, `expires_at_ms`,
//!   `granted_at_ms`, expiring with the lease;
//! - `PREFIX:{S}:state`: hash of `data_version` and `baseline`;
//! - `PREFIX:{S}:history`: hash of the history rows, one JSON object per
//!   task attempt, under `VERSION TASK#ATTEMPT`;
//! - `PREFIX:{S}:order`: list of the row ids in the order they were written.

mod error;
mod listener;
mod lock;
mod options;
mod rows;
mod scripts;
mod store;

use std::fmt;
use std::sync::Arc;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ScriptInvocation, Value};
use tracing::debug;
use upsilon::backend::BackendError;

use crate::wakeups::Wakeups;
use error::{driver, timed_out};
use listener::Subscription;
pub use options::{redact, RedisOptions};

/// The driver, for tasks that use the same Redis.
pub use redis;

/// The stored format this build writes and reads.
pub const FORMAT: u32 = 1;

/// Lock and store in Redis. Cheap to clone: clones share the connection and
/// the subscription.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    options: RedisOptions,
    target: String,
    conn: ConnectionManager,
    channel: String,
    wakeups: Arc<Wakeups>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("target", &self.inner.target)
            .field("prefix", &self.inner.options.prefix)
            .field("subscribed", &self.inner.wakeups.is_up())
            .finish_non_exhaustive()
    }
}

/// The keys of one service, in the order the scripts take them.
pub(crate) struct Keys {
    meta: String,
    state: String,
    lease: String,
    history: String,
    order: String,
}

impl RedisBackend {
    /// Connects from a `redis://`, `rediss://` or `redis+unix://` URL; see
    /// [`RedisOptions::from_url`].
    pub async fn connect(url: &str) -> Result<RedisBackend, BackendError> {
        RedisBackend::connect_with(RedisOptions::from_url(url)?).await
    }

    /// Connects with `options`, and subscribes to the channel that wakes
    /// waiting nodes (if that fails, they poll until it works).
    pub async fn connect_with(options: RedisOptions) -> Result<RedisBackend, BackendError> {
        options.validate()?;
        let target = options.target();
        let client = client(&options, &target)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.op_timeout))
            .set_number_of_retries(1)
            .set_min_delay(std::time::Duration::from_millis(50))
            .set_max_delay(std::time::Duration::from_secs(1));
        let connecting = ConnectionManager::new_with_config(client.clone(), config);
        let conn = tokio::time::timeout(options.connect_timeout * 3, connecting)
            .await
            .map_err(|_| timed_out("connecting", &target, options.connect_timeout * 3))?
            .map_err(|e| error::connecting(e, &target, options.uses_tls()))?;
        let channel = format!("{}:wake", options.prefix);
        let wakeups = Arc::new(Wakeups::default());
        let (first, subscribed) = tokio::sync::oneshot::channel();
        let subscription = Subscription {
            client,
            channel: channel.clone(),
            wakeups: wakeups.clone(),
            connect_timeout: options.connect_timeout,
            check_every: options.subscription_check,
            check_timeout: options.op_timeout,
            target: target.clone(),
        };
        let listener = tokio::spawn(subscription.run(first));
        let backend = RedisBackend {
            inner: Arc::new(Inner {
                options,
                target,
                conn,
                channel,
                wakeups,
                listener,
            }),
        };
        backend.ping().await?;
        // The first subscription attempt ends well within the connect
        // timeout; until it succeeds, waiting nodes poll.
        let _ = subscribed.await;
        if !backend.inner.wakeups.is_up() {
            debug!(target = %backend.inner.target, "not subscribed yet; waiting nodes poll");
        }
        Ok(backend)
    }

    /// The options it was connected with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// The pub/sub channel that wakes waiting nodes; the message is the
    /// service's name.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The key of `kind` (`meta`, `lease`, `state`, `history`, `order`) of
    /// `service`: `PREFIX:{SERVICE}:KIND`.
    pub fn key(&self, service: &str, kind: &str) -> String {
        key(&self.inner.options.prefix, service, kind)
    }

    fn keys(&self, service: &str) -> Result<Keys, BackendError> {
        if service.is_empty() {
            return Err(BackendError::other(
                "the service name is empty; Redis keys are scoped by it (`PREFIX:{SERVICE}:...`), so give it one",
            ));
        }
        let k = |kind| self.key(service, kind);
        Ok(Keys {
            meta: k("meta"),
            state: k("state"),
            lease: k("lease"),
            history: k("history"),
            order: k("order"),
        })
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.inner.conn.clone();
        let ping = redis::cmd("PING");
        let pong = ping.query_async::<Value>(&mut conn);
        self.timed("checking the connection", pong)
            .await
            .map(|_| ())
    }

    /// Runs a script, within the operation timeout.
    async fn eval(&self, what: &str, script: &ScriptInvocation<'_>) -> Result<Value, BackendError> {
        let mut conn = self.inner.conn.clone();
        self.timed(what, script.invoke_async::<Value>(&mut conn))
            .await
    }

    async fn timed<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackendError> {
        let timeout = self.inner.options.op_timeout;
        match tokio::time::timeout(timeout, op).await {
            Ok(result) => result.map_err(|e| driver(e, what, &self.inner.target)),
            Err(_) => Err(timed_out(what, &self.inner.target, timeout)),
        }
    }
}

/// `PREFIX:{SERVICE}:KIND`.
pub(crate) fn key(prefix: &str, service: &str, kind: &str) -> String {
    format!("{prefix}:{{{service}}}:{kind}")
}

fn check_format(found: &str) -> Result<(), BackendError> {
    if found.is_empty() {
        return Ok(());
    }
    BackendError::check_format(found, FORMAT, "the meta hash's `format`")
}

fn client(options: &RedisOptions, target: &str) -> Result<redis::Client, BackendError> {
    let info = options.info.clone();
    if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        // rustls needs a crypto provider; this crate builds it with ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let built = match options.ca_file() {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                BackendError::other(format!(
                    "cannot read the CA file {} for TLS to {target}: {e}",
                    path.display()
                ))
            })?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        None => redis::Client::open(info),
    };
    built.map_err(|e| {
        BackendError::other(format!("cannot set up the Redis client for {target}: {e}"))
    })
}
