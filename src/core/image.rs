//! One image on one disk of this node: the only place its state machine moves
//! (pending -> in-progress -> ready | failed), its status document, and the read path
//! every shell uses. It owns a `Fetcher` (blocks and sources), starts the verifier and
//! the fill on it, and hears back through `FetchObserver`; none of those modules know
//! `Image`. Node-wide resources (the hashing thread, the buffer pool) come from the node
//! (`Shared`), so building an image spawns nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::bitmap::BlockMap;
use super::error::{Error, FailureKind, Result, SourceError};
use super::fetch::{FetchConfig, FetchObserver, Fetcher};
use super::fill::{self, FillEnd};
use super::format::Format;
use super::give_way::HeldTime;
use super::lifecycle::Usage;
use super::metrics::Metrics;
use super::pieces::PieceDigests;
use super::qcow2::{RawViewSlot, StoredBytes};
use super::range::{BlockRange, ByteRange, Geometry};
use super::readahead::ReadState;
use super::source::Priority;
use super::source::Sources;
use super::spec::redact_url;
use super::spec::ChecksumAlgorithm;
use super::state::StateCell;
use super::status::{DiskDoc, SourceDoc, Status};
use super::store::{page_io, BufPool, Disk, ImageFiles, State, StoredSpec, StoredState};
use super::verify::{self, HashWorker, VerifyInput};
use super::view::{self, KernelCaps, OpenMode, View};

/// How long a fill that may share its work with peers waits for their polls at start.
const FILL_SETTLE: std::time::Duration = std::time::Duration::from_millis(1500);
/// The fill's first pause after a source could not serve, and its longest.
const FILL_RETRY_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const FILL_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Tunables shared by every image of a node.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// Presence granularity: what one bit of the bitmap covers.
    pub block_size: u64,
    /// Range requests the background fill keeps in flight.
    pub fill_parallel: usize,
    /// Reads wait until the image is verified (Longhorn's semantics).
    pub require_verified: bool,
    pub fetch: FetchConfig,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            block_size: 16 * 1024,
            fill_parallel: 4,
            require_verified: false,
            fetch: FetchConfig::default(),
        }
    }
}

/// Node-wide resources images use; the node starts them once.
#[derive(Clone, Debug)]
pub struct Shared {
    pub hasher: Arc<HashWorker>,
    pub buffers: Arc<BufPool>,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn start() -> Self {
        Self {
            hasher: Arc::new(HashWorker::start()),
            buffers: Arc::default(),
            metrics: Arc::default(),
        }
    }
}

/// What the shells hear about images: the FUSE shell drops kernel caches on these.
#[derive(Debug, Clone)]
pub enum ImageEvent {
    /// The image failed: cached pages of it must not be served any more.
    Failed { id: u64 },
    /// The image is gone from the node.
    Deleted { id: u64, name: String },
    /// The image is verified: new opens go through passthrough, so pages cached in the
    /// FUSE inode before (mmaps, raw views) are dropped now, off the next reader's path.
    Ready { id: u64 },
}

pub struct Image {
    pub name: String,
    /// Unique per image instance in this process: the FUSE shell derives inodes from it.
    pub id: u64,
    pub disk: Disk,
    fetcher: Arc<Fetcher>,
    stored: Mutex<StoredSpec>,
    state: StateCell,
    deleted: AtomicBool,
    /// A condition the image rides out without failing (no source can serve absent
    /// blocks, the fill stopped): shown as its error line.
    condition: Mutex<Option<String>>,
    fill_running: AtomicBool,
    /// Some block has landed (in this process or before): the state left pending.
    started: AtomicBool,
    /// The condition line is a source outage the fill rides out (cleared by a landing).
    riding_out: AtomicBool,
    /// Wakes a fill pausing after a failure (`bifs fill` asks for a retry now).
    retry_fill: tokio::sync::Notify,
    verify_running: AtomicBool,
    /// How long the node's hashing thread waited for readers before this image's chunks.
    hash_held: Arc<HeldTime>,
    cfg: ImageConfig,
    shared: Shared,
    cancel: CancellationToken,
    format: OnceLock<Format>,
    events: broadcast::Sender<ImageEvent>,
    raw_view: RawViewSlot,
    /// Names this version of this image to peers (`Identity::version_tag`).
    version: String,
    /// Open handles and the last use (delete, cleanup and eviction decide on them).
    usage: Usage,
    /// Piece digests of this node's verified copy, computed on first request.
    served_pieces: tokio::sync::OnceCell<Arc<PieceDigests>>,
    me: Weak<Image>,
}

