//! The HTTP side of Bill24: one pooled keep-alive hyper client (rustls for `https://`, with
//! HTTP/2 when Bill24 offers it by ALPN; plain `http://` for the simulator), reached directly or
//! through an egress proxy ([`crate::route`]), the two endpoint URLs, and one POST with its
//! deadline and a cap on the answer's size.
//!
//! A connection that stops answering is not reused: HTTP/2 connections are PINGed (idle ones
//! too) and closed when a PING goes unanswered, and a call that times out takes its connection
//! out of the pool, so the next call opens a new one. (HTTP/2 multiplexes every call onto one
//! connection: without both, one wedged connection would stall every call until the peer
//! closed it.)

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::header::PROXY_AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{HttpConnector, capture_connection};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::chain::error_chain;
use crate::route::{self, ProxyError, Route};
use crate::{Config, Endpoint, tls};

pub const AUTHORIZE_PATH: &str = "/merchantsecurity/authorize";
pub const BALANCE_PATH: &str = "/instant_payment/get_wallet_balance";

/// Bill24 answers are small (a balance is a few hundred bytes); a body larger than this is not
/// read on: the call fails as an answer the gateway cannot use, and is not retried.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// How long an unused pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The HTTP/2 keep-alive of a connection to Bill24, derived from `upstream.timeout`: after
/// one timeout without a frame from Bill24 a PING goes out, and a PING unanswered for one
/// more timeout closes the connection (a Bill24 that cannot answer a PING in that time could
/// not answer a call in time either). Bounded below so that a very short timeout does not
/// make a PING flood, and above so that a dead connection is found within a minute.
pub(crate) fn keep_alive(timeout: Duration) -> (Duration, Duration) {
    let interval = timeout.clamp(Duration::from_secs(1), Duration::from_secs(30));
    let ack_within = timeout.clamp(Duration::from_millis(100), Duration::from_secs(20));
    (interval, ack_within)
}

type HttpClient = Client<HttpsConnector<Route>, Full<Bytes>>;

/// An answer from Bill24, read in full.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection failed: {0}")]
    Io(String),
    /// Bill24 answered (with this status), but with a body over [`MAX_ANSWER_BYTES`].
    #[error("answer larger than {MAX_ANSWER_BYTES} bytes (HTTP {})", .0.as_u16())]
    TooLarge(StatusCode),
    /// The TLS handshake failed: why, in words (`certificate verify failed: unknown issuer`).
    #[error("{0}")]
    Tls(String),
    /// The egress proxy could not be reached, refused the tunnel or wants credentials.
    #[error("{0}")]
    Proxy(String),
}

impl TransportError {
    /// The `status` label of `gateway_upstream_requests_total`: the HTTP status when Bill24
    /// sent one, else what went wrong.
    pub fn label(&self) -> &str {
        match self {
            TransportError::TooLarge(status) => status.as_str(),
            TransportError::Timeout(_) => "timeout",
            TransportError::Tls(_) => "tls_error",
            TransportError::Proxy(_) => "proxy_error",
            _ => "error",
        }
    }
}

#[derive(Clone)]
pub struct Transport {
    client: HttpClient,
    /// `Proxy-Authorization` for a forwarding proxy (plain `http://` through a proxy).
    forward_authorization: Option<HeaderValue>,
    /// The forwarding proxy requests go to (plain `http://` through a proxy).
    forward_proxy: Option<String>,
    /// When Bill24 last asked for a client certificate that is not configured.
    asked_for_certificate: Arc<tls::CertificateRequests>,
    /// The route taken, for the start-up log line.
    route: String,
    authorize_url: Uri,
    balance_url: Uri,
    timeout: Duration,
}

impl Transport {
    pub fn new(cfg: &Config) -> Result<Self, String> {
        let url = |path: &str| -> Result<Uri, String> {
            format!("{}{}", cfg.base_url, path)
                .parse::<Uri>()
                .map_err(|e| format!("upstream.base_url: {e}"))
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        let base: Uri = cfg
            .base_url
            .parse()
            .map_err(|e| format!("upstream.base_url: {e}"))?;
        let chosen = route::choose(&base, cfg.proxy.as_ref(), http)?;
        let forward_proxy = match &chosen.route {
            Route::Forward { proxy, .. } => Some(proxy.clone()),
            _ => None,
        };
        let (tls_config, asked_for_certificate) = tls::client_config(&cfg.tls)?;
        // ALPN offers h2 and http/1.1: HTTP/2 when Bill24 picks it, HTTP/1.1 otherwise.
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(chosen.route);
        let (ping_interval, ping_timeout) = keep_alive(cfg.timeout);
        let client = Client::builder(TokioExecutor::new())
            .http2_keep_alive_interval(ping_interval)
            .http2_keep_alive_timeout(ping_timeout)
            .http2_keep_alive_while_idle(true)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(cfg.max_in_flight)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Transport {
            client,
            forward_authorization: chosen.forward_authorization,
            forward_proxy,
            asked_for_certificate,
            route: chosen.description,
            authorize_url: url(AUTHORIZE_PATH)?,
            balance_url: url(BALANCE_PATH)?,
            timeout: cfg.timeout,
        })
    }

