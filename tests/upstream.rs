//! The Bill24 side (CONTRACT §3 table, §4): what callers get for each kind of Bill24 answer,
//! what goes upstream, the concurrency cap, and the merchant access token's life.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bill24_sim::{ExpireFormat, Fault, RefusalStyle, SimConfig};
use common::*;
use futures_util::future::join_all;
use http::StatusCode;

/// HTTP 200 passes through whatever its body code.
#[tokio::test]
async fn http_200_passes_through_any_body_code() {
    let app = spawn_app().await;
    let r = app.balance("UNKNOWN-9").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["code"], "311");
    assert!(r.json()["data"].is_null());
    app.sim.fail_next(1, Fault::MissedField);
    let r = app.balance("C1").await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (StatusCode::OK, Some("ERR_MISSED_FIELD"))
    );
}

/// A 4xx other than 401: same status, Bill24's body passed through.
#[tokio::test]
async fn other_4xx_pass_through_with_their_body() {
    let app = spawn_app().await;
    for status in [400u16, 403, 404, 409, 422, 429] {
        app.sim.fail_next(1, Fault::Status(status));
        let r = app.balance("C1").await;
        assert_eq!(r.status.as_u16(), status);
        assert!(
            String::from_utf8_lossy(&r.body).contains("<html>"),
            "body passed through"
        );
    }
    assert_eq!(app.sim.balance_calls(), 6, "no retries on 4xx");
}

/// 5xx, a reset connection, a non-JSON 200 and an unreachable Bill24 are 502.
#[tokio::test]
async fn bill24_failures_are_502() {
    let app = spawn_app().await;
    for (fault, code) in [
        (Fault::Status(500), "upstream_error"),
        (Fault::Status(503), "upstream_error"),
        (Fault::Reset, "upstream_unreachable"),
        (Fault::Html, "upstream_invalid_answer"),
    ] {
        app.sim.set_balance_fault(Some(fault));
        let r = app.balance("C1").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{fault:?}");
        assert_eq!(r.error_code(), code, "{fault:?}");
        assert!(r.header("x-cache").is_none());
    }
    app.sim.set_balance_fault(None);
    assert_eq!(
        app.balance("C1").await.status,
        StatusCode::OK,
        "and it recovers"
    );
}

#[tokio::test]
async fn unreachable_bill24_is_502_and_the_gateway_still_starts() {
    let dead = dead_address().await;
    let app = spawn_app_with(|c| c.upstream.base_url = format!("http://{dead}")).await;
    let r = app.admin(http::Method::GET, "/readyz", &[]).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "readiness does not depend on Bill24"
    );
    let r = app.balance("C1").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "token_unavailable");
}

/// A request on a frozen clock: sent, and waited for until it reaches Bill24.
async fn at_bill24(app: &Arc<TestApp>, code: &str) -> tokio::task::JoinHandle<Reply> {
    let request = tokio::spawn({
        let app = app.clone();
        let code = code.to_string();
        async move { app.balance(&code).await }
    });
    until("the call at Bill24", || {
        app.sim.balance_calls_for(code) == 1
    })
    .await;
    request
}

/// No answer within `upstream.timeout`: 504, at the timeout.
#[tokio::test(start_paused = true)]
async fn slow_bill24_is_504() {
    let clock = FrozenClock::start();
    let app = Arc::new(
        spawn_app_with(|c| {
            c.upstream.timeout = Duration::from_millis(200);
            c.upstream.retries = 0;
        })
        .await,
    );
    app.balance("warm-up-token").await;
    app.sim.set_latency(Duration::from_secs(2));
    let before = app.answering_seconds().await;
    let request = at_bill24(&app, "C1").await;
    clock.advance(Duration::from_millis(199)).await;
    app.settle().await;
    assert!(!request.is_finished(), "not before the timeout");
    clock.advance(Duration::from_millis(1)).await;
    let r = request.await.expect("request");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), "upstream_timeout");
    let took = app.answering_seconds().await - before;
    assert!(
        (took - 0.2).abs() < 1e-9,
        "answered at the timeout, by the gateway's clock: {took} s"
    );
}

