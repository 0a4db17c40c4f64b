//! The fleet's shared tier (CONTRACT §10): many replicas act toward Bill24 as one gateway
//! through Redis / Valkey, standalone or Cluster.
//!
//! - **Answers (L2).** An L1 miss reads the customer's entry from Redis before asking Bill24;
//!   entries carry the wall-clock time they were stored, so their age and expiry are the same
//!   on every replica, and they are authenticated ([`seal`]): a tampered, foreign or moved
//!   entry is a miss, counted, never served.
//! - **One fill per key.** The replica that takes the key's fill lock (`SET NX PX`) asks
//!   Bill24, stores the answer and publishes `fill`; the others wait for that message (they
//!   registered before looking at the lock), then read the entry. A lock lives as long as one
//!   fill can take, so a holder that dies delays the others at most that long; a failed fill
//!   stores nothing and each waiter then makes one call of its own.
//! - **One token** ([`TokenShare`]): encrypted in Redis, refreshed under a lock by one replica.
//! - **Purges** delete the entry (or bump the fleet's purge epoch) and publish, and every
//!   replica drops its L1 copies; a replica that lost its subscription drops all of them when
//!   it is back, since it may have missed some.
//! - **Never a single point of failure.** Every call has its own deadline (`redis.timeout`),
//!   whatever the client's reconnect logic is doing; after consecutive failures the tier is
//!   marked down and skipped (requests go on as without Redis: L1, own coalescing, own token)
//!   until a probe succeeds, with backoff. `/readyz` never looks at it.
//!
//! Keys (one merchant's fleet: `<key_prefix>:<client_id>:`), the hash tag grouping one
//! customer's keys, never the whole fleet's:
//! `P:C:{<hex code>}:entry`, `P:C:{<hex code>}:fill`, `P:C:token`, `P:C:token:lock`,
//! `P:C:epoch`; messages on the channel `P:C:events`.

pub mod seal;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bill24::token::{SharedToken, TokenStore, Unavailable};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use http::HeaderValue;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, RedisResult, Script};
use smol_str::SmolStr;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::balance::cache::{BalanceCache, Entry};
use crate::config::{RedisConfig, UpstreamConfig};
use crate::metrics::Metrics;
use seal::{Keys, Rejected, StoredEntry};

/// Consecutive failed calls that mark the tier down.
const FAILURES_TO_DOWN: u32 = 3;
/// The first pause before probing a tier that is down; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Releases a lock only if it still holds this replica's token.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";
/// Stores an entry and releases the key's fill lock, if still ours, in one step (same slot).
const STORE_AND_RELEASE: &str = "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
                                 if redis.call('GET', KEYS[2]) == ARGV[3] then \
                                 redis.call('DEL', KEYS[2]) end return 1";

/// A connection to standalone Redis or to a Cluster (cheap handles, cloned per call).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: FromRedisValue>(mut self, cmd: Cmd) -> RedisResult<T> {
        match &mut self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    async fn script<T: FromRedisValue>(
        mut self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> RedisResult<T> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        match &mut self {
            Conn::Single(c) => invocation.invoke_async(c).await,
            Conn::Cluster(c) => invocation.invoke_async(c).await,
        }
    }
}

/// Up or down, with the backoff before the next probe while down.
struct Health {
    up: AtomicBool,
    failures: AtomicU32,
    /// While down: when the next probe may go, and the pause after that one.
    retry: Mutex<(Instant, Duration)>,
    probing: AtomicBool,
}

impl Health {
    /// Whether a call may go to Redis now: always while up; while down, one probe once the
    /// backoff has passed.
    fn admit(&self) -> bool {
        if self.up.load(Ordering::Acquire) {
            return true;
        }
        let due = self
            .retry
            .lock()
            .map(|r| Instant::now() >= r.0)
            .unwrap_or(true);
        due && !self.probing.swap(true, Ordering::AcqRel)
    }
}

/// Registered fill waits, by key: a `fill` message bumps the key's count and wakes them.
type Waits = Mutex<HashMap<String, Arc<Signal>>>;

