//! Resilience, through the real gateway and simulator: retries and their budget, the circuit
//! breaker, refresh-ahead, per-caller limits, connection timeouts, and a fault-injection suite
//! in which every request must be answered within `server.request_timeout`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bill24_gateway::config::Config;
use bill24_sim::{Fault, SimConfig, SimHandle, Simulator};
use common::*;
use futures_util::future::join_all;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------------

/// Connection resets, 5xx and timeouts are retried (up to `upstream.retries`), so a transient
/// failure never reaches the caller.
#[tokio::test]
async fn transient_failures_are_retried() {
    let app = spawn_app_with(|c| c.upstream.timeout = Duration::from_millis(150)).await;
    app.balance("warm-up").await;
    for (i, fault) in [
        Fault::Status(500),
        Fault::Status(503),
        Fault::Reset,
        Fault::Hang,
    ]
    .into_iter()
    .enumerate()
    {
        let code = format!("R{i}");
        app.sim.fail_next(2, fault);
        let r = app.balance(&code).await;
        assert_eq!(r.status, StatusCode::OK, "{fault:?}");
        assert_eq!(
            app.sim.balance_calls_for(&code),
            3,
            "{fault:?}: two retries"
        );
    }
    assert_eq!(app.metric("gateway_upstream_retries_total").await, 8.0);
    // Three failures in a row exhaust `retries = 2`.
    app.sim.fail_next(3, Fault::Status(500));
    assert_eq!(app.balance("R9").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(app.sim.balance_calls_for("R9"), 3);
}

/// `retries = 0` means one attempt.
#[tokio::test]
async fn zero_retries_means_one_attempt() {
    let app = spawn_app_with(|c| c.upstream.retries = 0).await;
    app.sim.fail_next(1, Fault::Status(500));
    assert_eq!(app.balance("C").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(app.sim.balance_calls_for("C"), 1);
}

/// 4xx answers and non-JSON bodies are not retried.
#[tokio::test]
async fn client_errors_and_bad_bodies_are_not_retried() {
    let app = spawn_app().await;
    app.sim.fail_next(1, Fault::Status(404));
    assert_eq!(app.balance("A").await.status, StatusCode::NOT_FOUND);
    app.sim.fail_next(1, Fault::Html);
    assert_eq!(app.balance("B").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(app.sim.balance_calls(), 2);
    assert_eq!(app.metric("gateway_upstream_retries_total").await, 0.0);
}

/// A retry never runs past the caller's deadline: the caller is answered at
/// `request_timeout`, and no retry starts that could not finish before it.
#[tokio::test(start_paused = true)]
async fn retries_stay_inside_the_request_deadline() {
    let clock = FrozenClock::start();
    let app = Arc::new(
        spawn_app_with(|c| {
            c.server.request_timeout = Duration::from_millis(400);
            c.upstream.timeout = Duration::from_millis(300);
            c.upstream.retries = 5;
        })
        .await,
    );
    app.balance("warm-up").await;
    app.sim.set_balance_fault(Some(Fault::Hang));
    let before = app.answering_seconds().await;
    let request = tokio::spawn({
        let app = app.clone();
        async move { app.balance("C").await }
    });
    until("the first attempt", || app.sim.balance_calls_for("C") == 1).await;
    // The first attempt times out at 300 ms; a retry follows its backoff (at most 25 ms).
    clock.advance(Duration::from_millis(300)).await;
    app.until_metric(&["gateway_upstream_retries_total"], 1.0)
        .await;
    clock.advance(Duration::from_millis(25)).await;
    until("the retry", || app.sim.balance_calls_for("C") == 2).await;
    clock.advance(Duration::from_millis(70)).await;
    app.settle().await;
    assert!(!request.is_finished(), "answered before the deadline");
    clock.advance(Duration::from_millis(5)).await;
    let r = request.await.expect("request");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    let took = app.answering_seconds().await - before;
    assert!(
        (took - 0.4).abs() < 1e-9,
        "answered at the deadline, by the gateway's clock: {took} s"
    );
    // Whatever the cut attempt left behind runs out: its timers, then any retry's backoff.
    for _ in 0..2 {
        clock.advance(Duration::from_secs(5)).await;
        app.settle().await;
    }
    assert_eq!(
        app.metric("gateway_upstream_retries_total").await,
        1.0,
        "no retry decided after the deadline"
    );
    assert_eq!(
        app.sim.balance_calls_for("C"),
        2,
        "one retry fit, cut at the deadline; none after it"
    );
}

/// A gateway with `retries` and `retry_budget` (circuit breaker off) in front of a Bill24 that
/// answers every balance call with a 500.
async fn failing_bill24(retries: u32, retry_budget: f64) -> Arc<TestApp> {
    let app = spawn_app_with(|c| {
        c.upstream.circuit_failures = 0;
        c.upstream.retries = retries;
        c.upstream.retry_budget = retry_budget;
    })
    .await;
    app.balance("warm-up").await;
    app.sim.set_balance_fault(Some(Fault::Status(500)));
    Arc::new(app)
}

/// `n` requests for distinct keys (`prefix` and a number) in `lanes` concurrent lanes, each
/// answered 502; the Bill24 calls they made.
async fn failing_requests(app: Arc<TestApp>, prefix: String, n: usize, lanes: usize) -> u64 {
    let before = app.sim.balance_calls();
    join_all((0..lanes).map(|lane| {
        let app = app.clone();
        let prefix = prefix.clone();
        async move {
            for i in (lane..n).step_by(lanes) {
                let r = app.balance(&format!("{prefix}{i}")).await;
                assert_eq!(r.status, StatusCode::BAD_GATEWAY);
            }
        }
    }))
    .await;
    app.sim.balance_calls() - before
}

/// On a frozen clock: `n` failing requests at once; once every first attempt has been
/// refused and its retry granted or denied, the clock moves past the longest backoff
/// (25 ms) so the granted retries go out. The Bill24 calls they made.
async fn failing_burst(app: &Arc<TestApp>, clock: &FrozenClock, prefix: &str, n: usize) -> u64 {
    const DECIDED: [&str; 2] = [
        "gateway_upstream_retries_total",
        "gateway_upstream_retries_denied_total",
    ];
    let text = app.metrics().await;
    let decided: f64 = DECIDED.iter().map(|s| metric_value(&text, s)).sum();
    let burst = tokio::spawn(failing_requests(app.clone(), prefix.to_string(), n, n));
    app.until_metric(&DECIDED, decided + n as f64).await;
    clock.advance(Duration::from_millis(25)).await;
    burst.await.expect("burst")
}

/// The retry budget bounds the extra load: retries are at most `retry_budget` of requests
/// (plus 10 per second), however many fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_budget_caps_the_extra_load() {
    let app = failing_bill24(2, 0.2).await;
    let requests = 400;
    let retries = failing_requests(app.clone(), "B".into(), requests, 40).await - requests as u64;
    // 20 % of 400 plus the 10/s reserve over the 10 s window: 180 at most (vs 800 unbudgeted).
    assert!(retries <= 180, "{retries} retries for {requests} requests");
    assert!(retries >= 80, "the budget still allows retries: {retries}");
    assert!(app.metric("gateway_upstream_retries_denied_total").await > 0.0);
}

/// The 10 retries a second always allowed are counted over a 10 s window: retries the reserve
/// paid for still count 8.5 s later, and no longer once the window has moved past them. On a
/// frozen clock, each phase happens at an exact moment.
#[tokio::test(start_paused = true)]
async fn retry_reserve_is_counted_over_ten_seconds() {
    let clock = FrozenClock::start();
    // No share of requests: only the reserve of 100 per 10 s.
    let app = failing_bill24(1, 0.0).await;
    assert_eq!(
        failing_burst(&app, &clock, "A", 150).await,
        250,
        "100 retries, then none"
    );
    // A request every half second until 8.5 s after the retries (each counts for at least
    // 9 s): none gets a retry. A window that slid faster than the clock would hand the reserve
    // back after 5 or 6 s of such traffic.
    let before = app.sim.balance_calls();
    for i in 0..17 {
        clock.advance(Duration::from_millis(500)).await;
        let r = app.balance(&format!("B{i}")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(
        app.sim.balance_calls() - before,
        17,
        "the reserve stays spent"
    );
    // Every retry counts for at most 10 s.
    clock.advance(Duration::from_secs(2)).await;
    assert_eq!(
        failing_burst(&app, &clock, "C", 10).await,
        20,
        "10 s on, it is back"
    );
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker
// ---------------------------------------------------------------------------------------------

fn breaker(c: &mut Config) {
    c.upstream.retries = 0;
    c.upstream.circuit_failures = 3;
    c.upstream.circuit_cooldown = Duration::from_millis(600);
}

/// After `circuit_failures` consecutive failures the circuit opens: 503 with Retry-After at
/// once, Bill24 untouched; after the cool-down one probe closes it when Bill24 is back. (On a
/// frozen clock: an answer that waited for anything would never come.)
#[tokio::test(start_paused = true)]
async fn circuit_opens_fails_fast_then_one_probe_closes_it() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(breaker).await;
    app.balance("warm-up").await;
    app.sim.set_balance_fault(Some(Fault::Status(500)));
    for _ in 0..3 {
        assert_eq!(app.balance("C").await.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(app.metric("gateway_circuit_state").await, 1.0);
    let calls = app.sim.balance_calls();
    for _ in 0..20 {
        let r = app.balance("C").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error_code(), "circuit_open");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(
        app.sim.balance_calls(),
        calls,
        "Bill24 untouched while open"
    );

    // Not yet over.
    clock.advance(Duration::from_millis(599)).await;
    assert_eq!(
        app.balance("C").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Cool-down over, Bill24 still failing: the probe fails and the circuit opens again.
    clock.advance(Duration::from_millis(1)).await;
    assert_eq!(app.balance("C").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(app.sim.balance_calls(), calls + 1, "exactly one probe");
    assert_eq!(
        app.balance("C").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Bill24 back: the next probe closes it.
    app.sim.set_balance_fault(None);
    clock.advance(Duration::from_millis(600)).await;
    assert_eq!(app.balance("C").await.status, StatusCode::OK);
    assert_eq!(app.metric("gateway_circuit_state").await, 0.0);
    assert_eq!(app.balance("D").await.status, StatusCode::OK);
    assert_eq!(app.metric("gateway_circuit_opened_total").await, 2.0);
}

/// While the probe is in flight, everyone else still gets 503.
#[tokio::test(start_paused = true)]
async fn half_open_lets_exactly_one_probe_through() {
    let clock = FrozenClock::start();
    let app = Arc::new(spawn_app_with(breaker).await);
    app.balance("warm-up").await;
    app.sim.set_balance_fault(Some(Fault::Status(500)));
    for _ in 0..3 {
        app.balance("C").await;
    }
    app.sim.set_balance_fault(None);
    app.sim.set_latency(Duration::from_millis(300));
    clock.advance(Duration::from_millis(700)).await;
    let before = app.sim.balance_calls();
    let requests: Vec<_> = (0..10)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { app.balance(&format!("P{i}")).await })
        })
        .collect();
    // The probe waits at Bill24 (300 ms of frozen time); the others are answered meanwhile.
    until("nine answered, the probe at Bill24", || {
        requests.iter().filter(|r| r.is_finished()).count() == 9 && app.sim.stats().in_flight == 1
    })
    .await;
    clock.advance(Duration::from_millis(300)).await;
    let mut replies = Vec::new();
    for r in requests {
        replies.push(r.await.expect("request"));
    }
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let open = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!((ok, open), (1, 9));
    assert_eq!(app.sim.balance_calls(), before + 1);
}

/// With the circuit open, an entry within `stale_if_error` still answers.
#[tokio::test(start_paused = true)]
async fn open_circuit_serves_stale_entries() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| {
        breaker(c);
        c.cache.ttl = Duration::from_millis(100);
        c.cache.stale_if_error = Duration::from_secs(30);
    })
    .await;
    app.balance("K").await;
    app.sim.set_balance_fault(Some(Fault::Status(500)));
    clock.advance(Duration::from_millis(150)).await;
    for _ in 0..3 {
        app.balance("other").await;
    }
    let r = app.balance("K").await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "STALE"));
}

/// `circuit_failures = 0` never opens.
#[tokio::test]
async fn circuit_disabled_never_opens() {
    let app = spawn_app_with(|c| {
        c.upstream.retries = 0;
        c.upstream.circuit_failures = 0;
    })
    .await;
    app.sim.set_balance_fault(Some(Fault::Status(500)));
    for _ in 0..20 {
        assert_eq!(app.balance("C").await.status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(app.sim.balance_calls(), 20);
}

// ---------------------------------------------------------------------------------------------
// Refresh ahead
// ---------------------------------------------------------------------------------------------

/// A hit close to expiry is answered at once and triggers one background refresh, so a hot
/// key never falls back to a miss.
#[tokio::test(start_paused = true)]
async fn refresh_ahead_keeps_a_hot_key_hot() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| {
        c.cache.ttl = Duration::from_millis(1000);
        c.cache.refresh_ahead = Duration::from_millis(500);
    })
    .await;
    app.sim.set_balance("HOT", 1);
    assert_eq!(app.balance("HOT").await.x_cache(), "MISS");
    app.sim.set_balance("HOT", 2);
    clock.advance(Duration::from_millis(499)).await;
    assert_eq!(app.balance("HOT").await.x_cache(), "HIT");
    app.settle().await;
    assert_eq!(app.metric("gateway_cache_refresh_ahead_total").await, 0.0);
    assert_eq!(app.sim.balance_calls_for("HOT"), 1, "not yet in the window");
    clock.advance(Duration::from_millis(1)).await;
    // In the window: hits, and one refresh however many hits.
    for _ in 0..20 {
        let r = app.balance("HOT").await;
        assert_eq!(r.x_cache(), "HIT");
    }
    until("the background refresh", || {
        app.sim.balance_calls_for("HOT") == 2
    })
    .await;
    app.settle().await;
    assert_eq!(
        app.sim.balance_calls_for("HOT"),
        2,
        "one background refresh"
    );
    assert_eq!(app.metric("gateway_cache_refresh_ahead_total").await, 1.0);
    // Past the first entry's expiry: still a hit, with the refreshed balance.
    clock.advance(Duration::from_millis(500)).await;
    let r = app.balance("HOT").await;
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(r.json()["data"][0]["balance"], 2);
}

/// `ttl_jitter` spreads the expiry of entries stored together.
#[tokio::test(start_paused = true)]
async fn ttl_jitter_spreads_expiry() {
    let clock = FrozenClock::start();
    let app = Arc::new(
        spawn_app_with(|c| {
            c.cache.ttl = Duration::from_millis(2000);
            c.cache.ttl_jitter = 0.5;
        })
        .await,
    );
    join_all((0..30).map(|i| {
        let app = app.clone();
        async move { app.balance(&format!("J{i}")).await }
    }))
    .await;
    clock.advance(Duration::from_millis(1500)).await;
    let replies = join_all((0..30).map(|i| {
        let app = app.clone();
        async move { app.balance(&format!("J{i}")).await }
    }))
    .await;
    let was_hit: Vec<bool> = replies.iter().map(|r| r.x_cache() == "HIT").collect();
    let hits = was_hit.iter().filter(|h| **h).count();
    // Each entry lives between 1 s and 2 s: about half are gone at 1.5 s.
    assert!((3..=27).contains(&hits), "{hits} of 30 still cached");
    clock.advance(Duration::from_millis(600)).await;
    let replies = join_all((0..30).map(|i| {
        let app = app.clone();
        async move { app.balance(&format!("J{i}")).await }
    }))
    .await;
    for (i, r) in replies.iter().enumerate() {
        // Never longer than the ttl: the first entries are all gone; those stored again at
        // 1.5 s live at least half the ttl.
        let expected = if was_hit[i] { "MISS" } else { "HIT" };
        assert_eq!(r.x_cache(), expected, "J{i}");
    }
}

/// Without `refresh_ahead` the key expires and misses.
#[tokio::test(start_paused = true)]
async fn without_refresh_ahead_the_key_expires() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| c.cache.ttl = Duration::from_millis(300)).await;
    app.balance("K").await;
    clock.advance(Duration::from_millis(299)).await;
    assert_eq!(app.balance("K").await.x_cache(), "HIT");
    clock.advance(Duration::from_millis(1)).await;
    assert_eq!(app.balance("K").await.x_cache(), "MISS");
}

