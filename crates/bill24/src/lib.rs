//! Bill24, the upstream: balance calls with the merchant access token, at most
//! `upstream.max_in_flight` at once, one shared token refresh and one retry on HTTP 401,
//! retries (with backoff, within the caller's deadline and a retry budget) on connection
//! failures, timeouts and 5xx, a circuit breaker, and each answer classified: passed on, or
//! a [`Failure`] that says what went wrong (the gateway decides what its caller is told).
//! Knows nothing of callers, the cache or serving: the gateway hands it a [`Config`] and an
//! [`Observer`] for its metrics, and gets [`Answer`]s or [`Failure`]s back.

#![forbid(unsafe_code)]
#![deny(unreachable_pub)]

mod budget;
pub mod chain;
pub mod circuit;
mod client;
pub mod fleet;
mod route;
mod secret;
pub mod tls;
pub mod token;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use smol_str::SmolStr;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use budget::RetryBudget;
use circuit::{Admission, Circuit, CircuitState, Transition};
pub use client::{AUTHORIZE_PATH, BALANCE_PATH, MAX_ANSWER_BYTES};
use client::{Reply, Transport, TransportError};
use fleet::{CircuitNews, FleetHooks};
pub use secret::{REDACTED, Secret};
use token::{AccessToken, Credentials, TokenError, TokenManager};

/// The correlation headers a balance call carries (CONTRACT §4).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// How to reach Bill24 and how hard to try: the gateway's `[upstream]` section, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `http://` or `https://` origin (plus optional path prefix), without a trailing `/`.
    pub base_url: String,
    pub merchant_token: Secret,
    pub client_id: String,
    pub client_secret: Secret,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_in_flight: usize,
    pub queue_timeout: Duration,
    pub token_refresh_margin: Duration,
    pub retries: u32,
    pub retry_budget: f64,
    pub circuit_failures: u32,
    pub circuit_cooldown: Duration,
    /// Balance calls per second across the whole fleet (0 = no ceiling); enforced through
    /// [`fleet::FleetHooks`], which the gateway builds from it.
    pub fleet_max_rps: f64,
    /// With a fleet: one circuit for all replicas.
    pub fleet_circuit: bool,
    /// Roots trusted besides the webpki roots, and a client certificate.
    pub tls: tls::Tls,
    /// `upstream.proxy` (`http://[user:pass@]host:port`); `None`: the environment decides
    /// (`HTTPS_PROXY`, `NO_PROXY`, ... as curl reads them).
    pub proxy: Option<Secret>,
}

/// Which Bill24 endpoint a call went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Balance,
    Authorize,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Balance => "balance",
            Endpoint::Authorize => "authorize",
        }
    }
}

/// What the client reports as it works, for the owner's metrics.
pub trait Observer: Send + Sync + 'static {
    /// One request sent to Bill24: `status` is the HTTP status, or `error` / `timeout`;
    /// `bill24_code` the answer's body code, `-` when none.
    fn upstream(&self, endpoint: Endpoint, status: &str, bill24_code: &str, elapsed: Duration);
    /// A balance call that is a retry.
    fn retry(&self);
    /// A retry not made because the retry budget was spent.
    fn retry_denied(&self);
    /// The circuit breaker moved to `state` (`opened`: it has just opened).
    fn circuit(&self, state: CircuitState, opened: bool);
    /// One authorize call (refreshes included) and whether it produced a token.
    fn token_refresh(&self, success: bool);
}

/// Retries are spread over this window when counted against the budget.
const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries always allowed per second, whatever the traffic (as Finagle and linkerd do).
const RETRY_BUDGET_MIN_PER_SEC: u32 = 10;
/// First retry backoff; doubles per retry, with jitter, up to [`MAX_RETRY_BACKOFF`].
const RETRY_BACKOFF: Duration = Duration::from_millis(25);
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// A retry is not worth starting with less than this left before the caller's deadline.
const MIN_ATTEMPT: Duration = Duration::from_millis(20);

/// The pause before retry number `retry` (0-based): half the exponential step plus a random
/// share of the other half (`jitter_draw` uniform in `[0, 1)`).
pub fn retry_backoff(retry: u32, jitter_draw: f64) -> Duration {
    let step = RETRY_BACKOFF
        .saturating_mul(1 << retry.min(8))
        .min(MAX_RETRY_BACKOFF);
    step / 2 + (step / 2).mul_f64(jitter_draw.clamp(0.0, 1.0))
}

