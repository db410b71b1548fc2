//! Helpers the PostgreSQL test files share: one server per test binary,
//! raw clients, backends in a schema of their own, a proxy that can cut or
//! freeze connections, and waiting for a condition with a limit.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use upsilon::backend::{Acquire, Lease};
use upsilon_backends::postgres::tokio_postgres::{self, Client, NoTls};
use upsilon_backends::postgres::{PostgresBackend, PostgresOptions};
use upsilon_test_servers::Postgres;

/// The server shared by the tests of one test binary. Never dropped: its
/// watchdog stops it when the test process exits.
pub fn server() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(Postgres::start)
}

/// A plain client of `url`, outside Upsilon.
pub async fn raw(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Options for the shared server with Upsilon's tables in `schema`.
pub fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::from_url(&server().url())
        .unwrap()
        .schema(schema)
}

/// A backend (one node) on the shared server, tables in `schema`.
pub async fn backend(schema: &str) -> PostgresBackend {
    PostgresBackend::connect(options(schema)).await.unwrap()
}

/// The lease of a grant; panics on anything else.
pub fn granted(a: Acquire) -> Lease {
    match a {
        Acquire::Granted(l) => l,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Polls `f` every 10 ms until it is true, for at most `limit`; returns how
/// long it took.
pub async fn until<F, Fut>(limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "still waiting after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// A loopback proxy in front of a server, for faults the server cannot make
/// by itself. Every connection through it is affected by its switches.
#[derive(Debug, Clone, Default)]
pub struct Proxy {
    /// When set, the next client message that contains `COMMIT` is passed on
    /// and the server's answer to it is swallowed: the client's connection
    /// is then closed, as if the reply had been lost on the way.
    pub lose_commit_reply: Arc<AtomicBool>,
    /// While set, nothing is passed on in either direction, and the
    /// connections stay open: a network that stopped delivering.
    pub frozen: Arc<AtomicBool>,
    /// Milliseconds each new connection waits before the proxy relays it:
    /// a connection that is slow to open (a password exchange over a slow
    /// network, a busy server).
    pub connect_delay_ms: Arc<AtomicU64>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:upstream`; returns it and its port.
    pub async fn start(upstream: u16) -> (Proxy, u16) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy::default();
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let p = p.clone();
                p.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let delay = p.connect_delay_ms.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                        .await
                        .unwrap();
                    p.relay(client, server).await;
                });
            }
        });
        (proxy, port)
    }

    async fn relay(self, client: tokio::net::TcpStream, server: tokio::net::TcpStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let swallow = Arc::new(AtomicBool::new(false));
        let up = {
            let (proxy, swallow) = (self.clone(), swallow.clone());
            async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    proxy.wait_thawed().await;
                    let commit = buf[..n].windows(6).any(|w| w == b"COMMIT");
                    if commit && proxy.lose_commit_reply.swap(false, Ordering::SeqCst) {
                        swallow.store(true, Ordering::SeqCst);
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        };
        let down = async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = sr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                self.wait_thawed().await;
                if swallow.load(Ordering::SeqCst) {
                    // The server has answered the COMMIT: it is done. The
                    // client never hears of it.
                    break;
                }
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = cw.shutdown().await;
        };
        // Either direction ending ends the connection.
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
    }

    async fn wait_thawed(&self) {
        while self.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// `url` with its port replaced by `port`.
pub fn via_port(url: &str, from: u16, port: u16) -> String {
    url.replace(&format!(":{from}/"), &format!(":{port}/"))
}

/// Round trips counted by [`counting_proxy`].
#[derive(Default)]
pub struct Turns {
    /// Per connection: its round trips, and whether it is a listening
    /// session.
    conns: std::sync::Mutex<
        Vec<
            Arc<(
                std::sync::atomic::AtomicUsize,
                std::sync::atomic::AtomicBool,
            )>,
        >,
    >,
}

impl Turns {
    /// The round trips of every connection that never sent `LISTEN`.
    pub fn load(&self, order: std::sync::atomic::Ordering) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.1.load(order))
            .map(|c| c.0.load(order))
            .sum()
    }
}

/// A loopback proxy in front of the server that counts round trips on the
/// connections made through it, apart from listening sessions (the
/// connection that sends `LISTEN`, whose holder pings are not counted; a
/// backend's first connection becomes its session): each time the client
/// sends after the server has answered is one more, the messages that open
/// the connection included.
pub async fn counting_proxy(upstream: u16) -> (u16, Arc<Turns>) {
    use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let turns = Arc::new(Turns::default());
    let counter = turns.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                .await
                .unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let last = Arc::new(AtomicU8::new(0));
            let last2 = last.clone();
            let conn = Arc::new((AtomicUsize::new(0), AtomicBool::new(false)));
            counter.conns.lock().unwrap().push(conn.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if buf[..n].windows(7).any(|w| w == b"LISTEN ") {
                        conn.1.store(true, Ordering::SeqCst);
                    }
                    if last.swap(1, Ordering::SeqCst) != 1 {
                        conn.0.fetch_add(1, Ordering::SeqCst);
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    last2.store(2, Ordering::SeqCst);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, turns)
}
