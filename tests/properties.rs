//! Property tests: the parsers that read caller and Bill24 input never panic, and accept
//! exactly what they should; through the real server, arbitrary bodies and Content-Types get
//! 200, 400, 413 or 415 — nothing else.

mod common;

use std::sync::OnceLock;

use bill24::wire::{balance_code, parse_authorize, parse_expire_time};
use bill24_gateway::internals::{
    CacheDirectives, TraceContext, is_json_content_type, parse_body, parse_body_json,
};
use common::*;
use http::{HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;

/// A valid `customer_sync_code`: 1–50 characters, none a control character.
fn sync_code() -> impl Strategy<Value = String> {
    prop::collection::vec(
        any::<char>().prop_filter("no Cc", |c| !c.is_control()),
        1..=50,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// Text that looks like a JSON object, often with `customer_sync_code` (once or more).
const NEAR_JSON: &str = r#"\{(("customer_sync_code"|"[a-z_]{0,20}"):( ?("[^"]{0,60}"|[0-9.eE+-]{1,20}|null|true|\[|\{|\}|\]),?){0,3}){0,3}\}?"#;

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".*".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What a body means, read by a reference written here rather than the gateway's parser.
/// serde_json decides the grammar, and JSON text is UTF-8 (RFC 8259 §8.1). Of the top-level
/// object, the `customer_sync_code` members are read in full (a value serde_json cannot read,
/// such as a number beyond f64 or an unpaired surrogate escape, makes the body unreadable);
/// other members are only checked against the grammar, since the gateway ignores them: such a
/// value there does not make an otherwise valid body invalid.
#[derive(Debug)]
enum Reading {
    NotJson,
    NotObject,
    /// The values of the top-level `customer_sync_code` members, in order.
    Object(Vec<serde_json::Value>),
}

fn read_as_reference(bytes: &[u8]) -> Reading {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};

    struct Codes;

    impl<'de> Visitor<'de> for Codes {
        type Value = Vec<serde_json::Value>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut codes = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                if key == "customer_sync_code" {
                    codes.push(map.next_value::<serde_json::Value>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(codes)
        }
    }

    if std::str::from_utf8(bytes).is_err() || serde_json::from_slice::<IgnoredAny>(bytes).is_err() {
        return Reading::NotJson;
    }
    if bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        != Some(&b'{')
    {
        return Reading::NotObject;
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match de
        .deserialize_map(Codes)
        .and_then(|codes| de.end().map(|()| codes))
    {
        Ok(codes) => Reading::Object(codes),
        Err(_) => Reading::NotJson,
    }
}

/// What the gateway must answer for a body, by the rules of CONTRACT §3 and README's error
/// table: the code, or the refusal's message.
fn expected_answer(bytes: &[u8]) -> Result<String, String> {
    let codes = match read_as_reference(bytes) {
        Reading::NotJson => return Err("request body is not valid JSON".into()),
        Reading::NotObject => return Err("request body must be a JSON object".into()),
        Reading::Object(codes) => codes,
    };
    let code = match codes.as_slice() {
        [] => return Err("customer_sync_code is missing".into()),
        [serde_json::Value::String(code)] => code,
        [_] => return Err("customer_sync_code must be a string".into()),
        _ => return Err("request body has customer_sync_code more than once".into()),
    };
    if code.is_empty() {
        Err("customer_sync_code must not be empty".into())
    } else if code.chars().any(|c| c.is_control()) {
        Err("customer_sync_code must not contain control characters".into())
    } else if code.chars().count() > 50 {
        Err("customer_sync_code is longer than 50 characters".into())
    } else {
        Ok(code.clone())
    }
}

/// The gateway's parser against the reference.
fn agrees_with_the_reference(bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed = parse_body(bytes)
        .map(|code| code.to_string())
        .map_err(|e| e.to_string());
    prop_assert_eq!(
        parsed,
        expected_answer(bytes),
        "{:?}",
        String::from_utf8_lossy(bytes)
    );
    Ok(())
}

/// The bodies where the reference's rules matter most, each checked by name.
#[test]
fn the_reference_cases() {
    let cases: &[(&[u8], Result<&str, &str>)] = &[
        // Other members are checked against JSON's grammar only: a number beyond f64 or an
        // unpaired surrogate escape there is still JSON.
        (br#"{"x":1e999,"customer_sync_code":"A"}"#, Ok("A")),
        (br#"{"x":"\ud800","customer_sync_code":"A"}"#, Ok("A")),
        // The code itself is read in full.
        (
            br#"{"customer_sync_code":1e999}"#,
            Err("request body is not valid JSON"),
        ),
        (
            br#"{"customer_sync_code":"\ud800"}"#,
            Err("request body is not valid JSON"),
        ),
        // JSON text is UTF-8, in members the gateway ignores too.
        (
            b"{\"x\":\"\xff\",\"customer_sync_code\":\"A\"}",
            Err("request body is not valid JSON"),
        ),
        // A repeated code is refused, but only in a body that is JSON.
        (
            br#"{"customer_sync_code":"A","customer_sync_code":"A"}"#,
            Err("request body has customer_sync_code more than once"),
        ),
        (
            br#"{"customer_sync_code":"A","customer_sync_code":"#,
            Err("request body is not valid JSON"),
        ),
        (
            br#"{"customer_sync_code":"A","customer_sync_code":"A"} x"#,
            Err("request body is not valid JSON"),
        ),
        // Only the top level counts.
        (
            br#"{"x":{"customer_sync_code":1,"customer_sync_code":2},"customer_sync_code":"A"}"#,
            Ok("A"),
        ),
        (br#"{"customer\u005fsync_code":"A"}"#, Ok("A")),
    ];
    for (body, answer) in cases {
        let expected = answer.map(str::to_string).map_err(str::to_string);
        assert_eq!(
            expected_answer(body),
            expected,
            "{}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(
            parse_body(body)
                .map(|code| code.to_string())
                .map_err(|e| e.to_string()),
            expected,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Arbitrary bytes: never a panic, and the answer agrees with serde_json's reading of
    /// the same bytes (a code exactly when they are an object with a valid one; a refusal
    /// that names what is wrong otherwise).
    #[test]
    fn request_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        agrees_with_the_reference(&bytes)?;
    }

    /// The no-JSON-parser path for the plain body shape answers exactly as serde_json does.
    #[test]
    fn plain_bodies_agree_with_the_json_parser(
        text in prop::collection::vec(any::<u8>(), 0..80),
        code in ".{0,60}",
    ) {
        let mut raw = br#"{"customer_sync_code":""#.to_vec();
        raw.extend_from_slice(&text);
        raw.extend_from_slice(br#""}"#);
        prop_assert_eq!(parse_body(&raw), parse_body_json(&raw));
        agrees_with_the_reference(&raw)?;
        let shaped = format!(r#"{{"customer_sync_code":"{code}"}}"#);
        prop_assert_eq!(parse_body(shaped.as_bytes()), parse_body_json(shaped.as_bytes()));
        agrees_with_the_reference(shaped.as_bytes())?;
    }

    /// The same with whitespace, JSON's and others, around and inside each token.
    #[test]
    fn spaced_plain_bodies_agree_with_the_json_parser(
        gaps in prop::collection::vec(prop::sample::select(vec![
            "", " ", "  ", "\t", "\n", "\r\n", "\u{c}", "\u{b}", "\u{a0}", "x",
        ]), 6),
        code in ".{0,60}",
    ) {
        let body = format!(
            r#"{}{{{}"customer_sync_code"{}:{}"{code}"{}}}{}"#,
            gaps[0], gaps[1], gaps[2], gaps[3], gaps[4], gaps[5]
        );
        prop_assert_eq!(parse_body(body.as_bytes()), parse_body_json(body.as_bytes()));
        agrees_with_the_reference(body.as_bytes())?;
    }

    /// Text that looks like JSON objects, mutated: never a panic, and the same answer as the
    /// reference.
    #[test]
    fn request_parser_never_panics_on_near_json(text in NEAR_JSON) {
        agrees_with_the_reference(text.as_bytes())?;
    }

    /// A valid code inside any object, among any other fields, is read exactly.
    #[test]
    fn valid_codes_are_read_exactly(
        code in sync_code(),
        extra in prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..4),
    ) {
        let mut object: serde_json::Map<String, serde_json::Value> =
            extra.into_iter().filter(|(k, _)| k != "customer_sync_code").collect();
        object.insert("customer_sync_code".into(), code.clone().into());
        let body = serde_json::to_vec(&object).expect("serializes");
        prop_assert_eq!(parse_body(&body).map(|c| c.to_string()), Ok(code));
    }

    /// A code with a control character, or too long, is refused with the right reason.
    #[test]
    fn invalid_codes_are_refused(
        prefix in "[a-z]{0,10}",
        control in prop::char::range('\u{0}', '\u{1f}')
            .prop_union(prop::char::range('\u{7f}', '\u{9f}')),
        long in sync_code().prop_filter("51+", |s| s.chars().count() > 0),
    ) {
        let with_control = format!("{prefix}{control}");
        let body = serde_json::json!({"customer_sync_code": with_control}).to_string();
        prop_assert_eq!(
            parse_body(body.as_bytes()).map_err(|e| e.to_string()),
            Err("customer_sync_code must not contain control characters".to_string())
        );
        let too_long: String = long.chars().cycle().take(51).collect();
        let body = serde_json::json!({"customer_sync_code": too_long}).to_string();
        prop_assert_eq!(
            parse_body(body.as_bytes()).map_err(|e| e.to_string()),
            Err("customer_sync_code is longer than 50 characters".to_string())
        );
    }

    /// Header parsers take any bytes a header value can hold.
    #[test]
    fn header_parsers_never_panic(value in prop::collection::vec(
        any::<u8>().prop_filter("header byte", |b| *b == b'\t' || (0x20..=0x7e).contains(b) || *b >= 0x80),
        0..200,
    )) {
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            let mut headers = HeaderMap::new();
            headers.insert("content-type", v.clone());
            headers.insert("cache-control", v.clone());
            let _ = is_json_content_type(&headers);
            let d = CacheDirectives::from_headers(&headers);
            let _ = d.accepts(std::time::Duration::from_secs(1));
            let _ = TraceContext::parse(v.as_bytes());
        }
    }

    /// Any bytes as an authorize answer: a token or a refusal, never a panic.
    #[test]
    fn token_answer_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_authorize(&bytes);
        let _ = balance_code(&bytes);
    }

    /// Authorize answers of Bill24's shape with odd values: never a panic, and a token is
    /// taken exactly when code is 200 and a token is present.
    #[test]
    fn token_answers_of_bill24s_shape(
        code in json_value(),
        token in prop::option::of(".{0,40}"),
        expire in prop::option::of(json_value()),
    ) {
        let mut data = serde_json::json!({"refreshToken": "r"});
        if let Some(t) = &token { data["token"] = t.clone().into(); }
        if let Some(e) = &expire { data["tokenExpireTime"] = e.clone(); }
        let body = serde_json::json!({"code": code, "message": "", "data": data}).to_string();
        let parsed = parse_authorize(body.as_bytes());
        let code_is_200 = code == serde_json::json!(200) || code == serde_json::json!("200");
        prop_assert_eq!(parsed.is_ok(), code_is_200 && token.as_deref().is_some_and(|t| !t.is_empty()));
    }

    /// `tokenExpireTime` in .NET's shape, any offset and 0–9 fractional digits, reads back to
    /// the same instant.
    #[test]
    fn expire_times_round_trip(
        secs in 0i64..4_102_444_800,
        nanos in 0u32..1_000_000_000,
        digits in 0usize..=9,
        offset_minutes in -840i32..=840,
    ) {
        let t = time::OffsetDateTime::from_unix_timestamp(secs).expect("in range")
            + time::Duration::nanoseconds(nanos as i64);
        let offset = time::UtcOffset::from_whole_seconds(offset_minutes * 60).expect("offset");
        let local = t.to_offset(offset);
        let fraction = format!("{:09}", local.nanosecond());
        let fraction = if digits == 0 { String::new() } else { format!(".{}", &fraction[..digits]) };
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let text = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}{sign}{:02}:{:02}",
            local.year(), u8::from(local.month()), local.day(),
            local.hour(), local.minute(), local.second(),
            offset_minutes.abs() / 60, offset_minutes.abs() % 60,
        );
        let parsed = parse_expire_time(&text).expect("parses");
        let truncated = (nanos / 10u32.pow(9 - digits as u32)) * 10u32.pow(9 - digits as u32);
        prop_assert_eq!(parsed.unix_timestamp(), secs);
        prop_assert_eq!(parsed.nanosecond(), truncated);
    }

    /// Any string as `tokenExpireTime`: a time or None, never a panic.
    #[test]
    fn expire_time_parser_never_panics(text in ".{0,64}") {
        let _ = parse_expire_time(&text);
    }
}

/// One gateway for the through-the-server properties.
fn shared_app() -> &'static (tokio::runtime::Runtime, TestApp) {
    static APP: OnceLock<(tokio::runtime::Runtime, TestApp)> = OnceLock::new();
    APP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let app = rt.block_on(spawn_app_with(|c| {
            c.server.max_body_bytes = 256;
            c.callers[0].rate_limit_rps = 0.0;
        }));
        (rt, app)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Arbitrary bodies through the real server (random bytes, near-JSON, bodies with a valid
    /// code, and those followed by a few bytes): 413 past the limit, else 200 exactly when the reference reads a valid code, else
    /// 400 with the reference's reason.
    #[test]
    fn arbitrary_bodies_get_a_clear_answer(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        NEAR_JSON.prop_map(String::into_bytes),
        sync_code().prop_map(|code| body_for(&code).into_bytes()),
        (sync_code(), prop::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(code, tail)| [body_for(&code).into_bytes(), tail].concat()),
    ]) {
        let (rt, app) = shared_app();
        let reply = rt.block_on(app.post(Some(ORDERS_KEY), bytes.clone(), &[]));
        let shown = String::from_utf8_lossy(&bytes);
        if bytes.len() > 256 {
            prop_assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", shown);
        } else {
            match expected_answer(&bytes) {
                Ok(_) => prop_assert_eq!(reply.status, StatusCode::OK, "{:?}", shown),
                Err(message) => {
                    prop_assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", shown);
                    prop_assert_eq!(&reply.json()["message"], &serde_json::Value::from(message));
                }
            }
        }
        prop_assert!(reply.header("x-request-id").is_some());
    }

    /// Arbitrary Content-Types, and ones near the JSON types: JSON ones are read, the rest
    /// are 415.
    #[test]
    fn arbitrary_content_types_get_a_clear_answer(ct in prop_oneof![
        "[ -~]{0,60}",
        "[ ]{0,2}(application|Application|APPLICATION|applications|text|x)[ ]?/[ ]?(json|JSON|jsonx|xjson|vnd\\.bill24\\+json|\\+json|x y\\+json|problem\\+JSON|json\\+xml)[ ]{0,2}(;[ -~]{0,20})?",
    ]) {
        let (rt, app) = shared_app();
        if HeaderValue::from_str(&ct).is_err() { return Ok(()) }
        let reply = rt.block_on(app.post(Some(ORDERS_KEY), body_for("P1"), &[("content-type", &ct)]));
        let expected = if json_media_type(&ct) { StatusCode::OK } else { StatusCode::UNSUPPORTED_MEDIA_TYPE };
        prop_assert_eq!(reply.status, expected, "{:?}", ct);
    }
}

/// Whether a Content-Type is one CONTRACT §3 reads as JSON, written out plainly: the media
/// type (before any parameters, without surrounding spaces) is `application/json` or
/// `application/<name>+json`, in any case, with a name that has no spaces.
fn json_media_type(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = media.split_once('/') else {
        return false;
    };
    let subtype = subtype.trim().to_ascii_lowercase();
    kind.trim().eq_ignore_ascii_case("application")
        && (subtype == "json"
            || subtype
                .strip_suffix("+json")
                .is_some_and(|name| !name.is_empty() && !name.contains(' ')))
}
