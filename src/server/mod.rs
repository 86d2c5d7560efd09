//! The listening socket and the HTTP connections on it: plain TCP, or TLS with handshakes done
//! off the accept loop and the certificate reloaded when its files change. This module knows
//! nothing of routes or registries; it takes a [`Router`] and serves it.
//!
//! What a client may hold is bounded here (`server:` in the configuration): a number of
//! connections, a header-read timeout, an idle timeout (a socket with nothing under way and
//! nothing moving), a send timeout (a client that stopped reading), HTTP/2 streams per
//! connection and the buffers of each (see [`MAX_BUF`], [`H2_SEND_BUF`]). Plain connections can
//! send files with sendfile ([`sendfile`]) once its start-up self-test passed; each request
//! learns through [`Connection`] whether its connection can.
//!
//! When every connection slot is taken, or accept fails for want of file descriptors, the
//! connection idle the longest (nothing under way) is closed to admit the new one, as nginx
//! closes idle keep-alive connections: idle sockets must not lock a normal client out until
//! `idle_timeout`. [`raise_fd_limit`] and [`max_connections`] size the default limit to the
//! descriptors the process may hold.

pub mod sendfile;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tower::ServiceExt;

use crate::config::ServerConfig;
use sendfile::{PlainConn, Sendfile};

/// A client that has not finished its TLS handshake by then is dropped, so a slow or idle
/// connection cannot hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's HTTP/1 buffer limit, for reading a request head and for queueing response bytes:
/// a request target of 64 KiB (the most the router accepts, [`MAX_TARGET`]) plus ordinary
/// headers fits, and a client that stops reading holds at most this much of queued response
/// plus one body chunk.
pub const MAX_BUF: usize = 96 * 1024;

/// hyper refuses a request target of 64 KiB or more (the `http` crate's limit) and a request
/// head beyond [`MAX_BUF`] itself, before any route, with an empty 414 or 431; [`Watched`]
/// swaps those for the same status with an OCI error body.
const HYPER_REFUSALS: [(&[u8], crate::error::ErrorCode, &str); 2] = [
    (
        b"HTTP/1.1 414 URI Too Long\r\n",
        crate::error::ErrorCode::UriTooLong,
        "the request target is longer than 64 KiB",
    ),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
        crate::error::ErrorCode::UriTooLong,
        "the request head is longer than 96 KiB",
    ),
];

/// Bytes HTTP/2 buffers per stream beyond what the client's window lets it send. hyper asks
/// the response body for its next chunk only when the stream has send capacity, so a stream
/// whose client stopped reading holds at most this plus one body chunk.
pub const H2_SEND_BUF: usize = 64 * 1024;

/// Our receive windows: requests to a registry mirror carry no body worth a larger window.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// `server.max_connections` when the configuration leaves it out and descriptors allow.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Descriptors a connection may hold at once: its socket and the blob file it sends.
const FDS_PER_CONNECTION: u64 = 2;

/// Descriptors kept out of the connections' share for everything else: the index, files being
/// written by downloads, upstream, bucket and peer connections, logs.
fn fd_reserve(limit: u64) -> u64 {
    64u64.saturating_add(limit / 8)
}

/// The process's file descriptor limit, before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy)]
pub struct FdLimit {
    pub was: u64,
    pub now: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (many distributions start services with
/// a soft limit of 1024 and a hard one far above): every connection needs a descriptor, and
/// the default connection limit follows from this one. Call once at start-up.
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // Linux refuses RLIM_INFINITY for open files; its own ceiling (fs.nr_open) is 2^20 by
    // default.
    const CEILING: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let was = limit.current.unwrap_or(CEILING);
    let hard = limit.maximum.unwrap_or(CEILING);
    if was >= hard {
        return Ok(FdLimit { was, now: was });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        },
    )?;
    Ok(FdLimit { was, now: hard })
}

/// The soft `RLIMIT_NOFILE` now.
pub fn fd_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Connections served at once: the configured number, or what `fd_limit` descriptors can hold
/// beside a reserve for the store and the upstreams (at most [`DEFAULT_MAX_CONNECTIONS`], at
/// least 8: with fewer descriptors than that, closing idle connections is what lets clients in).
pub fn max_connections(configured: Option<usize>, fd_limit: u64) -> usize {
    configured.unwrap_or_else(|| {
        let held = fd_limit.saturating_sub(fd_reserve(fd_limit)) / FDS_PER_CONNECTION;
        usize::try_from(held)
            .unwrap_or(usize::MAX)
            .clamp(8, DEFAULT_MAX_CONNECTIONS)
    })
}

