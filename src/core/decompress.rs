//! Compressed downloads: which compression a URL's body uses, and a stream of its
//! decompressed bytes. The image is the decompressed bytes (its SHA-512 is theirs, as
//! Longhorn's); a compressed body cannot serve a random range, so whoever uses this
//! reads the source in order from the start.
//!
//! Detection, first answer wins: the explicit `sourceParameters.compression`
//! (`gzip|gz`, `xz`, `zstd|zst`, or `none` to turn detection off), then
//! `Content-Encoding`, then `Content-Type`, then the URL's suffix (`.gz`, `.xz`, `.zst`);
//! when none of them says anything, the first bytes (magic numbers) decide.
//!
//! Codecs: `async-compression` (tokio bufread decoders) over `tokio_util::io::StreamReader`,
//! back to a stream with `ReaderStream`. It wraps flate2 (pure Rust, miniz_oxide), liblzma
//! and zstd (both C libraries built from their bundled sources by cc: nothing to install).
//! Build cost measured here (2 cores, clean debug build of just these 14 crates, the C
//! at opt-level 3 as Cargo.toml asks): about 70 s wall, of which zstd-sys's C is 58 s,
//! liblzma-sys 16 s, miniz_oxide 0.9 6 s (a second copy: qcow2-rs keeps 0.7), the rest
//! under 5 s. Pure-Rust xz (lzma-rs) and zstd (ruzstd) decoders would build faster but
//! run several times slower, and decompression sits on the path to every byte of such an
//! image. Measured decode alone of a 90 MB body (64 MiB random + 26 MB text, made by the
//! gzip/xz/zstd tools) in a debug build: gzip 0.18 s, xz 0.25 s, zstd 0.05 s; mostly
//! incompressible data flatters gzip and xz, whose real-image speeds are lower.
//!
//! Concatenated members (pigz, `zstd` of several frames, `xz` of several streams) are
//! decoded as one body. A corrupt or truncated body ends the stream with
//! `DecompressError::Corrupt` / `Truncated`, which say the codec and how far into the
//! compressed and decompressed bytes it got.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_compression::tokio::bufread::{GzipDecoder, XzDecoder, ZstdDecoder};
use bytes::Bytes;
use futures::stream::{self, BoxStream, Stream, StreamExt, TryStreamExt};
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use super::error::{Error, Result, SourceError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }

    /// The codec whose magic number `prefix` starts with (6 bytes are enough for all).
    pub fn sniff(prefix: &[u8]) -> Option<Compression> {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if prefix.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(Compression::Xz)
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the spec and the response say about a body, before any byte of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hints<'a> {
    /// `sourceParameters.compression`, if given.
    pub parameter: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub url: &'a str,
}

/// The outcome of `detect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Compressed(Compression),
    /// The parameter (`none`) or `Content-Encoding: identity` says the body is the image.
    Plain,
    /// Nothing says: let the first bytes decide (`decode` does).
    Unknown,
}

/// Decides from the hints, first answer wins. Only an unknown parameter value is an error.
pub fn detect(h: &Hints) -> Result<Detected> {
    if let Some(p) = h.parameter.map(str::trim).filter(|p| !p.is_empty()) {
        return match p.to_ascii_lowercase().as_str() {
            "gzip" | "gz" => Ok(Detected::Compressed(Compression::Gzip)),
            "xz" => Ok(Detected::Compressed(Compression::Xz)),
            "zstd" | "zst" => Ok(Detected::Compressed(Compression::Zstd)),
            "none" => Ok(Detected::Plain),
            _ => Err(Error::BadInput(format!(
                "unknown compression {p:?}: use gzip, xz, zstd or none (or leave it out to detect it)"
            ))),
        };
    }
    if let Some(enc) = h.content_encoding {
        // Several codings may be listed; the last one applied is the first to undo, and we
        // undo only one.
        let last = enc
            .rsplit(',')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match last.as_str() {
            "gzip" | "x-gzip" => return Ok(Detected::Compressed(Compression::Gzip)),
            "zstd" => return Ok(Detected::Compressed(Compression::Zstd)),
            "xz" | "x-xz" => return Ok(Detected::Compressed(Compression::Xz)),
            "identity" => return Ok(Detected::Plain),
            _ => {}
        }
    }
    if let Some(ct) = h.content_type {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/gzip" | "application/x-gzip" => {
                return Ok(Detected::Compressed(Compression::Gzip))
            }
            "application/x-xz" | "application/xz" => {
                return Ok(Detected::Compressed(Compression::Xz))
            }
            "application/zstd" | "application/x-zstd" => {
                return Ok(Detected::Compressed(Compression::Zstd))
            }
            _ => {}
        }
    }
    let path = h.url.split(['?', '#']).next().unwrap_or("");
    let path = path.to_ascii_lowercase();
    let by_suffix = [
        (".gz", Compression::Gzip),
        (".gzip", Compression::Gzip),
        (".xz", Compression::Xz),
        (".zst", Compression::Zstd),
        (".zstd", Compression::Zstd),
    ];
    for (suffix, c) in by_suffix {
        if path.ends_with(suffix) {
            return Ok(Detected::Compressed(c));
        }
    }
    Ok(Detected::Unknown)
}

