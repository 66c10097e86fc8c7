//! One image on one disk of this node: its state machine, its status document and the
//! read path that every shell uses. Fetching (`fetch.rs`), verification (`verify.rs`)
//! and the background fill (`fill.rs`) are further `impl Image` blocks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{broadcast, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::bitmap::BlockMap;
use super::error::{Error, Result, SourceError};
use super::fetch::{Job, ReadState};
use super::format::Format;
use super::source::Source;
use super::store::{Disk, ImageFiles, State, StoredSpec, StoredState};

/// Tunables shared by every image of a node.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// Presence granularity: what one bit of the bitmap covers.
    pub block_size: u64,
    /// The largest single range request to a source.
    pub max_request: u64,
    /// Range requests the background fill keeps in flight.
    pub fill_parallel: usize,
    /// The largest readahead window of a sequential reader.
    pub readahead_max: u64,
    /// Reads wait until the image is verified (Longhorn's semantics).
    pub require_verified: bool,
    /// Read buffers shared by all images of the node.
    pub buffers: Arc<super::store::BufPool>,
    /// The node's hashing thread.
    pub hasher: Arc<super::verify::HashWorker>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            block_size: 16 * 1024,
            max_request: 4 * 1024 * 1024,
            fill_parallel: 4,
            readahead_max: 64 * 1024 * 1024,
            require_verified: false,
            buffers: Default::default(),
            hasher: Default::default(),
        }
    }
}

