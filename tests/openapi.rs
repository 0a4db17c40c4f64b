//! The OpenAPI documents agree with the gateway: real responses, for every documented status,
//! carry the documented headers, media type and fields. (That every error the code can produce
//! is documented, and nothing else, is checked against the error enums inside the crate:
//! src/openapi_docs.rs.) Schema conformance at scale is schemathesis' job
//! (tests/contract/run.sh, in CI).

mod common;
#[path = "common/openapi_doc.rs"]
mod openapi_doc;

use std::collections::BTreeSet;
use std::time::Duration;

use bill24_sim::Fault;
use common::*;
use http::{Method, Request};
use http_body_util::Full;
use openapi_doc::{admin_doc, documented, endpoint_doc, error_codes, resolve};
use serde_json::Value;

struct Case {
    name: &'static str,
    status: u16,
    reply: Reply,
}

/// Every documented status of the endpoint, produced for real, with the documented headers,
/// media type and fields.
#[tokio::test]
async fn real_responses_match_the_endpoint_document() {
    let doc = endpoint_doc();
    let operation = &doc["paths"]["/instant_payment/get_wallet_balance"]["post"];
    let codes = error_codes(&doc);
    let mut cases = Vec::new();

    let app = spawn_app_with(|c| {
        c.server.max_body_bytes = 64;
        c.upstream.retries = 0;
        c.upstream.circuit_failures = 2;
        c.upstream.timeout = Duration::from_millis(200);
        c.callers[1].rate_limit_rps = 0.5;
        c.callers[1].burst = 1;
    })
    .await;
    let mut push = |name, status: u16, reply: Reply| {
        cases.push(Case {
            name,
            status,
            reply,
        })
    };
    push("miss", 200, app.balance("DOC1").await);
    push("hit", 200, app.balance("DOC1").await);
    push("not found", 200, app.balance("UNKNOWN-DOC").await);
    push("bad body", 400, app.post(Some(ORDERS_KEY), "{", &[]).await);
    push("no key", 401, app.post(None, body_for("DOC1"), &[]).await);
    let req = Request::get(app.url("/elsewhere"))
        .body(Full::default())
        .expect("request");
    push("other path", 404, app.request(req).await);
    let req = Request::get(app.url(PATH))
        .body(Full::default())
        .expect("request");
    push("other method", 405, app.request(req).await);
    push(
        "too large",
        413,
        app.post(Some(ORDERS_KEY), "x".repeat(100), &[]).await,
    );
    push(
        "not json",
        415,
        app.post(
            Some(ORDERS_KEY),
            body_for("DOC1"),
            &[("content-type", "text/plain")],
        )
        .await,
    );
    app.post(Some(BILLING_KEY), body_for("DOC1"), &[]).await;
    push(
        "rate limited",
        429,
        app.post(Some(BILLING_KEY), body_for("DOC1"), &[]).await,
    );
    app.sim.fail_next(1, Fault::Status(409));
    push("Bill24 4xx", 409, app.balance("DOC2").await);
    app.sim.set_balance_fault(Some(Fault::Hang));
    push("Bill24 slow", 504, app.balance("DOC3").await);
    app.sim.set_balance_fault(Some(Fault::Status(500)));
    push("Bill24 5xx", 502, app.balance("DOC4").await);
    push("circuit open", 503, app.balance("DOC5").await);

    let mut statuses = BTreeSet::new();
    for case in &cases {
        let Case {
            name,
            status,
            reply,
        } = case;
        assert_eq!(reply.status.as_u16(), *status, "{name}: {:?}", reply.body);
        statuses.insert(
            if (400..500).contains(status)
                && documented(&doc, operation, *status)
                    .is_some_and(|r| r["content"].get("*/*").is_some())
            {
                "4XX".to_string()
            } else {
                status.to_string()
            },
        );
        let response = documented(&doc, operation, *status)
            .unwrap_or_else(|| panic!("{name}: {status} undocumented"));
        for (header, spec) in response["headers"].as_object().into_iter().flatten() {
            let spec = resolve(&doc, spec);
            if spec["required"].as_bool() == Some(true) {
                assert!(reply.header(header).is_some(), "{name}: {header} missing");
            }
            if let Some(allowed) = spec["schema"]["enum"].as_array()
                && let Some(value) = reply.header(header)
            {
                assert!(
                    allowed.iter().any(|a| a == value),
                    "{name}: {header}: {value}"
                );
            }
        }
        if response["content"].get("application/json").is_some() {
            let media = reply.header("content-type").unwrap_or_default();
            assert!(media.starts_with("application/json"), "{name}: {media}");
            let body = reply.json();
            let schema = resolve(&doc, &response["content"]["application/json"]["schema"]);
            for required in schema["required"].as_array().into_iter().flatten() {
                let field = required.as_str().unwrap_or_default();
                assert!(
                    body.get(field).is_some(),
                    "{name}: {field} missing in {body}"
                );
            }
            if schema["additionalProperties"] == Value::Bool(false) {
                let documented: BTreeSet<&str> = schema["properties"]
                    .as_object()
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                for key in body
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.as_str())
                {
                    assert!(documented.contains(key), "{name}: undocumented field {key}");
                }
                let code = body["code"].as_str().unwrap_or_default();
                assert!(codes.contains(code), "{name}: undocumented code {code}");
            }
        }
    }
    // The cached answer's extra header.
    assert!(cases[1].reply.header("age").is_some(), "Age on a HIT");
    // The success body's documented fields, wallets included.
    let body = cases[0].reply.json();
    for field in ["code", "message", "message_kh", "data"] {
        assert!(body.get(field).is_some(), "{field}");
    }
    let wallet_fields = doc["components"]["schemas"]["Wallet"]["properties"]
        .as_object()
        .expect("wallet fields");
    for wallet in body["data"].as_array().expect("wallets") {
        for field in wallet_fields.keys() {
            assert!(wallet.get(field).is_some(), "wallet field {field}");
        }
    }
    assert!(cases[2].reply.json()["data"].is_null());

    let documented_statuses: BTreeSet<String> = operation["responses"]
        .as_object()
        .expect("responses")
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        statuses, documented_statuses,
        "every documented status is produced"
    );
}

