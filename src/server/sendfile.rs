//! Cache hits sent with sendfile(2) on plain HTTP/1 connections: the page cache goes to the
//! socket without passing through our memory, as nginx does.
//!
//! hyper only writes bytes it was handed, so a file cannot simply be given to it. Instead a
//! committed blob's response body, on a connection that can take it, is made of placeholder
//! frames: views into a static region whose bytes are never read, each one
//! registered in the connection's queue with the file range it stands for. The connection's
//! writer, [`PlainConn`], recognises a write that points into that region by its address and
//! sends the registered range from the file instead.
//!
//! This is sound because hyper's HTTP/1 writer, on an IO that reports vectored writes, queues
//! body buffers as they are and writes them in order without copying them (its "flatten"
//! strategy, which would copy, is only chosen for IOs without vectored writes). The writer
//! checks each placeholder write against the front of the queue (same frame, same position)
//! and fails the connection on any mismatch, so a placeholder byte is never sent as itself.
//! HTTP/2 copies frames into its own buffers, and TLS encrypts what it is given: neither
//! gets a [`Sendfile`] handle.
//!
//! sendfile runs on an async worker, so it must not wait for the disk: a frame whose bytes are
//! not all in the page cache is read in on the blocking pool before hyper gets it, and a hot
//! cache pays only for the check.

use std::any::Any;
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The most one placeholder frame stands for. Frames cost a queue entry, not memory, so they
/// can be large: fewer of them means less bookkeeping per byte.
pub const FRAME: usize = 4 << 20;

/// Never read or written, only pointed into ([`placeholder`]).
static PLACEHOLDER: Region = Region(UnsafeCell::new([0; FRAME]));

/// The cell keeps the region out of read-only data: a plain zeroed array would be 4 MiB of
/// zeros in the binary, where a writable static is .bss, which takes neither file space nor
/// memory until touched (and it never is).
struct Region(UnsafeCell<[u8; FRAME]>);

// SAFETY: nothing ever writes through the cell; it is only shared as `&[u8]`.
unsafe impl Sync for Region {}

/// The first `len` bytes of the placeholder region.
fn placeholder(len: usize) -> &'static [u8] {
    // SAFETY: the region is never written, so shared references to it are sound.
    let region: &'static [u8; FRAME] = unsafe { &*PLACEHOLDER.0.get() };
    &region[..len]
}

/// One placeholder frame: which file bytes it stands for, and how many were sent.
struct Segment {
    file: Arc<File>,
    offset: u64,
    len: usize,
    sent: usize,
    /// Keeps the blob pinned against eviction until its last byte is sent.
    _pin: Arc<dyn Any + Send + Sync>,
}

type Queue = Arc<Mutex<VecDeque<Segment>>>;

/// A plain TCP connection whose writes of placeholder frames become sendfile calls.
pub struct PlainConn {
    tcp: TcpStream,
    queue: Queue,
    /// What [`AsyncWrite::is_write_vectored`] answers: always true, except when a test plays
    /// a broken IO wrapper for the start-up self-test to catch.
    vectored: bool,
    /// Counts the bytes sendfile(2) says it sent.
    sent: Option<prometheus::IntCounter>,
}

impl PlainConn {
    pub fn new(tcp: TcpStream) -> PlainConn {
        PlainConn::with_options(tcp, true, None)
    }

    /// `vectored: false` is for tests only (see the field).
    pub fn with_options(
        tcp: TcpStream,
        vectored: bool,
        sent: Option<prometheus::IntCounter>,
    ) -> PlainConn {
        PlainConn {
            tcp,
            queue: Queue::default(),
            vectored,
            sent,
        }
    }

    /// The handle responses on this connection use to send files.
    pub fn sendfile(&self) -> Sendfile {
        Sendfile {
            queue: self.queue.clone(),
        }
    }

