//! Reloading the config while running (SIGHUP): callers (keys and limits), cache durations,
//! the admin key and access-log sampling take effect at once, without dropping connections;
//! the log level is applied by the caller of [`Reloader::apply`] (it owns the subscriber).
//! Anything else that changed is reported as needing a restart and left as it runs.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::access_log::AccessSample;
use crate::auth::CallerKeys;
use crate::balance::service::Balances;
use crate::config::{CacheConfig, Config, KeyHash, LogConfig, ServerConfig, UpstreamConfig};

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys (or sections) whose new values are now in effect.
    pub applied: Vec<&'static str>,
    /// Keys that changed but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
    /// The new `log.level`, when it changed (for the subscriber's owner to apply).
    pub log_level: Option<String>,
}

/// Applies new configs to a running gateway. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    current: Arc<Mutex<Config>>,
    callers: Arc<ArcSwap<CallerKeys>>,
    balances: Arc<Balances>,
    admin_key: Arc<ArcSwap<Option<KeyHash>>>,
    access_sample: AccessSample,
}

impl Reloader {
    pub(crate) fn new(
        current: Config,
        callers: Arc<ArcSwap<CallerKeys>>,
        balances: Arc<Balances>,
        admin_key: Arc<ArcSwap<Option<KeyHash>>>,
        access_sample: AccessSample,
    ) -> Self {
        Reloader {
            current: Arc::new(Mutex::new(current)),
            callers,
            balances,
            admin_key,
            access_sample,
        }
    }

    /// Applies what can change at run time; reports the rest. `new` must be validated.
    pub fn apply(&self, new: Config) -> ReloadReport {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = ReloadReport {
            needs_restart: restart_only_changes(&current, &new),
            ..ReloadReport::default()
        };
        if current.callers != new.callers {
            let keys = CallerKeys::replacing(&new.callers, &self.callers.load());
            self.callers.store(Arc::new(keys));
            report.applied.push("callers");
        }
        // `cache.max_entries` sized the cache when it was built; the running one stays.
        let mut cache = new.cache.clone();
        cache.max_entries = current.cache.max_entries;
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
        // Remember what is in effect: the reloadable parts as applied, the rest as running.
        current.callers = new.callers;
        current.server.admin_key_sha256 = new.server.admin_key_sha256;
        current.log.access_sample = new.log.access_sample;
        current.log.level = new.log.level;
        report
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

    let CacheConfig {
        ttl: _, // applied
        max_entries,
        negative_ttl: _,   // applied
        stale_if_error: _, // applied
        refresh_ahead: _,  // applied
        ttl_jitter: _,     // applied
    } = cache;
    compare("cache.max_entries", *max_entries != new.cache.max_entries);

    let LogConfig {
        format,
        level: _,         // applied
        access_sample: _, // applied
    } = log;
    compare("log.format", *format != new.log.format);
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn config() -> Config {
        RawConfig::default().validate().expect("defaults are valid")
    }

    #[test]
    fn every_runtime_key_is_either_reloadable_or_reported() {
        let old = config();
        let mut new = config();
        new.server.listen = "127.0.0.1:1".parse().expect("addr");
        new.upstream.timeout = std::time::Duration::from_secs(1);
        new.upstream.client_secret = bill24::Secret::new("other");
        new.cache.max_entries = 5;
        new.log.format = crate::config::LogFormat::Text;
        assert_eq!(
            restart_only_changes(&old, &new),
            [
                "server.listen",
                "upstream.client_secret",
                "upstream.timeout",
                "cache.max_entries",
                "log.format"
            ]
        );
        assert!(restart_only_changes(&old, &old).is_empty());
    }
}
