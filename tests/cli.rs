//! The binary itself (CONTRACT §1, §6, §7): its commands, its start-up failures, the access
//! log it writes, that no secret reaches its output, and signals.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bill24_sim::Simulator;
use common::process::*;
use common::*;
use http::StatusCode;

const CLIENT_SECRET: &str = "client-secret-5f1e0c";

fn run(args: &[&str], envs: &[(&str, &str)], dir: &Path) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir).env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("binary runs")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One clear line on stderr, and no panic.
/// `bill24-gateway hash-key` with `input` on stdin.
fn hash_key(input: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    child.wait_with_output().expect("runs")
}

fn assert_one_line_failure(out: &Output, mentions: &str) {
    assert!(!out.status.success(), "should fail");
    let err = stderr_of(out);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(mentions), "{err} should mention {mentions}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn hash_key_prints_the_sha256_of_stdin_minus_one_newline() {
    for (input, expected) in [
        (
            "foo\n",
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        ),
        (
            "foo",
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        ),
        (
            "foo\r\n",
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        ),
    ] {
        let out = hash_key(input);
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    }
    let out = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert_one_line_failure(&out, "no key");
    // Keys no caller could send as they are: refused, not hashed.
    for input in ["k ", " k", "k \n", "\tk", "k\u{1}x", "k\n\n"] {
        let out = hash_key(input);
        assert!(out.stdout.is_empty(), "{input:?}: no hash printed");
        assert_one_line_failure(&out, "white space or holds a control character");
    }
}

#[test]
fn check_config_prints_effective_toml_with_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), "merchant-token-from-file\n").expect("write");
    std::fs::write(
        dir.path().join("gw.toml"),
        format!(
            "[upstream]\nmerchant_token_file = \"token\"\nclient_id = \"c-1\"\n[cache]\nttl = \"3s\"\n{}",
            caller_block("orders", "k")
        ),
    )
    .expect("write");
    let out = run(
        &["--check-config", "--config", "gw.toml"],
        &[
            ("GATEWAY_UPSTREAM__CLIENT_SECRET", CLIENT_SECRET),
            ("GATEWAY_SERVICE_HOST", "10.0.0.1"),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(CLIENT_SECRET) && !stdout.contains("merchant-token-from-file"));
    assert!(
        stdout.contains("client_secret = \"[redacted]\""),
        "{stdout}"
    );
    let parsed: toml::Table = toml::from_str(&stdout).expect("valid TOML");
    assert_eq!(parsed["cache"]["ttl"].as_str(), Some("3s"));
    assert_eq!(parsed["upstream"]["client_id"].as_str(), Some("c-1"));
    assert_eq!(parsed["server"]["listen"].as_str(), Some("0.0.0.0:8080"));
    assert_eq!(parsed["callers"][0]["name"].as_str(), Some("orders"));
    assert!(
        stderr_of(&out).contains("GATEWAY_SERVICE_HOST"),
        "unknown variables are warned"
    );
}

#[test]
fn check_config_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (toml, key) in [
        ("[server]\nlistn = \"0.0.0.0:1\"\n", "server.listn"),
        ("[cache]\nttl = \"ten seconds\"\n", "cache.ttl"),
        ("[upstream]\nmax_in_flight = 0\n", "upstream.max_in_flight"),
    ] {
        std::fs::write(dir.path().join("bad.toml"), toml).expect("write");
        let out = run(&["--check-config", "--config", "bad.toml"], &[], dir.path());
        assert_one_line_failure(&out, key);
        // Serving with it fails the same way.
        let out = run(&["--config", "bad.toml"], &[], dir.path());
        assert_one_line_failure(&out, key);
    }
    let out = run(
        &["--check-config"],
        &[("GATEWAY_CACHE__TTL", "1")],
        dir.path(),
    );
    assert_one_line_failure(&out, "cache.ttl");
}

/// A file that is not TOML at all is said to be so, with where, on one line; not as a key.
#[test]
fn a_toml_syntax_error_says_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    for toml in [
        "[cache\nttl = \"3s\"\n",
        "[cache]\nttl = = 3\n",
        "ttl \"3s\"\n",
    ] {
        std::fs::write(dir.path().join("bad.toml"), toml).expect("write");
        for args in [
            &["--check-config", "--config", "bad.toml"][..],
            &["--config", "bad.toml"],
        ] {
            let out = run(args, &[], dir.path());
            assert_one_line_failure(&out, "not valid TOML");
            let err = stderr_of(&out);
            assert!(err.contains("bad.toml") && err.contains("line "), "{err}");
            assert!(
                !err.contains("<root>") && !err.contains("config key"),
                "{err}"
            );
        }
    }
}

