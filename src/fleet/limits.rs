//! The fleet's limits in bad times (CONTRACT §13): one ceiling on Bill24 balance calls, one
//! circuit, and callers' rates counted over every replica together.
//!
//! - **Ceiling and caller rates** are GCRA buckets in Redis ([`GCRA`]: one atomic step per
//!   call, on Redis's clock). A step reserves a place in line: the ceiling's callers wait their
//!   turn (in the order Redis saw them, never past `queue_timeout`); a caller's request over
//!   its rate is refused with the time until it would conform.
//! - **The circuit**: an opening is published (`circuit-open <ms>`) and every replica opens for
//!   that cool-down; a cooled-down circuit's probe is sent by the one replica that takes the
//!   probe lock; its outcome (`circuit-closed`, or another opening) reaches all.
//! - **Redis down**: each limit falls back to this replica alone at its share — the ceiling to
//!   `fleet_max_rps / N`, a caller to `rate_limit_rps / N`, N the fleet's size as last seen —
//!   and the circuit to the local one. Never to no limit; never a failed request because of
//!   Redis. Logged once when it starts and once when it ends.
//! - **The switch gives no new burst.** Going alone, a replica's bucket starts where the
//!   shared line stood at its last place in it (places already handed out are still used);
//!   back on Redis, its first step moves the shared line to where its own stood, plus a
//!   whole tolerance (Redis's bucket may be empty after a restart, or its line long past).
//!   So the fleet's count over any window stays within `rate × T + burst` across the
//!   switches, not one more burst (and queue) for each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bill24::fleet::{CircuitNews, FleetHooks, NoSlot};
use futures_util::future::BoxFuture;
use redis::Script;
use tokio::sync::watch;
use tokio::time::Instant;

use super::conn::CallError;
use super::{Fleet, millis};
use crate::caller::FleetRate;

/// One GCRA step on Redis's clock (microseconds). `ARGV`: emission interval, tolerance (burst
/// − 1 intervals), the longest wait a caller accepts, and a floor: the line is moved to at
/// least that long from now first (0: not moved; kept even when no place is reserved).
/// Returns the wait before the reserved place (≥ 0), or `-(1 + ms-ish retry)` when the wait
/// would be longer than accepted (nothing reserved then).
const GCRA: &str = "local t = redis.call('TIME') \
                    local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
                    local interval = tonumber(ARGV[1]) \
                    local tolerance = tonumber(ARGV[2]) \
                    local max_wait = tonumber(ARGV[3]) \
                    local tat = tonumber(redis.call('GET', KEYS[1]) or '0') \
                    if tat < now then tat = now end \
                    local floor = now + tonumber(ARGV[4]) \
                    local moved = tat < floor \
                    if moved then tat = floor end \
                    local wait = tat - tolerance - now \
                    if wait < 0 then wait = 0 end \
                    local new = tat \
                    if wait <= max_wait then new = tat + interval end \
                    if moved or wait <= max_wait then \
                      redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', \
                        math.ceil((new - now) / 1000) + 1000) \
                    end \
                    if wait > max_wait then return -1 - (wait - max_wait) end \
                    return wait";

/// How long a replica back on the shared bucket also keeps to its own share: the other
/// replicas' probes find Redis again within their backoff.
const RETURN_GRACE: Duration = super::conn::MAX_BACKOFF.saturating_mul(2);

/// Counts a failure for the fleet: the count within a cool-down.
const COUNT_FAILURE: &str = "local n = redis.call('INCR', KEYS[1]) \
                             if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
                             return n";

/// What a step gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A place, after this wait.
    Wait(Duration),
    /// None within the accepted wait; this much longer would have been needed.
    Refused(Duration),
}

/// `rps` per second with bursts of `burst` (0: one second's worth, at least 1): the
/// emission interval and the tolerance.
fn bucket(rps: f64, burst: u32) -> (Duration, Duration) {
    let interval = Duration::from_secs_f64(1.0 / rps.max(1e-6)).max(Duration::from_nanos(1));
    let burst = crate::config::burst_at(rps, burst);
    (interval, interval * burst.saturating_sub(1))
}

/// The same bucket on this replica alone (on tokio's clock), and where this replica's last
/// place in the shared line was.
#[derive(Debug, Default)]
struct LocalGcra {
    tat: Mutex<Option<Instant>>,
    /// This replica's last place in this bucket's line, and in the shared one.
    local_place: Mutex<Option<Instant>>,
    /// When this replica last heard from the shared line, and how far ahead it reached then.
    shared_line: Mutex<Option<(Instant, Duration)>>,
    /// This bucket stands in for the shared one now.
    alone: AtomicBool,
    /// When this bucket last handed back to the shared one.
    back_at: Mutex<Option<Instant>>,
}

