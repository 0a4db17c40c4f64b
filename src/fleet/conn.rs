//! The connection to Redis / Valkey and its health: every call has its own deadline
//! (`redis.timeout`), whatever the client's reconnect logic is doing; after consecutive
//! failures the tier is marked down and skipped until a probe succeeds, with backoff.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, RedisResult, Script};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::RedisConfig;
use crate::metrics::Metrics;

/// Consecutive failed calls that mark the tier down.
const FAILURES_TO_DOWN: u32 = 3;
/// How often a Redis that refuses writes (out of memory) is logged, at most.
const FULL_LOG_EVERY: Duration = Duration::from_secs(60);
/// The first pause before probing a tier that is down; doubles up to [`MAX_BACKOFF`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(200);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Why a call gave nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CallError {
    /// Not sent: the tier is down (or not connected yet).
    Skipped,
    /// Sent, and failed or timed out: it may still have been carried out.
    Failed,
}

/// A connection to standalone Redis or to a Cluster (cheap handles, cloned per call).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub(super) async fn query<T: FromRedisValue>(mut self, cmd: Cmd) -> RedisResult<T> {
        match &mut self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    pub(super) async fn script<T: FromRedisValue>(
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

/// The link to Redis: connection, health, metrics.
pub(super) struct Link {
    conn: ArcSwapOption<Conn>,
    /// For subscriptions (one node of a cluster is enough: PUBLISH reaches every node).
    pub(super) clients: Vec<redis::Client>,
    /// Up or down; waiters watch it to stop waiting when it goes down.
    up: watch::Sender<bool>,
    failures: AtomicU32,
    /// While down: when the next probe may go, and the pause after that one.
    retry: Mutex<(Instant, Duration)>,
    probing: AtomicBool,
    /// Whether the tier's state has been logged since start (the first one always is, down
    /// or up).
    told: AtomicBool,
    /// When a refused write (out of memory) was last logged.
    full_told: Mutex<Option<Instant>>,
    pub(super) timeout: Duration,
    pub(super) metrics: Arc<Metrics>,
    /// True once the first connection attempt is over (whatever its outcome).
    ready: watch::Sender<bool>,
}

impl Link {
    /// The link, connecting in the background (a Redis that is down at start delays nothing).
    pub(super) fn start(cfg: &RedisConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
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
        let link = Arc::new(Link {
            conn: ArcSwapOption::empty(),
            clients,
            up: watch::Sender::new(false),
            failures: AtomicU32::new(0),
            retry: Mutex::new((Instant::now(), FIRST_BACKOFF)),
            probing: AtomicBool::new(false),
            told: AtomicBool::new(false),
            full_told: Mutex::new(None),
            timeout: cfg.timeout,
            metrics,
            ready: watch::Sender::new(false),
        });
        link.metrics.set_redis_up(false);
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
            tokio::spawn(connect_cluster(link.clone(), client));
        } else {
            let client = link.clients.first().cloned().ok_or("redis.urls is empty")?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout.max(Duration::from_millis(500))))
                .set_response_timeout(Some(cfg.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| format!("redis: {e}"))?;
            link.conn.store(Some(Arc::new(Conn::Single(manager))));
            // Down until the first probe connects (at once, in the background).
        }
        tokio::spawn(probe(link.clone()));
        Ok(link)
    }

    /// Whether a call may go to Redis now: always while up; while down, one probe once the
    /// backoff has passed.
    fn admit(&self) -> bool {
        if self.is_up() {
            return true;
        }
        let due = self
            .retry
            .lock()
            .map(|r| Instant::now() >= r.0)
            .unwrap_or(true);
        due && !self.probing.swap(true, Ordering::AcqRel)
    }

    /// One Redis call within `redis.timeout`, with its metrics and the tier's health: skipped
    /// while the tier is down (but for a probe), and a failure counted toward marking it down.
    pub(super) async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, CallError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.admit() {
            self.metrics.redis(op, "skipped", None);
            return Err(CallError::Skipped);
        }
        self.attempt(op, self.timeout, f).await
    }

    /// A call made whatever the tier's health says (cleaning up after a fill: a lock released
    /// as soon as Redis answers again rather than when it expires), within `redis.timeout`.
    pub(super) async fn call_anyway<T, F, Fut>(
        &self,
        op: &'static str,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.attempt(op, self.timeout, f).await
    }

    /// A call that was admitted (or is the probe).
    async fn attempt<T, F, Fut>(
        &self,
        op: &'static str,
        deadline: Duration,
        f: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(conn) = self.conn.load_full() else {
            self.metrics.redis(op, "skipped", None);
            return Err(CallError::Skipped);
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
            Ok(Err(e)) if e.code() == Some("OOM") => {
                // Redis answers, but refuses writes: reads still serve, so the tier stays up
                // (marking it down would flap with every probe that succeeds).
                self.metrics.redis(op, "error", elapsed);
                self.succeeded();
                self.refused_write(op);
                Err(CallError::Failed)
            }
            Ok(Err(e)) => {
                self.metrics.redis(op, "error", elapsed);
                self.failed(op, &e.to_string());
                Err(CallError::Failed)
            }
            Err(_) => {
                self.metrics.redis(op, "timeout", elapsed);
                self.failed(op, "no answer within redis.timeout");
                Err(CallError::Failed)
            }
        }
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        if !self.up.send_replace(true) {
            if let Ok(mut retry) = self.retry.lock() {
                retry.1 = FIRST_BACKOFF;
            }
            self.metrics.set_redis_up(true);
            if self.told.swap(true, Ordering::AcqRel) {
                tracing::info!("shared tier (Redis) is answering again; sharing resumes");
            } else {
                tracing::info!("shared tier (Redis) is answering; sharing with the fleet");
            }
        }
    }

    fn refused_write(&self, op: &'static str) {
        let Ok(mut last) = self.full_told.lock() else {
            return;
        };
        if last.is_none_or(|at| at.elapsed() >= FULL_LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                op,
                "shared tier (Redis) refuses writes: out of memory (maxmemory); entries are \
                 read but not shared until it has room"
            );
        }
    }

    fn failed(&self, op: &'static str, error: &str) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let was_up = self.is_up();
        let probe_failed = !was_up && self.probing.swap(false, Ordering::AcqRel);
        if (was_up && failures >= FAILURES_TO_DOWN) || probe_failed {
            self.mark_down(op, error);
        } else if was_up {
            tracing::debug!(op, error, "Redis call failed");
        }
    }

    /// Down now (a failed call, or a lost subscription): calls are skipped until a probe
    /// succeeds, and whoever waits on the tier stops waiting.
    pub(super) fn mark_down(&self, op: &'static str, error: &str) {
        let pause = self
            .retry
            .lock()
            .map(|mut r| {
                let pause = r.1;
                *r = (Instant::now() + pause, (pause * 2).min(MAX_BACKOFF));
                pause
            })
            .unwrap_or(FIRST_BACKOFF);
        let was_up = self.up.send_replace(false);
        // At start too: a replica that never reaches Redis (a wrong password, a wrong
        // address) runs outside the fleet, and says so.
        if was_up || !self.told.swap(true, Ordering::AcqRel) {
            self.metrics.set_redis_up(false);
            tracing::warn!(
                op,
                error,
                retry_in_ms = super::millis(pause),
                "shared tier (Redis) is failing; going on without it"
            );
        }
    }

    /// Whether calls currently go to Redis.
    pub(super) fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Resolves once the tier is down.
    pub(super) async fn down(&self) {
        let mut up = self.up.subscribe();
        let _ = up.wait_for(|up| !*up).await;
    }

    /// Waits (at most `within`) for the first connection attempt to be over, so a replica
    /// that has just started asks the fleet before acting on its own.
    pub(super) async fn ready(&self, within: Duration) {
        let mut ready = self.ready.subscribe();
        let _ = tokio::time::timeout(within, ready.wait_for(|r| *r)).await;
    }
}

