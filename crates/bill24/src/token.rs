//! The merchant access token: obtained at start, refreshed in the background before it expires
//! (with `refreshToken` first, a full authorize as fallback), replaced when Bill24 refuses it,
//! and never asked for by more than one authorize call at a time.
//!
//! All token requests go through one *attempt* at a time: a spawned task (so a caller that
//! hangs up cannot cancel it) whose result every waiter shares. After a failed attempt the next
//! one waits for an exponential backoff (capped at 30 s); a request that needs a token during
//! the backoff is refused at once rather than triggering an authorize of its own.
//!
//! With a [`TokenStore`] (the gateway's fleet tier), replicas share one token: an attempt
//! first adopts a token another replica stored (unless it is the one Bill24 just refused, or
//! is itself due for refresh); otherwise it takes the fleet's refresh lock, reads again, and
//! only then asks Bill24, with the fleet's newest refresh token, and stores the result for the
//! others. A replica that finds the lock taken waits for the holder's token. Refresh tokens
//! may be single-use (IdentityServer's default): only the lock holder redeems one. When the
//! store is unavailable the manager acts on its own, as without one, except that it never
//! redeems a refresh token then (the one it holds may be the fleet's): a full authorize.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use singleflight::{Flight, Guard};
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{Transport, TransportError};
use crate::wire::{self, AuthorizeRefused, AuthorizeRequest};
use crate::{Endpoint, Observer, Secret};

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// At most one token replacement per this long because Bill24 refused a token: when Bill24
/// refuses every token (a 401 storm), requests fail instead of each buying a new one.
const MIN_REFUSAL_INTERVAL: Duration = Duration::from_secs(1);

/// The merchant credentials that buy an access token.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub merchant_token: Secret,
    pub client_id: String,
    pub client_secret: Secret,
}

/// A usable access token. `Debug` shows no secret.
pub struct AccessToken {
    token: Secret,
    /// `Bearer <token>`, marked sensitive.
    authorization: HeaderValue,
    refresh_token: Option<Secret>,
    /// None when Bill24 gave no readable `tokenExpireTime`: used until refused.
    expires_at: Option<Instant>,
    refresh_at: Option<Instant>,
    /// Wall-clock issue and expiry, for the replicas it is shared with.
    issued_wall: OffsetDateTime,
    expires_wall: Option<OffsetDateTime>,
}

/// A token as the replicas of a fleet share it: its expiry in wall-clock time (replicas share
/// no monotonic clock), and when it was issued (it is refreshed at half its life at the
/// earliest). `Debug` shows no secret.
#[derive(Clone)]
pub struct SharedToken {
    pub token: Secret,
    pub refresh_token: Option<Secret>,
    pub issued_at: OffsetDateTime,
    /// `tokenExpireTime`, when Bill24 gave a readable one.
    pub expires_at: Option<OffsetDateTime>,
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The shared store could not be used just now; the manager acts on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable;

/// Where the replicas of a fleet keep one merchant token (the gateway's Redis tier). Each call
/// is bounded in time by the implementation.
pub trait TokenStore: Send + Sync + 'static {
    /// The token stored for the fleet, if any (one that fails to decrypt is `None`).
    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Unavailable>>;
    /// Takes the fleet's refresh lock: `true` when this replica now holds it (until
    /// [`release`](TokenStore::release) or [`lock_ttl`](TokenStore::lock_ttl)), `false` when
    /// another replica does.
    fn lock(&self) -> BoxFuture<'_, Result<bool, Unavailable>>;
    /// Stores a token obtained under the lock, and tells the other replicas.
    fn store(&self, token: SharedToken) -> BoxFuture<'_, Result<(), Unavailable>>;
    /// Releases the lock, if this replica still holds it.
    fn release(&self) -> BoxFuture<'_, ()>;
    /// How long a lock lasts: a holder that dies delays the others at most this long.
    fn lock_ttl(&self) -> Duration;
    /// Changes whenever another replica announces a new token.
    fn token_changes(&self) -> watch::Receiver<u64>;
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    fn shared(&self) -> SharedToken {
        SharedToken {
            token: self.token.clone(),
            refresh_token: self.refresh_token.clone(),
            issued_at: self.issued_wall,
            expires_at: self.expires_wall,
        }
    }

