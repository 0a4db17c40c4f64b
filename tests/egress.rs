//! Bill24 over real TLS and through a real egress proxy (CONTRACT §11), through the built
//! binary: the simulator serves HTTPS with certificates made here by a test CA (HTTP/2 or only
//! HTTP/1.1 by ALPN, client certificates required or not), and Debian's `tinyproxy` carries
//! CONNECT tunnels and forwarded requests, with and without Basic credentials.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bill24_sim::{SimConfig, Simulator};
use common::process::{BIN, Running, balance, caller_block, get};
use common::tls::{Leaf, Pki, Usage};
use common::{ORDERS_KEY, metric_value};
use http::StatusCode;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// The simulator serving HTTPS with `leaf`; `client_ca`: client certificates are required.
async fn https_sim(leaf: &Leaf, client_ca: Option<&str>, http2: bool) -> Simulator {
    let tls = bill24_sim::tls_config(
        leaf.cert.as_bytes(),
        leaf.key.as_bytes(),
        client_ca.map(str::as_bytes),
        http2,
    )
    .expect("server TLS config");
    Simulator::bind(
        "127.0.0.1:0".parse().expect("addr"),
        SimConfig {
            tls: Some(tls),
            ..SimConfig::default()
        },
    )
    .await
    .expect("sim")
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// A gateway config for `base_url` with `upstream` keys added; no retries, so that each
/// request is one attempt.
fn config(base_url: &str, upstream: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{base_url}\"\nmerchant_token = \"{}\"\nclient_id = \"{}\"\n\
         retries = 0\ncircuit_failures = 1000\n{upstream}\n{}",
        bill24_sim::DEMO_MERCHANT_TOKEN,
        bill24_sim::DEMO_CLIENT_ID,
        caller_block("orders", ORDERS_KEY),
    )
}

struct Gateway {
    running: Running,
    main: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn gateway(config: &str, envs: &[(&str, &str)]) -> Gateway {
    let mut all = vec![(
        "GATEWAY_UPSTREAM__CLIENT_SECRET",
        bill24_sim::DEMO_CLIENT_SECRET,
    )];
    all.extend_from_slice(envs);
    let (running, dir) = Running::start(&[], config, &all);
    let (main, admin) = running.addresses().await;
    Gateway {
        running,
        main,
        admin,
        _dir: dir,
    }
}

impl Gateway {
    async fn metric(&self, series: &str) -> f64 {
        let reply = get(self.admin, "/metrics").await;
        metric_value(&String::from_utf8_lossy(&reply.body), series)
    }

