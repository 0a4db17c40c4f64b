//! How large a Bill24 answer may be, through the built binary in front of the simulator: an
//! answer over `bill24::MAX_ANSWER_BYTES` is a 502 `upstream_invalid_answer` after one call
//! (never retried), and the cache holds answers up to `MAX_CACHED_ANSWER_BYTES` within
//! `cache.max_bytes`.

mod common;

use std::net::SocketAddr;

use common::process::{balance, gateway_toml, gateway_with_sim, get};
use common::{ORDERS_KEY, metric_value};
use http::StatusCode;

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let reply = get(admin, "/metrics").await;
    metric_value(&String::from_utf8_lossy(&reply.body), series)
}

const BALANCE_200_NO_CODE: &str =
    "gateway_upstream_requests_total{endpoint=\"balance\",status=\"200\",bill24_code=\"-\"}";

/// One byte over the limit: 502 `upstream_invalid_answer` whose message says the answer was
/// too large, after exactly one Bill24 call although `retries` is 2, counted under Bill24's
/// status (200) and logged with it; an answer of exactly the limit is passed through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_is_an_invalid_answer_and_not_retried() {
    let (sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, admin) = gw.addresses().await;
    let limit = bill24::MAX_ANSWER_BYTES as u64;
    let handle = sim.handle();

    handle.set_answer_bytes(limit + 1);
    let reply = balance(main, ORDERS_KEY, "HUGE").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(body["code"], "upstream_invalid_answer", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("larger than 1048576 bytes"), "{message}");
    assert_eq!(handle.balance_calls_for("HUGE"), 1, "not retried");
    assert_eq!(metric(admin, BALANCE_200_NO_CODE).await, 1.0);
    let access = gw.wait_for_line("\"customer_sync_code\":\"HUGE\"").await;
    let access: serde_json::Value = serde_json::from_str(&access).expect("json line");
    assert_eq!(access["status"], 502, "{access}");
    assert_eq!(access["upstream_status"], 200, "{access}");

    handle.set_answer_bytes(limit);
    let reply = balance(main, ORDERS_KEY, "LARGEST").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len() as u64, limit, "passed through whole");
    assert_eq!(reply.json()["code"], "000");
    assert_eq!(handle.balance_calls_for("LARGEST"), 1);
}

/// An answer one byte over 64 KiB is passed on whole but not cached (each ask goes to Bill24,
/// `X-Cache: MISS` both times); one of exactly 64 KiB is cached (the second ask a HIT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_64_kib_is_passed_on_but_not_cached() {
    let (sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, admin) = gw.addresses().await;
    let handle = sim.handle();
    let cap = 64 * 1024;

    handle.set_answer_bytes(cap + 1);
    for _ in 0..2 {
        let reply = balance(main, ORDERS_KEY, "OVER").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.x_cache(), "MISS");
        assert_eq!(reply.body.len() as u64, cap + 1);
    }
    assert_eq!(handle.balance_calls_for("OVER"), 2, "not cached");
    gw.wait_for_line("too large to cache").await;

    handle.set_answer_bytes(cap);
    let first = balance(main, ORDERS_KEY, "AT").await;
    assert_eq!(first.x_cache(), "MISS");
    let second = balance(main, ORDERS_KEY, "AT").await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.body, first.body);
    assert_eq!(second.body.len() as u64, cap);
    assert_eq!(handle.balance_calls_for("AT"), 1, "cached");
    assert_eq!(metric(admin, "gateway_cache_entries").await, 1.0);
}

/// With `cache.max_bytes` at its least (1 MiB), 40 answers of 60 kB (2.3 MB) do not all stay:
/// at most 17 entries (17 × 60 kB and their bookkeeping fit in 1 MiB, 18 do not), so at most
/// 17 of the 40 are HITs when asked again; `max_entries` (100 000) is far off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_holds_no_more_than_max_bytes() {
    let (sim, gw, _dir) = gateway_with_sim(
        |sim| format!("{}\n[cache]\nmax_bytes = 1048576\n", gateway_toml(sim, "")),
        &[],
    )
    .await;
    let (main, admin) = gw.addresses().await;
    sim.handle().set_answer_bytes(60_000);
    let codes: Vec<String> = (0..40).map(|i| format!("BIG{i}")).collect();
    for code in &codes {
        let reply = balance(main, ORDERS_KEY, code).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.x_cache(), "MISS");
    }
    let entries = metric(admin, "gateway_cache_entries").await;
    assert!((1.0..=17.0).contains(&entries), "{entries} entries");
    let mut hits = 0;
    for code in &codes {
        let reply = balance(main, ORDERS_KEY, code).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), 60_000);
        if reply.x_cache() == "HIT" {
            hits += 1;
        }
    }
    assert!((1..=17).contains(&hits), "{hits} hits");
    assert!(metric(admin, "gateway_cache_entries").await <= 17.0);
}
