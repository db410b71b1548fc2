//! etcd: lease, fence, state and history as keys under one prefix of an
//! etcd v3 cluster (3.4 or newer).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::{Arc, Mutex};
//! use upsilon_backends::etcd::EtcdBackend;
//!
//! let backend = EtcdBackend::connect_url("etcd://etcd-0:2379,etcd-1:2379,etcd-2:2379/upsilon").await?;
//! let upsilon = upsilon::Upsilon::builder()
//!     .service("billing")
//!     .app_version(env!("CARGO_PKG_VERSION"))
//!     .backend(Arc::new(backend))
//!     .build()?;
//! upsilon.run().await?;
//! # Ok(()) }
//! ```
//!
//! How it works (docs/ETCD.md says more):
//! - The lease is a key attached to an etcd lease of the TTL in whole
//!   seconds (rounded up; at least 2 s, etcd's smallest), created in a
//!   transaction that requires it not to exist. etcd deletes it when its
//!   lease expires on the server, so it is never free before the holder's
//!   local deadline. A renewal is a keep-alive of that lease on a stream the
//!   holder keeps open, and a check that the key is still its own.
//! - The fence is the lease key's create revision, which only grows, plus
//!   an offset kept in the service's fence key that only grows: a grant
//!   raises it when the store has seen a fence above the revision (a store
//!   used with another lock), so that every grant is above every fence seen.
//! - Every store write is one transaction compared on the mod revision of
//!   the service's fence key, which every write (grant, claim, apply)
//!   rewrites: a write commits only if nothing was written since its read,
//!   and the rules ([`Snapshot::check`](upsilon::backend::Snapshot::check))
//!   are checked on that read. A lost compare is read and checked again.
//! - Waiting nodes watch the prefix: a lease key or a state key changing
//!   wakes them ([`Lock::notifies`](upsilon::backend::Lock::notifies) is
//!   true while the watch is up); they poll while it is down.
//! - [`Lock::until_lost`](upsilon::backend::Lock::until_lost) resolves on the
//!   holder when its keep-alive stream breaks, a keep-alive finds the etcd
//!   lease gone, or the lease key is deleted (a watch of its own).
//! - The client is given only the endpoints that take a connection, and
//!   they are probed again every 2 s and after a connection error, so a
//!   dead member neither fails the start nor keeps receiving requests.
//!
//! Keys (see `keys.rs`): `PREFIX/format`, and per service
//! `PREFIX/s/SERVICE/{lock,fence,state}` and `PREFIX/s/SERVICE/h/...` (one
//! key per history row). Values are JSON.

mod error;
mod holding;
mod keys;
mod lock;
mod members;
mod options;
mod store;
mod wakeups;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, KeyValue, Txn, TxnOp, TxnOpResponse,
};
use tracing::info;
use upsilon::backend::BackendError;

/// The client, for tasks that use etcd themselves and for tests.
pub use etcd_client;
pub use options::{EtcdOptions, DEFAULT_PORT, DEFAULT_PREFIX};

use error::{driver_in, timed_out};
use holding::Holding;
use keys::Keys;
use members::Members;
use wakeups::Wakeups;

/// The stored format this build writes and reads.
pub const FORMAT: u32 = 1;

/// The shortest lease TTL etcd grants: a shorter one is refused.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Lock and store in an etcd cluster. Cheap to clone: clones share the
/// client, the watch and the held leases.
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    options: EtcdOptions,
    client: Client,
    keys: Keys,
    holding: Holding,
    wakeups: Arc<Wakeups>,
    members: Arc<Members>,
    /// The wake-up watch and the endpoint probes; stopped when the last
    /// clone is dropped.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("target", &self.inner.options.target())
            .field("notifies", &self.inner.wakeups.is_up())
            .finish_non_exhaustive()
    }
}

/// One consistent read: the format key and the ranges asked for, all at one
/// revision.
struct Read {
    revision: i64,
    ranges: Vec<Vec<KeyValue>>,
}

impl Read {
    /// The single key of range `i`, if it exists.
    fn one(&self, i: usize) -> Option<&KeyValue> {
        self.ranges[i].first()
    }
}

/// The wall clock in ms since the epoch: etcd has no clock of its own to
/// read, and lease expiry is judged by etcd's lease TTLs, not by this.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn check_format(found: &[u8]) -> Result<(), BackendError> {
    let found = String::from_utf8_lossy(found);
    BackendError::check_format(&found, FORMAT, "the format key")
}

impl EtcdBackend {
    /// Connects from an `etcd://` or `etcds://` URL; see
    /// [`EtcdOptions::from_url`].
    pub async fn connect_url(url: &str) -> Result<EtcdBackend, BackendError> {
        EtcdBackend::connect(EtcdOptions::from_url(url)?).await
    }

