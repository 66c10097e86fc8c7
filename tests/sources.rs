//! Sources beyond a plain download, end to end through the real binary and a real mount:
//! uploads (resumable, verified while received), exports from a volume (sparse raw,
//! compact qcow2) and compressed downloads (gzip, zstd), and the bad input around them.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::origin::Origin;
use common::{
    assert_same, random_bytes, sh, sh_ok, sha512_hex, stamped_image, tail, wait_for, Daemon, BIN,
};

const MIB: u64 = 1024 * 1024;

fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Bytes the image's data file takes on the cache disk.
fn allocated(d: &Daemon, name: &str) -> u64 {
    let data = d.disk.join("images").join(name).join("data");
    std::fs::metadata(&data).unwrap().blocks() * 512
}

/// A sparse volume file of `size` bytes with random data at `at` (1 MiB each) and 4 MiB
/// written as explicit zeros (allocated, but no data) at 40 MiB.
fn sparse_volume(path: &Path, size: u64, at: &[u64]) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, off) in at.iter().enumerate() {
        f.write_all_at(&random_bytes(MIB as usize, 100 + i as u64), *off)
            .unwrap();
    }
    f.write_all_at(&vec![0u8; 4 * MIB as usize], 40 * MIB)
        .unwrap();
    f.sync_all().unwrap();
}

fn run(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = d.bifs(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// No image on the daemon is ready.
fn none_ready(d: &Daemon) {
    let list: serde_json::Value = serde_json::from_str(&d.bifs_ok(&["list", "--json"])).unwrap();
    for s in list.as_array().unwrap() {
        assert_ne!(s["state"], "ready", "left behind as ready: {s}");
    }
}

#[test]
fn upload_of_an_odd_sized_file_is_ready_equal_verified_and_sparse() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    // 64 MiB and 1001 bytes, with 16 MiB of zeros in the middle.
    let size = 64 * MIB as usize + 1001;
    let mut data = random_bytes(size, 7);
    data[24 * MIB as usize..40 * MIB as usize].fill(0);
    std::fs::write(&file, &data).unwrap();
    let sum = sha512_hex(&data);
    // Limited so that the read of the end below starts before its bytes arrive.
    let child = Command::new(BIN)
        .args([
            "upload",
            "up",
            file.to_str().unwrap(),
            "--checksum",
            &sum,
            "--limit-rate",
            "32M",
        ])
        .env("BIFS_SERVER", &d.server)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Blocks received are readable at once; a read of the end waits for its bytes.
    let path = d.path("up");
    wait_for(
        "the image to appear in the mount",
        Duration::from_secs(20),
        || path.exists().then_some(()),
    );
    let tail_read = {
        let path = path.clone();
        std::thread::spawn(move || read_at(&path, size as u64 - 5000, 5000))
    };
    wait_for(
        "the first MiB to be received",
        Duration::from_secs(30),
        || (d.status("up")["bytesCached"].as_u64().unwrap() >= MIB).then_some(()),
    );
    assert_eq!(
        read_at(&path, 0, MIB as usize).unwrap(),
        &data[..MIB as usize]
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "upload failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&d.log(), 30)
    );
    assert_eq!(tail_read.join().unwrap().unwrap(), &data[size - 5000..]);
    assert!(stdout.contains(&format!("sent {size} bytes")), "{stdout}");
    // Piped: plain progress lines, not a bar.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("up: 100% (") && stderr.contains("/s, ETA"),
        "{stderr}"
    );
    let st = d.wait_state("up", "ready", Duration::from_secs(60));
    assert_eq!(st["size"].as_u64().unwrap(), size as u64);
    assert_eq!(st["checksum"].as_str().unwrap(), sum);
    assert_eq!(st["source"]["type"], "upload");
    assert_same(&path, &file);
    assert_same(&d.raw_path("up"), &file);
    // The 16 MiB of zeros are holes in the data file.
    let alloc = allocated(&d, "up");
    assert!(
        alloc < 52 * MIB,
        "{alloc} bytes allocated for 48 MiB of data"
    );
    // The same command again: nothing to send.
    let again = d.bifs_ok(&["upload", "up", file.to_str().unwrap()]);
    assert!(again.contains("ready"), "{again}");
}

