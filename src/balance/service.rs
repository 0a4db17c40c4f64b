//! The balance service: answers a [`BalanceQuery`] from the cache when the entry is fresh and
//! the caller's `Cache-Control` allows it, otherwise from one shared Bill24 call per key
//! (request coalescing), storing what may be stored and falling back to a stale entry when
//! Bill24 fails.
//!
//! A fetch runs in its own task, so a caller that hangs up does not cancel the call the others
//! wait on. Fetches in flight live in a sharded map; a miss re-checks the cache under its
//! shard's lock, and a finished fetch stores its answer before leaving the map, so a request
//! sees either the fetch or its stored answer — never neither, which would cost a second call.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bill24::{Answer, BalanceCall, Bill24, Failure, UpstreamError};
use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::Full;
use singleflight::{Flight, Flights, Guard};
use tokio::time::Instant;
use tower::Service;

use super::cache::{BalanceCache, CacheStatus, Entry, Freshness, Tier, fresh_for};
use super::code::SyncCode;
use super::request::BalanceQuery;
use crate::config::CacheConfig;
use crate::error::{ErrorResponse, Response, set_retry_after};
use crate::fleet::{FillLock, Fleet, Read};
use crate::metrics::Metrics;

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const SHARDS: usize = 64;

/// What a fill produced, shared by every request that waited on it.
type FetchResult = Arc<Outcome>;

enum Outcome {
    /// Bill24's answer, or its failure.
    Fetched(Result<Answer, Failure>),
    /// An answer from the fleet's shared tier: found there, or (`joined`) stored there by the
    /// replica whose Bill24 call this one waited for.
    Shared { entry: Arc<Entry>, joined: bool },
}

impl Outcome {
    fn failed(&self) -> bool {
        matches!(self, Outcome::Fetched(Err(_)))
    }
}

/// Bill24's failures, as the caller gets them (the statuses are Bill24's own to say).
impl ErrorResponse for UpstreamError {
    fn status(&self) -> StatusCode {
        UpstreamError::status(self)
    }

    fn code(&self) -> &'static str {
        UpstreamError::code(self)
    }

    fn headers(&self, headers: &mut HeaderMap) {
        if let Some(wait) = self.retry_after() {
            set_retry_after(headers, wait);
        }
    }
}

/// One fill in flight for a key: a Bill24 call, or a read of the shared tier.
struct Fill {
    flight: Arc<Flight<FetchResult>>,
    /// False only while every waiter said `no-store`.
    store: AtomicBool,
    /// Whether an answer from the shared tier may serve: not for a fill started by a request
    /// whose `Cache-Control` skipped a usable entry.
    cached_ok: bool,
    /// For a refresh ahead of expiry: a shared answer serves only if stored after the entry
    /// being refreshed (Unix milliseconds).
    newer_than: Option<u64>,
}

