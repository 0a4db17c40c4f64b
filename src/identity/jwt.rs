//! JWT callers (CONTRACT §12): a Bearer token that is a JWT, signed by a key of the configured
//! JWKS (a file, or a URL), with `iss`, `aud`, `exp` and `nbf` checked. Only asymmetric
//! algorithms are accepted: `alg: none` and the HMAC algorithms are refused before any key is
//! looked at, and a JWKS's symmetric (`oct`) keys are never loaded; nor are keys whose `use` or
//! `key_ops` say they are not for verifying signatures. A token whose header has `crit` is
//! refused: no JWS extension is understood here (RFC 7515 §4.1.11).
//!
//! A verified token is remembered by its SHA-256 until it expires, so a caller repeating the
//! same token costs one hash, not a signature check. The memory belongs to one key set: a new
//! JWKS (or a new `[jwt]`) starts with none.
//!
//! The token itself is never logged or kept: only its hash, its subject and its expiry.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::{JwksSource, JwtConfig};
use crate::identity::file;

/// The most verified tokens remembered per key set.
const REMEMBERED_TOKENS: u64 = 10_000;
/// A JWKS URL is fetched again this often.
pub(crate) const JWKS_REFETCH_EVERY: Duration = Duration::from_secs(600);
/// At most one fetch for an unknown `kid` (or after a failed fetch) this often.
pub(crate) const JWKS_UNKNOWN_KID_EVERY: Duration = Duration::from_secs(30);
/// The largest JWKS accepted.
pub(crate) const MAX_JWKS_BYTES: usize = file::MAX_FILE_BYTES;
/// The longest Bearer value looked at (key or token); longer ones are refused unread. A
/// Kubernetes service-account token is 1–2 KiB.
pub(crate) const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token did not identify a caller: the access log's `auth_error`. Never the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JwtFailure {
    Malformed,
    AlgNone,
    Hmac,
    AlgorithmNotAllowed,
    NoKeys,
    UnknownKid,
    KeyNotForSignatures,
    CriticalHeader,
    KeyAlgorithmMismatch,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim,
    UnknownSubject,
}

impl JwtFailure {
    pub(crate) fn label(self) -> &'static str {
        match self {
            JwtFailure::Malformed => "jwt: malformed token",
            JwtFailure::AlgNone => "jwt: alg none refused",
            JwtFailure::Hmac => "jwt: HMAC algorithm refused",
            JwtFailure::AlgorithmNotAllowed => "jwt: algorithm not allowed",
            JwtFailure::NoKeys => "jwt: no signing keys loaded",
            JwtFailure::UnknownKid => "jwt: unknown kid",
            JwtFailure::KeyNotForSignatures => {
                "jwt: key not for verifying signatures (its use or key_ops)"
            }
            JwtFailure::CriticalHeader => "jwt: crit header names extensions not understood",
            JwtFailure::KeyAlgorithmMismatch => "jwt: key does not fit the algorithm",
            JwtFailure::BadSignature => "jwt: bad signature",
            JwtFailure::Expired => "jwt: expired (exp)",
            JwtFailure::NotYetValid => "jwt: not yet valid (nbf)",
            JwtFailure::WrongIssuer => "jwt: wrong issuer (iss)",
            JwtFailure::WrongAudience => "jwt: wrong audience (aud)",
            JwtFailure::MissingClaim => "jwt: missing claim (exp, iss, aud or sub)",
            JwtFailure::UnknownSubject => "jwt: subject matches no caller",
        }
    }
}

