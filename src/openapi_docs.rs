//! The OpenAPI documents (`openapi.yaml`, `openapi-admin.yaml`) against the error types: every
//! status and code the code can produce is documented, and the documents list no code that
//! nothing produces. The lists come from the error enums themselves (`strum::EnumIter`), so a
//! new variant is checked without anyone adding it here. (Real responses against the documents
//! are checked in `tests/openapi.rs` and by schemathesis in CI.)

use std::collections::BTreeSet;

use bill24::UpstreamError;
use strum::IntoEnumIterator;

use crate::admin::AdminError;
use crate::balance::code::InvalidSyncCode;
use crate::balance::request::InvalidRequest;

#[allow(unreachable_pub)] // shared with the integration tests, where it is public
#[path = "../tests/common/openapi_doc.rs"]
mod doc;
use crate::error::{ErrorResponse, GatewayError};
use doc::{admin_doc, documented, endpoint_doc, error_codes};

/// Every (status, code) the endpoint answers with, written out: what README's error table and
/// CONTRACT §3 say, and what the error types must produce (a variant that disappears, or
/// answers another status or code, is caught here).
const ENDPOINT_ERRORS: [(u16, &str); 22] = [
    (400, "invalid_host"),
    (400, "invalid_json"),
    (400, "invalid_body"),
    (400, "missing_customer_sync_code"),
    (400, "invalid_customer_sync_code"),
    (401, "unauthorized"),
    (404, "not_found"),
    (405, "method_not_allowed"),
    (413, "payload_too_large"),
    (415, "unsupported_media_type"),
    (429, "rate_limited"),
    (429, "too_many_concurrent_requests"),
    (502, "upstream_unreachable"),
    (502, "upstream_tls_error"),
    (502, "upstream_error"),
    (502, "upstream_invalid_answer"),
    (502, "upstream_unauthorized"),
    (502, "token_unavailable"),
    (503, "upstream_busy"),
    (503, "circuit_open"),
    (504, "upstream_timeout"),
    (504, "deadline_exceeded"),
];

/// The same for the admin listener.
const ADMIN_ERRORS: [(u16, &str); 6] = [
    (400, "invalid_host"),
    (400, "invalid_customer_sync_code"),
    (401, "unauthorized"),
    (404, "not_found"),
    (405, "method_not_allowed"),
    (503, "metrics_busy"),
];

/// (status, code) of every error the endpoint can answer with.
fn endpoint_errors() -> Vec<(u16, &'static str)> {
    fn of(e: &impl ErrorResponse) -> (u16, &'static str) {
        (e.status().as_u16(), e.code())
    }
    let mut all: Vec<_> = GatewayError::iter().map(|e| of(&e)).collect();
    for e in InvalidRequest::iter() {
        match e {
            InvalidRequest::SyncCode(_) => {
                all.extend(InvalidSyncCode::iter().map(|c| of(&InvalidRequest::SyncCode(c))));
            }
            other => all.push(of(&other)),
        }
    }
    all.extend(UpstreamError::iter().map(|e| of(&e)));
    all
}

#[test]
fn every_endpoint_error_is_documented_and_nothing_else() {
    let doc = endpoint_doc();
    let operation = &doc["paths"][bill24::BALANCE_PATH]["post"];
    let documented_codes = error_codes(&doc);
    let mut produced = BTreeSet::new();
    let errors = endpoint_errors();
    assert_eq!(
        errors.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(ENDPOINT_ERRORS),
        "the (status, code) pairs the endpoint answers with"
    );
    for (status, code) in errors {
        let response = documented(&doc, operation, status)
            .unwrap_or_else(|| panic!("status {status} ({code}) is not documented"));
        assert!(
            response["content"].get("application/json").is_some(),
            "{status}: gateway errors are JSON"
        );
        assert!(documented_codes.contains(code), "{code} is not documented");
        produced.insert(code.to_string());
    }
    assert_eq!(
        produced, documented_codes,
        "documented codes nobody produces"
    );
}

#[test]
fn every_admin_error_is_documented_and_nothing_else() {
    let doc = admin_doc();
    let documented_codes = error_codes(&doc);
    let mut produced = BTreeSet::new();
    assert_eq!(
        AdminError::iter()
            .map(|e| (e.status().as_u16(), e.code()))
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(ADMIN_ERRORS),
        "the (status, code) pairs the admin listener answers with"
    );
    for e in AdminError::iter() {
        let status = e.status().as_u16();
        // Any path other than the documented ones is a 404; every other status belongs to an
        // operation.
        if status != 404 {
            let somewhere = doc["paths"]
                .as_object()
                .expect("paths")
                .values()
                .flat_map(|item| item.as_object().into_iter().flat_map(|ops| ops.values()))
                .any(|operation| documented(&doc, operation, status).is_some());
            assert!(
                somewhere,
                "admin status {status} ({}) is not documented",
                e.code()
            );
        }
        assert!(
            documented_codes.contains(e.code()),
            "{} is not documented",
            e.code()
        );
        produced.insert(e.code().to_string());
    }
    assert_eq!(
        produced, documented_codes,
        "documented codes nobody produces"
    );
}
