//! The node: every image on this host's disks, keyed by name. Shells (FUSE, HTTP) hold
//! an `Arc<Node>` and call into it; it owns creation, start-up recovery, deletion, the
//! flusher that makes landed blocks durable in batches, the node-wide resources images
//! share (`Shared`: hashing thread, buffer pool) and the choice of each image's sources
//! (`SourceFactory`: the HTTP origin by default, in-memory sources in tests).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use super::lifecycle::{self, CopyFacts, Verdict};
use super::range::BlockRange;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::bitmap::BlockMap;
use super::error::{Error, Result};
use super::image::{Image, ImageConfig, ImageEvent, ImageParts, Shared};
use super::peer::Peers;
use super::source::{HttpClients, Identity, Source, Sources};
use super::sources::{http_sources, probe};
pub use super::sources::{sources_with, SourceFactory};
use super::spec::{ImageSpec, SourceType};
use super::status::Status;
use super::store::{Disk, ImageFiles, State, StoredSpec, StoredState};

/// How long a deficit of ready copies lasts before the first node in line fetches one
/// (and again for each node after it).
const REPLICA_GRACE: Duration = Duration::from_secs(5);

/// How often landed blocks are made durable (data fdatasync, then bitmap).
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Sources asked at once at start-up whether unfinished images' versions still exist.
const STARTUP_PROBES: usize = 8;

/// An image folder no image of this node claims.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Orphan {
    pub disk: String,
    pub path: PathBuf,
    pub reason: String,
}

/// One disk as `bifs disks` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskReport {
    pub uuid: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Bytes the data files of this node's images take on the disk.
    pub used_by_images_bytes: u64,
    pub images: usize,
    pub orphans: Vec<Orphan>,
}

/// When unused copies leave this node's disks.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// A copy unused this long is removed (never below the copies the cluster keeps).
    pub cleanup_wait: Duration,
    /// The copies the cluster keeps of an image whose spec names no minNumberOfCopies.
    pub min_copies: u32,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            cleanup_wait: Duration::from_secs(3600),
            min_copies: 1,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// A disk uuid (or its first characters); the disk with most free space otherwise.
    pub disk: Option<String>,
    pub no_fill: bool,
}

/// Images by name (sorted, for listings) and by instance id (for inode lookups).
#[derive(Default)]
struct Registry {
    by_name: BTreeMap<String, Arc<Image>>,
    by_id: std::collections::HashMap<u64, Arc<Image>>,
}

impl Registry {
    fn insert(&mut self, image: Arc<Image>) {
        self.by_id.insert(image.id, image.clone());
        self.by_name.insert(image.name.clone(), image);
    }

    fn remove(&mut self, name: &str) -> Option<Arc<Image>> {
        let image = self.by_name.remove(name)?;
        self.by_id.remove(&image.id);
        Some(image)
    }
}

fn check_space(disk: &Disk, need: u64) -> Result<()> {
    let free = disk.free_bytes();
    if free < need {
        return Err(Error::Io {
            path: disk.path.clone(),
            msg: format!(
                "not enough space for the image: {need} more bytes needed, {free} free; free space or add another --disk"
            ),
            errno: libc::ENOSPC,
        });
    }
    Ok(())
}

pub struct Node {
    pub disks: Vec<Disk>,
    pub cfg: ImageConfig,
    pub mountpoint: String,
    images: RwLock<Registry>,
    creating: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    sources: SourceFactory,
    peers: std::sync::OnceLock<Arc<Peers>>,
    lifecycle: std::sync::OnceLock<LifecycleConfig>,
    /// Image folders no image of this node claims (found at start-up).
    orphans: std::sync::Mutex<Vec<Orphan>>,
    shared: Shared,
    pub cancel: CancellationToken,
    events: tokio::sync::broadcast::Sender<ImageEvent>,
}

impl Node {
    /// Opens the disks and every image on them; resumes unfinished images.
    pub async fn start(
        disks: &[PathBuf],
        cfg: ImageConfig,
        mountpoint: String,
    ) -> Result<Arc<Node>> {
        let sources = http_sources(HttpClients::default(), None);
        Self::start_with(disks, cfg, mountpoint, sources).await
    }