#[test]
fn an_interrupted_upload_resumes_sending_only_the_rest() {
    let d = Daemon::start_with(&["--read-timeout", "3s"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.img");
    let size = 64 * MIB as usize;
    let data = random_bytes(size, 11);
    std::fs::write(&file, &data).unwrap();
    let f = file.to_str().unwrap();
    let mut child = Command::new(BIN)
        .args(["upload", "res", f, "--limit-rate", "16M"])
        .env("BIFS_SERVER", &d.server)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("a quarter to be received", Duration::from_secs(60), || {
        // The client creates the image first: until then there is no status.
        let out = d.bifs(&["status", "res", "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (s["bytesCached"].as_u64()? >= 16 * MIB).then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let cached = d.status("res")["bytesCached"].as_u64().unwrap();
    assert!(
        cached < size as u64,
        "the upload finished before it was killed"
    );
    assert_eq!(
        read_at(&d.path("res"), 0, MIB as usize).unwrap(),
        &data[..MIB as usize]
    );
    // A read of a block not received fails (EIO) after --read-timeout; once the upload
    // is idle, the log says that none is in progress.
    wait_for(
        "reads to say no upload is in progress",
        Duration::from_secs(60),
        || {
            let e = read_at(&d.path("res"), size as u64 - 4096, 4096).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
            d.log().contains("no upload is in progress").then_some(())
        },
    );
    assert_ne!(d.status("res")["state"], "failed");

    let out = d.bifs(&["upload", "res", f]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    let sent: u64 = stdout
        .split("sent ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {stdout}"));
    assert!(
        sent <= size as u64 - cached && sent > 0,
        "sent {sent} bytes again; {cached} of {size} were received before"
    );
    assert!(stderr.contains("already"), "{stderr}");
    let st = d.wait_state("res", "ready", Duration::from_secs(60));
    assert_eq!(st["checksum"].as_str().unwrap(), sha512_hex(&data));
    assert_same(&d.path("res"), &file);
}

#[test]
fn an_upload_with_a_wrong_checksum_fails_and_reads_eio() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("small.img");
    std::fs::write(&file, random_bytes(5 * MIB as usize + 7, 3)).unwrap();
    let wrong = "ab".repeat(64);
    let (rc, out, err) = run(
        &d,
        &[
            "upload",
            "bad",
            file.to_str().unwrap(),
            "--checksum",
            &wrong,
        ],
    );
    assert_eq!(rc, 1, "{out}{err}");
    assert!(err.contains("checksum"), "{err}");
    let st = d.status("bad");
    assert_eq!(st["state"], "failed");
    assert!(st["error"].as_str().unwrap().contains("checksum"), "{st}");
    let e = read_at(&d.path("bad"), 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
}

#[test]
fn raw_export_of_a_sparse_volume_is_equal_and_sparse() {
    let d = Daemon::start();
    let vol = d.dir.path().join("vol.raw");
    sparse_volume(&vol, 256 * MIB, &[0, 100 * MIB + 12345, 255 * MIB]);
    let v = vol.to_str().unwrap();
    let out = d.bifs_ok(&["create", "vraw", "--from-volume", v, "--export-type", "raw"]);
    assert!(out.contains("vraw"), "{out}");
    let st = d.wait_state("vraw", "ready", Duration::from_secs(120));
    assert_eq!(st["size"].as_u64().unwrap(), 256 * MIB);
    assert_eq!(st["source"]["type"], "export-from-volume");
    assert_eq!(
        st["checksum"].as_str().unwrap(),
        sha512_hex(&std::fs::read(&vol).unwrap())
    );
    assert_same(&d.path("vraw"), &vol);
    assert_same(&d.raw_path("vraw"), &vol);
    // 3 MiB of data (4 blocks' worth of slack at the unaligned one); the 4 MiB of
    // written zeros and the holes take nothing.
    let alloc = allocated(&d, "vraw");
    assert!(
        alloc <= 4 * MIB,
        "{alloc} bytes allocated for 3 MiB of data"
    );
}

#[test]
fn qcow2_export_checks_clean_compares_identical_and_is_small() {
    let d = Daemon::start();
    let vol = d.dir.path().join("vol.raw");
    sparse_volume(&vol, 256 * MIB, &[0, 100 * MIB + 12345, 255 * MIB]);
    // The YAML form.
    let yaml = d.dir.path().join("export.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: vq\nspec:\n  \
             sourceType: export-from-volume\n  sourceParameters:\n    path: {}\n    export-type: qcow2\n",
            vol.display()
        ),
    )
    .unwrap();
    d.bifs_ok(&["apply", "-f", yaml.to_str().unwrap()]);
    let st = d.wait_state("vq", "ready", Duration::from_secs(120));
    assert_eq!(st["format"], "qcow2");
    let size = st["size"].as_u64().unwrap();
    assert!(
        size < 5 * MIB,
        "the qcow2 export is {size} bytes for 3 MiB of data"
    );
    let img = d.path("vq");
    let check = sh_ok(&format!("qemu-img check -f qcow2 {}", img.display()));
    assert!(check.contains("No errors were found"), "{check}");
    let cmp = sh_ok(&format!(
        "qemu-img compare -f raw -F qcow2 {} {}",
        vol.display(),
        img.display()
    ));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    assert_same(&d.raw_path("vq"), &vol);
}

/// A compressed copy of `data` made by `tool` (gzip -c, zstd -c, xz -c).
fn compress(dir: &Path, data: &[u8], tool: &str, suffix: &str) -> Vec<u8> {
    let plain = dir.join("plain.img");
    std::fs::write(&plain, data).unwrap();
    let out: PathBuf = dir.join(format!("plain.img.{suffix}"));
    sh_ok(&format!(
        "{tool} -c -q {} > {}",
        plain.display(),
        out.display()
    ));
    std::fs::read(out).unwrap()
}

#[test]
fn gzip_zstd_and_xz_downloads_decompress_and_a_read_near_the_end_waits() {
    let d = Daemon::start();
    let origin = Origin::start();
    let dir = tempfile::tempdir().unwrap();
    let data = stamped_image(64 * MIB as usize, 21);
    for (tool, suffix) in [("gzip", "gz"), ("zstd", "zst")] {
        origin.put(
            &format!("disk.raw.{suffix}"),
            compress(dir.path(), &data, tool, suffix),
        );
    }
    // Slow bodies: the reads of the end below are issued before the stream reaches them.
    origin.set_chunk_delay(Duration::from_millis(1));
    for suffix in ["gz", "zst"] {
        let name = format!("c-{suffix}");
        d.bifs_ok(&[
            "create",
            &name,
            "--url",
            &origin.url(&format!("disk.raw.{suffix}")),
            "--checksum",
            &sha512_hex(&data),
        ]);
        let end = data.len() as u64 - 3 * MIB;
        // The stream has not reached these bytes yet: the read below waits for them.
        let cached = d.status(&name)["bytesCached"].as_u64().unwrap();
        assert!(cached < end, "{name}: {cached} bytes cached already");
        let got = read_at(&d.path(&name), end, MIB as usize).unwrap();
        assert!(
            got == data[end as usize..(end + MIB) as usize],
            "{name}: wrong bytes near the end"
        );
    }
    origin.set_chunk_delay(Duration::ZERO);
    // xz from a URL without a suffix, named by `compression`, its size given: no pass.
    origin.put("disk-xz", compress(dir.path(), &data, "xz -T0", "xz"));
    let yaml = dir.path().join("xz.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: c-xz\nspec:\n  \
             sourceType: download\n  sourceParameters:\n    url: {}\n    compression: xz\n    \
             size: \"{}\"\n  checksum: {}\n",
            origin.url("disk-xz"),
            data.len(),
            sha512_hex(&data)
        ),
    )
    .unwrap();
    d.bifs_ok(&["apply", "-f", yaml.to_str().unwrap()]);
    // zstd says its size in its frame header; gzip's size took one full pass.
    let passes = d.log().matches("reading the whole body once").count();
    assert_eq!(passes, 1, "{}", tail(&d.log(), 30));
    for suffix in ["gz", "zst", "xz"] {
        let name = format!("c-{suffix}");
        let st = d.wait_state(&name, "ready", Duration::from_secs(120));
        assert_eq!(st["size"].as_u64().unwrap(), data.len() as u64);
        assert_eq!(st["format"], "raw");
        let plain = dir.path().join("plain.img");
        assert_same(&d.path(&name), &plain);
    }
}

#[test]
fn bad_input_fails_with_the_right_exit_code_and_leaves_nothing_ready() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let m = missing.to_str().unwrap();
    let dir_s = dir.path().to_str().unwrap();

    let (rc, _, err) = run(&d, &["upload", "u1", m]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    let (rc, _, err) = run(&d, &["upload", "u1", dir_s]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("is a directory"), "{err}");
    let (rc, _, err) = run(
        &d,
        &["create", "e1", "--from-volume", m, "--export-type", "raw"],
    );
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    let (rc, _, err) = run(
        &d,
        &[
            "create",
            "e1",
            "--from-volume",
            dir_s,
            "--export-type",
            "raw",
        ],
    );
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("directory"), "{err}");

    let vol = dir.path().join("vol.raw");
    sparse_volume(&vol, 64 * MIB, &[0, 63 * MIB]);
    let v = vol.to_str().unwrap();
    let (rc, _, err) = run(
        &d,
        &["create", "e1", "--from-volume", v, "--export-type", "vmdk"],
    );
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("vmdk"), "{err}");
    // The API refuses it too (a spec from a program, not the CLI).
    let yaml = dir.path().join("bad.yaml");
    std::fs::write(
        &yaml,
        format!(
            "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: e2\nspec:\n  \
             sourceType: export-from-volume\n  sourceParameters:\n    path: {v}\n    export-type: vmdk\n"
        ),
    )
    .unwrap();
    let (rc, _, err) = run(&d, &["apply", "-f", yaml.to_str().unwrap()]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("raw or qcow2"), "{err}");

    // A volume that shrinks during the export: the image fails and says why.
    d.bifs_ok(&[
        "create",
        "shrink",
        "--from-volume",
        v,
        "--export-type",
        "raw",
        "--no-fill",
    ]);
    File::options()
        .write(true)
        .open(&vol)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    d.bifs_ok(&["fill", "shrink"]);
    let st = wait_for("the shrunk export to fail", Duration::from_secs(60), || {
        let s = d.status("shrink");
        (s["state"] == "failed").then_some(s)
    });
    let msg = st["error"].as_str().unwrap();
    assert!(
        msg.contains("volume size") && msg.contains("67108864"),
        "{msg}"
    );
    let e = read_at(&d.path("shrink"), 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");

    // Corrupt compressed streams: gzip (size learnt by a full pass, so create fails and
    // creates nothing) and zstd (size in its frame header: the image fails as it streams).
    let origin = Origin::start();
    let data = random_bytes(8 * MIB as usize, 5);
    for (tool, suffix) in [("gzip", "gz"), ("zstd", "zst")] {
        let mut body = compress(dir.path(), &data, tool, suffix);
        let mid = body.len() / 2;
        for b in &mut body[mid..mid + 64] {
            *b ^= 0x5a;
        }
        origin.put(&format!("bad.raw.{suffix}"), body);
    }
    let (rc, _, err) = run(&d, &["create", "cgz", "--url", &origin.url("bad.raw.gz")]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("gzip stream is corrupt"), "{err}");
    let (rc, _, _) = run(&d, &["status", "cgz"]);
    assert_ne!(rc, 0, "a corrupt gzip left an image behind");
    let (rc, _, err) = run(&d, &["create", "czst", "--url", &origin.url("bad.raw.zst")]);
    if rc == 0 {
        let st = wait_for("the corrupt zstd to fail", Duration::from_secs(60), || {
            let s = d.status("czst");
            (s["state"] == "failed").then_some(s)
        });
        assert!(st["error"].as_str().unwrap().contains("zstd"), "{st}");
    } else {
        assert_eq!(rc, 1, "{err}");
        assert!(err.contains("zstd"), "{err}");
    }
    none_ready(&d);
}

#[test]
fn an_export_by_volume_name_looks_in_the_volumes_dir() {
    let vols = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(&["--volumes-dir", vols.path().to_str().unwrap()]);
    let vol = vols.path().join("pvc-1234");
    sparse_volume(&vol, 48 * MIB, &[MIB, 47 * MIB]);
    let yaml = d.dir.path().join("byname.yaml");
    std::fs::write(
        &yaml,
        "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: byname\nspec:\n  \
         sourceType: export-from-volume\n  sourceParameters:\n    volume-name: pvc-1234\n    export-type: raw\n",
    )
    .unwrap();
    d.bifs_ok(&["apply", "-f", yaml.to_str().unwrap()]);
    let st = d.wait_state("byname", "ready", Duration::from_secs(60));
    assert_eq!(st["source"]["parameters"]["volume-name"], "pvc-1234");
    assert_same(&d.path("byname"), &vol);
    // A name that is not in the volumes dir: nothing to create it from.
    let missing = d.dir.path().join("missing.yaml");
    std::fs::write(
        &missing,
        "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: nothere\nspec:\n  \
         sourceType: export-from-volume\n  sourceParameters:\n    volume-name: pvc-none\n    export-type: raw\n",
    )
    .unwrap();
    let (rc, _, err) = run(&d, &["apply", "-f", missing.to_str().unwrap()]);
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains("pvc-none") && err.contains("does not exist"),
        "{err}"
    );
    none_ready_named(&d, "nothere");
}

/// `name` is not on the daemon, or not ready.
fn none_ready_named(d: &Daemon, name: &str) {
    let (rc, out, _) = run(d, &["status", name, "--json"]);
    if rc == 0 {
        assert!(!out.contains("\"ready\""), "{out}");
    }
}

#[test]
fn zero_blocks_of_a_plain_download_stay_holes() {
    let d = Daemon::start();
    let origin = Origin::start();
    let mut data = random_bytes(32 * MIB as usize, 9);
    data[4 * MIB as usize..28 * MIB as usize].fill(0);
    origin.put("z.raw", data.clone());
    d.bifs_ok(&[
        "create",
        "z",
        "--url",
        &origin.url("z.raw"),
        "--checksum",
        &sha512_hex(&data),
    ]);
    d.wait_state("z", "ready", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("z.raw");
    std::fs::write(&plain, &data).unwrap();
    assert_same(&d.path("z"), &plain);
    let alloc = allocated(&d, "z");
    assert!(
        alloc <= 9 * MIB,
        "{alloc} bytes allocated for 8 MiB of data"
    );
}

/// A loop device over a file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn new(file: &Path) -> LoopDevice {
        let dev = sh_ok(&format!("losetup -f --show {}", file.display()));
        LoopDevice(dev.trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn exports_of_a_block_device_are_equal_raw_and_compact_qcow2() {
    let d = Daemon::start();
    let file = d.dir.path().join("blockdev.img");
    sparse_volume(&file, 64 * MIB, &[2 * MIB, 60 * MIB]);
    let dev = LoopDevice::new(&file);
    d.bifs_ok(&[
        "create",
        "bdraw",
        "--from-volume",
        &dev.0,
        "--export-type",
        "raw",
    ]);
    d.bifs_ok(&[
        "create",
        "bdq",
        "--from-volume",
        &dev.0,
        "--export-type",
        "qcow2",
    ]);
    let st = d.wait_state("bdraw", "ready", Duration::from_secs(60));
    assert_eq!(st["size"].as_u64().unwrap(), 64 * MIB);
    assert_same(&d.path("bdraw"), &file);
    // A block device has no holes to ask about: its zero blocks are found by reading,
    // and neither export stores them.
    let alloc = allocated(&d, "bdraw");
    assert!(
        alloc <= 3 * MIB,
        "{alloc} bytes allocated for 2 MiB of data"
    );
    let st = d.wait_state("bdq", "ready", Duration::from_secs(60));
    assert!(st["size"].as_u64().unwrap() < 4 * MIB, "{st}");
    let cmp = sh_ok(&format!(
        "qemu-img compare -f raw -F qcow2 {} {}",
        file.display(),
        d.path("bdq").display()
    ));
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

#[test]
fn an_upload_resumes_after_the_daemon_is_killed() {
    let mut d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crash.img");
    let size = 32 * MIB as usize + 513;
    let data = random_bytes(size, 31);
    std::fs::write(&file, &data).unwrap();
    let f = file.to_str().unwrap();
    let mut child = Command::new(BIN)
        .args(["upload", "crash", f, "--limit-rate", "8M"])
        .env("BIFS_SERVER", &d.server)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "some blocks to be received",
        Duration::from_secs(60),
        || {
            let out = d.bifs(&["status", "crash", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (s["bytesCached"].as_u64()? >= 8 * MIB).then_some(())
        },
    );
    d.kill9();
    let _ = child.wait();
    sh(&format!("umount -l {}", d.mnt.display()));
    d.spawn();
    let st = d.status("crash");
    assert_ne!(st["state"], "ready");
    let out = d.bifs(&["upload", "crash", f]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&d.log(), 30)
    );
    let st = d.wait_state("crash", "ready", Duration::from_secs(60));
    assert_eq!(st["checksum"].as_str().unwrap(), sha512_hex(&data));
    assert_same(&d.path("crash"), &file);
}