/// Connections ready for HTTP: plain, or TLS after a completed handshake.
pub enum Listener {
    Plain {
        listener: TcpListener,
        slots: Arc<Slots>,
    },
    Tls {
        ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr, OwnedSemaphorePermit)>,
        local_addr: SocketAddr,
        slots: Arc<Slots>,
    },
}

impl Listener {
    /// Serves `listener` as is, or behind TLS (whose files are checked for changes every
    /// `tls.reload_interval`). Must be called within a tokio runtime. Nothing is accepted
    /// before [`serve`] gives the listener its connection limit.
    pub fn new(listener: TcpListener, tls: Option<Arc<tls::Reloader>>) -> io::Result<Listener> {
        let slots = Arc::new(Slots::new());
        let Some(reloader) = tls else {
            return Ok(Listener::Plain { listener, slots });
        };
        let local_addr = listener.local_addr()?;
        // A small queue: handshakes are concurrent, and the server takes connections as fast
        // as they come.
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(reload_loop(
            reloader.clone(),
            reloader.interval(),
            tx.clone(),
        ));
        tokio::spawn(accept_loop(listener, reloader, slots.clone(), tx));
        Ok(Listener::Tls {
            ready,
            local_addr,
            slots,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Plain { listener, .. } => listener.local_addr(),
            Listener::Tls { local_addr, .. } => Ok(*local_addr),
        }
    }

    fn slots(&self) -> &Arc<Slots> {
        match self {
            Listener::Plain { slots, .. } | Listener::Tls { slots, .. } => slots,
        }
    }

    /// The next connection, with its share of the connection limit.
    async fn accept(&mut self) -> (Accepted, SocketAddr, OwnedSemaphorePermit) {
        match self {
            Listener::Plain { listener, slots } => {
                let (stream, addr) = accept_tcp(listener, slots).await;
                let permit = slots.admit().await;
                (Accepted::Plain(stream), addr, permit)
            }
            Listener::Tls { ready, .. } => match ready.recv().await {
                Some((stream, addr, permit)) => (Accepted::Tls(Box::new(stream)), addr, permit),
                // The accept loop only ends when this receiver is gone; never reached while
                // serving, so wait forever rather than spin.
                None => std::future::pending().await,
            },
        }
    }
}

enum Accepted {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Waits for a free connection slot. The semaphore is never closed.
async fn permit(limit: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    match limit.clone().acquire_owned().await {
        Ok(permit) => permit,
        Err(_) => std::future::pending().await,
    }
}

/// The connections being served and the slots they hold.
pub struct Slots {
    limit: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next: AtomicU64,
    /// Tasks waiting for room: while there are any, a connection that closes, declines to be
    /// closed or finishes a request notifies [`Slots::freed`].
    waiting: AtomicUsize,
    freed: Notify,
    /// Connections closed to make room (`regmirror_connections_evicted_total`).
    evicted: OnceLock<prometheus::IntCounter>,
}

impl Slots {
    fn new() -> Slots {
        Slots {
            limit: Arc::new(Semaphore::new(0)),
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            evicted: OnceLock::new(),
        }
    }

    /// A connection slot: a free one, or the one of an idle connection closed for it. With
    /// nothing idle, waits until a connection closes or becomes idle.
    async fn admit(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(permit) = self.limit.clone().try_acquire_owned() {
                return permit;
            }
            // Counted as waiting before listening, so no wake-up falls in between.
            let _waiting = Waiting::new(self);
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            self.close_idle();
            tokio::select! {
                permit = permit(&self.limit) => return permit,
                () = freed => {}
            }
        }
    }

