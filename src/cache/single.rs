//! Single flight for small results (manifests, tag revalidations): concurrent callers with the
//! same key share one run of the work.
//!
//! The work runs in its own task, so a caller that goes away (client disconnect) never cancels
//! what the others wait for, and the result still lands in the store.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

type Inflight<K, V> = Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>;

/// Deduplicates concurrent work by key.
pub struct SingleFlight<K, V> {
    inflight: Inflight<K, V>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Arc::default(),
        }
    }
}

/// Removes the key when the work ends, even if it panicked, so a key never stays stuck.
struct Forget<K: Hash + Eq, V> {
    inflight: Inflight<K, V>,
    key: K,
}

impl<K: Hash + Eq, V> Drop for Forget<K, V> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.inflight.lock() {
            map.remove(&self.key);
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
        let mut rx = {
            let mut map = self.inflight.lock().expect("single-flight lock");
            match map.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let forget = Forget {
                        inflight: self.inflight.clone(),
                        key,
                    };
                    let fut = work();
                    tokio::spawn(async move {
                        let value = fut.await;
                        // Forget first: whoever comes after the result sees the store it wrote.
                        drop(forget);
                        let _ = tx.send(Some(value));
                    });
                    rx
                }
            }
        };
        let value = rx.wait_for(Option::is_some).await.ok()?;
        value.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flight: Arc<SingleFlight<&'static str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let flight = flight.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                flight
                    .run("k", || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 41
                    })
                    .await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), Some(41));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(flight.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn abandoned_caller_does_not_cancel_the_work() {
        let flight: Arc<SingleFlight<u8, u8>> = Arc::default();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let call = flight.run(1, || async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            d.fetch_add(1, Ordering::SeqCst);
            7
        });
        // Drop the caller before the work ends.
        let _ = tokio::time::timeout(Duration::from_millis(5), call).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn panicking_work_releases_the_key() {
        let flight: SingleFlight<u8, u8> = SingleFlight::default();
        assert_eq!(flight.run(1, || async { panic!("boom") }).await, None);
        assert_eq!(flight.run(1, || async { 2 }).await, Some(2));
    }
}
