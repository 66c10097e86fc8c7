//! Parsers under generated input (proptest, arbitrary bytes and near-valid mutations):
//! the on-disk loaders (spec.json, state.json, a bitmap of any length), the peer
//! manifest of piece digests, the qcow2 header checks (`Format::detect`), manifests
//! (YAML), the Range header of the peer `/data` endpoint (through a real daemon) and the
//! origin's Content-Range (through `HttpSource` against a real HTTP origin). A corrupt
//! input gives an error, never a panic or wrong bytes.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use bifs::core::bitmap::BlockMap;
use bifs::core::format::Format;
use bifs::core::pieces::PieceDigests;
use bifs::core::range::ByteRange;
use bifs::core::source::{HttpClients, HttpSource, Identity, Priority, Source};
use bifs::core::store::ImageFiles;
use common::origin::{Fault, Origin};
use common::{random_bytes, sha512_hex, Daemon};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// `n` cases, or `PARSER_CASES` (scripts/soak.sh runs many more).
fn cases(n: u32) -> Config {
    let n = std::env::var("PARSER_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(n);
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn format_detect_takes_any_head(mut head in proptest::collection::vec(any::<u8>(), 0..600), magic: bool) {
        if magic && head.len() >= 4 {
            head[..4].copy_from_slice(QCOW2_MAGIC);
        }
        let f = Format::detect(&head);
        let is_qcow2 = head.len() >= 104 && &head[..4] == QCOW2_MAGIC;
        prop_assert_eq!(f.name(), if is_qcow2 { "qcow2" } else { "raw" });
        if let Format::Qcow2(h) = &f {
            // Whatever the header says, the check answers in words and does not panic.
            let _ = h.raw_view_problem("x");
            prop_assert_eq!(f.virtual_size(), Some(u64::from_be_bytes(head[24..32].try_into().unwrap())));
        }
    }

    #[test]
    fn piece_digests_from_any_bytes_never_panic(
        b in proptest::collection::vec(any::<u8>(), 0..400),
        size in prop_oneof![Just(0u64), Just(4096), 0u64..1_000_000, Just(u64::MAX)],
        header in any::<bool>(),
    ) {
        let mut b = b;
        if header && b.len() >= 16 {
            // Near-valid: the right size, a plausible piece size.
            b[0..8].copy_from_slice(&4096u64.to_le_bytes());
            b[8..16].copy_from_slice(&size.to_le_bytes());
        }
        if let Ok(p) = PieceDigests::from_bytes(&b, size) {
            prop_assert_eq!(p.to_bytes(), b, "what parses writes back the same");
        }
    }

    #[test]
    fn a_bitmap_of_any_length_loads_only_its_blocks(
        blocks in 0u64..5000,
        bytes in proptest::collection::vec(any::<u8>(), 0..1000),
    ) {
        let m = BlockMap::from_bytes(blocks, &bytes);
        let want = (0..blocks)
            .filter(|&b| bytes.get((b / 8) as usize).is_some_and(|x| x >> (b % 8) & 1 == 1))
            .count() as u64;
        prop_assert_eq!(m.present_count(), want);
        prop_assert!(m.present_count() <= blocks);
    }

    #[test]
    fn manifests_of_any_text_never_panic(text in "[a-zA-Z0-9:&*<>\\[\\]{}|'\"#!%@`,\\- \n\t.]{0,300}") {
        let _ = bifs::core::manifest::parse(&text);
    }

    #[test]
    fn durations_of_any_text_are_bounded_or_refused(
        text in prop_oneof![
            "[0-9]{0,25}(s|m|h|ms|d|)",
            "[ -~]{0,12}",
        ]
    ) {
        if let Ok(d) = bifs::cli::parse_duration(&text) {
            prop_assert!(d.as_secs() <= 100 * 365 * 24 * 3600, "{text:?}: {d:?}");
        }
    }

    #[test]
    fn manifests_of_any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = bifs::core::manifest::parse(&String::from_utf8_lossy(&b));
    }
}

/// A valid spec.json, state.json and bitmap, then `mutate` decides what to break.
fn write_image(dir: &std::path::Path, spec: &[u8], state: &[u8], bitmap: &[u8], data_len: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("spec.json"), spec).unwrap();
    std::fs::write(dir.join("state.json"), state).unwrap();
    std::fs::write(dir.join("bitmap"), bitmap).unwrap();
    let f = std::fs::File::create(dir.join("data")).unwrap();
    f.set_len(data_len).unwrap();
}

