//! Test harness: a real origin (`origin`), the real `bifs` binary mounted on a real FUSE
//! mountpoint (`Daemon`), helpers to make images and run ordinary tools.
#![allow(dead_code)]

pub mod hostile;
pub mod ondisk;
pub mod origin;
pub mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_bifs");

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A large image cheaply: one random MiB repeated, each 4 KiB page stamped with its
/// offset so that a byte served from the wrong place never compares equal.
pub fn stamped_image(len: usize, seed: u64) -> bytes::Bytes {
    let unit = random_bytes(1 << 20, seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(unit.len());
        out.extend_from_slice(&unit[..n]);
    }
    for page in (0..len).step_by(4096) {
        let stamp = (page as u64).to_le_bytes();
        let n = stamp.len().min(len - page);
        out[page..page + n].copy_from_slice(&stamp[..n]);
    }
    out.into()
}

pub fn sha512_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha512::digest(data))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn is_mounted(mp: &Path) -> bool {
    let mp = mp.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(mp.as_str()))
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `bifs mount` on a temporary mountpoint and disk.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub disk: PathBuf,
    pub server: String,
    pub extra: Vec<String>,
    /// A network namespace (`scripts/netns-cluster.sh`) the daemon and its clients run in.
    pub netns: Option<String>,
    /// Environment for the next `spawn` (e.g. `BIFS_FAILPOINT`).
    pub env: Vec<(String, String)>,
    host: String,
    child: Option<Child>,
    port: u16,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        Self::start_at(None, "127.0.0.1", extra)
    }

    /// A daemon in network namespace `netns` listening on `host` (its address there).
    /// Started with `nsenter --net`, so its FUSE mount is visible here.
    pub fn start_in(netns: &str, host: &str, extra: &[&str]) -> Daemon {
        Self::start_at(Some(netns), host, extra)
    }

    /// A daemon on loopback port `port` (picked beforehand, so peers can name each other).
    pub fn start_on_port(port: u16, extra: &[&str]) -> Daemon {
        Self::start_full(None, "127.0.0.1", Some(port), extra)
    }

    fn start_at(netns: Option<&str>, host: &str, extra: &[&str]) -> Daemon {
        Self::start_full(netns, host, None, extra)
    }

    fn start_full(netns: Option<&str>, host: &str, port: Option<u16>, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        let disk = dir.path().join("disk");
        std::fs::create_dir_all(&mnt).unwrap();
        // A disk must exist: an empty directory becomes a new disk.
        std::fs::create_dir_all(&disk).unwrap();
        let port = port.unwrap_or_else(|| if netns.is_some() { 8090 } else { free_port() });
        let mut d = Daemon {
            mnt,
            disk,
            server: format!("http://{host}:{port}"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(str::to_string),
            env: Vec::new(),
            host: host.to_string(),
            child: None,
            port,
            dir,
        };
        d.spawn();
        d
    }

    /// Starts the daemon process (again) on the same disk and mountpoint.
    pub fn spawn(&mut self) {
        self.spawn_process();
        self.wait_up();
    }

    /// Starts the daemon process without waiting for it to serve.
    pub fn spawn_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = self
            .command(BIN)
            .arg("mount")
            .arg("--mountpoint")
            .arg(&self.mnt)
            .arg("--disk")
            .arg(&self.disk)
            .arg("--listen")
            .arg(format!("{}:{}", self.host, self.port))
            .args(&self.extra)
            .env("RUST_LOG", "bifs=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Whether the daemon serves its API and its mount.
    pub fn is_up(&self) -> bool {
        let health = format!("{}/healthz", self.server);
        let up = match &self.netns {
            None => reqwest::blocking_get_ok(&health),
            Some(_) => self
                .command("curl")
                .args(["-sf", "-m", "2", "-o", "/dev/null", &health])
                .status()
                .is_ok_and(|s| s.success()),
        };
        up && is_mounted(&self.mnt)
    }

    /// The daemon's exit status if it has exited (it is then forgotten).
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Waits until the daemon serves its API and its mount.
    pub fn wait_up(&mut self) {
        let start = Instant::now();
        while !self.is_up() {
            if let Some(status) = self.try_exit() {
                panic!(
                    "the daemon exited ({status}) before serving\n--- daemon log ---\n{}",
                    tail(&self.log(), 30)
                );
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "timed out after 20 s waiting for the daemon to serve its API and mount\n--- daemon log ---\n{}",
                    tail(&self.log(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `program`, run in the daemon's network namespace if it has one.
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(program);
                c
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    pub fn raw_path(&self, name: &str) -> PathBuf {
        self.mnt.join(".raw").join(name)
    }

    /// Runs a client command against this daemon.
    pub fn bifs(&self, args: &[&str]) -> Output {
        self.command(BIN)
            .args(args)
            .env("BIFS_SERVER", &self.server)
            .output()
            .unwrap()
    }

    /// Runs a client command that must succeed; returns its stdout.
    pub fn bifs_ok(&self, args: &[&str]) -> String {
        let out = self.bifs(args);
        assert!(
            out.status.success(),
            "bifs {args:?} failed ({:?}): {}\n--- daemon log ---\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 40)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn status(&self, name: &str) -> Value {
        serde_json::from_str(&self.bifs_ok(&["status", name, "--json"])).unwrap()
    }

    /// Waits for `state` (panics with the status if the image ends in another state).
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        wait_for(&format!("{name} to be {state}"), timeout, || {
            let s = self.status(name);
            let now = s["state"].as_str().unwrap().to_string();
            if now == state {
                return Some(s);
            }
            if now == "failed" || now == "ready" {
                panic!(
                    "{name} is {now}, expected {state}: {s}\n--- daemon log ---\n{}",
                    tail(&self.log(), 40)
                );
            }
            None
        })
    }

    /// Kills the daemon without any cleanup (as a crash would).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon as systemd would (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a shell command; returns (exit code, stdout, stderr).
pub fn sh(cmd: &str) -> (i32, String, String) {
    let out = Command::new("bash").arg("-c").arg(cmd).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs a shell command that must succeed; returns its stdout.
pub fn sh_ok(cmd: &str) -> String {
    let (rc, out, err) = sh(cmd);
    assert_eq!(rc, 0, "`{cmd}` failed: {err}{out}");
    out
}

/// Compares two files with cmp, failing with its message.
pub fn assert_same(a: &std::path::Path, b: &std::path::Path) {
    let (rc, out, err) = sh(&format!("cmp {} {}", a.display(), b.display()));
    assert_eq!(
        rc,
        0,
        "{} differs from {}: {out}{err}",
        a.display(),
        b.display()
    );
}

/// `curl` with `args`; returns (HTTP status, body).
pub fn curl(args: &str) -> (u16, String) {
    let (rc, out, err) = sh(&format!("curl -s -w '\\n%{{http_code}}' {args}"));
    assert_eq!(rc, 0, "curl {args}: {err}");
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// A finished command's stderr as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

mod reqwest {
    /// A tiny blocking GET over std: the tests need no HTTP client of their own.
    pub fn blocking_get_ok(url: &str) -> bool {
        use std::io::{Read, Write};
        let Some(rest) = url.strip_prefix("http://") else {
            return false;
        };
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
        let Ok(mut s) = std::net::TcpStream::connect(host) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        if write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .is_err()
        {
            return false;
        }
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.1 200")
    }
}

/// A small tmpfs for a disk (a disk that fills up), unmounted on drop.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    pub fn new(dir: &Path, mib: u64) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "bifs-test"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(ok.success());
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The first 8 characters of the uuid of the bifs disk at `disk`.
pub fn disk_uuid8(disk: &Path) -> String {
    let v: Value =
        serde_json::from_slice(&std::fs::read(disk.join("bifs-disk.json")).unwrap()).unwrap();
    v["uuid"].as_str().unwrap()[..8].to_string()
}

/// `n` daemons on loopback ports, each with `--peer` to all the others, and with the
/// extra arguments `extra(i)` gives node `i`.
pub fn start_cluster(n: usize, extra: impl Fn(usize) -> Vec<String>) -> Vec<Daemon> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    (0..n)
        .map(|i| {
            let mut args = extra(i);
            for (j, p) in ports.iter().enumerate() {
                if j != i {
                    args.push("--peer".to_string());
                    args.push(format!("http://127.0.0.1:{p}"));
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Daemon::start_on_port(ports[i], &args)
        })
        .collect()
}