/// The whole-request deadline `server.request_timeout` also answers 504, at the deadline.
#[tokio::test(start_paused = true)]
async fn request_deadline_is_504() {
    let clock = FrozenClock::start();
    let app = Arc::new(
        spawn_app_with(|c| {
            c.server.request_timeout = Duration::from_millis(300);
            c.upstream.timeout = Duration::from_secs(5);
        })
        .await,
    );
    app.balance("warm-up-token").await;
    app.sim.set_latency(Duration::from_secs(1));
    let before = app.answering_seconds().await;
    let request = at_bill24(&app, "C1").await;
    clock.advance(Duration::from_millis(299)).await;
    app.settle().await;
    assert!(!request.is_finished(), "not before the deadline");
    clock.advance(Duration::from_millis(1)).await;
    let r = request.await.expect("request");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), "deadline_exceeded");
    let took = app.answering_seconds().await - before;
    assert!(
        (took - 0.3).abs() < 1e-9,
        "answered at the deadline, by the gateway's clock: {took} s"
    );
    // The fetch went on and its answer was stored for the next caller.
    clock.advance(Duration::from_millis(700)).await;
    until("the call answered", || app.sim.stats().in_flight == 0).await;
    app.settle().await;
    assert_eq!(app.balance("C1").await.x_cache(), "HIT");
    assert_eq!(app.sim.balance_calls_for("C1"), 1);
}

/// At most `max_in_flight` calls reach Bill24 at once; others wait `queue_timeout`, then 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_concurrency_is_capped_and_overflow_is_503() {
    let app = Arc::new(
        spawn_app_with(|c| {
            c.upstream.max_in_flight = 2;
            c.upstream.queue_timeout = Duration::from_millis(100);
        })
        .await,
    );
    app.balance("warm-up-token").await;
    app.sim.set_latency(Duration::from_millis(400));
    let replies = join_all((0..6).map(|i| {
        let app = app.clone();
        async move { app.balance(&format!("K{i}")).await }
    }))
    .await;
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    let busy: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!(ok, 2, "two slots");
    assert_eq!(busy.len(), 4);
    for r in busy {
        assert_eq!(r.error_code(), "upstream_busy");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(app.sim.stats().max_in_flight, 2);
}

