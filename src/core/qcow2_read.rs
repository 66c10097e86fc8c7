//! The read path of a QCOW2 image's guest view: how guest bytes map to stored bytes and
//! how those are read through the lazy store, on the decoder thread (`qcow2`).
//!
//! - A guest read asks qcow2-rs only for the mappings of its clusters (its L2 cache);
//!   runs of allocated clusters that lie back to back in the stored image are then read
//!   with one stored read each, straight into the reply buffer. Zero and unallocated
//!   clusters are zeros: nothing fetched, nothing copied through the store. Compressed
//!   clusters go through qcow2-rs, which inflates them. Before, qcow2-rs asked its engine
//!   for every 64 KiB cluster alone: 16 requests per 1 MiB read, each absent one a hop
//!   to the node's runtime and a copy more.
//! - Present stored bytes are read from the data file right on the decoder thread (a
//!   page-cache `pread`, cheaper than a hop to another thread); absent ones are fetched
//!   on the node's runtime (`StoredBytes::fetch`, by `Handle::spawn` and awaiting the
//!   `JoinHandle`, awaitable from any runtime, so nothing `!Send` crosses over), then
//!   read the same way. Bytes past the end of the stored image read as zeros, as qcow2
//!   defines them.
//! - Readahead: the allocated clusters of a sequential guest read are a sequential read
//!   of the stored image (unallocated ones skipped), with their own `ReadState`, hits
//!   included: the reader's open file's, so two readers of one view do not reset each
//!   other's window. The metadata and compressed clusters qcow2-rs reads are read
//!   without readahead, so an L2 slice read does not reset the data stream's window.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use futures::FutureExt;
use qcow2_rs::dev::Qcow2Dev;
use qcow2_rs::error::Qcow2Result;
use qcow2_rs::ops::Qcow2IoOps;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::error::{Error, Result};
use super::readahead::ReadState;
use super::store::BufPool;

/// What the decoder needs of an image: its stored bytes.
#[async_trait::async_trait]
pub trait StoredBytes: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// The first 8 characters of the disk's uuid, for logs.
    fn disk8(&self) -> &str;
    /// The stored image's size in bytes.
    fn size(&self) -> u64;
    /// Cancelled when the image goes away or the daemon stops.
    fn cancel_token(&self) -> CancellationToken;
    /// Reads `buf.len()` bytes at `offset` if they can be served without waiting
    /// (present, and verified where that is required), recording the read in `ra` (which
    /// may start readahead: call it inside the node's runtime); None: use `fetch`.
    fn read_now(
        &self,
        offset: u64,
        buf: &mut [u8],
        ra: Option<&Mutex<ReadState>>,
    ) -> Option<Result<()>>;
    /// Makes `len` bytes at `offset` readable by `read_now`, fetching what is absent;
    /// `ra`: the reader's sequential detection, if it reads ahead.
    async fn fetch(&self, offset: u64, len: u32, ra: Option<&Mutex<ReadState>>) -> Result<()>;
    /// Reads `len` bytes at `offset`, fetching what is absent.
    async fn read(&self, offset: u64, len: u32, ra: Option<&Mutex<ReadState>>) -> Result<Bytes>;
}

/// qcow2-rs's I/O unit: offsets and lengths of guest reads are multiples of it.
pub(super) const SECTOR: u64 = 512;
/// The largest single `StoredBytes::read` (its length is a u32).
const MAX_STORED_READ: u64 = 64 * 1024 * 1024;

pub(super) fn decoder_error(name: &str, msg: String) -> Error {
    Error::Io {
        path: PathBuf::from(".raw").join(name),
        msg,
        errno: libc::EIO,
    }
}

/// Where a run of guest bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// The stored bytes from this offset on (allocated, uncompressed clusters, laid out
    /// back to back in the stored image).
    Stored(u64),
    /// Zeros: unallocated or zero clusters (there is no backing file), nothing to fetch.
    Zeros,
    /// Decoded by qcow2-rs (compressed clusters, anything else).
    Decoded,
}

/// A run of guest bytes `start..end` of one kind of piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    end: u64,
    piece: Piece,
}

impl Run {
    /// Extends this run by `next` if that continues it (same kind; for stored bytes, the
    /// next bytes of the stored image too).
    fn extend(&mut self, next: Run) -> bool {
        let continues = self.end == next.start
            && match (self.piece, next.piece) {
                (Piece::Stored(a), Piece::Stored(b)) => a + (self.end - self.start) == b,
                (a, b) => a == b,
            };
        if continues {
            self.end = next.end;
        }
        continues
    }
}

