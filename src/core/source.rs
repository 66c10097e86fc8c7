//! Where blocks come from. A `Source` knows the image's size and identity and streams
//! byte ranges of one pinned version; `fetch` decides which ranges to ask for.
//! Implementations: `HttpSource` (the origin URL), `MemSource` (tests, benches);
//! a peer source and a local-volume source fit the same trait.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use serde::{Deserialize, Serialize};

use super::error::SourceError;
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

#[async_trait]
pub trait Source: Send + Sync {
    /// A short, credential-free description for logs and status.
    fn describe(&self) -> String;
    /// Asks the source for its current size and identity.
    async fn probe(&self) -> Result<Identity, SourceError>;
    /// Streams `range` of the version pinned by `id`. Fails with `Changed` when the source
    /// no longer holds that version. Without range support only `0..size` may be asked.
    async fn read(&self, range: Range<u64>, id: &Identity) -> Result<ByteStream, SourceError>;
}

/// The origin: an http(s) URL read with range requests.
pub struct HttpSource {
    url: String,
    shown: String,
    client: reqwest::Client,
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .user_agent(concat!("bifs/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client has a valid static configuration")
}

impl HttpSource {
    pub fn new(url: &str, client: reqwest::Client) -> Self {
        Self {
            url: url.to_string(),
            shown: redact_url(url),
            client,
        }
    }

    fn status_error(&self, status: reqwest::StatusCode) -> SourceError {
        let hint = match status.as_u16() {
            404 | 410 => "; the file is not there: check the URL",
            401 | 403 => {
                "; access denied: the URL must be readable without credentials or carry them"
            }
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

    async fn probe(&self) -> Result<Identity, SourceError> {
        // One ranged GET answers everything: a 206 with Content-Range proves range support
        // (nginx sends no Accept-Ranges on a 206), a 200 means a server without ranges.
        let resp = self
            .client
            .get(&self.url)
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

    async fn read(&self, range: Range<u64>, id: &Identity) -> Result<ByteStream, SourceError> {
        let mut req = self.client.get(&self.url);
        let ranged = id.ranges;
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
                    Some((a, b, total)) if a == range.start && b + 1 == range.end => {
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

/// An in-memory source with fault injection, for tests and benches.
pub struct MemSource {
    data: Mutex<(Bytes, Identity)>,
    pub served: AtomicU64,
    pub requests: AtomicU64,
    faults: Mutex<VecDeque<SourceError>>,
    chunk: usize,
}

impl MemSource {
    pub fn new(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        let id = Identity {
            size: data.len() as u64,
            etag: Some("\"v1\"".into()),
            last_modified: None,
            ranges: true,
        };
        Self {
            data: Mutex::new((data, id)),
            served: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            faults: Mutex::new(VecDeque::new()),
            chunk: 64 * 1024,
        }
    }

    /// The next read fails with `e`.
    pub fn fail_next(&self, e: SourceError) {
        self.faults.lock().unwrap().push_back(e);
    }

    /// Replaces the content, as an origin whose file was overwritten.
    pub fn replace(&self, data: impl Into<Bytes>, etag: &str) {
        let data = data.into();
        let mut g = self.data.lock().unwrap();
        g.1 = Identity {
            size: data.len() as u64,
            etag: Some(etag.into()),
            last_modified: None,
            ranges: true,
        };
        g.0 = data;
    }
}

#[async_trait]
impl Source for MemSource {
    fn describe(&self) -> String {
        "memory".into()
    }

    async fn probe(&self) -> Result<Identity, SourceError> {
        Ok(self.data.lock().unwrap().1.clone())
    }

    async fn read(&self, range: Range<u64>, id: &Identity) -> Result<ByteStream, SourceError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = self.faults.lock().unwrap().pop_front() {
            return Err(e);
        }
        let (data, now) = self.data.lock().unwrap().clone();
        id.check(now.etag.as_deref(), None)?;
        let bytes = data.slice(range.start as usize..range.end as usize);
        self.served.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let chunks: Vec<Result<Bytes, SourceError>> = (0..bytes.len())
            .step_by(self.chunk)
            .map(|o| Ok(bytes.slice(o..(o + self.chunk).min(bytes.len()))))
            .collect();
        Ok(futures::stream::iter(chunks).boxed())
    }
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
