//! Verification: the digest of the whole image (SHA-512 as Longhorn, or SHA-256),
//! computed incrementally over the prefix of present blocks, so that it ends moments
//! after the last block lands instead of re-reading the image afterwards. The hashing
//! runs on one thread per node (`HashWorker`, owned by the node: the second core, or
//! whatever CPU readers leave) while fetches continue on the async workers.
//! `hash_prefix` knows no `Image`: the image compares the digest with its spec and
//! alone decides ready or failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::bitmap::BlockMap;
use super::error::{Error, Result};
use super::range::Geometry;
use super::spec::ChecksumAlgorithm as Algo;
use super::store::ImageFiles;

/// Bytes hashed per blocking call: large enough to amortise the hand-off.
const HASH_CHUNK: u64 = 4 * 1024 * 1024;

type HashJob = Box<dyn FnOnce() + Send>;

/// The node's hashing thread. SHA-512 costs a core at ~500 MiB/s here, as much as the
/// whole fetch path at line rate, so on a 2-core host it must not take the CPU a reader
/// needs. While readers read images still arriving (within the last `READER_QUIET`), the
/// thread runs as SCHED_IDLE: it gets only CPU time nobody else wants. Otherwise it
/// runs at nice 10 and catches up at full speed. One thread serves every image of the
/// node; the policy is checked between 4 MiB chunks (~8 ms of hashing).
pub struct HashWorker {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<HashJob>>,
    pressure: Arc<ReaderPressure>,
}

/// How long after the last such read hashing stays in the background.
const READER_QUIET: Duration = Duration::from_millis(250);

/// When a reader last read an image still arriving, in milliseconds since `epoch`.
struct ReaderPressure {
    epoch: Instant,
    last_read_ms: AtomicU64,
}

impl ReaderPressure {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn readers_active(&self) -> bool {
        let last = self.last_read_ms.load(Ordering::Relaxed);
        last != 0 && self.now_ms().saturating_sub(last) < READER_QUIET.as_millis() as u64
    }
}

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
        let pressure = Arc::new(ReaderPressure {
            epoch: Instant::now(),
            last_read_ms: AtomicU64::new(0),
        });
        let p = pressure.clone();
        std::thread::Builder::new()
            .name("bifs-hash".into())
            .spawn(move || {
                let mut idle = false;
                set_background(idle);
                while let Ok(job) = rx.recv() {
                    let want = p.readers_active();
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
        }
    }

    /// Runs `f` on the hashing thread; None if the thread is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: HashJob = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx.lock().unwrap().send(job).ok()?;
        rx.await.ok()
    }

    /// A reader is reading an image that is still arriving (waiting on a fetch, or
    /// served what readahead landed): hashing yields the CPU for a while.
    pub fn reader_active(&self) {
        let now = self.pressure.now_ms();
        self.pressure.last_read_ms.store(now, Ordering::Relaxed);
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

/// What `hash_prefix` needs of an image: no `Image`, so it runs in unit tests as is.
pub struct VerifyInput {
    pub files: Arc<ImageFiles>,
    pub map: Arc<BlockMap>,
    pub geo: Geometry,
    /// Woken when blocks land (or the image's state changes).
    pub landed: Arc<Notify>,
    pub algo: Algo,
    pub hasher: Arc<HashWorker>,
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
        cancel,
    } = input;
    let mut hasher = Some(Hasher::new(algo));
    let mut buf = Some(Vec::with_capacity(HASH_CHUNK as usize));
    let mut hashed: u64 = 0; // bytes
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
            let res = worker
                .run(move || {
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

    #[test]
    fn hashing_stays_in_the_background_only_while_readers_are_active() {
        let w = HashWorker::start();
        assert!(!w.pressure.readers_active(), "no reader yet");
        w.reader_active();
        assert!(w.pressure.readers_active());
        std::thread::sleep(READER_QUIET + Duration::from_millis(50));
        assert!(
            !w.pressure.readers_active(),
            "quiet again after READER_QUIET"
        );
    }
}
