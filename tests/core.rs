//! The core issue's promises, checked through a real mount of the real binary against a
//! real HTTP origin on 127.0.0.1.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::origin::{Fault, Origin};
use common::{random_bytes, sh, sha512_hex, Daemon};

const MIB: usize = 1024 * 1024;

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

#[test]
fn reads_right_after_create_return_the_source_bytes() {
    let origin = Origin::start();
    let data = random_bytes(24 * MIB + 12345, 1);
    origin.put("parrot.raw", data.clone());
    let d = Daemon::start();
    let sum = sha512_hex(&data);
    d.bifs_ok(&[
        "create",
        "parrot",
        "--url",
        &origin.url("parrot.raw"),
        "--checksum",
        &sum,
    ]);
    let p = d.path("parrot");
    // Scattered reads first, from the end backwards: whatever order, the right bytes.
    for off in [
        data.len() as u64 - 100,
        20 * MIB as u64 + 7,
        3,
        5 * MIB as u64 - 1,
    ] {
        let got = read_at(&p, off, 5000).unwrap();
        let end = (off as usize + 5000).min(data.len());
        assert_eq!(got, &data[off as usize..end], "bytes at {off}");
    }
    assert_eq!(std::fs::metadata(&p).unwrap().len(), data.len() as u64);
    let local = d.dir.path().join("local.raw");
    std::fs::write(&local, &data).unwrap();
    let (rc, _, err) = sh(&format!("cmp {} {}", p.display(), local.display()));
    assert_eq!(rc, 0, "cmp: {err}");
    let (rc, out, _) = sh(&format!("sha512sum {}", p.display()));
    assert_eq!(rc, 0);
    assert_eq!(out.split_whitespace().next().unwrap(), sum);
    // The raw view of a RAW image is the same bytes.
    let (rc, _, err) = sh(&format!(
        "cmp {} {}",
        d.raw_path("parrot").display(),
        local.display()
    ));
    assert_eq!(rc, 0, "cmp raw view: {err}");
}