    /// As `start`, with the sources images get from `sources` (tests: in-memory ones).
    pub async fn start_with(
        disks: &[PathBuf],
        cfg: ImageConfig,
        mountpoint: String,
        sources: SourceFactory,
    ) -> Result<Arc<Node>> {
        if disks.is_empty() {
            return Err(Error::BadInput(
                "give at least one --disk DIR for the cache".into(),
            ));
        }
        let disks = Disk::open_all(disks)?;
        let node = Arc::new(Node {
            disks,
            cfg,
            mountpoint,
            images: RwLock::new(Registry::default()),
            creating: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            sources,
            peers: std::sync::OnceLock::new(),
            lifecycle: std::sync::OnceLock::new(),
            orphans: std::sync::Mutex::new(Vec::new()),
            shared: Shared::start(),
            cancel: CancellationToken::new(),
            events: tokio::sync::broadcast::channel(1024).0,
        });
        for disk in &node.disks {
            for name in disk.image_names()? {
                if node.images.read().unwrap().by_name.contains_key(&name) {
                    warn!(image = %name, disk = %disk.uuid8(), "image also on another disk; using the first copy");
                    node.orphan(disk, &name, "a second copy of an image another disk holds");
                    continue;
                }
                match ImageFiles::open(disk.image_dir(&name)) {
                    Ok((files, stored, state, map)) => {
                        let image = node.build_image(disk.clone(), files, stored, state, map);
                        info!(image = %name, disk = %disk.uuid8(), state = image.state().as_str(),
                              present = image.present_blocks(), blocks = image.blocks(), "image found on disk");
                        node.images.write().unwrap().insert(image.clone());
                        image.start_background();
                    }
                    Err(e) => {
                        node.orphan(disk, &name, &format!("cannot be opened: {e}"));
                        error!(image = %name, disk = %disk.uuid8(), error = %e, "cannot open image; leaving it on disk untouched")
                    }
                }
            }
        }
        tokio::spawn(node.clone().flush_loop());
        let unfinished: Vec<_> = node
            .list()
            .into_iter()
            .filter(|i| !matches!(i.state(), State::Ready | State::Failed))
            .collect();
        if !unfinished.is_empty() {
            tokio::spawn(async move {
                futures::stream::iter(unfinished)
                    .for_each_concurrent(STARTUP_PROBES, |image| image.recheck_source())
                    .await;
            });
        }
        Ok(node)
    }

    fn build_image(
        &self,
        disk: Disk,
        files: Arc<ImageFiles>,
        stored: StoredSpec,
        state: StoredState,
        map: BlockMap,
    ) -> Arc<Image> {
        let sources = (self.sources)(&stored.spec, &stored.identity);
        self.build_image_with(disk, files, stored, state, map, sources)
    }

    fn build_image_with(
        &self,
        disk: Disk,
        files: Arc<ImageFiles>,
        stored: StoredSpec,
        state: StoredState,
        map: BlockMap,
        sources: Sources,
    ) -> Arc<Image> {
        let parts = ImageParts {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            disk,
            files,
            stored,
            state,
            map,
            sources,
        };
        Image::new(
            parts,
            self.cfg.clone(),
            self.shared.clone(),
            self.cancel.child_token(),
            self.events.clone(),
        )
    }

    pub fn get(&self, name: &str) -> Result<Arc<Image>> {
        self.images
            .read()
            .unwrap()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    /// Failures and deletions, for the shells' caches.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<ImageEvent> {
        self.events.subscribe()
    }

