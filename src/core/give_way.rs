//! Background work gives way to readers, with a floor.
//!
//! On two cores, a fill at full speed (receive, write, hash) and the origin serving it left
//! a reader's random 4 KiB reads a p99 of 1.1-1.8 ms against 0.4-0.5 ms with no fill, and
//! neither half alone was the cause: with the fill's streams paused while readers read but
//! the hashing thread running (as SCHED_IDLE), or the other way round, the p99 was still
//! 0.95-1.6 ms; with both paused, 0.49-0.66 ms (bench.sh section E, 2 GiB image, 3 rounds
//! each). A SCHED_IDLE CPU burner alone beside reads with no fill raised their p99 from
//! 0.41-0.45 to 0.61-1.66 ms (the scheduler counts a CPU that runs only idle-class work as
//! idle and wakes threads there; not traced further). So priorities are not enough: the
//! background stops while readers read.
//!
//! Readers are active while one has read within the last `QUIET`: for the fills, readers
//! waiting on fetches far ahead of their image's fill (`FetchConfig::far_from_fill`;
//! readers near it are served best by it running), of any image on the node
//! (`FetchConfig::far_readers`); for the hashing thread, readers of any image still
//! arriving. The background then waits, but never for more than `HOLD_MAX` at a stretch:
//! it then runs for `TURN` and waits again. Reads that never pause for `QUIET` so leave
//! it 1% of the time at least, and an image read without pause still gets ready; reads
//! with pauses, a VM's boot or its bursts, leave it every pause at full speed. During
//! bench.sh section E's 2000 back-to-back reads the image still fetched 410-555 MiB/s
//! (630-690 before): reads that need no fetch, or lie near the fill, do not hold it, and
//! a fill stream looks only between jobs and MiBs (how much each gives was not traced).

use std::time::Duration;

use super::sync::atomic::{AtomicU64, Ordering};
use super::sync::LastSeen;

/// A pause in reading this long lets the background run.
pub const QUIET: Duration = Duration::from_millis(10);
/// The longest the background waits at a stretch while readers read without pause...
pub const HOLD_MAX: Duration = Duration::from_millis(1000);
/// ...and how long it then runs before it waits again.
pub const TURN: Duration = Duration::from_millis(10);

/// Readers' activity, and the background's hold (see the module's text).
#[derive(Debug)]
pub struct GiveWay {
    readers: LastSeen,
    /// When the current hold began, on `readers`' clock (0: not held).
    held_since: AtomicU64,
}

impl GiveWay {
    /// On tokio's clock (the fill's streams: paused time in tests).
    pub fn new() -> Self {
        Self::with(LastSeen::default())
    }

    /// On std's clock (a thread outside the runtime: the hashing thread).
    pub fn std_clock() -> Self {
        Self::with(LastSeen::std_clock())
    }

    fn with(readers: LastSeen) -> Self {
        Self {
            readers,
            held_since: AtomicU64::new(0),
        }
    }

    /// A reader read (or waits) now.
    pub fn reader(&self) {
        self.readers.mark();
    }

    /// Whether a reader read within `d`.
    pub fn readers_within(&self, d: Duration) -> bool {
        self.readers.within(d)
    }

    /// How long the background should wait before it asks again (counted in `held`, the
    /// asking work's); None: it may run now.
    pub fn wait(&self, held: &HeldTime) -> Option<Duration> {
        self.wait_counted(&[held])
    }

    /// Waits (on this thread) until the background may run, the waits counted in each of
    /// `held` (the hashing thread's, and the image whose hashing waits).
    pub fn wait_blocking(&self, held: &[&HeldTime]) {
        while let Some(d) = self.wait_counted(held) {
            std::thread::sleep(d);
        }
    }

    fn wait_counted(&self, held: &[&HeldTime]) -> Option<Duration> {
        let now = self.readers.now_ms();
        let since = self.held_since.load(Ordering::Relaxed);
        let (wait, held_next) = decide(now, self.readers.last_ms(), since);
        if held_next != since {
            // Racing background workers may both start a hold: a millisecond apart.
            self.held_since.store(held_next, Ordering::Relaxed);
        }
        if let Some(w) = wait {
            for h in held {
                h.count(now, w);
            }
        }
        wait.map(Duration::from_millis)
    }
}

