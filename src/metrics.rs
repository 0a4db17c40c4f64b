//! Prometheus metrics (CONTRACT §6): one registry per gateway instance, rendered by the admin
//! listener. Names and labels are listed in README.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use bill24::circuit::CircuitState;
use bill24::{Endpoint, Observer};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub(crate) const REQUESTS_TOTAL: &str = "gateway_requests_total";
pub(crate) const REQUEST_DURATION: &str = "gateway_request_duration_seconds";
pub(crate) const UPSTREAM_REQUESTS_TOTAL: &str = "gateway_upstream_requests_total";
pub(crate) const UPSTREAM_DURATION: &str = "gateway_upstream_duration_seconds";
pub(crate) const CACHE_ENTRIES: &str = "gateway_cache_entries";
pub(crate) const COALESCED_TOTAL: &str = "gateway_coalesced_requests_total";
pub(crate) const TOKEN_REFRESHES_TOTAL: &str = "gateway_token_refreshes_total";
pub(crate) const TOKEN_EXPIRES_IN: &str = "gateway_token_expires_in_seconds";
pub(crate) const BUILD_INFO: &str = "gateway_build_info";
pub(crate) const UPSTREAM_RETRIES_TOTAL: &str = "gateway_upstream_retries_total";
pub(crate) const UPSTREAM_RETRIES_DENIED_TOTAL: &str = "gateway_upstream_retries_denied_total";
pub(crate) const CIRCUIT_STATE: &str = "gateway_circuit_state";
pub(crate) const CIRCUIT_OPENED_TOTAL: &str = "gateway_circuit_opened_total";
pub(crate) const REFRESH_AHEAD_TOTAL: &str = "gateway_cache_refresh_ahead_total";
pub(crate) const CACHE_HITS_TOTAL: &str = "gateway_cache_hits_total";
pub(crate) const REDIS_UP: &str = "gateway_redis_up";
pub(crate) const REDIS_REQUESTS_TOTAL: &str = "gateway_redis_requests_total";
pub(crate) const REDIS_DURATION: &str = "gateway_redis_duration_seconds";
pub(crate) const FLEET_FILL_WAITS_TOTAL: &str = "gateway_fleet_fill_waits_total";
pub(crate) const FLEET_LIMIT_WAIT: &str = "gateway_fleet_limit_wait_seconds";
pub(crate) const FLEET_REPLICAS: &str = "gateway_fleet_replicas";

