//! bifs as a careful administrator meets it on the mount and at start-up: what `df`, `du`
//! and `stat` show, and the refusals (a missing disk, a disk in use or given twice, a
//! non-empty or live mountpoint, an empty token file), and a read-only disk whose ready
//! images still serve. All through the real binary on real mounts.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::origin::Origin;
use common::{curl, random_bytes, sh, stderr_of as stderr, Daemon, BIN};

const MIB: usize = 1 << 20;

/// Runs `bifs args` that must stop by itself (a refusal at start-up); returns (code, stderr).
/// A bifs that keeps running is killed and the test fails.
fn run_to_exit(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bifs {args:?} kept running; it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), err)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn df_shows_the_disks_size_and_free_space_and_du_counts_the_cache_once() {
    let origin = Origin::start();
    let data = random_bytes(4 * MIB, 305);
    origin.put("df.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&["create", "counted", "--url", &origin.url("df.raw")]);
    d.wait_state("counted", "ready", Duration::from_secs(60));

    let df = |p: &std::path::Path| -> (u64, u64) {
        let (rc, out, err) = sh(&format!(
            "df -B1 --output=size,avail {} | tail -1",
            p.display()
        ));
        assert_eq!(rc, 0, "{err}");
        let v: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
        (v[0], v[1])
    };
    let (mnt_size, mnt_avail) = df(&d.mnt);
    let (disk_size, disk_avail) = df(&d.disk);
    // statfs counts in 4 KiB units: the size matches to within one.
    assert!(
        mnt_size.abs_diff(disk_size) < 4096,
        "df: mount {mnt_size}, disk {disk_size}"
    );
    assert!(mnt_avail > 0, "the mount never looks full");
    // Free space moves with whatever else writes to that filesystem meanwhile.
    assert!(
        mnt_avail.abs_diff(disk_avail) < 256 * MIB as u64,
        "df avail: mount {mnt_avail}, disk {disk_avail}"
    );
    let (_, out, _) = sh(&format!(
        "df -i --output=ipcent {} | tail -1",
        d.mnt.display()
    ));
    assert_ne!(out.trim(), "100%", "inodes never look exhausted");

    let du = |p: &std::path::Path, flags: &str| -> u64 {
        let (rc, out, err) = sh(&format!("du -B1 {flags} {}", p.display()));
        assert_eq!(rc, 0, "{err}");
        out.split_whitespace().next().unwrap().parse().unwrap()
    };
    let image = du(&d.path("counted"), "");
    assert!(
        image >= data.len() as u64,
        "du of the image shows it cached: {image}"
    );
    assert_eq!(
        du(&d.raw_path("counted"), ""),
        0,
        "the raw view's bytes are the image's"
    );
    assert_eq!(
        du(&d.mnt, "-s"),
        image,
        "du -s of the mount counts the cache once"
    );
}

#[test]
fn the_mount_root_and_raw_show_the_mount_start_time() {
    let before = now_secs();
    let d = Daemon::start();
    let after = now_secs();
    for p in [d.mnt.clone(), d.mnt.join(".raw")] {
        let (_, out, _) = sh(&format!("stat -c %Y {}", p.display()));
        let t: u64 = out.trim().parse().unwrap();
        assert!(
            t + 1 >= before && t <= after + 1,
            "{}: mtime {t}, mount started between {before} and {after}",
            p.display()
        );
    }
}

#[test]
fn mounting_over_a_non_empty_directory_or_a_live_mount_is_refused() {
    let d = Daemon::start();
    let base = tempfile::tempdir().unwrap();
    let disk = base.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let full = base.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("precious.txt"), b"keep me").unwrap();
    let mount = |mp: &std::path::Path| {
        run_to_exit(&[
            "mount",
            "--mountpoint",
            mp.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
    };
    let (code, err) = mount(&full);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("not empty") && err.contains("precious.txt"),
        "{err}"
    );
    assert!(!common::is_mounted(&full));
    assert_eq!(
        std::fs::read(full.join("precious.txt")).unwrap(),
        b"keep me"
    );

    let (code, err) = mount(&d.mnt);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already mounted by a running bifs"), "{err}");
    // The first daemon still serves its mount.
    d.bifs_ok(&["list"]);
    assert!(d.mnt.join(".raw").is_dir());
}

#[test]
fn a_disk_in_use_is_refused_naming_the_holder_and_freed_by_a_crash() {
    let mut d = Daemon::start();
    let other = tempfile::tempdir().unwrap();
    let mnt = other.path().join("mnt");
    let args = |mnt: &std::path::Path, disk: &std::path::Path| {
        vec![
            "mount".to_string(),
            "--mountpoint".into(),
            mnt.display().to_string(),
            "--disk".into(),
            disk.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let a = args(&mnt, &d.disk);
    let (code, err) = run_to_exit(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 2, "{err}");
    let pid = d.pid().unwrap();
    assert!(
        err.contains("in use by another bifs") && err.contains(&format!("pid {pid}")),
        "{err}"
    );
    assert!(!common::is_mounted(&mnt));
    // kill -9 releases the lock with the process: the restart takes the disk again.
    d.kill9();
    d.spawn();
    d.bifs_ok(&["list"]);
}

#[test]
fn a_missing_disk_and_the_same_disk_twice_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("mnt");
    let typo = base.path().join("dsik");
    let (code, err) = run_to_exit(&[
        "mount",
        "--mountpoint",
        mnt.to_str().unwrap(),
        "--disk",
        typo.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("does not exist") && err.contains("mkdir -p"),
        "{err}"
    );
    assert!(!typo.exists(), "a typo starts no new disk");

    let disk = base.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let again = format!("{}/../disk", disk.display());
    let (code, err) = run_to_exit(&[
        "mount",
        "--mountpoint",
        mnt.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
        "--disk",
        &again,
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("given twice"), "{err}");
    assert!(!common::is_mounted(&mnt));
}

#[test]
fn an_empty_or_missing_token_file_is_refused_at_start() {
    let base = tempfile::tempdir().unwrap();
    let (mnt, disk) = (base.path().join("mnt"), base.path().join("disk"));
    std::fs::create_dir_all(&disk).unwrap();
    let empty = base.path().join("token");
    std::fs::write(&empty, "\n").unwrap();
    let start = |token: &std::path::Path| {
        run_to_exit(&[
            "mount",
            "--mountpoint",
            mnt.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
        ])
    };
    let (code, err) = start(&empty);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is empty") && err.contains(empty.to_str().unwrap()),
        "{err}"
    );
    // A missing one names the file and what bifs was doing with it.
    let missing = base.path().join("no-token");
    let (code, err) = start(&missing);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot read the --token-file") && err.contains(missing.to_str().unwrap()),
        "{err}"
    );
    // The client refuses an empty token file too, before sending anything.
    let out = Command::new(BIN)
        .args(["list", "--server", "http://127.0.0.1:9", "--token-file"])
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is empty"), "{}", stderr(&out));
}

/// A tmpfs of its own, so the test can turn it read-only; unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn new(dir: &std::path::Path) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "bifs-admin-test"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(ok.success());
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, opt: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_disk_still_lists_and_serves_its_ready_images() {
    let origin = Origin::start();
    let data = random_bytes(2 * MIB, 306);
    origin.put("ro.raw", data.clone());
    let base = tempfile::tempdir().unwrap();
    let ro = base.path().join("ro");
    let tmpfs = Tmpfs::new(&ro);
    let mut d = Daemon::start_with(&["--disk", ro.to_str().unwrap()]);
    let uuid: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ro.join("bifs-disk.json")).unwrap()).unwrap();
    let uuid = uuid["uuid"].as_str().unwrap()[..8].to_string();
    d.bifs_ok(&[
        "create",
        "kept",
        "--url",
        &origin.url("ro.raw"),
        "--disk",
        &uuid,
    ]);
    d.wait_state("kept", "ready", Duration::from_secs(60));
    d.stop();
    tmpfs.remount("ro");
    d.spawn();
    let s = d.status("kept");
    assert_eq!(s["state"], "ready", "{s}");
    assert!(d.bifs_ok(&["list"]).contains("kept"));
    assert!(std::fs::read(d.path("kept")).unwrap() == data);
    // Nothing new goes onto it: a 4xx with the reason, not a raw 500.
    origin.put("new.raw", random_bytes(MIB, 307));
    let body = format!(
        r#"{{"name":"new","sourceType":"download","sourceParameters":{{"url":"{}"}},"disk":"{uuid}"}}"#,
        origin.url("new.raw")
    );
    let (code, resp) = curl(&format!(
        "-X POST -H 'Content-Type: application/json' -d '{body}' {}/v1/images",
        d.server
    ));
    assert_eq!(code, 409, "{resp}");
    assert!(resp.contains("read-only"), "{resp}");
    d.stop();
    tmpfs.remount("rw");
}