    /// Waits for the authorize call to have been made (it starts at once, in the background).
    async fn authorize_attempted(&self, status: &str) {
        let series = format!(
            "gateway_upstream_requests_total{{endpoint=\"authorize\",status=\"{status}\",bill24_code=\"-\"}}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric(&series).await < 1.0 {
            assert!(Instant::now() < deadline, "no {series}:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn output(&self) -> String {
        self.running.output().join("\n")
    }
}

/// Asserts a 502 `upstream_tls_error` whose message says `why`, a log line saying it too,
/// authorize counted under `tls_error`, and a gateway still ready.
async fn assert_tls_failure(gw: &Gateway, code: &str, why: &str) {
    gw.authorize_attempted("tls_error").await;
    let reply = balance(gw.main, ORDERS_KEY, code).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(body["code"], "upstream_tls_error", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(why), "{message}");
    let line = gw.running.wait_for_line(why).await;
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    assert_eq!(get(gw.admin, "/readyz").await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// The simulator serving `leaf` over HTTPS, and a gateway that trusts `pki`'s CA.
async fn behind_tls(pki: &Pki, leaf: Leaf, http2: bool) -> (Simulator, Gateway) {
    let sim = https_sim(&leaf, None, http2).await;
    let ca = format!("ca_file = \"{}\"", pki.path("ca.pem"));
    let gw = gateway(&config(&sim.base_url(), &ca), &[]).await;
    (sim, gw)
}

/// A Bill24 certificate from a private CA, trusted through `upstream.ca_file`: answers, then
/// hits; HTTP/2, since the simulator offers it by ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_in_ca_file_is_trusted_and_h2_is_used() {
    let pki = Pki::new("private CA");
    let (sim, gw) = behind_tls(
        &pki,
        pki.leaf(&["localhost", "127.0.0.1"], Usage::Server, false),
        true,
    )
    .await;
    let first = balance(gw.main, ORDERS_KEY, "TLS1").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.x_cache(), "MISS");
    let second = balance(gw.main, ORDERS_KEY, "TLS1").await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.body, first.body);
    let stats = sim.handle().stats();
    assert_eq!(stats.balance_calls, 1);
    assert_eq!(stats.authorize_calls, 1);
    assert_eq!(stats.http2_requests, 2, "authorize and balance over h2");
    assert_eq!(stats.connections, 1, "one pooled connection");
    assert!(
        gw.output().contains("\"route\":\"direct\""),
        "{}",
        gw.output()
    );
}

/// A Bill24 that offers only http/1.1 by ALPN is spoken to in HTTP/1.1; and after Bill24
/// closes its connections (both protocols), the next requests still get answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_when_not_offered_h2_and_the_pool_survives_closed_connections() {
    let pki = Pki::new("private CA");
    for http2 in [false, true] {
        let (sim, gw) = behind_tls(
            &pki,
            pki.leaf(&["localhost", "127.0.0.1"], Usage::Server, false),
            http2,
        )
        .await;
        let handle = sim.handle();
        assert_eq!(
            balance(gw.main, ORDERS_KEY, "POOL1").await.status,
            StatusCode::OK
        );
        assert_eq!(handle.stats().connections, 1);
        handle.apply(&bill24_sim::Control {
            close_connections: Some(true),
            ..Default::default()
        });
        // Give the gateway's pool a moment to see the close (a request sent at the same
        // instant would be retried with retries > 0; here retries = 0 on purpose).
        tokio::time::sleep(Duration::from_millis(200)).await;
        for code in ["POOL2", "POOL3"] {
            let reply = balance(gw.main, ORDERS_KEY, code).await;
            assert_eq!(reply.status, StatusCode::OK, "h2 {http2}: {:?}", reply.body);
        }
        let stats = handle.stats();
        assert_eq!(stats.connections, 2, "h2 {http2}: one new connection");
        assert_eq!(stats.balance_calls, 3);
        if http2 {
            assert_eq!(stats.http2_requests, 4);
        } else {
            assert_eq!(stats.http2_requests, 0, "HTTP/1.1 only");
        }
    }
}

/// Without the private CA the certificate does not verify: 502 naming the unknown issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_issuer_is_a_502_that_says_so() {
    let pki = Pki::new("private CA");
    let sim = https_sim(
        &pki.leaf(&["localhost", "127.0.0.1"], Usage::Server, false),
        None,
        true,
    )
    .await;
    let gw = gateway(&config(&sim.base_url(), ""), &[]).await;
    assert_tls_failure(&gw, "NOCA", "certificate verify failed: unknown issuer").await;
    assert_eq!(sim.handle().stats().balance_calls, 0);
    assert!(sim.handle().stats().tls_handshake_failures >= 1);
}

/// A certificate for another host name: 502 saying so, whatever CA signed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_host_name_is_a_502_that_says_so() {
    let pki = Pki::new("private CA");
    let (_sim, gw) = behind_tls(
        &pki,
        pki.leaf(&["bill24.example"], Usage::Server, false),
        true,
    )
    .await;
    assert_tls_failure(&gw, "NAME", "certificate verify failed: wrong host name").await;
    assert!(gw.output().contains("bill24.example"), "names what it got");
}

/// An expired certificate: 502 saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_a_502_that_says_so() {
    let pki = Pki::new("private CA");
    let (_sim, gw) = behind_tls(
        &pki,
        pki.leaf(&["localhost", "127.0.0.1"], Usage::Server, true),
        true,
    )
    .await;
    assert_tls_failure(&gw, "OLD", "certificate verify failed: expired").await;
}

