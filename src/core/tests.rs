//! Core tests without a mount or a network, after mountpoint-s3's prefetcher tests: a
//! node on a temp directory, images over in-memory sources with injected faults, a
//! reference model (the source's bytes) that every returned byte and every persisted
//! bit is checked against, crash-and-reopen cycles, and tokio's paused clock for the
//! retry and timeout paths. They run as a normal user in seconds (`cargo test --lib`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;

use super::error::{Error, SourceError};
use super::fetch::FetchConfig;
use super::image::{Image, ImageConfig};
use super::mem_source::{MemFault, MemSource};
use super::node::{CreateOptions, Node, SourceFactory};
use super::range::ByteRange;
use super::readahead::ReadState;
use super::source::Source;
use super::source::Sources;
use super::spec::ImageSpec;
use super::store::{ImageFiles, State};

const BS: u64 = 4096;

fn cfg() -> ImageConfig {
    ImageConfig {
        block_size: BS,
        fill_parallel: 2,
        require_verified: false,
        fetch: FetchConfig {
            max_request: 16 * BS,
            readahead_max: 64 * BS,
            read_timeout: Some(Duration::from_secs(5)),
            fill_runtime: None,
            ..FetchConfig::default()
        },
    }
}

fn data(len: usize, seed: u64) -> bytes::Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn sha512(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha512::digest(b))
}

/// The in-memory source of each image, by name.
type Registry = Arc<Mutex<Vec<(String, Arc<MemSource>)>>>;

/// Every image gets the source registered under its name (missing: none, with a reason).
fn factory(sources: Registry) -> SourceFactory {
    Arc::new(move |spec: &ImageSpec, _id: &super::source::Identity| {
        let found = sources
            .lock()
            .unwrap()
            .iter()
            .find(|(n, _)| *n == spec.name)
            .map(|(_, s)| s.clone());
        match found {
            Some(s) => Sources::one(s),
            None => Sources::none("the test gave it no source"),
        }
    })
}

async fn start(dir: &Path, reg: &Registry) -> Arc<Node> {
    start_cfg(dir, reg, cfg()).await
}

async fn start_cfg(dir: &Path, reg: &Registry, cfg: ImageConfig) -> Arc<Node> {
    Node::start_with(&[dir.to_path_buf()], cfg, "/t".into(), factory(reg.clone()))
        .await
        .expect("node starts")
}

async fn create(node: &Arc<Node>, name: &str, src: Arc<MemSource>, fill: bool) -> Arc<Image> {
    create_sum(node, name, src, fill, "").await
}

/// As `create`, with the spec's checksum.
async fn create_sum(
    node: &Arc<Node>,
    name: &str,
    src: Arc<MemSource>,
    fill: bool,
    checksum: &str,
) -> Arc<Image> {
    node.create_with_source(
        ImageSpec::download(name, "http://127.0.0.1:1/x", checksum),
        CreateOptions {
            disk: None,
            no_fill: !fill,
        },
        src,
    )
    .await
    .expect("create")
}

/// A node whose image `name` (256 blocks of seeded data, also returned) comes from one
/// memory source, and whose fill asks for the whole image in one request: the tests of
/// readers against a slow fill stream.
async fn one_stream_node(
    name: &str,
    seed: u64,
    tweak: impl FnOnce(&mut ImageConfig),
) -> (tempfile::TempDir, bytes::Bytes, Arc<MemSource>, Arc<Node>) {
    let dir = tempfile::tempdir().unwrap();
    let want = data(256 * BS as usize, seed);
    let src = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![(name.to_string(), src.clone())]));
    let mut c = cfg();
    c.fetch.max_request = 256 * BS;
    c.fill_parallel = 1;
    tweak(&mut c);
    let node = start_cfg(dir.path(), &reg, c).await;
    (dir, want, src, node)
}

/// Injected panics are expected here: keep their messages out of the test output.
fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<&str>().copied().unwrap_or("");
            if !msg.contains("injected panic") {
                default(info);
            }
        }));
    });
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The durability rule: every bit in the bitmap file names a block whose bytes in the
/// data file are the source's.
fn check_persisted(dir: &Path, name: &str, want: &[u8]) -> Result<u64, TestCaseError> {
    let (files, _, _, map) = ImageFiles::open(dir.join("images").join(name)).expect("reopen");
    let mut buf = vec![0u8; BS as usize];
    for b in 0..map.blocks() {
        if map.is_set(b) {
            let start = (b * BS) as usize;
            let end = (start + BS as usize).min(want.len());
            files
                .read_data(start as u64, &mut buf[..end - start])
                .unwrap();
            prop_assert_eq!(
                &buf[..end - start],
                &want[start..end],
                "block {} persisted wrong",
                b
            );
        }
    }
    Ok(map.present_count())
}

