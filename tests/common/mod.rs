//! Test harness: the real gateway on port 0 in front of the Bill24 simulator on port 0, and an
//! HTTP client to talk to both. Set `TEST_LOG=1` to see the gateway's logs.

#![allow(dead_code)]

pub mod process;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use bill24_gateway::config::{Config, KeyHashes, RawCaller, RawConfig};
use bill24_gateway::{Gateway, StartError, hash_key};
use bill24_sim::{SimConfig, SimHandle, Simulator};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ORDERS_KEY: &str = "orders-key-0123456789";
pub const BILLING_KEY: &str = "billing-key-9876543210";
pub const PATH: &str = "/instant_payment/get_wallet_balance";

pub fn init_test_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = bill24_gateway::init_logging(&bill24_gateway::config::LogConfig {
                format: bill24_gateway::config::LogFormat::Text,
                level: "debug,hyper=info,h2=info".into(),
                access_sample: 1.0,
            });
        }
    });
}

/// A raw config for a gateway on loopback port 0 in front of `base_url`, with two callers.
pub fn raw_config(base_url: &str) -> RawConfig {
    let mut raw = RawConfig::default();
    raw.server.listen = "127.0.0.1:0".into();
    raw.server.admin_listen = "127.0.0.1:0".into();
    raw.upstream.base_url = base_url.into();
    raw.upstream.merchant_token = bill24_gateway::Secret::new(bill24_sim::DEMO_MERCHANT_TOKEN);
    raw.upstream.client_id = bill24_sim::DEMO_CLIENT_ID.into();
    raw.upstream.client_secret = bill24_gateway::Secret::new(bill24_sim::DEMO_CLIENT_SECRET);
    raw.callers = vec![
        RawCaller {
            name: "orders".into(),
            key_sha256: KeyHashes::One(hex::encode(hash_key(ORDERS_KEY.as_bytes()))),
            spiffe_id: String::new(),
            jwt_subject: String::new(),
            rate_limit_rps: 0.0,
            burst: 0,
            max_concurrent: 0,
            limit_scope: Default::default(),
        },
        RawCaller {
            name: "billing".into(),
            key_sha256: KeyHashes::One(hex::encode(hash_key(BILLING_KEY.as_bytes()))),
            spiffe_id: String::new(),
            jwt_subject: String::new(),
            rate_limit_rps: 0.0,
            burst: 0,
            max_concurrent: 0,
            limit_scope: Default::default(),
        },
    ];
    raw
}

pub fn config(base_url: &str) -> Config {
    raw_config(base_url)
        .validate()
        .expect("test config is valid")
}

/// A response, read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn x_cache(&self) -> &str {
        self.header("x-cache").unwrap_or("<none>")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `code` of a gateway error body.
    pub fn error_code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("answered within 30s")
        .expect("request sent");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body read").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn body_for(code: &str) -> String {
    serde_json::json!({ "customer_sync_code": code }).to_string()
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub sim: SimHandle,
    /// Applies a new config to the running gateway (what SIGHUP does).
    pub reloader: bill24_gateway::Reloader,
    /// The config the gateway started with.
    pub config: Config,
    simulator: Simulator,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), StartError>>>,
    pub client: HttpClient,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_full(SimConfig::default(), |_| {}, configure).await
}

/// The simulator with `sim_config` (and `prepare` run on it before the gateway starts), and a
/// gateway whose config `configure` adjusts.
pub async fn spawn_app_full(
    sim_config: SimConfig,
    prepare: impl FnOnce(&SimHandle),
    configure: impl FnOnce(&mut Config),
) -> TestApp {
    spawn_app_on(1, sim_config, prepare, configure).await
}

