//! Serving a blob straight from the upstream without caching it, for blobs that cannot fit in
//! the store or when the disk is full.
//!
//! Even uncached bytes are verified: the last chunk is held back until the whole blob hashed to
//! its digest, so a client never receives a complete body that is wrong.

use std::io;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::oci::{Digest, DigestHasher};

struct State {
    body: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    hasher: DigestHasher,
    /// Offset of the next byte from the upstream.
    pos: u64,
    /// The last chunk of the requested range, waiting for verification.
    held: Option<Bytes>,
    finished: bool,
}

/// Streams bytes `start..end` of the upstream's response, verifying the whole blob.
pub fn verified_range(
    response: reqwest::Response,
    digest: Digest,
    start: u64,
    end: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = State {
        body: Box::pin(response.bytes_stream()),
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
                        state.hasher.update(&chunk);
                        let (chunk_start, chunk_end) = (state.pos, state.pos + chunk.len() as u64);
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
                        return Some((Err(io::Error::other(err.without_url())), state));
                    }
                    None => {
                        state.finished = true;
                        let actual = std::mem::take(&mut state.hasher).finish();
                        if actual != digest {
                            tracing::warn!(expected = %digest, %actual, "pass-through blob digest mismatch");
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
