//! The header parsers (Content-Type, Cache-Control, traceparent, X-Request-Id) on any value.
#![no_main]

use bill24_gateway::balance::request::{CacheDirectives, is_json_content_type};
use bill24_gateway::correlation::{RequestId, TraceContext};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for name in ["content-type", "cache-control", "traceparent", "x-request-id"] {
        headers.insert(name, value.clone());
    }
    let _ = is_json_content_type(&headers);
    let _ = CacheDirectives::from_headers(&headers).accepts(std::time::Duration::from_secs(1));
    let _ = TraceContext::from_headers(&headers).child_header();
    let id = RequestId::from_headers(&headers);
    assert!(!id.as_str().is_empty() && id.as_str().len() <= 128);
});
