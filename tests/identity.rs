//! Callers without shared secrets (CONTRACT §12), through the built binary: TLS on the main
//! listener (HTTP/1.1 and h2 by ALPN), client certificates whose URI SAN is a caller's
//! `spiffe_id`, and JWTs verified against a JWKS file or URL. Certificates and keys are made
//! by the test (rcgen, ring, and `openssl genpkey` for RSA); the JWKS URL is served by the
//! test itself.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::process::*;
use common::tls::{Leaf, Pki, Usage};
use common::*;
use http_body_util::{BodyExt, Full};
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "bill24-gateway";
const ORDERS_SUB: &str = "system:serviceaccount:orders:orders";
const ORDERS_SPIFFE: &str = "spiffe://cluster.local/ns/orders/sa/orders";

// ---------------------------------------------------------------------------------------------
// Signing keys and tokens
// ---------------------------------------------------------------------------------------------

enum Signer {
    Es256(signature::EcdsaKeyPair),
    Rs256(signature::RsaKeyPair),
}

struct SigningKey {
    kid: String,
    signer: Signer,
}

impl SigningKey {
    fn es256(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("ec key");
        let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("ec");
        SigningKey {
            kid: kid.into(),
            signer: Signer::Es256(pair),
        }
    }

    /// An RSA key made by `openssl genpkey` (ring cannot generate RSA keys).
    fn rs256(kid: &str) -> Self {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl genpkey");
        let der = match PrivateKeyDer::from_pem_slice(&out.stdout).expect("pem key") {
            PrivateKeyDer::Pkcs8(der) => der,
            _ => panic!("PKCS#8 expected"),
        };
        let pair = signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("rsa");
        SigningKey {
            kid: kid.into(),
            signer: Signer::Rs256(pair),
        }
    }

    fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Es256(_) => "ES256",
            Signer::Rs256(_) => "RS256",
        }
    }

    fn jwk(&self) -> serde_json::Value {
        match &self.signer {
            Signer::Es256(pair) => {
                let point = pair.public_key().as_ref();
                serde_json::json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig",
                    "alg": "ES256", "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])})
            }
            Signer::Rs256(pair) => {
                let parts: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
                serde_json::json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                    "n": B64.encode(&parts.n), "e": B64.encode(&parts.e)})
            }
        }
    }

    fn sign(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.signer {
            Signer::Es256(pair) => pair.sign(&rng, input).expect("sign").as_ref().to_vec(),
            Signer::Rs256(pair) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, input, &mut sig)
                    .expect("sign");
                sig
            }
        }
    }

    /// A token with `header` and `claims`, signed by this key.
    fn token_with(&self, header: serde_json::Value, claims: serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig))
    }

    fn header(&self) -> serde_json::Value {
        serde_json::json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid})
    }

    /// A good token for `sub`.
    fn token(&self, sub: &str) -> String {
        self.token_with(self.header(), claims(sub))
    }
}

/// The system's time: the gateway here is another process, on the real clock.
#[allow(clippy::disallowed_methods)]
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64
}

/// The claims of a Kubernetes projected service-account token for `sub`.
fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({"iss": ISSUER, "aud": [AUDIENCE], "sub": sub, "iat": now(),
        "nbf": now(), "exp": now() + 3600,
        "kubernetes.io": {"namespace": "orders", "serviceaccount": {"name": "orders"}}})
}

fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

// ---------------------------------------------------------------------------------------------
// A TLS client
// ---------------------------------------------------------------------------------------------

fn tls_config(ca_pem: &str, client: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("chain"),
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// One TLS connection to the gateway, speaking what ALPN chose.
struct Conn {
    send: Sender,
    alpn: Option<Vec<u8>>,
    peer_cert: Vec<u8>,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    let peer_cert = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let io = hyper_util::rt::TokioIo::new(tls);
    let send = if alpn.as_deref() == Some(b"h2") {
        let (send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("h2 connection: {e:?}");
            }
        });
        Sender::H2(send)
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("h1 connection: {e:?}");
            }
        });
        Sender::H1(send)
    };
    Ok(Conn {
        send,
        alpn,
        peer_cert,
    })
}

