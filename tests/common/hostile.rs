//! Helpers for the hostile-input tests (tests/hostile.rs, tests/hostile_cli.rs): a raw
//! HTTP/1.1 client that sends whatever bytes it is given, the checks of an error answer,
//! a listing of every file under a directory, and a daemon with one ready and one
//! partly present image.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use super::origin::Origin;
use super::{random_bytes, sha512_hex, Daemon};

pub const KIB: usize = 1024;
const MIB: usize = 1 << 20;

/// One HTTP/1.1 request over a fresh connection; (status, headers, body).
pub fn http(
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

pub fn unchunk(mut b: &[u8]) -> Vec<u8> {
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
pub fn assert_4xx_json(what: &str, (status, head, body): &(u16, String, Vec<u8>)) {
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
pub fn tree(root: &Path) -> Vec<String> {
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
pub fn bad_path_names() -> Vec<String> {
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

pub struct Setup {
    pub origin: Origin,
    pub d: Daemon,
    pub ready: Vec<u8>,
    pub part: Vec<u8>,
}

/// A daemon with a ready image `good` and an image `part` with only its first block.
pub fn setup() -> Setup {
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
        origin,
        d,
        ready,
        part,
    }
}
