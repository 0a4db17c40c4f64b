//! The fleet's view of itself (CONTRACT §13): each replica registers in Redis and says every
//! second that it is alive; `GET /fleet` lists the replicas alive, with each one's Redis and
//! circuit state and whether its config agrees with the others'.
//!
//! **One key, one clock.** The fleet is one hash, `P:C:fleet` (one slot, so a Redis Cluster
//! holds it on one node): field = a replica's id, value = its record (JSON) stamped with the
//! moment Redis received it (`seen_ms`, Redis's `TIME`, set inside the script: the replicas'
//! clocks never enter). Each heartbeat is one script: stamp and store this replica's record,
//! drop the records not stamped for [`GONE_AFTER`] by the same clock, return the rest and the
//! time. So a replica killed outright is gone from every view within five seconds, whoever
//! looks. A replica that stops cleanly removes its record at once.
//!
//! Heartbeats go through [`Link::call`](super::conn::Link::call): within `redis.timeout`, and
//! skipped while the tier is down. No request ever waits on one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bill24::Bill24;
use bill24::circuit::CircuitState;
use redis::Script;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::{Fleet, millis};

/// How often a replica says it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A replica not heard from for this long is gone.
const GONE_AFTER: Duration = Duration::from_secs(5);
/// The hash outlives its newest record by this much: a fleet that stopped leaves nothing.
const KEY_TTL: Duration = Duration::from_secs(60);
/// Replicas listed at most (a hash filled by someone else does not make `/fleet` unbounded).
const MAX_LISTED: usize = 1_000;

/// Stamps and stores this replica's record (`ARGV[2]`, a JSON object) under its id
/// (`ARGV[1]`), drops every record stamped more than `ARGV[3]` ms ago (or as far ahead: a
/// Cluster node whose clock is behind the one it took over from), and anything that is not a
/// record; keeps the hash `ARGV[4]` ms, and returns Redis's time (ms) and the records alive.
const BEAT: &str = "local t = redis.call('TIME') \
                    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
                    redis.call('HSET', KEYS[1], ARGV[1], string.sub(ARGV[2], 1, -2) .. \
                      ',\"seen_ms\":' .. string.format('%.0f', now) .. '}') \
                    redis.call('PEXPIRE', KEYS[1], ARGV[4]) \
                    local all = redis.call('HGETALL', KEYS[1]) \
                    local alive = {} \
                    for i = 1, #all, 2 do \
                      local ok, r = pcall(cjson.decode, all[i + 1]) \
                      local seen = ok and type(r) == 'table' and tonumber(r['seen_ms']) \
                      if seen and math.abs(now - seen) <= tonumber(ARGV[3]) then \
                        alive[#alive + 1] = all[i + 1] \
                      else \
                        redis.call('HDEL', KEYS[1], all[i]) \
                      end \
                    end \
                    return {now, alive}";
static BEAT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(BEAT));

/// The circuit breaker's state as `/fleet` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl From<CircuitState> for Circuit {
    fn from(state: CircuitState) -> Self {
        match state {
            CircuitState::Closed => Circuit::Closed,
            CircuitState::Open => Circuit::Open,
            CircuitState::HalfOpen => Circuit::HalfOpen,
        }
    }
}

/// What a replica publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    id: String,
    version: String,
    /// RFC 3339, UTC.
    started_at: String,
    /// The main listener's bound address.
    listen: String,
    /// [`crate::config::Config::fleet_digest`] of the config in effect.
    config_digest: String,
    redis_up: bool,
    circuit: Circuit,
}

/// A record as read back: the member and when Redis last heard from it.
#[derive(Debug, Deserialize)]
struct Heard {
    #[serde(flatten)]
    member: Member,
    seen_ms: u64,
}

/// This replica, as it presents itself to the fleet (and to `/fleet` without one).
pub(crate) struct Presence {
    id: String,
    started_at: String,
    listen: String,
    /// Follows reloads ([`crate::Reloader`] stores the new digest).
    digest: Arc<ArcSwap<String>>,
    bill24: Arc<Bill24>,
}

