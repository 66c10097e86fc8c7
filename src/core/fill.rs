//! The background fill: materialises the whole image in order from the first block, at
//! most `fill_parallel` requests at a time, skipping what readers already fetched or are
//! fetching. In-order progress keeps the verifier's prefix growing. Readers never wait
//! for a fill permit, which is what gives them priority.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tracing::info;

use super::image::Image;
use super::store::State;

impl Image {
    /// Starts the fill unless it runs already, it is switched off, or there is nothing to do.
    pub fn start_fill(self: &Arc<Self>) {
        if !self.fill_enabled() || matches!(self.state(), State::Ready | State::Failed) {
            return;
        }
        if self.fill_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.fill_loop().await;
            me.fill_running.store(false, Ordering::Release);
        });
    }

    async fn fill_loop(self: &Arc<Self>) {
        info!(image = %self.name, present = self.map.present_count(), blocks = self.blocks(), "fill started");
        let sem = Arc::new(Semaphore::new(self.cfg.fill_parallel));
        let max_blocks = (self.cfg.max_request / self.block_size).max(1);
        let mut cursor = 0;
        loop {
            if self.cancel.is_cancelled() || self.is_failed() || !self.fill_enabled() {
                return;
            }
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = self.cancel.cancelled() => return,
            };
            let notified = self.landed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (_, started) = self.plan(cursor..self.blocks(), false, max_blocks, Some(permit));
            if let Some(run) = started {
                cursor = run.end;
                continue;
            }
            if self.map.is_complete() {
                info!(image = %self.name, "fill complete");
                return;
            }
            // Everything absent is being fetched: wait for a job to end, then rescan from
            // the start (a reader's failed job may have left a hole behind the cursor).
            cursor = 0;
            tokio::select! {
                _ = notified => {}
                _ = self.cancel.cancelled() => return,
            }
        }
    }
}
