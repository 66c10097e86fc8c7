//! Uploads: an image whose bytes a client pushes (`PUT /v1/images/{name}/upload`, one
//! request per piece with `Content-Range: bytes A-B/TOTAL`). This module owns both ends:
//!
//! - `receive` lands a piece's bytes through `Fetcher::land`, the one landing path, as
//!   they arrive: whole blocks, in batches, never over a block already present (a
//!   resumed or repeated upload cannot change bytes the verifier has hashed). The
//!   verifier hashes the landed prefix as it grows, so the image is ready moments after
//!   the last byte. A piece that ends early keeps the whole blocks it brought.
//! - `UploadSource` is the image's source: a reader of a block not received yet waits
//!   for the upload to bring it (its fetch job then serves the block from the data file,
//!   rewriting the same bytes). When no upload is in progress (no piece for
//!   `IDLE_AFTER`), it answers with an error that may pass: the fetcher retries it for a
//!   few seconds, then the reader gets EIO, and the log says to run `bifs upload`.
//!   An upload image has no fill of its own: the upload is its fill.
//!
//! Resuming is the client's part: it asks `GET /v1/images/{name}/blocks` which blocks
//! are present and sends only the others.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::Notify;

use super::error::{Error, Result, SourceError};
use super::fetch::Fetcher;
use super::image::Image;
use super::range::{BlockRange, ByteRange};
use super::source::{ByteStream, Identity, Priority, Source};
use super::spec::SourceType;
use super::store::State;

/// An upload with no piece arriving for this long is not in progress.
const IDLE_AFTER: Duration = Duration::from_secs(3);
/// Bytes landed at once (whole blocks).
const BATCH: usize = 1 << 20;

/// What one image's upload is doing; shared by its source and the receiving requests.
#[derive(Default)]
pub struct UploadState {
    fetcher: OnceLock<Weak<Fetcher>>,
    active: AtomicUsize,
    last_piece: Mutex<Option<Instant>>,
    received: AtomicU64,
    changed: Notify,
}

impl UploadState {
    fn in_progress(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
            || self
                .last_piece
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < IDLE_AFTER)
    }

    fn touch(&self) {
        *self.last_piece.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Bytes received by this daemon for this image since it started.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Counts a piece in flight while it lives.
struct Active<'a>(&'a UploadState);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// The source of an upload image: blocks come only from the upload.
pub struct UploadSource {
    name: String,
    size: u64,
    state: Arc<UploadState>,
}

impl UploadSource {
    pub fn new(name: &str, size: u64) -> Self {
        Self {
            name: name.to_string(),
            size,
            state: Arc::default(),
        }
    }
}

/// What a reader of a block not uploaded gets while no upload runs: an error that may
/// pass (the fetcher retries it a few times, then the reader gets EIO).
fn not_in_progress(name: &str, at: u64) -> SourceError {
    SourceError::Unreachable {
        url: format!("upload of {name}"),
        reason: format!(
            "byte {at} has not been uploaded and no upload is in progress; \
             run `bifs upload {name} FILE` (again: it resumes)"
        ),
    }
}

#[async_trait]
impl Source for UploadSource {
    fn describe(&self) -> String {
        format!("upload of {}", self.name)
    }

