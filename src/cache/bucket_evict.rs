//! Keeping the shared bucket under `storage.max_size` and `cache.max_age`, by image, in a
//! cluster without a global lock.
//!
//! Every replica runs the same pass over the same listing and reaches the same decision: the
//! images in the bucket by last pull, oldest first, pinned ones left out, cut until the bucket
//! is under the low watermark (and every image nobody pulled within `max_age`); what to delete
//! is the content of cut images that no retained image holds. Each replica then acts only on
//! the cut images it owns (rendezvous hashing of the root digest; alone, it owns all), and
//! never at once: it marks them (`marks/`, with the last pull it saw). A pull or a presigned
//! redirect handed out before the mark must finish against content that is still there, so
//! only once `storage.s3.evict_grace` has passed does every replica drop its local tags naming
//! the image, and a `redirect_ttl` and two pass periods later its owner deletes it: first the
//! tags naming it, so
//! no tag is ever listed with content gone, then the content, then the image's own records. An
//! image pulled after its mark (its pull record is newer) keeps its content: the mark goes,
//! and if it is still cut the grace starts over. Replicas that disagree for a moment (a
//! listing a few seconds apart, a member joining) at worst delete one image twice or leave it
//! for the next pass.
//!
//! What an image holds is read from its manifests (immutable, so each replica reads each
//! manifest once and remembers what it names), not from records a replica wrote: the bucket's
//! content is the truth, and two replicas that each know half an image (the index here, a
//! platform manifest there) cannot make it lose members. Records hold only what content does
//! not say: when an image was last pulled (`images/`, written at most every
//! [`IMAGE_TOUCH`] per image per replica), which tags named it (`refs/`), and which roots a
//! pin pass pinned (`pins/`), so a replica whose own pin pass has not run yet spares them too.
//!
//! The local disk is only a hot tier with its own evictor ([`super::Evictor`]), which never
//! touches the bucket; nothing here touches the local disk.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, Registry};
use tracing::{info, warn};

use super::evict::{EvictPolicy, Verdict};
use super::Cache;
use crate::cluster::{Cluster, Owner};
use crate::oci::{media_type, Digest};
use crate::storage::s3::{self, Bucket, SharedImage, SharedPin};

pub const BUCKET_EVICTIONS: &str = "regmirror_bucket_evictions_total";
pub const BUCKET_EVICTED_BYTES: &str = "regmirror_bucket_evicted_bytes_total";

/// A replica records a pull of an image in the bucket at most this often: a pull that starts
/// while the image is marked for eviction is seen within this, well inside the grace period.
pub const IMAGE_TOUCH: Duration = Duration::from_secs(60);
/// How often a replica runs a pass.
const PASS_EVERY: Duration = Duration::from_secs(60);
/// The shortest time between two passes of one replica.
const MIN_GAP: Duration = Duration::from_secs(10);
/// An index names manifests which name blobs: three levels; more is a loop or abuse.
const MAX_DEPTH: u8 = 3;
/// What manifests name is written to the index this many manifests at a time: a first pass
/// over a large bucket holds no more than this in a batch.
const REMEMBER_BATCH: usize = 1000;
/// Pulls remembered per replica before the oldest are forgotten (then written again).
const MAX_TOUCHED: usize = 100_000;

/// The bucket's bounds, from the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bound {
    /// `storage.max_size` in bytes; 0 is unbounded.
    pub max_size: u64,
    pub low_watermark_percent: u8,
    /// `cache.max_age`; zero never.
    pub max_age: Duration,
    /// A pin mark older than this is no longer honoured (a pin removed from the
    /// configuration lets its image go): twice `pins_refresh`.
    pub pin_hold: Duration,
    /// How long a cut image stays marked before its content goes (`storage.s3.evict_grace`).
    pub grace: Duration,
    /// How long a presigned redirect stays good (`storage.s3.redirect_ttl`; zero without
    /// redirects): one handed out just before the tags were dropped must not outlive the
    /// content.
    pub redirect_ttl: Duration,
}

impl Bound {
    /// The eviction policy both tiers share, with the bucket's bounds.
    fn policy(&self) -> EvictPolicy {
        EvictPolicy::new(self.max_size, self.low_watermark_percent, self.max_age)
    }
}

/// What one pass saw and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BucketEvicted {
    /// Bytes of blobs and manifests in the bucket when the pass listed it.
    pub total: u64,
    /// Bytes the global decision frees (by every owner together).
    pub planned: u64,
    /// Images the global decision cuts.
    pub cut: usize,
    /// Of those, images this replica owns and removed.
    pub images: usize,
    /// Blobs and manifests this replica deleted, and their bytes.
    pub objects: usize,
    pub bytes: u64,
    /// Tags this replica removed.
    pub tags: usize,
    /// Repository links to content no longer in the bucket this replica removed.
    pub links: usize,
    /// The roots the global decision cuts, oldest first, and those this replica removed.
    pub cut_roots: Vec<Digest>,
    pub removed_roots: Vec<Digest>,
    /// Cut images this replica owns that it marked this pass (first cut, or pulled again
    /// since their mark: the grace starts over), and those still within their grace.
    pub marked: usize,
    pub waiting: usize,
    /// Marks this replica removed because their image is no longer cut (pulled again).
    pub unmarked: usize,
    /// Images whose local tags this replica dropped: their content is about to go, or went.
    pub forgotten: usize,
}

