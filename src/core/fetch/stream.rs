//! Running a fetch job: its task, its requests to the image's sources in order (with
//! retries from the first block not yet landed), the stream of each reply (checked
//! against piece digests, batched into whole blocks, handed to waiting readers as it
//! arrives) and the one landing path every source and upload shares (`land`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use super::{Fetcher, FILL_RUN_MIN, MAX_ATTEMPTS, WRITE_BATCH};
use crate::core::error::{Error, Result, SourceError};
use crate::core::jobs::{Arriving, Job, JobGuard};
use crate::core::metrics::Metrics;
use crate::core::range::{BlockRange, ByteRange};
use crate::core::source::{Priority, Source};
use crate::core::store::page_io;
use crate::core::sync::atomic::Ordering;
use crate::core::sync::spawn;

/// How many of the `pending` bytes received from byte `start` of the image (a multiple of
/// `unit`, the whole blocks or pieces landed at once) to write now: at the job's end all
/// of them; before it, none until they reach a `WRITE_BATCH` boundary of the data file,
/// then up to the last such boundary they reach (a whole number of units).
///
/// The boundary is the file's, not the job's: the kernel gives a buffered write folios
/// no larger than the write and aligned to their size, so 256 KiB written at 16 KiB
/// alignment became folios of 16-128 KiB, and a ready image read through passthrough
/// 3-10% slower than the same bytes in the 256 KiB-2 MiB folios of readahead or of
/// aligned writes (a 1 GiB `dd` from the page cache: 0.131-0.148 s against 0.122-0.133 s
/// for the origin file, beside it). Now they are 256-512 KiB folios, and read as fast.
/// Batches are no larger than before (one is smaller, up to the first boundary), so a
/// waiting reader waits no longer.
fn batch_len(start: u64, pending: usize, unit: usize, at_end: bool) -> usize {
    if at_end {
        return pending;
    }
    let unit = unit.max(1) as u64;
    let end = start + (pending as u64 / unit * unit);
    let align = (WRITE_BATCH as u64).max(unit);
    let to = end / align * align;
    if to <= start {
        return 0;
    }
    if (to - start).is_multiple_of(unit) {
        (to - start) as usize
    } else {
        // Units that do not divide the boundary (a peer's odd piece size): whole units.
        (end - start) as usize
    }
}

impl Fetcher {
    /// The guard that ends `job` however its task ends; made before the task is spawned,
    /// so that a task dropped before its first poll ends the job too.
    pub(super) fn guard(&self, job: Arc<Job>) -> JobGuard {
        JobGuard::new(&self.inflight, job, &self.landed, &self.files.dir)
    }

    /// Runs a job as a task of its own: a fill job on the fill runtime when there is one.
    pub(super) fn spawn_job(
        self: &Arc<Self>,
        guard: JobGuard,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let fill_rt = match guard.job().prio {
            Priority::Fill => self.cfg.fill_runtime.clone(),
            Priority::Reader => None,
        };
        let task = self.clone().run_job(guard, permit);
        match fill_rt {
            Some(rt) => drop(rt.spawn(task)),
            None => spawn(task),
        }
    }

    async fn run_job(self: Arc<Self>, guard: JobGuard, permit: Option<OwnedSemaphorePermit>) {
        let job = guard.job().clone();
        let result = self.fetch_job(&job).await;
        if let Err(e) = &result {
            if !matches!(e, Error::ShuttingDown) && self.halted().is_none() {
                if job.prio == Priority::Fill {
                    *self.fill_error.lock().unwrap() = Some(e.clone());
                }
                if let Some(o) = self.observer() {
                    o.fetch_failed(e, job.prio);
                }
            }
        }
        guard.finish(result);
        drop(permit);
    }