/// A Bill24 that requires a client certificate refuses the handshake without one (502 saying
/// so), and answers with `client_cert_file` + `client_key_file` set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_where_required() {
    let server_pki = Pki::new("server CA");
    let client_pki = Pki::new("client CA");
    let sim = https_sim(
        &server_pki.leaf(&["localhost", "127.0.0.1"], Usage::Server, false),
        Some(&client_pki.ca_pem),
        true,
    )
    .await;
    let ca = format!("ca_file = \"{}\"\n", server_pki.path("ca.pem"));

    let without = gateway(&config(&sim.base_url(), &ca), &[]).await;
    assert_tls_failure(&without, "NOCERT", "requires a client certificate").await;
    drop(without);

    let leaf = client_pki.leaf(&["orders.internal"], Usage::Client, false);
    client_pki.write("client.pem", &leaf.cert);
    client_pki.write("client.key", &leaf.key);
    let with = gateway(
        &config(
            &sim.base_url(),
            &format!(
                "{ca}client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                client_pki.path("client.pem"),
                client_pki.path("client.key")
            ),
        ),
        &[],
    )
    .await;
    let reply = balance(with.main, ORDERS_KEY, "MTLS").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(sim.handle().stats().balance_calls, 1);
    let output = with.output();
    assert!(!output.contains("PRIVATE KEY"), "{output}");
}

// ---------------------------------------------------------------------------------------------
// Start-up checks
// ---------------------------------------------------------------------------------------------

/// Files that cannot be used stop the start (and `--check-config`) with one line naming the
/// key and the reason; the key's contents never appear.
#[test]
fn unusable_tls_files_stop_the_start_naming_the_key() {
    let pki = Pki::new("private CA");
    let a = pki.leaf(&["localhost"], Usage::Client, false);
    let b = pki.leaf(&["localhost"], Usage::Client, false);
    pki.write("a.pem", &a.cert);
    pki.write("a.key", &a.key);
    pki.write("b.key", &b.key);
    pki.write("empty.pem", "");
    pki.write("key-only.pem", &a.key);
    pki.write(
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );
    let ca = |file: &str| format!("ca_file = \"{}\"", pki.path(file));
    let pair = |cert: &str, key: &str| {
        format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"",
            pki.path(cert),
            pki.path(key)
        )
    };
    let cases = [
        (ca("missing.pem"), "upstream.ca_file", "cannot read"),
        (
            ca("empty.pem"),
            "upstream.ca_file",
            "holds no PEM certificate",
        ),
        (
            ca("key-only.pem"),
            "upstream.ca_file",
            "holds no PEM certificate",
        ),
        (ca("garbage.pem"), "upstream.ca_file", "is not readable PEM"),
        (
            format!("client_cert_file = \"{}\"", pki.path("a.pem")),
            "upstream.client_key_file",
            "set both or neither",
        ),
        (
            format!("client_key_file = \"{}\"", pki.path("a.key")),
            "upstream.client_cert_file",
            "set both or neither",
        ),
        (
            pair("a.pem", "b.key"),
            "upstream.client_key_file",
            "does not belong to the certificate",
        ),
        (
            pair("a.pem", "a.pem"),
            "upstream.client_key_file",
            "holds no PEM private key",
        ),
        (
            pair("a.key", "a.key"),
            "upstream.client_cert_file",
            "holds no PEM certificate",
        ),
        (
            "proxy = \"socks5://127.0.0.1:1080\"".to_string(),
            "upstream.proxy",
            "http://",
        ),
        (
            "proxy = \"http://user:hunter2@127.0.0.1\"".to_string(),
            "upstream.proxy",
            "must name a host and a port",
        ),
    ];
    let key_body = a.key.lines().nth(1).unwrap_or_default().to_string();
    for (upstream, key, reason) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("gw.toml"),
            config("https://127.0.0.1:1", &upstream),
        )
        .expect("write");
        for args in [
            &["--config", "gw.toml"][..],
            &["--check-config", "--config", "gw.toml"],
        ] {
            let out = Command::new(BIN)
                .args(args)
                .current_dir(dir.path())
                .env("GATEWAY_UPSTREAM__CLIENT_SECRET", "x")
                .stdin(Stdio::null())
                .output()
                .expect("runs");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{upstream}: {stderr}");
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{upstream}: one line: {stderr}");
            assert!(
                lines[0].contains(key) && lines[0].contains(reason),
                "{upstream}: {}",
                lines[0]
            );
            assert!(!stderr.contains("hunter2"), "{stderr}");
            assert!(!stderr.contains(&key_body), "{stderr}");
            assert!(
                out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("hunter2")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Egress proxy
// ---------------------------------------------------------------------------------------------

/// Debian's tinyproxy on a free loopback port, logging every request it carries.
struct Proxy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// With `credentials`, it requires them (Basic); `extra`: more tinyproxy directives.
    async fn start(credentials: Option<(&str, &str)>) -> Proxy {
        Proxy::start_with(credentials, "").await
    }

    async fn start_with(credentials: Option<(&str, &str)>, extra: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = dir.path().join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nAllow 127.0.0.1\n\
             LogLevel Connect\nLogFile \"{}\"\nPidFile \"{}\"\n",
            log.display(),
            dir.path().join("tinyproxy.pid").display()
        );
        if let Some((user, password)) = credentials {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        conf.push_str(extra);
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).expect("write conf");
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed (.ci/run installs it: apt-get install tinyproxy)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "tinyproxy did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Proxy {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests the proxy logged that start with `method` (`CONNECT`, `POST`).
    fn requests(&self, method: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("): {method} ")))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn trusted_https_sim(pki: &Pki) -> Simulator {
    https_sim(
        &pki.leaf(&["localhost", "127.0.0.1"], Usage::Server, false),
        None,
        true,
    )
    .await
}

/// `upstream.proxy`: every connection to Bill24 is a CONNECT tunnel through the proxy, TLS
/// end to end; Basic credentials in the URL are sent to a proxy that requires them, and never
/// shown (`--check-config` prints them `[redacted]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_proxy_tunnels_with_credentials_that_never_show() {
    let pki = Pki::new("private CA");
    let sim = trusted_https_sim(&pki).await;
    let proxy = Proxy::start(Some(("alice", "pr0xy-s3cret"))).await;
    let ca = format!("ca_file = \"{}\"\n", pki.path("ca.pem"));
    let with_credentials = format!(
        "{ca}proxy = \"http://alice:pr0xy-s3cret@127.0.0.1:{}\"",
        proxy.port
    );

    let gw = gateway(&config(&sim.base_url(), &with_credentials), &[]).await;
    let reply = balance(gw.main, ORDERS_KEY, "PROXY1").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        balance(gw.main, ORDERS_KEY, "PROXY1").await.x_cache(),
        "HIT"
    );
    assert_eq!(proxy.requests("CONNECT"), 1, "one tunnel, pooled");
    assert_eq!(
        sim.handle().stats().http2_requests,
        2,
        "h2 inside the tunnel"
    );
    let output = gw.output();
    assert!(!output.contains("pr0xy-s3cret"), "{output}");
    assert!(
        output.contains(&format!("through the proxy 127.0.0.1:{}", proxy.port)),
        "{output}"
    );
    drop(gw);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("gw.toml"),
        config(&sim.base_url(), &with_credentials),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["--check-config", "--config", "gw.toml"])
        .current_dir(dir.path())
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "proxy = \"http://alice:[redacted]@127.0.0.1:{}\"",
            proxy.port
        )),
        "{text}"
    );
    assert!(!text.contains("pr0xy-s3cret"));

    // Without the credentials the proxy refuses the tunnel: 502, and the reason in the log.
    let without = format!("{ca}proxy = \"{}\"", proxy.url());
    let gw = gateway(&config(&sim.base_url(), &without), &[]).await;
    gw.authorize_attempted("proxy_error").await;
    let reply = balance(gw.main, ORDERS_KEY, "PROXY2").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    gw.running
        .wait_for_line("proxy authorization required")
        .await;
    assert_eq!(sim.handle().stats().balance_calls, 1, "nothing got through");
}

