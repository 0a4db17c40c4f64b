//! The header parsers (Content-Type, Cache-Control, traceparent, X-Request-Id) on any value.
#![no_main]

use bill24_gateway::internals::{CacheDirectives, RequestId, TraceContext, is_json_content_type};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for name in [
        "content-type",
        "cache-control",
        "traceparent",
        "x-request-id",
    ] {
        headers.insert(name, value.clone());
    }
    let _ = is_json_content_type(&headers);
    let _ = CacheDirectives::from_headers(&headers).accepts(std::time::Duration::from_secs(1));
    if let Some(trace) = TraceContext::from_headers(&headers) {
        let child = trace.child_header();
        assert!(TraceContext::parse(child.as_bytes()).is_some());
    }
    let id = RequestId::from_headers(&headers);
    assert!(!id.as_str().is_empty() && id.as_str().len() <= 128);
});
