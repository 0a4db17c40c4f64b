//! The access log and request metrics: one JSON line and one `gateway_requests_total` count per
//! request, written when the response leaves (or, with status 499, when the client hangs up
//! first). Inner layers add what they learn through the request's [`RequestState`].
//!
//! Lines for 401s are limited to [`UNAUTHORIZED_LINES_PER_SEC`] (a burst of as many): a flood of
//! wrong keys must not fill the disk or the log pipeline. Every 401 is still counted in the
//! metrics, and the next 401 line written says how many were not (`sampled`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use std::num::NonZeroU32;

use governor::{Quota, RateLimiter};
use http::Request;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::balance::cache::{CacheStatus, Tier};
use crate::caller::{Bucket, TokioClock};
use crate::error::Response;
use crate::identity::Method;
use crate::metrics::{Metrics, SHARDS, thread_slot};
use crate::request_state::{RequestState, millis};
use crate::telemetry::ACCESS_TARGET;

/// Status logged for a request whose client went away before the answer.
const CLIENT_CLOSED: u16 = 499;

/// Access lines written for 401s, at most, per second (and in a burst).
pub(crate) const UNAUTHORIZED_LINES_PER_SEC: u32 = 20;

/// The limit on 401 lines, shared by every request of a gateway (on every serving thread).
#[derive(Clone)]
pub struct UnauthorizedLines(Arc<(Bucket, AtomicU64)>);

impl UnauthorizedLines {
    pub fn new() -> Self {
        let per_sec = NonZeroU32::new(UNAUTHORIZED_LINES_PER_SEC).unwrap_or(NonZeroU32::MIN);
        let bucket = RateLimiter::direct_with_clock(Quota::per_second(per_sec), TokioClock::new());
        UnauthorizedLines(Arc::new((bucket, AtomicU64::new(0))))
    }

    /// Whether a 401 gets its line: `Some(n)` with the 401 lines not written since the last
    /// one that was, or `None` (and counted) when over the limit.
    fn admit(&self) -> Option<u64> {
        let (bucket, skipped) = &*self.0;
        if bucket.check().is_ok() {
            Some(skipped.swap(0, Ordering::AcqRel))
        } else {
            skipped.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

impl Default for UnauthorizedLines {
    fn default() -> Self {
        Self::new()
    }
}

/// `log.access_sample`: the share of successful requests that get an access line (errors
/// always do). Reloadable.
#[derive(Clone, Debug)]
pub struct AccessSample(Arc<AtomicU64>);

impl AccessSample {
    pub fn new(fraction: f64) -> Self {
        AccessSample(Arc::new(AtomicU64::new(fraction.clamp(0.0, 1.0).to_bits())))
    }

    pub fn set(&self, fraction: f64) {
        self.0
            .store(fraction.clamp(0.0, 1.0).to_bits(), Ordering::Release);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Acquire))
    }

    /// Whether a request that ended with `status` is logged.
    fn keeps(&self, status: u16) -> bool {
        let fraction = self.get();
        status >= 400 || fraction >= 1.0 || (fraction > 0.0 && rand::random::<f64>() < fraction)
    }
}

/// Requests in flight on the main listener (for the shutdown report), counted per thread
/// ([`thread_slot`]): a request counts up and down in the slot of the thread it began on.
#[derive(Clone, Debug)]
pub struct InFlight(Arc<[Slot]>);

/// One thread's count, on a cache line of its own.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Slot(AtomicIsize);

impl Default for InFlight {
    fn default() -> Self {
        InFlight((0..SHARDS).map(|_| Slot::default()).collect())
    }
}

impl InFlight {
    pub fn get(&self) -> usize {
        let total: isize = self.0.iter().map(|s| s.0.load(Ordering::Acquire)).sum();
        usize::try_from(total).unwrap_or(0)
    }

    /// A request began on this thread: the slot it is counted in.
    fn begin(&self) -> usize {
        let slot = thread_slot();
        if let Some(s) = self.0.get(slot) {
            s.0.fetch_add(1, Ordering::AcqRel);
        }
        slot
    }

