//! Kubernetes: the lease in a `coordination.k8s.io/v1` Lease, the data
//! version and history in ConfigMaps, all in one namespace, through the API
//! server the cluster already runs. Nothing to install: no database, no
//! custom resource; a Role with get, list, watch, create and update on
//! leases and configmaps is all it needs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use upsilon_backends::kubernetes::{KubernetesBackend, KubernetesOptions};
//!
//! // In a pod: the service account's credentials and namespace.
//! let backend = KubernetesBackend::connect(KubernetesOptions::new()).await?;
//! // Or by URL: upsilon_backends::connect("kubernetes://billing").await?
//! let upsilon = upsilon::Upsilon::builder()
//!     .service("billing")
//!     .app_version(env!("CARGO_PKG_VERSION"))
//!     .backend(Arc::new(backend))
//!     .build()?;
//! upsilon.run_until(upsilon::shutdown_signal()).await?;
//! # Ok(()) }
//! ```
//!
//! How it works (docs/KUBERNETES.md says more):
//! - **The lease** of a service is the Lease `PREFIX-KEY` (the key is the
//!   service name made fit for object names, see `names.rs`). Every write of
//!   it carries the `resourceVersion` it was read at, so a write that meets
//!   a newer one is refused (409 Conflict) and the backend reads again and
//!   decides again: a lost race, never an overwrite.
//! - **Expiry** does not depend on the nodes' clocks agreeing. As
//!   client-go's leader election does, a node measures the lease's TTL on
//!   its own monotonic clock from when it first saw the Lease at its
//!   current `resourceVersion` (read or watched); a renewal changes the
//!   `resourceVersion`, so it starts the measure again, and a takeover
//!   written against an older `resourceVersion` is refused. The holder's
//!   local deadline counts from before its renewal was sent, which is
//!   before any other node can see that renewal, so the holder stops first
//!   as long as no node's clock runs faster than the holder's by a factor
//!   of TTL / (TTL − safety margin) or more: 1.25 with the runner's
//!   defaults, where real clocks differ by a few parts in ten thousand
//!   (see docs/KUBERNETES.md). `renewTime` and `acquireTime` are written
//!   for people, and never read to judge expiry.
//! - **The fence** is the Lease's `upsilon.dev/fence-counter` annotation,
//!   raised by every grant in the same conditional write, never lowered.
//!   Every grant also first raises the service's fence floor in the
//!   namespace's `PREFIX-meta` ConfigMap, and takes one above the highest
//!   of the counter, the floor and every fence the store has seen, so that
//!   deleting the Lease, the state ConfigMap or the meta ConfigMap does not
//!   hand a fence out twice.
//! - **The store** is the ConfigMap `PREFIX-KEY`: data version, baseline,
//!   the store's fence and a summary of each task's history, written with
//!   a `resourceVersion` precondition after
//!   [`Snapshot::check`](upsilon::backend::Snapshot::check) on what was read.
//!   History rows live in pages of 100 (`PREFIX-KEY-hN`); a write puts its
//!   new rows in the state ConfigMap (one atomic write), then copies them to
//!   their page. Thousands of attempts take tens of pages, and the state
//!   ConfigMap stays small.
//! - **Wake-ups**: a watch on the Leases and one on the state ConfigMaps
//!   (with bookmarks); a waiting node sleeps until the holder or its fence
//!   changes, or the data version does. While a watch is down, waiting
//!   nodes poll.
//!
//! Objects (labels `app.kubernetes.io/managed-by=upsilon`,
//! `upsilon.dev/prefix`, `upsilon.dev/part`, `upsilon.dev/service-key`;
//! annotations `upsilon.dev/service` and `upsilon.dev/format`, [`FORMAT`]):
//! - `Lease PREFIX-KEY`: the lease and the grant counter;
//! - `ConfigMap PREFIX-KEY`: the state;
//! - `ConfigMap PREFIX-KEY-hN`: history rows `100·N` to `100·N + 99`;
//! - `ConfigMap PREFIX-meta`: each service's fence floor.

mod api;
mod lease;
mod lock;
mod names;
mod options;
mod state;
mod store;
mod watch;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tracing::info;
use upsilon::backend::BackendError;

pub use options::KubernetesOptions;
/// The client crates, for callers that build a [`kube::Config`] of their own.
pub use {k8s_openapi, kube};

use api::{Objects, Written};
use names::{Names, Part};
use state::{annotations, check_format};
use watch::{Kind, Watches};

/// The stored format this build writes and reads.
pub const FORMAT: u32 = 1;

/// Lock and store in one Kubernetes namespace. Cheap to clone: clones share
/// the client and the watches.
#[derive(Clone)]
pub struct KubernetesBackend {
    inner: Arc<Inner>,
}

struct Inner {
    options: KubernetesOptions,
    cluster: String,
    namespace: String,
    names: Names,
    leases: Objects<Lease>,
    configmaps: Objects<ConfigMap>,
    watches: Arc<Watches>,
    _watch_tasks: Vec<AbortOnDrop>,
    /// The Lease as this node last wrote it, per service: renewals and
    /// releases write on top of it, one request each when nothing else
    /// wrote it since.
    own: Mutex<HashMap<String, Lease>>,
    /// What this node last read of each service before it waits.
    seen: Mutex<HashMap<String, lock::Seen>>,
    /// The pending history entries this node copied to their pages.
    copied: Mutex<HashMap<String, HashSet<String>>>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("KubernetesBackend")
            .field("cluster", &i.cluster)
            .field("namespace", &i.namespace)
            .field("prefix", &i.names.prefix)
            .field("watch", &i.options.watch)
            .finish_non_exhaustive()
    }
}