/// Connects to a Redis Cluster in the background (its slot map is read at connect), retrying
/// with backoff until it answers.
async fn connect_cluster(link: Arc<Link>, client: redis::cluster::ClusterClient) {
    let mut pause = FIRST_BACKOFF;
    loop {
        let connect = tokio::time::timeout(
            link.timeout.max(Duration::from_secs(2)),
            client.get_async_connection(),
        );
        match connect.await {
            Ok(Ok(conn)) => {
                link.conn.store(Some(Arc::new(Conn::Cluster(conn))));
                link.succeeded();
                link.ready.send_replace(true);
                tracing::info!("connected to the Redis Cluster");
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot connect to the Redis Cluster yet"),
            Err(_) => tracing::warn!("cannot connect to the Redis Cluster yet: no answer"),
        }
        link.ready.send_replace(true);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}

/// While the tier is down, a probe (`PING`) each time the backoff has passed, so it comes
/// back without waiting for traffic; the first one at once. A probe may take longer than
/// `redis.timeout` (it may have to connect, TLS included): no request waits on it.
async fn probe(link: Arc<Link>) {
    let connect = link.timeout.max(Duration::from_secs(1));
    loop {
        if !link.is_up() && link.conn.load().is_some() && link.admit() {
            let _: Result<String, _> = link
                .attempt("ping", connect, |c| c.query(redis::cmd("PING")))
                .await;
            link.ready.send_replace(true);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
