//! `bifs upload NAME FILE`: the client side of an upload, and the local checks of
//! `bifs create --from-volume PATH`.
//!
//! 1. `POST /v1/images` with `{sourceType: upload, sourceParameters: {size}, checksum}`
//!    creates the image (a no-op when it exists with the same spec, an error naming the
//!    field when it differs).
//! 2. `GET /v1/images/{name}/blocks` says which blocks the daemon has; only the others
//!    are sent, so the same command after an interruption resumes where it stopped.
//! 3. Each run of absent blocks goes as `PUT /v1/images/{name}/upload` requests of at
//!    most `PIECE` bytes with `Content-Range: bytes A-B/SIZE`; the daemon's reply says
//!    how many bytes it received, which is what is counted as sent.
//! 4. Then it waits for the daemon's verdict: ready (the checksum computed while
//!    receiving) or failed.
//!
//! A progress bar (bytes, rate, ETA) on a terminal; plain lines every 10% when piped.

use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use crate::cli::{Client, Exit};

/// The largest upload request.
const PIECE: u64 = 8 << 20;
/// Upload requests in flight at once.
const IN_FLIGHT: usize = 2;

/// An exit code and a message (the CLI's).
type Fail = Exit;

fn failed(msg: impl Into<String>) -> Fail {
    Exit(1, msg.into())
}

fn usage(msg: impl Into<String>) -> Fail {
    Exit(2, msg.into())
}

/// Parses a rate such as `50M`, `512K` or `1G` (bytes per second, binary units).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    match num.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n * mult),
        _ => Err(format!(
            "invalid rate {s:?}: give bytes per second, e.g. 50M, 512K or 1G"
        )),
    }
}

/// `--from-volume PATH` as the daemon must see it: absolute, existing, not a directory.
/// The daemon opens it (on the same host) and says more if it cannot.
pub fn volume_arg(path: &Path) -> Result<String, String> {
    let abs = std::fs::canonicalize(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "volume {} does not exist; give the path of a volume file or block device",
                path.display()
            )
        } else {
            format!("cannot use volume {}: {e}", path.display())
        }
    })?;
    if abs.is_dir() {
        return Err(format!(
            "{} is a directory, not a volume; give a volume file or a block device (e.g. /dev/longhorn/NAME)",
            path.display()
        ));
    }
    Ok(abs.display().to_string())
}

pub(crate) struct Upload {
    /// The daemon's API, as every client command reaches it.
    pub(crate) client: Client,
    pub name: String,
    pub file: PathBuf,
    pub checksum: String,
    pub limit_rate: Option<u64>,
}

