//! Reading a balance request: Content-Type (415), size (413), the JSON body and its
//! `customer_sync_code` (400), and the caller's `Cache-Control` directives.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tower::{BoxError, Layer, Service, ServiceExt};

use super::code::{InvalidSyncCode, SyncCode, validate_sync_code};
use crate::error::{ErrorResponse, GatewayError, Response, reject};
use crate::request_state::RequestState;

/// Why a body was refused (all 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, strum::EnumIter)]
pub enum InvalidRequest {
    #[error("request body is not valid JSON")]
    NotJson,
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("request body has customer_sync_code more than once")]
    DuplicateField,
    #[error("request body could not be read")]
    Unreadable,
    #[error("customer_sync_code is missing")]
    MissingSyncCode,
    #[error("customer_sync_code must be a string")]
    SyncCodeNotString,
    #[error(transparent)]
    SyncCode(#[from] InvalidSyncCode),
}

impl ErrorResponse for InvalidRequest {
    fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    fn code(&self) -> &'static str {
        match self {
            InvalidRequest::NotJson => "invalid_json",
            InvalidRequest::NotObject
            | InvalidRequest::DuplicateField
            | InvalidRequest::Unreadable => "invalid_body",
            InvalidRequest::MissingSyncCode => "missing_customer_sync_code",
            InvalidRequest::SyncCodeNotString | InvalidRequest::SyncCode(_) => {
                "invalid_customer_sync_code"
            }
        }
    }
}

/// `application/json` or `application/*+json`, any parameters; no header at all reads as JSON.
pub fn is_json_content_type(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(CONTENT_TYPE).iter().peekable();
    if values.peek().is_none() {
        return true;
    }
    values.all(|v| {
        // What nearly every caller sends.
        if v.as_bytes().eq_ignore_ascii_case(b"application/json") {
            return true;
        }
        let Ok(text) = v.to_str() else { return false };
        let media = text.split(';').next().unwrap_or("").trim();
        let Some((kind, subtype)) = media.split_once('/') else {
            return false;
        };
        if !kind.trim_end().eq_ignore_ascii_case("application") {
            return false;
        }
        let subtype = subtype.trim_start();
        subtype.eq_ignore_ascii_case("json")
            || (subtype.len() > 5
                && subtype.is_char_boundary(subtype.len() - 5)
                && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json")
                && !subtype.contains(char::is_whitespace))
    })
}

/// A body known to be larger than the limit before it is read: hyper has read its
/// `Content-Length` already (and refused an invalid one), and says so in the size hint.
fn declared_too_large(body: &impl http_body::Body, limit: usize) -> bool {
    body.size_hint().lower() > limit as u64
}

/// Parses and validates the body; returns the `customer_sync_code`.
pub fn parse_body(body: &[u8]) -> Result<SyncCode, InvalidRequest> {
    match plain_body(body) {
        Some(code) => {
            validate_sync_code(code)?;
            Ok(SyncCode::new(code))
        }
        None => parse_body_json(body),
    }
}

/// The body every caller sends, `{"customer_sync_code":"<text>"}` with any JSON whitespace
/// between the tokens (as `json.dumps` or a pretty-printer writes it) and a text free of
/// quotes, backslashes and bytes below 0x20 (which JSON escapes): read without a JSON parser.
/// Any other body, valid or not, goes to [`parse_body_json`], which gives the same answer for
/// this one (a property test checks it).
fn plain_body(body: &[u8]) -> Option<&str> {
    let rest = json_ws(body).strip_prefix(b"{")?;
    let rest = json_ws(rest).strip_prefix(b"\"customer_sync_code\"")?;
    let rest = json_ws(rest).strip_prefix(b":")?;
    let rest = json_ws(rest).strip_prefix(b"\"")?;
    let end = rest
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    let (text, rest) = rest.split_at(end);
    // Stopped at a backslash or a control byte rather than the closing quote: not plain.
    let rest = rest.strip_prefix(b"\"")?;
    let rest = json_ws(rest).strip_prefix(b"}")?;
    if !json_ws(rest).is_empty() {
        return None;
    }
    std::str::from_utf8(text).ok()
}

