//! An origin that misbehaves in every way (`common::origin::Fault`, `Origin::set_down`),
//! through the real binary and a real mount: each case ends in a ready image whose
//! mounted bytes have the source's SHA-512, or a failed image whose message names the
//! cause; and nothing hangs: every read through the mount answers within a bound.
//!
//! The create's probe and first block are fetched before faults meant for the fill are
//! queued (`--no-fill`, then `bifs fill`), so each fault meets the request it is meant for.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use common::origin::{Fault, Origin};
use common::{sha512_hex, stamped_image, tail, wait_for, Daemon};
use serde_json::Value;

const MIB: usize = 1 << 20;
/// No read through the mount may take longer than this (a hang detector, not a timing claim).
const READ_BOUND: Duration = Duration::from_secs(90);
/// How long an image may take to settle (ready or failed).
const SETTLE: Duration = Duration::from_secs(90);

struct Case {
    origin: Origin,
    d: Daemon,
    data: Bytes,
    sum: String,
}

impl Case {
    /// An origin serving `img.raw` (`size` bytes) and a daemon with `args`.
    fn new(size: usize, seed: u64, args: &[&str]) -> Case {
        let origin = Origin::start();
        let data = stamped_image(size, seed);
        origin.put("img.raw", data.clone());
        let sum = sha512_hex(&data);
        let d = Daemon::start_with(args);
        Case {
            origin,
            d,
            data,
            sum,
        }
    }

    fn url(&self) -> String {
        self.origin.url("img.raw")
    }

    /// `bifs create img` with the right checksum and `extra` flags.
    fn create(&self, extra: &[&str]) -> std::process::Output {
        let url = self.url();
        let mut args = vec!["create", "img", "--url", &url, "--checksum", &self.sum];
        args.extend_from_slice(extra);
        self.d.bifs(&args)
    }

    /// Creates the image without its fill (probe and first block done, no fault met).
    fn create_quiet(&self) {
        let out = self.create(&["--no-fill"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until the image is ready or failed; returns its status.
    fn settle(&self) -> Value {
        wait_for("img to be ready or failed", SETTLE, || {
            let s = self.d.status("img");
            matches!(s["state"].as_str(), Some("ready" | "failed")).then_some(s)
        })
    }

    /// The image is ready and the mount serves the source's bytes (SHA-512 compared).
    fn assert_ready_right(&self, what: &str) {
        let s = self.settle();
        assert_eq!(
            s["state"],
            "ready",
            "{what}: {s}\n--- daemon log ---\n{}",
            tail(&self.d.log(), 40)
        );
        let got = read_bounded(&self.d.path("img")).expect("a ready image reads");
        assert_eq!(sha512_hex(&got), self.sum, "{what}: the mounted bytes");
        println!(
            "{what}: ready, {} bytes verified, {} faults injected",
            got.len(),
            self.origin.injected()
        );
    }

    /// The image failed, its error names the cause (every word of `words`), and reads
    /// of it answer EIO.
    fn assert_failed_naming(&self, what: &str, words: &[&str]) -> String {
        let s = self.settle();
        let err = s["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            s["state"],
            "failed",
            "{what}: {s}\n--- daemon log ---\n{}",
            tail(&self.d.log(), 40)
        );
        for w in words {
            assert!(err.contains(w), "{what}: the error names {w:?}: {err}");
        }
        let e = read_bounded(&self.d.path("img")).expect_err("a failed image gives EIO");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
        println!("{what}: failed as expected: {err}");
        err
    }
}

impl Case {
    /// After a failure that a retry may clear: nothing wrong was landed (every block
    /// whose bit is set on disk holds the source's bytes), and `bifs fill` completes it.
    fn retry_completes(&self, what: &str) {
        let on_disk = common::ondisk::check_on_disk(&self.d.disk, "img", &self.data)
            .expect("the image's files");
        assert!(!on_disk.ready, "{what}");
        self.d.bifs_ok(&["fill", "img"]);
        self.assert_ready_right(&format!("{what}, then `bifs fill`"));
    }
}

/// Reads a whole file in another thread; panics if it does not answer within `READ_BOUND`.
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    read_bounded_within(path, READ_BOUND)
}

fn read_bounded_within(path: &Path, bound: Duration) -> std::io::Result<Vec<u8>> {
    let rx = read_in_background(path.to_path_buf());
    rx.recv_timeout(bound).unwrap_or_else(|_| {
        panic!(
            "a read of {} did not answer within {bound:?}",
            path.display()
        )
    })
}

fn read_in_background(path: PathBuf) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::fs::File::open(&path).and_then(|mut f| {
            let mut v = Vec::new();
            f.read_to_end(&mut v).map(|_| v)
        });
        let _ = tx.send(r);
    });
    rx
}

