//! Hostile input, as a careless or malicious client would send it: every HTTP API
//! endpoint (the peer ones too) with bad names, bad JSON, bad Range headers; every CLI
//! command with bad values. The rule: a 4xx with a JSON `{error}` (or exit 2 with a
//! message), never a 5xx, a panic or a path outside the disk's image folders; `/data`
//! never serves an absent block as zeros.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::origin::Origin;
use common::{random_bytes, sha512_hex, tail, Daemon, BIN};

const KIB: usize = 1024;
const MIB: usize = 1 << 20;

/// One HTTP/1.1 request over a fresh connection; (status, headers, body).
fn http(
    server: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let host = server.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{method} {path}: no HTTP answer: {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = unchunk(&body);
    }
    (status, head, body)
}

fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// Asserts a 4xx whose body is a JSON object with an `error` string.
fn assert_4xx_json(what: &str, (status, head, body): &(u16, String, Vec<u8>)) {
    assert!(
        (400..500).contains(status),
        "{what}: want a 4xx, got {status}\n{head}\n{}",
        String::from_utf8_lossy(body)
    );
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{what}: {status} with a body that is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    assert!(v["error"].is_string(), "{what}: {v}");
}

/// Every file and directory under `root` (relative paths), sorted.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.ends_with("mnt") {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Names a client may put in a URL path: encoded slashes and dots, NUL, 10 KiB, unicode.
fn bad_path_names() -> Vec<String> {
    vec![
        "..".into(),
        "%2e%2e".into(),
        "%2E%2E".into(),
        "..%2f..%2fetc".into(),
        "%2e%2e%2f%2e%2e%2ftmp".into(),
        "a%2Fb".into(),
        "a%00b".into(),
        "%00".into(),
        "Upper".into(),
        ".hidden".into(),
        "-dash".into(),
        "a..b".into(),
        "%C3%A9".into(),
        "a%20b".into(),
        "x".repeat(10 * KIB),
        "%ff%fe".into(),
    ]
}

struct Setup {
    _origin: Origin,
    d: Daemon,
    ready: Vec<u8>,
    part: Vec<u8>,
}

/// A daemon with a ready image `good` and an image `part` with only its first block.
fn setup() -> Setup {
    let origin = Origin::start();
    let ready = random_bytes(2 * MIB, 51);
    origin.put("good.raw", ready.clone());
    let part = random_bytes(4 * MIB, 52);
    origin.put("part.raw", part.clone());
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "good",
        "--url",
        &origin.url("good.raw"),
        "--checksum",
        &sha512_hex(&ready),
    ]);
    d.bifs_ok(&[
        "create",
        "part",
        "--url",
        &origin.url("part.raw"),
        "--no-fill",
    ]);
    d.wait_state("good", "ready", Duration::from_secs(60));
    Setup {
        _origin: origin,
        d,
        ready,
        part,
    }
}

#[test]
fn every_endpoint_answers_bad_names_with_a_4xx_in_json_and_touches_no_path() {
    let s = setup();
    let before = tree(s.d.dir.path());
    let mut tried = 0;
    for name in bad_path_names() {
        for (method, suffix) in [
            ("GET", ""),
            ("DELETE", ""),
            ("POST", "/fill"),
            ("GET", "/blocks"),
            ("GET", "/data"),
            ("GET", "/manifest"),
        ] {
            let path = format!("/v1/images/{name}{suffix}");
            let r = http(&s.d.server, method, &path, &[], b"");
            assert_4xx_json(&format!("{method} {}", &path[..path.len().min(80)]), &r);
            tried += 1;
        }
    }
    for (method, path) in [
        ("GET", "/v1/nope"),
        ("GET", "/"),
        ("PUT", "/v1/images/good"),
        ("PATCH", "/v1/images"),
        ("GET", "/v1/images/good/fill"),
        ("GET", "/v1/images/good/data/../../../etc/passwd"),
        ("GET", "/v1/images/%2e%2e/%2e%2e/bifs-disk.json"),
    ] {
        let r = http(&s.d.server, method, path, &[], b"");
        assert_4xx_json(&format!("{method} {path}"), &r);
        tried += 1;
    }
    assert_eq!(
        tree(s.d.dir.path()),
        before,
        "no file appeared or went away"
    );
    assert_eq!(s.d.status("good")["state"], "ready");
    assert!(!s.d.log().contains("panicked"), "{}", tail(&s.d.log(), 20));
    println!("{tried} requests with bad names");
}

