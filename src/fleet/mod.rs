//! The fleet's shared tier (CONTRACT §10): many replicas act toward Bill24 as one gateway
//! through Redis / Valkey, standalone or Cluster. It is the second cache tier behind
//! [`crate::tier::Tier`]; it knows nothing of the balance service, and tells it what to drop
//! through the [`Invalidate`] callback it is given.
//!
//! By concern:
//! - [`conn`]: the connection and its health — every call has its own deadline
//!   (`redis.timeout`); after consecutive failures the tier is marked down and skipped (requests
//!   go on as without Redis: L1, own coalescing, own token) until a probe succeeds.
//! - [`seal`]: what is stored, authenticated (entries) and encrypted (the token).
//! - [`fill`]: one fill per key across replicas — read-through, the fill lock, the wait with
//!   its named outcome, the store and the publish.
//! - [`events`]: the channel (fill outcomes, purges, token changes) and the purge epoch.
//! - [`token`]: the one merchant token, for the Bill24 client's token manager.
//! - [`registry`]: the fleet's view of itself — each replica's record and heartbeat, the
//!   replicas alive (`GET /fleet`), and the last fleet size seen ([`Fleet::size`]).
//!
//! **One clock.** An entry's age is read from Redis's clock, never from a replica's: it is
//! stored to expire at a moment in Redis time (`SET … PXAT`), and a read returns its remaining
//! time (`PTTL`) in the same round trip. A replica whose clock is off by any amount serves no
//! entry older than its TTL, and its `Age` is the fleet's.
//!
//! Keys (one merchant's fleet: `<key_prefix>:<client_id>:`), the hash tag grouping one
//! customer's keys, never the whole fleet's:
//! `P:C:{<hex code>}:entry`, `P:C:{<hex code>}:fill`, `P:C:token`, `P:C:token:lock`,
//! `P:C:epoch`, `P:C:fleet` (a hash: one field per replica); messages on the channel
//! `P:C:events`.

mod conn;
mod events;
mod fill;
mod limits;
mod registry;
pub(crate) mod seal;
mod token;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bill24::fleet::CircuitNews;
use tokio::sync::watch;

use crate::config::{RedisConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::tier::Invalidate;
use conn::Link;
use events::{Epoch, Waits};
pub(crate) use limits::{CallerRates, FleetGuard};
pub(crate) use registry::{Membership, Presence, View};
pub(crate) use token::TokenShare;

/// The key names of one merchant's fleet.
struct Names {
    base: String,
}

impl Names {
    fn entry(&self, hex: &str) -> String {
        format!("{}{{{hex}}}:entry", self.base)
    }

    fn fill(&self, hex: &str) -> String {
        format!("{}{{{hex}}}:fill", self.base)
    }

    fn epoch(&self) -> String {
        format!("{}epoch", self.base)
    }

    fn token(&self) -> String {
        format!("{}token", self.base)
    }

    fn token_lock(&self) -> String {
        format!("{}token:lock", self.base)
    }

    fn channel(&self) -> String {
        format!("{}events", self.base)
    }

    fn ceiling(&self) -> String {
        format!("{}ceiling", self.base)
    }

    fn circuit_failures(&self) -> String {
        format!("{}circuit:failures", self.base)
    }

    fn probe_lock(&self) -> String {
        format!("{}circuit:probe", self.base)
    }

    /// A caller's fleet-wide rate (its name in hex: any name makes a valid key, no hash tag).
    fn caller(&self, name: &str) -> String {
        format!("{}caller:{}", self.base, hex::encode(name.as_bytes()))
    }

    fn fleet(&self) -> String {
        format!("{}fleet", self.base)
    }
}

/// The shared tier of one gateway replica.
pub(crate) struct Fleet {
    link: Arc<Link>,
    keys: Names,
    secrets: seal::Keys,
    /// How long a waiter waits for a live holder's fill at most: every attempt of one Bill24
    /// call and the backoffs between them.
    fill_ttl: Duration,
    /// A fill lock's lifetime, renewed by its holder while its call runs: a lock whose holder
    /// died, or that was set by a command the holder gave up on, is gone this soon.
    lease: Duration,
    token_ttl: Duration,
    /// This replica's token lock value (a lock is released only by its holder).
    lock_id: String,
    invalidate: Invalidate,
    waits: Waits,
    epoch: Epoch,
    token_version: watch::Sender<u64>,
    /// What other replicas' circuits did.
    circuit_news: watch::Sender<CircuitNews>,
    /// Replicas alive at the last heartbeat, this one included (0 before the first).
    replicas: AtomicUsize,
    /// Itself, for the background work a fill leaves behind (store, release, publish).
    me: Weak<Fleet>,
}

/// Milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn hex_code(code: &str) -> String {
    hex::encode(code.as_bytes())
}

impl Fleet {
    /// Builds the tier and starts its subscription; connections are made in the background,
    /// so a Redis that is down at start delays nothing. Must be called within a runtime.
    pub(crate) fn start(
        cfg: &RedisConfig,
        upstream: &UpstreamConfig,
        metrics: Arc<Metrics>,
        invalidate: Invalidate,
    ) -> Result<Arc<Self>, String> {
        let link = Link::start(cfg, metrics)?;
        // One fill: every attempt, the backoffs between them, and a little more.
        let attempts = upstream.retries.saturating_add(1);
        let fill_ttl = upstream.timeout * attempts
            + Duration::from_millis(250) * upstream.retries
            + Duration::from_secs(1);
        // A refresh token, then a full authorize, and the Redis calls around them.
        let token_ttl = upstream.timeout * 2 + cfg.timeout * 4 + Duration::from_secs(1);
        let lease = (cfg.timeout * 4).max(Duration::from_millis(200));
        let fleet = Arc::new_cyclic(|me| Fleet {
            link,
            keys: Names {
                base: format!("{}:{}:", cfg.key_prefix, upstream.client_id),
            },
            secrets: seal::Keys::derive(
                &upstream.merchant_token,
                &upstream.client_id,
                &upstream.client_secret,
            ),
            fill_ttl,
            lease,
            token_ttl,
            lock_id: hex::encode(rand::random::<[u8; 16]>()),
            invalidate,
            waits: Waits::new(16),
            epoch: Epoch::default(),
            token_version: watch::Sender::new(0),
            circuit_news: watch::Sender::new(CircuitNews::None),
            replicas: AtomicUsize::new(0),
            me: me.clone(),
        });
        tokio::spawn(events::subscribe(fleet.clone()));
        tokio::spawn(events::watch_epoch(fleet.clone()));
        Ok(fleet)
    }

    fn metrics(&self) -> &Metrics {
        &self.link.metrics
    }
}