fn spec_json(size: u64, block_size: u64) -> String {
    format!(
        r#"{{"spec":{{"name":"img","sourceType":"download","sourceParameters":{{"url":"http://127.0.0.1:1/x"}},"checksum":""}},
            "identity":{{"size":{size},"etag":"\"v1\"","lastModified":null,"ranges":true}},
            "blockSize":{block_size},"fill":true,"createdUnix":0}}"#
    )
}

/// Loads an image dir; a panic is reported as an error naming the input.
fn open_no_panic(dir: &std::path::Path) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| ImageFiles::open(dir.to_path_buf()))) {
        Ok(Ok((_, stored, _, map))) => {
            let want = stored.identity.size.div_ceil(stored.block_size);
            if map.blocks() != want {
                return Err(format!("{} blocks loaded, {want} expected", map.blocks()));
            }
            Ok(())
        }
        Ok(Err(e)) => {
            if e.to_string().is_empty() {
                return Err("an empty error".into());
            }
            Ok(())
        }
        Err(p) => Err(format!(
            "ImageFiles::open panicked: {:?}",
            p.downcast_ref::<String>()
                .cloned()
                .or(p.downcast_ref::<&str>().map(|s| s.to_string()))
        )),
    }
}

#[test]
fn on_disk_loaders_give_errors_not_panics_for_any_file() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    let states: Vec<Vec<u8>> = vec![
        br#"{"state":"in-progress"}"#.to_vec(),
        br#"{"state":"ready","checksum":"x"}"#.to_vec(),
        br#"{"state":"failed","error":"e","failure":"checksum"}"#.to_vec(),
        br#"{"state":"exploded"}"#.to_vec(),
        b"".to_vec(),
        b"{".to_vec(),
    ];
    let mut runner = TestRunner::new(cases(400));
    let strategy = (
        prop_oneof![
            // Near-valid specs with sizes and block sizes at the edges (block size 0 is
            // covered by its own test below).
            (
                // Not a huge size over a small block size: a known core bug (below).
                prop_oneof![Just(0u64), 1u64..100_000_000],
                prop_oneof![
                    Just(1u64),
                    Just(4096),
                    Just(16384),
                    Just(u64::MAX),
                    2u64..1_000_000
                ]
            )
                .prop_map(|(s, b)| spec_json(s, b).into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..300),
        ],
        0..states.len(),
        proptest::collection::vec(any::<u8>(), 0..2000),
        prop_oneof![Just(0u64), 0u64..10_000_000],
    );
    let tried = std::cell::Cell::new(0u32);
    runner
        .run(&strategy, |(spec, state, bitmap, data_len)| {
            tried.set(tried.get() + 1);
            let _ = std::fs::remove_dir_all(&dir);
            write_image(&dir, &spec, &states[state], &bitmap, data_len);
            open_no_panic(&dir).map_err(|e| {
                TestCaseError::fail(format!("{e}: spec {:?}", String::from_utf8_lossy(&spec)))
            })
        })
        .unwrap();
    println!("{} on-disk image directories loaded", tried.get());
}

#[test]
fn a_spec_with_block_size_zero_is_an_error_not_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    write_image(
        &dir,
        spec_json(1 << 20, 0).as_bytes(),
        br#"{"state":"in-progress"}"#,
        &[0; 8],
        1 << 20,
    );
    open_no_panic(&dir).unwrap();
}

#[test]
fn a_spec_claiming_an_exabyte_of_one_byte_blocks_is_an_error_not_an_abort() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    write_image(
        &dir,
        spec_json(u64::MAX, 1).as_bytes(),
        br#"{"state":"in-progress"}"#,
        &[0; 8],
        0,
    );
    open_no_panic(&dir).unwrap();
}

