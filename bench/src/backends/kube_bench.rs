//! The Kubernetes stand-in's bare client and floor, with kube.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use upsilon_backends::kubernetes::k8s_openapi::api::core::v1::ConfigMap;
use upsilon_backends::kubernetes::kube;
use upsilon_backends::kubernetes::kube::api::{
    Api, ObjectMeta, PostParams, WatchEvent, WatchParams,
};
use upsilon_backends::kubernetes::kube::config::{KubeConfigOptions, Kubeconfig};

/// The namespace the benchmark's objects go in.
pub const NAMESPACE: &str = "bench";
const FLOOR: &str = "bench-floor";

async fn client(kubeconfig: &str) -> anyhow::Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A new plain HTTP client (its own connection) and one GET of the
/// namespace's meta ConfigMap, which the backend made at its first
/// connect.
pub async fn bare(api: &str) -> anyhow::Result<()> {
    let resp = reqwest::Client::new()
        .get(format!(
            "{api}/api/v1/namespaces/{NAMESPACE}/configmaps/upsilon-meta"
        ))
        .bearer_auth(upsilon_test_servers::kube_api::TOKEN)
        .send()
        .await?;
    ensure!(
        resp.status().is_success(),
        "GET of the meta ConfigMap: {}",
        resp.status()
    );
    resp.bytes().await?;
    Ok(())
}

/// One ConfigMap update reaching `n` watchers (each its own client),
/// `repeats` times: ms from the update's reply to the last delivery
/// (negative when the last delivery came first).
pub async fn floor(kubeconfig: &str, n: usize, repeats: usize) -> anyhow::Result<Vec<f64>> {
    use futures_util::StreamExt as _;
    let writer: Api<ConfigMap> = Api::namespaced(client(kubeconfig).await?, NAMESPACE);
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(FLOOR.to_owned()),
            labels: Some([("bench".to_owned(), "floor".to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    cm = match writer.get_opt(FLOOR).await? {
        Some(found) => found,
        None => writer.create(&PostParams::default(), &cm).await?,
    };
    let from = cm.metadata.resource_version.clone().unwrap_or_default();
    let delivered: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut readers = Vec::with_capacity(n);
    for _ in 0..n {
        let api: Api<ConfigMap> = Api::namespaced(client(kubeconfig).await?, NAMESPACE);
        let wp = WatchParams::default().labels("bench=floor");
        let stream = api.watch(&wp, &from).await?;
        let delivered = delivered.clone();
        readers.push(tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(e) = stream.next().await {
                if let Ok(WatchEvent::Modified(_)) = e {
                    delivered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
            }
        }));
    }
    let mut out = Vec::with_capacity(repeats);
    for r in 0..repeats {
        delivered.lock().unwrap_or_else(|p| p.into_inner()).clear();
        cm.data = Some([("n".to_owned(), r.to_string())].into());
        cm = writer.replace(FLOOR, &PostParams::default(), &cm).await?;
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(60);
        let last = loop {
            {
                let d = delivered.lock().unwrap_or_else(|p| p.into_inner());
                if d.len() >= n {
                    break d.iter().copied().max().context("a delivery")?;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "an update reached fewer than {n} watchers"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        // The stand-in sends the event before its reply: a delivery
        // may come before the writer hears back (negative).
        out.push(crate::convergence::signed_ms(last, acked));
    }
    for r in readers {
        r.abort();
    }
    Ok(out)
}
