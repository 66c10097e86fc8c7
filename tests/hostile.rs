//! Hostile input over HTTP, as a careless or malicious client would send it: every API
//! endpoint (the peer ones too) with bad names, bad JSON, bad Range headers. The rule: a
//! 4xx with a JSON `{error}`, never a 5xx, a panic or a path outside the disk's image
//! folders; `/data` never serves an absent block as zeros. The CLI and YAML side is in
//! tests/hostile_cli.rs.

mod common;

use common::hostile::{assert_4xx_json, bad_path_names, http, setup, tree, KIB};

const MIB: usize = 1 << 20;
use common::tail;

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
            ("PUT", "/upload"),
            ("POST", "/cleanup"),
            ("POST", "/from-peers"),
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

#[test]
fn upload_pieces_with_hostile_content_ranges_are_refused_and_land_no_wrong_byte() {
    let s = setup();
    let server = &s.d.server;
    let data = common::random_bytes(MIB, 81);
    let spec = serde_json::json!({
        "name": "up", "sourceType": "upload",
        "sourceParameters": {"size": data.len().to_string()},
        "checksum": common::sha512_hex(&data),
    });
    let json = [("Content-Type", "application/json")];
    let r = http(
        server,
        "POST",
        "/v1/images",
        &json,
        spec.to_string().as_bytes(),
    );
    assert!(
        (200..300).contains(&r.0),
        "create the upload image: {}",
        r.0
    );
    let size = data.len();
    let garbage = vec![0xeeu8; 40_000];
    let mut long = data[..16384].to_vec();
    long.extend_from_slice(&garbage);
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("".into(), data[..16384].to_vec()),
        ("garbage".into(), data[..16384].to_vec()),
        ("bytes 0-0/1".into(), data[..1].to_vec()),
        (format!("bytes 5-1/{size}"), data[..16384].to_vec()),
        (
            format!("bytes 0-18446744073709551615/{size}"),
            data[..16384].to_vec(),
        ),
        (
            "bytes 18446744073709551615-18446744073709551615/18446744073709551615".into(),
            vec![1],
        ),
        (format!("bytes 1-16384/{size}"), data[1..16385].to_vec()),
        (
            format!("bytes 0-16383/{}", size + 1),
            data[..16384].to_vec(),
        ),
        (
            format!("bytes {size}-{}/{size}", size + 16383),
            garbage[..16384].to_vec(),
        ),
        (format!("bytes -16384/{size}"), data[..16384].to_vec()),
        // The body is longer than its range: what lies past the range must not land.
        (format!("bytes 0-16383/{size}"), long),
        // A body shorter than its range: no partial block lands.
        (
            format!("bytes 16384-32767/{size}"),
            data[16384..16484].to_vec(),
        ),
    ];
    let mut answers = Vec::new();
    for (cr, body) in &cases {
        let mut headers = vec![];
        if !cr.is_empty() {
            headers.push(("Content-Range", cr.as_str()));
        }
        let r = http(server, "PUT", "/v1/images/up/upload", &headers, body);
        assert!(
            r.0 < 500,
            "Content-Range {cr:?}: {} {}",
            r.0,
            String::from_utf8_lossy(&r.2)
        );
        if r.0 >= 400 {
            assert_4xx_json(&format!("upload Content-Range {cr:?}"), &r);
        }
        answers.push(format!("{cr:?} -> {}", r.0));
    }
    // A download image takes no upload.
    let r = http(
        server,
        "PUT",
        "/v1/images/good/upload",
        &[("Content-Range", "bytes 0-16383/2097152")],
        &data[..16384],
    );
    assert_4xx_json("upload to a download image", &r);
    // Nothing wrong landed: every present block holds the file's bytes.
    let on_disk = common::ondisk::check_on_disk(&s.d.disk, "up", &data).unwrap();
    assert!(!on_disk.failed);
    // The real upload completes it, and the checksum holds.
    let file = s.d.dir.path().join("up.bin");
    std::fs::write(&file, &data).unwrap();
    s.d.bifs_ok(&["upload", "up", file.to_str().unwrap()]);
    s.d.wait_state("up", "ready", std::time::Duration::from_secs(60));
    assert!(std::fs::read(s.d.path("up")).unwrap() == data);
    assert!(!s.d.log().contains("panicked"), "{}", tail(&s.d.log(), 20));
    println!("hostile upload pieces: {}", answers.join(", "));
}