#[test]
fn missing_config_file_and_unreadable_secret_file_fail_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(&["--config", "missing.toml"], &[], dir.path());
    assert_one_line_failure(&out, "missing.toml");
    let out = run(&[], &[("GATEWAY_CONFIG", "also-missing.toml")], dir.path());
    assert_one_line_failure(&out, "also-missing.toml");
    std::fs::write(
        dir.path().join("gw.toml"),
        "[upstream]\nclient_secret_file = \"/nonexistent/s\"\n",
    )
    .expect("write");
    let out = run(&["--config", "gw.toml"], &[], dir.path());
    assert_one_line_failure(&out, "upstream.client_secret_file");
    std::fs::write(
        dir.path().join("both.toml"),
        "[upstream]\nclient_secret = \"x\"\nclient_secret_file = \"s\"\n",
    )
    .expect("write");
    let out = run(&["--config", "both.toml"], &[], dir.path());
    assert_one_line_failure(&out, "upstream.client_secret_file");
}

#[test]
fn a_port_in_use_fails_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("gw.toml"),
        format!("[server]\nlisten = \"{addr}\"\nadmin_listen = \"127.0.0.1:0\"\n"),
    )
    .expect("write");
    let out = run(&["--config", "gw.toml"], &[], dir.path());
    assert_one_line_failure(&out, "server.listen");
}

/// A running binary with its output captured line by line.
/// A balance request for "SLOW" that Bill24 takes `latency` to answer, once Bill24 has it.
async fn slow_miss_in_flight(
    sim: &Simulator,
    main: SocketAddr,
    latency: Duration,
) -> tokio::task::JoinHandle<Reply> {
    sim.handle().set_latency(latency);
    let slow = tokio::spawn(post(main, Some(ORDERS_KEY), body_for("SLOW"), &[]));
    let handle = sim.handle();
    assert!(
        eventually(Duration::from_secs(3), || handle.balance_calls_for("SLOW")
            == 1)
        .await
    );
    slow
}

/// One JSON line per request with every field (null where it does not apply); no secret and
/// no balance anywhere in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_complete_and_output_has_no_secrets() {
    let (sim, mut gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    sim.handle().set_balance("LOGGED", 987_654_321);
    let (main, _) = gw.addresses().await;
    let ok = post(
        main,
        Some(ORDERS_KEY),
        body_for("LOGGED"),
        &[("x-request-id", "rid-miss")],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    let hit = post(
        main,
        Some(BILLING_KEY),
        body_for("LOGGED"),
        &[("x-request-id", "rid-hit")],
    )
    .await;
    assert_eq!(hit.x_cache(), "HIT");
    let wrong_key = "wrong-caller-key-7d3a";
    let denied = post(
        main,
        Some(wrong_key),
        body_for("LOGGED"),
        &[("x-request-id", "rid-401")],
    )
    .await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    let bad = post(
        main,
        Some(ORDERS_KEY),
        "{".into(),
        &[("x-request-id", "rid-400")],
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    sim.handle().revoke_access_tokens();
    let refreshed = post(main, Some(ORDERS_KEY), body_for("OTHER"), &[]).await;
    assert_eq!(refreshed.status, StatusCode::OK);
    let access_token = sim
        .handle()
        .last_balance_request()
        .and_then(|r| {
            r.header("authorization")
                .map(|a| a.trim_start_matches("Bearer ").to_string())
        })
        .expect("access token seen by Bill24");
    let refresh_token = serde_json::from_slice::<serde_json::Value>(
        &sim.handle()
            .last_authorize_request()
            .expect("authorize")
            .body,
    )
    .ok()
    .and_then(|b| b["refreshToken"].as_str().map(str::to_string))
    .expect("a refresh happened");

    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).await.success());
    let output = gw.output();

    let access: Vec<serde_json::Value> = output
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|j| j["target"] == "access")
        .collect();
    assert_eq!(
        access.len(),
        5,
        "one line per request:\n{}",
        output.join("\n")
    );
    for line in &access {
        for field in [
            "request_id",
            "caller",
            "customer_sync_code",
            "status",
            "bill24_code",
            "cache",
            "upstream_status",
            "upstream_ms",
            "latency_ms",
            "trace_id",
        ] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
    }
    let by_id = |id: &str| {
        access
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}"))
            .clone()
    };
    let miss = by_id("rid-miss");
    assert_eq!(miss["caller"], "orders");
    assert_eq!(miss["customer_sync_code"], "LOGGED");
    assert_eq!(miss["status"], 200);
    assert_eq!(miss["bill24_code"], "000");
    assert_eq!(miss["cache"], "miss");
    assert_eq!(miss["upstream_status"], 200);
    assert!(miss["upstream_ms"].as_f64().is_some());
    let hit = by_id("rid-hit");
    assert_eq!(
        (hit["caller"].as_str(), hit["cache"].as_str()),
        (Some("billing"), Some("hit"))
    );
    assert!(hit["upstream_status"].is_null() && hit["upstream_ms"].is_null());
    let denied = by_id("rid-401");
    assert!(denied["caller"].is_null());
    assert_eq!(denied["status"], 401);
    assert!(denied["cache"].is_null());
    let bad = by_id("rid-400");
    assert_eq!(bad["status"], 400);
    assert!(bad["customer_sync_code"].is_null());

    assert!(
        output
            .iter()
            .any(|l| l.contains("Bill24 access token obtained")),
        "token events logged"
    );
    let all = output.join("\n");
    for secret in [
        bill24_sim::DEMO_MERCHANT_TOKEN,
        bill24_sim::DEMO_CLIENT_SECRET,
        ORDERS_KEY,
        BILLING_KEY,
        wrong_key,
        access_token.as_str(),
        refresh_token.as_str(),
    ] {
        assert!(!all.contains(secret), "{secret} leaked into the output");
    }
    assert!(!all.contains("987654321"), "balances are not logged");
}

