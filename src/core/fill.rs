//! The background fill: materialises the whole image in order from the first block, at
//! most `parallel` requests at a time, skipping what readers already fetched or are
//! fetching. In-order progress keeps the verifier's prefix growing. Readers never wait
//! for a fill permit, and the fill's requests go to sources as `Priority::Fill`, which
//! is what gives readers priority, with the pauses of `Fetcher::yield_to_readers`. It
//! drives a `Fetcher` and knows no `Image`.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::error::Error;
use super::fetch::Fetcher;
use super::range::BlockRange;

/// How often a fill with nothing to start looks again (work left to other nodes).
const RESCAN_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// How a fill ended.
#[derive(Debug)]
pub enum FillEnd {
    /// Every block is present.
    Complete,
    /// Told to stop (shutdown, the image failed, the fill was switched off).
    Stopped,
    /// A fill job failed without failing the image (no source can serve a block, the
    /// source stayed unreachable): the fill stops; `bifs fill` restarts it.
    Failed(Error),
}

/// Runs the fill until every block is present, `stop()` says so, or a job fails.
pub async fn run(
    fetcher: Arc<Fetcher>,
    parallel: usize,
    cancel: CancellationToken,
    stop: impl Fn() -> bool,
) -> FillEnd {
    let _running = fetcher.fill_running();
    let map = fetcher.map().clone();
    let blocks = map.blocks();
    info!(present = map.present_count(), blocks, "fill started");
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let landed = fetcher.landed_notify();
    // Nodes sharing the fill begin in different places (see `FillPolicy::first_unit`).
    let mut cursor = match &fetcher.sources().fill_policy {
        Some(p) => {
            let unit = (super::pieces::PIECE_SIZE / fetcher.geometry().block_size).max(1);
            p.first_unit(blocks.div_ceil(unit)) * unit
        }
        None => 0,
    };
    loop {
        if cancel.is_cancelled() || stop() {
            return FillEnd::Stopped;
        }
        if let Some(e) = fetcher.take_fill_error() {
            return FillEnd::Failed(e);
        }
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = cancel.cancelled() => return FillEnd::Stopped,
        };
        // A reader waiting on a fetch goes first (fetch/mod.rs: readers first).
        fetcher.yield_to_readers().await;
        let notified = landed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(run) = fetcher.start_fill_job(cursor, permit) {
            cursor = run.end;
            continue;
        }
        if map.all_set(BlockRange::new(0, blocks)) {
            info!("fill complete");
            return FillEnd::Complete;
        }
        // Everything absent is being fetched (or left to another node for now): wait for
        // a job to end or a while, then rescan from the start (a reader's failed job may
        // have left a hole behind the cursor; another node may have fetched its share).
        cursor = 0;
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(RESCAN_EVERY) => {}
            _ = cancel.cancelled() => return FillEnd::Stopped,
        }
    }
}
