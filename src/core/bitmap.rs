//! Readiness: which blocks of an image are present in the data file.
//!
//! Bits are atomic so readers check presence without a lock; a bit goes from 0 to 1
//! only after the block's bytes are in the data file (page cache), and never back
//! while the image exists. Durability is a separate matter (see `store`): the bitmap
//! *file* only receives bits whose data has been `fdatasync`ed.
//!
//! Size: one bit per block. With 16 KiB blocks a 100 GiB image has 6.5 M blocks,
//! 800 KiB of bitmap in memory and on disk.

use std::ops::Range;

use super::range::BlockRange;
use super::sync::atomic::{AtomicU64, Ordering};

pub struct BlockMap {
    words: Vec<AtomicU64>,
    blocks: u64,
    present: AtomicU64,
}

impl BlockMap {
    pub fn new(blocks: u64) -> Self {
        let n = blocks.div_ceil(64) as usize;
        Self {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            blocks,
            present: AtomicU64::new(0),
        }
    }

    /// Loads the bits from their on-disk form (little-endian words); excess bits are ignored.
    pub fn from_bytes(blocks: u64, bytes: &[u8]) -> Self {
        let map = Self::new(blocks);
        for (i, w) in map.words.iter().enumerate() {
            let mut buf = [0u8; 8];
            let start = i * 8;
            if start < bytes.len() {
                let end = (start + 8).min(bytes.len());
                buf[..end - start].copy_from_slice(&bytes[start..end]);
            }
            let mut v = u64::from_le_bytes(buf);
            if i == map.words.len() - 1 && !blocks.is_multiple_of(64) {
                v &= (1u64 << (blocks % 64)) - 1;
            }
            w.store(v, Ordering::Relaxed);
        }
        let count = map
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum();
        map.present.store(count, Ordering::Relaxed);
        map
    }

    /// The on-disk form of words `range` (little-endian, 8 bytes a word).
    pub fn to_bytes(&self, words: Range<usize>) -> Vec<u8> {
        let mut out = Vec::with_capacity(words.len() * 8);
        for w in &self.words[words] {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out
    }

    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn present_count(&self) -> u64 {
        self.present.load(Ordering::Acquire)
    }

    pub fn is_complete(&self) -> bool {
        self.present_count() == self.blocks
    }

    pub fn is_set(&self, block: u64) -> bool {
        debug_assert!(block < self.blocks);
        self.words[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Sets the bits of `range`; returns how many were newly set.
    pub fn set_range(&self, range: BlockRange) -> u64 {
        let mut added = 0;
        let mut b = range.start;
        let end = range.end.min(self.blocks);
        while b < end {
            let word = b / 64;
            let lo = b % 64;
            let hi = (end - word * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[word as usize].fetch_or(mask, Ordering::AcqRel);
            added += (mask & !old).count_ones() as u64;
            b = word * 64 + hi;
        }
        self.present.fetch_add(added, Ordering::AcqRel);
        added
    }

    /// Whether every block of `range` is present.
    pub fn all_set(&self, range: BlockRange) -> bool {
        self.first_missing(range).is_none()
    }

    /// The first absent block in `range`.
    pub fn first_missing(&self, range: BlockRange) -> Option<u64> {
        self.scan(range, true)
    }

    /// The first present block in `range`.
    pub fn first_present(&self, range: BlockRange) -> Option<u64> {
        self.scan(range, false)
    }

    /// The length of the run of present blocks starting at `from`.
    pub fn present_run(&self, from: u64) -> u64 {
        self.first_missing(BlockRange::new(from, self.blocks))
            .unwrap_or(self.blocks)
            - from
    }

    fn scan(&self, range: BlockRange, want_missing: bool) -> Option<u64> {
        let end = range.end.min(self.blocks);
        let mut b = range.start;
        while b < end {
            let word = b / 64;
            let mut v = self.words[word as usize].load(Ordering::Acquire);
            if want_missing {
                v = !v;
            }
            v &= u64::MAX << (b % 64);
            if v != 0 {
                let found = word * 64 + v.trailing_zeros() as u64;
                return (found < end).then_some(found);
            }
            b = (word + 1) * 64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64),
        SetRange(u64, u64),
        Reopen,
    }

    fn op(blocks: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..blocks).prop_map(Op::Set),
            (0..blocks, 0..200u64).prop_map(move |(a, n)| Op::SetRange(a, (a + n).min(blocks))),
            Just(Op::Reopen),
        ]
    }

    proptest! {
        #[test]
        fn block_map_matches_a_set_model(blocks in 1u64..700, ops in proptest::collection::vec(op(700), 1..60)) {
            let mut real = BlockMap::new(blocks);
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Set(b) if b < blocks => {
                        let added = real.set_range(BlockRange::new(b, b + 1));
                        prop_assert_eq!(added, model.insert(b) as u64);
                    }
                    Op::Set(_) => {}
                    Op::SetRange(a, e) => {
                        let e = e.min(blocks);
                        let before = model.len() as u64;
                        for b in a.min(e)..e { model.insert(b); }
                        prop_assert_eq!(real.set_range(BlockRange::new(a.min(e), e)), model.len() as u64 - before);
                    }
                    Op::Reopen => {
                        let bytes = real.to_bytes(0..real.word_count());
                        real = BlockMap::from_bytes(blocks, &bytes);
                    }
                }
                prop_assert_eq!(real.present_count(), model.len() as u64);
                let got: Vec<u64> = (0..blocks).filter(|&b| real.is_set(b)).collect();
                prop_assert_eq!(got, model.iter().copied().collect::<Vec<_>>());
                let first_missing = (0..blocks).find(|b| !model.contains(b));
                prop_assert_eq!(real.first_missing(BlockRange::new(0, blocks)), first_missing);
                let first_present = model.iter().next().copied();
                prop_assert_eq!(real.first_present(BlockRange::new(0, blocks)), first_present);
            }
        }
    }

    #[test]
    fn scans_respect_range_ends() {
        let m = BlockMap::new(200);
        m.set_range(BlockRange::new(10, 130));
        assert_eq!(m.first_missing(BlockRange::new(10, 130)), None);
        assert_eq!(m.first_missing(BlockRange::new(10, 131)), Some(130));
        assert_eq!(m.first_present(BlockRange::new(0, 10)), None);
        assert_eq!(m.first_present(BlockRange::new(0, 11)), Some(10));
        assert_eq!(m.present_run(10), 120);
        assert_eq!(m.present_count(), 120);
    }
}
