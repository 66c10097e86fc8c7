//! Crashes: `kill -9` of the daemon at random moments while images fill, again and again
//! on the same disk; and a failpoint (`--features failpoints`) that kills it inside the
//! window between the data's `fdatasync` and the bitmap write. After every crash the
//! disk is read directly: each block whose bit is set in `<disk>/images/<name>/bitmap`
//! must hold the source's bytes in `data` (a ready image: every block). In the end every
//! image is ready and its mounted bytes have the source's SHA-512.
//!
//! Longer runs: `CRASH_KILLS=300 cargo test --features failpoints --test crash` (scripts/soak.sh).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::ondisk::check_on_disk;
use common::origin::Origin;
use common::{sha512_hex, stamped_image, tail, wait_for, Daemon};

const MIB: usize = 1 << 20;

/// A tiny xorshift, seeded from the clock (the seed is printed, so a run reproduces).
struct Rng(u64);

impl Rng {
    fn from_clock() -> Rng {
        let seed = std::env::var("CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("seed {seed} (CRASH_SEED={seed} repeats this run)");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The origin's files: name -> bytes.
struct Images {
    origin: Origin,
    files: Vec<(String, Bytes)>,
}

impl Images {
    fn new(n: usize, size: usize) -> Images {
        let origin = Origin::start();
        let files = (0..n)
            .map(|i| {
                let data = stamped_image(size, 100 + i as u64);
                let name = format!("img{i}");
                origin.put(&format!("{name}.raw"), data.clone());
                (name, data)
            })
            .collect();
        Images { origin, files }
    }

    fn create(&self, d: &Daemon, name: &str, data: &Bytes) {
        d.bifs_ok(&[
            "create",
            name,
            "--url",
            &self.origin.url(&format!("{name}.raw")),
            "--checksum",
            &sha512_hex(data),
        ]);
    }
}

/// Kills the daemon (as `kill -9`) and clears nothing: the next start must cope.
fn crash(d: &mut Daemon) {
    d.kill9();
}

#[test]
fn thirty_kill_9s_at_random_moments_lose_nothing_and_every_image_verifies() {
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut rng = Rng::from_clock();
    let imgs = Images::new(3, 16 * MIB);
    // Slow bodies (50 ms per 64 KiB piece), so fills are mid-flight when killed.
    imgs.origin.set_chunk_delay(Duration::from_millis(50));
    let mut d = Daemon::start();
    for (name, data) in &imgs.files {
        imgs.create(&d, name, data);
    }
    let start = Instant::now();
    let (mut restarts, mut verified, mut present_seen, mut completed) = (0, 0u64, 0u64, 0);
    // Names of the round's images: an image that is ready is checked, deleted and
    // created again under a new name, so fills keep running through every crash.
    let mut live: Vec<(String, usize)> = (0..imgs.files.len())
        .map(|i| (imgs.files[i].0.clone(), i))
        .collect();
    let mut generation = 0;
    while restarts < kills {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the crash loop is bounded in time ({restarts} restarts so far)"
        );
        // Up for a random 0..600 ms of filling, then killed.
        std::thread::sleep(Duration::from_millis(rng.below(600)));
        crash(&mut d);
        for (name, i) in &live {
            let src = &imgs.files[*i].1;
            if let Some(c) = check_on_disk(&d.disk, name, src) {
                assert!(!c.failed, "{name} failed\n{}", tail(&d.log(), 30));
                verified += c.bytes_verified;
                present_seen += c.present;
            }
        }
        d.spawn();
        restarts += 1;
        // Images that finished: check their bytes through the mount, then start anew.
        for slot in live.iter_mut() {
            let (name, i) = slot.clone();
            let s = d.status(&name);
            assert_ne!(s["state"], "failed", "{name}: {s}\n{}", tail(&d.log(), 30));
            if s["state"] == "ready" {
                let got = std::fs::read(d.path(&name)).unwrap();
                assert_eq!(sha512_hex(&got), sha512_hex(&imgs.files[i].1), "{name}");
                verified += got.len() as u64;
                completed += 1;
                d.bifs_ok(&["delete", &name]);
                generation += 1;
                // The origin serves the same file under a second name for the new image.
                let new = format!("{}-g{generation}", imgs.files[i].0);
                imgs.origin
                    .put(&format!("{new}.raw"), imgs.files[i].1.clone());
                imgs.create(&d, &new, &imgs.files[i].1);
                *slot = (new, i);
            }
        }
    }
    imgs.origin.set_chunk_delay(Duration::ZERO);
    for (name, i) in &live {
        d.wait_state(name, "ready", Duration::from_secs(120));
        let got = std::fs::read(d.path(name)).unwrap();
        assert_eq!(sha512_hex(&got), sha512_hex(&imgs.files[*i].1), "{name}");
        verified += got.len() as u64;
        completed += 1;
    }
    println!(
        "{restarts} kill -9 restarts survived; {present_seen} present blocks checked on disk; \
         {completed} images verified ready; {verified} bytes verified; nothing lost"
    );
}

#[test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature (scripts/test.sh builds with it)"
)]
fn a_crash_between_the_data_sync_and_the_bitmap_write_serves_no_unwritten_block() {
    let mut rng = Rng::from_clock();
    let imgs = Images::new(1, 24 * MIB);
    imgs.origin.set_chunk_delay(Duration::from_millis(40));
    let (name, src) = imgs.files[0].clone();
    let mut d = Daemon::start();
    imgs.create(&d, &name, &src);
    let mut crashes = 0;
    let mut window_seen = 0;
    for _ in 0..4 {
        let before = check_on_disk(&d.disk, &name, &src).unwrap();
        if before.ready {
            break;
        }
        // Die at the Nth flush that has bits to write, right after the data's fdatasync.
        let nth = 1 + rng.below(3);
        d.kill9();
        d.env = vec![(
            "BIFS_FAILPOINT".into(),
            format!("flush-before-bitmap:{nth}"),
        )];
        d.spawn_process();
        // The failpoint kills the daemon, unless the image finished before its Nth flush.
        let exit = wait_for(
            "the failpoint to kill the daemon (or the image to be ready)",
            Duration::from_secs(60),
            || {
                if let Some(status) = d.try_exit() {
                    return Some(Some(status));
                }
                let out = d.bifs(&["status", &name, "--json"]);
                let ready = out.status.success()
                    && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                        .is_ok_and(|s| s["state"] == "ready");
                ready.then_some(None)
            },
        );
        let Some(exit) = exit else {
            break;
        };
        assert!(!exit.success(), "killed by the failpoint: {exit:?}");
        assert!(
            d.log().contains("failpoint reached"),
            "{}",
            tail(&d.log(), 20)
        );
        crashes += 1;
        let after = check_on_disk(&d.disk, &name, &src).unwrap();
        assert!(!after.failed);
        // The window was really hit: blocks whose data is written but whose bit is not.
        if after.unclaimed_written > 0 {
            window_seen += 1;
        }
        assert!(after.present >= before.present, "bits only go from 0 to 1");
        // The stale mount of the killed daemon is cleared by the next start.
        d.env.clear();
        d.spawn();
        // Whatever was not claimed is fetched again; reading it through the mount gives
        // the source's bytes (never the unclaimed data file's without a fetch).
        assert_ne!(d.status(&name)["state"], "failed");
    }
    assert!(crashes >= 1);
    assert!(
        window_seen >= 1,
        "at least one crash left written but unclaimed blocks (the window)"
    );
    imgs.origin.set_chunk_delay(Duration::ZERO);
    d.wait_state(&name, "ready", Duration::from_secs(120));
    let got = std::fs::read(d.path(&name)).unwrap();
    assert_eq!(sha512_hex(&got), sha512_hex(&src));
    println!("{crashes} failpoint crashes (data synced, bits not), {window_seen} inside the window; ready and verified");
}
