//! The locks, atomics and task spawn that the fetch table, the block map and the flush
//! synchronise with: std's and tokio's in every build, shuttle's under the `shuttle`
//! feature, so that the model tests (`model_tests.rs`) explore the interleavings of
//! bifs's own code at the very points where it synchronises, not of a copy of it.
//!
//! Under `shuttle` these types work only inside a shuttle test: that build runs the
//! model tests alone (`cargo test --lib --features shuttle model_`).

#[cfg(not(feature = "shuttle"))]
pub use std::sync::{atomic, Mutex, MutexGuard, RwLock};

#[cfg(feature = "shuttle")]
pub use shuttle::sync::{atomic, Mutex, MutexGuard, RwLock};

/// Runs a fetch job in the background: on tokio's runtime, or as a shuttle task.
pub fn spawn<F>(fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    #[cfg(not(feature = "shuttle"))]
    tokio::spawn(fut);
    #[cfg(feature = "shuttle")]
    shuttle::future::spawn(fut);
}

/// A job's pause before it retries: tokio's timer, or under shuttle a scheduling point
/// (the model has no clock: any other task may run meanwhile, as in a pause).
pub async fn sleep(pause: std::time::Duration) {
    #[cfg(not(feature = "shuttle"))]
    tokio::time::sleep(pause).await;
    #[cfg(feature = "shuttle")]
    {
        let _ = pause;
        shuttle::future::yield_now().await;
    }
}

/// A fill stream's pause for waiting readers: tokio's timer, or under shuttle a
/// scheduling point (the model has no clock: any other task may run meanwhile).
pub async fn sleep_until(deadline: tokio::time::Instant) {
    #[cfg(not(feature = "shuttle"))]
    tokio::time::sleep_until(deadline).await;
    #[cfg(feature = "shuttle")]
    {
        let _ = deadline;
        shuttle::future::yield_now().await;
    }
}

/// When something last happened, to ask whether it was within a while: milliseconds
/// since the value was made (0: never), one atomic. tokio's clock, so paused-time tests
/// see their own (the hashing thread's `ReaderPressure` keeps std's: it is read off the
/// runtime); a plain std atomic in every build (a hint, not a point the model tests
/// need to explore).
#[derive(Debug)]
pub struct LastSeen {
    epoch: tokio::time::Instant,
    ms: std::sync::atomic::AtomicU64,
}

impl Default for LastSeen {
    fn default() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl LastSeen {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// It happened now.
    pub fn mark(&self) {
        self.ms
            .store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether it happened less than `d` ago.
    pub fn within(&self, d: std::time::Duration) -> bool {
        let last = self.ms.load(std::sync::atomic::Ordering::Relaxed);
        last != 0 && self.now_ms().saturating_sub(last) < d.as_millis() as u64
    }
}
