//! Issue 11: random reads fetch little while sequential reads and the fill still run at
//! line rate, and nothing is fetched twice.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use common::origin::Origin;
use common::{sh, stamped_image, Daemon};

const GIB: usize = 1 << 30;

fn offsets(n: usize, size: usize, len: usize, seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 16) % (size - len) as u64
        })
        .collect()
}

#[test]
fn random_reads_fetch_little_and_nothing_is_fetched_twice() {
    let origin = Origin::start();
    let data = stamped_image(GIB, 21);
    origin.put("big.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "big",
        "--url",
        &origin.url("big.raw"),
        "--no-fill",
    ]);
    let s = d.status("big");
    assert_eq!(s["state"], "in-progress");
    assert_eq!(s["fill"], false);
    let before = origin.served();
    let f = File::open(d.path("big")).unwrap();
    let mut buf = vec![0u8; 4096];
    let offs = offsets(2000, GIB, 4096, 42);
    for &off in &offs {
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(
            buf == data[off as usize..off as usize + 4096],
            "wrong bytes at {off}"
        );
    }
    let fetched = origin.served() - before;
    let asked = (offs.len() * 4096) as u64;
    eprintln!(
        "random reads: asked {asked} bytes, origin sent {fetched} ({:.1}x)",
        fetched as f64 / asked as f64
    );
    assert!(
        fetched <= 16 * asked,
        "origin sent {fetched} bytes for {asked} asked: more than 16x"
    );
    // Still in progress, with the real progress, and the status says the fill is off.
    let s = d.status("big");
    assert_eq!(s["state"], "in-progress");
    assert!(s["progress"].as_u64().unwrap() < 5, "{s}");
    let text = d.bifs_ok(&["status", "big"]);
    assert!(text.contains("fill off"), "{text}");

    // A sequential read of everything, then the fill: the random reads' blocks are not fetched again.
    let (rc, _, err) = sh(&format!(
        "dd if={} of=/dev/null bs=1M",
        d.path("big").display()
    ));
    assert_eq!(rc, 0, "{err}");
    d.bifs_ok(&["fill", "big"]);
    let s = d.wait_state("big", "ready", Duration::from_secs(300));
    assert_eq!(s["checksum"], common::sha512_hex(&data));
    let total = origin.served();
    eprintln!(
        "whole image: origin sent {total} bytes for {GIB} ({:.3}x)",
        total as f64 / GIB as f64
    );
    assert!(
        total <= GIB as u64 * 105 / 100,
        "origin sent {total} bytes in all for a {GIB}-byte image"
    );
    // And the bytes are right when read whole.
    let local = d.dir.path().join("big.raw");
    std::fs::write(&local, &data).unwrap();
    let (rc, _, err) = sh(&format!(
        "cmp {} {}",
        d.path("big").display(),
        local.display()
    ));
    assert_eq!(rc, 0, "{err}");
}

#[test]
fn sequential_and_random_readers_at_once_all_read_right() {
    let origin = Origin::start();
    let size = GIB / 4;
    let data = stamped_image(size, 22);
    origin.put("mix.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "mix",
        "--url",
        &origin.url("mix.raw"),
        "--no-fill",
    ]);
    let path = Arc::new(d.path("mix"));
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let (path, data) = (path.clone(), data.clone());
        threads.push(std::thread::spawn(move || {
            // Sequential readers, each over its own quarter, in 1 MiB reads.
            let f = File::open(&*path).unwrap();
            let quarter = size / 4;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = t as usize * quarter;
            while off < (t as usize + 1) * quarter {
                let n = f.read_at(&mut buf, off as u64).unwrap();
                assert!(n > 0);
                assert!(
                    buf[..n] == data[off..off + n],
                    "sequential reader {t} wrong at {off}"
                );
                off += n;
            }
        }));
    }
    for t in 0..4u64 {
        let (path, data) = (path.clone(), data.clone());
        threads.push(std::thread::spawn(move || {
            let f = File::open(&*path).unwrap();
            let mut buf = vec![0u8; 4096];
            for off in offsets(300, size, 4096, 100 + t) {
                f.read_exact_at(&mut buf, off).unwrap();
                assert!(
                    buf == data[off as usize..off as usize + 4096],
                    "random reader {t} wrong at {off}"
                );
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        origin.served() <= size as u64 * 105 / 100,
        "origin sent {} for {size}",
        origin.served()
    );
}

/// Issue 22: a page fault of an mmap of an image still arriving pulls the kernel's
/// readahead window around it; the mount keeps that window small, so an isolated 4 KiB
/// fault fetches at most 64 KiB (it fetched ~1 MiB with the kernel's 1 MiB window).
#[test]
fn an_mmap_page_fault_fetches_at_most_64_kib() {
    let origin = Origin::start();
    let size = 256 << 20;
    let data = stamped_image(size, 23);
    origin.put("m.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&["create", "m", "--url", &origin.url("m.raw"), "--no-fill"]);
    let f = File::open(d.path("m")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: a private read-only mapping of an open file, unmapped below; the slices
    // read from it stay within its length.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    let offs = offsets(50, size, 4096, 7);
    let before = origin.served();
    for &off in &offs {
        let off = (off / 4096 * 4096) as usize;
        // SAFETY: off + 4096 <= size, inside the mapping.
        let page = unsafe { std::slice::from_raw_parts((map as *const u8).add(off), 4096) };
        assert!(page == &data[off..off + 4096], "wrong bytes at {off}");
    }
    let per_read = (origin.served() - before) / offs.len() as u64;
    // SAFETY: the mapping made above, no slice of it outlives this point.
    unsafe { libc::munmap(map, size) };
    eprintln!("mmap: {per_read} origin bytes per 4 KiB page fault");
    assert!(
        per_read <= 64 * 1024,
        "an isolated page fault fetched {per_read} bytes on average: the readahead window is too big"
    );
}
