//! The admin listener (CONTRACT §5) and the metrics it serves (§6).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bill24_gateway::config::{RedisConfig, SecretUrl};
use bill24_sim::Fault;
use common::*;
use http::{Method, StatusCode};

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let r = app.admin(Method::GET, "/healthz", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.admin(Method::GET, "/readyz", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    // A 405's body names the methods its Allow header lists.
    let r = app.admin(Method::POST, "/healthz", &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(r.error_code(), "method_not_allowed");
    assert_eq!(r.json()["message"], "method not allowed; use GET, HEAD");
    let r = app.admin(Method::GET, "/cache", &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.header("allow"), Some("DELETE"));
    assert_eq!(r.json()["message"], "method not allowed; use DELETE");
    let r = app.admin(Method::GET, "/nope", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "not_found");
}

/// Readiness does not follow Bill24: an outage must not pull every pod out of service.
#[tokio::test]
async fn readiness_ignores_bill24_outages() {
    let app = spawn_app().await;
    app.sim.set_balance_fault(Some(Fault::Status(500)));
    app.sim.set_authorize_fault(Some(Fault::Status(500)));
    app.sim.revoke_all_tokens();
    assert_eq!(app.balance("C1").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        app.admin(Method::GET, "/readyz", &[]).await.status,
        StatusCode::OK
    );
}

/// Every metric of §6 with its labels and exact values, lowercase label values, `caller="-"` for
/// unauthenticated; and without `[redis]`, README.md's metrics but the shared tier's, each of
/// its documented type, and no other.
#[tokio::test]
async fn metrics_cover_the_contract() {
    let app = spawn_app_with(|c| c.upstream.retries = 0).await;
    app.balance("M1").await; // miss
    app.balance("M1").await; // hit
    app.post(None, body_for("M1"), &[]).await; // 401
    app.post(Some(ORDERS_KEY), "nope", &[]).await; // 400
    app.sim.fail_next(1, Fault::Status(500));
    app.balance("M2").await; // 502
    app.balance("UNKNOWN-7").await; // 311

    let r = app.admin(Method::GET, "/metrics", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain"))
    );
    let text = String::from_utf8(r.body.to_vec()).expect("utf-8");
    let samples = samples(&text);
    let version = format!(
        r#"gateway_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    for (series, value) in [
        (
            r#"gateway_requests_total{caller="orders",status="200",cache="miss"}"#,
            2.0,
        ),
        (
            r#"gateway_requests_total{caller="orders",status="200",cache="hit"}"#,
            1.0,
        ),
        (
            r#"gateway_requests_total{caller="-",status="401",cache="-"}"#,
            1.0,
        ),
        (
            r#"gateway_requests_total{caller="orders",status="400",cache="-"}"#,
            1.0,
        ),
        (
            r#"gateway_requests_total{caller="orders",status="502",cache="miss"}"#,
            1.0,
        ),
        (
            r#"gateway_upstream_requests_total{endpoint="balance",status="200",bill24_code="000"}"#,
            1.0,
        ),
        (
            r#"gateway_upstream_requests_total{endpoint="balance",status="200",bill24_code="311"}"#,
            1.0,
        ),
        (
            r#"gateway_upstream_requests_total{endpoint="balance",status="500",bill24_code="-"}"#,
            1.0,
        ),
        (
            r#"gateway_upstream_requests_total{endpoint="authorize",status="200",bill24_code="200"}"#,
            1.0,
        ),
        (
            r#"gateway_request_duration_seconds_count{cache="hit"}"#,
            1.0,
        ),
        (
            r#"gateway_upstream_duration_seconds_count{endpoint="balance"}"#,
            3.0,
        ),
        (
            r#"gateway_upstream_duration_seconds_count{endpoint="authorize"}"#,
            1.0,
        ),
        ("gateway_cache_entries", 1.0),
        ("gateway_coalesced_requests_total", 0.0),
        (r#"gateway_token_refreshes_total{result="success"}"#, 1.0),
        (r#"gateway_token_refreshes_total{result="failure"}"#, 0.0),
        (version.as_str(), 1.0),
    ] {
        assert_eq!(samples.get(series), Some(&value), "{series} in\n{text}");
    }
    // Without `[redis]`: only documented metrics, each of its documented type, and all of
    // them but the shared tier's.
    let exposed = exposed_metrics(&text);
    let documented = documented_metrics();
    for (name, kind) in &exposed {
        assert_eq!(
            documented.get(name),
            Some(kind),
            "{name} ({kind}) as README.md's metrics table has it"
        );
    }
    for name in documented.keys() {
        // The fleet's size is 1 without Redis; the rest need the shared tier.
        let shared_tier = name.starts_with("gateway_redis_")
            || (name.starts_with("gateway_fleet_") && name != "gateway_fleet_replicas");
        assert_eq!(exposed.contains_key(name), !shared_tier, "{name} exposed");
    }
    let expires = metric_value(&text, "gateway_token_expires_in_seconds");
    assert!(expires > 3500.0 && expires <= 3600.0, "{expires}");
    // Histograms resolve sub-millisecond hits.
    assert!(text.contains(r#"gateway_request_duration_seconds_bucket{cache="hit",le="0.0001"}"#));
    assert!(
        text.contains(r#"gateway_upstream_duration_seconds_bucket{endpoint="balance",le="10"}"#)
    );
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
    {
        let labels = &line[line.find('{').unwrap_or(0)..line.rfind('}').unwrap_or(0)];
        // `le="+Inf"` is Prometheus' own spelling.
        let labels = labels.replace("+Inf", "+inf");
        assert_eq!(
            labels,
            labels.to_lowercase(),
            "lowercase label values: {line}"
        );
    }
}

/// `/readyz` turns 503 as soon as shutdown starts, while in-flight requests finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_once_shutdown_starts() {
    let app = spawn_app_with(|c| c.server.drain_delay = Duration::from_millis(600)).await;
    app.balance("warm-up").await;
    app.sim.set_latency(Duration::from_millis(800));
    let (admin_addr, main_addr, sim) = (app.admin_addr, app.addr, app.sim.clone());
    let post = move |code: &str| {
        http::Request::post(format!("http://{main_addr}{PATH}"))
            .header("authorization", format!("Bearer {ORDERS_KEY}"))
            .body(body_for(code).into())
            .expect("request")
    };
    let slow = tokio::spawn(send_owned(post("SLOW")));
    assert!(
        eventually(Duration::from_secs(2), || sim.balance_calls_for("SLOW")
            == 1)
        .await
    );
    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = send(
        &client(),
        http::Request::get(format!("http://{admin_addr}/readyz"))
            .body(Default::default())
            .expect("request"),
    )
    .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    // During drain_delay new connections are still served.
    let during = send(&client(), post("warm-up")).await;
    assert_eq!(during.status, StatusCode::OK);
    let slow = slow.await.expect("slow request ran");
    assert_eq!(
        slow.status,
        StatusCode::OK,
        "the in-flight request finished"
    );
    stopping.await.expect("stopped");
    assert!(
        tokio::net::TcpStream::connect(main_addr).await.is_err(),
        "no more connections after the drain"
    );
}

async fn send_owned(req: http::Request<http_body_util::Full<bytes::Bytes>>) -> Reply {
    send(&client(), req).await
}

/// With `server.admin_key_sha256` set, purges need the admin key; the rest stays open.
#[tokio::test]
async fn admin_key_guards_purges_only() {
    let admin_key = "admin-key-xyz";
    let app = spawn_app_with(|c| {
        c.server.admin_key_sha256 = Some(bill24_gateway::hash_key(admin_key.as_bytes()));
    })
    .await;
    app.balance("A").await;
    for headers in [vec![], vec![("authorization", "Bearer wrong")]] {
        let r = app.admin(Method::DELETE, "/cache/A", &headers).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = app.admin(Method::DELETE, "/cache", &headers).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        app.balance("A").await.x_cache(),
        "HIT",
        "nothing was purged"
    );
    let bearer = format!("Bearer {admin_key}");
    let r = app
        .admin(Method::DELETE, "/cache/A", &[("authorization", &bearer)])
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(app.balance("A").await.x_cache(), "MISS");
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            app.admin(Method::GET, path, &[]).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
}

/// Malformed purge paths are refused clearly.
#[tokio::test]
async fn purge_paths_are_validated() {
    let app = spawn_app().await;
    let r = app.admin(Method::DELETE, "/cache/%FF%FE", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "invalid_customer_sync_code");
    assert_eq!(
        r.json()["message"],
        "the customer_sync_code in the path is not UTF-8 once percent-decoded"
    );
    let r = app.admin(Method::DELETE, "/cache/", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["message"], "customer_sync_code must not be empty");
    let long = "a".repeat(51);
    let r = app
        .admin(Method::DELETE, &format!("/cache/{long}"), &[])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = app.admin(Method::DELETE, "/cache/a%00b", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// A reload swaps callers, cache durations and the admin key in place, and reports what needs
/// a restart without applying it.
#[tokio::test]
async fn reload_applies_in_place_and_reports_restart_only_keys() {
    let app = spawn_app().await;
    assert_eq!(app.balance("A").await.x_cache(), "MISS");
    assert_eq!(app.balance("A").await.x_cache(), "HIT");

    let mut new = app.config.clone();
    new.callers.retain(|c| &*c.name == "billing");
    new.cache.ttl = Duration::ZERO;
    new.server.admin_key_sha256 = Some(bill24_gateway::hash_key(b"rotated-admin-key"));
    new.server.request_timeout = Duration::from_secs(1);
    new.cache.max_entries = 7;
    let report = app
        .reloader
        .apply(new, Default::default())
        .expect("applied");
    assert_eq!(
        report.applied,
        ["callers", "cache", "server.admin_key_sha256"]
    );
    assert_eq!(
        report.needs_restart,
        ["server.request_timeout", "cache.max_entries"]
    );

    assert_eq!(
        app.balance("B").await.status,
        StatusCode::UNAUTHORIZED,
        "orders removed"
    );
    let billing = |code: &'static str| app.post(Some(BILLING_KEY), body_for(code), &[]);
    assert_eq!(billing("B").await.x_cache(), "MISS");
    assert_eq!(billing("B").await.x_cache(), "MISS", "ttl 0 now");
    let denied = app.admin(Method::DELETE, "/cache", &[]).await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    let allowed = app
        .admin(
            Method::DELETE,
            "/cache",
            &[("authorization", "Bearer rotated-admin-key")],
        )
        .await;
    assert_eq!(allowed.status, StatusCode::NO_CONTENT);

    // The same config again changes nothing.
    let mut same = app.config.clone();
    same.callers.retain(|c| &*c.name == "billing");
    same.cache.ttl = Duration::ZERO;
    same.server.admin_key_sha256 = Some(bill24_gateway::hash_key(b"rotated-admin-key"));
    same.server.request_timeout = Duration::from_secs(1);
    let report = app
        .reloader
        .apply(same, Default::default())
        .expect("applied");
    assert!(report.applied.is_empty(), "{report:?}");
}

/// A reload that would leave no caller, or clear an admin key in force, is refused unless
/// the new config writes exactly that out; nothing of it applies.
#[tokio::test]
async fn a_reload_that_would_open_the_gateway_up_is_refused_unless_asked_for() {
    let app = spawn_app_with(|c| {
        c.server.admin_key_sha256 = Some(bill24_gateway::hash_key(b"admin-key"));
    })
    .await;
    let mut empty = app.config.clone();
    empty.callers.clear();
    empty.cache.ttl = Duration::ZERO;
    assert_eq!(
        app.reloader.apply(empty.clone(), Default::default()),
        Err(bill24_gateway::ReloadRefused::NoCallers)
    );
    let mut no_key = app.config.clone();
    no_key.server.admin_key_sha256 = None;
    assert_eq!(
        app.reloader.apply(no_key.clone(), Default::default()),
        Err(bill24_gateway::ReloadRefused::AdminKeyCleared)
    );
    // Nothing applied: callers still answered, and from cache (ttl unchanged).
    assert_eq!(app.balance("R").await.status, StatusCode::OK);
    assert_eq!(app.balance("R").await.x_cache(), "HIT");
    assert_eq!(
        app.admin(Method::DELETE, "/cache", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Written out explicitly: the operator means it.
    let explicit = bill24_gateway::config::Explicit {
        callers: true,
        admin_key: true,
    };
    app.reloader.apply(no_key, explicit).expect("asked for");
    assert_eq!(
        app.admin(Method::DELETE, "/cache", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    empty.server.admin_key_sha256 = None;
    app.reloader.apply(empty, explicit).expect("asked for");
    assert_eq!(app.balance("R").await.status, StatusCode::UNAUTHORIZED);
}

/// The metrics table of README.md: each name with its type.
fn documented_metrics() -> BTreeMap<String, String> {
    let readme = include_str!("../README.md");
    let table = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("README.md has a Metrics section");
    let rows: BTreeMap<String, String> = table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_string(), cells.get(2)?.to_string()))
        })
        .collect();
    assert!(rows.len() > 10, "the table is read: {rows:?}");
    rows
}

/// The metrics an exposition declares (`# TYPE name kind`), each checked to have samples
/// under its own name (a histogram's `_bucket`, `_sum` and `_count`), and no sample of a
/// `gateway_` metric without a declaration.
fn exposed_metrics(text: &str) -> BTreeMap<String, String> {
    let declared: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.split(['{', ' ']).next().unwrap_or_default();
        let metric = declared.iter().find(|(name, kind)| {
            series == name.as_str()
                || (kind.as_str() == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| series.strip_suffix(suffix) == Some(name.as_str())))
        });
        assert!(
            metric.is_some() || !series.starts_with("gateway_"),
            "{series}: a sample without # TYPE"
        );
    }
    for name in declared.keys() {
        assert!(
            text.lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name.as_str())),
            "{name} declared without samples"
        );
    }
    declared
        .into_iter()
        .filter(|(name, _)| name.starts_with("gateway_"))
        .collect()
}

/// Every sample line: series (name and labels, as rendered) and value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, value)| Some((series.to_string(), value.parse().ok()?)))
        .collect()
}

/// A `redis-server` of its own on a free loopback port, stopped when dropped.
struct RedisServer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new("redis-server")
            .current_dir(dir.path())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (apt install redis-server)");
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..500 {
            if server.pong().await {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server on {port} did not answer");
    }

    async fn pong(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut answer = [0u8; 7];
        stream.write_all(b"PING\r\n").await.is_ok()
            && stream.read_exact(&mut answer).await.is_ok()
            && &answer == b"+PONG\r\n"
    }

    fn config(&self) -> RedisConfig {
        RedisConfig {
            urls: vec![SecretUrl::new(format!("redis://127.0.0.1:{}", self.port))],
            cluster: false,
            username: None,
            password: None,
            key_prefix: "bill24gw".into(),
            timeout: Duration::from_millis(500),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `[redis]`, once the shared tier has been used (a fill waited for on another replica,
/// a hit, a Bill24 call of its own), a gateway exposes exactly README.md's metrics, each of
/// its documented type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposed_metrics_are_the_documented_ones() {
    let redis = RedisServer::start().await;
    let filler = Arc::new(spawn_app_with(|c| c.redis = Some(redis.config())).await);
    let waiter = spawn_app_with(|c| {
        c.redis = Some(redis.config());
        c.upstream.base_url = filler.sim_url();
    })
    .await;
    assert_eq!(filler.balance("warm-up").await.status, StatusCode::OK);
    filler.sim.set_latency(Duration::from_millis(300));
    let fill = tokio::spawn({
        let filler = filler.clone();
        async move { filler.balance("FILLED").await.status }
    });
    until("the fill at Bill24", || {
        filler.sim.balance_calls_for("FILLED") == 1
    })
    .await;
    // The other replica waits for that fill rather than calling Bill24.
    let r = waiter.balance("FILLED").await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "MISS"));
    assert_eq!(fill.await.expect("fill"), StatusCode::OK);
    assert_eq!(filler.sim.balance_calls_for("FILLED"), 1);
    filler.sim.set_latency(Duration::ZERO);
    assert_eq!(waiter.balance("FILLED").await.x_cache(), "HIT");
    assert_eq!(waiter.balance("OWN").await.status, StatusCode::OK);

    let text = waiter.metrics().await;
    assert_eq!(
        samples(&text).get(r#"gateway_fleet_fill_waits_total{outcome="filled"}"#),
        Some(&1.0),
        "{text}"
    );
    let exposed = exposed_metrics(&text);
    let mut documented = documented_metrics();
    // Recorded only under a ceiling (`upstream.fleet_max_rps`), which this fleet has not.
    documented.remove("gateway_fleet_limit_wait_seconds");
    assert_eq!(exposed, documented, "exposed (left) and documented\n{text}");
}
