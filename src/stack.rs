//! The request path of the in-house endpoint, top to bottom, in one place.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::Either;
use http::{Method, Request};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceBuilder};

use crate::access_log::{AccessLogLayer, AccessSample, InFlight, UnauthorizedLines};
use crate::auth::{AuthLayer, CallerKeys};
use crate::balance::request::ParseLayer;
use crate::balance::service::{BalanceService, Balances};
use crate::caller::FleetRate;
use crate::correlation::CorrelationLayer;
use crate::error::{ErrorResponse, GatewayError, Rejection, Response, reject};
use crate::identity::Identity;
use crate::limits::CallerLimitLayer;
use crate::metrics::Metrics;
use crate::request_state::RequestState;

/// The one endpoint: the same path as Bill24's, so a service switches by its base URL.
pub(crate) use bill24::BALANCE_PATH;

/// What the stack is built from.
#[derive(Clone)]
pub struct StackParts {
    pub metrics: Arc<Metrics>,
    pub in_flight: InFlight,
    pub access_sample: AccessSample,
    /// The limit on 401 access lines, one for the gateway.
    pub unauthorized_lines: UnauthorizedLines,
    pub callers: Arc<ArcSwap<CallerKeys>>,
    pub balances: Arc<Balances>,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    /// Where fleet-scoped callers' rates are counted (with `[redis]`).
    pub fleet_rate: Option<Arc<dyn FleetRate>>,
    /// JWT and client-certificate callers.
    pub identity: Arc<Identity>,
}

/// Builds the service the main listener serves. Checks run in the contract's order: route
/// (404/405), caller key (401), rate limit (429), Content-Type (415), size (413), body (400);
/// the deadline (504) covers reading the body and everything after.
pub fn build<B>(
    parts: &StackParts,
) -> impl Service<
    Request<B>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send + 'static + use<B>,
>
+ Clone
+ Send
+ 'static
+ use<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    ServiceBuilder::new()
        // X-Request-Id and traceparent in, X-Request-Id and error bodies out.
        .layer(CorrelationLayer)
        // One access log line and request metrics per request.
        .layer(AccessLogLayer::new(
            parts.metrics.clone(),
            parts.in_flight.clone(),
            parts.access_sample.clone(),
            parts.unauthorized_lines.clone(),
        ))
        // 404 / 405.
        .layer(RouteLayer)
        // 401; the caller's identity for everything below.
        .layer(AuthLayer::new(parts.callers.clone(), &parts.identity))
        // 429: the caller's rate limit and concurrency cap.
        .layer(CallerLimitLayer::new(parts.fleet_rate.clone()))
        // 504 once `server.request_timeout` has passed.
        .layer(DeadlineLayer::new(parts.request_timeout))
        // 415, 413, 400; the validated query.
        .layer(ParseLayer::new(parts.max_body_bytes))
        // Cache, coalescing, Bill24.
        .service(BalanceService::new(parts.balances.clone()))
}

/// Answers 504 when the inner service has not answered within the deadline. (tower's
/// `Timeout` reports an error instead, which this stack, whose services never fail, would
/// have to turn back into a response without the request at hand.)
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeadlineLayer {
    deadline: Duration,
}

impl DeadlineLayer {
    pub(crate) fn new(deadline: Duration) -> Self {
        DeadlineLayer { deadline }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            deadline: self.deadline,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Deadline<S> {
    inner: S,
    deadline: Duration,
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // From when the request came in; recorded in the request's state, where the balance
        // path reads it for the deadline Bill24 retries keep to.
        let deadline = match req.extensions().get::<RequestState>() {
            Some(state) => state.set_deadline(self.deadline),
            None => Instant::now() + self.deadline,
        };
        DeadlineFuture {
            inner: self.inner.call(req),
            deadline,
            timer: None,
        }
    }
}

pin_project! {
    /// The inner service's answer, or 504 once the deadline passes. The timer is set only
    /// when the answer is not ready at once (a cache hit never needs one).
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        deadline: Instant,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for DeadlineFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(answer) = this.inner.poll(cx) {
            return Poll::Ready(answer);
        }
        let deadline = *this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Ok(GatewayError::DeadlineExceeded.into_response()))
    }
}

/// An HTTP/1.1 request must carry exactly one `Host` (RFC 9112 §3.2: 400 otherwise). HTTP/1.0
/// may omit it; HTTP/2 names the authority in its own pseudo-header.
pub(crate) fn host_ok<B>(req: &Request<B>) -> bool {
    req.version() != http::Version::HTTP_11
        || req.headers().get_all(http::header::HOST).iter().count() == 1
}

/// 400 for an HTTP/1.1 request without exactly one `Host`, 404 for any path but
/// [`BALANCE_PATH`], 405 (with `Allow: POST`) for any method but POST.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RouteLayer;

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Route { inner }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Route<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Route<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Rejection<GatewayError, S::Error>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let rejection = if !host_ok(&req) {
            Some(GatewayError::InvalidHost)
        } else if req.uri().path() != BALANCE_PATH {
            Some(GatewayError::NotFound)
        } else if req.method() != Method::POST {
            Some(GatewayError::MethodNotAllowed)
        } else {
            None
        };
        match rejection {
            Some(e) => Either::Left(reject(e)),
            None => Either::Right(self.inner.call(req)),
        }
    }
}