    async fn fetch_job(&self, job: &Job) -> Result<()> {
        let mut next = job.blocks.start;
        let mut attempt = 0;
        loop {
            if let Some(e) = self.halted() {
                return Err(e);
            }
            if next >= job.end() {
                return Ok(()); // cut short by a reader, who fetches the rest
            }
            let before = next;
            match self.fetch_from_sources(job, &mut next).await {
                Ok(()) => return Ok(()),
                Err(Error::Source(e)) if e.is_retryable() => {
                    if next > before {
                        attempt = 0;
                    }
                    attempt += 1;
                    if attempt >= MAX_ATTEMPTS {
                        return Err(Error::Source(e));
                    }
                    let pause = Duration::from_millis(100 << attempt.min(6));
                    warn!(image = %self.name, block = next, attempt, error = %e, "range read failed, retrying");
                    tokio::select! {
                        _ = crate::core::sync::sleep(pause) => {}
                        _ = self.cancel.cancelled() => return Err(Error::ShuttingDown),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks each source in turn for blocks `*next..job.end()`.
    async fn fetch_from_sources(&self, job: &Job, next: &mut u64) -> Result<()> {
        let sources = self.sources();
        let mut retryable: Option<SourceError> = None;
        for source in &sources.list {
            let asked_from = *next * self.geo.block_size;
            match self.stream_job(source.as_ref(), job, next).await {
                Ok(()) => return Ok(()),
                Err(Error::Source(e @ SourceError::Corrupt { .. })) => {
                    warn!(image = %self.name, source = %source.describe(), error = %e, "source sent bytes that fail their piece digest; asking the next");
                    source.report_corrupt(ByteRange::new(asked_from, asked_from));
                    retryable = Some(e);
                }
                Err(Error::Source(e @ SourceError::Absent { .. })) => {
                    debug!(image = %self.name, source = %source.describe(), error = %e, "source lacks the blocks, asking the next");
                }
                Err(Error::Source(e)) if e.is_retryable() => {
                    debug!(image = %self.name, source = %source.describe(), error = %e, "source failed, asking the next");
                    retryable = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = retryable {
            return Err(e.into());
        }
        let bytes = self.geo.bytes_of(BlockRange::new(*next, job.end()));
        let reason = match (&sources.unavailable, &sources.when_absent) {
            (Some(why), _) | (None, Some(why)) => why.clone(),
            (None, None) if sources.list.is_empty() => "the image has no source".into(),
            (None, None) => "no source has them".into(),
        };
        Err(Error::NoSource {
            name: self.name.clone(),
            start: bytes.start,
            end: bytes.end,
            reason,
        })
    }

    /// One request to `source` for blocks `*next..job.end()`; advances `*next` as blocks
    /// land. A job cut short by a reader ends where it was cut, dropping the rest.
    async fn stream_job(&self, source: &dyn Source, job: &Job, next: &mut u64) -> Result<()> {
        let bs = self.geo.block_size;
        let want = self.geo.bytes_of(BlockRange::new(*next, job.end()));
        let end_byte = want.end;
        // Without ranges the stream always starts at 0: skip what is not wanted.
        let ask = if source.ranges() {
            want
        } else {
            ByteRange::new(0, self.geo.size)
        };
        let mut skip = (want.start - ask.start) as usize;
        // Pieces are checked when digests are known and the job covers whole pieces (a job
        // planned before the digests arrived may not; its source is the origin, whose
        // version is pinned, and the whole-image checksum still holds it).
        let pieces = self.pieces().filter(|p| {
            want.start.is_multiple_of(p.piece_size)
                && (want.end.is_multiple_of(p.piece_size) || want.end == self.geo.size)
        });
        if pieces.is_none() && source.needs_digests() {
            return Err(SourceError::Absent {
                url: source.describe(),
                start: want.start,
                end: want.end,
            }
            .into());
        }
        let batch_unit = pieces.as_ref().map_or(bs, |p| p.piece_size) as usize;
        debug!(image = %self.name, ?ask, prio = ?job.prio, checked = pieces.is_some(), "range request");
        let asked_at = std::time::Instant::now();
        let mut stream = tokio::select! {
            r = source.read(ask, &self.pin, job.prio) => r?,
            _ = self.cancel.cancelled() => return Err(Error::ShuttingDown),
        };
        self.metrics.request(source.kind(), asked_at.elapsed());

        // Received chunks wait here, uncopied, until whole blocks can be written with one pwritev.
        let mut pending: VecDeque<Bytes> = VecDeque::new();
        let mut pending_len = 0usize;
        let mut run = FILL_RUN_MIN; // bytes taken since the last pause
        loop {
            if job.prio == Priority::Fill && run >= FILL_RUN_MIN {
                self.yield_for(Some(job)).await;
                run = 0;
            }
            let chunk = tokio::select! {
                c = stream.next() => c,
                _ = self.cancel.cancelled() => return Err(Error::ShuttingDown),
            };
            let at_end;
            match chunk {
                Some(Ok(mut c)) => {
                    if skip > 0 {
                        let n = skip.min(c.len());
                        let _ = c.split_to(n);
                        skip -= n;
                    }
                    self.fetched_bytes
                        .fetch_add(c.len() as u64, Ordering::Relaxed);
                    let have = *next * bs + (pending_len + c.len()) as u64;
                    if have > end_byte {
                        if source.ranges() {
                            return Err(SourceError::Protocol {
                                url: source.describe(),
                                reason: "reply longer than asked".into(),
                            }
                            .into());
                        }
                        // A whole-image stream past the job's end: keep what the job wants.
                        c.truncate(c.len() - (have - end_byte) as usize);
                    }
                    run += c.len();
                    pending_len += c.len();
                    pending.push_back(c);
                    at_end = have >= end_byte.min(job.end() * bs);
                }
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(SourceError::Interrupted {
                        url: source.describe(),
                        reason: format!(
                            "body ended at byte {} of {}",
                            *next * bs + pending_len as u64,
                            end_byte
                        ),
                    }
                    .into())
                }
            }
            let start = *next * bs;
            let whole = batch_len(start, pending_len, batch_unit, at_end);
            if whole > 0 {
                // Reserved under the table's lock: a reader's cut lands after this batch.
                let upto = (start + whole as u64).div_ceil(bs);
                let may = self.inflight.lock().reserve(job, upto);
                let cut = may < upto;
                let whole = if cut {
                    ((may.saturating_sub(*next) * bs) as usize).min(whole)
                } else {
                    whole
                };
                if whole == 0 {
                    return Ok(());
                }
                let mut batch = Vec::with_capacity(pending.len());
                let mut need = whole;
                while need > 0 {
                    let mut c = pending.pop_front().expect("pending holds `whole` bytes");
                    if c.len() > need {
                        pending.push_front(c.split_off(need));
                    }
                    need -= c.len();
                    batch.push(c);
                }
                pending_len -= whole;
                self.metrics.bytes(source.kind(), whole as u64);
                if let Some(p) = &pieces {
                    if let Some(bad) = p.check_chunks(*next * bs, &batch) {
                        Metrics::add(&self.metrics.corrupt_pieces);
                        return Err(SourceError::Corrupt {
                            url: source.describe(),
                            piece: bad,
                        }
                        .into());
                    }
                }
                if job.has_waiters() {
                    let arriving = Arriving {
                        offset: *next * bs,
                        chunks: batch.clone(),
                    };
                    job.progress.send_modify(|p| p.arriving = Some(arriving));
                }
                let landed = self.land(*next * bs, batch).await;
                job.progress.send_modify(|p| {
                    p.arriving = None;
                    if let Ok(l) = &landed {
                        p.landed_to = l.end;
                    }
                });
                *next = landed?.end;
                if cut {
                    return Ok(());
                }
            }
            if at_end {
                return Ok(());
            }
        }
    }

    /// The one landing path, for every source and for uploads: writes `chunks` back to
    /// back from `offset` (block-aligned; whole blocks, or up to the image's end), sets
    /// their bits, marks them for the next flush and tells the observer.
    pub async fn land(&self, offset: u64, chunks: Vec<Bytes>) -> Result<BlockRange> {
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let bytes = ByteRange::new(offset, offset + len);
        let bs = self.geo.block_size;
        if !offset.is_multiple_of(bs)
            || (!bytes.end.is_multiple_of(bs) && bytes.end != self.geo.size)
        {
            return Err(Error::BadInput(format!(
                "{bytes:?} of image {:?} are not whole {bs}-byte blocks",
                self.name
            )));
        }
        if bytes.end > self.geo.size {
            return Err(Error::BadInput(format!(
                "{bytes:?} lie past the end of image {:?} ({} bytes)",
                self.name, self.geo.size
            )));
        }
        if let Some(e) = self.halted() {
            return Err(e);
        }
        let files = self.files.clone();
        let one_writer = self.writer.lock().await;
        // All-zero blocks become holes (zeros.rs), whatever source they came from. The
        // chunks come back for verification's feed.
        let chunks = page_io(len as usize, move || {
            crate::core::zeros::write_sparse(&files, offset, &chunks, bs).map(|()| chunks)
        })
        .await?;
        drop(one_writer);
        if self.files.note_written(len) {
            let files = self.files.clone();
            tokio::task::spawn_blocking(move || files.start_writeback());
        }
        let blocks = self.geo.blocks_of(bytes);
        self.map.set_range(blocks);
        self.feed.offer(offset, chunks);
        self.files.mark_dirty(blocks.start);
        if let Some(o) = self.observer() {
            o.landed(blocks);
        }
        self.landed.notify_waiters();
        Ok(blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::batch_len;

    const K: u64 = 1024;

    #[test]
    fn batches_end_on_the_files_write_batch_boundaries() {
        let wb = 256 * K;
        // A job starting 16 KiB into a boundary: nothing until the boundary, then up to it.
        assert_eq!(batch_len(16 * K, 200 * 1024, 16 * 1024, false), 0);
        assert_eq!(batch_len(16 * K, 240 * 1024, 16 * 1024, false), 240 * 1024);
        assert_eq!(batch_len(16 * K, 300 * 1024, 16 * 1024, false), 240 * 1024);
        // From a boundary, whole batches: the last boundary reached, not what lies past it.
        assert_eq!(batch_len(wb, 300 * 1024, 16 * 1024, false), 256 * 1024);
        assert_eq!(batch_len(wb, 600 * 1024, 16 * 1024, false), 512 * 1024);
        // A part block is never written before the job's end; at the end everything is.
        assert_eq!(batch_len(0, 256 * 1024 - 1, 16 * 1024, false), 0);
        assert_eq!(batch_len(0, 10, 16 * 1024, true), 10);
        // Units larger than a batch (4 MiB blocks): one unit at a time.
        assert_eq!(batch_len(4096 * K, 5 << 20, 4 << 20, false), 4 << 20);
        // A unit that does not divide the boundary (a peer's odd piece size): whole units.
        assert_eq!(batch_len(0, 3 * 12288 * 8, 12288 * 8, false), 3 * 12288 * 8);
    }
}