    /// Sends the file bytes behind a placeholder write of `len` bytes starting `at` bytes into
    /// its frame.
    fn poll_send_file(
        &self,
        cx: &mut Context<'_>,
        at: usize,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let mut queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(segment) = queue.front_mut() else {
            return Poll::Ready(Err(mismatch("no frame registered")));
        };
        if at != segment.sent || len > segment.len - segment.sent {
            return Poll::Ready(Err(mismatch("write does not continue the current frame")));
        }
        let (file, start) = (&segment.file, segment.offset + segment.sent as u64);
        let sent = ready!(poll_write_io(&self.tcp, cx, || {
            let mut offset = start;
            Ok(rustix::fs::sendfile(
                &self.tcp,
                file.as_fd(),
                Some(&mut offset),
                len,
            )?)
        }))?;
        if sent == 0 {
            // The file is shorter than its index entry said: end the transfer short rather
            // than let anything else stand in for the missing bytes.
            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
        }
        if let Some(counter) = &self.sent {
            counter.inc_by(sent as u64);
        }
        segment.sent += sent;
        if segment.sent == segment.len {
            queue.pop_front();
        }
        Poll::Ready(Ok(sent))
    }
}

fn mismatch(what: &str) -> io::Error {
    io::Error::other(format!("sendfile: {what}; dropping the connection"))
}

/// Where `buf` starts in the placeholder region, if it points into it.
fn placeholder_offset(buf: &[u8]) -> Option<usize> {
    let base = placeholder(0).as_ptr() as usize;
    let at = (buf.as_ptr() as usize).wrapping_sub(base);
    (!buf.is_empty() && at < FRAME).then_some(at)
}

/// Runs a non-blocking write `f` when the socket is writable, waiting again if it would block.
fn poll_write_io(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    mut f: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(tcp.poll_write_ready(cx))?;
        match tcp.try_io(Interest::WRITABLE, &mut f) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

impl AsyncRead for PlainConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match bufs
            .iter()
            .position(|buf| placeholder_offset(buf).is_some())
        {
            None => Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs),
            Some(0) => match placeholder_offset(&bufs[0]) {
                Some(at) => this.poll_send_file(cx, at, bufs[0].len()),
                None => unreachable!("position found a placeholder at 0"),
            },
            // Response headers before a file: MSG_MORE lets them leave in the same packet as
            // the file's first bytes rather than alone (the socket has TCP_NODELAY).
            Some(k) => poll_write_io(&this.tcp, cx, || {
                let flags = rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL;
                let mut control = rustix::net::SendAncillaryBuffer::default();
                Ok(rustix::net::sendmsg(
                    &this.tcp,
                    &bufs[..k],
                    &mut control,
                    flags,
                )?)
            }),
        }
    }

    /// Always: hyper copies body buffers into its own when an IO lacks vectored writes, and a
    /// copied placeholder could no longer be recognised.
    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Lets a response on a [`PlainConn`] send file bytes with sendfile. Only for HTTP/1
/// responses on that same connection.
#[derive(Clone)]
pub struct Sendfile {
    queue: Queue,
}

impl Sendfile {
    /// The bytes `start..end` of `file` as placeholder frames, registered with the connection
    /// as hyper takes them; `pin` is held until the last of them is sent. `file` must not
    /// change while it is sent (a committed blob never does).
    pub fn stream(
        &self,
        file: Arc<File>,
        start: u64,
        end: u64,
        pin: impl Any + Send + Sync,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let queue = self.queue.clone();
        let pin: Arc<dyn Any + Send + Sync> = Arc::new(pin);
        futures_util::stream::unfold(start, move |pos| {
            let (queue, file, pin) = (queue.clone(), file.clone(), pin.clone());
            async move {
                if pos >= end {
                    return None;
                }
                let len = (end - pos).min(FRAME as u64) as usize;
                if let Err(err) = ensure_resident(&file, pos, len).await {
                    return Some((Err(err), end));
                }
                queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push_back(Segment {
                        file,
                        offset: pos,
                        len,
                        sent: 0,
                        _pin: pin,
                    });
                let frame = Bytes::from_static(placeholder(len));
                Some((Ok(frame), pos + len as u64))
            }
        })
    }
}

