//! The etcd backend against a real etcd that these tests start themselves
//! (see `upsilon-test-servers`): conformance, the loss signal, a crash and a
//! restart, TTLs, credentials, several endpoints, TLS, and nodes running an
//! upgrade together.
//!
//! One server serves most tests, each under a key prefix of its own; the
//! tests that crash the server, turn authentication on or need TLS have one
//! of their own.
#![cfg(feature = "etcd")]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use upsilon::backend::{Lock, Store};
use upsilon::testing::conformance::{self, Harness, Wake};
use upsilon_backends::etcd::etcd_client::{Client, DeleteOptions};
use upsilon_backends::etcd::{EtcdBackend, EtcdOptions, FORMAT};
use upsilon_test_servers::Etcd;

/// The server shared by this file's tests. Never dropped: its watchdog stops
/// it when the test process exits.
fn server() -> &'static Etcd {
    static ETCD: OnceLock<Etcd> = OnceLock::new();
    ETCD.get_or_init(Etcd::start)
}

fn options(prefix: &str) -> EtcdOptions {
    EtcdOptions::new()
        .endpoint(server().endpoint())
        .prefix(prefix)
}

async fn backend(prefix: &str) -> EtcdBackend {
    EtcdBackend::connect(options(prefix)).await.unwrap()
}

/// A client of the shared server outside Upsilon.
async fn raw(endpoint: &str) -> Client {
    Client::connect([endpoint], None).await.unwrap()
}

struct EtcdHarness {
    backend: Arc<EtcdBackend>,
    /// Another node's backend on the same prefix: its own client and watch.
    peer: Arc<EtcdBackend>,
    raw: Client,
    prefix: String,
    saved: Mutex<Option<Vec<u8>>>,
}

impl EtcdHarness {
    async fn new(prefix: &str) -> EtcdHarness {
        EtcdHarness {
            backend: Arc::new(backend(prefix).await),
            peer: Arc::new(backend(prefix).await),
            raw: raw(&server().endpoint()).await,
            prefix: prefix.to_owned(),
            saved: Mutex::new(None),
        }
    }

    fn key(&self, service: &str, what: &str) -> String {
        format!("{}/s/{service}/{what}", self.prefix)
    }
}

#[async_trait]
impl Harness for EtcdHarness {
    fn lock(&self) -> Arc<dyn Lock> {
        self.backend.clone()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.backend.clone()
    }
    fn peer_lock(&self) -> Arc<dyn Lock> {
        self.peer.clone()
    }
    fn min_ttl(&self) -> Duration {
        Duration::from_secs(2)
    }
    async fn corrupt(&self, service: &str) {
        let mut kv = self.raw.kv_client();
        let key = self.key(service, "state");
        let found = kv.get(key.as_str(), None).await.unwrap();
        let old = found.kvs().first().map(|kv| kv.value().to_vec());
        *self.saved.lock().unwrap() = old;
        kv.put(
            key,
            r#"{"data_version":"one point oh","baseline":null}"#,
            None,
        )
        .await
        .unwrap();
    }
    async fn repair(&self, service: &str) {
        let old = self.saved.lock().unwrap().take().expect("corrupted first");
        let mut kv = self.raw.kv_client();
        kv.put(self.key(service, "state"), old, None).await.unwrap();
    }
    async fn future_format(&self) -> bool {
        let mut kv = self.raw.kv_client();
        kv.put(format!("{}/format", self.prefix), "99", None)
            .await
            .unwrap();
        true
    }
    async fn reset_format(&self) {
        let mut kv = self.raw.kv_client();
        kv.put(format!("{}/format", self.prefix), FORMAT.to_string(), None)
            .await
            .unwrap();
    }
    async fn delete_state_row(&self, service: &str) -> bool {
        // Everything but the history: the lease, the fence counters (the
        // offset and the store's fence), the data version and the baseline.
        let mut kv = self.raw.kv_client();
        let mut deleted = 0;
        for what in ["lock", "fence", "state"] {
            deleted += kv
                .delete(self.key(service, what), None)
                .await
                .unwrap()
                .deleted();
        }
        assert!(deleted > 0, "the keys of {service}");
        true
    }
    async fn delete_history(&self, service: &str) -> bool {
        let mut kv = self.raw.kv_client();
        let deleted = kv
            .delete(
                self.key(service, "h/"),
                Some(DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert!(deleted.deleted() > 0, "the history of {service}");
        true
    }
}

#[tokio::test]
async fn etcd_backend_conforms() {
    let report = conformance::run_all(&EtcdHarness::new("/conformance").await).await;
    assert_eq!(report.wake, Wake::Notifies, "the watch wakes waiters");
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}
