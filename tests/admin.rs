//! bifs as a careful administrator meets it: every valid name, exit codes and messages of
//! the CLI, what `df`, `du` and `stat` show on the mount, refusals at start-up (missing
//! disk, disk in use, non-empty or live mountpoint, empty token), the API's answers to bad
//! requests, a read-only disk, and `bifs serve` as an origin. All through the real binary.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::origin::Origin;
use common::{random_bytes, sh, sha512_hex, wait_for, Daemon, BIN};

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

/// `curl` with `args`; returns (HTTP status, body).
fn curl(args: &str) -> (u16, String) {
    let (rc, out, err) = sh(&format!("curl -s -w '\\n%{{http_code}}' {args}"));
    assert_eq!(rc, 0, "curl {args}: {err}");
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The longest valid name: four labels (63 + 63 + 63 + 61) and three dots.
fn longest_name() -> String {
    let n = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
    assert_eq!(n.len(), 253);
    n
}

#[test]
fn names_of_253_characters_work_on_every_path() {
    let origin = Origin::start();
    let data = random_bytes(MIB, 301);
    origin.put("long.raw", data.clone());
    let mut d = Daemon::start();
    let name = longest_name();
    d.bifs_ok(&[
        "create",
        &name,
        "--url",
        &origin.url("long.raw"),
        "--checksum",
        &sha512_hex(&data),
    ]);
    d.wait_state(&name, "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path(&name)).unwrap() == data);
    assert!(std::fs::read(d.raw_path(&name)).unwrap() == data);
    let (_, state, _) = sh(&format!(
        "getfattr -n user.bifs.state --only-values {}",
        d.path(&name).display()
    ));
    assert_eq!(state, "ready");
    // `bifs list` keeps its columns: STATE starts at the same column on every line.
    d.bifs_ok(&["create", "short", "--url", &origin.url("long.raw")]);
    let list = d.bifs_ok(&["list"]);
    let cols: Vec<usize> = list
        .lines()
        .map(|l| {
            l.find(" STATE")
                .or_else(|| l.find(" ready"))
                .or_else(|| l.find(" in-progress"))
                .or_else(|| l.find(" pending"))
                .unwrap_or_else(|| panic!("no state column in {l:?}"))
        })
        .collect();
    assert_eq!(cols.len(), 3, "{list}");
    assert!(cols.iter().all(|c| *c == cols[0]), "columns drift:\n{list}");
    // Leftovers of creates that died (this version's and the older naming) are cleared at
    // the next start, and the long name survives the restart.
    d.stop();
    let images = d.disk.join("images");
    std::fs::create_dir_all(images.join(".creating-0123456789abcdef")).unwrap();
    std::fs::create_dir_all(images.join(".old.creating")).unwrap();
    d.spawn();
    assert_eq!(d.status(&name)["state"], "ready");
    assert!(!images.join(".creating-0123456789abcdef").exists());
    assert!(!images.join(".old.creating").exists());
    assert!(std::fs::read(d.path(&name)).unwrap() == data);
    d.bifs_ok(&["delete", &name]);
    assert!(!d.path(&name).exists());
    assert!(!images.join(&name).exists());
}

#[test]
fn a_dns_label_over_63_characters_says_so() {
    let name = format!("{}.x", "a".repeat(64));
    let out = Command::new(BIN)
        .args(["create", &name, "--url", "http://127.0.0.1:9/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("64 characters") && err.contains("63"), "{err}");
}

#[test]
fn a_server_address_that_is_no_http_url_is_bad_usage() {
    for server in ["", "127.0.0.1:8090"] {
        let out = Command::new(BIN)
            .args(["list"])
            .env("BIFS_SERVER", server)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{server:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("http://HOST:PORT"),
            "{}",
            stderr(&out)
        );
    }
}

/// A small image whose checksum cannot match, waited until it failed.
fn failed_image(d: &Daemon, origin: &Origin) -> (Vec<String>, String) {
    origin.put("bad.raw", random_bytes(256 << 10, 302));
    let args: Vec<String> = [
        "create",
        "bad",
        "--url",
        &origin.url("bad.raw"),
        "--checksum",
        &sha512_hex(b"not these bytes"),
    ]
    .map(String::from)
    .to_vec();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let _ = d.bifs(&argv); // exits 0 or 1, depending on how fast it fails
    let s = wait_for("the image to fail", Duration::from_secs(60), || {
        let s = d.status("bad");
        (s["state"] == "failed").then_some(s)
    });
    (args, s["error"].as_str().unwrap().to_string())
}

#[test]
fn create_exits_1_with_the_reason_when_the_image_has_failed() {
    let origin = Origin::start();
    let d = Daemon::start();
    let (args, reason) = failed_image(&d, &origin);
    assert!(!reason.is_empty());
    // The same create again is a no-op on the existing image, which has failed.
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = d.bifs(&argv);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("failed") && err.contains(&reason), "{err}");
}

#[test]
fn status_wait_exits_0_only_in_the_state_asked_for() {
    let origin = Origin::start();
    let d = Daemon::start();
    let (_, reason) = failed_image(&d, &origin);
    let data = random_bytes(MIB, 303);
    origin.put("good.raw", data.clone());
    d.bifs_ok(&["create", "good", "--url", &origin.url("good.raw")]);
    let wait =
        |name: &str, want: &str| d.bifs(&["status", name, "--wait", want, "--timeout", "60s"]);

    let out = wait("good", "ready");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = wait("good", "failed");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is ready, not failed"),
        "{}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready"));

    let out = wait("bad", "failed");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = wait("bad", "ready");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("failed, not ready") && err.contains(&reason),
        "{err}"
    );
}