/// A count of messages for one key, and the waiters to wake on the next.
#[derive(Default)]
pub struct Signal {
    count: AtomicU64,
    notify: Notify,
}

/// The shared tier of one gateway replica.
pub struct Fleet {
    conn: ArcSwapOption<Conn>,
    /// For the subscription connection (one node of a cluster is enough: plain PUBLISH
    /// reaches every node).
    clients: Vec<redis::Client>,
    health: Health,
    keys: Keys,
    base: String,
    channel: String,
    timeout: Duration,
    fill_ttl: Duration,
    token_ttl: Duration,
    /// This replica's lock token (a random value: a lock is released only by its holder).
    lock_id: String,
    metrics: Arc<Metrics>,
    l1: Arc<BalanceCache>,
    waits: Waits,
    /// The fleet's purge epoch as last seen: entries of older epochs were purged.
    epoch: AtomicU64,
    token_version: watch::Sender<u64>,
    /// True once the first connection attempt is over (whatever its outcome).
    ready: watch::Sender<bool>,
}

/// What an L2 read found.
pub enum Read {
    Found(Arc<Entry>),
    Missing,
    Unavailable,
}

/// What trying a key's fill lock gave.
pub enum FillLock {
    /// This replica fills the key.
    Acquired,
    /// Another replica does: wait for its `fill` message.
    Held,
    Unavailable,
}

fn hex_code(code: &str) -> String {
    hex::encode(code.as_bytes())
}

