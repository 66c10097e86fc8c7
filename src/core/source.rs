//! Where blocks come from. A `Source` streams byte ranges of the one version of an image
//! that the image pinned (`Identity`: size, ETag / Last-Modified); `fetch` decides which
//! ranges to ask for and asks an image's sources in order.
//!
//! - The pin is the image's; capabilities are each source's (`ranges()`: whether it
//!   serves byte ranges at all).
//! - A source that lacks some bytes answers `SourceError::Absent`: the request moves to
//!   the next source and nothing fails. `Changed` means the version is gone for good;
//!   retryable errors (`is_retryable`) are worth another try after a pause.
//! - Every request says whom it serves (`Priority`): a waiting reader or the fill. The
//!   HTTP origin gives readers a connection pool of their own, so a reader's request
//!   never queues behind the fill's streams.
//!
//! Implementations: `HttpSource` here (the origin URL); `MemSource` (mem_source.rs: tests
//! and benches, with fault injection), peers, uploads and volumes in their own modules.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use serde::{Deserialize, Serialize};

use super::credentials::Credentials;
use super::error::SourceError;
use super::range::ByteRange;
use super::spec::redact_url;

/// What pins one version of a source: a changed size, ETag or Last-Modified means a
/// different image, and blocks of two versions must never be mixed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub size: u64,
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
    /// Whether the source serves byte ranges. Without them the image is fetched as one stream.
    pub ranges: bool,
}

impl Identity {
    /// A placeholder before the origin was asked (only to build sources that probe).
    pub fn unknown() -> Self {
        Self::of_size(0)
    }

    /// The identity of bytes that carry no version tag (a local volume, an upload): the
    /// size alone, served in ranges.
    pub fn of_size(size: u64) -> Self {
        Self {
            size,
            etag: None,
            last_modified: None,
            ranges: true,
        }
    }

    /// A short tag naming one version of one image (its spec and pinned identity): peers
    /// serve each other bytes only between copies with the same tag.
    pub fn version_tag(&self, spec: &super::spec::ImageSpec) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        // Credentials in a URL are not part of the version (peers see redacted specs).
        let spec = spec.redacted();
        h.update(spec.source_type.as_str());
        for (k, v) in &spec.source_parameters {
            h.update(format!("\0{k}={v}"));
        }
        h.update(format!(
            "\0{}\0{}\0{:?}\0{:?}",
            spec.checksum, self.size, self.etag, self.last_modified
        ));
        hex::encode(&h.finalize()[..16])
    }

    /// Compares what a response says about its version with the pinned one.
    pub fn check(
        &self,
        etag: Option<&str>,
        last_modified: Option<&str>,
    ) -> Result<(), SourceError> {
        if let (Some(was), Some(now)) = (&self.etag, etag) {
            if was != now {
                return Err(SourceError::Changed {
                    what: "ETag",
                    was: was.clone(),
                    now: now.into(),
                });
            }
        } else if let (Some(was), Some(now)) = (&self.last_modified, last_modified) {
            if was != now {
                return Err(SourceError::Changed {
                    what: "Last-Modified",
                    was: was.clone(),
                    now: now.into(),
                });
            }
        }
        Ok(())
    }
}

pub type ByteStream = BoxStream<'static, Result<Bytes, SourceError>>;

/// Whom a request serves: a reader waiting for its bytes comes before the fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Reader,
    Fill,
}

#[async_trait]
pub trait Source: Send + Sync {
    /// A short, credential-free description for logs and status.
    fn describe(&self) -> String;
    /// What `/metrics` counts its bytes as: `url`, `peer` or `other`.
    fn kind(&self) -> &'static str {
        "other"
    }
    /// Whether this source serves byte ranges. Without them only the whole image
    /// (`0..size`) may be asked, and the fetcher skips what it does not need.
    fn ranges(&self) -> bool;
    /// Whether this source may be used only where every piece is checked against digests
    /// of a verified copy (peers: none of their bytes lands unchecked).
    fn needs_digests(&self) -> bool {
        false
    }
    /// Whether this source may give piece digests (`piece_digests`): the image asks for
    /// them before it fetches anything.
    fn offers_digests(&self) -> bool {
        false
    }
    /// This source's reply to the request that started at `range.start` failed a
    /// piece digest: avoid whoever sent it for a while.
    fn report_corrupt(&self, _range: ByteRange) {}
    /// Per-piece digests of a verified copy of the image pinned by `pin`, if this source
    /// can give them (the wire form of `PieceDigests`).
    async fn piece_digests(&self, _pin: &Identity) -> Option<Bytes> {
        None
    }
    /// The source as `Any`, for a shell that must reach a source's own state (an
    /// upload's receiving end); None for most sources.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// Asks the source for its current size and identity.
    async fn probe(&self) -> Result<Identity, SourceError>;
    /// Streams `range` of the version pinned by `pin`. Fails with `Changed` when the
    /// source no longer holds that version, `Absent` when it lacks these bytes.
    async fn read(
        &self,
        range: ByteRange,
        pin: &Identity,
        prio: Priority,
    ) -> Result<ByteStream, SourceError>;
}