/// Whether a Bearer value has the shape of a JWS compact serialization (three base64url
/// parts). A caller key never has dots in it unless someone chose one so.
pub(crate) fn looks_like_jwt(token: &[u8]) -> bool {
    token.len() <= MAX_TOKEN_BYTES
        && token.iter().filter(|b| **b == b'.').count() == 2
        && token
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The algorithms a JWT may be signed with.
fn allowed(alg: &str) -> Result<Algorithm, JwtFailure> {
    match alg {
        "none" | "None" | "NONE" => Err(JwtFailure::AlgNone),
        a if a.starts_with("HS") => Err(JwtFailure::Hmac),
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        _ => Err(JwtFailure::AlgorithmNotAllowed),
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Present at all (even `null`): extensions the token says must be understood.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(value: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(value).map(|_| true)
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
}

/// One usable key of a JWKS.
struct Key {
    decoding: DecodingKey,
    /// The JWK's `alg`, when it names one: the token's must then be the same.
    alg: Option<String>,
    family: Family,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
}

fn family_of(alg: Algorithm) -> Option<Family> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(Family::Rsa),
        Algorithm::ES256 | Algorithm::ES384 => Some(Family::Ec),
        Algorithm::EdDSA => Some(Family::Ed),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
    }
}

/// The keys of one JWKS, and the tokens verified with them.
pub(crate) struct KeySet {
    by_kid: HashMap<String, Key>,
    /// Keys without a `kid` (a token without one may use the only key there is).
    unnamed: Vec<Key>,
    /// The `kid`s of keys that are not for verifying signatures (`use`, `key_ops`).
    not_for_signatures: HashSet<String>,
    /// SHA-256 of a verified token → its subject and its `exp` (seconds).
    verified: moka::sync::Cache<[u8; 32], (Arc<str>, f64)>,
}

impl KeySet {
    fn empty() -> Self {
        KeySet {
            by_kid: HashMap::new(),
            unnamed: Vec::new(),
            not_for_signatures: HashSet::new(),
            verified: moka::sync::Cache::new(REMEMBERED_TOKENS),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    /// Parses a JWKS document. Keys that cannot verify signatures here (symmetric keys, keys
    /// for encryption, unknown types) are skipped; a document with no usable key at all is
    /// refused, saying why.
    pub(crate) fn parse(text: &[u8]) -> Result<KeySet, String> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        if text.len() > MAX_JWKS_BYTES {
            return Err(format!("is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let doc: Doc = serde_json::from_slice(text)
            .map_err(|e| format!("is not a JWKS ({{\"keys\": [...]}}): {e}"))?;
        let mut set = KeySet::empty();
        for value in doc.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            if !for_signatures(&jwk) {
                if let Some(kid) = jwk.common.key_id {
                    set.not_for_signatures.insert(kid);
                }
                continue;
            }
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                // A shared secret: never a way in.
                AlgorithmParameters::OctetKey(_) => continue,
            };
            let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let key = Key {
                decoding,
                alg: jwk.common.key_algorithm.map(|a| format!("{a:?}")),
                family,
            };
            match jwk.common.key_id {
                Some(kid) => {
                    set.by_kid.insert(kid, key);
                }
                None => set.unnamed.push(key),
            }
        }
        if set.len() == 0 {
            return Err("holds no usable signing key (RSA, EC or OKP, not oct)".into());
        }
        Ok(set)
    }
}

/// Whether a JWK may verify signatures: its `use`, when given, is `sig`, and its `key_ops`,
/// when given, include `verify`.
fn for_signatures(jwk: &Jwk) -> bool {
    let by_use = match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => true,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_)) => false,
    };
    let by_ops = jwk
        .common
        .key_operations
        .as_ref()
        .is_none_or(|ops| ops.iter().any(|op| matches!(op, KeyOperations::Verify)));
    by_use && by_ops
}

/// Verifies JWTs for one `[jwt]` configuration.
pub(crate) struct Verifier {
    config: JwtConfig,
    keys: ArcSwap<KeySet>,
    /// SHA-256 of the JWKS text in use, and of the last one refused (so a broken file is
    /// reported once, not on every look).
    seen: Mutex<Seen>,
    /// A JWKS URL: fetches, one at a time.
    fetch: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Seen {
    good: Option<[u8; 32]>,
    bad: Option<[u8; 32]>,
    /// When the URL was last fetched (tried), and last fetched successfully.
    tried: Option<Instant>,
    fetched: Option<Instant>,
}

/// What looking at a JWKS source did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Loaded {
    Unchanged,
    Replaced(usize),
    Refused,
}

