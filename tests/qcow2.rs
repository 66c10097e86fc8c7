//! The QCOW2 guest view (`<mnt>/.raw/<name>`), checked through a real mount against a
//! real HTTP origin, with images made by qemu-img and mkfs.ext4 and read back by
//! qemu-img, cmp and the kernel's ext4 on a loop device.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::origin::{Fault, Origin};
use common::{assert_same, random_bytes, sh, sh_ok, sha512_hex, Daemon};

const MIB: u64 = 1024 * 1024;

fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        let got = f.read_at(&mut buf[n..], offset + n as u64)?;
        if got == 0 {
            break;
        }
        n += got;
    }
    buf.truncate(n);
    Ok(buf)
}

/// A loop mount of a file, unmounted on drop (also when the test fails half-way).
struct LoopMount {
    dir: PathBuf,
}

impl LoopMount {
    fn new(file: &Path, dir: &Path) -> LoopMount {
        std::fs::create_dir_all(dir).unwrap();
        sh_ok(&format!(
            "mount -o loop,ro {} {}",
            file.display(),
            dir.display()
        ));
        LoopMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// An ext4 filesystem of 64 MiB made with `mkfs.ext4 -d`, holding a random file (whose
/// SHA-512 is returned), a compressible text file and a small one.
fn make_ext4(dir: &Path) -> (PathBuf, String) {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    let blob = random_bytes(9 * MIB as usize + 4321, 21);
    std::fs::write(tree.join("blob.bin"), &blob).unwrap();
    let text: String = (0..120_000)
        .map(|i| format!("line {i} of a compressible file\n"))
        .collect();
    std::fs::write(tree.join("etc/text.txt"), text).unwrap();
    std::fs::write(tree.join("etc/hostname"), "bifs-test\n").unwrap();
    let raw = dir.join("ext4.raw");
    sh_ok(&format!(
        "truncate -s 64M {r} && mkfs.ext4 -q -F -d {t} {r}",
        r = raw.display(),
        t = tree.display()
    ));
    (raw, sha512_hex(&blob))
}

/// Publishes `file` on the origin and creates image `name` from it, without the fill so
/// it stays in progress until something reads it.
fn serve_image(origin: &Origin, d: &Daemon, file: &Path, name: &str) -> Vec<u8> {
    let data = std::fs::read(file).unwrap();
    let object = format!("{name}.qcow2");
    origin.put(&object, data.clone());
    d.bifs_ok(&["create", name, "--url", &origin.url(&object), "--no-fill"]);
    data
}

/// An ext4 image converted to compressed qcow2 and created as image `name` (no fill).
/// Returns the work dir, the raw original and the SHA-512 of the blob inside.
fn serve_compressed_ext4(origin: &Origin, d: &Daemon, name: &str) -> (PathBuf, PathBuf, String) {
    let work = work_dir(d);
    let (raw, blob_sum) = make_ext4(&work);
    let qcow = work.join(format!("{name}.qcow2"));
    sh_ok(&format!(
        "qemu-img convert -c -O qcow2 {} {}",
        raw.display(),
        qcow.display()
    ));
    serve_image(origin, d, &qcow, name);
    (work, raw, blob_sum)
}

#[test]
fn ext4_in_a_compressed_qcow2_is_readable_by_qemu_cmp_and_a_loop_mount() {
    let origin = Origin::start();
    let d = Daemon::start();
    let (work, raw, blob_sum) = serve_compressed_ext4(&origin, &d, "ext4");
    let s = d.status("ext4");
    assert_eq!(s["format"], "qcow2", "{s}");
    assert_eq!(s["virtualSize"], 64 * MIB, "{s}");

    // The stored bytes are a qcow2 that qemu-img understands while most is not fetched.
    let info = sh_ok(&format!("qemu-img info {}", d.path("ext4").display()));
    assert!(info.contains("file format: qcow2"), "{info}");
    assert!(info.contains("virtual size: 64 MiB"), "{info}");
    // (Whether qemu-img's reads and their readahead already fetched all of this small
    // image is a race: the state is not asserted here.)

    let cmp = sh_ok(&format!(
        "qemu-img compare {} {}",
        d.path("ext4").display(),
        raw.display()
    ));
    assert!(cmp.contains("Images are identical"), "{cmp}");

    let raw_view = d.raw_path("ext4");
    assert_eq!(std::fs::metadata(&raw_view).unwrap().len(), 64 * MIB);
    assert_same(&raw_view, &raw);

    let mnt = LoopMount::new(&raw_view, &work.join("loop"));
    let out = sh_ok(&format!("sha512sum {}", mnt.dir.join("blob.bin").display()));
    assert_eq!(out.split_whitespace().next(), Some(blob_sum.as_str()));
    let host = std::fs::read_to_string(mnt.dir.join("etc/hostname")).unwrap();
    assert_eq!(host, "bifs-test\n");
}

#[test]
fn a_qcow2_overlay_on_the_mounted_image_reads_back_the_original() {
    let origin = Origin::start();
    let d = Daemon::start();
    let (work, raw, _) = serve_compressed_ext4(&origin, &d, "base");
    let overlay = work.join("overlay.qcow2");
    sh_ok(&format!(
        "qemu-img create -f qcow2 -b {} -F qcow2 {}",
        d.path("base").display(),
        overlay.display()
    ));
    let cmp = sh_ok(&format!(
        "qemu-img compare {} {}",
        overlay.display(),
        raw.display()
    ));
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

#[test]
fn one_guest_block_of_a_1_gib_qcow2_fetches_only_its_metadata_and_cluster() {
    let origin = Origin::start();
    let d = Daemon::start();
    let work = work_dir(&d);
    let raw = work.join("big.raw");
    let qcow = work.join("big.qcow2");
    // AES-CTR over zeros: random-looking bytes at GB/s (urandom is slower).
    sh_ok(&format!(
        "openssl enc -aes-128-ctr -nosalt -pass pass:bifs -in /dev/zero 2>/dev/null \
         | head -c 1G > {r} && qemu-img convert -O qcow2 {r} {q}",
        r = raw.display(),
        q = qcow.display()
    ));
    let data = serve_image(&origin, &d, &qcow, "big");
    let stored = data.len() as u64;
    drop(data);
    let before = origin.served();

    let guest = 700 * MIB + 3 * 4096;
    let got = read_at(&d.raw_path("big"), guest, 4096).unwrap();
    assert_eq!(got, read_at(&raw, guest, 4096).unwrap());
    let fetched = origin.served() - before;
    eprintln!("one 4 KiB guest block: fetched {fetched} of {stored} bytes");
    assert!(
        fetched < stored / 20,
        "reading one 4 KiB guest block fetched {fetched} of {stored} bytes (limit 5%)"
    );
    assert_eq!(d.status("big")["state"], "in-progress");

    // The end of the disk: the last block, and a read that runs past it.
    let size = 1024 * MIB;
    let tail = read_at(&d.raw_path("big"), size - 4096, 4096).unwrap();
    assert_eq!(tail, read_at(&raw, size - 4096, 4096).unwrap());
    let across = read_at(&d.raw_path("big"), size - 1000, 8192).unwrap();
    assert_eq!(across.len(), 1000);
    assert_eq!(across, &tail[4096 - 1000..]);
    assert!(read_at(&d.raw_path("big"), size, 4096).unwrap().is_empty());
}

/// A scratch directory inside the daemon's temp dir.
fn work_dir(d: &Daemon) -> PathBuf {
    let work = d.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    work
}

/// Guest data for the variants: random, zeros and text, 24 MiB.
fn variant_base(dir: &Path) -> PathBuf {
    let mut data = random_bytes(8 * MIB as usize, 31);
    data.resize(16 * MIB as usize, 0);
    let text: Vec<u8> = (0..)
        .flat_map(|i| format!("{i:08} compressible text\n").into_bytes())
        .take(8 * MIB as usize)
        .collect();
    data.extend_from_slice(&text);
    let base = dir.join("base.raw");
    std::fs::write(&base, data).unwrap();
    base
}

#[test]
fn qcow2_variants_decode_like_qemu_img_convert() {
    let origin = Origin::start();
    let d = Daemon::start();
    let work = work_dir(&d);
    let base = variant_base(&work);
    let b = base.display();
    let w = work.display();
    let variants: Vec<(&str, String)> = vec![
        (
            "v2",
            format!("qemu-img convert -O qcow2 -o compat=0.10 {b} {w}/v2.qcow2"),
        ),
        (
            "v3",
            format!("qemu-img convert -O qcow2 -o compat=1.1 {b} {w}/v3.qcow2"),
        ),
        (
            "c2m",
            format!("qemu-img convert -O qcow2 -o cluster_size=2M {b} {w}/c2m.qcow2"),
        ),
        (
            "c4k",
            format!("qemu-img convert -O qcow2 -o cluster_size=4096 {b} {w}/c4k.qcow2"),
        ),
        (
            "c512",
            format!("qemu-img convert -O qcow2 -o cluster_size=512 {b} {w}/c512.qcow2"),
        ),
        (
            "zlib",
            format!("qemu-img convert -c -O qcow2 -o compression_type=zlib {b} {w}/zlib.qcow2"),
        ),
        (
            "zlib-v2",
            format!("qemu-img convert -c -O qcow2 -o compat=0.10 {b} {w}/zlib-v2.qcow2"),
        ),
        (
            "zlib-2m",
            format!("qemu-img convert -c -O qcow2 -o cluster_size=2M {b} {w}/zlib-2m.qcow2"),
        ),
        // Zero clusters (v3 zero flag), plain data and unallocated ranges.
        (
            "zeros",
            format!(
                "qemu-img create -q -f qcow2 {w}/zeros.qcow2 24M && qemu-io -f qcow2 \
             -c 'write -P 0x5a 0 8M' -c 'write -z 1M 2M' -c 'write -z -u 4M 1M' \
             -c 'write -P 0x33 12M 3M' -c 'write -z 13M 64k' {w}/zeros.qcow2"
            ),
        ),
        // A virtual size that is no multiple of the cluster size, with data at its end.
        (
            "odd",
            format!(
                "qemu-img create -q -f qcow2 {w}/odd.qcow2 25167360 && qemu-io -f qcow2 \
             -c 'write -P 0x77 25100288 67072' -c 'write -P 0x11 0 70000' {w}/odd.qcow2"
            ),
        ),
    ];
    for (name, make) in &variants {
        sh_ok(make);
        let qcow = work.join(format!("{name}.qcow2"));
        let want = work.join(format!("{name}.raw"));
        sh_ok(&format!(
            "qemu-img convert -O raw {} {}",
            qcow.display(),
            want.display()
        ));
        serve_image(&origin, &d, &qcow, name);
    }
    let map = sh_ok(&format!("qemu-img map --output=json {w}/zeros.qcow2"));
    assert!(
        map.contains("\"zero\": true, \"data\": false"),
        "the zeros variant has zero clusters: {map}"
    );
    for (name, _) in &variants {
        let want = work.join(format!("{name}.raw"));
        let raw_view = d.raw_path(name);
        assert_eq!(
            std::fs::metadata(&raw_view).unwrap().len(),
            std::fs::metadata(&want).unwrap().len(),
            "{name}: st_size is the virtual size"
        );
        assert_same(&raw_view, &want);
        // Unaligned reads across cluster boundaries, straight from the daemon each time.
        for (off, len) in [
            (65535u64, 3usize),
            (2 * MIB - 700, 5000),
            (MIB + 1, 200_000),
        ] {
            let got = read_at(&raw_view, off, len).unwrap();
            assert_eq!(
                got,
                read_at(&want, off, len).unwrap(),
                "{name} at {off}+{len}"
            );
        }
    }
    let odd = read_at(&d.raw_path("odd"), 25167360 - 700, 4096).unwrap();
    assert_eq!(odd, vec![0x77; 700]);
}

#[test]
fn unsupported_qcow2_features_fail_the_raw_view_only_and_say_why() {
    let origin = Origin::start();
    let d = Daemon::start();
    let work = work_dir(&d);
    let base = variant_base(&work);
    let b = base.display();
    let w = work.display();
    sh_ok(&format!(
        "qemu-img convert -c -O qcow2 -o compression_type=zstd {b} {w}/zstd.qcow2 && \
         qemu-img convert -O qcow2 -o extended_l2=on {b} {w}/l2x.qcow2 && \
         qemu-img create -q -f qcow2 -b {w}/zstd.qcow2 -F qcow2 {w}/child.qcow2"
    ));
    // A header qcow2-rs panics on (refcount_order 256 does not fit its u8): the decoder
    // thread dies, the daemon does not.
    sh_ok(&format!("qemu-img convert -O qcow2 {b} {w}/good.qcow2"));
    let mut bad = std::fs::read(work.join("good.qcow2")).unwrap();
    bad[96..100].copy_from_slice(&256u32.to_be_bytes());
    std::fs::write(work.join("panic.qcow2"), &bad).unwrap();

    let cases = [
        ("zstd", "zstd compression"),
        ("l2x", "extended L2"),
        (
            "child",
            "has a backing file of its own; a backing image must be self-contained",
        ),
        ("panic", "panicked"),
    ];
    let mut sums = Vec::new();
    for (name, _) in &cases {
        let data = serve_image(&origin, &d, &work.join(format!("{name}.qcow2")), name);
        sums.push(sha512_hex(&data));
    }
    serve_image(&origin, &d, &work.join("good.qcow2"), "good");

    for ((name, want), sum) in cases.iter().zip(&sums) {
        for _ in 0..2 {
            let e = read_at(&d.raw_path(name), 0, 4096).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
        }
        let (_, err, _) = sh(&format!(
            "getfattr -n user.bifs.error --only-values {}",
            d.path(name).display()
        ));
        assert!(
            err.contains(want),
            "{name}: error xattr {err:?} lacks {want:?}"
        );
        if *name != "panic" {
            assert!(
                err.contains("unsupported for the raw view") || *name == "child",
                "{err}"
            );
        }
        // The stored bytes are still served, and the image is not failed.
        let out = sh_ok(&format!("sha512sum {}", d.path(name).display()));
        assert_eq!(out.split_whitespace().next(), Some(sum.as_str()), "{name}");
        let s = d.status(name);
        assert_ne!(s["state"], "failed", "{name}: {s}");
        assert!(s["error"].as_str().unwrap().contains(want), "{s}");
    }
    // Other images' raw views are unaffected.
    assert_same(&d.raw_path("good"), &base);
    for (name, _) in &cases {
        d.wait_state(name, "ready", Duration::from_secs(60));
    }
    assert!(
        d.log().contains("raw view broken"),
        "the daemon logged the panic"
    );
}

#[test]
fn a_raw_read_the_origin_cannot_serve_gives_eio_and_a_later_one_succeeds() {
    let origin = Origin::start();
    // Readers ride out a failing source for --read-timeout before EIO.
    let d = Daemon::start_with(&["--read-timeout", "5s"]);
    let work = work_dir(&d);
    let base = variant_base(&work);
    let qcow = work.join("flaky.qcow2");
    sh_ok(&format!(
        "qemu-img convert -O qcow2 {} {}",
        base.display(),
        qcow.display()
    ));
    serve_image(&origin, &d, &qcow, "flaky");
    // Every request fails with a retryable status until the reader's fetch gives up.
    for _ in 0..100 {
        origin.fault(Fault::Status(503));
    }
    let e = read_at(&d.raw_path("flaky"), 8 * MIB, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let s = d.status("flaky");
    assert_eq!(
        s["error"], "",
        "a failed fetch is not a broken raw view: {s}"
    );
    assert_ne!(s["state"], "failed", "{s}");
    origin.clear_faults();
    let got = read_at(&d.raw_path("flaky"), 8 * MIB, 4096).unwrap();
    assert_eq!(got, read_at(&base, 8 * MIB, 4096).unwrap());
    assert_same(&d.raw_path("flaky"), &base);

    // Deleting the image ends its decoder thread.
    let pid = d.pid().unwrap();
    assert_eq!(decoder_threads(pid), 1);
    d.bifs_ok(&["delete", "flaky"]);
    common::wait_for("the decoder thread to end", Duration::from_secs(20), || {
        (decoder_threads(pid) == 0).then_some(())
    });
}

/// Threads of process `pid` that decode a qcow2 raw view.
fn decoder_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "bifs-qcow2")
        .count()
}

/// A `stat` of the raw view while `bifs create` still fetches the first block sees the
/// stored size (the format is not known yet); the kernel must not keep that size, so a
/// `stat` right after create returns shows the virtual size.
#[test]
fn the_raw_view_shows_the_virtual_size_as_soon_as_create_returns() {
    let origin = Origin::start();
    let d = Daemon::start();
    let work = work_dir(&d);
    let qcow = work.join("small.qcow2");
    sh_ok(&format!(
        "qemu-img create -q -f qcow2 {} 64M",
        qcow.display()
    ));
    let data = std::fs::read(&qcow).unwrap();
    origin.put("small.qcow2", data.clone());
    origin.set_chunk_delay(Duration::from_millis(700));
    let raw = d.raw_path("small");
    let early = std::thread::scope(|s| {
        let create = s.spawn(|| {
            d.bifs_ok(&[
                "create",
                "small",
                "--url",
                &origin.url("small.qcow2"),
                "--no-fill",
            ])
        });
        let early = common::wait_for("the raw view to appear", Duration::from_secs(10), || {
            std::fs::metadata(&raw).ok().map(|m| m.len())
        });
        create.join().unwrap();
        early
    });
    assert_eq!(
        early,
        data.len() as u64,
        "before the first block: the stored size"
    );
    let size = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(size, 64 * MIB, "right after create: the virtual size");
}