    /// The image with instance id `id` (the FUSE shell's inode numbers derive from it).
    pub fn get_by_id(&self, id: u64) -> Option<Arc<Image>> {
        self.images.read().unwrap().by_id.get(&id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Image>> {
        self.images
            .read()
            .unwrap()
            .by_name
            .values()
            .cloned()
            .collect()
    }

    /// The status document, with the copies peers hold.
    pub fn status(&self, image: &Image) -> Status {
        let mut st = image.status(&self.mountpoint);
        if let Some(p) = self.peers.get() {
            st.copies = p.copies(&image.name);
        }
        st
    }

    /// The other nodes (set once by the daemon; their poll loop runs until shutdown).
    pub fn attach_peers(&self, peers: Arc<Peers>) {
        if self.peers.set(peers.clone()).is_ok() {
            tokio::spawn(peers.run(self.cancel.child_token()));
        }
    }

    fn orphan(&self, disk: &Disk, name: &str, reason: &str) {
        self.orphans.lock().unwrap().push(Orphan {
            disk: disk.uuid8().to_string(),
            path: disk.image_dir(name),
            reason: reason.to_string(),
        });
    }

    /// Each disk: capacity, free space, bytes the images use, and orphan folders.
    pub fn disks_report(&self) -> Vec<DiskReport> {
        let images = self.list();
        let orphans = self.orphans.lock().unwrap().clone();
        self.disks
            .iter()
            .map(|d| {
                let mine: Vec<&Arc<Image>> =
                    images.iter().filter(|i| i.disk.uuid == d.uuid).collect();
                let space = d.space();
                DiskReport {
                    uuid: d.uuid.clone(),
                    path: d.path.clone(),
                    read_only: d.read_only,
                    capacity_bytes: space.map_or(0, |s| s.total_bytes),
                    free_bytes: space.map_or(0, |s| s.avail_bytes),
                    used_by_images_bytes: mine.iter().map(|i| i.allocated_bytes()).sum(),
                    images: mine.len(),
                    orphans: orphans
                        .iter()
                        .filter(|o| o.disk == d.uuid8())
                        .cloned()
                        .collect(),
                }
            })
            .collect()
    }

    /// Removes the orphan folders (not on read-only disks); returns those removed.
    pub async fn remove_orphans(&self) -> Result<Vec<Orphan>> {
        let all = std::mem::take(&mut *self.orphans.lock().unwrap());
        let mut removed = Vec::new();
        let mut kept = Vec::new();
        for o in all {
            let ro = self
                .disks
                .iter()
                .any(|d| d.uuid8() == o.disk && d.read_only);
            if ro {
                kept.push(o);
                continue;
            }
            let path = o.path.clone();
            match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&path)).await {
                Ok(Ok(())) => {
                    info!(path = %o.path.display(), reason = %o.reason, "orphan folder removed");
                    removed.push(o);
                }
                Ok(Err(e)) => {
                    warn!(path = %o.path.display(), error = %e, "cannot remove orphan folder");
                    kept.push(o);
                }
                Err(_) => kept.push(o),
            }
        }
        self.orphans.lock().unwrap().extend(kept);
        Ok(removed)
    }

    /// How long the hashing thread has waited for readers since the node started.
    pub fn hash_held(&self) -> Duration {
        self.shared.hasher.held()
    }