impl LocalGcra {
    /// Going alone (when it was not yet): no place before the one after the shared line's
    /// last one known here, and no burst (a line this replica never took part in starts as a
    /// new one).
    fn go_alone(&self, (interval, tolerance): (Duration, Duration)) {
        if self.alone.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = Instant::now();
        // A full line reaches about as far ahead however late it is (each second hands out as
        // many places as it adds): taken as still that far ahead within a second of hearing
        // from it, as that far from then after.
        let from = match *lock(&self.shared_line) {
            Some((at, ahead)) if now.duration_since(at) < Duration::from_secs(1) => now + ahead,
            Some((at, ahead)) => (at + ahead).max(now),
            // Never heard from it: nothing known to carry on from.
            None => return,
        };
        let mut tat = lock(&self.tat);
        let held = from + tolerance + interval;
        if tat.is_none_or(|t| t < held) {
            *tat = Some(held);
        }
    }

    /// How far ahead of now this replica's last place in this bucket's line is.
    fn ahead(&self) -> Duration {
        lock(&self.local_place).map_or(Duration::ZERO, |p| {
            p.saturating_duration_since(Instant::now())
        })
    }

    /// The shared line reaches `ahead` from now.
    fn placed(&self, ahead: Duration) {
        *lock(&self.shared_line) = Some((Instant::now(), ahead));
    }

    fn step(&self, interval: Duration, tolerance: Duration, max_wait: Duration) -> Step {
        let now = Instant::now();
        let mut tat = lock(&self.tat);
        let at = tat.filter(|t| *t > now).unwrap_or(now);
        let wait = at.checked_sub(tolerance).map_or(Duration::ZERO, |conform| {
            conform.saturating_duration_since(now)
        });
        if wait > max_wait {
            return Step::Refused(wait - max_wait);
        }
        *tat = Some(at + interval);
        *lock(&self.local_place) = Some(now + wait);
        Step::Wait(wait)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a limit runs alone now, logged once when that starts and once when it ends.
#[derive(Debug, Default)]
struct Alone(AtomicBool);

impl Alone {
    fn set(&self, alone: bool, what: &'static str, share: usize) {
        if self.0.swap(alone, Ordering::AcqRel) != alone {
            if alone {
                tracing::warn!(
                    limit = what,
                    replicas = share,
                    "the shared tier cannot be asked: this replica enforces its share of the \
                     fleet's limit alone"
                );
            } else {
                tracing::info!(limit = what, "the fleet's limit is shared again");
            }
        }
    }
}

impl Fleet {
    /// One step of the bucket at `key`.
    async fn gcra(
        &self,
        op: &'static str,
        key: &str,
        (interval, tolerance): (Duration, Duration),
        max_wait: Duration,
        floor: Duration,
    ) -> Result<Step, CallError> {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).to_string();
        let args = [
            micros(interval),
            micros(tolerance),
            micros(max_wait),
            micros(floor),
        ];
        let script = Script::new(GCRA);
        let answer: i64 = self
            .link
            .call(op, |c| {
                let args = args.each_ref().map(|a| a.as_bytes());
                async move { c.script(&script, &[key], &args).await }
            })
            .await?;
        Ok(if answer >= 0 {
            Step::Wait(Duration::from_micros(answer.unsigned_abs()))
        } else {
            Step::Refused(Duration::from_micros((-1 - answer).unsigned_abs()))
        })
    }
}

/// One fleet-wide bucket and what stands in for it while Redis cannot be asked.
struct Shared<'a> {
    /// The Redis call's name in the metrics.
    op: &'static str,
    /// The setting it enforces, for the log.
    setting: &'static str,
    key: &'a str,
    local: &'a LocalGcra,
    alone: &'a Alone,
}

