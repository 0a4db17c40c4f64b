//! Bill24's failures as the caller gets them: the status, the public code and `Retry-After` of
//! each [`UpstreamError`], decided here and nowhere else. The Bill24 client only says what
//! happened (a timeout, an open circuit and for how long, ...); the answer is the gateway's.

use std::time::Duration;

use bill24::UpstreamError;
use http::{HeaderMap, StatusCode};

use crate::error::{ErrorResponse, set_retry_after};

/// How long a caller is told to wait when every upstream slot stayed taken.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

impl ErrorResponse for UpstreamError {
    fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Busy | UpstreamError::CircuitOpen { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamError::Unreachable
            | UpstreamError::Tls(_)
            | UpstreamError::Status(_)
            | UpstreamError::InvalidAnswer
            | UpstreamError::AnswerTooLarge
            | UpstreamError::Unauthorized
            | UpstreamError::Token(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            UpstreamError::Timeout => "upstream_timeout",
            UpstreamError::Unreachable => "upstream_unreachable",
            UpstreamError::Tls(_) => "upstream_tls_error",
            UpstreamError::Status(_) => "upstream_error",
            UpstreamError::InvalidAnswer | UpstreamError::AnswerTooLarge => {
                "upstream_invalid_answer"
            }
            UpstreamError::Unauthorized => "upstream_unauthorized",
            UpstreamError::Token(_) => "token_unavailable",
            UpstreamError::Busy => "upstream_busy",
            UpstreamError::CircuitOpen { .. } => "circuit_open",
        }
    }

    fn headers(&self, headers: &mut HeaderMap) {
        match self {
            UpstreamError::Busy => set_retry_after(headers, BUSY_RETRY_AFTER),
            UpstreamError::CircuitOpen { paused_for } => set_retry_after(headers, *paused_for),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::mem::discriminant;

    use bill24::token::TokenError;
    use http::header::RETRY_AFTER;
    use strum::IntoEnumIterator;

    use super::*;
    use crate::error::ErrorReply;

    /// Every variant, with the status, code and `Retry-After` its caller gets.
    fn table() -> Vec<(UpstreamError, u16, &'static str, Option<&'static str>)> {
        vec![
            (UpstreamError::Timeout, 504, "upstream_timeout", None),
            (
                UpstreamError::Unreachable,
                502,
                "upstream_unreachable",
                None,
            ),
            (
                UpstreamError::Tls("certificate verify failed: unknown issuer".into()),
                502,
                "upstream_tls_error",
                None,
            ),
            (UpstreamError::Status(500), 502, "upstream_error", None),
            (UpstreamError::Status(503), 502, "upstream_error", None),
            (
                UpstreamError::InvalidAnswer,
                502,
                "upstream_invalid_answer",
                None,
            ),
            (
                UpstreamError::AnswerTooLarge,
                502,
                "upstream_invalid_answer",
                None,
            ),
            (
                UpstreamError::Unauthorized,
                502,
                "upstream_unauthorized",
                None,
            ),
            (
                UpstreamError::Token(TokenError::Abandoned),
                502,
                "token_unavailable",
                None,
            ),
            (
                UpstreamError::Token(TokenError::BackingOff {
                    wait: Duration::from_secs(5),
                    cause: None,
                }),
                502,
                "token_unavailable",
                None,
            ),
            (UpstreamError::Busy, 503, "upstream_busy", Some("1")),
            (
                UpstreamError::CircuitOpen {
                    paused_for: Duration::from_secs(30),
                },
                503,
                "circuit_open",
                Some("30"),
            ),
            (
                UpstreamError::CircuitOpen {
                    paused_for: Duration::from_millis(1500),
                },
                503,
                "circuit_open",
                Some("2"),
            ),
            (
                UpstreamError::CircuitOpen {
                    paused_for: Duration::ZERO,
                },
                503,
                "circuit_open",
                Some("1"),
            ),
        ]
    }

    #[test]
    fn every_upstream_error_has_its_status_code_and_retry_after() {
        for (error, status, code, retry_after) in table() {
            let message = error.to_string();
            let response = error.clone().into_response();
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            let reply = response
                .extensions()
                .get::<ErrorReply>()
                .expect("an error reply");
            assert_eq!(reply.code, code, "{error:?}");
            assert_eq!(reply.message, message, "{error:?}");
            assert_eq!(
                response
                    .headers()
                    .get(RETRY_AFTER)
                    .map(|v| v.to_str().expect("ascii")),
                retry_after,
                "{error:?}"
            );
            assert_eq!(response.headers().len(), usize::from(retry_after.is_some()));
        }
    }

    #[test]
    fn the_table_covers_every_variant() {
        let listed: HashSet<_> = table().iter().map(|(e, ..)| discriminant(e)).collect();
        for e in UpstreamError::iter() {
            assert!(
                listed.contains(&discriminant(&e)),
                "{e:?} is not in the table"
            );
        }
    }
}
