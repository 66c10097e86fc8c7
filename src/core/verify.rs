//! Verification: the digest of the whole image (SHA-512 as Longhorn, or SHA-256),
//! computed incrementally over the prefix of present blocks, so that it ends moments
//! after the last block lands instead of re-reading the image afterwards. The hashing
//! runs on one thread per node (`HashWorker`, owned by the node: the second core, or
//! whatever CPU readers leave) while fetches continue on the async workers.
//! `hash_prefix` knows no `Image`: the image compares the digest with its spec and
//! alone decides ready or failed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::bitmap::BlockMap;
use super::error::{Error, Result};
use super::give_way::{GiveWay, HeldTime};
use super::metrics::Metrics;
use super::range::Geometry;
use super::spec::ChecksumAlgorithm as Algo;
use super::store::ImageFiles;

/// Bytes hashed per blocking call: large enough to amortise the hand-off.
const HASH_CHUNK: u64 = 4 * 1024 * 1024;

/// A job, and where the waits before it are counted besides the thread's own (the image
/// it hashes).
type HashJob = (Arc<HeldTime>, Box<dyn FnOnce() + Send>);

/// The node's hashing thread. SHA-512 costs a core at ~500 MiB/s here, as much as the
/// whole fetch path at line rate, so on a 2-core host it must not take the CPU a reader
/// needs. While readers read images still arriving, it waits before each 4 MiB chunk (~8
/// ms of hashing), with a floor (`GiveWay`); within `READER_QUIET` of a read (its turns
/// under reads without pause, the chunk under way when reads begin) it runs as
/// SCHED_IDLE. Otherwise it runs at nice 10 and catches up at full speed. One thread
/// serves every image of the node.
pub struct HashWorker {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<HashJob>>,
    /// Readers of images still arriving: hashing gives them way (`GiveWay`).
    pressure: Arc<GiveWay>,
    /// How long the thread waited for them.
    held: Arc<HeldTime>,
    /// Landed bytes the node's feeds hold for hashing (`FEED_BUDGET`).
    feed_held: Arc<AtomicU64>,
}

/// How long after the last such read hashing stays in the background.
const READER_QUIET: Duration = Duration::from_millis(250);

impl std::fmt::Debug for HashWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashWorker")
    }
}

/// Sets the calling thread's scheduling: SCHED_IDLE, or SCHED_OTHER at nice 10.
fn set_background(idle: bool) {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: both calls act on the calling thread only (pid/tid 0) and read `param`.
    unsafe {
        libc::sched_setscheduler(0, policy, &param);
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

impl HashWorker {
    /// Starts the node's hashing thread.
    pub fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
        // Read on the hashing thread, off the runtime: std's clock.
        let pressure = Arc::new(GiveWay::std_clock());
        let p = pressure.clone();
        let held = Arc::new(HeldTime::default());
        let h = held.clone();
        std::thread::Builder::new()
            .name("bifs-hash".into())
            .spawn(move || {
                let mut idle = false;
                set_background(idle);
                while let Ok((image_held, job)) = rx.recv() {
                    // Readers read: wait (with a floor), and run in the background.
                    p.wait_blocking(&[&h, &image_held]);
                    let want = p.readers_within(READER_QUIET);
                    if want != idle {
                        idle = want;
                        set_background(idle);
                    }
                    job();
                }
            })
            .expect("a thread can be started at start-up");
        Self {
            tx: std::sync::Mutex::new(tx),
            pressure,
            held,
            feed_held: Arc::default(),
        }
    }

    /// How long hashing has waited for readers since the node started (`GiveWay`).
    pub fn held(&self) -> std::time::Duration {
        self.held.total()
    }

    /// Runs `f` on the hashing thread; None if the thread is gone. The thread's waits
    /// for readers before `f` are counted in `held` too (an image's, `hash_prefix`).
    pub async fn run<T: Send + 'static>(
        &self,
        held: Arc<HeldTime>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: HashJob = (
            held,
            Box::new(move || {
                let _ = tx.send(f());
            }),
        );
        self.tx.lock().unwrap().send(job).ok()?;
        rx.await.ok()
    }

    /// A reader is reading an image that is still arriving (waiting on a fetch, or
    /// served what readahead landed): hashing yields the CPU for a while.
    pub fn reader_active(&self) {
        self.pressure.reader();
    }
}

