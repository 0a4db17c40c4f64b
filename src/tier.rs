//! The second cache tier, as the balance service sees it: one call per L1 miss,
//! [`Tier::fill`], which either finds the customer's answer in the tier, waits for the one
//! another replica is fetching, or runs the caller's Bill24 call and shares its answer. The
//! tier owns read-through, the fill lock, the wait, the store and the publish; what L1 must
//! drop (purges from elsewhere) comes back through an [`Invalidate`] callback, so the tier
//! knows nothing of the balance service or its cache.
//!
//! [`crate::fleet`] implements it over Redis; tests use an in-memory one.

use std::sync::Arc;
use std::time::Duration;

use bill24::{Answer, Failure};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::HeaderValue;
use smol_str::SmolStr;

/// A cached Bill24 answer as the tier holds it.
#[derive(Debug, Clone)]
pub(crate) struct SharedAnswer {
    pub(crate) body: Bytes,
    pub(crate) content_type: HeaderValue,
    pub(crate) bill24_code: SmolStr,
    /// Its age when read, by the tier's own clock (zero for an answer just fetched): the same
    /// on every replica, whatever their clocks say.
    pub(crate) age: Duration,
    /// Served as a HIT while younger than this.
    pub(crate) fresh_for: Duration,
    /// After `fresh_for`, kept this much longer for `stale_if_error`.
    pub(crate) stale_for: Duration,
}

impl SharedAnswer {
    pub(crate) fn is_fresh(&self) -> bool {
        self.age < self.fresh_for
    }

    pub(crate) fn is_expired(&self) -> bool {
        self.age >= self.fresh_for + self.stale_for
    }
}

/// What a fill may take from the tier.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FillPolicy {
    /// Whether an answer already in the tier may serve (not when the caller's
    /// `Cache-Control` skipped a usable entry).
    pub(crate) cached_ok: bool,
    /// A refresh ahead of expiry: a stored answer serves only if younger than this (stored
    /// after the entry being refreshed).
    pub(crate) younger_than: Option<Duration>,
}

impl FillPolicy {
    /// Whether `answer`, found in the tier, answers this fill.
    pub(crate) fn serves(&self, answer: &SharedAnswer) -> bool {
        answer.is_fresh() && self.younger_than.is_none_or(|limit| answer.age < limit)
    }
}

/// The caller's Bill24 call, as the tier runs it: the result, and the answer to share when
/// it may be cached (and no purge reached this replica meanwhile).
pub(crate) struct Called {
    pub(crate) result: Result<Answer, Failure>,
    pub(crate) share: Option<SharedAnswer>,
}

/// The call the tier runs when it must: given the tier's answer that did not serve (an entry
/// past its TTL, still good for `stale_if_error`), to keep beside the call.
pub(crate) type Call<'a> =
    Box<dyn FnOnce(Option<SharedAnswer>) -> BoxFuture<'a, Called> + Send + 'a>;

/// How a fill ended.
#[derive(Debug)]
pub(crate) enum Filled {
    /// The tier held an answer that serves.
    Found(SharedAnswer),
    /// Another replica fetched it while this one waited.
    Joined(SharedAnswer),
    /// This replica called Bill24.
    Called(Result<Answer, Failure>),
}

/// Why a wait for another replica's fill ended (each counted in
/// `gateway_fleet_fill_waits_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitOutcome {
    /// The filler stored its answer.
    Filled,
    /// The filler's call failed (or its answer may not be cached), and it said so: the
    /// waiters stop waiting at once and make their own calls.
    Failed,
    /// The lock went without a word (its holder died, or never really held it), or the wait
    /// reached its bound.
    TimedOut,
    /// The tier stopped answering while waiting.
    TierDown,
}

impl WaitOutcome {
    pub(crate) fn label(self) -> &'static str {
        match self {
            WaitOutcome::Filled => "filled",
            WaitOutcome::Failed => "failed",
            WaitOutcome::TimedOut => "timed_out",
            WaitOutcome::TierDown => "tier_down",
        }
    }
}

/// What L1 must drop because of a purge made elsewhere (or a purge the tier may have missed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invalidation {
    Code(String),
    All,
}

/// Told what L1 must drop.
pub(crate) type Invalidate = Arc<dyn Fn(Invalidation) + Send + Sync>;

/// A second cache tier shared by the fleet's replicas.
pub(crate) trait Tier: Send + Sync {
    /// One fill for `code`: the tier's answer when it has one `policy` accepts; else one
    /// replica runs `call` while the others wait for its answer.
    fn fill<'a>(
        &'a self,
        code: &'a str,
        policy: FillPolicy,
        call: Call<'a>,
    ) -> BoxFuture<'a, Filled>;

    /// `DELETE /cache/{code}` for the fleet. False when the tier could not be told.
    fn purge<'a>(&'a self, code: &'a str) -> BoxFuture<'a, bool>;

    /// `DELETE /cache` for the fleet. False when the tier could not be told.
    fn purge_all(&self) -> BoxFuture<'_, bool>;
}