/// SIGTERM with a slow request in flight: /readyz turns 503, the request completes, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_zero() {
    let (sim, mut gw, _dir) =
        gateway_with_sim(|sim| gateway_toml(sim, "drain_delay = \"300ms\""), &[]).await;
    let (main, admin) = gw.addresses().await;
    assert_eq!(
        post(main, Some(ORDERS_KEY), body_for("W"), &[])
            .await
            .status,
        StatusCode::OK
    );
    let slow = slow_miss_in_flight(&sim, main, Duration::from_millis(1500)).await;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let slow = slow.await.expect("ran");
    assert_eq!(slow.status, StatusCode::OK);
    let status = gw.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit 0: {status:?}");
    assert!(gw.output().iter().any(|l| l.contains("shutdown started")));
}

/// `worker_threads = 1` runs everything on one thread: a slow Bill24 call does not hold up a
/// hit or the admin endpoints, and SIGTERM still drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_thread_serves_hits_while_a_miss_waits() {
    let (sim, mut gw, _dir) =
        gateway_with_sim(|sim| gateway_toml(sim, "worker_threads = 1"), &[]).await;
    let (main, admin) = gw.addresses().await;
    let first = post(main, Some(ORDERS_KEY), body_for("W"), &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let slow = slow_miss_in_flight(&sim, main, Duration::from_millis(1500)).await;
    let start = Instant::now();
    let hit = post(main, Some(ORDERS_KEY), body_for("W"), &[]).await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    let health = get(admin, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "answered while the miss waits"
    );
    assert!(!slow.is_finished(), "the miss is still waiting on Bill24");
    gw.signal("TERM");
    let slow = slow.await.expect("ran");
    assert_eq!(slow.status, StatusCode::OK);
    let status = gw.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit 0: {status:?}");
}

/// When the grace runs out, the gateway exits 0 anyway and says how many requests were cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_running_out_still_exits_zero_and_counts_cut_requests() {
    let (sim, mut gw, _dir) = gateway_with_sim(
        |sim| gateway_toml(sim, "shutdown_grace = \"200ms\"\nrequest_timeout = \"30s\""),
        &[("GATEWAY_UPSTREAM__TIMEOUT", "30s")],
    )
    .await;
    let (main, _) = gw.addresses().await;
    post(main, Some(ORDERS_KEY), body_for("W"), &[]).await;
    let _slow = slow_miss_in_flight(&sim, main, Duration::from_secs(10)).await;
    let start = Instant::now();
    gw.signal("INT");
    let status = gw.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success());
    assert!(start.elapsed() < Duration::from_secs(3));
    let line = gw.wait_for_line("shutdown grace ran out").await;
    let json: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(json["requests_cut"], 1);
}

/// The demo started with `envs`, its output read as it comes; and the URL its curl line names.
async fn start_demo(dir: &Path, envs: &[(&str, &str)]) -> (Running, String) {
    let mut child = Command::new(BIN)
        .arg("--demo")
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env("GATEWAY_SERVER__LISTEN", "127.0.0.1:0")
        .env("GATEWAY_SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let stdout = child.stdout.take().expect("stdout");
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut l) = lines.lock() {
                    l.push(line);
                }
            }
        });
    }
    let running = Running { child, lines };
    let curl = running.wait_for_line("curl -i -X POST").await;
    assert!(curl.contains(bill24_gateway::demo::DEMO_CALLER_KEY));
    let url = curl
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("url in the curl")
        .to_string();
    (running, url)
}

/// `--demo` runs with no config: the printed curl answers MISS then HIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_answers_miss_then_hit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut running, url) = start_demo(dir.path(), &[]).await;
    let key = bill24_gateway::demo::DEMO_CALLER_KEY;
    let ask = || {
        http::Request::post(url.as_str())
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(body_for(bill24_gateway::demo::DEMO_CUSTOMER).into())
            .expect("request")
    };
    let first = send(&client(), ask()).await;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    assert_eq!(first.json()["code"], "000");
    let second = send(&client(), ask()).await;
    assert_eq!(second.x_cache(), "HIT");
    running.signal("TERM");
    assert!(running.wait_exit(Duration::from_secs(10)).await.success());
}

