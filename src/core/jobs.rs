//! The single-flight table of one image's fetcher: which runs of blocks are being
//! fetched, by which job, and how far each has landed. A block is covered by at most one
//! job at a time (`Claims::claim` asserts it); every reader that needs it waits on that
//! job's progress (`Job::wait_arrived`), and a job wakes its waiters with an error however
//! its task ends (`JobGuard`). The fetcher decides what to claim and runs the jobs; this
//! module only keeps the table, so that the model tests (`model_tests.rs`, shuttle) and
//! the daemon run the same code.
//!
//! A job's end can be cut short (`Claims::cut`), so that a reader far ahead of a fill
//! stream fetches its blocks itself rather than wait for the stream to get there. Both
//! the cut and the job's landings (`Claims::reserve`) happen under the table's lock, and
//! a cut never goes below what the job has reserved: no block is landed by two jobs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use super::error::{Error, Result};
use super::range::{BlockRange, ByteRange};
use super::source::Priority;
use super::sync::atomic::{AtomicU64, Ordering};
use super::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone, Default)]
pub(crate) struct JobProgress {
    /// Blocks before this index have landed.
    pub landed_to: u64,
    pub done: bool,
    pub error: Option<Error>,
    /// Bytes the job received and is writing now, when readers wait on it: they are
    /// answered from here, not after the write (which can wait behind the fill's writes
    /// and the file system's journal for milliseconds).
    pub arriving: Option<Arriving>,
}

/// Received bytes on their way into the data file: `chunks` back to back from `offset`.
#[derive(Debug, Clone)]
pub(crate) struct Arriving {
    pub offset: u64,
    pub chunks: Vec<Bytes>,
}

impl Arriving {
    /// The bytes of `want`, if they all arrived here (no copy when one chunk holds them).
    pub fn get(&self, want: ByteRange) -> Option<Bytes> {
        let len: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        if want.start < self.offset || want.end > self.offset + len || want.is_empty() {
            return None;
        }
        let mut at = self.offset;
        let mut out: Option<Vec<u8>> = None;
        for c in &self.chunks {
            let end = at + c.len() as u64;
            if end > want.start && at < want.end {
                let from = (want.start.max(at) - at) as usize;
                let to = (want.end.min(end) - at) as usize;
                if out.is_none() && at <= want.start && want.end <= end {
                    return Some(c.slice(from..to));
                }
                out.get_or_insert_with(|| Vec::with_capacity(want.len() as usize))
                    .extend_from_slice(&c[from..to]);
            }
            at = end;
        }
        out.map(Bytes::from)
    }
}

pub(crate) struct Job {
    /// The blocks asked for when the job was claimed; it covers `blocks.start..end()`.
    pub blocks: BlockRange,
    pub prio: Priority,
    /// Where the job ends now: `blocks.end` unless a reader cut it short.
    end: AtomicU64,
    /// Blocks before this one the job has landed or is landing (no cut goes below it).
    reserved: AtomicU64,
    /// `send_modify`, never `send`: `send` drops the value when no one listens yet, and
    /// a reader that subscribes later would wait for an end it never sees.
    pub progress: watch::Sender<JobProgress>,
}

impl Job {
    /// The end of the blocks this job covers (`blocks.end`, or where a reader cut it).
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Blocks before this one are landed or being landed by the job.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// Whether a reader waits on this job now: each waiter holds a receiver of its
    /// progress (a fill job with waiters never pauses for readers).
    pub fn has_waiters(&self) -> bool {
        self.progress.receiver_count() > 0
    }

    /// Waits until block `upto - 1` of this job has landed (or the job ended), on a
    /// receiver of `progress` the waiter subscribed (the wait counts in `has_waiters`
    /// from the subscription on, not from the first poll). With `want` (bytes in the
    /// job's blocks before `upto`), answers with them as soon as they arrived, before
    /// they are written. `None`: they landed, or the job ended short without an error
    /// (read the file, or plan again).
    pub async fn wait_arrived(
        rx: &mut watch::Receiver<JobProgress>,
        upto: u64,
        want: Option<ByteRange>,
    ) -> Result<Option<Bytes>> {
        loop {
            {
                let p = rx.borrow_and_update();
                if p.landed_to >= upto {
                    return Ok(None);
                }
                // A halt's error wins over bytes still on their way.
                if let Some(e) = &p.error {
                    return Err(e.clone());
                }
                if let Some(b) = want.and_then(|w| p.arriving.as_ref()?.get(w)) {
                    return Ok(Some(b));
                }
                if p.done {
                    return Ok(None);
                }
            }
            if rx.changed().await.is_err() {
                return Ok(None);
            }
        }
    }
}

/// The jobs in flight, by first block.
#[derive(Default)]
pub(crate) struct JobTable {
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
}

impl JobTable {
    /// The table, locked: plan under one lock, so no other planner claims in between.
    pub fn lock(&self) -> Claims<'_> {
        Claims(self.jobs.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Tells the waiters of every job in flight that the fetcher halted with `err`: they
    /// stop waiting now, not when a job stalled on its source ends (maybe never). The
    /// jobs themselves end at their next landing, which a halted fetcher refuses.
    pub fn fail_all(&self, err: &Error) {
        for job in self.lock().0.values() {
            job.progress.send_modify(|p| p.error = Some(err.clone()));
        }
    }

    /// After `resume`: the jobs still in flight did not fail (an ended job has left the
    /// table before its error is set), so new waiters must not see the halt's error.
    pub fn clear_errors(&self) {
        for job in self.lock().0.values() {
            job.progress.send_modify(|p| p.error = None);
        }
    }
}

/// The locked table.
pub(crate) struct Claims<'a>(MutexGuard<'a, BTreeMap<u64, Arc<Job>>>);