/// Appends the run of one cluster's bytes to `runs`, merging it into the last if it
/// continues it.
fn push_run(runs: &mut Vec<Run>, run: Run) {
    if let Some(last) = runs.last_mut() {
        if last.extend(run) {
            return;
        }
    }
    runs.push(run);
}

/// The kind of piece guest bytes at `guest` (within their cluster) come from.
fn piece_of(mapping: &qcow2_rs::meta::Mapping, guest: u64, cluster_size: u64) -> Piece {
    use qcow2_rs::meta::MappingSource;
    match (&mapping.source, mapping.cluster_offset) {
        (MappingSource::DataFile, Some(host)) => Piece::Stored(host + guest % cluster_size),
        (MappingSource::Zero | MappingSource::Unallocated, _) => Piece::Zeros,
        _ => Piece::Decoded,
    }
}

/// One guest read: the device (for mappings and compressed clusters) and the engine
/// (for allocated clusters, read straight into the reply buffer).
pub(super) struct Guest<'a> {
    pub(super) dev: &'a Qcow2Dev<LazyIo>,
    pub(super) engine: &'a Engine,
    pub(super) virtual_size: u64,
    pub(super) name: &'a str,
}

impl Guest<'_> {
    /// Reads guest bytes `offset..offset+len`, clamped to the virtual size.
    ///
    /// The clusters' mappings come from qcow2-rs (its L2 cache); runs of allocated
    /// clusters that lie back to back in the stored image are then read with one stored
    /// read each, straight into the reply buffer, and zero clusters cost no fetch: a
    /// 1 MiB guest read is one request to the store, not one per cluster (16 with
    /// 64 KiB clusters, each a hop to the node's runtime and a copy when absent).
    /// Compressed clusters still go through qcow2-rs, which inflates them.
    ///
    /// `ra`: the reader's own sequential detection over the stored bytes (two readers of
    /// one view do not reset each other's window); None: the decoder's.
    pub(super) async fn read(
        &self,
        offset: u64,
        len: u64,
        pool: &Arc<BufPool>,
        ra: Option<&Arc<Mutex<ReadState>>>,
    ) -> Result<Bytes> {
        let ra = ra.unwrap_or(&self.engine.data_ra);
        let end = (offset + len).min(self.virtual_size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let start = offset / SECTOR * SECTOR;
        let aligned_end = end.div_ceil(SECTOR) * SECTOR;
        let runs = self.map(start, aligned_end).await?;
        let mut buf = pool.take((aligned_end - start) as usize);
        let mut reads = Vec::new();
        let mut rest = buf.as_mut_slice();
        for run in runs {
            let (part, tail) =
                std::mem::take(&mut rest).split_at_mut((run.end - run.start) as usize);
            rest = tail;
            match run.piece {
                Piece::Zeros => part.fill(0),
                Piece::Stored(at) => reads.push(
                    async move { self.engine.read_stored(at, part, Some(ra)).await }.boxed_local(),
                ),
                Piece::Decoded => reads.push(self.decode(run.start, part).boxed_local()),
            }
        }
        for r in futures::future::join_all(reads).await {
            r?;
        }
        Ok(Bytes::from_owner(buf).slice((offset - start) as usize..(end - start) as usize))
    }

    /// The runs of pieces guest bytes `start..end` (512-aligned) come from.
    async fn map(&self, start: u64, end: u64) -> Result<Vec<Run>> {
        let cluster_size = self.dev.info.cluster_size() as u64;
        let mut runs = Vec::new();
        let mut at = start;
        while at < end {
            let next = ((at / cluster_size + 1) * cluster_size).min(end);
            let mapping = self
                .dev
                .get_mapping(at)
                .await
                .map_err(|e| self.failed(at, next - at, e.to_string()))?;
            let piece = piece_of(&mapping, at, cluster_size);
            push_run(
                &mut runs,
                Run {
                    start: at,
                    end: next,
                    piece,
                },
            );
            at = next;
        }
        Ok(runs)
    }

    /// Decodes guest bytes `at..at+buf.len()` (512-aligned) through qcow2-rs, working
    /// around its miscounted reads at the end of the disk.
    async fn decode(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        let end = at + buf.len() as u64;
        // A read must not cross the virtual size: the whole sectors before it in one read,
        // then (for a size that is not a multiple of 512) the last partial sector alone.
        let whole_end = end.min(self.virtual_size / SECTOR * SECTOR);
        let mut from = at;
        for part_end in [whole_end, end] {
            if part_end <= from {
                continue;
            }
            let part = &mut buf[(from - at) as usize..(part_end - at) as usize];
            let want = part.len();
            match self.dev.read_at(part, from).await {
                Ok(n) if n == want => {}
                Ok(n) => {
                    return Err(self.failed(
                        from,
                        want as u64,
                        format!("short read: {n} of {want} bytes"),
                    ))
                }
                Err(e) => return Err(self.failed(from, want as u64, e.to_string())),
            }
            from = part_end;
        }
        Ok(())
    }

    /// The error of a failed decode: the engine's own, if it had one (the real cause,
    /// which may be worth a retry; qcow2-rs keeps only its text, or reports it as a
    /// short count), else qcow2-rs's message.
    fn failed(&self, at: u64, len: u64, what: String) -> Error {
        if let Some(e) = self.engine.last_error.take() {
            return e;
        }
        warn!(offset = at, len, error = %what, "qcow2 decode failed");
        decoder_error(
            self.name,
            format!("qcow2 decode of guest bytes {at}+{len} failed: {what}"),
        )
    }
}

