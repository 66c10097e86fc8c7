//! Load: 64 concurrent readers across 8 images, for a bounded time, while the images'
//! fills run against a slow origin. Every byte read is compared with the source, every
//! read must answer (a hang detector, not a timing claim), and the daemon must not grow:
//! its open file descriptors and resident memory are read from /proc before the load,
//! after the round served while the fills run, and at the end.
//!
//! Longer runs: `LOAD_SECS=300 cargo test --test load` (scripts/soak.sh).

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::origin::Origin;
use common::{sha512_hex, stamped_image, tail, Daemon};

const MIB: usize = 1 << 20;
const IMAGES: usize = 8;
const READERS: usize = 64;
/// No single read may take longer than this.
const READ_BOUND: Duration = Duration::from_secs(60);

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    bytes: AtomicU64,
    max_ms: AtomicU64,
}

/// Runs `READERS` readers for `secs` seconds; panics on a wrong byte, an error or a hang.
fn round(d: &Daemon, images: &Arc<Vec<(String, Bytes)>>, secs: u64, seed: u64, c: &Arc<Counts>) {
    let stop = Arc::new(AtomicBool::new(false));
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let mut handles = Vec::new();
    for r in 0..READERS {
        let (images, stop, failure, c) = (images.clone(), stop.clone(), failure.clone(), c.clone());
        let (name, src) = images[r % IMAGES].clone();
        let path = d.path(&name);
        handles.push(std::thread::spawn(move || {
            let mut x = (seed + r as u64).wrapping_mul(0x9E3779B97F4A7C15) | 1;
            let f = std::fs::File::open(&path).unwrap();
            // Half the readers are sequential (readahead), half random.
            let sequential = r % 2 == 0;
            let mut at = 0usize;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 4096 * (1 + (x % 64) as usize);
                let off = if sequential {
                    let o = at;
                    at = (at + len) % src.len();
                    o
                } else {
                    (x >> 8) as usize % src.len()
                };
                let len = len.min(src.len() - off);
                let mut buf = vec![0u8; len];
                let t = Instant::now();
                if let Err(e) = f.read_exact_at(&mut buf, off as u64) {
                    *failure.lock().unwrap() = Some(format!("{name} at {off}+{len}: {e}"));
                    return;
                }
                let ms = t.elapsed().as_millis() as u64;
                c.max_ms.fetch_max(ms, Ordering::Relaxed);
                if buf[..] != src[off..off + len] {
                    *failure.lock().unwrap() = Some(format!("{name} at {off}+{len}: wrong bytes"));
                    return;
                }
                c.reads.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) && failure.lock().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    // Every reader answers its last read within the bound.
    let deadline = Instant::now() + READ_BOUND;
    for h in handles {
        while !h.is_finished() {
            assert!(
                Instant::now() < deadline,
                "a reader did not answer within {READ_BOUND:?}\n{}",
                tail(&d.log(), 20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h.join().unwrap();
    }
    let failed = failure.lock().unwrap().take();
    if let Some(f) = failed {
        panic!("{f}\n--- daemon log ---\n{}", tail(&d.log(), 30));
    }
}

#[test]
fn sixty_four_readers_across_eight_filling_images_read_right_and_the_daemon_does_not_grow() {
    let secs: u64 = std::env::var("LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let origin = Origin::start();
    let images: Arc<Vec<(String, Bytes)>> = Arc::new(
        (0..IMAGES)
            .map(|i| {
                let data = stamped_image(16 * MIB, 200 + i as u64);
                origin.put(&format!("l{i}.raw"), data.clone());
                (format!("l{i}"), data)
            })
            .collect(),
    );
    // Slow enough that the fills run through the first rounds.
    origin.set_chunk_delay(Duration::from_millis(100));
    let d = Daemon::start();
    for (name, data) in images.iter() {
        d.bifs_ok(&[
            "create",
            name,
            "--url",
            &origin.url(&format!("{name}.raw")),
            "--checksum",
            &sha512_hex(data),
        ]);
    }
    let pid = d.pid().unwrap();
    let c = Arc::new(Counts::default());
    let filling_at_start = images
        .iter()
        .filter(|(n, _)| d.status(n)["state"] != "ready")
        .count();
    let (fds0, rss0) = (fds(pid), rss_kib(pid));
    round(&d, &images, secs, 1, &c);
    let (fds_mid, rss_mid) = (fds(pid), rss_kib(pid));
    let filling = images
        .iter()
        .filter(|(n, _)| d.status(n)["state"] != "ready")
        .count();
    round(&d, &images, secs, 2, &c);
    origin.set_chunk_delay(Duration::ZERO);
    round(&d, &images, secs, 3, &c);
    for (name, data) in images.iter() {
        d.wait_state(name, "ready", Duration::from_secs(120));
        let got = std::fs::read(d.path(name)).unwrap();
        assert!(got == data[..], "{name}: the whole image");
    }
    round(&d, &images, secs, 4, &c);
    let (fds1, rss1) = (fds(pid), rss_kib(pid));
    println!(
        "{} reads, {} bytes compared, slowest read {} ms; {filling_at_start} of {IMAGES} images filling \
         as the readers started, {filling} after the warm-up round; daemon fds {fds0} -> {fds_mid} -> {fds1}, RSS {rss0} -> {rss_mid} -> {rss1} KiB",
        c.reads.load(Ordering::Relaxed),
        c.bytes.load(Ordering::Relaxed),
        c.max_ms.load(Ordering::Relaxed)
    );
    assert_eq!(filling_at_start, IMAGES, "the fills ran during the load");
    // Readers closed their files: after the warm-up round the daemon's descriptors stay
    // flat (a little slack for connections to the origin coming and going). The warm-up
    // may leave idle connections in the HTTP pools (readers' and fill's, at most 64 idle
    // per origin each), so against the start the bound is the pools'. Once an image is
    // ready its reads go through passthrough, so the first round (all images filling) is
    // the one the daemon serves itself.
    assert!(
        fds1 <= fds_mid + 8,
        "descriptors grew: {fds0} -> {fds_mid} -> {fds1}"
    );
    assert!(
        fds1 <= fds0 + 2 * 64,
        "descriptors grew: {fds0} -> {fds_mid} -> {fds1}"
    );
    assert!(
        rss1 <= rss0 + 64 * 1024,
        "resident memory grew by more than 64 MiB: {rss0} -> {rss1} KiB"
    );
}