fn now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Fleet {
    /// Builds the tier and starts its subscription; connections are made in the background,
    /// so a Redis that is down at start delays nothing. Must be called within a runtime.
    pub fn start(
        cfg: &RedisConfig,
        upstream: &UpstreamConfig,
        l1: Arc<BalanceCache>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        // rediss:// needs a process-wide TLS provider (the Bill24 client passes its own);
        // installed once, later calls find it there.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let infos = cfg
            .urls
            .iter()
            .map(|url| {
                let info = url
                    .expose()
                    .into_connection_info()
                    .map_err(|e| format!("redis.urls: {e}"))?;
                let mut redis = info.redis_settings().clone();
                if let Some(user) = &cfg.username {
                    redis = redis.set_username(user);
                }
                if let Some(password) = &cfg.password {
                    redis = redis.set_password(password.expose());
                }
                Ok(info.set_redis_settings(redis))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let clients = infos
            .iter()
            .map(|i| redis::Client::open(i.clone()).map_err(|e| format!("redis.urls: {e}")))
            .collect::<Result<Vec<_>, String>>()?;
        // One fill: every attempt, the backoffs between them, and a little more.
        let attempts = upstream.retries.saturating_add(1);
        let fill_ttl = upstream.timeout * attempts
            + Duration::from_millis(250) * upstream.retries
            + Duration::from_secs(1);
        // A refresh token, then a full authorize, and the Redis calls around them.
        let token_ttl = upstream.timeout * 2 + cfg.timeout * 4 + Duration::from_secs(1);
        let base = format!("{}:{}:", cfg.key_prefix, upstream.client_id);
        let fleet = Arc::new(Fleet {
            conn: ArcSwapOption::empty(),
            clients,
            health: Health {
                up: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                retry: Mutex::new((Instant::now(), FIRST_BACKOFF)),
                probing: AtomicBool::new(false),
            },
            keys: Keys::derive(
                &upstream.merchant_token,
                &upstream.client_id,
                &upstream.client_secret,
            ),
            channel: format!("{base}events"),
            base,
            timeout: cfg.timeout,
            fill_ttl,
            token_ttl,
            lock_id: hex::encode(rand::random::<[u8; 16]>()),
            metrics,
            l1,
            waits: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            token_version: watch::Sender::new(0),
            ready: watch::Sender::new(false),
        });
        fleet.metrics.set_redis_up(false);
        if cfg.cluster {
            let mut builder = ClusterClientBuilder::new(infos)
                .connection_timeout(cfg.timeout.max(Duration::from_millis(500)))
                .response_timeout(cfg.timeout)
                .retries(1);
            if let Some(user) = &cfg.username {
                builder = builder.username(user);
            }
            if let Some(password) = &cfg.password {
                builder = builder.password(password.expose());
            }
            let client = builder.build().map_err(|e| format!("redis.urls: {e}"))?;
            tokio::spawn(connect_cluster(fleet.clone(), client));
        } else {
            let client = fleet
                .clients
                .first()
                .cloned()
                .ok_or("redis.urls is empty")?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout.max(Duration::from_millis(500))))
                .set_response_timeout(Some(cfg.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| format!("redis: {e}"))?;
            fleet.conn.store(Some(Arc::new(Conn::Single(manager))));
            // Down until the first probe connects (at once, in the background).
        }
        tokio::spawn(subscribe(fleet.clone()));
        tokio::spawn(probe(fleet.clone()));
        Ok(fleet)
    }

    /// One Redis call within `redis.timeout`, with its metrics and the tier's health: skipped
    /// while the tier is down (but for a probe), and a failure counted toward marking it down.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.health.admit() {
            self.metrics.redis(op, "skipped", None);
            return Err(Unavailable);
        }
        self.attempt(op, self.timeout, f).await
    }

    /// A call that was admitted (or is the probe).
    async fn attempt<T, F, Fut>(
        &self,
        op: &'static str,
        deadline: Duration,
        f: F,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(conn) = self.conn.load_full() else {
            self.metrics.redis(op, "skipped", None);
            return Err(Unavailable);
        };
        let start = Instant::now();
        let result = tokio::time::timeout(deadline, f((*conn).clone())).await;
        let elapsed = Some(start.elapsed());
        match result {
            Ok(Ok(value)) => {
                self.metrics.redis(op, "ok", elapsed);
                self.succeeded();
                Ok(value)
            }
            Ok(Err(e)) => {
                self.metrics.redis(op, "error", elapsed);
                self.failed(op, &e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.metrics.redis(op, "timeout", elapsed);
                self.failed(op, "no answer within redis.timeout");
                Err(Unavailable)
            }
        }
    }

    fn succeeded(&self) {
        self.health.failures.store(0, Ordering::Release);
        self.health.probing.store(false, Ordering::Release);
        if !self.health.up.swap(true, Ordering::AcqRel) {
            if let Ok(mut retry) = self.health.retry.lock() {
                retry.1 = FIRST_BACKOFF;
            }
            self.metrics.set_redis_up(true);
            tracing::info!("shared tier (Redis) is answering again; sharing resumes");
        }
    }

    fn failed(&self, op: &'static str, error: &str) {
        let failures = self.health.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let was_up = self.health.up.load(Ordering::Acquire);
        let probe_failed = !was_up && self.health.probing.swap(false, Ordering::AcqRel);
        if (was_up && failures >= FAILURES_TO_DOWN) || probe_failed {
            let pause = self
                .health
                .retry
                .lock()
                .map(|mut r| {
                    let pause = r.1;
                    *r = (Instant::now() + pause, (pause * 2).min(MAX_BACKOFF));
                    pause
                })
                .unwrap_or(FIRST_BACKOFF);
            if self.health.up.swap(false, Ordering::AcqRel) {
                self.metrics.set_redis_up(false);
                tracing::warn!(
                    op,
                    error,
                    retry_in_ms = millis(pause),
                    "shared tier (Redis) is failing; going on without it"
                );
            }
        } else if was_up {
            tracing::debug!(op, error, "Redis call failed");
        }
    }

    /// Whether calls currently go to Redis.
    pub fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Acquire)
    }

    /// Waits (at most `within`) for the first connection attempt to be over, so a replica
    /// that has just started asks the fleet before acting on its own.
    pub async fn ready(&self, within: Duration) {
        let mut ready = self.ready.subscribe();
        let _ = tokio::time::timeout(within, ready.wait_for(|r| *r)).await;
    }

    fn entry_key(&self, hex: &str) -> String {
        format!("{}{{{hex}}}:entry", self.base)
    }

    fn fill_key(&self, hex: &str) -> String {
        format!("{}{{{hex}}}:fill", self.base)
    }

    fn epoch_key(&self) -> String {
        format!("{}epoch", self.base)
    }

    fn token_key(&self) -> String {
        format!("{}token", self.base)
    }

    fn token_lock_key(&self) -> String {
        format!("{}token:lock", self.base)
    }

    /// The purge epoch as this replica last saw it.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// One round trip's deadline (`redis.timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long another replica's fill may take.
    pub fn fill_ttl(&self) -> Duration {
        self.fill_ttl
    }

    /// The customer's entry, if there is one that is authentic and not purged.
    pub async fn read(&self, code: &str) -> Read {
        let key = self.entry_key(&hex_code(code));
        let got: Result<Option<Vec<u8>>, _> = self
            .call("get", |c| c.query(redis::cmd("GET").arg(&key).clone()))
            .await;
        let bytes = match got {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Read::Missing,
            Err(Unavailable) => return Read::Unavailable,
        };
        match seal::open_entry(&self.keys, &key, code, &bytes) {
            Ok(stored) if stored.epoch >= self.epoch() => match to_entry(stored) {
                Some(entry) => Read::Found(Arc::new(entry)),
                None => {
                    self.metrics.redis("get", "rejected", None);
                    Read::Missing
                }
            },
            // Written before the last `DELETE /cache`.
            Ok(_) => Read::Missing,
            Err(Rejected) => {
                self.metrics.redis("get", "rejected", None);
                tracing::warn!(
                    customer_sync_code = code,
                    "an entry in the shared tier did not verify; treated as a miss"
                );
                Read::Missing
            }
        }
    }

    /// Registers a wait for the key's `fill` message; make it before looking at the lock, so
    /// a message sent in between is not missed.
    pub fn fill_wait(self: &Arc<Self>, code: &str) -> FillWait {
        let hex = hex_code(code);
        let signal: Arc<Signal> = self
            .waits
            .lock()
            .map(|mut w| w.entry(hex.clone()).or_default().clone())
            .unwrap_or_default();
        FillWait {
            fleet: self.clone(),
            hex,
            seen: signal.count.load(Ordering::Acquire),
            signal,
        }
    }

    /// Tries the key's fill lock.
    pub async fn lock_fill(&self, code: &str) -> FillLock {
        let key = self.fill_key(&hex_code(code));
        let ttl = millis(self.fill_ttl);
        let set: Result<Option<String>, _> = self
            .call("lock", |c| {
                c.query(
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&self.lock_id)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl)
                        .clone(),
                )
            })
            .await;
        match set {
            Ok(Some(_)) => FillLock::Acquired,
            Ok(None) => FillLock::Held,
            Err(Unavailable) => FillLock::Unavailable,
        }
    }

    /// The filling replica's answer: stores it (when there is one to store, and no purge
    /// reached this replica meanwhile) and releases the key's lock in one step, then tells
    /// the waiting replicas, which read the entry or, finding none, make their own call.
    pub async fn finish_fill(&self, code: &str, entry: Option<(&Entry, u64)>) {
        let hex = hex_code(code);
        let entry_key = self.entry_key(&hex);
        let fill_key = self.fill_key(&hex);
        match entry {
            Some((entry, epoch)) => {
                let stored = to_stored(entry, epoch);
                let left = (stored.fresh_for_ms + stored.stale_for_ms)
                    .saturating_sub(now_ms().saturating_sub(stored.stored_at_ms))
                    .max(1);
                let sealed = seal::seal_entry(&self.keys, &entry_key, code, &stored);
                let ttl = left.to_string();
                let script = Script::new(STORE_AND_RELEASE);
                let _: Result<i64, _> = self
                    .call("set", |c| async move {
                        c.script(
                            &script,
                            &[&entry_key, &fill_key],
                            &[&sealed, ttl.as_bytes(), self.lock_id.as_bytes()],
                        )
                        .await
                    })
                    .await;
            }
            None => self.release(&fill_key).await,
        }
        self.publish(format!("fill {hex}")).await;
    }

    /// Stores an answer fetched without the fill lock (after waiting for a replica that did
    /// not deliver, or with Redis briefly unreachable).
    pub async fn store(&self, code: &str, entry: &Entry, epoch: u64) {
        let entry_key = self.entry_key(&hex_code(code));
        let stored = to_stored(entry, epoch);
        let left = (stored.fresh_for_ms + stored.stale_for_ms).max(1);
        let sealed = seal::seal_entry(&self.keys, &entry_key, code, &stored);
        let _: Result<(), _> = self
            .call("set", |c| {
                c.query(
                    redis::cmd("SET")
                        .arg(&entry_key)
                        .arg(sealed)
                        .arg("PX")
                        .arg(left)
                        .clone(),
                )
            })
            .await;
    }

    async fn release(&self, lock_key: &str) {
        let script = Script::new(RELEASE);
        let _: Result<i64, _> = self
            .call("unlock", |c| async move {
                c.script(&script, &[lock_key], &[self.lock_id.as_bytes()])
                    .await
            })
            .await;
    }

    async fn publish(&self, message: String) -> bool {
        let channel = self.channel.clone();
        self.call("publish", |c| {
            c.query::<i64>(redis::cmd("PUBLISH").arg(channel).arg(message).clone())
        })
        .await
        .is_ok()
    }

    /// `DELETE /cache/{code}` for the fleet: the entry goes, and every replica drops its
    /// copy. False when Redis could not be told.
    pub async fn purge(&self, code: &str) -> bool {
        let hex = hex_code(code);
        let key = self.entry_key(&hex);
        let deleted = self
            .call("purge", |c| {
                c.query::<i64>(redis::cmd("DEL").arg(&key).clone())
            })
            .await
            .is_ok();
        deleted && self.publish(format!("purge {hex}")).await
    }

    /// `DELETE /cache` for the fleet: a new purge epoch (entries of older ones are misses
    /// everywhere, however many there are, in one call rather than a scan of every node), and
    /// every replica drops its copies. False when Redis could not be told.
    pub async fn purge_all(&self) -> bool {
        let key = self.epoch_key();
        match self
            .call("purge", |c| {
                c.query::<u64>(redis::cmd("INCR").arg(&key).clone())
            })
            .await
        {
            Ok(epoch) => {
                self.epoch.fetch_max(epoch, Ordering::AcqRel);
                self.publish(format!("purge-all {epoch}")).await
            }
            Err(Unavailable) => false,
        }
    }

    /// A message on the fleet's channel.
    fn on_event(&self, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let (kind, arg) = text.split_once(' ').unwrap_or((&text, ""));
        match kind {
            "fill" => self.wake(arg),
            "purge" => {
                if let Some(code) = hex::decode(arg)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                {
                    self.l1.purge(&code);
                }
            }
            "purge-all" => {
                if let Ok(epoch) = arg.parse::<u64>() {
                    self.epoch.fetch_max(epoch, Ordering::AcqRel);
                }
                self.l1.purge_all();
            }
            "token" => {
                self.token_version.send_modify(|v| *v += 1);
            }
            _ => {}
        }
    }

    fn wake(&self, hex: &str) {
        if let Ok(waits) = self.waits.lock()
            && let Some(signal) = waits.get(hex)
        {
            signal.count.fetch_add(1, Ordering::AcqRel);
            signal.notify.notify_waiters();
        }
    }

    /// Back after a lost subscription: messages may have been missed, so L1 copies are
    /// dropped, waiting fills re-read, and the token is looked at again.
    fn resubscribed(&self) {
        self.l1.purge_all();
        if let Ok(waits) = self.waits.lock() {
            for signal in waits.values() {
                signal.count.fetch_add(1, Ordering::AcqRel);
                signal.notify.notify_waiters();
            }
        }
        self.token_version.send_modify(|v| *v += 1);
        tracing::info!("shared tier subscription restored; local cache copies dropped");
    }

    async fn read_epoch(&self) {
        let key = self.epoch_key();
        if let Ok(Some(epoch)) = self
            .call("get", |c| {
                c.query::<Option<u64>>(redis::cmd("GET").arg(&key).clone())
            })
            .await
        {
            self.epoch.fetch_max(epoch, Ordering::AcqRel);
        }
    }
}

