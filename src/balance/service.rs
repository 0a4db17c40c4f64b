//! The balance service: answers a [`BalanceQuery`] from the cache when the entry is fresh and
//! the caller's `Cache-Control` allows it, otherwise from one shared Bill24 call per key
//! (request coalescing), storing what may be stored and falling back to a stale entry when
//! Bill24 fails.
//!
//! A fetch runs in its own task, so a caller that hangs up does not cancel the call the others
//! wait on. Fetches in flight live in a sharded map; a miss re-checks the cache under its
//! shard's lock, and a finished fetch stores its answer before leaving the map, so a request
//! sees either the fetch or its stored answer — never neither, which would cost a second call.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::Full;
use tokio::sync::{Mutex, Notify};
use tower::Service;

use super::cache::{BalanceCache, CacheStatus, Entry, Freshness, fresh_for};
use super::request::{BalanceQuery, SyncCode};
use crate::bill24::{Answer, BalanceCall, Bill24, Failure};
use crate::config::CacheConfig;
use crate::error::{GatewayError, Response};
use crate::metrics::Metrics;

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const SHARDS: usize = 64;

type FetchResult = Arc<Result<Answer, Failure>>;
type FlightMap = HashMap<SyncCode, Arc<Flight>>;

/// One Bill24 call in flight and the requests waiting on it.
struct Flight {
    result: OnceLock<FetchResult>,
    /// Wakes the waiters once `result` is set, the longest-waiting first: one `Notify` keeps
    /// its waiters in arrival order (a `watch` channel spreads its receivers over several
    /// lists and wakes them in no particular order, so the first request to arrive could be
    /// answered last, a whole fan-out later).
    done: Notify,
    /// Whether the answer may be stored: false only while every waiter said `no-store`.
    store: AtomicBool,
}

impl Flight {
    fn new(store: bool) -> Arc<Self> {
        Arc::new(Flight {
            result: OnceLock::new(),
            done: Notify::new(),
            store: AtomicBool::new(store),
        })
    }

    /// Sets the result (the first one set stays) and wakes every waiter.
    fn finish(&self, result: FetchResult) {
        let _ = self.result.set(result);
        self.done.notify_waiters();
    }

    async fn wait(&self) -> FetchResult {
        loop {
            let notified = self.done.notified();
            let mut notified = std::pin::pin!(notified);
            // In the waiter list before looking, so a result set in between still wakes us.
            notified.as_mut().enable();
            if let Some(result) = self.result.get() {
                return result.clone();
            }
            notified.await;
        }
    }
}

/// Finishes a flight whose fetch ended without a result (its task was dropped): the waiters
/// get a failure rather than waiting forever.
struct FinishOnDrop(Arc<Flight>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if self.0.result.get().is_none() {
            self.0.finish(abandoned());
        }
    }
}

/// Everything the balance path shares: cache, upstream, fetches in flight.
pub struct Balances {
    cache: BalanceCache,
    bill24: Arc<Bill24>,
    cache_config: ArcSwap<CacheConfig>,
    flights: Box<[Mutex<FlightMap>]>,
    hasher: RandomState,
    metrics: Arc<Metrics>,
}

/// What the cache alone could do for a query.
pub enum FromCache {
    /// A fresh entry answered (HIT).
    Answered(Response),
    /// No fresh entry.
    Missed,
    /// A fresh entry the caller's `Cache-Control` does not accept.
    Skipped,
}

enum Lookup {
    /// Found fresh in the cache after all (re-checked under the shard lock).
    Hit(Arc<Entry>),
    /// The shared fetch's result.
    Fetched(FetchResult),
}