#[derive(Debug, Clone)]
enum Op {
    Read { offset: u64, len: u32 },
    Sequential { from: u64, reads: u8 },
    Fill,
    Fault(u8),
    Crash,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..size, 1..40_000u32).prop_map(|(offset, len)| Op::Read { offset, len }),
        2 => (0..size, 1..12u8).prop_map(|(from, reads)| Op::Sequential { from, reads }),
        1 => Just(Op::Fill),
        2 => (0..3u8).prop_map(Op::Fault),
        1 => Just(Op::Crash),
    ]
}

/// One life of the daemon: a runtime and a node, ended by a crash (no final flush).
struct Life {
    rt: tokio::runtime::Runtime,
    node: Arc<Node>,
}

fn live(dir: &Path, reg: &Registry) -> Life {
    let rt = rt();
    let node = rt.block_on(start(dir, reg));
    Life { rt, node }
}

fn crash(life: Life) {
    // Tasks stop at their next await, as if the process died there; nothing flushes.
    life.node.cancel.cancel();
    drop(life.node);
    life.rt.shutdown_timeout(Duration::from_millis(200));
}

fn run_model(size: usize, seed: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    quiet_injected_panics();
    let dir = tempfile::tempdir().unwrap();
    let want = data(size, seed);
    let src = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![("img".to_string(), src.clone())]));
    let mut life = live(dir.path(), &reg);
    life.rt
        .block_on(create(&life.node, "img", src.clone(), false));
    let mut faults_injected = false;
    let mut fill_on = false;
    let read = |life: &Life, offset: u64, len: u32, ra: Option<&Mutex<ReadState>>| {
        let image = life.node.get("img").unwrap();
        life.rt
            .block_on(async { image.read(offset, len, ra).await })
    };
    for op in ops {
        match op {
            Op::Read { offset, len } => match read(&life, offset, len, None) {
                Ok(b) => {
                    let start = (offset as usize).min(size);
                    let end = (offset as usize + len as usize).min(size);
                    prop_assert_eq!(&b[..], &want[start..end]);
                }
                Err(e) => prop_assert!(faults_injected, "read failed without a fault: {e}"),
            },
            Op::Sequential { from, reads } => {
                let ra = Mutex::new(ReadState::default());
                let mut at = from;
                for _ in 0..reads {
                    match read(&life, at, 8192, Some(&ra)) {
                        Ok(b) => {
                            let start = (at as usize).min(size);
                            let end = (at as usize + 8192).min(size);
                            prop_assert_eq!(&b[..], &want[start..end]);
                            at += b.len() as u64;
                        }
                        Err(e) => prop_assert!(faults_injected, "read failed without a fault: {e}"),
                    }
                }
            }
            Op::Fill => {
                fill_on = true;
                let _rt = life.rt.enter();
                let _ = life.node.fill("img");
            }
            Op::Fault(k) => {
                faults_injected = true;
                src.fault_next(match k {
                    0 => MemFault::Error(SourceError::Status {
                        url: "memory".into(),
                        status: 503,
                        hint: "",
                    }),
                    1 => MemFault::Truncate(5000),
                    _ => MemFault::Panic,
                });
            }
            Op::Crash => {
                crash(life);
                check_persisted(dir.path(), "img", &want)?;
                life = live(dir.path(), &reg);
            }
        }
    }
    // Without faults left, everything must end ready with the right digest.
    src.clear_faults();
    let image = life.node.get("img").unwrap();
    if image.is_failed() {
        // A fill's retries can run out against injected faults: that failure must be
        // one a retry clears, and the retry must work.
        prop_assert!(faults_injected);
        prop_assert_eq!(image.status("/t").state, State::Failed);
    }
    {
        let _rt = life.rt.enter();
        life.node.fill("img").expect("fill restarts");
    }
    let image = life.node.get("img").unwrap();
    let r = life.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), image.wait_ready()).await
    });
    prop_assert!(
        matches!(r, Ok(Ok(()))),
        "not ready: {:?} (fill was {fill_on})",
        r
    );
    prop_assert_eq!(image.status("/t").computed_checksum, sha512(&want));
    let all = read(&life, 0, size as u32, None).expect("whole read");
    prop_assert_eq!(&all[..], &want[..]);
    life.rt.block_on(life.node.shutdown());
    drop(life);
    prop_assert_eq!(
        check_persisted(dir.path(), "img", &want)?,
        size.div_ceil(BS as usize) as u64
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("BIFS_MODEL_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24), .. ProptestConfig::default() })]

    /// Random and sequential reads, fills, source faults (errors, short bodies, panics)
    /// and crash-reopen cycles against the model: every byte returned is the source's,
    /// every persisted bit names durable source bytes, and the image ends ready.
    #[test]
    fn reads_fills_faults_and_crashes_match_the_model(
        tail in 0u64..BS,
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(40 * BS), 1..14),
    ) {
        run_model((39 * BS + tail) as usize, seed, ops)?;
    }
}

