//! A counting TCP proxy in front of PostgreSQL: it counts the connections
//! made through it and the round trips made on them.
//!
//! A round trip is a flight: what a client sends after the server last sent
//! it anything. Statements that a client pipelines (sends together before
//! reading the answers) are one flight; a statement prepared and then
//! executed in two exchanges is two. Flights that open a connection (the
//! start-up message, TLS and authentication exchanges) are counted apart.
//! The proxy reads only the frontend messages' headers.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The counts so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    /// Connections accepted since the last reset.
    pub opened: u64,
    /// Connections open now.
    pub open: i64,
    /// Round trips that run statements.
    pub queries: u64,
    /// Round trips that open connections.
    pub setups: u64,
}

#[derive(Debug, Default)]
struct Counts {
    opened: AtomicU64,
    open: AtomicI64,
    queries: AtomicU64,
    setups: AtomicU64,
}

#[derive(Debug)]
pub struct Proxy {
    pub port: u16,
    counts: Arc<Counts>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and relays to `upstream` on 127.0.0.1.
    pub async fn start(upstream: u16) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let _ = relay(client, upstream, c).await;
                });
            }
        });
        Ok(Proxy {
            port,
            counts,
            accept,
        })
    }

    pub fn tally(&self) -> Tally {
        let c = &self.counts;
        Tally {
            opened: c.opened.load(Ordering::SeqCst),
            open: c.open.load(Ordering::SeqCst),
            queries: c.queries.load(Ordering::SeqCst),
            setups: c.setups.load(Ordering::SeqCst),
        }
    }

    /// Zeroes every count but the open connections.
    pub fn reset(&self) {
        let c = &self.counts;
        c.opened.store(0, Ordering::SeqCst);
        c.queries.store(0, Ordering::SeqCst);
        c.setups.store(0, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, upstream: u16, counts: Arc<Counts>) -> io::Result<()> {
    let server = TcpStream::connect(("127.0.0.1", upstream)).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    counts.opened.fetch_add(1, Ordering::SeqCst);
    counts.open.fetch_add(1, Ordering::SeqCst);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Whether the server spoke last: the client's next bytes start a flight.
    let answered = Arc::new(AtomicBool::new(true));
    let up = {
        let answered = answered.clone();
        let counts = counts.clone();
        async move {
            let mut parser = Frontend::default();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                let starts = answered.swap(false, Ordering::SeqCst);
                parser.feed(&buf[..n], starts, &counts);
                sw.write_all(&buf[..n]).await?;
            }
            sw.shutdown().await
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // Before the client can see it, so that its reply starts a flight.
            answered.store(true, Ordering::SeqCst);
            cw.write_all(&buf[..n]).await?;
        }
        cw.shutdown().await
    };
    let _ = tokio::join!(up, down);
    counts.open.fetch_sub(1, Ordering::SeqCst);
    Ok(())
}

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

/// Splits the client's byte stream into messages: first untyped ones (the
/// start-up message, after any TLS or GSS request), then typed ones.
#[derive(Debug, Default)]
struct Frontend {
    typed: bool,
    header: Vec<u8>,
    skip: usize,
    /// A flight has started and its first message header is not read yet.
    pending: bool,
}

impl Frontend {
    /// Reads `data`; if it starts a flight, counts the flight by the kind of
    /// its first message.
    fn feed(&mut self, mut data: &[u8], starts: bool, counts: &Counts) {
        if starts {
            if self.skip > 0 {
                // It began in the middle of a message.
                counts.queries.fetch_add(1, Ordering::SeqCst);
            } else {
                self.pending = true;
            }
        }
        while !data.is_empty() {
            if self.skip > 0 {
                let k = self.skip.min(data.len());
                self.skip -= k;
                data = &data[k..];
                continue;
            }
            let need = if self.typed { 5 } else { 8 };
            let k = (need - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..k]);
            data = &data[k..];
            if self.header.len() < need {
                break;
            }
            let h = &self.header;
            let setup = if self.typed {
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                self.skip = len.saturating_sub(4);
                match h[0] {
                    // Authentication (SASL, password).
                    b'p' => Some(true),
                    // Terminate: not a round trip.
                    b'X' => None,
                    _ => Some(false),
                }
            } else {
                let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let code = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                self.skip = len.saturating_sub(8);
                if code != SSL_REQUEST && code != GSSENC_REQUEST {
                    self.typed = true;
                }
                Some(true)
            };
            self.header.clear();
            if self.pending {
                self.pending = false;
                match setup {
                    Some(true) => counts.setups.fetch_add(1, Ordering::SeqCst),
                    Some(false) => counts.queries.fetch_add(1, Ordering::SeqCst),
                    None => 0,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn flights_are_counted_by_their_first_message() {
        let counts = Counts::default();
        let mut p = Frontend::default();
        let mut startup = 16u32.to_be_bytes().to_vec();
        startup.extend_from_slice(&196608u32.to_be_bytes());
        startup.extend_from_slice(b"user\0x\0\0\0");
        startup.truncate(16);
        // Start-up split over two reads, one flight.
        p.feed(&startup[..5], true, &counts);
        p.feed(&startup[5..], false, &counts);
        p.feed(&typed(b'p', b"sasl"), true, &counts);
        // A pipelined flight: parse, bind, execute, sync.
        let mut flight = typed(b'P', b"\0SELECT 1\0\0\0");
        flight.extend(typed(b'B', b"\0\0\0\0\0\0\0\0"));
        flight.extend(typed(b'E', b"\0\0\0\0\0"));
        flight.extend(typed(b'S', b""));
        p.feed(&flight, true, &counts);
        p.feed(&typed(b'Q', b"SELECT 1\0"), true, &counts);
        p.feed(&typed(b'X', b""), true, &counts);
        assert_eq!(counts.setups.load(Ordering::SeqCst), 2);
        assert_eq!(counts.queries.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_tls_request_is_followed_by_a_start_up_message() {
        let counts = Counts::default();
        let mut p = Frontend::default();
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        p.feed(&ssl, true, &counts);
        let mut startup = 8u32.to_be_bytes().to_vec();
        startup.extend_from_slice(&196608u32.to_be_bytes());
        p.feed(&startup, true, &counts);
        p.feed(&typed(b'Q', b"SELECT 1\0"), true, &counts);
        assert_eq!(counts.setups.load(Ordering::SeqCst), 2);
        assert_eq!(counts.queries.load(Ordering::SeqCst), 1);
    }
}