#[test]
fn the_peer_data_endpoint_parses_any_range_header_without_serving_wrong_bytes() {
    let origin = Origin::start();
    let data = random_bytes(1 << 20, 61);
    origin.put("r.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "r",
        "--url",
        &origin.url("r.raw"),
        "--checksum",
        &sha512_hex(&data),
    ]);
    d.wait_state("r", "ready", Duration::from_secs(60));
    let host = d.server.strip_prefix("http://").unwrap().to_string();
    let size = data.len() as u64;
    let num = prop_oneof![
        Just(String::new()),
        (0u64..size + 10).prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("99999999999999999999".to_string()),
        Just("-1".to_string()),
        "[ 0-9a-z+-]{0,6}",
    ];
    let header = prop_oneof![
        (num.clone(), num).prop_map(|(a, b)| format!("bytes={a}-{b}")),
        "[ -~]{0,40}",
    ];
    let mut runner = TestRunner::new(cases(300));
    let tried = std::cell::Cell::new(0u32);
    runner
        .run(&header, |h| {
            tried.set(tried.get() + 1);
            let (status, head, body) = get_range(&host, "/v1/images/r/data", &h);
            match status {
                206 => {
                    let cr = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-range: bytes ")
                                .map(str::to_string)
                        })
                        .ok_or_else(|| TestCaseError::fail("206 without Content-Range"))?;
                    let span = cr.split_once('/').unwrap().0.to_string();
                    let (a, b) = span.split_once('-').unwrap();
                    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                    prop_assert!(a <= b && b < data.len(), "{h:?}: {cr}");
                    prop_assert!(body == data[a..=b], "{:?}: wrong bytes for {}", h, cr);
                }
                // No Range header at all (an empty one is sent as none) serves the whole image.
                200 => prop_assert!(body == data, "{:?}: 200 with wrong bytes", h),
                416 => {}
                s => return Err(TestCaseError::fail(format!("{h:?}: status {s}"))),
            }
            Ok(())
        })
        .unwrap();
    println!("{} Range headers against /data", tried.get());
}

/// GET with a raw Range header; (status, head, body). The body of a 206/200 has a
/// Content-Length here (the endpoint sets it).
fn get_range(host: &str, path: &str, range: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let range_line = if range.is_empty() {
        String::new()
    } else {
        format!("Range: {range}\r\n")
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{range_line}\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

#[test]
fn the_origin_content_range_is_checked_for_any_header() {
    let origin = Origin::start();
    let size = 1u64 << 20;
    let data = random_bytes(size as usize, 62);
    origin.put("c.raw", data.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let src = HttpSource::new(&origin.url("c.raw"), HttpClients::default(), true);
    let pin: Identity = rt.block_on(src.probe()).unwrap();
    let (start, end) = (16384u64, 32768u64);
    let num = prop_oneof![
        Just(start.to_string()),
        Just((end - 1).to_string()),
        Just(size.to_string()),
        (0u64..size * 2).prop_map(|n| n.to_string()),
        // Not u64::MAX: as the last byte after the asked start it is a known core bug
        // (an overflow panic in debug builds), see tests/faults.rs.
        Just((u64::MAX - 1).to_string()),
        "[ 0-9*+-]{0,5}",
    ];
    let header = prop_oneof![
        (num.clone(), num.clone(), num).prop_map(|(a, b, t)| format!("bytes {a}-{b}/{t}")),
        "[ -~]{0,30}",
        // The right answers, so that acceptance is tried too.
        Just(format!("bytes {start}-{}/{size}", end - 1)),
        Just(format!("bytes {start}-{}/*", end - 1)),
    ];
    let mut runner = TestRunner::new(cases(300));
    let tried = std::cell::Cell::new(0u32);
    runner
        .run(&header, |h| {
            tried.set(tried.get() + 1);
            origin.clear_faults();
            origin.fault(Fault::ContentRange(h.clone()));
            let r = rt.block_on(async {
                let s = src
                    .read(ByteRange::new(start, end), &pin, Priority::Reader)
                    .await?;
                let chunks: Vec<_> = futures::StreamExt::collect::<Vec<_>>(s).await;
                let mut out = Vec::new();
                for c in chunks {
                    out.extend_from_slice(&c?);
                }
                Ok::<_, bifs::core::SourceError>(out)
            });
            // What the header must say for the reply to be taken.
            let exact = h
                .trim()
                .strip_prefix("bytes ")
                .and_then(|r| r.split_once('/'))
                .and_then(|(span, total)| {
                    let (a, b) = span.split_once('-')?;
                    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                    let total_ok = total.parse::<u64>().map_or(true, |t| t == size);
                    (a == start && b + 1 == end && total_ok).then_some(())
                })
                .is_some();
            match r {
                Ok(bytes) => {
                    prop_assert!(exact, "{h:?} was taken");
                    prop_assert!(bytes == data[start as usize..end as usize]);
                }
                Err(e) => prop_assert!(!exact, "{h:?} refused: {e}"),
            }
            Ok(())
        })
        .unwrap();
    println!("{} Content-Range headers against HttpSource", tried.get());
}
