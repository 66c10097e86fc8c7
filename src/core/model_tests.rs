//! Model checking of the fetch table, the data-file writer and the flush, with shuttle
//! (as mountpoint-s3 checks its prefetcher). These run the real `Fetcher`, `JobTable`,
//! `BlockMap` and `ImageFiles` (files in a temp folder): under the `shuttle` feature
//! their locks, atomics and job spawns are shuttle's (`sync.rs`), so shuttle chooses
//! the interleaving at every point where bifs synchronises, and a reader stranded for
//! ever is a failure ("deadlock"). Sources and the halt, delete and flush calls are
//! tasks; the source yields between chunks, so a job lands in several batches.
//!
//! Run: `cargo test --lib --features shuttle model_` (scripts/test.sh does);
//! `MODEL_ITERATIONS` sets the schedules per scheduler (scripts/soak.sh runs many more).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use shuttle::future::{block_on, spawn, yield_now};
use shuttle::rand::Rng;
use tokio_util::sync::CancellationToken;

use super::bitmap::BlockMap;
use super::error::{Error, SourceError};
use super::fetch::{FetchConfig, Fetcher};
use super::jobs::{Job, JobGuard, JobTable};
use super::metrics::Metrics;
use super::pieces::PieceDigests;
use super::range::{BlockRange, ByteRange, Geometry};
use super::source::{ByteStream, FillPolicy, Identity, Priority, Source, Sources};
use super::spec::ImageSpec;
use super::store::{BufPool, Disk, DiskEvent, ImageFiles, StoredSpec};

/// Blocks of 128 KiB, chunks of half a block: a job of 4 blocks lands in two batches of
/// 256 KiB (`WRITE_BATCH`), so readers see a job half landed.
const BS: u64 = 128 * 1024;
const BLOCKS: u64 = 8;
const CHUNK: usize = (BS / 2) as usize;

