//! A TCP proxy on loopback that injects network faults between a node and
//! its server: it cuts every open connection, delays what passes in one
//! direction, or holds it back (a blackhole) in one direction or both.
//!
//! The fault test gives each node a proxy of its own, so a fault hits one
//! node's connections and nobody else's. The relaying follows
//! `bench/src/proxy.rs` (one task per connection, the two directions apart);
//! what it relays is never parsed.
//!
//! - [`FaultProxy::cut`] closes every open connection at once, both ways: a
//!   reset, a NAT or firewall dropping the flow.
//! - [`Flow::Delay`] delays every chunk by a fixed time from its arrival,
//!   in order: a slow or congested path.
//! - [`Flow::Hold`] stops relaying in that direction; what arrives is kept
//!   and delivered when the flow is set back, as TCP's retransmissions would
//!   once a partition heals. A connection opened while either direction is
//!   held does not reach the server until both flow again, as a handshake
//!   would not. Hold, then [`FaultProxy::cut`], is a partition that TCP gave
//!   up on.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A direction of the relayed traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the node) to the server.
    Up,
    /// From the server to the client.
    Down,
}

/// What happens to the traffic in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flow {
    /// Relayed at once.
    #[default]
    Pass,
    /// Relayed this long after it arrived, in order.
    Delay(Duration),
    /// Kept back until the flow changes (a blackhole).
    Hold,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mode {
    up: Flow,
    down: Flow,
}

impl Mode {
    fn of(self, d: Direction) -> Flow {
        match d {
            Direction::Up => self.up,
            Direction::Down => self.down,
        }
    }
}

/// Where the proxy relays to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A TCP port on 127.0.0.1.
    Tcp(u16),
    /// A Unix socket (PostgreSQL's, say: local connections skip the
    /// password exchange, which costs a debug build a lot of CPU).
    Unix(PathBuf),
}

/// What the proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted.
    pub opened: u64,
    /// Connections closed by [`FaultProxy::cut`].
    pub cut: u64,
}

#[derive(Debug)]
struct Control {
    mode: watch::Sender<Mode>,
    /// Bumped by every cut; a connection ends when it changes.
    cuts: watch::Sender<u64>,
    opened: AtomicU64,
    open: AtomicU64,
    cut: AtomicU64,
}

/// The proxy. Dropping it closes its connections.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    control: Arc<Control>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and relays to `upstream`.
    pub async fn start(upstream: Upstream) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let control = Arc::new(Control {
            mode: watch::channel(Mode::default()).0,
            cuts: watch::channel(0).0,
            opened: AtomicU64::new(0),
            open: AtomicU64::new(0),
            cut: AtomicU64::new(0),
        });
        let c = control.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                c.opened.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(client, upstream.clone(), c.clone()));
            }
        });
        Ok(FaultProxy {
            port,
            control,
            accept,
        })
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sets what happens to the traffic in direction `d`, for the open
    /// connections and the new ones.
    pub fn set(&self, d: Direction, flow: Flow) {
        self.control.mode.send_modify(|m| match d {
            Direction::Up => m.up = flow,
            Direction::Down => m.down = flow,
        });
    }

    /// Both directions relayed at once again; what was held is delivered.
    pub fn heal(&self) {
        self.control.mode.send_replace(Mode::default());
    }

    /// Closes every open connection, both ways, at once. Returns how many.
    pub fn cut(&self) -> u64 {
        let open = self.control.open.load(Ordering::SeqCst);
        self.control.cut.fetch_add(open, Ordering::SeqCst);
        self.control.cuts.send_modify(|n| *n += 1);
        open
    }

    /// What it has done so far.
    pub fn stats(&self) -> Stats {
        Stats {
            opened: self.control.opened.load(Ordering::SeqCst),
            cut: self.control.cut.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.control.cuts.send_modify(|n| *n += 1);
    }
}

