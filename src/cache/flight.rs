//! Blob downloads in flight, shared by every client that asks for the same digest meanwhile.
//!
//! One task writes the upstream's bytes into a file in `tmp/` and publishes how far it got on a
//! `watch` channel; each client reads that same file with positioned reads as the bytes arrive,
//! so nobody waits for the whole blob before its first byte and nobody polls.
//!
//! Nothing unverified goes out complete: until the digest is verified, every response holds
//! back its own last byte (the blob's for a full GET, the range's for a range), so a client can
//! never receive a complete body that turns out wrong; its transfer ends short instead.
//!
//! Flights are registered in the cache's one single-flight registry ([`Inflight`]); the
//! download task holds its flight through a [`Download`] guard that ends it failed if the task
//! ends without a result (a panic included), so readers are never left waiting and the digest
//! can be fetched again.
//!
//! When the store refuses the rest of a download (disk full, quota, read-only, over the size
//! limit), the flight turns into pass-through: each reader goes on from the upstream with a
//! `Range` request, hashing the prefix the file holds first, so its end is still verified.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::single::{Inflight, Join, Leader};
use crate::oci::{Digest, RepoName};
use crate::upstream::Upstream;

/// A boxed body stream.
pub type BodyStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// How a download is going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for the upstream's response headers.
    Starting,
    /// `written` bytes are in the file; `total` is the upstream's Content-Length if it sent one.
    Running { written: u64, total: Option<u64> },
    /// Verified: the file holds the whole blob (committed, or only kept open when the store
    /// refused the commit).
    Done { total: u64 },
    /// Failed; nothing was committed.
    Failed(super::Error),
    /// The store will not take (the rest of) this blob: the file holds its first `valid` bytes
    /// as the upstream sent them, unverified. Readers go on from the upstream themselves.
    PassThrough { valid: u64 },
}

/// Where a blob comes from: what a reader needs to go on without the download.
pub struct Source {
    pub upstream: Arc<Upstream>,
    pub repo: RepoName,
    pub digest: Digest,
    /// Whether a miss may go to the digest's owner in the cluster: not for a request that
    /// came from a peer, which asks this replica because it is the owner.
    pub forward: bool,
}

/// A download under way.
pub struct Flight {
    /// The upstream and repository the download was started for: another repository joining
    /// it must first show that its upstream has the blob too.
    source: Arc<Source>,
    tmp_path: PathBuf,
    file: Arc<File>,
    progress: watch::Sender<Progress>,
}

impl Flight {
    /// Publishes new progress to every reader.
    pub fn publish(&self, progress: Progress) {
        self.progress.send_replace(progress);
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Whether the download was started for this upstream and repository.
    pub fn owned_by(&self, upstream: &str, repo: &str) -> bool {
        self.source.upstream.name == upstream && self.source.repo.as_str() == repo
    }

    /// Where the blob comes from.
    pub fn source(&self) -> &Arc<Source> {
        &self.source
    }

    /// Where the download is being written.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// A reader for one client.
    pub fn reader(&self) -> FlightReader {
        FlightReader {
            file: self.file.clone(),
            progress: self.progress.subscribe(),
            source: self.source.clone(),
            total: None,
        }
    }
}

/// The downloads under way, by digest and by whether they may be forwarded to the digest's
/// owner. A peer's request (which must never be forwarded again) never joins a flight that
/// forwards: two replicas whose views of the cluster briefly disagree would otherwise each
/// wait on the other's flight, a cycle broken only by the peer read timeout. A client's
/// request joins a flight that does not forward when there is one, so both kinds run at once
/// only while views disagree (then both verify and commit the same bytes).
#[derive(Default)]
pub struct Flights {
    inflight: Inflight<(Digest, bool), Arc<Flight>>,
    /// Downloads that committed, so a request that looked in the store just before one did
    /// does not start it again: known in memory, under no lock but its own, so nothing blocking
    /// runs under the registry's.
    commits: Arc<Commits>,
}

/// How many downloads committed, and at which count each recent digest did. The count is
/// read on every blob request, so it is an atomic; it moves only under the lock.
#[derive(Default)]
struct Commits {
    count: AtomicU64,
    recent: Mutex<HashMap<Digest, u64>>,
}

/// Commits remembered; a request that took longer than this many commits between its look in
/// the store and its join may fetch a blob again (verified and committed like any other).
const RECENT_COMMITS: u64 = 4096;

/// What [`Flights::join`] decided.
pub enum Joined {
    /// Someone is already downloading it.
    Existing(Arc<Flight>),
    /// The caller must run the download and end it through the [`Download`].
    Started(Download, FlightReader),
}

impl Flights {
    /// How many downloads have committed: read before looking in the store, and handed to
    /// [`Flights::join`].
    pub fn commits(&self) -> u64 {
        self.commits.count.load(Ordering::Acquire)
    }

