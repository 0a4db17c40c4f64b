//! Caching (CONTRACT §3): what is stored and for how long, X-Cache and Age, the caller's
//! Cache-Control, stale-if-error, and request coalescing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bill24_sim::Fault;
use common::*;
use futures_util::future::join_all;
use http::{Method, StatusCode};

/// First request MISS, then HIT with Age, from one Bill24 call; after the TTL, a MISS again.
#[tokio::test(start_paused = true)]
async fn miss_then_hit_then_miss_after_ttl() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| c.cache.ttl = Duration::from_millis(1500)).await;
    let first = app.balance("M005T").await;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    let second = app.balance("M005T").await;
    assert_eq!((second.status, second.x_cache()), (StatusCode::OK, "HIT"));
    assert_eq!(second.header("age"), Some("0"));
    assert_eq!(
        second.body, first.body,
        "the cached bytes are Bill24's bytes"
    );
    assert_eq!(app.sim.balance_calls_for("M005T"), 1);

    clock.advance(Duration::from_millis(999)).await;
    let aged = app.balance("M005T").await;
    assert_eq!(aged.header("age"), Some("0"), "whole seconds, rounded down");
    clock.advance(Duration::from_millis(1)).await;
    let aged = app.balance("M005T").await;
    assert_eq!(aged.x_cache(), "HIT");
    assert_eq!(aged.header("age"), Some("1"));
    clock.advance(Duration::from_millis(499)).await;
    assert_eq!(app.balance("M005T").await.x_cache(), "HIT", "until the ttl");
    assert_eq!(app.sim.balance_calls_for("M005T"), 1);

    clock.advance(Duration::from_millis(1)).await;
    let expired = app.balance("M005T").await;
    assert_eq!(expired.x_cache(), "MISS");
    assert_eq!(app.sim.balance_calls_for("M005T"), 2);
}

/// Keys are exact and case-sensitive.
#[tokio::test]
async fn keys_are_exact_and_case_sensitive() {
    let app = spawn_app().await;
    for code in ["m005t", "M005T", "M005T ", " M005T"] {
        assert_eq!(app.balance(code).await.x_cache(), "MISS", "{code:?}");
    }
    assert_eq!(app.balance("M005T").await.x_cache(), "HIT");
    assert_eq!(app.sim.balance_calls(), 4);
}

/// A cache hit is shared across callers (the key is the customer, not the caller).
#[tokio::test]
async fn entries_are_shared_across_callers() {
    let app = spawn_app().await;
    assert_eq!(app.balance("M005T").await.x_cache(), "MISS");
    let other = app.post(Some(BILLING_KEY), body_for("M005T"), &[]).await;
    assert_eq!(other.x_cache(), "HIT");
}

/// "311" is passed through and not cached unless `negative_ttl` is set.
#[tokio::test(start_paused = true)]
async fn not_found_is_cached_only_under_negative_ttl() {
    let clock = FrozenClock::start();
    let app = spawn_app().await;
    for _ in 0..2 {
        let r = app.balance("UNKNOWN-1").await;
        assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "MISS"));
        assert_eq!(r.json()["code"], "311");
    }
    assert_eq!(app.sim.balance_calls_for("UNKNOWN-1"), 2);

    let app = spawn_app_with(|c| c.cache.negative_ttl = Duration::from_millis(400)).await;
    assert_eq!(app.balance("UNKNOWN-1").await.x_cache(), "MISS");
    let hit = app.balance("UNKNOWN-1").await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.json()["code"], "311");
    clock.advance(Duration::from_millis(399)).await;
    assert_eq!(app.balance("UNKNOWN-1").await.x_cache(), "HIT");
    clock.advance(Duration::from_millis(1)).await;
    assert_eq!(app.balance("UNKNOWN-1").await.x_cache(), "MISS");
    assert_eq!(app.sim.balance_calls_for("UNKNOWN-1"), 2);
}