/// Exactly these headers go upstream; the caller's key never does.
#[tokio::test]
async fn only_allow_listed_headers_go_upstream() {
    let app = spawn_app().await;
    let r = app
        .balance_with(
            "C1",
            &[
                ("x-request-id", "rid-1"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("cookie", "session=abc"),
                ("x-forwarded-for", "10.0.0.1"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("user-agent", "orders/1.0"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let last = app.sim.last_balance_request().expect("called");
    let mut names: Vec<&str> = last.headers.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "authorization",
            "content-length",
            "content-type",
            "host",
            "traceparent",
            "x-request-id"
        ]
    );
    let auth = last.header("authorization").expect("authorization");
    assert!(auth.starts_with("Bearer eyJ"), "Bill24's access token");
    assert!(!auth.contains(ORDERS_KEY));
    assert!(last.headers.iter().all(|(_, v)| !v.contains(ORDERS_KEY)));
    assert_eq!(last.header("content-type"), Some("application/json"));
    assert_eq!(last.header("x-request-id"), Some("rid-1"));
    let tp = last.header("traceparent").expect("traceparent");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "same trace: {tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "a new span for the upstream hop: {tp}"
    );
}

/// With no traceparent from the caller, one is started.
#[tokio::test]
async fn a_trace_is_started_when_absent() {
    let app = spawn_app().await;
    app.balance("C1").await;
    let last = app.sim.last_balance_request().expect("called");
    let tp = last.header("traceparent").expect("traceparent");
    assert_eq!(tp.len(), 55);
    assert!(tp.starts_with("00-") && tp.ends_with("-01"), "{tp}");
}

/// The authorize call carries the merchant credentials as BILL24.md §1 describes.
#[tokio::test]
async fn authorize_request_has_bill24s_shape() {
    let app = spawn_app().await;
    app.balance("C1").await;
    let auth = app.sim.last_authorize_request().expect("authorized");
    let body: serde_json::Value = serde_json::from_slice(&auth.body).expect("json");
    assert_eq!(body["token"], bill24_sim::DEMO_MERCHANT_TOKEN);
    assert_eq!(body["clientId"], bill24_sim::DEMO_CLIENT_ID);
    assert_eq!(body["secret"], bill24_sim::DEMO_CLIENT_SECRET);
    assert!(
        body.get("refreshToken").is_none(),
        "first authorize has no refresh token"
    );
    assert_eq!(auth.header("content-type"), Some("application/json"));
    assert_eq!(auth.header("accept"), Some("application/json"));
}

/// The token is obtained at start: one authorize, then many balance calls use it.
#[tokio::test]
async fn token_obtained_once_at_start() {
    let app = spawn_app().await;
    assert!(eventually(Duration::from_secs(2), || app.sim.authorize_calls() == 1).await);
    for i in 0..10 {
        app.balance(&format!("C{i}")).await;
    }
    assert_eq!(app.sim.authorize_calls(), 1);
    assert_eq!(app.sim.stats().unauthorized_balance_calls, 0);
}

/// Concurrent first requests while the authorize is slow share that one authorize.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_authorize_in_flight_however_many_requests_wait() {
    let app = Arc::new(
        spawn_app_full(
            SimConfig::default(),
            |sim| sim.set_authorize_latency(Duration::from_millis(300)),
            |_| {},
        )
        .await,
    );
    let replies = join_all((0..30).map(|i| {
        let app = app.clone();
        async move { app.balance(&format!("C{i}")).await }
    }))
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(app.sim.authorize_calls(), 1);
}

/// On a Bill24 401 the gateway refreshes (refreshToken first) and retries once.
#[tokio::test]
async fn bill24_401_refreshes_the_token_and_retries_once() {
    let app = spawn_app().await;
    app.balance("warm-up").await;
    app.sim.revoke_access_tokens();
    let r = app.balance("C1").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(app.sim.authorize_calls(), 2);
    assert_eq!(app.sim.refresh_calls(), 1, "the refresh token was used");
    assert_eq!(app.sim.balance_calls_for("C1"), 2, "one retry");
    let refresh = app.sim.last_authorize_request().expect("authorize");
    let body: serde_json::Value = serde_json::from_slice(&refresh.body).expect("json");
    assert!(body["refreshToken"].as_str().is_some_and(|t| !t.is_empty()));
}

/// When the refresh token is refused too, a full authorize follows.
#[tokio::test]
async fn refused_refresh_token_falls_back_to_full_authorize() {
    for style in [RefusalStyle::BodyCode, RefusalStyle::HttpStatus] {
        let app = spawn_app().await;
        app.sim.set_refusal_style(style);
        app.balance("warm-up").await;
        app.sim.revoke_all_tokens();
        let r = app.balance("C1").await;
        assert_eq!(r.status, StatusCode::OK, "{style:?}");
        assert_eq!(
            app.sim.authorize_calls(),
            3,
            "start, refresh (refused), full authorize"
        );
        assert_eq!(app.sim.refresh_calls(), 1);
    }
}

/// 401 again after the refresh: 502.
#[tokio::test]
async fn second_401_is_502() {
    let app = spawn_app().await;
    app.balance("warm-up").await;
    app.sim.fail_next(2, Fault::Unauthorized);
    let r = app.balance("C1").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "upstream_unauthorized");
    assert_eq!(app.sim.balance_calls_for("C1"), 2, "exactly one retry");
}

