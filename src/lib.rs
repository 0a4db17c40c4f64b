//! bill24-gateway: one in-house endpoint for Bill24 wallet balances, with caller keys, a short
//! cache, shared upstream calls and a merchant token the gateway manages itself.
//!
//! # Layout
//!
//! The workspace has five crates, and dependencies point one way:
//!
//! ```text
//! bill24-gateway (this crate) ──> bill24 ──> singleflight
//!        │                          (the Bill24 client: pooled transport, merchant token,
//!        │                           retries, circuit breaker, wire shapes)
//!        └──> bill24-sim             (the Bill24 simulator: demo, tests, load tests)
//! ```
//!
//! and all three read time from `clock`: tokio's monotonic clock, and the one wall clock
//! (`clock::now_utc`), which moves with tokio's when a test pauses and advances it.
//!
//! `bill24` knows nothing of callers, the cache or serving: it takes a [`bill24::Config`] and an
//! observer for its metrics ([`bill24::Observer`], which [`metrics`] implements) and answers
//! balance calls with an [`bill24::Answer`] or a [`bill24::Failure`]. A failure says what went
//! wrong; what the caller is told (status, code, `Retry-After`) is decided in this crate, in
//! [`upstream_error`]. Both crates write errors on one line with [`bill24::chain`]. The
//! simulator knows nothing of either; it speaks BILL24.md.
//!
//! Inside this crate, a request on the main listener ([`server`], with per-connection timers
//! in [`connection`]) goes down the tower stack that [`stack`] builds, in this order:
//! [`correlation`] (request id, trace context, error bodies) → [`access_log`] (one line and the
//! request metrics) → route → [`auth`] (caller key, JWT or client certificate, with
//! [`identity`] keeping the listener's TLS and the JWKS current) → [`limits`] (per-caller rate and
//! concurrency) → deadline → [`balance::request`] (Content-Type, size, body) →
//! [`balance::service`], which answers from [`balance::cache`] (L1), else through the second
//! tier when there is one ([`tier::Tier`], one call per miss), else through one shared call to
//! `bill24`. [`admin`] serves health, readiness, metrics, the view of the fleet and purge on
//! its own listener; [`reload`] applies a re-read config; [`demo`] wires the simulator to a
//! gateway.
//!
//! The second tier is the fleet's ([`fleet`], over Redis): it owns read-through, the fill
//! lock, the wait, the store and the publish, and tells L1 what to drop through a callback
//! ([`tier::Invalidate`]) that [`Gateway`] wires to the cache. `balance` and `fleet` never
//! import each other; both import [`tier`]:
//!
//! ```text
//! balance::service ──> tier <── fleet::{fill, events, token} ──> fleet::{conn, seal}
//!        │                                 │
//!        └──> balance::cache               └──> bill24::token (the TokenStore it implements)
//! ```
//!
//! [`fleet`]'s `registry` is the fleet's view of itself: each replica's record and heartbeat
//! in Redis, which [`admin`] serves as `GET /fleet` (this replica alone without Redis).
//!
//! The files import each other in layers, lower never importing higher:
//!
//! 1. leaves, which import no layer: [`config`], [`error`] (the [`error::ErrorResponse`]
//!    trait that each error type implements where it is defined, and the one renderer),
//!    [`upstream_error`] (that trait for Bill24's failures: their statuses, codes and
//!    `Retry-After`),
//!    [`caller`] (who a caller is and its limits), [`caller_changes`] (what a new config
//!    does to the callers, for the reload's log line), [`correlation::context`] (request id and
//!    trace), [`balance::code`] (`customer_sync_code`), [`balance::cache`], [`holding`],
//!    [`metrics`], [`telemetry`];
//! 2. [`request_state`], the one value the layers share about a request;
//! 3. the layers and services: [`correlation`], [`access_log`], [`auth`], [`limits`],
//!    [`balance::request`], [`balance::service`], [`fleet`] (over [`tier`], a leaf),
//!    [`identity`] (below [`auth`] and [`server`]),
//!    [`stack`], [`admin`], [`connection`], [`server`], [`reload`], [`demo`].
//!
//! [`Gateway::bind`] binds the sockets (port 0 works, for tests) and [`Gateway::run`] serves
//! until the shutdown future resolves; a [`Reloader`] applies a re-read config meanwhile.

