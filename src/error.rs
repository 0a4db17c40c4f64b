//! The gateway's own errors, in one place: each leaf error becomes a status, its headers and a
//! JSON body `{"code": "...", "message": "...", "request_id": "..."}`.
//!
//! Layers answer with [`GatewayError::into_response`], which carries the code and message in
//! the response's extensions; the request-id layer, which knows the id, renders the body
//! ([`render_body`]). So a layer that rejects a request (or the deadline that cuts one) needs
//! nothing from the request to do it.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::balance::request::InvalidRequest;
use crate::bill24::UpstreamError;
use crate::correlation::RequestId;

pub type Body = Full<Bytes>;
pub type Response = http::Response<Body>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("no such endpoint; the gateway serves POST /instant_payment/get_wallet_balance")]
    NotFound,
    #[error("method not allowed; use POST")]
    MethodNotAllowed,
    #[error("missing or unknown caller key; send Authorization: Bearer <caller key>")]
    Unauthorized,
    #[error("caller is over its rate limit")]
    RateLimited { retry_after: Duration },
    #[error("caller has too many requests in flight")]
    TooManyConcurrent { retry_after: Duration },
    #[error("unsupported Content-Type; send application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    InvalidRequest(#[from] InvalidRequest),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("the request did not complete within the gateway's deadline")]
    DeadlineExceeded,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::RateLimited { .. } | GatewayError::TooManyConcurrent { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::Upstream(e) => e.status(),
            GatewayError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable, machine-readable `code` of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NotFound => "not_found",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::TooManyConcurrent { .. } => "too_many_concurrent_requests",
            GatewayError::UnsupportedMediaType => "unsupported_media_type",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::InvalidRequest(e) => e.code(),
            GatewayError::Upstream(e) => e.code(),
            GatewayError::DeadlineExceeded => "deadline_exceeded",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::RateLimited { retry_after }
            | GatewayError::TooManyConcurrent { retry_after } => Some(*retry_after),
            GatewayError::Upstream(e) => e.retry_after(),
            _ => None,
        }
    }

    /// The error as a response: status and headers now, the body once the request id is known.
    pub fn into_response(self) -> Response {
        let mut response = http::Response::new(Body::default());
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        match &self {
            GatewayError::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            GatewayError::MethodNotAllowed => {
                headers.insert(ALLOW, HeaderValue::from_static("POST"));
            }
            _ => {}
        }
        if let Some(wait) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
        }
        response.extensions_mut().insert(ErrorReply {
            code: self.code(),
            message: self.to_string(),
        });
        response
    }
}

/// The future of a layer that refuses a request: it holds the (small) error and makes the
/// response when polled, so the futures of the layers above stay small on the way in.
#[derive(Debug)]
pub struct Rejection<E> {
    error: Option<GatewayError>,
    _error_type: PhantomData<fn() -> E>,
}

pub fn reject<E>(error: GatewayError) -> Rejection<E> {
    Rejection {
        error: Some(error),
        _error_type: PhantomData,
    }
}

impl<E> Future for Rejection<E> {
    type Output = Result<Response, E>;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.error.take() {
            Some(error) => Poll::Ready(Ok(error.into_response())),
            // Polled again after it answered.
            None => Poll::Pending,
        }
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

/// An error answer waiting for its body (see the module docs).
#[derive(Debug, Clone)]
pub struct ErrorReply {
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    request_id: &'a str,
}

/// Writes the JSON error body of a response made by [`GatewayError::into_response`]; other
/// responses pass unchanged.
pub fn render_body(response: &mut Response, request_id: &RequestId) {
    let Some(reply) = response.extensions().get::<ErrorReply>() else {
        return;
    };
    let body = ErrorBody {
        code: reply.code,
        message: &reply.message,
        request_id: request_id.as_str(),
    };
    // Serializing three strings cannot fail; an empty body would still carry the status.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    *response.body_mut() = Full::new(Bytes::from(bytes));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("full body")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("json body")
    }

    #[tokio::test]
    async fn error_bodies_carry_code_message_and_request_id() {
        let mut response = GatewayError::Unauthorized.into_response();
        let mut headers = http::HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("req-1"));
        render_body(&mut response, &RequestId::from_headers(&headers));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let json = body_json(response).await;
        assert_eq!(json["code"], "unauthorized");
        assert_eq!(json["request_id"], "req-1");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    #[test]
    fn statuses_and_headers() {
        let r = GatewayError::MethodNotAllowed.into_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "POST");
        let r = GatewayError::RateLimited {
            retry_after: Duration::ZERO,
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[RETRY_AFTER], "1", "Retry-After is at least 1s");
        assert_eq!(
            retry_after_secs(Duration::from_millis(1500)),
            2,
            "rounded up"
        );
        assert_eq!(retry_after_secs(Duration::from_secs(4)), 4);
        assert_eq!(
            GatewayError::PayloadTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            GatewayError::DeadlineExceeded.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