/// Schedules per scheduler and property (`MODEL_ITERATIONS`, default 100: about 12 s on 2 cores).
fn iterations() -> usize {
    std::env::var("MODEL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// Runs `f` under shuttle's random scheduler and under PCT (depth 3), each for
/// `iterations()` schedules.
fn check(f: impl Fn() + Send + Sync + 'static) {
    let f = Arc::new(f);
    let g = f.clone();
    shuttle::check_random(move || g(), iterations());
    shuttle::check_pct(move || f(), iterations(), 3);
}

fn image_bytes() -> Bytes {
    (0..(BLOCKS * BS) as usize)
        .map(|i| (i / 7 % 251) as u8 + 1) // no zero block: every block is a data write
        .collect::<Vec<u8>>()
        .into()
}

/// A source that serves its bytes in chunks with a scheduling point before each, counts
/// the bytes it handed over per block, and stalls for ever when told (a hung origin).
struct ModelSource {
    data: Bytes,
    stall: bool,
    /// Bytes handed to the fetcher, per block (a stream dropped early hands no more).
    served: Arc<std::sync::Mutex<Vec<u32>>>,
}

#[async_trait]
impl Source for ModelSource {
    fn describe(&self) -> String {
        "model".into()
    }
    fn ranges(&self) -> bool {
        true
    }
    async fn probe(&self) -> Result<Identity, SourceError> {
        Ok(identity())
    }
    async fn read(
        &self,
        range: ByteRange,
        _pin: &Identity,
        _prio: Priority,
    ) -> Result<ByteStream, SourceError> {
        if self.stall {
            futures::future::pending::<()>().await;
        }
        let body = self.data.slice(range.start as usize..range.end as usize);
        let chunks: Vec<(u64, Bytes)> = (0..body.len())
            .step_by(CHUNK)
            .map(|o| {
                let at = range.start + o as u64;
                (at, body.slice(o..(o + CHUNK).min(body.len())))
            })
            .collect();
        let served = self.served.clone();
        Ok(futures::stream::iter(chunks)
            .then(move |(at, c)| {
                let served = served.clone();
                async move {
                    yield_now().await;
                    served.lock().unwrap()[(at / BS) as usize] += c.len() as u32;
                    Ok(c)
                }
            })
            .boxed())
    }
}

/// The fill of a node that shares the work with others (peers) in units of 4 blocks, and
/// leaves none of them to the others.
struct FourBlockUnits;

impl FillPolicy for FourBlockUnits {
    fn unit_bytes(&self) -> Option<u64> {
        Some(4 * BS)
    }
    fn defer(&self, _bytes: ByteRange) -> bool {
        false
    }
    fn first_unit(&self, _units: u64) -> u64 {
        0
    }
}

fn identity() -> Identity {
    Identity {
        size: BLOCKS * BS,
        etag: Some("\"m\"".into()),
        last_modified: None,
        ranges: true,
    }
}

/// One image over a `ModelSource`, its fetcher as the daemon builds it.
struct World {
    fetcher: Arc<Fetcher>,
    source: Arc<ModelSource>,
    want: Bytes,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

fn temp_dir() -> tempfile::TempDir {
    // tmpfs where there is one: fdatasync is then cheap, and thousands of schedules run.
    match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").expect("temp dir"),
        false => tempfile::tempdir().expect("temp dir"),
    }
}

fn world(stall: bool) -> World {
    world_with(stall, false)
}

/// `shared`: the fill shares its work with other nodes in units of 4 blocks (peers).
fn world_with(stall: bool, shared: bool) -> World {
    let dir = temp_dir();
    let disk = Disk::open(dir.path()).expect("disk");
    let stored = StoredSpec {
        spec: ImageSpec::download("m", "http://127.0.0.1:1/m", ""),
        identity: identity(),
        block_size: BS,
        fill: true,
        created_unix: 0,
    };
    let files = ImageFiles::create(&disk, &stored).expect("image files");
    let want = image_bytes();
    let source = Arc::new(ModelSource {
        data: want.clone(),
        stall,
        served: Arc::new(std::sync::Mutex::new(vec![0; BLOCKS as usize])),
    });
    let cancel = CancellationToken::new();
    let fetcher = Arc::new(Fetcher::new(
        "m".into(),
        Geometry::new(BLOCKS * BS, BS),
        Arc::new(BlockMap::new(BLOCKS)),
        files,
        identity(),
        Sources {
            fill_policy: shared.then(|| Arc::new(FourBlockUnits) as Arc<dyn FillPolicy>),
            ..Sources::one(source.clone())
        },
        FetchConfig {
            max_request: 4 * BS,
            readahead_max: 8 * BS,
            read_timeout: None, // a stranded reader is a deadlock shuttle reports
            fill_runtime: None,
            ..FetchConfig::default()
        },
        Arc::new(BufPool::default()),
        Arc::new(Metrics::default()),
        cancel.clone(),
    ));
    World {
        fetcher,
        source,
        want,
        cancel,
        _dir: dir,
    }
}

impl World {
    /// A reader of `blocks` that comes at any moment (`arrive_late`): ensure, then read; the bytes or the error.
    fn reader(&self, blocks: BlockRange) -> shuttle::future::JoinHandle<Result<Bytes, Error>> {
        let f = self.fetcher.clone();
        spawn(async move {
            arrive_late().await;
            // As a FUSE read: answered from the bytes as they arrived, or from the file.
            let want = f.geometry().bytes_of(blocks);
            match f.ensure_read(want, true).await? {
                (_, Some(arrived)) => Ok(arrived),
                (_, None) => f.read_present(want),
            }
        })
    }

    fn expect_bytes(&self, blocks: BlockRange, got: &Bytes) {
        let want = self.want.slice(
            (blocks.start * BS) as usize..(blocks.end * BS).min(self.want.len() as u64) as usize,
        );
        assert!(got[..] == want[..], "{blocks:?}: a reader got other bytes");
    }

    /// A fill job from block 0, as the fill starts one (with its permit).
    fn fill(&self) -> shuttle::future::JoinHandle<()> {
        let f = self.fetcher.clone();
        spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(1));
            let permit = permits.try_acquire_owned().expect("a permit");
            f.start_fill_job(0, permit);
        })
    }

    /// No block landed twice, and none came from the source more than twice (twice only
    /// when a reader cut short the fill job whose stream held it, not yet landed).
    fn assert_fetched_once(&self) {
        let journal = self.fetcher.files().journal.lock().unwrap().clone();
        let mut landed = vec![0u32; BLOCKS as usize];
        for e in &journal {
            if let DiskEvent::DataWritten { offset, len } = e {
                for b in offset / BS..(offset + len).div_ceil(BS) {
                    landed[b as usize] += 1;
                }
            }
        }
        assert!(
            landed.iter().all(|&n| n <= 1),
            "a block landed twice: {landed:?}"
        );
        let served = self.source.served.lock().unwrap().clone();
        assert!(
            served.iter().all(|&n| u64::from(n) <= 2 * BS),
            "a block came from the source more than twice (bytes per block): {served:?}"
        );
    }

    /// Waits (yielding) until no job is in flight.
    async fn settle(&self) {
        while !self.fetcher.jobs().lock().jobs().is_empty() {
            yield_now().await;
        }
    }
}

