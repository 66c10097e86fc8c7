//! The single-flight table of one image's fetcher: which runs of blocks are being
//! fetched, by which job, and how far each has landed. A block is covered by at most one
//! job at a time (`Claims::claim` asserts it); every reader that needs it waits on that
//! job's progress (`Job::wait_landed`), and a job wakes its waiters with an error however
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

use tokio::sync::{watch, Notify};

use super::error::{Error, Result};
use super::range::BlockRange;
use super::source::Priority;
use super::sync::atomic::{AtomicU64, Ordering};
use super::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone, Default)]
pub(crate) struct JobProgress {
    /// Blocks before this index have landed.
    pub landed_to: u64,
    pub done: bool,
    pub error: Option<Error>,
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
    /// from the subscription on, not from the first poll).
    pub async fn wait_landed(rx: &mut watch::Receiver<JobProgress>, upto: u64) -> Result<()> {
        loop {
            {
                let p = rx.borrow_and_update();
                if p.landed_to >= upto {
                    return Ok(());
                }
                if let Some(e) = &p.error {
                    return Err(e.clone());
                }
                if p.done {
                    return Ok(()); // ended short without error: the caller re-plans
                }
            }
            if rx.changed().await.is_err() {
                return Ok(());
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