/// Everything an image is built from.
pub struct ImageParts {
    pub id: u64,
    pub disk: Disk,
    pub files: Arc<ImageFiles>,
    pub stored: StoredSpec,
    pub state: StoredState,
    pub map: BlockMap,
    pub sources: Sources,
}

impl Image {
    pub fn new(
        parts: ImageParts,
        cfg: ImageConfig,
        shared: Shared,
        cancel: CancellationToken,
        events: broadcast::Sender<ImageEvent>,
    ) -> Arc<Image> {
        let ImageParts {
            id,
            disk,
            files,
            stored,
            state,
            map,
            sources,
        } = parts;
        let geo = Geometry::new(stored.identity.size, stored.block_size);
        let condition = sources.unavailable.clone();
        let fetcher = Arc::new(Fetcher::new(
            stored.spec.name.clone(),
            geo,
            Arc::new(map),
            files.clone(),
            stored.identity.clone(),
            sources,
            cfg.fetch.clone(),
            shared.buffers.clone(),
            shared.metrics.clone(),
            cancel.clone(),
        ));
        let failed = state.state == State::Failed;
        let started = state.state != State::Pending;
        let version = stored.identity.version_tag(&stored.spec);
        let state = StateCell::new(stored.spec.name.clone(), files.clone(), state);
        let image = Arc::new_cyclic(|me: &Weak<Image>| Image {
            name: stored.spec.name.clone(),
            id,
            disk,
            fetcher,
            stored: Mutex::new(stored),
            state,
            deleted: AtomicBool::new(false),
            condition: Mutex::new(condition),
            fill_running: AtomicBool::new(false),
            started: AtomicBool::new(started),
            riding_out: AtomicBool::new(false),
            retry_fill: tokio::sync::Notify::new(),
            verify_running: AtomicBool::new(false),
            hash_held: Arc::default(),
            cfg,
            shared,
            cancel,
            format: OnceLock::new(),
            events,
            raw_view: RawViewSlot::default(),
            version,
            usage: Usage::default(),
            served_pieces: tokio::sync::OnceCell::new(),
            me: me.clone(),
        });
        let observer: Weak<dyn FetchObserver> = image.me.clone();
        image.fetcher.set_observer(observer);
        if failed {
            image.fetcher.halt(image.failure());
        }
        image
    }

