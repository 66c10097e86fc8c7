//! Verification: SHA-512 of the whole image, computed incrementally over the prefix of
//! present blocks, so that it ends moments after the last block lands instead of
//! re-reading the image afterwards. The hashing runs on one thread per node (the second
//! core, or whatever CPU readers leave) while fetches continue on the async workers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha512};
use tracing::{debug, error};

use super::error::Error;
use super::image::Image;
use super::store::State;

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

impl Default for HashWorker {
    fn default() -> Self {
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
}

impl HashWorker {
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

impl Image {
    /// Runs until the image is ready or failed (or the daemon stops).
    pub(crate) async fn verify_loop(self: Arc<Self>) {
        let mut hasher = Some(Sha512::new());
        let mut buf = Some(Vec::with_capacity(HASH_CHUNK as usize));
        let mut hashed: u64 = 0; // bytes
        loop {
            let notified = self.landed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.state() {
                State::Ready | State::Failed => return,
                _ => {}
            }
            let block = hashed / self.block_size;
            let run = if block < self.blocks() {
                self.map.present_run(block)
            } else {
                0
            };
            let avail = ((block + run) * self.block_size).min(self.size);
            if avail > hashed {
                let end = avail.min(hashed + HASH_CHUNK);
                let (files, mut h, mut b) = (
                    self.files.clone(),
                    hasher.take().unwrap(),
                    buf.take().unwrap(),
                );
                let start = hashed;
                let res = self
                    .cfg
                    .hasher
                    .run(move || {
                        b.resize((end - start) as usize, 0);
                        let r = files.read_data(start, &mut b);
                        if r.is_ok() {
                            h.update(&b);
                        }
                        (h, b, r)
                    })
                    .await;
                let Some((h, b, r)) = res else { return };
                hasher = Some(h);
                buf = Some(b);
                if let Err(e) = r {
                    self.fail(&e);
                    return;
                }
                hashed = end;
                continue;
            }
            if hashed == self.size {
                self.finish_verify(hasher.take().unwrap());
                return;
            }
            tokio::select! {
                _ = notified => {}
                _ = self.cancel.cancelled() => return,
            }
        }
    }

    fn finish_verify(&self, hasher: Sha512) {
        let got = hex::encode(hasher.finalize());
        let want = self.stored().spec.checksum;
        if !want.is_empty() && !want.eq_ignore_ascii_case(&got) {
            self.fail(&Error::Checksum { want, got });
            return;
        }
        debug!(image = %self.name, "checksum verified");
        // Ready promises that every byte is durable: flush before saying so.
        if let Err(e) = self.files.flush(&self.map) {
            self.fail(&e);
            return;
        }
        if let Err(e) = self.set_ready(got) {
            error!(image = %self.name, error = %e, "cannot record ready state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_stays_in_the_background_only_while_readers_are_active() {
        let w = HashWorker::default();
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
