//! Sequential-read detection per open file: decides when a reader's next bytes are worth
//! fetching ahead, and how many (a window that doubles up to `readahead_max` and resets
//! on a seek, as mountpoint-s3's prefetcher does). Pure: the fetcher acts on its answer.

use super::fetch::FetchConfig;
use super::range::ByteRange;

/// Per-open-file sequential detection.
#[derive(Debug, Default)]
pub struct ReadState {
    next: u64,
    window: u64,
    prefetched_to: u64,
    reads: u64,
}

impl ReadState {
    /// Records a read of `bytes`; returns the byte range to prefetch, if any.
    pub fn advance(&mut self, bytes: ByteRange, size: u64, cfg: &FetchConfig) -> Option<ByteRange> {
        let (offset, end) = (bytes.start, bytes.end);
        // The kernel issues readahead requests concurrently, so they may arrive a little
        // out of order: anything near the expected offset still counts as sequential.
        let slack = 2 * 1024 * 1024;
        // A stream starts only at the exact offset the last read ended (or at 0); random
        // reads that land near each other must not open a window (they did: 1 MiB
        // prefetches among 16 KiB misses raised amplification from 4.4x to 7.9x).
        let near = offset + slack >= self.next && offset <= self.next + slack;
        let sequential = (self.reads == 0 && offset == 0)
            || (self.reads > 0
                && if self.window == 0 {
                    offset == self.next
                } else {
                    near
                });
        self.reads += 1;
        self.next = self.next.max(end);
        if !sequential {
            self.next = end;
            self.window = 0;
            self.prefetched_to = 0;
            return None;
        }
        // The first window is 1 MiB (or the whole allowance, if that is smaller).
        let first = (1024 * 1024).min(cfg.readahead_max);
        self.window = (self.window * 2).clamp(first, cfg.readahead_max.max(first));
        let from = self.prefetched_to.max(end);
        let to = (end + self.window).min(size);
        if to <= from {
            return None;
        }
        // Top up only when at least half a window is missing: fewer, larger requests.
        if self.prefetched_to > end && self.prefetched_to - end > self.window / 2 {
            return None;
        }
        self.prefetched_to = to;
        Some(ByteRange::new(from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readahead_window_grows_on_sequential_reads_and_resets_on_a_seek() {
        let cfg = FetchConfig::default();
        let mut ra = ReadState::default();
        let size = 1 << 30;
        let r1 = ra.advance(ByteRange::new(0, 131072), size, &cfg).unwrap();
        assert_eq!(r1, ByteRange::new(131072, 131072 + 1024 * 1024));
        let mut off = 131072;
        let mut last_window = ra.window;
        for _ in 0..20 {
            ra.advance(ByteRange::new(off, off + 131072), size, &cfg);
            off += 131072;
            assert!(ra.window >= last_window);
            last_window = ra.window;
        }
        assert_eq!(ra.window, cfg.readahead_max);
        assert!(ra
            .advance(ByteRange::new(700 << 20, (700 << 20) + 4096), size, &cfg)
            .is_none());
        assert_eq!(ra.window, 0);
    }
}