    fn is_valid(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// `Bearer <token>` as a header value marked sensitive.
fn bearer(token: &Secret) -> HeaderValue {
    let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .unwrap_or_else(|_| {
            tracing::warn!("Bill24 issued a token that is not a valid header value");
            HeaderValue::from_static("Bearer invalid")
        });
    authorization.set_sensitive(true);
    authorization
}

/// When to refresh a token that lives `lifetime` from now: `margin` before it expires, but
/// never sooner than half its lifetime.
pub fn refresh_after(lifetime: Duration, margin: Duration) -> Duration {
    lifetime.saturating_sub(margin).max(lifetime / 2)
}

/// Backoff before the attempt that follows `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

#[derive(Debug, Clone, Default, thiserror::Error)]
pub enum TokenError {
    #[error("Bill24 refused to issue an access token: {0}")]
    Refused(AuthorizeRefused),
    #[error("authorize answered HTTP {0}")]
    Status(u16),
    #[error("authorize call failed: {0}")]
    Transport(TransportError),
    #[error("the last token request failed{}; next one in {wait:?}", because(.cause))]
    BackingOff {
        wait: Duration,
        /// Why the last request failed.
        cause: Option<Box<TokenError>>,
    },
    #[default]
    #[error("the token request was abandoned")]
    Abandoned,
    #[error("Bill24 refused a token obtained moments ago; not asking for another yet")]
    RefusedTooSoon,
}

fn because(cause: &Option<Box<TokenError>>) -> String {
    cause
        .as_ref()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default()
}

impl TokenError {
    /// The TLS failure behind this one, if that is what it comes to.
    pub fn tls_failure(&self) -> Option<&str> {
        match self {
            TokenError::Transport(TransportError::Tls(reason)) => Some(reason),
            TokenError::BackingOff {
                cause: Some(cause), ..
            } => cause.tls_failure(),
            _ => None,
        }
    }
}

type AttemptResult = Result<Arc<AccessToken>, TokenError>;
type Attempt = Arc<Flight<AttemptResult>>;

struct State {
    token: Option<Arc<AccessToken>>,
    /// The refresh token of a token that was dropped because Bill24 refused it.
    orphan_refresh: Option<Secret>,
    /// The token Bill24 refused last: never adopted from the fleet again.
    refused: Option<Secret>,
    attempt: Option<Attempt>,
    failures: u32,
    /// Why the last attempt failed, while backing off after it.
    last_failure: Option<TokenError>,
    retry_at: Option<Instant>,
    /// When a refused token was last dropped.
    last_refusal: Option<Instant>,
}

struct Inner {
    transport: Arc<Transport>,
    credentials: Credentials,
    margin: Duration,
    metrics: Arc<dyn Observer>,
    store: Option<Arc<dyn TokenStore>>,
    state: Mutex<State>,
    /// Wakes the background refresher when the token or an attempt changes.
    changed: Notify,
}

/// Hands out the current access token; see the module docs.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
    refresher: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl TokenManager {
    /// Creates the manager and starts its background refresher, which asks for the first
    /// token at once. Must be called within a tokio runtime.
    pub fn start(
        transport: Arc<Transport>,
        credentials: Credentials,
        margin: Duration,
        metrics: Arc<dyn Observer>,
        store: Option<Arc<dyn TokenStore>>,
    ) -> Self {
        let inner = Arc::new(Inner {
            transport,
            credentials,
            margin,
            metrics,
            store,
            state: Mutex::new(State {
                token: None,
                orphan_refresh: None,
                refused: None,
                attempt: None,
                failures: 0,
                last_failure: None,
                retry_at: None,
                last_refusal: None,
            }),
            changed: Notify::new(),
        });
        let refresher = tokio::spawn(refresher(inner.clone()));
        TokenManager {
            inner,
            refresher: Arc::new(Mutex::new(Some(refresher))),
        }
    }

    /// A valid token: the current one, the result of the attempt in flight, or of a new
    /// attempt when the backoff allows one.
    pub async fn token(&self) -> Result<Arc<AccessToken>, TokenError> {
        let attempt = {
            let mut st = self.inner.lock();
            let now = Instant::now();
            if let Some(token) = st.token.as_ref().filter(|t| t.is_valid(now)) {
                return Ok(token.clone());
            }
            self.inner.join_or_start(&mut st, now)?
        };
        attempt.wait().await
    }

    /// Bill24 answered 401 to `refused`: drop it (once, however many requests saw the 401)
    /// and get a new token through the shared attempt.
    pub async fn refused(
        &self,
        refused: &Arc<AccessToken>,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let attempt = {
            let mut st = self.inner.lock();
            let now = Instant::now();
            match &st.token {
                Some(current) if Arc::ptr_eq(current, refused) => {
                    if st
                        .last_refusal
                        .is_some_and(|at| now.saturating_duration_since(at) < MIN_REFUSAL_INTERVAL)
                    {
                        return Err(TokenError::RefusedTooSoon);
                    }
                    tracing::warn!("Bill24 refused the access token; requesting a new one");
                    let refresh = current.refresh_token.clone();
                    let token = current.token.clone();
                    st.last_refusal = Some(now);
                    st.orphan_refresh = refresh;
                    st.refused = Some(token);
                    st.token = None;
                }
                Some(current) if current.is_valid(now) => return Ok(current.clone()),
                _ => {}
            }
            self.inner.join_or_start(&mut st, now)?
        };
        attempt.wait().await
    }

    /// Time left on the current token; `None` when there is none or its expiry is unknown.
    pub fn expires_in(&self) -> Option<Duration> {
        let st = self.inner.lock();
        let token = st.token.as_ref()?;
        token
            .expires_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Whether a token is held and, as far as is known, still valid.
    pub fn has_valid_token(&self) -> bool {
        let st = self.inner.lock();
        st.token
            .as_ref()
            .is_some_and(|t| t.is_valid(Instant::now()))
    }

    /// Stops the background refresher.
    pub fn stop(&self) {
        if let Ok(mut slot) = self.refresher.lock()
            && let Some(handle) = slot.take()
        {
            handle.abort();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data updated in short critical sections; a poisoned lock still
        // holds a consistent value.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the attempt in flight, or starts one unless backing off.
    fn join_or_start(
        self: &Arc<Self>,
        st: &mut State,
        now: Instant,
    ) -> Result<Attempt, TokenError> {
        // An attempt whose task was dropped unfinished has an (abandoned) result but is still
        // registered: it is over, not joined.
        if let Some(attempt) = st.attempt.as_ref().filter(|a| !a.is_finished()) {
            return Ok(attempt.clone());
        }
        if let Some(at) = st.retry_at.filter(|at| now < *at) {
            return Err(TokenError::BackingOff {
                wait: at - now,
                cause: st.last_failure.clone().map(Box::new),
            });
        }
        Ok(self.start_attempt(st))
    }

    fn start_attempt(self: &Arc<Self>, st: &mut State) -> Attempt {
        let attempt = Arc::new(Flight::new());
        st.attempt = Some(attempt.clone());
        // Made before the task and moved into it: waiters get `Abandoned` rather than waiting
        // for ever if the task is dropped (the runtime shutting down).
        let guard = Guard::new(attempt.clone(), || Err(TokenError::Abandoned));
        let refresh = st
            .token
            .as_ref()
            .and_then(|t| t.refresh_token.clone())
            .or_else(|| st.orphan_refresh.take());
        // The token we hold, or the one Bill24 refused: a stored token equal to either is not
        // one to adopt.
        let stale = st
            .token
            .as_ref()
            .map(|t| t.token.clone())
            .or(st.refused.clone());
        let inner = self.clone();
        tokio::spawn(async move {
            let result = match inner.store.clone() {
                Some(store) => match inner.attempt_shared(store.as_ref(), stale.as_ref()).await {
                    Some(result) => result,
                    // The store is unreachable: the refresh token this replica holds may be
                    // the fleet's, and other replicas may be redeeming it now; a single-use
                    // one presented twice can revoke the whole family. A full authorize of
                    // this replica's own instead.
                    None => inner.attempt(None).await,
                },
                None => inner.attempt(refresh).await,
            };
            {
                let mut st = inner.lock();
                st.attempt = None;
                match &result {
                    Ok(token) => {
                        st.token = Some(token.clone());
                        st.orphan_refresh = None;
                        st.failures = 0;
                        st.retry_at = None;
                        st.last_failure = None;
                    }
                    Err(e) => {
                        st.failures = st.failures.saturating_add(1);
                        let wait = backoff(st.failures);
                        st.retry_at = Some(Instant::now() + wait);
                        st.last_failure = Some(e.clone());
                        tracing::warn!(
                            error = %e,
                            failures = st.failures,
                            retry_in_ms = wait.as_millis() as u64,
                            "no Bill24 access token; will try again"
                        );
                    }
                }
            }
            inner.changed.notify_one();
            guard.flight().finish(result);
        });
        attempt
    }

    /// An attempt through the fleet's store (see the module docs); `None` when the store is
    /// unavailable, and the manager acts on its own.
    async fn attempt_shared(
        &self,
        store: &dyn TokenStore,
        stale: Option<&Secret>,
    ) -> Option<AttemptResult> {
        let mut changes = store.token_changes();
        // A few rounds at most: each waits for a holder's token or its lock's expiry.
        for _ in 0..3 {
            let stored = store.load().await.ok()?;
            if let Some(token) = stored.filter(|t| self.adoptable(t, stale)) {
                return Some(Ok(self.adopt(token)));
            }
            if !store.lock().await.ok()? {
                // Another replica is asking Bill24: wait for its token (or its lock's end). The
                // receiver has seen every change since this attempt began, so a token stored
                // between the read and the lock ends the wait at once.
                let _ = tokio::time::timeout(store.lock_ttl(), changes.changed()).await;
                continue;
            }
            // Another replica may have stored one between the read and the lock.
            let stored = match store.load().await {
                Ok(stored) => stored,
                Err(Unavailable) => {
                    store.release().await;
                    return None;
                }
            };
            if let Some(token) = stored.clone().filter(|t| self.adoptable(t, stale)) {
                store.release().await;
                return Some(Ok(self.adopt(token)));
            }
            // The fleet's newest refresh token, redeemed by the lock holder only.
            let refresh = stored.and_then(|t| t.refresh_token);
            let result = self.attempt(refresh).await;
            if let Ok(token) = &result {
                let _ = store.store(token.shared()).await;
            }
            store.release().await;
            return Some(result);
        }
        None
    }

    /// Whether a stored token is one to use rather than replace: not the one held or refused,
    /// and not itself due for refresh.
    fn adoptable(&self, token: &SharedToken, stale: Option<&Secret>) -> bool {
        if stale.is_some_and(|s| s.expose() == token.token.expose()) {
            return false;
        }
        let now = clock::now_utc();
        match token.expires_at {
            None => true,
            Some(expires) => {
                let lifetime = Duration::try_from(expires - token.issued_at).unwrap_or_default();
                let due = token.issued_at + refresh_after(lifetime, self.margin);
                now < due && now < expires
            }
        }
    }

    /// A token another replica obtained, on this replica's clock.
    fn adopt(&self, shared: SharedToken) -> Arc<AccessToken> {
        let now = Instant::now();
        let now_wall = clock::now_utc();
        let left = |at: OffsetDateTime| Duration::try_from(at - now_wall).unwrap_or_default();
        let refresh_at = shared.expires_at.map(|expires| {
            let lifetime = Duration::try_from(expires - shared.issued_at).unwrap_or_default();
            now + left(shared.issued_at + refresh_after(lifetime, self.margin))
        });
        tracing::info!(
            expires_in_s = shared.expires_at.map(|at| left(at).as_secs()),
            "Bill24 access token taken from the fleet"
        );
        let authorization = bearer(&shared.token);
        Arc::new(AccessToken {
            authorization,
            refresh_token: shared.refresh_token,
            expires_at: shared.expires_at.map(|at| now + left(at)),
            refresh_at,
            issued_wall: shared.issued_at,
            expires_wall: shared.expires_at,
            token: shared.token,
        })
    }

    /// One attempt: the refresh token first when there is one, then a full authorize.
    async fn attempt(&self, refresh: Option<Secret>) -> AttemptResult {
        if let Some(refresh) = refresh {
            match self.authorize(Some(&refresh)).await {
                Ok(token) => return Ok(token),
                Err(e) => tracing::warn!(
                    error = %e,
                    "refreshing the access token failed; trying a full authorize"
                ),
            }
        }
        self.authorize(None).await
    }

    async fn authorize(&self, refresh: Option<&Secret>) -> AttemptResult {
        let via = if refresh.is_some() {
            "refresh_token"
        } else {
            "authorize"
        };
        let body = serde_json::to_vec(&AuthorizeRequest {
            token: self.credentials.merchant_token.expose(),
            client_id: &self.credentials.client_id,
            secret: self.credentials.client_secret.expose(),
            refresh_token: refresh.map(Secret::expose),
        })
        .unwrap_or_default();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let start = Instant::now();
        let reply = self
            .transport
            .post(Endpoint::Authorize, headers, Bytes::from(body))
            .await;
        let (status_label, code_label, result) = match reply {
            Err(e) => (
                e.label().to_string(),
                "-".to_string(),
                Err(TokenError::Transport(e)),
            ),
            Ok(reply) => {
                let status = reply.status.as_str().to_string();
                if reply.status != http::StatusCode::OK {
                    (
                        status,
                        "-".into(),
                        Err(TokenError::Status(reply.status.as_u16())),
                    )
                } else {
                    match wire::parse_authorize(&reply.body) {
                        Ok(issued) => (status, "200".into(), Ok(self.accept(issued))),
                        Err(refused) => {
                            let code = match &refused {
                                AuthorizeRefused::Refused { code, .. } => code.clone(),
                                _ => "-".into(),
                            };
                            (status, code, Err(TokenError::Refused(refused)))
                        }
                    }
                }
            }
        };
        self.metrics.upstream(
            Endpoint::Authorize,
            &status_label,
            &code_label,
            start.elapsed(),
        );
        self.metrics.token_refresh(result.is_ok());
        match &result {
            Ok(token) => tracing::info!(
                via,
                expires_in_s = token
                    .expires_at
                    .map(|at| at.saturating_duration_since(Instant::now()).as_secs()),
                refresh_in_s = token
                    .refresh_at
                    .map(|at| at.saturating_duration_since(Instant::now()).as_secs()),
                "Bill24 access token obtained"
            ),
            Err(e) => tracing::warn!(via, error = %e, "Bill24 access token request failed"),
        }
        result
    }

    fn accept(&self, issued: wire::IssuedToken) -> Arc<AccessToken> {
        let now = Instant::now();
        let lifetime = match issued.expires_at {
            Some(at) => {
                let left = at - clock::now_utc();
                if left.is_positive() {
                    Duration::try_from(left).ok()
                } else {
                    tracing::warn!(
                        "Bill24's tokenExpireTime is already past (clock skew?); using the \
                         token until Bill24 refuses it"
                    );
                    None
                }
            }
            None => {
                tracing::warn!(
                    token_expire_time = issued.unreadable_expiry.as_deref(),
                    "Bill24's tokenExpireTime is missing or unreadable; using the token until \
                     Bill24 refuses it"
                );
                None
            }
        };
        let now_wall = clock::now_utc();
        Arc::new(AccessToken {
            authorization: bearer(&issued.token),
            refresh_token: issued.refresh_token,
            expires_at: lifetime.map(|l| now + l),
            refresh_at: lifetime.map(|l| now + refresh_after(l, self.margin)),
            issued_wall: now_wall,
            expires_wall: lifetime.map(|l| now_wall + l),
            token: issued.token,
        })
    }

    /// When the refresher should next act, or None to wait for a change.
    fn next_due(&self) -> Option<Instant> {
        let st = self.lock();
        if st.attempt.as_ref().is_some_and(|a| !a.is_finished()) {
            return None;
        }
        let due = match &st.token {
            None => Some(Instant::now()),
            Some(token) => token.refresh_at,
        }?;
        Some(st.retry_at.map_or(due, |retry| due.max(retry)))
    }
}

/// Keeps a token: the first at start, then each refresh on time, retrying with backoff.
async fn refresher(inner: Arc<Inner>) {
    loop {
        let changed = inner.changed.notified();
        match inner.next_due() {
            Some(due) if due <= Instant::now() => {
                {
                    let mut st = inner.lock();
                    if st.attempt.as_ref().is_none_or(|a| a.is_finished()) {
                        inner.start_attempt(&mut st);
                    }
                }
                changed.await;
            }
            Some(due) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_time_is_margin_before_expiry_but_not_before_half_life() {
        let h = Duration::from_secs(3600);
        let m5 = Duration::from_secs(300);
        assert_eq!(refresh_after(h, m5), Duration::from_secs(3300));
        assert_eq!(
            refresh_after(Duration::from_secs(4), m5),
            Duration::from_secs(2)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(600), m5),
            Duration::from_secs(300)
        );
        assert_eq!(refresh_after(Duration::ZERO, m5), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_and_caps_at_30s() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(1));
        assert_eq!(backoff(8), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30));
    }
}
