//! Block ranges and byte ranges, as distinct types: a reader asks for bytes, presence is
//! tracked per block, sources are asked for bytes again. Mixing the two units was the
//! easiest bug to write in the old fetch path (`u64` everywhere); the types make every
//! conversion explicit and put the rounding rules in one place (`Geometry`).

use std::fmt;

/// Block indices `start..end` of one image.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BlockRange {
    pub start: u64,
    pub end: u64,
}

/// Byte offsets `start..end` of one image.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl BlockRange {
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn contains(&self, block: u64) -> bool {
        self.start <= block && block < self.end
    }
}

impl ByteRange {
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl fmt::Debug for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blocks {}..{}", self.start, self.end)
    }
}

impl fmt::Debug for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bytes {}..{}", self.start, self.end)
    }
}

/// The shape of one image: its size and the block size presence is tracked in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub block_size: u64,
}

impl Geometry {
    pub fn new(size: u64, block_size: u64) -> Self {
        assert!(block_size > 0, "a block size is never zero");
        Self { size, block_size }
    }

    /// How many blocks cover the image (the last one may be short).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    /// The blocks that hold any byte of `bytes` (clamped to the image).
    pub fn blocks_of(&self, bytes: ByteRange) -> BlockRange {
        let end = bytes.end.min(self.size);
        let start = bytes.start.min(end);
        if start == end {
            let b = start / self.block_size;
            return BlockRange::new(b, b);
        }
        BlockRange::new(start / self.block_size, end.div_ceil(self.block_size))
    }

    /// The bytes of `blocks` (the last block ends at the image's end).
    pub fn bytes_of(&self, blocks: BlockRange) -> ByteRange {
        ByteRange::new(
            (blocks.start * self.block_size).min(self.size),
            (blocks.end * self.block_size).min(self.size),
        )
    }

    /// The bytes a read of `len` at `offset` can return: empty past the end.
    pub fn clamp(&self, offset: u64, len: u64) -> ByteRange {
        let start = offset.min(self.size);
        ByteRange::new(start, offset.saturating_add(len).min(self.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_outwards_and_clamp_to_the_image() {
        let g = Geometry::new(100, 16);
        assert_eq!(g.blocks(), 7);
        assert_eq!(g.blocks_of(ByteRange::new(15, 17)), BlockRange::new(0, 2));
        assert_eq!(g.blocks_of(ByteRange::new(96, 500)), BlockRange::new(6, 7));
        assert!(g.blocks_of(ByteRange::new(200, 300)).is_empty());
        assert_eq!(g.bytes_of(BlockRange::new(5, 7)), ByteRange::new(80, 100));
        assert_eq!(g.clamp(90, 50), ByteRange::new(90, 100));
        assert!(g.clamp(150, 10).is_empty());
    }
}