/// Everything the balance path shares: cache, upstream, fetches in flight, the fleet's tier.
pub struct Balances {
    cache: Arc<BalanceCache>,
    bill24: Arc<Bill24>,
    fleet: Option<Arc<Fleet>>,
    cache_config: ArcSwap<CacheConfig>,
    fills: Flights<SyncCode, Fill>,
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Usable {
    Yes,
    Skipped,
    No,
}

enum Lookup {
    /// Found fresh in the cache after all (re-checked under the shard lock).
    Hit(Arc<Entry>),
    /// The shared fetch's result.
    Fetched(FetchResult),
}

/// How a new fill starts.
struct FillKind {
    store: bool,
    cached_ok: bool,
    newer_than: Option<u64>,
}

impl Balances {
    pub fn new(
        cache_config: CacheConfig,
        cache: Arc<BalanceCache>,
        bill24: Arc<Bill24>,
        fleet: Option<Arc<Fleet>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Balances {
            cache,
            bill24,
            fleet,
            cache_config: ArcSwap::from_pointee(cache_config),
            fills: Flights::new(SHARDS),
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

    /// Purges one customer here and, with a fleet, everywhere. False when the fleet could not
    /// be told (this replica's copy is gone all the same).
    pub async fn purge(&self, code: &str) -> bool {
        self.cache.purge(code);
        match &self.fleet {
            Some(fleet) => fleet.purge(code).await,
            None => true,
        }
    }

    /// Purges every entry here and, with a fleet, everywhere; false as for [`Self::purge`].
    pub async fn purge_all(&self) -> bool {
        self.cache.purge_all();
        match &self.fleet {
            Some(fleet) => fleet.purge_all().await,
            None => true,
        }
    }

    /// What a cached entry can do for `q` at `now`: answer it (fresh, and the caller's
    /// `Cache-Control` accepts its age), be skipped by the caller, or nothing.
    fn usable(entry: &Entry, q: &BalanceQuery, now: Instant) -> Usable {
        if entry.freshness(now) != Freshness::Fresh {
            Usable::No
        } else if q.directives.accepts(entry.age(now)) {
            Usable::Yes
        } else {
            Usable::Skipped
        }
    }

    /// Answers a query from a fresh entry its `Cache-Control` accepts, without waiting on
    /// anything.
    pub fn answer_from_cache(self: &Arc<Self>, q: &BalanceQuery) -> FromCache {
        let Some(entry) = self.cache.get(&q.customer_sync_code) else {
            return FromCache::Missed;
        };
        let now = Instant::now();
        match Self::usable(&entry, q, now) {
            Usable::No => return FromCache::Missed,
            Usable::Skipped => return FromCache::Skipped,
            Usable::Yes => {}
        }
        if entry.claim_refresh(now, self.cache_config.load().refresh_ahead) {
            tokio::spawn(self.clone().refresh_ahead(q.clone(), entry.clone()));
        }
        FromCache::Answered(cached(&entry, CacheStatus::Hit, Tier::L1, now, q))
    }

    /// Answers a query the cache could not: one shared fill per key (the fleet's tier, then
    /// Bill24). `skipped_fresh`: the caller's `Cache-Control` skipped a usable entry (BYPASS
    /// rather than MISS).
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
        let mut cached_ok = !skipped_fresh;
        loop {
            let result = match self.clone().lookup(&q, cached_ok).await {
                Lookup::Hit(e) => {
                    return cached(&e, CacheStatus::Hit, Tier::L1, Instant::now(), &q);
                }
                Lookup::Fetched(result) => result,
            };
            match &*result {
                Outcome::Fetched(Ok(answer)) => return fetched(answer, status, &q),
                Outcome::Fetched(Err(failure)) => return self.failed(failure, status, &q),
                // Fetched for this request (it waited for another replica's call).
                Outcome::Shared {
                    entry,
                    joined: true,
                } => return cached(entry, status, Tier::L2, Instant::now(), &q),
                Outcome::Shared {
                    entry,
                    joined: false,
                } => {
                    let now = Instant::now();
                    if cached_ok && Self::usable(entry, &q, now) == Usable::Yes {
                        return cached(entry, CacheStatus::Hit, Tier::L2, now, &q);
                    }
                    // Joined a fill whose shared answer this caller's `Cache-Control` does not
                    // accept: a fill that asks Bill24.
                    cached_ok = false;
                }
            }
        }
    }

    /// Joins the fill in flight for this key, or starts one. When `cached_ok`, a fresh entry
    /// that appeared meanwhile answers instead.
    async fn lookup(self: Arc<Self>, q: &BalanceQuery, cached_ok: bool) -> Lookup {
        let store = !q.directives.no_store;
        let joined = self.fills.with(&q.customer_sync_code, |fills| {
            if let Some(fill) = fills.get(&q.customer_sync_code) {
                if store {
                    fill.store.store(true, Ordering::Release);
                }
                self.metrics.coalesced();
                return Ok(fill.flight.clone());
            }
            if cached_ok
                && let Some(e) = self.cache.get(&q.customer_sync_code)
                && Self::usable(&e, q, Instant::now()) == Usable::Yes
            {
                return Err(e);
            }
            let kind = FillKind {
                store,
                cached_ok,
                newer_than: None,
            };
            Ok(self.clone().start_fill(fills, q, kind))
        });
        match joined {
            Ok(flight) => Lookup::Fetched(flight.wait().await),
            Err(entry) => Lookup::Hit(entry),
        }
    }

    /// Registers a fill for `q`'s key (in its shard, locked by the caller) and starts it.
    fn start_fill(
        self: Arc<Self>,
        fills: &mut std::collections::HashMap<SyncCode, Arc<Fill>>,
        q: &BalanceQuery,
        kind: FillKind,
    ) -> Arc<Flight<FetchResult>> {
        let fill = Arc::new(Fill {
            flight: Arc::new(Flight::new()),
            store: AtomicBool::new(kind.store),
            cached_ok: kind.cached_ok,
            newer_than: kind.newer_than,
        });
        fills.insert(q.customer_sync_code.clone(), fill.clone());
        let flight = fill.flight.clone();
        // The guard is moved in with the future: even a fill dropped before it first runs
        // finishes its flight.
        let guard = Guard::new(flight.clone(), abandoned);
        tokio::spawn(self.fill(q.clone(), fill, guard));
        flight
    }

    /// A hit close to expiry: fetch the key again in the background (unless a fill is in
    /// flight already), so a hot key never falls back to a miss. With a fleet, an answer
    /// another replica stored after this entry serves instead of a call.
    async fn refresh_ahead(self: Arc<Self>, mut q: BalanceQuery, entry: Arc<Entry>) {
        q.deadline = Instant::now() + self.bill24.timeout();
        q.state = q.state.detached();
        let flight = self.fills.with(&q.customer_sync_code, |fills| {
            if fills.contains_key(&q.customer_sync_code) {
                return None;
            }
            self.metrics.refresh_ahead();
            let kind = FillKind {
                store: true,
                cached_ok: true,
                newer_than: Some(entry.stored_wall_ms),
            };
            Some(self.clone().start_fill(fills, &q, kind))
        });
        let Some(flight) = flight else { return };
        if flight.wait().await.failed() {
            // Let a later hit try again.
            entry.refreshing.store(false, Ordering::Release);
        }
    }

    /// One fill on behalf of every request waiting on `fill`.
    async fn fill(self: Arc<Self>, q: BalanceQuery, fill: Arc<Fill>, guard: Guard<FetchResult>) {
        let flight = guard.flight();
        let generation = self.cache.generation();
        let outcome = match &self.fleet {
            Some(fleet) if fill.store.load(Ordering::Acquire) => {
                self.fill_through_fleet(fleet, &q, &fill, generation).await
            }
            _ => Outcome::Fetched(self.call(&q, &fill, generation, Share::No).await),
        };
        // Stored before the fill leaves the map, so a request sees either the fill or its
        // stored answer.
        flight.finish(Arc::new(outcome));
        self.fills.remove(&q.customer_sync_code, &fill);
    }

    /// The fleet's way (`fleet` module docs): the shared tier's answer when it has one this
    /// fill may use; else one replica calls Bill24 under the key's fill lock while the others
    /// wait for its answer, and a replica that waited in vain makes one call of its own.
    async fn fill_through_fleet(
        &self,
        fleet: &Arc<Fleet>,
        q: &BalanceQuery,
        fill: &Fill,
        generation: u64,
    ) -> Outcome {
        let code = &q.customer_sync_code;
        fleet.ready(fleet.timeout()).await;
        let epoch = fleet.epoch();
        let serves = |entry: &Entry| {
            entry.freshness(Instant::now()) == Freshness::Fresh
                && fill.newer_than.is_none_or(|t| entry.stored_wall_ms > t)
        };
        if fill.cached_ok
            && let Read::Found(entry) = fleet.read(code).await
        {
            // Kept here even when it does not serve: within `stale_if_error` it may still
            // answer if Bill24 fails.
            if entry.freshness(Instant::now()) != Freshness::Expired {
                self.cache
                    .insert_if_current(code.clone(), entry.clone(), generation);
            }
            if serves(&entry) {
                return Outcome::Shared {
                    entry,
                    joined: false,
                };
            }
        }
        if !fleet.is_up() {
            return Outcome::Fetched(self.call(q, fill, generation, Share::No).await);
        }
        // Registered before the lock is looked at, so the holder's message cannot be missed.
        let wait = fleet.fill_wait(code);
        match fleet.lock_fill(code).await {
            FillLock::Acquired => {
                // Another replica may have stored the answer and released the lock between
                // the read above and this lock: read once more before calling Bill24.
                if fill.cached_ok
                    && let Read::Found(entry) = fleet.read(code).await
                    && serves(&entry)
                {
                    fleet.finish_fill(code, None).await;
                    self.cache
                        .insert_if_current(code.clone(), entry.clone(), generation);
                    return Outcome::Shared {
                        entry,
                        joined: false,
                    };
                }
                let share = Share::Locked(fleet, epoch);
                Outcome::Fetched(self.call(q, fill, generation, share).await)
            }
            FillLock::Held => {
                wait.wait(fleet.fill_ttl()).await;
                if let Read::Found(entry) = fleet.read(code).await
                    && serves(&entry)
                {
                    self.cache
                        .insert_if_current(code.clone(), entry.clone(), generation);
                    return Outcome::Shared {
                        entry,
                        joined: true,
                    };
                }
                // The holder's call failed (nothing stored) or the holder died: one call of
                // this replica's own.
                let share = Share::Unlocked(fleet, epoch);
                Outcome::Fetched(self.call(q, fill, generation, share).await)
            }
            FillLock::Unavailable => {
                Outcome::Fetched(self.call(q, fill, generation, Share::No).await)
            }
        }
    }

    /// One Bill24 call; its answer stored here, and in the fleet's tier as `share` says, when
    /// it may be cached (and no purge reached this replica meanwhile).
    async fn call(
        &self,
        q: &BalanceQuery,
        fill: &Fill,
        generation: u64,
        share: Share<'_>,
    ) -> Result<Answer, Failure> {
        let call = BalanceCall {
            customer_sync_code: &q.customer_sync_code,
            request_id: &q.state.id().header_value(),
            traceparent: q.state.trace().child_header(),
            deadline: q.deadline,
        };
        let result = self.bill24.balance(&call).await;
        let entry = match &result {
            Ok(answer) if fill.store.load(Ordering::Acquire) => {
                self.entry_for(answer).map(Arc::new)
            }
            _ => None,
        };
        if let Some(entry) = &entry {
            self.cache
                .insert_if_current(q.customer_sync_code.clone(), entry.clone(), generation);
        }
        let current = self.cache.generation() == generation;
        let shared = entry.as_deref().filter(|_| current);
        match share {
            Share::No => {}
            Share::Locked(fleet, epoch) => {
                fleet
                    .finish_fill(&q.customer_sync_code, shared.map(|e| (e, epoch)))
                    .await
            }
            Share::Unlocked(fleet, epoch) => {
                if let Some(entry) = shared {
                    fleet.store(&q.customer_sync_code, entry, epoch).await;
                }
            }
        }
        result
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
            stored_wall_ms: wall_ms(),
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
                return cached(&e, CacheStatus::Stale, Tier::L1, now, q);
            }
        }
        q.state.cache(status);
        failure.error.clone().into_response()
    }
}

