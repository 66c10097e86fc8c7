//! Disk faults: a cache disk that fills up mid-fill fails only the image on it (with a
//! message naming the cause and what to do); images on other disks keep filling and
//! serving; after space is freed a retry completes it.

mod common;

use std::time::Duration;

use common::origin::Origin;
use common::{disk_uuid8, sh, sha512_hex, stamped_image, wait_for, Daemon, SmallDisk};

const MIB: usize = 1 << 20;

#[test]
fn a_full_disk_fails_only_its_image_while_the_other_disk_keeps_serving() {
    let origin = Origin::start();
    let small_data = stamped_image(24 * MIB, 71);
    let other_data = stamped_image(16 * MIB, 72);
    origin.put("s.raw", small_data.clone());
    origin.put("o.raw", other_data.clone());
    let base = tempfile::tempdir().unwrap();
    let small = base.path().join("small");
    let _tmpfs = SmallDisk::new(&small, 40);
    let d = Daemon::start_with(&["--disk", small.to_str().unwrap()]);
    origin.set_chunk_delay(Duration::from_millis(20));
    let create = |name: &str, file: &str, disk: &str, sum: &str| {
        d.bifs_ok(&[
            "create",
            name,
            "--url",
            &origin.url(file),
            "--disk",
            disk,
            "--checksum",
            sum,
        ]);
    };
    create("s", "s.raw", &disk_uuid8(&small), &sha512_hex(&small_data));
    create("o", "o.raw", &disk_uuid8(&d.disk), &sha512_hex(&other_data));
    // The small disk fills up under the fill.
    let filler = small.join("filler");
    let (rc, _, _) = sh(&format!(
        "dd if=/dev/zero of={} bs=1M count=40 2>/dev/null",
        filler.display()
    ));
    assert_ne!(rc, 0, "the filler fills the disk");
    origin.set_chunk_delay(Duration::ZERO);
    let s = wait_for("s to fail", Duration::from_secs(60), || {
        let s = d.status("s");
        (s["state"] == "failed").then_some(s)
    });
    let msg = s["error"].as_str().unwrap();
    assert!(
        msg.contains("No space left") && msg.contains("free space"),
        "{msg}"
    );
    // The other disk's image is untouched by it: it fills, verifies and serves.
    d.wait_state("o", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("o")).unwrap() == other_data[..]);
    let e = std::fs::read(d.path("s")).expect_err("the failed image answers EIO");
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    // Space freed, a retry completes it.
    std::fs::remove_file(&filler).unwrap();
    d.bifs_ok(&["fill", "s"]);
    d.wait_state("s", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("s")).unwrap() == small_data[..]);
    assert!(!d.log().contains("panicked"));
}
