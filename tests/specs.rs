//! Longhorn's ways of describing backing images, run through the real binary on a real
//! mount: the seed's BackingImage YAML (`bifs apply`), its StorageClass parameters
//! (`bifs ensure`), a `--manifests` folder laid out as a ConfigMap volume, and the input
//! mistakes that must exit 2 naming the field.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::origin::Origin;
use common::{random_bytes, sha512_hex, tail, wait_for, Daemon, BIN};

const MIB: usize = 1 << 20;
const READY: Duration = Duration::from_secs(60);

/// The seed's download example, verbatim but for the URL and checksum (ours, local).
const SEED_DOWNLOAD: &str = "apiVersion: longhorn.io/v1beta1
kind: BackingImage
metadata:
  name: bi-download
  namespace: longhorn-system
spec:
  sourceType: download
  sourceParameters:
    url: https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw
  checksum: 304f3ed30ca6878e9056ee6f1b02b328239f0d0c2c1272840998212f9734b196371560b3b939037e4f4c2884ce457c2cbc9f0621f4f5d1ca983983c8cdf8cd9a
";
const SEED_URL: &str = "https://longhorn-backing-image.s3-us-west-1.amazonaws.com/parrot.raw";
const SEED_SUM: &str = "304f3ed30ca6878e9056ee6f1b02b328239f0d0c2c1272840998212f9734b196371560b3b939037e4f4c2884ce457c2cbc9f0621f4f5d1ca983983c8cdf8cd9a";

/// The seed's StorageClass example, verbatim but for the URL and checksum.
const SEED_STORAGE_CLASS: &str = r#"kind: StorageClass
apiVersion: storage.k8s.io/v1
metadata:
  name: longhorn-backing-image-example
provisioner: driver.longhorn.io
allowVolumeExpansion: true
reclaimPolicy: Delete
volumeBindingMode: Immediate
parameters:
  numberOfReplicas: "3"
  staleReplicaTimeout: "2880"
  backingImage: "bi-download"
  backingImageDataSourceType: "download"
  backingImageDataSourceParameters: '{"url": "https://backing-image-example.s3-region.amazonaws.com/test-backing-image"}'
  backingImageChecksum: "SHA512 checksum of the backing image"
"#;

fn seed_download(name: &str, url: &str, sum: &str) -> String {
    SEED_DOWNLOAD
        .replace("name: bi-download", &format!("name: {name}"))
        .replace(SEED_URL, url)
        .replace(SEED_SUM, sum)
}