/// Every job in the table covers blocks no other job covers (`claim` also asserts it).
fn assert_disjoint(table: &JobTable) {
    let jobs = table.lock().jobs();
    for pair in jobs.windows(2) {
        assert!(
            pair[0].end() <= pair[1].blocks.start,
            "jobs {:?} (to {}) and {:?} overlap",
            pair[0].blocks,
            pair[0].end(),
            pair[1].blocks
        );
    }
}

/// Lets 0 to 15 scheduling points pass: a task that comes at any moment, not first.
async fn arrive_late() {
    for _ in 0..shuttle::rand::thread_rng().gen_range(0..16) {
        yield_now().await;
    }
}

fn halt_error() -> Error {
    Error::Checksum {
        want: "a".into(),
        got: "b".into(),
    }
}

/// Two readers and the fill on one block: each block is fetched once, every reader is
/// woken with its bytes, no two jobs ever cover one block.
#[test]
fn model_two_readers_and_the_fill_on_one_block() {
    check(|| {
        let w = world(false);
        block_on(async {
            let fill = w.fill();
            let r1 = w.reader(BlockRange::new(2, 3));
            let r2 = w.reader(BlockRange::new(1, 6));
            let watcher = {
                let f = w.fetcher.clone();
                spawn(async move {
                    for _ in 0..4 {
                        assert_disjoint(f.jobs());
                        yield_now().await;
                    }
                })
            };
            fill.await.unwrap();
            let b1 = r1
                .await
                .unwrap()
                .expect("no fault: the reader gets its bytes");
            let b2 = r2
                .await
                .unwrap()
                .expect("no fault: the reader gets its bytes");
            w.expect_bytes(BlockRange::new(2, 3), &b1);
            w.expect_bytes(BlockRange::new(1, 6), &b2);
            watcher.await.unwrap();
            w.settle().await;
        });
        w.assert_fetched_once();
    });
}

/// The same, with the fill sharing its work in units (peers): a unit that a reader's job
/// covers in part is left, not fetched over that job.
#[test]
fn model_a_reader_and_the_shared_fill_on_one_unit() {
    check(|| {
        let w = world_with(false, true);
        block_on(async {
            let r = w.reader(BlockRange::new(2, 3));
            let fill = w.fill();
            let b = r
                .await
                .unwrap()
                .expect("no fault: the reader gets its bytes");
            w.expect_bytes(BlockRange::new(2, 3), &b);
            fill.await.unwrap();
            w.settle().await;
        });
        w.assert_fetched_once();
    });
}

