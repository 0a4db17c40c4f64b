//! Per-caller protection, so one noisy service cannot starve the others: a token bucket
//! (`rate_limit_rps`, `burst`) and a cap on requests in flight (`max_concurrent`). Over
//! either, 429 with `Retry-After`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::Request;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::config::CallerConfig;
use crate::error::{GatewayError, Rejection, Response, reject};
use crate::holding::Holding;
use crate::request_state::RequestState;

/// One caller's limits; either may be absent (0 = unlimited).
#[derive(Debug, Default)]
pub struct CallerLimits {
    bucket: Option<DefaultDirectRateLimiter>,
    in_flight: Option<Arc<Semaphore>>,
    /// The settings these were built from (a reload keeps limits whose settings are unchanged).
    settings: (u64, u32, u32),
}

impl CallerLimits {
    pub fn new(cfg: &CallerConfig) -> Self {
        CallerLimits {
            bucket: quota(cfg.rate_limit_rps, cfg.burst).map(RateLimiter::direct),
            in_flight: (cfg.max_concurrent > 0)
                .then(|| Arc::new(Semaphore::new(cfg.max_concurrent as usize))),
            settings: settings_of(cfg),
        }
    }

    pub fn same_settings(&self, cfg: &CallerConfig) -> bool {
        self.settings == settings_of(cfg)
    }
}

fn settings_of(cfg: &CallerConfig) -> (u64, u32, u32) {
    (cfg.rate_limit_rps.to_bits(), cfg.burst, cfg.max_concurrent)
}

/// `rps` cells per second, bursts of `burst` (0: one second's worth, at least 1).
pub fn quota(rps: f64, burst: u32) -> Option<Quota> {
    if !(rps.is_finite() && rps > 0.0) {
        return None;
    }
    let period = Duration::from_secs_f64(1.0 / rps).max(Duration::from_nanos(1));
    let burst = if burst == 0 {
        (rps.ceil().min(u32::MAX as f64) as u32).max(1)
    } else {
        burst
    };
    Some(Quota::with_period(period)?.allow_burst(NonZeroU32::new(burst)?))
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CallerLimitLayer;

impl<S> Layer<S> for CallerLimitLayer {
    type Service = CallerLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerLimit { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CallerLimit<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for CallerLimit<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Rejection<S::Error>, Holding<S::Future, OwnedSemaphorePermit>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(limits) = req
            .extensions()
            .get::<RequestState>()
            .and_then(|s| s.caller())
            .map(|c| c.limits.clone())
        else {
            return Either::Right(Holding::new(self.inner.call(req), None));
        };
        if let Some(bucket) = &limits.bucket
            && let Err(not_until) = bucket.check()
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return refuse(GatewayError::RateLimited { retry_after: wait });
        }
        let permit = match &limits.in_flight {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return refuse(GatewayError::TooManyConcurrent {
                        retry_after: Duration::from_secs(1),
                    });
                }
            },
        };
        Either::Right(Holding::new(self.inner.call(req), permit))
    }
}

fn refuse<F, E>(error: GatewayError) -> Either<Rejection<E>, F> {
    Either::Left(reject(error))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn bucket_allows_the_burst_then_refuses() {
        let limits = CallerLimits::new(&CallerConfig {
            name: Arc::from("x"),
            key_sha256: vec![],
            rate_limit_rps: 1.0,
            burst: 3,
            max_concurrent: 0,
        });
        let bucket = limits.bucket.as_ref().expect("bucket");
        for _ in 0..3 {
            assert!(bucket.check().is_ok());
        }
        let refused = bucket.check().expect_err("over the burst");
        let wait = refused.wait_time_from(DefaultClock::default().now());
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
    }
}
