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
