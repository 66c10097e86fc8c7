use super::*;
use async_compression::tokio::bufread::{GzipEncoder, XzEncoder, ZstdEncoder};
use async_compression::Level;
use futures::TryStreamExt;
use rand::RngCore;
use tokio::io::AsyncReadExt;

#[derive(Debug, PartialEq)]
struct Boom(&'static str);

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

const ALL: [Compression; 3] = [Compression::Gzip, Compression::Xz, Compression::Zstd];

async fn compress(codec: Compression, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    // Fastest levels: the C codecs run unoptimised in test builds.
    match codec {
        Compression::Gzip => {
            GzipEncoder::with_quality(data, Level::Fastest)
                .read_to_end(&mut out)
                .await
        }
        Compression::Xz => {
            XzEncoder::with_quality(data, Level::Fastest)
                .read_to_end(&mut out)
                .await
        }
        Compression::Zstd => {
            ZstdEncoder::with_quality(data, Level::Fastest)
                .read_to_end(&mut out)
                .await
        }
    }
    .unwrap();
    out
}

/// `data` as a source stream of uneven chunks.
fn chunked(
    data: Vec<u8>,
    chunk: usize,
) -> impl Stream<Item = Result<Bytes, Boom>> + Send + Unpin + 'static {
    let data = Bytes::from(data);
    let pieces: Vec<Result<Bytes, Boom>> = (0..data.len())
        .step_by(chunk)
        .map(|i| Ok(data.slice(i..(i + chunk).min(data.len()))))
        .collect();
    stream::iter(pieces)
}

