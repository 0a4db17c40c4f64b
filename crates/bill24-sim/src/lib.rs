//! A Bill24 simulator that speaks BILL24.md: `/merchantsecurity/authorize` (numeric `code`,
//! .NET-style `tokenExpireTime`, refresh tokens) and `/instant_payment/get_wallet_balance`
//! (HTTP 200 with `"000"`, `"311"` or `"ERR_MISSED_FIELD"`, HTTP 401 for a bad or expired
//! token), with faults to inject and counters to read. Used by `--demo`, the tests and the
//! load tests (`bill24-gateway simulate`), never by the request path.
//!
//! Control it in-process through [`SimHandle`], or over HTTP: `GET /_sim/stats` and
//! `POST /_sim/control` (see [`Control`]).
//!
//! Token lifetimes run on tokio's clock, so tests on paused time see tokens expire when they
//! advance it.
//!
//! It serves plain HTTP (HTTP/1.1 and h2c), or HTTPS with a given certificate ([`tls_config`]):
//! ALPN offers `h2` and `http/1.1` (or only `http/1.1`), and client certificates can be
//! required.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

/// Credentials the simulator accepts unless told otherwise (the demo uses them).
pub const DEMO_MERCHANT_TOKEN: &str = "demo-merchant-token";
pub const DEMO_CLIENT_ID: &str = "demo-client";
pub const DEMO_CLIENT_SECRET: &str = "demo-client-secret";

/// Codes starting with this (any case) are unknown customers (`"311"`).
pub const UNKNOWN_PREFIX: &str = "UNKNOWN";

const MESSAGE_KH_SUCCESS: &str = "ជោគជ័យ";
const MESSAGE_KH_NOT_FOUND: &str = "រកមិនឃើញអតិថិជន";

/// A fault the simulator applies to the answers of one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// This HTTP status with an HTML body.
    Status(u16),
    /// Close the connection without answering.
    Reset,
    /// HTTP 200 with an HTML (non-JSON) body.
    Html,
    /// Answer HTTP 401 as if the token were bad.
    Unauthorized,
    /// HTTP 200 with `"code":"ERR_MISSED_FIELD"`, as if the field were missing.
    MissedField,
    /// No answer for a minute (the gateway's timeout decides).
    Hang,
}

/// How `tokenExpireTime` is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpireFormat {
    /// `2025-03-03T16:58:46.9386571+07:00` (what Bill24 sends).
    #[default]
    Dotnet,
    /// `2025-03-03T09:58:46.938Z`.
    Utc,
    /// No `tokenExpireTime` at all.
    Missing,
    /// `tokenExpireTime: "soon"`.
    Garbage,
}

/// How the authorize endpoint refuses bad credentials (BILL24.md: either happens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalStyle {
    /// HTTP 200 with body `code` 401.
    #[default]
    BodyCode,
    /// HTTP 401.
    HttpStatus,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub merchant_token: String,
    pub client_id: String,
    pub client_secret: String,
    pub token_lifetime: Duration,
    /// Serve HTTPS with this ([`tls_config`] builds one); `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A TLS server config from PEM: the certificate chain and its key; with `client_ca`,
/// clients must present a certificate signed by it; ALPN offers `h2` (unless `http2` is
/// false) and `http/1.1`.
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca: Option<&[u8]>,
    http2: bool,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(cert.map_err(|e| format!("client CA: {e}"))?)
                    .map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            merchant_token: DEMO_MERCHANT_TOKEN.into(),
            client_id: DEMO_CLIENT_ID.into(),
            client_secret: DEMO_CLIENT_SECRET.into(),
            token_lifetime: Duration::from_secs(3600),
            tls: None,
        }
    }
}

