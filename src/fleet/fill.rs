//! One fill per key across the fleet: the tier's side of [`Tier::fill`].
//!
//! 1. **Look** (one round trip, [`LOOK`]): the customer's entry, its remaining time, the fill
//!    lock's remaining time, and Redis's clock. An entry's age is its lifetime minus its
//!    remaining time — Redis's clock, the same for every replica.
//! 2. **Lock** (`SET NX PX lease`, a fresh random value per fill). The lease is short and the
//!    holder renews it while its Bill24 call runs, so a lock whose holder died — or one set by
//!    a command its sender gave up on (a paused Redis runs it later) — is gone within one
//!    lease, not after a whole fill's worth of retries.
//! 3. **Wait** (lock taken by another replica): registered before the lock was tried, the wait
//!    ends with a named [`WaitOutcome`] — the holder's `fill` or `failed` message, the lock gone
//!    without a word (looked at again each time its lease would run out), the tier down, or
//!    the fill's bound.
//! 4. **Store and release** in one step (the holder's caller waits for it, at most
//!    `redis.timeout`, so the next request anywhere finds the entry), in a task of its own and
//!    tried even when the tier is marked down meanwhile; then the message.
//!
//! Stores set an absolute expiry in Redis's time (`PXAT`), estimated from the look's clock and
//! this replica's monotonic clock since: a store that Redis carries out late (a pause) does not
//! make its entry live longer.

use std::time::Duration;

use bill24::Failure;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::HeaderValue;
use redis::Script;
use singleflight::{Flight, Joined};
use smol_str::SmolStr;
use tokio::time::Instant;

use super::conn::CallError;
use super::seal::{self, Rejected, StoredEntry};
use super::{Fleet, hex_code, millis};
use crate::tier::{Call, Called, FillPolicy, Filled, SharedAnswer, Tier, WaitOutcome};

/// The entry, its PTTL, the fill lock's PTTL and Redis's time (ms), in one round trip (one
/// slot: both keys carry the customer's hash tag).
const LOOK: &str = "local e = redis.call('GET', KEYS[1]) \
                    local t = redis.call('PTTL', KEYS[1]) \
                    local l = redis.call('PTTL', KEYS[2]) \
                    local now = redis.call('TIME') \
                    return {e, t, l, tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)}";
/// Extends a lock's lease if it still holds this holder's value.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                     return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Releases a lock only if it still holds this holder's value.
pub(super) const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                                  return redis.call('DEL', KEYS[1]) else return 0 end";
/// Stores an entry to expire at a moment in Redis time and releases the key's fill lock, if
/// still this holder's, in one step (same slot).
const STORE_AND_RELEASE: &str = "redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2]) \
                                 if redis.call('GET', KEYS[2]) == ARGV[3] then \
                                 redis.call('DEL', KEYS[2]) end return 1";

/// How much longer than its lifetime an entry's remaining time may be (the writer's estimate
/// of Redis's clock is a little ahead at most); more, and its expiry was pushed back.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);
/// Past a lock's remaining time, before looking at it again.
const LOOK_AGAIN_AFTER: Duration = Duration::from_millis(5);

/// Redis's clock, as read once, moved on by this replica's monotonic clock.
#[derive(Clone, Copy)]
struct RedisClock {
    read_ms: u64,
    at: Instant,
}

impl RedisClock {
    fn now_ms(&self) -> u64 {
        self.read_ms.saturating_add(millis(self.at.elapsed()))
    }
}

/// What a look found.
struct Look {
    /// The customer's entry: authentic, of the epoch in force, its age by Redis's clock.
    answer: Option<SharedAnswer>,
    /// An authentic entry of another epoch (a purge this replica may not have heard of yet).
    other_epoch: Option<u64>,
    /// The fill lock's remaining time, when there is one.
    locked: Option<Duration>,
    clock: RedisClock,
}

/// One fill of one key: what its steps share.
struct KeyFill<'a> {
    code: &'a str,
    hex: &'a str,
    epoch: u64,
    /// Redis's clock as the first look read it.
    clock: RedisClock,
    /// This fill's lock value (random).
    value: String,
}