// ---------------------------------------------------------------------------------------------
// Caller protection
// ---------------------------------------------------------------------------------------------

/// Over its token bucket a caller gets 429 with Retry-After; other callers are unaffected.
#[tokio::test(start_paused = true)]
async fn rate_limit_is_per_caller() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| {
        c.callers[0].rate_limit_rps = 2.0;
        c.callers[0].burst = 3;
    })
    .await;
    for _ in 0..3 {
        assert_eq!(app.balance("K").await.status, StatusCode::OK);
    }
    let r = app.balance("K").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "rate_limited");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Checked before Content-Type and body.
    let r = app
        .post(
            Some(ORDERS_KEY),
            "garbage",
            &[("content-type", "text/plain")],
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // The other caller is not limited.
    for _ in 0..10 {
        let r = app.post(Some(BILLING_KEY), body_for("K"), &[]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // The bucket refills at 2/s: one request's worth after 500 ms, not before.
    clock.advance(Duration::from_millis(499)).await;
    assert_eq!(app.balance("K").await.status, StatusCode::TOO_MANY_REQUESTS);
    clock.advance(Duration::from_millis(1)).await;
    assert_eq!(app.balance("K").await.status, StatusCode::OK);
    assert_eq!(
        app.metric(r#"gateway_requests_total{caller="orders",status="429",cache="-"}"#)
            .await,
        3.0
    );
}

/// Over `max_concurrent` requests in flight, a caller gets 429; others are unaffected.
#[tokio::test(start_paused = true)]
async fn concurrency_cap_is_per_caller() {
    let clock = FrozenClock::start();
    let app = Arc::new(spawn_app_with(|c| c.callers[0].max_concurrent = 2).await);
    app.balance("warm-up").await;
    app.sim.set_latency(Duration::from_millis(300));
    let mut held = Vec::new();
    for i in 0..2 {
        let app2 = app.clone();
        held.push(tokio::spawn(
            async move { app2.balance(&format!("C{i}")).await },
        ));
        until("the request at Bill24", || {
            app.sim.stats().in_flight == i + 1
        })
        .await;
    }
    let third = app.balance("C2").await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.error_code(), "too_many_concurrent_requests");
    assert_eq!(third.header("retry-after"), Some("1"));
    let others: Vec<_> = (0..4)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                app.post(Some(BILLING_KEY), body_for(&format!("O{i}")), &[])
                    .await
            })
        })
        .collect();
    until("the other caller's requests at Bill24", || {
        app.sim.stats().in_flight == 6
    })
    .await;
    clock.advance(Duration::from_millis(300)).await;
    for r in held.into_iter().chain(others) {
        assert_eq!(r.await.expect("request").status, StatusCode::OK);
    }
    // Slots come back when requests finish.
    app.sim.set_latency(Duration::ZERO);
    assert_eq!(app.balance("again").await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Connection hardening
// ---------------------------------------------------------------------------------------------

/// For a frozen clock: the peer closes the connection (read until it does); panics after 10 s
/// of real time.
async fn closes(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            _ = real_sleep(Duration::from_secs(10)) => panic!("not closed within 10 s"),
        }
    }
}