/// A request as the simulator received it.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// Header names lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Settings that can change while running (HTTP: `POST /_sim/control`, all fields optional).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Control {
    /// Delay before each balance answer.
    pub latency_ms: Option<u64>,
    /// Delay before each authorize answer.
    pub authorize_latency_ms: Option<u64>,
    /// A fault on every balance call (`null` clears it).
    #[serde(deserialize_with = "present")]
    pub balance_fault: Option<Option<Fault>>,
    /// A fault on the next N balance calls: `[N, fault]`.
    pub fail_next: Option<(u64, Fault)>,
    /// A fault on every authorize call (`null` clears it).
    #[serde(deserialize_with = "present")]
    pub authorize_fault: Option<Option<Fault>>,
    pub token_lifetime_ms: Option<u64>,
    pub expire_format: Option<ExpireFormat>,
    pub refusal_style: Option<RefusalStyle>,
    /// Invalidate every access token (`"access"`) or access and refresh tokens (`"all"`).
    pub revoke: Option<Revoke>,
    /// Zero every counter.
    pub reset_counters: Option<bool>,
    /// Close every open connection now (clients must open new ones).
    pub close_connections: Option<bool>,
    /// Make every `"000"` answer exactly this many bytes long, by lengthening its first
    /// wallet's name (still valid JSON); 0 or shorter than the plain answer: no padding.
    pub answer_bytes: Option<u64>,
}

/// A field that is present, even as `null` (which plain `Option<Option<_>>` reads as absent).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revoke {
    Access,
    All,
}

/// Counter snapshot (HTTP: `GET /_sim/stats`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub authorize_calls: u64,
    pub refresh_calls: u64,
    pub balance_calls: u64,
    pub unauthorized_balance_calls: u64,
    /// Refresh tokens presented again after they were redeemed (refresh tokens are single-use,
    /// as IdentityServer's are by default: each such call is refused).
    pub reused_refresh_tokens: u64,
    pub in_flight: u64,
    pub max_in_flight: u64,
    /// Connections accepted (with HTTPS: whose handshake completed).
    pub connections: u64,
    /// TLS handshakes that failed (a client that did not trust the certificate, or had no
    /// client certificate where one is required).
    pub tls_handshake_failures: u64,
    /// Requests that came over HTTP/2.
    pub http2_requests: u64,
}

struct Settings {
    latency: Duration,
    authorize_latency: Duration,
    balance_fault: Option<Fault>,
    fail_next: (u64, Option<Fault>),
    authorize_fault: Option<Fault>,
    token_lifetime: Duration,
    expire_format: ExpireFormat,
    refusal_style: RefusalStyle,
    answer_bytes: usize,
}

struct Tokens {
    access: HashMap<String, Instant>,
    refresh: HashSet<String>,
    /// Refresh tokens already redeemed (single use).
    redeemed: HashSet<String>,
}