    /// Asks the connection idle the longest to close; false when none is idle.
    fn close_idle(&self) -> bool {
        let open = match self.open.lock() {
            Ok(open) => open,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Ties (the clock counts milliseconds) go to the older connection.
        let victim = open
            .iter()
            .filter(|(_, a)| a.is_idle() && !a.closing.load(Ordering::Relaxed))
            .min_by_key(|(id, a)| (a.last_moved(), **id))
            .map(|(_, a)| a);
        let Some(victim) = victim else {
            return false;
        };
        victim.closing.store(true, Ordering::Relaxed);
        victim.close.notify_one();
        if let Some(evicted) = self.evicted.get() {
            evicted.inc();
        }
        true
    }

    fn register(&self, activity: Arc<Activity>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        match self.open.lock() {
            Ok(mut open) => open.insert(id, activity),
            Err(poisoned) => poisoned.into_inner().insert(id, activity),
        };
        id
    }

    fn remove(&self, id: u64) {
        match self.open.lock() {
            Ok(mut open) => open.remove(&id),
            Err(poisoned) => poisoned.into_inner().remove(&id),
        };
    }

    fn wake_waiters(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// Counts a task waiting for room in [`Slots::waiting`] while it lives.
struct Waiting<'a>(&'a Slots);

impl<'a> Waiting<'a> {
    fn new(slots: &'a Slots) -> Waiting<'a> {
        slots.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(slots)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves when the connection is asked to make room and is still idle; a connection that
/// started a request meanwhile declines (and tells the waiting admitter to look again).
async fn evicted(activity: &Activity, slots: &Slots) {
    loop {
        activity.close.notified().await;
        if activity.is_idle() {
            return;
        }
        activity.closing.store(false, Ordering::Relaxed);
        slots.freed.notify_waiters();
    }
}

/// Accepts one TCP connection, riding out errors: one that concerns only that connection is
/// skipped; running out of file descriptors closes the connection idle the longest and tries
/// again once it is gone (or after a moment, when nothing is idle), instead of ending the
/// server or spinning.
async fn accept_tcp(listener: &TcpListener, slots: &Slots) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                // hyper writes whole responses; Nagle would only hold back the tail of one
                // until the client's delayed ACK.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY");
                }
                return (stream, addr);
            }
            Err(error) if is_connection_error(&error) => {
                tracing::debug!(%error, "accepted connection failed")
            }
            Err(error) => {
                let out_of_descriptors =
                    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                tracing::warn!(%error, "accept failed; retrying shortly");
                let waiting = Waiting::new(slots);
                let freed = slots.freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if out_of_descriptors && slots.close_idle() {
                    tokio::select! {
                        () = freed => {}
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                drop(waiting);
            }
        }
    }
}

fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// What a request knows of its connection (axum's `ConnectInfo`).
#[derive(Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// Set on plain connections when sendfile is on: lets an HTTP/1 response send a file
    /// without copying it.
    pub sendfile: Option<Sendfile>,
}

/// How [`serve`] treats connections beyond [`ServerConfig`].
#[derive(Clone, Default)]
pub struct Options {
    /// Whether plain connections get a sendfile handle (after the self-test passed).
    pub sendfile: bool,
    /// Counts the bytes sendfile(2) reports sent.
    pub sendfile_bytes: Option<prometheus::IntCounter>,
    /// Counts idle connections closed to make room for new ones.
    pub evicted: Option<prometheus::IntCounter>,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the connections finish
/// what they are doing (HTTP/2 connections get a GOAWAY, idle ones are closed).
pub async fn serve(
    mut listener: Listener,
    router: Router,
    config: &ServerConfig,
    options: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = listener.slots().clone();
    slots
        .limit
        .add_permits(max_connections(config.max_connections, fd_limit()));
    if let Some(evicted) = &options.evicted {
        let _ = slots.evicted.set(evicted.clone());
    }
    let server = Arc::new(Server::new(config, options, Some(slots)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (accepted, peer, permit) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        server.spawn(
            accepted,
            peer,
            router.clone(),
            graceful.watcher(),
            Some(permit),
        );
    }
    // Stop accepting: queued connections are refused rather than left waiting.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Everything a connection task needs, shared by all of them.
struct Server {
    builder: auto::Builder<TokioExecutor>,
    config: ServerConfig,
    options: Options,
    /// Where connections register so that idle ones can be closed to make room (none for the
    /// sendfile self-test's one connection).
    slots: Option<Arc<Slots>>,
}

impl Server {
    fn new(config: &ServerConfig, options: Options, slots: Option<Arc<Slots>>) -> Server {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout.0)
            .max_buf_size(MAX_BUF)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(config.http2_max_streams)
            .max_send_buf_size(H2_SEND_BUF)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_header_list_size(MAX_BUF as u32);
        Server {
            builder,
            config: config.clone(),
            options,
            slots,
        }
    }

    /// Serves one connection on its own task; `permit` is released when it closes.
    fn spawn(
        self: &Arc<Self>,
        accepted: Accepted,
        peer: SocketAddr,
        router: Router,
        watcher: Watcher,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let (io, sendfile) = match accepted {
            Accepted::Plain(tcp) => {
                #[cfg(feature = "test-hooks")]
                let vectored = !self.config.break_vectored_writes;
                #[cfg(not(feature = "test-hooks"))]
                let vectored = true;
                let conn =
                    PlainConn::with_options(tcp, vectored, self.options.sendfile_bytes.clone());
                let sendfile = self.options.sendfile.then(|| conn.sendfile());
                (Either::Left(conn), sendfile)
            }
            Accepted::Tls(tls) => (Either::Right(*tls), None),
        };
        let info = Connection { peer, sendfile };
        let activity = Arc::new(Activity::new());
        let slots = self.slots.clone();
        let id = slots.as_ref().map(|slots| slots.register(activity.clone()));
        let io = Watched {
            inner: io,
            activity: activity.clone(),
            rewrite: None,
        };
        let server = self.clone();
        tokio::spawn(async move {
            let service = {
                let activity = activity.clone();
                let slots = slots.clone();
                hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                    let guard = InFlight::new(activity.clone(), slots.clone());
                    let (router, info) = (router.clone(), info.clone());
                    async move {
                        let mut request = request.map(Body::new);
                        request.extensions_mut().insert(ConnectInfo(info));
                        let response = match router.oneshot(request).await {
                            Ok(response) => response,
                            Err(never) => match never {},
                        };
                        Ok::<_, Infallible>(response.map(|body| Tracked {
                            body,
                            _guard: guard,
                        }))
                    }
                })
            };
            let conn = server.builder.serve_connection(TokioIo::new(io), service);
            let conn = watcher.watch(conn);
            let idle = server.config.idle_timeout.0;
            let send = server.config.send_timeout.0;
            tokio::select! {
                result = conn => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                }
                reason = watchdog(&activity, idle, send) => {
                    tracing::debug!(%peer, reason, "closing connection");
                }
                () = async {
                    match &slots {
                        Some(slots) => evicted(&activity, slots).await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::debug!(%peer, "closing an idle connection to make room for a new one");
                }
            }
            if let (Some(slots), Some(id)) = (&slots, id) {
                slots.remove(id);
                drop(permit);
                slots.wake_waiters();
            }
        });
    }
}

/// Accepts TCP connections and hands each to its own handshake task, until the server drops
/// its [`Listener`]. A handshake holds a connection slot like any connection.
async fn accept_loop(
    listener: TcpListener,
    reloader: Arc<tls::Reloader>,
    slots: Arc<Slots>,
    tx: Ready,
) {
    loop {
        let accepted = tokio::select! {
            accepted = async {
                let accepted = accept_tcp(&listener, &slots).await;
                (accepted, slots.admit().await)
            } => accepted,
            () = tx.closed() => return,
        };
        let ((stream, peer), permit) = accepted;
        let acceptor = TlsAcceptor::from(reloader.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, peer, permit)).await;
                }
                // rustls errors name the reason (no client certificate, unknown CA, protocol
                // mismatch) and hold nothing secret.
                Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

type Ready = mpsc::Sender<(TlsStream<TcpStream>, SocketAddr, OwnedSemaphorePermit)>;

async fn reload_loop(reloader: Arc<tls::Reloader>, interval: Duration, tx: Ready) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = tx.closed() => return,
        }
        let reloader = reloader.clone();
        // File reads and key parsing are blocking work.
        let _ = tokio::task::spawn_blocking(move || reloader.check()).await;
    }
}