/// How long one piece of background work (an image's fill, the hashing thread, an image's
/// hashing on that thread) has given
/// way: the union of the waits its workers were told, counted once however many waited at
/// the same time (a wait ended early by a reader's call counts whole: at most `QUIET`
/// more).
#[derive(Debug, Default)]
pub struct HeldTime {
    ms: AtomicU64,
    /// The end of the last wait counted.
    until: AtomicU64,
}

impl HeldTime {
    /// A worker was told at `now` to wait `wait` (ms, on the hold's clock).
    fn count(&self, now: u64, wait: u64) {
        let until = now + wait;
        let counted = self.until.fetch_max(until, Ordering::Relaxed).max(now);
        self.ms
            .fetch_add(until.saturating_sub(counted), Ordering::Relaxed);
    }

    pub fn total(&self) -> Duration {
        Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

impl Default for GiveWay {
    fn default() -> Self {
        Self::new()
    }
}

/// The hold's rule on a millisecond clock: at `now`, with the last read at `last` (0:
/// none yet) and the hold begun at `held` (0: none), how long to wait (None: run) and
/// when the hold began afterwards.
fn decide(now: u64, last: u64, held: u64) -> (Option<u64>, u64) {
    let (quiet, hold_max, turn) = (ms(QUIET), ms(HOLD_MAX), ms(TURN));
    let since_read = now.saturating_sub(last);
    if last == 0 || since_read >= quiet {
        return (None, 0);
    }
    let held = if held == 0 { now } else { held };
    let stretch = now - held.min(now);
    if stretch < hold_max {
        return (Some((quiet - since_read).min(hold_max - stretch)), held);
    }
    if stretch < hold_max + turn {
        return (None, held); // the background's turn
    }
    // The turn is over: a new hold.
    (Some((quiet - since_read).min(hold_max)), now)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: u64 = 10;
    const H: u64 = 1000;
    const T: u64 = 10;

    #[test]
    fn the_rule_holds_while_readers_read_and_gives_a_turn_after_the_longest_hold() {
        assert_eq!((ms(QUIET), ms(HOLD_MAX), ms(TURN)), (Q, H, T));
        // No reader yet, or none within QUIET: run, and no hold.
        assert_eq!(decide(500, 0, 0), (None, 0));
        assert_eq!(decide(500, 500 - Q, 0), (None, 0));
        assert_eq!(decide(500, 480, 300), (None, 0), "a pause ends the hold");
        // A read just now: the hold begins; wait until the readers may have gone quiet.
        assert_eq!(decide(500, 500, 0), (Some(Q), 500));
        assert_eq!(decide(503, 500, 500), (Some(Q - 3), 500));
        // Reads without pause: waits never run past the longest hold...
        assert_eq!(decide(500 + H - 2, 500 + H - 2, 500), (Some(2), 500));
        // ...then the background's turn...
        assert_eq!(decide(500 + H, 500 + H, 500), (None, 500));
        assert_eq!(decide(500 + H + T - 1, 500 + H + T - 1, 500), (None, 500));
        // ...and after it a new hold.
        let now = 500 + H + T;
        assert_eq!(decide(now, now, 500), (Some(Q), now));
    }

    #[test]
    fn the_background_waits_while_a_reader_reads_and_runs_once_it_stops() {
        let (g, held) = (GiveWay::std_clock(), HeldTime::default());
        assert_eq!(g.wait(&held), None, "no reader yet");
        g.reader();
        let t = std::time::Instant::now();
        let w = g.wait(&held).expect("a reader just read");
        assert!(w <= QUIET, "{w:?}");
        assert!(g.readers_within(QUIET));
        g.wait_blocking(&[&held]);
        let waited = t.elapsed();
        assert!(
            waited + Duration::from_millis(2) >= QUIET && waited < HOLD_MAX,
            "waited {waited:?}"
        );
        assert_eq!(g.wait(&held), None);
        // The first wait and those of `wait_blocking` cover the same stretch: counted once.
        let ms = Duration::from_millis;
        assert!(
            held.total() + ms(2) >= QUIET && held.total() <= waited + ms(2),
            "held {:?}, waited {waited:?}",
            held.total()
        );
    }

    #[test]
    fn waits_of_several_workers_at_once_count_once() {
        let h = HeldTime::default();
        let ms = Duration::from_millis;
        h.count(100, 10);
        h.count(103, 7); // another worker, the same stretch
        assert_eq!(h.total(), ms(10));
        h.count(105, 10); // overlapping: only what lies past 110
        assert_eq!(h.total(), ms(15));
        h.count(200, 4); // a later, separate wait
        assert_eq!(h.total(), ms(19));
    }
}
