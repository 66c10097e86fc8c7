//! A compact QCOW2 image of a volume, produced lazily: any byte range of the qcow2 file
//! can be asked for, in any order, without writing the file anywhere first. This is what
//! "export from a volume as qcow2" serves to the store block by block, like any source.
//!
//! `Qcow2Layout::build` reads the volume's allocated extents once (SEEK_DATA/SEEK_HOLE,
//! then each cluster that reads all-zero stays unallocated, as `qemu-img convert` leaves
//! it; `ZeroScan::ExtentsOnly` skips the reading and trusts the extents) and fixes the
//! layout; `read_at` then generates the metadata from the in-memory
//! map and reads data clusters from the volume.
//!
//! Layout (the order `qemu-img convert` uses, with all L2 tables before the data):
//! ```text
//! cluster 0            header (version 3, refcount_order 4, no backing file, no compression)
//! refcount table       one 8-byte entry per refcount block
//! refcount blocks      16-bit refcount 1 for every cluster of the file
//! L1 table             one entry per L2 table's worth of the virtual size
//! L2 tables            only for L1 entries that cover at least one allocated cluster
//! data clusters        the allocated guest clusters, in guest order
//! ```
//! Every cluster of the file is referenced exactly once, so every refcount is 1 and
//! every L1/L2 entry carries QCOW_OFLAG_COPIED (qemu-img check insists on both).
//!
//! Memory: one bit per guest cluster plus two counters per L1 entry (a 100 GiB volume
//! with 64 KiB clusters: 200 KiB + 3 KiB), whatever the fragmentation; L2 and refcount
//! clusters are generated when read. A bitmap with per-L2 prefix counts gives both
//! directions of the mapping: guest cluster -> file cluster (rank) and back (select).
//!
//! Virtual size: the volume's size rounded up to 512 bytes, as qemu's raw driver reports
//! a file of that size (`qemu-img convert` of a 1000000-byte raw file gives a virtual
//! size of 1000448); the added tail reads as zeros.
//!
//! Why not qcow2-rs's writer: it needs a seekable local file and rewrites metadata after
//! the data (measured in FACTS.md), so the image would be written whole before a block
//! of it could be served, at twice the disk traffic. A read-only generator of a
//! fixed layout is a few hundred lines and serves any range at once.

use super::error::{Error, Result};
use super::volume::Volume;

/// 64 KiB clusters, qemu's default.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

const QCOW_OFLAG_COPIED: u64 = 1 << 63;
const HEADER_LENGTH: u32 = 112;
const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts
const SCAN_CHUNK_BYTES: u64 = 4 << 20;
/// A multiple of every cluster size (2 MiB at most).
const SCAN_WINDOW_BYTES: u64 = 1 << 30;
/// qemu refuses images whose L1 table is larger (QCOW_MAX_L1_SIZE).
const MAX_L1_BYTES: u64 = 32 << 20;

/// How `Qcow2Layout::build_with` decides which clusters hold data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroScan {
    /// Read the volume's allocated extents and leave clusters that read all-zero out:
    /// the smallest file (as `qemu-img convert`), but every allocated byte is read once
    /// before the first byte of the qcow2 can be served (a full 100 GiB block device:
    /// 100 GiB read up front).
    Read,
    /// Trust SEEK_DATA/SEEK_HOLE: every cluster that touches an extent is data, unread.
    /// Instant for files; zero-filled allocated ranges are then stored, and a block
    /// device (all data) exports at full size.
    ExtentsOnly,
}

#[derive(Debug)]
pub struct Qcow2Layout {
    volume: Volume,
    cluster_bits: u32,
    virtual_size: u64,
    /// One bit per guest cluster: it holds data and gets a data cluster in the file.
    allocated: Vec<u64>,
    /// Per L1 entry, allocated guest clusters before it (one extra entry: the total).
    rank_before_l1: Vec<u64>,
    /// Per L1 entry, L2 tables before it (one extra entry: the number of L2 tables).
    l2_before_l1: Vec<u64>,
    /// First cluster of each region, in file order, and the total.
    rc_table_at: u64,
    rc_blocks_at: u64,
    l1_at: u64,
    l2_at: u64,
    data_at: u64,
    total_clusters: u64,
}