struct State {
    credentials: SimConfig,
    settings: Mutex<Settings>,
    tokens: Mutex<Tokens>,
    balances: Mutex<HashMap<String, Vec<Wallet>>>,
    per_customer: Mutex<HashMap<String, u64>>,
    last_balance: Mutex<Option<Recorded>>,
    last_authorize: Mutex<Option<Recorded>>,
    authorize_calls: AtomicU64,
    refresh_calls: AtomicU64,
    balance_calls: AtomicU64,
    unauthorized_balance_calls: AtomicU64,
    reused_refresh_tokens: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    connections: AtomicU64,
    tls_handshake_failures: AtomicU64,
    http2_requests: AtomicU64,
    /// Bumped to close every open connection.
    close_connections: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Wallet {
    pub id: String,
    pub name: String,
    pub balance: serde_json::Number,
    pub currency: String,
}

/// A running simulator.
pub struct Simulator {
    addr: SocketAddr,
    handle: SimHandle,
    stop: watch::Sender<bool>,
}

impl Simulator {
    /// Serves on `listener` until dropped.
    pub fn start(listener: TcpListener, config: SimConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            settings: Mutex::new(Settings {
                latency: Duration::ZERO,
                authorize_latency: Duration::ZERO,
                balance_fault: None,
                fail_next: (0, None),
                authorize_fault: None,
                token_lifetime: config.token_lifetime,
                expire_format: ExpireFormat::default(),
                refusal_style: RefusalStyle::default(),
                answer_bytes: 0,
            }),
            credentials: config,
            tokens: Mutex::new(Tokens {
                access: HashMap::new(),
                refresh: HashSet::new(),
                redeemed: HashSet::new(),
            }),
            balances: Mutex::new(HashMap::new()),
            per_customer: Mutex::new(HashMap::new()),
            last_balance: Mutex::new(None),
            last_authorize: Mutex::new(None),
            authorize_calls: AtomicU64::new(0),
            refresh_calls: AtomicU64::new(0),
            balance_calls: AtomicU64::new(0),
            unauthorized_balance_calls: AtomicU64::new(0),
            reused_refresh_tokens: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            http2_requests: AtomicU64::new(0),
            close_connections: watch::channel(0).0,
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, state.clone(), stopped));
        Ok(Simulator {
            addr,
            handle: SimHandle(state),
            stop,
        })
    }

    /// Binds `addr` and serves.
    pub async fn bind(addr: SocketAddr, config: SimConfig) -> std::io::Result<Self> {
        Self::start(TcpListener::bind(addr).await?, config)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` or `https://` (with HTTPS) and the address.
    pub fn base_url(&self) -> String {
        let scheme = if self.handle.0.credentials.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn handle(&self) -> SimHandle {
        self.handle.clone()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Controls and counters of a running simulator.
#[derive(Clone)]
pub struct SimHandle(Arc<State>);

impl SimHandle {
    pub fn apply(&self, control: &Control) {
        let s = &self.0;
        {
            let mut set = lock(&s.settings);
            if let Some(ms) = control.latency_ms {
                set.latency = Duration::from_millis(ms);
            }
            if let Some(ms) = control.authorize_latency_ms {
                set.authorize_latency = Duration::from_millis(ms);
            }
            if let Some(fault) = control.balance_fault {
                set.balance_fault = fault;
            }
            if let Some((n, fault)) = control.fail_next {
                set.fail_next = (n, Some(fault));
            }
            if let Some(fault) = control.authorize_fault {
                set.authorize_fault = fault;
            }
            if let Some(ms) = control.token_lifetime_ms {
                set.token_lifetime = Duration::from_millis(ms);
            }
            if let Some(f) = control.expire_format {
                set.expire_format = f;
            }
            if let Some(r) = control.refusal_style {
                set.refusal_style = r;
            }
            if let Some(n) = control.answer_bytes {
                set.answer_bytes = usize::try_from(n).unwrap_or(usize::MAX);
            }
        }
        if let Some(revoke) = control.revoke {
            let mut tokens = lock(&s.tokens);
            tokens.access.clear();
            if revoke == Revoke::All {
                tokens.refresh.clear();
            }
        }
        if control.close_connections == Some(true) {
            s.close_connections.send_modify(|n| *n += 1);
        }
        if control.reset_counters == Some(true) {
            for c in [
                &s.authorize_calls,
                &s.refresh_calls,
                &s.balance_calls,
                &s.unauthorized_balance_calls,
                &s.reused_refresh_tokens,
                &s.max_in_flight,
                &s.connections,
                &s.tls_handshake_failures,
                &s.http2_requests,
            ] {
                c.store(0, Ordering::SeqCst);
            }
            lock(&s.per_customer).clear();
        }
    }

    // The setters below are shorthands for one-field [`Control`]s.

    pub fn set_latency(&self, latency: Duration) {
        self.apply(&Control {
            latency_ms: Some(millis(latency)),
            ..Control::default()
        });
    }

    pub fn set_authorize_latency(&self, latency: Duration) {
        self.apply(&Control {
            authorize_latency_ms: Some(millis(latency)),
            ..Control::default()
        });
    }

    /// A fault on every balance call until cleared with `None`.
    pub fn set_balance_fault(&self, fault: Option<Fault>) {
        self.apply(&Control {
            balance_fault: Some(fault),
            ..Control::default()
        });
    }

    /// A fault on the next `n` balance calls only.
    pub fn fail_next(&self, n: u64, fault: Fault) {
        self.apply(&Control {
            fail_next: Some((n, fault)),
            ..Control::default()
        });
    }

    pub fn set_authorize_fault(&self, fault: Option<Fault>) {
        self.apply(&Control {
            authorize_fault: Some(fault),
            ..Control::default()
        });
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.apply(&Control {
            token_lifetime_ms: Some(millis(lifetime)),
            ..Control::default()
        });
    }

    pub fn set_expire_format(&self, format: ExpireFormat) {
        self.apply(&Control {
            expire_format: Some(format),
            ..Control::default()
        });
    }

    pub fn set_refusal_style(&self, style: RefusalStyle) {
        self.apply(&Control {
            refusal_style: Some(style),
            ..Control::default()
        });
    }

    /// Makes every `"000"` answer exactly `bytes` long (0: answers as usual).
    pub fn set_answer_bytes(&self, bytes: u64) {
        self.apply(&Control {
            answer_bytes: Some(bytes),
            ..Control::default()
        });
    }

    /// Invalidates every access token issued so far (refresh tokens keep working).
    pub fn revoke_access_tokens(&self) {
        self.apply(&Control {
            revoke: Some(Revoke::Access),
            ..Control::default()
        });
    }

    /// Invalidates every access and refresh token issued so far.
    pub fn revoke_all_tokens(&self) {
        self.apply(&Control {
            revoke: Some(Revoke::All),
            ..Control::default()
        });
    }

    /// Sets the wallets a customer has (1 or 2 in real life).
    pub fn set_wallets(&self, customer_sync_code: &str, wallets: Vec<Wallet>) {
        lock(&self.0.balances).insert(customer_sync_code.to_string(), wallets);
    }

    /// Sets the KHR balance of a customer's single wallet.
    pub fn set_balance(&self, customer_sync_code: &str, balance: i64) {
        self.set_wallets(
            customer_sync_code,
            vec![Wallet {
                id: wallet_id(customer_sync_code, "KHR"),
                name: format!("{customer_sync_code}'s Wallet(KHR)"),
                balance: balance.into(),
                currency: "KHR".into(),
            }],
        );
    }

    pub fn stats(&self) -> Stats {
        let s = &self.0;
        Stats {
            authorize_calls: s.authorize_calls.load(Ordering::SeqCst),
            refresh_calls: s.refresh_calls.load(Ordering::SeqCst),
            balance_calls: s.balance_calls.load(Ordering::SeqCst),
            unauthorized_balance_calls: s.unauthorized_balance_calls.load(Ordering::SeqCst),
            reused_refresh_tokens: s.reused_refresh_tokens.load(Ordering::SeqCst),
            in_flight: s.in_flight.load(Ordering::SeqCst),
            max_in_flight: s.max_in_flight.load(Ordering::SeqCst),
            connections: s.connections.load(Ordering::SeqCst),
            tls_handshake_failures: s.tls_handshake_failures.load(Ordering::SeqCst),
            http2_requests: s.http2_requests.load(Ordering::SeqCst),
        }
    }

    /// Every call to the authorize endpoint (refreshes included).
    pub fn authorize_calls(&self) -> u64 {
        self.0.authorize_calls.load(Ordering::SeqCst)
    }

    /// Authorize calls that carried a `refreshToken`.
    pub fn refresh_calls(&self) -> u64 {
        self.0.refresh_calls.load(Ordering::SeqCst)
    }

    /// Every call to the balance endpoint (401s and faults included).
    pub fn balance_calls(&self) -> u64 {
        self.0.balance_calls.load(Ordering::SeqCst)
    }

    /// Balance calls that named this customer.
    pub fn balance_calls_for(&self, customer_sync_code: &str) -> u64 {
        lock(&self.0.per_customer)
            .get(customer_sync_code)
            .copied()
            .unwrap_or(0)
    }

    pub fn last_balance_request(&self) -> Option<Recorded> {
        lock(&self.0.last_balance).clone()
    }

    pub fn last_authorize_request(&self) -> Option<Recorded> {
        lock(&self.0.last_authorize).clone()
    }
}

type SimResponse = Response<Full<Bytes>>;

async fn serve(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            match state.credentials.tls.clone() {
                None => {
                    state.connections.fetch_add(1, Ordering::SeqCst);
                    serve_connection(TokioIo::new(stream), state, stop).await;
                }
                Some(tls) => {
                    let accepting = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
                    match tokio::time::timeout(Duration::from_secs(10), accepting).await {
                        Ok(Ok(stream)) => {
                            state.connections.fetch_add(1, Ordering::SeqCst);
                            serve_connection(TokioIo::new(stream), state, stop).await;
                        }
                        _ => {
                            state.tls_handshake_failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        });
    }
}

/// Serves one connection until it ends, the simulator stops, or connections are closed.
async fn serve_connection<I>(io: I, state: Arc<State>, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut close = state.close_connections.subscribe();
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { handle(state, req).await }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(io, service);
    tokio::select! {
        _ = conn => {}
        _ = stop.changed() => {}
        _ = close.changed() => {}
    }
}

/// Errors close the connection without an answer (the `reset` fault).
async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<SimResponse, std::io::Error> {
    if req.version() == http::Version::HTTP_2 {
        state.http2_requests.fetch_add(1, Ordering::SeqCst);
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let authorization = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(plain(StatusCode::BAD_REQUEST, "unreadable body")),
    };
    let recorded = Recorded { headers, body };
    match (method, path.as_str()) {
        (Method::POST, "/merchantsecurity/authorize") => authorize(&state, recorded).await,
        (Method::POST, "/instant_payment/get_wallet_balance") => {
            let _guard = InFlightGuard::enter(&state);
            balance(&state, recorded, authorization.as_deref()).await
        }
        (Method::GET, "/_sim/stats") => Ok(json(StatusCode::OK, &SimHandle(state).stats())),
        (Method::POST, "/_sim/control") => {
            match serde_json::from_slice::<Control>(&recorded.body) {
                Ok(control) => {
                    SimHandle(state.clone()).apply(&control);
                    Ok(json(StatusCode::OK, &SimHandle(state).stats()))
                }
                Err(e) => Ok(plain(StatusCode::BAD_REQUEST, &e.to_string())),
            }
        }
        _ => Ok(plain(StatusCode::NOT_FOUND, "not found")),
    }
}

struct InFlightGuard<'a>(&'a State);

impl<'a> InFlightGuard<'a> {
    fn enter(state: &'a State) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlightGuard(state)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Deserialize)]
struct AuthorizeBody {
    #[serde(default)]
    token: String,
    #[serde(default, rename = "clientId")]
    client_id: String,
    #[serde(default)]
    secret: String,
    #[serde(default, rename = "refreshToken")]
    refresh_token: Option<String>,
}

async fn authorize(state: &State, recorded: Recorded) -> Result<SimResponse, std::io::Error> {
    state.authorize_calls.fetch_add(1, Ordering::SeqCst);
    let parsed = serde_json::from_slice::<AuthorizeBody>(&recorded.body);
    if parsed.as_ref().is_ok_and(|b| b.refresh_token.is_some()) {
        state.refresh_calls.fetch_add(1, Ordering::SeqCst);
    }
    *lock(&state.last_authorize) = Some(recorded);
    let (latency, fault, lifetime, format, style) = {
        let s = lock(&state.settings);
        (
            s.authorize_latency,
            s.authorize_fault,
            s.token_lifetime,
            s.expire_format,
            s.refusal_style,
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(fault) = fault {
        return apply_fault(fault).await;
    }
    let refuse = |message: &str| {
        let body = serde_json::json!({"code": 401, "message": message, "data": null});
        Ok(match style {
            RefusalStyle::BodyCode => json(StatusCode::OK, &body),
            RefusalStyle::HttpStatus => json(StatusCode::UNAUTHORIZED, &body),
        })
    };
    let Ok(body) = parsed else {
        return Ok(json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"code": 400, "message": "Invalid input", "data": null}),
        ));
    };
    let c = &state.credentials;
    if body.token != c.merchant_token
        || body.client_id != c.client_id
        || body.secret != c.client_secret
    {
        return refuse("Invalid merchant credentials");
    }
    let mut tokens = lock(&state.tokens);
    if let Some(refresh) = &body.refresh_token {
        if tokens.redeemed.contains(refresh) {
            // IdentityServer answers `invalid_grant`: a refresh token is good for one use.
            state.reused_refresh_tokens.fetch_add(1, Ordering::SeqCst);
            return refuse("Refresh token already used");
        }
        if !tokens.refresh.remove(refresh) {
            return refuse("Invalid refresh token");
        }
        tokens.redeemed.insert(refresh.clone());
    }
    let access = format!("eyJhbGciOiJIUzI1NiJ9.{}.sim", random_hex(24));
    let refresh = random_hex(32);
    tokens
        .access
        .insert(access.clone(), Instant::now() + lifetime);
    tokens.refresh.insert(refresh.clone());
    drop(tokens);

    let expires = clock::now_utc() + lifetime;
    let mut data = serde_json::json!({
        "issuer": "http://bill24-simulator",
        "token": access,
        "refreshToken": refresh,
    });
    match format {
        ExpireFormat::Dotnet => data["tokenExpireTime"] = dotnet_time(expires).into(),
        ExpireFormat::Utc => {
            data["tokenExpireTime"] = expires
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
                .into()
        }
        ExpireFormat::Garbage => data["tokenExpireTime"] = "soon".into(),
        ExpireFormat::Missing => {}
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"code": 200, "message": "", "data": data}),
    ))
}

/// `2025-03-03T16:58:46.9386571+07:00`: Phnom Penh time, 7 fractional digits.
fn dotnet_time(t: OffsetDateTime) -> String {
    let local = t.to_offset(time::macros::offset!(+7));
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}+07:00",
        local.year(),
        u8::from(local.month()),
        local.day(),
        local.hour(),
        local.minute(),
        local.second(),
        local.nanosecond() / 100
    )
}