impl Fleet {
    /// One step of a fleet-wide bucket of `rps` / `burst` (0: one second's worth) in Redis;
    /// while Redis cannot be asked, of this replica's share of it (`rps / N`, `burst / N`
    /// rounded up; N the fleet's size as last seen).
    async fn shared_step(
        &self,
        bucket_at: Shared<'_>,
        (rps, burst): (f64, u32),
        max_wait: Duration,
    ) -> Step {
        let Shared {
            op,
            setting,
            key,
            local,
            alone,
        } = bucket_at;
        let shared = bucket(rps, burst);
        // Back from alone: the shared line's next place comes after this replica's own last
        // one, with no burst in hand.
        let floor = if local.alone.load(Ordering::Acquire) {
            local.ahead() + shared.1 + shared.0
        } else {
            Duration::ZERO
        };
        let share = |n: usize| {
            let burst = (burst as usize).div_ceil(n) as u32;
            bucket(rps / n as f64, burst)
        };
        match self.gcra(op, key, shared, max_wait, floor).await {
            Ok(step) => {
                alone.set(false, setting, 1);
                if local.alone.swap(false, Ordering::AcqRel) {
                    *lock(&local.back_at) = Some(Instant::now());
                }
                // Where the shared line ends, as Redis said: this place, or past the longest
                // wait accepted.
                local.placed(match step {
                    Step::Wait(wait) => wait,
                    Step::Refused(more) => max_wait + more,
                });
                // The other replicas come back within a probe's backoff of this one; until
                // then some may still be alone at their share, so this one keeps to its share
                // too (the stricter of the two places).
                if lock(&local.back_at).is_some_and(|at| at.elapsed() < RETURN_GRACE) {
                    let (interval, tolerance) = share(self.size());
                    return match (step, local.step(interval, tolerance, max_wait)) {
                        (Step::Wait(a), Step::Wait(b)) => Step::Wait(a.max(b)),
                        (Step::Refused(a), Step::Refused(b)) => Step::Refused(a.max(b)),
                        (Step::Refused(more), _) | (_, Step::Refused(more)) => Step::Refused(more),
                    };
                }
                step
            }
            Err(_) => {
                let n = self.size();
                let (interval, tolerance) = share(n);
                alone.set(true, setting, n);
                local.go_alone((interval, tolerance));
                local.step(interval, tolerance, max_wait)
            }
        }
    }
}

/// The ceiling and the circuit, for the Bill24 client.
pub(crate) struct FleetGuard {
    fleet: Arc<Fleet>,
    /// `upstream.fleet_max_rps`; 0 = no ceiling.
    max_rps: f64,
    circuit: bool,
    local: LocalGcra,
    alone: Alone,
    /// This replica counted failures for the fleet since the last success it saw.
    counting: AtomicBool,
}

impl FleetGuard {
    pub(crate) fn new(fleet: Arc<Fleet>, max_rps: f64, circuit: bool) -> Arc<Self> {
        Arc::new(FleetGuard {
            fleet,
            max_rps,
            circuit,
            local: LocalGcra::default(),
            alone: Alone::default(),
            counting: AtomicBool::new(false),
        })
    }

    fn publish_soon(&self, message: String) {
        let Some(fleet) = self.fleet.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            fleet.publish(message).await;
        });
    }
}

impl FleetHooks for FleetGuard {
    fn reserve(&self, within: Duration) -> BoxFuture<'_, Result<Duration, NoSlot>> {
        Box::pin(async move {
            if self.max_rps <= 0.0 {
                return Ok(Duration::ZERO);
            }
            let key = self.fleet.keys.ceiling();
            let step = self
                .fleet
                .shared_step(
                    Shared {
                        op: "ceiling",
                        setting: "upstream.fleet_max_rps",
                        key: &key,
                        local: &self.local,
                        alone: &self.alone,
                    },
                    (self.max_rps, 0),
                    within,
                )
                .await;
            match step {
                Step::Wait(wait) => {
                    self.fleet.metrics().fleet_limit_wait(wait);
                    Ok(wait)
                }
                Step::Refused(_) => Err(NoSlot),
            }
        })
    }

    fn failed(&self, threshold: u32, cooldown: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            if !self.circuit {
                return false;
            }
            self.counting.store(true, Ordering::Release);
            let key = self.fleet.keys.circuit_failures();
            let script = Script::new(COUNT_FAILURE);
            let ttl = millis(cooldown).max(1).to_string();
            let count: Result<i64, _> = self
                .fleet
                .link
                .call("circuit_count", |c| {
                    let key = key.as_str();
                    async move { c.script(&script, &[key], &[ttl.as_bytes()]).await }
                })
                .await;
            // Redis cannot be asked: the local circuit counts alone.
            count.is_ok_and(|n| n >= i64::from(threshold))
        })
    }

    fn succeeded(&self) {
        // Only a replica that counted failures starts the count again: no Redis call for a
        // success in good times.
        if !self.circuit || !self.counting.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(fleet) = self.fleet.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let key = fleet.keys.circuit_failures();
            let _: Result<i64, _> = fleet
                .link
                .call("circuit_count", |c| {
                    c.query(redis::cmd("DEL").arg(&key).clone())
                })
                .await;
        });
    }

    fn circuit_opened(&self, cooldown: Duration) {
        if self.circuit {
            self.publish_soon(format!("circuit-open {}", millis(cooldown)));
        }
    }

    fn circuit_closed(&self) {
        if self.circuit {
            self.publish_soon("circuit-closed".into());
        }
    }

    fn claim_probe(&self, cooldown: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            if !self.circuit {
                return true;
            }
            let key = self.fleet.keys.probe_lock();
            let claimed: Result<Option<String>, _> = self
                .fleet
                .link
                .call("probe_lock", |c| {
                    c.query(
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(&self.fleet.lock_id)
                            .arg("NX")
                            .arg("PX")
                            .arg(millis(cooldown).max(1))
                            .clone(),
                    )
                })
                .await;
            // Redis cannot be asked: the local circuit decides alone.
            !matches!(claimed, Ok(None))
        })
    }

    fn circuit_news(&self) -> watch::Receiver<CircuitNews> {
        self.fleet.circuit_news.subscribe()
    }
}

