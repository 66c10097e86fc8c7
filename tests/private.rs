//! Private origins: credentials from `sourceParameters.secretRef` (a file of key=value
//! lines, or a folder as a Kubernetes Secret volume) and from `user:pass@` in a URL. The
//! test origin checks them; no secret shows anywhere a person or a program can look.

mod common;

use std::time::Duration;

use base64::Engine;
use common::origin::Origin;
use common::{random_bytes, sh, sha512_hex, Daemon};

const MIB: usize = 1 << 20;

fn apply(d: &Daemon, name: &str, url: &str, secret: &str) -> std::process::Output {
    let yaml = format!(
        "apiVersion: longhorn.io/v1beta1\nkind: BackingImage\nmetadata:\n  name: {name}\nspec:\n  \
         sourceType: download\n  sourceParameters:\n    url: {url}\n    secretRef: {secret}\n"
    );
    let f = d.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    d.bifs(&["apply", "-f", f.to_str().unwrap()])
}

/// Everything a person or a program can see of a daemon.
fn everything_shown(d: &Daemon, name: &str) -> String {
    let mut all = String::new();
    for args in [
        vec!["status", name, "--json"],
        vec!["status", name],
        vec!["list"],
        vec!["list", "--json"],
    ] {
        let out = d.bifs(&args);
        all += &String::from_utf8_lossy(&out.stdout);
        all += &String::from_utf8_lossy(&out.stderr);
    }
    all += &sh(&format!("getfattr -d -m - {} 2>&1", d.path(name).display())).1;
    all += &sh(&format!("curl -s {}/metrics", d.server)).1;
    all += &d.log();
    all
}

#[test]
fn basic_and_bearer_secrets_reach_private_origins_and_show_nowhere() {
    let origin = Origin::start();
    let data = random_bytes(2 * MIB + 7, 51);
    origin.put("p.raw", data.clone());
    let secrets = tempfile::tempdir().unwrap();
    let sd = secrets.path().to_str().unwrap().to_string();
    let d = Daemon::start_with(&["--secrets-dir", &sd]);

    // Basic auth from a file of key=value lines.
    std::fs::write(
        secrets.path().join("basic"),
        "username=alice\npassword=Pw-basic-77\n",
    )
    .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode("alice:Pw-basic-77");
    origin.require_auth(&format!("Basic {b64}"));
    let out = apply(&d, "withbasic", &origin.url("p.raw"), "basic");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_state("withbasic", "ready", Duration::from_secs(60));
    assert!(std::fs::read(d.path("withbasic")).unwrap() == data);

    // A bearer token from a folder, as a Kubernetes Secret volume lays it out.
    std::fs::create_dir(secrets.path().join("tok")).unwrap();
    std::fs::write(secrets.path().join("tok/token"), "Tk-bearer-88\n").unwrap();
    origin.require_auth("Bearer Tk-bearer-88");
    let out = apply(&d, "withtoken", &origin.url("p.raw"), "tok");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = d.wait_state("withtoken", "ready", Duration::from_secs(60));
    assert_eq!(s["computedChecksum"], sha512_hex(&data));

    // A wrong secret: refused, the message says 403 and what to check.
    std::fs::write(secrets.path().join("wrong"), "token=Tk-wrong-99\n").unwrap();
    let out = apply(&d, "withwrong", &origin.url("p.raw"), "wrong");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("403") && err.contains("credentials were refused"),
        "{err}"
    );
    assert!(!err.contains("Tk-wrong-99"), "{err}");

    // user:pass@ in the URL works too, and the URL is shown without them.
    let b64 = base64::engine::general_purpose::STANDARD.encode("carol:Pw-url-66");
    origin.require_auth(&format!("Basic {b64}"));
    let url = origin
        .url("p.raw")
        .replace("http://", "http://carol:Pw-url-66@");
    d.bifs_ok(&["create", "withurl", "--url", &url]);
    d.wait_state("withurl", "ready", Duration::from_secs(60));

    let shown = everything_shown(&d, "withbasic")
        + &everything_shown(&d, "withtoken")
        + &everything_shown(&d, "withurl");
    for secret in ["Pw-basic-77", "Tk-bearer-88", "Tk-wrong-99", "Pw-url-66"] {
        assert!(!shown.contains(secret), "{secret} is shown somewhere");
    }
    assert!(
        shown.contains("secretRef"),
        "the secret's name is shown: {}",
        &shown[..200.min(shown.len())]
    );
}

#[test]
fn a_missing_secret_is_a_clear_error_that_creates_nothing() {
    let origin = Origin::start();
    origin.put("m.raw", random_bytes(MIB, 52));
    let secrets = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(&["--secrets-dir", secrets.path().to_str().unwrap()]);
    let out = apply(&d, "nosecret", &origin.url("m.raw"), "absent");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("secretRef \"absent\"") && err.contains("--secrets-dir"),
        "{err}"
    );
    assert!(!d.path("nosecret").exists());
}
