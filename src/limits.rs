//! Per-caller protection, so one noisy service cannot starve the others: the layer that applies
//! each caller's [`CallerLimits`](crate::caller::CallerLimits) (token bucket and cap on requests
//! in flight). Over either, 429 with `Retry-After`.

use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::Request;
use tokio::sync::OwnedSemaphorePermit;
use tower::{Layer, Service};

use crate::caller::OverLimit;
use crate::error::{GatewayError, Rejection, Response, reject};
use crate::holding::Holding;
use crate::request_state::RequestState;

#[derive(Clone, Copy, Debug, Default)]
pub struct CallerLimitLayer;

impl<S> Layer<S> for CallerLimitLayer {
    type Service = CallerLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallerLimit { inner }
    }
}

#[derive(Clone, Debug)]
pub struct CallerLimit<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for CallerLimit<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future =
        Either<Rejection<GatewayError, S::Error>, Holding<S::Future, OwnedSemaphorePermit>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let admitted = req
            .extensions()
            .get::<RequestState>()
            .and_then(|s| s.caller())
            .map(|c| c.limits.admit());
        let permit = match admitted {
            None => None,
            Some(Ok(permit)) => permit,
            Some(Err(OverLimit::Rate { retry_after })) => {
                return Either::Left(reject(GatewayError::RateLimited { retry_after }));
            }
            Some(Err(OverLimit::Concurrency)) => {
                return Either::Left(reject(GatewayError::TooManyConcurrent {
                    retry_after: Duration::from_secs(1),
                }));
            }
        };
        Either::Right(Holding::new(self.inner.call(req), permit))
    }
}