impl Claims<'_> {
    /// The job covering `block`, if any.
    pub fn covering(&self, block: u64) -> Option<Arc<Job>> {
        self.0
            .range(..=block)
            .next_back()
            .filter(|(_, j)| j.end() > block)
            .map(|(_, j)| j.clone())
    }

    /// The first block of the first job starting at `from` or after (u64::MAX: none).
    pub fn next_start(&self, from: u64) -> u64 {
        self.0.range(from..).next().map_or(u64::MAX, |(s, _)| *s)
    }

    /// The first job in flight that covers a block of `run`.
    pub fn in_the_way(&self, run: BlockRange) -> Option<Arc<Job>> {
        self.covering(run.start).or_else(|| {
            self.0
                .range(run.start..run.end)
                .next()
                .map(|(_, j)| j.clone())
        })
    }

    /// Enters a job for `run`, whose blocks no job covers (the caller checked, under
    /// this same lock). The model tests assert it on every claim.
    pub fn claim(&mut self, run: BlockRange, prio: Priority) -> Arc<Job> {
        #[cfg(feature = "shuttle")]
        assert!(
            self.in_the_way(run).is_none(),
            "{run:?} overlaps a job in flight"
        );
        let job = Arc::new(Job {
            blocks: run,
            prio,
            end: AtomicU64::new(run.end),
            reserved: AtomicU64::new(run.start),
            progress: watch::channel(JobProgress::default()).0,
        });
        self.0.insert(run.start, job.clone());
        job
    }

    /// Cuts `job` (in flight) short at block `at`: from there on its blocks are no one's,
    /// for the caller to claim. Never below what the job has reserved for landing; false
    /// if nothing is left to cut.
    pub fn cut(&mut self, job: &Job, at: u64) -> bool {
        let at = at.max(job.reserved());
        if at >= job.end() {
            return false;
        }
        job.end.store(at, Ordering::Release);
        true
    }

    /// The job's task is about to land blocks up to `upto`: reserves them and returns how
    /// far it may land (less than `upto` if a reader cut the job meanwhile).
    pub fn reserve(&mut self, job: &Job, upto: u64) -> u64 {
        let upto = upto.min(job.end());
        job.reserved.fetch_max(upto, Ordering::AcqRel);
        upto
    }

    /// The jobs in flight, in block order.
    #[cfg(all(test, feature = "shuttle"))]
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.0.values().cloned().collect()
    }
}

/// Ends a job however its task ends: normally, by error, by panic or dropped, even
/// dropped before its first poll (the guard is made when the job is claimed and moves
/// into the task). Waiters are woken with the job's error (or a "task ended" one) and
/// the job leaves the table.
pub(crate) struct JobGuard {
    table: Arc<JobTable>,
    job: Arc<Job>,
    /// Woken when the job ends (the fetcher's "blocks landed or a job ended").
    ended: Arc<Notify>,
    /// The image's folder, named in the error of a job whose task ended unexpectedly.
    dir: PathBuf,
    result: Option<Result<()>>,
}

impl JobGuard {
    pub fn new(table: &Arc<JobTable>, job: Arc<Job>, ended: &Arc<Notify>, dir: &Path) -> Self {
        Self {
            table: table.clone(),
            job,
            ended: ended.clone(),
            dir: dir.to_path_buf(),
            result: None,
        }
    }

    pub fn job(&self) -> &Arc<Job> {
        &self.job
    }

    /// Ends the job with `result`.
    pub fn finish(mut self, result: Result<()>) {
        self.result = Some(result);
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or_else(|| {
            Err(Error::Io {
                path: self.dir.join("data"),
                msg: format!(
                    "the fetch of {:?} ended unexpectedly (its task panicked or was dropped)",
                    self.job.blocks
                ),
                errno: libc::EIO,
            })
        });
        // Out of the table before its end is told: `clear_errors` counts on it.
        self.table.lock().0.remove(&self.job.blocks.start);
        self.job.progress.send_modify(|p| {
            p.done = true;
            p.error = result.err();
        });
        self.ended.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arriving() -> Arriving {
        // 30 bytes from offset 100, in chunks of 10, 5 and 15: byte i holds i.
        let all: Vec<u8> = (100u8..130).collect();
        Arriving {
            offset: 100,
            chunks: vec![
                Bytes::copy_from_slice(&all[..10]),
                Bytes::copy_from_slice(&all[10..15]),
                Bytes::copy_from_slice(&all[15..]),
            ],
        }
    }

    #[test]
    fn arrived_bytes_are_sliced_within_and_across_chunks() {
        let a = arriving();
        let get = |s: u64, e: u64| a.get(ByteRange::new(s, e)).map(|b| b.to_vec());
        let want = |s: u8, e: u8| Some((s..e).collect::<Vec<u8>>());
        assert_eq!(get(100, 130), want(100, 130), "all of it");
        assert_eq!(get(102, 108), want(102, 108), "inside the first chunk");
        assert_eq!(get(110, 115), want(110, 115), "the second chunk exactly");
        assert_eq!(get(108, 121), want(108, 121), "across three chunks");
        assert_eq!(get(99, 105), None, "starts before");
        assert_eq!(get(125, 131), None, "ends after");
        assert_eq!(get(110, 110), None, "empty");
    }
}
