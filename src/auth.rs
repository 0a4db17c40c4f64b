//! Caller authentication: `Authorization: Bearer <caller key>`, whose SHA-256 must equal one of
//! the configured `[[callers]]` hashes (compared in constant time). The key is used for nothing
//! else: it is never logged and never forwarded.

use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::header::AUTHORIZATION;
use http::{HeaderMap, Request};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tower::{Layer, Service};

use crate::caller::{Caller, CallerLimits};
use crate::config::{CallerConfig, KeyHash};
use crate::error::{GatewayError, Rejection, Response, reject};
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
            out.callers.push(Caller {
                name: c.name.clone(),
                index,
                limits,
            });
            for hash in &c.key_sha256 {
                out.keys.push((words(hash), index));
            }
        }
        out
    }

    /// The caller whose key hash matches. Every configured hash is compared, in constant time,
    /// whichever matches.
    pub fn identify(&self, key: &[u8]) -> Option<&Caller> {
        let hash = words(&hash_key(key));
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

/// Answers 401 unless the request carries a known caller key; records the [`Caller`] in the
/// request's [`RequestState`].
#[derive(Clone)]
pub(crate) struct AuthLayer {
    keys: Arc<ArcSwap<CallerKeys>>,
}

impl AuthLayer {
    /// `keys` may be swapped at run time (config reload).
    pub(crate) fn new(keys: Arc<ArcSwap<CallerKeys>>) -> Self {
        AuthLayer { keys }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            keys: self.keys.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Auth<S> {
    inner: S,
    keys: Arc<ArcSwap<CallerKeys>>,
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Rejection<GatewayError, S::Error>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let caller =
            bearer_key(req.headers()).and_then(|key| self.keys.load().identify(key).cloned());
        let Some(caller) = caller else {
            return Either::Left(reject(GatewayError::Unauthorized));
        };
        RequestState::of(&mut req).set_caller(&caller);
        Either::Right(self.inner.call(req))
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
                rate_limit_rps: 0.0,
                burst: 0,
                max_concurrent: 0,
                limit_scope: Default::default(),
            },
            CallerConfig {
                name: Arc::from("billing"),
                key_sha256: vec![hash_key(b"old-key"), hash_key(b"new-key")],
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
