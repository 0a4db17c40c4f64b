//! The in-house endpoint's request handling (CONTRACT §3): routing, caller keys, Content-Type,
//! size and body validation, their order, X-Request-Id, and the protocols served.

mod common;

use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let json = reply.json();
    assert_eq!(json["code"], code, "{json}");
    assert!(
        json["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{json}"
    );
    let id = reply
        .header("x-request-id")
        .expect("X-Request-Id on errors");
    assert_eq!(
        json["request_id"], id,
        "the body carries the response's request id"
    );
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "errors are JSON"
    );
}

/// A known caller gets Bill24's body byte for byte, with X-Cache and X-Request-Id.
#[tokio::test]
async fn known_caller_gets_bill24_body_byte_for_byte() {
    let app = spawn_app().await;
    app.sim.set_wallets(
        "M005T",
        vec![
            bill24_sim::Wallet {
                id: "w1".into(),
                name: "Kouern Deav's Wallet(KHR)".into(),
                balance: serde_json::Number::from(123_456_789_012_345_678i64),
                currency: "KHR".into(),
            },
            bill24_sim::Wallet {
                id: "w2".into(),
                name: "Kouern Deav's Wallet(USD)".into(),
                balance: serde_json::Number::from_f64(12.5).expect("finite"),
                currency: "USD".into(),
            },
        ],
    );
    let reply = app.balance("M005T").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.x_cache(), "MISS");
    let text = std::str::from_utf8(&reply.body).expect("utf-8");
    assert!(
        text.starts_with(
            r#"{"code":"000","message":"Success","message_kh":"ជោគជ័យ","data":[{"id":"w1""#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#""balance":123456789012345678"#),
        "no float round-trip: {text}"
    );
    assert!(text.contains(r#""balance":12.5"#), "{text}");
    assert!(reply.header("x-request-id").is_some());
    assert!(reply.header("age").is_none(), "no Age on a MISS");
}

/// Another path is 404, whatever the method and key.
#[tokio::test]
async fn other_paths_are_404() {
    let app = spawn_app().await;
    for (method, path) in [
        (Method::POST, "/"),
        (Method::POST, "/instant_payment/get_wallet_balance/"),
        (Method::POST, "/instant_payment/get_wallet_balanc"),
        (Method::GET, "/metrics"),
        (Method::POST, "/INSTANT_PAYMENT/GET_WALLET_BALANCE"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(app.url(path))
            .body(Full::default())
            .expect("request");
        let reply = app.request(req).await;
        assert_error(&reply, StatusCode::NOT_FOUND, "not_found");
    }
    assert_eq!(app.sim.balance_calls(), 0);
}

/// Another method on the endpoint is 405 with `Allow: POST`.
#[tokio::test]
async fn other_methods_are_405_with_allow() {
    let app = spawn_app().await;
    for method in [
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        let req = Request::builder()
            .method(method.clone())
            .uri(app.url(PATH))
            .header("authorization", format!("Bearer {ORDERS_KEY}"))
            .body(Full::default())
            .expect("request");
        let reply = app.request(req).await;
        assert_error(&reply, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        assert_eq!(reply.header("allow"), Some("POST"), "{method}");
    }
}

/// No key, an unknown key, or another scheme: 401 with `WWW-Authenticate: Bearer`.
#[tokio::test]
async fn missing_or_unknown_keys_are_401() {
    let app = spawn_app().await;
    let body = body_for("M005T");
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("authorization", "Bearer not-a-caller".into())],
        vec![("authorization", format!("Basic {ORDERS_KEY}"))],
        vec![("authorization", "Bearer".into())],
        vec![("authorization", format!("Bearer {ORDERS_KEY}x"))],
        vec![("authorization", ORDERS_KEY.into())],
    ];
    for headers in cases {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(app.url(PATH))
            .header("content-type", "application/json");
        for (n, v) in &headers {
            req = req.header(*n, v.as_str());
        }
        let reply = app
            .request(
                req.body(Full::new(Bytes::from(body.clone())))
                    .expect("request"),
            )
            .await;
        assert_error(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    // Scheme case does not matter; both configured callers work.
    let reply = app
        .post(
            None,
            body.clone(),
            &[("authorization", &format!("bearer {BILLING_KEY}"))],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        app.sim.balance_calls(),
        1,
        "only the authenticated request reached Bill24"
    );
}

/// Anything but JSON is 415; no Content-Type at all reads as JSON.
#[tokio::test]
async fn content_type_must_be_json() {
    let app = spawn_app().await;
    let body = body_for("M005T");
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "text/json",
    ] {
        let reply = app
            .post(Some(ORDERS_KEY), body.clone(), &[("content-type", ct)])
            .await;
        assert_error(
            &reply,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        );
    }
    for ct in [
        "application/json; charset=utf-8",
        "application/vnd.bill24+json",
        "APPLICATION/JSON",
    ] {
        let reply = app
            .post(Some(ORDERS_KEY), body.clone(), &[("content-type", ct)])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{ct}");
    }
    let req = Request::builder()
        .method(Method::POST)
        .uri(app.url(PATH))
        .header("authorization", format!("Bearer {ORDERS_KEY}"))
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    assert_eq!(
        app.request(req).await.status,
        StatusCode::OK,
        "no Content-Type reads as JSON"
    );
}

/// Bodies over `server.max_body_bytes` are 413, with or without a Content-Length.
#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = spawn_app_with(|c| c.server.max_body_bytes = 100).await;
    let big = format!(
        r#"{{"customer_sync_code":"M005T","pad":"{}"}}"#,
        "x".repeat(200)
    );
    let reply = app.post(Some(ORDERS_KEY), big.clone(), &[]).await;
    assert_error(&reply, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // Chunked, no Content-Length: the limit still holds while reading.
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ORDERS_KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    for chunk in big.as_bytes().chunks(50) {
        let framed = format!(
            "{:x}\r\n{}\r\n",
            chunk.len(),
            String::from_utf8_lossy(chunk)
        );
        if stream.write_all(framed.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let (text, _) = read_response(&mut stream).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    // A Content-Length over the limit is refused before any of the body is sent.
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ORDERS_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let started = Instant::now();
    let (text, _) = read_response(&mut stream).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once"
    );

    // Exactly at the limit is fine.
    let exact = format!(
        r#"{{"customer_sync_code":"M005T","p":"{}"}}"#,
        "x".repeat(100 - 37)
    );
    assert_eq!(exact.len(), 100);
    assert_eq!(
        app.post(Some(ORDERS_KEY), exact, &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(app.sim.balance_calls(), 1);
}

/// Every way a body can be wrong is 400 with a code that says which, and never reaches Bill24.
#[tokio::test]
async fn invalid_bodies_are_400() {
    let app = spawn_app().await;
    let long = format!(r#"{{"customer_sync_code":"{}"}}"#, "a".repeat(51));
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "invalid_json"),
        ("not json".into(), "invalid_json"),
        (r#"{"customer_sync_code":"M005T""#.into(), "invalid_json"),
        (r#"["M005T"]"#.into(), "invalid_body"),
        (r#""M005T""#.into(), "invalid_body"),
        ("{}".into(), "missing_customer_sync_code"),
        (
            r#"{"customer_sync_code":123}"#.into(),
            "invalid_customer_sync_code",
        ),
        (
            r#"{"customer_sync_code":null}"#.into(),
            "invalid_customer_sync_code",
        ),
        (
            r#"{"customer_sync_code":""}"#.into(),
            "invalid_customer_sync_code",
        ),
        (long, "invalid_customer_sync_code"),
        (
            r#"{"customer_sync_code":"a\u0000b"}"#.into(),
            "invalid_customer_sync_code",
        ),
        (
            r#"{"customer_sync_code":"a\tb"}"#.into(),
            "invalid_customer_sync_code",
        ),
        (
            r#"{"customer_sync_code":"a\u009fb"}"#.into(),
            "invalid_customer_sync_code",
        ),
        (
            r#"{"customer_sync_code":"a","customer_sync_code":"b"}"#.into(),
            "invalid_body",
        ),
    ];
    for (body, code) in cases {
        let reply = app.post(Some(ORDERS_KEY), body.clone(), &[]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body:?}");
        assert_eq!(reply.error_code(), code, "{body:?}");
    }
    let bytes = app
        .post(
            Some(ORDERS_KEY),
            Bytes::from_static(b"{\"customer_sync_code\":\"\xff\"}"),
            &[],
        )
        .await;
    assert_eq!(bytes.status, StatusCode::BAD_REQUEST, "invalid UTF-8");
    assert_eq!(app.sim.balance_calls(), 0);

    // 50 characters (Unicode scalar values, not bytes) is the most allowed.
    let fifty = "ស".repeat(50);
    assert_eq!(app.balance(&fifty).await.status, StatusCode::OK);
}

/// Other fields are ignored and not forwarded; Bill24 sees only the code.
#[tokio::test]
async fn only_customer_sync_code_is_forwarded() {
    let app = spawn_app().await;
    let reply = app
        .post(
            Some(ORDERS_KEY),
            r#"{"extra":{"nested":[1,2]},"customer_sync_code":"M005T","token":"x"}"#,
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let last = app.sim.last_balance_request().expect("Bill24 was called");
    assert_eq!(&last.body[..], br#"{"customer_sync_code":"M005T"}"#);
}

/// Checks run in order: route, key, Content-Type, size, body.
#[tokio::test]
async fn checks_run_in_contract_order() {
    let app = spawn_app_with(|c| c.server.max_body_bytes = 64).await;
    let huge_garbage = "x".repeat(1000);

    // Wrong path beats a missing key.
    let req = Request::builder()
        .method(Method::GET)
        .uri(app.url("/nope"))
        .body(Full::default())
        .expect("request");
    assert_eq!(app.request(req).await.status, StatusCode::NOT_FOUND);
    // Wrong method beats a missing key.
    let req = Request::builder()
        .method(Method::GET)
        .uri(app.url(PATH))
        .body(Full::default())
        .expect("request");
    assert_eq!(
        app.request(req).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // A missing key beats a bad Content-Type and a huge body.
    let reply = app
        .post(
            None,
            huge_garbage.clone(),
            &[("content-type", "text/plain")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // A bad Content-Type beats a huge body.
    let reply = app
        .post(
            Some(ORDERS_KEY),
            huge_garbage.clone(),
            &[("content-type", "text/plain")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Size beats a malformed body.
    let reply = app.post(Some(ORDERS_KEY), huge_garbage, &[]).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    // And the body last.
    let reply = app.post(Some(ORDERS_KEY), "garbage", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

/// X-Request-Id: a valid one is echoed (errors included) and forwarded; an invalid one is
/// replaced; none gets one generated.
#[tokio::test]
async fn request_id_is_echoed_replaced_or_generated_and_forwarded() {
    let app = spawn_app().await;
    let id = "req-123_ABC.xyz~!";
    let reply = app.balance_with("M005T", &[("x-request-id", id)]).await;
    assert_eq!(reply.header("x-request-id"), Some(id));
    let last = app.sim.last_balance_request().expect("called");
    assert_eq!(last.header("x-request-id"), Some(id), "forwarded to Bill24");

    let reply = app
        .post(None, body_for("M005T"), &[("x-request-id", "err-1")])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.header("x-request-id"), Some("err-1"));
    assert_eq!(reply.json()["request_id"], "err-1");

    let too_long = "a".repeat(129);
    for bad in [too_long.as_str(), "has space", "tab\there"] {
        let reply = app.balance_with("M005T", &[("x-request-id", bad)]).await;
        let got = reply.header("x-request-id").expect("present");
        assert_ne!(got, bad);
        assert!((1..=128).contains(&got.len()) && got.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
    let max = "b".repeat(128);
    let reply = app.balance_with("M005T", &[("x-request-id", &max)]).await;
    assert_eq!(reply.header("x-request-id"), Some(max.as_str()));

    let a = app.balance("M005T").await;
    let b = app.balance("M005T").await;
    let (a, b) = (a.header("x-request-id"), b.header("x-request-id"));
    assert!(
        a.is_some() && b.is_some() && a != b,
        "generated ids are unique"
    );
}

/// The same request works over HTTP/2 cleartext with prior knowledge.
#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let app = spawn_app().await;
    let h2 = h2_client();
    let req = Request::builder()
        .method(Method::POST)
        .uri(app.url(PATH))
        .header("authorization", format!("Bearer {ORDERS_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body_for("M005T"))))
        .expect("request");
    let reply = send(&h2, req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.x_cache(), "MISS");
    let req = Request::builder()
        .method(Method::POST)
        .uri(app.url(PATH))
        .header("authorization", format!("Bearer {ORDERS_KEY}"))
        .body(Full::new(Bytes::from(body_for("M005T"))))
        .expect("request");
    let reply = send(&h2, req).await;
    assert_eq!(reply.x_cache(), "HIT");
}

/// HTTP/1.1 keep-alive: several requests on one connection.
#[tokio::test]
async fn http1_keep_alive_serves_several_requests_per_connection() {
    let app = spawn_app().await;
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let body = body_for("M005T");
    for i in 0..3 {
        let req = format!(
            "POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ORDERS_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.expect("write");
        let (text, _) = read_response(&mut stream).await;
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text}");
    }
}

/// Malformed HTTP gets a 400 or a closed connection, and the gateway keeps serving.
#[tokio::test]
async fn malformed_http_is_refused_and_the_gateway_keeps_serving() {
    let app = spawn_app().await;
    for garbage in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"POST /instant_payment/get_wallet_balance HTTP/9.9\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        stream.write_all(garbage).await.expect("write");
        let (text, end) = read_response(&mut stream).await;
        refused(&text, end, &String::from_utf8_lossy(garbage));
    }
    // An oversized header block.
    let mut stream = TcpStream::connect(app.addr).await.expect("connect");
    let huge = format!(
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "y".repeat(100_000)
    );
    let _ = stream.write_all(huge.as_bytes()).await;
    let (text, end) = read_response(&mut stream).await;
    refused(&text, end, "an oversized header block");

    assert_eq!(app.balance("M005T").await.status, StatusCode::OK);
}

/// How reading a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A whole response (head and Content-Length body) arrived.
    Complete,
    /// The gateway closed the connection.
    Closed,
    /// Nothing more came for 5 s: the connection hangs.
    Quiet,
}

/// A refusal of malformed input: a 4xx answer, or the connection closed; never a connection
/// left hanging.
fn refused(text: &str, end: End, what: &str) {
    assert_ne!(end, End::Quiet, "{what}: the connection hangs ({text:?})");
    if text.is_empty() {
        assert_eq!(end, End::Closed, "{what}");
    } else {
        assert!(text.starts_with("HTTP/1.1 4"), "{what} -> {text}");
    }
}

/// Reads one response (head and Content-Length body), or whatever arrives before the
/// connection closes or goes quiet, and how it ended.
async fn read_response(stream: &mut TcpStream) -> (String, End) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break End::Closed,
            Err(_) => break End::Quiet,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&buf);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + length {
                break End::Complete;
            }
        }
    };
    (String::from_utf8_lossy(&buf).into_owned(), end)
}