impl Verifier {
    /// A verifier for `config`; with a JWKS file, its keys are read now (a file that cannot
    /// be used is an error: there are no previous keys to keep). A URL is fetched by
    /// [`Verifier::upkeep`].
    pub(crate) fn new(config: JwtConfig) -> Result<Self, String> {
        let verifier = Verifier {
            config,
            keys: ArcSwap::from_pointee(KeySet::empty()),
            seen: Mutex::default(),
            fetch: tokio::sync::Mutex::new(()),
        };
        if let JwksSource::File(path) = &verifier.config.jwks {
            let text = file::read(path)
                .map_err(|e| format!("cannot read jwt.jwks_file {}: {e}", path.display()))?;
            let set = KeySet::parse(&text)
                .map_err(|e| format!("jwt.jwks_file {} {e}", path.display()))?;
            verifier.keys.store(Arc::new(set));
            verifier.seen().good = Some(Sha256::digest(&text).into());
        }
        Ok(verifier)
    }

    pub(crate) fn config(&self) -> &JwtConfig {
        &self.config
    }

    /// How many keys are in use.
    #[cfg(test)]
    pub(crate) fn key_count(&self) -> usize {
        self.keys.load().len()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `text` as the new JWKS unless it is the one in use or one already refused.
    fn offer(&self, text: &[u8], origin: &str) -> Loaded {
        let digest: [u8; 32] = Sha256::digest(text).into();
        {
            let seen = self.seen();
            if seen.good == Some(digest) || seen.bad == Some(digest) {
                return Loaded::Unchanged;
            }
        }
        match KeySet::parse(text) {
            Ok(set) => {
                let n = set.len();
                self.keys.store(Arc::new(set));
                let mut seen = self.seen();
                seen.good = Some(digest);
                seen.bad = None;
                tracing::info!(source = origin, keys = n, "JWKS loaded");
                Loaded::Replaced(n)
            }
            Err(why) => {
                self.seen().bad = Some(digest);
                tracing::warn!(
                    source = origin,
                    error = %why,
                    keys_kept = self.keys.load().len(),
                    "JWKS refused; the previous keys stay in use"
                );
                Loaded::Refused
            }
        }
    }

    /// Looks at the JWKS source: a file is re-read (and taken when it changed); a URL is
    /// fetched when `force` or when it is due (every 10 min; 30 s after a failed fetch).
    pub(crate) async fn upkeep(&self, client: &JwksClient, force: bool) -> Loaded {
        match &self.config.jwks {
            JwksSource::File(path) => match file::in_time({
                let path = path.clone();
                move || file::read(&path)
            })
            .await
            {
                Ok(text) => self.offer(&text, &path.display().to_string()),
                Err(why) => {
                    let digest: [u8; 32] = Sha256::digest(why.as_bytes()).into();
                    let mut seen = self.seen();
                    if seen.bad != Some(digest) {
                        seen.bad = Some(digest);
                        tracing::warn!(
                            source = %path.display(),
                            error = %why,
                            "JWKS file unreadable; the previous keys stay in use"
                        );
                    }
                    Loaded::Refused
                }
            },
            JwksSource::Url(uri) => {
                let due = {
                    let seen = self.seen();
                    let now = Instant::now();
                    let since = |at: Option<Instant>| at.map(|t| now.duration_since(t));
                    match (since(seen.tried), since(seen.fetched)) {
                        (None, _) => true,
                        (Some(tried), _) if tried < JWKS_UNKNOWN_KID_EVERY => false,
                        _ if force => true,
                        (_, None) => true,
                        (_, Some(fetched)) => fetched >= JWKS_REFETCH_EVERY,
                    }
                };
                if !due {
                    return Loaded::Unchanged;
                }
                self.fetch_url(client, uri).await
            }
        }
    }

    async fn fetch_url(&self, client: &JwksClient, uri: &http::Uri) -> Loaded {
        let Ok(_one) = self.fetch.try_lock() else {
            // Another fetch is under way: wait for it and use what it got.
            let _ = self.fetch.lock().await;
            return Loaded::Unchanged;
        };
        self.seen().tried = Some(Instant::now());
        let shown = redacted_url(uri);
        match client.get(uri).await {
            Ok(text) => {
                self.seen().fetched = Some(Instant::now());
                self.offer(&text, &shown)
            }
            Err(why) => {
                tracing::warn!(
                    source = %shown,
                    error = %why,
                    keys_kept = self.keys.load().len(),
                    "JWKS fetch failed; the previous keys stay in use"
                );
                Loaded::Refused
            }
        }
    }

    /// Verifies `token`, whose SHA-256 is `digest`, with the keys in hand: its subject, or why
    /// not. An unknown `kid` is [`JwtFailure::UnknownKid`]; the caller may refresh a URL's keys
    /// and ask again.
    pub(crate) fn verify(&self, token: &[u8], digest: &[u8; 32]) -> Result<Arc<str>, JwtFailure> {
        let keys = self.keys.load();
        let leeway = self.config.leeway.as_secs_f64();
        if let Some((sub, exp)) = keys.verified.get(digest) {
            if now_secs() <= exp + leeway {
                return Ok(sub);
            }
            keys.verified.invalidate(digest);
            return Err(JwtFailure::Expired);
        }
        let token = std::str::from_utf8(token).map_err(|_| JwtFailure::Malformed)?;
        let header = header_of(token)?;
        let alg = allowed(&header.alg)?;
        if header.crit {
            return Err(JwtFailure::CriticalHeader);
        }
        if keys.len() == 0 {
            return Err(JwtFailure::NoKeys);
        }
        let key = match &header.kid {
            Some(kid) => keys
                .by_kid
                .get(kid)
                .ok_or(if keys.not_for_signatures.contains(kid) {
                    JwtFailure::KeyNotForSignatures
                } else {
                    JwtFailure::UnknownKid
                })?,
            // Without a kid, the JWKS's only key, named or not.
            None => match (keys.by_kid.values().next(), keys.unnamed.as_slice()) {
                (Some(only), []) if keys.by_kid.len() == 1 => only,
                (None, [only]) => only,
                _ => return Err(JwtFailure::UnknownKid),
            },
        };
        if key.alg.as_deref().is_some_and(|a| a != header.alg) || family_of(alg) != Some(key.family)
        {
            return Err(JwtFailure::KeyAlgorithmMismatch);
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map_err(|e| failure_of(e.kind()))?
            .claims;
        let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
            return Err(JwtFailure::MissingClaim);
        };
        let sub: Arc<str> = Arc::from(sub);
        keys.verified.insert(*digest, (sub.clone(), exp));
        Ok(sub)
    }
}

fn failure_of(kind: &jsonwebtoken::errors::ErrorKind) -> JwtFailure {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature | K::Crypto(_) => JwtFailure::BadSignature,
        K::InvalidEcdsaKey | K::InvalidRsaKey(_) | K::InvalidKeyFormat | K::InvalidAlgorithm => {
            JwtFailure::KeyAlgorithmMismatch
        }
        K::ExpiredSignature => JwtFailure::Expired,
        K::ImmatureSignature => JwtFailure::NotYetValid,
        K::InvalidIssuer => JwtFailure::WrongIssuer,
        K::InvalidAudience => JwtFailure::WrongAudience,
        K::MissingRequiredClaim(_) | K::InvalidSubject => JwtFailure::MissingClaim,
        _ => JwtFailure::Malformed,
    }
}

