//! Single flight: concurrent requests for the same key share one run of the work. One registry
//! ([`Inflight`]) serves both kinds of work the cache shares: small results (manifests, tag
//! revalidations, [`SingleFlight`]) and blob downloads (`flight.rs`).
//!
//! The key is forgotten by a drop guard ([`Leader`]), so work that ends in any way, panic
//! included, never leaves a key behind for later callers to wait on forever. The work runs in
//! its own task, so a caller that goes away (client disconnect) never cancels what the others
//! wait for, and the result still lands in the store.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

type Map<K, T> = Arc<Mutex<HashMap<K, T>>>;

/// Work under way, by key: `T` is what later callers need to follow it.
pub struct Inflight<K, T> {
    map: Map<K, T>,
}

impl<K, T> Default for Inflight<K, T> {
    fn default() -> Self {
        Inflight {
            map: Arc::default(),
        }
    }
}

/// What [`Inflight::join`] decided.
pub enum Join<K: Hash + Eq, T> {
    /// Someone already runs the work: follow it.
    Existing(T),
    /// The caller runs the work and holds the key until the [`Leader`] is dropped.
    Started(T, Leader<K, T>),
}

/// Holds a key registered by [`Inflight::join`]; dropping it (the work ended, returned or
/// panicked) forgets the key.
pub struct Leader<K: Hash + Eq, T> {
    map: Map<K, T>,
    key: K,
}

impl<K: Hash + Eq, T> Drop for Leader<K, T> {
    fn drop(&mut self) {
        // A poisoned lock still holds a consistent map (only inserts and removes happen under
        // it): forgetting the key matters more than the poison.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&self.key);
    }
}

impl<K: Hash + Eq + Clone, T: Clone> Inflight<K, T> {
    /// Follows the work under way for `key`, or registers new work with what `start` makes.
    /// `start` runs under the registry's lock and may decline (`Ok(None)`: nothing to do) or
    /// fail; either registers nothing.
    pub fn join<E>(
        &self,
        key: &K,
        start: impl FnOnce() -> Result<Option<T>, E>,
    ) -> Result<Option<Join<K, T>>, E> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = map.get(key) {
            return Ok(Some(Join::Existing(existing.clone())));
        }
        let Some(value) = start()? else {
            return Ok(None);
        };
        map.insert(key.clone(), value.clone());
        let leader = Leader {
            map: self.map.clone(),
            key: key.clone(),
        };
        Ok(Some(Join::Started(value, leader)))
    }

    /// The work under way for `key`, if any, to follow.
    pub fn get(&self, key: &K) -> Option<T> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    /// Work under way.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Deduplicates concurrent work with a small, cloneable result.
pub struct SingleFlight<K, V> {
    inflight: Inflight<K, watch::Receiver<Option<V>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Inflight::default(),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless a run for `key` is already under way, and answers its result. `None`
    /// means the work panicked.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> Option<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let mut sender = None;
        let joined = self.inflight.join(&key, || {
            let (tx, rx) = watch::channel(None);
            sender = Some(tx);
            Ok::<_, std::convert::Infallible>(Some(rx))
        });
        let mut rx = match joined {
            Ok(Some(Join::Existing(rx))) => rx,
            Ok(Some(Join::Started(rx, leader))) => {
                let tx = sender.expect("set when started");
                let fut = work();
                tokio::spawn(async move {
                    let value = fut.await;
                    // Forget first: whoever comes after the result sees the store it wrote.
                    drop(leader);
                    let _ = tx.send(Some(value));
                });
                rx
            }
            Ok(None) | Err(_) => unreachable!("start always registers"),
        };
        let value = rx.wait_for(Option::is_some).await.ok()?;
        value.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    /// Polls `fut` exactly once.
    async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = fut => Some(out),
            () = std::future::ready(()) => None,
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flight: SingleFlight<&'static str, usize> = SingleFlight::default();
        let runs = Arc::new(AtomicUsize::new(0));
        // The work waits for a gate, opened once every caller has joined.
        let (open, gate) = tokio::sync::watch::channel(false);
        let calls = (0..10).map(|_| {
            let (runs, mut gate) = (runs.clone(), gate.clone());
            flight.run("k", || async move {
                let _ = gate.wait_for(|open| *open).await;
                runs.fetch_add(1, Ordering::SeqCst) + 41
            })
        });
        let mut all = Box::pin(futures_util::future::join_all(calls));
        assert!(poll_once(&mut all).await.is_none(), "the work waits");
        assert_eq!(flight.inflight.len(), 1);
        open.send_replace(true);
        assert_eq!(all.await, vec![Some(41); 10]);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flight.inflight.len(), 0);
    }

    #[tokio::test]
    async fn abandoned_caller_does_not_cancel_the_work() {
        let flight: SingleFlight<u8, u8> = SingleFlight::default();
        let (release, released) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        let mut call = Box::pin(flight.run(1, || async move {
            let _ = released.await;
            let _ = done_tx.send(());
            7
        }));
        // The work starts on the first poll; then its only caller goes away.
        assert!(poll_once(&mut call).await.is_none());
        drop(call);
        release.send(()).unwrap();
        done.await
            .expect("the work ran to its end without its caller");
    }

    #[tokio::test]
    async fn panicking_work_releases_the_key() {
        let flight: SingleFlight<u8, u8> = SingleFlight::default();
        assert_eq!(flight.run(1, || async { panic!("boom") }).await, None);
        assert_eq!(flight.run(1, || async { 2 }).await, Some(2));
    }

    #[test]
    fn a_leader_dropped_by_a_panic_forgets_its_key() {
        let inflight: Inflight<u8, u8> = Inflight::default();
        let Ok(Some(Join::Started(_, leader))) = inflight.join(&1, || Ok::<_, ()>(Some(5))) else {
            panic!("first join starts");
        };
        assert!(matches!(
            inflight.join(&1, || Ok::<_, ()>(Some(6))),
            Ok(Some(Join::Existing(5)))
        ));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _leader = leader;
            panic!("work failed");
        }));
        assert!(unwound.is_err());
        assert_eq!(inflight.len(), 0);
        assert!(matches!(
            inflight.join(&1, || Ok::<_, ()>(Some(7))),
            Ok(Some(Join::Started(7, _)))
        ));
    }
}
