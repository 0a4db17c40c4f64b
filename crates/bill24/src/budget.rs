//! The retry budget (`upstream.retry_budget`): over a sliding window of about ten seconds,
//! retries are at most that fraction of the requests sent, plus a reserve of ten retries a
//! second that is always there. The same idea as Finagle's and linkerd's budgets.
//!
//! Counted under one lock: the check and the withdrawal are a single step, so concurrent
//! retries can never overdraw it, and the window slides slot by slot. (tower's `TpsBudget`
//! checks and takes in two steps, and its window advances two slots at a time, which halves
//! the window the reserve is counted over.) Only requests that reach Bill24 touch it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The window is this many slots; a deposit or withdrawal counts until its slot is reused.
const SLOTS: usize = 10;

#[derive(Debug)]
pub(crate) struct RetryBudget {
    /// Retries allowed per request sent (`retry_budget`).
    ratio: f64,
    /// Retries always allowed within one window (`min_per_sec` × the window in seconds).
    reserve: f64,
    slot_len: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Where the current slot began.
    slot_start: Instant,
    current: usize,
    deposits: [u64; SLOTS],
    withdrawals: [u64; SLOTS],
}

impl Window {
    /// Moves the current slot up to `now`, emptying each slot it enters.
    fn advance(&mut self, now: Instant, slot_len: Duration) {
        let elapsed = now.saturating_duration_since(self.slot_start);
        if elapsed < slot_len {
            return;
        }
        let steps = elapsed.as_nanos() / slot_len.as_nanos();
        for _ in 0..steps.min(SLOTS as u128) {
            self.current = (self.current + 1) % SLOTS;
            self.deposits[self.current] = 0;
            self.withdrawals[self.current] = 0;
        }
        // Slots keep their boundaries; after a long quiet spell the window starts afresh.
        self.slot_start = if steps <= SLOTS as u128 {
            self.slot_start + slot_len * steps as u32
        } else {
            now
        };
    }
}

impl RetryBudget {
    /// `ratio` retries per request over `window`, plus `min_per_sec` retries a second.
    pub(crate) fn new(window: Duration, min_per_sec: u32, ratio: f64, now: Instant) -> Self {
        // Slots of at least a millisecond (`advance` divides by their length).
        let window = window.max(Duration::from_millis(SLOTS as u64));
        RetryBudget {
            ratio: ratio.max(0.0),
            reserve: f64::from(min_per_sec) * window.as_secs_f64(),
            slot_len: window / SLOTS as u32,
            window: Mutex::new(Window {
                slot_start: now,
                current: 0,
                deposits: [0; SLOTS],
                withdrawals: [0; SLOTS],
            }),
        }
    }

    /// One request sent to Bill24.
    pub(crate) fn deposit(&self, now: Instant) {
        let mut w = self.lock();
        w.advance(now, self.slot_len);
        let current = w.current;
        w.deposits[current] = w.deposits[current].saturating_add(1);
    }

    /// Takes one retry if the budget has it; `false` (and nothing taken) otherwise.
    pub(crate) fn withdraw(&self, now: Instant) -> bool {
        let mut w = self.lock();
        w.advance(now, self.slot_len);
        let deposits: u64 = w.deposits.iter().sum();
        let withdrawals: u64 = w.withdrawals.iter().sum();
        if (withdrawals + 1) as f64 > self.reserve + self.ratio * deposits as f64 {
            return false;
        }
        let current = w.current;
        w.withdrawals[current] += 1;
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The counters are always consistent (no step can panic halfway), so a poisoned lock
        // is still good to use.
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const WINDOW: Duration = Duration::from_secs(10);

    fn taken(budget: &RetryBudget, now: Instant, tries: usize) -> usize {
        (0..tries).filter(|_| budget.withdraw(now)).count()
    }

    fn requests(budget: &RetryBudget, now: Instant, n: usize) {
        for _ in 0..n {
            budget.deposit(now);
        }
    }

    #[test]
    fn the_reserve_alone_without_requests() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(WINDOW, 10, 0.2, t0);
        assert_eq!(taken(&budget, t0, 500), 100);
    }

    #[test]
    fn a_fraction_of_the_requests_on_top_of_the_reserve() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(WINDOW, 10, 0.2, t0);
        requests(&budget, t0, 400);
        assert_eq!(taken(&budget, t0, 1000), 180);
        // One more request earns a fifth of a retry: four more, no retry; the fifth, one.
        requests(&budget, t0, 4);
        assert!(!budget.withdraw(t0));
        budget.deposit(t0);
        assert!(budget.withdraw(t0));
    }

    #[test]
    fn a_zero_ratio_leaves_only_the_reserve() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(WINDOW, 10, 0.0, t0);
        requests(&budget, t0, 10_000);
        assert_eq!(taken(&budget, t0, 500), 100);
    }

    #[test]
    fn what_was_taken_counts_for_the_whole_window() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(WINDOW, 10, 0.2, t0);
        assert_eq!(taken(&budget, t0, 200), 100);
        // Six, then nine and a half seconds on: the withdrawals still count.
        assert!(!budget.withdraw(t0 + Duration::from_secs(6)));
        assert!(!budget.withdraw(t0 + Duration::from_millis(9_500)));
        // Once their slot is reused they no longer do.
        assert_eq!(taken(&budget, t0 + Duration::from_secs(10), 200), 100);
    }

    #[test]
    fn deposits_expire_with_their_slot() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(WINDOW, 0, 0.5, t0);
        requests(&budget, t0, 10);
        let later = t0 + Duration::from_secs(5);
        requests(&budget, later, 10);
        assert_eq!(taken(&budget, later, 100), 10);
        // t0's deposits have left the window; later's and its withdrawals remain.
        assert_eq!(taken(&budget, t0 + Duration::from_secs(10), 100), 0);
        // Everything has left it.
        let quiet = t0 + Duration::from_secs(60);
        requests(&budget, quiet, 4);
        assert_eq!(taken(&budget, quiet, 100), 2);
    }

    #[test]
    fn a_clock_that_goes_nowhere_or_back_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let budget = RetryBudget::new(WINDOW, 1, 1.0, t0);
        budget.deposit(t0);
        assert_eq!(taken(&budget, t0 - Duration::from_secs(50), 100), 11);
    }

    #[test]
    fn concurrent_retries_never_overdraw() {
        for _ in 0..20 {
            let t0 = Instant::now();
            let budget = Arc::new(RetryBudget::new(WINDOW, 10, 0.2, t0));
            requests(&budget, t0, 400);
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let budget = budget.clone();
                    std::thread::spawn(move || taken(&budget, t0, 100))
                })
                .collect();
            let total: usize = handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .sum();
            assert_eq!(total, 180);
        }
    }
}