#[test]
fn create_refuses_bad_specs_with_a_4xx_in_json_and_creates_nothing() {
    let s = setup();
    let before = tree(s.d.dir.path());
    let url = "http://127.0.0.1:1/x.raw";
    let long = "a".repeat(10 * KIB);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let mut bodies: Vec<(String, String)> = vec![
        ("not JSON".into(), "xx".into()),
        ("empty".into(), "".into()),
        ("null".into(), "null".into()),
        ("an array".into(), "[]".into()),
        ("an empty object".into(), "{}".into()),
        ("nested 10000 deep".into(), deep),
        ("a number name".into(), format!(r#"{{"name":5,"sourceType":"download","sourceParameters":{{"url":"{url}"}}}}"#)),
        ("parameters a string".into(), r#"{"name":"a","sourceType":"download","sourceParameters":"x"}"#.into()),
        ("unknown source type".into(), format!(r#"{{"name":"a","sourceType":"ftp","sourceParameters":{{"url":"{url}"}}}}"#)),
        ("no url".into(), r#"{"name":"a","sourceType":"download","sourceParameters":{}}"#.into()),
        ("a file url".into(), r#"{"name":"a","sourceType":"download","sourceParameters":{"url":"file:///etc/passwd"}}"#.into()),
        ("a checksum of 127 digits".into(), format!(r#"{{"name":"a","sourceType":"download","sourceParameters":{{"url":"{url}"}},"checksum":"{}"}}"#, "a".repeat(127))),
        ("a checksum with non-hex".into(), format!(r#"{{"name":"a","sourceType":"download","sourceParameters":{{"url":"{url}"}},"checksum":"{}"}}"#, "z".repeat(128))),
        ("noFill a string".into(), format!(r#"{{"name":"a","sourceType":"download","sourceParameters":{{"url":"{url}"}},"noFill":"yes"}}"#)),
        ("an existing name with another url".into(), format!(r#"{{"name":"good","sourceType":"download","sourceParameters":{{"url":"{url}"}}}}"#)),
    ];
    for name in [
        "..",
        "../x",
        "../../tmp/x",
        "a/b",
        "/abs",
        "a\u{0}b",
        ".x",
        "x.",
        "A",
        "a..b",
        "é",
        &long,
        "%2e%2e",
    ] {
        let spec = serde_json::json!({
            "name": name, "sourceType": "download", "sourceParameters": {"url": url}
        });
        bodies.push((
            format!("name {:?}", &name[..name.len().min(20)]),
            spec.to_string(),
        ));
    }
    for (what, body) in &bodies {
        let r = http(
            &s.d.server,
            "POST",
            "/v1/images",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_4xx_json(what, &r);
    }
    // Without a JSON content type.
    let r = http(&s.d.server, "POST", "/v1/images", &[], b"{}");
    assert_4xx_json("no content type", &r);
    assert_eq!(tree(s.d.dir.path()), before, "nothing was created");
    assert!(!s.d.log().contains("panicked"), "{}", tail(&s.d.log(), 20));
    println!("{} bad create bodies", bodies.len() + 1);
}

#[test]
fn data_answers_bad_ranges_with_416_and_never_serves_an_absent_block_as_zeros() {
    let s = setup();
    let server = &s.d.server;
    let size = s.ready.len() as u64;
    let mut tried = 0;
    for range in [
        "bytes=-1".to_string(),
        "bytes=-0".into(),
        "bytes=5-1".into(),
        "bytes=0-99999999999999999999".into(),
        "bytes=18446744073709551615-".into(),
        "bytes=18446744073709551614-18446744073709551615".into(),
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
        "bytes=abc".into(),
        "bytes=0-0,5-6".into(),
        "items=0-1".into(),
        "bytes=".into(),
        "bytes=--1".into(),
        "bytes= 1 - 2 ".into(),
        "bytes=0x10-0x20".into(),
        "".into(),
    ] {
        for name in ["good", "part"] {
            let r = http(
                server,
                "GET",
                &format!("/v1/images/{name}/data"),
                &[("Range", &range)],
                b"",
            );
            tried += 1;
            match r.0 {
                // A lenient parse of a range the image holds is fine if the bytes are right.
                206 => {
                    let src = if name == "good" { &s.ready } else { &s.part };
                    let head = r.1.to_ascii_lowercase();
                    let cr = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-range: bytes "))
                        .unwrap_or_else(|| panic!("{range:?}: 206 without Content-Range"));
                    let (a, b) = cr.split_once('/').unwrap().0.split_once('-').unwrap();
                    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                    assert_eq!(r.2, src[a..=b], "{name} {range:?}: the bytes served");
                }
                416 => assert_4xx_json(&format!("{name} Range {range:?}"), &r),
                _ => panic!(
                    "{name} Range {range:?}: {} {}",
                    r.0,
                    String::from_utf8_lossy(&r.2)
                ),
            }
        }
    }
    // `part` has only its first block: anything beyond is 416, never zeros.
    for range in [
        "bytes=16384-32767",
        "bytes=0-32767",
        "bytes=4000000-4000010",
        "bytes=0-",
    ] {
        let r = http(
            server,
            "GET",
            "/v1/images/part/data",
            &[("Range", range)],
            b"",
        );
        assert_eq!(
            r.0,
            416,
            "part {range}: absent bytes: {}",
            String::from_utf8_lossy(&r.2)
        );
        tried += 1;
    }
    let r = http(server, "GET", "/v1/images/part/data", &[], b"");
    assert_eq!(r.0, 416, "part without Range: the whole image is not here");
    let r = http(
        server,
        "GET",
        "/v1/images/part/data",
        &[("Range", "bytes=0-16383")],
        b"",
    );
    assert_eq!(r.0, 206, "part: its present first block serves");
    assert_eq!(r.2.len(), 16384);
    // A peer asking for another version.
    let r = http(
        server,
        "GET",
        "/v1/images/good/data",
        &[("x-bifs-version", "nonsense\u{7f}"), ("Range", "bytes=0-1")],
        b"",
    );
    assert!((400..500).contains(&r.0), "a wrong version: {}", r.0);
    let r = http(server, "GET", "/v1/images/part/manifest", &[], b"");
    assert_4xx_json("manifest of an unready image", &r);
    assert!(!s.d.log().contains("panicked"), "{}", tail(&s.d.log(), 20));
    println!("{tried} Range headers tried");
}

fn bifs(d: &Daemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .env("BIFS_SERVER", &d.server)
        .output()
        .unwrap()
}

/// Exit 2 with a message, no panic.
fn assert_usage_error(what: &str, out: &std::process::Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: exit {:?}: {err}",
        out.status.code()
    );
    assert!(!err.trim().is_empty(), "{what}: a message");
}

#[test]
fn cli_arguments_with_bad_values_exit_2_without_a_panic() {
    let s = setup();
    let d = &s.d;
    let before = tree(d.dir.path());
    let url = "http://127.0.0.1:1/x.raw";
    let long = "a".repeat(10 * KIB);
    let mut tried = 0;
    for name in [
        "..", "../x", "a/b", "/abs", ".x", "A", "a..b", "é", "%2e%2e", &long, "", "-",
    ] {
        let out = bifs(d, &["create", name, "--url", url]);
        assert_usage_error(&format!("create {:?}", &name[..name.len().min(20)]), &out);
        tried += 1;
        for cmd in ["status", "delete", "fill"] {
            let out = bifs(d, &[cmd, name]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains("panicked"), "{cmd} {name:?}: {err}");
            assert!(matches!(out.status.code(), Some(1 | 2)), "{cmd}: {err}");
            tried += 1;
        }
    }
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "bad checksum",
            vec!["create", "a", "--url", url, "--checksum", "xyz"],
        ),
        ("bad url", vec!["create", "a", "--url", "ftp://x/y"]),
        ("empty url", vec!["create", "a", "--url", ""]),
        (
            "status timeout overflowing u64",
            vec![
                "status",
                "good",
                "--wait",
                "ready",
                "--timeout",
                "99999999999999999999s",
            ],
        ),
        (
            "status timeout of u64::MAX hours",
            vec![
                "status",
                "good",
                "--wait",
                "ready",
                "--timeout",
                "18446744073709551615h",
            ],
        ),
        (
            "status timeout negative",
            vec!["status", "good", "--wait", "ready", "--timeout", "-5s"],
        ),
        (
            "status wait for a bad state",
            vec!["status", "good", "--wait", "gone"],
        ),
        (
            "mount block-kib overflowing u64",
            vec![
                "mount",
                "--mountpoint",
                "/nonexistent-bifs",
                "--disk",
                "/nonexistent-bifs",
                "--block-kib",
                "99999999999999999999",
            ],
        ),
        (
            "mount block-kib 0",
            vec![
                "mount",
                "--mountpoint",
                "/nonexistent-bifs",
                "--disk",
                "/nonexistent-bifs",
                "--block-kib",
                "0",
            ],
        ),
        (
            "mount read-timeout of u64::MAX minutes",
            vec![
                "mount",
                "--mountpoint",
                "/nonexistent-bifs",
                "--disk",
                "/nonexistent-bifs",
                "--read-timeout",
                "18446744073709551615m",
            ],
        ),
        (
            "mount listen garbage",
            vec![
                "mount",
                "--mountpoint",
                "/nonexistent-bifs",
                "--disk",
                "/nonexistent-bifs",
                "--listen",
                "999.1.1.1:99999",
            ],
        ),
        ("ensure without =", vec!["ensure", "backingImage"]),
        (
            "ensure bad json parameters",
            vec![
                "ensure",
                "backingImage=a",
                "backingImageDataSourceType=download",
                "backingImageDataSourceParameters={nope",
            ],
        ),
    ];
    for (what, args) in &cases {
        let out = bifs(d, args);
        assert_usage_error(what, &out);
        tried += 1;
    }
    assert_eq!(tree(d.dir.path()), before, "nothing was created");
    assert!(!d.log().contains("panicked"), "{}", tail(&d.log(), 20));
    println!("{tried} bad CLI invocations");
}

#[test]
fn apply_refuses_yaml_bombs_and_bad_shapes_quickly() {
    let s = setup();
    let d = &s.d;
    let yaml_dir = tempfile::tempdir().unwrap();
    let dir = yaml_dir.path();
    // A billion laughs: nine levels of nine aliases.
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for c in 'b'..='j' {
        bomb.push_str(&format!(
            "{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
        prev = c;
    }
    let bomb_manifest = format!(
        "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: bomb\n  junk: &j [1]\nspec:\n  sourceType: download\n  sourceParameters:\n    url: http://127.0.0.1:1/x\n{}",
        bomb.lines().map(|l| format!("  x{l}\n")).collect::<String>()
    );
    let merge_bomb = {
        let mut y = String::from(
            "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: merge\n",
        );
        y.push_str("base0: &m0 {k0: 0}\n");
        for i in 1..200 {
            y.push_str(&format!("base{i}: &m{i}\n  <<: *m{}\n  k{i}: {i}\n", i - 1));
        }
        y.push_str("spec:\n  <<: *m199\n");
        y
    };
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, String)> = vec![
        ("billion laughs at the top", bomb.clone()),
        ("billion laughs in a manifest", bomb_manifest),
        ("merge chain of 200", merge_bomb),
        ("100000 nested flow sequences", deep),
        ("a scalar", "42\n".into()),
        ("a list", "- 1\n- 2\n".into()),
        ("binary", String::from_utf8_lossy(&random_bytes(4096, 9)).into()),
        ("a NUL in a name", "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: \"a\\0b\"\nspec:\n  sourceType: download\n  sourceParameters:\n    url: http://127.0.0.1:1/x\n".into()),
        ("a path as the name", "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: ../../x\nspec:\n  sourceType: download\n  sourceParameters:\n    url: http://127.0.0.1:1/x\n".into()),
    ];
    let before = tree(d.dir.path());
    for (i, (what, yaml)) in cases.iter().enumerate() {
        let f = dir.join(format!("{i}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (server, file) = (d.server.clone(), f.clone());
        std::thread::spawn(move || {
            let out = std::process::Command::new(BIN)
                .args(["apply", "-f"])
                .arg(&file)
                .env("BIFS_SERVER", server)
                .output()
                .unwrap();
            let _ = tx.send(out);
        });
        let out = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{what}: apply did not answer within 30 s"));
        assert_usage_error(what, &out);
        let err = String::from_utf8_lossy(&out.stderr);
        println!("{what}: {}", err.lines().next().unwrap_or_default());
    }
    assert_eq!(tree(d.dir.path()), before, "nothing was created");
    println!("{} hostile YAML files", cases.len());
}

#[test]
fn url_credentials_are_never_shown() {
    let s = setup();
    let d = &s.d;
    let url = s
        ._origin
        .url("good.raw")
        .replace("http://", "http://someone:s3cretpw@");
    d.bifs_ok(&[
        "create",
        "cred",
        "--url",
        &url,
        "--checksum",
        &sha512_hex(&s.ready),
    ]);
    d.wait_state("cred", "ready", Duration::from_secs(60));
    let mut shown = vec![
        ("status", d.bifs_ok(&["status", "cred", "--json"])),
        ("status text", d.bifs_ok(&["status", "cred"])),
        ("list", d.bifs_ok(&["list", "--json"])),
        (
            "metrics",
            String::from_utf8_lossy(&http(&d.server, "GET", "/metrics", &[], b"").2).to_string(),
        ),
        ("log", d.log()),
    ];
    let (_, xattrs, _) = common::sh(&format!("getfattr -d -m - {}", d.path("cred").display()));
    shown.push(("xattrs", xattrs));
    for (what, text) in &shown {
        assert!(
            !text.contains("s3cretpw"),
            "{what} shows the URL's password:\n{text}"
        );
    }
    assert!(
        shown[0].1.contains("127.0.0.1"),
        "the URL is shown, without credentials"
    );
}

#[test]
#[ignore = "core bug: Disk::open and write_json_atomic (src/core/store.rs) create the disk's \
            directories and spec.json with the process umask (0755/0644): any local user reads \
            the URL credentials stored in <disk>/images/<name>/spec.json; the disk should be 0700"]
fn stored_url_credentials_are_readable_by_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    let spec = s.d.disk.join("images/good/spec.json");
    for p in [s.d.disk.clone(), spec] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", p.display());
    }
}