/// Reads of the stored image through the lazy store, for qcow2-rs (metadata, compressed
/// clusters) and for the allocated clusters `Guest` reads itself.
pub(super) struct Engine {
    /// Weak: the image owns the decoder's channel (see `DecoderCtx`).
    pub(super) image: Weak<dyn StoredBytes>,
    /// The node's runtime, where fetches run.
    pub(super) rt: Handle,
    /// Sequential detection over the allocated clusters guest reads cover, for readers
    /// without one of their own (a sequential guest read is a sequential read of the
    /// stored image, unallocated clusters skipped).
    /// The metadata and compressed clusters qcow2-rs reads itself are read without
    /// readahead: the header and tables sit at the start of the stored image, where
    /// reads look like the start of a sequential stream (a 4 KiB guest read fetched
    /// 6 MiB), and an L2 slice read among data reads would reset the data's window.
    pub(super) data_ra: Arc<Mutex<ReadState>>,
    /// The last error of a read, for the reply (qcow2-rs keeps only its text).
    pub(super) last_error: Rc<RefCell<Option<Error>>>,
}

impl Engine {
    /// Reads stored bytes `offset..offset+buf.len()` into `buf`: present ones from the
    /// data file right here (see the module comment), absent ones fetched on the node's
    /// runtime first. Bytes past the end of the stored image read as zeros.
    async fn read_stored(
        &self,
        offset: u64,
        buf: &mut [u8],
        ra: Option<&Arc<Mutex<ReadState>>>,
    ) -> Result<()> {
        let image = self.image.upgrade().ok_or(Error::ShuttingDown)?;
        let end = (offset + buf.len() as u64).min(image.size());
        let have = end.saturating_sub(offset) as usize;
        buf[have..].fill(0);
        if have == 0 {
            return Ok(());
        }
        // A hit may start readahead: fetches belong on the node's runtime.
        let now = {
            let _rt = self.rt.enter();
            image.read_now(offset, &mut buf[..have], ra.map(|r| &**r))
        };
        if let Some(r) = now {
            return r;
        }
        let mut at = offset;
        while at < end {
            let n = (end - at).min(MAX_STORED_READ);
            let part = &mut buf[(at - offset) as usize..(at - offset + n) as usize];
            let (fetcher, ra) = (image.clone(), ra.cloned());
            self.rt
                .spawn(async move { fetcher.fetch(at, n as u32, ra.as_deref()).await })
                .await
                .map_err(|_| Error::ShuttingDown)??;
            // Present now, read straight into the caller's buffer; should it not be
            // servable after all (failed meanwhile...), the full read says why.
            if image.read_now(at, part, None).is_none() {
                let reader = image.clone();
                let bytes = self
                    .rt
                    .spawn(async move { reader.read(at, n as u32, None).await })
                    .await
                    .map_err(|_| Error::ShuttingDown)??;
                if bytes.len() as u64 != n {
                    return Err(decoder_error(
                        image.name(),
                        format!("stored bytes {at}+{n}: read returned {} bytes", bytes.len()),
                    ));
                }
                part.copy_from_slice(&bytes);
            }
            at += n;
        }
        Ok(())
    }
}

/// qcow2-rs's I/O engine.
pub(super) struct LazyIo(pub(super) Rc<Engine>);

impl Qcow2IoOps for LazyIo {
    async fn read_to(&self, offset: u64, buf: &mut [u8]) -> Qcow2Result<usize> {
        match self.0.read_stored(offset, buf, None).await {
            Ok(()) => Ok(buf.len()),
            Err(e) => {
                let msg = e.to_string();
                *self.0.last_error.borrow_mut() = Some(e);
                Err(msg.into())
            }
        }
    }