/// Nothing but "000" (and opted-in "311") is ever cached: not ERR_MISSED_FIELD, not a 4xx,
/// not a 5xx.
#[tokio::test]
async fn other_answers_are_never_cached() {
    let app = spawn_app_with(|c| {
        c.cache.negative_ttl = Duration::from_secs(60);
        c.upstream.retries = 0;
    })
    .await;
    app.sim.fail_next(1, Fault::MissedField);
    let r = app.balance("C1").await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (StatusCode::OK, Some("ERR_MISSED_FIELD"))
    );
    app.sim.fail_next(1, Fault::Status(404));
    assert_eq!(app.balance("C1").await.status, StatusCode::NOT_FOUND);
    app.sim.fail_next(1, Fault::Status(500));
    assert_eq!(app.balance("C1").await.status, StatusCode::BAD_GATEWAY);
    let r = app.balance("C1").await;
    assert_eq!(
        (r.status, r.x_cache()),
        (StatusCode::OK, "MISS"),
        "nothing was cached before"
    );
    assert_eq!(app.balance("C1").await.x_cache(), "HIT");
    assert_eq!(app.sim.balance_calls_for("C1"), 4);
}

/// `Cache-Control: no-cache` skips a fresh entry (BYPASS), fetches fresh and stores it.
#[tokio::test]
async fn no_cache_fetches_fresh_and_stores() {
    let app = spawn_app().await;
    app.sim.set_balance("C1", 100);
    assert_eq!(app.balance("C1").await.x_cache(), "MISS");
    app.sim.set_balance("C1", 200);
    assert!(app.balance("C1").await.json()["data"][0]["balance"] == 100);

    let fresh = app
        .balance_with("C1", &[("cache-control", "no-cache")])
        .await;
    assert_eq!(fresh.x_cache(), "BYPASS");
    assert_eq!(fresh.json()["data"][0]["balance"], 200);
    assert!(fresh.header("age").is_none());
    let after = app.balance("C1").await;
    assert_eq!(after.x_cache(), "HIT");
    assert_eq!(
        after.json()["data"][0]["balance"],
        200,
        "the fresh answer was stored"
    );
    assert_eq!(app.sim.balance_calls_for("C1"), 2);

    // With no usable entry, the same request is a plain MISS.
    let miss = app
        .balance_with("C2", &[("cache-control", "no-cache")])
        .await;
    assert_eq!(miss.x_cache(), "MISS");
}

/// A refetched entry lives its own full TTL, not what was left of the one it replaced.
#[tokio::test(start_paused = true)]
async fn a_refetched_entry_gets_a_full_ttl() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| c.cache.ttl = Duration::from_millis(600)).await;
    assert_eq!(app.balance("C1").await.x_cache(), "MISS");
    clock.advance(Duration::from_millis(400)).await;
    let r = app
        .balance_with("C1", &[("cache-control", "no-cache")])
        .await;
    assert_eq!(r.x_cache(), "BYPASS");
    clock.advance(Duration::from_millis(599)).await;
    assert_eq!(
        app.balance("C1").await.x_cache(),
        "HIT",
        "past the first entry's expiry"
    );
    clock.advance(Duration::from_millis(1)).await;
    assert_eq!(app.balance("C1").await.x_cache(), "MISS", "its own ttl");
    assert_eq!(app.sim.balance_calls_for("C1"), 3);
}

/// `no-store` fetches fresh and leaves the cache as it was.
#[tokio::test]
async fn no_store_fetches_fresh_without_storing() {
    let app = spawn_app().await;
    app.sim.set_balance("C1", 100);
    app.balance("C1").await;
    app.sim.set_balance("C1", 200);
    let fresh = app
        .balance_with("C1", &[("cache-control", "no-store")])
        .await;
    assert_eq!(fresh.x_cache(), "BYPASS");
    assert_eq!(fresh.json()["data"][0]["balance"], 200);
    let cached = app.balance("C1").await;
    assert_eq!(cached.x_cache(), "HIT");
    assert_eq!(
        cached.json()["data"][0]["balance"],
        100,
        "no-store did not replace the entry"
    );

    // no-store with nothing cached: a MISS that stores nothing.
    let r = app
        .balance_with("C2", &[("cache-control", "no-store")])
        .await;
    assert_eq!(r.x_cache(), "MISS");
    assert_eq!(app.balance("C2").await.x_cache(), "MISS");
    assert_eq!(app.sim.balance_calls_for("C2"), 2);
}

