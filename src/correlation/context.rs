//! The identity of a request across hops: its `X-Request-Id` and W3C trace context, taken from
//! the caller when valid and started here otherwise.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue};

// As `HeaderName`s, a lookup hashes them without parsing the name first.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// 1–128 visible ASCII characters, from the caller or generated.
#[derive(Clone, Debug)]
pub struct RequestId(Repr);

#[derive(Clone, Debug)]
enum Repr {
    /// The caller's, as received.
    Given(HeaderValue),
    /// Made here, kept inline: `len` bytes of `text`.
    Made { text: [u8; MADE_LEN], len: u8 },
}

/// 16 hex digits of prefix, `-`, up to 16 hex digits of counter.
const MADE_LEN: usize = 33;

impl RequestId {
    /// The caller's id when it is 1–128 visible ASCII characters (`!`..`~`), else a new one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        match headers.get(X_REQUEST_ID) {
            Some(v) if is_valid_request_id(v.as_bytes()) => RequestId(Repr::Given(v.clone())),
            _ => Self::generate(),
        }
    }

    /// A new id: this process's random 64-bit prefix and a counter, in hex
    /// (`5f0c9e1a2b3c4d5e-1a`). Unique without a random draw per request, and made without
    /// an allocation.
    pub fn generate() -> Self {
        static PREFIX: OnceLock<[u8; 17]> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let prefix = PREFIX.get_or_init(|| {
            let mut prefix = [b'-'; 17];
            prefix[..16].copy_from_slice(format!("{:016x}", rand::random::<u64>()).as_bytes());
            prefix
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut counter = [0u8; 16];
        // 8 bytes make exactly 16 hex digits: cannot fail.
        let _ = hex::encode_to_slice(n.to_be_bytes(), &mut counter);
        // Without leading zeros (at least one digit).
        let digits = &counter[counter.iter().position(|&d| d != b'0').unwrap_or(15)..];
        let mut text = [0u8; MADE_LEN];
        text[..17].copy_from_slice(prefix);
        text[17..17 + digits.len()].copy_from_slice(digits);
        RequestId(Repr::Made {
            text,
            len: (17 + digits.len()) as u8,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored, so this never falls back.
        match &self.0 {
            Repr::Given(v) => v.to_str().unwrap_or("-"),
            Repr::Made { text, len } => {
                std::str::from_utf8(&text[..usize::from(*len)]).unwrap_or("-")
            }
        }
    }

    pub fn header_value(&self) -> HeaderValue {
        match &self.0 {
            Repr::Given(v) => v.clone(),
            Repr::Made { text, len } => HeaderValue::from_bytes(&text[..usize::from(*len)])
                .unwrap_or(HeaderValue::from_static("-")),
        }
    }
}

pub(crate) fn is_valid_request_id(bytes: &[u8]) -> bool {
    (1..=128).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A W3C trace context: the caller's trace when it sent a valid `traceparent`, else a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    flags: u8,
}

impl TraceContext {
    /// The caller's trace, when it sent a valid `traceparent`.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        headers
            .get(TRACEPARENT)
            .and_then(|v| Self::parse(v.as_bytes()))
    }

    /// A new trace.
    pub fn generate() -> Self {
        TraceContext {
            trace_id: rand::random::<u128>().max(1),
            flags: 0x01,
        }
    }

    /// `version-traceid-parentid-flags`; version `ff`, all-zero ids and bad hex are invalid.
    /// Versions above `00` may append fields, which are ignored.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 55 {
            return None;
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let version = u8::from_str_radix(hex_field(text, 0, 2)?, 16).ok()?;
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = u128::from_str_radix(hex_field(text, 3, 32)?, 16).ok()?;
        let parent_id = u64::from_str_radix(hex_field(text, 36, 16)?, 16).ok()?;
        let flags = u8::from_str_radix(hex_field(text, 53, 2)?, 16).ok()?;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(TraceContext { trace_id, flags })
    }

    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The `traceparent` for a call made on this trace's behalf: same trace, a new span id.
    pub fn child_header(&self) -> HeaderValue {
        let span_id = rand::random::<u64>().max(1);
        let mut s = String::with_capacity(55);
        let _ = write!(
            s,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, span_id, self.flags
        );
        HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(
            "00-00000000000000000000000000000001-0000000000000001-01",
        ))
    }
}

/// Lowercase hex only, as the W3C spec requires.
fn hex_field(text: &str, start: usize, len: usize) -> Option<&str> {
    let field = text.get(start..start + len)?;
    field
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        .then_some(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_visible_ascii_and_short() {
        for ok in ["a", "abc-123_XYZ", &"x".repeat(128), "!~"] {
            assert!(is_valid_request_id(ok.as_bytes()), "{ok}");
        }
        for bad in ["", " ", "a b", &"x".repeat(129), "é", "a\tb", "a\u{7f}"] {
            assert!(!is_valid_request_id(bad.as_bytes()), "{bad:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        let generated = RequestId::from_headers(&headers);
        assert_ne!(generated.as_str(), "has space");
        assert!(is_valid_request_id(generated.as_str().as_bytes()));
    }

    #[test]
    fn generated_ids_are_unique_and_valid() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| RequestId::generate().as_str().to_string())
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert!(is_valid_request_id(id.as_bytes()), "{id}");
            assert_eq!(id.as_bytes()[16], b'-', "{id}");
        }
        // The counter, in hex without leading zeros, counting up (other tests draw ids too).
        let a = RequestId::generate();
        let b = RequestId::generate();
        let counter = |id: &RequestId| {
            let hex = &id.as_str()[17..];
            assert!(hex == "0" || !hex.starts_with('0'), "{hex}");
            u64::from_str_radix(hex, 16).expect("hex")
        };
        assert!(counter(&b) > counter(&a));
        assert_eq!(a.header_value(), a.as_str());
        assert_eq!(a.as_str()[..17], b.as_str()[..17], "one prefix per process");
    }

    #[test]
    fn traceparent_parsing() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tc = TraceContext::parse(good.as_bytes()).expect("valid");
        assert_eq!(tc.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = tc.child_header();
        let child = child.to_str().expect("ascii");
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, good, "a new span id for the upstream hop");
        assert!(TraceContext::parse(child.as_bytes()).is_some());

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
            "",
        ] {
            assert!(TraceContext::parse(bad.as_bytes()).is_none(), "{bad}");
        }
        // A future version may carry more fields.
        assert!(
            TraceContext::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future")
                .is_some()
        );
    }
}