/// An image's sources in the order they are asked, or why it has none.
pub struct Sources {
    pub list: Vec<Arc<dyn Source>>,
    /// Why no source can serve absent blocks (shown in status and in readers' errors).
    pub unavailable: Option<String>,
    /// Who fetches what when several nodes fill the same image at once (peers).
    pub fill_policy: Option<Arc<dyn FillPolicy>>,
    /// What it means when every source lacks some bytes (an image with peers only).
    pub when_absent: Option<String>,
}

/// Shares the work of filling one image among the nodes that fill it at the same time,
/// so the origin sends each piece about once per cluster: each node fills the pieces it
/// owns from the origin and takes the others from their owners once they have them.
pub trait FillPolicy: Send + Sync {
    /// The size of the pieces work is shared in, when it is shared now (None: fill alone).
    fn unit_bytes(&self) -> Option<u64>;
    /// Whether the fill should leave `bytes` (one unit) for now: another node fetches
    /// them and is making progress.
    fn defer(&self, bytes: ByteRange) -> bool;
    /// Where this node starts filling, in units of `unit_bytes` out of `units`: nodes
    /// that start at once begin in different places before they have heard of each other.
    fn first_unit(&self, units: u64) -> u64;
}

impl Sources {
    pub fn one(source: Arc<dyn Source>) -> Self {
        Self {
            list: vec![source],
            unavailable: None,
            fill_policy: None,
            when_absent: None,
        }
    }

    pub fn none(why: impl Into<String>) -> Self {
        Self {
            list: Vec::new(),
            unavailable: Some(why.into()),
            fill_policy: None,
            when_absent: None,
        }
    }

    /// Whether any source serves byte ranges.
    pub fn ranged(&self) -> bool {
        self.list.iter().any(|s| s.ranges())
    }
}

/// The node's HTTP clients: one connection pool for readers and one for the fill, so a
/// reader's range request never waits for a connection the fill's streams hold.
#[derive(Clone)]
pub struct HttpClients {
    reader: reqwest::Client,
    fill: reqwest::Client,
}

impl Default for HttpClients {
    fn default() -> Self {
        Self {
            reader: http_client(),
            fill: http_client(),
        }
    }
}

impl HttpClients {
    /// Clients that also trust the CA certificates of the PEM bundle `ca_file`
    /// (`--ca-file`: origins with certificates of a private CA).
    pub fn with_ca(ca_file: &std::path::Path) -> Result<Self, String> {
        let pem = std::fs::read(ca_file)
            .map_err(|e| format!("--ca-file {}: cannot read it: {e}", ca_file.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            format!(
                "--ca-file {}: not a PEM bundle of certificates: {e}",
                ca_file.display()
            )
        })?;
        if certs.is_empty() {
            return Err(format!(
                "--ca-file {}: holds no certificate",
                ca_file.display()
            ));
        }
        let build = || {
            let mut b = http_client_builder();
            for c in &certs {
                b = b.add_root_certificate(c.clone());
            }
            b.build()
                .map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))
        };
        Ok(Self {
            reader: build()?,
            fill: build()?,
        })
    }
}

pub fn http_client() -> reqwest::Client {
    http_client_builder()
        .build()
        .expect("the HTTP client has a valid static configuration")
}

fn http_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .user_agent(concat!("bifs/", env!("CARGO_PKG_VERSION")))
}

/// The origin: an http(s) URL read with range requests.
pub struct HttpSource {
    url: String,
    shown: String,
    clients: HttpClients,
    /// Basic auth, a bearer token or headers (a URL's `user:pass@`, a `secretRef`).
    creds: Credentials,
    /// Learnt by `probe` (and kept in the image's spec.json across restarts).
    ranges: AtomicBool,
}

