//! Caller authentication (CONTRACT §3, §12), by one of:
//! - `Authorization: Bearer <caller key>`, whose SHA-256 must equal one of the configured
//!   `[[callers]]` hashes (compared in constant time);
//! - `Authorization: Bearer <JWT>` with `[jwt]`: verified against the JWKS, its `sub` a
//!   caller's `jwt_subject`;
//! - no `Authorization`, over TLS with a client certificate that chains to
//!   `server.tls_client_ca_file` and whose URI SAN is a caller's `spiffe_id`.
//!
//! A request that carries an `Authorization` value is decided by it alone; a Bearer value over
//! 8 KiB is refused unread. Keys and tokens are used for nothing else: never logged and never
//! forwarded.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, Either};
use http::header::AUTHORIZATION;
use http::{HeaderMap, Request};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tower::{Layer, Service};

use crate::caller::{Caller, CallerLimits};
use crate::config::{CallerConfig, KeyHash};
use crate::error::{GatewayError, Rejection, Response, reject};
use crate::identity::jwt::{JwksClient, Jwt, JwtFailure, MAX_TOKEN_BYTES, looks_like_jwt};
use crate::identity::tls::PeerCertificate;
use crate::identity::{Identity, Method};
use crate::request_state::RequestState;

/// SHA-256 of a caller (or admin) key.
pub fn hash_key(key: &[u8]) -> KeyHash {
    Sha256::digest(key).into()
}

/// The configured callers' key hashes.
#[derive(Debug, Default)]
pub struct CallerKeys {
    /// Each hash as four words, compared word by word in constant time.
    keys: Vec<([u64; 4], usize)>,
    callers: Vec<Caller>,
    /// `spiffe_id` → caller index.
    spiffe_ids: HashMap<Arc<str>, usize>,
    /// `jwt_subject` → caller index.
    subjects: HashMap<Arc<str>, usize>,
}

fn words(hash: &KeyHash) -> [u64; 4] {
    std::array::from_fn(|i| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&hash[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(word)
    })
}

/// Constant-time equality of two hashes (no branch or early exit on the data).
fn same(a: &[u64; 4], b: &[u64; 4]) -> subtle::Choice {
    a[0].ct_eq(&b[0]) & a[1].ct_eq(&b[1]) & a[2].ct_eq(&b[2]) & a[3].ct_eq(&b[3])
}

impl CallerKeys {
    pub fn new(callers: &[CallerConfig]) -> Self {
        Self::replacing(callers, &CallerKeys::default())
    }

    /// The keys of `callers`, keeping the rate-limit state of callers in `previous` whose name
    /// and limits did not change (so a config reload does not refill every bucket).
    pub fn replacing(callers: &[CallerConfig], previous: &CallerKeys) -> Self {
        let mut out = CallerKeys::default();
        for (index, c) in callers.iter().enumerate() {
            let limits = previous
                .callers
                .iter()
                .find(|p| p.name == c.name && p.limits.same_settings(c))
                .map(|p| p.limits.clone())
                .unwrap_or_else(|| Arc::new(CallerLimits::new(c)));
            out.callers.push(Caller::new(c.name.clone(), index, limits));
            for hash in &c.key_sha256 {
                out.keys.push((words(hash), index));
            }
            if let Some(id) = &c.spiffe_id {
                out.spiffe_ids.insert(id.clone(), index);
            }
            if let Some(sub) = &c.jwt_subject {
                out.subjects.insert(sub.clone(), index);
            }
        }
        out
    }

    /// The caller whose `spiffe_id` is one of `uris` (a certificate's URI SANs).
    pub(crate) fn by_spiffe_id(&self, uris: &[String]) -> Option<&Caller> {
        uris.iter()
            .find_map(|uri| self.spiffe_ids.get(uri.as_str()))
            .and_then(|i| self.callers.get(*i))
    }

    /// The caller whose `jwt_subject` is `sub`.
    pub(crate) fn by_subject(&self, sub: &str) -> Option<&Caller> {
        self.subjects.get(sub).and_then(|i| self.callers.get(*i))
    }

    /// The caller whose key hash matches. Every configured hash is compared, in constant time,
    /// whichever matches.
    pub fn identify(&self, key: &[u8]) -> Option<&Caller> {
        self.identify_hash(&hash_key(key))
    }