/// Runs `bifs ARGS` with `input` on its standard input.
fn bifs_stdin(d: &Daemon, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("BIFS_SERVER", &d.server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts the exit code and that stderr holds every one of `words`; returns stderr.
fn expect_exit(out: &Output, code: i32, words: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {} stderr: {err}",
        text(&out.stdout)
    );
    for w in words {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
    err
}

fn write(path: &Path, s: &str) {
    std::fs::write(path, s).unwrap();
}

#[test]
fn the_seed_backing_image_applies_reaches_ready_and_reapplies_as_a_no_op() {
    let origin = Origin::start();
    let data = random_bytes(6 * MIB + 123, 19);
    origin.put("parrot.raw", data.clone());
    let sum = sha512_hex(&data);
    let d = Daemon::start();
    let file = d.dir.path().join("bi.yaml");
    write(
        &file,
        &seed_download("bi-download", &origin.url("parrot.raw"), &sum),
    );

    let out = d.bifs_ok(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.contains("bi-download: created"), "{out}");
    let s = d.wait_state("bi-download", "ready", READY);
    assert_eq!(s["checksum"], sum.as_str());
    assert_eq!(std::fs::read(d.path("bi-download")).unwrap(), data);

    // The same manifest again, this time from stdin: nothing changes, nothing is fetched.
    let served = origin.served();
    let out = bifs_stdin(
        &d,
        &["apply", "-f", "-"],
        &std::fs::read_to_string(&file).unwrap(),
    );
    expect_exit(&out, 0, &[]);
    assert!(
        text(&out.stdout).contains("bi-download: unchanged (ready"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(origin.served(), served, "re-apply fetched bytes");
    assert_eq!(d.status("bi-download")["state"], "ready");

    // A different checksum for the same name: refused, naming the field and both values.
    let other = "ab".repeat(64);
    write(
        &file,
        &seed_download("bi-download", &origin.url("parrot.raw"), &other),
    );
    let out = d.bifs(&["apply", "-f", file.to_str().unwrap()]);
    expect_exit(
        &out,
        1,
        &[
            &format!("checksum is {sum}, asked {other}"),
            "bifs delete bi-download",
        ],
    );
    assert_eq!(d.status("bi-download")["checksum"], sum.as_str());
}

#[test]
fn the_seed_storage_class_creates_then_validates_and_a_different_url_is_refused() {
    let origin = Origin::start();
    let data = random_bytes(3 * MIB, 23);
    origin.put("test-backing-image", data.clone());
    origin.put("other", random_bytes(MIB, 24));
    let sum = sha512_hex(&data);
    let d = Daemon::start();
    let params = |url: &str| {
        vec![
            "numberOfReplicas=3".to_string(),
            "staleReplicaTimeout=2880".into(),
            "backingImage=bi-download".into(),
            "backingImageDataSourceType=download".into(),
            format!(r#"backingImageDataSourceParameters={{"url": "{url}"}}"#),
            format!("backingImageChecksum={sum}"),
        ]
    };
    let ensure = |p: Vec<String>| {
        let mut args = vec!["ensure".to_string()];
        args.extend(p);
        d.bifs(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let url = origin.url("test-backing-image");
    let out = ensure(params(&url));
    expect_exit(&out, 0, &[]);
    assert!(text(&out.stdout).contains("bi-download: created"));
    d.wait_state("bi-download", "ready", READY);

    let served = origin.served();
    let out = ensure(params(&url));
    expect_exit(&out, 0, &[]);
    assert!(text(&out.stdout).contains("bi-download: unchanged"));
    // The StorageClass document itself, as the seed writes it, through apply.
    let sc = SEED_STORAGE_CLASS
        .replace(
            "https://backing-image-example.s3-region.amazonaws.com/test-backing-image",
            &url,
        )
        .replace("SHA512 checksum of the backing image", &sum);
    let out = bifs_stdin(&d, &["apply", "-f", "-"], &sc);
    expect_exit(&out, 0, &[]);
    assert!(text(&out.stdout).contains("bi-download: unchanged"));
    // A StorageClass naming only the image: it exists, so that is enough.
    expect_exit(&d.bifs(&["ensure", "backingImage=bi-download"]), 0, &[]);
    assert_eq!(origin.served(), served, "validation fetched bytes");

    let other = origin.url("other");
    let out = ensure(params(&other));
    expect_exit(
        &out,
        1,
        &[&format!("sourceParameters.url is {url}, asked {other}")],
    );
    let out = d.bifs(&["ensure", "backingImage=missing"]);
    expect_exit(
        &out,
        1,
        &["missing does not exist", "backingImageDataSourceType"],
    );
}

#[test]
fn bad_input_exits_2_naming_the_field_and_creates_nothing() {
    let d = Daemon::start();
    let good = seed_download("bi-bad", "http://127.0.0.1:9/x.raw", "");
    let apply = |yaml: &str| bifs_stdin(&d, &["apply", "-f", "-"], yaml);

    expect_exit(
        &apply("apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: [x\n"),
        2,
        &["not valid YAML", "line "],
    );
    expect_exit(
        &apply(&good.replace("sourceType: download", "sourceType: s3")),
        2,
        &["line 7: spec.sourceType: \"s3\" is not a source type"],
    );
    expect_exit(
        &apply(&good.replace("    url: http://127.0.0.1:9/x.raw\n", "")),
        2,
        &["spec.sourceParameters.url: is missing"],
    );
    expect_exit(
        &apply(&good.replace("  checksum:", "  sha512:")),
        2,
        &["line 10: spec.sha512: unknown field"],
    );
    expect_exit(
        &apply(&good.replace("kind: BackingImage", "kind: Volume")),
        2,
        &["line 2: kind: \"Volume\" is not a kind"],
    );
    // Both seed examples pasted without `---` between them.
    expect_exit(
        &apply(&format!("{good}{good}")),
        2,
        &["apiVersion: given twice", "---"],
    );
    let ensure = |json: &str| {
        d.bifs(&[
            "ensure",
            "backingImage=bi-bad",
            "backingImageDataSourceType=download",
            &format!("backingImageDataSourceParameters={json}"),
        ])
    };
    expect_exit(
        &ensure("url=http://127.0.0.1:9/x"),
        2,
        &["backingImageDataSourceParameters: not JSON"],
    );
    expect_exit(
        &ensure("{}"),
        2,
        &["backingImageDataSourceParameters: url is missing"],
    );
    expect_exit(
        &ensure(r#"{"url": "http:\\/\\/127.0.0.1:9\\/x"}"#),
        2,
        &["backslash", "remove every"],
    );
    expect_exit(
        &d.bifs(&[
            "ensure",
            "backingImage=bi-bad",
            "backingImageDataSourceType=nfs",
        ]),
        2,
        &["backingImageDataSourceType: \"nfs\" is not a source type"],
    );
    expect_exit(
        &d.bifs(&["apply", "-f", "/nonexistent/bi.yaml"]),
        2,
        &["cannot read /nonexistent/bi.yaml"],
    );
    let list = d.bifs_ok(&["list", "--json"]);
    assert_eq!(list.trim(), "[]", "bad input created something: {list}");
}

/// A folder as kubelet lays out a ConfigMap volume: `..<version>/` directories, a
/// `..data` symlink to the current one, and each key a symlink through `..data`.
struct ConfigMapDir {
    dir: std::path::PathBuf,
    version: u32,
}

impl ConfigMapDir {
    fn new(dir: &Path) -> ConfigMapDir {
        std::fs::create_dir_all(dir).unwrap();
        let mut c = ConfigMapDir {
            dir: dir.to_path_buf(),
            version: 0,
        };
        c.publish(&[]);
        c
    }

    /// Writes a new version and swaps it in as kubelet does: rename a new `..data`
    /// link over the old one, then add links for new keys and drop the ones gone.
    fn publish(&mut self, files: &[(&str, &str)]) {
        use std::os::unix::fs::symlink;
        self.version += 1;
        let ver = format!(
            "..2026_12_02_00_00_{:02}.{}",
            self.version,
            1000 + self.version
        );
        let vdir = self.dir.join(&ver);
        std::fs::create_dir(&vdir).unwrap();
        for (k, v) in files {
            write(&vdir.join(k), v);
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&ver, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && !files.iter().any(|(k, _)| *k == name) {
                std::fs::remove_file(self.dir.join(&name)).unwrap();
            }
        }
        for (k, _) in files {
            let link = self.dir.join(k);
            if link.symlink_metadata().is_err() {
                symlink(format!("..data/{k}"), link).unwrap();
            }
        }
    }
}

#[test]
fn a_manifests_folder_laid_out_as_a_configmap_applies_added_files_and_swapped_versions() {
    let origin = Origin::start();
    for (i, n) in ["a.raw", "b.raw", "c.raw"].iter().enumerate() {
        origin.put(n, random_bytes(MIB, 40 + i as u64));
    }
    let base = tempfile::tempdir().unwrap();
    let mut cm = ConfigMapDir::new(&base.path().join("manifests"));
    let d = Daemon::start_with(&["--manifests", cm.dir.to_str().unwrap()]);
    let appears = |name: &str| {
        wait_for(
            &format!("image {name} to appear"),
            Duration::from_secs(20),
            || {
                let out = d.bifs(&["status", name, "--json"]);
                out.status.success().then_some(())
            },
        )
    };

    // A key added to the ConfigMap: its image appears.
    let a = seed_download("bi-a", &origin.url("a.raw"), "");
    cm.publish(&[("a.yaml", &a)]);
    appears("bi-a");

    // A new version swapped in: a.yaml gains a document, b.yml is a new key, and a
    // file with a mistake is logged naming its field and line without stopping the rest.
    let a2 = format!(
        "{a}---\n{}",
        seed_download("bi-c", &origin.url("c.raw"), "")
    );
    let b = seed_download("bi-b", &origin.url("b.raw"), "");
    let broken = seed_download("bi-x", &origin.url("a.raw"), "")
        .replace("sourceType: download", "sourceType: torrent");
    cm.publish(&[
        ("a.yaml", &a2),
        ("b.yml", &b),
        ("broken.yaml", &broken),
        ("notes.txt", "not yaml"),
    ]);
    appears("bi-c");
    appears("bi-b");
    for n in ["bi-a", "bi-b", "bi-c"] {
        d.wait_state(n, "ready", READY);
    }
    wait_for(
        "the broken manifest to be logged",
        Duration::from_secs(20),
        || {
            let log = d.log();
            (log.contains("broken.yaml") && log.contains("line 7: spec.sourceType")).then_some(())
        },
    );
    assert!(
        d.log().contains("not a .yaml or .yml file"),
        "notes.txt not mentioned"
    );
    assert!(
        !text(&d.bifs(&["list"]).stdout).contains("bi-x"),
        "the broken document created an image"
    );

    // A version that changes an existing image's spec is refused (logged, naming the
    // field); the image keeps its spec. The ConfigMap dropping a key deletes nothing.
    let a3 = seed_download("bi-a", &origin.url("b.raw"), "");
    cm.publish(&[("a.yaml", &a3)]);
    wait_for("the conflict to be logged", Duration::from_secs(20), || {
        d.log()
            .contains(&format!(
                "sourceParameters.url is {}, asked {}",
                origin.url("a.raw"),
                origin.url("b.raw")
            ))
            .then_some(())
    });
    let s = d.status("bi-a");
    assert_eq!(
        s["source"]["parameters"]["url"],
        origin.url("a.raw").as_str()
    );
    assert_eq!(d.status("bi-b")["state"], "ready", "{}", tail(&d.log(), 20));
}

#[test]
fn a_non_loopback_listen_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["mount", "--mountpoint"])
        .arg(dir.path().join("mnt"))
        .arg("--disk")
        .arg(dir.path().join("disk"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    expect_exit(&out, 2, &["--token-file", "--insecure-listen"]);
    assert!(
        !dir.path().join("disk").exists(),
        "the daemon started anyway"
    );
}

#[test]
fn apply_and_ensure_present_the_api_token() {
    let origin = Origin::start();
    origin.put("t.raw", random_bytes(MIB, 5));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write(&token, "s3cret-token\n");
    let d = Daemon::start_with(&["--token-file", token.to_str().unwrap()]);
    let yaml = seed_download("bi-t", &origin.url("t.raw"), "");
    let run = |with_token: bool| {
        let mut c = Command::new(BIN);
        c.args(["apply", "-f", "-"]).env("BIFS_SERVER", &d.server);
        if with_token {
            c.env("BIFS_TOKEN_FILE", &token);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    expect_exit(&run(false), 1, &["bearer token"]);
    expect_exit(&run(true), 0, &[]);
    let out = Command::new(BIN)
        .args(["ensure", "backingImage=bi-t"])
        .env("BIFS_SERVER", &d.server)
        .env("BIFS_TOKEN_FILE", &token)
        .output()
        .unwrap();
    expect_exit(&out, 0, &[]);
    assert!(text(&out.stdout).contains("bi-t: exists"));
    assert!(
        !d.log().contains("s3cret-token"),
        "the token reached the log"
    );
}

#[test]
fn sha256_checksums_right_is_ready_wrong_is_failed() {
    use sha2::Digest;
    let origin = Origin::start();
    let data = random_bytes(2 * MIB, 77);
    origin.put("img.raw", data.clone());
    let right = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
    let wrong = format!("sha256:{}", "00".repeat(32));
    let d = Daemon::start();
    let yaml = format!(
        "{}---\n{}",
        seed_download("good", &origin.url("img.raw"), &right),
        seed_download("bad", &origin.url("img.raw"), &wrong)
    );
    expect_exit(&bifs_stdin(&d, &["apply", "-f", "-"], &yaml), 0, &[]);
    assert_eq!(
        d.wait_state("good", "ready", READY)["checksum"],
        right.as_str()
    );
    let s = d.wait_state("bad", "failed", READY);
    assert!(s["error"].as_str().unwrap().contains("checksum"), "{s}");
}