impl Balances {
    pub fn new(cache_config: CacheConfig, bill24: Arc<Bill24>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Balances {
            cache: BalanceCache::new(cache_config.max_entries),
            bill24,
            cache_config: ArcSwap::from_pointee(cache_config),
            flights: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            metrics,
        })
    }

    pub fn cache(&self) -> &BalanceCache {
        &self.cache
    }

    pub fn bill24(&self) -> &Arc<Bill24> {
        &self.bill24
    }

    /// Applies new cache durations to entries stored from now on.
    pub fn set_cache_config(&self, cfg: CacheConfig) {
        self.cache_config.store(Arc::new(cfg));
    }

    fn shard(&self, code: &str) -> &Mutex<FlightMap> {
        &self.flights[(self.hasher.hash_one(code) as usize) % self.flights.len()]
    }

    /// Answers a query from a fresh entry its `Cache-Control` accepts, without waiting on
    /// anything.
    pub fn answer_from_cache(self: &Arc<Self>, q: &BalanceQuery) -> FromCache {
        let Some(entry) = self.cache.get(&q.customer_sync_code) else {
            return FromCache::Missed;
        };
        let now = Instant::now();
        if entry.freshness(now) != Freshness::Fresh {
            return FromCache::Missed;
        }
        if !q.directives.accepts(entry.age(now)) {
            return FromCache::Skipped;
        }
        if entry.claim_refresh(now, self.cache_config.load().refresh_ahead) {
            tokio::spawn(self.clone().refresh_ahead(q.clone(), entry.clone()));
        }
        FromCache::Answered(cached(&entry, CacheStatus::Hit, now, q))
    }

    /// Answers a query the cache could not: one shared Bill24 call per key. `skipped_fresh`:
    /// the caller's `Cache-Control` skipped a usable entry (BYPASS rather than MISS).
    pub async fn answer_from_upstream(
        self: Arc<Self>,
        q: BalanceQuery,
        skipped_fresh: bool,
    ) -> Response {
        let status = if skipped_fresh {
            CacheStatus::Bypass
        } else {
            CacheStatus::Miss
        };
        let result = match self.clone().lookup(&q, !skipped_fresh).await {
            Lookup::Hit(e) => return cached(&e, CacheStatus::Hit, Instant::now(), &q),
            Lookup::Fetched(result) => result,
        };
        match &*result {
            Ok(answer) => fetched(answer, status, &q),
            Err(failure) => self.failed(failure, status, &q),
        }
    }

    /// Joins the fetch in flight for this key, or starts one. When `recheck`, a fresh entry
    /// that appeared meanwhile answers instead.
    async fn lookup(self: Arc<Self>, q: &BalanceQuery, recheck: bool) -> Lookup {
        let store = !q.directives.no_store;
        let mut flights = self.shard(&q.customer_sync_code).lock().await;
        let flight = if let Some(flight) = flights.get(&q.customer_sync_code) {
            if store {
                flight.store.store(true, Ordering::Release);
            }
            self.metrics.coalesced();
            flight.clone()
        } else {
            if recheck && let Some(e) = self.cache.get(&q.customer_sync_code) {
                let now = Instant::now();
                if e.freshness(now) == Freshness::Fresh && q.directives.accepts(e.age(now)) {
                    return Lookup::Hit(e);
                }
            }
            self.clone().start_flight(&mut flights, q, store)
        };
        drop(flights);
        Lookup::Fetched(flight.wait().await)
    }

    /// Registers a fetch for `q`'s key and starts it.
    fn start_flight(
        self: Arc<Self>,
        flights: &mut FlightMap,
        q: &BalanceQuery,
        store: bool,
    ) -> Arc<Flight> {
        let flight = Flight::new(store);
        flights.insert(q.customer_sync_code.clone(), flight.clone());
        // The guard is moved in with the future: even a fetch dropped before it first runs
        // finishes its flight.
        tokio::spawn(self.fetch(q.clone(), FinishOnDrop(flight.clone())));
        flight
    }

    /// A hit close to expiry: fetch the key again in the background (unless a fetch is in
    /// flight already), so a hot key never falls back to a miss.
    async fn refresh_ahead(self: Arc<Self>, mut q: BalanceQuery, entry: Arc<Entry>) {
        q.deadline = Instant::now() + self.bill24.timeout();
        q.state = q.state.detached();
        let flight = {
            let mut flights = self.shard(&q.customer_sync_code).lock().await;
            if flights.contains_key(&q.customer_sync_code) {
                return;
            }
            self.metrics.refresh_ahead();
            self.clone().start_flight(&mut flights, &q, true)
        };
        if flight.wait().await.is_err() {
            // Let a later hit try again.
            entry.refreshing.store(false, Ordering::Release);
        }
    }

    /// One Bill24 call on behalf of every request waiting on `flight`.
    async fn fetch(self: Arc<Self>, q: BalanceQuery, guard: FinishOnDrop) {
        let flight = &guard.0;
        let generation = self.cache.generation();
        let call = BalanceCall {
            customer_sync_code: &q.customer_sync_code,
            request_id: &q.state.id().header_value(),
            traceparent: q.state.trace().child_header(),
            deadline: q.deadline,
        };
        let result = self.bill24.balance(&call).await;
        if let Ok(answer) = &result
            && flight.store.load(Ordering::Acquire)
            && let Some(entry) = self.entry_for(answer)
        {
            self.cache
                .insert_if_current(q.customer_sync_code.clone(), Arc::new(entry), generation);
        }
        flight.finish(Arc::new(result));
        let mut flights = self.shard(&q.customer_sync_code).lock().await;
        if flights
            .get(&q.customer_sync_code)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            flights.remove(&q.customer_sync_code);
        }
    }

    /// The cache entry for an answer, when it may be cached at all.
    fn entry_for(&self, answer: &Answer) -> Option<Entry> {
        if answer.status != StatusCode::OK {
            return None;
        }
        let code = answer.bill24_code.as_ref()?;
        let cfg = self.cache_config.load();
        let fresh_for = fresh_for(&cfg, code, rand::random::<f64>())?;
        Some(Entry {
            // A copy of exactly the body: the answer's bytes may be a slice of the connection's
            // read buffer, which a cached entry would otherwise keep alive in full.
            body: Bytes::copy_from_slice(&answer.body),
            content_type: stored_content_type(answer.content_type.as_ref()),
            bill24_code: code.clone(),
            stored_at: Instant::now(),
            fresh_for,
            stale_for: cfg.stale_if_error,
            refreshing: AtomicBool::new(false),
        })
    }

    /// Bill24 failed: an entry still within `stale_if_error` answers (STALE), else the error.
    fn failed(&self, failure: &Failure, status: CacheStatus, q: &BalanceQuery) -> Response {
        q.state.upstream(failure.upstream_status, failure.elapsed);
        if let Some(e) = self.cache.get(&q.customer_sync_code) {
            let now = Instant::now();
            if !e.stale_for.is_zero() && e.freshness(now) != Freshness::Expired {
                return cached(&e, CacheStatus::Stale, now, q);
            }
        }
        q.state.cache(status);
        GatewayError::Upstream(failure.error.clone()).into_response()
    }
}