    /// Connects, authenticates if a user is given, writes the format key if
    /// it is missing (refusing a newer one), and starts the watch that wakes
    /// waiting nodes.
    pub async fn connect(options: EtcdOptions) -> Result<EtcdBackend, BackendError> {
        options.validate()?;
        let target = options.target();
        let plain = !options.tls;
        let cannot = |e: BackendError| {
            let said = |source: &dyn std::fmt::Display| {
                let mut s = format!("cannot connect to etcd at {target}: {source}");
                // What a server that takes TLS only answers a plain client.
                if plain && s.ends_with("transport error") {
                    s.push_str(
                        "; if the cluster takes TLS connections only, use `etcds://` (`EtcdOptions::tls`)",
                    );
                }
                s
            };
            match e {
                BackendError::Unavailable { source } => BackendError::unavailable(said(&source)),
                BackendError::Other { source } => BackendError::other(said(&source)),
                other => other,
            }
        };
        let endpoints = options
            .endpoints
            .iter()
            .cloned()
            .zip(options.endpoint_urls())
            .collect();
        let (members, live) = Members::probe(endpoints, options.connect_timeout)
            .await
            .map_err(|why| {
                BackendError::unavailable(format!("cannot connect to etcd at {target}: {why}"))
            })?;
        let connect = Client::connect(live, Some(connect_options(&options)?));
        let client = tokio::time::timeout(options.op_timeout, connect)
            .await
            .map_err(|_| cannot(timed_out("connecting", options.op_timeout)))?
            .map_err(|e| cannot(driver_in(e, "")))?;
        let keys = Keys::new(&options.prefix);
        let wakeups = Arc::new(Wakeups::default());
        let backend = EtcdBackend {
            inner: Arc::new(Inner {
                options,
                client,
                keys,
                holding: Holding::default(),
                wakeups,
                members: Arc::new(members),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        let revision = backend.prepare().await.map_err(cannot)?;
        let watch = wakeups::start(
            backend.inner.client.clone(),
            backend.inner.keys.clone(),
            backend.inner.wakeups.clone(),
            revision + 1,
            backend.inner.options.op_timeout,
        )
        .await;
        let members = tokio::spawn(members::keep(
            backend.inner.client.clone(),
            backend.inner.members.clone(),
        ));
        backend
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([watch, members]);
        Ok(backend)
    }

    /// The options it was connected with.
    pub fn options(&self) -> &EtcdOptions {
        &self.inner.options
    }

    /// The client, connected and authenticated as the options say.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Writes the format key if it is missing and checks it; returns the
    /// revision it was read at.
    async fn prepare(&self) -> Result<i64, BackendError> {
        let key = self.inner.keys.format();
        let create = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), FORMAT.to_string(), None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.txn("reading Upsilon's stored format", create).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            info!(prefix = %self.inner.options.prefix, "created Upsilon's format key in etcd");
            return Ok(revision);
        }
        let found = get_kvs(&resp.op_responses(), 0);
        match found.first() {
            Some(kv) => check_format(kv.value())?,
            None => {
                return Err(BackendError::other(
                    "the format key vanished as it was read",
                ))
            }
        }
        Ok(revision)
    }

    /// Runs `fut` with the operation timeout.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, BackendError> {
        let limit = self.inner.options.op_timeout;
        let result = match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(driver_in(e, what)),
            Err(_) => Err(timed_out(what, limit)),
        };
        if matches!(&result, Err(e) if e.is_transient()) {
            self.inner.members.suspect();
        }
        result
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<etcd_client::TxnResponse, BackendError> {
        let mut kv = self.inner.client.kv_client();
        self.timed(what, kv.txn(txn)).await
    }

    /// Reads the format key and `ranges` at one revision, and checks the
    /// format.
    async fn read(&self, what: &str, ranges: Vec<TxnOp>) -> Result<Read, BackendError> {
        let mut ops = Vec::with_capacity(ranges.len() + 1);
        ops.push(TxnOp::get(self.inner.keys.format(), None));
        ops.extend(ranges);
        let resp = self.txn(what, Txn::new().and_then(ops)).await?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| BackendError::other("etcd answered a read without a header"))?;
        let responses = resp.op_responses();
        let mut ranges: Vec<Vec<KeyValue>> = (0..responses.len())
            .map(|i| get_kvs(&responses, i))
            .collect();
        match ranges[0].first() {
            Some(kv) => check_format(kv.value())?,
            None => {
                return Err(BackendError::corrupt(format!(
                    "the format key {} is missing; it is written when a backend connects",
                    self.inner.keys.format()
                )))
            }
        }
        ranges.remove(0);
        Ok(Read { revision, ranges })
    }

    /// A compare that the format key still holds this build's format.
    fn format_unchanged(&self) -> Compare {
        Compare::value(
            self.inner.keys.format(),
            CompareOp::Equal,
            FORMAT.to_string(),
        )
    }
}

/// The key-values of the range answer at `i` of a transaction.
fn get_kvs(responses: &[TxnOpResponse], i: usize) -> Vec<KeyValue> {
    match responses.get(i) {
        Some(TxnOpResponse::Get(g)) => g.kvs().to_vec(),
        _ => Vec::new(),
    }
}

/// The client's options: timeouts, HTTP/2 keep-alive (so that a dead
/// connection is noticed without traffic), credentials and TLS.
fn connect_options(options: &EtcdOptions) -> Result<ConnectOptions, BackendError> {
    // etcd refuses client pings more often than every 5 s by default.
    let mut o = ConnectOptions::new()
        .with_connect_timeout(options.connect_timeout)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let (Some(user), Some(password)) = (&options.user, &options.password) {
        o = o
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    if options.tls {
        let mut tls = etcd_client::TlsOptions::new().with_native_roots();
        if let Some(path) = &options.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                BackendError::other(format!(
                    "cannot read the CA certificate file {}: {e}",
                    path.display()
                ))
            })?;
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
        }
        o = o.with_tls(tls);
    }
    Ok(o)
}

#[cfg(test)]
mod tests;