#![forbid(unsafe_code)]
#![deny(unreachable_pub)]

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod auth;
pub(crate) mod balance;
pub(crate) mod caller;
pub mod caller_changes;
pub mod config;
pub(crate) mod connection;
pub(crate) mod correlation;
pub mod demo;
pub(crate) mod error;
pub(crate) mod fleet;
pub(crate) mod holding;
pub(crate) mod identity;
pub(crate) mod limits;
pub(crate) mod metrics;
#[cfg(test)]
mod openapi_docs;
pub(crate) mod reload;
pub(crate) mod request_state;
pub(crate) mod server;
pub(crate) mod stack;
pub(crate) mod telemetry;
pub(crate) mod tier;
pub(crate) mod upstream_error;

pub use auth::hash_key;
pub use bill24::Secret;
pub use reload::{ReloadRefused, ReloadReport, Reloader};
pub use server::runtime;
pub use telemetry::{LogHandle, init as init_logging};

/// Internals the benchmarks and fuzz targets reach into; not an interface.
#[doc(hidden)]
pub mod internals {
    pub use crate::access_log::{AccessSample, InFlight, UnauthorizedLines};
    pub use crate::auth::{CallerKeys, bearer_key};
    pub use crate::balance::cache::{BalanceCache, CacheStatus, Entry};
    pub use crate::balance::code::validate_sync_code;
    pub use crate::balance::request::{
        CacheDirectives, is_json_content_type, parse_body, parse_body_json,
    };
    pub use crate::balance::service::{Balances, cached_response};
    pub use crate::correlation::context::{RequestId, TraceContext};
    /// What the shared tier stores (for the benchmarks).
    pub mod seal {
        pub use crate::fleet::seal::{Keys, StoredEntry, open_entry, seal_entry};
    }
    pub use crate::identity::Identity;
    pub use crate::metrics::Metrics;
    pub use crate::stack::{StackParts, build as build_stack};
}

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use bill24::Bill24;

use crate::access_log::{AccessSample, InFlight};
use crate::admin::Admin;
use crate::auth::CallerKeys;
use crate::balance::cache::BalanceCache;
use crate::balance::service::Balances;
use crate::caller::FleetRate;
use crate::config::Config;
use crate::fleet::{CallerRates, Fleet, FleetGuard, Membership, Presence, TokenShare};
use crate::metrics::Metrics;
use crate::tier::{Invalidate, Invalidation, Tier};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("cannot set up the Bill24 client: {0}")]
    Upstream(String),
    #[error("cannot set up the shared tier: {0}")]
    Redis(String),
    #[error("cannot set up caller identity (TLS, JWT): {0}")]
    Identity(String),
}

/// How often histogram samples are folded into their buckets.
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// How long admin connections may finish once the main listener is done.
const ADMIN_GRACE: Duration = Duration::from_secs(1);
/// Open connections on the admin listener, at most (probes and scrapes need few). When they
/// are all open, the oldest one not serving a request is closed for the newcomer.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// A gateway with its sockets bound and its state built, ready to [`run`](Gateway::run).
pub struct Gateway {
    config: Config,
    main: Main,
    admin: TcpListener,
    state: State,
}

/// Where the main listener's connections are served.
enum Main {
    /// On the runtime that runs the gateway.
    Here(TcpListener),
    /// On threads of their own, one per listener (all on one port, `SO_REUSEPORT`), each a
    /// current-thread runtime: a connection and its requests never leave the thread that
    /// accepted it, with no work stealing and no wake-up crossing threads on a hit. The
    /// runtime that runs the gateway keeps what all share: Bill24 calls and the fills that
    /// make them, the token, Redis, the admin listener.
    Threads(Vec<std::net::TcpListener>),
}

impl Main {
    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Main::Here(l) => l.local_addr().ok(),
            Main::Threads(ls) => ls.first().and_then(|l| l.local_addr().ok()),
        }
    }
}

/// What the request path and the admin listener share; the reloadable parts sit behind
/// `ArcSwap`s that [`Reloader`] swaps.
struct State {
    metrics: Arc<Metrics>,
    bill24: Arc<Bill24>,
    balances: Arc<Balances>,
    callers: Arc<ArcSwap<CallerKeys>>,
    admin_key: Arc<ArcSwap<Option<config::KeyHash>>>,
    access_sample: AccessSample,
    in_flight: InFlight,
    ready: Arc<AtomicBool>,
    /// Where fleet-scoped callers' rates are counted (with `[redis]`).
    fleet_rate: Option<Arc<dyn FleetRate>>,
    /// The shared tier, with `[redis]`; and this replica's place in it.
    fleet: Option<Arc<Fleet>>,
    membership: Option<Membership>,
    /// This replica as `/fleet` lists it.
    presence: Arc<Presence>,
    /// The digest of the config in effect (a reload stores the new one).
    digest: Arc<ArcSwap<String>>,
    /// The listener's TLS and the JWT verifier.
    identity: Arc<identity::Identity>,
}

