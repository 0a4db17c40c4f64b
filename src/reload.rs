//! Reloading the config while running (SIGHUP): callers (keys, SPIFFE IDs, JWT subjects and
//! limits), cache durations, the admin key, `[jwt]` and access-log sampling take effect at
//! once, without dropping connections, and the listener's certificate and the JWKS files are
//! read again;
//! the log level is applied by the caller of [`Reloader::apply`] (it owns the subscriber).
//! Anything else that changed is reported as needing a restart and left as it runs.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::access_log::AccessSample;
use crate::auth::CallerKeys;
use crate::balance::service::Balances;
use crate::caller_changes::CallerChanges;
use crate::config::{
    CacheConfig, Config, Explicit, KeyHash, LogConfig, RedisConfig, ServerConfig, UpstreamConfig,
};
use crate::identity::Identity;

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys (or sections) whose new values are now in effect.
    pub applied: Vec<&'static str>,
    /// Keys that changed but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
    /// The new `log.level`, when it changed (for the subscriber's owner to apply).
    pub log_level: Option<String>,
    /// Who was added, removed, loosened or otherwise changed among the callers.
    pub callers: CallerChanges,
}

/// Why a reload was refused: it would have opened the gateway up, most likely by accident (an
/// empty or half-written file). The running config stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadRefused {
    #[error(
        "the new config has no [[callers]]: every request would be answered 401; to mean it, \
         write `callers = []` in the file (or set GATEWAY_CALLERS='[]')"
    )]
    NoCallers,
    #[error(
        "the new config has no server.admin_key_sha256 while one is in force: purges would need \
         no key; to mean it, write `admin_key_sha256 = \"\"` in [server]"
    )]
    AdminKeyCleared,
}

/// Applies new configs to a running gateway. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    current: Arc<Mutex<Config>>,
    callers: Arc<ArcSwap<CallerKeys>>,
    balances: Arc<Balances>,
    admin_key: Arc<ArcSwap<Option<KeyHash>>>,
    access_sample: AccessSample,
    /// [`Config::fleet_digest`] of the config in effect, as the fleet's view shows it.
    digest: Arc<ArcSwap<String>>,
    identity: Arc<Identity>,
}

impl Reloader {
    pub(crate) fn new(
        current: Config,
        callers: Arc<ArcSwap<CallerKeys>>,
        balances: Arc<Balances>,
        admin_key: Arc<ArcSwap<Option<KeyHash>>>,
        access_sample: AccessSample,
        digest: Arc<ArcSwap<String>>,
        identity: Arc<Identity>,
    ) -> Self {
        Reloader {
            current: Arc::new(Mutex::new(current)),
            callers,
            balances,
            admin_key,
            access_sample,
            digest,
            identity,
        }
    }

    /// Reads the listener's certificate files and the JWKS file again (SIGHUP); a broken new
    /// file keeps the old one and logs why.
    pub async fn reread_files(&self) {
        self.identity.reload().await;
    }