/// Returns once `len` bytes at `offset` of `file` are in the page cache, reading them in on
/// the blocking pool if they are not; a file shorter than that is an error.
async fn ensure_resident(file: &Arc<File>, offset: u64, len: usize) -> io::Result<()> {
    let map = map(file, offset, len)?;
    if resident(&map)? {
        return Ok(());
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        if file.metadata()?.len() < offset + len as u64 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // MADV_POPULATE_READ reports a page it cannot read (the file shrank since the check
        // above, or the disk failed) as an error where touching the page would raise SIGBUS:
        // nothing here reads mapped memory.
        match map.advise(memmap2::Advice::PopulateRead) {
            Ok(()) => Ok(()),
            // Kernels before 5.14 lack MADV_POPULATE_READ: read the range into a scratch
            // buffer instead, which fills the page cache just the same.
            Err(err) if err.kind() == io::ErrorKind::InvalidInput => {
                drop(map);
                read_through(&file, offset, len)
            }
            Err(err) => Err(err),
        }
    })
    .await
    .map_err(io::Error::other)?
}

/// Reads `len` bytes at `offset` and throws them away: they are in the page cache afterwards.
fn read_through(file: &File, offset: u64, len: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut scratch = vec![0u8; len.min(256 * 1024)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(scratch.len());
        file.read_exact_at(&mut scratch[..n], offset + done as u64)?;
        done += n;
    }
    Ok(())
}

/// An unpopulated, page-aligned mapping of the pages holding `len` bytes at `offset`: creating
/// it reads nothing, it is only asked about (mincore) or faulted in.
fn map(file: &File, offset: u64, len: usize) -> io::Result<memmap2::Mmap> {
    let page = rustix::param::page_size() as u64;
    let start = offset - offset % page;
    // SAFETY: the mapping's memory is never read or written by this process, only asked
    // about (mincore) and populated (madvise), which report pages past the end of the file or
    // unreadable as errors; so a file that shrinks or fails meanwhile cannot raise SIGBUS.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(start)
            .len(len + (offset - start) as usize)
            .map(file)
    }
}