/// Without `upstream.proxy`, `HTTPS_PROXY` is honoured for an `https://` Bill24, and
/// `NO_PROXY` naming Bill24's host bypasses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_from_the_environment_and_no_proxy_bypass() {
    let pki = Pki::new("private CA");
    let sim = trusted_https_sim(&pki).await;
    let proxy = Proxy::start(None).await;
    let cfg = config(
        &sim.base_url(),
        &format!("ca_file = \"{}\"", pki.path("ca.pem")),
    );

    let gw = gateway(&cfg, &[("HTTPS_PROXY", &proxy.url())]).await;
    assert_eq!(
        balance(gw.main, ORDERS_KEY, "ENV1").await.status,
        StatusCode::OK
    );
    assert_eq!(proxy.requests("CONNECT"), 1);
    assert!(gw.output().contains("from HTTPS_PROXY"), "{}", gw.output());
    drop(gw);

    for no_proxy in ["127.0.0.1", "localhost,127.0.0.0/8", "*"] {
        let gw = gateway(
            &cfg,
            &[("https_proxy", &proxy.url()), ("NO_PROXY", no_proxy)],
        )
        .await;
        assert_eq!(
            balance(gw.main, ORDERS_KEY, "ENV2").await.status,
            StatusCode::OK,
            "NO_PROXY={no_proxy}"
        );
        assert_eq!(
            proxy.requests("CONNECT"),
            1,
            "NO_PROXY={no_proxy}: bypassed"
        );
        assert!(gw.output().contains("\"route\":\"direct\""));
    }

    // HTTP_PROXY is for http:// only: an https:// Bill24 goes direct.
    let gw = gateway(&cfg, &[("HTTP_PROXY", &proxy.url())]).await;
    assert_eq!(
        balance(gw.main, ORDERS_KEY, "ENV3").await.status,
        StatusCode::OK
    );
    assert_eq!(proxy.requests("CONNECT"), 1);
}