/// Where a cut image stands with its mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marked {
    /// No mark yet, or pulled since it was marked: (re)marked now, the grace starts.
    Anew,
    /// Within the grace: kept, served, redirected to.
    Waiting,
    /// Grace over: every replica drops its local tags naming it (so none answers a tag
    /// whose content is about to go), the owner deletes it on a pass at least two pass
    /// intervals later, by when every replica has had a pass.
    Forget,
    /// Deleted by its owner now.
    Due,
}

/// Per-replica memory of the pass and the pull records.
pub(super) struct State {
    bound: Bound,
    /// Roots whose pull this replica last recorded, and when.
    touched: Mutex<HashMap<Digest, u64>>,
    /// What each manifest names (manifests are immutable).
    children: Mutex<HashMap<Digest, Arc<Vec<Digest>>>>,
    /// Image and pin records by root, with the entity tag they were read at.
    images: Mutex<HashMap<Digest, (Option<String>, u64)>>,
    pins: Mutex<HashMap<Digest, (Option<String>, u64)>>,
    evictions: Option<(IntCounter, IntCounter)>,
    /// The bucket's size as the last pass listed it plus what this replica wrote since: a
    /// pass is started early when it goes over `max_size`.
    estimate: AtomicU64,
    wake: tokio::sync::Notify,
    /// Bucket writes started off a request's path and not finished yet.
    pending: Arc<tokio::sync::watch::Sender<usize>>,
    /// The roots of the last pass's images: one no longer listed went, and its local tags go.
    roots: Mutex<HashSet<Digest>>,
    /// Whether a pass swept the index's memo of bucket manifests since the process started.
    swept: std::sync::atomic::AtomicBool,
}