/// SHA-512 comes from OpenSSL: one stream of SHA-512 cannot be split across cores, so the
/// time to ready is bound by the fastest single-core implementation, and on this AMD EPYC
/// OpenSSL's assembly runs 723 MiB/s (`openssl speed -evp sha512`, 4 MiB blocks) where the
/// sha2 crate runs about 500 and `sha512sum` 465 (1 GiB: 2.2 s of CPU). SHA-256 stays with
/// sha2, which uses the SHA-NI instructions (about 1.5 GiB/s).
enum Hasher {
    Sha512(Box<openssl::sha::Sha512>),
    Sha256(Box<Sha256>),
}

impl Hasher {
    fn new(algo: Algo) -> Self {
        match algo {
            Algo::Sha512 => Self::Sha512(Box::new(openssl::sha::Sha512::new())),
            Algo::Sha256 => Self::Sha256(Box::default()),
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Self::Sha512(h) => h.update(b),
            Self::Sha256(h) => h.update(b),
        }
    }

    fn finish(self) -> String {
        match self {
            Self::Sha512(h) => hex::encode(h.finish()),
            Self::Sha256(h) => hex::encode(h.finalize()),
        }
    }
}

/// The most landed bytes the feeds of a node hold at once: images filling at the same
/// time share it, so memory does not grow with their number (when each image kept its
/// streams' bytes within 16 MiB, eight slow fills grew the daemon by 74 MiB).
const FEED_BUDGET: u64 = 16 * 1024 * 1024;

/// Bytes that landed where the hashed prefix ends, handed to the hasher as received, so
/// it hashes them without reading them back from the data file (a copy through the page
/// cache, and a read from disk if they were written back meanwhile). The fetcher offers
/// every batch it lands; the feed keeps one run from where the hasher is, extended by
/// batches that land at its end, as far as the node's `FEED_BUDGET` allows, and nothing
/// while no hasher runs. Batches landing elsewhere (the fill's other streams, a fill
/// that outran hashing) are read back, so they cost no memory here.
#[derive(Default)]
pub struct HashFeed {
    inner: Mutex<Feed>,
}

#[derive(Default)]
struct Feed {
    /// Where the held run starts: the end of what the hasher has taken; None while no
    /// hasher runs.
    at: Option<u64>,
    held: VecDeque<Bytes>,
    held_bytes: u64,
    /// The node's count of bytes held by every feed (the hashing thread's).
    budget: Option<Arc<AtomicU64>>,
}

impl Feed {
    /// Lets go of everything held.
    fn clear(&mut self) {
        self.held.clear();
        if let Some(b) = &self.budget {
            b.fetch_sub(self.held_bytes, Ordering::AcqRel);
        }
        self.held_bytes = 0;
    }
}

impl HashFeed {
    /// `chunks` landed back to back from `offset`: their blocks are present. Kept if they
    /// extend the held run and the budget allows.
    pub fn offer(&self, offset: u64, chunks: Vec<Bytes>) {
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let mut f = self.inner.lock().unwrap();
        let (Some(at), Some(budget)) = (f.at, f.budget.clone()) else {
            return;
        };
        if len == 0 || offset != at + f.held_bytes {
            return;
        }
        if budget.fetch_add(len, Ordering::AcqRel) + len > FEED_BUDGET {
            budget.fetch_sub(len, Ordering::AcqRel);
            return;
        }
        f.held_bytes += len;
        f.held.extend(chunks);
    }

    /// A hasher starts from the image's first byte, holding at most what `budget` (the
    /// node's) allows.
    fn start(&self, budget: Arc<AtomicU64>) {
        let mut f = self.inner.lock().unwrap();
        f.clear();
        f.budget = Some(budget);
        f.at = Some(0);
    }

    /// The hasher stopped: nothing more is kept.
    fn stop(&self) {
        let mut f = self.inner.lock().unwrap();
        f.clear();
        f.at = None;
        f.budget = None;
    }

    /// Up to `max` bytes of the held run (from where the hasher is); the hasher moves on
    /// past them.
    fn take(&self, max: u64) -> Vec<Bytes> {
        let mut f = self.inner.lock().unwrap();
        let mut out = Vec::new();
        let mut left = max.min(f.held_bytes);
        let taken = left;
        while left > 0 {
            let mut c = f.held.pop_front().expect("held_bytes counts the run");
            if c.len() as u64 > left {
                f.held.push_front(c.split_off(left as usize));
            }
            left -= c.len() as u64;
            out.push(c);
        }
        f.held_bytes -= taken;
        if let Some(b) = &f.budget {
            b.fetch_sub(taken, Ordering::AcqRel);
        }
        if let Some(at) = &mut f.at {
            *at += taken;
        }
        out
    }

