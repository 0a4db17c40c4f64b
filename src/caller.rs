//! Who a caller is once authenticated, and what it may use: its name, its place in
//! `[[callers]]`, and its limits (`rate_limit_rps`/`burst` as a token bucket, `max_concurrent`
//! as a semaphore). Shared by authentication, the limits layer and the request state; imports
//! nothing of the gateway but its config.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use futures_util::future::BoxFuture;

use crate::config::{CallerConfig, LimitScope};

/// Counts callers' requests over every replica of the fleet together (`limit_scope =
/// "fleet"`), implemented over the fleet's shared tier.
pub trait FleetRate: Send + Sync {
    /// One request of `caller` against `rps` / `burst` over the whole fleet: admitted, or the
    /// time until it would be.
    fn admit<'a>(
        &'a self,
        caller: &'a str,
        rps: f64,
        burst: u32,
    ) -> BoxFuture<'a, Result<(), Duration>>;
}

/// An authenticated caller: one reference, so a request that carries it moves one count.
#[derive(Clone, Debug)]
pub struct Caller(Arc<CallerData>);

#[derive(Debug)]
pub struct CallerData {
    pub name: Arc<str>,
    /// Position in `[[callers]]`.
    pub index: usize,
    pub limits: Arc<CallerLimits>,
}

impl Caller {
    pub fn new(name: Arc<str>, index: usize, limits: Arc<CallerLimits>) -> Self {
        Caller(Arc::new(CallerData {
            name,
            index,
            limits,
        }))
    }
}

impl std::ops::Deref for Caller {
    type Target = CallerData;

    fn deref(&self) -> &CallerData {
        &self.0
    }
}

/// governor's clock over tokio's: one clock in the process, so a test on paused time sees
/// buckets refill as it advances.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokioClock {
    epoch: Instant,
}

impl TokioClock {
    pub(crate) fn new() -> Self {
        TokioClock {
            epoch: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    /// Time since this clock's epoch.
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }
}

/// A token bucket on tokio's clock.
pub(crate) type Bucket = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// Why a caller's request is refused, and when it may try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    Rate { retry_after: Duration },
    Concurrency,
}

/// One caller's limits; either may be absent (0 = unlimited).
#[derive(Debug)]
pub struct CallerLimits {
    bucket: Option<(Bucket, TokioClock)>,
    in_flight: Option<Arc<Semaphore>>,
    /// The settings these were built from (a reload keeps limits whose settings are unchanged).
    settings: (u64, u32, u32, LimitScope),
}

impl CallerLimits {
    pub fn new(cfg: &CallerConfig) -> Self {
        let clock = TokioClock::new();
        CallerLimits {
            bucket: quota(cfg.rate_limit_rps, cfg.burst)
                .map(|q| (RateLimiter::direct_with_clock(q, clock), clock)),
            in_flight: (cfg.max_concurrent > 0)
                .then(|| Arc::new(Semaphore::new(cfg.max_concurrent as usize))),
            settings: settings_of(cfg),
        }
    }

    pub fn same_settings(&self, cfg: &CallerConfig) -> bool {
        self.settings == settings_of(cfg)
    }

    /// The rate counted over the whole fleet, when this caller's is (`rate_limit_rps`,
    /// `burst`).
    pub fn fleet_rate(&self) -> Option<(f64, u32)> {
        let (rps, burst, _, scope) = self.settings;
        let rps = f64::from_bits(rps);
        (scope == LimitScope::Fleet && rps > 0.0).then_some((rps, burst))
    }

    /// Only the cap on requests in flight (the rate was counted by the fleet).
    pub fn admit_in_flight(&self) -> Result<Option<OwnedSemaphorePermit>, OverLimit> {
        match &self.in_flight {
            None => Ok(None),
            Some(slots) => slots
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| OverLimit::Concurrency),
        }
    }

    /// Takes one request's worth from the bucket and, when capped, one concurrency slot (held
    /// until the permit is dropped).
    pub fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, OverLimit> {
        if let Some((bucket, clock)) = &self.bucket
            && let Err(not_until) = bucket.check()
        {
            return Err(OverLimit::Rate {
                retry_after: not_until.wait_time_from(clock.now()),
            });
        }
        self.admit_in_flight()
    }
}

fn settings_of(cfg: &CallerConfig) -> (u64, u32, u32, LimitScope) {
    (
        cfg.rate_limit_rps.to_bits(),
        cfg.burst,
        cfg.max_concurrent,
        cfg.limit_scope,
    )
}

/// `rps` cells per second, bursts of `burst` (0: one second's worth, at least 1).
fn quota(rps: f64, burst: u32) -> Option<Quota> {
    if !(rps.is_finite() && rps > 0.0) {
        return None;
    }
    let period = Duration::from_secs_f64(1.0 / rps).max(Duration::from_nanos(1));
    let burst = crate::config::burst_at(rps, burst);
    Some(Quota::with_period(period)?.allow_burst(NonZeroU32::new(burst)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate_limit_rps: f64, burst: u32, max_concurrent: u32) -> CallerLimits {
        CallerLimits::new(&CallerConfig {
            name: Arc::from("x"),
            key_sha256: vec![],
            spiffe_id: None,
            jwt_subject: None,
            rate_limit_rps,
            burst,
            max_concurrent,
            limit_scope: Default::default(),
        })
    }

    #[test]
    fn quotas() {
        assert!(quota(0.0, 5).is_none(), "0 = unlimited");
        assert!(quota(f64::NAN, 5).is_none());
        let q = quota(10.0, 0).expect("quota");
        assert_eq!(q.burst_size().get(), 10);
        assert_eq!(q.replenish_interval(), Duration::from_millis(100));
        let q = quota(0.5, 0).expect("fractional rate");
        assert_eq!(q.burst_size().get(), 1);
        assert_eq!(q.replenish_interval(), Duration::from_secs(2));
        assert_eq!(quota(5.0, 20).expect("quota").burst_size().get(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_the_burst_refuses_then_refills_on_tokio_time() {
        let limits = limits(1.0, 3, 0);
        for _ in 0..3 {
            assert!(limits.admit().is_ok());
        }
        let Err(OverLimit::Rate { retry_after }) = limits.admit() else {
            panic!("over the burst")
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(limits.admit().is_err(), "not yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(limits.admit().is_ok(), "one cell back after a second");
    }

    #[tokio::test(start_paused = true)]
    async fn the_concurrency_cap_holds_until_a_permit_is_dropped() {
        let limits = limits(0.0, 0, 2);
        let a = limits.admit().expect("first");
        let _b = limits.admit().expect("second");
        assert_eq!(limits.admit().err(), Some(OverLimit::Concurrency));
        drop(a);
        assert!(limits.admit().is_ok());
        assert!(
            self::limits(0.0, 0, 0)
                .admit()
                .expect("unlimited")
                .is_none()
        );
    }
}