/// `bytes` past any leading JSON whitespace (space, tab, line feed, carriage return).
fn json_ws(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// [`parse_body`] by way of serde_json, for any shape of body.
pub fn parse_body_json(body: &[u8]) -> Result<SyncCode, InvalidRequest> {
    // JSON text is UTF-8 (RFC 8259 §8.1), in the members the gateway ignores too; serde_json
    // checks only the strings it decodes.
    if std::str::from_utf8(body).is_err() {
        return Err(InvalidRequest::NotJson);
    }
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(_) => {
            // Valid JSON that is not an object, or not JSON at all.
            return Err(match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => InvalidRequest::NotObject,
                Err(_) => InvalidRequest::NotJson,
            });
        }
        None => return Err(InvalidRequest::NotJson),
    }
    let parsed: BalanceBody<'_> = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data if e.to_string().starts_with("duplicate field") => {
            // serde stops at the second key: a body that is not JSON past it is not JSON.
            match serde_json::from_slice::<IgnoredAny>(body) {
                Ok(_) => InvalidRequest::DuplicateField,
                Err(_) => InvalidRequest::NotJson,
            }
        }
        serde_json::error::Category::Data => InvalidRequest::NotObject,
        _ => InvalidRequest::NotJson,
    })?;
    let code = match parsed.customer_sync_code {
        SyncCodeField::Missing => return Err(InvalidRequest::MissingSyncCode),
        SyncCodeField::NotString => return Err(InvalidRequest::SyncCodeNotString),
        SyncCodeField::Text(text) => text,
    };
    validate_sync_code(&code)?;
    Ok(SyncCode::new(code))
}

#[derive(Deserialize)]
struct BalanceBody<'a> {
    #[serde(borrow, default)]
    customer_sync_code: SyncCodeField<'a>,
}

/// The field as found: a string (borrowed when it has no escapes), something else, or absent.
#[derive(Default)]
enum SyncCodeField<'a> {
    #[default]
    Missing,
    NotString,
    Text(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for SyncCodeField<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;

        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = SyncCodeField<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(SyncCodeField::Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(SyncCodeField::Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(SyncCodeField::Text(Cow::Owned(v)))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(SyncCodeField::NotString)
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(SyncCodeField::NotString)
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(SyncCodeField::NotString)
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(SyncCodeField::NotString)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(SyncCodeField::NotString)
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(SyncCodeField::NotString)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(SyncCodeField::NotString)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(SyncCodeField::NotString)
            }
        }

        deserializer.deserialize_any(FieldVisitor)
    }
}

/// The caller's `Cache-Control` request directives (RFC 9111 §5.2.1) that the gateway honours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheDirectives {
    /// `no-cache`: do not answer from cache; fetch fresh and store it.
    pub no_cache: bool,
    /// `no-store`: fetch fresh and do not store.
    pub no_store: bool,
    /// `max-age=N`: answer from cache only if the entry is at most this old.
    pub max_age: Option<Duration>,
}

/// RFC 9111 §1.2.2: delta-seconds too large to represent are taken as 2^31.
const MAX_DELTA_SECONDS: u64 = 2_147_483_648;

impl CacheDirectives {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut out = CacheDirectives::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for directive in text.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                if name.eq_ignore_ascii_case("no-cache") {
                    out.no_cache = true;
                } else if name.eq_ignore_ascii_case("no-store") {
                    out.no_store = true;
                } else if name.eq_ignore_ascii_case("max-age") {
                    // An unreadable max-age is taken as 0: fetch fresh rather than guess.
                    let secs = arg.and_then(delta_seconds).unwrap_or(0);
                    let age = Duration::from_secs(secs);
                    out.max_age = Some(out.max_age.map_or(age, |m| m.min(age)));
                }
            }
        }
        out
    }

    /// Whether an entry of this age may answer the request (`max-age=0` never does).
    pub fn accepts(&self, age: Duration) -> bool {
        !self.no_cache
            && !self.no_store
            && self.max_age.is_none_or(|max| !max.is_zero() && age <= max)
    }
}

