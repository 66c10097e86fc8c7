//! Durability: a disk directory holding images, and per image the files DESIGN.md lists.
//!
//! ```text
//! <disk>/bifs-disk.json            {uuid}                    (disk.rs)
//! <disk>/bifs-disk.lock            flock; the holder's pid   (disk.rs)
//! <disk>/images/<name>/spec.json   spec, source identity, block size
//! <disk>/images/<name>/data        sparse; image bytes at their own offsets
//! <disk>/images/<name>/bitmap      one bit per block, little-endian 64-bit words
//! <disk>/images/<name>/state.json  state, verified checksum, error
//! ```
//! The rule: a bit reaches the bitmap file only after its block's data is durable
//! (`Flusher::flush`: snapshot bits, `fdatasync` data, then write the snapshot).
//! Bits only ever go from 0 to 1 in the file, so a torn bitmap write is still safe.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::bitmap::BlockMap;
use super::error::{Error, FailureKind, Result};
use super::range::BlockRange;
use super::source::Identity;
use super::spec::ImageSpec;
use super::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub use super::disk::{write_json_atomic, Disk};

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|e| Error::io_doing(path, "cannot read", e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Io {
        path: path.into(),
        msg: format!("unreadable: {e}"),
        errno: libc::EIO,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSpec {
    pub spec: ImageSpec,
    pub identity: Identity,
    pub block_size: u64,
    /// Whether the background fill runs (`--no-fill` turns it off until `bifs fill`).
    pub fill: bool,
    pub created_unix: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Pending,
    InProgress,
    Ready,
    Failed,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl State {
    /// Whether the image settled: ready or failed (nothing more happens by itself).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Ready | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InProgress => "in-progress",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredState {
    pub state: State,
    /// The SHA-512 computed over the whole image once it is complete.
    #[serde(default)]
    pub checksum: String,
    #[serde(default)]
    pub error: Option<String>,
    /// Why the image failed (decides whether a retry may clear it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
}

impl StoredState {
    pub fn pending() -> Self {
        Self {
            state: State::Pending,
            checksum: String::new(),
            error: None,
            failure: None,
        }
    }

    /// The failure's kind; state.json files from before kinds existed name it in words.
    pub fn failure_kind(&self) -> FailureKind {
        self.failure.unwrap_or_else(|| {
            FailureKind::guess_from_message(self.error.as_deref().unwrap_or_default())
        })
    }
}

/// The largest image bifs opens (64 TiB): bounds what a corrupt spec.json can make it
/// allocate (a bitmap of 512 MiB at 16 KiB blocks).
pub const MAX_IMAGE_BYTES: u64 = 64 << 40;

/// The open files of one image on one disk.
pub struct ImageFiles {
    pub dir: PathBuf,
    pub data: File,
    bitmap: File,
    /// Opened for reading only: the image lives on a read-only disk.
    pub read_only: bool,
    /// Set when bits were added since the last flush.
    dirty: AtomicBool,
    /// Lowest bitmap word touched since the last flush (usize::MAX: none).
    dirty_from: AtomicUsize,
    /// Bytes written since writeback of the data file was last started.
    unstarted: AtomicU64,
    /// What reached the files, in order: the model tests check the durability rule on it.
    #[cfg(feature = "shuttle")]
    pub journal: super::sync::Mutex<Vec<DiskEvent>>,
}

/// A write or sync of an image's files, as the model tests see it (`ImageFiles::journal`).
/// Noted conservatively: data after its write returned, a sync after it returned, bits
/// before their write starts.
#[cfg(feature = "shuttle")]
#[derive(Debug, Clone)]
pub enum DiskEvent {
    DataWritten { offset: u64, len: u64 },
    DataSynced,
    BitsWritten { from_word: usize, bits: Vec<u8> },
}

/// Every this many bytes written, writeback of the data file starts (`start_writeback`).
///
/// Without it the kernel starts writing a filling image's pages only at its background
/// threshold (10% of memory) or after 30 s, so each flush's fdatasync found up to half a
/// second of fill (500 MB) dirty and took 50+ ms, during which ext4's journal commit held
/// up every other write of the file: a reader's 16 KiB landing waited 40 ms behind it
/// (strace, a 2 GiB fill with random reads). Written behind, the fdatasync finds little
/// left, as RocksDB's `bytes_per_sync` does for its files.
const WRITE_BEHIND: u64 = 16 * 1024 * 1024;

impl ImageFiles {
    /// Creates the image's directory atomically: built under a dot-name, then renamed.
    pub fn create(disk: &Disk, stored: &StoredSpec) -> Result<Arc<ImageFiles>> {
        let dir = disk.image_dir(&stored.spec.name);
        if disk.read_only {
            return Err(Error::Io {
                path: disk.path.clone(),
                msg: "the disk is read-only: its images are served, but no new image can be \
                      stored on it; pick another disk"
                    .into(),
                errno: libc::EROFS,
            });
        }
        // A short name of its own: a name may have 253 characters, and `.<name>.creating`
        // would pass the 255-byte limit of a file name. Leftovers of a crash start with a
        // dot and are removed at the next start (`image_names`).
        let tmp = disk.path.join("images").join(format!(
            ".creating-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let build = || -> Result<()> {
            let data = tmp.join("data");
            File::create(&data)
                .and_then(|f| f.set_len(stored.identity.size))
                .map_err(|e| Error::io(&data, e))?;
            let blocks = stored.identity.size.div_ceil(stored.block_size);
            let bitmap = tmp.join("bitmap");
            File::create(&bitmap)
                .and_then(|f| f.set_len(blocks.div_ceil(64) * 8))
                .map_err(|e| Error::io(&bitmap, e))?;
            write_json_atomic(&tmp.join("spec.json"), stored)?;
            write_json_atomic(&tmp.join("state.json"), &StoredState::pending())?;
            fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))
        };
        if let Err(e) = build() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(Arc::new(Self::open_files(dir, false)?))
    }

    /// Opens the data and bitmap files, for reading only if `read_only`.
    fn open_files(dir: PathBuf, read_only: bool) -> Result<ImageFiles> {
        let open = |name: &str| {
            let p = dir.join(name);
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(&p)
                .map_err(|e| Error::io_doing(&p, "cannot open", e))
        };
        Ok(ImageFiles {
            data: open("data")?,
            bitmap: open("bitmap")?,
            read_only,
            dir,
            dirty: AtomicBool::new(false),
            dirty_from: AtomicUsize::new(usize::MAX),
            unstarted: AtomicU64::new(0),
            #[cfg(feature = "shuttle")]
            journal: Default::default(),
        })
    }

    /// Opens an image left on disk: its spec, state and the durable bits.
    pub fn open(dir: PathBuf) -> Result<(Arc<ImageFiles>, StoredSpec, StoredState, BlockMap)> {
        let stored: StoredSpec = read_json(&dir.join("spec.json"))?;
        let state: StoredState = read_json(&dir.join("state.json"))?;
        // An image on a read-only disk (a read-only mount) opens for reading: a ready
        // one serves as it is; any write to it fails with EROFS.
        let files = match Self::open_files(dir.clone(), false) {
            Err(Error::Io { errno, .. }) if errno == libc::EROFS || errno == libc::EACCES => {
                Self::open_files(dir, true)?
            }
            r => r?,
        };
        // A corrupt spec.json must be an error, not a panic or an abort at every start.
        let bs = stored.block_size;
        if !bs.is_power_of_two() || !(4096..=4 << 20).contains(&bs) {
            return Err(Error::Io {
                path: files.dir.join("spec.json"),
                msg: format!(
                    "unreadable: blockSize {bs} is not a power of two from 4 KiB to 4 MiB"
                ),
                errno: libc::EIO,
            });
        }
        if stored.identity.size > MAX_IMAGE_BYTES {
            return Err(Error::Io {
                path: files.dir.join("spec.json"),
                msg: format!(
                    "unreadable: size {} is beyond the {} bytes bifs supports",
                    stored.identity.size, MAX_IMAGE_BYTES
                ),
                errno: libc::EIO,
            });
        }
        let blocks = stored.identity.size.div_ceil(bs);
        let mut bits = Vec::new();
        let len = files.bitmap.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        bits.resize(len, 0);
        files
            .bitmap
            .read_exact_at(&mut bits, 0)
            .map_err(|e| Error::io(files.dir.join("bitmap"), e))?;
        let map = if state.state == State::Ready {
            let m = BlockMap::new(blocks);
            m.set_range(BlockRange::new(0, blocks));
            m
        } else {
            BlockMap::from_bytes(blocks, &bits)
        };
        Ok((Arc::new(files), stored, state, map))
    }

    /// Notes `event` for the model tests.
    #[cfg(feature = "shuttle")]
    pub(crate) fn note(&self, event: DiskEvent) {
        self.journal.lock().unwrap().push(event);
    }

    /// Writes `chunks` back to back from `offset` with as few syscalls as it takes.
    pub fn write_chunks(&self, mut offset: u64, chunks: &[bytes::Bytes]) -> Result<()> {
        self.check_writable()?;
        // A write takes time: the model lets other tasks run before it.
        #[cfg(feature = "shuttle")]
        shuttle::thread::yield_now();
        #[cfg(feature = "shuttle")]
        let first = offset;
        use std::os::fd::AsRawFd;
        let mut idx = 0;
        let mut skip = 0; // bytes of chunks[idx] already written
        while idx < chunks.len() {
            let iov: Vec<libc::iovec> = chunks[idx..]
                .iter()
                .take(512)
                .enumerate()
                .map(|(i, c)| {
                    let c = if i == 0 { &c[skip..] } else { &c[..] };
                    libc::iovec {
                        iov_base: c.as_ptr() as *mut libc::c_void,
                        iov_len: c.len(),
                    }
                })
                .collect();
            // SAFETY: the iovecs point into `chunks`, alive and unmodified for the call.
            let n = unsafe {
                libc::pwritev(
                    self.data.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as i32,
                    offset as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io(self.dir.join("data"), e));
            }
            if n == 0 {
                return Err(Error::io(
                    self.dir.join("data"),
                    std::io::ErrorKind::WriteZero.into(),
                ));
            }
            let mut n = n as usize;
            offset += n as u64;
            while n > 0 {
                let left = chunks[idx].len() - skip;
                if n >= left {
                    n -= left;
                    idx += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        #[cfg(feature = "shuttle")]
        self.note(DiskEvent::DataWritten {
            offset: first,
            len: offset - first,
        });
        Ok(())
    }

    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.data
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(self.dir.join("data"), e))
    }

    /// EROFS with a message, rather than EBADF from a descriptor opened for reading.
    fn check_writable(&self) -> Result<()> {
        if !self.read_only {
            return Ok(());
        }
        Err(Error::Io {
            path: self.dir.clone(),
            msg: "the image's disk is read-only: what it holds is served, nothing can be added; \
                  make the disk writable and restart bifs"
                .into(),
            errno: libc::EROFS,
        })
    }

    pub fn save_state(&self, state: &StoredState) -> Result<()> {
        self.check_writable()?;
        write_json_atomic(&self.dir.join("state.json"), state)
    }

    pub fn save_spec(&self, stored: &StoredSpec) -> Result<()> {
        self.check_writable()?;
        write_json_atomic(&self.dir.join("spec.json"), stored)
    }

    /// Counts `n` bytes written to the data file; true when writeback should start now
    /// (every `WRITE_BEHIND` bytes).
    pub fn note_written(&self, n: u64) -> bool {
        let before = self.unstarted.fetch_add(n, Ordering::AcqRel);
        if before + n < WRITE_BEHIND {
            return false;
        }
        self.unstarted.store(0, Ordering::Release);
        true
    }

    /// Starts writeback of every dirty page of the data file, without waiting for it
    /// (may block briefly on a full device queue: call it off the async workers).
    pub fn start_writeback(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range reads its integer arguments only; the fd is open for
        // `self`'s life. Offset 0 and length 0 mean the whole file.
        let r = unsafe {
            libc::sync_file_range(self.data.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r != 0 {
            // Only an early start of what the next flush does anyway: nothing is lost.
            tracing::debug!(dir = %self.dir.display(), error = %std::io::Error::last_os_error(), "cannot start writeback");
        }
    }

    /// Notes that bits from `block` on were set in memory and await a flush.
    pub fn mark_dirty(&self, block: u64) {
        self.dirty_from
            .fetch_min((block / 64) as usize, Ordering::AcqRel);
        self.dirty.store(true, Ordering::Release);
    }

    /// Makes every bit set in `map` before this call durable, data first.
    pub fn flush(&self, map: &BlockMap) -> Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let from = self
            .dirty_from
            .swap(usize::MAX, Ordering::AcqRel)
            .min(map.word_count());
        // Snapshot the bits first: every block they cover was written before now,
        // so the fdatasync below makes all of them durable.
        let snapshot = map.to_bytes(from..map.word_count());
        let restore = |e| {
            self.mark_dirty(from as u64 * 64);
            e
        };
        self.data
            .sync_data()
            .map_err(|e| restore(Error::io(self.dir.join("data"), e)))?;
        #[cfg(feature = "shuttle")]
        self.note(DiskEvent::DataSynced);
        // Tests crash here (tests/crash.rs): the data is durable, its bits are not.
        #[cfg(feature = "failpoints")]
        super::failpoint::hit("flush-before-bitmap");
        #[cfg(feature = "shuttle")]
        self.note(DiskEvent::BitsWritten {
            from_word: from,
            bits: snapshot.clone(),
        });
        self.bitmap
            .write_all_at(&snapshot, from as u64 * 8)
            .and_then(|_| self.bitmap.sync_data())
            .map_err(|e| restore(Error::io(self.dir.join("bitmap"), e)))?;
        Ok(())
    }

    pub fn remove(&self) -> Result<()> {
        self.check_writable()?;
        fs::remove_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_with_the_longest_name_is_created_and_a_read_only_disk_refuses_new_ones() {
        let t = tempfile::tempdir().unwrap();
        let disk = Disk::open(t.path()).unwrap();
        let name = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        let stored = StoredSpec {
            spec: ImageSpec::download(&name, "http://h/x", ""),
            identity: Identity::of_size(4096),
            block_size: 4096,
            fill: true,
            created_unix: 0,
        };
        ImageFiles::create(&disk, &stored).unwrap();
        assert_eq!(disk.image_names().unwrap(), vec![name.clone()]);
        let mut ro = disk.clone();
        ro.read_only = true;
        let e = ImageFiles::create(&ro, &stored).err().unwrap().to_string();
        assert!(e.contains("read-only"), "{e}");
    }

    #[test]
    fn only_flushed_bits_survive_a_reopen() {
        let t = tempfile::tempdir().unwrap();
        let disk = Disk::open(t.path()).unwrap();
        let stored = StoredSpec {
            spec: ImageSpec::download("img", "http://h/x", ""),
            identity: Identity::of_size(100_000),
            block_size: 4096,
            fill: true,
            created_unix: 0,
        };
        let files = ImageFiles::create(&disk, &stored).unwrap();
        let map = BlockMap::new(25);
        files
            .write_chunks(0, &[bytes::Bytes::from(vec![7u8; 8192])])
            .unwrap();
        map.set_range(BlockRange::new(0, 2));
        files.mark_dirty(0);
        files.flush(&map).unwrap();
        map.set_range(BlockRange::new(2, 3)); // in memory only: never flushed, like a crash right here
        files.mark_dirty(2);
        drop(files);
        let (files, s, st, map) = ImageFiles::open(disk.image_dir("img")).unwrap();
        assert_eq!(s.block_size, 4096);
        assert_eq!(st.state, State::Pending);
        assert_eq!(map.present_count(), 2);
        let mut buf = [0u8; 4];
        files.read_data(8188, &mut buf).unwrap();
        assert_eq!(buf, [7; 4]);
    }
}

/// Up to this many bytes, a data-file read or write runs on the async worker itself: it is
/// a copy to or from the page cache (a 4 KiB random read: microseconds; a 1 MiB FUSE read:
/// about 100 us), cheaper than handing it to the blocking pool and back, which dominated the
/// latency of random reads and cost a thread switch per MiB of sequential reads. Larger
/// transfers go to the blocking pool so that a worker never stalls for long.
const INLINE_IO_BYTES: usize = 2 * 1024 * 1024;

/// Runs page-cache I/O of `len` bytes inline or on the blocking pool (see above).
pub(crate) async fn page_io<T: Send + 'static>(
    len: usize,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if len <= INLINE_IO_BYTES {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::ShuttingDown)?
}

/// Read buffers shared by the images of a node. Replies to FUSE reads are up to 1 MiB; a
/// fresh zeroed allocation for each cost page faults and zeroing, and with many threads
/// freeing them the allocator's heaps grew the daemon's RSS. A few buffers reused keep
/// both flat.
#[derive(Debug, Default)]
pub struct BufPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Buffers kept for reuse, and the largest one kept.
const POOL_BUFFERS: usize = 8;
const POOL_MIN_BYTES: usize = 64 << 10;
const POOL_MAX_BYTES: usize = 1 << 20;

/// A buffer of a `BufPool`; dropping it gives it back.
pub struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufPool>,
}

impl BufPool {
    /// A buffer of `len` bytes (contents unspecified).
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        // Small reads (random 4 KiB) take a small fresh buffer; large ones reuse 1 MiB ones.
        let pooled = (POOL_MIN_BYTES..=POOL_MAX_BYTES).contains(&len);
        let buf = match pooled.then(|| self.free.lock().unwrap().pop()).flatten() {
            Some(buf) => buf,
            None => vec![0u8; if pooled { POOL_MAX_BYTES } else { len }],
        };
        PooledBuf {
            buf,
            len,
            pool: self.clone(),
        }
    }
}

impl PooledBuf {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if self.buf.len() == POOL_MAX_BYTES {
            let mut free = self.pool.free.lock().unwrap();
            if free.len() < POOL_BUFFERS {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}
