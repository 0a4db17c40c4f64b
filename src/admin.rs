//! The admin listener: liveness, readiness, Prometheus metrics, the view of the fleet
//! (`/fleet`), cache purge, and the OpenAPI documents (`/openapi.yaml`, `/openapi-admin.yaml`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use percent_encoding::percent_decode_str;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{bearer_key, hash_key};
use crate::balance::code::{InvalidSyncCode, validate_sync_code};
use crate::balance::service::Balances;
use crate::config::KeyHash;
use crate::correlation::context::RequestId;
use crate::error::{ErrorResponse, Response, render_body};
use crate::fleet::{Fleet, Presence, View};
use crate::metrics::Metrics;

/// The admin listener's refusals.
#[derive(Debug, Clone, thiserror::Error, strum::EnumIter)]
pub(crate) enum AdminError {
    #[error("an HTTP/1.1 request needs exactly one Host header")]
    InvalidHost,
    #[error("no such admin endpoint")]
    NotFound,
    #[error("method not allowed; use {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("missing or wrong admin key; send Authorization: Bearer <admin key>")]
    Unauthorized,
    #[error("the customer_sync_code in the path is not UTF-8 once percent-decoded")]
    CodeNotUtf8,
    #[error(transparent)]
    InvalidCode(#[from] InvalidSyncCode),
    #[error(
        "too many /metrics pages are being rendered or sent at once (at most {METRICS_PAGES_AT_ONCE}); retry shortly"
    )]
    MetricsBusy,
}

impl ErrorResponse for AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::InvalidHost => StatusCode::BAD_REQUEST,
            AdminError::NotFound => StatusCode::NOT_FOUND,
            AdminError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::CodeNotUtf8 | AdminError::InvalidCode(_) => StatusCode::BAD_REQUEST,
            AdminError::MetricsBusy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidHost => "invalid_host",
            AdminError::NotFound => "not_found",
            AdminError::MethodNotAllowed { .. } => "method_not_allowed",
            AdminError::Unauthorized => "unauthorized",
            AdminError::CodeNotUtf8 | AdminError::InvalidCode(_) => "invalid_customer_sync_code",
            AdminError::MetricsBusy => "metrics_busy",
        }
    }

    fn headers(&self, headers: &mut HeaderMap) {
        match self {
            AdminError::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            AdminError::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            AdminError::MetricsBusy => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
    }
}

/// What the admin endpoints read and act on.
pub(crate) struct Admin {
    /// True from start until shutdown begins.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub balances: Arc<Balances>,
    /// `server.admin_key_sha256`: when set, purges need `Bearer <admin key>`.
    pub admin_key: Arc<ArcSwap<Option<KeyHash>>>,
    /// The shared tier, with `[redis]`.
    pub fleet: Option<Arc<Fleet>>,
    /// This replica, as `/fleet` lists it.
    pub presence: Arc<Presence>,
    /// `/metrics` pages alive (being rendered, or sent), [`METRICS_PAGES_AT_ONCE`] at most.
    pub metrics_pages: Arc<Semaphore>,
}

/// `/metrics` pages that may be alive at once, across connections. A page is tens of KiB, and
/// one stays alive until its client has taken it: clients that never take it (an HTTP/2
/// window of 0) could otherwise make the gateway hold one per stream they open. Past it, 503
/// `metrics_busy`; a scraper or two never comes near it.
pub(crate) const METRICS_PAGES_AT_ONCE: usize = 16;

/// How long a page counts against [`METRICS_PAGES_AT_ONCE`] at most: a page its client does
/// not take (a window of 0) stops keeping real scrapes out after this, though its bytes stay
/// until the connection goes (8 streams per connection, 256 connections bound them).
const PAGE_COUNTS_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// A rendered `/metrics` page; its slot is freed when the last of its bytes is dropped, or
/// after [`PAGE_COUNTS_FOR`].
struct MetricsPage {
    text: String,
    _gone: tokio::sync::oneshot::Sender<()>,
}

/// Holds `slot` until the page is dropped, [`PAGE_COUNTS_FOR`] at most.
fn hold_for_page(slot: OwnedSemaphorePermit) -> tokio::sync::oneshot::Sender<()> {
    let (gone, page_gone) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(PAGE_COUNTS_FOR, page_gone).await;
        drop(slot);
    });
    gone
}