/// What a connection's watchdog looks at: when bytes last moved, since when a write has been
/// waiting for the client to read, and how many requests are under way.
struct Activity {
    /// tokio's clock, so tests can pause it.
    start: tokio::time::Instant,
    /// Milliseconds since `start` of the last read or write that moved bytes.
    last_io: AtomicU64,
    /// Milliseconds since `start`, plus one, of the first write still waiting; 0 when none.
    blocked_since: AtomicU64,
    in_flight: AtomicUsize,
    /// Asked to close to make room for a new connection ([`Slots::close_idle`]).
    close: Notify,
    closing: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: tokio::time::Instant::now(),
            last_io: AtomicU64::new(0),
            blocked_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            close: Notify::new(),
            closing: AtomicBool::new(false),
        }
    }

    /// Nothing under way: an idle keep-alive or HTTP/2 connection, or a silent socket.
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// When bytes last moved, comparable across connections.
    fn last_moved(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_io.load(Ordering::Relaxed))
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn moved(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
        self.blocked_since.store(0, Ordering::Relaxed);
    }

    fn blocked(&self) {
        if self.blocked_since.load(Ordering::Relaxed) == 0 {
            self.blocked_since
                .store(self.now().saturating_add(1), Ordering::Relaxed);
        }
    }
}