impl Presence {
    /// A new replica id (random per process), started now.
    pub(crate) fn new(
        listen: SocketAddr,
        digest: Arc<ArcSwap<String>>,
        bill24: Arc<Bill24>,
    ) -> Self {
        let now = clock::now_utc();
        // To the millisecond: finer says nothing about when a process started.
        let now = now.replace_millisecond(now.millisecond()).unwrap_or(now);
        Presence {
            id: hex::encode(rand::random::<[u8; 8]>()),
            started_at: now.format(&Rfc3339).unwrap_or_default(),
            listen: listen.to_string(),
            digest,
            bill24,
        }
    }

    fn member(&self, redis_up: bool) -> Member {
        Member {
            id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: self.started_at.clone(),
            listen: self.listen.clone(),
            config_digest: self.digest.load().as_ref().clone(),
            redis_up,
            circuit: self.bill24.circuit_state().into(),
        }
    }
}

/// One replica in `/fleet`.
#[derive(Debug, Serialize)]
pub(crate) struct Listed {
    #[serde(flatten)]
    member: Member,
    /// Its digest is the one most replicas have (on a tie, this replica's).
    config_matches: bool,
    /// Since Redis last heard from it, by Redis's clock.
    last_seen_ms: u64,
}

/// The answer of `GET /fleet`.
#[derive(Debug, Serialize)]
pub(crate) struct View {
    /// The id of the replica that answers.
    replica: String,
    replicas: Vec<Listed>,
    /// Whether Redis answered: without it, only this replica is listed.
    redis_up: bool,
}

impl View {
    /// This replica alone: no `[redis]`, or Redis not answering.
    pub(crate) fn alone(me: &Presence) -> View {
        View {
            replica: me.id.clone(),
            replicas: vec![Listed {
                member: me.member(false),
                config_matches: true,
                last_seen_ms: 0,
            }],
            redis_up: false,
        }
    }

    /// The replicas Redis holds, as of `now` (Redis's time, ms); this replica among them.
    fn of(me: &Presence, now: u64, heard: Vec<Heard>) -> View {
        let mut listed: Vec<Listed> = heard
            .into_iter()
            .map(|h| Listed {
                last_seen_ms: now.saturating_sub(h.seen_ms),
                member: h.member,
                config_matches: false,
            })
            .collect();
        if !listed.iter().any(|l| l.member.id == me.id) {
            listed.push(Listed {
                member: me.member(true),
                config_matches: false,
                last_seen_ms: 0,
            });
        }
        let mine = me.digest.load();
        let agreed = agreed_digest(
            listed.iter().map(|l| l.member.config_digest.as_str()),
            mine.as_str(),
        );
        for l in &mut listed {
            l.config_matches = l.member.config_digest == agreed;
        }
        listed.sort_by(|a, b| {
            (&a.member.started_at, &a.member.id).cmp(&(&b.member.started_at, &b.member.id))
        });
        View {
            replica: me.id.clone(),
            replicas: listed,
            redis_up: true,
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        // Strings, numbers and booleans only: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// The digest most replicas have; on a tie, `mine` when it is among the most common (else the
/// smallest of them, so every replica of a split fleet names the same one).
fn agreed_digest<'a>(digests: impl Iterator<Item = &'a str>, mine: &'a str) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for d in digests {
        *counts.entry(d).or_default() += 1;
    }
    let most = counts.values().copied().max().unwrap_or(0);
    if counts.get(mine).copied().unwrap_or(0) == most {
        return mine.to_string();
    }
    counts
        .into_iter()
        .find(|(_, n)| *n == most)
        .map(|(d, _)| d.to_string())
        .unwrap_or_else(|| mine.to_string())
}

/// This replica's place in the fleet: its heartbeats, until it leaves.
pub(crate) struct Membership {
    fleet: Arc<Fleet>,
    me: Arc<Presence>,
    heartbeats: JoinHandle<()>,
}

impl Membership {
    /// Stops the heartbeats and removes this replica's record (a clean stop: it is gone from
    /// every view at once, not after [`GONE_AFTER`]).
    pub(crate) async fn leave(self) {
        self.heartbeats.abort();
        let key = self.fleet.keys.fleet();
        let id = self.me.id.clone();
        let _: Result<i64, _> = self
            .fleet
            .link
            .call_anyway("heartbeat", |c| {
                c.query(redis::cmd("HDEL").arg(&key).arg(&id).clone())
            })
            .await;
    }
}

impl Fleet {
    /// The last fleet size this replica saw, itself included (at least 1): the N that
    /// fleet-wide limits divide by while Redis is down.
    pub(crate) fn size(&self) -> usize {
        self.replicas.load(Ordering::Acquire).max(1)
    }