#[test]
fn image_reaches_ready_with_every_status_field() {
    let origin = Origin::start();
    let data = random_bytes(8 * MIB, 2);
    origin.put("a.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&["create", "alpha", "--url", &origin.url("a.raw")]);
    let s = d.wait_state("alpha", "ready", Duration::from_secs(60));
    for field in [
        "name",
        "format",
        "size",
        "state",
        "progress",
        "bytesCached",
        "checksum",
        "source",
        "disk",
        "path",
        "rawPath",
        "error",
    ] {
        assert!(s.get(field).is_some(), "status lacks {field}: {s}");
    }
    assert_eq!(s["progress"], 100);
    assert_eq!(s["size"], data.len() as u64);
    assert_eq!(s["bytesCached"], data.len() as u64);
    assert_eq!(s["format"], "raw");
    assert_eq!(s["source"]["type"], "download");
    assert_eq!(s["source"]["parameters"]["url"], origin.url("a.raw"));
    assert_eq!(s["disk"]["uuid"].as_str().unwrap().len(), 36);
    // No checksum given: the computed one is recorded.
    assert_eq!(s["checksum"], sha512_hex(&data));
    assert_eq!(s["path"], d.path("alpha").display().to_string());
    let (rc, out, _) = sh(&format!("getfattr -d -m - {}", d.path("alpha").display()));
    assert_eq!(rc, 0);
    assert!(out.contains("user.bifs.state=\"ready\""), "{out}");
    assert!(out.contains("user.bifs.progress=\"100\""), "{out}");
    assert!(out.contains("user.bifs.format=\"raw\""), "{out}");
    // No security labels, no ACLs: EOPNOTSUPP, so `ls -l` stops asking after one file.
    let errno_of = |name: &str| {
        let path = std::ffi::CString::new(d.path("alpha").to_str().unwrap()).unwrap();
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: NUL-terminated strings; a null buffer of size 0 asks for the length only.
        let r = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        assert_eq!(r, -1);
        std::io::Error::last_os_error().raw_os_error().unwrap()
    };
    assert_eq!(errno_of("security.selinux"), libc::EOPNOTSUPP);
    assert_eq!(errno_of("system.posix_acl_access"), libc::EOPNOTSUPP);
    assert_eq!(errno_of("user.bifs.nothing"), libc::ENODATA);
    let list = d.bifs_ok(&["list"]);
    assert!(list.contains("alpha") && list.contains("ready"), "{list}");
    // After ready the reads go through passthrough / page cache and stay right.
    let got = std::fs::read(d.path("alpha")).unwrap();
    assert!(got == data);
}

#[test]
fn wrong_checksum_fails_the_image_and_reads_give_eio() {
    let origin = Origin::start();
    let data = random_bytes(4 * MIB, 3);
    origin.put("w.raw", data.clone());
    let d = Daemon::start();
    let wrong = sha512_hex(b"something else");
    d.bifs_ok(&[
        "create",
        "wrong",
        "--url",
        &origin.url("w.raw"),
        "--checksum",
        &wrong,
    ]);
    let out = d.bifs(&["status", "wrong", "--wait", "ready", "--timeout", "60s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "status --wait ready of a failed image exits 1"
    );
    let s = d.status("wrong");
    assert_eq!(s["state"], "failed");
    let err = s["error"].as_str().unwrap();
    assert!(
        err.contains(&wrong) && err.contains(&sha512_hex(&data)),
        "error names both digests: {err}"
    );
    let e = read_at(&d.path("wrong"), 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let (_, out, _) = sh(&format!(
        "getfattr -n user.bifs.error --only-values {}",
        d.path("wrong").display()
    ));
    assert!(out.contains("checksum mismatch"), "{out}");
}

#[test]
fn a_killed_daemon_resumes_without_refetching_what_it_had() {
    let origin = Origin::start();
    let size = 32 * MIB;
    let data = random_bytes(size, 4);
    origin.put("k.raw", data.clone());
    origin.set_chunk_delay(Duration::from_millis(4));
    let mut d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "kill",
        "--url",
        &origin.url("k.raw"),
        "--checksum",
        &sha512_hex(&data),
    ]);
    common::wait_for("a third of the image", Duration::from_secs(60), || {
        (d.status("kill")["progress"].as_u64().unwrap() >= 35).then_some(())
    });
    // Let the flusher make at least one pass over what landed.
    std::thread::sleep(Duration::from_millis(700));
    d.kill9();
    let (_, _, err) = sh(&format!("ls {}", d.mnt.display()));
    assert!(
        err.contains("not connected"),
        "a killed daemon leaves a stale mount: {err}"
    );
    origin.set_chunk_delay(Duration::ZERO);
    d.spawn(); // clears the stale mount, reopens the disk
    let s = d.wait_state("kill", "ready", Duration::from_secs(60));
    assert_eq!(s["progress"], 100);
    let served = origin.served();
    assert!(
        served <= size as u64 * 5 / 4,
        "fetched {served} bytes over both runs for a {size}-byte image (limit 1.25x)"
    );
    assert!(std::fs::read(d.path("kill")).unwrap() == data);
}

#[test]
fn a_source_that_changes_mid_fill_fails_the_image_and_mixes_nothing() {
    let origin = Origin::start();
    let old = random_bytes(32 * MIB, 5);
    origin.put("c.raw", old.clone());
    origin.set_chunk_delay(Duration::from_millis(30));
    let d = Daemon::start();
    d.bifs_ok(&["create", "changing", "--url", &origin.url("c.raw")]);
    let head = read_at(&d.path("changing"), 0, 65536).unwrap();
    assert_eq!(head, &old[..65536]);
    let new = random_bytes(32 * MIB, 6);
    origin.put("c.raw", new.clone());
    origin.set_chunk_delay(Duration::ZERO);
    let s = common::wait_for("the image to fail", Duration::from_secs(60), || {
        let s = d.status("changing");
        (s["state"] == "failed").then_some(s)
    });
    assert!(
        s["error"].as_str().unwrap().contains("source changed"),
        "{s}"
    );
    // Every read now fails; none returns bytes of the new version.
    for off in [0u64, 8 * MIB as u64, 32 * MIB as u64 - 4096] {
        match read_at(&d.path("changing"), off, 4096) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
            Ok(b) => assert_eq!(
                b,
                &old[off as usize..off as usize + b.len()],
                "served bytes not of the old version at {off}"
            ),
        }
    }
    let e = File::open(d.path("changing"))
        .and_then(|mut f| f.read(&mut [0u8; 10]))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}