    fn ranges(&self) -> bool {
        true
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn probe(&self) -> Result<Identity, SourceError> {
        Ok(Identity::of_size(self.size))
    }

    /// Waits for the upload to land `range`'s blocks, streaming each run as it is there.
    async fn read(
        &self,
        range: ByteRange,
        _pin: &Identity,
        prio: Priority,
    ) -> Result<ByteStream, SourceError> {
        if prio == Priority::Fill {
            // The upload is the fill (`bifs fill` on an upload image): a fill job would
            // only wait for the upload and write its blocks twice.
            return Err(SourceError::Absent {
                url: self.describe(),
                start: range.start,
                end: range.end,
            });
        }
        let fetcher = match self.state.fetcher.get().and_then(Weak::upgrade) {
            Some(f) if self.state.in_progress() => f,
            _ => return Err(not_in_progress(&self.name, range.start)),
        };
        let state = self.state.clone();
        let name = self.name.clone();
        let s = futures::stream::unfold(range.start, move |at| {
            let (fetcher, state, name) = (fetcher.clone(), state.clone(), name.clone());
            async move {
                if at >= range.end {
                    return None;
                }
                let geo = fetcher.geometry();
                let block = at / geo.block_size;
                loop {
                    let landed = fetcher.landed_notify();
                    let notified = landed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if fetcher.map().is_set(block) {
                        break;
                    }
                    if !state.in_progress() {
                        return Some((Err(not_in_progress(&name, at)), range.end));
                    }
                    tokio::select! {
                        _ = notified => {}
                        _ = state.changed.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                // The run of present blocks from here, up to 1 MiB.
                let last = geo.blocks_of(ByteRange::new(at, range.end)).end;
                let upto = fetcher
                    .map()
                    .first_missing(BlockRange::new(block, last))
                    .unwrap_or(last);
                let end = (upto * geo.block_size)
                    .min(range.end)
                    .min(at + BATCH as u64);
                match fetcher.read_present_async(ByteRange::new(at, end)).await {
                    Ok(b) => Some((Ok(b), end)),
                    Err(e) => Some((
                        Err(SourceError::Interrupted {
                            url: "upload".into(),
                            reason: e.to_string(),
                        }),
                        range.end,
                    )),
                }
            }
        });
        Ok(s.boxed())
    }
}

/// The upload state of `image`, if it is an upload image.
pub fn state_of(image: &Image) -> Option<Arc<UploadState>> {
    let sources = image.fetcher().sources();
    sources.list.iter().find_map(|s| {
        s.as_any()
            .and_then(|a| a.downcast_ref::<UploadSource>())
            .map(|u| u.state.clone())
    })
}

/// Parses `bytes A-B/TOTAL` into the byte range and the total.
pub fn parse_content_range(v: &str) -> Option<(ByteRange, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b, total): (u64, u64, u64) = (
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (a <= b && b < total).then(|| (ByteRange::new(a, b + 1), total))
}

/// What one piece did (the reply to its PUT).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    /// Bytes of this piece's body received.
    pub received: u64,
    /// Bytes of it landed (blocks already present are skipped).
    pub landed: u64,
    /// Bytes received for this image since the daemon started.
    pub received_total: u64,
    pub state: State,
}

/// Receives one piece: `content_range` (the header's value) and its body.
pub async fn receive<S, E>(
    image: &Arc<Image>,
    content_range: Option<&str>,
    body: S,
) -> Result<Receipt>
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let name = &image.name;
    if image.stored().spec.source_type != SourceType::Upload {
        return Err(Error::BadInput(format!(
            "image {name:?} is not an upload image (its sourceType is {}); create it with `bifs upload`",
            image.stored().spec.source_type.as_str()
        )));
    }
    let state = state_of(image).ok_or_else(|| {
        Error::Unsupported(format!(
            "image {name:?} cannot take an upload on this node (it comes from peers here)"
        ))
    })?;
    if image.is_failed() {
        return Err(image.failure());
    }
    let size = image.size();
    let (range, total) = match content_range {
        None if size == 0 => (ByteRange::new(0, 0), 0),
        None => {
            return Err(Error::BadInput(
                "an upload piece needs Content-Range: bytes FIRST-LAST/TOTAL".into(),
            ))
        }
        Some(v) => parse_content_range(v).ok_or_else(|| {
            Error::BadInput(format!(
                "bad Content-Range {v:?}: give bytes FIRST-LAST/TOTAL, FIRST <= LAST < TOTAL"
            ))
        })?,
    };
    if total != size {
        return Err(Error::BadInput(format!(
            "the uploaded file is {total} bytes but image {name:?} was created for {size}; \
             upload the file it was created for, or delete the image first"
        )));
    }
    let geo = image.geometry();
    let bs = geo.block_size;
    if !range.start.is_multiple_of(bs) || (!range.end.is_multiple_of(bs) && range.end != size) {
        return Err(Error::BadInput(format!(
            "upload piece {range:?} of {name:?} is not whole {bs}-byte blocks (the last piece may end at the file's end)"
        )));
    }
    // As a download's fill is refused when the disk cannot hold the rest of the image.
    let need = size - image.bytes_cached();
    let free = image.disk.free_bytes();
    if free < need {
        return Err(Error::Io {
            path: image.disk.path.clone(),
            msg: format!(
                "not enough space for the rest of the upload: {need} more bytes needed, {free} free; \
                 free space and run the same `bifs upload` again"
            ),
            errno: libc::ENOSPC,
        });
    }
    let fetcher = image.fetcher().clone();
    let _ = state.fetcher.set(Arc::downgrade(&fetcher));
    state.active.fetch_add(1, Ordering::AcqRel);
    let _active = Active(&state);
    state.changed.notify_waiters();

    let mut body = body;
    let mut buf = BytesMut::with_capacity(BATCH);
    let mut at = range.start;
    let mut received = 0u64;
    let mut landed = 0u64;
    loop {
        let chunk = match body.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                land_blocks(&fetcher, at, buf.split().freeze(), &mut landed, true).await?;
                return Err(Error::BadInput(format!(
                    "the upload of {name:?} broke off after {received} bytes of piece {range:?}: {e}; \
                     run the same `bifs upload` again to resume"
                )));
            }
            None => break,
        };
        received += chunk.len() as u64;
        state
            .received
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        state.touch();
        if at + (buf.len() + chunk.len()) as u64 > range.end {
            return Err(Error::BadInput(format!(
                "upload piece {range:?} of {name:?} sent more bytes than its Content-Range says"
            )));
        }
        buf.extend_from_slice(&chunk);
        if buf.len() >= BATCH {
            let whole = buf.len() / bs as usize * bs as usize;
            let batch = buf.split_to(whole).freeze();
            let n = batch.len() as u64;
            land_blocks(&fetcher, at, batch, &mut landed, false).await?;
            at += n;
        }
    }
    let rest = buf.split().freeze();
    let short = at + rest.len() as u64 != range.end;
    land_blocks(&fetcher, at, rest, &mut landed, short).await?;
    if short {
        return Err(Error::BadInput(format!(
            "upload piece {range:?} of {name:?} ended after {received} bytes; \
             run the same `bifs upload` again to resume"
        )));
    }
    Ok(Receipt {
        received,
        landed,
        received_total: state.received(),
        state: image.state(),
    })
}