#[test]
fn an_absent_block_is_fetched_once_for_many_readers() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let want = data(256 * BS as usize, 1);
    let src = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![("one".to_string(), src.clone())]));
    rt.block_on(async {
        let node = start(dir.path(), &reg).await;
        let image = create(&node, "one", src.clone(), false).await;
        let before = src.requests.load(Ordering::Relaxed);
        let reads = (0..16).map(|_| {
            let image = image.clone();
            tokio::spawn(async move { image.read(100 * BS, 4096, None).await })
        });
        for r in futures::future::join_all(reads).await {
            assert_eq!(
                &r.unwrap().unwrap()[..],
                &want[(100 * BS) as usize..(101 * BS) as usize]
            );
        }
        assert_eq!(
            src.requests.load(Ordering::Relaxed) - before,
            1,
            "one request for 16 readers"
        );
        node.shutdown().await;
    });
}

#[test]
fn a_panicking_source_strands_no_reader() {
    quiet_injected_panics();
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let want = data(64 * BS as usize, 2);
    let src = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![("p".to_string(), src.clone())]));
    rt.block_on(async {
        let node = start(dir.path(), &reg).await;
        let image = create(&node, "p", src.clone(), false).await;
        src.fault_next(MemFault::Panic);
        let r = tokio::time::timeout(Duration::from_secs(10), image.read(30 * BS, 4096, None))
            .await
            .expect("the reader is woken, not stranded");
        let e = r.unwrap_err();
        assert!(e.to_string().contains("ended unexpectedly"), "{e}");
        assert!(
            !image.is_failed(),
            "a reader's failed job does not fail the image"
        );
        // The job left the table: the next read fetches afresh.
        let b = image.read(30 * BS, 4096, None).await.unwrap();
        assert_eq!(&b[..], &want[(30 * BS) as usize..(31 * BS) as usize]);
        node.shutdown().await;
    });
}