/// A failed decompressed stream: the source's own error, or bad compressed data.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError<E> {
    #[error("{0}")]
    Source(E),
    /// The bytes already yielded may be wrong too: gzip, xz and zstd check their
    /// checksums at the end of a member or frame (seen: a zstd body damaged in a raw
    /// block decoded to its end and only then failed its checksum). A consumer must
    /// never count a body whose stream did not end cleanly as the image.
    #[error("the {codec} stream is corrupt within its first {compressed_bytes} compressed bytes ({decompressed_bytes} bytes decompressed so far): {reason}; the source does not hold a valid {codec} file")]
    Corrupt {
        codec: Compression,
        compressed_bytes: u64,
        decompressed_bytes: u64,
        reason: String,
    },
    #[error("the {codec} stream ends after {compressed_bytes} compressed bytes ({decompressed_bytes} decompressed), before the end of its compressed data; the file on the source is truncated")]
    Truncated {
        codec: Compression,
        compressed_bytes: u64,
        decompressed_bytes: u64,
    },
}

impl DecompressError<SourceError> {
    /// For `Source::read`: bad compressed data is a permanent `Protocol` error of the
    /// source at `url` (the image fails as source-gone: retrying fetches the same bytes).
    pub fn into_source_error(self, url: &str) -> SourceError {
        match self {
            DecompressError::Source(e) => e,
            bad => SourceError::Protocol {
                url: url.to_string(),
                reason: bad.to_string(),
            },
        }
    }
}

/// The decompressed bytes of `input` (`codec` data), in chunks of up to 256 KiB.
/// The stream ends after its first error.
pub fn decompress<S, E>(
    codec: Compression,
    input: S,
) -> BoxStream<'static, Result<Bytes, DecompressError<E>>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    let compressed = Arc::new(AtomicU64::new(0));
    // The decoder sees only io::Error; the source's own error waits here, typed.
    let source_error: Arc<Mutex<Option<E>>> = Arc::new(Mutex::new(None));
    let counted = {
        let (compressed, source_error) = (compressed.clone(), source_error.clone());
        input.map(move |r| match r {
            Ok(b) => {
                compressed.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(b)
            }
            Err(e) => {
                if let Ok(mut slot) = source_error.lock() {
                    *slot = Some(e);
                }
                Err(io::Error::other("the source failed"))
            }
        })
    };
    let reader = StreamReader::new(Box::pin(counted));
    let decoder: Box<dyn AsyncRead + Send + Unpin> = match codec {
        Compression::Gzip => {
            let mut d = GzipDecoder::new(reader);
            d.multiple_members(true);
            Box::new(d)
        }
        Compression::Xz => {
            let mut d = XzDecoder::new(reader);
            d.multiple_members(true);
            Box::new(d)
        }
        Compression::Zstd => {
            let mut d = ZstdDecoder::new(reader);
            d.multiple_members(true);
            Box::new(d)
        }
    };
    let mut decompressed = 0u64;
    ReaderStream::with_capacity(decoder, 256 << 10)
        .map(move |r| match r {
            Ok(b) => {
                decompressed += b.len() as u64;
                Ok(b)
            }
            Err(e) => {
                if let Some(src) = source_error.lock().ok().and_then(|mut s| s.take()) {
                    return Err(DecompressError::Source(src));
                }
                let compressed_bytes = compressed.load(Ordering::Relaxed);
                Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                    DecompressError::Truncated {
                        codec,
                        compressed_bytes,
                        decompressed_bytes: decompressed,
                    }
                } else {
                    DecompressError::Corrupt {
                        codec,
                        compressed_bytes,
                        decompressed_bytes: decompressed,
                        reason: e.to_string(),
                    }
                })
            }
        })
        .boxed()
}

/// Peeks at the first bytes of `input` (at least 6, or all of a shorter body) and returns
/// the codec their magic number names with a stream that still yields every byte.
pub async fn sniff_stream<S, E>(
    input: S,
) -> Result<(Option<Compression>, BoxStream<'static, Result<Bytes, E>>), E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    let (prefix, whole) = peek(input, 6).await?;
    Ok((Compression::sniff(&prefix), whole))
}

/// The first `n` bytes of a stream (fewer if it ends sooner), and the whole stream again.
pub async fn peek<S, E>(
    mut input: S,
    n: usize,
) -> Result<(Vec<u8>, BoxStream<'static, Result<Bytes, E>>), E>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    let mut head: Vec<Bytes> = Vec::new();
    let mut seen = 0usize;
    while seen < n {
        match input.next().await {
            Some(Ok(b)) => {
                seen += b.len();
                head.push(b);
            }
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    let prefix = head
        .iter()
        .flat_map(|b| b.iter().copied())
        .take(n)
        .collect();
    let whole = stream::iter(head.into_iter().map(Ok)).chain(input).boxed();
    Ok((prefix, whole))
}

/// The image bytes of a body as `detect` judged it: decompressed, passed through, or
/// (Unknown) sniffed first and then one of the two.
pub fn decode<S, E>(
    detected: Detected,
    input: S,
) -> BoxStream<'static, Result<Bytes, DecompressError<E>>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    match detected {
        Detected::Compressed(c) => decompress(c, input),
        Detected::Plain => input.map_err(DecompressError::Source).boxed(),
        Detected::Unknown => stream::once(async move {
            match sniff_stream(input).await {
                Ok((Some(c), s)) => decompress(c, s),
                Ok((None, s)) => s.map_err(DecompressError::Source).boxed(),
                Err(e) => stream::once(async move { Err(DecompressError::Source(e)) }).boxed(),
            }
        })
        .flatten()
        .boxed(),
    }
}

#[cfg(test)]
#[path = "decompress_tests.rs"]
mod tests;