impl Qcow2Layout {
    /// Scans `volume` and lays out its qcow2 image with clusters of `1 << cluster_bits`
    /// bytes (9..=21, as qemu allows), leaving clusters that read all-zero out
    /// (`ZeroScan::Read`).
    pub fn build(volume: &Volume, cluster_bits: u32) -> Result<Qcow2Layout> {
        Self::build_with(volume, cluster_bits, ZeroScan::Read, &mut |_| {})
    }

    /// As `build`, choosing how zero clusters are found and calling `progress(offset)`
    /// as the scan passes volume offsets (each of them once, in order).
    pub fn build_with(
        volume: &Volume,
        cluster_bits: u32,
        scan: ZeroScan,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Qcow2Layout> {
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::BadInput(format!(
                "qcow2 cluster_bits {cluster_bits} is out of range: use 9 (512 B) to 21 (2 MiB)"
            )));
        }
        let cluster = 1u64 << cluster_bits;
        let size = volume.size_bytes();
        let virtual_size = size.div_ceil(512) * 512;
        let guest_clusters = virtual_size.div_ceil(cluster);
        let l2_entries = cluster / 8;
        let l1_entries = guest_clusters.div_ceil(l2_entries);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::BadInput(format!(
                "a {size}-byte volume needs an L1 table larger than qemu's 32 MiB limit with \
                 {cluster}-byte clusters; use larger clusters"
            )));
        }
        let mut allocated = vec![0u64; guest_clusters.div_ceil(64) as usize];

        // Clusters that hold a non-zero byte. `scanned_to` keeps a cluster shared by two
        // extents from being read twice.
        let mut buf = vec![0u8; SCAN_CHUNK_BYTES as usize];
        let mut scanned_to = 0u64;
        // Extents a window at a time: a badly fragmented file has millions of them.
        for w in 0..size.div_ceil(SCAN_WINDOW_BYTES) {
            let window = w * SCAN_WINDOW_BYTES..((w + 1) * SCAN_WINDOW_BYTES).min(size);
            for extent in volume.data_extents(window)? {
                let mut pos = (extent.start & !(cluster - 1)).max(scanned_to);
                let end = (extent.end.div_ceil(cluster) * cluster).min(size);
                while pos < end {
                    let n = (end - pos).min(SCAN_CHUNK_BYTES) as usize;
                    if scan == ZeroScan::ExtentsOnly {
                        for g in pos >> cluster_bits..(pos + n as u64).div_ceil(cluster) {
                            allocated[(g / 64) as usize] |= 1 << (g % 64);
                        }
                        pos += n as u64;
                        progress(pos);
                        continue;
                    }
                    let chunk = &mut buf[..n];
                    if !volume.read_at(pos, chunk)?.is_zero() {
                        for (i, c) in chunk.chunks(cluster as usize).enumerate() {
                            if !super::volume::is_all_zero(c) {
                                let g = (pos >> cluster_bits) + i as u64;
                                allocated[(g / 64) as usize] |= 1 << (g % 64);
                            }
                        }
                    }
                    pos += n as u64;
                    progress(pos);
                }
                scanned_to = scanned_to.max(end);
            }
        }

        let words_per_l2 = (l2_entries / 64) as usize;
        let mut rank_before_l1 = Vec::with_capacity(l1_entries as usize + 1);
        let mut l2_before_l1 = Vec::with_capacity(l1_entries as usize + 1);
        let (mut rank, mut l2s) = (0u64, 0u64);
        for k in 0..l1_entries as usize {
            rank_before_l1.push(rank);
            l2_before_l1.push(l2s);
            let lo = (k * words_per_l2).min(allocated.len());
            let hi = ((k + 1) * words_per_l2).min(allocated.len());
            let n: u64 = allocated[lo..hi]
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum();
            rank += n;
            l2s += u64::from(n > 0);
        }
        rank_before_l1.push(rank);
        l2_before_l1.push(l2s);

        // Refcount blocks count themselves and the table that points at them: iterate
        // until the sizes stop moving (two or three rounds).
        let l1_clusters = (l1_entries * 8).div_ceil(cluster);
        let fixed = 1 + l1_clusters + l2s + rank;
        let per_block = cluster * 8 / (1 << REFCOUNT_ORDER);
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = fixed + rt + rb;
            let rb2 = total.div_ceil(per_block);
            let rt2 = (rb2 * 8).div_ceil(cluster);
            if (rt2, rb2) == (rt, rb) {
                break;
            }
            (rt, rb) = (rt2, rb2);
        }
        let rc_table_at = 1;
        let rc_blocks_at = rc_table_at + rt;
        let l1_at = rc_blocks_at + rb;
        let l2_at = l1_at + l1_clusters;
        let data_at = l2_at + l2s;
        Ok(Qcow2Layout {
            volume: volume.clone(),
            cluster_bits,
            virtual_size,
            allocated,
            rank_before_l1,
            l2_before_l1,
            rc_table_at,
            rc_blocks_at,
            l1_at,
            l2_at,
            data_at,
            total_clusters: data_at + rank,
        })
    }

    /// Length of the qcow2 file in bytes.
    pub fn len(&self) -> u64 {
        self.total_clusters << self.cluster_bits
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The guest size the header declares: the volume size rounded up to 512.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest clusters that hold data (each is one data cluster in the file).
    pub fn data_clusters(&self) -> u64 {
        self.total_clusters - self.data_at
    }

    /// Bytes of header, refcounts, L1 and L2 tables.
    pub fn metadata_bytes(&self) -> u64 {
        self.data_at << self.cluster_bits
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Fills `buf` with the qcow2 file's bytes from `offset`; returns how many (fewer
    /// than `buf.len()` only at the end of the file). Blocking: data clusters are read
    /// from the volume.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = self.len();
        if offset >= len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(len - offset) as usize;
        let cb = self.cluster_bits;
        let csize = 1u64 << cb;
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let c = pos >> cb;
            let within = (pos & (csize - 1)) as usize;
            if c >= self.data_at {
                done += self.read_data(c, within, &mut buf[done..n])?;
                continue;
            }
            let take = (csize as usize - within).min(n - done);
            self.read_metadata(c, within, &mut buf[done..done + take]);
            done += take;
        }
        Ok(n)
    }

    /// Data clusters from file cluster `c` (byte `within` of it) into `out`, as one
    /// volume read per run of consecutive guest clusters. Returns the bytes written.
    fn read_data(&self, c: u64, within: usize, out: &mut [u8]) -> Result<usize> {
        let cb = self.cluster_bits;
        let csize = 1u64 << cb;
        let g = self.select(c - self.data_at);
        // Extend over following file clusters while they are the following guest clusters.
        let want_clusters = (within as u64 + out.len() as u64).div_ceil(csize);
        let mut run = 1u64;
        let guest_clusters = self.virtual_size.div_ceil(csize);
        while run < want_clusters && g + run < guest_clusters && self.is_allocated(g + run) {
            run += 1;
        }
        let take = ((run << cb) - within as u64).min(out.len() as u64) as usize;
        let start = (g << cb) + within as u64;
        // The volume ends inside the last cluster; past it (the 512 rounding and the
        // cluster's tail) the guest reads zeros.
        let size = self.volume.size_bytes();
        let from_volume = size.saturating_sub(start).min(take as u64) as usize;
        if from_volume > 0 {
            self.volume.read_at(start, &mut out[..from_volume])?;
        }
        out[from_volume..take].fill(0);
        Ok(take)
    }

    /// Bytes `within..within + out.len()` of metadata cluster `c` (< data_at). Only the
    /// entries asked for are generated: with 2 MiB clusters a whole L2 table is 262144
    /// entries, too many to make for every small read.
    fn read_metadata(&self, c: u64, within: usize, out: &mut [u8]) {
        if c == 0 {
            let header = self.header();
            out.fill(0);
            if within < header.len() {
                let n = (header.len() - within).min(out.len());
                out[..n].copy_from_slice(&header[within..within + n]);
            }
            return;
        }
        let entry_size = if (self.rc_blocks_at..self.l1_at).contains(&c) {
            2
        } else {
            8
        };
        let first = within / entry_size;
        let end = (within + out.len()).div_ceil(entry_size);
        let mut entries = vec![0u8; (end - first) * entry_size];
        self.fill_entries(c, first as u64, &mut entries);
        let skip = within - first * entry_size;
        out.copy_from_slice(&entries[skip..skip + out.len()]);
    }

    /// Entries of metadata cluster `c` from entry index `first`, into `out` (zeroed).
    fn fill_entries(&self, c: u64, first: u64, out: &mut [u8]) {
        let cb = self.cluster_bits;
        let csize = 1u64 << cb;
        if c < self.rc_blocks_at {
            // Refcount table: entry i points at refcount block i.
            let first = (c - self.rc_table_at) * (csize / 8) + first;
            let blocks = self.l1_at - self.rc_blocks_at;
            for (i, e) in out.chunks_exact_mut(8).enumerate() {
                let idx = first + i as u64;
                if idx < blocks {
                    e.copy_from_slice(&((self.rc_blocks_at + idx) << cb).to_be_bytes());
                }
            }
        } else if c < self.l1_at {
            // Refcount block: every cluster of the file has refcount 1.
            let first = (c - self.rc_blocks_at) * (csize / 2) + first;
            for (i, e) in out.chunks_exact_mut(2).enumerate() {
                if first + (i as u64) < self.total_clusters {
                    e.copy_from_slice(&1u16.to_be_bytes());
                }
            }
        } else if c < self.l2_at {
            let first = (c - self.l1_at) * (csize / 8) + first;
            let l1_entries = self.rank_before_l1.len() as u64 - 1;
            for (i, e) in out.chunks_exact_mut(8).enumerate() {
                let k = (first + i as u64) as usize;
                if (k as u64) < l1_entries && self.l2_before_l1[k + 1] > self.l2_before_l1[k] {
                    let at = (self.l2_at + self.l2_before_l1[k]) << cb;
                    e.copy_from_slice(&(at | QCOW_OFLAG_COPIED).to_be_bytes());
                }
            }
        } else {
            // L2 table number t belongs to the L1 entry k whose count of tables before it
            // is t and that has a table of its own.
            let t = c - self.l2_at;
            let k = self.l2_before_l1.partition_point(|&x| x <= t) - 1;
            let first_guest = k as u64 * (csize / 8) + first;
            let mut next_data = self.rank(first_guest);
            for (i, e) in out.chunks_exact_mut(8).enumerate() {
                let g = first_guest + i as u64;
                if self.is_allocated(g) {
                    let at = (self.data_at + next_data) << cb;
                    e.copy_from_slice(&(at | QCOW_OFLAG_COPIED).to_be_bytes());
                    next_data += 1;
                }
            }
        }
    }

    fn header(&self) -> [u8; HEADER_LENGTH as usize] {
        let mut out = [0u8; HEADER_LENGTH as usize];
        let l1_entries = self.rank_before_l1.len() as u64 - 1;
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes()); // version
                                     // 8: backing_file_offset, 16: backing_file_size: none
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        // 32: crypt_method none
        put(36, &(l1_entries as u32).to_be_bytes());
        put(40, &(self.l1_at << self.cluster_bits).to_be_bytes());
        put(48, &(self.rc_table_at << self.cluster_bits).to_be_bytes());
        let rc_table_clusters = (self.rc_blocks_at - self.rc_table_at) as u32;
        put(56, &rc_table_clusters.to_be_bytes());
        // 60: nb_snapshots, 64: snapshots_offset, 72..96: feature bits: all zero
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &HEADER_LENGTH.to_be_bytes());
        // 104: compression_type zlib (unused), padding; the end-of-extensions marker
        // (eight zero bytes) follows at 112, in the zeroed rest of the cluster.
        out
    }

    /// Allocated guest clusters before guest cluster `g`.
    fn rank(&self, g: u64) -> u64 {
        let words_per_l2 = (1u64 << self.cluster_bits) / 8 / 64;
        let k = g / (words_per_l2 * 64);
        let word_at = |w: u64| self.allocated.get(w as usize).copied().unwrap_or(0);
        let whole: u64 = (k * words_per_l2..g / 64)
            .map(|w| u64::from(word_at(w).count_ones()))
            .sum();
        let part = word_at(g / 64) & ((1u64 << (g % 64)) - 1);
        self.rank_before_l1[k as usize] + whole + u64::from(part.count_ones())
    }

    fn is_allocated(&self, g: u64) -> bool {
        self.allocated
            .get((g / 64) as usize)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    /// The guest cluster that holds the `j`-th data cluster (j < data_clusters()).
    fn select(&self, j: u64) -> u64 {
        let k = self.rank_before_l1.partition_point(|&r| r <= j) - 1;
        let words_per_l2 = (1u64 << self.cluster_bits) / 8 / 64;
        let mut left = j - self.rank_before_l1[k];
        let mut w = k as u64 * words_per_l2;
        loop {
            let word = self.allocated[w as usize];
            let ones = u64::from(word.count_ones());
            if left < ones {
                let mut word = word;
                for _ in 0..left {
                    word &= word - 1; // clear the lowest set bit
                }
                return w * 64 + u64::from(word.trailing_zeros());
            }
            left -= ones;
            w += 1;
        }
    }
}

#[cfg(test)]
#[path = "qcow2_export_tests.rs"]
mod tests;
