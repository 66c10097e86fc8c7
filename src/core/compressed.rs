//! A download whose body is gzip, xz or zstd, as a `Source`: the image is the
//! decompressed bytes. A compressed body cannot serve a byte range, so this source has
//! no ranges (`ranges() == false`): the fetcher asks for the whole image, the fill lands
//! it in order from the first byte, and a reader of a block far in waits until the one
//! stream reaches it (bounded by `--read-timeout`). Random reads of such an image are
//! not lazy; an uncompressed URL with range support is what makes them lazy.
//!
//! The image's size must be known before its first byte lands (the data file, bitmap
//! and verifier are sized by it). In order:
//! 1. `sourceParameters.size`, the decompressed size, when the spec gives it;
//! 2. the content size in a zstd frame header (`zstd FILE` writes it when it compresses
//!    a file); should the body hold more frames than the first, the stream runs past
//!    that size and the image fails saying to give `size`;
//! 3. otherwise one full pass at create: the body is downloaded and decompressed once,
//!    counting bytes, before the image exists (gzip's trailer keeps the size modulo
//!    4 GiB of the last member only, and xz's index sits at the end of the body).
//!
//! Every stream is checked against the size: a body that decompresses to more or fewer
//! bytes fails the image (permanently: fetching again gets the same bytes), and the
//! last bytes land only after the codec has checked its trailer (its checksum).

use async_trait::async_trait;
use futures::stream::{self, StreamExt};

use super::decompress::{self, Compression};
use super::error::SourceError;
use super::range::ByteRange;
use super::source::{ByteStream, Identity, Priority, Source};
use super::spec::redact_url;

pub struct CompressedSource {
    url: String,
    shown: String,
    codec: Compression,
    /// `sourceParameters.size`, if given.
    size: Option<u64>,
    client: reqwest::Client,
}