/// Piece digests of the image in pieces of 4 blocks, as a verified copy gives them.
fn digests(data: &[u8]) -> Arc<PieceDigests> {
    use sha2::Digest;
    let piece = 4 * BS;
    let mut wire = piece.to_le_bytes().to_vec();
    wire.extend_from_slice(&(data.len() as u64).to_le_bytes());
    for p in data.chunks(piece as usize) {
        wire.extend_from_slice(&sha2::Sha256::digest(p));
    }
    Arc::new(PieceDigests::from_bytes(&wire, data.len() as u64).expect("digests"))
}

/// Piece digests arriving while a job planned without them is in flight: a job planned
/// after them (whole pieces) is not laid over that one; it waits for it to end. (Whole
/// pieces fetch their present blocks again, by design: no served-once check here.)
/// No reader here starts a job on a piece boundary before the digests: `stream_job` checks
/// such a job as whole pieces once the digests are in, and its trailing partial piece
/// fails as corrupt (the source is blamed, the job retried); that is `stream_job`'s to fix.
#[test]
fn model_digests_arriving_mid_flight_lay_no_job_over_another() {
    check(|| {
        let w = world(false);
        block_on(async {
            let early = w.reader(BlockRange::new(2, 3));
            let set = {
                let (f, d) = (w.fetcher.clone(), digests(&w.want));
                spawn(async move {
                    arrive_late().await;
                    f.set_pieces(d);
                })
            };
            let late = w.reader(BlockRange::new(1, 2));
            let watcher = {
                let f = w.fetcher.clone();
                spawn(async move {
                    for _ in 0..8 {
                        assert_disjoint(f.jobs());
                        yield_now().await;
                    }
                })
            };
            for (r, blocks) in [
                (early, BlockRange::new(2, 3)),
                (late, BlockRange::new(1, 2)),
            ] {
                let b = r
                    .await
                    .unwrap()
                    .expect("no fault: the reader gets its bytes");
                w.expect_bytes(blocks, &b);
            }
            set.await.unwrap();
            watcher.await.unwrap();
            w.settle().await;
        });
    });
}

/// A failure (the image fails: `halt`) racing a read: the reader gets its bytes or the
/// failure, whether the source answers or hangs; never waits for ever.
#[test]
fn model_a_failure_racing_a_read_answers_the_reader() {
    for stall in [false, true] {
        check(move || {
            let w = world(stall);
            block_on(async {
                let fill = w.fill();
                let r = w.reader(BlockRange::new(2, 4));
                let halt = {
                    let f = w.fetcher.clone();
                    spawn(async move {
                        arrive_late().await;
                        f.halt(halt_error())
                    })
                };
                match r.await.unwrap() {
                    Ok(b) => {
                        assert!(!stall, "a hung source served nothing");
                        w.expect_bytes(BlockRange::new(2, 4), &b);
                    }
                    Err(e) => assert!(matches!(e, Error::Checksum { .. }), "{e}"),
                }
                halt.await.unwrap();
                fill.await.unwrap();
                if !stall {
                    w.settle().await;
                }
            });
        });
    }
}

/// Delete racing a read (the node cancels the image's work, then removes its files):
/// the reader gets the right bytes or an error, never other bytes or zeros.
#[test]
fn model_delete_racing_a_read_gives_bytes_or_an_error() {
    check(|| {
        let w = world(false);
        block_on(async {
            let fill = w.fill();
            let r = w.reader(BlockRange::new(2, 4));
            let delete = {
                let (cancel, files) = (w.cancel.clone(), w.fetcher.files().clone());
                spawn(async move {
                    arrive_late().await;
                    cancel.cancel();
                    files.remove().expect("files removed");
                })
            };
            match r.await.unwrap() {
                Ok(b) => w.expect_bytes(BlockRange::new(2, 4), &b),
                Err(e) => assert!(matches!(e, Error::ShuttingDown), "{e}"),
            }
            delete.await.unwrap();
            fill.await.unwrap();
            w.settle().await;
        });
    });
}