    /// Bytes the data file takes on disk (holes take none).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.fetcher
            .files()
            .data
            .metadata()
            .map_or(0, |m| m.blocks() * 512)
    }

    /// A handle `fh` was opened through the mount by `pid`.
    pub fn opened(&self, fh: u64, pid: u32) {
        self.usage.opened(fh, pid);
    }

    /// Handle `fh` was released.
    pub fn closed(&self, fh: u64) {
        self.usage.closed(fh);
    }

    /// The pids holding handles open now.
    pub fn open_pids(&self) -> Vec<u32> {
        self.usage.open_pids()
    }

    /// Records a use (an open, a close, a peer's fetch).
    pub fn touch(&self) {
        self.usage.touch();
    }

    /// How long since the last use.
    pub fn idle(&self) -> std::time::Duration {
        self.usage.idle()
    }

    /// The tag naming this version of this image (peers compare it).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Piece digests of this node's copy, for peers: only once it is ready (its whole
    /// checksum matched), computed from the data file on first request.
    pub async fn piece_digests(&self) -> Result<Arc<PieceDigests>> {
        if self.state() != State::Ready {
            return Err(Error::BadInput(format!(
                "image {:?} is not ready on this node; piece digests come only from a verified copy",
                self.name
            )));
        }
        let (files, size) = (self.fetcher.files().clone(), self.size());
        self.served_pieces
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || PieceDigests::compute(&files, size))
                    .await
                    .map_err(|_| Error::ShuttingDown)?
                    .map(Arc::new)
            })
            .await
            .cloned()
    }

    /// Asks each source that can give them for piece digests once; true if installed.
    pub async fn acquire_digests(&self) -> bool {
        if self.fetcher.pieces().is_some() {
            return true;
        }
        let sources = self.fetcher.sources();
        let pin = self.fetcher.pin().clone();
        for s in &sources.list {
            let Some(bytes) = s.piece_digests(&pin).await else {
                continue;
            };
            match PieceDigests::from_bytes(&bytes, self.size()) {
                Ok(p) => {
                    info!(image = %self.name, source = %s.describe(), pieces = p.pieces(), "piece digests received: every piece is checked from now on");
                    self.fetcher.set_pieces(Arc::new(p));
                    self.fetcher.landed_notify().notify_waiters();
                    return true;
                }
                Err(e) => {
                    warn!(image = %self.name, source = %s.describe(), error = %e, "piece digests refused")
                }
            }
        }
        false
    }

    /// Keeps asking for piece digests while the image is unfinished and some source
    /// needs them (peers are used only once they are known).
    fn start_digest_watch(self: &Arc<Self>) {
        let sources = self.fetcher.sources();
        if !sources.list.iter().any(|s| s.offers_digests()) || self.fetcher.pieces().is_some() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                if me.state().is_final() || me.cancel.is_cancelled() || me.acquire_digests().await {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = me.cancel.cancelled() => return,
                }
            }
        });
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    pub fn geometry(&self) -> Geometry {
        self.fetcher.geometry()
    }

    pub fn size(&self) -> u64 {
        self.geometry().size
    }

    pub fn block_size(&self) -> u64 {
        self.geometry().block_size
    }

    pub fn blocks(&self) -> u64 {
        self.geometry().blocks()
    }

    /// The image's data file (passthrough opens hand it to the kernel).
    pub fn data_path(&self) -> std::path::PathBuf {
        self.fetcher.files().dir.join("data")
    }

    pub fn present_blocks(&self) -> u64 {
        self.fetcher.map().present_count()
    }

    pub fn state(&self) -> State {
        self.state.get()
    }

    pub fn is_failed(&self) -> bool {
        self.state.is_failed()
    }

    pub fn stored(&self) -> StoredSpec {
        self.stored.lock().unwrap().clone()
    }

    /// Whether the background fill is switched on (no clone of the spec: asked per job).
    pub fn fill_enabled(&self) -> bool {
        self.stored.lock().unwrap().fill
    }

    /// When the image was created (the mount shows it as mtime; asked per getattr).
    pub fn created_unix(&self) -> u64 {
        self.stored.lock().unwrap().created_unix
    }

    pub fn error(&self) -> Option<String> {
        self.state.snapshot().error
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Progress in percent: present blocks over all blocks. 100 once ready, or once every
    /// block is cached on an image that failed (its checksum did not match).
    pub fn progress(&self) -> u32 {
        let state = self.state();
        let map = self.fetcher.map();
        if state == State::Ready || (state == State::Failed && map.is_complete()) {
            return 100;
        }
        let blocks = self.blocks().max(1);
        ((map.present_count() * 100 / blocks) as u32).min(99)
    }

    pub fn bytes_cached(&self) -> u64 {
        (self.present_blocks() * self.block_size()).min(self.size())
    }

    /// The format, once the first block is present (detected from its magic).
    pub fn format(&self) -> Option<Format> {
        if let Some(f) = self.format.get() {
            return Some(f.clone());
        }
        if self.blocks() == 0 {
            return Some(self.format.get_or_init(|| Format::Raw).clone());
        }
        if !self.fetcher.map().is_set(0) {
            return None;
        }
        let len = self.block_size().min(self.size()) as usize;
        let mut head = vec![0u8; len];
        self.fetcher.files().read_data(0, &mut head).ok()?;
        Some(self.format.get_or_init(|| Format::detect(&head)).clone())
    }

    // ---- the state machine ----

    /// Fails the image: readers get EIO from now on, the message says why.
    pub fn fail(&self, err: &Error) {
        if !self.state.fail(err) {
            return;
        }
        if matches!(err, Error::Checksum { .. }) {
            Metrics::add(&self.shared.metrics.verify_failures);
        }
        self.fetcher.halt(self.failure());
        error!(image = %self.name, disk = %self.disk.uuid8(), error = %err, "image failed");
        let _ = self.events.send(ImageEvent::Failed { id: self.id });
    }

    /// Clears a failure that a retry can cure (source down, disk full); not a checksum
    /// mismatch or a changed source, whose cached blocks cannot be trusted.
    pub fn clear_recoverable_failure(&self) -> Result<bool> {
        if !self.state.clear_failure(self.present_blocks() > 0)? {
            return Ok(false);
        }
        self.fetcher.resume();
        self.condition.lock().unwrap().take();
        Ok(true)
    }

    /// The error readers of a failed image get.
    pub fn failure(&self) -> Error {
        self.state.failure()
    }

    fn set_condition(&self, why: String) {
        self.riding_out.store(false, Ordering::Release);
        let mut c = self.condition.lock().unwrap();
        if c.as_deref() != Some(why.as_str()) {
            warn!(image = %self.name, condition = %why, "image cannot fetch; present blocks are still served");
            *c = Some(why);
        }
    }

    /// Switches the fill on (persisted); false if it was on already.
    pub fn enable_fill(&self) -> Result<bool> {
        let mut stored = self.stored.lock().unwrap();
        if stored.fill {
            return Ok(false);
        }
        stored.fill = true;
        self.fetcher.files().save_spec(&stored)?;
        Ok(true)
    }

    /// Starts verification and the fill (if switched on) of an unfinished image.
    pub fn start_background(self: &Arc<Self>) {
        if matches!(self.state(), State::Ready | State::Failed) {
            return;
        }
        if self.disk.read_only {
            // Nothing can land on a read-only disk: serve what is there and say why.
            self.set_condition(format!(
                "its disk {} is read-only: the blocks it holds are served, nothing more is \
                 fetched; remount the disk read-write and restart bifs to complete it",
                self.disk.path.display()
            ));
            return;
        }
        self.start_digest_watch();
        self.start_verify();
        self.start_fill();
    }

    fn start_verify(self: &Arc<Self>) {
        if self.verify_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (algo, _) = ChecksumAlgorithm::split(&self.stored.lock().unwrap().spec.checksum);
        let input = VerifyInput {
            files: self.fetcher.files().clone(),
            map: self.fetcher.map().clone(),
            geo: self.geometry(),
            landed: self.fetcher.landed_notify(),
            algo,
            hasher: self.shared.hasher.clone(),
            feed: self.fetcher.hash_feed(),
            held: self.hash_held.clone(),
            metrics: self.shared.metrics.clone(),
            cancel: self.cancel.clone(),
        };
        let me = self.clone();
        tokio::spawn(async move {
            let stop = || me.is_failed() || me.state() == State::Ready;
            match verify::hash_prefix(input, stop).await {
                Ok(Some(digest)) => me.finish_verify(digest).await,
                Ok(None) | Err(Error::ShuttingDown) => {}
                Err(e) => me.fail(&e),
            }
            me.verify_running.store(false, Ordering::Release);
        });
    }

    async fn finish_verify(&self, got: String) {
        let spec_sum = self.stored.lock().unwrap().spec.checksum.clone();
        let (_, want) = ChecksumAlgorithm::split(&spec_sum);
        if !want.is_empty() && !want.eq_ignore_ascii_case(&got) {
            self.fail(&Error::Checksum {
                want: spec_sum,
                got,
            });
            return;
        }
        // Ready promises that every byte is durable: flush before saying so.
        let (files, map) = (self.fetcher.files().clone(), self.fetcher.map().clone());
        let flushed = tokio::task::spawn_blocking(move || files.flush(&map))
            .await
            .unwrap_or(Err(Error::ShuttingDown));
        if let Err(e) = flushed {
            self.fail(&e);
            return;
        }
        match self.state.ready(got) {
            Ok(true) => {
                self.condition.lock().unwrap().take();
                info!(image = %self.name, disk = %self.disk.uuid8(), "ready: all blocks present and checksum verified");
                let _ = self.events.send(ImageEvent::Ready { id: self.id });
            }
            Ok(false) => {}
            Err(e) => error!(image = %self.name, error = %e, "cannot record ready state"),
        }
    }

    /// Starts the fill unless it runs already, it is switched off, or there is nothing to do.
    pub fn start_fill(self: &Arc<Self>) {
        if !self.fill_enabled() || matches!(self.state(), State::Ready | State::Failed) {
            return;
        }
        if self.fetcher.sources().list.is_empty() {
            return; // nothing to fill from; the condition says why
        }
        if self.fill_running.swap(true, Ordering::AcqRel) {
            // A fill pausing after a source failed tries again now (`bifs fill`).
            self.retry_fill.notify_one();
            return;
        }
        // A fill that stopped on an error is being retried: its condition is stale.
        self.condition.lock().unwrap().take();
        let me = self.clone();
        let span = tracing::info_span!("fill", image = %self.name);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                me.fill_until_done().await;
                me.fill_running.store(false, Ordering::Release);
            },
            span,
        ));
    }

    /// Runs the fill; a source that cannot serve for now (unreachable, busy, or no source
    /// has the blocks yet) is ridden out: the image stays in progress, its error line
    /// says since when, present blocks keep serving, and the fill tries again after a
    /// pause that doubles up to `FILL_RETRY_MAX`. Only a permanent problem fails the image
    /// (through `fetch_failed`).
    async fn fill_until_done(self: &Arc<Self>) {
        // With peers, other nodes may be starting on the same image right now: give the
        // peer polls a moment to find them, so the work is shared from the first piece
        // (readers are not held up by this; only the background fill waits).
        if self.fetcher.sources().fill_policy.is_some() {
            tokio::select! {
                _ = tokio::time::sleep(FILL_SETTLE) => {}
                _ = self.cancel.cancelled() => return,
            }
        }
        let mut pause = FILL_RETRY_MIN;
        let mut since: Option<std::time::SystemTime> = None;
        loop {
            let stop = || self.is_failed() || !self.fill_enabled();
            let end = fill::run(
                self.fetcher.clone(),
                self.cfg.fill_parallel,
                self.cancel.clone(),
                stop,
            )
            .await;
            let FillEnd::Failed(e) = end else { return };
            let t = *since.get_or_insert_with(std::time::SystemTime::now);
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.set_condition(format!(
                "source unavailable since {} (unix time {secs}), retrying every {} s at most: {e}",
                super::status::humantime_utc(t),
                FILL_RETRY_MAX.as_secs()
            ));
            self.riding_out.store(true, Ordering::Release);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.retry_fill.notified() => pause = FILL_RETRY_MIN,
                _ = self.cancel.cancelled() => return,
            }
            pause = (pause * 2).min(FILL_RETRY_MAX);
        }
    }

    /// Asks the origin (the last source) whether it still holds the version this image
    /// pinned, and fails the image if not. Run at start-up for unfinished images: an
    /// origin replaced while the daemon was down is reported at once, not when the first
    /// absent block is read. A source that cannot be asked is left to the fetches.
    pub async fn recheck_source(self: Arc<Self>) {
        if self.disk.read_only {
            return; // a failure could not be recorded there; its reads say what they can
        }
        let Some(origin) = self.fetcher.sources().list.last().cloned() else {
            return;
        };
        let pinned = self.fetcher.pin().clone();
        let now = tokio::select! {
            r = origin.probe() => r,
            _ = self.cancel.cancelled() => return,
        };
        let changed = match now {
            Ok(now) if now.size != pinned.size => Some(SourceError::Changed {
                what: "size",
                was: pinned.size.to_string(),
                now: now.size.to_string(),
            }),
            Ok(now) => pinned
                .check(now.etag.as_deref(), now.last_modified.as_deref())
                .err(),
            Err(e) => {
                warn!(image = %self.name, error = %e, "cannot check the source at start-up; fetches will tell");
                None
            }
        };
        if let Some(e) = changed {
            self.fail(&Error::Source(e));
        }
    }

    /// Marks the image deleted and stops its work: readers get "deleted".
    pub fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        self.cancel.cancel();
    }

    /// Readers of a deleted image learn that, not "the daemon is shutting down".
    fn explain(&self, e: Error) -> Error {
        match e {
            Error::ShuttingDown if self.deleted.load(Ordering::Acquire) => {
                Error::Deleted(self.name.clone())
            }
            e => e,
        }
    }

    // ---- the read path ----

    /// The read of `len` bytes at `offset` if it needs no waiting: every block present
    /// (and verified, when that is required). Runs on the caller's thread, so the FUSE
    /// shell answers such reads without a hop to an async worker: on a VM a thread
    /// wake-up costs as much as reading 1 MiB from the page cache. Must run inside the
    /// runtime (readahead may start fetches). None: use `read`.
    pub fn read_present(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
        ra: Option<&Mutex<ReadState>>,
    ) -> Option<Result<Bytes>> {
        if self.is_failed() {
            return Some(Err(self.failure()));
        }
        let bytes = self.geometry().clamp(offset, u64::from(len));
        if bytes.is_empty() {
            return Some(Ok(Bytes::new()));
        }
        let blocks = self.geometry().blocks_of(bytes);
        if !self.fetcher.map().all_set(blocks) || !self.verified_enough() {
            return None;
        }
        if self.state() != State::Ready {
            self.shared.hasher.reader_active();
        }
        Metrics::add(&self.shared.metrics.cache_hits);
        self.read_ahead(bytes, ra);
        Some(self.read_landed(bytes))
    }

    fn verified_enough(&self) -> bool {
        !self.cfg.require_verified || self.state() == State::Ready
    }

    /// Records a read in the caller's sequential-read state and starts the readahead
    /// it calls for.
    fn read_ahead(&self, bytes: ByteRange, ra: Option<&Mutex<ReadState>>) {
        if let Some(ra) = ra {
            let ahead = ra
                .lock()
                .unwrap()
                .advance(bytes, self.size(), self.fetcher.config());
            if let Some(ahead) = ahead {
                self.fetcher.prefetch(ahead);
            }
        }
    }

    /// Reads `bytes`, all present, from the data file; a failure meanwhile wins.
    fn read_landed(&self, bytes: ByteRange) -> Result<Bytes> {
        self.unless_failed(self.fetcher.read_present(bytes)?)
    }

    /// `out`, read or arrived, unless the image failed meanwhile (its failure wins).
    fn unless_failed(&self, out: Bytes) -> Result<Bytes> {
        if self.is_failed() {
            return Err(self.failure());
        }
        Ok(out)
    }

    /// Reads `len` bytes at `offset` of the stored image, fetching what is absent.
    /// `ra` carries the caller's sequential-read state for readahead.
    pub async fn read(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
        ra: Option<&Mutex<ReadState>>,
    ) -> Result<Bytes> {
        self.read_inner(offset, len, ra)
            .await
            .map_err(|e| self.explain(e))
    }

    async fn read_inner(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
        ra: Option<&Mutex<ReadState>>,
    ) -> Result<Bytes> {
        let (bytes, arrived) = self.make_present(offset, len, ra, true).await?;
        if bytes.is_empty() {
            return Ok(Bytes::new());
        }
        match arrived {
            Some(b) => self.unless_failed(b),
            None => {
                let me = self.clone();
                page_io(bytes.len() as usize, move || me.read_landed(bytes)).await
            }
        }
    }

    /// A read up to the data file: clamps `len` bytes at `offset` to the image, starts
    /// the readahead `ra` calls for, fetches what is absent and waits for verification
    /// where that is required. Returns the clamped bytes, readable; with `early`, their
    /// content instead when it arrived in one fetch (`Fetcher::ensure_read`): then they
    /// may not be written yet.
    async fn make_present(
        &self,
        offset: u64,
        len: u32,
        ra: Option<&Mutex<ReadState>>,
        early: bool,
    ) -> Result<(ByteRange, Option<Bytes>)> {
        if self.is_failed() {
            return Err(self.failure());
        }
        let bytes = self.geometry().clamp(offset, u64::from(len));
        if bytes.is_empty() {
            return Ok((bytes, None));
        }
        self.read_ahead(bytes, ra);
        let (waited, arrived) = self.fetcher.ensure_read(bytes, early).await?;
        let m = &self.shared.metrics;
        Metrics::add(if waited {
            &m.cache_misses
        } else {
            &m.cache_hits
        });
        if !self.verified_enough() {
            if !self.fill_enabled() {
                // Nothing would ever make it ready: say so instead of hanging the reader.
                return Err(Error::Failed {
                    name: self.name.clone(),
                    msg: "not verified yet and its fill is off (--no-fill) while the daemon runs with \
                          --require-verified; run `bifs fill` to complete it"
                        .into(),
                    kind: FailureKind::Other,
                });
            }
            self.wait_ready().await?;
        }
        Ok((bytes, arrived))
    }

    /// Waits until the image is ready (verified) or failed.
    pub async fn wait_ready(&self) -> Result<()> {
        let mut rx = self.subscribe();
        loop {
            match *rx.borrow_and_update() {
                State::Ready => return Ok(()),
                State::Failed => return Err(self.failure()),
                _ => {}
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(Error::ShuttingDown) },
                _ = self.cancel.cancelled() => return Err(self.explain(Error::ShuttingDown)),
            }
        }
    }

    // ---- views ----

    /// The size a view shows (`st_size`). The stored view needs no format: `ls -l` of a
    /// thousand images must not read a thousand headers.
    pub fn view_size(&self, view: View) -> u64 {
        match view {
            View::Stored => self.size(),
            View::Raw => match self.format() {
                Some(Format::Qcow2(h)) => h.virtual_size,
                _ => self.size(),
            },
        }
    }

    /// Whether reads of `view` are plain reads of the data file (passthrough is possible).
    pub fn view_is_stored_bytes(&self, view: View) -> bool {
        view == View::Stored || matches!(self.format(), Some(Format::Raw))
    }

    /// How an open of `view` is best served, given what the kernel offers.
    pub fn open_mode(&self, view: View, caps: KernelCaps) -> OpenMode {
        view::open_mode(
            self.state() == State::Ready,
            self.view_is_stored_bytes(view),
            caps,
        )
    }

    pub async fn read_view(
        self: &Arc<Self>,
        view: View,
        offset: u64,
        len: u32,
        ra: Option<&Arc<Mutex<ReadState>>>,
    ) -> Result<Bytes> {
        match (view, self.format()) {
            (View::Stored, _) | (View::Raw, Some(Format::Raw)) => {
                self.read(offset, len, ra.map(|r| &**r)).await
            }
            (View::Raw, Some(Format::Qcow2(h))) => {
                if self.is_failed() {
                    return Err(self.failure());
                }
                let stored: Arc<dyn StoredBytes> = self.clone();
                self.raw_view
                    .read(stored, &self.shared.buffers, &h, offset, len, ra.cloned())
                    .await
                    .map_err(|e| self.explain(e))
            }
            (View::Raw, None) => {
                self.fetcher
                    .ensure(BlockRange::new(0, 1))
                    .await
                    .map_err(|e| self.explain(e))?;
                Box::pin(self.read_view(view, offset, len, ra)).await
            }
        }
    }

    /// Why the raw view of this image does not work, once a raw read found out.
    pub fn raw_view_error(&self) -> Option<String> {
        self.raw_view.error()
    }

    pub fn status(&self, mountpoint: &str) -> Status {
        let stored = self.stored();
        let st = self.state.snapshot();
        let fmt = self.format();
        let (algo, _) = ChecksumAlgorithm::split(&stored.spec.checksum);
        let mut parameters = stored.spec.source_parameters.clone();
        if let Some(url) = parameters.get_mut("url") {
            *url = redact_url(url);
        }
        let error = st
            .error
            .clone()
            .or_else(|| self.condition.lock().unwrap().clone())
            // A broken raw view does not fail the image, but status must say why it EIOs.
            .or_else(|| self.raw_view_error())
            .unwrap_or_default();
        Status {
            name: self.name.clone(),
            format: fmt.as_ref().map_or("unknown".into(), |f| f.name().into()),
            size: self.size(),
            virtual_size: fmt.as_ref().and_then(Format::virtual_size),
            state: st.state,
            progress: self.progress(),
            bytes_cached: self.bytes_cached(),
            bytes_allocated: self.allocated_bytes(),
            checksum: if stored.spec.checksum.is_empty() && st.state == State::Ready {
                st.checksum.clone()
            } else {
                stored.spec.checksum.clone()
            },
            computed_checksum: st.checksum,
            checksum_algorithm: algo.as_str().into(),
            source: SourceDoc {
                kind: stored.spec.source_type.as_str().into(),
                parameters,
            },
            disk: DiskDoc {
                uuid: self.disk.uuid.clone(),
                path: self.disk.path.display().to_string(),
                read_only: self.disk.read_only,
            },
            path: format!("{mountpoint}/{}", self.name),
            raw_path: format!("{mountpoint}/.raw/{}", self.name),
            error,
            fill: stored.fill,
            block_size: self.block_size(),
            bytes_fetched: self.fetcher.fetched_bytes(),
            fill_held_ms: self.fetcher.fill_held().as_millis() as u64,
            hash_held_ms: self.hash_held.total().as_millis() as u64,
            version: self.version.clone(),
            open_handles: self.usage.open_pids().len() as u32,
            min_number_of_copies: stored.spec.min_number_of_copies,
            node_selector: stored.spec.node_selector.clone(),
            disk_selector: stored.spec.disk_selector.clone(),
            copies: Vec::new(),
        }
    }
}

