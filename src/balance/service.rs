//! The balance service: answers a [`BalanceQuery`] from the cache when the entry is fresh and
//! the caller's `Cache-Control` allows it, otherwise from one shared fill per key (request
//! coalescing) — through the fleet's tier when there is one, which may hold the answer, wait
//! for another replica's call, or run this replica's — storing what may be stored and falling
//! back to a stale entry when Bill24 fails. It reads as: L1 → [`Tier::fill`] → answer.
//!
//! A fill runs in its own task, so a caller that hangs up does not cancel the call the others
//! wait on. Fills in flight live in a sharded map ([`singleflight::Flights`]); a miss
//! re-checks the cache under its shard's lock, and a finished fill stores its answer before
//! leaving the map, so a request sees either the fill or its stored answer — never neither,
//! which would cost a second call.

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
use singleflight::{Flight, Flights, Guard, Joined};
use tokio::time::Instant;
use tower::Service;

use super::cache::{
    BalanceCache, CacheStatus, Entry, Freshness, Generation, MAX_CACHED_ANSWER_BYTES,
    Tier as CacheTier, fresh_for,
};
use super::code::SyncCode;
use super::request::BalanceQuery;
use crate::config::CacheConfig;
use crate::error::{ErrorResponse, Response};
use crate::metrics::Metrics;
use crate::tier::{Call, Called, FillPolicy, Filled, SharedAnswer, Tier};

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// How often purges the tier could not take are sent again.
const RESEND_PURGES_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
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

/// One fill in flight for a key: a Bill24 call, or a read of the shared tier.
struct Fill {
    flight: Arc<Flight<FetchResult>>,
    /// False only while every waiter said `no-store`.
    store: AtomicBool,
    /// What the fill may take from the shared tier.
    policy: FillPolicy,
}

/// Everything the balance path shares: cache, upstream, fills in flight, the fleet's tier.
pub struct Balances {
    cache: Arc<BalanceCache>,
    bill24: Arc<Bill24>,
    tier: Option<Arc<dyn Tier>>,
    cache_config: ArcSwap<CacheConfig>,
    fills: Flights<SyncCode, Fill>,
    metrics: Arc<Metrics>,
    /// Purges the tier could not be told of yet: sent again until it can.
    unsent: std::sync::Mutex<Unsent>,
    /// Where fills, refreshes and purge resends run: the runtime these balances were made on,
    /// also when a request is served on a thread of its own (the serving thread then only
    /// waits for the answer).
    background: Option<tokio::runtime::Handle>,
}

/// Purges waiting to reach the fleet.
#[derive(Default)]
struct Unsent {
    all: bool,
    codes: std::collections::BTreeSet<String>,
    /// A task is sending them.
    sending: bool,
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

impl Balances {
    /// The balance path of a gateway without a shared tier.
    pub fn new(
        cache_config: CacheConfig,
        cache: Arc<BalanceCache>,
        bill24: Arc<Bill24>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_tier(cache_config, cache, bill24, None, metrics)
    }

