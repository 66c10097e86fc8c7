//! Failures a user can cause beyond bad input: a full disk, deleting an image in use,
//! a daemon guarded by a token; and the stricter `--require-verified` mode.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::origin::Origin;
use common::{
    disk_uuid8, random_bytes, sh, sha512_hex, start_cluster, wait_for, Daemon, SmallDisk,
};

const MIB: usize = 1 << 20;

#[test]
fn a_full_disk_fails_the_image_with_a_clear_message_and_recovers_after_space_is_freed() {
    let origin = Origin::start();
    let data = random_bytes(24 * MIB, 31);
    origin.put("f.raw", data.clone());
    origin.put("huge.raw", vec![0u8; 64 * MIB]);
    let base = tempfile::tempdir().unwrap();
    let disk = base.path().join("disk");
    let _tmpfs = SmallDisk::new(&disk, 40);
    let d = Daemon::start_with(&["--disk", disk.to_str().unwrap()]);
    // Two disks now: the daemon's own and the small one. Ask for the small one by uuid.
    let uuid: serde_json::Value =
        serde_json::from_slice(&std::fs::read(disk.join("bifs-disk.json")).unwrap()).unwrap();
    let uuid = uuid["uuid"].as_str().unwrap()[..8].to_string();
    // Larger than the disk: refused at create, nothing made.
    let out = d.bifs(&[
        "create",
        "huge",
        "--url",
        &origin.url("huge.raw"),
        "--disk",
        &uuid,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not enough space"), "{err}");
    assert!(!disk.join("images/huge").exists());
    // Fits at create, but the disk fills up under it while the fill runs.
    origin.set_chunk_delay(Duration::from_millis(20));
    d.bifs_ok(&[
        "create",
        "fits",
        "--url",
        &origin.url("f.raw"),
        "--disk",
        &uuid,
        "--checksum",
        &sha512_hex(&data),
    ]);
    let filler = disk.join("filler");
    let (rc, _, _) = sh(&format!(
        "dd if=/dev/zero of={} bs=1M count=40 2>/dev/null",
        filler.display()
    ));
    assert_ne!(rc, 0, "the filler fills the disk");
    origin.set_chunk_delay(Duration::ZERO);
    let s = wait_for("the image to fail", Duration::from_secs(60), || {
        let s = d.status("fits");
        (s["state"] == "failed").then_some(s)
    });
    let msg = s["error"].as_str().unwrap();
    assert!(
        msg.contains("No space left") && msg.contains("free space"),
        "{msg}"
    );
    // Other work goes on: the daemon answers, and after space is freed a retry completes it.
    std::fs::remove_file(&filler).unwrap();
    d.bifs_ok(&["fill", "fits"]);
    d.wait_state("fits", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("fits")).unwrap() == data);
}

#[test]
fn a_checksum_failure_cannot_be_retried_away() {
    let origin = Origin::start();
    origin.put("c.raw", random_bytes(MIB, 32));
    let d = Daemon::start();
    d.bifs_ok(&[
        "create",
        "bad",
        "--url",
        &origin.url("c.raw"),
        "--checksum",
        &sha512_hex(b"x"),
    ]);
    let out = d.bifs(&["status", "bad", "--wait", "failed", "--timeout", "60s"]);
    assert!(out.status.success());
    let out = d.bifs(&["fill", "bad"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("delete and recreate"));
    assert_eq!(d.status("bad")["state"], "failed");
}

#[test]
fn deleting_an_image_in_use_ends_its_reads_and_frees_its_files() {
    let origin = Origin::start();
    let data = random_bytes(16 * MIB, 33);
    origin.put("d.raw", data.clone());
    origin.set_chunk_delay(Duration::from_millis(20));
    let d = Daemon::start();
    d.bifs_ok(&["create", "gone", "--url", &origin.url("d.raw")]);
    let f = File::open(d.path("gone")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    // In use: refused, naming who holds it (this test process).
    let out = d.bifs(&["delete", "gone"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains(&format!("pid {} (", std::process::id())),
        "{err}"
    );
    assert!(d.path("gone").exists(), "nothing was deleted");
    d.bifs_ok(&["delete", "gone", "--force"]);
    assert!(!d.path("gone").exists());
    assert!(!d.disk.join("images/gone").exists(), "its files are gone");
    assert!(
        f.read_exact_at(&mut buf, 15 * MIB as u64).is_err(),
        "reads of a deleted image fail"
    );
    let out = d.bifs(&["delete", "gone"]);
    assert_eq!(out.status.code(), Some(1));
    // The name is free again, for a new image with another source.
    origin.set_chunk_delay(Duration::ZERO);
    origin.put("e.raw", random_bytes(MIB, 34));
    d.bifs_ok(&["create", "gone", "--url", &origin.url("e.raw")]);
    d.wait_state("gone", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("gone")).unwrap() == random_bytes(MIB, 34));
}

#[test]
fn require_verified_reads_wait_for_ready() {
    let origin = Origin::start();
    let data = random_bytes(8 * MIB, 35);
    origin.put("v.raw", data.clone());
    origin.set_chunk_delay(Duration::from_millis(10));
    let d = Daemon::start_with(&["--require-verified"]);
    d.bifs_ok(&["create", "strict", "--url", &origin.url("v.raw")]);
    let path = d.path("strict");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        buf
    });
    wait_for("the reader", Duration::from_secs(60), || {
        if reader.is_finished() {
            return Some(());
        }
        // While the reader waits, the image is not ready yet.
        assert_ne!(d.status("strict")["state"], "failed");
        None
    });
    assert_eq!(
        d.status("strict")["state"],
        "ready",
        "a read returned before the image was verified"
    );
    assert_eq!(reader.join().unwrap(), &data[..4096]);
}

#[test]
fn a_token_guards_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let d = Daemon::start_with(&["--token-file", token.to_str().unwrap()]);
    let out = d.bifs(&["list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bearer token"));
    let out = Command::new(common::BIN)
        .args(["list", "--json"])
        .env("BIFS_SERVER", &d.server)
        .env("BIFS_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, out, _) = sh(&format!("curl -s {}/healthz", d.server));
    assert_eq!(out, "ok\n");
    assert!(
        !d.log().contains("s3cret"),
        "the token never reaches the log"
    );
}

#[test]
fn metrics_show_each_image() {
    let origin = Origin::start();
    origin.put("m.raw", random_bytes(MIB, 36));
    let d = Daemon::start();
    d.bifs_ok(&["create", "metered", "--url", &origin.url("m.raw")]);
    d.wait_state("metered", "ready", Duration::from_secs(60));
    let (rc, out, _) = sh(&format!("curl -sf {}/metrics", d.server));
    assert_eq!(rc, 0);
    assert!(out.contains("bifs_images 1"), "{out}");
    assert!(
        out.contains("bifs_image_size_bytes{name=\"metered\""),
        "{out}"
    );
    assert!(out.contains("state=\"ready\"} 1"), "{out}");
    // How long the fill and the hashing gave way to readers (none read here).
    assert!(
        out.contains("bifs_image_fill_held_seconds_total{name=\"metered\""),
        "{out}"
    );
    assert!(
        out.contains("bifs_image_hash_held_seconds_total{name=\"metered\""),
        "{out}"
    );
    assert!(out.contains("\nbifs_hash_held_seconds_total "), "{out}");
    // And in status, for a person and for programs.
    let json = d.bifs_ok(&["status", "metered", "--json"]);
    assert!(json.contains("\"hashHeldMs\":"), "{json}");
    assert!(json.contains("\"fillHeldMs\":"), "{json}");
}

#[test]
fn unused_copies_are_cleaned_up_after_the_wait_but_never_the_last_or_one_in_use() {
    let origin = Origin::start();
    let data = random_bytes(2 * MIB, 41);
    origin.put("w.raw", data.clone());
    origin.put("v.raw", random_bytes(MIB, 42));
    let url = origin.url("w.raw");
    let nodes = start_cluster(2, |_| vec!["--cleanup-wait".into(), "2s".into()]);
    let (a, b) = (&nodes[0], &nodes[1]);
    for d in [a, b] {
        d.bifs_ok(&["create", "w", "--url", &url]);
        d.wait_state("w", "ready", Duration::from_secs(60));
    }
    // A holds its copy open; B's copy is unused: B's goes, A's stays.
    let held = File::open(a.path("w")).unwrap();
    common::wait_for(
        "B's unused copy to be removed",
        Duration::from_secs(30),
        || (!b.path("w").exists() && !b.disk.join("images/w").exists()).then_some(()),
    );
    assert!(a.path("w").exists(), "the copy in use stays");
    // Now A holds the only copy: even unused it is never removed.
    drop(held);
    let v_url = origin.url("v.raw");
    a.bifs_ok(&["create", "only", "--url", &v_url]);
    a.wait_state("only", "ready", Duration::from_secs(60));
    let quiet_deadline = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < quiet_deadline {
        assert!(
            a.path("w").exists() && a.path("only").exists(),
            "a last copy was removed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(std::fs::read(a.path("w")).unwrap() == data);
}

#[test]
fn manual_cleanup_is_refused_for_the_last_copy_and_a_copy_in_use() {
    let origin = Origin::start();
    origin.put("m.raw", random_bytes(MIB, 43));
    let d = Daemon::start();
    d.bifs_ok(&["create", "m", "--url", &origin.url("m.raw")]);
    d.wait_state("m", "ready", Duration::from_secs(60));
    let out = d.bifs(&["cleanup", "m"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keeps at least 1 ready copy"), "{err}");
    let f = File::open(d.path("m")).unwrap();
    let err = String::from_utf8_lossy(&d.bifs(&["cleanup", "m"]).stderr).to_string();
    assert!(
        err.contains("in use") && err.contains("open handle"),
        "{err}"
    );
    drop(f);
    assert!(d.path("m").exists());
}

#[test]
fn a_lost_copy_is_made_again_on_another_node_to_keep_the_minimum() {
    let origin = Origin::start();
    let data = random_bytes(3 * MIB, 44);
    origin.put("r.raw", data.clone());
    let yaml = format!(
        "apiVersion: longhorn.io/v1beta2\nkind: BackingImage\nmetadata:\n  name: kept\nspec:\n  \
         minNumberOfCopies: 2\n  sourceType: download\n  sourceParameters:\n    url: {}\n",
        origin.url("r.raw")
    );
    let mut nodes = start_cluster(3, |_| Vec::new());
    let file = nodes[0].dir.path().join("kept.yaml");
    std::fs::write(&file, yaml).unwrap();
    for n in &nodes[..2] {
        n.bifs_ok(&["apply", "-f", file.to_str().unwrap()]);
        n.wait_state("kept", "ready", Duration::from_secs(60));
    }
    // Two ready copies, as asked: the third node does not fetch one.
    assert!(!nodes[2].path("kept").exists());
    assert_eq!(nodes[0].status("kept")["minNumberOfCopies"], 2);
    // One holder is lost: the third node makes a copy (from the peer) within a bound.
    nodes[0].kill9();
    let third = &nodes[2];
    let t0 = std::time::Instant::now();
    while !third.path("kept").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the third node made no copy: {}",
            common::tail(&third.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    third.wait_state("kept", "ready", Duration::from_secs(60));
    assert!(std::fs::read(third.path("kept")).unwrap() == data);
    drop(nodes.remove(0));
}

/// A strict reader of the Prometheus text format: every sample belongs to a family
/// declared by `# TYPE` before it, names and labels are well formed, values are numbers.
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut types = std::collections::BTreeMap::new();
    let mut samples = std::collections::BTreeMap::new();
    let ident = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(ident(name), "bad family name {name:?}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(ident(name), "bad metric name in {line:?}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                for pair in inner.split("\",").map(|p| p.trim_end_matches('"')) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(ident(k) && !v.contains('"'), "bad label in {line:?}");
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample before its # TYPE: {line:?}"
        );
        samples.insert(series.to_string(), v);
    }
    samples
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_as_reads_happen() {
    let origin = Origin::start();
    let data = random_bytes(8 * MIB, 37);
    origin.put("p.raw", data.clone());
    let d = Daemon::start();
    d.bifs_ok(&["create", "prom", "--url", &origin.url("p.raw"), "--no-fill"]);
    let scrape = || {
        let (rc, out, _) = sh(&format!("curl -sf {}/metrics", d.server));
        assert_eq!(rc, 0);
        parse_prometheus(&out)
    };
    let before = scrape();
    let f = File::open(d.path("prom")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 5 * MIB as u64).unwrap();
    f.read_exact_at(&mut buf, 5 * MIB as u64).unwrap();
    let after = scrape();
    let get = |m: &std::collections::BTreeMap<String, f64>, k: &str| {
        *m.get(k).unwrap_or_else(|| panic!("no {k}"))
    };
    assert!(
        get(&after, "bifs_source_bytes_total{kind=\"url\"}")
            > get(&before, "bifs_source_bytes_total{kind=\"url\"}")
    );
    assert!(
        get(&after, "bifs_source_requests_total{kind=\"url\"}")
            > get(&before, "bifs_source_requests_total{kind=\"url\"}")
    );
    assert!(
        get(&after, "bifs_reads_total{result=\"miss\"}")
            > get(&before, "bifs_reads_total{result=\"miss\"}")
    );
    assert!(get(&after, "bifs_source_first_byte_seconds_count{kind=\"url\"}") >= 1.0);
    let disk = after
        .keys()
        .find(|k| k.starts_with("bifs_disk_bytes{") && k.contains("kind=\"total\""))
        .unwrap();
    assert!(get(&after, disk) > 0.0);
    assert!(
        get(&after, "bifs_reads_total{result=\"hit\"}")
            > get(&before, "bifs_reads_total{result=\"hit\"}"),
        "the second read was a hit"
    );
}

#[test]
fn a_full_disk_evicts_the_least_recently_used_copy_held_elsewhere_never_one_in_use() {
    let origin = Origin::start();
    for (i, n) in ["e1", "e2", "e3"].iter().enumerate() {
        origin.put(&format!("{n}.raw"), random_bytes(9 * MIB, 60 + i as u64));
    }
    let base = tempfile::tempdir().unwrap();
    let small = base.path().join("small");
    let _tmpfs = SmallDisk::new(&small, 24);
    let small_disk = small.to_str().unwrap().to_string();
    let nodes = start_cluster(2, |i| {
        if i == 0 {
            vec!["--disk".into(), small_disk.clone()]
        } else {
            Vec::new()
        }
    });
    let (a, b) = (&nodes[0], &nodes[1]);
    let uuid = disk_uuid8(&small);
    for n in ["e1", "e2"] {
        let url = origin.url(&format!("{n}.raw"));
        b.bifs_ok(&["create", n, "--url", &url]);
        b.wait_state(n, "ready", Duration::from_secs(60));
        a.bifs_ok(&["create", n, "--url", &url, "--disk", &uuid]);
        a.wait_state(n, "ready", Duration::from_secs(60));
    }
    // e2 is in use on A; e1 is the least recently used copy, and B holds it too.
    let held = File::open(a.path("e2")).unwrap();
    wait_for("A to see B's ready copies", Duration::from_secs(30), || {
        let s = a.status("e1");
        (s["copies"][0]["state"] == "ready").then_some(())
    });
    a.bifs_ok(&[
        "create",
        "e3",
        "--url",
        &origin.url("e3.raw"),
        "--disk",
        &uuid,
    ]);
    a.wait_state("e3", "ready", Duration::from_secs(60));
    assert!(
        !a.path("e1").exists(),
        "the least recently used copy held elsewhere was evicted"
    );
    assert!(a.path("e2").exists(), "a copy in use is never evicted");
    assert!(b.path("e1").exists(), "the cluster still holds e1");
    let (_, metrics, _) = sh(&format!("curl -s {}/metrics", a.server));
    assert!(metrics.contains("bifs_evictions_total 1"), "{metrics}");
    drop(held);
}

#[test]
fn disks_show_space_and_orphans_and_cleanup_orphans_removes_them() {
    let origin = Origin::start();
    origin.put("s.raw", random_bytes(2 * MIB, 70));
    let mut d = Daemon::start();
    d.bifs_ok(&["create", "spaced", "--url", &origin.url("s.raw")]);
    d.wait_state("spaced", "ready", Duration::from_secs(60));
    d.stop();
    // A folder nothing claims: a half-written leftover.
    let orphan = d.disk.join("images/leftover");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("data"), b"junk").unwrap();
    d.spawn();
    let v: serde_json::Value = serde_json::from_str(&d.bifs_ok(&["disks", "--json"])).unwrap();
    let disk = &v[0];
    assert!(disk["capacityBytes"].as_u64().unwrap() > 0, "{v}");
    assert!(
        disk["usedByImagesBytes"].as_u64().unwrap() >= 2 * MIB as u64,
        "{v}"
    );
    assert_eq!(disk["images"], 1);
    assert_eq!(
        disk["orphans"][0]["path"],
        orphan.display().to_string(),
        "{v}"
    );
    let table = d.bifs_ok(&["disks"]);
    assert!(
        table.contains("orphan:") && table.contains("leftover"),
        "{table}"
    );
    assert!(d.status("spaced")["bytesAllocated"].as_u64().unwrap() >= 2 * MIB as u64);
    let out = d.bifs_ok(&["cleanup", "--orphans"]);
    assert!(out.contains("1 orphan folder(s) removed"), "{out}");
    assert!(!orphan.exists());
    assert!(d.path("spaced").exists(), "images are untouched");
}