/// The Content-Type to keep with an entry, as its own small allocation (like the body, the
/// parsed header may be a slice of a read buffer many times its size); the usual values are
/// static.
fn stored_content_type(value: Option<&HeaderValue>) -> HeaderValue {
    const COMMON: [&str; 3] = [
        "application/json; charset=utf-8",
        "application/json",
        "application/json;charset=utf-8",
    ];
    match value {
        None => HeaderValue::from_static("application/json"),
        Some(v) => COMMON
            .iter()
            .find(|c| v.as_bytes().eq_ignore_ascii_case(c.as_bytes()))
            .map(|c| HeaderValue::from_static(c))
            .unwrap_or_else(|| {
                HeaderValue::from_bytes(v.as_bytes())
                    .unwrap_or(HeaderValue::from_static("application/json"))
            }),
    }
}

fn abandoned() -> FetchResult {
    Arc::new(Err(Failure {
        error: crate::bill24::UpstreamError::Unreachable,
        upstream_status: None,
        elapsed: None,
    }))
}

/// An answer from the cache (HIT or STALE), with `Age`.
fn cached(entry: &Entry, status: CacheStatus, now: Instant, q: &BalanceQuery) -> Response {
    q.state.cached(status, &entry.bill24_code);
    cached_response(entry, status, now)
}

