//! Two nodes with distinct addresses, in network namespaces joined by a bridge
//! (`scripts/netns-cluster.sh`): the origin and node A on 10.99.0.1, node B on 10.99.0.2.
//! B gets the image from A across the network, then A's link goes down and B still
//! answers every read from what it holds. The namespaces are removed even on failure.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{random_bytes, sha512_hex, Daemon};

const MIB: usize = 1024 * 1024;

/// The namespaces of one test; dropped (removed) whatever happens.
struct Cluster {
    prefix: String,
}

impl Cluster {
    fn up(n: u32, prefix: &str) -> Cluster {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-cluster.sh");
        let c = Cluster {
            prefix: prefix.to_string(),
        };
        let ok = Command::new(script)
            .args(["up", &n.to_string(), prefix])
            .status()
            .unwrap();
        assert!(ok.success(), "netns-cluster.sh up failed");
        c
    }

    fn ns(&self, i: u32) -> String {
        format!("{}-n{i}", self.prefix)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-cluster.sh");
        let _ = Command::new(script).args(["down", &self.prefix]).status();
    }
}

#[test]
fn a_node_on_another_address_fetches_from_its_peer_across_namespaces() {
    let cluster = Cluster::up(2, "bifsT1");
    let data = random_bytes(12 * MIB + 777, 91);
    let sum = sha512_hex(&data);
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("n.raw"), &data).unwrap();
    // The origin: `bifs serve` on node 1 (killed on drop, also when the test fails).
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let origin = Kill(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", cluster.ns(1)))
            .arg(common::BIN)
            .args([
                "serve",
                served.path().to_str().unwrap(),
                "--listen",
                "10.99.0.1:8080",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = "http://10.99.0.1:8080/n.raw";
    let a = Daemon::start_in(&cluster.ns(1), "10.99.0.1", &["--insecure-listen"]);
    a.bifs_ok(&["create", "nimg", "--url", url, "--checksum", &sum]);
    a.wait_state("nimg", "ready", Duration::from_secs(60));
    // The origin goes away: B can only get the image from A, across the bridge.
    drop(origin);
    let b = Daemon::start_in(
        &cluster.ns(2),
        "10.99.0.2",
        &["--insecure-listen", "--peer", "http://10.99.0.1:8090"],
    );
    b.bifs_ok(&["create", "nimg", "--url", url, "--checksum", &sum]);
    let s = b.wait_state("nimg", "ready", Duration::from_secs(60));
    assert_eq!(s["copies"][0]["node"], "http://10.99.0.1:8090");
    assert!(std::fs::read(b.path("nimg")).unwrap() == data, "cmp equal");
    // A partition: B's copy is local, so its readers never notice.
    let down = Command::new("ip")
        .args(["-n", &cluster.ns(2), "link", "set", "eth0", "down"])
        .status()
        .unwrap();
    assert!(down.success());
    assert!(std::fs::read(b.path("nimg")).unwrap() == data);
    common::wait_for("A to show as unknown on B", Duration::from_secs(30), || {
        (b.status("nimg")["copies"][0]["state"] == "unknown").then_some(())
    });
}