/// Resolves cache hits (tens of µs) as well as slow Bill24 calls (seconds).
const REQUEST_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];
/// One Redis round trip: tens of microseconds on a LAN, up to `redis.timeout` (50 ms).
const REDIS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
const UPSTREAM_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Counters of `gateway_requests_total`, by caller, then (status, cache).
type RequestSeries =
    HashMap<Box<str>, Vec<(u16, &'static str, Counter)>, foldhash::fast::RandomState>;

/// The `cache` label values, whose duration histograms are registered up front.
const CACHE_LABELS: [&str; 5] = ["hit", "miss", "stale", "bypass", "-"];

/// Request metrics are counted per thread, each thread in a shard of its own, and folded into
/// the registry when it is read ([`Metrics::render`]) or tidied ([`Metrics::upkeep`]): a
/// request touches no cache line another serving thread writes (the registry's counters,
/// histogram buffers and reference counts are all shared). More threads than shards share.
pub(crate) const SHARDS: usize = 64;
/// Duration samples a shard keeps before its own thread folds them.
const FOLD_AT: usize = 1024;

/// One thread's counts since the last fold, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Local>);

#[derive(Default)]
struct Local {
    requests: Vec<Pending>,
    /// Samples of `gateway_request_duration_seconds` by [`CACHE_LABELS`] index.
    durations: [Vec<f64>; CACHE_LABELS.len()],
    /// `gateway_cache_hits_total`: L1, L2.
    hits: [u64; 2],
}

/// Requests of one `gateway_requests_total` series not folded yet.
struct Pending {
    status: u16,
    cache: &'static str,
    caller: Box<str>,
    count: u64,
}

/// This thread's shard, of [`SHARDS`] (per-thread counts elsewhere use the same).
pub(crate) fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    request_series: RwLock<RequestSeries>,
    request_durations: [Histogram; 5],
    shards: Box<[Shard]>,
    coalesced: Counter,
    cache_entries: Gauge,
    token_expires_in: Gauge,
    retries: Counter,
    retries_denied: Counter,
    circuit_state: Gauge,
    circuit_opened: Counter,
    refresh_ahead: Counter,
    cache_hits: [Counter; 2],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    #[expect(
        clippy::new_without_default,
        reason = "one registry per gateway, made where the gateway is built; no default one"
    )]
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), REQUEST_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(UPSTREAM_DURATION.into()), UPSTREAM_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(REDIS_DURATION.into()), REDIS_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(FLEET_LIMIT_WAIT.into()), UPSTREAM_BUCKETS)
            });
        // Only fails on an empty bucket list, which the constants above are not.
        let recorder = builder.unwrap_or_default().build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_counter(KeyName::from(name), None, SharedString::from(help));
        };
        describe(
            REQUESTS_TOTAL,
            "Requests answered on the in-house endpoint.",
        );
        describe(
            REQUEST_DURATION,
            "Time to answer a request, by cache outcome.",
        );
        describe(UPSTREAM_REQUESTS_TOTAL, "Requests sent to Bill24.");
        describe(UPSTREAM_DURATION, "Time Bill24 took to answer.");
        describe(CACHE_ENTRIES, "Entries in the balance cache.");
        describe(
            COALESCED_TOTAL,
            "Requests that joined another request's Bill24 call.",
        );
        describe(
            TOKEN_REFRESHES_TOTAL,
            "Access token requests to Bill24, by result.",
        );
        describe(
            TOKEN_EXPIRES_IN,
            "Seconds until the current access token expires.",
        );
        describe(BUILD_INFO, "The running build.");
        describe(
            UPSTREAM_RETRIES_TOTAL,
            "Balance calls to Bill24 that were retries.",
        );
        describe(
            UPSTREAM_RETRIES_DENIED_TOTAL,
            "Retries not made because the retry budget was spent.",
        );
        describe(
            CIRCUIT_STATE,
            "Circuit breaker on Bill24: 0 closed, 1 open, 2 half-open (probing).",
        );
        describe(
            CIRCUIT_OPENED_TOTAL,
            "Times the circuit breaker on Bill24 opened.",
        );
        describe(
            REFRESH_AHEAD_TOTAL,
            "Background refreshes started by a hit close to expiry.",
        );
        describe(
            CACHE_HITS_TOTAL,
            "Cache hits, by tier (l1: this replica, l2: Redis).",
        );
        describe(
            REDIS_UP,
            "Whether the shared tier (Redis) is in use: 1 up, 0 down.",
        );
        describe(
            REDIS_REQUESTS_TOTAL,
            "Calls to the shared tier, by operation and result.",
        );
        describe(REDIS_DURATION, "Time a call to the shared tier took.");
        describe(
            FLEET_FILL_WAITS_TOTAL,
            "Waits for another replica's fill, by how they ended.",
        );
        recorder.describe_histogram(
            KeyName::from(FLEET_LIMIT_WAIT),
            None,
            SharedString::from(
                "Time a Bill24 call waited for a place under the fleet's ceiling (upstream.fleet_max_rps).",
            ),
        );
        describe(
            FLEET_REPLICAS,
            "Replicas of the fleet alive, as this replica last saw them (1 without Redis).",
        );

        let coalesced = register_counter(&recorder, COALESCED_TOTAL, vec![]);
        let cache_entries = recorder.register_gauge(&Key::from_name(CACHE_ENTRIES), &metadata());
        let token_expires_in =
            recorder.register_gauge(&Key::from_name(TOKEN_EXPIRES_IN), &metadata());
        token_expires_in.set(0.0);
        recorder
            .register_gauge(
                &Key::from_parts(
                    BUILD_INFO,
                    vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
                ),
                &metadata(),
            )
            .set(1.0);
        // Counters with no traffic yet still show up as 0, so dashboards see the series.
        for result in ["success", "failure"] {
            register_counter(
                &recorder,
                TOKEN_REFRESHES_TOTAL,
                vec![Label::new("result", result)],
            )
            .absolute(0);
        }
        coalesced.absolute(0);
        let retries = register_counter(&recorder, UPSTREAM_RETRIES_TOTAL, vec![]);
        retries.absolute(0);
        let retries_denied = register_counter(&recorder, UPSTREAM_RETRIES_DENIED_TOTAL, vec![]);
        retries_denied.absolute(0);
        let circuit_opened = register_counter(&recorder, CIRCUIT_OPENED_TOTAL, vec![]);
        circuit_opened.absolute(0);
        let circuit_state = recorder.register_gauge(&Key::from_name(CIRCUIT_STATE), &metadata());
        circuit_state.set(0.0);
        let refresh_ahead = register_counter(&recorder, REFRESH_AHEAD_TOTAL, vec![]);
        refresh_ahead.absolute(0);
        // Alone until a heartbeat says otherwise.
        recorder
            .register_gauge(&Key::from_name(FLEET_REPLICAS), &metadata())
            .set(1.0);

        let request_durations = CACHE_LABELS.map(|cache| {
            recorder.register_histogram(
                &Key::from_parts(REQUEST_DURATION, vec![Label::new("cache", cache)]),
                &metadata(),
            )
        });

        let cache_hits = ["l1", "l2"].map(|tier| {
            let counter =
                register_counter(&recorder, CACHE_HITS_TOTAL, vec![Label::new("tier", tier)]);
            counter.absolute(0);
            counter
        });

        Metrics {
            cache_hits,
            request_series: RwLock::new(HashMap::default()),
            request_durations,
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            recorder,
            handle,
            coalesced,
            cache_entries,
            token_expires_in,
            retries,
            retries_denied,
            circuit_state,
            circuit_opened,
            refresh_ahead,
        }
    }

    /// One answered request on the in-house endpoint; `hit`: answered HIT, from this
    /// replica's cache (`Some(false)`) or the shared tier (`Some(true)`). Counted in this
    /// thread's shard.
    pub fn request(
        &self,
        caller: &str,
        status: u16,
        cache: &'static str,
        elapsed: Duration,
        hit: Option<bool>,
    ) {
        let Some(label) = CACHE_LABELS.iter().position(|l| *l == cache) else {
            // No such label today; counted at once rather than kept.
            self.request_counter(caller, status, cache).increment(1);
            self.recorder
                .register_histogram(
                    &Key::from_parts(REQUEST_DURATION, vec![Label::new("cache", cache)]),
                    &metadata(),
                )
                .record(elapsed.as_secs_f64());
            return;
        };
        let Some(shard) = self.shards.get(thread_slot()) else {
            return;
        };
        let mut local = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
        match local
            .requests
            .iter_mut()
            .find(|p| p.status == status && p.cache == cache && *p.caller == *caller)
        {
            Some(pending) => pending.count += 1,
            None => local.requests.push(Pending {
                status,
                cache,
                caller: caller.into(),
                count: 1,
            }),
        }
        if let Some(l2) = hit {
            local.hits[usize::from(l2)] += 1;
        }
        let samples = &mut local.durations[label];
        samples.push(elapsed.as_secs_f64());
        if samples.len() >= FOLD_AT {
            for sample in samples.drain(..) {
                self.request_durations[label].record(sample);
            }
        }
    }

    /// Moves every shard's counts into the registry.
    fn fold(&self) {
        for shard in &self.shards {
            let mut local = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
            let Local {
                requests,
                durations,
                hits,
            } = &mut *local;
            for pending in requests.iter_mut().filter(|p| p.count > 0) {
                self.request_counter(&pending.caller, pending.status, pending.cache)
                    .increment(std::mem::take(&mut pending.count));
            }
            for (histogram, samples) in self.request_durations.iter().zip(durations) {
                for sample in samples.drain(..) {
                    histogram.record(sample);
                }
            }
            for (counter, count) in self.cache_hits.iter().zip(hits) {
                if *count > 0 {
                    counter.increment(std::mem::take(count));
                }
            }
        }
    }

    /// The counter for one (caller, status, cache) series, registered once: the hit path
    /// only takes a read lock and compares a few labels.
    fn request_counter(&self, caller: &str, status: u16, cache: &'static str) -> Counter {
        let find = |series: &RequestSeries| {
            series.get(caller).and_then(|list| {
                list.iter()
                    .find(|(s, c, _)| *s == status && *c == cache)
                    .map(|(_, _, counter)| counter.clone())
            })
        };
        if let Ok(series) = self.request_series.read()
            && let Some(counter) = find(&series)
        {
            return counter;
        }
        let counter = register_counter(
            &self.recorder,
            REQUESTS_TOTAL,
            vec![
                Label::new("caller", caller.to_string()),
                Label::new("status", status.to_string()),
                Label::new("cache", cache),
            ],
        );
        if let Ok(mut series) = self.request_series.write() {
            series
                .entry(Box::from(caller))
                .or_default()
                .push((status, cache, counter.clone()));
        }
        counter
    }

    pub fn coalesced(&self) {
        self.coalesced.increment(1);
    }

    pub fn refresh_ahead(&self) {
        self.refresh_ahead.increment(1);
    }

    pub fn set_redis_up(&self, up: bool) {
        self.recorder
            .register_gauge(&Key::from_name(REDIS_UP), &metadata())
            .set(if up { 1.0 } else { 0.0 });
    }

    /// Replicas alive at the last heartbeat (the last count seen while Redis is down).
    pub fn set_fleet_replicas(&self, replicas: usize) {
        self.recorder
            .register_gauge(&Key::from_name(FLEET_REPLICAS), &metadata())
            .set(replicas as f64);
    }

    /// One call to the shared tier (`result`: `ok`, `error`, `timeout`, `rejected` for a value
    /// that did not verify, `skipped` while the tier is down), with its time when it was made.
    pub fn redis(&self, op: &'static str, result: &'static str, elapsed: Option<Duration>) {
        register_counter(
            &self.recorder,
            REDIS_REQUESTS_TOTAL,
            vec![Label::new("op", op), Label::new("result", result)],
        )
        .increment(1);
        if let Some(elapsed) = elapsed {
            self.recorder
                .register_histogram(
                    &Key::from_parts(REDIS_DURATION, vec![Label::new("op", op)]),
                    &metadata(),
                )
                .record(elapsed.as_secs_f64());
        }
    }

    /// A Bill24 call waited this long under the fleet's ceiling.
    pub fn fleet_limit_wait(&self, waited: Duration) {
        self.recorder
            .register_histogram(&Key::from_name(FLEET_LIMIT_WAIT), &metadata())
            .record(waited.as_secs_f64());
    }

    /// A wait for another replica's fill ended (`filled`, `failed`, `timed_out`,
    /// `tier_down`).
    pub fn fleet_fill_wait(&self, outcome: &'static str) {
        register_counter(
            &self.recorder,
            FLEET_FILL_WAITS_TOTAL,
            vec![Label::new("outcome", outcome)],
        )
        .increment(1);
    }

    pub fn set_cache_entries(&self, entries: u64) {
        self.cache_entries.set(entries as f64);
    }

    pub fn set_token_expires_in(&self, seconds: f64) {
        self.token_expires_in.set(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.fold();
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets; run periodically so memory stays
    /// bounded between scrapes.
    pub fn upkeep(&self) {
        self.fold();
        self.handle.run_upkeep();
    }
}

/// What the Bill24 client reports.
impl Observer for Metrics {
    fn upstream(&self, endpoint: Endpoint, status: &str, bill24_code: &str, elapsed: Duration) {
        let labels = vec![
            Label::new("endpoint", endpoint.as_str()),
            Label::new("status", status.to_string()),
            Label::new("bill24_code", bill24_code.to_string()),
        ];
        register_counter(&self.recorder, UPSTREAM_REQUESTS_TOTAL, labels).increment(1);
        self.recorder
            .register_histogram(
                &Key::from_parts(
                    UPSTREAM_DURATION,
                    vec![Label::new("endpoint", endpoint.as_str())],
                ),
                &metadata(),
            )
            .record(elapsed.as_secs_f64());
    }

    fn retry(&self) {
        self.retries.increment(1);
    }

    fn retry_denied(&self) {
        self.retries_denied.increment(1);
    }

    fn circuit(&self, state: CircuitState, opened: bool) {
        self.circuit_state.set(state as u8 as f64);
        if opened {
            self.circuit_opened.increment(1);
        }
    }

    fn token_refresh(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        register_counter(
            &self.recorder,
            TOKEN_REFRESHES_TOTAL,
            vec![Label::new("result", result)],
        )
        .increment(1);
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

fn register_counter(
    recorder: &PrometheusRecorder,
    name: &'static str,
    labels: Vec<Label>,
) -> Counter {
    recorder.register_counter(&Key::from_parts(name, labels), &metadata())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_contract_names_and_labels() {
        let m = Metrics::new();
        m.request("orders", 200, "hit", Duration::from_micros(40), Some(false));
        m.request("orders", 200, "hit", Duration::from_micros(40), Some(true));
        m.request("-", 401, "-", Duration::from_micros(10), None);
        m.upstream(Endpoint::Balance, "200", "000", Duration::from_millis(12));
        m.upstream(Endpoint::Authorize, "200", "200", Duration::from_millis(3));
        m.coalesced();
        m.token_refresh(true);
        m.set_cache_entries(3);
        let text = m.render();
        for needle in [
            r#"gateway_requests_total{caller="orders",status="200",cache="hit"} 2"#,
            r#"gateway_requests_total{caller="-",status="401",cache="-"} 1"#,
            r#"gateway_request_duration_seconds_bucket{cache="hit",le="0.00005"} 2"#,
            r#"gateway_cache_hits_total{tier="l1"} 1"#,
            r#"gateway_cache_hits_total{tier="l2"} 1"#,
            r#"gateway_upstream_requests_total{endpoint="balance",status="200",bill24_code="000"} 1"#,
            r#"gateway_upstream_duration_seconds_count{endpoint="authorize"} 1"#,
            "gateway_coalesced_requests_total 1",
            r#"gateway_token_refreshes_total{result="success"} 1"#,
            r#"gateway_token_refreshes_total{result="failure"} 0"#,
            "gateway_cache_entries 3",
            "gateway_token_expires_in_seconds 0",
            "gateway_fleet_replicas 1",
            "gateway_build_info{version=",
            "# HELP gateway_requests_total",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    /// Requests counted on many threads at once, more threads than shards, are all there
    /// when the metrics are read, also read while they are being counted.
    #[test]
    fn requests_counted_on_many_threads_all_show() {
        let m = std::sync::Arc::new(Metrics::new());
        let threads = SHARDS + 8;
        let per_thread = FOLD_AT + 7;
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let caller = if i % 2 == 0 { "orders" } else { "billing" };
                    for _ in 0..per_thread {
                        m.request(caller, 200, "hit", Duration::from_micros(30), Some(false));
                    }
                })
            })
            .collect();
        let _ = m.render();
        for worker in workers {
            worker.join().expect("worker");
        }
        let text = m.render();
        let half = threads / 2 * per_thread;
        for needle in [
            format!(r#"gateway_requests_total{{caller="orders",status="200",cache="hit"}} {half}"#),
            format!(
                r#"gateway_requests_total{{caller="billing",status="200",cache="hit"}} {half}"#
            ),
            format!(
                r#"gateway_cache_hits_total{{tier="l1"}} {}"#,
                threads * per_thread
            ),
            format!(
                r#"gateway_request_duration_seconds_count{{cache="hit"}} {}"#,
                threads * per_thread
            ),
        ] {
            assert!(text.contains(&needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn instances_do_not_share_counts() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.coalesced();
        assert!(a.render().contains("gateway_coalesced_requests_total 1"));
        assert!(b.render().contains("gateway_coalesced_requests_total 0"));
    }
}