/// `log.format = "text"` written to a pipe (not a terminal) carries no ANSI colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut running, url) = start_demo(dir.path(), &[("GATEWAY_LOG__FORMAT", "text")]).await;
    let reply = send(
        &client(),
        http::Request::post(url.as_str())
            .header("authorization", "Bearer not-the-key")
            .body(body_for(bill24_gateway::demo::DEMO_CUSTOMER).into())
            .expect("request"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let id = reply.header("x-request-id").expect("id").to_string();
    let line = running.wait_for_line(&id).await;
    assert!(
        line.contains("INFO") && line.contains("status=401"),
        "{line}"
    );
    running.signal("TERM");
    assert!(running.wait_exit(Duration::from_secs(10)).await.success());
    let lines = running.lines.lock().map(|l| l.clone()).unwrap_or_default();
    let coloured: Vec<_> = lines.iter().filter(|l| l.contains('\u{1b}')).collect();
    assert!(coloured.is_empty(), "{coloured:?}");
}

/// SIGHUP re-reads the config: callers (key rotation included), cache durations and the log
/// level change at once, and an open keep-alive connection survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_callers_cache_and_log_level() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (sim, mut gw, dir) = gateway_with_sim(
        |sim| format!("{}[cache]\nttl = \"1h\"\n", gateway_toml(sim, "")),
        &[],
    )
    .await;
    let (main, _) = gw.addresses().await;

    // A keep-alive connection opened before the reload.
    let mut conn = tokio::net::TcpStream::connect(main).await.expect("connect");
    let raw = |key: &str| {
        let body = body_for("KEEP");
        format!(
            "POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    conn.write_all(raw(ORDERS_KEY).as_bytes())
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(
        post(main, Some(ORDERS_KEY), body_for("C1"), &[])
            .await
            .x_cache(),
        "MISS"
    );
    assert_eq!(
        post(main, Some(ORDERS_KEY), body_for("C1"), &[])
            .await
            .x_cache(),
        "HIT"
    );

    // Rotate: orders gets a new key (old and new both valid), billing is removed, the cache
    // ttl drops to 0 (nothing cached), and the level to warn (no access lines).
    let new_key = "orders-new-key-after-rotation";
    let rotated = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{}\"\nmerchant_token = \"{}\"\nclient_id = \"{}\"\n\
         [cache]\nttl = \"0s\"\n[log]\nlevel = \"warn\"\n\
         [[callers]]\nname = \"orders\"\nkey_sha256 = [\"{}\", \"{}\"]\n",
        sim.base_url(),
        bill24_sim::DEMO_MERCHANT_TOKEN,
        bill24_sim::DEMO_CLIENT_ID,
        hex::encode(bill24_gateway::hash_key(ORDERS_KEY.as_bytes())),
        hex::encode(bill24_gateway::hash_key(new_key.as_bytes())),
    );
    std::fs::write(dir.path().join("gw.toml"), rotated).expect("write");
    gw.signal("HUP");
    let line = gw.wait_for_line("config reloaded").await;
    assert!(line.contains("callers") && line.contains("cache"), "{line}");
    assert!(!line.contains("needs_restart\":\"[\\\"server"), "{line}");

    let lines_before = gw.output().len();
    assert_eq!(
        post(main, Some(new_key), body_for("C2"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        post(main, Some(ORDERS_KEY), body_for("C2"), &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        post(main, Some(BILLING_KEY), body_for("C2"), &[])
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "billing was removed"
    );
    assert_eq!(
        post(main, Some(new_key), body_for("C2"), &[])
            .await
            .x_cache(),
        "MISS",
        "ttl 0: nothing cached any more"
    );
    // The connection from before the reload still serves.
    conn.write_all(raw(new_key).as_bytes())
        .await
        .expect("write");
    let n = conn.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Level warn: successful requests no longer write access lines (the 401 is not logged
    // either: the access log is at info).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let new_access = gw.output()[lines_before..]
        .iter()
        .filter(|l| l.contains("\"target\":\"access\""))
        .count();
    assert_eq!(new_access, 0);
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).await.success());
}

/// An invalid config on SIGHUP is rejected with a line naming the problem; the running config
/// stays. Changes that need a restart are logged as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rejects_invalid_config_and_flags_restart_only_changes() {
    let (sim, mut gw, dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, _) = gw.addresses().await;
    assert_eq!(
        post(main, Some(ORDERS_KEY), body_for("A"), &[])
            .await
            .status,
        StatusCode::OK
    );

    std::fs::write(dir.path().join("gw.toml"), "[cache]\nttl_seconds = 5\n").expect("write");
    gw.signal("HUP");
    let line = gw.wait_for_line("config reload rejected").await;
    assert!(line.contains("cache.ttl_seconds"), "{line}");
    assert_eq!(
        post(main, Some(ORDERS_KEY), body_for("A"), &[])
            .await
            .status,
        StatusCode::OK,
        "old config still serving"
    );

    let moved = gateway_toml(&sim, "")
        .replace("max_body_bytes", "x")
        .replace(
            "admin_listen = \"127.0.0.1:0\"",
            "admin_listen = \"127.0.0.1:0\"\nmax_body_bytes = 100",
        );
    std::fs::write(dir.path().join("gw.toml"), moved).expect("write");
    gw.signal("HUP");
    let line = gw.wait_for_line("takes effect after a restart").await;
    assert!(line.contains("server.max_body_bytes"), "{line}");
    let big = format!(
        r#"{{"customer_sync_code":"A","pad":"{}"}}"#,
        "x".repeat(200)
    );
    assert_eq!(
        post(main, Some(ORDERS_KEY), big, &[]).await.status,
        StatusCode::OK,
        "max_body_bytes unchanged until a restart"
    );
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).await.success());
}