async fn collect(
    s: BoxStream<'static, Result<Bytes, DecompressError<Boom>>>,
) -> Result<Vec<u8>, DecompressError<Boom>> {
    s.try_fold(Vec::new(), |mut acc, b| async move {
        acc.extend_from_slice(&b);
        Ok(acc)
    })
    .await
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Deterministic and compressible: the codecs entropy-code it, so damage in the middle
/// breaks their bitstreams instead of landing in a stored block.
fn text(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while v.len() < len {
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        v.extend_from_slice(format!("line {i} value {x} {}\n", x % 977).as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

#[tokio::test]
async fn random_8mib_round_trips_through_every_codec() {
    let data = random(8 << 20);
    for codec in ALL {
        let packed = compress(codec, &data).await;
        assert_eq!(Compression::sniff(&packed), Some(codec));
        let out = collect(decompress(codec, chunked(packed.clone(), 65_536 + 13)))
            .await
            .unwrap();
        assert!(out == data, "{codec}: decompressed bytes differ");
        // Same through detection by magic bytes, the magic split over one-byte chunks.
        let rest = chunked(packed[5..].to_vec(), 65_536);
        let s = chunked(packed[..5].to_vec(), 1).chain(rest);
        let out = collect(decode(Detected::Unknown, s)).await;
        assert!(out.unwrap() == data, "{codec}: sniffed decode differs");
    }
}

#[tokio::test]
async fn concatenated_members_decode_as_one_body() {
    let (a, b) = (text(300_000), random(100_000));
    for codec in ALL {
        let mut packed = compress(codec, &a).await;
        packed.extend(compress(codec, &b).await);
        let out = collect(decompress(codec, chunked(packed, 4096)))
            .await
            .unwrap();
        assert_eq!(out.len(), a.len() + b.len(), "{codec}");
        assert!(
            out[..a.len()] == a[..] && out[a.len()..] == b[..],
            "{codec}"
        );
    }
}

#[tokio::test]
async fn corrupt_stream_is_an_error_that_says_corrupt_and_where() {
    let data = text(4 << 20);
    for codec in ALL {
        let mut packed = compress(codec, &data).await;
        let mid = packed.len() / 2;
        for b in &mut packed[mid..mid + 64] {
            *b ^= 0xA5;
        }
        let e = collect(decompress(codec, chunked(packed.clone(), 65_536)))
            .await
            .unwrap_err();
        match &e {
            DecompressError::Corrupt {
                codec: c,
                compressed_bytes,
                decompressed_bytes,
                ..
            } => {
                assert_eq!(*c, codec);
                assert!(*compressed_bytes as usize >= mid, "{codec}: {e}");
                assert!((*decompressed_bytes as usize) < data.len(), "{codec}: {e}");
            }
            other => panic!("{codec}: expected Corrupt, got {other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(codec.name())
                && msg.contains("corrupt")
                && msg.contains("compressed bytes"),
            "{msg}"
        );

        // Cut short: Truncated, not a quiet short image.
        packed.truncate(mid);
        let e = collect(decompress(codec, chunked(packed, 65_536)))
            .await
            .unwrap_err();
        assert!(
            matches!(e, DecompressError::Truncated { codec: c, compressed_bytes, .. } if c == codec && compressed_bytes as usize == mid),
            "{codec}: {e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
        let se = DecompressError::<SourceError>::Truncated {
            codec,
            compressed_bytes: 1,
            decompressed_bytes: 2,
        }
        .into_source_error("http://h/img.gz");
        assert!(
            matches!(&se, SourceError::Protocol { url, reason } if url == "http://h/img.gz" && reason.contains("truncated"))
                && !se.is_retryable(),
            "{se}"
        );
    }
    // Not that codec at all.
    let e = collect(decompress(Compression::Zstd, chunked(text(10_000), 999)))
        .await
        .unwrap_err();
    assert!(matches!(e, DecompressError::Corrupt { .. }), "{e}");
}

#[tokio::test]
async fn source_error_passes_through_typed() {
    let packed = compress(Compression::Gzip, &random(1 << 20)).await;
    let first = Bytes::from(packed[..100_000].to_vec());
    let s = stream::iter(vec![Ok(first), Err(Boom("origin went away"))]);
    let e = collect(decompress(Compression::Gzip, s)).await.unwrap_err();
    assert!(
        matches!(e, DecompressError::Source(Boom("origin went away"))),
        "{e}"
    );
    // Before the first byte, while sniffing.
    let s = stream::iter(vec![Err::<Bytes, _>(Boom("refused"))]);
    let e = collect(decode(Detected::Unknown, s)).await.unwrap_err();
    assert!(matches!(e, DecompressError::Source(Boom("refused"))), "{e}");
}

#[tokio::test]
async fn plain_bodies_pass_through() {
    for body in [
        text(1_000_000),
        b"QFI\xfb\0\0\0\x03".to_vec(),
        b"ab".to_vec(),
    ] {
        for d in [Detected::Unknown, Detected::Plain] {
            let out = collect(decode(d, chunked(body.clone(), 3))).await.unwrap();
            assert!(out == body, "{d:?}, {} bytes", body.len());
        }
    }
    assert!(collect(decode(Detected::Unknown, chunked(Vec::new(), 1)))
        .await
        .unwrap()
        .is_empty());
}

#[test]
fn detection_table() {
    use Compression::*;
    use Detected::*;
    let h = |parameter, content_encoding, content_type, url| Hints {
        parameter,
        content_encoding,
        content_type,
        url,
    };
    let rows: Vec<(Hints, Detected)> = vec![
        (h(None, None, None, "http://h/img.qcow2"), Unknown),
        (h(None, None, None, "http://h/img.raw.gz"), Compressed(Gzip)),
        (
            h(None, None, None, "http://h/IMG.QCOW2.XZ?sig=abc#x"),
            Compressed(Xz),
        ),
        (h(None, None, None, "http://h/img.zst"), Compressed(Zstd)),
        (h(None, None, None, "http://h/img.zstd"), Compressed(Zstd)),
        (h(None, None, None, "http://h/gz/img.raw?f=.gz"), Unknown),
        (
            h(None, None, Some("application/gzip"), "http://h/img"),
            Compressed(Gzip),
        ),
        (
            h(
                None,
                None,
                Some("application/x-xz; charset=binary"),
                "http://h/img",
            ),
            Compressed(Xz),
        ),
        (
            h(None, None, Some("application/zstd"), "http://h/img"),
            Compressed(Zstd),
        ),
        (
            h(
                None,
                None,
                Some("application/octet-stream"),
                "http://h/img.gz",
            ),
            Compressed(Gzip),
        ),
        (
            h(
                None,
                Some("gzip"),
                Some("application/octet-stream"),
                "http://h/img",
            ),
            Compressed(Gzip),
        ),
        (
            h(
                None,
                Some("zstd"),
                Some("application/gzip"),
                "http://h/img.xz",
            ),
            Compressed(Zstd),
        ),
        (h(None, Some("identity"), None, "http://h/img.gz"), Plain),
        (h(None, Some("br"), None, "http://h/img.xz"), Compressed(Xz)),
        (
            h(Some("none"), Some("gzip"), None, "http://h/img.gz"),
            Plain,
        ),
        (
            h(Some("XZ"), Some("gzip"), None, "http://h/img.gz"),
            Compressed(Xz),
        ),
        (h(Some("zst"), None, None, "http://h/img"), Compressed(Zstd)),
        (h(Some("gz"), None, None, "http://h/img"), Compressed(Gzip)),
        (h(Some(""), None, None, "http://h/img.gz"), Compressed(Gzip)),
    ];
    for (hints, want) in rows {
        assert_eq!(detect(&hints).unwrap(), want, "{hints:?}");
    }
    match detect(&h(Some("bzip2"), None, None, "http://h/img")) {
        Err(Error::BadInput(m)) => assert!(
            m.contains("bzip2") && m.contains("gzip, xz, zstd or none"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(Compression::sniff(b"\x1f\x8b\x08"), Some(Gzip));
    assert_eq!(Compression::sniff(b"\xfd7zXZ\0"), Some(Xz));
    assert_eq!(Compression::sniff(b"\xfd7zXZ"), None);
    assert_eq!(Compression::sniff(b"\x28\xb5\x2f\xfd"), Some(Zstd));
    assert_eq!(Compression::sniff(b"QFI\xfb"), None);
    assert_eq!(Compression::sniff(b""), None);
}