    /// Applies what can change at run time; reports the rest. `new` must be validated.
    /// Refused (nothing applied) when it would remove every caller or clear the admin key,
    /// unless `explicit` says the new config asks for exactly that.
    pub fn apply(&self, new: Config, explicit: Explicit) -> Result<ReloadReport, ReloadRefused> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if new.callers.is_empty() && !current.callers.is_empty() && !explicit.callers {
            return Err(ReloadRefused::NoCallers);
        }
        if new.server.admin_key_sha256.is_none()
            && current.server.admin_key_sha256.is_some()
            && !explicit.admin_key
        {
            return Err(ReloadRefused::AdminKeyCleared);
        }
        let mut report = ReloadReport {
            needs_restart: restart_only_changes(&current, &new),
            ..ReloadReport::default()
        };
        if current.callers != new.callers {
            let keys = CallerKeys::replacing(&new.callers, &self.callers.load());
            self.callers.store(Arc::new(keys));
            report.applied.push("callers");
            report.callers = CallerChanges::between(&current.callers, &new.callers);
        }
        // `cache.max_entries` and `cache.max_bytes` sized the cache when it was built; the
        // running one stays.
        let mut cache = new.cache.clone();
        cache.max_entries = current.cache.max_entries;
        cache.max_bytes = current.cache.max_bytes;
        if cache != current.cache {
            self.balances.set_cache_config(cache.clone());
            report.applied.push("cache");
            current.cache = cache;
        }
        if current.server.admin_key_sha256 != new.server.admin_key_sha256 {
            self.admin_key.store(Arc::new(new.server.admin_key_sha256));
            report.applied.push("server.admin_key_sha256");
        }
        if current.log.access_sample != new.log.access_sample {
            self.access_sample.set(new.log.access_sample);
            report.applied.push("log.access_sample");
        }
        if current.log.level != new.log.level {
            report.log_level = Some(new.log.level.clone());
            report.applied.push("log.level");
        }
        if current.server.tls.is_some()
            && new.server.tls.is_some()
            && current.server.tls != new.server.tls
        {
            self.identity.set_tls_files(new.server.tls.as_ref());
            report.applied.push("server.tls_cert_file");
            current.server.tls = new.server.tls.clone();
        }
        if current.jwt != new.jwt {
            match self.identity.set_jwt(new.jwt.as_ref()) {
                Ok(_) => {
                    report.applied.push("jwt");
                    current.jwt = new.jwt.clone();
                }
                Err(why) => tracing::warn!(
                    error = %why,
                    "the new [jwt] cannot be used; the running one stays"
                ),
            }
        }
        // Remember what is in effect: the reloadable parts as applied, the rest as running.
        current.callers = new.callers;
        current.server.admin_key_sha256 = new.server.admin_key_sha256;
        current.log.access_sample = new.log.access_sample;
        current.log.level = new.log.level;
        // What the fleet sees: the settings in effect (those needing a restart as running).
        let digest = current.fleet_digest();
        if **self.digest.load() != digest {
            self.digest.store(Arc::new(digest));
        }
        Ok(report)
    }
}