/// SIGHUP with an empty config file would remove every caller and switch the admin key off:
/// refused with an error line saying why, the running config serving on. Written out
/// explicitly (`callers = []`, `admin_key_sha256 = ""`), it is applied, and the config's
/// warnings are logged as `--check-config` prints them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_empty_config_is_refused_unless_it_says_so() {
    let admin_hash = hex::encode(bill24_gateway::hash_key(b"admin-key"));
    let (sim, mut gw, dir) = gateway_with_sim(
        |sim| gateway_toml(sim, &format!("admin_key_sha256 = \"{admin_hash}\"")),
        &[],
    )
    .await;
    let (main, admin) = gw.addresses().await;
    let purge = || async move {
        let req = http::Request::delete(format!("http://{admin}/cache"))
            .body(Default::default())
            .expect("request");
        send(&client(), req).await.status
    };
    std::fs::write(dir.path().join("gw.toml"), "").expect("write");
    gw.signal("HUP");
    let line = gw.wait_for_line("config reload rejected").await;
    assert!(
        line.contains("no [[callers]]") && line.contains("ERROR"),
        "{line}"
    );
    assert_eq!(balance(main, ORDERS_KEY, "E1").await.status, StatusCode::OK);
    assert_eq!(
        purge().await,
        StatusCode::UNAUTHORIZED,
        "admin key still on"
    );

    // Callers kept, only the admin key gone (not written out): refused too.
    std::fs::write(dir.path().join("gw.toml"), gateway_toml(&sim, "")).expect("write");
    gw.signal("HUP");
    let line = gw
        .wait_for_line("admin_key_sha256 while one is in force")
        .await;
    assert!(line.contains("config reload rejected"), "{line}");
    assert_eq!(purge().await, StatusCode::UNAUTHORIZED);

    // Meant: applied, with the config's own warnings logged.
    let open = gateway_toml(&sim, "admin_key_sha256 = \"\"")
        .split("[[callers]]")
        .next()
        .unwrap_or_default()
        .replace("[server]", "callers = []\n[server]");
    std::fs::write(dir.path().join("gw.toml"), open).expect("write");
    gw.signal("HUP");
    gw.wait_for_line("\"config reloaded\"").await;
    gw.wait_for_line("no [[callers]] configured").await;
    assert_eq!(
        balance(main, ORDERS_KEY, "E1").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(purge().await, StatusCode::NO_CONTENT);
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).await.success());
}