/// `max-age=N`: cache only if the entry is at most N seconds old; `max-age=0` always fetches.
#[tokio::test(start_paused = true)]
async fn max_age_bounds_the_entry_age() {
    let clock = FrozenClock::start();
    let app = spawn_app().await;
    app.balance("C1").await;
    let r = app
        .balance_with("C1", &[("cache-control", "max-age=5")])
        .await;
    assert_eq!(r.x_cache(), "HIT");
    let r = app
        .balance_with("C1", &[("cache-control", "max-age=0")])
        .await;
    assert_eq!(r.x_cache(), "BYPASS");
    assert_eq!(app.sim.balance_calls_for("C1"), 2);

    clock.advance(Duration::from_secs(1)).await;
    // The entry is exactly 1 s old (the max-age=0 fetch stored it again).
    let r = app
        .balance_with("C1", &[("cache-control", "max-age=1")])
        .await;
    assert_eq!(r.x_cache(), "HIT", "at most N seconds old");
    clock.advance(Duration::from_millis(1)).await;
    let r = app
        .balance_with("C1", &[("cache-control", "max-age=1")])
        .await;
    assert_eq!(r.x_cache(), "BYPASS", "sub-second age counts");
    let r = app
        .balance_with("C1", &[("cache-control", "max-age=2")])
        .await;
    assert_eq!(r.x_cache(), "HIT");
    // max-age never stretches the TTL.
    let r = app
        .balance_with("C1", &[("cache-control", "max-age=100000")])
        .await;
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(app.sim.balance_calls_for("C1"), 3);
}

/// Under `stale_if_error`, an expired entry answers (STALE, with Age) when Bill24 fails; past
/// the window, the failure shows.
#[tokio::test(start_paused = true)]
async fn stale_entry_answers_when_bill24_fails() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| {
        c.cache.ttl = Duration::from_millis(300);
        c.cache.stale_if_error = Duration::from_millis(1200);
        c.upstream.retries = 0;
    })
    .await;
    let fresh = app.balance("C1").await;
    clock.advance(Duration::from_millis(300)).await;
    for fault in [Fault::Status(503), Fault::Reset, Fault::Html] {
        app.sim.fail_next(1, fault);
        let stale = app.balance("C1").await;
        assert_eq!(
            (stale.status, stale.x_cache()),
            (StatusCode::OK, "STALE"),
            "{fault:?}"
        );
        assert_eq!(stale.body, fresh.body);
        assert_eq!(stale.header("age"), Some("0"));
    }
    // Bill24 fine again: the expired entry is replaced.
    assert_eq!(app.balance("C1").await.x_cache(), "MISS");
    // The last moment of ttl + stale_if_error, then past it: no entry to fall back on.
    clock.advance(Duration::from_millis(1499)).await;
    app.sim.fail_next(1, Fault::Status(500));
    let stale = app.balance("C1").await;
    assert_eq!((stale.x_cache(), stale.header("age")), ("STALE", Some("1")));
    clock.advance(Duration::from_millis(1)).await;
    app.sim.fail_next(1, Fault::Status(500));
    assert_eq!(app.balance("C1").await.status, StatusCode::BAD_GATEWAY);
}

