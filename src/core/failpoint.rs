//! Failpoints: crash the process at a named point, for tests that prove a durability
//! rule by dying inside the window it is about. Compiled only with the `failpoints`
//! cargo feature (scripts/test.sh builds the one test binary with it; release builds
//! never have it), and armed only by `BIFS_FAILPOINT=NAME[:N]`: the Nth time the
//! process passes `NAME` (default the first) it sends itself SIGKILL, as `kill -9`
//! would, so no destructor, flush or unmount runs.
//!
//! Points: `flush-before-bitmap` (`ImageFiles::flush`: the data is `fdatasync`ed, its
//! bits are not yet written).

use std::sync::atomic::{AtomicU64, Ordering};

/// Times each armed point was passed. A process-wide counter on purpose: the point is
/// named once per process by the environment, and test-only.
static PASSED: AtomicU64 = AtomicU64::new(0);

/// Kills the process if `name` is armed and this is its Nth pass.
pub fn hit(name: &str) {
    let Ok(spec) = std::env::var("BIFS_FAILPOINT") else {
        return;
    };
    let (armed, nth) = match spec.split_once(':') {
        Some((n, count)) => (n, count.parse::<u64>().unwrap_or(1)),
        None => (spec.as_str(), 1),
    };
    if armed != name {
        return;
    }
    if PASSED.fetch_add(1, Ordering::SeqCst) + 1 == nth.max(1) {
        tracing::warn!(
            failpoint = name,
            pass = nth,
            "failpoint reached: killing the process"
        );
        // SAFETY: kill(2) on our own pid with a signal number; no memory is shared.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