/// The file is read once per reload: with `gw.toml` a symlink swapped atomically between the
/// full config and an empty file (as Kubernetes swaps a ConfigMap's `..data`) under a SIGHUP
/// every 20 ms, no reload may take its "was `callers` written out?" from one version and the
/// values from the other. Every reload is either a no-op (the full file again) or refused (the
/// empty one): none applies a change, the caller key keeps working and the admin key stays on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_a_swapped_symlink_never_strips_callers_or_the_admin_key() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let admin_hash = hex::encode(bill24_gateway::hash_key(b"admin-key"));
    let (sim, mut gw, dir) = gateway_with_sim(
        |sim| gateway_toml(sim, &format!("admin_key_sha256 = \"{admin_hash}\"")),
        &[],
    )
    .await;
    let (main, admin) = gw.addresses().await;
    let full = std::fs::read_to_string(dir.path().join("gw.toml")).expect("read");
    assert!(full.contains(&admin_hash) && sim.base_url().len() > 1);
    std::fs::write(dir.path().join("full.toml"), &full).expect("write");
    std::fs::write(dir.path().join("empty.toml"), "").expect("write");
    let point_at = |dir: &Path, target: &str| {
        let tmp = dir.join("gw.toml.swap");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).expect("symlink");
        std::fs::rename(&tmp, dir.join("gw.toml")).expect("rename");
    };
    point_at(dir.path(), "full.toml");

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, dir) = (stop.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                point_at(
                    &dir,
                    if swaps.is_multiple_of(2) {
                        "empty.toml"
                    } else {
                        "full.toml"
                    },
                );
                swaps += 1;
            }
            swaps
        })
    };
    const HANGUPS: usize = 150;
    for _ in 0..HANGUPS {
        gw.signal("HUP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    assert!(
        swaps > HANGUPS as u64,
        "the file was swapped only {swaps} times"
    );
    point_at(dir.path(), "full.toml");
    gw.signal("HUP");
    // Wait until the last SIGHUP (on the full file) has been handled.
    let deadline = Instant::now() + Duration::from_secs(10);
    let handled = |out: &[String]| {
        out.iter()
            .filter(|l| l.contains("\"config reloaded\"") || l.contains("config reload rejected"))
            .count()
    };
    let mut last = 0;
    while Instant::now() < deadline {
        let now = handled(&gw.output());
        if now == last && now > 0 {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = gw.output();
    assert!(
        handled(&out) > 0,
        "no reload was handled:\n{}",
        out.join("\n")
    );
    let applied_something: Vec<&String> = out
        .iter()
        .filter(|l| l.contains("\"config reloaded\"") && !l.contains("\"applied\":\"[]\""))
        .collect();
    assert!(
        applied_something.is_empty(),
        "a reload changed the config: {applied_something:?}"
    );
    assert_eq!(balance(main, ORDERS_KEY, "R1").await.status, StatusCode::OK);
    let req = http::Request::delete(format!("http://{admin}/cache/R1"))
        .body(Default::default())
        .expect("request");
    assert_eq!(
        send(&client(), req).await.status,
        StatusCode::UNAUTHORIZED,
        "the admin key is still in force"
    );
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).await.success());
}

/// A config whose `billing` caller comes first and `orders` second, with limits on `orders`:
/// cut before `orders`' `rate_limit_rps` it still parses (orders unlimited), cut before the
/// second `[[callers]]` too (orders gone).
fn limited_callers_toml(sim: &Simulator) -> String {
    let base = gateway_toml(sim, "");
    let head = base.split("[[callers]]").next().unwrap_or_default();
    format!(
        "{head}{}{}rate_limit_rps = 50\nmax_concurrent = 4\n",
        caller_block("billing", BILLING_KEY),
        caller_block("orders", ORDERS_KEY),
    )
}

/// What must never appear in a line about callers: their keys and key hashes.
fn assert_no_key_material(line: &str) {
    for key in [ORDERS_KEY, BILLING_KEY, "orders-rotated-key"] {
        let hash = hex::encode(bill24_gateway::hash_key(key.as_bytes()));
        assert!(
            !line.contains(key) && !line.contains(&hash) && !line.contains(&hash[..16]),
            "key material in {line}"
        );
    }
}