/// Without `stale_if_error` an expired entry is never served.
#[tokio::test(start_paused = true)]
async fn no_stale_without_stale_if_error() {
    let clock = FrozenClock::start();
    let app = spawn_app_with(|c| {
        c.cache.ttl = Duration::from_millis(200);
        c.upstream.retries = 0;
    })
    .await;
    app.balance("C1").await;
    clock.advance(Duration::from_millis(200)).await;
    app.sim.fail_next(1, Fault::Status(500));
    let r = app.balance("C1").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "upstream_error");
}

/// Stale also covers a timeout and a token failure.
#[tokio::test(start_paused = true)]
async fn stale_covers_timeouts_and_token_failures() {
    let clock = FrozenClock::start();
    let app = std::sync::Arc::new(
        spawn_app_with(|c| {
            c.cache.ttl = Duration::from_millis(200);
            c.cache.stale_if_error = Duration::from_secs(30);
            c.upstream.timeout = Duration::from_millis(200);
            c.upstream.retries = 0;
        })
        .await,
    );
    app.balance("C1").await;
    clock.advance(Duration::from_millis(300)).await;
    app.sim.set_latency(Duration::from_millis(500));
    let request = tokio::spawn({
        let app = app.clone();
        async move { app.balance("C1").await }
    });
    until("the call at Bill24", || app.sim.stats().in_flight == 1).await;
    clock.advance(Duration::from_millis(200)).await;
    let r = request.await.expect("request");
    assert_eq!(r.x_cache(), "STALE", "504 → stale");
    app.sim.set_latency(Duration::ZERO);
    clock.advance(Duration::from_millis(300)).await;

    app.sim.revoke_all_tokens();
    app.sim.set_authorize_fault(Some(Fault::Status(503)));
    assert_eq!(
        app.balance("C1").await.x_cache(),
        "STALE",
        "token failure → stale"
    );
}

/// 100 concurrent requests for one cold key: exactly one Bill24 call, every caller answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_share_one_upstream_call() {
    let app = Arc::new(spawn_app().await);
    app.sim.set_latency(Duration::from_millis(200));
    let replies = join_all((0..100).map(|_| {
        let app = app.clone();
        async move { app.balance("HOT").await }
    }))
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let first = &replies[0].body;
    assert!(replies.iter().all(|r| r.body == *first));
    assert_eq!(app.sim.balance_calls_for("HOT"), 1);
    assert!(
        replies
            .iter()
            .all(|r| r.x_cache() == "MISS" || r.x_cache() == "HIT")
    );
    let coalesced = app.metric("gateway_coalesced_requests_total").await;
    let misses = replies.iter().filter(|r| r.x_cache() == "MISS").count() as f64;
    assert_eq!(
        coalesced,
        misses - 1.0,
        "every MISS but the leader joined its call"
    );
}

/// Concurrent requests that will not be cached (a 311 without negative_ttl) still share the
/// one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uncacheable_answers_are_shared_too() {
    let app = Arc::new(spawn_app().await);
    app.sim.set_latency(Duration::from_millis(200));
    let replies = join_all((0..20).map(|_| {
        let app = app.clone();
        async move { app.balance("UNKNOWN-X").await }
    }))
    .await;
    assert!(replies.iter().all(|r| r.json()["code"] == "311"));
    assert_eq!(app.sim.balance_calls_for("UNKNOWN-X"), 1);
}