/// The response for a cached entry: Bill24's bytes, `X-Cache` and `Age`.
pub fn cached_response(entry: &Entry, status: CacheStatus, now: Instant) -> Response {
    let mut response = http::Response::new(Full::new(entry.body.clone()));
    // Room for these and X-Request-Id, so the map is allocated once.
    *response.headers_mut() = HeaderMap::with_capacity(4);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, entry.content_type.clone());
    headers.insert(X_CACHE, status.header_value());
    headers.insert(http::header::AGE, entry.age_header(now));
    response
}

/// Bill24's answer, passed through byte for byte (MISS or BYPASS).
fn fetched(answer: &Answer, status: CacheStatus, q: &BalanceQuery) -> Response {
    q.state.cache(status);
    q.state.bill24_code(answer.bill24_code.as_ref());
    q.state
        .upstream(Some(answer.status.as_u16()), Some(answer.elapsed));
    let mut response = http::Response::new(Full::new(answer.body.clone()));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        answer
            .content_type
            .clone()
            .unwrap_or(HeaderValue::from_static("application/json")),
    );
    headers.insert(X_CACHE, status.header_value());
    response
}

/// The innermost service of the stack.
#[derive(Clone)]
pub struct BalanceService {
    balances: Arc<Balances>,
}

impl BalanceService {
    pub fn new(balances: Arc<Balances>) -> Self {
        BalanceService { balances }
    }
}

/// A hit is answered in `call` itself; only a miss becomes a (boxed) future.
pub type BalanceFuture = Either<
    Ready<Result<Response, Infallible>>,
    Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>,
>;

impl Service<BalanceQuery> for BalanceService {
    type Response = Response;
    type Error = Infallible;
    type Future = BalanceFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, q: BalanceQuery) -> Self::Future {
        let skipped_fresh = match self.balances.answer_from_cache(&q) {
            FromCache::Answered(response) => return Either::Left(ready(Ok(response))),
            FromCache::Missed => false,
            FromCache::Skipped => true,
        };
        let balances = self.balances.clone();
        Either::Right(Box::pin(async move {
            Ok(balances.answer_from_upstream(q, skipped_fresh).await)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    fn answer(code: &str) -> FetchResult {
        Arc::new(Ok(Answer {
            status: StatusCode::OK,
            content_type: None,
            body: Bytes::from(format!(r#"{{"code":"{code}"}}"#)),
            bill24_code: Some(code.into()),
            elapsed: Duration::ZERO,
        }))
    }

    /// Waiters that arrived one after another, woken by one finish: the order they resume in.
    async fn wake_order(waiters: usize) -> Vec<usize> {
        let flight = Flight::new(true);
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..waiters {
            let (flight, order) = (flight.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let result = flight.wait().await;
                assert!(result.is_ok());
                order.lock().expect("order").push(i);
            }));
            // Let it run up to its wait before the next one arrives.
            tokio::task::yield_now().await;
        }
        flight.finish(answer("000"));
        for task in tasks {
            task.await.expect("waiter");
        }
        order.lock().expect("order").clone()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiters_resume_in_the_order_they_came() {
        // More than one batch of tokio's wake-ups (32).
        assert_eq!(wake_order(200).await, (0..200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_late_waiter_gets_the_result_at_once_and_the_first_result_stays() {
        let flight = Flight::new(true);
        flight.finish(answer("000"));
        flight.finish(answer("311"));
        let result = tokio::time::timeout(Duration::from_secs(1), flight.wait())
            .await
            .expect("no wait");
        let Ok(answer) = &*result else {
            panic!("the first result")
        };
        assert_eq!(answer.bill24_code.as_deref(), Some("000"));
    }

    #[tokio::test]
    async fn a_fetch_dropped_unfinished_fails_its_waiters() {
        let flight = Flight::new(true);
        let waiter = tokio::spawn({
            let flight = flight.clone();
            async move { flight.wait().await }
        });
        tokio::task::yield_now().await;
        // As `start_flight` does: the guard made first and moved into the fetch, so even a
        // fetch dropped before it ever ran finishes the flight.
        let guard = FinishOnDrop(flight);
        let fetch = async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        };
        drop(fetch);
        let result = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("waiter");
        assert!(result.is_err());
    }
}