    /// The hasher reads up to `end` from the data file: what is held goes (those bytes
    /// are read back), and bytes landing at `end` start a new run.
    fn skip_to(&self, end: u64) {
        let mut f = self.inner.lock().unwrap();
        f.clear();
        if f.at.is_some() {
            f.at = Some(end);
        }
    }
}

/// Stops the feed when the hasher ends, however it ends.
struct FeedGuard<'a>(&'a HashFeed);

impl Drop for FeedGuard<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// What `hash_prefix` needs of an image: no `Image`, so it runs in unit tests as is.
pub struct VerifyInput {
    pub files: Arc<ImageFiles>,
    pub map: Arc<BlockMap>,
    pub geo: Geometry,
    /// Woken when blocks land (or the image's state changes).
    pub landed: Arc<Notify>,
    pub algo: Algo,
    pub hasher: Arc<HashWorker>,
    /// Landed bytes offered to the hasher (the fetcher's).
    pub feed: Arc<HashFeed>,
    /// How long this image's hashing waited for readers (its status: `hashHeldMs`).
    pub held: Arc<HeldTime>,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
}

/// Hashes the image as the prefix of present blocks grows, until every byte is hashed
/// (the digest, hex) or `stop()` says to give up (None; also on shutdown).
pub async fn hash_prefix(input: VerifyInput, stop: impl Fn() -> bool) -> Result<Option<String>> {
    let VerifyInput {
        files,
        map,
        geo,
        landed,
        algo,
        hasher: worker,
        feed,
        held,
        metrics,
        cancel,
    } = input;
    let mut hasher = Some(Hasher::new(algo));
    let mut buf = Some(Vec::new());
    let mut hashed: u64 = 0; // bytes
    feed.start(worker.feed_held.clone());
    let _stop_feed = FeedGuard(&feed);
    loop {
        let notified = landed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if stop() || cancel.is_cancelled() {
            return Ok(None);
        }
        let block = hashed / geo.block_size;
        let run = if block < geo.blocks() {
            map.present_run(block)
        } else {
            0
        };
        let avail = ((block + run) * geo.block_size).min(geo.size);
        if avail > hashed {
            let end = avail.min(hashed + HASH_CHUNK);
            let (files, mut h, mut b) = (
                files.clone(),
                hasher.take().expect("the hasher is back after each chunk"),
                buf.take().expect("the buffer is back after each chunk"),
            );
            let start = hashed;
            // The bytes as received where the feed holds them, else read back; either way
            // bytes landing at `end` start the feed's next run.
            let fed = feed.take(end - start);
            let fed_len: u64 = fed.iter().map(|c| c.len() as u64).sum();
            let end = if fed_len > 0 {
                start + fed_len
            } else {
                feed.skip_to(end);
                end
            };
            let res = worker
                .run(held.clone(), move || {
                    if fed_len > 0 {
                        for c in &fed {
                            h.update(c);
                        }
                        return (h, b, Ok(()));
                    }
                    b.resize((end - start) as usize, 0);
                    let r = files.read_data(start, &mut b);
                    if r.is_ok() {
                        h.update(&b);
                    }
                    (h, b, r)
                })
                .await;
            let Some((h, b, r)) = res else {
                return Err(Error::ShuttingDown);
            };
            hasher = Some(h);
            buf = Some(b);
            r?;
            let counter = if fed_len > 0 {
                &metrics.hashed_received
            } else {
                &metrics.hashed_read_back
            };
            counter.fetch_add(end - start, Ordering::Relaxed);
            hashed = end;
            continue;
        }
        if hashed == geo.size {
            let digest = hasher.take().expect("the hasher is back").finish();
            debug!(bytes = hashed, algo = algo.as_str(), "image hashed");
            return Ok(Some(digest));
        }
        tokio::select! {
            _ = notified => {}
            _ = cancel.cancelled() => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize, fill: u8) -> Vec<Bytes> {
        vec![Bytes::from(vec![fill; n])]
    }

    /// The feed keeps only batches that extend its run from where the hasher is, and
    /// nothing while no hasher runs; the hasher takes the run as far as it asks, and what
    /// it reads back instead is let go.
    #[test]
    fn the_hash_feed_keeps_only_what_extends_the_hashed_prefix() {
        let f = HashFeed::default();
        f.offer(0, b(4096, 1));
        assert!(f.take(u64::MAX).is_empty(), "kept while no hasher ran");
        let budget = Arc::new(AtomicU64::new(0));
        f.start(budget.clone());
        f.offer(8192, b(4096, 3));
        assert!(
            f.take(u64::MAX).is_empty(),
            "a batch past a gap: read back later"
        );
        for (i, fill) in [1u8, 2, 3].into_iter().enumerate() {
            f.offer(i as u64 * 4096, b(4096, fill));
        }
        assert_eq!(
            budget.load(Ordering::SeqCst),
            12288,
            "the node counts what is held"
        );
        let got = f.take(6144);
        assert_eq!(
            got.iter().map(|c| c.len()).sum::<usize>(),
            6144,
            "as far as asked"
        );
        assert_eq!((got[0][0], got[1][0]), (1, 2));
        f.offer(12288, b(4096, 4));
        let rest = f.take(u64::MAX);
        assert_eq!(rest.iter().map(|c| c.len()).sum::<usize>(), 10240);
        assert_eq!((rest[0][0], rest[1][0], rest[2][0]), (2, 3, 4));
        assert_eq!(budget.load(Ordering::SeqCst), 0, "taken: no longer counted");
        f.offer(16384, b(4096, 5));
        f.skip_to(32768);
        assert_eq!(
            budget.load(Ordering::SeqCst),
            0,
            "read back instead: let go"
        );
        f.offer(20480, b(4096, 6));
        assert!(
            f.take(u64::MAX).is_empty(),
            "before where the hasher reads to"
        );
        f.offer(32768, b(4096, 7));
        assert_eq!(f.take(u64::MAX)[0][0], 7, "a new run where it reads to");
        f.stop();
        f.offer(36864, b(4096, 8));
        assert!(f.take(u64::MAX).is_empty(), "stopped: nothing kept");
    }

    /// The feeds of a node together hold no more than `FEED_BUDGET`: a second image
    /// filling at the same time gets what the first leaves.
    #[test]
    fn the_feeds_of_a_node_share_one_budget() {
        let budget = Arc::new(AtomicU64::new(0));
        let (one, two) = (HashFeed::default(), HashFeed::default());
        one.start(budget.clone());
        two.start(budget.clone());
        let mib = 1024 * 1024;
        for i in 0..12 {
            one.offer(i * mib, b(mib as usize, 1));
        }
        for i in 0..8 {
            two.offer(i * mib, b(mib as usize, 2));
        }
        let held = |f: &HashFeed| f.take(u64::MAX).len();
        assert_eq!(held(&one) + held(&two), 16, "12 + 4 MiB of 20 offered");
        assert_eq!(budget.load(Ordering::SeqCst), 0, "all taken");
    }

    #[test]
    fn hashing_stays_in_the_background_only_while_readers_are_active() {
        let w = HashWorker::start();
        assert!(!w.pressure.readers_within(READER_QUIET), "no reader yet");
        w.reader_active();
        assert!(w.pressure.readers_within(READER_QUIET));
        std::thread::sleep(READER_QUIET + Duration::from_millis(50));
        assert!(
            !w.pressure.readers_within(READER_QUIET),
            "quiet again after READER_QUIET"
        );
    }

    #[tokio::test]
    async fn a_hash_job_waits_while_a_reader_reads_and_runs_when_it_pauses() {
        use crate::core::give_way;
        let w = HashWorker::start();
        assert_eq!(w.pressure.wait(&w.held), None, "no reader: hashing runs");
        w.reader_active();
        let t = std::time::Instant::now();
        let image = Arc::new(HeldTime::default());
        let ran_after = w.run(image.clone(), move || t.elapsed()).await.unwrap();
        // The reader's mark is on a millisecond clock: up to 1 ms earlier than `t`.
        assert!(
            ran_after + Duration::from_millis(2) >= give_way::QUIET,
            "ran {ran_after:?} after a read"
        );
        assert!(
            ran_after < give_way::HOLD_MAX,
            "ran {ran_after:?} after a read"
        );
        // The wait is the thread's and the image's whose job waited, and no other's.
        let ms = Duration::from_millis;
        let waited = image.total();
        assert!(
            waited + ms(2) >= give_way::QUIET && waited <= ran_after + ms(2),
            "the image's count: {waited:?}, ran {ran_after:?} after a read"
        );
        assert_eq!(w.held(), waited, "the thread's count");
        w.reader_active();
        let other = Arc::new(HeldTime::default());
        assert!(w.run(other.clone(), || ()).await.is_some());
        assert_eq!(
            image.total(),
            waited,
            "another image's job counts in its own"
        );
        assert!(other.total() > Duration::ZERO, "{:?}", other.total());
        assert!(w.held() > waited, "the thread counts every wait");
    }
}
