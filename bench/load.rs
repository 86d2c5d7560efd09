//! A small closed-loop HTTP/1.1 load generator: `c` keep-alive connections, each sending one
//! request, reading the whole response and sending the next, for a fixed time.
//!
//! It runs on one thread (a current-thread tokio runtime) so that on a 2-core machine every
//! server gets the same one core of client work, and it discards bodies without copying them
//! anywhere but the socket read buffer. Unlike `wrk` it handles `HEAD` responses (which carry
//! a Content-Length but no body) and reports latency percentiles from every request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// Bytes read per `read` call: large, so big bodies cost few system calls.
const READ_BUF: usize = 256 * 1024;

/// One kind of request, repeated.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub head: bool,
    pub path: String,
    /// Extra header lines, each `Name: value`.
    pub headers: Vec<String>,
    /// HTTPS with this client configuration (HTTP/1.1 by ALPN) instead of plain HTTP.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Target {
    fn request(&self) -> Vec<u8> {
        let mut r = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: regmirror-bench\r\n",
            if self.head { "HEAD" } else { "GET" },
            self.path,
            self.addr
        );
        for h in &self.headers {
            r.push_str(h);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    }
}

/// What one run measured (only requests that completed inside the measuring window).
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    /// The first error, for the report.
    pub first_error: Option<String>,
    /// Body bytes received inside the window (partial responses included).
    pub body_bytes: u64,
    pub window: Duration,
    /// Microseconds per completed request, sorted.
    pub latencies_us: Vec<u32>,
    /// CPU seconds the load generator itself used (warm-up included).
    pub client_cpu_secs: f64,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }

    /// Body throughput in GB/s (10^9 bytes).
    pub fn gbps(&self) -> f64 {
        self.body_bytes as f64 / self.window.as_secs_f64() / 1e9
    }

    /// The `p`th percentile latency in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }
}

/// Nearest-rank percentile of sorted values; 0 for none.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `conns` connections against `target` for `warmup + measure`, counting only what
/// completes after the warm-up. Blocks the calling thread.
pub fn run(target: &Target, conns: usize, warmup: Duration, measure: Duration) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load runtime");
    let request = target.request();
    let cpu_before = thread_cpu_secs();
    let started = Instant::now();
    let window = (started + warmup, started + warmup + measure);
    rt.block_on(async {
        let tasks: Vec<_> = (0..conns)
            .map(|_| {
                let request = request.clone();
                let (addr, head, tls) = (target.addr, target.head, target.tls.clone());
                tokio::spawn(async move { connection(addr, head, tls, request, window).await })
            })
            .collect();
        let mut total = Outcome {
            window: measure,
            ..Outcome::default()
        };
        for t in tasks {
            let o = t.await.expect("load task panicked");
            total.requests += o.requests;
            total.errors += o.errors;
            total.body_bytes += o.body_bytes;
            total.latencies_us.extend(o.latencies_us);
            if total.first_error.is_none() {
                total.first_error = o.first_error;
            }
        }
        total.latencies_us.sort_unstable();
        total.client_cpu_secs = thread_cpu_secs() - cpu_before;
        total
    })
}

/// One request per target, each on its own new connection, all at once (`concurrent`) or one
/// after another; for reads that must each be a first read (a cache filling from its bucket).
/// The window is the time from the first request to the last response. Blocks the calling
/// thread.
pub fn one_each(targets: &[Target], concurrent: bool) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load runtime");
    let cpu_before = thread_cpu_secs();
    let started = Instant::now();
    // No deadline but a hang guard: every byte of every response counts.
    let window = (started, started + Duration::from_secs(3600));
    rt.block_on(async {
        let one = |t: &Target| single(t.addr, t.head, t.tls.clone(), t.request(), window);
        let outcomes = if concurrent {
            futures_util::future::join_all(targets.iter().map(one)).await
        } else {
            let mut v = Vec::new();
            for t in targets {
                v.push(one(t).await);
            }
            v
        };
        let mut total = Outcome::default();
        for o in outcomes {
            total.requests += o.requests;
            total.errors += o.errors;
            total.body_bytes += o.body_bytes;
            total.latencies_us.extend(o.latencies_us);
            if total.first_error.is_none() {
                total.first_error = o.first_error;
            }
        }
        total.window = started.elapsed();
        total.latencies_us.sort_unstable();
        total.client_cpu_secs = thread_cpu_secs() - cpu_before;
        total
    })
}

/// One request on a new connection.
async fn single(
    addr: SocketAddr,
    head: bool,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    request: Vec<u8>,
    window: (Instant, Instant),
) -> Outcome {
    let mut out = Outcome::default();
    let mut buf = vec![0u8; READ_BUF];
    let sent = Instant::now();
    let mut s = match connect(addr, tls).await {
        Ok(s) => s,
        Err(e) => {
            fail(&mut out, e);
            return out;
        }
    };
    match exchange(
        &mut s,
        head,
        &request,
        &mut buf,
        window,
        &mut out.body_bytes,
    )
    .await
    {
        Ok(Exchange::Done { .. }) => {
            out.requests = 1;
            let us = sent.elapsed().as_micros();
            out.latencies_us.push(us.min(u32::MAX as u128) as u32);
        }
        Ok(Exchange::Deadline) => fail(&mut out, "no whole response within the hour".into()),
        Ok(Exchange::Status(code)) => fail(&mut out, format!("HTTP status {code}")),
        Err(e) => fail(&mut out, e),
    }
    out
}