impl Gateway {
    /// Binds `server.listen` and `server.admin_listen`, and starts the Bill24 client (whose
    /// token manager asks for a token at once). Must be called within a tokio runtime.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let main = bind(config.server.listen, "server.listen")?;
        let admin = bind(config.server.admin_listen, "server.admin_listen")?;
        Self::from_listeners(config, main, admin)
    }

    /// Like [`Gateway::bind`], serving the main listener on `threads` threads of its own when
    /// `threads` is 2 or more (see [`serving_threads`]): `threads` listeners share the port
    /// (`SO_REUSEPORT`, where the platform has it), each served by a current-thread runtime;
    /// the runtime that runs the gateway keeps the rest. With 0 or 1, the same as `bind`.
    pub async fn bind_threads(config: Config, threads: usize) -> Result<Self, StartError> {
        #[cfg(unix)]
        if threads > 1 {
            let addr = config.server.listen;
            let main = server::listen_group(addr, threads).map_err(|source| StartError::Bind {
                addr,
                key: "server.listen",
                source,
            })?;
            let admin = bind(config.server.admin_listen, "server.admin_listen")?;
            return Self::from_listeners_inner(config, Main::Threads(main), admin);
        }
        Self::bind(config).await
    }

    /// Like [`Gateway::bind`], with listeners bound by the caller (the config's addresses
    /// are ignored).
    pub fn from_listeners(
        config: Config,
        main: TcpListener,
        admin: TcpListener,
    ) -> Result<Self, StartError> {
        Self::from_listeners_inner(config, Main::Here(main), admin)
    }

    fn from_listeners_inner(
        config: Config,
        main: Main,
        admin: TcpListener,
    ) -> Result<Self, StartError> {
        let identity = Arc::new(
            identity::Identity::new(config.server.tls.as_ref(), config.jwt.as_ref())
                .map_err(StartError::Identity)?,
        );
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(BalanceCache::new(
            config.cache.max_entries,
            config.cache.max_bytes,
        ));
        let fleet = match &config.redis {
            Some(redis) => {
                // What the fleet tells L1 to drop (purges made elsewhere, or ones it may have
                // missed); it knows nothing else of the cache.
                let l1 = cache.clone();
                let invalidate: Invalidate = Arc::new(move |what| match what {
                    Invalidation::Code(code) => l1.purge(&code),
                    Invalidation::All => l1.purge_all(),
                });
                Some(
                    Fleet::start(redis, &config.upstream, metrics.clone(), invalidate)
                        .map_err(StartError::Redis)?,
                )
            }
            None => None,
        };
        let tokens = fleet
            .clone()
            .map(|f| Arc::new(TokenShare(f)) as Arc<dyn bill24::token::TokenStore>);
        // The fleet's ceiling and circuit; without `[redis]`, a ceiling of this replica's own.
        let hooks = fleet.clone().map(|f| {
            FleetGuard::new(
                f,
                config.upstream.fleet_max_rps,
                config.upstream.fleet_circuit,
            ) as Arc<dyn bill24::fleet::FleetHooks>
        });
        let bill24 = Arc::new(
            Bill24::start_in_fleet(&config.upstream, metrics.clone(), tokens, hooks)
                .map_err(StartError::Upstream)?,
        );
        let fleet_rate = fleet
            .clone()
            .map(|f| CallerRates::new(f) as Arc<dyn FleetRate>);
        let balances = Balances::with_tier(
            config.cache.clone(),
            cache,
            bill24.clone(),
            fleet.clone().map(|f| f as Arc<dyn Tier>),
            metrics.clone(),
        );
        let digest = Arc::new(ArcSwap::from_pointee(config.fleet_digest()));
        let presence = Arc::new(Presence::new(
            main.local_addr().unwrap_or(config.server.listen),
            digest.clone(),
            bill24.clone(),
        ));
        let membership = fleet.as_ref().map(|f| f.join(presence.clone()));
        let state = State {
            metrics,
            bill24,
            balances,
            callers: Arc::new(ArcSwap::from_pointee(CallerKeys::new(&config.callers))),
            admin_key: Arc::new(ArcSwap::from_pointee(config.server.admin_key_sha256)),
            access_sample: AccessSample::new(config.log.access_sample),
            in_flight: InFlight::default(),
            ready: Arc::new(AtomicBool::new(true)),
            fleet_rate,
            fleet,
            membership,
            presence,
            digest,
            identity,
        };
        Ok(Gateway {
            config,
            main,
            admin,
            state,
        })
    }

    pub fn main_addr(&self) -> SocketAddr {
        self.main.local_addr().unwrap_or(self.config.server.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.config.server.admin_listen)
    }

    /// Applies a new config to this gateway while it runs (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader::new(
            self.config.clone(),
            self.state.callers.clone(),
            self.state.balances.clone(),
            self.state.admin_key.clone(),
            self.state.access_sample.clone(),
            self.state.digest.clone(),
            self.state.identity.clone(),
        )
    }

    /// Serves until `shutdown` resolves, then drains (CONTRACT §7): `/readyz` turns 503 at
    /// once, connections are still accepted for `server.drain_delay`, then in-flight requests
    /// get up to `server.shutdown_grace` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), StartError> {
        let Gateway {
            config,
            main,
            admin,
            state,
        } = self;
        let main_addr = main.local_addr();
        let admin_addr = admin.local_addr().ok();
        let upkeep = tokio::spawn({
            let metrics = state.metrics.clone();
            async move {
                let mut tick = tokio::time::interval(METRICS_UPKEEP_EVERY);
                loop {
                    tick.tick().await;
                    metrics.upkeep();
                }
            }
        });
        let parts = stack::StackParts {
            metrics: state.metrics.clone(),
            in_flight: state.in_flight.clone(),
            access_sample: state.access_sample.clone(),
            unauthorized_lines: access_log::UnauthorizedLines::new(),
            callers: state.callers.clone(),
            balances: state.balances.clone(),
            request_timeout: config.server.request_timeout,
            max_body_bytes: config.server.max_body_bytes,
            fleet_rate: state.fleet_rate.clone(),
            identity: state.identity.clone(),
        };
        // Certificate and JWKS files followed as they change.
        let follow = tokio::spawn(state.identity.clone().follow());
        let admin_state = Arc::new(Admin {
            ready: state.ready.clone(),
            metrics: state.metrics.clone(),
            balances: state.balances.clone(),
            admin_key: state.admin_key.clone(),
            fleet: state.fleet.clone(),
            presence: state.presence.clone(),
            metrics_pages: Arc::new(tokio::sync::Semaphore::new(admin::METRICS_PAGES_AT_ONCE)),
        });
        let admin_service = tower::service_fn(move |req| admin_state.clone().handle(req));

        let builder = server::connection_builder();
        let admin_builder = server::admin_connection_builder();
        let main_graceful = GracefulShutdown::new();
        let admin_graceful = GracefulShutdown::new();
        let (stop_main, main_stopped) = watch::channel(false);
        let (stop_admin, admin_stopped) = watch::channel(false);

        tracing::info!(
            listen = main_addr.map(|a| a.to_string()),
            tls = state.identity.tls.is_some(),
            admin_listen = admin_addr.map(|a| a.to_string()),
            upstream = %config.upstream.base_url,
            callers = config.callers.len(),
            "gateway started"
        );

        let ready = state.ready.clone();
        let sequence = async {
            shutdown.await;
            ready.store(false, Ordering::Release);
            tracing::info!(
                drain_delay_ms = config.server.drain_delay.as_millis() as u64,
                "shutdown started: /readyz now answers 503"
            );
            tokio::time::sleep(config.server.drain_delay).await;
            let _ = stop_main.send(true);
        };
        let admin_loop = server::accept_loop(
            admin,
            None,
            admin_service,
            &admin_builder,
            &admin_graceful,
            server::ConnectionLimits {
                max_connections: ADMIN_MAX_CONNECTIONS,
                when_full: server::WhenFull::Evict,
                ..server::ConnectionLimits::from_config(&config.server)
            },
            Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS)),
            admin_stopped,
        );
        let in_flight = state.in_flight.clone();
        // Kept until the gateway is done with Redis and Bill24: what a serving thread started
        // there (a reconnect, say) lives on its runtime.
        let (release_threads, threads_released) = watch::channel(false);
        let finish = async {
            let limits = server::ConnectionLimits::from_config(&config.server);
            let slots = Arc::new(Semaphore::new(limits.max_connections));
            let serving = match main {
                Main::Here(listener) => Either::Left(async {
                    server::accept_loop(
                        listener,
                        state.identity.tls.clone(),
                        stack::build(&parts),
                        &builder,
                        &main_graceful,
                        limits,
                        slots,
                        main_stopped,
                    )
                    .await;
                    tokio::time::timeout(config.server.shutdown_grace, main_graceful.shutdown())
                        .await
                        .is_ok()
                }),
                Main::Threads(listeners) => Either::Right(serve_on_threads(
                    listeners,
                    ThreadServing {
                        tls: state.identity.tls.clone(),
                        parts: parts.clone(),
                        limits,
                        slots,
                        grace: config.server.shutdown_grace,
                        stop: main_stopped,
                        release: threads_released,
                    },
                )),
            };
            let (drained, ()) = tokio::join!(serving, sequence);
            if !drained {
                tracing::warn!(
                    requests_cut = in_flight.get(),
                    shutdown_grace_ms = config.server.shutdown_grace.as_millis() as u64,
                    "shutdown grace ran out; cutting the requests still in flight"
                );
            }
            let _ = stop_admin.send(true);
        };
        tokio::join!(admin_loop, finish);
        let _ = tokio::time::timeout(ADMIN_GRACE, admin_graceful.shutdown()).await;
        state.bill24.stop();
        if let Some(membership) = state.membership {
            // Gone from the fleet's view at once rather than when its heartbeat is missed.
            membership.leave().await;
        }
        upkeep.abort();
        follow.abort();
        let _ = release_threads.send(true);
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// Whether the listener's TLS files and the JWKS file of `config` can be used as the gateway
/// would use them at start (`--check-config`).
pub fn check_identity(config: &Config) -> Result<(), String> {
    identity::Identity::new(config.server.tls.as_ref(), config.jwt.as_ref()).map(|_| ())
}