#[test]
fn unknown_json_fields_are_refused_naming_the_field() {
    let origin = Origin::start();
    origin.put("u.raw", random_bytes(MIB, 304));
    let d = Daemon::start();
    let url = origin.url("u.raw");
    for (typo, body) in [
        (
            "checksumm",
            format!(
                r#"{{"name":"u","sourceType":"download","sourceParameters":{{"url":"{url}"}},"checksumm":"x"}}"#
            ),
        ),
        (
            "nofill",
            format!(
                r#"{{"name":"u","sourceType":"download","sourceParameters":{{"url":"{url}"}},"nofill":true}}"#
            ),
        ),
    ] {
        let (code, resp) = curl(&format!(
            "-X POST -H 'Content-Type: application/json' -d '{body}' {}/v1/images",
            d.server
        ));
        assert_eq!(code, 400, "{resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        assert!(v["error"].as_str().unwrap().contains(typo), "{resp}");
    }
    assert_eq!(
        d.bifs_ok(&["list", "--json"]).trim(),
        "[]",
        "nothing was created"
    );
    // The right spelling works.
    let body = format!(
        r#"{{"name":"u","sourceType":"download","sourceParameters":{{"url":"{url}"}},"noFill":true}}"#
    );
    let (code, resp) = curl(&format!(
        "-X POST -H 'Content-Type: application/json' -d '{body}' {}/v1/images",
        d.server
    ));
    assert_eq!(code, 201, "{resp}");
}

#[test]
fn bad_requests_get_4xx_json_errors_never_5xx() {
    let origin = Origin::start();
    let d = Daemon::start();
    let long = "a".repeat(10_000);
    let missing = origin.url("missing.raw");
    let create = |body: &str| {
        format!(
            "-X POST -H 'Content-Type: application/json' -d '{body}' {}/v1/images",
            d.server
        )
    };
    let cases = [
        create(&format!(
            r#"{{"name":"{}x","sourceType":"download","sourceParameters":{{"url":"{missing}"}}}}"#,
            longest_name()
        )),
        create(&format!(
            r#"{{"name":"ok","sourceType":"download","sourceParameters":{{"url":"{missing}"}}}}"#
        )),
        create(r#"{"name":5}"#),
        create("not json"),
        create("[]"),
        create(
            r#"{"name":"../x","sourceType":"download","sourceParameters":{"url":"http://127.0.0.1:9/x"}}"#,
        ),
        format!("{}/v1/images/{long}", d.server),
        format!("{}/v1/images/%ff%fe", d.server),
        format!("{}/v1/images/%2e%2e", d.server),
        format!("-X DELETE {}/v1/images/%2e%2e%2fimages", d.server),
        format!("-X POST {}/v1/images/nothere/fill", d.server),
        format!("{}/v1/nothing", d.server),
        format!("-X PUT {}/v1/images", d.server),
    ];
    for args in cases {
        let (code, body) = curl(&args);
        assert!((400..500).contains(&code), "{code} for {args}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("not JSON ({e}) for {args}: {body:?}"));
        assert!(v["error"].is_string(), "{args}: {body}");
    }
    // An origin's 404 (a 422 above): the create failed, exit 1, with the origin's answer.
    let out = d.bifs(&["create", "ok", "--url", &missing]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
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

#[test]
fn bifs_serve_refuses_empty_ranges_file_slashes_and_symlinks_out() {
    let base = tempfile::tempdir().unwrap();
    let www = base.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("f.raw"), b"0123456789").unwrap();
    std::fs::write(www.join("empty.raw"), b"").unwrap();
    std::fs::write(base.path().join("secret"), b"outside").unwrap();
    std::os::unix::fs::symlink("../secret", www.join("out")).unwrap();
    std::os::unix::fs::symlink("f.raw", www.join("in")).unwrap();
    let port = common::free_port();
    let mut serve = Command::new(BIN)
        .args([
            "serve",
            www.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = |p: &str| format!("http://127.0.0.1:{port}/{p}");
    wait_for("bifs serve", Duration::from_secs(10), || {
        (sh(&format!("curl -sf -o /dev/null {}", url("f.raw"))).0 == 0).then_some(())
    });
    let range = |p: &str| curl(&format!("-H 'Range: bytes=0-3' {}", url(p)));
    assert_eq!(range("f.raw"), (206, "0123".into()));
    assert_eq!(
        range("in"),
        (206, "0123".into()),
        "a symlink inside DIR is served"
    );
    assert_eq!(range("empty.raw").0, 416);
    assert_eq!(
        curl(&url("empty.raw")).0,
        200,
        "without Range a 0-byte file is fine"
    );
    assert_eq!(range("f.raw/").0, 404, "/file/ is not the file");
    let (code, body) = range("out");
    assert_eq!(code, 404, "a symlink out of DIR is not followed: {body}");
    assert!(!body.contains("outside"));
    assert_eq!(range("%2e%2e/secret").0, 404);
    let _ = serve.kill();
    let _ = serve.wait();
}