/// Why Bill24 gave no usable answer: what happened, not what the caller is told (the gateway
/// decides that). (`EnumIter` lists them for the checks of the gateway's API documents.)
#[derive(Debug, Clone, thiserror::Error, strum::EnumIter)]
pub enum UpstreamError {
    #[error("Bill24 did not answer in time")]
    Timeout,
    #[error("Bill24 could not be reached")]
    Unreachable,
    #[error("the TLS connection to Bill24 failed: {0}")]
    Tls(String),
    #[error("Bill24 answered with an error (HTTP {0})")]
    Status(u16),
    #[error("Bill24's answer was not valid JSON")]
    InvalidAnswer,
    /// A body over [`MAX_ANSWER_BYTES`]: Bill24 answered, but nothing the gateway could use
    /// (and asking again would most likely bring the same).
    #[error("Bill24's answer was larger than {MAX_ANSWER_BYTES} bytes")]
    AnswerTooLarge,
    #[error("Bill24 refused the gateway's access token")]
    Unauthorized,
    #[error("the gateway has no valid Bill24 access token")]
    Token(TokenError),
    #[error("too many requests to Bill24 in flight; try again shortly")]
    Busy,
    #[error("Bill24 is failing; requests are paused for a moment")]
    CircuitOpen {
        /// How long requests stay paused: the cool-down left, or a whole cool-down while the
        /// probe is out.
        paused_for: Duration,
    },
}

impl UpstreamError {
    /// Worth another attempt: the failure may be transient and the request is a read.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout | UpstreamError::Unreachable | UpstreamError::Status(_)
        )
    }

    /// Counts toward opening the circuit: Bill24 (or its token endpoint) failed us. A full
    /// local queue or an open circuit does not.
    pub fn counts_against_circuit(&self) -> bool {
        !matches!(
            self,
            UpstreamError::Busy | UpstreamError::CircuitOpen { .. }
        )
    }

    /// No token: a TLS failure says so (it is what an operator must fix), anything else is
    /// [`UpstreamError::Token`].
    fn from_token(e: TokenError) -> Self {
        match e.tls_failure() {
            Some(reason) => UpstreamError::Tls(reason.to_string()),
            None => UpstreamError::Token(e),
        }
    }

    fn from_transport(e: &TransportError) -> Self {
        match e {
            TransportError::Timeout(_) => UpstreamError::Timeout,
            TransportError::Connect(_) => UpstreamError::Unreachable,
            TransportError::Io(_) | TransportError::Proxy(_) => UpstreamError::Unreachable,
            TransportError::TooLarge(_) => UpstreamError::AnswerTooLarge,
            TransportError::Tls(reason) => UpstreamError::Tls(reason.clone()),
        }
    }
}

/// A failed balance call, with what is known of Bill24's side for the access log.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: UpstreamError,
    pub upstream_status: Option<u16>,
    pub elapsed: Option<Duration>,
}

impl Failure {
    fn new(error: UpstreamError, upstream_status: Option<u16>, elapsed: Option<Duration>) -> Self {
        Failure {
            error,
            upstream_status,
            elapsed,
        }
    }
}

/// Bill24's answer as the caller gets it: HTTP 200 (any body code) or a 4xx other than 401.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    /// The body's `code` (`"000"`, `"311"`, …) when the body is a JSON object that has one.
    pub bill24_code: Option<SmolStr>,
    pub elapsed: Duration,
}

/// What a balance call forwards (the code and the caller's correlation headers), and until
/// when retrying is worth it.
pub struct BalanceCall<'a> {
    pub customer_sync_code: &'a str,
    pub request_id: &'a HeaderValue,
    pub traceparent: HeaderValue,
    /// The caller's deadline: no retry starts that could not finish before it.
    pub deadline: Instant,
}

pub struct Bill24 {
    transport: Arc<Transport>,
    tokens: TokenManager,
    slots: Semaphore,
    queue_timeout: Duration,
    retries: u32,
    budget: RetryBudget,
    circuit: Arc<Circuit>,
    /// `upstream.circuit_failures` (0: the circuit never opens).
    circuit_failures: u32,
    metrics: Arc<dyn Observer>,
    /// The fleet's ceiling and circuit, when replicas share them.
    fleet: Option<Arc<dyn FleetHooks>>,
}

impl Bill24 {
    /// Builds the client and starts the token manager (which asks for a token at once).
    /// `tokens`: where the replicas of a fleet share one merchant token, if they do.
    pub fn start(
        cfg: &Config,
        metrics: Arc<dyn Observer>,
        tokens: Option<Arc<dyn token::TokenStore>>,
    ) -> Result<Self, String> {
        Self::start_in_fleet(cfg, metrics, tokens, None)
    }

