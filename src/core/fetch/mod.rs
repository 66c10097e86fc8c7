//! The fetcher: turns "these blocks are needed" into range requests to an image's
//! sources, and lands what arrives. It owns the block map, the image's files, the
//! sources, the pinned version, the in-flight jobs and the data-file writer; it knows
//! nothing of `Image` and reports what happened through `FetchObserver`, so the image
//! alone runs the state machine. Everything here runs against `MemSource` in
//! `cargo test --lib`, without a mount or a network.
//!
//! - Single flight: an absent block is covered by at most one `Job` (a contiguous run of
//!   blocks, one request); every reader that needs it waits on that job's progress.
//! - Request size follows the access pattern: an isolated miss asks only for its own
//!   blocks (16 KiB by default); a sequential reader gets a readahead window that doubles
//!   up to `readahead_max` and resets on a seek (as mountpoint-s3's prefetcher), cut
//!   into requests of at most `max_request` (4 MiB) so several are in flight.
//! - Bytes land progressively through one path (`land`: write, set bits, mark dirty,
//!   notify), shared by every source and by uploads: a reader waits for its own blocks,
//!   not the whole request, and when they come in one job it is answered from the
//!   received bytes before they are written (`Fetcher::ensure_read`): the write of a
//!   reader's 16 KiB could wait 5-10 ms behind the fill's writes and the journal.
//! - Several sources, asked in order: one that answers `Absent` or fails with an error
//!   that may pass moves the request to the next; a permanent error (the version is gone)
//!   ends the job. Retryable errors are retried with backoff from the first block not
//!   yet landed.
//! - No stranded waiters: a job whose task panics or is dropped wakes its waiters with
//!   an error (`JobGuard`), and a reader gives up after `read_timeout` with the reason.
//! - Readers first. On two cores a fill at full speed (receive, write, hash) held the
//!   CPU, the async workers and the origin that a reader's one small request needs: a
//!   cold random 4 KiB read took 8-75 ms with the fill running against 0.5 ms without.
//!   So while a reader waits on a fetch, fill jobs no reader waits on stop taking bytes
//!   off their streams (and the fill starts no new job) for at most `FILL_YIELD_MAX`,
//!   and then take at least `FILL_RUN_MIN` before they pause again; fill jobs may run on
//!   a runtime of their own at a lower CPU priority (`FetchConfig::fill_runtime`), raised
//!   while a reader waits on a fill job (`FetchConfig::fill_priority`); the
//!   data file is written behind (`ImageFiles::note_written`); while readers far ahead of
//!   the fill read (or readers of an image with no fill running), every fill on the node
//!   starts no job and takes no bytes at all, with a floor
//!   (`GiveWay`: at least 1% of the time under reads that never pause; the hashing thread
//!   does the same), and its requests are short (`FILL_REQUEST_NEAR_READERS`), so that the
//!   origin has little of the fill's to send before it answers a reader's request; and a
//!   reader whose blocks lie far ahead of a fill stream (`CUT_AHEAD`) cuts the fill job
//!   short there and fetches the rest itself rather than wait for the stream to get
//!   there. The fill keeps all its streams: readers that read where it is about to be
//!   (a VM's boot files near the start of the image) are served best by it running
//!   ahead at full speed (one stream while readers were about made a boot-like pattern
//!   4x slower).

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

mod stream;

use super::bitmap::BlockMap;
use super::error::{Error, Result};
use super::give_way::{GiveWay, HeldTime};
use super::jobs::{Claims, Job, JobTable};
use super::metrics::Metrics;
use super::pieces::PieceDigests;
use super::range::{BlockRange, ByteRange, Geometry};
use super::source::{Identity, Priority, Sources};
use super::store::{page_io, BufPool, ImageFiles};
use super::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use super::sync::{Mutex, RwLock};
use super::verify::HashFeed;