/// Whether (and how) a fill's answer goes to the fleet's tier.
enum Share<'a> {
    No,
    /// Under the key's fill lock: stored and the lock released in one step, then announced.
    Locked(&'a Arc<Fleet>, u64),
    /// Without the lock (the holder did not deliver): stored.
    Unlocked(&'a Arc<Fleet>, u64),
}

/// Now, in wall-clock Unix milliseconds.
fn wall_ms() -> u64 {
    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
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
    Arc::new(Outcome::Fetched(Err(Failure {
        error: UpstreamError::Unreachable,
        upstream_status: None,
        elapsed: None,
    })))
}

/// An answer from a cache tier (HIT or STALE with `Age`; MISS or BYPASS for an answer another
/// replica fetched while this request waited).
fn cached(
    entry: &Entry,
    status: CacheStatus,
    tier: Tier,
    now: Instant,
    q: &BalanceQuery,
) -> Response {
    q.state.cached(status, tier, &entry.bill24_code);
    cached_response(entry, status, now)
}

/// The response for a cached entry: Bill24's bytes, `X-Cache`, and `Age` on HIT and STALE.
pub fn cached_response(entry: &Entry, status: CacheStatus, now: Instant) -> Response {
    let mut response = http::Response::new(Full::new(entry.body.clone()));
    // Room for these and X-Request-Id, so the map is allocated once.
    *response.headers_mut() = HeaderMap::with_capacity(4);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, entry.content_type.clone());
    headers.insert(X_CACHE, status.header_value());
    if matches!(status, CacheStatus::Hit | CacheStatus::Stale) {
        headers.insert(http::header::AGE, entry.age_header(now));
    }
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