    /// POSTs `body` with exactly `headers` (plus the `Host` and framing hyper adds), and reads
    /// the whole answer within `upstream.timeout`.
    pub async fn post(
        &self,
        endpoint: Endpoint,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Reply, TransportError> {
        self.post_within(endpoint, headers, body, self.timeout)
            .await
    }

    /// [`Transport::post`] with a shorter time limit (`timeout` is capped at
    /// `upstream.timeout`).
    pub async fn post_within(
        &self,
        endpoint: Endpoint,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        let timeout = timeout.min(self.timeout);
        let url = match endpoint {
            Endpoint::Balance => self.balance_url.clone(),
            Endpoint::Authorize => self.authorize_url.clone(),
        };
        let mut request = Request::post(url)
            .body(Full::new(body))
            .map_err(|e| TransportError::Io(e.to_string()))?;
        *request.headers_mut() = headers;
        if let Some(auth) = &self.forward_authorization {
            request
                .headers_mut()
                .insert(PROXY_AUTHORIZATION, auth.clone());
        }
        // Which pooled connection carries the call, so that a timeout can retire it.
        let connection = capture_connection(&mut request);
        let start = Instant::now();
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| self.classify_error(&e))?;
            // A forwarding proxy answers for itself with 407: not Bill24's 4xx to pass on.
            if self.forward_proxy.is_some()
                && response.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED
            {
                return Err(TransportError::Proxy(format!(
                    "the proxy asks for credentials (HTTP 407); {PROXY_CREDENTIALS_HINT}"
                )));
            }
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        TransportError::TooLarge(parts.status)
                    } else if let Some(proxy) = &self.forward_proxy {
                        TransportError::Proxy(format!(
                            "through the proxy {proxy}: {}",
                            error_chain(e.as_ref())
                        ))
                    } else {
                        TransportError::Io(error_chain(e.as_ref()))
                    }
                })?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                content_type: parts.headers.get(CONTENT_TYPE).cloned(),
                body,
                elapsed: start.elapsed(),
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may be wedged (a peer that neither reads nor writes, or a
                // full send window): the pool must not hand it to the next call.
                if let Some(connected) = connection.connection_metadata().as_ref() {
                    connected.poison();
                }
                Err(TransportError::Timeout(timeout))
            }
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How Bill24 is reached: `direct`, or through which proxy (never its credentials).
    pub fn route(&self) -> &str {
        &self.route
    }
}

const PROXY_CREDENTIALS_HINT: &str = "give them in the proxy URL: http://user:password@host:port";

impl Transport {
    /// A failed exchange, sorted: TLS and proxy failures by name, so that an operator tells
    /// them from an outage.
    fn classify_error(&self, e: &hyper_util::client::legacy::Error) -> TransportError {
        if let Some(reason) = tls::failure(e) {
            return TransportError::Tls(reason);
        }
        // With TLS 1.3 a server that requires a client certificate refuses it after the
        // client has finished its side of the handshake: the client sees only a broken
        // connection, so the request for a certificate it could not answer is what tells.
        if self.asked_for_certificate.within(Duration::from_secs(60)) {
            return TransportError::Tls(tls::NO_CLIENT_CERTIFICATE.into());
        }
        // A forwarding proxy is the peer of every connection: it is what failed.
        if let Some(proxy) = &self.forward_proxy {
            return TransportError::Proxy(format!("through the proxy {proxy}: {}", error_chain(e)));
        }
        classify_other(e)
    }
}

fn classify_other(e: &hyper_util::client::legacy::Error) -> TransportError {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(proxy) = s.downcast_ref::<ProxyError>() {
            let hint = if proxy.detail.contains("proxy authorization required") {
                format!(" (HTTP 407; {PROXY_CREDENTIALS_HINT})")
            } else {
                String::new()
            };
            return TransportError::Proxy(format!("{proxy}{hint}"));
        }
        source = s.source();
    }
    if e.is_connect() {
        TransportError::Connect(error_chain(e))
    } else {
        TransportError::Io(error_chain(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_follows_the_timeout_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(keep_alive(ms(5_000)), (ms(5_000), ms(5_000)));
        assert_eq!(keep_alive(ms(300)), (ms(1_000), ms(300)));
        assert_eq!(keep_alive(ms(10)), (ms(1_000), ms(100)));
        assert_eq!(keep_alive(ms(120_000)), (ms(30_000), ms(20_000)));
    }
}