    /// The balance path, with the fleet's tier behind the cache.
    pub(crate) fn with_tier(
        cache_config: CacheConfig,
        cache: Arc<BalanceCache>,
        bill24: Arc<Bill24>,
        tier: Option<Arc<dyn Tier>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Balances {
            cache,
            bill24,
            tier,
            cache_config: ArcSwap::from_pointee(cache_config),
            fills: Flights::new(SHARDS),
            metrics,
            unsent: Default::default(),
            background: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Runs `task` on [`Balances::background`] (the current runtime when there is none).
    fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.background {
            Some(runtime) => drop(runtime.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
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

    /// Purges one customer here and, with a tier, everywhere. False when the tier could not
    /// be told now (this replica's copy is gone all the same, and the purge is sent again
    /// until the tier takes it).
    pub async fn purge(self: &Arc<Self>, code: &str) -> bool {
        self.cache.purge(code);
        let Some(tier) = &self.tier else { return true };
        if tier.purge(code).await {
            return true;
        }
        self.keep_unsent(|u| {
            u.codes.insert(code.to_string());
        });
        false
    }

    /// Purges every entry here and, with a tier, everywhere; false as for [`Self::purge`].
    pub async fn purge_all(self: &Arc<Self>) -> bool {
        self.cache.purge_all();
        let Some(tier) = &self.tier else { return true };
        if tier.purge_all().await {
            return true;
        }
        self.keep_unsent(|u| {
            u.all = true;
            u.codes.clear();
        });
        false
    }

    /// Keeps a purge the tier could not take, and starts sending them again if nothing is.
    fn keep_unsent(self: &Arc<Self>, add: impl FnOnce(&mut Unsent)) {
        let start = {
            let mut unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
            add(&mut unsent);
            !std::mem::replace(&mut unsent.sending, true)
        };
        if start {
            self.spawn(self.clone().send_unsent());
        }
    }

    /// Sends the kept purges again, every [`RESEND_PURGES_EVERY`], until the tier has them all.
    async fn send_unsent(self: Arc<Self>) {
        let Some(tier) = self.tier.clone() else {
            return;
        };
        loop {
            tokio::time::sleep(RESEND_PURGES_EVERY).await;
            let (all, codes) = {
                let unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
                (unsent.all, unsent.codes.clone())
            };
            let mut sent = Vec::new();
            let all_sent = all && tier.purge_all().await;
            if !all {
                for code in &codes {
                    if tier.purge(code).await {
                        sent.push(code.clone());
                    } else {
                        break;
                    }
                }
            }
            let mut unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
            if all_sent {
                unsent.all = false;
            }
            for code in sent {
                unsent.codes.remove(&code);
            }
            if !unsent.all && unsent.codes.is_empty() {
                unsent.sending = false;
                tracing::info!(
                    "purges made while the shared tier was unreachable have reached the fleet"
                );
                return;
            }
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
            self.spawn(self.clone().refresh_ahead(q.clone(), entry.clone()));
        }
        FromCache::Answered(cached(&entry, CacheStatus::Hit, CacheTier::L1, now, q))
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
            let result = match self.clone().lookup(&q, cached_ok) {
                Lookup::Hit(e) => {
                    return cached(&e, CacheStatus::Hit, CacheTier::L1, Instant::now(), &q);
                }
                Lookup::Wait(flight) => flight.wait().await,
            };
            match &*result {
                Outcome::Fetched(Ok(answer)) => return fetched(answer, status, &q),
                Outcome::Fetched(Err(failure)) => return self.failed(failure, status, &q),
                // Fetched for this request (it waited for another replica's call).
                Outcome::Shared {
                    entry,
                    joined: true,
                } => return cached(entry, status, CacheTier::L2, Instant::now(), &q),
                Outcome::Shared {
                    entry,
                    joined: false,
                } => {
                    let now = Instant::now();
                    if cached_ok && Self::usable(entry, &q, now) == Usable::Yes {
                        return cached(entry, CacheStatus::Hit, CacheTier::L2, now, &q);
                    }
                    // Joined a fill whose shared answer this caller's `Cache-Control` does not
                    // accept: a fill that asks Bill24.
                    cached_ok = false;
                }
            }
        }
    }
}

impl Balances {
    /// Joins the fill in flight for this key, or starts one. When `cached_ok`, a fresh entry
    /// that appeared meanwhile answers instead.
    fn lookup(self: Arc<Self>, q: &BalanceQuery, cached_ok: bool) -> Lookup {
        let store = !q.directives.no_store;
        let code = &q.customer_sync_code;
        let joined = self.fills.join_or_start(
            code.clone(),
            |fill| {
                if store {
                    fill.store.store(true, Ordering::Release);
                }
                self.metrics.coalesced();
            },
            || match self.cache.get(code) {
                Some(e) if cached_ok && Self::usable(&e, q, Instant::now()) == Usable::Yes => {
                    Err(e)
                }
                _ => Ok(Fill {
                    flight: Arc::new(Flight::new()),
                    store: AtomicBool::new(store),
                    policy: FillPolicy {
                        cached_ok,
                        younger_than: None,
                    },
                }),
            },
        );
        match joined {
            Joined::Joined(fill) => Lookup::Wait(fill.flight.clone()),
            Joined::Started(fill) => Lookup::Wait(self.spawn_fill(q, fill)),
            Joined::Declined(entry) => Lookup::Hit(entry),
        }
    }

    /// Starts a registered fill in its own task.
    fn spawn_fill(self: Arc<Self>, q: &BalanceQuery, fill: Arc<Fill>) -> Arc<Flight<FetchResult>> {
        let flight = fill.flight.clone();
        // The guard is moved in with the future: even a fill dropped before it first runs
        // finishes its flight.
        let guard = Guard::new(flight.clone(), abandoned);
        let fill = self.clone().fill(q.clone(), fill, guard);
        self.spawn(fill);
        flight
    }

    /// A hit close to expiry: fetch the key again in the background (unless a fill is in
    /// flight already), so a hot key never falls back to a miss. With a tier, an answer
    /// another replica stored after this entry serves instead of a call.
    async fn refresh_ahead(self: Arc<Self>, mut q: BalanceQuery, entry: Arc<Entry>) {
        q.deadline = Instant::now() + self.bill24.timeout();
        q.state = q.state.detached();
        let younger_than = entry.age(Instant::now());
        let started = self
            .fills
            .start_if_absent(q.customer_sync_code.clone(), || Fill {
                flight: Arc::new(Flight::new()),
                store: AtomicBool::new(true),
                policy: FillPolicy {
                    cached_ok: true,
                    younger_than: Some(younger_than),
                },
            });
        let Some(fill) = started else { return };
        self.metrics.refresh_ahead();
        let flight = self.clone().spawn_fill(&q, fill);
        if flight.wait().await.failed() {
            // Let a later hit try again.
            entry.refreshing.store(false, Ordering::Release);
        }
    }

    /// One fill on behalf of every request waiting on `fill`.
    async fn fill(self: Arc<Self>, q: BalanceQuery, fill: Arc<Fill>, guard: Guard<FetchResult>) {
        let code = &q.customer_sync_code;
        let generation = self.cache.generation();
        let outcome = match &self.tier {
            Some(tier) if fill.store.load(Ordering::Acquire) => {
                let call: Call<'_> = Box::new(|stale: Option<SharedAnswer>| {
                    Box::pin(async {
                        // Kept here beside the call: within `stale_if_error`, it answers if
                        // Bill24 fails.
                        if let Some(stale) = stale {
                            self.cache.insert_if_current(
                                code.clone(),
                                Arc::new(entry_from_shared(stale)),
                                generation,
                            );
                        }
                        self.call(&q, &fill, generation).await
                    })
                });
                match tier.fill(code, fill.policy, call).await {
                    Filled::Found(answer) => self.shared(code, answer, generation, false),
                    Filled::Joined(answer) => self.shared(code, answer, generation, true),
                    Filled::Called(result) => Outcome::Fetched(result),
                }
            }
            _ => Outcome::Fetched(self.call(&q, &fill, generation).await.result),
        };
        // Stored before the fill leaves the map, so a request sees either the fill or its
        // stored answer.
        guard.flight().finish(Arc::new(outcome));
        self.fills.remove(code, &fill);
    }

    /// An answer from the tier, kept in L1 until the tier's copy expires (its age is the
    /// tier's: a read never restarts the TTL).
    fn shared(
        &self,
        code: &SyncCode,
        answer: SharedAnswer,
        generation: Generation,
        joined: bool,
    ) -> Outcome {
        let entry = Arc::new(entry_from_shared(answer));
        self.cache
            .insert_if_current(code.clone(), entry.clone(), generation);
        Outcome::Shared { entry, joined }
    }

    /// One Bill24 call; its answer stored here when it may be cached (and no purge of the key
    /// reached this replica meanwhile), and handed back for the tier to share.
    async fn call(&self, q: &BalanceQuery, fill: &Fill, generation: Generation) -> Called {
        let call = BalanceCall {
            customer_sync_code: &q.customer_sync_code,
            request_id: &q.state.id().header_value(),
            traceparent: q.state.trace().child_header(),
            deadline: q.deadline,
        };
        let result = self.bill24.balance(&call).await;
        let entry = match &result {
            Ok(answer) if fill.store.load(Ordering::Acquire) => self.entry_for(answer),
            _ => None,
        };
        let mut share = None;
        if let Some((entry, answer)) = entry {
            self.cache
                .insert_if_current(q.customer_sync_code.clone(), Arc::new(entry), generation);
            if self.cache.is_current(&q.customer_sync_code, generation) {
                share = Some(answer);
            }
        }
        Called { result, share }
    }

    /// The cache entry for an answer, and the same as the tier holds it, when it may be
    /// cached at all. An answer over [`MAX_CACHED_ANSWER_BYTES`] is passed on, not kept: the
    /// caller's balance is right, only each ask for it goes to Bill24.
    fn entry_for(&self, answer: &Answer) -> Option<(Entry, SharedAnswer)> {
        if answer.status != StatusCode::OK {
            return None;
        }
        let code = answer.bill24_code.as_ref()?;
        let cfg = self.cache_config.load();
        let fresh_for = fresh_for(&cfg, code, rand::random::<f64>())?;
        if answer.body.len() > MAX_CACHED_ANSWER_BYTES {
            tracing::warn!(
                bytes = answer.body.len(),
                limit = MAX_CACHED_ANSWER_BYTES,
                "Bill24 answer too large to cache: passed on, not cached"
            );
            return None;
        }
        let shared = SharedAnswer {
            // A copy of exactly the body: the answer's bytes may be a slice of the connection's
            // read buffer, which a cached entry would otherwise keep alive in full.
            body: Bytes::copy_from_slice(&answer.body),
            content_type: stored_content_type(answer.content_type.as_ref()),
            bill24_code: code.clone(),
            age: std::time::Duration::ZERO,
            fresh_for,
            stale_for: cfg.stale_if_error,
        };
        Some((entry_from_shared(shared.clone()), shared))
    }

    /// Bill24 failed: an entry still within `stale_if_error` answers (STALE), else the error.
    fn failed(&self, failure: &Failure, status: CacheStatus, q: &BalanceQuery) -> Response {
        q.state.upstream(failure.upstream_status, failure.elapsed);
        if let Some(e) = self.cache.get(&q.customer_sync_code) {
            let now = Instant::now();
            if !e.stale_for.is_zero() && e.freshness(now) != Freshness::Expired {
                return cached(&e, CacheStatus::Stale, CacheTier::L1, now, q);
            }
        }
        q.state.cache(status);
        failure.error.clone().into_response()
    }
}

/// What [`Balances::lookup`] found.
enum Lookup {
    /// Found fresh in the cache after all (re-checked under the shard lock).
    Hit(Arc<Entry>),
    /// The shared fill to wait for.
    Wait(Arc<Flight<FetchResult>>),
}

/// An L1 entry for an answer of the tier: as old as the tier says.
fn entry_from_shared(answer: SharedAnswer) -> Entry {
    let now = Instant::now();
    Entry {
        body: answer.body,
        content_type: answer.content_type,
        bill24_code: answer.bill24_code,
        stored_at: now.checked_sub(answer.age).unwrap_or(now),
        fresh_for: answer.fresh_for,
        stale_for: answer.stale_for,
        refreshing: AtomicBool::new(false),
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
    tier: CacheTier,
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

/// The innermost service of the stack. The balances are behind a reference of this stack's
/// own: a stack is built for each serving thread, and the stack is cloned for every request,
/// so the count that clone moves is this thread's rather than one every thread writes.
#[derive(Clone)]
pub(crate) struct BalanceService {
    balances: Arc<ThisStack>,
}

/// The shared balances, as one stack holds them.
struct ThisStack(Arc<Balances>);

impl BalanceService {
    pub(crate) fn new(balances: Arc<Balances>) -> Self {
        BalanceService {
            balances: Arc::new(ThisStack(balances)),
        }
    }
}

/// A hit is answered in `call` itself; only a miss becomes a (boxed) future.
pub(crate) type BalanceFuture = Either<
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
        let skipped_fresh = match self.balances.0.answer_from_cache(&q) {
            FromCache::Answered(response) => return Either::Left(ready(Ok(response))),
            FromCache::Missed => false,
            FromCache::Skipped => true,
        };
        let balances = self.balances.0.clone();
        Either::Right(Box::pin(async move {
            Ok(balances.answer_from_upstream(q, skipped_fresh).await)
        }))
    }
}

#[cfg(test)]
mod tests {
    //! The balance service over an in-memory tier, on paused time: what it does with each way
    //! a fill can end. Bill24 is an address nobody listens on, so any call it makes fails.
    use std::sync::Mutex;
    use std::time::Duration;