fn delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        text.parse::<u64>()
            .unwrap_or(MAX_DELTA_SECONDS)
            .min(MAX_DELTA_SECONDS),
    )
}

/// A validated balance request, as the cache and upstream see it.
#[derive(Clone)]
pub struct BalanceQuery {
    pub customer_sync_code: SyncCode,
    pub directives: CacheDirectives,
    /// The caller's deadline, `server.request_timeout` from when the request came in (no
    /// Bill24 retry starts that could not end before it; the deadline layer answers 504 at it).
    pub deadline: Instant,
    /// The request's id, trace and log notes.
    pub state: RequestState,
}

/// Turns an HTTP request into a [`BalanceQuery`]: 415, 413 and 400 in that order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParseLayer {
    max_body_bytes: usize,
}

impl ParseLayer {
    pub(crate) fn new(max_body_bytes: usize) -> Self {
        ParseLayer { max_body_bytes }
    }
}

impl<S> Layer<S> for ParseLayer {
    type Service = Parse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Parse {
            inner,
            max_body_bytes: self.max_body_bytes,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Parse<S> {
    inner: S,
    max_body_bytes: usize,
}

impl<S, B> Service<Request<B>> for Parse<S>
where
    S: Service<BalanceQuery, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner service is driven with `oneshot`, which waits for its readiness.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let limit = self.max_body_bytes;
        if !is_json_content_type(req.headers()) {
            return refuse(GatewayError::UnsupportedMediaType);
        }
        if declared_too_large(req.body(), limit) {
            return refuse(GatewayError::PayloadTooLarge { limit });
        }
        let directives = CacheDirectives::from_headers(req.headers());
        let state = RequestState::of(&mut req);
        let deadline = state.deadline();
        let inner = self.inner.clone();
        Box::pin(async move {
            let bytes = match read_body(req.into_body(), limit).await {
                Ok(bytes) => bytes,
                Err(BodyError::TooLarge) => {
                    return Ok(GatewayError::PayloadTooLarge { limit }.into_response());
                }
                Err(BodyError::Unreadable) => {
                    return Ok(InvalidRequest::Unreadable.into_response());
                }
            };
            let customer_sync_code = match parse_body(&bytes) {
                Ok(code) => code,
                Err(e) => return Ok(e.into_response()),
            };
            state.customer_sync_code(&customer_sync_code);
            inner
                .oneshot(BalanceQuery {
                    customer_sync_code,
                    directives,
                    deadline,
                    state,
                })
                .await
        })
    }
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    TooLarge,
    Unreadable,
}

/// Reads a whole body of at most `limit` bytes. A body that arrives in one frame (the usual
/// case) is returned as is, without a copy, as soon as that frame is in.
pub(crate) async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.as_mut().frame().await {
        let frame = frame.map_err(|_| BodyError::Unreadable)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut buf = BytesMut::with_capacity(total);
                buf.extend_from_slice(head);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
            (_, Some(buf)) => buf.extend_from_slice(&data),
        }
        // With a Content-Length, the body knows when its last byte has come: stop there
        // rather than wait for the end-of-stream signal.
        if body.is_end_stream() {
            break;
        }
    }
    Ok(joined.map(BytesMut::freeze).or(first).unwrap_or_default())
}