/// CPU time of the calling thread.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One connection's loop; reconnects when the server closes between responses.
async fn connection(
    addr: SocketAddr,
    head: bool,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    request: Vec<u8>,
    (from, until): (Instant, Instant),
) -> Outcome {
    let mut out = Outcome::default();
    let mut buf = vec![0u8; READ_BUF];
    let mut stream: Option<Stream> = None;
    while Instant::now() < until {
        let s = match stream.as_mut() {
            Some(s) => s,
            None => match connect(addr, tls.clone()).await {
                Ok(s) => stream.insert(s),
                Err(e) => {
                    fail(&mut out, format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match exchange(
            s,
            head,
            &request,
            &mut buf,
            (from, until),
            &mut out.body_bytes,
        )
        .await
        {
            Ok(Exchange::Done { keep_alive }) => {
                let done = Instant::now();
                if done >= from && done <= until {
                    out.requests += 1;
                    let us = done.duration_since(sent).as_micros();
                    out.latencies_us.push(us.min(u32::MAX as u128) as u32);
                }
                if !keep_alive {
                    stream = None;
                }
            }
            Ok(Exchange::Deadline) => break,
            Ok(Exchange::Status(code)) => {
                fail(&mut out, format!("HTTP status {code}"));
                stream = None;
            }
            Err(e) => {
                fail(&mut out, e);
                stream = None;
            }
        }
    }
    out
}

type Stream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// A connection, with a TLS handshake when `tls` is set.
async fn connect(
    addr: SocketAddr,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<Stream, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = tls else {
        return Ok(Either::Left(tcp));
    };
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(Either::Right(tls))
}

/// A client configuration trusting the PEM CA at `ca`, offering HTTP/1.1 only.
pub fn tls_client(ca: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA added");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

fn fail(out: &mut Outcome, e: String) {
    out.errors += 1;
    if out.first_error.is_none() {
        out.first_error = Some(e);
    }
}

enum Exchange {
    Done {
        keep_alive: bool,
    },
    /// The measuring window closed in the middle of a body.
    Deadline,
    Status(u16),
}

/// Sends one request and reads its response to the end of the body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    head: bool,
    request: &[u8],
    buf: &mut [u8],
    (from, until): (Instant, Instant),
    body_bytes: &mut u64,
) -> Result<Exchange, String> {
    s.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    // TLS may hold the record back until flushed.
    s.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut filled = 0;
    let (head_len, length, keep_alive, status) = loop {
        if filled == buf.len() {
            return Err("response head too large".into());
        }
        let n = s
            .read(&mut buf[filled..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        filled += n;
        if let Some(parsed) = parse_head(&buf[..filled])? {
            break parsed;
        }
    };
    if status != 200 {
        return Ok(Exchange::Status(status));
    }
    let mut remaining = if head { 0 } else { length };
    let early = (filled - head_len) as u64;
    if early > remaining {
        return Err("more bytes than the Content-Length (pipelining is not used)".into());
    }
    remaining -= early;
    count(body_bytes, early, from, until);
    while remaining > 0 {
        let want = buf.len().min(remaining.min(usize::MAX as u64) as usize);
        let n = s
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("read body: {e}"))?;
        if n == 0 {
            return Err(format!("body ended {remaining} bytes short"));
        }
        remaining -= n as u64;
        if count(body_bytes, n as u64, from, until) {
            return Ok(Exchange::Deadline);
        }
    }
    Ok(Exchange::Done { keep_alive })
}

/// Adds `n` to the counter if now is inside the window; true once the window has closed.
fn count(counter: &mut u64, n: u64, from: Instant, until: Instant) -> bool {
    let now = Instant::now();
    if now >= from && now <= until {
        *counter += n;
    }
    now > until
}

/// Parses a response head once it is complete: (head length, Content-Length, keep-alive,
/// status). A 200 without Content-Length is refused rather than guessed.
fn parse_head(b: &[u8]) -> Result<Option<(usize, u64, bool, u16)>, String> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&b[..end]).map_err(|_| "non-UTF-8 response head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut keep_alive = true;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<u64>().ok();
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep_alive = false;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked responses are not supported by the load generator".into());
        }
    }
    let length = match (status, length) {
        (_, Some(l)) => l,
        (200, None) => return Err("200 without Content-Length".into()),
        (_, None) => 0,
    };
    Ok(Some((end + 4, length, keep_alive, status)))
}

/// Checks of the parsing and statistics above, run by `cargo test` (which runs this bench in
/// test mode, where `#[cfg(test)]` is not set for a `harness = false` target).
pub fn self_check() {
    let v: Vec<u32> = (1..=100).collect();
    assert_eq!(percentile(&v, 50.0), 50);
    assert_eq!(percentile(&v, 99.0), 99);
    assert_eq!(percentile(&v, 100.0), 100);
    assert_eq!(percentile(&[7], 99.0), 7);
    assert_eq!(percentile(&[], 50.0), 0);

    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nabc";
    assert_eq!(
        parse_head(ok).unwrap(),
        Some((ok.len() - 3, 12, false, 200))
    );
    assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-").unwrap(), None);
    assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    let nf = b"HTTP/1.1 404 Not Found\r\n\r\n";
    assert_eq!(parse_head(nf).unwrap(), Some((nf.len(), 0, true, 404)));
}
