//! Power loss: a disk on an ext4 filesystem in a loop-mounted file, cut off abruptly
//! right after a `kill -9` of the daemon (`EXT4_IOC_SHUTDOWN` with NOLOGFLUSH: whatever
//! was not yet durable is lost, as in a power cut), then mounted again. Every block whose
//! bit survived in the bitmap must hold the source's bytes (the data is `fdatasync`ed
//! before its bits are written), and the image must resume and verify.
//!
//! Longer runs: `POWER_CUTS=50` (scripts/soak.sh).
//!
//! (Device-mapper, the other way to cut a disk off, is not in this machine's kernel.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::ondisk::check_on_disk;
use common::origin::Origin;
use common::{sh, sha512_hex, stamped_image, tail, Daemon};

const MIB: usize = 1 << 20;

/// An ext4 filesystem in a file, loop-mounted at `dir`; unmounted on drop.
struct LoopDisk {
    dir: PathBuf,
    file: PathBuf,
}

impl LoopDisk {
    fn new(base: &Path, mib: u64) -> LoopDisk {
        let file = base.join("disk.ext4");
        let dir = base.join("loopdisk");
        std::fs::create_dir_all(&dir).unwrap();
        let (rc, _, err) = sh(&format!(
            "truncate -s {mib}M {f} && mkfs.ext4 -q -F {f}",
            f = file.display()
        ));
        assert_eq!(rc, 0, "mkfs.ext4: {err}");
        let d = LoopDisk { dir, file };
        d.mount();
        d
    }

    fn mount(&self) {
        let (rc, _, err) = sh(&format!(
            "mount -o loop {} {}",
            self.file.display(),
            self.dir.display()
        ));
        assert_eq!(rc, 0, "mount: {err}");
    }

    /// The power cut: the filesystem stops at once, nothing more reaches the file.
    fn cut_power(&self) {
        // EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32); EXT4_GOING_FLAGS_NOLOGFLUSH = 2.
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
        let f = std::fs::File::open(&self.dir).unwrap();
        let flags: u32 = 2;
        use std::os::fd::AsRawFd;
        // SAFETY: an ioctl on an fd we own with a pointer to a live u32.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), EXT4_IOC_SHUTDOWN, &flags) };
        assert_eq!(rc, 0, "shutdown: {}", std::io::Error::last_os_error());
        drop(f);
        let (rc, _, err) = sh(&format!("umount {}", self.dir.display()));
        assert_eq!(rc, 0, "umount after the cut: {err}");
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn power_cuts_during_fills_lose_only_blocks_not_yet_claimed() {
    let origin = Origin::start();
    let data = stamped_image(32 * MIB, 301);
    origin.put("p.raw", data.clone());
    origin.set_chunk_delay(Duration::from_millis(20));
    let base = tempfile::tempdir().unwrap();
    let disk = LoopDisk::new(base.path(), 128);
    let loop_disk = disk.dir.to_str().unwrap().to_string();
    let mut d = Daemon::start_with(&["--disk", &loop_disk]);
    let uuid: serde_json::Value =
        serde_json::from_slice(&std::fs::read(disk.dir.join("bifs-disk.json")).unwrap()).unwrap();
    let uuid = uuid["uuid"].as_str().unwrap()[..8].to_string();
    d.bifs_ok(&[
        "create",
        "p",
        "--url",
        &origin.url("p.raw"),
        "--disk",
        &uuid,
        "--checksum",
        &sha512_hex(&data),
    ]);
    // The create is made durable before the first cut (a cut right after a create may
    // lose the whole image, which `recreated` counts).
    sh("sync");
    let (mut cuts, mut recreated, mut present_after) = (0, 0, Vec::new());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let cuts_wanted: usize = std::env::var("POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for _ in 0..cuts_wanted {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Filling for a random 0.2..1.4 s (it flushes every 0.5 s), then the cut.
        std::thread::sleep(Duration::from_millis(200 + x % 1200));
        let cached = d.status("p")["bytesCached"].as_u64().unwrap() / (16 * 1024);
        d.kill9();
        disk.cut_power();
        cuts += 1;
        disk.mount();
        match check_on_disk(&disk.dir, "p", &data) {
            Some(c) => {
                assert!(!c.failed && (!c.ready || c.present > 0));
                present_after.push((cached, c.present));
            }
            None => recreated += 1,
        }
        d.spawn();
        if d.bifs(&["status", "p"]).status.code() != Some(0) {
            d.bifs_ok(&[
                "create",
                "p",
                "--url",
                &origin.url("p.raw"),
                "--disk",
                &uuid,
                "--checksum",
                &sha512_hex(&data),
            ]);
        }
    }
    origin.set_chunk_delay(Duration::ZERO);
    d.wait_state("p", "ready", Duration::from_secs(120));
    let got = std::fs::read(d.path("p")).unwrap();
    assert_eq!(
        sha512_hex(&got),
        sha512_hex(&data),
        "{}",
        tail(&d.log(), 20)
    );
    println!(
        "{cuts} power cuts survived; (blocks landed before, durable after) each: {present_after:?}; \
         images lost whole by a cut: {recreated}; ready and verified"
    );
}