#[derive(Deserialize)]
struct BalanceBody {
    #[serde(default)]
    customer_sync_code: Option<String>,
}

async fn balance(
    state: &State,
    recorded: Recorded,
    authorization: Option<&str>,
) -> Result<SimResponse, std::io::Error> {
    state.balance_calls.fetch_add(1, Ordering::SeqCst);
    let code = serde_json::from_slice::<BalanceBody>(&recorded.body)
        .ok()
        .and_then(|b| b.customer_sync_code);
    if let Some(code) = &code {
        *lock(&state.per_customer).entry(code.clone()).or_default() += 1;
    }
    *lock(&state.last_balance) = Some(recorded);
    let (latency, fault, answer_bytes) = {
        let mut s = lock(&state.settings);
        let fault = match s.fail_next {
            (n, Some(f)) if n > 0 => {
                s.fail_next = (n - 1, Some(f));
                Some(f)
            }
            _ => s.balance_fault,
        };
        (s.latency, fault, s.answer_bytes)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let token_ok = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| {
            lock(&state.tokens)
                .access
                .get(t)
                .is_some_and(|exp| Instant::now() < *exp)
        });
    if let Some(fault) = fault {
        return apply_fault(fault).await;
    }
    if !token_ok {
        state
            .unauthorized_balance_calls
            .fetch_add(1, Ordering::SeqCst);
        return Ok(unauthorized());
    }
    let Some(code) = code.filter(|c| !c.is_empty()) else {
        return Ok(missed_field());
    };
    if code.to_ascii_uppercase().starts_with(UNKNOWN_PREFIX) {
        return Ok(json(
            StatusCode::OK,
            &BalanceAnswer {
                code: "311",
                message: "Customer not found",
                message_kh: MESSAGE_KH_NOT_FOUND,
                data: None,
            },
        ));
    }
    let wallets = lock(&state.balances)
        .get(&code)
        .cloned()
        .unwrap_or_else(|| default_wallets(&code));
    let mut answer = BalanceAnswer {
        code: "000",
        message: "Success",
        message_kh: MESSAGE_KH_SUCCESS,
        data: Some(wallets),
    };
    pad(&mut answer, answer_bytes);
    Ok(json(StatusCode::OK, &answer))
}