/// The JOSE header, read without trusting it.
fn header_of(token: &str) -> Result<RawHeader, JwtFailure> {
    let head = token.split('.').next().ok_or(JwtFailure::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| JwtFailure::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtFailure::Malformed)
}

fn now_secs() -> f64 {
    clock::now_utc().unix_timestamp_nanos() as f64 / 1e9
}

/// A URL as logged: without user info or query.
fn redacted_url(uri: &http::Uri) -> String {
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{}{port}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.host().unwrap_or(""),
        uri.path()
    )
}

/// Fetches JWKS documents over HTTP(S) (webpki roots).
pub(crate) struct JwksClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl JwksClient {
    pub(crate) fn new() -> Self {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
            .with_no_client_auth()
        });
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = match tls {
            Ok(tls) => hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(http),
            Err(_) => hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_http1()
                .wrap_connector(http),
        };
        JwksClient {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build(connector),
        }
    }

    async fn get(&self, uri: &http::Uri) -> Result<Vec<u8>, String> {
        use http_body_util::BodyExt;
        let req = http::Request::get(uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| bill24::chain::Chain(&e).to_string())?;
            if !res.status().is_success() {
                return Err(format!("answered {}", res.status()));
            }
            let body = http_body_util::Limited::new(res.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(Duration::from_secs(10), fetch)
            .await
            .map_err(|_| "no answer within 10 s".to_string())?
    }
}

