//! A backend under test: the server the benchmark started for it, its URL,
//! its bare client, its notification floor and the server's own counts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use upsilon::backend::Backend;

use crate::common::Env;
use crate::convergence::notify_floor;

#[cfg(feature = "etcd")]
use super::etcd_bench;
#[cfg(feature = "kubernetes")]
use super::kube_bench;
#[cfg(feature = "redis")]
use super::redis_bench;
use super::Kind;

/// A backend under test: where it is, and the server kept running for it.
pub(super) struct Subject<'e> {
    pub(super) kind: Kind,
    pub(super) url: String,
    env: &'e Env,
    /// What the bare client and the floor connect to: the server's URL,
    /// SQLite's file, etcd's endpoint, the kubeconfig of the Kubernetes
    /// stand-in (whose bare client takes the stand-in's URL).
    raw: String,
    /// The server the benchmark started for it, stopped when dropped.
    _server: Option<Box<dyn std::any::Any + Send>>,
    /// A connection of the benchmark's own to Redis, to read its counts.
    #[cfg(feature = "redis")]
    redis: Option<redis::aio::MultiplexedConnection>,
    /// The stand-in API server, to read its counts and when it committed a
    /// write, and a backend of the benchmark's own to name its objects.
    #[cfg(feature = "kubernetes")]
    kube: Option<(
        Arc<upsilon_test_servers::kube_api::KubeApi>,
        upsilon_backends::kubernetes::KubernetesBackend,
    )>,
}

impl<'e> Subject<'e> {
    pub(super) async fn start(kind: Kind, env: &'e Env) -> anyhow::Result<Subject<'e>> {
        let mut subject = Subject {
            kind,
            url: env.url.clone(),
            env,
            raw: env.url.clone(),
            _server: None,
            #[cfg(feature = "redis")]
            redis: None,
            #[cfg(feature = "kubernetes")]
            kube: None,
        };
        match kind {
            Kind::Postgres => {}
            Kind::Sqlite => {
                let path = env.dir.path().join("backends.db");
                subject.url = format!("sqlite://{}", path.display());
                subject.raw = path.display().to_string();
            }
            #[cfg(feature = "redis")]
            Kind::Redis => {
                eprintln!("  6: starting Redis");
                let guard = tokio::task::spawn_blocking(redis_bench::start).await?;
                subject.url = guard.url();
                subject.raw = subject.url.clone();
                subject._server = Some(Box::new(guard));
                let client = redis::Client::open(subject.url.as_str())?;
                subject.redis = Some(client.get_multiplexed_async_connection().await?);
            }
            #[cfg(feature = "etcd")]
            Kind::Etcd => {
                eprintln!("  6: starting etcd");
                let guard = tokio::task::spawn_blocking(etcd_bench::start).await?;
                subject.url = guard.url();
                subject.raw = guard.endpoint();
                subject._server = Some(Box::new(guard));
            }
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => {
                eprintln!("  6: starting the Kubernetes API stand-in");
                let api = Arc::new(upsilon_test_servers::kube_api::KubeApi::start().await);
                let path = env.dir.path().join("bench.kubeconfig");
                api.write_kubeconfig(&path, kube_bench::NAMESPACE);
                subject.url = format!(
                    "kubernetes://{}?kubeconfig={}",
                    kube_bench::NAMESPACE,
                    path.display()
                );
                subject.raw = path.display().to_string();
                let names =
                    upsilon_backends::kubernetes::KubernetesBackend::connect_url(&subject.url)
                        .await?;
                subject.kube = Some((api, names));
            }
        }
        Ok(subject)
    }

    pub(super) fn name(&self) -> &'static str {
        self.kind.name()
    }

    pub(super) async fn open(&self) -> anyhow::Result<Arc<dyn Backend>> {
        upsilon_backends::connect(&self.url)
            .await
            .with_context(|| format!("opening {}", self.name()))
    }

    /// The bare client: connect, and one read.
    pub(super) async fn bare(&self) -> anyhow::Result<()> {
        match self.kind {
            Kind::Postgres => {
                let (client, conn) =
                    tokio_postgres::connect(&self.raw, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client.simple_query("SELECT 1").await?;
            }
            Kind::Sqlite => {
                let conn = rusqlite::Connection::open(&self.raw)?;
                conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
            }
            #[cfg(feature = "redis")]
            Kind::Redis => redis_bench::bare(&self.raw).await?,
            #[cfg(feature = "etcd")]
            Kind::Etcd => etcd_bench::bare(&self.raw).await?,
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => {
                let (api, _) = self.kube.as_ref().context("the Kubernetes stand-in")?;
                kube_bench::bare(&api.url()).await?
            }
        }
        Ok(())
    }

    /// One notification reaching `n` receivers, `repeats` times: ms from
    /// the sender's acknowledgement to the last delivery.
    pub(super) async fn floor(&self, n: usize, repeats: usize) -> anyhow::Result<Option<Vec<f64>>> {
        Ok(match self.kind {
            Kind::Postgres => Some(notify_floor(self.env, n, repeats).await?.0),
            Kind::Sqlite => None,
            #[cfg(feature = "redis")]
            Kind::Redis => Some(redis_bench::floor(&self.raw, n, repeats).await?),
            #[cfg(feature = "etcd")]
            Kind::Etcd => Some(etcd_bench::floor(&self.raw, n, repeats).await?),
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => Some(kube_bench::floor(&self.raw, n, repeats).await?),
        })
    }

    /// When the server committed the write of `service`'s new data
    /// version, where the backend's final write returns only after another
    /// one (Kubernetes: the state ConfigMap, then the history's page).
    pub(super) fn committed_at(&self, service: &str) -> Option<Instant> {
        match self.kind {
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => {
                let (api, names) = self.kube.as_ref()?;
                api.written_at(
                    upsilon_test_servers::kube_api::Resource::ConfigMaps,
                    kube_bench::NAMESPACE,
                    &names.object_name(service),
                )
            }
            _ => {
                let _ = service;
                None
            }
        }
    }

    /// The server's own count of each command so far, where it keeps one
    /// cheaply; `None` where it does not.
    pub(super) async fn server_commands(&self) -> anyhow::Result<Option<BTreeMap<String, u64>>> {
        Ok(match self.kind {
            Kind::Postgres | Kind::Sqlite => None,
            #[cfg(feature = "redis")]
            Kind::Redis => {
                let mut conn = self.redis.clone().context("the Redis connection")?;
                Some(redis_bench::commands(&mut conn).await?)
            }
            #[cfg(feature = "etcd")]
            Kind::Etcd => Some(etcd_bench::requests(&self.raw).await?),
            #[cfg(feature = "kubernetes")]
            Kind::Kubernetes => self.kube.as_ref().map(|(api, _)| api.requests()),
        })
    }
}
