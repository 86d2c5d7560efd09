//! Serving a blob straight from the upstream without caching it: blobs that cannot fit in the
//! store, a full or read-only disk, and readers of a download the store refused part-way.
//!
//! Even uncached bytes are verified: the last chunk of the requested range is held back until
//! the whole blob hashed to its digest and had exactly its size, so a client never receives a
//! complete body that is wrong.

use std::io;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};

use super::flight::BodyStream;
use crate::oci::{Digest, DigestHasher};

struct State {
    body: BodyStream,
    hasher: DigestHasher,
    /// Offset of the next byte from the body.
    pos: u64,
    /// The last chunk of the requested range, waiting for verification.
    held: Option<Bytes>,
    finished: bool,
}

/// Streams bytes `start..end` of the upstream's response, verifying the whole blob of `size`
/// bytes.
pub fn verified_range(
    response: reqwest::Response,
    digest: Digest,
    start: u64,
    end: u64,
    size: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let body = Box::pin(
        response
            .bytes_stream()
            .map_err(|e| io::Error::other(e.without_url())),
    );
    verified(body, digest, start, end, size)
}

/// Streams bytes `start..end` of `body`, the whole blob from its first byte, verifying that it
/// has `size` bytes that hash to `digest` before the range's last chunk goes out.
pub fn verified(
    body: BodyStream,
    digest: Digest,
    start: u64,
    end: u64,
    size: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = State {
        body,
        hasher: DigestHasher::new(),
        pos: 0,
        held: None,
        finished: false,
    };
    futures_util::stream::unfold(state, move |mut state| {
        let digest = digest.clone();
        async move {
            while !state.finished {
                match state.body.next().await {
                    Some(Ok(chunk)) => {
                        let (chunk_start, chunk_end) = (state.pos, state.pos + chunk.len() as u64);
                        if chunk_end > size {
                            // An endless or lying body: stop reading it at once.
                            state.finished = true;
                            let err = io::Error::other("upstream blob longer than its size");
                            return Some((Err(err), state));
                        }
                        state.hasher.update(&chunk);
                        state.pos = chunk_end;
                        if chunk_end <= start || chunk_start >= end {
                            continue;
                        }
                        let from = (start.max(chunk_start) - chunk_start) as usize;
                        let to = (end.min(chunk_end) - chunk_start) as usize;
                        if let Some(ready) = state.held.replace(chunk.slice(from..to)) {
                            return Some((Ok(ready), state));
                        }
                    }
                    Some(Err(err)) => {
                        state.finished = true;
                        return Some((Err(err), state));
                    }
                    None => {
                        state.finished = true;
                        let actual = std::mem::take(&mut state.hasher).finish();
                        if state.pos != size || actual != digest {
                            tracing::warn!(expected = %digest, %actual, bytes = state.pos, size, "pass-through blob does not match its digest");
                            let err =
                                io::Error::other("upstream content does not match its digest");
                            return Some((Err(err), state));
                        }
                        return state.held.take().map(|last| (Ok(last), state));
                    }
                }
            }
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(chunks: Vec<&'static [u8]>, digest: &Digest, size: u64) -> Vec<io::Result<Bytes>> {
        let body = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))));
        verified(Box::pin(body), digest.clone(), 0, size, size)
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_body_of_the_wrong_length_never_completes() {
        let digest = Digest::sha256_of(b"abcdef");
        let ok = run(vec![b"abc", b"def"], &digest, 6).await;
        let ok: Vec<Bytes> = ok.into_iter().map(Result::unwrap).collect();
        assert_eq!(ok.concat(), b"abcdef");
        // Longer than its size: cut off without reading on.
        let long = run(vec![b"abc", b"def", b"g"], &digest, 6).await;
        assert!(long.last().unwrap().is_err());
        // Shorter: the last bytes never go out.
        let short = run(vec![b"abc"], &digest, 6).await;
        assert!(short.iter().all(Result::is_err));
    }
}