    /// The request counted in `slot` ended (on whichever thread).
    fn end(&self, slot: usize) {
        if let Some(s) = self.0.get(slot) {
            s.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// What every request's line needs, behind one reference per stack. A stack is built for each
/// serving thread, so the reference counts a request moves are its own thread's.
struct Shared {
    metrics: Arc<Metrics>,
    in_flight: InFlight,
    sample: AccessSample,
    unauthorized: UnauthorizedLines,
}

#[derive(Clone)]
pub(crate) struct AccessLogLayer {
    shared: Arc<Shared>,
}

impl AccessLogLayer {
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        in_flight: InFlight,
        sample: AccessSample,
        unauthorized: UnauthorizedLines,
    ) -> Self {
        AccessLogLayer {
            shared: Arc::new(Shared {
                metrics,
                in_flight,
                sample,
                unauthorized,
            }),
        }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLog {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct AccessLog<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let state = RequestState::of(&mut req);
        let slot = self.shared.in_flight.begin();
        let record = Record {
            state,
            status: None,
            slot,
            shared: self.shared.clone(),
        };
        AccessLogFuture {
            inner: self.inner.call(req),
            record,
        }
    }
}

pin_project! {
    /// The inner answer; its [`Record`] writes the line when this future is dropped.
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        record: Record,
    }
}

impl<F, E> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        this.record.status = Some(response.status().as_u16());
        Poll::Ready(Ok(response))
    }
}

/// Writes the line when dropped: after the response, or when the client hung up.
pub(crate) struct Record {
    state: RequestState,
    status: Option<u16>,
    /// Where the request was counted in flight.
    slot: usize,
    shared: Arc<Shared>,
}

impl Drop for Record {
    fn drop(&mut self) {
        let shared = &*self.shared;
        shared.in_flight.end(self.slot);
        let elapsed = self.state.start().elapsed();
        let status = self.status.unwrap_or(CLIENT_CLOSED);
        let notes = self.state.take_notes();
        let caller = self.state.caller().map(|c| &*c.name);
        let cache = notes.cache.map(CacheStatus::label);
        let hit =
            (notes.cache == Some(CacheStatus::Hit)).then(|| notes.cache_tier == Some(Tier::L2));
        shared.metrics.request(
            caller.unwrap_or("-"),
            status,
            cache.unwrap_or("-"),
            elapsed,
            hit,
        );
        if !shared.sample.keeps(status) {
            return;
        }
        let sampled = if status == 401 {
            match shared.unauthorized.admit() {
                // `null` when none was left out since the line before, as on other lines.
                Some(skipped) => (skipped > 0).then_some(skipped),
                None => return,
            }
        } else {
            None
        };
        tracing::info!(
            target: ACCESS_TARGET,
            request_id = self.state.id().as_str(),
            trace_id = self.state.trace().trace_id(),
            caller,
            auth = self.state.auth_method().map(Method::label),
            auth_error = notes.auth_error,
            customer_sync_code = notes.customer_sync_code.as_deref(),
            status,
            bill24_code = notes.bill24_code.as_deref(),
            cache,
            cache_tier = notes.cache_tier.map(Tier::label),
            upstream_status = notes.upstream_status,
            upstream_ms = notes.upstream_ms,
            latency_ms = millis(elapsed),
            sampled,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lines_for_401s_are_limited_and_the_next_one_counts_the_rest() {
        let lines = UnauthorizedLines::new();
        let burst = UNAUTHORIZED_LINES_PER_SEC as usize;
        let written: Vec<u64> = (0..burst).filter_map(|_| lines.admit()).collect();
        assert_eq!(written, vec![0; burst], "a burst, nothing skipped");
        for _ in 0..1000 {
            assert_eq!(lines.admit(), None, "over the limit");
        }
        tokio::time::advance(std::time::Duration::from_secs(1) / UNAUTHORIZED_LINES_PER_SEC).await;
        assert_eq!(lines.admit(), Some(1000), "says how many were not written");
        assert_eq!(lines.admit(), None);
    }

    #[test]
    fn sampling_keeps_every_error_and_a_share_of_successes() {
        let sample = AccessSample::new(0.0);
        assert!(!sample.keeps(200));
        assert!(sample.keeps(400) && sample.keeps(502));
        sample.set(1.0);
        assert!(sample.keeps(200));
        sample.set(0.25);
        let kept = (0..10_000).filter(|_| sample.keeps(200)).count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
        sample.set(7.0);
        assert_eq!(sample.get(), 1.0, "clamped");
    }
}