/// A plain `http://` Bill24 behind `HTTP_PROXY`: requests are forwarded in absolute form, as
/// curl does, with the proxy's credentials on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_forwards_plain_http_with_credentials() {
    let sim = Simulator::bind("127.0.0.1:0".parse().expect("addr"), SimConfig::default())
        .await
        .expect("sim");
    let proxy = Proxy::start(Some(("bob", "fwd-s3cret"))).await;
    let url = format!("http://bob:fwd-s3cret@127.0.0.1:{}", proxy.port);
    let gw = gateway(&config(&sim.base_url(), ""), &[("HTTP_PROXY", &url)]).await;
    let reply = balance(gw.main, ORDERS_KEY, "FWD1").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        proxy.requests("POST"),
        2,
        "authorize and balance, forwarded"
    );
    assert_eq!(proxy.requests("CONNECT"), 0);
    assert!(!gw.output().contains("fwd-s3cret"));
    assert!(
        sim.handle()
            .last_balance_request()
            .and_then(|r| r.header("proxy-authorization").map(str::to_string))
            .is_none(),
        "the proxy's credentials stop at the proxy"
    );

    // Without credentials: the proxy's own 407 is a 502, not Bill24's 4xx passed on.
    drop(gw);
    let gw = gateway(
        &config(&sim.base_url(), ""),
        &[("HTTP_PROXY", &proxy.url())],
    )
    .await;
    gw.authorize_attempted("proxy_error").await;
    let reply = balance(gw.main, ORDERS_KEY, "FWD2").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        sim.handle().stats().authorize_calls,
        1,
        "only the first gateway's"
    );
}

/// A proxy whose rules refuse the tunnel (CONNECT only to port 443): 502, counted under
/// `proxy_error`, and the log says the proxy refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_the_tunnel_is_a_proxy_error() {
    let pki = Pki::new("private CA");
    let sim = trusted_https_sim(&pki).await;
    let proxy = Proxy::start_with(None, "ConnectPort 443\n").await;
    let cfg = config(
        &sim.base_url(),
        &format!(
            "ca_file = \"{}\"\nproxy = \"{}\"",
            pki.path("ca.pem"),
            proxy.url()
        ),
    );
    let gw = gateway(&cfg, &[]).await;
    gw.authorize_attempted("proxy_error").await;
    let reply = balance(gw.main, ORDERS_KEY, "ACL").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    gw.running
        .wait_for_line(&format!(
            "through the proxy 127.0.0.1:{}: tunnel error: unsuccessful",
            proxy.port
        ))
        .await;
    assert_eq!(sim.handle().stats().connections, 0);
}

// ---------------------------------------------------------------------------------------------
// A connection that stops answering
// ---------------------------------------------------------------------------------------------