/// The JWT verifier in force (`None` without `[jwt]`), swapped by a reload.
#[derive(Default)]
pub(crate) struct Jwt {
    pub(crate) current: ArcSwapOption<Verifier>,
}

impl Jwt {
    /// Verifies `token` (SHA-256 `digest`); on an unknown `kid` with a JWKS URL, fetches the
    /// keys again (at most once per 30 s) and tries once more.
    pub(crate) async fn verify_fetching(
        &self,
        client: &JwksClient,
        token: &[u8],
        digest: &[u8; 32],
    ) -> Result<Arc<str>, JwtFailure> {
        let Some(verifier) = self.current.load_full() else {
            return Err(JwtFailure::NoKeys);
        };
        match verifier.verify(token, digest) {
            Err(JwtFailure::UnknownKid | JwtFailure::NoKeys)
                if matches!(verifier.config.jwks, JwksSource::Url(_)) =>
            {
                verifier.upkeep(client, true).await;
                verifier.verify(token, digest)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shapes() {
        assert!(looks_like_jwt(b"eyJh.eyJz.c2ln"));
        assert!(
            looks_like_jwt(b"a.b."),
            "empty signature: still a JWT, refused later"
        );
        assert!(!looks_like_jwt(b"plain-caller-key"));
        assert!(!looks_like_jwt(b"a.b.c.d"));
        assert!(!looks_like_jwt(b"a.b+c.d"));
        assert!(!looks_like_jwt(&[b'a'; MAX_TOKEN_BYTES + 1]));
    }

    #[test]
    fn a_crit_header_is_seen_whatever_its_value() {
        let header = |json: &str| {
            let token = format!(
                "{}.e30.c2ln",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
            );
            header_of(&token).map(|h| h.crit)
        };
        assert_eq!(header(r#"{"alg":"ES256"}"#), Ok(false));
        assert_eq!(header(r#"{"alg":"ES256","crit":["exp"]}"#), Ok(true));
        assert_eq!(header(r#"{"alg":"ES256","crit":null}"#), Ok(true));
    }

    #[test]
    fn only_asymmetric_algorithms() {
        assert_eq!(allowed("none"), Err(JwtFailure::AlgNone));
        assert_eq!(allowed("HS256"), Err(JwtFailure::Hmac));
        assert_eq!(allowed("HS512"), Err(JwtFailure::Hmac));
        assert_eq!(allowed("RS1"), Err(JwtFailure::AlgorithmNotAllowed));
        assert_eq!(allowed("RS256"), Ok(Algorithm::RS256));
        assert_eq!(allowed("ES256"), Ok(Algorithm::ES256));
    }

    #[test]
    fn a_jwks_of_secrets_only_is_refused_and_secrets_are_skipped() {
        let oct = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"}]}"#;
        assert!(KeySet::parse(oct).is_err());
        let mixed = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"},
            {"kty":"EC","crv":"P-256","kid":"e","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"weird","kid":"w"}]}"#;
        let set = KeySet::parse(mixed).expect("one EC key");
        assert_eq!(set.len(), 1);
        assert!(set.by_kid.contains_key("e"));
        assert!(KeySet::parse(b"not json").is_err());
        let ec = |extra: &str| {
            format!(
                r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"e",{extra}
                "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}}]}}"#
            )
        };
        for not_for_signatures in [
            r#""use":"enc","#,
            r#""key_ops":["encrypt"],"#,
            r#""key_ops":["sign"],"#,
            r#""use":"sig","key_ops":[],"#,
        ] {
            assert!(
                KeySet::parse(ec(not_for_signatures).as_bytes()).is_err(),
                "{not_for_signatures}"
            );
        }
        for usable in ["", r#""use":"sig","#, r#""key_ops":["verify","sign"],"#] {
            let set = KeySet::parse(ec(usable).as_bytes()).expect(usable);
            assert_eq!(set.len(), 1, "{usable}");
        }
        assert!(KeySet::parse(br#"{"keys":[]}"#).is_err());
    }
}