/// For a frozen clock: whether the peer has closed the connection by now, once the runtime
/// has handled everything under way ([`TestApp::settle`]): what it sent is taken, without
/// waiting for more.
async fn closed_by_now(app: &TestApp, stream: &mut TcpStream) -> bool {
    app.settle().await;
    let mut buf = [0u8; 1024];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

fn raw_request(code: &str) -> String {
    let body = body_for(code);
    format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ORDERS_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn read_one_response(stream: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length: ")
                        .and_then(|v| v.parse().ok())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// A request head trickling in (slowloris) is cut at `header_read_timeout`, counted from its
/// first byte however many bytes follow.
#[tokio::test(start_paused = true)]
async fn slow_request_heads_are_cut() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| c.server.header_read_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(b"POST /instant_payment/get_wallet_balance HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // The gateway has read the head's first bytes: its timer runs from here.
    app.settle().await;
    for _ in 0..2 {
        clock.advance(Duration::from_millis(100)).await;
        stream.write_all(b"X-Slow: 1\r\n").await.expect("write");
    }
    clock.advance(Duration::from_millis(99)).await;
    assert!(
        !closed_by_now(&app, &mut stream).await,
        "open until header_read_timeout"
    );
    clock.advance(Duration::from_millis(1)).await;
    closes(&mut stream).await;
    assert_eq!(
        app.balance("K").await.status,
        StatusCode::OK,
        "others unaffected"
    );
}

/// An idle keep-alive connection outlives `header_read_timeout` and closes after
/// `idle_timeout`.
#[tokio::test(start_paused = true)]
async fn idle_keep_alive_connections_close_after_idle_timeout() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| {
        c.server.header_read_timeout = Duration::from_millis(200);
        c.server.idle_timeout = Duration::from_millis(900);
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    stream
        .write_all(raw_request("K").as_bytes())
        .await
        .expect("write");
    assert!(
        read_one_response(&mut stream)
            .await
            .starts_with("HTTP/1.1 200")
    );
    clock.advance(Duration::from_millis(500)).await;
    stream
        .write_all(raw_request("K").as_bytes())
        .await
        .expect("write");
    assert!(
        read_one_response(&mut stream)
            .await
            .starts_with("HTTP/1.1 200"),
        "still open after more than header_read_timeout idle"
    );
    clock.advance(Duration::from_millis(899)).await;
    assert!(
        !closed_by_now(&app, &mut stream).await,
        "not before idle_timeout"
    );
    clock.advance(Duration::from_millis(1)).await;
    closes(&mut stream).await;
}

/// A connection that never sends anything is closed after `idle_timeout`.
#[tokio::test(start_paused = true)]
async fn silent_connections_are_closed() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| c.server.idle_timeout = Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    // The gateway has taken the connection: its timer runs from here.
    app.settle().await;
    clock.advance(Duration::from_millis(299)).await;
    assert!(
        !closed_by_now(&app, &mut stream).await,
        "not before idle_timeout"
    );
    clock.advance(Duration::from_millis(1)).await;
    closes(&mut stream).await;
}

/// Beyond `max_connections`, new connections wait until one closes.
#[tokio::test]
async fn max_connections_bounds_open_connections() {
    let app = spawn_app_with(|c| c.server.max_connections = 2).await;
    let mut a = TcpStream::connect(app.addr).await.expect("connect");
    let mut b = TcpStream::connect(app.addr).await.expect("connect");
    for s in [&mut a, &mut b] {
        s.write_all(raw_request("K").as_bytes())
            .await
            .expect("write");
        assert!(read_one_response(s).await.starts_with("HTTP/1.1 200"));
    }
    let mut c = TcpStream::connect(app.addr)
        .await
        .expect("connect (backlog)");
    c.write_all(raw_request("K").as_bytes())
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await;
    assert!(waited.is_err(), "the third connection waits");
    drop(a);
    assert!(read_one_response(&mut c).await.starts_with("HTTP/1.1 200"));
}

/// Too many header fields: refused, and the gateway keeps serving.
#[tokio::test]
async fn too_many_headers_are_refused() {
    let app = spawn_app().await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let mut head = format!("POST {PATH} HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        head.push_str(&format!("X-H{i}: v\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 4"), "{text}");
    assert_eq!(app.balance("K").await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Fault-injection suite
// ---------------------------------------------------------------------------------------------

const DEADLINE: Duration = Duration::from_millis(800);

fn suite_config(c: &mut Config) {
    c.server.request_timeout = DEADLINE;
    c.upstream.timeout = Duration::from_millis(300);
    c.upstream.circuit_failures = 5;
    c.upstream.circuit_cooldown = Duration::from_millis(500);
    c.cache.ttl = Duration::from_millis(200);
}

/// Load from `workers` concurrent callers for `duration`, over `keys` keys. Every request
/// must be answered within the deadline (plus scheduling slack); returns the statuses.
async fn load(app: &Arc<TestApp>, workers: usize, duration: Duration, keys: usize) -> Vec<u16> {
    let until = Instant::now() + duration;
    let results = join_all((0..workers).map(|w| {
        let app = app.clone();
        async move {
            let mut statuses = Vec::new();
            let mut i = 0;
            while Instant::now() < until {
                let start = Instant::now();
                let r = app.balance(&format!("L{}", (w + i) % keys)).await;
                let took = start.elapsed();
                assert!(
                    took <= DEADLINE + Duration::from_millis(250),
                    "answered in {took:?}, past the deadline"
                );
                statuses.push(r.status.as_u16());
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            statuses
        }
    }))
    .await;
    results.into_iter().flatten().collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

async fn recovered(app: &Arc<TestApp>) -> bool {
    for i in 0..100 {
        if app.balance(&format!("recovery-{i}")).await.status == StatusCode::OK {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Bill24 slow (past `upstream.timeout`): 504s or fast 503s once the circuit opens, all within
/// the deadline; Bill24 sees few calls thanks to the breaker; recovery when it speeds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_bill24_slow() {
    let app = Arc::new(spawn_app_with(suite_config).await);
    app.balance("warm-up").await;
    app.sim.set_balance_fault(Some(Fault::Hang));
    let statuses = load(&app, 8, Duration::from_secs(2), 50).await;
    assert!(
        statuses.iter().all(|s| [504, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(count(&statuses, 503) > 0, "the breaker opened");
    let calls = app.sim.balance_calls();
    assert!(
        calls < 60,
        "Bill24 spared: {calls} calls for {} requests",
        statuses.len()
    );
    app.sim.set_balance_fault(None);
    assert!(recovered(&app).await);
}

/// 5xx bursts: short ones are absorbed by retries; long ones open the breaker; all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_5xx_bursts() {
    let app = Arc::new(spawn_app_with(suite_config).await);
    app.balance("warm-up").await;
    app.sim.fail_next(2, Fault::Status(503));
    assert_eq!(
        app.balance("short-burst").await.status,
        StatusCode::OK,
        "absorbed"
    );
    app.sim.set_balance_fault(Some(Fault::Status(500)));
    let statuses = load(&app, 8, Duration::from_millis(1500), 50).await;
    assert!(
        statuses.iter().all(|s| [200, 502, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(
        count(&statuses, 503) > count(&statuses, 502),
        "mostly fast failures"
    );
    app.sim.set_balance_fault(None);
    assert!(recovered(&app).await);
}

/// On a frozen clock: one request for `code`, each of its retries sent as soon as it is decided
/// (the clock moves past the longest backoff it can have). The reply, and the Bill24 calls
/// made.
async fn one_request(app: &Arc<TestApp>, clock: &FrozenClock, code: &str) -> (Reply, u64) {
    let retries = |text: &str| metric_value(text, "gateway_upstream_retries_total");
    let before = retries(&app.metrics().await);
    let mut decided = 0;
    let request = tokio::spawn({
        let app = app.clone();
        let code = code.to_string();
        async move { app.balance(&code).await }
    });
    loop {
        // The answer, or the next retry decided (its backoff is then on the clock).
        let mut retry = false;
        for _ in 0..2_000 {
            if request.is_finished() {
                let reply = request.await.expect("request");
                return (reply, app.sim.balance_calls_for(code));
            }
            if retries(&app.metrics().await) > before + f64::from(decided) {
                retry = true;
                break;
            }
            real_sleep(Duration::from_millis(5)).await;
        }
        assert!(retry, "{code}: neither answered nor retried within 10 s");
        clock.advance(bill24::retry_backoff(decided, 1.0)).await;
        decided += 1;
    }
}

/// (status, error code or `-`, Bill24 calls) of one request, as [`one_request`] makes it.
async fn outcome(app: &Arc<TestApp>, clock: &FrozenClock, code: &str) -> (u16, String, u64) {
    let (reply, calls) = one_request(app, clock, code).await;
    let error = if reply.status == StatusCode::OK {
        "-".to_string()
    } else {
        reply.error_code()
    };
    (reply.status.as_u16(), error, calls)
}

/// Resets and HTML bodies, one request at a time on a frozen clock: 502 for the first
/// `circuit_failures` requests (a reset retried, an HTML body not), then 503 `circuit_open`
/// without a call until the cool-down ends; the probe fails and the circuit opens again; once
/// Bill24 is fine, the next probe closes it. Never a hang or a 500.
#[tokio::test(start_paused = true)]
async fn fault_resets_and_html_bodies() {
    let clock = FrozenClock::start();
    for (fault, error, calls) in [
        (Fault::Reset, "upstream_unreachable", 3),
        (Fault::Html, "upstream_invalid_answer", 1),
    ] {
        let app = Arc::new(spawn_app_with(suite_config).await);
        app.balance("warm-up").await;
        app.sim.set_balance_fault(Some(fault));
        let failed = (502, error.to_string(), calls);
        let open = (503, "circuit_open".to_string(), 0);
        for i in 0..5 {
            let code = format!("F{i}");
            assert_eq!(
                outcome(&app, &clock, &code).await,
                failed,
                "{fault:?} {code}"
            );
        }
        assert_eq!(outcome(&app, &clock, "open").await, open, "{fault:?}");
        clock.advance(Duration::from_millis(500)).await;
        assert_eq!(outcome(&app, &clock, "probe").await, failed, "{fault:?}");
        assert_eq!(outcome(&app, &clock, "reopened").await, open, "{fault:?}");
        app.sim.set_balance_fault(None);
        clock.advance(Duration::from_millis(500)).await;
        let fine = (200, "-".to_string(), 1);
        assert_eq!(outcome(&app, &clock, "probe-2").await, fine, "{fault:?}");
        assert_eq!(outcome(&app, &clock, "closed").await, fine, "{fault:?}");
    }
}

/// Flapping, one request at a time on a frozen clock: Bill24 fails (503) and recovers again
/// and again. Failures that successes separate never open the circuit (it counts consecutive
/// failed requests): each failed request is a 502 after its two retries, each other one a
/// 200. Five failures in a row open it; the first request after the cool-down probes a
/// recovered Bill24 and closes it.
#[tokio::test(start_paused = true)]
async fn fault_flapping() {
    let clock = FrozenClock::start();
    let app = Arc::new(spawn_app_with(suite_config).await);
    app.balance("warm-up").await;
    let failed = (502, "upstream_error".to_string(), 3);
    let fine = (200, "-".to_string(), 1);
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("L{n}")
    };
    for failures in [1, 4, 2, 4, 3, 4] {
        app.sim.set_balance_fault(Some(Fault::Status(503)));
        for _ in 0..failures {
            let code = next();
            assert_eq!(outcome(&app, &clock, &code).await, failed, "{code}");
        }
        app.sim.set_balance_fault(None);
        let code = next();
        assert_eq!(outcome(&app, &clock, &code).await, fine, "{code}");
        clock.advance(Duration::from_millis(150)).await;
    }
    assert_eq!(app.metric("gateway_circuit_opened_total").await, 0.0);
    app.sim.set_balance_fault(Some(Fault::Status(503)));
    for _ in 0..5 {
        let code = next();
        assert_eq!(outcome(&app, &clock, &code).await, failed, "{code}");
    }
    app.sim.set_balance_fault(None);
    let open = (503, "circuit_open".to_string(), 0);
    assert_eq!(outcome(&app, &clock, "while-open").await, open);
    clock.advance(Duration::from_millis(499)).await;
    assert_eq!(outcome(&app, &clock, "still-open").await, open);
    clock.advance(Duration::from_millis(1)).await;
    assert_eq!(outcome(&app, &clock, "probe").await, fine);
    assert_eq!(outcome(&app, &clock, "closed").await, fine);
    assert_eq!(app.metric("gateway_circuit_opened_total").await, 1.0);
}

/// A 401 storm (Bill24 refuses every token): callers get 502/503 quickly, and the gateway
/// does not buy a token per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_401_storm() {
    let app = Arc::new(
        spawn_app_with(|c| {
            suite_config(c);
            c.upstream.circuit_failures = 0;
        })
        .await,
    );
    app.balance("warm-up").await;
    app.sim.set_balance_fault(Some(Fault::Unauthorized));
    let statuses = load(&app, 8, Duration::from_secs(2), 40).await;
    assert!(statuses.iter().all(|s| *s == 502), "{statuses:?}");
    let authorizes = app.sim.authorize_calls();
    assert!(
        authorizes <= 1 + 2 * 3,
        "{authorizes} authorize calls for {} requests",
        statuses.len()
    );
    app.sim.set_balance_fault(None);
    assert!(recovered(&app).await);
}

/// The authorize endpoint goes down while tokens expire: stale entries keep answering where
/// allowed, other requests get 502/503 within the deadline, and the gateway recovers by
/// itself once authorize is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_authorize_down_while_tokens_expire() {
    let app = Arc::new(
        spawn_app_full(
            SimConfig {
                token_lifetime: Duration::from_millis(800),
                ..SimConfig::default()
            },
            |_| {},
            |c| {
                suite_config(c);
                c.cache.stale_if_error = Duration::from_secs(30);
            },
        )
        .await,
    );
    app.balance("L0").await;
    app.sim.set_authorize_fault(Some(Fault::Status(503)));
    tokio::time::sleep(Duration::from_millis(900)).await;
    let statuses = load(&app, 6, Duration::from_secs(1), 10).await;
    assert!(
        statuses.iter().all(|s| [200, 502, 503].contains(s)),
        "{statuses:?}"
    );
    let stale_ok = app.balance("L0").await;
    assert_eq!(
        (stale_ok.status, stale_ok.x_cache()),
        (StatusCode::OK, "STALE")
    );
    app.sim.set_authorize_fault(None);
    assert!(recovered(&app).await);
    assert_eq!(
        app.sim.stats().unauthorized_balance_calls,
        0,
        "no call with an expired token"
    );
}

/// Bill24 down at start (nothing listening), then up on that address: the gateway starts,
/// answers 502/503 meanwhile, and recovers on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_bill24_down_at_start() {
    let addr = dead_address().await;
    let app = Arc::new(
        spawn_app_with(|c| {
            suite_config(c);
            c.upstream.base_url = format!("http://{addr}");
        })
        .await,
    );
    let statuses = load(&app, 4, Duration::from_millis(700), 10).await;
    assert!(
        statuses.iter().all(|s| [502, 503].contains(s)),
        "{statuses:?}"
    );
    let simulator = Simulator::bind(addr, SimConfig::default())
        .await
        .expect("bind");
    assert!(recovered(&app).await);
    assert!(simulator.handle().authorize_calls() >= 1);
}

/// Bill24 goes away mid-run and comes back (new process, tokens it does not know): calls
/// fail meanwhile, and the gateway re-authorizes and recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_bill24_down_mid_run() {
    let first = Simulator::bind("127.0.0.1:0".parse().expect("addr"), SimConfig::default())
        .await
        .expect("sim");
    let addr: SocketAddr = first.addr();
    let app = Arc::new(
        spawn_app_with(|c| {
            suite_config(c);
            c.upstream.base_url = format!("http://{addr}");
        })
        .await,
    );
    assert_eq!(app.balance("L1").await.status, StatusCode::OK);
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let statuses = load(&app, 6, Duration::from_secs(1), 10).await;
    assert!(
        statuses.iter().all(|s| [200, 502, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(count(&statuses, 502) + count(&statuses, 503) > 0);
    let second = Simulator::bind(addr, SimConfig::default())
        .await
        .expect("rebind");
    assert!(recovered(&app).await);
    let handle: SimHandle = second.handle();
    assert!(
        handle.authorize_calls() >= 1,
        "re-authorized with the new Bill24"
    );
}