/// Fleet-scoped callers' rates.
pub(crate) struct CallerRates {
    fleet: Arc<Fleet>,
    local: Mutex<HashMap<String, Arc<LocalGcra>>>,
    alone: Alone,
}

impl CallerRates {
    pub(crate) fn new(fleet: Arc<Fleet>) -> Arc<Self> {
        Arc::new(CallerRates {
            fleet,
            local: Mutex::new(HashMap::new()),
            alone: Alone::default(),
        })
    }

    fn local(&self, caller: &str) -> Arc<LocalGcra> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.entry(caller.to_string()).or_default().clone()
    }
}

impl FleetRate for CallerRates {
    fn admit<'a>(
        &'a self,
        caller: &'a str,
        rps: f64,
        burst: u32,
    ) -> BoxFuture<'a, Result<(), Duration>> {
        Box::pin(async move {
            let key = self.fleet.keys.caller(caller);
            let local = self.local(caller);
            let step = self
                .fleet
                .shared_step(
                    Shared {
                        op: "caller_rate",
                        setting: "callers.rate_limit_rps",
                        key: &key,
                        local: &local,
                        alone: &self.alone,
                    },
                    (rps, burst),
                    Duration::ZERO,
                )
                .await;
            match step {
                Step::Wait(_) => Ok(()),
                Step::Refused(retry_after) => Err(retry_after),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_one_per_interval() {
        assert_eq!(
            bucket(20.0, 0),
            (Duration::from_millis(50), Duration::from_millis(950))
        );
        assert_eq!(
            bucket(10.0, 3),
            (Duration::from_millis(100), Duration::from_millis(200))
        );
        assert_eq!(bucket(0.5, 0), (Duration::from_secs(2), Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_bucket_queues_in_order_and_refuses_past_the_wait() {
        let g = LocalGcra::default();
        let (interval, tolerance) = bucket(10.0, 2);
        let within = Duration::from_millis(250);
        assert_eq!(
            g.step(interval, tolerance, within),
            Step::Wait(Duration::ZERO)
        );
        assert_eq!(
            g.step(interval, tolerance, within),
            Step::Wait(Duration::ZERO)
        );
        assert_eq!(
            g.step(interval, tolerance, within),
            Step::Wait(Duration::from_millis(100))
        );
        assert_eq!(
            g.step(interval, tolerance, within),
            Step::Wait(Duration::from_millis(200))
        );
        assert_eq!(
            g.step(interval, tolerance, within),
            Step::Refused(Duration::from_millis(50)),
            "past the accepted wait: nothing reserved"
        );
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(
            g.step(interval, tolerance, within),
            Step::Wait(Duration::ZERO)
        );
        // A rate limiter accepts no wait.
        let r = LocalGcra::default();
        assert_eq!(
            r.step(interval, tolerance, Duration::ZERO),
            Step::Wait(Duration::ZERO)
        );
        assert_eq!(
            r.step(interval, tolerance, Duration::ZERO),
            Step::Wait(Duration::ZERO)
        );
        assert_eq!(
            r.step(interval, tolerance, Duration::ZERO),
            Step::Refused(Duration::from_millis(100))
        );
    }
}