/// [`spawn_app_full`] with the main listener served on `threads` threads of its own
/// ([`Gateway::bind_threads`]) when `threads` is 2 or more.
pub async fn spawn_app_on(
    threads: usize,
    sim_config: SimConfig,
    prepare: impl FnOnce(&SimHandle),
    configure: impl FnOnce(&mut Config),
) -> TestApp {
    init_test_log();
    let simulator = Simulator::bind("127.0.0.1:0".parse().expect("addr"), sim_config)
        .await
        .expect("simulator binds");
    prepare(&simulator.handle());
    let mut config = config(&simulator.base_url());
    configure(&mut config);
    let gateway = Gateway::bind_threads(config.clone(), threads)
        .await
        .expect("gateway binds");
    let reloader = gateway.reloader();
    let addr = gateway.main_addr();
    let admin_addr = gateway.admin_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway.run(async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        admin_addr,
        sim: simulator.handle(),
        reloader,
        config,
        simulator,
        shutdown: Some(tx),
        task: Some(task),
        client: client(),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn sim_url(&self) -> String {
        self.simulator.base_url()
    }

    /// POST a balance request for `code` as caller `orders`.
    pub async fn balance(&self, code: &str) -> Reply {
        self.post(Some(ORDERS_KEY), body_for(code), &[]).await
    }

    /// POST a balance request for `code` with extra headers.
    pub async fn balance_with(&self, code: &str, headers: &[(&str, &str)]) -> Reply {
        self.post(Some(ORDERS_KEY), body_for(code), headers).await
    }

    /// POST `body` to the endpoint, with `Content-Type: application/json` unless `headers`
    /// set one.
    pub async fn post(
        &self,
        key: Option<&str>,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder().method(Method::POST).uri(self.url(PATH));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/json");
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        send(&self.client, req).await
    }

    pub async fn request(&self, req: Request<Full<Bytes>>) -> Reply {
        send(&self.client, req).await
    }

    pub async fn admin(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin_addr, path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        send(&self.client, req.body(Full::default()).expect("request")).await
    }

    /// Waits in real time (the clock may be frozen) until the sum of these series reaches
    /// `target`; panics after 10 s.
    pub async fn until_metric(&self, series: &[&str], target: f64) {
        for _ in 0..1_000 {
            let text = self.metrics().await;
            if series.iter().map(|s| metric_value(&text, s)).sum::<f64>() >= target {
                return;
            }
            real_sleep(Duration::from_millis(10)).await;
        }
        panic!("{series:?} did not reach {target} within 10 s");
    }

    /// Lets the gateway and the simulator (on this runtime) handle everything already under
    /// way (timers that fired, bytes sent on a socket, tasks woken) before a check that
    /// something has *not* happened: five round trips to the admin listener, each of which the
    /// runtime can only complete by polling its sockets again. Counted in the runtime's own
    /// turns, not in real time: a loaded machine makes it slower, never shorter.
    pub async fn settle(&self) {
        for _ in 0..5 {
            let reply = self.admin(Method::GET, "/healthz", &[]).await;
            assert_eq!(reply.status, StatusCode::OK);
        }
    }

    /// The time the gateway spent answering all the requests it has answered, by its own
    /// clock (the frozen one, in a test that freezes it): the sum of
    /// `gateway_request_duration_seconds` over every `cache` label.
    pub async fn answering_seconds(&self) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("gateway_request_duration_seconds_sum"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    pub async fn metrics(&self) -> String {
        let reply = self.admin(Method::GET, "/metrics", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        String::from_utf8(reply.body.to_vec()).expect("utf-8 metrics")
    }

    /// The value of one sample line (`name{labels}`, labels as rendered), or 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("gateway stops within 30s")
                .expect("gateway task did not panic")
                .expect("gateway ran");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

/// Tokio's clock, paused and kept from moving by itself: time moves only when the test calls
/// [`FrozenClock::advance`], so a TTL, a cool-down or a token lifetime passes in an instant and
/// exactly where the test says. (A plain paused clock jumps to the next timer whenever the
/// runtime waits, and it also waits while loopback sockets carry a request: that would fire a
/// 504 deadline in the middle of an ordinary exchange.) For `#[tokio::test]`'s current-thread
/// runtime, started paused (`#[tokio::test(start_paused = true)]`), as its first statement: a
/// clock paused from the runtime's start stays on whole milliseconds of the timer wheel, so
/// advancing by whole milliseconds fires exactly the timers that are due. The gateway and the
/// simulator run on the same runtime and clock.
///
/// Inside such a test, wait for conditions with [`until`], not with tokio's sleeps.
pub struct FrozenClock {
    _release: std::sync::mpsc::Sender<()>,
}

impl FrozenClock {
    pub fn start() -> Self {
        let (release, released) = std::sync::mpsc::channel::<()>();
        // While a blocking task runs, a paused clock does not auto-advance (tokio's documented
        // way to keep it still). Bounded in real time: a test that hangs gets its timeouts
        // back after 30 s and fails rather than blocking the run.
        tokio::task::spawn_blocking(move || {
            let _ = released.recv_timeout(Duration::from_secs(30));
        });
        FrozenClock { _release: release }
    }

    /// Moves the clock forward and fires the timers that are due.
    pub async fn advance(&self, by: Duration) {
        tokio::time::advance(by).await;
        // Let the tasks the timers woke run before the test goes on.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
}

/// Waits in real time (the clock may be frozen) until `check` holds; panics after 10 s.
pub async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..2_000 {
        if check() {
            return;
        }
        real_sleep(Duration::from_millis(5)).await;
    }
    panic!("{what}: not within 10 s");
}

/// A pause in real time, whatever tokio's clock does; the runtime carries socket traffic
/// meanwhile.
pub async fn real_sleep(duration: Duration) {
    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(duration)).await;
}

/// Polls `check` every 10 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A loopback address nothing listens on.
pub async fn dead_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr
}
