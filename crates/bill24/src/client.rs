//! The HTTP side of Bill24: one pooled keep-alive hyper client (rustls with the webpki roots for
//! `https://`, plain `http://` for the simulator), the two endpoint URLs, and one POST with its
//! deadline and a cap on the answer's size.

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::{Config, Endpoint};

pub const AUTHORIZE_PATH: &str = "/merchantsecurity/authorize";
pub const BALANCE_PATH: &str = "/instant_payment/get_wallet_balance";

/// Bill24 answers are small; anything larger than this is treated as a failure.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// How long an unused pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

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
    #[error("answer larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
}

impl TransportError {
    /// The `status` label of `gateway_upstream_requests_total` for a call with no HTTP status.
    pub fn label(&self) -> &'static str {
        match self {
            TransportError::Timeout(_) => "timeout",
            _ => "error",
        }
    }
}

#[derive(Clone)]
pub struct Transport {
    client: HttpClient,
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
        let https = HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("TLS setup: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(cfg.max_in_flight)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Transport {
            client,
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
        let start = Instant::now();
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    TransportError::Connect(error_chain(&e))
                } else {
                    TransportError::Io(error_chain(&e))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        TransportError::TooLarge
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
            Err(_) => Err(TransportError::Timeout(timeout)),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// An error and its sources on one line (these never contain request headers or bodies).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
