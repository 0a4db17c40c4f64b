//! Micro-benchmarks of the cache-hit path, piece by piece, and of the whole tower stack in
//! process (no sockets): caller-key check, body parse and validation, cache lookup, response
//! build, request metrics, and one full hit; and what the shared tier does to an entry (seal
//! and open) beside an HMAC of the same bytes. `cargo bench --bench hit_path`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use bill24::Bill24;
use bill24_gateway::config::{CallerConfig, RawConfig};
use bill24_gateway::hash_key;
use bill24_gateway::internals::{
    AccessSample, BalanceCache, Balances, CacheDirectives, CacheStatus, CallerKeys, Entry,
    Identity, InFlight, Metrics, StackParts, UnauthorizedLines, bearer_key, build_stack,
    cached_response, is_json_content_type, parse_body, seal,
};
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

const BODY: &[u8] = br#"{"code":"000","message":"Success","message_kh":"ok","data":[{"id":"w-6-khr","name":"BENCH1's Wallet(KHR)","balance":620100,"currency":"KHR"}]}"#;

fn callers(n: usize) -> Vec<CallerConfig> {
    (0..n)
        .map(|i| CallerConfig {
            name: Arc::from(format!("caller-{i}")),
            key_sha256: vec![hash_key(format!("key-{i}").as_bytes())],
            spiffe_id: None,
            jwt_subject: None,
            rate_limit_rps: 0.0,
            burst: 0,
            max_concurrent: 0,
            limit_scope: Default::default(),
        })
        .collect()
}

fn entry() -> Entry {
    Entry {
        body: Bytes::from_static(BODY),
        content_type: HeaderValue::from_static("application/json; charset=utf-8"),
        bill24_code: smol_str::SmolStr::new_static("000"),
        stored_at: Instant::now(),
        fresh_for: Duration::from_secs(3600),
        stale_for: Duration::ZERO,
        refreshing: AtomicBool::new(false),
    }
}

fn pieces(c: &mut Criterion) {
    let keys = CallerKeys::new(&callers(10));
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_static("Bearer key-7"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    c.bench_function("auth: bearer + sha256 + compare with 10 callers", |b| {
        b.iter(|| {
            keys.identify(bearer_key(&headers).unwrap_or_default())
                .is_some()
        })
    });
    c.bench_function("request: content-type + cache-control + body parse", |b| {
        b.iter(|| {
            is_json_content_type(&headers)
                && CacheDirectives::from_headers(&headers).accepts(Duration::ZERO)
                && parse_body(br#"{"customer_sync_code":"BENCH123"}"#).is_ok()
        })
    });

    let cache = BalanceCache::new(100_000, 128 << 20);
    let codes: Vec<String> = (0..1000).map(|i| format!("BENCH{i}")).collect();
    for code in &codes {
        cache.insert(code.into(), Arc::new(entry()));
    }
    let mut i = 0usize;
    c.bench_function("cache: moka lookup of a present key (1000 entries)", |b| {
        b.iter(|| {
            i = (i + 7919) % 1000;
            cache.get(&codes[i]).is_some()
        })
    });
    let e = entry();
    c.bench_function("response: build a HIT from an entry", |b| {
        b.iter(|| cached_response(&e, CacheStatus::Hit, Instant::now()))
    });
    let metrics = Metrics::new();
    c.bench_function("metrics: count and time one request", |b| {
        b.iter(|| {
            metrics.request(
                "caller-7",
                200,
                "hit",
                Duration::from_micros(30),
                Some(false),
            )
        })
    });
}

fn full_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut raw = RawConfig::default();
    // Nothing listens there: every request must be a hit.
    raw.upstream.base_url = "http://127.0.0.1:9".into();
    raw.cache.ttl = Duration::from_secs(3600);
    let config = raw.validate().expect("valid");
    let mut service = rt.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let bill24 =
            Arc::new(Bill24::start(&config.upstream, metrics.clone(), None).expect("client"));
        let cache = Arc::new(BalanceCache::new(
            config.cache.max_entries,
            config.cache.max_bytes,
        ));
        let balances = Balances::new(config.cache.clone(), cache, bill24, metrics.clone());
        for i in 0..1000 {
            balances
                .cache()
                .insert(format!("BENCH{i}").into(), Arc::new(entry()));
        }
        let parts = StackParts {
            metrics,
            in_flight: InFlight::default(),
            access_sample: AccessSample::new(1.0),
            unauthorized_lines: UnauthorizedLines::new(),
            callers: Arc::new(ArcSwap::from_pointee(CallerKeys::new(&callers(10)))),
            balances,
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 8192,
            fleet_rate: None,
            identity: Arc::new(Identity::keys_only()),
        };
        build_stack::<Full<Bytes>>(&parts)
    });
    let mut i = 0usize;
    c.bench_function(
        "stack: one cache hit through every layer (no sockets)",
        |b| {
            b.iter(|| {
                i = (i + 1) % 1000;
                let req = Request::post(bill24::BALANCE_PATH)
                    .header("authorization", "Bearer key-7")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"customer_sync_code":"BENCH{i}"}}"#
                    ))))
                    .expect("request");
                let response: Result<_, Infallible> =
                    rt.block_on(async { service.ready().await?.call(req).await });
                response.map(|r| r.status())
            })
        },
    );
}

/// An entry as the fleet stores it in Redis: sealed (encrypted and authenticated) on a fill,
/// opened on an L1 miss that Redis answers. Beside it, an HMAC-SHA256 over the same bytes
/// (the work of authenticating it without encrypting it), as a baseline.
fn fleet_entry(c: &mut Criterion) {
    let keys = seal::Keys::derive(
        &bill24::Secret::new("merchant-token"),
        "client-id",
        &bill24::Secret::new("client-secret"),
    );
    let stored = seal::StoredEntry {
        stored_at_ms: 1_764_000_000_000,
        fresh_for_ms: 4_000,
        stale_for_ms: 0,
        epoch: 7,
        bill24_code: smol_str::SmolStr::new_static("000"),
        content_type: Bytes::from_static(b"application/json; charset=utf-8"),
        body: Bytes::from_static(BODY),
    };
    let key = "bill24gw:client-id:{42454e43483132}:entry";
    let sealed = seal::seal_entry(&keys, key, "BENCH12", &stored);
    c.bench_function("fleet entry: seal (XChaCha20-Poly1305)", |b| {
        b.iter(|| seal::seal_entry(&keys, key, "BENCH12", &stored))
    });
    c.bench_function("fleet entry: open (XChaCha20-Poly1305)", |b| {
        b.iter(|| seal::open_entry(&keys, key, "BENCH12", &sealed).is_ok())
    });
    let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"an entry authentication key");
    c.bench_function("fleet entry: baseline HMAC-SHA256 of the same bytes", |b| {
        b.iter(|| ring::hmac::sign(&mac, &sealed))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = pieces, full_hit, fleet_entry
}
criterion_main!(benches);