/// Resolves when the connection should be closed: nothing under way and no bytes moving for
/// `idle`, or a response whose client has not read a byte for `send`.
async fn watchdog(activity: &Activity, idle: Duration, send: Duration) -> &'static str {
    let idle = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let send = u64::try_from(send.as_millis()).unwrap_or(u64::MAX);
    loop {
        let now = activity.now();
        let blocked = activity.blocked_since.load(Ordering::Relaxed);
        let wait = if blocked != 0 {
            let waited = now.saturating_sub(blocked - 1);
            if waited >= send {
                return "the client stopped reading (server.send_timeout)";
            }
            send - waited
        } else if activity.in_flight.load(Ordering::Relaxed) == 0 {
            let waited = now.saturating_sub(activity.last_io.load(Ordering::Relaxed));
            if waited >= idle {
                return "idle (server.idle_timeout)";
            }
            idle - waited
        } else {
            // A request under way and nothing blocked: look again later.
            idle.min(send)
        };
        tokio::time::sleep(Duration::from_millis(wait.max(10))).await;
    }
}

/// Counts a request as under way until its response body is dropped (sent or abandoned).
struct InFlight(Arc<Activity>, Option<Arc<Slots>>);

impl InFlight {
    fn new(activity: Arc<Activity>, slots: Option<Arc<Slots>>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity, slots)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let left = self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        // The end of a response is activity: the idle time counts from here.
        self.0.last_io.store(self.0.now(), Ordering::Relaxed);
        // The connection just became idle: a new one waiting for room may close it.
        if let (1, Some(slots)) = (left, &self.1) {
            slots.wake_waiters();
        }
    }
}

/// A response body that keeps its request counted as under way.
struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// An IO that reports to its connection's [`Activity`]. Everything else is forwarded, vectored
/// writes included: sendfile depends on it (the start-up self-test checks), except hyper's own
/// bodiless refusals of oversized requests, which go out with an OCI error body instead.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    rewrite: Option<Rewrite>,
}

/// A response written in place of the one hyper asked for, which is `original` bytes long.
struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
    original: usize,
}