/// A half-written file that still parses is applied, but its `config reloaded` line says what
/// it did, at WARN: cut before `rate_limit_rps` it names the caller and the loosened limits;
/// cut before the second `[[callers]]` it names the removed caller. Tightening again and a
/// key rotation are INFO and say "key changed", never a key or its hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_cut_off_file_says_which_caller_lost_what() {
    let (sim, mut gw, dir) = gateway_with_sim(limited_callers_toml, &[]).await;
    let (main, _) = gw.addresses().await;
    let full = limited_callers_toml(&sim);
    let gw_toml = dir.path().join("gw.toml");
    let cut_at = |needle: &str| {
        let (head, _) = full.rsplit_once(needle).expect("needle in the config");
        head.to_string()
    };

    std::fs::write(&gw_toml, cut_at("rate_limit_rps")).expect("write");
    gw.signal("HUP");
    let line = gw.wait_for_line("rate_limit_rps 50 -> 0 (unlimited)").await;
    assert!(
        line.contains("\"config reloaded\"") && line.contains("WARN"),
        "{line}"
    );
    assert!(
        line.contains(r#""callers_loosened":"[\"orders: rate_limit_rps 50 -> 0 (unlimited)\", \"orders: max_concurrent 4 -> 0 (unlimited)\"]""#),
        "{line}"
    );
    assert!(line.contains(r#""callers_removed":"[]""#), "{line}");
    assert_no_key_material(&line);

    std::fs::write(&gw_toml, &full).expect("write");
    gw.signal("HUP");
    let line = gw.wait_for_line("rate_limit_rps 0 (unlimited) -> 50").await;
    assert!(
        line.contains("INFO") && line.contains("callers_changed"),
        "{line}"
    );
    assert!(line.contains(r#""callers_loosened":"[]""#), "{line}");

    std::fs::write(&gw_toml, cut_at("[[callers]]")).expect("write");
    gw.signal("HUP");
    let line = gw
        .wait_for_line(r#""callers_removed":"[\"orders\"]""#)
        .await;
    assert!(
        line.contains("\"config reloaded\"") && line.contains("WARN"),
        "{line}"
    );
    assert_no_key_material(&line);
    assert_eq!(
        balance(main, ORDERS_KEY, "K1").await.status,
        StatusCode::UNAUTHORIZED,
        "applied: the file parses and says so"
    );

    let rotated = format!(
        "{}{}rate_limit_rps = 50\nmax_concurrent = 4\n",
        cut_at("[[callers]]"),
        caller_block("orders", ORDERS_KEY).replace(
            &format!(
                "\"{}\"",
                hex::encode(bill24_gateway::hash_key(ORDERS_KEY.as_bytes()))
            ),
            &format!(
                "[\"{}\", \"{}\"]",
                hex::encode(bill24_gateway::hash_key(ORDERS_KEY.as_bytes())),
                hex::encode(bill24_gateway::hash_key(b"orders-rotated-key"))
            )
        ),
    );
    std::fs::write(&gw_toml, rotated).expect("write");
    gw.signal("HUP");
    let line = gw.wait_for_line(r#""callers_added":"[\"orders\"]""#).await;
    assert!(line.contains("INFO"), "{line}");
    assert_no_key_material(&line);
    // Now a key change alone: the second key dropped.
    std::fs::write(&gw_toml, &full).expect("write");
    gw.signal("HUP");
    let line = gw.wait_for_line("orders: key changed (2 -> 1 keys)").await;
    assert!(line.contains("\"config reloaded\""), "{line}");
    assert_no_key_material(&line);
    assert_eq!(balance(main, ORDERS_KEY, "K1").await.status, StatusCode::OK);
    for line in gw.output() {
        assert_no_key_material(&line);
    }
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).await.success());
}

/// `--check-config --against OLD` says what the config would do to the callers against the
/// one OLD makes, in the reload line's fields, without key material; stdout stays the TOML.
#[tokio::test]
async fn check_config_against_a_file_names_removed_and_loosened_callers() {
    let sim = Simulator::bind("127.0.0.1:0".parse().expect("addr"), Default::default())
        .await
        .expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let full = limited_callers_toml(&sim);
    let (cut, _) = full.rsplit_once("rate_limit_rps").expect("cut");
    std::fs::write(dir.path().join("running.toml"), &full).expect("write");
    std::fs::write(dir.path().join("cut.toml"), cut).expect("write");
    let check = |config: &str| {
        run(
            &[
                "--check-config",
                "--config",
                config,
                "--against",
                "running.toml",
            ],
            &[("GATEWAY_UPSTREAM__CLIENT_SECRET", CLIENT_SECRET)],
            dir.path(),
        )
    };
    let out = check("cut.toml");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains(
            r#"warning: against running.toml: callers_added=[] callers_removed=[] callers_loosened=["orders: rate_limit_rps 50 -> 0 (unlimited)", "orders: max_concurrent 4 -> 0 (unlimited)"] callers_changed=[]"#
        ),
        "{stderr}"
    );
    assert_no_key_material(&stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(toml::from_str::<toml::Table>(&stdout).is_ok(), "{stdout}");

    let out = check("running.toml");
    assert!(
        stderr_of(&out).contains("against running.toml: no change to the callers"),
        "{}",
        stderr_of(&out)
    );
    let (no_orders, _) = full.rsplit_once("[[callers]]").expect("cut");
    std::fs::write(dir.path().join("cut.toml"), no_orders).expect("write");
    let stderr = stderr_of(&check("cut.toml"));
    assert!(stderr.contains(r#"callers_removed=["orders"]"#), "{stderr}");
    // A broken file to compare against is named as such.
    let out = run(
        &[
            "--check-config",
            "--config",
            "running.toml",
            "--against",
            "missing.toml",
        ],
        &[("GATEWAY_UPSTREAM__CLIENT_SECRET", CLIENT_SECRET)],
        dir.path(),
    );
    assert_one_line_failure(&out, "--against");
}

/// Threads of `pid` parked in `open()` on a FIFO that has no writer (Linux's `wchan`).
fn threads_blocked_on_a_fifo(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("wchan"))
                .is_ok_and(|w| w.trim() == "wait_for_partner")
        })
        .count()
}

/// Points `dir/gw.toml` at `target` (a symlink swapped in atomically).
fn point_config_at(dir: &Path, target: &str) {
    let tmp = dir.join("gw.toml.swap");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("gw.toml")).expect("rename");
}

/// `gw.toml` a symlink to a FIFO nobody writes: the reload's read blocks, but off the
/// runtime's threads — health and balances answer at once — and after 5 s the reload is
/// refused with a line saying so, the running config staying. A SIGHUP meanwhile is refused at
/// once instead of parking a second thread on the FIFO. When a writer finally comes, that late
/// read is dropped and the next SIGHUP reads afresh. SIGTERM with a read still blocked exits
/// promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_on_a_fifo_blocks_no_request_and_parks_one_thread_at_most() {
    let (sim, mut gw, dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, admin) = gw.addresses().await;
    let pid = gw.child.id();
    let full = gateway_toml(&sim, "");
    std::fs::write(dir.path().join("full.toml"), &full).expect("write");
    let fifo = dir.path().join("gw.fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    point_config_at(dir.path(), "gw.fifo");

    let hup = Instant::now();
    gw.signal("HUP");
    real_sleep(Duration::from_millis(300)).await;
    assert_eq!(threads_blocked_on_a_fifo(pid), 1, "the read is blocked");
    for round in 0..3 {
        let asked = Instant::now();
        assert_eq!(get(admin, "/healthz").await.status, StatusCode::OK);
        let code = format!("F{round}");
        assert_eq!(
            balance(main, ORDERS_KEY, &code).await.status,
            StatusCode::OK
        );
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "answered in {:?} while the reload is blocked",
            asked.elapsed()
        );
    }
    let line = gw.wait_for_line("could not be read in time").await;
    let refused_after = hup.elapsed();
    assert!(
        line.contains("config reload rejected") && line.contains("\"limit_ms\":5000"),
        "{line}"
    );
    assert!(
        refused_after >= Duration::from_millis(4500) && refused_after < Duration::from_secs(8),
        "refused after {refused_after:?}"
    );
    assert_eq!(
        balance(main, BILLING_KEY, "F9").await.status,
        StatusCode::OK
    );

    // More SIGHUPs while the read is still blocked: refused at once, no second thread.
    for n in 1..=2 {
        let asked = Instant::now();
        gw.signal("HUP");
        let deadline = asked + Duration::from_secs(2);
        while gw
            .output()
            .iter()
            .filter(|l| l.contains("previous read of the config file is still blocked"))
            .count()
            < n
        {
            assert!(
                Instant::now() < deadline,
                "SIGHUP {n} while blocked not refused at once:\n{}",
                gw.output().join("\n")
            );
            real_sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(threads_blocked_on_a_fifo(pid), 1, "after SIGHUP {n}");
    }
    assert_eq!(get(admin, "/healthz").await.status, StatusCode::OK);

    // A writer at last (an empty config): the late read ends and is dropped, not applied.
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::write(fifo, "")
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !writer.is_finished() {
        assert!(Instant::now() < deadline, "the FIFO found no reader");
        real_sleep(Duration::from_millis(20)).await;
    }
    real_sleep(Duration::from_millis(200)).await;
    assert_eq!(threads_blocked_on_a_fifo(pid), 0);
    assert_eq!(balance(main, ORDERS_KEY, "F1").await.status, StatusCode::OK);
    // The next SIGHUP reads the file as it is now: billing removed.
    let (no_billing, _) = full.rsplit_once("[[callers]]").expect("two callers");
    std::fs::write(dir.path().join("full.toml"), no_billing).expect("write");
    point_config_at(dir.path(), "full.toml");
    gw.signal("HUP");
    let line = gw
        .wait_for_line(r#""callers_removed":"[\"billing\"]""#)
        .await;
    assert!(line.contains("\"config reloaded\""), "{line}");

    // Blocked again, then SIGTERM: the parked read does not hold the exit.
    point_config_at(dir.path(), "gw.fifo");
    gw.signal("HUP");
    real_sleep(Duration::from_millis(300)).await;
    assert_eq!(threads_blocked_on_a_fifo(pid), 1);
    let term = Instant::now();
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(5)).await.success());
    assert!(
        term.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        term.elapsed()
    );
}

#[test]
fn check_config_refuses_an_unusable_jwks_and_hides_a_jwks_url_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    write(
        "oct.json",
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"}]}"#,
    );
    write("broken.json", "{");
    for jwks in ["oct.json", "broken.json"] {
        write(
            "gw.toml",
            &format!(
                "[jwt]\nissuer = \"https://issuer\"\njwks_file = \"{jwks}\"\n{}",
                caller_block("orders", "k")
            ),
        );
        let out = run(&["--check-config", "--config", "gw.toml"], &[], dir.path());
        assert!(
            !out.status.success(),
            "{jwks}: refused as the gateway would at start"
        );
        assert!(
            stderr_of(&out).contains("jwt.jwks_file"),
            "{}",
            stderr_of(&out)
        );
    }
    write(
        "gw.toml",
        &format!(
            "[jwt]\nissuer = \"https://issuer\"\n\
             jwks_url = \"http://user:hunter2@127.0.0.1:1/jwks?token=SECRETQ\"\n{}",
            caller_block("orders", "k")
        ),
    );
    let out = run(&["--check-config", "--config", "gw.toml"], &[], dir.path());
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("SECRETQ"),
        "{stdout}"
    );
    assert!(stdout.contains("jwks_url = \"http://user:[redacted]@127.0.0.1:1/jwks?[redacted]\""));
}