/// The admin document, likewise; and the admin listener serves both documents.
#[tokio::test]
async fn real_responses_match_the_admin_document() {
    let doc = admin_doc();
    let app = spawn_app_with(|c| {
        c.server.admin_key_sha256 = Some(bill24_gateway::hash_key(b"admin-key"));
    })
    .await;
    let bearer = [("authorization", "Bearer admin-key")];
    /// (documented path, method, URL, status, headers)
    type AdminCase<'a> = (&'a str, Method, &'a str, u16, &'a [(&'a str, &'a str)]);
    let cases: Vec<AdminCase> = vec![
        ("/healthz", Method::GET, "/healthz", 200, &[]),
        ("/healthz", Method::POST, "/healthz", 405, &[]),
        ("/readyz", Method::GET, "/readyz", 200, &[]),
        ("/metrics", Method::GET, "/metrics", 200, &[]),
        ("/fleet", Method::GET, "/fleet", 200, &[]),
        ("/fleet", Method::POST, "/fleet", 405, &[]),
        ("/openapi.yaml", Method::GET, "/openapi.yaml", 200, &[]),
        (
            "/openapi-admin.yaml",
            Method::GET,
            "/openapi-admin.yaml",
            200,
            &[],
        ),
        ("/cache", Method::DELETE, "/cache", 204, &bearer),
        ("/cache", Method::DELETE, "/cache", 401, &[]),
        ("/cache", Method::GET, "/cache", 405, &[]),
        (
            "/cache/{customer_sync_code}",
            Method::DELETE,
            "/cache/A%20B",
            204,
            &bearer,
        ),
        (
            "/cache/{customer_sync_code}",
            Method::DELETE,
            "/cache/%00",
            400,
            &bearer,
        ),
        (
            "/cache/{customer_sync_code}",
            Method::DELETE,
            "/cache/x",
            401,
            &[],
        ),
    ];
    for (path, method, url, status, headers) in cases {
        let reply = app.admin(method.clone(), url, headers).await;
        assert_eq!(reply.status.as_u16(), status, "{method} {url}");
        let operation = &doc["paths"][path][method.as_str().to_lowercase()];
        let operation = if operation.is_null() {
            // A method the path does not have: its documented 405 lives on the real one.
            doc["paths"][path]
                .as_object()
                .and_then(|ops| ops.values().next())
                .expect("an operation")
        } else {
            operation
        };
        let response = documented(&doc, operation, status)
            .unwrap_or_else(|| panic!("{method} {url}: {status} undocumented"));
        for (header, spec) in response["headers"].as_object().into_iter().flatten() {
            if resolve(&doc, spec)["required"].as_bool() == Some(true) {
                assert!(
                    reply.header(header).is_some(),
                    "{method} {url}: {header} missing"
                );
            }
        }
        if let Some(media) = response["content"]
            .as_object()
            .and_then(|c| c.keys().next())
        {
            let got = reply.header("content-type").unwrap_or_default();
            assert!(
                got.starts_with(media.as_str()),
                "{method} {url}: {got} vs {media}"
            );
        }
    }
    // The view of the fleet has the documented fields, and only those.
    let fleet = app.admin(Method::GET, "/fleet", &[]).await.json();
    for (value, schema) in [(&fleet, "Fleet"), (&fleet["replicas"][0], "Replica")] {
        let schema = &doc["components"]["schemas"][schema];
        let fields: BTreeSet<&str> = value
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let documented: BTreeSet<&str> = schema["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert!(required.is_subset(&fields), "{value}: {required:?}");
        assert!(fields.is_subset(&documented), "{value}: {documented:?}");
    }
    let served = app.admin(Method::GET, "/openapi.yaml", &[]).await;
    assert_eq!(&served.body[..], include_str!("../openapi.yaml").as_bytes());
}