    /// The node-wide counters (`/metrics`).
    pub fn metrics(&self) -> &Arc<crate::core::metrics::Metrics> {
        &self.shared.metrics
    }

    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.get()
    }

    /// Picks the disk for a new image; `size`: the space it must have free (None: an
    /// image that is fetched only as it is read, `--no-fill`, is checked when its fill starts).
    fn pick_disk(&self, want: Option<&str>, size: Option<u64>) -> Result<Disk> {
        let disk = match want {
            Some(w) => self
                .disks
                .iter()
                .find(|d| d.uuid.starts_with(w))
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<_> = self.disks.iter().map(|d| d.uuid8().to_string()).collect();
                    Error::BadInput(format!(
                        "no disk with uuid {w:?} on this node; disks: {}",
                        known.join(", ")
                    ))
                })?,
            // A read-only disk still serves what it holds, but takes no new image.
            None => self
                .disks
                .iter()
                .filter(|d| !d.read_only)
                .max_by_key(|d| d.free_bytes())
                .cloned()
                .ok_or_else(|| Error::Io {
                    path: self.disks[0].path.clone(),
                    msg: "every --disk of this node is read-only: no new image can be stored; \
                          remount a disk read-write or add a writable --disk"
                        .into(),
                    errno: libc::EROFS,
                })?,
        };
        if let Some(need) = size {
            check_space(&disk, need)?;
        }
        Ok(disk)
    }

    /// Creates an image (a no-op when it exists with the same spec).
    pub async fn create(
        self: &Arc<Self>,
        spec: ImageSpec,
        opts: CreateOptions,
    ) -> Result<Arc<Image>> {
        spec.validate()?;
        // An upload is its own fill: a fill would only wait for the upload's blocks.
        let mut opts = opts;
        opts.no_fill |= spec.source_type == SourceType::Upload;
        // The origin is asked for the version first; the image's sources are then built
        // for that version (peers serve each other one version only).
        let probing = (self.sources)(&spec, &Identity::unknown());
        let factory = self.sources.clone();
        self.create_inner(spec, opts, probing, Some(factory)).await
    }

    /// Creates image `name` as another node holds it: its spec comes from a peer with a
    /// copy, and its bytes from the peers (and its URL, if it has one). How images
    /// without a URL (uploads, exports) reach other nodes.
    pub async fn create_from_peers(
        self: &Arc<Self>,
        name: &str,
        opts: CreateOptions,
    ) -> Result<Arc<Image>> {
        super::spec::validate_name(name)?;
        if let Ok(existing) = self.get(name) {
            return Ok(existing);
        }
        let Some(peers) = self.peers.get().cloned() else {
            return Err(Error::BadInput(format!(
                "no source given for image {name:?} and this daemon has no peers \
                 (--peer or --peers-dns): give --url"
            )));
        };
        let Some(spec) = peers.find_spec(name).await else {
            return Err(Error::NotFound(format!(
                "{name} (no peer holds a copy either; an image without a URL cannot be \
                 created until a node with a copy is reachable)"
            )));
        };
        let probing = (self.sources)(&spec, &Identity::unknown());
        let factory = self.sources.clone();
        self.create_inner(spec, opts, probing, Some(factory)).await
    }

    /// As `create`, with the source given (tests and benches use a `MemSource`).
    pub async fn create_with_source(
        self: &Arc<Self>,
        spec: ImageSpec,
        opts: CreateOptions,
        source: Arc<dyn Source>,
    ) -> Result<Arc<Image>> {
        self.create_with_sources(spec, opts, Sources::one(source))
            .await
    }

    /// As `create`, with the sources given; the last one (the origin) is probed for the
    /// image's size and version.
    pub async fn create_with_sources(
        self: &Arc<Self>,
        spec: ImageSpec,
        opts: CreateOptions,
        sources: Sources,
    ) -> Result<Arc<Image>> {
        self.create_inner(spec, opts, sources, None).await
    }

    async fn create_inner(
        self: &Arc<Self>,
        mut spec: ImageSpec,
        opts: CreateOptions,
        sources: Sources,
        rebuild: Option<SourceFactory>,
    ) -> Result<Arc<Image>> {
        spec.checksum = spec.checksum.to_ascii_lowercase();
        let _guard = self.creating.lock().await;
        if let Ok(existing) = self.get(&spec.name) {
            let have = existing.stored().spec;
            if let Some(e) = have.conflict_with(&spec) {
                return Err(e);
            }
            if let Some(want) = opts.disk.as_deref() {
                if !existing.disk.uuid.starts_with(want) {
                    return Err(Error::BadInput(format!(
                        "image {:?} exists already, on disk {} ({}), not on disk {want:?}; \
                         an image lives on one disk of a node",
                        spec.name,
                        existing.disk.uuid8(),
                        existing.disk.path.display()
                    )));
                }
            }
            return Ok(existing);
        }
        let Some(origin) = sources.list.last().cloned() else {
            return Err(Error::Unsupported(
                sources.unavailable.clone().unwrap_or_else(|| {
                    format!("image {:?} has no source to create it from", spec.name)
                }),
            ));
        };
        let identity = probe(&sources).await?;
        let sources = match rebuild {
            Some(f) => f(&spec, &identity),
            None => sources,
        };
        let need = (!opts.no_fill).then_some(identity.size);
        let disk = match self.pick_disk(opts.disk.as_deref(), need) {
            Err(Error::Io { errno, .. }) if errno == libc::ENOSPC => {
                // Under pressure: make room from copies the cluster holds elsewhere.
                let disk = self.pick_disk(opts.disk.as_deref(), None)?;
                self.evict_for(&disk, need.unwrap_or(0)).await;
                self.pick_disk(Some(&disk.uuid), need)?
            }
            r => r?,
        };
        let stored = StoredSpec {
            spec,
            identity,
            block_size: self.cfg.block_size,
            fill: !opts.no_fill,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let files = ImageFiles::create(&disk, &stored)?;
        let blocks = stored.identity.size.div_ceil(stored.block_size);
        let image = self.build_image_with(
            disk.clone(),
            files,
            stored,
            StoredState::pending(),
            BlockMap::new(blocks),
            sources,
        );
        info!(image = %image.name, disk = %disk.uuid8(), size = image.size(), source = %origin.describe(), "image created");
        self.images.write().unwrap().insert(image.clone());
        // Learn at once which other nodes hold (or are filling) this image.
        if let Some(p) = self.peers.get() {
            p.poll_all().await;
        }
        // Peers serve only against piece digests: get them before anything is fetched,
        // so a copy on another node is used from the first block on.
        if image
            .fetcher()
            .sources()
            .list
            .iter()
            .any(|s| s.offers_digests())
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), image.acquire_digests()).await;
        }
        image.start_background();
        // The first block tells the format; fetch it now so status shows it at once
        // (not for an upload: its first block comes when the client sends it).
        if image.blocks() > 0 && image.stored().spec.source_type != SourceType::Upload {
            if let Err(e) = image.fetcher().ensure(BlockRange::new(0, 1)).await {
                warn!(image = %image.name, error = %e, "first block not fetched");
            }
        }
        Ok(image)
    }

    /// Deletes an image: readers get ENOENT, its files go away.
    /// Deletes an image: refused while handles are open on it, naming who holds them,
    /// unless `force` (open handles then get EIO).
    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        let image = self.get(name)?;
        if !force {
            if let Some(h) = lifecycle::holder(&self.copy_facts(&image)) {
                return Err(Error::Kept {
                    name: name.to_string(),
                    why: format!("in use: {h}"),
                    hint: "; close it (detach loop devices, stop the VM) or use `bifs delete --force`, \
                           after which open handles get EIO",
                });
            }
        }
        self.remove_copy(name).await?;
        info!(image = %name, force, "image deleted");
        Ok(())
    }

    /// The facts the cleanup rules decide on (see `lifecycle`).
    pub fn copy_facts(&self, image: &Image) -> CopyFacts {
        let (node_id, ready_elsewhere) = match self.peers.get() {
            Some(p) => (
                p.node_id().to_string(),
                p.ready_elsewhere(&image.name, image.version()),
            ),
            None => (String::new(), Vec::new()),
        };
        CopyFacts {
            name: image.name.clone(),
            state: image.state(),
            open_pids: image.open_pids(),
            idle: image.idle(),
            node_id,
            ready_elsewhere,
            min_copies: image.stored().spec.min_number_of_copies,
        }
    }

    /// Removes this node's copy now (`bifs cleanup`): refused for a copy in use or one the
    /// cluster's minimum number of copies needs.
    pub async fn cleanup(&self, name: &str) -> Result<()> {
        let image = self.get(name)?;
        if let Verdict::Keep(why) =
            lifecycle::manual_cleanup(&self.copy_facts(&image), self.lifecycle().min_copies, false)
        {
            return Err(Error::Kept {
                name: name.to_string(),
                why,
                hint: "",
            });
        }
        self.remove_copy(name).await?;
        info!(image = %name, "copy cleaned up");
        Ok(())
    }

    fn lifecycle(&self) -> LifecycleConfig {
        self.lifecycle.get().cloned().unwrap_or_default()
    }

    /// Starts removing copies unused for `cfg.cleanup_wait` (never below the copies the
    /// cluster keeps), until shutdown.
    pub fn start_lifecycle(self: &Arc<Self>, cfg: LifecycleConfig) {
        if self.lifecycle.set(cfg.clone()).is_err() {
            return;
        }
        let me = self.clone();
        let every = (cfg.cleanup_wait / 4).clamp(Duration::from_secs(1), Duration::from_secs(5));
        tokio::spawn(async move {
            let mut deficits = HashMap::new();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = me.cancel.cancelled() => return,
                }
                me.replica_pass(&cfg, &mut deficits).await;
                me.cleanup_pass(&cfg).await;
            }
        });
    }

    /// Brings images whose ready copies fell below their minimum back up: a deficit seen
    /// for long enough (`lifecycle::replica_delay`) makes this node fetch a copy (from
    /// peers first), unless it holds one already.
    async fn replica_pass(
        self: &Arc<Self>,
        cfg: &LifecycleConfig,
        since: &mut HashMap<String, std::time::Instant>,
    ) {
        let Some(peers) = self.peers.get().cloned() else {
            return;
        };
        let cluster = peers.cluster_images();
        since.retain(|n, _| cluster.contains_key(n));
        for (name, (ready, min, without)) in cluster {
            let need = lifecycle::needed(min, cfg.min_copies);
            if self.get(&name).is_ok() || ready == 0 || ready >= need {
                since.remove(&name);
                continue;
            }
            let first = *since
                .entry(name.clone())
                .or_insert_with(std::time::Instant::now);
            let wait = lifecycle::replica_delay(&name, peers.node_id(), &without, REPLICA_GRACE);
            if first.elapsed() < wait {
                continue;
            }
            info!(image = %name, ready, need, "fewer ready copies than the cluster keeps; fetching one");
            if let Err(e) = self
                .create_from_peers(&name, CreateOptions::default())
                .await
            {
                warn!(image = %name, error = %e, "cannot make a copy");
            }
            since.remove(&name);
        }
    }

    async fn cleanup_pass(&self, cfg: &LifecycleConfig) {
        let mut images = self.list();
        images.sort_by_key(|i| lifecycle::cleanup_order(i.state()));
        for image in images {
            let facts = self.copy_facts(&image);
            if lifecycle::auto_cleanup(&facts, cfg.cleanup_wait, cfg.min_copies) == Verdict::Remove
            {
                match self.remove_copy(&image.name).await {
                    Ok(()) => {
                        crate::core::metrics::Metrics::add(&self.shared.metrics.copies_removed);
                        info!(image = %image.name, state = image.state().as_str(),
                        idle_secs = facts.idle.as_secs(), ready_elsewhere = facts.ready_elsewhere.len(),
                        "unused copy removed")
                    }
                    Err(e) => warn!(image = %image.name, error = %e, "cannot remove unused copy"),
                }
            }
        }
    }

    /// Evicts copies from `disk` until `need` bytes are free: only ready copies nothing
    /// holds open whose removal leaves the cluster its minimum (as `bifs cleanup` would
    /// allow), least recently used first. Never a copy in use, never the last copies.
    async fn evict_for(&self, disk: &Disk, need: u64) {
        let min = self.lifecycle().min_copies;
        let mut candidates: Vec<(std::time::Duration, Arc<Image>)> = self
            .list()
            .into_iter()
            .filter(|i| i.disk.uuid == disk.uuid && i.state() == State::Ready)
            .filter(|i| {
                lifecycle::manual_cleanup(&self.copy_facts(i), min, false) == Verdict::Remove
            })
            .map(|i| (i.idle(), i))
            .collect();
        // Least recently used first: the longest idle.
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        for (idle, image) in candidates {
            if disk.free_bytes() >= need {
                break;
            }
            match self.remove_copy(&image.name).await {
                Ok(()) => {
                    crate::core::metrics::Metrics::add(&self.shared.metrics.evictions);
                    info!(image = %image.name, idle_secs = idle.as_secs(), need, "copy evicted to make room (other nodes hold it)");
                }
                Err(e) => warn!(image = %image.name, error = %e, "cannot evict copy"),
            }
        }
    }

    /// Removes an image from this node: readers get "deleted", its files go away.
    async fn remove_copy(&self, name: &str) -> Result<()> {
        // Checked first: on a read-only disk the files cannot go, so the image stays listed.
        let disk = self.get(name)?.disk.clone();
        if disk.read_only {
            return Err(Error::Io {
                path: disk.path.clone(),
                msg: format!(
                    "the disk holding image {name:?} is read-only: its files cannot be removed; \
                     remount it read-write first"
                ),
                errno: libc::EROFS,
            });
        }
        let image = self
            .images
            .write()
            .unwrap()
            .remove(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        image.mark_deleted();
        let _ = self.events.send(ImageEvent::Deleted {
            id: image.id,
            name: name.to_string(),
        });
        let files = image.fetcher().files().clone();
        tokio::task::spawn_blocking(move || files.remove())
            .await
            .map_err(|_| Error::ShuttingDown)??;
        Ok(())
    }

    /// Starts (or restarts after a recoverable failure) the fill of an image.
    pub fn fill(&self, name: &str) -> Result<Arc<Image>> {
        let image = self.get(name)?;
        check_space(&image.disk, image.size() - image.bytes_cached())?;
        image.clear_recoverable_failure()?;
        image.enable_fill()?;
        image.start_background();
        Ok(image)
    }

    async fn flush_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
                _ = self.cancel.cancelled() => break,
            }
            self.flush_all().await;
        }
        self.flush_all().await;
    }

    /// Makes every landed block durable.
    pub async fn flush_all(&self) {
        let images = self.list();
        let _ = tokio::task::spawn_blocking(move || {
            for image in images {
                let f = image.fetcher();
                if let Err(e) = f.files().flush(f.map()) {
                    error!(image = %image.name, error = %e, "cannot persist landed blocks");
                }
            }
        })
        .await;
    }

    /// Stops background work and flushes.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.flush_all().await;
    }
}