impl HttpSource {
    /// `ranges`: what an earlier probe found (true until a probe says otherwise).
    pub fn new(url: &str, clients: HttpClients, ranges: bool) -> Self {
        let (creds, clean) = Credentials::from_url(url);
        Self {
            url: clean,
            shown: redact_url(url),
            clients,
            creds,
            ranges: AtomicBool::new(ranges),
        }
    }

    /// Adds credentials (a `secretRef`'s) to those of the URL.
    pub fn with_credentials(mut self, creds: Credentials) -> Self {
        self.creds = std::mem::take(&mut self.creds).or(creds);
        self
    }

    fn status_error(&self, status: reqwest::StatusCode) -> SourceError {
        let hint = match status.as_u16() {
            404 | 410 => "; the file is not there: check the URL",
            401 | 403 if self.creds.is_empty() => {
                "; access denied: give credentials (sourceParameters.secretRef, or user:pass@ in the URL)"
            }
            401 | 403 => "; access denied: the credentials were refused; check the secret",
            s if s >= 500 => "; the server failed, retrying later may help",
            _ => "",
        };
        SourceError::Status {
            url: self.shown.clone(),
            status: status.as_u16(),
            hint,
        }
    }

    fn send_error(&self, e: reqwest::Error) -> SourceError {
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            reason = format!("{reason}: {s}");
            src = s.source();
        }
        SourceError::Unreachable {
            url: self.shown.clone(),
            reason,
        }
    }
}

fn header(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Parses `bytes A-B/TOTAL`.
fn content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, total.parse().ok()))
}

#[async_trait]
impl Source for HttpSource {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn ranges(&self) -> bool {
        self.ranges.load(Ordering::Relaxed)
    }

    fn kind(&self) -> &'static str {
        "url"
    }

    async fn probe(&self) -> Result<Identity, SourceError> {
        let id = self.probe_once().await?;
        self.ranges.store(id.ranges, Ordering::Relaxed);
        Ok(id)
    }

    async fn read(
        &self,
        range: ByteRange,
        pin: &Identity,
        prio: Priority,
    ) -> Result<ByteStream, SourceError> {
        self.read_range(range, pin, prio).await
    }
}

impl HttpSource {
    async fn probe_once(&self) -> Result<Identity, SourceError> {
        // One ranged GET answers everything: a 206 with Content-Range proves range support
        // (nginx sends no Accept-Ranges on a 206), a 200 means a server without ranges.
        let resp = self
            .creds
            .apply(self.clients.reader.get(&self.url))
            .header(reqwest::header::RANGE, "bytes=0-0")
            .send()
            .await
            .map_err(|e| self.send_error(e))?;
        let etag = header(&resp, reqwest::header::ETAG);
        let last_modified = header(&resp, reqwest::header::LAST_MODIFIED);
        match resp.status().as_u16() {
            206 => {
                let cr = header(&resp, reqwest::header::CONTENT_RANGE).unwrap_or_default();
                let size = content_range(&cr).and_then(|(_, _, t)| t).ok_or_else(|| {
                    SourceError::Protocol {
                        url: self.shown.clone(),
                        reason: format!("206 reply with unusable Content-Range {cr:?}"),
                    }
                })?;
                Ok(Identity {
                    size,
                    etag,
                    last_modified,
                    ranges: true,
                })
            }
            200 => {
                let size = resp.content_length().ok_or_else(|| SourceError::Protocol {
                    url: self.shown.clone(),
                    reason:
                        "no Content-Length and no range support: the image size cannot be known"
                            .into(),
                })?;
                Ok(Identity {
                    size,
                    etag,
                    last_modified,
                    ranges: false,
                })
            }
            416 => Ok(Identity {
                size: 0,
                etag,
                last_modified,
                ranges: true,
            }),
            _ => Err(self.status_error(resp.status())),
        }
    }