impl Conn {
    async fn balance(&mut self, bearer: Option<&str>, code: &str) -> Result<Reply, String> {
        let mut req = http::Request::post(format!("https://localhost{PATH}"))
            .header("content-type", "application/json");
        if let Some(token) = bearer {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let mut req = req.body(Full::from(body_for(code))).expect("request");
        let res = match &mut self.send {
            Sender::H1(send) => {
                req.headers_mut()
                    .insert("host", http::HeaderValue::from_static("localhost"));
                // Ready once the connection has finished the previous exchange.
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(req).await
            }
            Sender::H2(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(req).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = res.status();
        let headers = res.headers().clone();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// One request on a new connection.
async fn once(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, bearer: Option<&str>) -> Reply {
    let mut conn = connect(addr, config.clone()).await.expect("connects");
    conn.balance(bearer, "CUST001").await.expect("answer")
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

struct Setup {
    pki: Pki,
    _sim: bill24_sim::Simulator,
    gateway: Running,
    /// Holds the config file, `gw.toml`.
    dir: tempfile::TempDir,
    main: SocketAddr,
}

/// The gateway over TLS (a certificate for localhost from `pki`), with the client CA when
/// `mtls`, `[jwt]` as `jwt` (TOML lines) and the usual key callers plus `orders-jwt` and
/// `orders-mesh`.
async fn start(pki: Pki, mtls: bool, jwt: &str, extra_callers: &str) -> Setup {
    let server = pki.leaf(&["localhost", "127.0.0.1"], Usage::Server, false);
    let cert = pki.write("server.pem", &server.cert);
    let key = pki.write("server.key", &server.key);
    let ca = if mtls {
        format!("tls_client_ca_file = \"{}\"\n", pki.path("ca.pem"))
    } else {
        String::new()
    };
    let tls = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{ca}",
        cert.display(),
        key.display()
    );
    let (sim, gateway, dir) = gateway_with_sim(
        |sim| {
            format!(
                "{}\n{jwt}\n\
                 [[callers]]\nname = \"orders-jwt\"\njwt_subject = \"{ORDERS_SUB}\"\n\
                 [[callers]]\nname = \"orders-mesh\"\nspiffe_id = \"{ORDERS_SPIFFE}\"\n\
                 {extra_callers}",
                gateway_toml(sim, &tls)
            )
        },
        &[],
    )
    .await;
    let (main, _) = gateway.addresses().await;
    Setup {
        pki,
        _sim: sim,
        gateway,
        dir,
        main,
    }
}

/// The access-log line of the request whose id is `id`.
async fn access_line(gateway: &Running, reply: &Reply) -> serde_json::Value {
    let id = reply
        .header("x-request-id")
        .expect("request id")
        .to_string();
    let line = gateway.wait_for_line(&id).await;
    serde_json::from_str(&line).expect("json line")
}

/// `reply` is a 200 for `caller`, identified by `auth` as its access line says.
async fn assert_served(gateway: &Running, reply: &Reply, caller: &str, auth: &str) {
    assert_eq!(reply.status, 200, "{caller}: {:?}", reply.body);
    let line = access_line(gateway, reply).await;
    assert_eq!(line["caller"], caller, "{line}");
    assert_eq!(line["auth"], auth, "{line}");
}

/// `reply` is a 401 `unauthorized` for no caller, and its access line's `auth_error` says
/// `why`.
async fn assert_refused(gateway: &Running, reply: &Reply, why: &str) {
    assert_eq!(reply.status, 401, "{why}: {:?}", reply.body);
    assert_eq!(reply.error_code(), "unauthorized", "{why}");
    let line = access_line(gateway, reply).await;
    assert_eq!(line["caller"], serde_json::Value::Null, "{line}");
    assert!(
        line["auth_error"].as_str().is_some_and(|e| e.contains(why)),
        "{why}: {line}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_speaks_tls_with_h2_and_http1_by_alpn_and_keys_still_work() {
    let s = start(Pki::new("listener CA"), false, "", "").await;
    for (alpn, expected) in [
        (vec![&b"h2"[..], b"http/1.1"], Some(&b"h2"[..])),
        (vec![&b"http/1.1"[..]], Some(&b"http/1.1"[..])),
        (vec![], None),
    ] {
        let config = tls_config(&s.pki.ca_pem, None, &alpn);
        let mut conn = connect(s.main, config).await.expect("TLS handshake");
        assert_eq!(conn.alpn.as_deref(), expected);
        for _ in 0..2 {
            let reply = conn
                .balance(Some(ORDERS_KEY), "CUST001")
                .await
                .expect("answer");
            assert_served(&s.gateway, &reply, "orders", "key").await;
        }
        let reply = conn
            .balance(Some("wrong"), "CUST001")
            .await
            .expect("answer");
        assert_refused(&s.gateway, &reply, "key: matches no caller").await;
    }
    // Plain HTTP to the TLS port is no way around it.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.main)
        .await
        .expect("connect");
    let request = format!(
        "POST {PATH} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ORDERS_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        body_for("CUST001").len(),
        body_for("CUST001")
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP answered on the TLS listener: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_identify_spiffe_callers_and_nothing_else_does() {
    let s = start(Pki::new("mesh CA"), true, "", "").await;
    let good = s.pki.client_with_uri(ORDERS_SPIFFE);
    let reply = once(
        s.main,
        &tls_config(&s.pki.ca_pem, Some(&good), &[b"h2"]),
        None,
    )
    .await;
    assert_served(&s.gateway, &reply, "orders-mesh", "mtls").await;

    // Over HTTP/1.1 too, several requests on one connection.
    let mut conn = connect(
        s.main,
        tls_config(&s.pki.ca_pem, Some(&good), &[b"http/1.1"]),
    )
    .await
    .expect("connects");
    for _ in 0..3 {
        assert_eq!(
            conn.balance(None, "CUST001").await.expect("answer").status,
            200
        );
    }

    // The same SPIFFE ID from another CA: 401, and the line says why.
    let rogue_ca = Pki::new("rogue CA");
    let rogue = rogue_ca.client_with_uri(ORDERS_SPIFFE);
    let reply = once(s.main, &tls_config(&s.pki.ca_pem, Some(&rogue), &[]), None).await;
    assert_refused(&s.gateway, &reply, "not issued by").await;

    // Two URI SANs, one of them the caller's: a certificate is one workload, or none.
    let both = s
        .pki
        .client_with_uris(&["spiffe://cluster.local/ns/other/sa/other", ORDERS_SPIFFE]);
    let reply = once(s.main, &tls_config(&s.pki.ca_pem, Some(&both), &[]), None).await;
    assert_refused(&s.gateway, &reply, "exactly one URI SAN").await;

    // A good certificate for a workload that is no caller.
    let other = s
        .pki
        .client_with_uri("spiffe://cluster.local/ns/other/sa/other");
    let reply = once(s.main, &tls_config(&s.pki.ca_pem, Some(&other), &[]), None).await;
    assert_refused(&s.gateway, &reply, "no caller's spiffe_id").await;

    // A certificate with DNS names only.
    let dns = s.pki.leaf(&["orders.local"], Usage::Client, false);
    let reply = once(s.main, &tls_config(&s.pki.ca_pem, Some(&dns), &[]), None).await;
    assert_eq!(reply.status, 401);

    // No certificate and no key.
    let reply = once(s.main, &tls_config(&s.pki.ca_pem, None, &[]), None).await;
    assert_eq!(reply.status, 401, "no certificate, no key");

    // Keys still work without a certificate; a wrong key does not fall back to the
    // certificate.
    let no_cert = tls_config(&s.pki.ca_pem, None, &[]);
    assert_eq!(once(s.main, &no_cert, Some(ORDERS_KEY)).await.status, 200);
    let with_cert = tls_config(&s.pki.ca_pem, Some(&good), &[]);
    assert_eq!(
        once(s.main, &with_cert, Some("wrong-key")).await.status,
        401
    );
}

fn jwt_section(jwks_file: &str) -> String {
    format!(
        "[jwt]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_file = \"{jwks_file}\"\n"
    )
}

/// [`start`] with `[jwt]` on the JWKS `jwks_text`, in the file `jwks.json` next to the
/// certificates.
async fn start_with_jwks(ca: &str, mtls: bool, jwks_text: &str, extra_callers: &str) -> Setup {
    let pki = Pki::new(ca);
    let jwks_path = pki.write("jwks.json", jwks_text);
    let jwt = jwt_section(&jwks_path.display().to_string());
    start(pki, mtls, &jwt, extra_callers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_identify_callers_and_every_bad_shape_is_refused_saying_which_check() {
    let es = SigningKey::es256("es-1");
    let rs = SigningKey::rs256("rs-1");
    // Keys the JWKS says are not for verifying signatures: `use: enc`, and `key_ops` without
    // `verify`; and one whose `key_ops` does allow it.
    let enc = SigningKey::es256("enc-1");
    let sign_only = SigningKey::es256("ops-1");
    let verify_ops = SigningKey::es256("ops-2");
    let mut enc_jwk = enc.jwk();
    enc_jwk["use"] = "enc".into();
    let with_ops = |key: &SigningKey, ops: &[&str]| {
        let mut jwk = key.jwk();
        let fields = jwk.as_object_mut().expect("object");
        fields.remove("use");
        fields.insert("key_ops".into(), serde_json::json!(ops));
        jwk
    };
    let set = serde_json::json!({"keys": [es.jwk(), rs.jwk(), enc_jwk,
        with_ops(&sign_only, &["sign"]), with_ops(&verify_ops, &["verify"])]});
    let s = start_with_jwks("listener CA", false, &set.to_string(), "").await;
    let config = tls_config(&s.pki.ca_pem, None, &[b"h2"]);

    for key in [&es, &rs, &verify_ops] {
        let token = key.token(ORDERS_SUB);
        let reply = once(s.main, &config, Some(&token)).await;
        assert_served(&s.gateway, &reply, "orders-jwt", "jwt").await;
    }

    let good = es.token(ORDERS_SUB);
    let parts: Vec<&str> = good.split('.').collect();
    let mut tampered_claims = claims(ORDERS_SUB);
    tampered_claims["sub"] = "system:serviceaccount:billing:billing".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(tampered_claims.to_string()),
        parts[2]
    );
    let none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(claims(ORDERS_SUB).to_string())
    );
    // HS256 "signed" with the public key as the secret (the classic key-confusion attack).
    let hs256 = {
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "es-1"});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims(ORDERS_SUB).to_string())
        );
        let mac_key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, es.jwk().to_string().as_bytes());
        let tag = ring::hmac::sign(&mac_key, input.as_bytes());
        format!("{input}.{}", B64.encode(tag.as_ref()))
    };
    let stranger = SigningKey::es256("es-unknown");
    let mut wrong_iss = claims(ORDERS_SUB);
    wrong_iss["iss"] = "https://evil.example".into();
    let mut wrong_aud = claims(ORDERS_SUB);
    wrong_aud["aud"] = serde_json::json!(["another-service"]);
    let mut expired = claims(ORDERS_SUB);
    expired["exp"] = (now() - 120).into();
    let mut not_yet = claims(ORDERS_SUB);
    not_yet["nbf"] = (now() + 600).into();
    let mut no_exp = claims(ORDERS_SUB);
    no_exp.as_object_mut().expect("object").remove("exp");
    let mut within_leeway = claims(ORDERS_SUB);
    within_leeway["exp"] = (now() - 10).into();
    // The leeway (30 s) still accepts a token 10 s past its exp.
    let reply = once(
        s.main,
        &config,
        Some(&es.token_with(es.header(), within_leeway)),
    )
    .await;
    assert_eq!(reply.status, 200, "within the leeway");

    let bad: Vec<(&str, String, &str)> = vec![
        ("alg none", none, "alg none"),
        ("HS256", hs256, "HMAC"),
        ("tampered payload", tampered, "bad signature"),
        ("unknown kid", stranger.token(ORDERS_SUB), "unknown kid"),
        (
            "unmapped sub",
            es.token("system:serviceaccount:other:other"),
            "subject matches no caller",
        ),
        (
            "wrong iss",
            es.token_with(es.header(), wrong_iss),
            "wrong issuer",
        ),
        (
            "wrong aud",
            es.token_with(es.header(), wrong_aud),
            "wrong audience",
        ),
        ("expired", es.token_with(es.header(), expired), "expired"),
        ("nbf", es.token_with(es.header(), not_yet), "not yet valid"),
        (
            "no exp",
            es.token_with(es.header(), no_exp),
            "missing claim",
        ),
        (
            "ES256 header on the RSA key",
            rs.token_with(
                serde_json::json!({"alg": "ES256", "kid": "rs-1"}),
                claims(ORDERS_SUB),
            ),
            "key does not fit",
        ),
        ("garbage", "a.b.c".to_string(), "malformed"),
        (
            "a key for encryption (use: enc)",
            enc.token(ORDERS_SUB),
            "key not for verifying signatures",
        ),
        (
            "a key whose key_ops lack verify",
            sign_only.token(ORDERS_SUB),
            "key not for verifying signatures",
        ),
        (
            "a crit header",
            es.token_with(
                serde_json::json!({"alg": "ES256", "kid": "es-1", "crit": ["exp"], "exp": 1}),
                claims(ORDERS_SUB),
            ),
            "crit",
        ),
    ];
    for (what, token, why) in &bad {
        let reply = once(s.main, &config, Some(token)).await;
        assert!(
            !String::from_utf8_lossy(&reply.body).contains(token.as_str()),
            "{what}"
        );
        assert_refused(&s.gateway, &reply, why).await;
    }
    // No token, good or bad, ever reaches the log.
    let output = s.gateway.output().join("\n");
    for (what, token, _) in &bad {
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(
            signature.len() < 8 || !output.contains(signature),
            "{what}: the token is in the log"
        );
        assert!(!output.contains(token.as_str()), "{what}");
    }
    assert!(!output.contains(&good));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_callers_get_the_same_limits_as_key_callers() {
    let es = SigningKey::es256("es-1");
    let limited = "[[callers]]\nname = \"limited\"\njwt_subject = \"system:serviceaccount:x:limited\"\n\
                   rate_limit_rps = 1\nburst = 2\n";
    let s = start_with_jwks("listener CA", false, &jwks(&[&es]), limited).await;
    let config = tls_config(&s.pki.ca_pem, None, &[]);
    let token = es.token("system:serviceaccount:x:limited");
    let mut conn = connect(s.main, config).await.expect("connects");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            conn.balance(Some(&token), "CUST001")
                .await
                .expect("answer")
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    let metrics = get(admin_of(&s.gateway).await, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_eq!(
        metric_value(
            &text,
            r#"gateway_requests_total{caller="limited",status="429",cache="-"}"#
        ),
        2.0
    );
}

async fn admin_of(gateway: &Running) -> SocketAddr {
    gateway.addresses().await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_and_jwks_serve_new_connections_while_open_ones_stay() {
    let old_key = SigningKey::es256("old");
    let new_key = SigningKey::es256("new");
    let s = start_with_jwks("rotation CA", true, &jwks(&[&old_key]), "").await;
    let jwks_path = s.pki.path("jwks.json");
    let config = tls_config(&s.pki.ca_pem, None, &[b"h2"]);
    let mut open = connect(s.main, config.clone()).await.expect("connects");
    let first_cert = open.peer_cert.clone();
    assert_eq!(
        open.balance(Some(&old_key.token(ORDERS_SUB)), "CUST001")
            .await
            .expect("answer")
            .status,
        200
    );

    // A broken pair (a key that is not the certificate's) is refused; the old one stays.
    let other = s.pki.leaf(&["localhost"], Usage::Server, false);
    s.pki.write("server.key", &other.key);
    s.gateway
        .wait_for_line("listener certificate files refused")
        .await;
    // (A new client config each time: a resumed session would show the old certificate.)
    let fresh_config = || tls_config(&s.pki.ca_pem, None, &[b"h2"]);
    let again = connect(s.main, fresh_config()).await.expect("still served");
    assert_eq!(again.peer_cert, first_cert, "the old certificate stays");

    // A good new pair: new connections get it, the open one goes on.
    s.pki.write("server.pem", &other.cert);
    s.gateway.wait_for_line("listener certificate loaded").await;
    let fresh = connect(s.main, fresh_config()).await.expect("connects");
    assert_ne!(
        fresh.peer_cert, first_cert,
        "new connections see the new certificate"
    );
    assert_eq!(
        open.balance(Some(ORDERS_KEY), "CUST001")
            .await
            .expect("the open connection stays")
            .status,
        200
    );

    // JWKS rotation: the new key's tokens work, the removed key's (remembered) no longer.
    let old_token = old_key.token(ORDERS_SUB);
    std::fs::write(&jwks_path, "{ not json").expect("write");
    s.gateway.wait_for_line("JWKS refused").await;
    assert_eq!(
        open.balance(Some(&old_token), "CUST001")
            .await
            .expect("answer")
            .status,
        200,
        "a broken JWKS keeps the old keys"
    );
    std::fs::write(&jwks_path, jwks(&[&new_key])).expect("write");
    s.gateway.wait_for_line("\"keys\":1").await;
    assert_eq!(
        open.balance(Some(&new_key.token(ORDERS_SUB)), "CUST001")
            .await
            .expect("answer")
            .status,
        200
    );
    assert_eq!(
        open.balance(Some(&old_token), "CUST001")
            .await
            .expect("answer")
            .status,
        401,
        "a key gone from the JWKS verifies nothing, even a token it verified before"
    );

    // SIGHUP re-reads at once.
    let newest = s.pki.leaf(&["localhost"], Usage::Server, false);
    s.pki.write("server.key", &newest.key);
    s.pki.write("server.pem", &newest.cert);
    s.gateway.signal("HUP");
    s.gateway.wait_for_line("config reloaded").await;
    let after = connect(s.main, fresh_config()).await.expect("connects");
    assert_ne!(after.peer_cert, fresh.peer_cert);

    // New file names on SIGHUP: in use by the time the reload is logged, not a poll later.
    let renamed = s.pki.leaf(&["localhost"], Usage::Server, false);
    s.pki.write("renamed.pem", &renamed.cert);
    s.pki.write("renamed.key", &renamed.key);
    let config_path = s.dir.path().join("gw.toml");
    let config = std::fs::read_to_string(&config_path).expect("config");
    let config = config
        .replace("server.pem", "renamed.pem")
        .replace("server.key", "renamed.key");
    std::fs::write(&config_path, config).expect("write config");
    s.gateway.signal("HUP");
    s.gateway
        .wait_for_line(r#"[\"server.tls_cert_file\"]"#)
        .await;
    let renamed_conn = connect(s.main, fresh_config()).await.expect("connects");
    let expected = CertificateDer::from_pem_slice(renamed.cert.as_bytes()).expect("pem");
    assert!(
        renamed_conn.peer_cert == expected.as_ref(),
        "new connections present the certificate of the new file names at once"
    );
}

/// A JWKS served over HTTP by the test, counting its fetches.
async fn jwks_server(body: Arc<std::sync::Mutex<String>>, fetches: Arc<AtomicUsize>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            let fetches = fetches.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let text = body.lock().map(|b| b.clone()).unwrap_or_default();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::<Bytes>::from(
                            text,
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_at_start_and_again_for_an_unknown_kid_at_most_every_30s() {
    let first = SigningKey::es256("first");
    let second = SigningKey::es256("second");
    let third = SigningKey::es256("third");
    let body = Arc::new(std::sync::Mutex::new(jwks(&[&first])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let addr = jwks_server(body.clone(), fetches.clone()).await;
    let s = start(
        Pki::new("listener CA"),
        false,
        &format!("[jwt]\nissuer = \"{ISSUER}\"\njwks_url = \"http://{addr}/openid/v1/jwks\"\n"),
        "",
    )
    .await;
    s.gateway.wait_for_line("JWKS loaded").await;
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched at start");
    let config = tls_config(&s.pki.ca_pem, None, &[]);
    let mut conn = connect(s.main, config).await.expect("connects");
    for _ in 0..3 {
        let token = first.token(ORDERS_SUB);
        assert_eq!(
            conn.balance(Some(&token), "CUST001")
                .await
                .expect("ok")
                .status,
            200
        );
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "known keys: no fetch");

    // A new key appears at the issuer: the first token with its kid fetches again.
    *body.lock().expect("body") = jwks(&[&first, &second, &third]);
    // Not yet 30 s since the start fetch: an unknown kid is refused without a fetch.
    let reply = conn
        .balance(Some(&second.token(ORDERS_SUB)), "CUST001")
        .await
        .expect("answer");
    assert_refused(&s.gateway, &reply, "unknown kid").await;
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "at most one fetch per 30 s"
    );

    // 30 s after the last fetch, an unknown kid fetches once, and the keys it brought verify
    // without another fetch.
    tokio::time::sleep(Duration::from_secs(31)).await;
    let reply = conn
        .balance(Some(&second.token(ORDERS_SUB)), "CUST001")
        .await
        .expect("answer");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    let reply = conn
        .balance(Some(&third.token(ORDERS_SUB)), "CUST001")
        .await
        .expect("answer");
    assert_eq!(reply.status, 200);
    let unknown = SigningKey::es256("fourth");
    let reply = conn
        .balance(Some(&unknown.token(ORDERS_SUB)), "CUST001")
        .await
        .expect("answer");
    assert_eq!(reply.status, 401);
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "again within 30 s: no fetch"
    );
}

/// A Bearer value over 8 KiB is refused unread with a 401 that says so, over HTTP/1.1 and h2,
/// as long as the request head fits the 16 KiB header limit; a head beyond that limit is
/// 431, as for any header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_bearer_token_is_401_within_the_header_limit_and_431_beyond() {
    let es = SigningKey::es256("es-1");
    let s = start_with_jwks("listener CA", false, &jwks(&[&es]), "").await;
    // JWT-shaped, with a claim that makes it 12 KiB, and signed: only its size is wrong.
    let mut big = claims(ORDERS_SUB);
    big["padding"] = "x".repeat(9 * 1024).into();
    let oversized = es.token_with(es.header(), big);
    assert!((12 * 1024..14 * 1024).contains(&oversized.len()));
    let too_large_for_the_head = format!("{}.{}.sig", "a".repeat(10 * 1024), "b".repeat(8 * 1024));
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let config = tls_config(&s.pki.ca_pem, None, &[alpn]);
        let mut conn = connect(s.main, config).await.expect("connects");
        let reply = conn
            .balance(Some(&oversized), "CUST001")
            .await
            .expect("answer");
        assert_refused(&s.gateway, &reply, "Bearer value over 8192 bytes").await;
        // The connection goes on.
        let reply = conn
            .balance(Some(&es.token(ORDERS_SUB)), "CUST001")
            .await
            .expect("answer");
        assert_served(&s.gateway, &reply, "orders-jwt", "jwt").await;

        let mut conn = connect(s.main, tls_config(&s.pki.ca_pem, None, &[alpn]))
            .await
            .expect("connects");
        let reply = conn
            .balance(Some(&too_large_for_the_head), "CUST001")
            .await
            .expect("answer");
        assert_eq!(reply.status, 431, "{alpn:?}");
    }
}

/// A TLS 1.3 ClientHello naming `host` in its SNI extension, byte by byte (rustls as a client
/// sends only valid names).
fn client_hello(host: &[u8]) -> Vec<u8> {
    fn vec16(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }
    fn ext(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut v = kind.to_be_bytes().to_vec();
        v.extend(vec16(body));
        v
    }
    let mut name = vec![0u8];
    name.extend(vec16(host));
    let mut share = vec![0x00, 0x1d];
    share.extend(vec16(&[7u8; 32]));
    let extensions = [
        ext(0x0000, &vec16(&name)),                     // server_name
        ext(0x002b, &[2, 0x03, 0x04]),                  // supported_versions: TLS 1.3
        ext(0x000a, &vec16(&[0x00, 0x1d])),             // supported_groups: x25519
        ext(0x000d, &vec16(&[0x04, 0x03, 0x08, 0x04])), // signature_algorithms
        ext(0x0033, &vec16(&share)),                    // key_share
    ]
    .concat();
    let mut hello = vec![0x03, 0x03];
    hello.extend([1u8; 32]); // random
    hello.push(0); // no session id
    hello.extend(vec16(&[0x13, 0x01])); // TLS_AES_128_GCM_SHA256
    hello.extend([1, 0]); // no compression
    hello.extend(vec16(&extensions));
    let mut handshake = vec![1u8]; // ClientHello
    handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(vec16(&handshake));
    record
}

/// Handshakes that fail on purpose (an illegal SNI name, plain HTTP on the TLS port) cannot
/// flood the log: rustls's own warnings are not logged, and the gateway logs one line per
/// reason (then at most one a minute, counting the failures it stands for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_log_one_line_per_reason_not_one_per_attempt() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(Pki::new("listener CA"), false, "", "").await;
    let attempt = |bytes: Vec<u8>| async move {
        let mut tcp = tokio::net::TcpStream::connect(s.main)
            .await
            .expect("connect");
        tcp.write_all(&bytes).await.expect("write");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    };
    for _ in 0..20 {
        attempt(client_hello(b"not a host name!")).await;
        attempt(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()).await;
    }
    let line = s.gateway.wait_for_line("illegal SNI").await;
    let line: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(line["message"], "TLS handshake failed", "{line}");
    assert_eq!(line["failures"], 1, "{line}");
    s.gateway.wait_for_line("not TLS").await;
    // The listener still serves.
    let config = tls_config(&s.pki.ca_pem, None, &[]);
    let reply = once(s.main, &config, Some(ORDERS_KEY)).await;
    assert_served(&s.gateway, &reply, "orders", "key").await;
    let output = s.gateway.output();
    let failed: Vec<&String> = output
        .iter()
        .filter(|l| l.contains("TLS handshake failed"))
        .collect();
    assert_eq!(failed.len(), 2, "one line per reason: {failed:#?}");
    let from_rustls: Vec<&String> = output
        .iter()
        .filter(|l| l.contains(r#""log.target":"rustls"#) || l.contains("Illegal SNI"))
        .collect();
    assert!(
        from_rustls.is_empty(),
        "rustls's own lines: {from_rustls:#?}"
    );
    assert!(!output.iter().any(|l| l.contains("not a host name")));
}
