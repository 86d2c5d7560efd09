//! An optional userspace relay in front of the upstream that behaves like a WAN link: every
//! chunk is delayed by half the round-trip time in each direction, and the bytes of all
//! connections share one bandwidth cap per direction (`tc` is not available here).
//!
//! Reading and writing are separate tasks joined by a channel, so the delay is latency, not a
//! throughput limit: a full window of data can be on the "wire" at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The link's shape.
#[derive(Clone, Copy, Debug)]
pub struct Wan {
    pub rtt: Duration,
    /// Bytes per second in each direction.
    pub bytes_per_sec: f64,
}

impl Wan {
    /// Parses `RTT_MS,MBIT` (e.g. `20,1000`).
    pub fn parse(s: &str) -> Result<Wan, String> {
        let (rtt, mbit) = s
            .split_once(',')
            .ok_or_else(|| format!("--wan wants RTT_MS,MBIT, got {s:?}"))?;
        let rtt: f64 = rtt.trim().parse().map_err(|_| format!("bad RTT {rtt:?}"))?;
        let mbit: f64 = mbit
            .trim()
            .parse()
            .map_err(|_| format!("bad Mbit/s {mbit:?}"))?;
        if rtt < 0.0 || mbit <= 0.0 {
            return Err(format!("--wan {s:?}: RTT must be >= 0 and bandwidth > 0"));
        }
        Ok(Wan {
            rtt: Duration::from_secs_f64(rtt / 1000.0),
            bytes_per_sec: mbit * 1e6 / 8.0,
        })
    }
}

/// A running relay; it stops when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    /// Bytes sent from the upstream towards the caches.
    pub downstream_bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When each direction of the link is next free.
struct Link {
    free_at: Mutex<Instant>,
}

impl Link {
    /// The time a chunk of `len` bytes sent now arrives at the far end.
    fn schedule(&self, len: usize, wan: &Wan) -> Instant {
        let mut free_at = self.free_at.lock().expect("link lock");
        let start = (*free_at).max(Instant::now());
        *free_at = start + Duration::from_secs_f64(len as f64 / wan.bytes_per_sec);
        *free_at + wan.rtt / 2
    }
}

pub async fn start(upstream: SocketAddr, wan: Wan) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay bind");
    let addr = listener.local_addr().unwrap();
    let downstream_bytes = Arc::new(AtomicU64::new(0));
    let counter = downstream_bytes.clone();
    let up_link = Arc::new(Link {
        free_at: Mutex::new(Instant::now()),
    });
    let down_link = Arc::new(Link {
        free_at: Mutex::new(Instant::now()),
    });
    let task = tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let (counter, up_link, down_link) =
                (counter.clone(), up_link.clone(), down_link.clone());
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let none = Arc::new(AtomicU64::new(0));
                tokio::join!(
                    pipe(cr, sw, up_link, wan, none),
                    pipe(sr, cw, down_link, wan, counter),
                );
            });
        }
    });
    Relay {
        addr,
        downstream_bytes,
        task,
    }
}

/// Copies one direction through the shaped link.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    wan: Wan,
    counter: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(4096);
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
            let at = link.schedule(n, &wan);
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

/// Checks of the option parser, for `cargo test`'s run of this bench.
pub fn self_check() {
    let w = Wan::parse("20,800").unwrap();
    assert_eq!(w.rtt, Duration::from_millis(20));
    assert_eq!(w.bytes_per_sec, 100e6);
    assert!(Wan::parse("20").is_err());
    assert!(Wan::parse("20,0").is_err());
}