    /// Registers this replica and keeps it registered: a heartbeat every second.
    pub(crate) fn join(self: &Arc<Self>, me: Arc<Presence>) -> Membership {
        let heartbeats = tokio::spawn({
            let fleet = self.clone();
            let me = me.clone();
            async move {
                // A replica that has just started registers as soon as it is connected.
                fleet.link.ready(Duration::from_secs(2)).await;
                let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    fleet.beat(&me).await;
                }
            }
        });
        Membership {
            fleet: self.clone(),
            me,
            heartbeats,
        }
    }

    /// The fleet as Redis holds it now (this replica's record refreshed on the way), or this
    /// replica alone when Redis does not answer.
    pub(crate) async fn view(&self, me: &Presence) -> View {
        match self.beat(me).await {
            Some((now, heard)) => View::of(me, now, heard),
            None => View::alone(me),
        }
    }

    /// One heartbeat: Redis's time and the records alive, or `None` when Redis was not asked
    /// or did not answer.
    async fn beat(&self, me: &Presence) -> Option<(u64, Vec<Heard>)> {
        let record = serde_json::to_string(&me.member(self.link.is_up())).ok()?;
        let key = self.keys.fleet();
        let gone_after = millis(GONE_AFTER).to_string();
        let key_ttl = millis(KEY_TTL).to_string();
        let (now, records): (u64, Vec<Vec<u8>>) = self
            .link
            .call("heartbeat", |c| async move {
                c.script(
                    &BEAT_SCRIPT,
                    &[&key],
                    &[
                        me.id.as_bytes(),
                        record.as_bytes(),
                        gone_after.as_bytes(),
                        key_ttl.as_bytes(),
                    ],
                )
                .await
            })
            .await
            .ok()?;
        let heard: Vec<Heard> = records
            .iter()
            .filter_map(|r| serde_json::from_slice(r).ok())
            .take(MAX_LISTED)
            .collect();
        self.replicas.store(heard.len(), Ordering::Release);
        self.metrics().set_fleet_replicas(self.size());
        Some((now, heard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agreed_digest_is_the_most_common_and_ties_go_to_this_replica() {
        let agreed =
            |all: &[&'static str], mine: &'static str| agreed_digest(all.iter().copied(), mine);
        assert_eq!(agreed(&["a", "a", "b"], "b"), "a");
        assert_eq!(agreed(&["a", "a", "b"], "a"), "a");
        assert_eq!(agreed(&["a", "b"], "b"), "b", "a tie: this replica's");
        assert_eq!(agreed(&["a", "b"], "a"), "a");
        assert_eq!(agreed(&["c", "b", "a"], "c"), "c");
        // This replica's digest not among the most common ones: the same choice everywhere.
        assert_eq!(agreed(&["b", "b", "a", "a", "c"], "c"), "a");
        assert_eq!(agreed(&[], "a"), "a");
    }

    #[test]
    fn records_read_back_with_their_stamp() {
        let member = Member {
            id: "0123456789abcdef".into(),
            version: "0.1.0".into(),
            started_at: "2026-01-02T03:04:05Z".into(),
            listen: "127.0.0.1:8080".into(),
            config_digest: "00ff00ff00ff00ff".into(),
            redis_up: true,
            circuit: Circuit::HalfOpen,
        };
        let json = serde_json::to_string(&member).expect("json");
        assert!(
            json.ends_with('}'),
            "the script splices the stamp before the last brace"
        );
        assert!(json.contains("\"circuit\":\"half_open\""), "{json}");
        // What the script stores.
        let stored = format!("{},\"seen_ms\":1767323045123}}", &json[..json.len() - 1]);
        let heard: Heard = serde_json::from_str(&stored).expect("read back");
        assert_eq!(heard.member, member);
        assert_eq!(heard.seen_ms, 1_767_323_045_123);
        // Not records: skipped, never a panic.
        for junk in [
            "",
            "{}",
            "null",
            "[1,2]",
            "{\"seen_ms\":\"x\"}",
            &stored.replace("half_open", "ajar"),
            &stored.replace("1767323045123", "-1"),
            &"{".repeat(10_000),
        ] {
            assert!(serde_json::from_str::<Heard>(junk).is_err(), "{junk:.40}");
        }
    }
}
