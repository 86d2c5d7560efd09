//! The listening socket: plain TCP, or TLS with handshakes done off the accept loop and the
//! certificate reloaded when its files change. `axum::serve` drives either through one
//! [`Listener`]; this module knows nothing of routes or registries. Plain connections can send
//! files with sendfile ([`sendfile`]); each request learns through [`Connection`] whether its
//! connection can.

pub mod sendfile;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

use sendfile::{PlainConn, Sendfile};

/// A client that has not finished its TLS handshake by then is dropped, so a slow or idle
/// connection cannot hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections ready for HTTP: plain, or TLS after a completed handshake.
pub enum Listener {
    Plain(TcpListener),
    Tls {
        ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        local_addr: SocketAddr,
    },
}

impl Listener {
    /// Serves `listener` as is, or behind TLS (whose files are checked for changes every
    /// `tls.reload_interval`). Must be called within a tokio runtime.
    pub fn new(listener: TcpListener, tls: Option<Arc<tls::Reloader>>) -> io::Result<Listener> {
        let Some(reloader) = tls else {
            return Ok(Listener::Plain(listener));
        };
        let local_addr = listener.local_addr()?;
        // A small queue: handshakes are concurrent, and axum takes connections as fast as they
        // come.
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(reload_loop(
            reloader.clone(),
            reloader.interval(),
            tx.clone(),
        ));
        tokio::spawn(accept_loop(listener, reloader, tx));
        Ok(Listener::Tls { ready, local_addr })
    }
}

impl axum::serve::Listener for Listener {
    type Io = Either<PlainConn, TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self {
            Listener::Plain(listener) => {
                let (stream, addr) = axum::serve::Listener::accept(listener).await;
                // hyper writes whole responses; Nagle would only hold back the tail of one
                // until the client's delayed ACK.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY");
                }
                (Either::Left(PlainConn::new(stream)), addr)
            }
            Listener::Tls { ready, .. } => match ready.recv().await {
                Some((stream, addr)) => (Either::Right(stream), addr),
                // The accept loop only ends when this receiver is gone; never reached while
                // serving, so wait forever rather than spin.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Plain(listener) => listener.local_addr(),
            Listener::Tls { local_addr, .. } => Ok(*local_addr),
        }
    }
}

/// What a request knows of its connection (axum's `ConnectInfo`).
#[derive(Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// Set on plain connections: lets an HTTP/1 response send a file without copying it.
    pub sendfile: Option<Sendfile>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>>
    for Connection
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Connection {
        Connection {
            peer: *stream.remote_addr(),
            sendfile: match stream.io() {
                Either::Left(plain) => Some(plain.sendfile()),
                Either::Right(_) => None,
            },
        }
    }
}

type Ready = mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>;

/// Accepts TCP connections and hands each to its own handshake task, until the server drops
/// its [`Listener`].
async fn accept_loop(listener: TcpListener, reloader: Arc<tls::Reloader>, tx: Ready) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(reloader.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, peer)).await;
                }
                // rustls errors name the reason (no client certificate, unknown CA, protocol
                // mismatch) and hold nothing secret.
                Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

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
