//! Soak driver: minutes of mixed load against a running gateway while Bill24 faults are
//! switched on and off through the simulator's control endpoint. Run by `bench/soak.sh`,
//! which starts the simulator and the gateway; see README "Soak test".
//!
//! Reports requests sent and answered (they must be equal), answers by status, the gateway's
//! RSS at start and end, and Bill24 calls per 1000 requests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// The gateway's main listener.
    #[arg(long)]
    gateway: String,
    /// The simulator's base URL (for faults and stats).
    #[arg(long)]
    sim: String,
    /// The gateway's process id (for RSS).
    #[arg(long)]
    pid: u32,
    #[arg(long)]
    key: String,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Distinct customers; a tenth of them get half the traffic.
    #[arg(long, default_value_t = 2000)]
    keys: usize,
    /// How long each fault phase lasts.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    phase: Duration,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Faults cycled through, one per phase.
fn phases() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "healthy",
            json!({"latency_ms": 5, "balance_fault": null, "authorize_fault": null}),
        ),
        ("slow (300 ms)", json!({"latency_ms": 300})),
        (
            "5xx",
            json!({"latency_ms": 5, "balance_fault": {"status": 503}}),
        ),
        ("healthy", json!({"balance_fault": null})),
        ("resets", json!({"balance_fault": "reset"})),
        ("html bodies", json!({"balance_fault": "html"})),
        ("healthy", json!({"balance_fault": null})),
        ("tokens revoked", json!({"revoke": "all"})),
        (
            "authorize down, short tokens",
            json!({"authorize_fault": {"status": 503}, "token_lifetime_ms": 3000, "revoke": "all"}),
        ),
        (
            "healthy",
            json!({"authorize_fault": null, "token_lifetime_ms": 3600000}),
        ),
    ]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

async fn sim_request(
    client: &HttpClient,
    sim: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let req = match body {
        Some(b) => {
            Request::post(format!("{sim}{path}")).body(Full::new(Bytes::from(b.to_string())))
        }
        None => Request::get(format!("{sim}{path}")).body(Full::default()),
    };
    let Ok(req) = req else { return json!({}) };
    match client.request(req).await {
        Ok(r) => match r.into_body().collect().await {
            Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(json!({})),
            Err(_) => json!({}),
        },
        Err(_) => json!({}),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency)
        .build_http();
    let sent = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let by_status = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    sim_request(
        &client,
        &args.sim,
        "/_sim/control",
        Some(json!({"reset_counters": true})),
    )
    .await;
    let rss_start = rss_kib(args.pid);
    let start = Instant::now();

    let url = format!("{}/instant_payment/get_wallet_balance", args.gateway);
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let (client, url, key) = (client.clone(), url.clone(), args.key.clone());
            let (sent, answered, by_status, stop) = (
                sent.clone(),
                answered.clone(),
                by_status.clone(),
                stop.clone(),
            );
            let keys = args.keys;
            tokio::spawn(async move {
                let mut n: u64 = w as u64 * 7919;
                while !stop.load(Ordering::Relaxed) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let hot = (n >> 33).is_multiple_of(2);
                    let k = if hot {
                        (n >> 40) as usize % (keys / 10).max(1)
                    } else {
                        (n >> 40) as usize % keys
                    };
                    let mut req = Request::post(url.as_str())
                        .header("authorization", format!("Bearer {key}"))
                        .header("content-type", "application/json");
                    if (n >> 20).is_multiple_of(50) {
                        req = req.header("cache-control", "no-cache");
                    }
                    let body = format!(r#"{{"customer_sync_code":"SOAK{k}"}}"#);
                    let Ok(req) = req.body(Full::new(Bytes::from(body))) else {
                        continue;
                    };
                    sent.fetch_add(1, Ordering::Relaxed);
                    let label =
                        match tokio::time::timeout(Duration::from_secs(30), client.request(req))
                            .await
                        {
                            Ok(Ok(response)) => {
                                let status = response.status().as_u16();
                                let _ = response.into_body().collect().await;
                                answered.fetch_add(1, Ordering::Relaxed);
                                status.to_string()
                            }
                            Ok(Err(_)) => "transport error (unanswered)".to_string(),
                            Err(_) => "no answer in 30 s (unanswered)".to_string(),
                        };
                    if let Ok(mut m) = by_status.lock() {
                        *m.entry(label).or_default() += 1;
                    }
                }
            })
        })
        .collect();

    let mut phase_list = phases().into_iter().cycle();
    while start.elapsed() < args.duration {
        let (name, control) = phase_list.next().unwrap_or(("healthy", json!({})));
        sim_request(&client, &args.sim, "/_sim/control", Some(control)).await;
        println!(
            "[{:>5.0}s] phase: {name:<30} sent {:>8}  answered {:>8}  rss {} KiB",
            start.elapsed().as_secs_f64(),
            sent.load(Ordering::Relaxed),
            answered.load(Ordering::Relaxed),
            rss_kib(args.pid)
        );
        tokio::time::sleep(
            args.phase
                .min(args.duration.saturating_sub(start.elapsed())),
        )
        .await;
    }
    sim_request(
        &client,
        &args.sim,
        "/_sim/control",
        Some(phases()[0].1.clone()),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed();
    let rss_end = rss_kib(args.pid);
    let stats = sim_request(&client, &args.sim, "/_sim/stats", None).await;
    let sent = sent.load(Ordering::Relaxed);
    let answered = answered.load(Ordering::Relaxed);
    let balance_calls = stats["balance_calls"].as_u64().unwrap_or(0);
    let authorize_calls = stats["authorize_calls"].as_u64().unwrap_or(0);

    println!(
        "\n== soak: {:.0} s, {} workers, {} keys",
        elapsed.as_secs_f64(),
        args.concurrency,
        args.keys
    );
    println!("requests sent      {sent}");
    println!(
        "requests answered  {answered}  ({})",
        if sent == answered {
            "all"
        } else {
            "MISSING ANSWERS"
        }
    );
    println!(
        "throughput         {:.0} req/s",
        answered as f64 / elapsed.as_secs_f64()
    );
    println!("answers by status:");
    if let Ok(m) = by_status.lock() {
        for (status, n) in m.iter() {
            println!(
                "  {status:<32} {n:>9}  ({:.2} %)",
                *n as f64 * 100.0 / sent.max(1) as f64
            );
        }
    }
    println!("gateway RSS        start {rss_start} KiB, end {rss_end} KiB");
    println!(
        "Bill24 calls       {balance_calls} balance ({:.1} per 1000 requests), {authorize_calls} authorize",
        balance_calls as f64 * 1000.0 / sent.max(1) as f64
    );
    if sent != answered {
        std::process::exit(1);
    }
}