/// How many times a job retries a retryable error without making progress.
const MAX_ATTEMPTS: u32 = 6;
/// How long a reader pauses before asking again after its job failed for a cause that
/// may pass.
const READER_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The most a job writes at once: received bytes are written when they reach a multiple
/// of it in the data file, where folios come out whole (`stream::batch_len`); a job
/// smaller than this writes once.
const WRITE_BATCH: usize = 256 * 1024;
/// The longest a fill stream (or the start of a fill job) pauses for waiting readers; a
/// stream that paused then takes at least `FILL_RUN_MIN` before it pauses again. So a
/// reader that waits long (a stalled source) and readers that never stop waiting (a busy
/// VM) slow the fill, they do not stop it: it keeps at least a few MiB/s per stream.
const FILL_YIELD_MAX: Duration = Duration::from_millis(20);
const FILL_RUN_MIN: usize = 1024 * 1024;
/// A reader waiting on a block this far ahead of where a fill job has landed fetches it
/// itself (`Claims::cut`): a fill stream gets there in about 1 ms at its 200-300 MiB/s,
/// a request of the reader's own takes 0.2-0.5 ms on a loopback origin, and up to a
/// whole 4 MiB job later (15-20 ms) is what waiting used to cost.
const CUT_AHEAD: u64 = 256 * 1024;
/// The largest fill request while readers far ahead of the fill are about (one waited on
/// a fetch at least `FetchConfig::far_from_fill` past the fill's last request, within
/// `READERS_RECENT`). An origin answers a reader's request after what it is sending the
/// fill: nginx sends each response in up to 2 MiB per turn of its event loop, so four fill
/// streams of 4 MiB requests kept a reader's 16 KiB waiting 2-4 ms (p99) where the idle
/// origin answers in 0.2 ms. Requests this short bound what the fill has asked of the
/// origin at any time to 512 KiB: p99 1.1-1.4 ms, against 1.4-2.4 ms with 256 KiB
/// requests and no change with 1 MiB; the fill, with a reader reading far ahead of it all
/// along, was no slower than with 4 MiB requests (2 GiB ready in 5.0-5.2 s against
/// 5.2-6.5 s). Readers near the fill are
/// served best by it running ahead at full speed (a VM's boot files near the start of
/// the image: short requests made a boot-like pattern 3x slower), so they do not count.
const FILL_REQUEST_NEAR_READERS: u64 = 128 * 1024;
const READERS_RECENT: Duration = Duration::from_millis(200);

/// Tunables of the fetch path.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// The largest single range request to a source.
    pub max_request: u64,
    /// The largest readahead window of a sequential reader.
    pub readahead_max: u64,
    /// How long a reader waits for absent blocks before it gets EIO (None: for ever).
    pub read_timeout: Option<Duration>,
    /// Where fill jobs run (None: where the fill runs). The daemon gives them a runtime
    /// of their own at a lower CPU priority, so a reader's tasks never queue behind fill
    /// streams on the async workers and win the CPU when both want it.
    pub fill_runtime: Option<tokio::runtime::Handle>,
    /// Raises the fill runtime's CPU priority while a reader waits on a fill job (None:
    /// nothing to raise). A reader waiting on a fill stream must not wait behind the
    /// priority that keeps the fill out of readers' way: with its threads at nice 10, a
    /// sequential read of a qcow2's raw view, which waits on fill jobs all the way, took
    /// 1.5-2.4 s against 0.73-0.77 s with them always at nice 0 (raised only while such
    /// readers wait: a median of 0.86 s against 0.97 s, 6 runs each, same conditions).
    pub fill_priority: Option<Arc<dyn ReadersOnFill>>,
    /// A reader waiting this far past the fill's last request is far ahead of it: the
    /// fill will not reach its blocks soon, and its requests are kept short while such
    /// readers are about (`FILL_REQUEST_NEAR_READERS`). 128 MiB: about 100 ms of the
    /// fill's work on a fast origin.
    pub far_from_fill: u64,
    /// Readers far ahead of a fill, node-wide: every image's fill gives way to them
    /// (`GiveWay`), not only the fill of the image they read. On two cores another
    /// image's fill takes the same CPU (and often the same origin) a reader needs. Clones
    /// of one config share it; each `default()` makes a new one.
    pub far_readers: Arc<GiveWay>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            max_request: 4 * 1024 * 1024,
            readahead_max: 64 * 1024 * 1024,
            read_timeout: Some(Duration::from_secs(120)),
            fill_runtime: None,
            fill_priority: None,
            far_from_fill: 128 * 1024 * 1024,
            far_readers: Arc::new(GiveWay::new()),
        }
    }
}

/// Told when readers begin and end waiting on fill jobs (node-wide: the fill's threads
/// serve every image). `enter` and `leave` come in pairs; quick.
pub trait ReadersOnFill: Send + Sync + std::fmt::Debug {
    fn enter(&self);
    fn leave(&self);
}

/// A reader waiting on a fill job, while it lives.
struct OnFill(Arc<dyn ReadersOnFill>);