/// An image that fails while a reader waits on a stalled source answers that reader with
/// the failure at once, not when its read times out (never, with `--read-timeout 0`).
/// Found by the model (`model_a_failure_racing_a_read_answers_the_reader`).
#[test]
fn a_failure_answers_a_reader_waiting_on_a_stalled_source() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let src = Arc::new(MemSource::new(data(16 * BS as usize, 9)));
    let reg = Arc::new(Mutex::new(vec![("s".to_string(), src.clone())]));
    rt.block_on(async {
        let node = start(dir.path(), &reg).await;
        let image = create(&node, "s", src.clone(), false).await;
        let before = src.requests.load(Ordering::Relaxed);
        src.fault_next(MemFault::Stall);
        let reader = {
            let image = image.clone();
            tokio::spawn(async move { image.read(4 * BS, 4096, None).await })
        };
        // Once the reader's request is out (and stalls), the image fails.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while src.requests.load(Ordering::Relaxed) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "the read asked nothing"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        image.fail(&Error::Checksum {
            want: "0".repeat(128),
            got: "1".repeat(128),
        });
        let e = reader.await.unwrap().unwrap_err();
        assert!(
            !matches!(e, Error::ReadTimeout { .. }),
            "the reader waited for its timeout: {e}"
        );
        assert!(e.to_string().contains("checksum"), "{e}");
        node.shutdown().await;
    });
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_and_a_stalled_source_times_the_reader_out() {
    let dir = tempfile::tempdir().unwrap();
    let want = data(64 * BS as usize, 3);
    let src = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![("r".to_string(), src.clone())]));
    let node = start(dir.path(), &reg).await;
    let image = create(&node, "r", src.clone(), false).await;
    // Three 503s: retried after 200, 400 and 800 ms of (paused) time, then served.
    for _ in 0..3 {
        src.fail_next(SourceError::Status {
            url: "memory".into(),
            status: 503,
            hint: "",
        });
    }
    let t0 = tokio::time::Instant::now();
    let b = image.read(10 * BS, 4096, None).await.unwrap();
    assert_eq!(&b[..], &want[(10 * BS) as usize..(11 * BS) as usize]);
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t0.elapsed()
    );
    // A source that never answers: the reader gets EIO after --read-timeout (5 s here).
    src.fault_next(MemFault::Stall);
    let t0 = tokio::time::Instant::now();
    let e = image.read(40 * BS, 4096, None).await.unwrap_err();
    assert!(matches!(e, Error::ReadTimeout { secs: 5, .. }), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    assert!(t0.elapsed() >= Duration::from_secs(5));
    assert!(!image.is_failed());
    node.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn the_fill_yields_to_a_waiting_reader_and_goes_on_when_it_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let want = data(512 * BS as usize, 11);
    let src = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![("y".to_string(), src.clone())]));
    let node = start(dir.path(), &reg).await;
    let image = create(&node, "y", src.clone(), false).await;
    // A reader waits on a stalled request (until --read-timeout, 5 s here)...
    src.fault_next(MemFault::Stall);
    let reader = {
        let image = image.clone();
        tokio::spawn(async move { image.read(500 * BS, 4096, None).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    // ... while the fill starts. In paused time an unhindered fill of 32 jobs of 16
    // blocks lands at once; yielding, it starts one job per pause of up to 20 ms.
    node.fill("y").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = image.fetcher().map().present_count();
    assert!(
        during <= 128,
        "the fill held back while a reader waited: {during} of 512 blocks after 100 ms"
    );
    assert!(!reader.is_finished());
    let e = reader.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::ReadTimeout { .. }), "{e}");
    // The reader gone, the fill goes on at full speed: within 100 ms of paused time it
    // has every block but those of the stalled request (which never ends here).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = image.fetcher().map().present_count();
    assert!(
        after >= 512 - 16,
        "{after} of 512 blocks once the reader was gone"
    );
    let b = image.read(200 * BS, 4096, None).await.unwrap();
    assert_eq!(&b[..], &want[(200 * BS) as usize..(201 * BS) as usize]);
    node.cancel.cancel();
}

/// A reader far ahead of a slow fill stream does not wait for the stream to get there:
/// it cuts the fill job short and fetches its blocks itself (`Claims::cut`). The image
/// still verifies with the right bytes (that no block lands twice, the model checks).
#[tokio::test(start_paused = true)]
async fn a_reader_far_ahead_of_a_slow_fill_stream_fetches_its_blocks_itself() {
    let (_dir, want, src, node) = one_stream_node("c", 12, |_| {}).await;
    let image = create(&node, "c", src.clone(), false).await;
    // The fill's request streams 64 KiB (16 blocks) every 50 ms: it would reach block
    // 200 after about 600 ms.
    src.fault_next(MemFault::Slow(Duration::from_millis(50)));
    node.fill("c").unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let t0 = tokio::time::Instant::now();
    let b = image.read(200 * BS, 4096, None).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(&b[..], &want[(200 * BS) as usize..(201 * BS) as usize]);
    assert!(
        took < Duration::from_millis(100),
        "the reader waited {took:?} for the fill stream"
    );
    image.wait_ready().await.unwrap();
    let all = image.read(0, 256 * BS as u32, None).await.unwrap();
    assert!(all[..] == want[..], "the image's bytes");
    node.cancel.cancel();
}