/// Reads `len` bytes at `offset` in another thread, bounded as `read_bounded`.
fn read_at_bounded(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let r = std::fs::File::open(&p).and_then(|f| {
            let mut v = vec![0u8; len];
            f.read_exact_at(&mut v, offset).map(|_| v)
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(READ_BOUND)
        .unwrap_or_else(|_| panic!("a read at {offset} did not answer within {READ_BOUND:?}"))
}

/// Queues `faults` for the fill, starts it, and expects a ready image with the right bytes.
fn fill_through(faults: &[(Fault, usize)], what: &str) {
    let c = Case::new(8 * MIB, 11, &[]);
    c.create_quiet();
    for (f, n) in faults {
        c.origin.fault_n(f.clone(), *n);
    }
    c.d.bifs_ok(&["fill", "img"]);
    // A reader during the faults: it must get the right bytes too.
    let got = read_bounded(&c.d.path("img")).unwrap_or_else(|e| {
        panic!(
            "{what}: a reader during the faults got {e}; status {}\n--- daemon log ---\n{}",
            c.d.status("img"),
            tail(&c.d.log(), 20)
        )
    });
    assert_eq!(
        sha512_hex(&got),
        c.sum,
        "{what}: bytes read during the faults"
    );
    c.assert_ready_right(what);
    let want: usize = faults.iter().map(|(_, n)| n).sum();
    assert_eq!(c.origin.faults_left(), 0, "{what}: every fault was met");
    assert!(c.origin.injected() >= want as u64);
}

#[test]
fn a_source_refusing_connections_for_a_while_is_ridden_out_and_the_fill_resumes() {
    let c = Case::new(8 * MIB, 12, &["--read-timeout", "3s"]);
    c.create_quiet();
    c.origin.set_down(true);
    c.d.bifs_ok(&["fill", "img"]);
    let s = wait_for(
        "the status to say the source is unavailable",
        SETTLE,
        || {
            let s = c.d.status("img");
            let err = s["error"].as_str().unwrap_or_default().to_string();
            assert_ne!(
                s["state"], "failed",
                "an unreachable source fails nothing: {s}"
            );
            err.contains("source unavailable since").then_some(s)
        },
    );
    assert_eq!(s["state"], "in-progress", "{s}");
    println!("while refused: {}", s["error"]);
    // The first block (fetched by the create) still serves; an absent one gives up after
    // --read-timeout with EIO, it does not hang.
    let head = read_at_bounded(&c.d.path("img"), 0, 4096).expect("a present block serves");
    assert_eq!(&head[..], &c.data[..4096]);
    let e = read_at_bounded(&c.d.path("img"), 5 * MIB as u64, 4096)
        .expect_err("an absent block while the source is down");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // A reader that starts while the source is down and waits: with 3 s it may time out;
    // after the source is back, every read succeeds and the fill resumes by itself.
    c.origin.set_down(false);
    c.assert_ready_right("refused connections, then back");
    assert!(
        c.d.log().contains("read gave up waiting"),
        "the give-up is logged"
    );
}

#[test]
fn a_source_that_goes_down_mid_body_resets_open_streams_and_is_ridden_out() {
    let c = Case::new(16 * MIB, 13, &[]);
    c.create_quiet();
    // Slow bodies, so the fill is mid-stream when the origin goes down.
    c.origin.set_chunk_delay(Duration::from_millis(20));
    c.d.bifs_ok(&["fill", "img"]);
    wait_for("the fill to be under way", SETTLE, || {
        (c.origin.served() > 2 * MIB as u64).then_some(())
    });
    c.origin.set_down(true);
    let reader = read_in_background(c.d.path("img"));
    wait_for(
        "the status to say the source is unavailable",
        SETTLE,
        || {
            let s = c.d.status("img");
            assert_ne!(s["state"], "failed", "{s}");
            s["error"]
                .as_str()
                .is_some_and(|e| e.contains("source unavailable since"))
                .then_some(())
        },
    );
    assert!(c.origin.resets() > 0, "open connections were reset");
    c.origin.set_chunk_delay(Duration::ZERO);
    c.origin.set_down(false);
    // The reader waited through the outage (default --read-timeout 120 s) and gets it all.
    let got = reader
        .recv_timeout(READ_BOUND)
        .expect("the reader answers")
        .expect("the reader rides out the outage");
    assert_eq!(sha512_hex(&got), c.sum);
    c.assert_ready_right("down mid-body, then back");
}

#[test]
fn resets_mid_body_are_retried() {
    fill_through(&[(Fault::Truncate(100_000), 5)], "resets mid-body");
}

#[test]
fn a_content_length_longer_than_the_body_is_retried() {
    fill_through(
        &[(Fault::LengthOver(5000), 4)],
        "Content-Length over the body",
    );
}

#[test]
fn a_content_length_shorter_than_the_range_is_retried() {
    fill_through(
        &[(Fault::LengthUnder(5000), 4)],
        "Content-Length under the range",
    );
}

#[test]
fn server_errors_and_429_with_and_without_retry_after_are_retried() {
    let mut faults = Vec::new();
    for code in [500, 502, 503, 429] {
        faults.push((Fault::Status(code), 1));
        faults.push((Fault::StatusRetryAfter(code, 1), 1));
    }
    fill_through(&faults, "500/502/503/429 with and without Retry-After");
}

#[test]
fn stalls_of_seconds_before_and_inside_a_body_are_ridden_out() {
    fill_through(
        &[
            (Fault::Delay(Duration::from_secs(3)), 1),
            (
                Fault::StallMidBody {
                    after: 1 << 20,
                    pause: Duration::from_secs(3),
                },
                1,
            ),
        ],
        "stalls of seconds",
    );
}

#[test]
fn a_redirect_loop_during_the_fill_is_retried() {
    fill_through(&[(Fault::RedirectLoop, 2)], "redirect loop during the fill");
}

#[test]
fn a_redirect_loop_at_create_fails_the_create_and_names_it() {
    let c = Case::new(MIB, 14, &[]);
    let url = format!("http://{}/loop/img.raw", c.origin.addr);
    let out = c.d.bifs(&["create", "img", "--url", &url]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("redirect"),
        "the error names the redirects: {err}"
    );
    let list = c.d.bifs_ok(&["list", "--json"]);
    assert_eq!(list.trim(), "[]", "nothing was created");
}

#[test]
fn busy_answers_at_create_are_retried() {
    let c = Case::new(4 * MIB, 15, &[]);
    c.origin.fault(Fault::StatusRetryAfter(503, 1));
    c.origin.fault(Fault::Status(429));
    let out = c.create(&[]);
    assert!(
        out.status.success(),
        "a busy origin at create time is waited for: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.assert_ready_right("503 and 429 at create");
}

#[test]
fn a_reply_that_ignores_range_once_does_not_fail_the_image() {
    fill_through(&[(Fault::IgnoreRange, 1)], "Range ignored once (same ETag)");
}

#[test]
fn another_etag_mid_fill_fails_the_image_as_a_changed_source() {
    let c = Case::new(8 * MIB, 16, &[]);
    c.create_quiet();
    c.origin.fault(Fault::OtherEtag);
    c.d.bifs_ok(&["fill", "img"]);
    c.assert_failed_naming("another ETag", &["source changed", "ETag"]);
}

#[test]
fn corrupted_bytes_under_the_same_etag_fail_the_checksum_and_are_never_served_as_good() {
    let c = Case::new(8 * MIB, 17, &[]);
    c.create_quiet();
    c.origin.fault(Fault::Corrupt);
    c.d.bifs_ok(&["fill", "img"]);
    c.assert_failed_naming("corrupt bytes, same ETag", &["checksum mismatch"]);
}

#[test]
fn a_body_larger_than_announced_is_never_landed() {
    let c = Case::new(8 * MIB, 18, &[]);
    c.create_quiet();
    c.origin.fault_n(Fault::Oversize(100), 2);
    c.d.bifs_ok(&["fill", "img"]);
    let mut s = c.settle();
    // Each oversized reply fails the image, naming it; how many of them one failure
    // consumes depends on how many fill requests were in flight when it came.
    while s["state"] == "failed" && c.origin.faults_left() > 0 {
        c.assert_failed_naming("body larger than announced", &["longer than asked"]);
        c.d.bifs_ok(&["fill", "img"]);
        s = c.settle();
    }
    match s["state"].as_str() {
        Some("ready") => c.assert_ready_right("body larger than announced"),
        _ => {
            c.assert_failed_naming("body larger than announced", &["longer than asked"]);
            c.retry_completes("body larger than announced");
        }
    }
}

#[test]
fn bad_content_range_headers_are_caught() {
    for (i, cr) in [
        "bytes 0-0/1",
        "bytes */8388608",
        "bytes 1-2",
        "garbage",
        "bytes 18446744073709551615-0/8388608",
    ]
    .iter()
    .enumerate()
    {
        let c = Case::new(8 * MIB, 30 + i as u64, &[]);
        c.create_quiet();
        c.origin.fault(Fault::ContentRange(cr.to_string()));
        c.d.bifs_ok(&["fill", "img"]);
        let s = c.settle();
        match s["state"].as_str() {
            Some("ready") => c.assert_ready_right(&format!("Content-Range {cr:?}")),
            _ => {
                c.assert_failed_naming(&format!("Content-Range {cr:?}"), &["Content-Range"]);
                c.retry_completes(&format!("Content-Range {cr:?}"));
            }
        }
    }
}

#[test]
fn absurd_content_ranges_at_create_are_refused_without_a_panic() {
    // The probe claims an image of 2^64-1 bytes.
    let c = Case::new(MIB, 40, &[]);
    c.origin
        .fault(Fault::ContentRange("bytes 0-0/18446744073709551615".into()));
    let out = c.create(&[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!(
        "a probe claiming 2^64-1 bytes: exit {:?}: {err}",
        out.status.code()
    );
    assert!(!out.status.success(), "{err}");
    assert!(!c.d.log().contains("panicked"), "{}", tail(&c.d.log(), 20));
    assert_eq!(c.d.bifs_ok(&["list", "--json"]).trim(), "[]");
}

#[test]
fn a_content_range_ending_at_u64_max_is_a_bad_reply_not_a_panic() {
    // The first block's reply ends at byte 2^64-1.
    let c = Case::new(MIB, 41, &[]);
    c.origin.fault(Fault::Pass);
    c.origin.fault(Fault::ContentRange(
        "bytes 0-18446744073709551615/1048576".into(),
    ));
    let out = c.create(&[]);
    println!(
        "a first block ending at byte 2^64-1: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !c.d.log().contains("panicked"),
        "no panic on a Content-Range ending at 2^64-1:\n{}",
        tail(&c.d.log(), 20)
    );
    if out.status.success() {
        let s = c.settle();
        if s["state"] == "ready" {
            c.assert_ready_right("Content-Range ending at 2^64-1");
        } else {
            c.assert_failed_naming("Content-Range ending at 2^64-1", &["Content-Range"]);
        }
    }
}

/// Starts `dd` reading 64 KiB of an absent range of `img`; waits until its request has
/// reached the origin (which stalls), kills it with SIGKILL and returns how long the
/// killed reader took to go away (bounded by `bound`: a hang detector).
fn kill_a_stalled_reader(c: &Case, bound: Duration) -> Duration {
    let before = c.origin.requests();
    let mut dd = std::process::Command::new("dd")
        .arg(format!("if={}", c.d.path("img").display()))
        .args([
            "of=/dev/null",
            "bs=64k",
            "skip=64",
            "count=1",
            "iflag=direct",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the reader's request to reach the origin", SETTLE, || {
        (c.origin.requests() > before).then_some(())
    });
    let t = std::time::Instant::now();
    dd.kill().unwrap();
    wait_for("the killed reader to go away", bound, || {
        dd.try_wait().unwrap()
    });
    t.elapsed()
}

#[test]
fn a_reader_killed_while_the_source_stalls_goes_away_within_the_read_timeout() {
    let c = Case::new(8 * MIB, 19, &["--read-timeout", "4s"]);
    c.create_quiet();
    c.origin.fault_n(Fault::Delay(Duration::from_secs(20)), 20);
    let took = kill_a_stalled_reader(&c, Duration::from_secs(30));
    println!("a reader killed during a stall went away after {took:?}");
    c.origin.clear_faults();
    assert_eq!(c.d.status("img")["state"], "in-progress");
}

/// fuser 0.18 answers FUSE_INTERRUPT with ENOSYS, so the kernel never says the reader
/// was killed; the daemon sees it from the reader's pending SIGKILL (fs.rs `caller_killed`).
#[test]
fn a_reader_killed_while_the_source_stalls_goes_away_at_once() {
    let c = Case::new(8 * MIB, 20, &[]);
    c.create_quiet();
    c.origin.fault_n(Fault::Delay(Duration::from_secs(60)), 20);
    kill_a_stalled_reader(&c, Duration::from_secs(10));
}