pub struct Image {
    pub name: String,
    /// Unique per image instance in this process: the FUSE shell derives inodes from it.
    pub id: u64,
    pub disk: Disk,
    pub files: Arc<ImageFiles>,
    pub(crate) stored: Mutex<StoredSpec>,
    pub map: BlockMap,
    pub(crate) source: Arc<dyn Source>,
    pub block_size: u64,
    pub size: u64,
    pub(crate) cfg: ImageConfig,
    state: Mutex<StoredState>,
    state_tx: watch::Sender<State>,
    failed: AtomicBool,
    pub(crate) inflight: Mutex<BTreeMap<u64, Arc<Job>>>,
    /// Woken whenever blocks land or the state changes: the verifier and fill wait on it.
    pub(crate) landed: Notify,
    pub(crate) fill_running: AtomicBool,
    pub(crate) fetched_bytes: AtomicU64,
    /// One write into the data file at a time: concurrent pwritevs of one file serialise
    /// on its inode lock in the kernel anyway, spinning there (13% of the daemon's CPU
    /// on a cold read); waiting here frees the worker for other streams instead.
    pub(crate) writer: tokio::sync::Mutex<()>,
    pub(crate) cancel: CancellationToken,
    format: OnceLock<Format>,
    events: broadcast::Sender<ImageEvent>,
    /// The QCOW2 guest view's decoder (`qcow2.rs`), started by the first raw read.
    pub(crate) raw_view: super::qcow2::RawViewSlot,
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

/// The status document (`bifs status --json`, `GET /v1/images/{name}`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub name: String,
    pub format: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    pub state: String,
    pub progress: u32,
    pub bytes_cached: u64,
    pub checksum: String,
    pub source: SourceDoc,
    pub disk: DiskDoc,
    pub path: String,
    pub raw_path: String,
    pub error: String,
    pub fill: bool,
    pub block_size: u64,
    pub bytes_fetched: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SourceDoc {
    #[serde(rename = "type")]
    pub kind: String,
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DiskDoc {
    pub uuid: String,
    pub path: String,
}

impl Image {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        disk: Disk,
        files: Arc<ImageFiles>,
        stored: StoredSpec,
        state: StoredState,
        map: BlockMap,
        source: Arc<dyn Source>,
        cfg: ImageConfig,
        cancel: CancellationToken,
        events: broadcast::Sender<ImageEvent>,
    ) -> Arc<Image> {
        let (state_tx, _) = watch::channel(state.state);
        Arc::new(Image {
            name: stored.spec.name.clone(),
            id,
            disk,
            files,
            block_size: stored.block_size,
            size: stored.identity.size,
            stored: Mutex::new(stored),
            map,
            source,
            cfg,
            failed: AtomicBool::new(state.state == State::Failed),
            state: Mutex::new(state),
            state_tx,
            inflight: Mutex::new(BTreeMap::new()),
            landed: Notify::new(),
            writer: tokio::sync::Mutex::new(()),
            fill_running: AtomicBool::new(false),
            fetched_bytes: AtomicU64::new(0),
            cancel,
            format: OnceLock::new(),
            events,
            raw_view: Default::default(),
        })
    }

    pub fn blocks(&self) -> u64 {
        self.map.blocks()
    }

    pub fn state(&self) -> State {
        self.state.lock().unwrap().state
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
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
        self.state.lock().unwrap().error.clone()
    }

    pub fn checksum(&self) -> String {
        self.state.lock().unwrap().checksum.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    /// Progress in percent: present blocks over all blocks (100 only once ready).
    pub fn progress(&self) -> u32 {
        if self.state() == State::Ready {
            return 100;
        }
        let blocks = self.blocks().max(1);
        ((self.map.present_count() * 100 / blocks) as u32).min(99)
    }

    pub fn bytes_cached(&self) -> u64 {
        (self.map.present_count() * self.block_size).min(self.size)
    }

    /// The format, once the first block is present (detected from its magic).
    pub fn format(&self) -> Option<Format> {
        if let Some(f) = self.format.get() {
            return Some(f.clone());
        }
        if self.blocks() == 0 {
            return Some(self.format.get_or_init(|| Format::Raw).clone());
        }
        if !self.map.is_set(0) {
            return None;
        }
        let len = self.block_size.min(self.size) as usize;
        let mut head = vec![0u8; len];
        self.files.read_data(0, &mut head).ok()?;
        Some(self.format.get_or_init(|| Format::detect(&head)).clone())
    }

    pub(crate) fn set_state(&self, new: State) {
        let mut st = self.state.lock().unwrap();
        if st.state == new || st.state == State::Failed || st.state == State::Ready {
            return;
        }
        st.state = new;
        if let Err(e) = self.files.save_state(&st) {
            error!(image = %self.name, error = %e, "cannot save state");
        }
        drop(st);
        info!(image = %self.name, state = new.as_str(), "state changed");
        self.state_tx.send_replace(new);
        self.landed.notify_waiters();
    }

    pub(crate) fn set_ready(&self, checksum: String) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        if st.state == State::Failed {
            return Ok(());
        }
        st.state = State::Ready;
        st.checksum = checksum;
        st.error = None;
        self.files.save_state(&st)?;
        drop(st);
        info!(image = %self.name, disk = %self.disk.uuid8(), "ready: all blocks present and SHA-512 verified");
        let _ = self.events.send(ImageEvent::Ready { id: self.id });
        self.state_tx.send_replace(State::Ready);
        self.landed.notify_waiters();
        Ok(())
    }

    /// Fails the image: readers get EIO from now on, the message says why.
    pub fn fail(&self, err: &Error) {
        let mut st = self.state.lock().unwrap();
        if st.state == State::Failed || st.state == State::Ready {
            return;
        }
        st.state = State::Failed;
        st.error = Some(err.to_string());
        if let Error::Checksum { got, .. } = err {
            st.checksum = got.clone();
        }
        self.failed.store(true, Ordering::Release);
        if let Err(e) = self.files.save_state(&st) {
            error!(image = %self.name, error = %e, "cannot save state");
        }
        drop(st);
        error!(image = %self.name, disk = %self.disk.uuid8(), error = %err, "image failed");
        let _ = self.events.send(ImageEvent::Failed { id: self.id });
        self.state_tx.send_replace(State::Failed);
        self.landed.notify_waiters();
    }

    /// Clears a failure that a retry can cure (source down, disk full); not a checksum
    /// mismatch or a changed source, whose cached blocks cannot be trusted.
    pub fn clear_recoverable_failure(&self) -> Result<bool> {
        let mut st = self.state.lock().unwrap();
        if st.state != State::Failed {
            return Ok(false);
        }
        let msg = st.error.clone().unwrap_or_default();
        if msg.contains("checksum mismatch") || msg.contains("source changed") {
            return Err(Error::Failed {
                name: self.name.clone(),
                msg: format!("{msg}; this cannot be retried: delete and recreate the image"),
            });
        }
        st.state = if self.map.present_count() > 0 {
            State::InProgress
        } else {
            State::Pending
        };
        st.error = None;
        self.files.save_state(&st)?;
        self.failed.store(false, Ordering::Release);
        self.state_tx.send_replace(st.state);
        Ok(true)
    }

    pub(crate) fn failure(&self) -> Error {
        Error::Failed {
            name: self.name.clone(),
            msg: self.error().unwrap_or_else(|| "unknown error".into()),
        }
    }

    /// Asks the source whether it still holds the version this image pinned, and fails
    /// the image if not. Run at start-up for unfinished images: an origin replaced while
    /// the daemon was down is reported at once, not when the first absent block is read
    /// (the cached blocks are never mixed with the new version either way). A source that
    /// cannot be asked is left to the fetches, which report it their own way.
    pub async fn recheck_source(self: Arc<Self>) {
        let pinned = self.stored.lock().unwrap().identity.clone();
        let now = tokio::select! {
            r = self.source.probe() => r,
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

    /// The read of `offset..offset+len` if it needs no waiting: every block present (and
    /// verified, when that is required). Runs on the caller's thread, so the FUSE shell
    /// answers such reads without a hop to an async worker: on a VM a thread wake-up
    /// costs as much as reading 1 MiB from the page cache. Must run inside the runtime
    /// (readahead may start fetches). None: use `read`.
    pub fn read_present(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
        ra: Option<&Mutex<ReadState>>,
    ) -> Option<Result<Bytes>> {
        if self.is_failed() {
            return Some(Err(self.failure()));
        }
        if offset >= self.size || len == 0 {
            return Some(Ok(Bytes::new()));
        }
        let end = (offset + len as u64).min(self.size);
        let blocks = offset / self.block_size..end.div_ceil(self.block_size);
        if !self.map.all_set(blocks) || (self.cfg.require_verified && self.state() != State::Ready)
        {
            return None;
        }
        if self.state() != State::Ready {
            self.cfg.hasher.reader_active();
        }
        self.read_ahead(offset, end, ra);
        Some(self.read_landed(offset, end))
    }

    /// Records a read in the caller's sequential-read state and starts the readahead
    /// it calls for.
    fn read_ahead(self: &Arc<Self>, offset: u64, end: u64, ra: Option<&Mutex<ReadState>>) {
        if let Some(ra) = ra {
            let ahead = ra
                .lock()
                .unwrap()
                .advance(offset, end, self.size, &self.cfg);
            if let Some(ahead) = ahead {
                self.prefetch(ahead);
            }
        }
    }

    /// Reads `offset..end`, all present, from the data file; a failure meanwhile wins.
    fn read_landed(&self, offset: u64, end: u64) -> Result<Bytes> {
        let len = (end - offset) as usize;
        let mut buf = self.cfg.buffers.take(len);
        self.files.read_data(offset, buf.as_mut_slice())?;
        if self.is_failed() {
            return Err(self.failure());
        }
        Ok(Bytes::from_owner(buf))
    }

    /// Reads `len` bytes at `offset` of the stored image, fetching what is absent.
    /// `ra` carries the caller's sequential-read state for readahead.
    pub async fn read(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
        ra: Option<&Mutex<ReadState>>,
    ) -> Result<Bytes> {
        if self.is_failed() {
            return Err(self.failure());
        }
        if offset >= self.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + len as u64).min(self.size);
        self.read_ahead(offset, end, ra);
        let blocks = offset / self.block_size..end.div_ceil(self.block_size);
        self.ensure(blocks).await?;
        if self.cfg.require_verified && self.state() != State::Ready {
            if !self.fill_enabled() {
                // Nothing would ever make it ready: say so instead of hanging the reader.
                return Err(Error::Failed {
                    name: self.name.clone(),
                    msg: "not verified yet and its fill is off (--no-fill) while the daemon runs with \
                          --require-verified; run `bifs fill` to complete it"
                        .into(),
                });
            }
            self.wait_ready().await?;
        }
        let this = self.clone();
        super::store::page_io((end - offset) as usize, move || {
            this.read_landed(offset, end)
        })
        .await
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
                _ = self.cancel.cancelled() => return Err(Error::ShuttingDown),
            }
        }
    }

