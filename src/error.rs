//! Error answers, rendered in one place: an error becomes a status, its headers and a JSON body
//! `{"code": "...", "message": "...", "request_id": "..."}`.
//!
//! Each error type says its own status, code and headers by implementing [`ErrorResponse`]
//! next to where it is defined (the request parser's, the admin listener's); Bill24's failures,
//! which the client crate reports without deciding any answer, get theirs in `upstream_error`.
//! This module names none of them, so it imports nothing of the gateway.
//! [`GatewayError`] holds the refusals of the serving layers themselves (route, caller, limits,
//! deadline).
//!
//! Layers answer with [`ErrorResponse::into_response`], which carries the code and message in
//! the response's extensions; the correlation layer, which knows the request id, renders the
//! body ([`render_body`]). So a layer that rejects a request (or the deadline that cuts one)
//! needs nothing from the request to do it.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::Full;
use serde::Serialize;

pub(crate) type Body = Full<Bytes>;
pub(crate) type Response = http::Response<Body>;

/// An error that is answered to the client: its status, stable code and headers; its
/// `Display` is the message.
pub(crate) trait ErrorResponse: std::fmt::Display {
    fn status(&self) -> StatusCode;

    /// The stable, machine-readable `code` of the error body.
    fn code(&self) -> &'static str;

    /// Headers that belong to the status (`WWW-Authenticate`, `Allow`, `Retry-After`).
    fn headers(&self, _headers: &mut HeaderMap) {}

    /// The error as a response: status and headers now, the body once the request id is
    /// known ([`render_body`]).
    fn into_response(self) -> Response
    where
        Self: Sized,
    {
        let mut response = http::Response::new(Body::default());
        *response.status_mut() = self.status();
        self.headers(response.headers_mut());
        response.extensions_mut().insert(ErrorReply {
            code: self.code(),
            message: self.to_string(),
        });
        response
    }
}

/// The refusals of the serving layers.
#[derive(Debug, Clone, thiserror::Error, strum::EnumIter)]
pub(crate) enum GatewayError {
    #[error("an HTTP/1.1 request needs exactly one Host header")]
    InvalidHost,
    #[error("no such endpoint; the gateway serves POST {}", bill24::BALANCE_PATH)]
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
    #[error("the request did not complete within the gateway's deadline")]
    DeadlineExceeded,
}

impl ErrorResponse for GatewayError {
    fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidHost => StatusCode::BAD_REQUEST,
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::RateLimited { .. } | GatewayError::TooManyConcurrent { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            GatewayError::InvalidHost => "invalid_host",
            GatewayError::NotFound => "not_found",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::TooManyConcurrent { .. } => "too_many_concurrent_requests",
            GatewayError::UnsupportedMediaType => "unsupported_media_type",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::DeadlineExceeded => "deadline_exceeded",
        }
    }

    fn headers(&self, headers: &mut HeaderMap) {
        match self {
            GatewayError::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            GatewayError::MethodNotAllowed => {
                headers.insert(ALLOW, HeaderValue::from_static("POST"));
            }
            GatewayError::RateLimited { retry_after }
            | GatewayError::TooManyConcurrent { retry_after } => {
                set_retry_after(headers, *retry_after);
            }
            _ => {}
        }
    }
}

/// The future of a layer that refuses a request: it holds the (small) error and makes the
/// response when polled, so the futures of the layers above stay small on the way in.
#[derive(Debug)]
pub(crate) struct Rejection<R, E> {
    error: Option<R>,
    _error_type: PhantomData<fn() -> E>,
}

pub(crate) fn reject<R, E>(error: R) -> Rejection<R, E> {
    Rejection {
        error: Some(error),
        _error_type: PhantomData,
    }
}

impl<R: ErrorResponse + Unpin, E> Future for Rejection<R, E> {
    type Output = Result<Response, E>;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.error.take() {
            Some(error) => Poll::Ready(Ok(error.into_response())),
            // Polled again after it answered.
            None => Poll::Pending,
        }
    }
}

/// Sets `Retry-After` in whole seconds: rounded up, at least 1.
pub(crate) fn set_retry_after(headers: &mut HeaderMap, wait: Duration) {
    let secs = (wait.as_secs_f64().ceil() as u64).max(1);
    headers.insert(RETRY_AFTER, HeaderValue::from(secs));
}

/// An error answer waiting for its body (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct ErrorReply {
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    request_id: &'a str,
}

/// Writes the JSON error body of a response made by [`ErrorResponse::into_response`]; other
/// responses pass unchanged.
pub(crate) fn render_body(response: &mut Response, request_id: &str) {
    let Some(reply) = response.extensions().get::<ErrorReply>() else {
        return;
    };
    let body = ErrorBody {
        code: reply.code,
        message: &reply.message,
        request_id,
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
        render_body(&mut response, "req-1");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let json = body_json(response).await;
        assert_eq!(json["code"], "unauthorized");
        assert_eq!(json["request_id"], "req-1");
        assert_eq!(
            json["message"],
            "missing or unknown caller key; send Authorization: Bearer <caller key>"
        );
    }

    #[test]
    fn a_response_without_an_error_is_left_alone() {
        let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
        render_body(&mut response, "req-1");
        assert!(response.headers().get(CONTENT_TYPE).is_none());
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
        let mut headers = HeaderMap::new();
        set_retry_after(&mut headers, Duration::from_millis(1500));
        assert_eq!(headers[RETRY_AFTER], "2", "rounded up");
        set_retry_after(&mut headers, Duration::from_secs(4));
        assert_eq!(headers[RETRY_AFTER], "4");
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
