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
/// since the value was made (0: never), one atomic; a plain std atomic in every build (a
/// hint, not a point the model tests need to explore). Two clocks: tokio's (`default`),
/// so paused-time tests see their own; or std's (`std_clock`), for a value read off the
/// runtime (the hashing thread's), where tokio's paused clock would not be the one its
/// marks were made with.
#[derive(Debug)]
pub struct LastSeen {
    epoch: std::time::Instant,
    tokio_clock: bool,
    ms: std::sync::atomic::AtomicU64,
}

impl Default for LastSeen {
    fn default() -> Self {
        Self::new(true)
    }
}

impl LastSeen {
    /// On std's clock.
    pub fn std_clock() -> Self {
        Self::new(false)
    }

    fn new(tokio_clock: bool) -> Self {
        let mut s = Self {
            epoch: std::time::Instant::now(),
            tokio_clock,
            ms: std::sync::atomic::AtomicU64::new(0),
        };
        s.epoch = s.now();
        s
    }

    fn now(&self) -> std::time::Instant {
        if self.tokio_clock {
            tokio::time::Instant::now().into_std()
        } else {
            std::time::Instant::now()
        }
    }

    /// Milliseconds on this clock (1 at its creation).
    pub(crate) fn now_ms(&self) -> u64 {
        self.now().saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// It happened now.
    pub fn mark(&self) {
        self.ms
            .store(self.now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// When it last happened, in `now_ms`' terms (0: never).
    pub(crate) fn last_ms(&self) -> u64 {
        self.ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether it happened less than `d` ago.
    pub fn within(&self, d: std::time::Duration) -> bool {
        let last = self.ms.load(std::sync::atomic::Ordering::Relaxed);
        last != 0 && self.now_ms().saturating_sub(last) < d.as_millis() as u64
    }
}