/// One connection, until either side closes it or it is cut.
async fn serve(client: TcpStream, upstream: Upstream, control: Arc<Control>) {
    let mut cuts = control.cuts.subscribe();
    cuts.mark_unchanged();
    control.open.fetch_add(1, Ordering::SeqCst);
    let relay = async {
        let mut mode = control.mode.subscribe();
        // No handshake across a blackhole.
        mode.wait_for(|m| m.up != Flow::Hold && m.down != Flow::Hold)
            .await
            .map_err(|_| io::Error::other("the proxy is gone"))?;
        client.set_nodelay(true)?;
        let (cr, cw) = client.into_split();
        match upstream {
            Upstream::Tcp(port) => {
                let server = TcpStream::connect(("127.0.0.1", port)).await?;
                server.set_nodelay(true)?;
                let (sr, sw) = server.into_split();
                relay(cr, cw, sr, sw, &control).await
            }
            Upstream::Unix(path) => {
                let (sr, sw) = UnixStream::connect(path).await?.into_split();
                relay(cr, cw, sr, sw, &control).await
            }
        }
    };
    tokio::select! {
        _ = relay => {}
        _ = cuts.changed() => {}
    }
    // Both sockets are dropped here: closed.
    control.open.fetch_sub(1, Ordering::SeqCst);
}

async fn relay(
    cr: impl AsyncRead + Unpin,
    cw: impl AsyncWrite + Unpin,
    sr: impl AsyncRead + Unpin,
    sw: impl AsyncWrite + Unpin,
    control: &Control,
) -> io::Result<()> {
    tokio::try_join!(
        pump(cr, sw, control.mode.subscribe(), Direction::Up),
        pump(sr, cw, control.mode.subscribe(), Direction::Down),
    )?;
    Ok(())
}

/// Relays `from` to `to` in direction `d` as the mode says, until `from`
/// ends (then `to` is shut down) or either fails.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<Mode>,
    d: Direction,
) -> io::Result<()> {
    // What was read and when; `None` is the end of the stream.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            let _ = tx.send((Instant::now(), chunk));
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
        }
    };
    let write = async move {
        while let Some((arrived, chunk)) = rx.recv().await {
            loop {
                let due = match mode.borrow_and_update().of(d) {
                    Flow::Pass => Some(arrived),
                    Flow::Delay(by) => Some(arrived + by),
                    Flow::Hold => None,
                };
                match due {
                    Some(due) if Instant::now() >= due => break,
                    Some(due) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => {}
                            changed = mode.changed() => if changed.is_err() { return Ok(()) },
                        }
                    }
                    None => {
                        if mode.changed().await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            match chunk {
                Some(bytes) => to.write_all(&bytes).await?,
                None => return to.shutdown().await,
            }
        }
        Ok(())
    };
    tokio::try_join!(read, write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its port.
    async fn echo() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        port
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        Ok(back)
    }

    #[tokio::test]
    async fn it_relays_delays_holds_and_cuts() {
        let proxy = FaultProxy::start(Upstream::Tcp(echo().await))
            .await
            .unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");

        proxy.set(Direction::Down, Flow::Delay(Duration::from_millis(150)));
        let t = Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").await.unwrap(), b"slow");
        assert!(t.elapsed() >= Duration::from_millis(150));

        proxy.set(Direction::Down, Flow::Pass);
        proxy.set(Direction::Up, Flow::Hold);
        s.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut buf)).await;
        assert!(early.is_err(), "nothing passes a blackhole");
        proxy.heal();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"held", "what was held is delivered after healing");

        assert_eq!(proxy.cut(), 1);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("a cut connection is closed at once");
        assert!(n.is_err() || rest.is_empty());
        assert_eq!(proxy.stats().cut, 1);

        // A connection opened during a blackhole reaches the server only
        // after it.
        proxy.set(Direction::Down, Flow::Hold);
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        s.write_all(b"late").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut buf)).await;
        assert!(early.is_err());
        proxy.heal();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"late");
    }
}