/// This layer's future for a refused request (its futures are boxed).
fn refuse(
    error: GatewayError,
) -> Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>> {
    Box::pin(reject(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[tokio::test]
    async fn bodies_are_read_whole_or_refused_past_the_limit() {
        use http_body_util::{Full, StreamBody};
        let one = read_body(Full::new(Bytes::from_static(b"{\"a\":1}")), 16).await;
        assert_eq!(one.ok().as_deref(), Some(&b"{\"a\":1}"[..]));
        let frames = |parts: Vec<&'static [u8]>| {
            StreamBody::new(futures_util::stream::iter(parts.into_iter().map(|p| {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(p)))
            })))
        };
        let many = read_body(frames(vec![b"ab", b"cd", b"ef"]), 6).await;
        assert_eq!(many.ok().as_deref(), Some(&b"abcdef"[..]));
        let over = read_body(frames(vec![b"ab", b"cd", b"efg"]), 6).await;
        assert_eq!(over, Err(BodyError::TooLarge));
        let empty = read_body(frames(vec![]), 6).await;
        assert_eq!(empty.ok().as_deref(), Some(&b""[..]));
    }

    /// A body that says it has ended once its one frame is taken, and never signals the end
    /// otherwise.
    struct EndsWithoutEof(Option<Bytes>);

    impl http_body::Body for EndsWithoutEof {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            match self.0.take() {
                Some(data) => Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
                None => Poll::Pending,
            }
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_none()
        }
    }

    #[tokio::test]
    async fn a_body_is_done_when_it_says_so() {
        let body = EndsWithoutEof(Some(Bytes::from_static(b"{}")));
        let read = tokio::time::timeout(Duration::from_secs(5), read_body(body, 16)).await;
        assert_eq!(read.ok().and_then(Result::ok).as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn the_plain_shape_is_read_without_json_and_agrees_with_it() {
        for body in [
            &br#"{"customer_sync_code":"M005T"}"#[..],
            br#"{"customer_sync_code":""}"#,
            br#"{"customer_sync_code":"a\"b"}"#,
            br#"{"customer_sync_code":"a\u0000"}"#,
            b"{\"customer_sync_code\":\"a\x01\"}",
            b"{\"customer_sync_code\":\"\xff\"}",
            "{\"customer_sync_code\":\"a\u{7f}\u{85}\"}".as_bytes(),
            br#"{"customer_sync_code":"x"}}"#,
            br#"{"customer_sync_code":"x","y":1}"#,
        ] {
            assert_eq!(
                parse_body(body),
                parse_body_json(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            plain_body(br#"{"customer_sync_code":"M005T"}"#),
            Some("M005T")
        );
        assert_eq!(plain_body(br#"{"customer_sync_code":"a\"b"}"#), None);
    }

    #[test]
    fn valid_bodies() {
        assert_eq!(
            &*parse_body(br#"{"customer_sync_code":"M005T"}"#).expect("ok"),
            "M005T"
        );
        assert_eq!(
            &*parse_body(br#" {"other": [1, {"x": null}], "customer_sync_code": "a\"b"} "#)
                .expect("ok"),
            "a\"b"
        );
        let fifty = "ក".repeat(50);
        let body = format!(r#"{{"customer_sync_code":"{fifty}"}}"#);
        assert_eq!(&*parse_body(body.as_bytes()).expect("50 chars"), fifty);
        assert_eq!(
            &*parse_body(br#"{"customer_sync_code":"\u00e9t\u00e9"}"#).expect("escapes"),
            "été"
        );
    }

    #[test]
    fn invalid_bodies() {
        use InvalidRequest::*;
        use InvalidSyncCode::*;
        let cases: &[(&[u8], InvalidRequest)] = &[
            (b"", NotJson),
            (b"   ", NotJson),
            (b"{", NotJson),
            (b"not json", NotJson),
            (br#"{"customer_sync_code":"a"} trailing"#, NotJson),
            (br#"{"customer_sync_code":"\ud800"}"#, NotJson),
            (b"[\"M005T\"]", NotObject),
            (b"\"M005T\"", NotObject),
            (b"42", NotObject),
            (b"null", NotObject),
            (b"{}", MissingSyncCode),
            (br#"{"customer_sync_code":null}"#, SyncCodeNotString),
            (br#"{"customer_sync_code":5}"#, SyncCodeNotString),
            (br#"{"customer_sync_code":["a"]}"#, SyncCodeNotString),
            (br#"{"customer_sync_code":{"a":1}}"#, SyncCodeNotString),
            (br#"{"customer_sync_code":true}"#, SyncCodeNotString),
            (br#"{"customer_sync_code":""}"#, SyncCode(Empty)),
            (
                br#"{"customer_sync_code":"a\u0000b"}"#,
                SyncCode(ControlChar),
            ),
            (br#"{"customer_sync_code":"a\nb"}"#, SyncCode(ControlChar)),
            (
                br#"{"customer_sync_code":"a\u007fb"}"#,
                SyncCode(ControlChar),
            ),
            (
                br#"{"customer_sync_code":"a\u0085b"}"#,
                SyncCode(ControlChar),
            ),
            (
                br#"{"customer_sync_code":"a","customer_sync_code":"b"}"#,
                DuplicateField,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                parse_body(body).as_ref().map(|s| &**s),
                Err(expected),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(r#"{{"customer_sync_code":"{}"}}"#, "x".repeat(51));
        assert_eq!(parse_body(long.as_bytes()), Err(SyncCode(TooLong)));
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(
            parse_body(deep.as_bytes()).is_err(),
            "deep nesting is refused, not a crash"
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn content_types() {
        assert!(
            is_json_content_type(&HeaderMap::new()),
            "absent reads as JSON"
        );
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/vnd.bill24+json",
            "application/problem+json; q=1",
        ] {
            assert!(
                is_json_content_type(&headers(&[("content-type", ok)])),
                "{ok}"
            );
        }
        for bad in [
            "",
            "text/plain",
            "application/xml",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/+json",
            "application/jsonx",
            "json",
            "text/json",
        ] {
            assert!(
                !is_json_content_type(&headers(&[("content-type", bad)])),
                "{bad}"
            );
        }
        assert!(!is_json_content_type(&headers(&[
            ("content-type", "application/json"),
            ("content-type", "text/plain")
        ])));
    }

    #[test]
    fn cache_control_directives() {
        let d = |v: &'static str| CacheDirectives::from_headers(&headers(&[("cache-control", v)]));
        assert_eq!(
            d("no-cache"),
            CacheDirectives {
                no_cache: true,
                ..Default::default()
            }
        );
        assert_eq!(
            d("No-Store"),
            CacheDirectives {
                no_store: true,
                ..Default::default()
            }
        );
        assert_eq!(d("max-age=5").max_age, Some(Duration::from_secs(5)));
        assert_eq!(d("max-age=\"7\"").max_age, Some(Duration::from_secs(7)));
        assert_eq!(
            d("max-age=0, no-cache"),
            CacheDirectives {
                no_cache: true,
                no_store: false,
                max_age: Some(Duration::ZERO)
            }
        );
        assert_eq!(
            d("max-age=abc").max_age,
            Some(Duration::ZERO),
            "unreadable = 0"
        );
        assert_eq!(d("max-age=-1").max_age, Some(Duration::ZERO));
        assert_eq!(
            d("max-age=99999999999999999999999").max_age,
            Some(Duration::from_secs(MAX_DELTA_SECONDS))
        );
        assert_eq!(
            d("max-age=10, max-age=3").max_age,
            Some(Duration::from_secs(3))
        );
        assert_eq!(d("private, only-if-cached"), CacheDirectives::default());

        let max5 = d("max-age=5");
        assert!(max5.accepts(Duration::from_secs(5)));
        assert!(
            !max5.accepts(Duration::from_millis(5_001)),
            "sub-second exact"
        );
        assert!(!d("max-age=0").accepts(Duration::from_nanos(1)));
        assert!(
            !d("max-age=0").accepts(Duration::ZERO),
            "max-age=0 always fetches"
        );
        assert!(!d("no-cache").accepts(Duration::ZERO));
        assert!(!d("no-store").accepts(Duration::ZERO));
        assert!(CacheDirectives::default().accepts(Duration::from_secs(3600)));
    }
}
