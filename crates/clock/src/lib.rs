//! One clock for both kinds of time.
//!
//! Monotonic time is tokio's [`Instant`]: every timer, deadline and elapsed time in the
//! workspace is measured on it, and a test can pause it and move it (`start_paused`,
//! `tokio::time::advance`). Wall time is [`now_utc`], the one place the workspace reads it
//! (clippy's `disallowed-methods` keeps it so): the system's time, moved by however far
//! tokio's clock stands from the real monotonic one. In production the two monotonic clocks
//! are the same and [`now_utc`] is the system's time (to within a millisecond: the system
//! clock is measured against the monotonic one, and measured again when it has moved by
//! more); on a paused clock the wall clock stands still with it, to the nanosecond, and moves
//! by exactly what the test advances, so a token's expiry, an entry's age and the timers that
//! act on them move together.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

pub use tokio::time::Instant;

/// The real monotonic clock's first reading, which the system clock is measured against.
#[allow(clippy::disallowed_types)]
static ANCHOR: OnceLock<std::time::Instant> = OnceLock::new();
/// The system clock's time (ns since the epoch) at [`ANCHOR`], as last measured.
static AT_ANCHOR: AtomicI64 = AtomicI64::new(i64::MIN);
/// A new measurement replaces the last only when it differs by more than this (the system
/// clock was set or slewed), so the reads of two clocks a few nanoseconds apart do not make
/// a paused clock's wall time jitter.
const REMEASURE: i64 = 1_000_000;

/// The time of day, UTC: the system's, on tokio's clock (see the crate's documentation).
pub fn now_utc() -> OffsetDateTime {
    #[allow(clippy::disallowed_types)]
    let anchor = *ANCHOR.get_or_init(std::time::Instant::now);
    let on_tokio = Instant::now().into_std();
    #[allow(clippy::disallowed_types)]
    let real = std::time::Instant::now();
    #[allow(clippy::disallowed_methods)]
    let system = match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => nanos(after),
        Err(before) => -nanos(before.duration()),
    };
    let measured = system - nanos(real.duration_since(anchor));
    let last = AT_ANCHOR.load(Ordering::Acquire);
    let at_anchor = if last != i64::MIN && (measured - last).abs() <= REMEASURE {
        last
    } else {
        AT_ANCHOR.store(measured, Ordering::Release);
        measured
    };
    let since_anchor = match on_tokio.checked_duration_since(anchor) {
        Some(after) => nanos(after),
        None => -nanos(anchor.duration_since(on_tokio)),
    };
    let at = i128::from(at_anchor.saturating_add(since_anchor));
    OffsetDateTime::from_unix_timestamp_nanos(at).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis_apart(a: OffsetDateTime, b: OffsetDateTime) -> i128 {
        (a - b).whole_milliseconds()
    }

    #[test]
    fn outside_a_runtime_it_is_the_system_time() {
        #[allow(clippy::disallowed_methods)]
        let system = OffsetDateTime::now_utc();
        assert!(millis_apart(now_utc(), system).abs() < 50);
    }

    #[tokio::test]
    async fn on_a_running_clock_it_is_the_system_time() {
        #[allow(clippy::disallowed_methods)]
        let system = OffsetDateTime::now_utc();
        assert!(millis_apart(now_utc(), system).abs() < 50);
    }

    #[tokio::test(start_paused = true)]
    async fn on_a_paused_clock_it_stands_still_and_moves_with_advance() {
        let start = now_utc();
        let mono = Instant::now();
        // Real time passes; neither clock moves.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(Instant::now(), mono);
        assert_eq!(now_utc(), start, "to the nanosecond");
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert_eq!(Instant::now() - mono, Duration::from_secs(3_600));
        assert_eq!(now_utc() - start, time::Duration::seconds(3_600), "exactly");
    }
}
