//! The background side of [`storage::scrub`]: at start-up, verify the files found without an
//! index entry (they are not served until then); then every `storage.scrub.interval`, re-hash
//! every stored blob and remove the corrupt ones, which the next pull fetches again.
//!
//! The blocking passes hold the store only between files (through a `Weak`), so a server that
//! stops is not held up by a pass paced to a slow `max_rate`.

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use crate::config::ScrubConfig;
use crate::metrics::Metrics;
use crate::storage::scrub::{self, Event, Limiter, Report};
use crate::storage::{self, Store};

/// Starts the verification of `unverified` files, then the periodic scrub.
pub fn spawn(store: &Arc<Store>, metrics: Arc<Metrics>, config: &ScrubConfig, unverified: usize) {
    let weak = Arc::downgrade(store);
    let interval = config.interval.0;
    let rate = config.max_rate.0;
    metrics
        .store_unverified
        .set(i64::try_from(unverified).unwrap_or(i64::MAX));
    tokio::spawn(async move {
        let pass = |repair: Option<bool>| {
            let weak = weak.clone();
            let metrics = metrics.clone();
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let mut limiter = Limiter::new(rate);
                let get = || weak.upgrade();
                let mut on = |event: Event| observe(&metrics, event);
                let result = match repair {
                    None => scrub::verify_unverified(&get, &mut limiter, &mut on),
                    Some(repair) => scrub::scrub_index(&get, &mut limiter, repair, &mut on),
                };
                (result, started.elapsed())
            })
        };
        let finished =
            |what: &str, result: Result<(Result<Report, storage::Error>, _), _>| match result {
                Ok((Ok(report), elapsed)) if !report.stopped => {
                    metrics.scrub_passes.inc();
                    let elapsed: std::time::Duration = elapsed;
                    info!(
                        blobs = report.blobs,
                        bytes = report.bytes,
                        adopted = report.adopted,
                        relinked = report.relinked,
                        corrupt = report.corrupt.len(),
                        seconds = elapsed.as_secs_f64(),
                        "{what} finished"
                    );
                    true
                }
                Ok((Ok(_), _)) => false,
                Ok((Err(err), _)) => {
                    warn!(error = %err, "{what} failed");
                    true
                }
                Err(err) => {
                    warn!(error = %err, "{what} panicked");
                    true
                }
            };
        // The log line and `regmirror_scrub_passes_total` reaching 1 say the store is fully
        // verified (every file is served or gone).
        if !finished("store verification", pass(None).await) {
            return;
        }
        if interval.is_zero() {
            return;
        }
        loop {
            tokio::time::sleep(interval).await;
            if weak.strong_count() == 0 || !finished("scrub", pass(Some(true)).await) {
                return;
            }
        }
    });
}

fn observe(metrics: &Metrics, event: Event) {
    match event {
        Event::Hashed { bytes } => {
            metrics.scrub_blobs.inc();
            metrics.scrub_bytes.inc_by(bytes);
        }
        Event::Corrupt { .. } => metrics.scrub_corrupt.inc(),
        Event::Settled => metrics.store_unverified.dec(),
    }
}