/// A TCP relay in front of Bill24 that the test can freeze: every connection open at that
/// moment stops reading and writing, its sockets held open (a peer that hangs without closing,
/// or one whose buffers are full); connections made afterwards are relayed as usual.
struct Relay {
    addr: SocketAddr,
    /// Connections accepted.
    connections: Arc<AtomicU64>,
    /// Frozen connections whose gateway side has since closed.
    closed_while_frozen: Arc<AtomicU64>,
    freeze: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let relay = Relay {
            addr: listener.local_addr().expect("relay addr"),
            connections: Arc::default(),
            closed_while_frozen: Arc::default(),
            freeze: tokio::sync::watch::channel(0).0,
        };
        let connections = relay.connections.clone();
        let closed = relay.closed_while_frozen.clone();
        let freeze = relay.freeze.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let mut frozen = freeze.subscribe();
                frozen.mark_unchanged();
                let closed = closed.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                        _ = frozen.changed() => {}
                    }
                    // Frozen: nothing is read or written any more; watch for the gateway
                    // giving up on the connection (the unread bytes stay where they are).
                    loop {
                        match inbound.ready(tokio::io::Interest::READABLE).await {
                            Ok(ready) if !ready.is_read_closed() => {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            _ => break,
                        }
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                    drop(outbound);
                });
            }
        });
        relay
    }

    fn freeze(&self) {
        self.freeze.send_modify(|n| *n += 1);
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

/// The HTTPS + h2 simulator behind a [`Relay`], and a gateway (no retries) that reaches it
/// through the relay with `upstream.timeout` 1 s: PINGs after 1 s without a frame, unanswered
/// for 1 s more closes the connection.
async fn behind_relay(pki: &Pki) -> (Simulator, Relay, Gateway) {
    let sim = https_sim(
        &pki.leaf(&["localhost", "127.0.0.1"], Usage::Server, false),
        None,
        true,
    )
    .await;
    let relay = Relay::start(sim.addr()).await;
    let upstream = format!("ca_file = \"{}\"\ntimeout = \"1s\"", pki.path("ca.pem"));
    let gw = gateway(&config(&format!("https://{}", relay.addr), &upstream), &[]).await;
    let first = balance(gw.main, ORDERS_KEY, "BEFORE").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let stats = sim.handle().stats();
    assert_eq!(
        (relay.connections(), stats.connections, stats.http2_requests),
        (1, 1, 2),
        "authorize and the balance call on one h2 connection"
    );
    (sim, relay, gw)
}

/// Bill24's h2 connection wedges under a call (it stops reading and writing, the socket stays
/// open): that call gets 504 at `upstream.timeout`, and the next call goes out on a new
/// connection and is answered at once, rather than queueing behind the wedged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_h2_connection_is_not_reused_after_a_timeout() {
    let pki = Pki::new("private CA");
    let (sim, relay, gw) = behind_relay(&pki).await;
    relay.freeze();

    let started = Instant::now();
    let stalled = balance(gw.main, ORDERS_KEY, "STALLED").await;
    assert_eq!(
        stalled.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{:?}",
        stalled.body
    );
    assert_eq!(stalled.error_code(), "upstream_timeout");
    assert!(started.elapsed() >= Duration::from_secs(1));

    let started = Instant::now();
    let next = balance(gw.main, ORDERS_KEY, "NEXT").await;
    assert_eq!(next.status, StatusCode::OK, "{:?}", next.body);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered at once: {:?}",
        started.elapsed()
    );
    let handle = sim.handle();
    assert_eq!(relay.connections(), 2, "one new connection");
    assert_eq!(handle.stats().connections, 2);
    assert_eq!(
        handle.balance_calls_for("STALLED"),
        0,
        "it never got through"
    );
    assert_eq!(handle.balance_calls_for("NEXT"), 1);
    assert_eq!(handle.stats().balance_calls, 2);
}

/// An idle h2 connection whose Bill24 stops answering is found by its PINGs and closed within
/// the PING interval plus the PING timeout (2 s here), before any call needs it; the next
/// call opens a new connection and is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_that_stops_answering_pings_is_closed() {
    let pki = Pki::new("private CA");
    let (sim, relay, gw) = behind_relay(&pki).await;
    let frozen_at = Instant::now();
    relay.freeze();
    let deadline = frozen_at + Duration::from_secs(6);
    while relay.closed_while_frozen.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the gateway kept the silent connection for 6 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed_after = frozen_at.elapsed();
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after <= Duration::from_millis(3_500),
        "closed {closed_after:?} after the freeze"
    );
    assert_eq!(
        relay.connections(),
        1,
        "no call needed a connection meanwhile"
    );

    let started = Instant::now();
    let next = balance(gw.main, ORDERS_KEY, "AFTER").await;
    assert_eq!(next.status, StatusCode::OK, "{:?}", next.body);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(relay.connections(), 2);
    assert_eq!(sim.handle().stats().connections, 2);
    assert_eq!(sim.handle().stats().balance_calls, 2);
}
