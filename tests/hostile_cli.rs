//! Hostile input on the command line and in YAML: every CLI command with bad values
//! (names with `/`, `..`, NUL, 10 KiB; durations and sizes that overflow u64), YAML bombs
//! and bad shapes through `bifs apply`: exit 2 with a message, never a panic or a file
//! outside the disk's image folders; and URL credentials never shown.

mod common;

use std::time::Duration;

use common::hostile::{http, setup, tree, KIB};
use common::{random_bytes, sha512_hex, tail, Daemon, BIN};

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
        .origin
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
fn stored_url_credentials_are_readable_by_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    let spec = s.d.disk.join("images/good/spec.json");
    for p in [s.d.disk.clone(), spec] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", p.display());
    }
}