fn human(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// Runs of absent blocks in a bitmap (bit b: byte b/8, bit b%8), as byte ranges.
fn missing_runs(bitmap: &[u8], blocks: u64, block_size: u64, size: u64) -> Vec<(u64, u64)> {
    let present = |b: u64| {
        bitmap
            .get((b / 8) as usize)
            .is_some_and(|w| w & (1 << (b % 8)) != 0)
    };
    let mut runs = Vec::new();
    let mut b = 0;
    while b < blocks {
        if present(b) {
            b += 1;
            continue;
        }
        let start = b;
        while b < blocks && !present(b) {
            b += 1;
        }
        runs.push((start * block_size, (b * block_size).min(size)));
    }
    runs
}

impl Upload {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Fail> {
        self.client.call(method, path, body).await
    }

    pub async fn run(self) -> Result<(), Fail> {
        let meta = std::fs::metadata(&self.file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                usage(format!(
                    "{} does not exist; give the file to upload",
                    self.file.display()
                ))
            } else {
                usage(format!("cannot read {}: {e}", self.file.display()))
            }
        })?;
        if meta.is_dir() {
            return Err(usage(format!(
                "{} is a directory; give the file to upload",
                self.file.display()
            )));
        }
        if !meta.is_file() {
            return Err(usage(format!(
                "{} is not a regular file; give the file to upload",
                self.file.display()
            )));
        }
        let size = meta.len();
        let file = Arc::new(
            std::fs::File::open(&self.file)
                .map_err(|e| usage(format!("cannot open {}: {e}", self.file.display())))?,
        );
        let name = self.name.clone();
        let spec = serde_json::json!({
            "name": name, "sourceType": "upload",
            "sourceParameters": {"size": size.to_string()},
            "checksum": self.checksum, "noFill": true,
        });
        let st = self
            .call(reqwest::Method::POST, "/v1/images", Some(spec))
            .await?;
        match st.get("state").and_then(Value::as_str) {
            Some("ready") => {
                println!(
                    "{name}: ready (uploaded before), checksum {}",
                    st["checksum"].as_str().unwrap_or("")
                );
                return Ok(());
            }
            Some("failed") => {
                return Err(failed(format!(
                    "image {name} failed: {}; delete it (`bifs delete {name}`) and upload again",
                    st["error"].as_str().unwrap_or("")
                )))
            }
            _ => {}
        }
        let blocks = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/images/{name}/blocks"),
                None,
            )
            .await?;
        use base64::Engine;
        let bitmap = base64::engine::general_purpose::STANDARD
            .decode(blocks["bitmap"].as_str().unwrap_or(""))
            .map_err(|e| failed(format!("unexpected reply from the daemon (bitmap): {e}")))?;
        let bs = blocks["blockSize"].as_u64().unwrap_or(0).max(1);
        let runs = missing_runs(&bitmap, size.div_ceil(bs), bs, size);
        let missing: u64 = runs.iter().map(|(a, b)| b - a).sum();
        let had = size - missing;
        if had > 0 {
            eprintln!(
                "{name}: the daemon has {} of {} already; sending the remaining {}",
                human(had as f64),
                human(size as f64),
                human(missing as f64)
            );
        }
        let piece = match self.limit_rate {
            // Small enough that a limited upload shows progress (and can resume) often.
            Some(r) => (r / 4 / bs * bs).clamp(bs, PIECE.max(bs)),
            None => PIECE / bs * bs,
        }
        .max(bs);
        let mut progress = Progress::new(&name, size, had);
        let started = Instant::now();
        // Pieces in order, each with the bytes sent before it (for --limit-rate).
        let mut pieces = Vec::new();
        let mut before = 0u64;
        for (start, end) in runs {
            let mut at = start;
            while at < end {
                let to = (at + piece).min(end);
                pieces.push((at, to, before));
                before += to - at;
                at = to;
            }
        }
        // Two pieces in flight: one is read from the file and sent while the daemon
        // lands and hashes the other.
        let mut replies = futures::stream::iter(pieces)
            .map(|(at, to, before)| self.send_piece(file.clone(), at, to, size, before, started))
            .buffered(IN_FLIGHT);
        let mut sent = 0u64;
        while let Some(received) = replies.next().await {
            sent += received?;
            progress.set(had + sent);
        }
        progress.finish();
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let st = self.wait_final(&name).await?;
        let state = st["state"].as_str().unwrap_or("");
        if state != "ready" {
            return Err(failed(format!(
                "image {name} failed: {}",
                st["error"].as_str().unwrap_or("")
            )));
        }
        println!(
            "{name}: ready; sent {sent} bytes in {secs:.1} s ({}/s), {had} bytes were on the daemon already; checksum {}",
            human(sent as f64 / secs),
            st["checksum"].as_str().unwrap_or("")
        );
        Ok(())
    }

    /// Sends bytes `at..to` of the file as one piece, once `--limit-rate` allows the
    /// `before` bytes sent ahead of it; returns the bytes the daemon received.
    async fn send_piece(
        &self,
        file: Arc<std::fs::File>,
        at: u64,
        to: u64,
        size: u64,
        before: u64,
        started: Instant,
    ) -> Result<u64, Fail> {
        if let Some(rate) = self.limit_rate {
            let due = Duration::from_secs_f64(before as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let name = &self.name;
        let body = read_piece(file, at, to).await?;
        let req = self
            .client
            .request(reqwest::Method::PUT, &format!("/v1/images/{name}/upload"))
            .header(
                reqwest::header::CONTENT_RANGE,
                format!("bytes {at}-{}/{size}", to - 1),
            )
            .body(body);
        let resp = req.send().await.map_err(|e| {
            failed(format!(
                "the upload of {name} broke off at byte {at}: {e}; run the same command again to resume"
            ))
        })?;
        let receipt = crate::cli::reply(resp).await?;
        Ok(receipt["received"].as_u64().unwrap_or(0))
    }

    /// Polls the status until the image is ready or failed (the verifier finishes moments
    /// after the last byte).
    async fn wait_final(&self, name: &str) -> Result<Value, Fail> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let st = self
                .call(reqwest::Method::GET, &format!("/v1/images/{name}"), None)
                .await?;
            match st["state"].as_str() {
                Some("ready") | Some("failed") => return Ok(st),
                _ if Instant::now() > deadline => {
                    return Err(failed(format!(
                        "every byte of {name} was sent but it is not ready after 10 minutes: {}",
                        st["error"].as_str().unwrap_or("")
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

async fn read_piece(file: Arc<std::fs::File>, at: u64, to: u64) -> Result<Vec<u8>, Fail> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; (to - at) as usize];
        file.read_exact_at(&mut buf, at).map(|_| buf)
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| {
        failed(format!(
            "cannot read the file at byte {at}: {e} (did it shrink?)"
        ))
    })
}

/// A bar on a terminal, a line per 10% otherwise.
struct Progress {
    name: String,
    size: u64,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    from: u64,
    last_tenth: u64,
}

impl Progress {
    fn new(name: &str, size: u64, had: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(size);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(name.to_string());
            b.set_position(had);
            b
        });
        Self {
            name: name.to_string(),
            size,
            bar,
            started: Instant::now(),
            from: had,
            last_tenth: had * 10 / size.max(1),
        }
    }

    fn set(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            return;
        }
        let tenth = done * 10 / self.size.max(1);
        if tenth > self.last_tenth {
            self.last_tenth = tenth;
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = (done - self.from) as f64 / secs;
            let eta = (self.size - done) as f64 / rate.max(1.0);
            eprintln!(
                "{}: {}% ({} of {}, {}/s, ETA {eta:.0} s)",
                self.name,
                tenth * 10,
                human(done as f64),
                human(self.size as f64),
                human(rate)
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runs_follow_the_bitmap_and_end_at_the_size() {
        // 10 blocks of 4 bytes, size 38: blocks 0, 1 and 5 present.
        let bitmap = [0b0010_0011u8, 0];
        assert_eq!(missing_runs(&bitmap, 10, 4, 38), vec![(8, 20), (24, 38)]);
    }

    #[test]
    fn rates_take_binary_suffixes() {
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("512k"), Ok(512 << 10));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert!(parse_rate("fast").is_err());
    }
}