/// The changed keys that a running gateway cannot adopt.
///
/// Every field of every section is named here (no `..`): a key added to the config does not
/// compile until it is listed, as restart-only or as applied by [`Reloader::apply`].
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut compare = |key: &'static str, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    let Config {
        server,
        upstream,
        cache,
        log,
        redis,
        jwt: _,     // applied
        callers: _, // applied
    } = old;

    let ServerConfig {
        listen,
        admin_listen,
        max_body_bytes,
        request_timeout,
        shutdown_grace,
        drain_delay,
        header_read_timeout,
        idle_timeout,
        max_connections,
        admin_key_sha256: _, // applied
        worker_threads,
        tls,
    } = server;
    let n = &new.server;
    compare("server.listen", *listen != n.listen);
    compare("server.admin_listen", *admin_listen != n.admin_listen);
    compare("server.max_body_bytes", *max_body_bytes != n.max_body_bytes);
    compare(
        "server.request_timeout",
        *request_timeout != n.request_timeout,
    );
    compare("server.shutdown_grace", *shutdown_grace != n.shutdown_grace);
    compare("server.drain_delay", *drain_delay != n.drain_delay);
    compare(
        "server.header_read_timeout",
        *header_read_timeout != n.header_read_timeout,
    );
    compare("server.idle_timeout", *idle_timeout != n.idle_timeout);
    compare(
        "server.max_connections",
        *max_connections != n.max_connections,
    );
    compare("server.worker_threads", *worker_threads != n.worker_threads);
    // Turning TLS on or off changes what the listener speaks; new files are applied.
    compare("server.tls_cert_file", tls.is_some() != n.tls.is_some());

    let UpstreamConfig {
        base_url,
        merchant_token,
        client_id,
        client_secret,
        timeout,
        connect_timeout,
        max_in_flight,
        queue_timeout,
        token_refresh_margin,
        retries,
        retry_budget,
        circuit_failures,
        circuit_cooldown,
        fleet_max_rps,
        fleet_circuit,
        tls,
        proxy,
    } = upstream;
    let n = &new.upstream;
    compare("upstream.base_url", *base_url != n.base_url);
    compare(
        "upstream.merchant_token",
        *merchant_token != n.merchant_token,
    );
    compare("upstream.client_id", *client_id != n.client_id);
    compare("upstream.client_secret", *client_secret != n.client_secret);
    compare("upstream.timeout", *timeout != n.timeout);
    compare(
        "upstream.connect_timeout",
        *connect_timeout != n.connect_timeout,
    );
    compare("upstream.max_in_flight", *max_in_flight != n.max_in_flight);
    compare("upstream.queue_timeout", *queue_timeout != n.queue_timeout);
    compare(
        "upstream.token_refresh_margin",
        *token_refresh_margin != n.token_refresh_margin,
    );
    compare("upstream.retries", *retries != n.retries);
    compare("upstream.retry_budget", *retry_budget != n.retry_budget);
    compare(
        "upstream.circuit_failures",
        *circuit_failures != n.circuit_failures,
    );
    compare(
        "upstream.circuit_cooldown",
        *circuit_cooldown != n.circuit_cooldown,
    );
    compare("upstream.fleet_max_rps", *fleet_max_rps != n.fleet_max_rps);
    compare("upstream.fleet_circuit", *fleet_circuit != n.fleet_circuit);
    let bill24::tls::Tls {
        extra_roots,
        client_identity,
    } = tls;
    compare("upstream.ca_file", *extra_roots != n.tls.extra_roots);
    compare(
        "upstream.client_cert_file",
        *client_identity != n.tls.client_identity,
    );
    compare("upstream.proxy", *proxy != n.proxy);

    let CacheConfig {
        ttl: _, // applied
        max_entries,
        max_bytes,
        negative_ttl: _,   // applied
        stale_if_error: _, // applied
        refresh_ahead: _,  // applied
        ttl_jitter: _,     // applied
    } = cache;
    compare("cache.max_entries", *max_entries != new.cache.max_entries);
    compare("cache.max_bytes", *max_bytes != new.cache.max_bytes);

    let LogConfig {
        format,
        level: _,         // applied
        access_sample: _, // applied
    } = log;
    compare("log.format", *format != new.log.format);

    // The shared tier's connections are made at start.
    match (redis.as_ref(), new.redis.as_ref()) {
        (None, None) => {}
        (
            Some(RedisConfig {
                urls,
                cluster,
                username,
                password,
                key_prefix,
                timeout,
            }),
            Some(n),
        ) => {
            compare("redis.urls", *urls != n.urls);
            compare("redis.cluster", *cluster != n.cluster);
            compare("redis.username", *username != n.username);
            compare("redis.password", *password != n.password);
            compare("redis.key_prefix", *key_prefix != n.key_prefix);
            compare("redis.timeout", *timeout != n.timeout);
        }
        // Turned on or off.
        _ => compare("redis.urls", true),
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawConfig, known_keys};
    use crate::metrics::Metrics;
    use figment::Figment;
    use figment::providers::{Format, Serialized, Toml};
    use std::collections::BTreeSet;

    const HASH: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    /// A new value for every key (`*_file` keys change the secret they name, as the inline
    /// form does).
    fn changes() -> Vec<(&'static str, String)> {
        let mut c: Vec<(&'static str, String)> = [
            ("server.listen", "[server]\nlisten = \"127.0.0.1:1\""),
            (
                "server.admin_listen",
                "[server]\nadmin_listen = \"127.0.0.1:2\"",
            ),
            ("server.max_body_bytes", "[server]\nmax_body_bytes = 1"),
            (
                "server.request_timeout",
                "[server]\nrequest_timeout = \"1s\"",
            ),
            ("server.shutdown_grace", "[server]\nshutdown_grace = \"1s\""),
            ("server.drain_delay", "[server]\ndrain_delay = \"1s\""),
            (
                "server.header_read_timeout",
                "[server]\nheader_read_timeout = \"1s\"",
            ),
            ("server.idle_timeout", "[server]\nidle_timeout = \"1s\""),
            ("server.max_connections", "[server]\nmax_connections = 1"),
            ("server.worker_threads", "[server]\nworker_threads = 3"),
            (
                "upstream.base_url",
                "[upstream]\nbase_url = \"http://127.0.0.1:10\"",
            ),
            (
                "upstream.merchant_token",
                "[upstream]\nmerchant_token = \"x\"",
            ),
            ("upstream.client_id", "[upstream]\nclient_id = \"x\""),
            (
                "upstream.client_secret",
                "[upstream]\nclient_secret = \"x\"",
            ),
            ("upstream.timeout", "[upstream]\ntimeout = \"1s\""),
            (
                "upstream.connect_timeout",
                "[upstream]\nconnect_timeout = \"2s\"",
            ),
            ("upstream.max_in_flight", "[upstream]\nmax_in_flight = 1"),
            (
                "upstream.queue_timeout",
                "[upstream]\nqueue_timeout = \"2s\"",
            ),
            (
                "upstream.token_refresh_margin",
                "[upstream]\ntoken_refresh_margin = \"1s\"",
            ),
            ("upstream.retries", "[upstream]\nretries = 0"),
            ("upstream.retry_budget", "[upstream]\nretry_budget = 0.5"),
            (
                "upstream.circuit_failures",
                "[upstream]\ncircuit_failures = 1",
            ),
            (
                "upstream.circuit_cooldown",
                "[upstream]\ncircuit_cooldown = \"1s\"",
            ),
            (
                "upstream.proxy",
                "[upstream]\nproxy = \"http://127.0.0.1:3128\"",
            ),
            ("upstream.fleet_max_rps", "[upstream]\nfleet_max_rps = 20"),
            (
                "upstream.fleet_circuit",
                "[upstream]\nfleet_circuit = false",
            ),
            ("cache.ttl", "[cache]\nttl = \"1s\""),
            ("cache.max_entries", "[cache]\nmax_entries = 1"),
            ("cache.max_bytes", "[cache]\nmax_bytes = 2097152"),
            ("cache.negative_ttl", "[cache]\nnegative_ttl = \"1s\""),
            ("cache.stale_if_error", "[cache]\nstale_if_error = \"1s\""),
            ("cache.refresh_ahead", "[cache]\nrefresh_ahead = \"1s\""),
            ("cache.ttl_jitter", "[cache]\nttl_jitter = 0.5"),
            ("log.format", "[log]\nformat = \"text\""),
            ("log.level", "[log]\nlevel = \"debug\""),
            ("log.access_sample", "[log]\naccess_sample = 0.5"),
            ("redis.urls", "[redis]\nurls = [\"redis://127.0.0.1:2\"]"),
            ("redis.cluster", "[redis]\ncluster = true"),
            ("redis.username", "[redis]\nusername = \"u\""),
            ("redis.password", "[redis]\npassword = \"p\""),
            ("redis.key_prefix", "[redis]\nkey_prefix = \"other\""),
            ("redis.timeout", "[redis]\ntimeout = \"1s\""),
            ("jwt.issuer", "[jwt]\nissuer = \"https://other.example\""),
            ("jwt.audience", "[jwt]\naudience = \"another-service\""),
            (
                "jwt.jwks_url",
                "[jwt]\njwks_url = \"http://127.0.0.1:2/jwks\"",
            ),
            ("jwt.leeway", "[jwt]\nleeway = \"1s\""),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        c.push((
            "server.admin_key_sha256",
            format!("[server]\nadmin_key_sha256 = \"{HASH}\""),
        ));
        c.push((
            "callers",
            format!("[[callers]]\nname = \"a\"\nkey_sha256 = \"{HASH}\""),
        ));
        c
    }

    fn config(toml: &str) -> Config {
        let base = "[upstream]\nbase_url = \"http://127.0.0.1:9\"\nclient_id = \"c\"\n\
                    [redis]\nurls = [\"redis://127.0.0.1:1\"]\n\
                    [jwt]\nissuer = \"https://issuer.example\"\n\
                    jwks_url = \"http://127.0.0.1:1/jwks\"\n";
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(base))
            .merge(Toml::string(toml))
            .extract()
            .expect("a valid change");
        raw.validate().expect("valid")
    }

    /// A reloader over a gateway running `old`: the Bill24 client (to stop) and the fleet
    /// digest it keeps up to date come with it.
    fn reloader_for(old: &Config) -> (Reloader, Arc<bill24::Bill24>, Arc<ArcSwap<String>>) {
        let metrics = Arc::new(Metrics::new());
        let bill24 =
            Arc::new(bill24::Bill24::start(&old.upstream, metrics.clone(), None).expect("client"));
        let cache = Arc::new(crate::balance::cache::BalanceCache::new(10, 1 << 20));
        let digest = Arc::new(ArcSwap::from_pointee(old.fleet_digest()));
        let reloader = Reloader::new(
            old.clone(),
            Arc::new(ArcSwap::from_pointee(CallerKeys::new(&old.callers))),
            Balances::new(old.cache.clone(), cache, bill24.clone(), metrics),
            Arc::new(ArcSwap::from_pointee(old.server.admin_key_sha256)),
            AccessSample::new(old.log.access_sample),
            digest.clone(),
            Arc::new(Identity::keys_only()),
        );
        (reloader, bill24, digest)
    }

    /// Every key of the config, changed alone, is either applied at once or reported as
    /// needing a restart: never silently ignored.
    #[tokio::test]
    async fn every_key_is_applied_or_reported() {
        let changes = changes();
        let listed: BTreeSet<&str> = changes.iter().map(|(k, _)| *k).collect();
        let known: BTreeSet<String> = known_keys()
            .into_keys()
            .filter(|k| !k.ends_with("_file"))
            .collect();
        assert_eq!(
            known,
            listed.iter().map(|k| k.to_string()).collect(),
            "a change for every key"
        );
        for (key, toml) in changes {
            let old = config("");
            let (reloader, bill24, _) = reloader_for(&old);
            let new = config(&toml);
            assert_ne!(old, new, "{key}: the change changes the config");
            let report = reloader
                .apply(new, Explicit::default())
                .expect("a change, not an emptying");
            let section = key.split('.').next().unwrap_or(key);
            let applied = report.applied.contains(&key)
                || (section == "cache" && report.applied.contains(&"cache"))
                || (section == "jwt" && report.applied.contains(&"jwt"));
            let reported = report.needs_restart == [key];
            assert!(
                applied != reported,
                "{key}: applied {:?}, needs restart {:?}",
                report.applied,
                report.needs_restart
            );
            assert!(
                report.needs_restart.is_empty() || report.applied.is_empty(),
                "{key}: one or the other: {report:?}"
            );
            bill24.stop();
        }
    }

    /// The digest the fleet sees follows what a reload puts in effect: a new `cache.ttl` at
    /// once, a restart-only key not until the restart.
    #[tokio::test]
    async fn the_fleet_digest_follows_what_a_reload_applies() {
        let old = config("");
        let (reloader, bill24, digest) = reloader_for(&old);
        let restart_only = config("[upstream]\nretries = 0");
        assert_ne!(restart_only.fleet_digest(), old.fleet_digest());
        reloader
            .apply(restart_only, Explicit::default())
            .expect("applied");
        assert_eq!(**digest.load(), old.fleet_digest(), "still the running one");
        let ttl = config("[cache]\nttl = \"1s\"");
        reloader
            .apply(ttl.clone(), Explicit::default())
            .expect("applied");
        assert_ne!(**digest.load(), old.fleet_digest());
        assert_eq!(**digest.load(), ttl.fleet_digest());
        bill24.stop();
    }
}