/// A job whose task is dropped (a runtime shutting down, an aborted task) wakes every
/// waiter, whether it found the job before or after the end: the table and `JobGuard`
/// alone, as `run_job` holds them.
#[test]
fn model_a_dropped_job_wakes_every_waiter() {
    check(|| {
        let table = Arc::new(JobTable::default());
        let ended = Arc::new(tokio::sync::Notify::new());
        let job = table.lock().claim(BlockRange::new(0, 4), Priority::Reader);
        // Made at the claim and moved into the task, as `plan` does for `run_job`.
        let guard = JobGuard::new(&table, job, &ended, Path::new("/m"));
        let task = spawn(async move {
            let _guard = guard;
            futures::future::pending::<()>().await; // a source that never answers
        });
        let waiters: Vec<_> = (1..=2u64)
            .map(|upto| {
                let table = table.clone();
                spawn(async move {
                    // As a reader plans: the covering job, under the lock, then its progress.
                    let job = table.lock().covering(0);
                    // `ensure` waits on its jobs one after another: a job may end before
                    // its waiter subscribes.
                    yield_now().await;
                    match job {
                        Some(job) => {
                            let mut rx = job.progress.subscribe();
                            Some(Job::wait_arrived(&mut rx, upto, None).await.map(|_| ()))
                        }
                        None => None, // the job had ended: a reader re-plans
                    }
                })
            })
            .collect();
        block_on(async move {
            yield_now().await;
            task.abort();
            for w in waiters {
                if let Some(r) = w.await.unwrap() {
                    let e = r.expect_err("the job ended without landing");
                    assert!(e.to_string().contains("ended unexpectedly"), "{e}");
                }
            }
            assert!(table.lock().jobs().is_empty(), "the job left the table");
        });
    });
}

/// The durability rule under any interleaving of landings and flushes: a bit reaches the
/// bitmap file only after its block's data was synced; and a flush that starts after a
/// landing returned makes that landing's bits durable.
#[test]
fn model_a_bit_is_persisted_only_after_its_data() {
    check(|| {
        let w = world(false);
        let map = w.fetcher.map().clone();
        let files = w.fetcher.files().clone();
        block_on(async {
            let fill = w.fill();
            let r = w.reader(BlockRange::new(5, 7));
            let flusher = {
                let (map, files) = (map.clone(), files.clone());
                spawn(async move {
                    // As the node's flush loop, many times over the landings.
                    for _ in 0..24 {
                        files.flush(&map).expect("flush");
                        yield_now().await;
                    }
                })
            };
            fill.await.unwrap();
            r.await.unwrap().expect("bytes");
            w.settle().await;
            flusher.await.unwrap();
            files.flush(&map).expect("flush");
        });
        let journal = files.journal.lock().unwrap().clone();
        let mut written = vec![false; BLOCKS as usize];
        let mut durable = vec![false; BLOCKS as usize];
        let mut persisted = vec![false; BLOCKS as usize];
        for e in &journal {
            match e {
                DiskEvent::DataWritten { offset, len } => {
                    for b in offset / BS..(offset + len).div_ceil(BS) {
                        written[b as usize] = true;
                    }
                }
                DiskEvent::DataSynced => durable = written.clone(),
                DiskEvent::BitsWritten { from_word, bits } => {
                    // Bits from word `from_word` on (an empty write when no word was dirty).
                    for (i, byte) in bits.iter().enumerate() {
                        for bit in 0..8 {
                            let b = from_word * 64 + i * 8 + bit;
                            if byte & (1 << bit) == 0 {
                                continue;
                            }
                            assert!(
                                durable[b],
                                "block {b}'s bit was written before its data was synced: {journal:?}"
                            );
                            persisted[b] = true;
                        }
                    }
                }
            }
        }
        let present: Vec<bool> = (0..BLOCKS).map(|b| map.is_set(b)).collect();
        assert_eq!(
            persisted, present,
            "the last flush, after every landing, persisted every present bit"
        );
    });
}