    /// The download a request for `source` would join, if one is under way.
    pub fn running(&self, source: &Source) -> Option<Arc<Flight>> {
        if source.forward {
            if let Some(flight) = self.inflight.get(&(source.digest.clone(), false)) {
                return Some(flight);
            }
        }
        self.inflight.get(&(source.digest.clone(), source.forward))
    }

    fn committed_since(&self, digest: &Digest, seen: u64) -> bool {
        self.commits
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .is_some_and(|at| *at > seen)
    }

    /// Joins the download of `source.digest`, or registers a new one on `file`, unless a
    /// download of it committed after the caller's look in the store (`seen`, from
    /// [`Flights::commits`] before it looked): then `None`, and the store has it.
    pub fn join(
        &self,
        source: Source,
        file: impl FnOnce() -> io::Result<(PathBuf, File)>,
        seen: u64,
    ) -> io::Result<Option<Joined>> {
        if source.forward {
            if let Some(flight) = self.inflight.get(&(source.digest.clone(), false)) {
                return Ok(Some(Joined::Existing(flight)));
            }
        }
        let key = (source.digest.clone(), source.forward);
        let joined = self.inflight.join(&key, || {
            if self.committed_since(&source.digest, seen) {
                return Ok::<_, io::Error>(None);
            }
            let (progress, _) = watch::channel(Progress::Starting);
            let (tmp_path, file) = file()?;
            Ok(Some(Arc::new(Flight {
                source: Arc::new(source),
                tmp_path,
                file: Arc::new(file),
                progress,
            })))
        })?;
        Ok(joined.map(|joined| match joined {
            Join::Existing(flight) => Joined::Existing(flight),
            Join::Started(flight, leader) => {
                let reader = flight.reader();
                let download = Download {
                    flight,
                    leader: Some(leader),
                    commits: self.commits.clone(),
                };
                Joined::Started(download, reader)
            }
        }))
    }

    /// Downloads under way.
    pub fn len(&self) -> usize {
        self.inflight.len()
    }
}

/// The download task's hold on its flight. [`Download::finish`] ends it with a result; dropped
/// without one (the task panicked or was cancelled) it ends the flight failed. Either way the
/// digest is forgotten first and the readers told after, so a request arriving in between finds
/// the blob in the store (or starts a fresh download), never a finished flight.
pub struct Download {
    flight: Arc<Flight>,
    leader: Option<Leader<(Digest, bool), Arc<Flight>>>,
    commits: Arc<Commits>,
}

impl Download {
    /// Ends the download; call after the commit is recorded.
    pub fn finish(mut self, progress: Progress) {
        self.end(progress);
    }

    /// Ends a download whose blob is now in the store: noted before its key is released, so
    /// a request that looked in the store before the commit does not start it again.
    pub fn finish_committed(mut self, progress: Progress) {
        {
            let mut recent = self
                .commits
                .recent
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Noted before the count moves: a request that read the new count finds it.
            let count = self.commits.count.load(Ordering::Relaxed).saturating_add(1);
            if recent.len() as u64 >= RECENT_COMMITS {
                recent.retain(|_, at| at.saturating_add(RECENT_COMMITS / 2) > count);
            }
            recent.insert(self.flight.source.digest.clone(), count);
            self.commits.count.store(count, Ordering::Release);
        }
        self.end(progress);
    }

    fn end(&mut self, progress: Progress) {
        if let Some(leader) = self.leader.take() {
            drop(leader);
            self.flight.publish(progress);
        }
    }
}

impl std::ops::Deref for Download {
    type Target = Flight;

    fn deref(&self) -> &Flight {
        &self.flight
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        let failed = super::Error::Internal("blob download ended without a result".into());
        self.end(Progress::Failed(failed));
    }
}

/// One client's view of a download.
pub struct FlightReader {
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
    source: Arc<Source>,
    /// The blob's size once [`FlightReader::size`] learnt it.
    total: Option<u64>,
}

/// Where a reader's stream is.
enum Stage {
    /// Reading the download's file from this offset.
    Flight(FlightReader, u64),
    /// Gone on from the upstream after the store refused the download.
    Direct(BodyStream),
    End,
}

impl FlightReader {
    /// Waits for the blob's size, or why it cannot be had; `None` when the blob passes through
    /// uncached. The size is known from the upstream's headers; an upstream that sends no length
    /// makes us wait for the whole download.
    pub async fn size(&mut self) -> Result<Option<u64>, super::Error> {
        let progress = self
            .progress
            .wait_for(|p| {
                matches!(
                    p,
                    Progress::Running { total: Some(_), .. }
                        | Progress::Done { .. }
                        | Progress::Failed(_)
                        | Progress::PassThrough { .. }
                )
            })
            .await
            .map_err(|_| super::Error::Internal("download task ended without a result".into()))?;
        let size = match &*progress {
            Progress::Running {
                total: Some(total), ..
            }
            | Progress::Done { total } => Some(*total),
            Progress::Failed(err) => return Err(err.clone()),
            Progress::PassThrough { .. } => None,
            Progress::Starting | Progress::Running { total: None, .. } => {
                unreachable!("excluded by wait_for")
            }
        };
        self.total = size;
        Ok(size)
    }