    async fn write_from(&self, _offset: u64, _buf: &[u8]) -> Qcow2Result<()> {
        Err("the raw view is read-only".into())
    }

    async fn fallocate(&self, _offset: u64, _len: usize, _flags: u32) -> Qcow2Result<()> {
        Err("the raw view is read-only".into())
    }

    async fn fsync(&self, _offset: u64, _len: usize, _flags: u32) -> Qcow2Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::image::ImageConfig;
    use crate::core::mem_source::MemSource;
    use crate::core::node::{CreateOptions, Node};
    use crate::core::source::Sources;
    use crate::core::spec::ImageSpec;
    use crate::core::View;
    use std::sync::atomic::Ordering;

    const MIB: u64 = 1024 * 1024;

    /// A guest disk of `size_mib` MiB with pseudo-random data in the even MiBs below
    /// `data_below_mib` and zeros elsewhere, and its qcow2 by `qemu-img convert` (64 KiB
    /// clusters; the zero MiBs stay unallocated).
    fn qcow2_with_holes(
        dir: &std::path::Path,
        size_mib: u64,
        data_below_mib: u64,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut guest = vec![0u8; (size_mib * MIB) as usize];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for mib in (0..data_below_mib).step_by(2) {
            for b in &mut guest[(mib * MIB) as usize..((mib + 1) * MIB) as usize] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        let (raw, qcow) = (dir.join("guest.raw"), dir.join("guest.qcow2"));
        std::fs::write(&raw, &guest).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow)
            .output()
            .expect("qemu-img runs (scripts/deps.sh installs qemu-utils)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (guest, std::fs::read(&qcow).unwrap())
    }

    /// A node holding image "q": the qcow2 of a 64 MiB guest with 16 MiB of data in every
    /// other MiB of the first 32 (`qcow2_with_holes`), over a `MemSource`, without fill.
    struct QcowImage {
        image: Arc<crate::core::image::Image>,
        src: Arc<MemSource>,
        guest: Vec<u8>,
        qcow: Vec<u8>,
    }

    /// Runs `test` on a fresh `QcowImage` on a 2-worker runtime, then shuts the node down.
    fn with_qcow_image<F: std::future::Future<Output = ()>>(
        test: impl FnOnce(Arc<QcowImage>) -> F,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (guest, qcow) = qcow2_with_holes(dir.path(), 64, 32);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let disk = dir.path().join("disk");
            std::fs::create_dir(&disk).unwrap();
            let node = Node::start_with(
                &[disk],
                ImageConfig::default(),
                "/t".into(),
                Arc::new(|_: &ImageSpec, _: &_| Sources::none("the test gives its source")),
            )
            .await
            .unwrap();
            let src = Arc::new(MemSource::new(qcow.clone()));
            let image = node
                .create_with_source(
                    ImageSpec::download("q", "http://127.0.0.1:1/q.qcow2", ""),
                    CreateOptions {
                        disk: None,
                        no_fill: true,
                    },
                    src.clone(),
                )
                .await
                .unwrap();
            let q = Arc::new(QcowImage {
                image,
                src,
                guest,
                qcow,
            });
            test(q).await;
            node.shutdown().await;
        });
    }

    #[test]
    fn unallocated_clusters_fetch_nothing_and_allocated_ones_arrive_in_large_requests() {
        with_qcow_image(|q| async move {
            let (image, src, guest, qcow) = (&q.image, &q.src, &q.guest, &q.qcow);
            let read = |offset: u64, len: u64| image.read_view(View::Raw, offset, len as u32, None);
            let want = |offset: u64, len: u64| &guest[offset as usize..(offset + len) as usize];
            // The first read brings in the header, the tables and one cluster.
            assert_eq!(&read(0, 4096).await.unwrap()[..], want(0, 4096));
            let served = src.served.load(Ordering::Relaxed);
            for (offset, len) in [
                (MIB, MIB),
                (40 * MIB, 24 * MIB - 4096),
                (33 * MIB + 512, 4096),
            ] {
                let got = read(offset, len).await.unwrap();
                assert!(
                    got.len() as u64 == len && got.iter().all(|b| *b == 0),
                    "{offset}+{len}"
                );
            }
            assert_eq!(
                src.served.load(Ordering::Relaxed),
                served,
                "reading unallocated guest bytes fetched from the source"
            );
            // A sequential read, in the kernel's 1 MiB requests: each stored byte is
            // fetched once, in requests that grow with the readahead window.
            let requests = src.requests.load(Ordering::Relaxed);
            for offset in (0..64 * MIB).step_by(MIB as usize) {
                assert_eq!(
                    &read(offset, MIB).await.unwrap()[..],
                    want(offset, MIB),
                    "at {offset}"
                );
            }
            let requests = src.requests.load(Ordering::Relaxed) - requests;
            let served = src.served.load(Ordering::Relaxed);
            eprintln!("sequential read of 16 MiB of data: {requests} requests, {served} of {} bytes served", qcow.len());
            assert!(
                served <= qcow.len() as u64,
                "{served} bytes served of {}",
                qcow.len()
            );
            assert!(
                requests <= 10,
                "a sequential read of 16 MiB of allocated clusters took {requests} requests"
            );
        });
    }

    #[test]
    fn two_sequential_readers_of_one_view_each_keep_their_readahead() {
        with_qcow_image(|q| async move {
            let (image, src, guest) = (&q.image, &q.src, &q.guest);
            let want = |offset: u64, len: u64| &guest[offset as usize..(offset + len) as usize];
            image.read_view(View::Raw, 0, 4096, None).await.unwrap();
            // Two open files read guest MiBs 0-16 and 16-32 in 128 KiB reads, taking
            // turns: one shared window would reset at every turn (128 requests).
            let (a, b): (Arc<Mutex<ReadState>>, Arc<Mutex<ReadState>>) = Default::default();
            let requests = src.requests.load(Ordering::Relaxed);
            const CHUNK: u64 = 128 * 1024;
            for k in 0..(16 * MIB / CHUNK) {
                for (base, ra) in [(0, &a), (16 * MIB, &b)] {
                    let offset = base + k * CHUNK;
                    let got = image
                        .read_view(View::Raw, offset, CHUNK as u32, Some(ra))
                        .await
                        .unwrap();
                    assert_eq!(&got[..], want(offset, CHUNK), "at {offset}");
                }
            }
            let requests = src.requests.load(Ordering::Relaxed) - requests;
            eprintln!(
                "two interleaved sequential readers of 8 MiB of data each: {requests} requests"
            );
            assert!(
                requests <= 32,
                "two interleaved sequential readers took {requests} requests"
            );
        });
    }

    fn run(start: u64, end: u64, piece: Piece) -> Run {
        Run { start, end, piece }
    }

    #[test]
    fn clusters_merge_into_runs_only_where_the_stored_bytes_continue() {
        let c = 65536;
        let mut runs = Vec::new();
        // Two clusters back to back in the stored image, then one elsewhere.
        push_run(&mut runs, run(0, c, Piece::Stored(10 * c)));
        push_run(&mut runs, run(c, 2 * c, Piece::Stored(11 * c)));
        push_run(&mut runs, run(2 * c, 3 * c, Piece::Stored(20 * c)));
        // Zero clusters merge with each other, not with stored ones.
        push_run(&mut runs, run(3 * c, 4 * c, Piece::Zeros));
        push_run(&mut runs, run(4 * c, 5 * c, Piece::Zeros));
        push_run(&mut runs, run(5 * c, 6 * c, Piece::Stored(21 * c)));
        push_run(&mut runs, run(6 * c, 7 * c, Piece::Decoded));
        push_run(&mut runs, run(7 * c, 8 * c, Piece::Decoded));
        assert_eq!(
            runs,
            vec![
                run(0, 2 * c, Piece::Stored(10 * c)),
                run(2 * c, 3 * c, Piece::Stored(20 * c)),
                run(3 * c, 5 * c, Piece::Zeros),
                run(5 * c, 6 * c, Piece::Stored(21 * c)),
                run(6 * c, 8 * c, Piece::Decoded),
            ]
        );
    }

    #[test]
    fn a_read_starting_inside_a_cluster_maps_to_its_stored_offset() {
        use qcow2_rs::meta::{Mapping, MappingSource};
        let c = 65536;
        let m = |source, cluster_offset| Mapping {
            source,
            cluster_offset,
            compressed_length: None,
            copied: false,
        };
        assert_eq!(
            piece_of(&m(MappingSource::DataFile, Some(7 * c)), 3 * c + 4096, c),
            Piece::Stored(7 * c + 4096)
        );
        assert_eq!(
            piece_of(&m(MappingSource::Unallocated, None), 0, c),
            Piece::Zeros
        );
        assert_eq!(
            piece_of(&m(MappingSource::Zero, Some(c)), 0, c),
            Piece::Zeros
        );
        assert_eq!(
            piece_of(&m(MappingSource::Compressed, Some(c)), 0, c),
            Piece::Decoded
        );
        assert_eq!(
            piece_of(&m(MappingSource::Backing, None), 0, c),
            Piece::Decoded
        );
    }
}