/// Whether the holder stored an answer or not.
enum Finish {
    Store { sealed: Vec<u8>, expires_at_ms: u64 },
    Release,
}

impl Tier for Fleet {
    fn fill<'a>(
        &'a self,
        code: &'a str,
        policy: FillPolicy,
        call: Call<'a>,
    ) -> BoxFuture<'a, Filled> {
        Box::pin(self.fill_key(code, policy, call))
    }

    fn purge<'a>(&'a self, code: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let hex = hex_code(code);
            let key = self.keys.entry(&hex);
            let deleted = self
                .link
                .call("purge", |c| {
                    c.query::<i64>(redis::cmd("DEL").arg(&key).clone())
                })
                .await
                .is_ok();
            deleted && self.publish(format!("purge {hex}")).await
        })
    }

    fn purge_all(&self) -> BoxFuture<'_, bool> {
        Box::pin(self.new_epoch())
    }
}

/// A fill without the tier: this replica's own call, nothing shared.
async fn alone(call: Call<'_>) -> Filled {
    Filled::Called(call(None).await.result)
}

impl Fleet {
    async fn fill_key(&self, code: &str, policy: FillPolicy, call: Call<'_>) -> Filled {
        // A replica that has just started asks the fleet before acting on its own.
        self.link.ready(self.link.timeout).await;
        let Some(mut epoch) = self.epoch().await else {
            return alone(call).await;
        };
        let hex = hex_code(code);
        let Ok(mut look) = self.look(code, &hex, epoch).await else {
            return alone(call).await;
        };
        if let Some(theirs) = look.other_epoch
            && let Some(now) = self.read_epoch().await
            && now == theirs
        {
            // A purge this replica had not heard of yet: the entry is of the epoch in force.
            epoch = now;
            let Ok(again) = self.look(code, &hex, epoch).await else {
                return alone(call).await;
            };
            look = again;
        }
        if policy.cached_ok
            && let Some(answer) = &look.answer
            && policy.serves(answer)
        {
            return Filled::Found(answer.clone());
        }
        // Within `stale_if_error`, it may still answer if Bill24 fails.
        let stale = look
            .answer
            .take()
            .filter(|a| policy.cached_ok && !a.is_expired());
        // Registered before the lock is tried, so the holder's message cannot be missed.
        let flight =
            match self
                .waits
                .join_or_start(hex.clone(), |_| {}, || Ok::<_, ()>(Flight::new()))
            {
                Joined::Joined(flight) | Joined::Started(flight) => flight,
                Joined::Declined(()) => return alone(call).await,
            };
        let fill = KeyFill {
            code,
            hex: &hex,
            epoch,
            clock: look.clock,
            value: hex::encode(rand::random::<[u8; 16]>()),
        };
        let lock_key = self.keys.fill(&hex);
        let locked: Result<Option<String>, _> = self
            .link
            .call("lock", |c| {
                c.query(
                    redis::cmd("SET")
                        .arg(&lock_key)
                        .arg(&fill.value)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis(self.lease))
                        .clone(),
                )
            })
            .await;
        if !matches!(locked, Ok(None)) {
            self.waits.remove_if_unshared(&hex, &flight);
        }
        match locked {
            Ok(Some(_)) => {
                // Another replica may have stored its answer and released the lock between
                // the look and the lock.
                if policy.cached_ok
                    && let Some(answer) = self.look_for(&fill, policy).await
                {
                    drop(self.finish(&fill, Finish::Release, false));
                    return Filled::Found(answer);
                }
                let called = self.hold(&lock_key, &fill.value, call(stale)).await;
                let _ = self
                    .finish(&fill, self.to_finish(&fill, called.share), true)
                    .await;
                Filled::Called(called.result)
            }
            Ok(None) => {
                let (outcome, answer) = self.wait(&fill, &flight, &look).await;
                self.waits.remove_if_unshared(&hex, &flight);
                drop(flight);
                self.metrics().fleet_fill_wait(outcome.label());
                if let Some(answer) = answer.filter(|a| policy.serves(a)) {
                    return Filled::Joined(answer);
                }
                if outcome == WaitOutcome::Filled
                    && let Some(answer) = self.look_for(&fill, policy).await
                {
                    return Filled::Joined(answer);
                }
                // The holder failed, vanished, or the tier did: one call of this replica's
                // own, shared (without the lock) while the tier answers.
                let called = call(stale).await;
                if outcome != WaitOutcome::TierDown
                    && let Finish::Store {
                        sealed,
                        expires_at_ms,
                    } = self.to_finish(&fill, called.share)
                {
                    self.store_unlocked(&hex, sealed, expires_at_ms);
                }
                Filled::Called(called.result)
            }
            Err(CallError::Skipped) => alone(call).await,
            Err(CallError::Failed) => {
                // The lock may still be set when Redis carries out the command late: stored
                // and released (if it is this fill's) as soon as Redis answers again.
                drop(flight);
                let called = call(stale).await;
                drop(self.finish(&fill, self.to_finish(&fill, called.share), false));
                Filled::Called(called.result)
            }
        }
    }

    /// Looks again; the entry found, when `policy` may serve it.
    async fn look_for(&self, fill: &KeyFill<'_>, policy: FillPolicy) -> Option<SharedAnswer> {
        let look = self.look(fill.code, fill.hex, fill.epoch).await.ok()?;
        look.answer.filter(|answer| policy.serves(answer))
    }

    /// One look at the customer's keys.
    async fn look(&self, code: &str, hex: &str, epoch: u64) -> Result<Look, CallError> {
        let entry_key = self.keys.entry(hex);
        let lock_key = self.keys.fill(hex);
        let script = Script::new(LOOK);
        let (bytes, entry_ttl, lock_ttl, redis_ms): (Option<Vec<u8>>, i64, i64, u64) = self
            .link
            .call("get", |c| {
                let keys = [entry_key.as_str(), lock_key.as_str()];
                async move { c.script(&script, &keys, &[]).await }
            })
            .await?;
        let clock = RedisClock {
            read_ms: redis_ms,
            at: Instant::now(),
        };
        let locked = u64::try_from(lock_ttl).ok().map(Duration::from_millis);
        let mut look = Look {
            answer: None,
            other_epoch: None,
            locked,
            clock,
        };
        let Some(bytes) = bytes else { return Ok(look) };
        match seal::open_entry(&self.secrets, &entry_key, code, &bytes) {
            Ok(stored) if stored.epoch != epoch => look.other_epoch = Some(stored.epoch),
            Ok(stored) => match to_answer(stored, entry_ttl) {
                Some(answer) => look.answer = Some(answer),
                None => {
                    self.metrics().redis("get", "rejected", None);
                    tracing::warn!(
                        customer_sync_code = code,
                        "an entry in the shared tier has an expiry it was not stored with; \
                         treated as a miss"
                    );
                }
            },
            Err(Rejected) => {
                self.metrics().redis("get", "rejected", None);
                tracing::warn!(
                    customer_sync_code = code,
                    "an entry in the shared tier did not verify; treated as a miss"
                );
            }
        }
        Ok(look)
    }

    /// Waits for another replica's fill: its message, the lock gone without one, the tier
    /// down, or the bound. The answer, when a look on the way found one.
    async fn wait(
        &self,
        fill: &KeyFill<'_>,
        flight: &Flight<WaitOutcome>,
        first: &Look,
    ) -> (WaitOutcome, Option<SharedAnswer>) {
        let bound = Instant::now() + self.fill_ttl;
        // A holder renews its lock to one lease at most: a longer one is no live fill's (set
        // by someone else with access to Redis), and nobody waits on it.
        let foreign = |left: Duration| left > self.lease + EXPIRY_SLACK;
        if first.locked.is_some_and(foreign) {
            return (WaitOutcome::TimedOut, None);
        }
        let mut look_in = first.locked.unwrap_or(self.lease).min(self.lease) + LOOK_AGAIN_AFTER;
        let down = self.link.down();
        let mut down = std::pin::pin!(down);
        loop {
            tokio::select! {
                outcome = flight.wait() => return (outcome, None),
                () = &mut down => return (WaitOutcome::TierDown, None),
                () = tokio::time::sleep(look_in) => {}
            }
            if Instant::now() >= bound {
                return (WaitOutcome::TimedOut, None);
            }
            match self.look(fill.code, fill.hex, fill.epoch).await {
                Ok(look) if look.answer.as_ref().is_some_and(|a| a.is_fresh()) => {
                    // Stored, and its message lost or still on its way.
                    return (WaitOutcome::Filled, look.answer);
                }
                Ok(Look {
                    locked: Some(left), ..
                }) if !foreign(left) => look_in = left.min(self.lease) + LOOK_AGAIN_AFTER,
                Ok(_) => return (WaitOutcome::TimedOut, None),
                Err(_) => return (WaitOutcome::TierDown, None),
            }
        }
    }

    /// Runs the holder's call, renewing its lease meanwhile.
    async fn hold(&self, lock_key: &str, value: &str, call: BoxFuture<'_, Called>) -> Called {
        let lease = millis(self.lease).to_string();
        let renew = async {
            let mut every = tokio::time::interval(self.lease / 4);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let script = Script::new(RENEW);
                let renewed: Result<i64, _> = self
                    .link
                    .call("renew", |c| {
                        let args = [value.as_bytes(), lease.as_bytes()];
                        async move { c.script(&script, &[lock_key], &args).await }
                    })
                    .await;
                if renewed == Ok(0) {
                    // Lost (it ran out during a stall): another replica may fill too; this
                    // one's answer is stored all the same.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            called = call => called,
            () = renew => unreachable_renew(),
        }
    }

    /// What the holder leaves in the tier for an answer (or for none).
    fn to_finish(&self, fill: &KeyFill<'_>, share: Option<SharedAnswer>) -> Finish {
        let Some(answer) = share else {
            return Finish::Release;
        };
        let now = fill.clock.now_ms();
        let lifetime = answer.fresh_for + answer.stale_for;
        let left = millis(lifetime.saturating_sub(answer.age));
        if left == 0 {
            return Finish::Release;
        }
        let stored = StoredEntry {
            stored_at_ms: now.saturating_sub(millis(answer.age)),
            fresh_for_ms: millis(answer.fresh_for),
            stale_for_ms: millis(answer.stale_for),
            epoch: fill.epoch,
            bill24_code: answer.bill24_code,
            content_type: Bytes::copy_from_slice(answer.content_type.as_bytes()),
            body: answer.body,
        };
        let sealed = seal::seal_entry(
            &self.secrets,
            &self.keys.entry(fill.hex),
            fill.code,
            &stored,
        );
        Finish::Store {
            sealed,
            expires_at_ms: now.saturating_add(left),
        }
    }

    /// Stores (or not) and releases the lock in the background, then says so on the channel:
    /// `fill` after a store, `failed` when the lock was this fill's and nothing was stored.
    /// `held`: the lock is known to be this fill's.
    ///
    /// The receiver resolves once the store (or release) is done, before the message: the
    /// holder's caller waits for it (at most `redis.timeout`), so a request that follows the
    /// answer anywhere in the fleet finds the entry.
    fn finish(
        &self,
        fill: &KeyFill<'_>,
        finish: Finish,
        held: bool,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (done, stored) = tokio::sync::oneshot::channel();
        let Some(fleet) = self.me.upgrade() else {
            return stored;
        };
        let hex = fill.hex.to_owned();
        let value = fill.value.clone();
        tokio::spawn(async move {
            let entry_key = fleet.keys.entry(&hex);
            let lock_key = fleet.keys.fill(&hex);
            match finish {
                Finish::Store {
                    sealed,
                    expires_at_ms,
                } => {
                    let script = Script::new(STORE_AND_RELEASE);
                    let at = expires_at_ms.to_string();
                    let stored: Result<i64, _> = fleet
                        .link
                        .call_anyway("set", |c| async move {
                            c.script(
                                &script,
                                &[&entry_key, &lock_key],
                                &[&sealed, at.as_bytes(), value.as_bytes()],
                            )
                            .await
                        })
                        .await;
                    let _ = done.send(());
                    if stored.is_ok() {
                        let _ = fleet.publish_anyway(format!("fill {hex}")).await;
                    }
                }
                Finish::Release => {
                    let script = Script::new(RELEASE);
                    let released: Result<i64, _> = fleet
                        .link
                        .call_anyway("unlock", |c| async move {
                            c.script(&script, &[&lock_key], &[value.as_bytes()]).await
                        })
                        .await;
                    let _ = done.send(());
                    if held && released == Ok(1) {
                        let _ = fleet.publish_anyway(format!("failed {hex}")).await;
                    }
                }
            }
        });
        stored
    }

    /// Stores an answer fetched without the lock, in the background.
    fn store_unlocked(&self, hex: &str, sealed: Vec<u8>, expires_at_ms: u64) {
        let Some(fleet) = self.me.upgrade() else {
            return;
        };
        let key = self.keys.entry(hex);
        tokio::spawn(async move {
            let _: Result<(), _> = fleet
                .link
                .call("set", |c| {
                    c.query(
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(sealed)
                            .arg("PXAT")
                            .arg(expires_at_ms)
                            .clone(),
                    )
                })
                .await;
        });
    }
}

