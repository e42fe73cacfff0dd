//! The node's hybrid logical clock: `unix_ms << 16 | counter`, never going backwards.
//!
//! [`Clock::now`] gives a value larger than every value it gave before and at least the wall clock.
//! The high-water mark is persisted with every commit (`crate::log`), and a node reopens its clock
//! at `max(persisted, wall)`, so the clock never goes backwards across restarts either.
//! [`Clock::observe`] folds in clocks seen on other authors' scribes, except those more than
//! [`MAX_OBSERVED_DRIFT_MS`] ahead of the wall clock: one author with a broken clock must not drag
//! every node's clock into the future (those scribes are still stored; only the clock ignores them).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How far ahead of the local wall clock an observed clock may be and still move ours.
pub const MAX_OBSERVED_DRIFT_MS: u64 = 60_000;

/// A source of wall-clock milliseconds; injectable so tests can move time without sleeping.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system wall clock in unix milliseconds.
pub fn system_wall_clock() -> WallClock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// A hybrid logical clock shared by every writer of one node.
pub struct Clock {
    last: Mutex<u64>,
    wall: WallClock,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock").field("last", &self.peek()).finish()
    }
}

impl Clock {
    /// A clock that will never return a value at or below `high_water`.
    pub fn new(high_water: u64, wall: WallClock) -> Clock {
        Clock {
            last: Mutex::new(high_water),
            wall,
        }
    }

    /// The next value: greater than any value returned before, and at least the wall clock.
    pub fn now(&self) -> u64 {
        let wall = (self.wall)() << 16;
        let mut last = self.last.lock().expect("clock lock poisoned");
        let next = wall.max(last.saturating_add(1));
        *last = next;
        next
    }

    /// Moves the clock up to `seen` (an hlc read on another author's scribe), unless `seen` is
    /// implausibly far in the future.
    pub fn observe(&self, seen: u64) {
        let wall_ms = (self.wall)();
        if (seen >> 16) > wall_ms.saturating_add(MAX_OBSERVED_DRIFT_MS) {
            return;
        }
        let mut last = self.last.lock().expect("clock lock poisoned");
        *last = (*last).max(seen);
    }

    /// The last value returned or observed (the high-water mark to persist).
    pub fn peek(&self) -> u64 {
        *self.last.lock().expect("clock lock poisoned")
    }

    /// The wall clock in unix milliseconds.
    pub fn wall_ms(&self) -> u64 {
        (self.wall)()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn manual(start: u64) -> (Arc<AtomicU64>, WallClock) {
        let time = Arc::new(AtomicU64::new(start));
        let reader = time.clone();
        (time, Arc::new(move || reader.load(Ordering::SeqCst)))
    }

    #[test]
    fn never_goes_backwards_even_when_the_wall_clock_does() {
        let (time, wall) = manual(1_000);
        let clock = Clock::new(0, wall);
        let first = clock.now();
        time.store(500, Ordering::SeqCst);
        let second = clock.now();
        assert!(second > first);
        assert_eq!(first >> 16, 1_000);
    }

    #[test]
    fn restarts_above_the_persisted_high_water_mark() {
        let (_time, wall) = manual(1_000);
        let high_water = (2_000u64 << 16) | 7;
        let clock = Clock::new(high_water, wall);
        assert!(clock.now() > high_water);
    }

    #[test]
    fn observes_plausible_clocks_and_ignores_far_future_ones() {
        let (_time, wall) = manual(1_000_000);
        let clock = Clock::new(0, wall);
        clock.observe((1_000_500u64) << 16);
        assert!(clock.now() > (1_000_500u64 << 16));
        clock.observe((1_000_000 + MAX_OBSERVED_DRIFT_MS + 10) << 16);
        assert!(clock.now() < ((1_000_000 + MAX_OBSERVED_DRIFT_MS) << 16));
    }
}