/// Whether every page of `map` is in the page cache.
fn resident(map: &memmap2::Mmap) -> io::Result<bool> {
    const PAGES: usize = 256;
    let page = rustix::param::page_size();
    let mut flags = [0u8; PAGES];
    for start in (0..map.len()).step_by(PAGES * page) {
        let len = (map.len() - start).min(PAGES * page);
        // SAFETY: `start` is a multiple of the page size into a live, page-aligned mapping,
        // `len` stays within it, and `flags` has a byte for each of its at most PAGES pages.
        let rc =
            unsafe { libc::mincore(map.as_ptr().add(start) as *mut _, len, flags.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if !flags[..len.div_ceil(page)].iter().all(|flag| flag & 1 == 1) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (PlainConn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (PlainConn::new(accepted.unwrap().0), client.unwrap())
    }

    fn file(len: usize) -> (tempfile::TempDir, Vec<u8>, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + i / 7919) as u8).collect();
        std::fs::write(dir.path().join("f"), &bytes).unwrap();
        let file = Arc::new(File::open(dir.path().join("f")).unwrap());
        (dir, bytes, file)
    }

    /// What hyper does: headers and frames queued, written with vectored writes that may be
    /// partial, in order. The peer must read exactly the headers and the file's bytes.
    #[tokio::test]
    async fn placeholder_frames_arrive_as_the_file_bytes() {
        let (mut conn, mut client) = pair().await;
        let len = FRAME + 123_457;
        let (_dir, bytes, file) = file(len);
        let frames: Vec<Bytes> = conn
            .sendfile()
            .stream(file, 10, len as u64, ())
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(frames.len(), 2);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut pending: Vec<&[u8]> = vec![b"HTTP/1.1 200 OK\r\n\r\n"];
        pending.extend(frames.iter().map(|f| &f[..]));
        while !pending.is_empty() {
            let slices: Vec<IoSlice> = pending.iter().map(|b| IoSlice::new(b)).collect();
            let mut n = conn.write_vectored(&slices).await.unwrap();
            while n > 0 {
                let take = n.min(pending[0].len());
                pending[0] = &pending[0][take..];
                n -= take;
                if pending[0].is_empty() {
                    pending.remove(0);
                }
            }
        }
        conn.shutdown().await.unwrap();
        drop(conn);
        let got = reader.await.unwrap();
        let (head, body) = got.split_at(19);
        assert_eq!(head, b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(body == &bytes[10..], "body differs from the file");
    }

    /// sendfile must not wait for the disk on an async worker: a frame not in the page cache
    /// is read in before it is handed over.
    #[tokio::test]
    async fn frames_not_in_the_page_cache_are_read_in_first() {
        // On disk, not tmpfs: tmpfs pages cannot be dropped from memory.
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let dir = tempfile::tempdir_in(target).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; FRAME + 5 * 4096]).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        file.sync_all().unwrap();
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let whole = FRAME + 5 * 4096;
        assert!(
            !resident(&map(&file, 0, whole).unwrap()).unwrap(),
            "could not drop the file from the page cache: the test cannot check anything"
        );
        let (conn, _client) = pair().await;
        let mut frames = Box::pin(conn.sendfile().stream(file.clone(), 100, whole as u64, ()));
        frames.next().await.unwrap().unwrap();
        assert!(resident(&map(&file, 100, FRAME).unwrap()).unwrap());
        frames.next().await.unwrap().unwrap();
        assert!(resident(&map(&file, 0, whole).unwrap()).unwrap());
    }

    #[tokio::test]
    async fn an_unregistered_placeholder_write_fails_instead_of_sending_zeros() {
        let (mut conn, mut client) = pair().await;
        let err = conn.write(placeholder(100)).await.unwrap_err();
        assert!(err.to_string().contains("no frame registered"), "{err}");

        // A frame written out of place (not from its start) is refused too.
        let (_dir, _, file) = file(1000);
        let frames: Vec<_> = conn.sendfile().stream(file, 0, 1000, ()).collect().await;
        assert_eq!(frames.len(), 1);
        let err = conn.write(&placeholder(100)[5..]).await.unwrap_err();
        assert!(err.to_string().contains("does not continue"), "{err}");

        drop(conn);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap_or_default();
        assert!(got.is_empty(), "nothing was sent: {} bytes", got.len());
    }

    #[tokio::test]
    async fn a_file_shorter_than_promised_ends_the_transfer() {
        let (mut conn, _client) = pair().await;
        let (_dir, _, file) = file(1000);
        let frames: Vec<Bytes> = conn
            .sendfile()
            .stream(file, 0, 2000, ())
            .map(Result::unwrap)
            .collect()
            .await;
        let n = conn.write(&frames[0]).await.unwrap();
        assert_eq!(n, 1000);
        let err = conn.write(&frames[0][1000..]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn the_pin_is_held_until_the_last_byte_is_sent() {
        let (mut conn, mut client) = pair().await;
        let (_dir, _, file) = file(5000);
        let pin = Arc::new(());
        let frames: Vec<Bytes> = conn
            .sendfile()
            .stream(file, 0, 5000, pin.clone())
            .map(Result::unwrap)
            .collect()
            .await;
        assert!(
            Arc::strong_count(&pin) > 1,
            "the stream ended but nothing was sent yet"
        );
        conn.write_all(&frames[0]).await.unwrap();
        assert_eq!(Arc::strong_count(&pin), 1);
        let mut got = vec![0; 5000];
        client.read_exact(&mut got).await.unwrap();
    }
}