/// The wall clock, ms since the epoch: history timestamps, and the times
/// leases are reported at. Never used to judge expiry.
fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl KubernetesBackend {
    /// Connects from a `kubernetes://NAMESPACE` URL; see
    /// [`KubernetesOptions::from_url`].
    pub async fn connect_url(url: &str) -> Result<KubernetesBackend, BackendError> {
        KubernetesBackend::connect(KubernetesOptions::from_url(url)?).await
    }

    /// Connects: configures the client (see [`KubernetesOptions`]), checks
    /// the stored format in the namespace's meta ConfigMap (creating it
    /// when it is missing), and starts the watches.
    pub async fn connect(options: KubernetesOptions) -> Result<KubernetesBackend, BackendError> {
        options.validate()?;
        let config = client_config(&options).await?;
        let namespace = options
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let cluster = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| {
            BackendError::other(format!(
                "cannot make a Kubernetes client for {cluster}: {}",
                api::chain(&e)
            ))
        })?;
        let names = Names {
            prefix: options.prefix.clone(),
        };
        let leases = Objects {
            api: Api::namespaced(client.clone(), &namespace),
            what: "Lease",
            namespace: namespace.clone(),
            timeout: options.op_timeout,
        };
        let configmaps = Objects {
            api: Api::namespaced(client, &namespace),
            what: "ConfigMap",
            namespace: namespace.clone(),
            timeout: options.op_timeout,
        };
        prepare_meta(&configmaps, &names).await?;
        let watches = Arc::new(Watches::default());
        let mut tasks = Vec::new();
        if options.watch {
            tasks.push(AbortOnDrop(tokio::spawn(watch::follow(
                leases.api.clone(),
                names.selector(Part::Lease),
                Kind::Lease,
                watches.clone(),
                lease::project,
            ))));
            tasks.push(AbortOnDrop(tokio::spawn(watch::follow(
                configmaps.api.clone(),
                names.selector(Part::State),
                Kind::State,
                watches.clone(),
                store::project,
            ))));
        }
        Ok(KubernetesBackend {
            inner: Arc::new(Inner {
                options,
                cluster,
                namespace,
                names,
                leases,
                configmaps,
                watches,
                _watch_tasks: tasks,
                own: Mutex::default(),
                seen: Mutex::default(),
                copied: Mutex::default(),
            }),
        })
    }

    /// The namespace of its objects.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The options it was connected with.
    pub fn options(&self) -> &KubernetesOptions {
        &self.inner.options
    }

    /// The name of the Lease of `service`, which is also the name of its
    /// state ConfigMap.
    pub fn object_name(&self, service: &str) -> String {
        self.inner.names.object(service)
    }

    /// The name of history page `n` of `service` (rows `100·n` to
    /// `100·n + 99`).
    pub fn page_name(&self, service: &str, n: u64) -> String {
        self.inner.names.page(service, n)
    }

    /// The name of the namespace's meta ConfigMap (fence floors).
    pub fn meta_name(&self) -> String {
        self.inner.names.meta()
    }
}

/// The client configuration the options ask for.
async fn client_config(options: &KubernetesOptions) -> Result<Config, BackendError> {
    if let Some(config) = &options.config {
        return Ok(config.clone());
    }
    let kco = KubeConfigOptions {
        context: options.context.clone(),
        ..KubeConfigOptions::default()
    };
    let found = match &options.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| {
                BackendError::other(format!(
                    "cannot read the kubeconfig {}: {}",
                    path.display(),
                    api::chain(&e)
                ))
            })?;
            Config::from_custom_kubeconfig(kc, &kco)
                .await
                .map_err(|e| api::chain(&e))
        }
        None if options.context.is_some() => Config::from_kubeconfig(&kco)
            .await
            .map_err(|e| api::chain(&e)),
        None => Config::infer().await.map_err(|e| api::chain(&e)),
    };
    found.map_err(|why| {
        BackendError::other(format!(
            "no Kubernetes client configuration: {why} (in a pod, the service account's token is mounted unless automountServiceAccountToken is false; elsewhere set KUBECONFIG)"
        ))
    })
}

/// Checks the format in the meta ConfigMap, creating it when it is missing.
async fn prepare_meta(configmaps: &Objects<ConfigMap>, names: &Names) -> Result<(), BackendError> {
    let name = names.meta();
    match configmaps.get(&name).await? {
        Some(cm) => check_format(&cm.metadata, &format!("the meta ConfigMap {name}")),
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(names.labels(Part::Meta, None)),
                    annotations: Some(annotations(None)),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            };
            if let Written::Stored(_) = configmaps.create(&cm).await? {
                info!(namespace = %configmaps.namespace, %name, "created Upsilon's meta ConfigMap");
            }
            Ok(())
        }
    }
}

impl Inner {
    /// A conflict-retry budget ran out.
    fn contended(&self, doing: &str, service: &str) -> BackendError {
        BackendError::unavailable(format!(
            "{doing} `{service}`: the object changed under every one of {} tries (409 Conflict each time)",
            self.options.conflict_retries
        ))
    }
}
