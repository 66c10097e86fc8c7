//! The deployment files under deploy/: every Kubernetes document passes the offline schema
//! check (`kubernetes-validate --strict`, installed by scripts/deps.sh into
//! target/deploy-venv) and holds what the daemon relies on; the systemd unit passes
//! `systemd-analyze verify` and keeps its promises (stale mount cleared, clean stop,
//! restart on failure). A missing validator is a failure, never a skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use common::BIN;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_bin(name: &str) -> PathBuf {
    let bin = root().join("target/deploy-venv/bin").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run scripts/deps.sh (it installs kubernetes-validate into target/deploy-venv)",
        bin.display()
    );
    bin
}

fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "deploy/kubernetes holds {files:?}");
    files
}

/// Every document of every file, as JSON (PyYAML from the same venv reads them).
fn documents() -> Vec<Value> {
    let out = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
             print(json.dumps(docs))",
        ])
        .args(kubernetes_files())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

/// `--flag=value` or `--flag value` from an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix(&format!("{name}=")) {
            out.push(v);
        } else if a == name {
            out.push(args[i + 1].as_str());
        }
    }
    out
}

/// Flags in `args` that `bifs mount --help` does not list. `--peers-dns` is left out:
/// the peers work adds it.
fn unknown_mount_flags(args: &[String]) -> Vec<String> {
    let help = Command::new(BIN)
        .args(["mount", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap().to_string())
        .filter(|f| {
            f != "--peers-dns"
                && !help.contains(&format!("{f} "))
                && !help.contains(&format!("{f}\n"))
        })
        .collect()
}

#[test]
fn kubernetes_documents_pass_the_offline_schema_check() {
    let out = Command::new(venv_bin("kubernetes-validate"))
        .arg("--strict")
        .args(kubernetes_files())
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(!all.contains("ERROR") && !all.contains("WARN"), "{all}");
    assert_eq!(
        all.matches(" passed for resource ").count(),
        kubernetes_files().len(),
        "{all}"
    );
}

#[test]
fn the_daemonset_holds_what_the_daemon_relies_on() {
    let docs = documents();
    let ds = kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
    assert_eq!(args[0], "mount");
    assert_eq!(
        unknown_mount_flags(&args),
        Vec::<String>::new(),
        "flags bifs does not know"
    );
    assert_eq!(c["securityContext"]["privileged"], true);

    let mounts = c["volumeMounts"].as_array().unwrap();
    let volume_at = |path: &str| -> (&Value, &Value) {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"));
        let v = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume {}", m["name"]));
        (m, v)
    };
    let (_, fuse) = volume_at("/dev/fuse");
    assert_eq!(fuse["hostPath"]["path"], "/dev/fuse");
    let mp = flag(&args, "--mountpoint")[0];
    let (m, v) = volume_at(mp);
    assert_eq!(
        m["mountPropagation"], "Bidirectional",
        "the host must see the mount"
    );
    assert!(v["hostPath"].is_object());
    let disks = flag(&args, "--disk");
    assert!(!disks.is_empty());
    for d in disks {
        assert!(
            volume_at(d).1["hostPath"].is_object(),
            "disk {d} is not on the host"
        );
    }

    // The token: a non-loopback --listen needs it (the daemon refuses otherwise).
    let listen = flag(&args, "--listen")[0];
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let token = Path::new(flag(&args, "--token-file")[0]);
    let (_, tv) = volume_at(token.parent().unwrap().to_str().unwrap());
    let secret = kind(&docs, "Secret");
    assert_eq!(tv["secret"]["secretName"], secret["metadata"]["name"]);
    let key = token.file_name().unwrap().to_str().unwrap();
    assert!(secret["stringData"][key].is_string() || secret["data"][key].is_string());

    // The manifests: mounted from the ConfigMap, and bifs itself accepts every key.
    let dir = flag(&args, "--manifests")[0];
    let (_, mv) = volume_at(dir);
    let cm = kind(&docs, "ConfigMap");
    assert_eq!(mv["configMap"]["name"], cm["metadata"]["name"]);
    for (k, text) in cm["data"].as_object().unwrap() {
        assert!(
            k.ends_with(".yaml") || k.ends_with(".yml"),
            "{k} is not read by --manifests"
        );
        let parsed = bifs::core::manifest::parse(text.as_str().unwrap());
        assert!(
            parsed.is_ok_and(|d| !d.is_empty()),
            "{k}: not a valid manifest"
        );
    }

    // Probes on /healthz at the API port; preStop unmounts the mountpoint.
    let named: Vec<&Value> = c["ports"].as_array().unwrap().iter().collect();
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/healthz", "{probe}");
        let p = &get["port"];
        let resolved = p.as_u64().or_else(|| {
            named
                .iter()
                .find(|n| n["name"] == *p)
                .and_then(|n| n["containerPort"].as_u64())
        });
        assert_eq!(resolved, Some(port), "{probe} port");
    }
    let pre_stop = c["lifecycle"]["preStop"]["exec"]["command"].to_string();
    assert!(
        pre_stop.contains("umount") && pre_stop.contains(mp),
        "{pre_stop}"
    );

    // Peers: --peers-dns names the headless Service, which selects these pods on the API port.
    let svc = kind(&docs, "Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    let peers = flag(&args, "--peers-dns")[0];
    let ns = ds["metadata"]["namespace"].as_str().unwrap();
    assert!(
        peers.starts_with(&format!(
            "{}.{ns}.",
            svc["metadata"]["name"].as_str().unwrap()
        )),
        "{peers}"
    );
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service does not select the pods");
    }
    assert!(svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["port"].as_u64() == Some(port)));
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], ns, "{} elsewhere", d["kind"]);
        }
    }
}

#[test]
fn the_systemd_unit_verifies_and_keeps_its_promises() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/bifs.service")).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    let has = |l: &str| lines.contains(&l);
    assert!(has("Restart=on-failure"));
    assert!(has("KillSignal=SIGTERM"));
    let exec = lines
        .iter()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let args: Vec<String> = exec.split_whitespace().skip(1).map(String::from).collect();
    assert_eq!(args[0], "mount");
    assert_eq!(unknown_mount_flags(&args), Vec::<String>::new());
    let mp = flag(&args, "--mountpoint")[0];
    let pre = lines
        .iter()
        .find(|l| l.starts_with("ExecStartPre=") && l.contains("umount"))
        .expect("a stale mount is cleared before start");
    assert!(
        pre.starts_with("ExecStartPre=-") && pre.ends_with(mp),
        "{pre}"
    );

    let Ok(v) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("NOTE: systemd-analyze is not installed here: `systemd-analyze verify` not run");
        return;
    };
    assert!(v.status.success());
    // verify wants every executable to exist: point ExecStart at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("bifs.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/bifs", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // It exits 0 on some mistakes ("..., ignoring"): any remark about the unit fails.
    assert!(
        out.status.success() && !err.contains("bifs.service"),
        "{err}"
    );
}