    /// Like [`Bill24::start`], for a replica of a fleet that shares a ceiling on balance calls
    /// and one circuit through `fleet`. Must be called within a runtime.
    pub fn start_in_fleet(
        cfg: &Config,
        metrics: Arc<dyn Observer>,
        tokens: Option<Arc<dyn token::TokenStore>>,
        fleet: Option<Arc<dyn FleetHooks>>,
    ) -> Result<Self, String> {
        let transport = Arc::new(Transport::new(cfg)?);
        tracing::info!(route = transport.route(), "Bill24 connections");
        let tokens = TokenManager::start(
            transport.clone(),
            Credentials {
                merchant_token: cfg.merchant_token.clone(),
                client_id: cfg.client_id.clone(),
                client_secret: cfg.client_secret.clone(),
            },
            cfg.token_refresh_margin,
            metrics.clone(),
            tokens,
        );
        let circuit = Arc::new(Circuit::new(cfg.circuit_failures, cfg.circuit_cooldown));
        if let Some(fleet) = &fleet {
            tokio::spawn(follow_the_fleet(
                fleet.circuit_news(),
                circuit.clone(),
                metrics.clone(),
            ));
        }
        Ok(Bill24 {
            transport,
            tokens,
            slots: Semaphore::new(cfg.max_in_flight),
            queue_timeout: cfg.queue_timeout,
            retries: cfg.retries,
            budget: RetryBudget::new(
                RETRY_BUDGET_WINDOW,
                RETRY_BUDGET_MIN_PER_SEC,
                cfg.retry_budget,
                Instant::now(),
            ),
            circuit,
            circuit_failures: cfg.circuit_failures,
            metrics,
            fleet,
        })
    }

    pub fn tokens(&self) -> &TokenManager {
        &self.tokens
    }

    /// Where the circuit breaker on Bill24 stands now.
    pub fn circuit_state(&self) -> CircuitState {
        self.circuit.state()
    }

    /// Asks Bill24 for a balance: through the circuit breaker, retrying what is worth it.
    pub async fn balance(&self, call: &BalanceCall<'_>) -> Result<Answer, Failure> {
        let admission = match self.circuit.admit(Instant::now()) {
            Ok((Admission::Probe, transition)) => {
                // One probe for the fleet: another replica's outcome decides here too.
                if let Some(fleet) = &self.fleet
                    && !fleet.claim_probe(self.circuit.cooldown()).await
                {
                    self.circuit.probe_elsewhere(Instant::now());
                    return Err(Failure::new(
                        UpstreamError::CircuitOpen {
                            paused_for: self.circuit.cooldown(),
                        },
                        None,
                        None,
                    ));
                }
                self.circuit_moved(transition);
                Admission::Probe
            }
            Ok((admission, transition)) => {
                self.circuit_moved(transition);
                admission
            }
            Err(wait) => {
                return Err(Failure::new(
                    UpstreamError::CircuitOpen { paused_for: wait },
                    None,
                    None,
                ));
            }
        };
        self.budget.deposit(Instant::now());
        let mut retries = 0;
        let result = loop {
            // The first attempt may outlive the caller (its answer still fills the cache for
            // the next one); a retry never does.
            let limit = if retries == 0 {
                self.transport.timeout()
            } else {
                call.deadline.saturating_duration_since(Instant::now())
            };
            let result = self.exchange(call, limit).await;
            let Err(failure) = &result else {
                break result;
            };
            if !failure.error.is_retryable() || retries >= self.retries {
                break result;
            }
            let pause = retry_backoff(retries, rand::random::<f64>());
            if Instant::now() + pause + MIN_ATTEMPT >= call.deadline {
                break result;
            }
            if !self.budget.withdraw(Instant::now()) {
                self.metrics.retry_denied();
                break result;
            }
            retries += 1;
            self.metrics.retry();
            tracing::debug!(
                request_id = call.request_id.to_str().unwrap_or("-"),
                retry = retries,
                error = %failure.error,
                "retrying the Bill24 call"
            );
            tokio::time::sleep(pause).await;
        };
        let failed = matches!(&result, Err(f) if f.error.counts_against_circuit());
        let mut transition = self.circuit.record(admission, failed, Instant::now());
        if let Some(fleet) = &self.fleet
            && admission == Admission::Normal
            && transition.is_none()
        {
            if result.is_ok() {
                fleet.succeeded();
            } else if failed
                && self.circuit.state() == CircuitState::Closed
                && self.circuit_failures > 0
                && fleet
                    .failed(self.circuit_failures, self.circuit.cooldown())
                    .await
            {
                // The fleet's failures, not only this replica's, open the circuit.
                transition = self
                    .circuit
                    .open_for(self.circuit.cooldown(), Instant::now());
            }
        }
        self.circuit_moved(transition);
        if let Some(fleet) = &self.fleet {
            match transition {
                Some(Transition::Opened) => fleet.circuit_opened(self.circuit.cooldown()),
                Some(Transition::Closed) => fleet.circuit_closed(),
                _ => {}
            }
        }
        result
    }