/// The OCI response replacing `head`, if `head` is one of [`HYPER_REFUSALS`]. hyper writes
/// those before any request exists, so none is under way; our own responses always are.
fn replacement(head: &[u8], activity: &Activity) -> Option<Vec<u8>> {
    if activity.in_flight.load(Ordering::Relaxed) != 0 || !head.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let (status, code, message) = HYPER_REFUSALS
        .iter()
        .find(|(status, _, _)| head.starts_with(status))?;
    let body = serde_json::json!({ "errors": [{ "code": code.as_str(), "message": message }] })
        .to_string();
    let status = &status[..status.len() - 2];
    let mut bytes = status.to_vec();
    bytes.extend_from_slice(
        format!(
            "\r\ncontent-type: application/json; charset=utf-8\r\ndocker-distribution-api-version: registry/2.0\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    Some(bytes)
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.moved();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> Watched<T> {
    /// Writes the replacement of a refusal instead of `original` bytes, if there is one.
    fn poll_rewrite(
        &mut self,
        cx: &mut Context<'_>,
        head: &[u8],
        original: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        if self.rewrite.is_none() {
            let bytes = replacement(head, &self.activity)?;
            self.rewrite = Some(Rewrite {
                bytes,
                written: 0,
                original,
            });
        }
        let rewrite = self.rewrite.as_mut()?;
        while rewrite.written < rewrite.bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &rewrite.bytes[rewrite.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => rewrite.written += n,
                Poll::Ready(Err(error)) => return Some(Poll::Ready(Err(error))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        let original = rewrite.original;
        self.rewrite = None;
        Some(Poll::Ready(Ok(original)))
    }

    fn note(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.moved(),
            Poll::Pending => self.activity.blocked(),
            _ => {}
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(result) = self.poll_rewrite(cx, buf, buf.len()) {
            return result;
        }
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // hyper writes a refusal's head as one buffer.
        if let [head] = bufs {
            if let Some(result) = self.poll_rewrite(cx, head, head.len()) {
                return result;
            }
        }
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Proves at start-up that a placeholder-frame body goes out as the file's bytes through this
/// very stack (hyper, the connection wrappers, [`PlainConn`]): serves one file over a loopback
/// connection and compares what a client receives. An error says what went wrong; the caller
/// then serves without sendfile.
pub async fn sendfile_self_test(config: &ServerConfig) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LEN: usize = 300_001;
    let pattern: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8 + 1).collect();
    let file = memfd(&pattern).map_err(|e| format!("cannot create the test file: {e}"))?;
    let file = Arc::new(file);
    let router = Router::new().route(
        "/",
        axum::routing::get(move |ConnectInfo(conn): ConnectInfo<Connection>| {
            let file = file.clone();
            async move {
                match conn.sendfile {
                    Some(sendfile) => axum::response::Response::builder()
                        .header(axum::http::header::CONTENT_LENGTH, LEN)
                        .body(Body::from_stream(sendfile.stream(file, 0, LEN as u64, ())))
                        .unwrap_or_default(),
                    None => axum::response::Response::default(),
                }
            }
        }),
    );
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("loopback address: {e}"))?;
    let server = Arc::new(Server::new(
        config,
        Options {
            sendfile: true,
            ..Options::default()
        },
        None,
    ));
    let graceful = GracefulShutdown::new();
    let watcher = graceful.watcher();
    let exchange = async move {
        let serve = async {
            let (stream, peer) = listener.accept().await?;
            server.spawn(Accepted::Plain(stream), peer, router, watcher, None);
            Ok::<_, io::Error>(())
        };
        let client = async {
            let mut client = TcpStream::connect(addr).await?;
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: self-test\r\nconnection: close\r\n\r\n")
                .await?;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await?;
            Ok::<_, io::Error>(got)
        };
        let ((), got) = tokio::try_join!(serve, client)?;
        Ok::<_, io::Error>(got)
    };
    let got = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| format!("loopback exchange failed: {e}"))?;
    drop(graceful);
    let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err("the answer has no complete head".into());
    };
    let (head, body) = (&got[..at], &got[at + 4..]);
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "the answer is not a 200: {}",
            String::from_utf8_lossy(&head[..head.len().min(40)])
        ));
    }
    if body != pattern.as_slice() {
        let zeros = body.iter().filter(|b| **b == 0).count();
        return Err(format!(
            "the body differs from the file ({} bytes received, {zeros} of them zero: placeholder bytes went out as data)",
            body.len()
        ));
    }
    Ok(())
}

/// An anonymous in-memory file holding `bytes`.
fn memfd(bytes: &[u8]) -> io::Result<std::fs::File> {
    use std::io::Write;
    let fd = rustix::fs::memfd_create(
        "regmirror-sendfile-self-test",
        rustix::fs::MemfdFlags::CLOEXEC,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_limit_follows_the_descriptors() {
        for (configured, fds, expected) in [
            (Some(10), 256, 10),
            (Some(100_000), 256, 100_000),
            (None, 256, 80),
            (None, 1024, 416),
            (None, 64, 8),
            (None, 0, 8),
            (None, 1 << 20, DEFAULT_MAX_CONNECTIONS),
            (None, u64::MAX, DEFAULT_MAX_CONNECTIONS),
        ] {
            assert_eq!(
                max_connections(configured, fds),
                expected,
                "{configured:?} {fds}"
            );
        }
    }

    #[tokio::test]
    async fn the_sendfile_self_test_passes_on_this_stack_and_fails_without_vectored_writes() {
        let config = ServerConfig::default();
        sendfile_self_test(&config).await.unwrap();
        let broken = ServerConfig {
            break_vectored_writes: true,
            ..ServerConfig::default()
        };
        let err = sendfile_self_test(&broken).await.unwrap_err();
        assert!(err.contains("placeholder"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_closes_idle_and_stalled_connections_only() {
        let idle = Duration::from_secs(60);
        let send = Duration::from_secs(30);
        // Idle: nothing under way.
        let activity = Activity::new();
        let reason = watchdog(&activity, idle, send).await;
        assert!(reason.contains("idle"), "{reason}");

        // A request under way that is not blocked keeps the connection however long it takes.
        let activity = Arc::new(Activity::new());
        let guard = InFlight::new(activity.clone(), None);
        let watch = watchdog(&activity, idle, send);
        tokio::pin!(watch);
        tokio::select! {
            reason = &mut watch => panic!("closed while a request was under way: {reason}"),
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        // A write that waits for the client for longer than `send` closes it.
        activity.blocked();
        let reason = watch.await;
        assert!(reason.contains("stopped reading"), "{reason}");
        drop(guard);
    }
}
