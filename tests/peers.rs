//! Several bifs daemons on loopback ports fetching from each other: a node gets an image
//! from a ready peer (with the origin down, and with the origin up but unused), a lying
//! peer's corrupt pieces are caught by the piece digests and fetched again elsewhere,
//! and a peer killed mid-fill leaves the other node's readers unharmed.

mod common;

use std::time::Duration;

use common::origin::Origin;
use common::proxy::LyingPeer;
use common::{random_bytes, sha512_hex, Daemon};

const MIB: usize = 1024 * 1024;

/// Node A with `name` ready from `origin`.
fn ready_node(origin: &Origin, name: &str, file: &str, sum: &str) -> Daemon {
    let a = Daemon::start();
    a.bifs_ok(&[
        "create",
        name,
        "--url",
        &origin.url(file),
        "--checksum",
        sum,
    ]);
    a.wait_state(name, "ready", Duration::from_secs(60));
    a
}

#[test]
fn a_node_gets_an_image_from_a_ready_peer_while_the_origin_is_down() {
    let origin = Origin::start();
    let data = random_bytes(24 * MIB + 12345, 71);
    let sum = sha512_hex(&data);
    origin.put("p.raw", data.clone());
    let url = origin.url("p.raw");
    let a = ready_node(&origin, "pimg", "p.raw", &sum);
    drop(origin); // connection refused from now on
    let b = Daemon::start_with(&["--peer", &a.server]);
    b.bifs_ok(&["create", "pimg", "--url", &url, "--checksum", &sum]);
    let s = b.wait_state("pimg", "ready", Duration::from_secs(60));
    assert_eq!(s["computedChecksum"], sum);
    assert!(std::fs::read(b.path("pimg")).unwrap() == data, "cmp equal");
    let copies = s["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 1, "{s}");
    assert_eq!(copies[0]["state"], "ready");
    assert_eq!(copies[0]["node"], a.server);
}

#[test]
fn with_a_ready_peer_the_origin_sends_a_new_node_almost_nothing() {
    let origin = Origin::start();
    let data = random_bytes(32 * MIB, 72);
    let sum = sha512_hex(&data);
    origin.put("q.raw", data.clone());
    let a = ready_node(&origin, "qimg", "q.raw", &sum);
    let before = origin.served();
    let b = Daemon::start_with(&["--peer", &a.server]);
    b.bifs_ok(&[
        "create",
        "qimg",
        "--url",
        &origin.url("q.raw"),
        "--checksum",
        &sum,
    ]);
    b.wait_state("qimg", "ready", Duration::from_secs(60));
    assert!(std::fs::read(b.path("qimg")).unwrap() == data);
    let sent = origin.served() - before;
    assert!(
        sent * 100 < data.len() as u64,
        "the origin sent {sent} bytes for a {} byte image",
        data.len()
    );
}

#[test]
fn a_peer_that_corrupts_pieces_is_caught_and_never_served() {
    let origin = Origin::start();
    let data = random_bytes(16 * MIB, 73);
    let sum = sha512_hex(&data);
    origin.put("c.raw", data.clone());
    let a = ready_node(&origin, "cimg", "c.raw", &sum);
    let liar = LyingPeer::start(&a.server, 2);
    let b = Daemon::start_with(&["--peer", &liar.url()]);
    b.bifs_ok(&[
        "create",
        "cimg",
        "--url",
        &origin.url("c.raw"),
        "--checksum",
        &sum,
    ]);
    // Every byte read through the mount is right, before and after ready.
    let mut got = vec![0u8; data.len()];
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(b.path("cimg")).unwrap();
    for off in (0..data.len()).step_by(MIB).rev() {
        f.read_exact_at(&mut got[off..off + MIB], off as u64)
            .unwrap();
    }
    assert!(
        got == data,
        "no corrupt byte reached a reader: {}",
        common::tail(&b.log(), 60)
    );
    let s = b.wait_state("cimg", "ready", Duration::from_secs(60));
    assert_eq!(s["computedChecksum"], sum);
    assert!(liar.corrupted() > 0, "the proxy corrupted nothing");
    assert!(
        b.log().contains("wrong digest"),
        "the daemon said why it refetched"
    );
}

#[test]
fn a_peer_killed_mid_fill_harms_no_reader_and_resumes_its_files() {
    let origin = Origin::start();
    let data = random_bytes(48 * MIB, 74);
    let sum = sha512_hex(&data);
    origin.put("k.raw", data.clone());
    let mut a = ready_node(&origin, "kimg", "k.raw", &sum);
    // A slow link to A, so that B is still filling from it when A dies.
    let slow = LyingPeer::start_with(&a.server, 0, Duration::from_millis(300));
    let b = Daemon::start_with(&["--peer", &slow.url()]);
    b.bifs_ok(&[
        "create",
        "kimg",
        "--url",
        &origin.url("k.raw"),
        "--checksum",
        &sum,
    ]);
    common::wait_for("B to fetch from A", Duration::from_secs(30), || {
        (b.status("kimg")["bytesCached"].as_u64().unwrap() > 0).then_some(())
    });
    let before_kill = origin.served();
    a.kill9();
    assert_ne!(
        b.status("kimg")["state"],
        "ready",
        "B was still filling when A died"
    );
    // B's readers read everything right: what A no longer serves comes from the origin.
    assert!(std::fs::read(b.path("kimg")).unwrap() == data);
    b.wait_state("kimg", "ready", Duration::from_secs(60));
    assert!(
        origin.served() > before_kill,
        "the rest came from the origin"
    );
    common::wait_for("A to show as unknown", Duration::from_secs(30), || {
        (b.status("kimg")["copies"][0]["state"] == "unknown").then_some(())
    });
    // A comes back on the same disk: ready at once, nothing refetched.
    let served = origin.served();
    a.spawn();
    assert_eq!(a.status("kimg")["state"], "ready");
    assert_eq!(origin.served(), served);
    assert!(std::fs::read(a.path("kimg")).unwrap() == data);
}

#[test]
fn peers_found_through_dns_serve_like_listed_ones() {
    let origin = Origin::start();
    let data = random_bytes(8 * MIB, 75);
    let sum = sha512_hex(&data);
    origin.put("d.raw", data.clone());
    let a = ready_node(&origin, "dimg", "d.raw", &sum);
    let port = a.server.rsplit(':').next().unwrap().to_string();
    // As a headless Service lists a DaemonSet's pods: every address of the name.
    let b = Daemon::start_with(&["--peers-dns", &format!("localhost:{port}")]);
    let before = origin.served();
    common::wait_for("B to resolve and see A", Duration::from_secs(30), || {
        let out = b.bifs(&[
            "create",
            "dimg",
            "--url",
            &origin.url("d.raw"),
            "--checksum",
            &sum,
        ]);
        out.status.success().then_some(())
    });
    let s = b.wait_state("dimg", "ready", Duration::from_secs(60));
    assert!(std::fs::read(b.path("dimg")).unwrap() == data);
    let copies = s["copies"].as_array().unwrap();
    assert!(
        copies
            .iter()
            .any(|c| c["node"] == format!("http://127.0.0.1:{port}") && c["state"] == "ready"),
        "{s}"
    );
    assert!((origin.served() - before) * 100 < data.len() as u64);
}

#[test]
fn three_fresh_nodes_filling_at_once_share_the_work_and_the_origin_sends_about_one_copy() {
    let origin = Origin::start();
    let data = random_bytes(32 * MIB, 76);
    let sum = sha512_hex(&data);
    origin.put("t.raw", data.clone());
    // A rate-limited origin: 64 KiB pieces 16 ms apart (4 MiB/s per stream).
    origin.set_chunk_delay(Duration::from_millis(16));
    let nodes = common::start_cluster(3, |_| Vec::new());
    let url = origin.url("t.raw");
    std::thread::scope(|s| {
        for n in &nodes {
            let (url, sum) = (&url, &sum);
            s.spawn(move || n.bifs_ok(&["create", "timg", "--url", url, "--checksum", sum]));
        }
    });
    for n in &nodes {
        let s = n.wait_state("timg", "ready", Duration::from_secs(120));
        assert_eq!(s["computedChecksum"], sum);
        assert!(std::fs::read(n.path("timg")).unwrap() == data, "cmp equal");
    }
    let ratio = origin.served() as f64 / data.len() as f64;
    println!("origin sent {ratio:.2}x the image for 3 nodes");
    assert!(ratio < 1.2, "origin sent {ratio:.2}x the image for 3 nodes");
}

#[test]
fn an_image_named_only_is_created_as_a_peer_holds_it() {
    let origin = Origin::start();
    let data = random_bytes(4 * MIB + 5, 77);
    let sum = sha512_hex(&data);
    origin.put("n.raw", data.clone());
    let a = ready_node(&origin, "named", "n.raw", &sum);
    drop(origin);
    let b = Daemon::start_with(&["--peer", &a.server]);
    let (rc, out, err) = common::sh(&format!(
        "curl -sf -X POST {}/v1/images/named/from-peers",
        b.server
    ));
    assert_eq!(rc, 0, "{out} {err}");
    let s = b.wait_state("named", "ready", Duration::from_secs(60));
    assert_eq!(s["checksum"], sum, "the spec came from the peer");
    assert!(std::fs::read(b.path("named")).unwrap() == data);
    // A name no node holds: a clear 404.
    let (_, out, _) = common::sh(&format!(
        "curl -s -X POST {}/v1/images/nobody/from-peers",
        b.server
    ));
    assert!(out.contains("no peer holds a copy"), "{out}");
}

#[test]
fn an_uploaded_image_reaches_other_nodes_from_peers_and_says_when_it_cannot_be_recovered() {
    let data = random_bytes(6 * MIB + 333, 78);
    let sum = sha512_hex(&data);
    let mut a = Daemon::start();
    let file = a.dir.path().join("up.img");
    std::fs::write(&file, &data).unwrap();
    a.bifs_ok(&[
        "upload",
        "upimg",
        file.to_str().unwrap(),
        "--checksum",
        &sum,
    ]);
    a.wait_state("upimg", "ready", Duration::from_secs(60));
    // B gets it from A: no URL exists, the spec and every byte come from the peer.
    let b = Daemon::start_with(&["--peer", &a.server]);
    b.bifs_ok(&["create", "upimg"]);
    let s = b.wait_state("upimg", "ready", Duration::from_secs(60));
    assert_eq!(s["source"]["type"], "upload");
    assert!(std::fs::read(b.path("upimg")).unwrap() == data);
    // C, with A gone and no other copy, says the image cannot be recovered.
    let c = Daemon::start_with(&["--peer", &a.server, "--read-timeout", "3s"]);
    c.bifs_ok(&["create", "upimg"]);
    // A goes before C's fill starts (it waits 1.5 s for its peers): C holds one block.
    a.kill9();
    let e = std::fs::read(c.path("upimg")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    common::wait_for("C to say why", Duration::from_secs(30), || {
        let s = c.status("upimg");
        s["error"]
            .as_str()
            .unwrap()
            .contains("cannot be recovered")
            .then_some(())
    });
}

#[test]
fn bifs_list_counts_the_ready_copies_in_the_cluster() {
    let origin = Origin::start();
    let data = random_bytes(MIB, 79);
    let sum = sha512_hex(&data);
    origin.put("l.raw", data);
    let a = ready_node(&origin, "limg", "l.raw", &sum);
    let b = Daemon::start_with(&["--peer", &a.server]);
    b.bifs_ok(&[
        "create",
        "limg",
        "--url",
        &origin.url("l.raw"),
        "--checksum",
        &sum,
    ]);
    b.wait_state("limg", "ready", Duration::from_secs(60));
    let list = b.bifs_ok(&["list"]);
    assert!(list.lines().next().unwrap().contains("COPIES"), "{list}");
    let row = list.lines().find(|l| l.starts_with("limg")).unwrap();
    assert!(row.contains(" 2/2 "), "both copies ready: {list}");
}