    /// [`Self::identify`] for a key already hashed.
    pub fn identify_hash(&self, hash: &KeyHash) -> Option<&Caller> {
        let hash = words(hash);
        let mut found = u64::MAX;
        for (candidate, index) in &self.keys {
            found = u64::conditional_select(&found, &(*index as u64), same(candidate, &hash));
        }
        self.callers.get(usize::try_from(found).ok()?)
    }
}

/// The key of `Authorization: Bearer <key>` (scheme in any case).
pub fn bearer_key(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let split = value.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Answers 401 unless the request identifies a caller (by key, JWT or client certificate);
/// records the [`Caller`] and how it was identified in the request's [`RequestState`].
/// (What it judges by is behind one reference per stack: a stack is built for each serving
/// thread, so the reference count a request moves is its own thread's.)
#[derive(Clone)]
pub(crate) struct AuthLayer(Arc<Judge>);

struct Judge {
    keys: Arc<ArcSwap<CallerKeys>>,
    jwt: Arc<Jwt>,
    jwks_client: Arc<JwksClient>,
}

impl AuthLayer {
    /// `keys` may be swapped at run time (config reload), and so may the JWT verifier.
    pub(crate) fn new(keys: Arc<ArcSwap<CallerKeys>>, identity: &Identity) -> Self {
        AuthLayer(Arc::new(Judge {
            keys,
            jwt: identity.jwt.clone(),
            jwks_client: identity.jwks_client.clone(),
        }))
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

/// A Bearer value that is no caller's key (and no JWT to verify).
const NO_SUCH_KEY: &str = "key: matches no caller";
/// A Bearer value too long to be a key or a token.
const TOO_LONG: &str = "authorization: Bearer value over 8192 bytes";
const _: () = assert!(MAX_TOKEN_BYTES == 8192, "TOO_LONG states the bound");

/// What the request's credentials came to.
enum Decision {
    Caller(Caller, Method),
    Refused(Option<&'static str>),
}

/// A [`Decision`] now, or a JWT whose `kid` is not known yet (the JWKS URL may be fetched
/// again): its SHA-256 comes along.
enum Judged {
    Now(Decision),
    FetchKeys(KeyHash),
}

impl Judge {
    fn judge(&self, headers: &HeaderMap, peer: Option<&PeerCertificate>) -> Judged {
        let keys = self.keys.load();
        if let Some(token) = bearer_key(headers) {
            if token.len() > MAX_TOKEN_BYTES {
                return Judged::Now(Decision::Refused(Some(TOO_LONG)));
            }
            // One hash serves both the key lookup and the verified-token memory.
            let digest = hash_key(token);
            if let Some(caller) = keys.identify_hash(&digest) {
                return Judged::Now(Decision::Caller(caller.clone(), Method::Key));
            }
            let Some(verifier) = self.jwt.current.load_full() else {
                return Judged::Now(Decision::Refused(Some(NO_SUCH_KEY)));
            };
            if !looks_like_jwt(token) {
                return Judged::Now(Decision::Refused(Some(NO_SUCH_KEY)));
            }
            return match verifier.verify(token, &digest) {
                Err(JwtFailure::UnknownKid | JwtFailure::NoKeys)
                    if matches!(verifier.config().jwks, crate::config::JwksSource::Url(_)) =>
                {
                    Judged::FetchKeys(digest)
                }
                verified => Judged::Now(by_subject(&keys, verified)),
            };
        }
        if headers.contains_key(AUTHORIZATION) {
            return Judged::Now(Decision::Refused(Some(
                "authorization: not a Bearer credential",
            )));
        }
        Judged::Now(match peer {
            // A SPIFFE X.509-SVID has exactly one URI SAN: a certificate with several could
            // otherwise act as whichever caller its SANs happen to match.
            Some(PeerCertificate::Verified(uris)) if uris.len() != 1 => {
                Decision::Refused(Some("client certificate: not exactly one URI SAN"))
            }
            Some(PeerCertificate::Verified(uris)) => match keys.by_spiffe_id(uris) {
                Some(caller) => Decision::Caller(caller.clone(), Method::Mtls),
                None => Decision::Refused(Some(
                    "client certificate: its URI SAN is no caller's spiffe_id",
                )),
            },
            Some(PeerCertificate::Refused(why)) => Decision::Refused(Some(why)),
            Some(PeerCertificate::None) | None => Decision::Refused(None),
        })
    }

    /// The decision on a token after the JWKS URL was fetched again for its `kid`.
    async fn judge_fetching(&self, headers: &HeaderMap, digest: &KeyHash) -> Decision {
        let Some(token) = bearer_key(headers) else {
            return Decision::Refused(None);
        };
        let verified = self
            .jwt
            .verify_fetching(&self.jwks_client, token, digest)
            .await;
        by_subject(&self.keys.load(), verified)
    }
}

/// The caller a verified token's `sub` names, or why there is none.
fn by_subject(keys: &CallerKeys, verified: Result<Arc<str>, JwtFailure>) -> Decision {
    match verified.map(|sub| keys.by_subject(&sub).cloned()) {
        Ok(Some(caller)) => Decision::Caller(caller, Method::Jwt),
        Ok(None) => Decision::Refused(Some(JwtFailure::UnknownSubject.label())),
        Err(failure) => Decision::Refused(Some(failure.label())),
    }
}

/// Records `decision` in the request's state: whether the request goes on.
fn admit(decision: Decision, state: &RequestState) -> bool {
    match decision {
        Decision::Caller(caller, method) => {
            state.set_caller(caller, method);
            true
        }
        Decision::Refused(why) => {
            if let Some(why) = why {
                state.auth_error(why);
            }
            false
        }
    }
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<
        Either<Rejection<GatewayError, S::Error>, S::Future>,
        BoxFuture<'static, Result<Response, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let judged = self
            .layer
            .0
            .judge(req.headers(), req.extensions().get::<PeerCertificate>());
        let state = RequestState::of(&mut req);
        match judged {
            Judged::Now(decision) => {
                if admit(decision, &state) {
                    Either::Left(Either::Right(self.inner.call(req)))
                } else {
                    Either::Left(Either::Left(reject(GatewayError::Unauthorized)))
                }
            }
            Judged::FetchKeys(digest) => {
                // The service was made ready for this request: take it, leave a clone.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let layer = self.layer.0.clone();
                Either::Right(Box::pin(async move {
                    let decision = layer.judge_fetching(req.headers(), &digest).await;
                    if admit(decision, &state) {
                        inner.call(req).await
                    } else {
                        reject(GatewayError::Unauthorized).await
                    }
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn keys() -> CallerKeys {
        CallerKeys::new(&[
            CallerConfig {
                name: Arc::from("orders"),
                key_sha256: vec![hash_key(b"orders-key")],
                spiffe_id: None,
                jwt_subject: None,
                rate_limit_rps: 0.0,
                burst: 0,
                max_concurrent: 0,
                limit_scope: Default::default(),
            },
            CallerConfig {
                name: Arc::from("billing"),
                key_sha256: vec![hash_key(b"old-key"), hash_key(b"new-key")],
                spiffe_id: None,
                jwt_subject: None,
                rate_limit_rps: 0.0,
                burst: 0,
                max_concurrent: 0,
                limit_scope: Default::default(),
            },
        ])
    }

    #[test]
    fn hash_matches_sha256_hex() {
        assert_eq!(
            hex::encode(hash_key(b"foo")),
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        );
    }

    #[test]
    fn identifies_callers_and_rotated_keys() {
        let k = keys();
        assert_eq!(k.identify(b"orders-key").map(|c| &*c.name), Some("orders"));
        assert_eq!(k.identify(b"old-key").map(|c| c.index), Some(1));
        assert_eq!(k.identify(b"new-key").map(|c| c.index), Some(1));
        assert!(k.identify(b"orders-key ").is_none());
        assert!(k.identify(b"").is_none());
        assert!(CallerKeys::default().identify(b"x").is_none());
    }

    #[test]
    fn bearer_parsing() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(AUTHORIZATION, HeaderValue::from_static(v));
            m
        };
        assert_eq!(bearer_key(&h("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer_key(&h("bearer   abc  ")), Some(&b"abc"[..]));
        assert_eq!(bearer_key(&h("BEARER abc")), Some(&b"abc"[..]));
        assert_eq!(bearer_key(&h("Basic abc")), None);
        assert_eq!(bearer_key(&h("Bearer")), None);
        assert_eq!(bearer_key(&h("Bearer ")), None);
        assert_eq!(bearer_key(&h("abc")), None);
        assert_eq!(bearer_key(&HeaderMap::new()), None);
    }
}