/// Lengthens the first wallet's name (ASCII, one byte per character in the JSON) so that the
/// answer is `bytes` long, when it is shorter.
fn pad(answer: &mut BalanceAnswer, bytes: usize) {
    let len = serde_json::to_vec(&*answer).map_or(0, |b| b.len());
    if let Some(wallet) = answer.data.as_mut().and_then(|w| w.first_mut())
        && bytes > len
    {
        wallet.name.push_str(&"x".repeat(bytes - len));
    }
}

/// A balance answer, fields in Bill24's order.
#[derive(Serialize)]
struct BalanceAnswer {
    code: &'static str,
    message: &'static str,
    message_kh: &'static str,
    data: Option<Vec<Wallet>>,
}

fn missed_field() -> SimResponse {
    json(
        StatusCode::OK,
        &BalanceAnswer {
            code: "ERR_MISSED_FIELD",
            message: "Please provide [customer_sync_code].",
            message_kh: "សូមផ្តល់ [customer_sync_code]។",
            data: None,
        },
    )
}

async fn apply_fault(fault: Fault) -> Result<SimResponse, std::io::Error> {
    match fault {
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(html(StatusCode::GATEWAY_TIMEOUT))
        }
        Fault::MissedField => Ok(missed_field()),
        Fault::Reset => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "simulated reset",
        )),
        Fault::Html => Ok(html(StatusCode::OK)),
        Fault::Unauthorized => Ok(unauthorized()),
        Fault::Status(code) => Ok(html(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        )),
    }
}