/// While a reader far ahead of the fill has lately waited on a fetch, fill requests are
/// short (an origin answers the reader's next request after what it is sending the fill);
/// without such readers (none, one quiet a while, one near where the fill is) they are
/// `max_request`. The bytes are the image's either way. Each case on a node of its own:
/// far readers hold every fill on their node.
#[tokio::test(start_paused = true)]
async fn the_fill_asks_for_less_at_a_time_while_readers_are_about() {
    let want = data(1024 * BS as usize, 14);
    let names = ["far", "alone", "after", "near"];
    let mut largest = Vec::new();
    for name in names {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        c.fetch.max_request = 256 * BS; // 1 MiB
        c.fetch.far_from_fill = 512 * BS;
        let src = Arc::new(MemSource::new(want.clone()));
        let reg = Arc::new(Mutex::new(
            [(name.to_string(), src.clone())].into_iter().collect(),
        ));
        let node = start_cfg(dir.path(), &reg, c).await;
        let image = create(&node, name, src.clone(), false).await;
        match name {
            "alone" => drop(node.fill(name).unwrap()),
            "near" => {
                // Near where the fill is, once it runs (a read before any fill runs is
                // far: no fill would bring its blocks).
                src.fault_next(MemFault::Slow(Duration::from_millis(1)));
                node.fill(name).unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(image.read(100 * BS, 4096, None).await.unwrap());
            }
            _ => {
                drop(image.read(1000 * BS, 4096, None).await.unwrap());
                if name == "after" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                node.fill(name).unwrap();
            }
        }
        image.wait_ready().await.unwrap();
        let all = image.read(0, 1024 * BS as u32, None).await.unwrap();
        assert!(all[..] == want[..], "the bytes of {name}");
        largest.push(fill_requests(&src).into_iter().max());
        node.cancel.cancel();
    }
    assert_eq!(
        largest,
        vec![
            Some(32 * BS),
            Some(256 * BS),
            Some(256 * BS),
            Some(256 * BS)
        ],
        "the largest fill request: a reader far ahead of the fill about, none, one quiet \
         for 300 ms, one near the fill"
    );
}

/// The sizes of the fill's requests to `src`, in order.
fn fill_requests(src: &MemSource) -> Vec<u64> {
    src.asked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| *p == super::source::Priority::Fill)
        .map(|(r, _)| r.len())
        .collect()
}

/// While a reader far ahead of the fill reads, the fill asks the source for nothing (it
/// gives way, `GiveWay`, and no hold lasts the longest hold here), and its status counts
/// the pause; once the reader pauses the fill runs and the image gets ready with its bytes.
#[tokio::test(start_paused = true)]
async fn the_fill_waits_while_a_far_reader_reads_and_runs_once_it_pauses() {
    far_reads_hold_a_fill(false).await;
}

/// The same when the reader reads another image (with no fill of its own): it holds the
/// fill of every image on the node (on two cores another image's fill takes the CPU the
/// reader needs).
#[tokio::test(start_paused = true)]
async fn a_far_reader_of_one_image_holds_the_fill_of_another() {
    far_reads_hold_a_fill(true).await;
}

/// Far reads of image "r" (1024 blocks, no fill started) one each 2 ms for 200 ms while the
/// fill of image "f" runs: "f" itself, or with `other`, a second image of 256 blocks.
async fn far_reads_hold_a_fill(other: bool) {
    let dir = tempfile::tempdir().unwrap();
    let r_bytes = data(1024 * BS as usize, 15);
    let mut c = cfg();
    c.fetch.far_from_fill = 512 * BS;
    let r_src = Arc::new(MemSource::new(r_bytes.clone()));
    let mut sources = vec![("r".to_string(), r_src.clone())];
    let f_bytes = if other {
        let b = data(256 * BS as usize, 17);
        sources.push(("f".to_string(), Arc::new(MemSource::new(b.clone()))));
        b
    } else {
        r_bytes.clone()
    };
    let f_src = sources.last().unwrap().1.clone();
    let reg = Arc::new(Mutex::new(sources.into_iter().collect()));
    let node = start_cfg(dir.path(), &reg, c).await;
    let r = create(&node, "r", r_src.clone(), false).await;
    let f = if other {
        create(&node, "f", f_src.clone(), false).await
    } else {
        r.clone()
    };
    // Far blocks in an order no readahead follows: each waits on a fetch of its own.
    let far = |i: u64| (600 + i * 37 % 400) * BS;
    r.read(far(0), 4096, None).await.unwrap();
    node.fill(&f.name).unwrap();
    for i in 1..100 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let got = r.read(far(i), 4096, None).await.unwrap();
        assert!(got[..] == r_bytes[far(i) as usize..][..4096], "read {i}");
    }
    assert!(
        fill_requests(&f_src).is_empty(),
        "fill requests while a far reader read"
    );
    // The status says so: the reads above took 200 ms.
    let held = f.status("/m").fill_held_ms;
    assert!((100..=400).contains(&held), "fill held {held} ms");
    if other {
        assert_eq!(r.status("/m").fill_held_ms, 0, "r has no fill running");
    }
    f.wait_ready().await.unwrap();
    assert!(
        !fill_requests(&f_src).is_empty(),
        "the fill ran once the reader paused"
    );
    let all = f.read(0, f_bytes.len() as u32, None).await.unwrap();
    assert!(all[..] == f_bytes[..], "the filled image's bytes");
    node.cancel.cancel();
}