/// The serving threads for `server.worker_threads`: that many, or one per CPU for 0.
pub fn serving_threads(worker_threads: usize) -> usize {
    match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// What each serving thread of [`Main::Threads`] is given.
#[derive(Clone)]
struct ThreadServing {
    tls: Option<Arc<identity::tls::ListenerTls>>,
    parts: stack::StackParts,
    limits: server::ConnectionLimits,
    /// The connection cap, shared by every thread's listener.
    slots: Arc<Semaphore>,
    grace: Duration,
    stop: watch::Receiver<bool>,
    /// Turns true once the gateway is done; the thread then drops its runtime (and with it
    /// any connection the grace cut).
    release: watch::Receiver<bool>,
}

/// Serves each listener on a thread of its own with a current-thread runtime, until `stop`;
/// then lets each drain for `grace`. True when every connection finished within it.
async fn serve_on_threads(listeners: Vec<std::net::TcpListener>, serving: ThreadServing) -> bool {
    let mut drained = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let (done, finished) = tokio::sync::oneshot::channel::<bool>();
        drained.push(finished);
        let ThreadServing {
            tls,
            parts,
            limits,
            slots,
            grace,
            stop,
            mut release,
        } = serving.clone();
        let started = std::thread::Builder::new()
            .name(format!("bill24-serve-{i}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a serving thread's runtime");
                        let _ = done.send(true);
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot serve a listener");
                            let _ = done.send(true);
                            return;
                        }
                    };
                    let builder = server::connection_builder();
                    let graceful = GracefulShutdown::new();
                    server::accept_loop(
                        listener,
                        tls,
                        stack::build(&parts),
                        &builder,
                        &graceful,
                        limits,
                        slots,
                        stop,
                    )
                    .await;
                    let ok = tokio::time::timeout(grace, graceful.shutdown())
                        .await
                        .is_ok();
                    let _ = done.send(ok);
                    let _ = release.wait_for(|done| *done).await;
                });
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start a serving thread");
        }
    }
    let mut all = true;
    for finished in drained {
        // A thread that could not start has dropped its sender: nothing of it to drain.
        all &= finished.await.unwrap_or(true);
    }
    all
}

fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, StartError> {
    server::listen(addr).map_err(|source| StartError::Bind { addr, key, source })
}