#[test]
fn unreachable_and_missing_sources_give_clear_errors_and_create_nothing() {
    let origin = Origin::start();
    let d = Daemon::start();
    let out = d.bifs(&["create", "missing", "--url", &origin.url("nope.raw")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("check the URL"),
        "{err}"
    );
    // Nothing listens on port 9 of loopback: connection refused.
    let out = d.bifs(&["create", "down", "--url", "http://127.0.0.1:9/x.raw"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach source"), "{err}");
    origin.fault(Fault::Status(403));
    origin.put("forbidden.raw", vec![1u8; 1000]);
    let out = d.bifs(&["create", "forbidden", "--url", &origin.url("forbidden.raw")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    let list: serde_json::Value = serde_json::from_str(&d.bifs_ok(&["list", "--json"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        0,
        "failed creates left images behind: {list}"
    );
    assert_eq!(
        std::fs::read_dir(&d.mnt).unwrap().count(),
        1,
        "only .raw in the mount"
    );
}

#[test]
fn transient_faults_are_retried_and_the_image_still_verifies() {
    let origin = Origin::start();
    let data = random_bytes(12 * MIB, 7);
    origin.put("t.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "flaky",
        "--url",
        &origin.url("t.raw"),
        "--checksum",
        &sha512_hex(&data),
        "--no-fill",
    ]);
    // The create's probe and first block are done; now the fill meets a reset, a 503 and a slow reply.
    origin.fault(Fault::Truncate(100_000));
    origin.fault(Fault::Status(503));
    origin.fault(Fault::Delay(Duration::from_millis(500)));
    d.bifs_ok(&["fill", "flaky"]);
    d.wait_state("flaky", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("flaky")).unwrap() == data);
    assert!(
        d.log().contains("retrying"),
        "the daemon logged its retries"
    );
}

#[test]
fn a_failing_image_leaves_the_others_served() {
    let origin = Origin::start();
    let good = random_bytes(4 * MIB, 8);
    origin.put("good.raw", good.clone());
    origin.put("bad.raw", random_bytes(16 * MIB, 9));
    let d = Daemon::start();
    d.bifs_ok(&["create", "good", "--url", &origin.url("good.raw")]);
    d.wait_state("good", "ready", Duration::from_secs(60));
    d.bifs_ok(&[
        "create",
        "bad",
        "--url",
        &origin.url("bad.raw"),
        "--no-fill",
    ]);
    origin.remove("bad.raw");
    d.bifs_ok(&["fill", "bad"]);
    let s = common::wait_for("bad to fail", Duration::from_secs(60), || {
        let s = d.status("bad");
        (s["state"] == "failed").then_some(s)
    });
    assert!(s["error"].as_str().unwrap().contains("404"), "{s}");
    assert!(std::fs::read(d.path("good")).unwrap() == good);
    assert_eq!(d.status("good")["state"], "ready");
}

#[test]
fn bad_input_exits_2_names_the_problem_and_creates_nothing() {
    let origin = Origin::start();
    origin.put("x.raw", vec![0u8; 4096]);
    let d = Daemon::start();
    let url = origin.url("x.raw");
    let long = "a".repeat(300);
    let nonhex = "g".repeat(128);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", "../x", "--url", &url], "invalid image name"),
        (vec!["create", "A", "--url", &url], "invalid image name"),
        (vec!["create", &long, "--url", &url], "300 characters"),
        (
            vec!["create", "ok", "--url", "ftp://127.0.0.1/x.raw"],
            "not supported",
        ),
        (vec!["create", "ok", "--url", "not a url"], "invalid URL"),
        (
            vec!["create", "ok", "--url", &url, "--checksum", "abc123"],
            "128 hex digits",
        ),
        (
            vec!["create", "ok", "--url", &url, "--checksum", &nonhex],
            "128 hex digits",
        ),
        (vec!["status", "Bad_Name"], "invalid image name"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, want) in cases {
        let out = d.bifs(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
    // The API refuses the same input on its own (for programs that skip the CLI).
    let (rc, out, _) = sh(&format!(
        "curl -s -o /dev/stdout -w ' %{{http_code}}' -X POST -H 'content-type: application/json' \
         -d '{{\"name\":\"../x\",\"sourceType\":\"download\",\"sourceParameters\":{{\"url\":\"{url}\"}}}}' {}/v1/images",
        d.server
    ));
    assert_eq!(rc, 0);
    assert!(
        out.ends_with(" 400") && out.contains("invalid image name"),
        "{out}"
    );
    let list: serde_json::Value = serde_json::from_str(&d.bifs_ok(&["list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);
    // An existing name with another spec is refused and names the field; the same spec is a no-op.
    d.bifs_ok(&["create", "ok", "--url", &url]);
    d.bifs_ok(&["create", "ok", "--url", &url]);
    origin.put("y.raw", vec![0u8; 4096]);
    let out = d.bifs(&["create", "ok", "--url", &origin.url("y.raw")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sourceParameters"));
    let out = d.bifs(&["status", "nothere"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image named"));
}

#[test]
fn eight_concurrent_random_readers_during_the_fill_all_get_the_right_bytes() {
    let origin = Origin::start();
    let size = 32 * MIB;
    let data = std::sync::Arc::new(random_bytes(size, 10));
    origin.put("r.raw", data.to_vec());
    origin.set_chunk_delay(Duration::from_micros(500));
    let d = Daemon::start();
    d.bifs_ok(&["create", "conc", "--url", &origin.url("r.raw")]);
    let path = d.path("conc");
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (data, path) = (data.clone(), path.clone());
            std::thread::spawn(move || {
                let f = File::open(&path).unwrap();
                let mut x = t * 7919 + 1;
                for _ in 0..150 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 20) % size as u64;
                    let len = 1 + ((x >> 8) % 200_000) as usize;
                    let mut buf = vec![0u8; len];
                    let n = f.read_at(&mut buf, off).unwrap();
                    let want = &data[off as usize..(off as usize + len).min(size)];
                    assert_eq!(n, want.len());
                    assert!(
                        &buf[..n] == want,
                        "reader {t} got wrong bytes at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    origin.set_chunk_delay(Duration::ZERO);
    d.wait_state("conc", "ready", Duration::from_secs(60));
}

#[test]
fn writes_truncates_and_creates_fail_with_erofs() {
    let origin = Origin::start();
    origin.put("ro.raw", random_bytes(MIB, 11));
    let d = Daemon::start();
    d.bifs_ok(&["create", "ro", "--url", &origin.url("ro.raw")]);
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(
        OpenOptions::new().write(true).open(d.path("ro")).map(drop),
        "open for write",
    );
    erofs(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.path("ro"))
            .map(drop),
        "open read-write",
    );
    erofs(File::create(d.mnt.join("new")).map(drop), "create");
    erofs(std::fs::create_dir(d.mnt.join("dir")), "mkdir");
    erofs(std::fs::remove_file(d.path("ro")), "unlink");
    erofs(
        OpenOptions::new()
            .write(true)
            .open(d.path("ro"))
            .and_then(|f| f.set_len(0)),
        "truncate",
    );
    let (rc, _, err) = sh(&format!(
        "dd if=/dev/zero of={} bs=4k count=1 conv=notrunc",
        d.path("ro").display()
    ));
    assert_ne!(rc, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    // The image is unchanged.
    let mut f = File::open(d.path("ro")).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut b = vec![0u8; 16];
    f.read_exact(&mut b).unwrap();
    assert_eq!(b, random_bytes(16, 11));
}

#[test]
fn sigterm_unmounts_cleanly_and_a_restart_serves_ready_images_at_once() {
    let origin = Origin::start();
    let data = random_bytes(2 * MIB, 12);
    origin.put("s.raw", data.clone());
    let mut d = Daemon::start();
    d.bifs_ok(&["create", "stay", "--url", &origin.url("s.raw")]);
    d.wait_state("stay", "ready", Duration::from_secs(60));
    d.stop();
    assert!(
        !common::is_mounted(&d.mnt),
        "SIGTERM leaves no mount behind"
    );
    drop(origin); // the origin is gone: a ready image needs nothing from it
    d.spawn();
    assert_eq!(d.status("stay")["state"], "ready");
    assert!(std::fs::read(d.path("stay")).unwrap() == data);
}

#[test]
fn a_server_without_range_support_still_serves_the_image() {
    let origin = Origin::start();
    let data = random_bytes(6 * MIB + 3, 13);
    origin.put("n.raw", data.clone());
    origin.set_no_ranges(true);
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "noranges",
        "--url",
        &origin.url("n.raw"),
        "--checksum",
        &sha512_hex(&data),
    ]);
    // A read near the end waits for the one stream to get there.
    let got = read_at(&d.path("noranges"), data.len() as u64 - 1000, 1000).unwrap();
    assert_eq!(got, &data[data.len() - 1000..]);
    d.wait_state("noranges", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("noranges")).unwrap() == data);
    assert!(
        origin.served() <= 2 * data.len() as u64,
        "served {}",
        origin.served()
    );
}

#[test]
fn bifs_serve_is_an_origin_with_ranges() {
    let www = tempfile::tempdir().unwrap();
    let data = random_bytes(3 * MIB + 17, 14);
    std::fs::write(www.path().join("img.raw"), &data).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut serve = std::process::Command::new(common::BIN)
        .args([
            "serve",
            www.path().to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/img.raw");
    common::wait_for("bifs serve", Duration::from_secs(10), || {
        (sh(&format!("curl -sf -o /dev/null {url}")).0 == 0).then_some(())
    });
    let (_, out, _) = sh(&format!(
        "curl -s -D - -o /dev/null -H 'Range: bytes=5-9' {url}"
    ));
    assert!(
        out.starts_with("HTTP/1.1 206") && out.to_lowercase().contains("content-range: bytes 5-9/"),
        "{out}"
    );
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "served",
        "--url",
        &url,
        "--checksum",
        &sha512_hex(&data),
    ]);
    d.wait_state("served", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("served")).unwrap() == data);
    let _ = serve.kill();
    let _ = serve.wait();
    let out = d.bifs(&["serve", "/nonexistent/dir"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

#[test]
fn redirects_are_followed() {
    let origin = Origin::start();
    let data = random_bytes(3 * MIB, 15);
    origin.put("r.raw", data.clone());
    let d = Daemon::start();
    let url = format!("http://{}/moved/r.raw", origin.addr);
    d.bifs_ok(&[
        "create",
        "moved",
        "--url",
        &url,
        "--checksum",
        &sha512_hex(&data),
    ]);
    d.wait_state("moved", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("moved")).unwrap() == data);
}

/// An image still arriving is opened with FOPEN_DIRECT_IO (no second copy in the FUSE
/// page cache); programs that mmap it (file managers, some checksummers) must still work.
#[test]
fn mmap_of_an_image_still_arriving_reads_the_source_bytes() {
    use std::os::fd::AsRawFd;
    let origin = Origin::start();
    let data = random_bytes(16 * MIB + 4321, 21);
    origin.put("m.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "mapped",
        "--url",
        &origin.url("m.raw"),
        "--no-fill",
    ]);
    let f = File::open(d.path("mapped")).unwrap();
    let len = data.len();
    // SAFETY: a private read-only mapping of a file we hold open; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping is `len` bytes long and lives until munmap below.
    let mapped = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    for off in [len - 10, 9 * MIB + 17, 0, 3 * MIB] {
        let end = (off + 8192).min(len);
        assert_eq!(&mapped[off..end], &data[off..end], "mapped bytes at {off}");
    }
    assert_eq!(sha512_hex(mapped), sha512_hex(&data));
    // SAFETY: ptr/len come from the mmap above.
    unsafe { libc::munmap(ptr, len) };
}

/// An origin replaced while the daemon was down fails the unfinished image at start-up,
/// before anything reads it, instead of after the cached blocks were served.
#[test]
fn an_origin_replaced_while_the_daemon_was_down_fails_the_image_at_start_up() {
    let origin = Origin::start();
    let old = random_bytes(8 * MIB, 22);
    origin.put("r.raw", old.clone());
    let mut d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "replaced",
        "--url",
        &origin.url("r.raw"),
        "--no-fill",
    ]);
    assert_eq!(read_at(&d.path("replaced"), 0, 4096).unwrap(), &old[..4096]);
    d.stop();
    origin.put("r.raw", random_bytes(8 * MIB, 23));
    d.spawn();
    let s = common::wait_for("the image to fail", Duration::from_secs(30), || {
        let s = d.status("replaced");
        (s["state"] == "failed").then_some(s)
    });
    assert!(
        s["error"].as_str().unwrap().contains("source changed"),
        "{s}"
    );
    let e = read_at(&d.path("replaced"), 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}

#[test]
fn an_image_whose_source_this_build_cannot_use_serves_its_cached_blocks_after_a_restart() {
    let origin = Origin::start();
    let data = random_bytes(8 * MIB, 21);
    let other = random_bytes(MIB, 22);
    origin.put("k.raw", data.clone());
    origin.put("o.raw", other.clone());
    let mut d = Daemon::start();
    d.bifs_ok(&["create", "kept", "--url", &origin.url("k.raw"), "--no-fill"]);
    assert_eq!(read_at(&d.path("kept"), 0, MIB).unwrap(), data[..MIB]);
    d.bifs_ok(&["create", "other", "--url", &origin.url("o.raw")]);
    d.wait_state("other", "ready", Duration::from_secs(60));
    d.stop();
    // A spec whose source this node cannot use: an export of a volume not on this node.
    let spec_path = d.disk.join("images/kept/spec.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    spec["spec"]["sourceType"] = "export-from-volume".into();
    spec["spec"]["sourceParameters"] =
        serde_json::json!({"path": "/nonexistent/bifs-volume", "export-type": "raw"});
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    d.spawn();
    // Present blocks read right; an absent one answers EIO within seconds, not a hang.
    assert_eq!(
        read_at(&d.path("kept"), 4096, 65536).unwrap(),
        data[4096..4096 + 65536]
    );
    let t0 = std::time::Instant::now();
    let e = read_at(&d.path("kept"), 6 * MIB as u64, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let s = d.status("kept");
    assert_eq!(s["state"], "in-progress", "{s}");
    let err = s["error"].as_str().unwrap();
    assert!(err.contains("does not exist on this node"), "{err}");
    // The other image is untouched.
    assert_eq!(d.status("other")["state"], "ready");
    assert!(std::fs::read(d.path("other")).unwrap() == other);
}
