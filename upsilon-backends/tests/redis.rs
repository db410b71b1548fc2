//! The Redis backend against real servers that these tests start themselves
//! (see `upsilon-test-servers`): conformance, a crash with and without an
//! append-only file, dropped connections and subscriptions, credentials,
//! TLS, and nodes that run each task once.
//!
//! One server serves most tests, each test with a key prefix of its own;
//! the tests that stop, crash or reconfigure a server start their own.
#![cfg(feature = "redis")]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use upsilon::backend::{Acquire, AttemptState, BackendError, Change, Lease, Lock, Store};
use upsilon::testing::conformance::{self, Harness, Wake};
use upsilon::testing;
use upsilon::{Outcome, Task, TaskContext, TaskFuture, Upsilon};
use upsilon_backends::redis::redis::{self as driver, aio::MultiplexedConnection};
use upsilon_backends::redis::{RedisBackend, RedisOptions, FORMAT};
use upsilon_test_servers::{Fsync, Redis};

/// The server shared by this file's tests. Never dropped: its watchdog stops
/// it when the test process exits.
fn server() -> &'static Redis {
    static REDIS: OnceLock<Redis> = OnceLock::new();
    REDIS.get_or_init(Redis::start)
}

fn options(redis: &Redis, prefix: &str) -> RedisOptions {
    RedisOptions::from_url(&redis.url()).unwrap().prefix(prefix)
}

async fn backend(redis: &Redis, prefix: &str) -> RedisBackend {
    RedisBackend::connect_with(options(redis, prefix)).await.unwrap()
}

/// A plain connection of the test's own, behind the backend's back.
async fn raw(redis: &Redis) -> MultiplexedConnection {
    driver::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn cmd<T: driver::FromRedisValue>(conn: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut c = driver::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn granted(a: Acquire) -> Lease {
    match a {
        Acquire::Granted(l) => l,
        other => panic!("expected a grant, got {other:?}"),
    }
}

const TTL: Duration = Duration::from_secs(30);

struct Rd {
    backend: Arc<RedisBackend>,
    /// Another node's backend on the same prefix: its own connection and
    /// subscription.
    peer: Arc<RedisBackend>,
    prefix: String,
    conn: tokio::sync::Mutex<MultiplexedConnection>,
    saved: Mutex<Option<String>>,
}

impl Rd {
    async fn new(redis: &Redis, prefix: &str) -> Rd {
        Rd {
            backend: Arc::new(backend(redis, prefix).await),
            peer: Arc::new(backend(redis, prefix).await),
            prefix: prefix.to_owned(),
            conn: tokio::sync::Mutex::new(raw(redis).await),
            saved: Mutex::new(None),
        }
    }

    fn key(&self, service: &str, kind: &str) -> String {
        self.backend.key(service, kind)
    }

    async fn cmd<T: driver::FromRedisValue>(&self, args: &[&str]) -> T {
        cmd(&mut *self.conn.lock().await, args).await
    }

    /// Every meta key under the prefix.
    async fn meta_keys(&self) -> Vec<String> {
        let pattern = format!("{}:{{*}}:meta", self.prefix);
        self.cmd(&["KEYS", &pattern]).await
    }
}

#[async_trait]
impl Harness for Rd {
    fn lock(&self) -> Arc<dyn Lock> {
        self.backend.clone()
    }
    fn store(&self) -> Arc<dyn Store> {
        self.backend.clone()
    }
    fn peer_lock(&self) -> Arc<dyn Lock> {
        self.peer.clone()
    }
    async fn corrupt(&self, service: &str) {
        let state = self.key(service, "state");
        let old: Option<String> = self.cmd(&["HGET", &state, "data_version"]).await;
        *self.saved.lock().unwrap() = old;
        let _: i64 = self
            .cmd(&["HSET", &state, "data_version", "one point oh"])
            .await;
    }
    async fn repair(&self, service: &str) {
        let state = self.key(service, "state");
        let old = self.saved.lock().unwrap().take();
        match old {
            Some(v) => {
                let _: i64 = self.cmd(&["HSET", &state, "data_version", &v]).await;
            }
            None => {
                let _: i64 = self.cmd(&["HDEL", &state, "data_version"]).await;
            }
        }
    }
    async fn future_format(&self) -> bool {
        for meta in self.meta_keys().await {
            let _: i64 = self.cmd(&["HSET", &meta, "format", "99"]).await;
        }
        true
    }
    async fn reset_format(&self) {
        for meta in self.meta_keys().await {
            let _: i64 = self
                .cmd(&["HSET", &meta, "format", &FORMAT.to_string()])
                .await;
        }
    }
    async fn delete_state_row(&self, service: &str) -> bool {
        let (state, lease) = (self.key(service, "state"), self.key(service, "lease"));
        let _: i64 = self.cmd(&["DEL", &state, &lease]).await;
        true
    }
    async fn delete_history(&self, service: &str) -> bool {
        let (history, order) = (self.key(service, "history"), self.key(service, "order"));
        let deleted: i64 = self.cmd(&["DEL", &history, &order]).await;
        assert_eq!(deleted, 2, "the history of {service}");
        true
    }
}

#[tokio::test]
async fn redis_backend_conforms() {
    let h = Rd::new(server(), "conformance").await;
    let report = conformance::run_all(&h).await;
    assert_eq!(report.wake, Wake::Notifies, "pub/sub wakes waiters");
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
}