/// One or two wallets, balances derived from the code so they are stable across calls.
fn default_wallets(code: &str) -> Vec<Wallet> {
    let h = code.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut wallets = vec![Wallet {
        id: wallet_id(code, "KHR"),
        name: format!("{code}'s Wallet(KHR)"),
        balance: ((h % 10_000) * 100).into(),
        currency: "KHR".into(),
    }];
    if h % 2 == 0 {
        wallets.push(Wallet {
            id: wallet_id(code, "USD"),
            name: format!("{code}'s Wallet(USD)"),
            balance: ((h >> 20) % 5_000).into(),
            currency: "USD".into(),
        });
    }
    wallets
}

fn wallet_id(code: &str, currency: &str) -> String {
    format!("w-{}-{}", code.len(), currency.to_ascii_lowercase())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> SimResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn plain(status: StatusCode, text: &str) -> SimResponse {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn html(status: StatusCode) -> SimResponse {
    let mut r = Response::new(Full::new(Bytes::from_static(
        b"<html><body><h1>Service Unavailable</h1></body></html>",
    )));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
    r
}

fn unauthorized() -> SimResponse {
    json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"message": "Authorization has been denied for this request."}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotnet_time_has_seven_digits_and_parses_back() {
        let t =
            OffsetDateTime::from_unix_timestamp_nanos(1_740_995_926_938_657_100).expect("valid");
        let text = dotnet_time(t);
        assert_eq!(text, "2025-03-03T16:58:46.9386571+07:00");
        let parsed = OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339);
        assert_eq!(parsed.ok(), Some(t));
    }

    #[test]
    fn control_null_clears_a_fault_and_absent_leaves_it() {
        let set: Control =
            serde_json::from_str(r#"{"balance_fault": {"status": 503}}"#).expect("json");
        assert_eq!(set.balance_fault, Some(Some(Fault::Status(503))));
        let clear: Control = serde_json::from_str(r#"{"balance_fault": null}"#).expect("json");
        assert_eq!(clear.balance_fault, Some(None));
        let absent: Control = serde_json::from_str("{}").expect("json");
        assert_eq!(absent.balance_fault, None);
        assert!(serde_json::from_str::<Control>(r#"{"nope": 1}"#).is_err());
    }

    #[test]
    fn wallets_are_stable_and_one_or_two() {
        let a = default_wallets("M005T");
        assert_eq!(a, default_wallets("M005T"));
        assert!((1..=2).contains(&a.len()));
        let counts: HashSet<usize> = (0..20)
            .map(|i| default_wallets(&format!("C{i}")).len())
            .collect();
        assert_eq!(counts.len(), 2, "both one- and two-wallet customers exist");
    }
}
