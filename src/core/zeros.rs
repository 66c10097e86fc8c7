//! All-zero blocks stay holes: the landing path (`Fetcher::land`) writes landed bytes
//! through `write_sparse`, which writes the runs of blocks holding data and punches the
//! runs of all-zero blocks instead of writing them. Whatever the source (a download, a
//! volume export, an upload, a decompressed stream), a mostly empty image takes the
//! disk space of its data, not of its size, and reads of a hole return zeros.
//!
//! Why punch rather than skip: the data file is sparse from creation, so a zero block
//! that was never written is a hole already and the punch is a cheap no-op; but a block
//! written before a crash whose bit never became durable may hold other bytes, and a
//! hole is the only way to make it zeros without writing them. A filesystem that
//! cannot punch (EOPNOTSUPP) gets the zeros written.
//!
//! Cost: each landed block is compared against zeros with `memcmp`, which stops at the
//! first non-zero byte of a data block; only zero blocks are read to their end.

use std::os::fd::AsRawFd;

use bytes::Bytes;

use super::error::{Error, Result};
use super::store::ImageFiles;
use super::volume::is_all_zero;

/// A run of consecutive blocks of one kind, from `offset`.
#[derive(Debug, PartialEq, Eq)]
pub enum Run {
    Data { offset: u64, chunks: Vec<Bytes> },
    Zeros { offset: u64, len: u64 },
}

/// Splits `chunks` (back to back from `offset`, a block boundary) into runs of data
/// blocks and runs of all-zero blocks. The last block may be short (the image's end).
/// A data run holds one slice per chunk it overlaps (not one per block), so it is
/// written with as few iovecs as the chunks themselves.
pub fn runs(offset: u64, chunks: &[Bytes], block_size: u64) -> Vec<Run> {
    let bs = block_size as usize;
    let mut starts = Vec::with_capacity(chunks.len());
    let mut total = 0usize;
    for c in chunks {
        starts.push(total);
        total += c.len();
    }
    // The bytes a..b of the concatenation, as slices of the chunks.
    let slices = |a: usize, b: usize| -> Vec<Bytes> {
        let first = starts.partition_point(|s| *s <= a).saturating_sub(1);
        let mut out = Vec::new();
        for (c, s) in chunks[first..].iter().zip(&starts[first..]) {
            if *s >= b {
                break;
            }
            let (from, to) = (a.max(*s) - s, b.min(s + c.len()) - s);
            if from < to {
                out.push(c.slice(from..to));
            }
        }
        out
    };
    let is_zero = |a: usize, b: usize| slices(a, b).iter().all(|p| is_all_zero(p));
    // (zero, start, end) in bytes of the concatenation.
    let mut spans: Vec<(bool, usize, usize)> = Vec::new();
    let mut a = 0;
    while a < total {
        let b = (a + bs).min(total);
        let zero = is_zero(a, b);
        match spans.last_mut() {
            Some((z, _, end)) if *z == zero => *end = b,
            _ => spans.push((zero, a, b)),
        }
        a = b;
    }
    spans
        .into_iter()
        .map(|(zero, a, b)| {
            let at = offset + a as u64;
            if zero {
                Run::Zeros {
                    offset: at,
                    len: (b - a) as u64,
                }
            } else {
                Run::Data {
                    offset: at,
                    chunks: slices(a, b),
                }
            }
        })
        .collect()
}

/// Writes `chunks` from `offset` into the data file, all-zero blocks as holes.
pub fn write_sparse(
    files: &ImageFiles,
    offset: u64,
    chunks: &[Bytes],
    block_size: u64,
) -> Result<()> {
    for run in runs(offset, chunks, block_size) {
        match run {
            Run::Data { offset, chunks } => files.write_chunks(offset, &chunks)?,
            Run::Zeros { offset, len } => punch(files, offset, len)?,
        }
    }
    Ok(())
}

/// Makes `len` bytes at `offset` a hole (zeros written where the filesystem cannot).
fn punch(files: &ImageFiles, offset: u64, len: u64) -> Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the fd is open for `files`' life.
    let r = unsafe {
        libc::fallocate(
            files.data.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        #[cfg(feature = "shuttle")]
        files.note(super::store::DiskEvent::DataWritten { offset, len });
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        let zeros = Bytes::from(vec![0u8; len as usize]);
        return files.write_chunks(offset, &[zeros]);
    }
    Err(Error::io(files.dir.join("data"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(fill: u8, len: usize) -> Vec<u8> {
        vec![fill; len]
    }

    #[test]
    fn zero_blocks_split_from_data_blocks_across_chunk_boundaries() {
        // Blocks of 4: data, zero, zero, data, short zero tail; chunked at odd places.
        let mut all = Vec::new();
        all.extend(block(1, 4));
        all.extend(block(0, 8));
        all.extend([0, 0, 0, 9]);
        all.extend(block(0, 2));
        let chunks: Vec<Bytes> = all.chunks(3).map(Bytes::copy_from_slice).collect();
        let runs = runs(100, &chunks, 4);
        assert_eq!(runs.len(), 4, "{runs:?}");
        let data_len = |r: &Run| match r {
            Run::Data { chunks, .. } => chunks.iter().map(Bytes::len).sum::<usize>(),
            Run::Zeros { .. } => 0,
        };
        assert!(matches!(runs[0], Run::Data { offset: 100, .. }));
        assert_eq!(data_len(&runs[0]), 4);
        assert_eq!(
            runs[1],
            Run::Zeros {
                offset: 104,
                len: 8
            }
        );
        assert!(matches!(runs[2], Run::Data { offset: 112, .. }));
        assert_eq!(data_len(&runs[2]), 4);
        assert_eq!(
            runs[3],
            Run::Zeros {
                offset: 116,
                len: 2
            }
        );
    }

    #[test]
    fn written_sparse_file_reads_back_and_keeps_zero_blocks_unallocated() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let disk = super::super::store::Disk::open(dir.path()).unwrap();
        let bs = 64 * 1024u64;
        let size = 64 * bs;
        let stored = super::super::store::StoredSpec {
            spec: super::super::spec::ImageSpec::download("z", "http://h/z", ""),
            identity: super::super::source::Identity::of_size(size),
            block_size: bs,
            fill: true,
            created_unix: 0,
        };
        let files = ImageFiles::create(&disk, &stored).unwrap();
        // Stale bytes where a zero block will land: the punch must clear them.
        files
            .write_chunks(bs, &[Bytes::from(vec![7u8; bs as usize])])
            .unwrap();
        let mut img = vec![0u8; size as usize];
        img[..bs as usize].fill(5);
        img[(63 * bs) as usize..].fill(6);
        let chunks: Vec<Bytes> = img.chunks(100_000).map(Bytes::copy_from_slice).collect();
        write_sparse(&files, 0, &chunks, bs).unwrap();
        let mut back = vec![1u8; size as usize];
        files.read_data(0, &mut back).unwrap();
        assert!(back == img, "content differs");
        let allocated = files.data.metadata().unwrap().blocks() * 512;
        assert!(
            allocated <= 4 * bs,
            "{allocated} bytes allocated for 2 data blocks"
        );
    }
}