/// A bucket write under way (see [`Cache::bucket_writes_settled`]).
pub(super) struct Pending(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl State {
    pub(super) fn new(bound: Bound, registry: &Registry) -> State {
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::new(name, help).ok()?;
            // A second cache in one process (tests) shares the first one's series.
            let _ = registry.register(Box::new(counter.clone()));
            Some(counter)
        };
        let evictions = counter(
            BUCKET_EVICTIONS,
            "Blobs and manifests this replica deleted from the shared bucket to keep it under storage.max_size and cache.max_age.",
        )
        .zip(counter(
            BUCKET_EVICTED_BYTES,
            "Bytes this replica deleted from the shared bucket.",
        ));
        State {
            bound,
            touched: Mutex::default(),
            children: Mutex::default(),
            images: Mutex::default(),
            pins: Mutex::default(),
            evictions,
            estimate: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            pending: Arc::new(tokio::sync::watch::Sender::new(0)),
            roots: Mutex::default(),
            swept: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// No bucket, no bounds, no counters.
    pub(super) fn idle() -> State {
        State {
            bound: Bound::default(),
            touched: Mutex::default(),
            children: Mutex::default(),
            images: Mutex::default(),
            pins: Mutex::default(),
            evictions: None,
            estimate: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            pending: Arc::new(tokio::sync::watch::Sender::new(0)),
            roots: Mutex::default(),
            swept: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counts a bucket write under way until the guard is dropped.
    pub(super) fn pending(&self) -> Pending {
        self.pending.send_modify(|n| *n += 1);
        Pending(self.pending.clone())
    }

    /// Whether a pull of `root` at `now` should be written to the bucket, and notes it if so.
    fn should_touch(&self, root: &Digest, now: u64) -> bool {
        let every = u64::try_from(IMAGE_TOUCH.as_millis()).unwrap_or(u64::MAX);
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        if touched
            .get(root)
            .is_some_and(|at| at.saturating_add(every) > now)
        {
            return false;
        }
        if touched.len() >= MAX_TOUCHED {
            touched.retain(|_, at| at.saturating_add(every) > now);
        }
        touched.insert(root.clone(), now);
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `sha256/<64 hex>[/rest]` as listed under `images/`, `pins/`, `refs/`, `blobs/` or
/// `manifests/`: the digest and the rest.
fn split_name(name: &str) -> Option<(Digest, &str)> {
    let hex = name.strip_prefix("sha256/")?;
    let (hex, rest) = match hex.split_once('/') {
        Some((hex, rest)) => (hex, rest),
        None => (hex, ""),
    };
    let digest = format!("sha256:{hex}").parse().ok()?;
    Some((digest, rest))
}

/// One unit of eviction: an image (a root manifest and what it names), or content no image
/// names, on its own.
struct Unit {
    root: Digest,
    last_pull: u64,
    members: Vec<Digest>,
    pinned: bool,
}

impl Cache {
    /// Records a pull of every image holding `digest`: in the index (eviction order and
    /// `max_age`) and, with a bucket, in the bucket at most every [`IMAGE_TOUCH`] per image on
    /// this replica. Off the request's path: one task, one trip to the blocking pool.
    pub(super) fn record_pull(&self, digest: &Digest) {
        let Some(this) = self.me.upgrade() else {
            return;
        };
        let (digest, now) = (digest.clone(), self.clock.now());
        let bucket = self.shared.bucket().cloned();
        // Counted until it lands, index and bucket alike ([`Cache::bucket_writes_settled`]).
        let pending = self.shared.evict.pending();
        // Off the response's path.
        tokio::spawn(async move {
            let _pending = pending;
            let shared = bucket.is_some();
            let roots: Vec<Digest> = this
                .facts
                .local(move |store| {
                    let index = store.index();
                    let _ = index.touch_owners(&digest, now, super::TOUCH_GRANULARITY_MS);
                    Ok(if shared {
                        index.owners(&digest)?
                    } else {
                        Vec::new()
                    })
                })
                .await
                .unwrap_or_default();
            let Some(bucket) = bucket else {
                return;
            };
            let roots: Vec<Digest> = roots
                .into_iter()
                .filter(|root| this.shared.evict.should_touch(root, now))
                .collect();
            let image = SharedImage { last_pull: now };
            for root in roots {
                if let Err(error) = bucket.put_image(&root, &image).await {
                    warn!(%root, %error, "could not record the pull in the bucket");
                }
            }
        });
    }

    /// Records that a tag named the image rooted at `root` (for whoever removes the image),
    /// off the request's path.
    pub(super) fn share_tag_ref(&self, upstream: &str, repository: &str, tag: &str, root: &Digest) {
        let Some(bucket) = self.shared.bucket() else {
            return;
        };
        let (bucket, upstream, repository, tag, root) = (
            bucket.clone(),
            upstream.to_owned(),
            repository.to_owned(),
            tag.to_owned(),
            root.clone(),
        );
        let pending = self.shared.evict.pending();
        tokio::spawn(async move {
            let _pending = pending;
            if let Err(error) = bucket
                .put_tag_ref(&root, &upstream, &repository, &tag)
                .await
            {
                warn!(%root, %error, "could not record the tag's image in the bucket");
            }
        });
    }

    /// Marks pinned roots in the bucket, so every replica spares them.
    pub(super) async fn share_pins(&self, roots: impl Iterator<Item = &Digest>) {
        let Some(bucket) = self.shared.bucket() else {
            return;
        };
        let pin = SharedPin {
            at: self.clock.now(),
        };
        for root in roots {
            if let Err(error) = bucket.put_pin(root, &pin).await {
                warn!(%root, %error, "could not mark the pinned image in the bucket");
            }
        }
    }

    /// Waits until the writes this replica started off requests' paths (pull records in the
    /// index and the bucket, tag records, blob uploads) are done: for shutdown and tests (an
    /// eviction pass right after a pull must see it).
    pub async fn bucket_writes_settled(&self) {
        let mut pending = self.shared.evict.pending.subscribe();
        let _ = pending.wait_for(|n| *n == 0).await;
    }

    /// Notes `bytes` this replica wrote to the bucket, and starts a pass early when that takes
    /// the bucket over `max_size` as far as this replica knows.
    pub(super) fn bucket_written(&self, bytes: u64) {
        let state = &self.shared.evict;
        if self.shared.bucket().is_none() || state.bound.max_size == 0 {
            return;
        }
        let before = state.estimate.fetch_add(bytes, Ordering::Relaxed);
        if state.bound.policy().over(before.saturating_add(bytes)) {
            state.wake.notify_one();
        }
    }

    /// One eviction pass over the bucket (see the module documentation). Without a bucket or
    /// bounds, does nothing.
    pub async fn evict_bucket_once(&self) -> Result<BucketEvicted, super::Error> {
        let mut done = BucketEvicted::default();
        let Some(bucket) = self.shared.bucket().cloned() else {
            return Ok(done);
        };
        let bound = self.shared.evict.bound;
        let policy = bound.policy();
        if !policy.bounded() {
            return Ok(done);
        }
        let now = self.clock.now();
        let cluster = self.shared.cluster().cloned();
        let mine = |root: &Digest| owns(cluster.as_deref(), root);
        // Records first, content after: a record's manifest was written before it, so the
        // content listing shows it, and a record is never mistaken for one whose image is gone.
        // Each listing is folded page by page into what the pass needs of it; no listing is
        // held whole.
        let image_list = listed_records(&bucket, "images").await?;
        let mut listed_marks: Vec<Digest> = Vec::new();
        bucket
            .scan("marks", |item| {
                if let Some((root, "")) = split_name(&item.name) {
                    listed_marks.push(root);
                }
            })
            .await?;
        let mut refs: HashMap<Digest, Vec<String>> = HashMap::new();
        bucket
            .scan("refs", |item| {
                if let Some((root, name)) = split_name(&item.name) {
                    refs.entry(root).or_default().push(name.to_owned());
                }
            })
            .await?;
        let pin_list = listed_records(&bucket, "pins").await?;
        // Links to content the bucket no longer holds go (invariant 4: no record outlives its
        // content), by the owner of the digest. A link is written after its content, and links
        // are listed before content: a listed link whose content is not listed is one whose
        // content is gone. Only this replica's share is kept until the content is listed.
        let mut links: Vec<(Digest, String)> = Vec::new();
        bucket
            .scan("links", |item| {
                let Some((_, hex)) = item.name.rsplit_once("/_l/") else {
                    return;
                };
                if let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() {
                    if mine(&digest) {
                        links.push((digest, item.name));
                    }
                }
            })
            .await?;
        let mut sizes: HashMap<Digest, (u64, u64, bool)> = HashMap::new();
        for (prefix, manifest) in [("manifests", true), ("blobs", false)] {
            bucket
                .scan(prefix, |item| {
                    if let Some((digest, "")) = split_name(&item.name) {
                        sizes.insert(digest, (item.size, item.modified, manifest));
                    }
                })
                .await?;
        }
        done.total = sizes
            .values()
            .fold(0u64, |sum, (size, _, _)| sum.saturating_add(*size));
        self.shared
            .evict
            .estimate
            .store(done.total, Ordering::Relaxed);
        // Over the bound, every replica evicts down to the low watermark. The first pass to see
        // the bucket over says so in the bucket: a replica whose pass comes after the others
        // removed their share (the bucket under `max_size` by then, not yet under the low
        // watermark) still removes its own.
        let mut over = false;
        if bound.max_size > 0 {
            let marked = bucket.evicting().await.unwrap_or(false);
            if policy.over(done.total) {
                over = true;
                if !marked {
                    bucket.set_evicting(Some(now)).await?;
                }
            } else if policy.over_low(done.total) {
                over = marked;
            } else if marked {
                bucket.set_evicting(None).await?;
            }
        }

        let images = self.read_records(&bucket, image_list, true).await;
        let pin_hold = millis(bound.pin_hold);
        let (marks, expired): (Vec<_>, Vec<_>) = self
            .read_records(&bucket, pin_list, false)
            .await
            .into_iter()
            .partition(|(_, at)| at.saturating_add(pin_hold) > now);
        let mut pinned: HashSet<Digest> = marks.into_iter().map(|(root, _)| root).collect();
        pinned.extend(self.pinned().into_values());

        // What every manifest names, and so which manifests no other one names.
        let manifests: Vec<Digest> = sizes
            .iter()
            .filter(|(_, (_, _, manifest))| *manifest)
            .map(|(digest, _)| digest.clone())
            .collect();
        let children = self.children_of_all(&bucket, manifests).await?;
        let named: HashSet<&Digest> = children.values().flat_map(|kids| kids.iter()).collect();
        let mut roots: BTreeSet<Digest> = BTreeSet::new();
        for digest in children.keys() {
            if images.contains_key(digest) || pinned.contains(digest) || !named.contains(digest) {
                roots.insert(digest.clone());
            }
        }
        let mut units: Vec<Unit> = roots
            .into_iter()
            .map(|root| {
                let last_pull = images
                    .get(&root)
                    .copied()
                    .unwrap_or_else(|| sizes.get(&root).map_or(0, |(_, modified, _)| *modified));
                Unit {
                    pinned: pinned.contains(&root),
                    members: closure(&root, &children, &sizes),
                    root,
                    last_pull,
                }
            })
            .collect();
        // Content no image names (fetched by digest alone, or left by a crash) is a unit of
        // its own, dated by its upload.
        let strays: Vec<Unit> = {
            let held: HashSet<&Digest> = units.iter().flat_map(|u| u.members.iter()).collect();
            sizes
                .iter()
                .filter(|(digest, _)| !held.contains(digest))
                .map(|(digest, (_, modified, _))| Unit {
                    root: digest.clone(),
                    last_pull: *modified,
                    members: vec![digest.clone()],
                    pinned: false,
                })
                .collect()
        };
        units.extend(strays);
        units.sort_by(|a, b| (a.last_pull, &a.root).cmp(&(b.last_pull, &b.root)));

        // The global decision: the same on every replica that listed the same bucket.
        let mut holders: HashMap<&Digest, usize> = HashMap::new();
        for unit in &units {
            for member in &unit.members {
                *holders.entry(member).or_default() += 1;
            }
        }
        let mut cut: Vec<usize> = Vec::new();
        let mut dead: HashSet<Digest> = HashSet::new();
        for (i, unit) in units.iter().enumerate() {
            let remaining = done.total.saturating_sub(done.planned);
            match policy.verdict(unit.last_pull, unit.pinned, now, over, remaining) {
                Verdict::Stop => break,
                Verdict::Spare => continue,
                Verdict::Cut => cut.push(i),
            }
            for member in &unit.members {
                if let Some(count) = holders.get_mut(member) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        dead.insert(member.clone());
                        done.planned = done
                            .planned
                            .saturating_add(sizes.get(member).map_or(0, |(size, _, _)| *size));
                    }
                }
            }
        }
        done.cut = cut.len();
        done.cut_roots = cut.iter().map(|&i| units[i].root.clone()).collect();

        // Mark first, delete after the grace: a pull or a presigned redirect handed out before
        // the mark finishes against content that is still there, and a pull meanwhile saves
        // the image (its record is newer than the mark's).
        // Only the marks of cut images matter here; the others are removed unread below.
        let mut marks: HashMap<Digest, s3::SharedMark> = HashMap::new();
        let cut_roots: HashSet<&Digest> = cut.iter().map(|&i| &units[i].root).collect();
        for root in listed_marks.iter().filter(|root| cut_roots.contains(root)) {
            if let Ok(Some(mark)) = bucket.get_mark(root).await {
                marks.insert(root.clone(), mark);
            }
        }
        let grace = millis(bound.grace);
        // Past the grace, tags go everywhere first; the content goes once every replica has
        // had two passes to drop its tags (a pass comes every PASS_EVERY + MIN_GAP at most,
        // plus its own duration) and a redirect handed out just before is past its life.
        let delete_after = grace
            .saturating_add(millis(bound.redirect_ttl))
            .saturating_add(millis(PASS_EVERY + MIN_GAP).saturating_mul(2));
        let status: HashMap<&Digest, Marked> = cut
            .iter()
            .map(|&i| {
                let unit = &units[i];
                let status = match marks.get(&unit.root) {
                    None => Marked::Anew,
                    Some(mark) if mark.last_pull < unit.last_pull => Marked::Anew,
                    Some(mark) if now >= mark.marked_at.saturating_add(delete_after) => Marked::Due,
                    Some(mark) if now >= mark.marked_at.saturating_add(grace) => Marked::Forget,
                    Some(_) => Marked::Waiting,
                };
                (&unit.root, status)
            })
            .collect();

        // Records of images whose root manifest is gone (removed by an owner's earlier pass
        // while a replica was re-recording its tag, or never written): their tags go too.
        let dangling: BTreeSet<Digest> = images
            .keys()
            .chain(refs.keys())
            .filter(|root| !sizes.contains_key(*root))
            .cloned()
            .collect();
        for (digest, name) in &links {
            if !sizes.contains_key(digest) && bucket.delete_listed("links", name).await.is_ok() {
                done.links += 1;
            }
        }
        // Pin marks no pin pass renewed (the pin left the configuration) go, by their owner.
        for (root, _) in &expired {
            if mine(root) {
                let _ = bucket.delete_key(&s3::pin_key(root)).await;
            }
        }
        // Manifests are remembered only while the bucket holds them.
        self.forget_children(&sizes).await;

        // Marks of images no longer cut (pulled again, or the bucket shrank) go, by their owner.
        for root in &listed_marks {
            if !status.contains_key(root)
                && mine(root)
                && bucket.delete_key(&s3::mark_key(root)).await.is_ok()
            {
                done.unmarked += 1;
            }
        }
        // Every replica forgets the tags it holds for images about to go or gone, so none
        // answers a tag whose content the bucket no longer has (its hot tier may not hold
        // all of it): the next pull of such a tag asks the upstream.
        let current: HashSet<Digest> = units.iter().map(|u| u.root.clone()).collect();
        let gone: Vec<Digest> = {
            let mut known = lock(&self.shared.evict.roots);
            let gone = known.difference(&current).cloned().collect();
            *known = current;
            gone
        };
        let forget: Vec<Digest> = status
            .iter()
            .filter(|(_, s)| matches!(s, Marked::Forget | Marked::Due))
            .map(|(root, _)| (*root).clone())
            .chain(gone)
            .chain(dangling.iter().cloned())
            .collect();
        if !forget.is_empty() {
            let store = self.store.clone();
            done.forgotten = tokio::task::spawn_blocking(move || {
                let index = store.index();
                forget
                    .iter()
                    .filter(|root| index.forget_tags_of(root).is_ok())
                    .count()
            })
            .await
            .unwrap_or(0);
        }
        // Owners mark what is newly cut; the rest waits for its grace.
        for &i in &cut {
            let unit = &units[i];
            if !mine(&unit.root) {
                continue;
            }
            match status.get(&unit.root) {
                // Pulled within the last record interval: a pull since then may not be
                // recorded yet, so the mark waits for a pass that sees it settled.
                Some(Marked::Anew) if now.saturating_sub(unit.last_pull) < millis(IMAGE_TOUCH) => {}
                Some(Marked::Anew) => {
                    let mark = s3::SharedMark {
                        marked_at: now,
                        last_pull: unit.last_pull,
                    };
                    match bucket.put_mark(&unit.root, &mark).await {
                        Ok(()) => done.marked += 1,
                        Err(error) => {
                            warn!(root = %unit.root, %error, "could not mark the image for eviction")
                        }
                    }
                }
                Some(Marked::Waiting | Marked::Forget) => done.waiting += 1,
                Some(Marked::Due) | None => {}
            }
        }
        let due = |root: &Digest| status.get(root) == Some(&Marked::Due);
        if !cut.iter().any(|&i| due(&units[i].root)) && dangling.is_empty() {
            return Ok(done);
        }

        // Content of a cut image other cut images share: whoever deletes it first removes
        // the tags of all of them, so none is left listed with content gone.
        let mut sharers: HashMap<&Digest, Vec<&Digest>> = HashMap::new();
        for &i in &cut {
            for member in &units[i].members {
                if dead.contains(member) {
                    sharers.entry(member).or_default().push(&units[i].root);
                }
            }
        }
        let protected = self.new_since(&bucket, &sizes).await?;
        for &i in &cut {
            let unit = &units[i];
            if !mine(&unit.root) || !due(&unit.root) {
                continue;
            }
            // Content this image shares with other cut images goes only once all of them are
            // due: one still within its grace may yet be pulled and kept.
            let gone: Vec<&Digest> = unit
                .members
                .iter()
                .filter(|m| dead.contains(*m) && !protected.contains(*m))
                .filter(|m| {
                    sharers
                        .get(*m)
                        .is_none_or(|roots| roots.iter().all(|r| due(r)))
                })
                .collect();
            let mut tag_roots: BTreeSet<&Digest> = BTreeSet::from([&unit.root]);
            for member in &gone {
                tag_roots.extend(sharers.get(*member).into_iter().flatten().copied());
            }
            if let Err(error) = self
                .remove_tags(&bucket, &tag_roots, &refs, &mut done)
                .await
            {
                warn!(root = %unit.root, %error, "bucket eviction could not remove the image's tags; keeping its content");
                continue;
            }
            for member in gone {
                let Some((size, _, manifest)) = sizes.get(member) else {
                    continue;
                };
                match bucket.delete_key(&s3::content_key(member, *manifest)).await {
                    Ok(()) => {
                        done.objects += 1;
                        done.bytes = done.bytes.saturating_add(*size);
                    }
                    Err(error) => {
                        warn!(digest = %member, %error, "bucket eviction could not delete")
                    }
                }
            }
            self.remove_records(&bucket, &unit.root, &refs).await;
            let _ = bucket.delete_key(&s3::mark_key(&unit.root)).await;
            done.images += 1;
            done.removed_roots.push(unit.root.clone());
        }
        for root in dangling.iter().filter(|root| mine(root)) {
            if self
                .remove_tags(&bucket, &BTreeSet::from([root]), &refs, &mut done)
                .await
                .is_ok()
            {
                self.remove_records(&bucket, root, &refs).await;
            }
        }
        self.shared
            .evict
            .estimate
            .fetch_sub(done.bytes.min(done.total), Ordering::Relaxed);
        if let Some((objects, bytes)) = &self.shared.evict.evictions {
            objects.inc_by(done.objects as u64);
            bytes.inc_by(done.bytes);
        }
        if done.images > 0 || done.tags > 0 {
            info!(
                total = done.total,
                cut = done.cut,
                images = done.images,
                objects = done.objects,
                bytes = done.bytes,
                tags = done.tags,
                "evicted least recently pulled images from the bucket"
            );
        }
        Ok(done)
    }

    /// Removes the tags recorded as naming any of `roots` (those that still do).
    async fn remove_tags(
        &self,
        bucket: &Bucket,
        roots: &BTreeSet<&Digest>,
        refs: &HashMap<Digest, Vec<String>>,
        done: &mut BucketEvicted,
    ) -> Result<(), crate::storage::Error> {
        for root in roots {
            for name in refs.get(*root).into_iter().flatten() {
                if bucket.delete_tag_naming(name, root).await? {
                    done.tags += 1;
                }
            }
        }
        Ok(())
    }

    /// Removes the records of an image whose tags and content are gone.
    async fn remove_records(
        &self,
        bucket: &Bucket,
        root: &Digest,
        refs: &HashMap<Digest, Vec<String>>,
    ) {
        for name in refs.get(root).into_iter().flatten() {
            let _ = bucket.delete_key(&s3::tag_ref_key(root, name)).await;
        }
        let _ = bucket.delete_key(&s3::image_key(root)).await;
        lock(&self.shared.evict.images).remove(root);
    }

    /// The image (`images` true) or pin records listed, by root: each read once per change
    /// of its entity tag.
    async fn read_records(
        &self,
        bucket: &Bucket,
        list: Vec<Record>,
        images: bool,
    ) -> HashMap<Digest, u64> {
        let state = &self.shared.evict;
        let cache = if images { &state.images } else { &state.pins };
        let mut out = HashMap::new();
        let mut seen = HashSet::new();
        for Record {
            root,
            e_tag,
            modified,
        } in list
        {
            seen.insert(root.clone());
            let known = lock(cache)
                .get(&root)
                .filter(|(tag, _)| e_tag.is_some() && *tag == e_tag)
                .map(|(_, at)| *at);
            let at = match known {
                Some(at) => at,
                None => {
                    let read = if images {
                        bucket
                            .get_image(&root)
                            .await
                            .map(|r| r.map(|r| r.last_pull))
                    } else {
                        bucket.get_pin(&root).await.map(|r| r.map(|r| r.at))
                    };
                    // Unreadable: dated by its upload, which is when it was last written.
                    let at = read.ok().flatten().unwrap_or(modified);
                    lock(cache).insert(root.clone(), (e_tag, at));
                    at
                }
            };
            out.insert(root, at);
        }
        lock(cache).retain(|root, _| seen.contains(root));
        out
    }

    /// What each of `manifests` (in the bucket) names: from memory, else from what an earlier
    /// pass wrote down in the index (so a restart reads no manifest again), else read once and
    /// written down. A manifest that is gone or does not hash to its name names nothing; one
    /// the bucket fails to give fails the pass, since its layers would otherwise look like
    /// nobody's.
    async fn children_of_all(
        &self,
        bucket: &Bucket,
        manifests: Vec<Digest>,
    ) -> Result<HashMap<Digest, Arc<Vec<Digest>>>, crate::storage::Error> {
        let state = &self.shared.evict;
        let mut out = HashMap::with_capacity(manifests.len());
        let mut unknown = Vec::new();
        {
            let memory = lock(&state.children);
            for digest in manifests {
                match memory.get(&digest) {
                    Some(kids) => {
                        out.insert(digest, kids.clone());
                    }
                    None => unknown.push(digest),
                }
            }
        }
        if unknown.is_empty() {
            return Ok(out);
        }
        let store = self.store.clone();
        let (unknown, recorded) = tokio::task::spawn_blocking(move || {
            let recorded = store.index().bucket_children(&unknown);
            (unknown, recorded)
        })
        .await
        .map_err(|e| crate::storage::Error::Io(std::io::Error::other(e)))?;
        // An unreadable memo only costs reads.
        let recorded = recorded.unwrap_or_else(|_| vec![None; unknown.len()]);
        let mut learned = Vec::new();
        for (digest, recorded) in unknown.into_iter().zip(recorded) {
            let kids = match recorded {
                Some(kids) => kids,
                None => match bucket.get_manifest(&digest).await? {
                    Some((bytes, _)) => {
                        let kids: Vec<Digest> = media_type::referenced_digests(&bytes)
                            .into_iter()
                            .map(|(d, _)| d)
                            .collect();
                        learned.push((digest.clone(), kids.clone()));
                        if learned.len() >= REMEMBER_BATCH {
                            self.remember_children(std::mem::take(&mut learned)).await;
                        }
                        kids
                    }
                    // Gone since the listing: nothing to keep for it this pass, and nothing
                    // remembered, should the same manifest come back.
                    None => {
                        out.insert(digest, Arc::new(Vec::new()));
                        continue;
                    }
                },
            };
            let kids = Arc::new(kids);
            lock(&state.children).insert(digest.clone(), kids.clone());
            out.insert(digest, kids);
        }
        if !learned.is_empty() {
            self.remember_children(learned).await;
        }
        Ok(out)
    }

    /// Writes down what bucket manifests name, for the next start.
    async fn remember_children(&self, learned: Vec<(Digest, Vec<Digest>)>) {
        let store = self.store.clone();
        let written =
            tokio::task::spawn_blocking(move || store.index().put_bucket_children(&learned)).await;
        if !matches!(written, Ok(Ok(()))) {
            warn!(
                "could not write down what bucket manifests name; the next start reads them again"
            );
        }
    }

    /// Forgets what manifests the bucket no longer holds named, in memory and in the index.
    async fn forget_children(&self, sizes: &HashMap<Digest, (u64, u64, bool)>) {
        let state = &self.shared.evict;
        let mut gone = Vec::new();
        lock(&state.children).retain(|digest, _| {
            let keep = sizes.contains_key(digest);
            if !keep {
                gone.push(digest.clone());
            }
            keep
        });
        // Once per process the index is swept whole (it may name manifests deleted while this
        // replica was down); after that, what memory forgets is all there is to forget.
        let sweep = !state.swept.swap(true, Ordering::Relaxed);
        let listed: Option<HashSet<Digest>> = sweep.then(|| {
            sizes
                .iter()
                .filter(|(_, (_, _, manifest))| *manifest)
                .map(|(d, _)| d.clone())
                .collect()
        });
        if gone.is_empty() && listed.is_none() {
            return;
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let index = store.index();
            match listed {
                Some(listed) => index
                    .retain_bucket_children(|d| listed.contains(d))
                    .map(drop),
                None => index
                    .retain_bucket_children(|d| !gone.contains(d))
                    .map(drop),
            }
        })
        .await;
    }

    /// What manifests written since the pass listed them name: a new image may have come to
    /// share content with a cut one meanwhile, and that content stays.
    async fn new_since(
        &self,
        bucket: &Bucket,
        sizes: &HashMap<Digest, (u64, u64, bool)>,
    ) -> Result<HashSet<Digest>, crate::storage::Error> {
        let mut new = Vec::new();
        bucket
            .scan("manifests", |item| {
                if let Some((digest, "")) = split_name(&item.name) {
                    if !sizes.get(&digest).is_some_and(|(_, _, manifest)| *manifest) {
                        new.push(digest);
                    }
                }
            })
            .await?;
        let mut protected = HashSet::new();
        let mut pending: Vec<(Digest, u8)> = new.into_iter().map(|d| (d, 0)).collect();
        while let Some((digest, depth)) = pending.pop() {
            if depth < MAX_DEPTH {
                let kids = self.children_of_all(bucket, vec![digest.clone()]).await?;
                for kid in kids.values().flat_map(|k| k.iter()) {
                    pending.push((kid.clone(), depth + 1));
                }
            }
            protected.insert(digest);
        }
        Ok(protected)
    }
}

/// A record (`images/`, `pins/`) as listed: read only when its entity tag changed.
struct Record {
    root: Digest,
    e_tag: Option<String>,
    modified: u64,
}

async fn listed_records(
    bucket: &Bucket,
    prefix: &str,
) -> Result<Vec<Record>, crate::storage::Error> {
    let mut out = Vec::new();
    bucket
        .scan(prefix, |item| {
            if let Some((root, "")) = split_name(&item.name) {
                out.push(Record {
                    root,
                    e_tag: item.e_tag,
                    modified: item.modified,
                });
            }
        })
        .await?;
    Ok(out)
}

/// The root and what it names, down to [`MAX_DEPTH`], that the bucket holds.
fn closure(
    root: &Digest,
    children: &HashMap<Digest, Arc<Vec<Digest>>>,
    sizes: &HashMap<Digest, (u64, u64, bool)>,
) -> Vec<Digest> {
    let mut out: BTreeSet<Digest> = BTreeSet::new();
    let mut pending = vec![(root.clone(), 0u8)];
    while let Some((digest, depth)) = pending.pop() {
        if depth < MAX_DEPTH {
            for kid in children.get(&digest).into_iter().flat_map(|k| k.iter()) {
                pending.push((kid.clone(), depth + 1));
            }
        }
        if sizes.contains_key(&digest) {
            out.insert(digest);
        }
    }
    out.into_iter().collect()
}

/// Whether this replica removes the image rooted at `root`: its owner in the cluster, or
/// alone, every one.
fn owns(cluster: Option<&Cluster>, root: &Digest) -> bool {
    cluster.is_none_or(|c| matches!(c.owner(root.as_str()), Owner::Me))
}

/// Runs a pass every minute, or sooner (at most every [`MIN_GAP`]) when this replica's uploads
/// take the bucket over its bound, until `shutdown`.
pub async fn run(cache: Arc<Cache>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(PASS_EVERY) => {}
            _ = cache.shared.evict.wake.notified() => {}
        }
        if let Err(error) = cache.evict_bucket_once().await {
            warn!(%error, "bucket eviction pass failed; trying again later");
        }
        // A bucket that stays over (others' shares pending, pins) must not turn every upload
        // into a listing of the whole bucket.
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(MIN_GAP) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_names_split_into_digest_and_rest() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            split_name(&format!("sha256/{}", d.hex())),
            Some((d.clone(), ""))
        );
        assert_eq!(
            split_name(&format!("sha256/{}/docker.io/library/a/_t/v1", d.hex())),
            Some((d, "docker.io/library/a/_t/v1"))
        );
        assert_eq!(split_name("sha256/zz"), None);
        assert_eq!(split_name("md5/aa"), None);
    }

    #[test]
    fn closure_keeps_what_the_bucket_holds() {
        let (root, child, layer, missing) = (
            Digest::sha256_of(b"r"),
            Digest::sha256_of(b"c"),
            Digest::sha256_of(b"l"),
            Digest::sha256_of(b"m"),
        );
        let children = HashMap::from([
            (root.clone(), Arc::new(vec![child.clone()])),
            (child.clone(), Arc::new(vec![layer.clone(), missing])),
        ]);
        let sizes = HashMap::from([
            (root.clone(), (1, 0, true)),
            (child.clone(), (1, 0, true)),
            (layer.clone(), (1, 0, false)),
        ]);
        let mut want = vec![root.clone(), child, layer];
        want.sort();
        assert_eq!(closure(&root, &children, &sizes), want);
    }
}