    async fn read_range(
        &self,
        range: ByteRange,
        id: &Identity,
        prio: Priority,
    ) -> Result<ByteStream, SourceError> {
        let client = match prio {
            Priority::Reader => &self.clients.reader,
            Priority::Fill => &self.clients.fill,
        };
        let mut req = self.creds.apply(client.get(&self.url));
        let ranged = self.ranges();
        if ranged {
            req = req.header(
                reqwest::header::RANGE,
                format!("bytes={}-{}", range.start, range.end - 1),
            );
            // If-Range makes a changed origin answer 200 instead of mixing versions.
            if let Some(etag) = id.etag.as_deref().filter(|e| !e.starts_with("W/")) {
                req = req.header(reqwest::header::IF_RANGE, etag);
            } else if let Some(lm) = &id.last_modified {
                req = req.header(reqwest::header::IF_RANGE, lm.as_str());
            }
        }
        let resp = req.send().await.map_err(|e| self.send_error(e))?;
        let status = resp.status().as_u16();
        id.check(
            header(&resp, reqwest::header::ETAG).as_deref(),
            header(&resp, reqwest::header::LAST_MODIFIED).as_deref(),
        )?;
        match (status, ranged) {
            (206, true) => {
                let cr = header(&resp, reqwest::header::CONTENT_RANGE).unwrap_or_default();
                match content_range(&cr) {
                    Some((a, b, total))
                        if a == range.start && b.checked_add(1) == Some(range.end) =>
                    {
                        if let Some(t) = total.filter(|t| *t != id.size) {
                            return Err(SourceError::Changed {
                                what: "size",
                                was: id.size.to_string(),
                                now: t.to_string(),
                            });
                        }
                    }
                    _ => {
                        return Err(SourceError::Protocol {
                            url: self.shown.clone(),
                            reason: format!(
                                "asked bytes {}-{}, got Content-Range {cr:?}",
                                range.start,
                                range.end - 1
                            ),
                        })
                    }
                }
            }
            (200, false) => {
                if let Some(len) = resp.content_length().filter(|l| *l != id.size) {
                    return Err(SourceError::Changed {
                        what: "size",
                        was: id.size.to_string(),
                        now: len.to_string(),
                    });
                }
            }
            (200, true)
                if header(&resp, reqwest::header::ETAG).is_some_and(|e| {
                    id.etag.as_deref() == Some(e.as_str()) && !e.starts_with("W/")
                }) =>
            {
                // The same version, but the Range was ignored (a proxy, a busy server): the
                // whole body comes; keep the bytes asked for and drop the rest.
                return Ok(skip_to(resp, range, self.shown.clone()));
            }
            (200, true) => {
                // If-Range failed (the validator changed) or the server stopped honouring ranges.
                return Err(SourceError::Changed {
                    what: "validator (If-Range answered with the whole file)",
                    was: id
                        .etag
                        .clone()
                        .or(id.last_modified.clone())
                        .unwrap_or_default(),
                    now: header(&resp, reqwest::header::ETAG).unwrap_or_default(),
                });
            }
            (416, _) => {
                return Err(SourceError::Changed {
                    what: "size",
                    was: id.size.to_string(),
                    now: "smaller".into(),
                });
            }
            _ => return Err(self.status_error(resp.status())),
        }
        let url = self.shown.clone();
        Ok(resp
            .bytes_stream()
            .map(move |r| {
                r.map_err(|e| SourceError::Interrupted {
                    url: url.clone(),
                    reason: e.to_string(),
                })
            })
            .boxed())
    }
}

/// The bytes `range` of a whole-body reply (a server that ignored the Range header).
fn skip_to(resp: reqwest::Response, range: ByteRange, url: String) -> ByteStream {
    let mut skip = range.start;
    let mut left = range.len();
    resp.bytes_stream()
        .map(move |r| {
            r.map_err(|e| SourceError::Interrupted {
                url: url.clone(),
                reason: e.to_string(),
            })
        })
        .filter_map(move |r| {
            let out = match r {
                Err(e) => Some(Err(e)),
                Ok(mut c) => {
                    let n = skip.min(c.len() as u64) as usize;
                    let _ = c.split_to(n);
                    skip -= n as u64;
                    let keep = left.min(c.len() as u64) as usize;
                    c.truncate(keep);
                    left -= keep as u64;
                    (!c.is_empty()).then_some(Ok(c))
                }
            };
            futures::future::ready(out)
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        assert_eq!(
            content_range("bytes 0-9/67108864"),
            Some((0, 9, Some(67108864)))
        );
        assert_eq!(content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(content_range("items 0-1/2"), None);
    }

    #[test]
    fn identity_detects_a_new_etag() {
        let id = Identity {
            size: 1,
            etag: Some("\"a\"".into()),
            last_modified: None,
            ranges: true,
        };
        assert!(id.check(Some("\"a\""), None).is_ok());
        let e = id.check(Some("\"b\""), None).unwrap_err();
        assert!(e.to_string().contains("source changed"), "{e}");
    }
}