    use figment::Figment;
    use figment::providers::{Format, Serialized, Toml};
    use futures_util::future::BoxFuture;
    use smol_str::SmolStr;
    use tower::ServiceExt;

    use super::*;
    use crate::balance::request::CacheDirectives;
    use crate::config::RawConfig;
    use crate::correlation::context::RequestId;
    use crate::request_state::RequestState;

    #[derive(Clone, Copy)]
    enum Mode {
        Found,
        Joined,
        /// Runs the caller's call, handing it what the tier holds.
        Call,
    }

    /// A tier in memory: one held answer, and what it was asked.
    struct FakeTier {
        held: SharedAnswer,
        mode: Mode,
        fills: Mutex<Vec<FillPolicy>>,
        purged: Mutex<Vec<String>>,
    }

    impl Tier for FakeTier {
        fn fill<'a>(
            &'a self,
            _code: &'a str,
            policy: FillPolicy,
            call: Call<'a>,
        ) -> BoxFuture<'a, Filled> {
            self.fills.lock().expect("fills").push(policy);
            Box::pin(async move {
                match self.mode {
                    Mode::Found => Filled::Found(self.held.clone()),
                    Mode::Joined => Filled::Joined(self.held.clone()),
                    Mode::Call => Filled::Called(call(Some(self.held.clone())).await.result),
                }
            })
        }