    pub fn status(&self, mountpoint: &str) -> Status {
        let stored = self.stored();
        let st = self.state.lock().unwrap().clone();
        let fmt = self.format();
        Status {
            name: self.name.clone(),
            format: fmt.as_ref().map_or("unknown".into(), |f| f.name().into()),
            size: self.size,
            virtual_size: fmt.as_ref().and_then(Format::virtual_size),
            state: st.state.as_str().into(),
            progress: self.progress(),
            bytes_cached: self.bytes_cached(),
            checksum: if st.checksum.is_empty() {
                stored.spec.checksum.clone()
            } else {
                st.checksum
            },
            source: SourceDoc {
                kind: stored.spec.source_type.as_str().into(),
                parameters: stored.spec.source_parameters.clone(),
            },
            disk: DiskDoc {
                uuid: self.disk.uuid.clone(),
                path: self.disk.path.display().to_string(),
            },
            path: format!("{mountpoint}/{}", self.name),
            raw_path: format!("{mountpoint}/.raw/{}", self.name),
            // A broken raw view does not fail the image, but status must say why it EIOs.
            error: st
                .error
                .or_else(|| self.raw_view_error())
                .unwrap_or_default(),
            fill: stored.fill,
            block_size: self.block_size,
            bytes_fetched: self.fetched_bytes.load(Ordering::Relaxed),
        }
    }
}