/// The renewal loop never ends on its own.
fn unreachable_renew() -> Called {
    Called {
        result: Err(Failure {
            error: bill24::UpstreamError::Unreachable,
            upstream_status: None,
            elapsed: None,
        }),
        share: None,
    }
}

/// An answer for a stored entry with `ttl_ms` left in Redis: its age is what it has lived of
/// its lifetime. `None` for an entry whose expiry is not one it was stored with (none at all,
/// or pushed back) or whose Content-Type does not parse.
fn to_answer(stored: StoredEntry, ttl_ms: i64) -> Option<SharedAnswer> {
    let left = Duration::from_millis(u64::try_from(ttl_ms).ok()?);
    let fresh_for = Duration::from_millis(stored.fresh_for_ms);
    let stale_for = Duration::from_millis(stored.stale_for_ms);
    let lifetime = fresh_for + stale_for;
    if left > lifetime + EXPIRY_SLACK {
        return None;
    }
    Some(SharedAnswer {
        content_type: HeaderValue::from_maybe_shared(stored.content_type).ok()?,
        body: stored.body,
        bill24_code: SmolStr::new(&stored.bill24_code),
        age: lifetime.saturating_sub(left),
        fresh_for,
        stale_for,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(fresh_ms: u64, stale_ms: u64) -> StoredEntry {
        StoredEntry {
            stored_at_ms: 0,
            fresh_for_ms: fresh_ms,
            stale_for_ms: stale_ms,
            epoch: 0,
            bill24_code: SmolStr::new_static("000"),
            content_type: Bytes::from_static(b"application/json"),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn age_is_the_lifetime_redis_has_counted_down() {
        let a = to_answer(stored(4_000, 6_000), 7_000).expect("answer");
        assert_eq!(a.age, Duration::from_secs(3));
        assert!(a.is_fresh());
        let a = to_answer(stored(4_000, 6_000), 5_999).expect("answer");
        assert_eq!(a.age, Duration::from_millis(4_001));
        assert!(!a.is_fresh() && !a.is_expired());
        let a = to_answer(stored(4_000, 0), 4_800).expect("within the slack");
        assert_eq!(a.age, Duration::ZERO);
    }

    #[test]
    fn an_expiry_it_was_not_stored_with_is_refused() {
        assert!(
            to_answer(stored(4_000, 0), -1).is_none(),
            "no expiry (PERSIST)"
        );
        assert!(to_answer(stored(4_000, 0), -2).is_none(), "gone");
        assert!(
            to_answer(stored(4_000, 0), 5_001).is_none(),
            "pushed back past its lifetime"
        );
    }
}
