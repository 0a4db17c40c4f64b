//! Reloading the config while running (SIGHUP): callers (keys and limits), cache durations,
//! the admin key and access-log sampling take effect at once, without dropping connections;
//! the log level is applied by the caller of [`Reloader::apply`] (it owns the subscriber).
//! Anything else that changed is reported as needing a restart and left as it runs.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::access_log::AccessSample;
use crate::auth::CallerKeys;
use crate::balance::service::Balances;
use crate::config::{Config, KeyHash};

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
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    macro_rules! compare {
        ($($section:ident . $key:ident),* $(,)?) => {
            $(
                if old.$section.$key != new.$section.$key {
                    keys.push(concat!(stringify!($section), ".", stringify!($key)));
                }
            )*
        };
    }
    compare!(
        server.listen,
        server.admin_listen,
        server.max_body_bytes,
        server.request_timeout,
        server.shutdown_grace,
        server.drain_delay,
        server.header_read_timeout,
        server.idle_timeout,
        server.max_connections,
        server.worker_threads,
        upstream.base_url,
        upstream.merchant_token,
        upstream.client_id,
        upstream.client_secret,
        upstream.timeout,
        upstream.connect_timeout,
        upstream.max_in_flight,
        upstream.queue_timeout,
        upstream.token_refresh_margin,
        upstream.retries,
        upstream.retry_budget,
        upstream.circuit_failures,
        upstream.circuit_cooldown,
        cache.max_entries,
        log.format,
    );
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
        new.upstream.client_secret = crate::secret::Secret::new("other");
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