impl OnFill {
    fn new(p: &Arc<dyn ReadersOnFill>) -> Self {
        p.enter();
        Self(p.clone())
    }
}

impl Drop for OnFill {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// What the fetcher tells its owner. Called on the fetching task, so quick.
pub trait FetchObserver: Send + Sync {
    /// These blocks landed (their bits are set, not yet durable).
    fn landed(&self, blocks: BlockRange);
    /// A job ended with `err` after its retries.
    fn fetch_failed(&self, err: &Error, prio: Priority);
    /// A reader waits for (or was served) bytes that are still arriving.
    fn reader_active(&self);
}

/// An image's fill runs while this lives (`Fetcher::fill_running`).
pub struct FillRunning(Arc<Fetcher>);

impl Drop for FillRunning {
    fn drop(&mut self) {
        self.0.fills_running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a reader waiting on a fetch while it lives; the last one gone wakes the fill
/// streams paused for readers.
struct Waiting<'a>(&'a Fetcher);

impl<'a> Waiting<'a> {
    /// A reader waits for blocks from `first` on (`probe`: the daemon's own read of the
    /// first block for the format, which holds nothing back).
    fn new(fetcher: &'a Fetcher, first: u64, probe: bool) -> Self {
        fetcher.readers_waiting.fetch_add(1, Ordering::AcqRel);
        // Far ahead of the fill (`FetchConfig::far_from_fill`), or no fill of this image
        // runs (switched off, or not begun): no fill brings the blocks soon. Every fill
        // on the node then gives way (`FetchConfig::far_readers`).
        let far = fetcher.cfg.far_from_fill / fetcher.geo.block_size;
        if !probe
            && (fetcher.fills_running.load(Ordering::Relaxed) == 0
                || first >= fetcher.fill_front.load(Ordering::Relaxed) + far)
        {
            fetcher.cfg.far_readers.reader();
        }
        Self(fetcher)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.0.readers_waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.readers_changed.notify_waiters();
        }
    }
}

pub struct Fetcher {
    /// The image's name, for logs and errors.
    name: String,
    geo: Geometry,
    map: Arc<BlockMap>,
    files: Arc<ImageFiles>,
    pin: Identity,
    sources: RwLock<Arc<Sources>>,
    cfg: FetchConfig,
    buffers: Arc<BufPool>,
    metrics: Arc<Metrics>,
    inflight: Arc<JobTable>,
    /// One write into the data file at a time: concurrent pwritevs of one file serialise
    /// on its inode lock in the kernel anyway, spinning there (13% of the daemon's CPU
    /// on a cold read); waiting here frees the worker for other streams instead.
    writer: tokio::sync::Mutex<()>,
    /// Woken whenever blocks land or a job ends.
    landed: Arc<Notify>,
    /// Readers waiting on a fetch now, and a wake-up for paused fill streams when the
    /// last of them is served or a reader starts waiting on a job (which may be theirs).
    readers_waiting: AtomicUsize,
    readers_changed: Notify,
    /// How long this image's fill gave way to far readers (`FetchConfig::far_readers`).
    fill_held: HeldTime,
    /// Fills of this image running (`FillRunning`): 0 or 1, but an old one may still end
    /// after a new one began.
    fills_running: AtomicUsize,
    /// Told when a reader starts waiting on a fill job (a fill stream held for far
    /// readers runs again at once).
    fill_waited: Notify,
    /// The end of the fill's last job (a block).
    fill_front: AtomicU64,
    fetched_bytes: AtomicU64,
    /// Landed bytes offered to verification, so it need not read them back.
    feed: Arc<HashFeed>,
    /// Set by the owner when the image failed: nothing more is fetched or landed.
    halted: RwLock<Option<Error>>,
    is_halted: AtomicBool,
    /// Per-piece digests from a verified copy: once set, every piece is checked as it lands.
    pieces: RwLock<Option<Arc<PieceDigests>>>,
    /// The last error of a fill job that did not halt the fetcher (the fill stops on it).
    fill_error: Mutex<Option<Error>>,
    cancel: CancellationToken,
    observer: OnceLock<Weak<dyn FetchObserver>>,
}

/// What `plan` did: the jobs to wait on (each with the block it must reach), and the
/// run of the last job it started.
type Plan = (Vec<(Arc<Job>, u64)>, Option<BlockRange>);

impl Fetcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        geo: Geometry,
        map: Arc<BlockMap>,
        files: Arc<ImageFiles>,
        pin: Identity,
        sources: Sources,
        cfg: FetchConfig,
        buffers: Arc<BufPool>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            name,
            geo,
            map,
            files,
            pin,
            sources: RwLock::new(Arc::new(sources)),
            cfg,
            buffers,
            metrics,
            inflight: Arc::default(),
            writer: tokio::sync::Mutex::new(()),
            landed: Arc::new(Notify::new()),
            readers_waiting: AtomicUsize::new(0),
            fill_held: HeldTime::default(),
            fills_running: AtomicUsize::new(0),
            fill_waited: Notify::new(),
            fill_front: AtomicU64::new(0),
            readers_changed: Notify::new(),
            feed: Arc::default(),
            fetched_bytes: AtomicU64::new(0),
            halted: RwLock::new(None),
            is_halted: AtomicBool::new(false),
            pieces: RwLock::new(None),
            fill_error: Mutex::new(None),
            cancel,
            observer: OnceLock::new(),
        }
    }

    /// Whom to tell about landings and failures (set once, by the owner).
    pub fn set_observer(&self, observer: Weak<dyn FetchObserver>) {
        let _ = self.observer.set(observer);
    }

    fn observer(&self) -> Option<Arc<dyn FetchObserver>> {
        self.observer.get().and_then(Weak::upgrade)
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn map(&self) -> &Arc<BlockMap> {
        &self.map
    }

    pub fn files(&self) -> &Arc<ImageFiles> {
        &self.files
    }

    pub fn pin(&self) -> &Identity {
        &self.pin
    }

    pub fn config(&self) -> &FetchConfig {
        &self.cfg
    }

    /// Woken whenever blocks land or a job ends (the verifier waits on it).
    pub fn landed_notify(&self) -> Arc<Notify> {
        self.landed.clone()
    }

    /// Where landed bytes are offered to verification.
    pub fn hash_feed(&self) -> Arc<HashFeed> {
        self.feed.clone()
    }

    pub fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes.load(Ordering::Relaxed)
    }

    /// How long this image's fill has given way to readers far ahead of a fill (of this
    /// image or another on the node: `FetchConfig::far_readers`), since this daemon
    /// opened the image.
    pub fn fill_held(&self) -> Duration {
        self.fill_held.total()
    }

    /// The single-flight table (the model tests look into it).
    #[cfg(all(test, feature = "shuttle"))]
    pub(crate) fn jobs(&self) -> &JobTable {
        &self.inflight
    }

    /// The sources, first asked first.
    pub fn sources(&self) -> Arc<Sources> {
        self.sources.read().unwrap().clone()
    }

    pub fn set_sources(&self, sources: Sources) {
        *self.sources.write().unwrap() = Arc::new(sources);
    }

    /// The piece digests every landing is checked against, once known.
    pub fn pieces(&self) -> Option<Arc<PieceDigests>> {
        self.pieces.read().unwrap().clone()
    }

    /// Installs piece digests (from a verified copy); from now on pieces are checked.
    pub fn set_pieces(&self, pieces: Arc<PieceDigests>) {
        *self.pieces.write().unwrap() = Some(pieces);
    }

    /// Stops all fetching and landing: jobs end with `err`, readers get it.
    pub fn halt(&self, err: Error) {
        *self.halted.write().unwrap() = Some(err.clone());
        self.is_halted.store(true, Ordering::Release);
        self.inflight.fail_all(&err);
        self.landed.notify_waiters();
    }

    /// Lets fetching go on after `halt` (a retry of a failure that can pass).
    pub fn resume(&self) {
        *self.halted.write().unwrap() = None;
        self.is_halted.store(false, Ordering::Release);
        self.inflight.clear_errors();
        self.fill_error.lock().unwrap().take();
    }

    fn halted(&self) -> Option<Error> {
        if !self.is_halted.load(Ordering::Acquire) {
            return None;
        }
        self.halted.read().unwrap().clone()
    }

    /// Why the last fill job ended in error without halting (the fill stops on it).
    pub fn take_fill_error(&self) -> Option<Error> {
        self.fill_error.lock().unwrap().take()
    }

    /// How far ahead of a fill job's landings a waiting reader's block must lie for the
    /// reader to cut the job (`CUT_AHEAD`), in blocks.
    fn cut_ahead(&self) -> u64 {
        (CUT_AHEAD / self.geo.block_size).max(1)
    }

    fn max_blocks(&self) -> u64 {
        (self.cfg.max_request / self.geo.block_size).max(1)
    }

    /// The largest request of a job of `prio`, in blocks: fill requests are short while
    /// readers far ahead of the fill are about (`FILL_REQUEST_NEAR_READERS`).
    fn request_blocks(&self, prio: Priority) -> u64 {
        let max = self.max_blocks();
        if prio == Priority::Fill && self.cfg.far_readers.readers_within(READERS_RECENT) {
            max.min((FILL_REQUEST_NEAR_READERS / self.geo.block_size).max(1))
        } else {
            max
        }
    }

    /// Reads `bytes`, every block of them present, from the data file.
    pub fn read_present(&self, bytes: ByteRange) -> Result<Bytes> {
        let mut buf = self.buffers.take(bytes.len() as usize);
        self.files.read_data(bytes.start, buf.as_mut_slice())?;
        Ok(Bytes::from_owner(buf))
    }

    /// As `read_present`, on the blocking pool when the read is large.
    pub async fn read_present_async(self: &Arc<Self>, bytes: ByteRange) -> Result<Bytes> {
        let me = self.clone();
        page_io(bytes.len() as usize, move || me.read_present(bytes)).await
    }

    /// Plans jobs for the absent, uncovered blocks of `range`, returning those to wait
    /// on when `wait` is set. `permit`: the first new job takes it (the fill's limit),
    /// and then only one job is started.
    fn plan(
        self: &Arc<Self>,
        range: BlockRange,
        wait: bool,
        mut permit: Option<OwnedSemaphorePermit>,
        prio: Priority,
    ) -> Plan {
        let mut waits = Vec::new();
        let mut started = None;
        let one_job = permit.is_some();
        let sources = self.sources();
        let ranged = sources.ranged();
        let max_blocks = self.request_blocks(prio);
        let mut inflight = self.inflight.lock();
        let mut b = range.start;
        while b < range.end {
            let Some(m) = self.map.first_missing(BlockRange::new(b, range.end)) else {
                break;
            };
            if let Some(job) = inflight.covering(m) {
                // A reader far ahead of a fill stream fetches its blocks itself: the rest
                // of the fill job becomes a job of its own, from the reader's first block.
                let old_end = job.end();
                if wait
                    && prio == Priority::Reader
                    && job.prio == Priority::Fill
                    && ranged
                    && self.pieces().is_none()
                    && m >= job.reserved() + self.cut_ahead()
                    && inflight.cut(&job, m)
                {
                    let run = BlockRange::new(m, old_end);
                    let job = inflight.claim(run, prio);
                    self.spawn_job(self.guard(job.clone()), None);
                    debug!(image = %self.name, ?run, "a reader cut a fill job short");
                    started = Some(run);
                    b = run.end;
                    waits.push((job, run.end.min(range.end)));
                    continue;
                }
                b = old_end;
                if wait {
                    waits.push((job.clone(), old_end.min(range.end)));
                }
                continue;
            }
            // Several nodes filling this image at once share the work unit by unit.
            let shared = match (&sources.fill_policy, prio) {
                (Some(p), Priority::Fill) if ranged => p.unit_bytes().map(|u| (p, u)),
                _ => None,
            };
            if let Some((policy, unit_bytes)) = shared {
                let unit = (unit_bytes / self.geo.block_size).max(1);
                let start = m / unit * unit;
                let run = BlockRange::new(start, (start + unit).min(self.geo.blocks()));
                // A unit that a reader's job covers in part waits: fetching it whole
                // would fetch that job's blocks twice.
                if policy.defer(self.geo.bytes_of(run)) || inflight.in_the_way(run).is_some() {
                    b = run.end;
                    continue;
                }
                let job = inflight.claim(run, prio);
                self.spawn_job(self.guard(job), permit.take());
                started = Some(run);
                break;
            }
            let run = if !ranged {
                // Without range support the one stream covers the whole image.
                BlockRange::new(0, self.geo.blocks())
            } else if let Some(pieces) = self.pieces() {
                let run = self.piece_run(&pieces, m, range, &inflight);
                // A job planned before the digests arrived may lie in these pieces: wait
                // for it to end (not only land: its blocks are not the reader's), then plan
                // the pieces whole, rather than fetch its blocks twice. Its error is the
                // reader's: the pieces the reader needs hold its blocks.
                if let Some(job) = inflight.in_the_way(run) {
                    if wait {
                        waits.push((job, u64::MAX));
                    }
                    b = run.end;
                    continue;
                }
                run
            } else {
                let next_job = inflight.next_start(m);
                let present = self
                    .map
                    .first_present(BlockRange::new(m, range.end))
                    .unwrap_or(range.end);
                BlockRange::new(m, range.end.min(next_job).min(present).min(m + max_blocks))
            };
            let job = inflight.claim(run, prio);
            self.spawn_job(self.guard(job.clone()), permit.take());
            started = Some(run);
            b = run.end;
            if wait {
                waits.push((job, run.end.min(range.end)));
            }
            if one_job {
                break;
            }
        }
        (waits, started)
    }

    /// With piece digests a job covers whole pieces (each is checked before it lands):
    /// from the piece holding block `m`, on through pieces that still miss a block, up to
    /// the request limit, the next job or the end of the asked range.
    fn piece_run(
        &self,
        pieces: &PieceDigests,
        m: u64,
        range: BlockRange,
        inflight: &Claims,
    ) -> BlockRange {
        let blocks = self.geo.blocks();
        let unit = (pieces.piece_size / self.geo.block_size).max(1);
        let start = m / unit * unit;
        let next_job = inflight.next_start(start + 1);
        let limit = (range.end.div_ceil(unit) * unit)
            .min(start + self.max_blocks().div_ceil(unit).max(1) * unit)
            .min(blocks);
        let mut end = (start + unit).min(blocks);
        while end < limit && end + unit <= next_job {
            let next = (end + unit).min(blocks);
            if self.map.all_set(BlockRange::new(end, next)) {
                break;
            }
            end = next;
        }
        BlockRange::new(start, end)
    }

    /// Makes every block of `range` present, fetching what is absent, for the daemon's
    /// own use (the format probe): a reader, but one neither the fills nor the hashing
    /// thread give way to.
    /// True if it had to wait for a fetch (a cache miss), false if all was present.
    pub async fn ensure(self: &Arc<Self>, range: BlockRange) -> Result<bool> {
        Ok(self.wait_present(range, None, true).await?.0)
    }

    /// As `ensure` for the blocks of `bytes`; with `early`, when those bytes arrive in
    /// one job, also their content as soon as it arrived, before it is written (then the
    /// blocks may not be present yet: the caller answers with it, not from the file).
    pub async fn ensure_read(
        self: &Arc<Self>,
        bytes: ByteRange,
        early: bool,
    ) -> Result<(bool, Option<Bytes>)> {
        let want = early.then_some(bytes);
        self.wait_present(self.geo.blocks_of(bytes), want, false)
            .await
    }

    async fn wait_present(
        self: &Arc<Self>,
        range: BlockRange,
        want: Option<ByteRange>,
        probe: bool,
    ) -> Result<(bool, Option<Bytes>)> {
        let deadline = self
            .cfg
            .read_timeout
            .map(|t| tokio::time::Instant::now() + t);
        let mut waiting = None;
        loop {
            if let Some(e) = self.halted() {
                return Err(e);
            }
            if self.map.all_set(range) {
                return Ok((waiting.is_some(), None));
            }
            waiting.get_or_insert_with(|| Waiting::new(self, range.start, probe));
            let (waits, _) = self.plan(range, true, None, Priority::Reader);
            if let Some(o) = self.observer().filter(|_| !probe) {
                o.reader_active();
            }
            let one_job = waits.len() == 1;
            for (job, upto) in waits {
                // Subscribed now, and said: a fill stream paused for readers looks again,
                // and does not keep one that waits on it waiting.
                let mut rx = job.progress.subscribe();
                self.readers_changed.notify_waiters();
                if job.prio == Priority::Fill {
                    self.fill_waited.notify_waiters();
                }
                let _raised = match &self.cfg.fill_priority {
                    Some(p) if job.prio == Priority::Fill => Some(OnFill::new(p)),
                    _ => None,
                };
                let early = want.filter(|_| one_job);
                let timeout = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => futures::future::pending().await,
                    }
                };
                tokio::select! {
                    r = Job::wait_arrived(&mut rx, upto, early) => match r {
                        Ok(Some(bytes)) => return Ok((true, Some(bytes))),
                        Ok(None) => {}
                        // A source that cannot serve for now: try again (a new job) after
                        // a pause, until the deadline; anything else is the reader's error.
                        Err(e) if self.worth_waiting(&e) => self.retry_pause(e, deadline).await?,
                        Err(e) => return Err(e),
                    },
                    _ = self.cancel.cancelled() => return Err(Error::ShuttingDown),
                    _ = timeout => {
                        let bytes = self.geo.bytes_of(range);
                        let secs = self.cfg.read_timeout.map_or(0, |t| t.as_secs());
                        let reason = "the source is slow, stalled or unreachable".to_string();
                        warn!(image = %self.name, ?bytes, secs, %reason, "read gave up waiting");
                        return Err(Error::ReadTimeout {
                            name: self.name.clone(),
                            start: bytes.start,
                            end: bytes.end,
                            secs,
                            reason,
                        });
                    }
                }
            }
        }
    }

    /// A reader's pause after its job failed with `e`, a cause that may pass: Ok to plan
    /// again, or `e` once the deadline has passed.
    async fn retry_pause(&self, e: Error, deadline: Option<tokio::time::Instant>) -> Result<()> {
        tokio::select! {
            _ = super::sync::sleep(READER_RETRY_PAUSE) => {}
            _ = self.cancel.cancelled() => return Err(Error::ShuttingDown),
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Err(e);
        }
        Ok(())
    }

    /// Whether a reader whose job ended with `e` should wait and try again: the source
    /// may come back (unreachable, busy), or a peer may get the blocks. An image with no
    /// source at all answers at once.
    fn worth_waiting(&self, e: &Error) -> bool {
        match e {
            Error::Source(s) => s.is_retryable(),
            Error::NoSource { .. } => !self.sources().list.is_empty(),
            _ => false,
        }
    }

    /// Waits while readers wait on fetches, for at most `FILL_YIELD_MAX` (the fill calls
    /// it before it starts a job).
    pub async fn yield_to_readers(&self) {
        self.yield_for(None).await
    }

    /// As `yield_to_readers`, but not when a reader waits on `job` (a fill stream calls
    /// it between chunks). Readers far ahead of the fill are given way to first, while
    /// they read (`GiveWay`: the fill waits, with a floor).
    async fn yield_for(&self, job: Option<&Job>) {
        let deadline = tokio::time::Instant::now() + FILL_YIELD_MAX;
        loop {
            // Enabled before the checks, so that a reader arriving between them wakes us.
            let (waited, gone) = (self.fill_waited.notified(), self.readers_changed.notified());
            tokio::pin!(waited, gone);
            waited.as_mut().enable();
            gone.as_mut().enable();
            if job.is_some_and(|j| j.has_waiters()) {
                return;
            }
            if let Some(d) = self.cfg.far_readers.wait(&self.fill_held) {
                // Far readers read: held, with a floor (`GiveWay`); woken early only by a
                // reader that starts waiting on a fill job (not by every read).
                tokio::select! {
                    _ = waited => {}
                    _ = super::sync::sleep_until(tokio::time::Instant::now() + d) => {}
                    _ = self.cancel.cancelled() => return,
                }
                continue;
            }
            if self.readers_waiting.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::select! {
                _ = gone => {}
                _ = super::sync::sleep_until(deadline) => return,
                _ = self.cancel.cancelled() => return,
            }
        }
    }

    /// Starts fetching `bytes` in the background (readahead for a reader).
    pub fn prefetch(self: &Arc<Self>, bytes: ByteRange) {
        let blocks = self.geo.blocks_of(bytes);
        self.plan(blocks, false, None, Priority::Reader);
    }

    /// Says the fill runs while the returned guard lives (`fill::run` holds it): readers
    /// of an image with no fill running count as far ahead of a fill.
    pub fn fill_running(self: &Arc<Self>) -> FillRunning {
        self.fills_running.fetch_add(1, Ordering::Relaxed);
        FillRunning(self.clone())
    }

    /// Starts one fill job for the first absent, uncovered blocks from `from` on; it
    /// holds `permit` until it ends. Returns the blocks it covers.
    pub fn start_fill_job(
        self: &Arc<Self>,
        from: u64,
        permit: OwnedSemaphorePermit,
    ) -> Option<BlockRange> {
        let range = BlockRange::new(from, self.geo.blocks());
        let run = self.plan(range, false, Some(permit), Priority::Fill).1;
        if let Some(run) = run {
            self.fill_front.store(run.end, Ordering::Relaxed);
        }
        run
    }
}
