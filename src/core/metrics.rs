//! Node-wide counters the shells export (`GET /metrics`): bytes and requests by source
//! kind, time to first byte of source requests, cache hits and misses of reads, verify
//! failures, copies removed and evicted. Plain atomics: counting costs a few nanoseconds on paths
//! that move megabytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-byte histogram's buckets.
pub const TTFB_BUCKETS: [f64; 8] = [0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, f64::INFINITY];

/// The kinds of source bytes are counted by.
pub const SOURCE_KINDS: [&str; 3] = ["url", "peer", "other"];

#[derive(Debug, Default)]
pub struct KindCounters {
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
    /// Cumulative bucket counts of the time to first byte, and the sum in microseconds.
    pub ttfb_buckets: [AtomicU64; 8],
    pub ttfb_sum_us: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub by_kind: [KindCounters; 3],
    /// Reads answered from blocks already present.
    pub cache_hits: AtomicU64,
    /// Reads that had to wait for blocks to be fetched.
    pub cache_misses: AtomicU64,
    /// Images whose whole checksum did not match.
    pub verify_failures: AtomicU64,
    /// Pieces refused because they failed their digest.
    pub corrupt_pieces: AtomicU64,
    /// Copies removed by the cleanup (unused for the wait interval).
    pub copies_removed: AtomicU64,
    /// Copies evicted to make room for a new image (held elsewhere, unused).
    pub evictions: AtomicU64,
    /// Bytes verification hashed from the buffers they arrived in.
    pub hashed_received: AtomicU64,
    /// Bytes verification read back from the data file to hash them.
    pub hashed_read_back: AtomicU64,
}

fn index(kind: &str) -> usize {
    SOURCE_KINDS.iter().position(|k| *k == kind).unwrap_or(2)
}

impl Metrics {
    pub fn kind(&self, kind: &str) -> &KindCounters {
        &self.by_kind[index(kind)]
    }

    /// A request to a source of `kind` answered after `ttfb`.
    pub fn request(&self, kind: &str, ttfb: Duration) {
        let k = self.kind(kind);
        k.requests.fetch_add(1, Ordering::Relaxed);
        let secs = ttfb.as_secs_f64();
        for (i, le) in TTFB_BUCKETS.iter().enumerate() {
            if secs <= *le {
                k.ttfb_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        k.ttfb_sum_us
            .fetch_add(ttfb.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn bytes(&self, kind: &str, n: u64) {
        self.kind(kind).bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
