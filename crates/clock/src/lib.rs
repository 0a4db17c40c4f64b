//! One clock for both kinds of time.
//!
//! Monotonic time is tokio's [`Instant`]: every timer, deadline and elapsed time in the
//! workspace is measured on it, and a test can pause it and move it (`start_paused`,
//! `tokio::time::advance`). Wall time is [`now_utc`], the one place the workspace reads it
//! (clippy's `disallowed-methods` keeps it so): the system's time, moved by however far
//! tokio's clock stands from the real monotonic one. In production the two monotonic clocks
//! are the same and [`now_utc`] is the system's time; on a paused clock the wall clock stands
//! still with it and moves by exactly what the test advances, so a token's expiry, an entry's
//! age and the timers that act on them move together.

use std::time::SystemTime;

use time::OffsetDateTime;

pub use tokio::time::Instant;

/// The time of day, UTC: the system's, on tokio's clock (see the crate's documentation).
pub fn now_utc() -> OffsetDateTime {
    let on_tokio = Instant::now().into_std();
    // The real monotonic clock, only to measure how far tokio's stands from it.
    #[allow(clippy::disallowed_types)]
    let real = std::time::Instant::now();
    #[allow(clippy::disallowed_methods)]
    let system = OffsetDateTime::from(SystemTime::now());
    match on_tokio.checked_duration_since(real) {
        Some(ahead) => system + ahead,
        None => system - real.duration_since(on_tokio),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        assert!(millis_apart(now_utc(), start).abs() <= 1);
        tokio::time::advance(Duration::from_secs(3_600)).await;
        let moved = now_utc() - start;
        assert_eq!(Instant::now() - mono, Duration::from_secs(3_600));
        assert!(
            (moved.whole_milliseconds() - 3_600_000).abs() <= 1,
            "moved {moved}"
        );
    }
}
