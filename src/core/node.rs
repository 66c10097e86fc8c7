//! The node: every image on this host's disks, keyed by name. Shells (FUSE, HTTP) hold
//! an `Arc<Node>` and call into it; it owns creation, start-up recovery, deletion and
//! the flusher that makes landed blocks durable in batches.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::bitmap::BlockMap;
use super::error::{Error, Result};
use super::image::{Image, ImageConfig, ImageEvent, Status};
use super::source::{http_client, HttpSource, Source};
use super::spec::{ImageSpec, SourceType};
use super::store::{Disk, ImageFiles, State, StoredSpec, StoredState};

/// How often landed blocks are made durable (data fdatasync, then bitmap).
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Sources asked at once at start-up whether unfinished images' versions still exist.
const STARTUP_PROBES: usize = 8;

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
    client: reqwest::Client,
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
        if disks.is_empty() {
            return Err(Error::BadInput(
                "give at least one --disk DIR for the cache".into(),
            ));
        }
        let disks = disks
            .iter()
            .map(|d| Disk::open(d))
            .collect::<Result<Vec<_>>>()?;
        let node = Arc::new(Node {
            disks,
            cfg,
            mountpoint,
            images: RwLock::new(Registry::default()),
            creating: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            client: http_client(),
            cancel: CancellationToken::new(),
            events: tokio::sync::broadcast::channel(1024).0,
        });
        for disk in &node.disks {
            for name in disk.image_names()? {
                if node.images.read().unwrap().by_name.contains_key(&name) {
                    warn!(image = %name, disk = %disk.uuid8(), "image also on another disk; using the first copy");
                    continue;
                }
                match ImageFiles::open(disk.image_dir(&name)) {
                    Ok((files, stored, state, map)) => {
                        let image = node.build_image(disk.clone(), files, stored, state, map);
                        info!(image = %name, disk = %disk.uuid8(), state = image.state().as_str(),
                              present = image.map.present_count(), blocks = image.blocks(), "image found on disk");
                        node.images.write().unwrap().insert(image.clone());
                        node.run_background(&image);
                    }
                    Err(e) => {
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

    fn source_for(&self, spec: &ImageSpec) -> Result<Arc<dyn Source>> {
        match (spec.source_type, spec.url()) {
            (SourceType::Download, Some(url)) => {
                Ok(Arc::new(HttpSource::new(url, self.client.clone())))
            }
            _ => Err(Error::Unsupported(format!(
                "sourceType {} is not supported yet",
                spec.source_type.as_str()
            ))),
        }
    }

    fn build_image(
        &self,
        disk: Disk,
        files: Arc<ImageFiles>,
        stored: StoredSpec,
        state: StoredState,
        map: BlockMap,
    ) -> Arc<Image> {
        // An image left on disk by a later bifs with a source type this one lacks still
        // serves the blocks it has; an empty source fails any fetch of the rest.
        let source = self
            .source_for(&stored.spec)
            .unwrap_or_else(|_| Arc::new(super::source::MemSource::new(Vec::new())));
        self.build_image_with(disk, files, stored, state, map, source)
    }

    fn build_image_with(
        &self,
        disk: Disk,
        files: Arc<ImageFiles>,
        stored: StoredSpec,
        state: StoredState,
        map: BlockMap,
        source: Arc<dyn Source>,
    ) -> Arc<Image> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Image::new(
            id,
            disk,
            files,
            stored,
            state,
            map,
            source,
            self.cfg.clone(),
            self.cancel.child_token(),
            self.events.clone(),
        )
    }

    fn run_background(&self, image: &Arc<Image>) {
        if matches!(image.state(), State::Ready | State::Failed) {
            return;
        }
        tokio::spawn(image.clone().verify_loop());
        image.start_fill();
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

    pub fn status(&self, image: &Image) -> Status {
        image.status(&self.mountpoint)
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
            None => self
                .disks
                .iter()
                .max_by_key(|d| d.free_bytes())
                .cloned()
                .expect("at least one disk"),
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
        let source = self.source_for(&spec);
        spec.validate()?;
        self.create_with_source(spec, opts, source?).await
    }

    /// As `create`, with the source given (tests and benches use a `MemSource`).
    pub async fn create_with_source(
        self: &Arc<Self>,
        mut spec: ImageSpec,
        opts: CreateOptions,
        source: Arc<dyn Source>,
    ) -> Result<Arc<Image>> {
        spec.checksum = spec.checksum.to_ascii_lowercase();
        let _guard = self.creating.lock().await;
        if let Ok(existing) = self.get(&spec.name) {
            let have = existing.stored().spec;
            return match have.conflict_with(&spec) {
                Some(e) => Err(e),
                None => Ok(existing),
            };
        }
        let identity = source.probe().await?;
        let disk = self.pick_disk(
            opts.disk.as_deref(),
            (!opts.no_fill).then_some(identity.size),
        )?;
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
        let state = StoredState {
            state: State::Pending,
            checksum: String::new(),
            error: None,
        };
        let image = self.build_image_with(
            disk.clone(),
            files,
            stored,
            state,
            BlockMap::new(blocks),
            source,
        );
        info!(image = %image.name, disk = %disk.uuid8(), size = image.size, source = %image.source.describe(), "image created");
        self.images.write().unwrap().insert(image.clone());
        self.run_background(&image);
        // The first block tells the format; fetch it now so status shows it at once.
        if image.blocks() > 0 {
            if let Err(e) = image.ensure(0..1).await {
                warn!(image = %image.name, error = %e, "first block not fetched");
            }
        }
        Ok(image)
    }

    /// Deletes an image: readers get ENOENT, its files go away.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let image = self
            .images
            .write()
            .unwrap()
            .remove(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        image.cancel.cancel();
        let _ = self.events.send(ImageEvent::Deleted {
            id: image.id,
            name: name.to_string(),
        });
        let files = image.files.clone();
        tokio::task::spawn_blocking(move || files.remove())
            .await
            .map_err(|_| Error::ShuttingDown)??;
        info!(image = %name, "image deleted");
        Ok(())
    }

    /// Starts (or restarts after a recoverable failure) the fill of an image.
    pub fn fill(&self, name: &str) -> Result<Arc<Image>> {
        let image = self.get(name)?;
        check_space(&image.disk, image.size - image.bytes_cached())?;
        let recovered = image.clear_recoverable_failure()?;
        {
            let mut stored = image.stored.lock().unwrap();
            if !stored.fill {
                stored.fill = true;
                image.files.save_spec(&stored)?;
            }
        }
        if recovered {
            self.run_background(&image);
        } else {
            image.start_fill();
        }
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
                if let Err(e) = image.files.flush(&image.map) {
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