/// A registered wait for a key's `fill` message: a message that came after registering, even
/// before waiting, ends the wait.
pub struct FillWait {
    fleet: Arc<Fleet>,
    hex: String,
    signal: Arc<Signal>,
    seen: u64,
}

impl FillWait {
    /// Waits for the message, at most `within`.
    pub async fn wait(&self, within: Duration) {
        let wait = async {
            loop {
                let notified = self.signal.notify.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self.signal.count.load(Ordering::Acquire) != self.seen {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(within, wait).await;
    }
}

impl Drop for FillWait {
    fn drop(&mut self) {
        if let Ok(mut waits) = self.fleet.waits.lock()
            && waits
                .get(&self.hex)
                .is_some_and(|s| Arc::ptr_eq(s, &self.signal) && Arc::strong_count(s) <= 2)
        {
            waits.remove(&self.hex);
        }
    }
}

/// An L1 entry for an L2 one: the same wall-clock store time, so it expires when the L2 one
/// does (an L2 read never restarts the TTL).
fn to_entry(stored: StoredEntry) -> Option<Entry> {
    let age = Duration::from_millis(now_ms().saturating_sub(stored.stored_at_ms));
    let now = Instant::now();
    Some(Entry {
        content_type: HeaderValue::from_maybe_shared(stored.content_type).ok()?,
        body: stored.body,
        bill24_code: stored.bill24_code,
        stored_at: now.checked_sub(age).unwrap_or(now),
        stored_wall_ms: stored.stored_at_ms,
        fresh_for: Duration::from_millis(stored.fresh_for_ms),
        stale_for: Duration::from_millis(stored.stale_for_ms),
        refreshing: AtomicBool::new(false),
    })
}

fn to_stored(entry: &Entry, epoch: u64) -> StoredEntry {
    StoredEntry {
        stored_at_ms: entry.stored_wall_ms,
        fresh_for_ms: millis(entry.fresh_for),
        stale_for_ms: millis(entry.stale_for),
        epoch,
        bill24_code: SmolStr::new(&entry.bill24_code),
        content_type: Bytes::copy_from_slice(entry.content_type.as_bytes()),
        body: entry.body.clone(),
    }
}

/// Connects to a Redis Cluster in the background (its slot map is read at connect), retrying
/// with backoff until it answers.
async fn connect_cluster(fleet: Arc<Fleet>, client: redis::cluster::ClusterClient) {
    let mut pause = FIRST_BACKOFF;
    loop {
        let connect = tokio::time::timeout(
            fleet.timeout.max(Duration::from_secs(2)),
            client.get_async_connection(),
        );
        match connect.await {
            Ok(Ok(conn)) => {
                fleet.conn.store(Some(Arc::new(Conn::Cluster(conn))));
                fleet.health.up.store(true, Ordering::Release);
                fleet.metrics.set_redis_up(true);
                fleet.ready.send_replace(true);
                tracing::info!("connected to the Redis Cluster");
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot connect to the Redis Cluster yet"),
            Err(_) => tracing::warn!("cannot connect to the Redis Cluster yet: no answer"),
        }
        fleet.ready.send_replace(true);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}

/// While the tier is down, a probe (`PING`) each time the backoff has passed, so it comes
/// back without waiting for traffic; the first one at once. A probe may take longer than
/// `redis.timeout` (it may have to connect, TLS included): no request waits on it.
async fn probe(fleet: Arc<Fleet>) {
    let connect = fleet.timeout.max(Duration::from_secs(2));
    loop {
        if !fleet.is_up() && fleet.conn.load().is_some() && fleet.health.admit() {
            let _: Result<String, _> = fleet
                .attempt("ping", connect, |c| c.query(redis::cmd("PING")))
                .await;
            fleet.ready.send_replace(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps a subscription to the fleet's channel, on one node, reconnecting with backoff.
async fn subscribe(fleet: Arc<Fleet>) {
    let mut lost = false;
    let mut pause = FIRST_BACKOFF;
    let mut node = 0usize;
    loop {
        let client = &fleet.clients[node % fleet.clients.len()];
        node = node.wrapping_add(1);
        let connect = tokio::time::timeout(
            fleet.timeout.max(Duration::from_secs(1)),
            client.get_async_pubsub(),
        );
        if let Ok(Ok(mut pubsub)) = connect.await
            && tokio::time::timeout(
                fleet.timeout.max(Duration::from_secs(1)),
                pubsub.subscribe(&fleet.channel),
            )
            .await
            .is_ok_and(|r| r.is_ok())
        {
            fleet.metrics.redis("subscribe", "ok", None);
            fleet.read_epoch().await;
            if lost {
                fleet.resubscribed();
            }
            pause = FIRST_BACKOFF;
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                fleet.on_event(message.get_payload_bytes());
            }
            lost = true;
            tracing::warn!("shared tier subscription lost; reconnecting");
        } else {
            fleet.metrics.redis("subscribe", "error", None);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}

/// The fleet's one merchant token, for the Bill24 client's token manager.
pub struct TokenShare(pub Arc<Fleet>);

impl TokenStore for TokenShare {
    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Unavailable>> {
        Box::pin(async move {
            let fleet = &self.0;
            // A replica that has just started looks for the fleet's token before buying one.
            fleet.ready(Duration::from_secs(2)).await;
            let key = fleet.token_key();
            let bytes: Option<Vec<u8>> = fleet
                .call("token_get", |c| {
                    c.query(redis::cmd("GET").arg(&key).clone())
                })
                .await?;
            let Some(bytes) = bytes else { return Ok(None) };
            match seal::open_token(&fleet.keys, &key, &bytes) {
                Ok(token) => Ok(Some(token)),
                Err(Rejected) => {
                    fleet.metrics.redis("token_get", "rejected", None);
                    tracing::warn!("the shared access token did not decrypt; not used");
                    Ok(None)
                }
            }
        })
    }

    fn lock(&self) -> BoxFuture<'_, Result<bool, Unavailable>> {
        Box::pin(async move {
            let fleet = &self.0;
            let key = fleet.token_lock_key();
            let set: Option<String> = fleet
                .call("token_lock", |c| {
                    c.query(
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(&fleet.lock_id)
                            .arg("NX")
                            .arg("PX")
                            .arg(millis(fleet.token_ttl))
                            .clone(),
                    )
                })
                .await?;
            Ok(set.is_some())
        })
    }

    fn store(&self, token: SharedToken) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            let fleet = &self.0;
            let key = fleet.token_key();
            let sealed = seal::seal_token(&fleet.keys, &key, &token);
            let mut set = redis::cmd("SET");
            set.arg(&key).arg(sealed);
            // Kept until it expires (an hour at most when Bill24 gave no expiry).
            let left = token
                .expires_at
                .map(|at| at - OffsetDateTime::now_utc())
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or(Duration::from_secs(3600));
            set.arg("PX").arg(millis(left).max(1));
            fleet.call("token_set", |c| c.query::<()>(set)).await?;
            fleet.publish("token".into()).await;
            Ok(())
        })
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let key = self.0.token_lock_key();
            self.0.release(&key).await;
        })
    }

    fn lock_ttl(&self) -> Duration {
        self.0.token_ttl
    }

    fn token_changes(&self) -> watch::Receiver<u64> {
        self.0.token_version.subscribe()
    }
}