    /// Streams bytes `start..end` as the download provides them; ends with an error if the
    /// download fails, so the client sees a broken transfer rather than a wrong body. Byte
    /// `end - 1` waits for verification, so a range is never complete before the blob is.
    pub fn stream(
        self,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures_util::stream::unfold(Stage::Flight(self, start), move |stage| async move {
            match stage {
                Stage::End => None,
                Stage::Direct(mut body) => {
                    let item = body.next().await?;
                    Some((item, Stage::Direct(body)))
                }
                Stage::Flight(reader, pos) => reader.next_chunk(pos, end).await,
            }
        })
    }

    async fn next_chunk(mut self, pos: u64, end: u64) -> Option<(io::Result<Bytes>, Stage)> {
        if pos >= end {
            return None;
        }
        let available = loop {
            let progress = self.progress.borrow_and_update().clone();
            let available = match progress {
                // The last byte of the blob and of this response wait for verification.
                Progress::Running {
                    written,
                    total: Some(total),
                } => written.min(total.saturating_sub(1)).min(end - 1),
                Progress::Running { total: None, .. } | Progress::Starting => 0,
                Progress::Done { total } => total,
                Progress::PassThrough { valid } => {
                    let mut body = self.resume(valid, pos, end);
                    let item = body.next().await?;
                    return Some((item, Stage::Direct(body)));
                }
                Progress::Failed(err) => {
                    return Some((Err(io::Error::other(err.to_string())), Stage::End));
                }
            };
            if available > pos {
                break available;
            }
            if self.progress.changed().await.is_err() {
                let err = io::Error::other("download task ended without a result");
                return Some((Err(err), Stage::End));
            }
        };
        let len = (available.min(end) - pos).min(READ_CHUNK as u64) as usize;
        // The bytes just written are in the page cache: read on this thread, into a pooled
        // buffer, like those of a committed file.
        match read_chunk(self.file.clone(), pos, len).await {
            Ok(chunk) => {
                let next = pos + chunk.len() as u64;
                Some((Ok(chunk), Stage::Flight(self, next)))
            }
            Err(err) => Some((Err(err), Stage::End)),
        }
    }

    /// Bytes `start..end` from the upstream, after the store refused the download at `valid`:
    /// the file's first `valid` bytes, then the upstream's from there on, all hashed, the
    /// range's last bytes held back until the whole blob matches its digest.
    fn resume(&self, valid: u64, start: u64, end: u64) -> BodyStream {
        let Some(size) = self.total else {
            let err = io::Error::other("download passed through before its size was known");
            return Box::pin(futures_util::stream::iter([Err(err)]));
        };
        let source = self.source.clone();
        let prefix = file_stream(self.file.clone(), 0, valid.min(size));
        let rest = async move {
            if valid >= size {
                return Ok::<_, io::Error>(futures_util::stream::empty().boxed());
            }
            let response = source
                .upstream
                .get_blob(&source.repo, &source.digest, valid)
                .await
                .map_err(io::Error::other)?;
            Ok(response.bytes_stream().map_err(io::Error::other).boxed())
        };
        let body = prefix.chain(futures_util::stream::once(rest).try_flatten());
        let digest = self.source.digest.clone();
        Box::pin(super::passthrough::verified(
            Box::pin(body),
            digest,
            start,
            end,
            size,
        ))
    }
}

/// Streams `start..end` of a committed file, read in chunks of [`READ_CHUNK`] into buffers
/// taken from a pool and returned to it once the response has written them.
///
/// No memory mapping: a mapped file that shrinks (a disk error, an operator, a bad restore)
/// raises SIGBUS in whichever thread touches the lost page (rustls encrypting it, h2 copying
/// it) and kills the process. A read reports the same thing as an error for this transfer
/// only. Pooled buffers keep the copy cheap: no allocation, no zeroing, no page faults per
/// chunk once warm; and a chunk already in the page cache is read right on the async thread
/// (`RWF_NOWAIT` fails instead of waiting for the disk), so only cold chunks pay the hop to the
/// blocking pool.
pub fn file_stream(
    file: Arc<File>,
    start: u64,
    end: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold((file, start), move |(file, pos)| async move {
        if pos >= end {
            return None;
        }
        let len = (end - pos).min(READ_CHUNK as u64) as usize;
        match read_chunk(file.clone(), pos, len).await {
            Ok(chunk) => {
                let next = pos + chunk.len() as u64;
                Some((Ok(chunk), (file, next)))
            }
            Err(err) => Some((Err(err), (file, end))),
        }
    })
}

/// Bytes per read of a committed file or of one being filled: what one response holds in
/// memory at a time besides its connection's buffers. With hyper's 96 KiB HTTP/1 write queue
/// and rustls's 64 KiB of records, a stalled reader costs under 256 KiB on every path (the
/// README's bound, measured by `hostile_client::stalled_readers_hold_at_most_256_kib_each`);
/// large enough that a read is still far cheaper than what the socket does with it.
pub const READ_CHUNK: usize = 64 * 1024;

/// Idle buffers kept for reuse; more are freed when they come back.
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

/// A pooled buffer holding `len` bytes read from a file; back to the pool when dropped.
struct Pooled {
    buf: Box<[u8]>,
    len: usize,
}

impl Pooled {
    fn take() -> Pooled {
        let buf = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| vec![0; READ_CHUNK].into_boxed_slice());
        Pooled { buf, len: 0 }
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut pool = POOL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < POOL_MAX {
            pool.push(buf);
        }
    }
}