/// The node's one hashing thread waits while readers read images still arriving, and
/// each image's status counts the waits before its own chunks: an image hashed while
/// another is read without pause shows them (`hashHeldMs`), the image read shows none.
/// Real time: the hashing thread runs on std's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_images_status_counts_its_hashings_waits_for_readers() {
    let dir = tempfile::tempdir().unwrap();
    let r_bytes = data(4096 * BS as usize, 21);
    let f_bytes = data(16 * BS as usize, 22);
    let r_src = Arc::new(MemSource::new(r_bytes.clone()));
    let f_src = Arc::new(MemSource::new(f_bytes.clone()));
    let reg = Arc::new(Mutex::new(
        [
            ("r".to_string(), r_src.clone()),
            ("f".to_string(), f_src.clone()),
        ]
        .into_iter()
        .collect(),
    ));
    let node = start(dir.path(), &reg).await;
    let r = create(&node, "r", r_src, false).await;
    let f = create_sum(&node, "f", f_src, false, &sha512(&f_bytes)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = tokio::spawn({
        let (r, stop, want) = (r.clone(), stop.clone(), r_bytes.clone());
        async move {
            // Blocks 64.. in an order no readahead follows, each waited on while new;
            // none near the start, so r's hashed prefix stays empty.
            for i in 0u64.. {
                if stop.load(Ordering::SeqCst) {
                    return i;
                }
                let at = (64 + i * 997 % 4000) * BS;
                let got = r.read(at, 4096, None).await.unwrap();
                assert!(got[..] == want[at as usize..][..4096], "read {i}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            unreachable!()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = std::time::Instant::now();
    node.fill("f").unwrap();
    tokio::time::timeout(Duration::from_secs(30), f.wait_ready())
        .await
        .expect("f gets ready while r is read (the longest hold is 1 s)")
        .unwrap();
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    assert!(reader.await.unwrap() > 10, "r was read throughout");
    let held = Duration::from_millis(f.status("/m").hash_held_ms);
    assert!(
        held > Duration::ZERO && held <= took,
        "f's hashing waited {held:?} of the {took:?} to ready"
    );
    assert!(node.hash_held() >= held, "the thread counts f's waits too");
    assert_eq!(r.status("/m").hash_held_ms, 0, "r has nothing to hash");
    let all = f.read(0, f_bytes.len() as u32, None).await.unwrap();
    assert!(all[..] == f_bytes[..], "f's bytes");
    node.cancel.cancel();
}

/// Counts readers waiting on fill jobs, as the daemon's `FillThreads` is told.
#[derive(Debug, Default)]
struct OnFillCount {
    now: std::sync::atomic::AtomicUsize,
    ever: std::sync::atomic::AtomicUsize,
}

impl super::fetch::ReadersOnFill for OnFillCount {
    fn enter(&self) {
        self.now.fetch_add(1, Ordering::SeqCst);
        self.ever.fetch_add(1, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A reader waiting on a fill job says so while it waits (the daemon raises the fill's
/// threads then, so the reader does not wait behind their low priority), and no longer
/// once it is served; a reader on a job of its own does not.
#[tokio::test(start_paused = true)]
async fn a_reader_waiting_on_a_fill_job_raises_the_fill_while_it_waits() {
    let count = Arc::new(OnFillCount::default());
    let counted = count.clone();
    let (_dir, want, src, node) =
        one_stream_node("r", 15, |c| c.fetch.fill_priority = Some(counted)).await;
    let image = create(&node, "r", src.clone(), false).await;
    // A reader's own job first: nothing raised.
    image.read(250 * BS, 4096, None).await.unwrap();
    assert_eq!(count.ever.load(Ordering::SeqCst), 0, "a reader's own job");
    // The fill's one request streams 64 KiB every 50 ms; block 20 is 5 chunks in, too
    // near its landings for the reader to cut it: the reader waits on the fill job.
    src.fault_next(MemFault::Slow(Duration::from_millis(50)));
    node.fill("r").unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let reading = tokio::spawn({
        let image = image.clone();
        async move { image.read(20 * BS, 4096, None).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count.now.load(Ordering::SeqCst), 1, "raised while it waits");
    let b = reading.await.unwrap().unwrap();
    assert_eq!(&b[..], &want[(20 * BS) as usize..(21 * BS) as usize]);
    assert_eq!(count.now.load(Ordering::SeqCst), 0, "lowered once served");
    image.wait_ready().await.unwrap();
    node.cancel.cancel();
}

/// Verification hashes bytes as they arrive, from the fetch's buffers, when the fill
/// is no faster than hashing: nothing is read back from the data file, and the image
/// still verifies against its checksum (so the bytes hashed were the image's, in order).
#[tokio::test(start_paused = true)]
async fn verification_hashes_a_slow_fill_from_the_received_buffers() {
    let (_dir, want, src, node) = one_stream_node("h", 13, |_| {}).await;
    let image = create_sum(&node, "h", src.clone(), false, &sha512(&want)).await;
    src.fault_next(MemFault::Slow(Duration::from_millis(20)));
    node.fill("h").unwrap();
    image.wait_ready().await.unwrap();
    let m = node.metrics();
    assert_eq!(
        (
            m.hashed_received.load(Ordering::Relaxed),
            m.hashed_read_back.load(Ordering::Relaxed)
        ),
        (want.len() as u64, 0),
        "bytes hashed from the received buffers, and read back"
    );
    node.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_source_is_ridden_out_and_the_fill_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let want = data(16 * BS as usize, 4);
    let src = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![("f".to_string(), src.clone())]));
    let node = start(dir.path(), &reg).await;
    let image = create(&node, "f", src.clone(), false).await;
    image.read(0, 4096, None).await.unwrap();
    for _ in 0..40 {
        src.fail_next(SourceError::Unreachable {
            url: "memory".into(),
            reason: "connection refused".into(),
        });
    }
    node.fill("f").unwrap();
    // The fill runs out of attempts: the image stays in progress and says why...
    let st = loop {
        let st = image.status("/t");
        if st.error.contains("source unavailable since") {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st.state, State::InProgress, "{st:?}");
    assert!(st.error.contains("connection refused"), "{}", st.error);
    // ...present blocks keep serving...
    let b = image.read(0, 4096, None).await.unwrap();
    assert_eq!(&b[..], &want[..4096]);
    // ...and once the source is back the fill resumes by itself: no `bifs fill`.
    src.clear_faults();
    image.wait_ready().await.unwrap();
    assert_eq!(image.status("/t").error, "", "the condition is cleared");
    node.cancel.cancel();
}

#[test]
fn a_checksum_failure_is_persisted_as_a_kind_that_cannot_be_retried() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let want = data(8 * BS as usize, 5);
    let src = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![("c".to_string(), src.clone())]));
    rt.block_on(async {
        let node = start(dir.path(), &reg).await;
        let image = node
            .create_with_source(
                ImageSpec::download("c", "http://127.0.0.1:1/x", &"0".repeat(128)),
                CreateOptions::default(),
                src.clone(),
            )
            .await
            .unwrap();
        assert!(image.wait_ready().await.is_err());
        let st = image.status("/t");
        assert_eq!(st.state, State::Failed);
        assert_eq!(
            st.checksum,
            "0".repeat(128),
            "checksum shows what was asked"
        );
        assert_eq!(st.computed_checksum, sha512(&want), "and what was computed");
        assert_eq!(st.progress, 100, "every byte is cached");
        let e = node.fill("c").err().expect("refused").to_string();
        assert!(e.contains("cannot be retried"), "{e}");
        node.shutdown().await;
    });
}

#[test]
fn a_source_without_the_bytes_passes_the_request_to_the_next() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let want = data(32 * BS as usize, 6);
    let peer = Arc::new(MemSource::new(want.clone()));
    peer.lack(ByteRange::new(8 * BS, 16 * BS));
    let origin = Arc::new(MemSource::new(want.clone()));
    let reg = Arc::new(Mutex::new(vec![]));
    rt.block_on(async {
        let node = start(dir.path(), &reg).await;
        let sources = Sources {
            list: vec![peer.clone() as Arc<dyn Source>, origin.clone()],
            unavailable: None,
            fill_policy: None,
            when_absent: None,
        };
        let image = node
            .create_with_sources(
                ImageSpec::download("two", "http://127.0.0.1:1/x", ""),
                CreateOptions {
                    disk: None,
                    no_fill: true,
                },
                sources,
            )
            .await
            .unwrap();
        let served = origin.served.load(Ordering::Relaxed);
        let b = image.read(2 * BS, 4096, None).await.unwrap();
        assert_eq!(&b[..], &want[(2 * BS) as usize..(3 * BS) as usize]);
        assert_eq!(
            origin.served.load(Ordering::Relaxed),
            served,
            "the first source served it"
        );
        let b = image.read(10 * BS, 4096, None).await.unwrap();
        assert_eq!(&b[..], &want[(10 * BS) as usize..(11 * BS) as usize]);
        assert_eq!(
            origin.served.load(Ordering::Relaxed) - served,
            BS,
            "the next source served the absent block"
        );
        assert!(!image.is_failed());
        node.shutdown().await;
    });
}

#[test]
fn an_image_whose_source_this_build_cannot_use_serves_what_it_has_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let want = data(32 * BS as usize, 7);
    let other = data(8 * BS as usize, 8);
    let src = Arc::new(MemSource::new(want.clone()));
    let osrc = Arc::new(MemSource::new(other.clone()));
    let reg = Arc::new(Mutex::new(vec![
        ("lost".to_string(), src.clone()),
        ("fine".to_string(), osrc.clone()),
    ]));
    let rt1 = rt();
    rt1.block_on(async {
        let node = start(dir.path(), &reg).await;
        let image = create(&node, "lost", src.clone(), false).await;
        image.read(0, 4 * BS as u32, None).await.unwrap();
        create(&node, "fine", osrc.clone(), true)
            .await
            .wait_ready()
            .await
            .unwrap();
        node.shutdown().await;
    });
    drop(rt1);
    // After the restart the factory has no source for "lost".
    reg.lock().unwrap().retain(|(n, _)| n != "lost");
    rt().block_on(async {
        let node = start(dir.path(), &reg).await;
        let image = node.get("lost").unwrap();
        let b = image.read(BS, 2 * BS as u32, None).await.unwrap();
        assert_eq!(&b[..], &want[BS as usize..3 * BS as usize]);
        let e = tokio::time::timeout(Duration::from_secs(5), image.read(20 * BS, 4096, None))
            .await
            .expect("answers within seconds")
            .unwrap_err();
        assert!(matches!(e, Error::NoSource { .. }), "{e}");
        assert_eq!(e.errno(), libc::EIO);
        let st = image.status("/t");
        assert_ne!(st.state, State::Failed, "present blocks still serve");
        assert!(
            st.error.contains("the test gave it no source"),
            "{}",
            st.error
        );
        let fine = node.get("fine").unwrap();
        assert_eq!(fine.state(), State::Ready);
        assert_eq!(
            &fine.read(0, other.len() as u32, None).await.unwrap()[..],
            &other[..]
        );
        node.shutdown().await;
    });
}

/// The core's modules import each other in one direction only.
#[test]
fn core_imports_form_no_cycle() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut edges: Vec<(String, String)> = Vec::new();
    let mut modules = BTreeSet::new();
    // A module is a file, or a folder whose mod.rs names the core's modules `super::`
    // and whose other files name the core's modules `crate::core::` (their `super::` is
    // the folder's module itself).
    let mut sources: Vec<(String, String, bool)> = Vec::new(); // module, code, super is core
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_string_lossy().to_string();
        if module == "mod" || module == "tests" {
            continue;
        }
        if path.is_dir() {
            for f in std::fs::read_dir(&path).unwrap() {
                let f = f.unwrap().path();
                let is_mod = f.file_name().is_some_and(|n| n == "mod.rs");
                sources.push((module.clone(), std::fs::read_to_string(&f).unwrap(), is_mod));
            }
        } else {
            sources.push((module, std::fs::read_to_string(&path).unwrap(), true));
        }
    }
    for (module, text, super_is_core) in &sources {
        let module = module.clone();
        // Only the module's own code, not its unit tests.
        let code = text.split("#[cfg(test)]").next().unwrap();
        modules.insert(module.clone());
        let prefixes: &[&str] = if *super_is_core {
            &["super::", "crate::core::"]
        } else {
            &["crate::core::"]
        };
        for prefix in prefixes {
            for (i, _) in code.match_indices(prefix) {
                let rest = &code[i + prefix.len()..];
                let dep: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !dep.is_empty() && dep != module {
                    edges.push((module.clone(), dep));
                }
            }
        }
    }
    edges.sort();
    edges.dedup();
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        edges: &[(String, String)],
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_string());
        for (_, to) in edges.iter().filter(|(f, _)| f == m) {
            if let Some(c) = visit(to, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in &modules {
        if let Some(cycle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!("import cycle in src/core: {}", cycle.join(" -> "));
        }
    }
    assert!(
        edges.iter().any(|(f, t)| f == "image" && t == "fetch"),
        "the scan sees imports"
    );
}