    fn circuit_moved(&self, transition: Option<Transition>) {
        circuit_moved(self.metrics.as_ref(), &self.circuit, transition, false);
    }

    /// One exchange: a token, the call, and on a 401 one shared refresh and one more call,
    /// each call within `limit`.
    async fn exchange(&self, call: &BalanceCall<'_>, limit: Duration) -> Result<Answer, Failure> {
        let start = Instant::now();
        let token = self
            .tokens
            .token()
            .await
            .map_err(|e| Failure::new(UpstreamError::from_token(e), None, None))?;
        let mut attempt = self.send(&token, call, limit).await?;
        if attempt.reply.status == StatusCode::UNAUTHORIZED {
            let token = self.tokens.refused(&token).await.map_err(|e| {
                Failure::new(
                    UpstreamError::from_token(e),
                    Some(401),
                    Some(start.elapsed()),
                )
            })?;
            attempt = self.send(&token, call, limit).await?;
            if attempt.reply.status == StatusCode::UNAUTHORIZED {
                return Err(Failure::new(
                    UpstreamError::Unauthorized,
                    Some(401),
                    Some(start.elapsed()),
                ));
            }
        }
        classify(attempt, start.elapsed())
    }

    /// One POST, holding an upstream slot for its duration.
    async fn send(
        &self,
        token: &AccessToken,
        call: &BalanceCall<'_>,
        limit: Duration,
    ) -> Result<Attempt, Failure> {
        // A place under the fleet's ceiling first (waiting in line, within `queue_timeout`).
        if let Some(fleet) = &self.fleet {
            match fleet.reserve(self.queue_timeout).await {
                Ok(wait) if wait.is_zero() => {}
                Ok(wait) => tokio::time::sleep(wait).await,
                Err(fleet::NoSlot) => return Err(Failure::new(UpstreamError::Busy, None, None)),
            }
        }
        let _slot = match tokio::time::timeout(self.queue_timeout, self.slots.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(Failure::new(UpstreamError::Busy, None, None)),
        };
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(AUTHORIZATION, token.authorization().clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(X_REQUEST_ID, call.request_id.clone());
        headers.insert(TRACEPARENT, call.traceparent.clone());
        let body = serde_json::to_vec(&wire::BalanceRequest {
            customer_sync_code: call.customer_sync_code,
        })
        .unwrap_or_default();
        let start = Instant::now();
        match self
            .transport
            .post_within(Endpoint::Balance, headers, Bytes::from(body), limit)
            .await
        {
            Ok(reply) => {
                let code = read_code(&reply);
                let label = match &code {
                    Ok(Some(c)) => c.as_ref(),
                    _ => "-",
                };
                self.metrics.upstream(
                    Endpoint::Balance,
                    reply.status.as_str(),
                    label,
                    reply.elapsed,
                );
                Ok(Attempt { reply, code })
            }
            Err(e) => {
                let elapsed = start.elapsed();
                self.metrics
                    .upstream(Endpoint::Balance, e.label(), "-", elapsed);
                tracing::warn!(
                    request_id = call.request_id.to_str().unwrap_or("-"),
                    error = %e,
                    "Bill24 balance call failed"
                );
                let upstream_status = match e {
                    TransportError::TooLarge(status) => Some(status.as_u16()),
                    _ => None,
                };
                Err(Failure::new(
                    UpstreamError::from_transport(&e),
                    upstream_status,
                    Some(match e {
                        TransportError::Timeout(t) => t,
                        _ => elapsed,
                    }),
                ))
            }
        }
    }

    pub fn timeout(&self) -> Duration {
        self.transport.timeout()
    }

    pub fn stop(&self) {
        self.tokens.stop();
    }
}

struct Attempt {
    reply: Reply,
    code: Result<Option<SmolStr>, wire::NotJson>,
}

/// The body code of a 2xx/4xx JSON answer (other answers are not read).
fn read_code(reply: &Reply) -> Result<Option<SmolStr>, wire::NotJson> {
    if reply.status.is_success() || reply.status.is_client_error() {
        wire::balance_code(&reply.body)
    } else {
        Ok(None)
    }
}

/// 200 (JSON) and 4xx pass through; everything else is a failure.
fn classify(attempt: Attempt, elapsed: Duration) -> Result<Answer, Failure> {
    let Attempt { reply, code } = attempt;
    let status = reply.status;
    let fail = |error| Err(Failure::new(error, Some(status.as_u16()), Some(elapsed)));
    if status == StatusCode::OK {
        match code {
            Ok(bill24_code) => Ok(Answer {
                status,
                content_type: reply.content_type,
                body: reply.body,
                bill24_code,
                elapsed,
            }),
            Err(_) => fail(UpstreamError::InvalidAnswer),
        }
    } else if status.is_client_error() {
        Ok(Answer {
            status,
            content_type: reply.content_type,
            body: reply.body,
            bill24_code: code.ok().flatten(),
            elapsed,
        })
    } else {
        fail(UpstreamError::Status(status.as_u16()))
    }
}

/// Logs and counts a move of the circuit; `remote`: made by another replica's news.
fn circuit_moved(
    metrics: &dyn Observer,
    circuit: &Circuit,
    transition: Option<Transition>,
    remote: bool,
) {
    let Some(transition) = transition else {
        return;
    };
    metrics.circuit(circuit.state(), transition == Transition::Opened);
    let by = if remote {
        "another replica"
    } else {
        "this replica"
    };
    match transition {
        Transition::Opened => {
            tracing::warn!(
                by,
                "circuit to Bill24 opened: requests fail fast until a probe succeeds"
            );
        }
        Transition::HalfOpened => {
            tracing::info!("circuit to Bill24 half-open: sending one probe request");
        }
        Transition::Closed => {
            tracing::info!(by, "circuit to Bill24 closed: Bill24 answers again")
        }
    }
}

/// Applies what other replicas' circuits did to this one, for as long as the fleet tells.
async fn follow_the_fleet(
    mut news: watch::Receiver<CircuitNews>,
    circuit: Arc<Circuit>,
    metrics: Arc<dyn Observer>,
) {
    while news.changed().await.is_ok() {
        let latest = *news.borrow_and_update();
        let transition = match latest {
            CircuitNews::None => None,
            CircuitNews::Opened { cooldown, .. } => circuit.open_for(cooldown, Instant::now()),
            CircuitNews::Closed { .. } => circuit.close(),
        };
        circuit_moved(metrics.as_ref(), &circuit, transition, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_grows_with_jitter_and_a_cap() {
        assert_eq!(retry_backoff(0, 0.0), Duration::from_micros(12_500));
        assert_eq!(retry_backoff(0, 1.0), Duration::from_millis(25));
        assert_eq!(retry_backoff(1, 0.0), Duration::from_millis(25));
        assert_eq!(retry_backoff(1, 1.0), Duration::from_millis(50));
        assert_eq!(retry_backoff(10, 1.0), MAX_RETRY_BACKOFF);
        assert_eq!(retry_backoff(u32::MAX, 0.0), MAX_RETRY_BACKOFF / 2);
    }

    #[test]
    fn what_is_retried_and_what_opens_the_circuit() {
        assert!(UpstreamError::Timeout.is_retryable());
        assert!(UpstreamError::Unreachable.is_retryable());
        assert!(UpstreamError::Status(503).is_retryable());
        assert!(!UpstreamError::InvalidAnswer.is_retryable());
        assert!(!UpstreamError::AnswerTooLarge.is_retryable());
        assert!(UpstreamError::AnswerTooLarge.counts_against_circuit());
        assert!(matches!(
            UpstreamError::from_transport(&TransportError::TooLarge(StatusCode::OK)),
            UpstreamError::AnswerTooLarge
        ));
        assert!(!UpstreamError::Unauthorized.is_retryable());
        assert!(!UpstreamError::Busy.is_retryable());
        assert!(!UpstreamError::Token(TokenError::Abandoned).is_retryable());
        assert!(UpstreamError::Token(TokenError::Abandoned).counts_against_circuit());
        assert!(!UpstreamError::Busy.counts_against_circuit());
        assert!(
            !UpstreamError::CircuitOpen {
                paused_for: Duration::from_secs(1)
            }
            .counts_against_circuit()
        );
    }
}