/// Reads up to `len` (at most [`READ_CHUNK`]) bytes at `pos` of a file, committed or filled up
/// to at least `pos + len`: on this thread if they are in the page cache, else on the blocking
/// pool, so a socket write never waits for the disk. A file shorter than `pos + len` is an error, never a silent truncation.
async fn read_chunk(file: Arc<File>, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut chunk = Pooled::take();
    let wanted = pos
        .checked_add(len as u64)
        .ok_or(io::ErrorKind::InvalidInput)?;
    if file.metadata()?.len() < wanted {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let fast = rustix::io::preadv2(
        &*file,
        &mut [io::IoSliceMut::new(&mut chunk.buf[..len])],
        pos,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    match fast {
        Ok(n) if n > 0 => {
            chunk.len = n;
            return Ok(Bytes::from_owner(chunk));
        }
        // EAGAIN: not in the page cache. 0 is not the end of the file (its length was checked
        // above) but a page that cannot be had without waiting (some kernels answer so for
        // pages under writeback). Anything else (a file system or kernel without RWF_NOWAIT)
        // gets its real answer from a plain read below.
        Ok(_) | Err(_) => {}
    }
    tokio::task::spawn_blocking(move || {
        let n = file.read_at(&mut chunk.buf[..len], pos)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        chunk.len = n;
        Ok(Bytes::from_owner(chunk))
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    fn committed(len: usize) -> (tempfile::TempDir, Vec<u8>, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path = dir.path().join("blob");
        std::fs::write(&path, &bytes).unwrap();
        (dir, bytes, Arc::new(File::open(&path).unwrap()))
    }

    #[tokio::test]
    async fn file_stream_serves_any_range_in_chunks() {
        let len = 2 * READ_CHUNK + 12_345;
        let (_dir, bytes, file) = committed(len);
        let ranges = [
            (0, len),
            (1, len),
            (4095, 4097),
            (READ_CHUNK - 1, 2 * READ_CHUNK + 1),
            (len - 1, len),
        ];
        for (start, end) in ranges {
            let chunks: Vec<Bytes> = file_stream(file.clone(), start as u64, end as u64)
                .try_collect()
                .await
                .unwrap();
            assert!(
                chunks.iter().all(|c| c.len() <= READ_CHUNK),
                "{start}..{end}"
            );
            assert_eq!(chunks.concat(), bytes[start..end], "{start}..{end}");
        }
        let empty: Vec<Bytes> = file_stream(file, 5, 5).try_collect().await.unwrap();
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn file_stream_past_the_end_is_an_error_not_a_short_body() {
        let (_dir, _, file) = committed(10_000);
        let mut stream = Box::pin(file_stream(file, 0, 20_000));
        let err = futures_util::StreamExt::next(&mut stream)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(futures_util::StreamExt::next(&mut stream).await.is_none());
    }

    /// A chunk already handed out stays readable when the file shrinks behind it (a mapped
    /// chunk raised SIGBUS here), and the next one is an error, not a crash.
    #[tokio::test]
    async fn file_stream_survives_a_file_truncated_midway() {
        let len = 4 * READ_CHUNK;
        let (dir, bytes, file) = committed(len);
        let mut stream = Box::pin(file_stream(file, 0, len as u64));
        let first = futures_util::StreamExt::next(&mut stream)
            .await
            .unwrap()
            .unwrap();
        let second = futures_util::StreamExt::next(&mut stream)
            .await
            .unwrap()
            .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("blob"))
            .unwrap()
            .set_len(0)
            .unwrap();
        assert_eq!(first, bytes[..first.len()]);
        assert_eq!(second, bytes[first.len()..first.len() + second.len()]);
        let err = futures_util::StreamExt::next(&mut stream)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