/// The first caller hanging up (closing its connection) does not cancel the call the others
/// wait on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_caller_hanging_up_does_not_cancel_the_shared_call() {
    use tokio::io::AsyncWriteExt;
    let app = Arc::new(spawn_app().await);
    app.sim.set_latency(Duration::from_millis(300));
    let mut leader = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let body = body_for("HOT");
    let request = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ORDERS_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    leader.write_all(request.as_bytes()).await.expect("write");
    assert!(
        eventually(Duration::from_secs(2), || app.sim.balance_calls_for("HOT")
            == 1)
        .await
    );
    let followers = tokio::spawn({
        let app = app.clone();
        async move {
            join_all((0..10).map(|_| {
                let app = app.clone();
                async move { app.balance("HOT").await }
            }))
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(leader);
    let replies = followers.await.expect("followers ran");
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::OK && r.x_cache() == "MISS")
    );
    assert_eq!(app.sim.balance_calls_for("HOT"), 1);
    assert_eq!(
        app.balance("HOT").await.x_cache(),
        "HIT",
        "and its answer was stored"
    );
    assert_eq!(
        app.metric(r#"gateway_requests_total{caller="orders",status="499",cache="-"}"#)
            .await,
        1.0,
        "the hung-up request is counted as 499"
    );
}

/// A no-cache request joins a fetch already in flight instead of starting another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bypassing_requests_join_the_fetch_in_flight() {
    let app = Arc::new(spawn_app().await);
    app.sim.set_latency(Duration::from_millis(200));
    let replies = join_all((0..10).map(|i| {
        let app = app.clone();
        async move {
            if i % 2 == 0 {
                app.balance_with("K", &[("cache-control", "no-cache")])
                    .await
            } else {
                app.balance("K").await
            }
        }
    }))
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(app.sim.balance_calls_for("K"), 1);
}

/// Purging one entry or all of them makes the next request a MISS.
#[tokio::test]
async fn purge_removes_entries() {
    let app = spawn_app().await;
    for code in ["A", "B", "with space/ស"] {
        app.balance(code).await;
        assert_eq!(app.balance(code).await.x_cache(), "HIT");
    }
    let r = app.admin(Method::DELETE, "/cache/A", &[]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(app.balance("A").await.x_cache(), "MISS");
    assert_eq!(app.balance("B").await.x_cache(), "HIT");

    let r = app
        .admin(Method::DELETE, "/cache/with%20space%2F%E1%9E%9F", &[])
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "percent-decoded");
    assert_eq!(app.balance("with space/ស").await.x_cache(), "MISS");

    let r = app.admin(Method::DELETE, "/cache", &[]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(app.balance("A").await.x_cache(), "MISS");
    assert_eq!(app.balance("B").await.x_cache(), "MISS");

    let r = app.admin(Method::DELETE, "/cache/never-cached", &[]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

/// A fetch that started before a purge does not store its (possibly outdated) answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_during_a_fetch_wins() {
    let app = Arc::new(spawn_app().await);
    app.sim.set_latency(Duration::from_millis(300));
    let pending = {
        let app = app.clone();
        tokio::spawn(async move { app.balance("P").await })
    };
    assert!(
        eventually(Duration::from_secs(2), || app.sim.balance_calls_for("P")
            == 1)
        .await
    );
    assert_eq!(
        app.admin(Method::DELETE, "/cache/P", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(pending.await.expect("ran").status, StatusCode::OK);
    app.sim.set_latency(Duration::ZERO);
    assert_eq!(app.balance("P").await.x_cache(), "MISS");
}

/// Cache keys are the code exactly as sent: codes that differ only by case, Unicode form, a
/// look-alike character, white space or an invisible character never share an entry, so no
/// caller can be served another customer's balance (or plant one) by normalization tricks.
#[tokio::test]
async fn look_alike_codes_never_share_an_entry() {
    let app = spawn_app().await;
    let original = app.balance("M005T").await;
    assert_eq!(original.x_cache(), "MISS");
    let look_alikes = [
        "m005t",
        "M005T ",
        " M005T",
        "M005T\u{200b}",
        "\u{ff2d}005T",
        "M005\u{0422}",
        "Mo05T",
        "M005T\u{301}",
    ];
    for code in look_alikes {
        let r = app.balance(code).await;
        assert_eq!(
            (r.status, r.x_cache()),
            (StatusCode::OK, "MISS"),
            "{code:?}"
        );
        assert_ne!(r.body, original.body, "{code:?} got M005T's balance");
        assert_eq!(
            app.sim.balance_calls_for(code),
            1,
            "{code:?} asked for as sent"
        );
    }
    let again = app.balance("M005T").await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.body, original.body);
}