/// 50 concurrent requests after every token was revoked: at most 2 authorize calls (the
/// refresh attempt and the full authorize), and every request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_storm_costs_at_most_two_authorize_calls() {
    let app = Arc::new(spawn_app().await);
    app.balance("warm-up").await;
    let before = app.sim.authorize_calls();
    app.sim.revoke_all_tokens();
    app.sim.set_latency(Duration::from_millis(50));
    let replies = join_all((0..50).map(|i| {
        let app = app.clone();
        async move { app.balance(&format!("S{i}")).await }
    }))
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let authorizes = app.sim.authorize_calls() - before;
    assert!(
        (1..=2).contains(&authorizes),
        "{authorizes} authorize calls"
    );
}

/// The token is refreshed in the background before it expires: with a 2 s token and a 5 m
/// margin, after half its life. Requests never see a 401. (The lifetime is read from Bill24's
/// `tokenExpireTime`, a wall-clock time, so it is 2 s less the few real milliseconds the
/// exchange took: the checks leave that much room.)
#[tokio::test(start_paused = true)]
async fn token_is_refreshed_in_the_background_before_expiry() {
    let clock = FrozenClock::start();
    let app = spawn_app_full(
        SimConfig {
            token_lifetime: Duration::from_secs(2),
            ..SimConfig::default()
        },
        |_| {},
        |_| {},
    )
    .await;
    until("the first token", || app.sim.authorize_calls() == 1).await;
    app.until_metric(&[r#"gateway_token_refreshes_total{result="success"}"#], 1.0)
        .await;
    clock.advance(Duration::from_millis(900)).await;
    app.settle().await;
    assert_eq!(app.sim.refresh_calls(), 0, "not before half its life");
    clock.advance(Duration::from_millis(100)).await;
    until("the refresh at half its life", || {
        app.sim.refresh_calls() == 1
    })
    .await;
    assert_eq!(app.sim.authorize_calls(), 2);
    // The new token is in place (its refresh timer set) once the refresh counts as done.
    app.until_metric(&[r#"gateway_token_refreshes_total{result="success"}"#], 2.0)
        .await;
    clock.advance(Duration::from_millis(900)).await;
    app.settle().await;
    assert_eq!(app.sim.refresh_calls(), 1, "the new token: not sooner");
    clock.advance(Duration::from_millis(100)).await;
    until("half the new token's life later", || {
        app.sim.refresh_calls() == 2
    })
    .await;
    assert_eq!(app.balance("C1").await.status, StatusCode::OK);
    assert_eq!(app.sim.stats().unauthorized_balance_calls, 0);
}

/// `tokenExpireTime` in UTC ("Z") works like the .NET offset form.
#[tokio::test(start_paused = true)]
async fn utc_expire_times_are_read() {
    let clock = FrozenClock::start();
    let app = spawn_app_full(
        SimConfig {
            token_lifetime: Duration::from_secs(2),
            ..SimConfig::default()
        },
        |sim| sim.set_expire_format(ExpireFormat::Utc),
        |_| {},
    )
    .await;
    until("the first token", || app.sim.authorize_calls() == 1).await;
    let expires_in = app.metric("gateway_token_expires_in_seconds").await;
    assert!(expires_in > 1.9 && expires_in <= 2.0, "{expires_in}");
    clock.advance(Duration::from_millis(1000)).await;
    until("the refresh at half its life", || {
        app.sim.refresh_calls() == 1
    })
    .await;
}

/// A token without a readable expiry is used until Bill24 refuses it (two hours on, still no
/// refresh).
#[tokio::test(start_paused = true)]
async fn token_without_expiry_is_used_until_refused() {
    let clock = FrozenClock::start();
    for format in [ExpireFormat::Missing, ExpireFormat::Garbage] {
        let app = spawn_app_full(
            SimConfig::default(),
            |sim| sim.set_expire_format(format),
            |_| {},
        )
        .await;
        for i in 0..5 {
            assert_eq!(app.balance(&format!("C{i}")).await.status, StatusCode::OK);
        }
        // Every timer due within two hours fires, and then whatever those set up.
        for _ in 0..2 {
            clock.advance(Duration::from_secs(3600)).await;
            app.settle().await;
        }
        assert_eq!(
            app.sim.authorize_calls(),
            1,
            "{format:?}: no refresh without an expiry"
        );
        app.sim.revoke_access_tokens();
        assert_eq!(app.balance("after").await.status, StatusCode::OK);
        assert_eq!(app.sim.authorize_calls(), 2);
    }
}

/// Bill24's authorize down at start: the gateway serves anyway (502 for misses), keeps
/// retrying with backoff (250 ms, doubling), and recovers on its own.
#[tokio::test(start_paused = true)]
async fn authorize_down_at_start_then_recovers() {
    let clock = FrozenClock::start();
    let app = spawn_app_full(
        SimConfig::default(),
        |sim| sim.set_authorize_fault(Some(Fault::Status(503))),
        |_| {},
    )
    .await;
    const FAILURES: &str = r#"gateway_token_refreshes_total{result="failure"}"#;
    until("the first attempt", || app.sim.authorize_calls() == 1).await;
    // Failed: the backoff runs from here.
    app.until_metric(&[FAILURES], 1.0).await;
    let r = app.balance("C1").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "token_unavailable");
    assert_eq!(
        app.sim.authorize_calls(),
        1,
        "a request does not buy a token"
    );
    // Attempts at 0, 250 ms and 750 ms; the next at 1.75 s: each not a millisecond early.
    for (wait, attempts) in [(250, 2), (500, 3)] {
        clock.advance(Duration::from_millis(wait - 1)).await;
        app.settle().await;
        assert_eq!(app.sim.authorize_calls(), attempts - 1, "backing off");
        clock.advance(Duration::from_millis(1)).await;
        until("the next attempt", || app.sim.authorize_calls() == attempts).await;
        app.until_metric(&[FAILURES], attempts as f64).await;
    }
    clock.advance(Duration::from_millis(999)).await;
    app.settle().await;
    assert_eq!(app.sim.authorize_calls(), 3, "backing off");
    app.sim.set_authorize_fault(None);
    clock.advance(Duration::from_millis(1)).await;
    until("a token", || app.sim.authorize_calls() == 4).await;
    app.until_metric(&[r#"gateway_token_refreshes_total{result="success"}"#], 1.0)
        .await;
    assert_eq!(app.balance("C1").await.status, StatusCode::OK, "recovered");
    assert!(
        app.metric(r#"gateway_token_refreshes_total{result="failure"}"#)
            .await
            >= 3.0
    );
    assert!(
        app.metric(r#"gateway_token_refreshes_total{result="success"}"#)
            .await
            >= 1.0
    );
}

/// Wrong merchant credentials: 502 for callers, never one authorize per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_credentials_never_cost_one_authorize_per_request() {
    let app = Arc::new(
        spawn_app_with(|c| {
            c.upstream.client_secret = bill24_gateway::Secret::new("wrong");
        })
        .await,
    );
    let replies = join_all((0..40).map(|i| {
        let app = app.clone();
        async move { app.balance(&format!("C{i}")).await }
    }))
    .await;
    // 502 (no token), or 503 once the circuit breaker has opened on those failures.
    assert!(replies.iter().all(
        |r| r.status == StatusCode::BAD_GATEWAY || r.status == StatusCode::SERVICE_UNAVAILABLE
    ));
    assert!(
        replies
            .iter()
            .any(|r| r.error_code() == "token_unavailable")
    );
    assert!(
        app.sim.authorize_calls() <= 3,
        "{}",
        app.sim.authorize_calls()
    );
}