impl FetchObserver for Image {
    /// Called for every batch that lands (each 256 KiB of a fill): atomics only, unless
    /// this is the first landing or the end of an outage.
    fn landed(&self, _blocks: BlockRange) {
        if !self.started.swap(true, Ordering::AcqRel) && self.state.start() {
            info!(image = %self.name, "state changed: in-progress");
        }
        if self.riding_out.swap(false, Ordering::AcqRel) {
            info!(image = %self.name, "source serving again");
            self.condition.lock().unwrap().take();
        }
    }

    fn fetch_failed(&self, err: &Error, prio: Priority) {
        match err {
            // No source can serve: present blocks keep serving, the status says why.
            Error::NoSource { .. } => self.set_condition(err.to_string()),
            // A source that cannot serve for now: the image rides it out. A reader's
            // request retries until --read-timeout; the fill pauses and tries again.
            Error::Source(s) if s.is_retryable() => {
                warn!(image = %self.name, error = %err, ?prio, "fetch failed; will try again");
            }
            _ => self.fail(err),
        }
    }

    fn reader_active(&self) {
        self.shared.hasher.reader_active();
    }
}

#[async_trait::async_trait]
impl StoredBytes for Image {
    fn name(&self) -> &str {
        &self.name
    }

    fn disk8(&self) -> &str {
        self.disk.uuid8()
    }