/// Lands the absent whole blocks of `bytes` (at `offset`); `partial`: a trailing piece of
/// a block is dropped (the piece broke off), otherwise `bytes` ends on a block or the image.
async fn land_blocks(
    fetcher: &Fetcher,
    offset: u64,
    mut bytes: Bytes,
    landed: &mut u64,
    partial: bool,
) -> Result<()> {
    let geo = fetcher.geometry();
    let bs = geo.block_size;
    if partial && offset + bytes.len() as u64 != geo.size {
        bytes.truncate(bytes.len() / bs as usize * bs as usize);
    }
    if bytes.is_empty() {
        return Ok(());
    }
    let blocks = geo.blocks_of(ByteRange::new(offset, offset + bytes.len() as u64));
    let map = fetcher.map();
    let mut b = blocks.start;
    while b < blocks.end {
        let Some(m) = map.first_missing(BlockRange::new(b, blocks.end)) else {
            break;
        };
        let e = map
            .first_present(BlockRange::new(m, blocks.end))
            .unwrap_or(blocks.end);
        let from = ((m * bs - offset) as usize).min(bytes.len());
        let to = ((e * bs).saturating_sub(offset) as usize).min(bytes.len());
        fetcher.land(m * bs, vec![bytes.slice(from..to)]).await?;
        *landed += (to - from) as u64;
        b = e;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse_and_reject_nonsense() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((ByteRange::new(0, 100), 1000))
        );
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 0-10/10"), None);
        assert_eq!(parse_content_range("bytes 0-1/*"), None);
    }
}
