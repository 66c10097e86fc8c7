//! An in-memory source with fault injection (errors, bodies cut short, panics, stalls,
//! bytes it lacks, a replaced object), for the core's tests and the benches: the core's
//! behaviour under every failure a source can show is tested without a network.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::StreamExt;

use super::error::SourceError;
use super::range::ByteRange;
use super::source::{ByteStream, Identity, Priority, Source};

/// What a `MemSource` does to its next read instead of serving it.
#[derive(Debug, Clone)]
pub enum MemFault {
    /// Fail the request with this error.
    Error(SourceError),
    /// Send this many bytes of the body, then break off.
    Truncate(usize),
    /// Panic inside the request (a bug in a source must strand no reader).
    Panic,
    /// Never answer (a stalled origin).
    Stall,
    /// Send each chunk of the body this long after the last (a slow stream).
    Slow(std::time::Duration),
}

/// An in-memory source with fault injection, for tests and benches.
pub struct MemSource {
    data: Mutex<(Bytes, Identity)>,
    pub served: AtomicU64,
    pub requests: AtomicU64,
    /// Every range asked for, with its priority, in order.
    pub asked: Mutex<Vec<(ByteRange, Priority)>>,
    faults: Mutex<VecDeque<MemFault>>,
    /// Byte ranges this source does not have (answered with `Absent`).
    holes: Mutex<Vec<ByteRange>>,
    ranges: bool,
    chunk: usize,
}

impl MemSource {
    pub fn new(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        let id = Identity {
            size: data.len() as u64,
            etag: Some("\"v1\"".into()),
            last_modified: None,
            ranges: true,
        };
        Self {
            data: Mutex::new((data, id)),
            served: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            asked: Mutex::new(Vec::new()),
            faults: Mutex::new(VecDeque::new()),
            holes: Mutex::new(Vec::new()),
            ranges: true,
            chunk: 64 * 1024,
        }
    }

    /// A source that serves only the whole image (a server without range support).
    pub fn without_ranges(mut self) -> Self {
        self.ranges = false;
        self.data.lock().unwrap().1.ranges = false;
        self
    }

    /// The next read fails with `e`.
    pub fn fail_next(&self, e: SourceError) {
        self.fault_next(MemFault::Error(e));
    }

    /// The next read suffers `f`.
    pub fn fault_next(&self, f: MemFault) {
        self.faults.lock().unwrap().push_back(f);
    }

    /// Drops the faults not yet suffered.
    pub fn clear_faults(&self) {
        self.faults.lock().unwrap().clear();
    }

    /// Reads touching `range` answer `Absent` from now on.
    pub fn lack(&self, range: ByteRange) {
        self.holes.lock().unwrap().push(range);
    }

    /// Replaces the content, as an origin whose file was overwritten.
    pub fn replace(&self, data: impl Into<Bytes>, etag: &str) {
        let data = data.into();
        let mut g = self.data.lock().unwrap();
        g.1 = Identity {
            size: data.len() as u64,
            etag: Some(etag.into()),
            last_modified: None,
            ranges: self.ranges,
        };
        g.0 = data;
    }
}

#[async_trait]
impl Source for MemSource {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn ranges(&self) -> bool {
        self.ranges
    }

    async fn probe(&self) -> Result<Identity, SourceError> {
        Ok(self.data.lock().unwrap().1.clone())
    }

    async fn read(
        &self,
        range: ByteRange,
        id: &Identity,
        prio: Priority,
    ) -> Result<ByteStream, SourceError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.asked.lock().unwrap().push((range, prio));
        let fault = self.faults.lock().unwrap().pop_front();
        let mut keep = usize::MAX;
        let mut pace = None;
        match fault {
            Some(MemFault::Error(e)) => return Err(e),
            Some(MemFault::Panic) => panic!("MemSource: injected panic"),
            Some(MemFault::Stall) => futures::future::pending::<()>().await,
            Some(MemFault::Truncate(n)) => keep = n,
            Some(MemFault::Slow(d)) => pace = Some(d),
            None => {}
        }
        let overlaps = |h: &ByteRange| h.start < range.end && range.start < h.end;
        if self.holes.lock().unwrap().iter().any(overlaps) {
            return Err(SourceError::Absent {
                url: self.describe(),
                start: range.start,
                end: range.end,
            });
        }
        let (data, now) = self.data.lock().unwrap().clone();
        id.check(now.etag.as_deref(), None)?;
        if now.size != id.size {
            return Err(SourceError::Changed {
                what: "size",
                was: id.size.to_string(),
                now: now.size.to_string(),
            });
        }
        if !self.ranges && (range.start != 0 || range.end != now.size) {
            return Err(SourceError::Protocol {
                url: self.describe(),
                reason: format!("{range:?} asked of a source without ranges"),
            });
        }
        let bytes = data.slice(range.start as usize..range.end as usize);
        let bytes = bytes.slice(..keep.min(bytes.len()));
        let cut = keep != usize::MAX;
        self.served.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut chunks: Vec<Result<Bytes, SourceError>> = (0..bytes.len())
            .step_by(self.chunk)
            .map(|o| Ok(bytes.slice(o..(o + self.chunk).min(bytes.len()))))
            .collect();
        if cut {
            chunks.push(Err(SourceError::Interrupted {
                url: self.describe(),
                reason: "injected: body cut short".into(),
            }));
        }
        let stream = futures::stream::iter(chunks);
        Ok(match pace {
            None => stream.boxed(),
            Some(d) => stream
                .then(move |c| async move {
                    tokio::time::sleep(d).await;
                    c
                })
                .boxed(),
        })
    }
}