    fn size(&self) -> u64 {
        self.geometry().size
    }

    fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    fn read_now(
        &self,
        offset: u64,
        buf: &mut [u8],
        ra: Option<&Mutex<ReadState>>,
    ) -> Option<Result<()>> {
        let bytes = ByteRange::new(offset, offset + buf.len() as u64);
        let present = self.fetcher.map().all_set(self.geometry().blocks_of(bytes));
        if self.is_failed() || !present || !self.verified_enough() {
            return None;
        }
        // A hit keeps a sequential reader's readahead going and hashing in the
        // background, as in `read_present`.
        if self.state() != State::Ready {
            self.shared.hasher.reader_active();
        }
        self.read_ahead(bytes, ra);
        if let Err(e) = self.fetcher.files().read_data(offset, buf) {
            return Some(Err(e));
        }
        if self.is_failed() {
            return Some(Err(self.failure()));
        }
        Some(Ok(()))
    }

    async fn fetch(&self, offset: u64, len: u32, ra: Option<&Mutex<ReadState>>) -> Result<()> {
        self.make_present(offset, len, ra, false)
            .await
            .map(|_| ())
            .map_err(|e| self.explain(e))
    }

    async fn read(&self, offset: u64, len: u32, ra: Option<&Mutex<ReadState>>) -> Result<Bytes> {
        let me = self.me.upgrade().ok_or(Error::ShuttingDown)?;
        Image::read(&me, offset, len, ra).await
    }
}