        fn purge<'a>(&'a self, code: &'a str) -> BoxFuture<'a, bool> {
            self.purged.lock().expect("purged").push(code.to_string());
            Box::pin(async { true })
        }

        fn purge_all(&self) -> BoxFuture<'_, bool> {
            self.purged.lock().expect("purged").push("*".into());
            Box::pin(async { true })
        }
    }

    fn held(age_s: u64) -> SharedAnswer {
        SharedAnswer {
            body: Bytes::from_static(br#"{"code":"000","data":[]}"#),
            content_type: HeaderValue::from_static("application/json"),
            bill24_code: SmolStr::new_static("000"),
            age: Duration::from_secs(age_s),
            fresh_for: Duration::from_secs(10),
            stale_for: Duration::from_secs(30),
        }
    }

    fn setup(mode: Mode, held: SharedAnswer, cache: &str) -> (Arc<FakeTier>, BalanceService) {
        let toml = format!(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\nclient_id = \"c\"\nretries = 0\n\
             [cache]\n{cache}\n"
        );
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(&toml))
            .extract()
            .expect("config");
        let config = raw.validate().expect("valid");
        let metrics = Arc::new(Metrics::new());
        let bill24 =
            Arc::new(Bill24::start(&config.upstream, metrics.clone(), None).expect("client"));
        let tier = Arc::new(FakeTier {
            held,
            mode,
            fills: Mutex::new(Vec::new()),
            purged: Mutex::new(Vec::new()),
        });
        let balances = Balances::with_tier(
            config.cache.clone(),
            Arc::new(BalanceCache::new(100, 1 << 20)),
            bill24,
            Some(tier.clone() as Arc<dyn Tier>),
            metrics,
        );
        (tier, BalanceService::new(balances))
    }

    fn query(code: &str) -> BalanceQuery {
        BalanceQuery {
            customer_sync_code: code.into(),
            directives: CacheDirectives::default(),
            deadline: Instant::now() + Duration::from_secs(10),
            state: RequestState::new(RequestId::generate(), None),
        }
    }

    async fn ask(service: &BalanceService, code: &str) -> (StatusCode, String, Option<String>) {
        let response = service
            .clone()
            .oneshot(query(code))
            .await
            .expect("infallible");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        (
            response.status(),
            header("x-cache").unwrap_or_default(),
            header("age"),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_found_in_the_tier_is_a_hit_as_old_as_the_tier_says() {
        let (tier, service) = setup(Mode::Found, held(3), "ttl = \"10s\"");
        assert_eq!(
            ask(&service, "C1").await,
            (StatusCode::OK, "HIT".into(), Some("3".into()))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            ask(&service, "C1").await,
            (StatusCode::OK, "HIT".into(), Some("5".into())),
            "kept in L1 with the tier's age"
        );
        assert_eq!(tier.fills.lock().expect("fills").len(), 1, "L1 answered");
        // Expires in L1 when it does in the tier: 7 s after it was found at age 3.
        tokio::time::advance(Duration::from_secs(5)).await;
        ask(&service, "C1").await;
        assert_eq!(
            tier.fills.lock().expect("fills").len(),
            2,
            "asked the tier again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_another_replica_fetched_is_a_miss_then_a_hit() {
        let (tier, service) = setup(Mode::Joined, held(0), "ttl = \"10s\"");
        assert_eq!(
            ask(&service, "C1").await,
            (StatusCode::OK, "MISS".into(), None)
        );
        assert_eq!(
            ask(&service, "C1").await,
            (StatusCode::OK, "HIT".into(), Some("0".into()))
        );
        assert_eq!(tier.fills.lock().expect("fills").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tiers_expired_answer_is_served_stale_when_bill24_fails() {
        let (_tier, service) = setup(
            Mode::Call,
            held(12),
            "ttl = \"10s\"\nstale_if_error = \"30s\"",
        );
        assert_eq!(
            ask(&service, "C1").await,
            (StatusCode::OK, "STALE".into(), Some("12".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_stale_answer_a_failed_call_is_an_error() {
        let (_tier, service) = setup(
            Mode::Call,
            held(45),
            "ttl = \"10s\"\nstale_if_error = \"30s\"",
        );
        let (status, cache, _) = ask(&service, "C1").await;
        assert!(status.is_server_error(), "{status}");
        assert_eq!(cache, "", "an error body, not a cached answer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_ahead_takes_only_an_answer_younger_than_the_entry() {
        let (tier, service) = setup(
            Mode::Found,
            held(9),
            "ttl = \"10s\"\nrefresh_ahead = \"2s\"",
        );
        ask(&service, "C1").await;
        // A hit within `refresh_ahead` of expiry starts a refresh in the background.
        ask(&service, "C1").await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let fills = tier.fills.lock().expect("fills").clone();
        assert_eq!(fills.len(), 2, "the miss, then the refresh");
        assert!(fills[0].cached_ok && fills[0].younger_than.is_none());
        assert_eq!(fills[1].younger_than, Some(Duration::from_secs(9)));
    }

    #[tokio::test(start_paused = true)]
    async fn purges_reach_the_tier() {
        let (tier, service) = setup(Mode::Found, held(0), "ttl = \"10s\"");
        ask(&service, "C1").await;
        assert!(service.balances.0.purge("C1").await);
        assert!(service.balances.0.cache().get("C1").is_none());
        assert!(service.balances.0.purge_all().await);
        assert_eq!(*tier.purged.lock().expect("purged"), ["C1", "*"]);
    }
}
