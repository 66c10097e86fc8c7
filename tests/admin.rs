//! bifs as a careful administrator meets it from the CLI and the API: every valid name,
//! exit codes and messages, refusal of unknown fields and other bad requests (4xx JSON,
//! never 5xx), and `bifs serve` as an origin. All through the real binary; what the mount
//! shows and the refusals at start-up are in `admin_mount.rs`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::origin::Origin;
use common::{curl, random_bytes, sh, sha512_hex, stderr_of as stderr, wait_for, Daemon, BIN};

const MIB: usize = 1 << 20;

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
        format!("{}/v1/images/%ff/blocks", d.server),
        format!("{}/v1/images/%ff/data", d.server),
        format!("-X POST {}/v1/images/%ff/cleanup", d.server),
        format!("-X DELETE '{}/v1/images/x?force=maybe'", d.server),
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
