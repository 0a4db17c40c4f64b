//! Per-caller protection, so one noisy service cannot starve the others: the layer that applies
//! each caller's [`CallerLimits`](crate::caller::CallerLimits) (token bucket and cap on requests
//! in flight). Over either, 429 with `Retry-After`. A caller with `limit_scope = "fleet"` has
//! its rate counted over every replica together ([`FleetRate`]: one round trip to the fleet's
//! tier per request); its cap on requests in flight stays this replica's.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::Request;
use tokio::sync::OwnedSemaphorePermit;
use tower::{Layer, Service};

use crate::caller::{FleetRate, OverLimit};
use crate::error::{ErrorResponse, GatewayError, Rejection, Response, reject};
use crate::holding::Holding;
use crate::request_state::RequestState;

#[derive(Clone, Default)]
pub(crate) struct CallerLimitLayer {
    /// Behind a reference of this stack's own (one stack per serving thread).
    fleet: Arc<Option<Arc<dyn FleetRate>>>,
}

impl CallerLimitLayer {
    /// Fleet-scoped callers' rates counted by `fleet` (without one, on this replica alone).
    pub(crate) fn new(fleet: Option<Arc<dyn FleetRate>>) -> Self {
        CallerLimitLayer {
            fleet: Arc::new(fleet),
        }
    }
}

impl<S> Layer<S> for CallerLimitLayer {
    type Service = CallerLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerLimit {
            inner,
            fleet: self.fleet.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct CallerLimit<S> {
    inner: S,
    fleet: Arc<Option<Arc<dyn FleetRate>>>,
}

fn refused(over: OverLimit) -> GatewayError {
    match over {
        OverLimit::Rate { retry_after } => GatewayError::RateLimited { retry_after },
        OverLimit::Concurrency => GatewayError::TooManyConcurrent {
            retry_after: Duration::from_secs(1),
        },
    }
}

type Local<S, E> = Either<Rejection<GatewayError, E>, Holding<S, OwnedSemaphorePermit>>;

impl<S, B> Service<Request<B>> for CallerLimit<S>
where
    S: Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future =
        Either<Local<S::Future, S::Error>, BoxFuture<'static, Result<Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let caller = req
            .extensions()
            .get::<RequestState>()
            .and_then(|s| s.caller());
        let fleet_scoped = match (&*self.fleet, caller) {
            (Some(fleet), Some(caller)) => caller
                .limits
                .fleet_rate()
                .map(|rate| (fleet.clone(), caller.clone(), rate)),
            _ => None,
        };
        if let Some((fleet, caller, (rps, burst))) = fleet_scoped {
            // The service that was made ready goes into the future; a clone stays here.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            return Either::Right(Box::pin(async move {
                if let Err(retry_after) = fleet.admit(&caller.name, rps, burst).await {
                    return Ok(GatewayError::RateLimited { retry_after }.into_response());
                }
                match caller.limits.admit_in_flight() {
                    Ok(permit) => Holding::new(inner.call(req), permit).await,
                    Err(over) => Ok(refused(over).into_response()),
                }
            }));
        }
        let admitted = req
            .extensions()
            .get::<RequestState>()
            .and_then(|s| s.caller())
            .map(|c| c.limits.admit());
        let permit = match admitted {
            None => None,
            Some(Ok(permit)) => permit,
            Some(Err(over)) => return Either::Left(Either::Left(reject(refused(over)))),
        };
        Either::Left(Either::Right(Holding::new(self.inner.call(req), permit)))
    }
}