impl CompressedSource {
    pub fn new(url: &str, codec: Compression, size: Option<u64>, client: reqwest::Client) -> Self {
        Self {
            url: url.to_string(),
            shown: format!("{} ({codec})", redact_url(url)),
            codec,
            size,
            client,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> SourceError {
        SourceError::Unreachable {
            url: self.shown.clone(),
            reason: e.to_string(),
        }
    }

    /// A GET of the whole body; its ETag and Last-Modified.
    async fn get(
        &self,
    ) -> Result<(reqwest::Response, Option<String>, Option<String>), SourceError> {
        let resp = self
            .client
            .get(&self.url)
            // The body is the compressed file: no transparent re-encoding on the way.
            .header(reqwest::header::ACCEPT_ENCODING, "identity")
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(SourceError::Status {
                url: self.shown.clone(),
                status,
                hint: if status == 404 || status == 410 {
                    "; the file is not there: check the URL"
                } else {
                    ""
                },
            });
        }
        let h = |n: reqwest::header::HeaderName| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (etag, lm) = (h(reqwest::header::ETAG), h(reqwest::header::LAST_MODIFIED));
        Ok((resp, etag, lm))
    }

    fn body(&self, resp: reqwest::Response) -> ByteStream {
        let url = self.shown.clone();
        resp.bytes_stream()
            .map(move |r| {
                r.map_err(|e| SourceError::Interrupted {
                    url: url.clone(),
                    reason: e.to_string(),
                })
            })
            .boxed()
    }

    fn decoded(&self, body: ByteStream) -> ByteStream {
        let url = self.shown.clone();
        decompress::decompress(self.codec, body)
            .map(move |r| r.map_err(|e| e.into_source_error(&url)))
            .boxed()
    }
}

/// The content size a zstd frame header carries, if it carries one.
pub fn zstd_content_size(head: &[u8]) -> Option<u64> {
    if head.len() < 5 || head[..4] != [0x28, 0xb5, 0x2f, 0xfd] {
        return None;
    }
    let fhd = head[4];
    let single_segment = (fhd >> 5) & 1 == 1;
    let mut pos = 5 + usize::from(!single_segment);
    pos += [0, 1, 2, 4][(fhd & 3) as usize];
    let n = match fhd >> 6 {
        0 if single_segment => 1,
        0 => return None,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let bytes = head.get(pos..pos + n)?;
    let mut v = 0u64;
    for (i, b) in bytes.iter().enumerate() {
        v |= u64::from(*b) << (8 * i);
    }
    Some(if n == 2 { v + 256 } else { v })
}

/// `inner`, checked to hold exactly `size` bytes and to end cleanly: the chunk that
/// reaches `size` is held back until the stream has ended (the codec checked its trailer).
fn exactly(inner: ByteStream, size: u64, url: String) -> ByteStream {
    struct St {
        inner: ByteStream,
        seen: u64,
        done: bool,
    }
    let wrong = move |seen: u64, more: bool| SourceError::Protocol {
        url: url.clone(),
        reason: if more {
            format!("the body decompresses to more than the image's {size} bytes; give the right sourceParameters.size (the decompressed size in bytes)")
        } else {
            format!("the body decompresses to {seen} bytes, not the image's {size}; give the right sourceParameters.size")
        },
    };
    stream::unfold(
        St {
            inner,
            seen: 0,
            done: false,
        },
        move |mut st| {
            let wrong = wrong.clone();
            async move {
                if st.done {
                    return None;
                }
                loop {
                    match st.inner.next().await {
                        Some(Ok(b)) if b.is_empty() => continue,
                        Some(Ok(b)) => {
                            st.seen += b.len() as u64;
                            if st.seen > size {
                                st.done = true;
                                return Some((Err(wrong(st.seen, true)), st));
                            }
                            if st.seen < size {
                                return Some((Ok(b), st));
                            }
                            // The last chunk: only once the stream ended cleanly.
                            loop {
                                match st.inner.next().await {
                                    Some(Ok(x)) if x.is_empty() => continue,
                                    Some(Ok(_)) => {
                                        st.done = true;
                                        return Some((Err(wrong(st.seen, true)), st));
                                    }
                                    Some(Err(e)) => {
                                        st.done = true;
                                        return Some((Err(e), st));
                                    }
                                    None => {
                                        st.done = true;
                                        return Some((Ok(b), st));
                                    }
                                }
                            }
                        }
                        Some(Err(e)) => {
                            st.done = true;
                            return Some((Err(e), st));
                        }
                        None => {
                            st.done = true;
                            if st.seen < size {
                                return Some((Err(wrong(st.seen, false)), st));
                            }
                            return None;
                        }
                    }
                }
            }
        },
    )
    .boxed()
}

#[async_trait]
impl Source for CompressedSource {
    fn describe(&self) -> String {
        self.shown.clone()
    }

    fn ranges(&self) -> bool {
        false
    }

    async fn probe(&self) -> Result<Identity, SourceError> {
        let (resp, etag, last_modified) = self.get().await?;
        let id = |size| Identity {
            size,
            etag: etag.clone(),
            last_modified: last_modified.clone(),
            ranges: false,
        };
        if let Some(size) = self.size {
            return Ok(id(size));
        }
        let (prefix, whole) = decompress::peek(self.body(resp), 18).await?;
        if self.codec == Compression::Zstd {
            if let Some(size) = zstd_content_size(&prefix) {
                return Ok(id(size));
            }
        }
        // One full pass, counting decompressed bytes.
        tracing::info!(source = %self.shown, "decompressed size unknown: reading the whole body once to learn it (give sourceParameters.size to skip this)");
        let mut decoded = self.decoded(whole);
        let mut size = 0u64;
        while let Some(chunk) = decoded.next().await {
            size += chunk?.len() as u64;
        }
        Ok(id(size))
    }

    async fn read(
        &self,
        range: ByteRange,
        pin: &Identity,
        _prio: Priority,
    ) -> Result<ByteStream, SourceError> {
        if range.start != 0 {
            return Err(SourceError::Protocol {
                url: self.shown.clone(),
                reason: format!(
                    "{range:?} asked of a compressed source, which serves only the whole image"
                ),
            });
        }
        let (resp, etag, lm) = self.get().await?;
        pin.check(etag.as_deref(), lm.as_deref())?;
        let decoded = self.decoded(self.body(resp));
        Ok(exactly(decoded, pin.size, self.shown.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn zstd_frame_headers_give_their_content_size() {
        // Single segment, 1-byte FCS: 0x28b52ffd, FHD 0x20, FCS 5.
        assert_eq!(
            zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0x20, 5]),
            Some(5)
        );
        // FCS flag 2 (4 bytes), window descriptor present.
        let h = [0x28, 0xb5, 0x2f, 0xfd, 0x80, 0x58, 0x00, 0x00, 0x00, 0x04];
        assert_eq!(zstd_content_size(&h), Some(64 << 20));
        // FCS flag 1: value + 256.
        let h = [0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0x01];
        assert_eq!(zstd_content_size(&h), Some(256 + 256));
        // No FCS, not single segment: unknown.
        assert_eq!(
            zstd_content_size(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58]),
            None
        );
        assert_eq!(zstd_content_size(b"\x1f\x8b\x08\x00\x00"), None);
    }

    async fn collect(s: ByteStream) -> Result<Vec<u8>, SourceError> {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    fn parts(p: &[&'static [u8]]) -> ByteStream {
        let v: Vec<Result<Bytes, SourceError>> =
            p.iter().map(|b| Ok(Bytes::from_static(b))).collect();
        stream::iter(v).boxed()
    }

    #[tokio::test]
    async fn streams_must_hold_exactly_the_size() {
        let ok = collect(exactly(parts(&[b"ab", b"cd"]), 4, "u".into())).await;
        assert_eq!(ok.unwrap(), b"abcd");
        let short = collect(exactly(parts(&[b"ab"]), 4, "u".into())).await;
        assert!(short.unwrap_err().to_string().contains("2 bytes"));
        let long = collect(exactly(parts(&[b"ab", b"cd", b"e"]), 4, "u".into())).await;
        assert!(long.unwrap_err().to_string().contains("more than"));
    }
}