impl AsRef<[u8]> for MetricsPage {
    fn as_ref(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

impl Admin {
    pub(crate) async fn handle<B>(
        self: Arc<Self>,
        req: Request<B>,
    ) -> Result<Response, Infallible> {
        let path = req.uri().path();
        let method = req.method();
        if !crate::stack::host_ok(&req) {
            return Ok(error(AdminError::InvalidHost));
        }
        let response = match path {
            "/healthz" => only_get(method).unwrap_or_else(|| text(StatusCode::OK, "ok\n")),
            "/readyz" => only_get(method).unwrap_or_else(|| {
                if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                }
            }),
            "/metrics" => match only_get(method) {
                Some(r) => r,
                None => self.metrics_page().await,
            },
            // Open, like /metrics (health, readiness and metrics need no admin key).
            "/fleet" => match only_get(method) {
                Some(r) => r,
                None => self.fleet_page().await,
            },
            "/openapi.yaml" => {
                only_get(method).unwrap_or_else(|| yaml(include_str!("../openapi.yaml")))
            }
            "/openapi-admin.yaml" => {
                only_get(method).unwrap_or_else(|| yaml(include_str!("../openapi-admin.yaml")))
            }
            "/cache" => {
                if method != Method::DELETE {
                    error(AdminError::MethodNotAllowed { allow: "DELETE" })
                } else if let Some(denied) = self.check_admin_key(&req) {
                    denied
                } else {
                    if self.balances.purge_all().await {
                        tracing::info!("cache purged");
                        no_content()
                    } else {
                        tracing::warn!(
                            "cache purged on this replica; the fleet's shared tier could not be \
                             told yet: the purge is sent again until it is"
                        );
                        fleet_pending()
                    }
                }
            }
            _ => match path.strip_prefix("/cache/") {
                Some(encoded) => {
                    if method != Method::DELETE {
                        error(AdminError::MethodNotAllowed { allow: "DELETE" })
                    } else if let Some(denied) = self.check_admin_key(&req) {
                        denied
                    } else {
                        self.purge_one(encoded).await
                    }
                }
                None => error(AdminError::NotFound),
            },
        };
        Ok(response)
    }

    async fn metrics_page(&self) -> Response {
        let Ok(slot) = self.metrics_pages.clone().try_acquire_owned() else {
            return error(AdminError::MetricsBusy);
        };
        self.metrics.set_cache_entries(self.balances.cache().len());
        let tokens = self.balances.bill24().tokens();
        self.metrics
            .set_token_expires_in(match tokens.expires_in() {
                Some(left) => left.as_secs_f64(),
                // A token whose expiry Bill24 did not say: unknown.
                None if tokens.has_valid_token() => f64::NAN,
                None => 0.0,
            });
        let page = MetricsPage {
            text: self.metrics.render(),
            _gone: hold_for_page(slot),
        };
        let mut r = http::Response::new(Full::new(Bytes::from_owner(page)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    async fn fleet_page(&self) -> Response {
        let view = match &self.fleet {
            Some(fleet) => fleet.view(&self.presence).await,
            None => View::alone(&self.presence),
        };
        let mut r = http::Response::new(Full::new(Bytes::from(view.to_json())));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

    async fn purge_one(&self, encoded: &str) -> Response {
        let Ok(code) = percent_decode_str(encoded).decode_utf8() else {
            return error(AdminError::CodeNotUtf8);
        };
        if let Err(e) = validate_sync_code(&code) {
            return error(AdminError::from(e));
        }
        if self.balances.purge(&code).await {
            tracing::info!(customer_sync_code = %code, "cache entry purged");
            no_content()
        } else {
            tracing::warn!(
                customer_sync_code = %code,
                "cache entry purged on this replica; the fleet's shared tier could not be told \
                 yet: the purge is sent again until it is"
            );
            fleet_pending()
        }
    }

    /// None when allowed; the 401 answer otherwise.
    fn check_admin_key<B>(&self, req: &Request<B>) -> Option<Response> {
        let expected = (**self.admin_key.load())?;
        let presented = bearer_key(req.headers()).map(hash_key);
        match presented {
            Some(hash) if bool::from(hash.ct_eq(&expected)) => None,
            _ => Some(error(AdminError::Unauthorized)),
        }
    }
}

fn only_get(method: &Method) -> Option<Response> {
    (method != Method::GET && method != Method::HEAD)
        .then(|| error(AdminError::MethodNotAllowed { allow: "GET, HEAD" }))
}

fn error(e: AdminError) -> Response {
    let mut r = e.into_response();
    render_body(&mut r, RequestId::generate().as_str());
    r
}

fn text(status: StatusCode, body: &'static str) -> Response {
    let mut r = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn yaml(document: &'static str) -> Response {
    let mut r = http::Response::new(Full::new(Bytes::from_static(document.as_bytes())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/yaml"));
    r
}

fn no_content() -> Response {
    let mut r = http::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// 204 (gone here, as the contract says), saying that the fleet has not been told yet.
fn fleet_pending() -> Response {
    let mut r = no_content();
    r.headers_mut().insert(
        http::HeaderName::from_static("x-fleet-purge"),
        HeaderValue::from_static("pending"),
    );
    r
}
