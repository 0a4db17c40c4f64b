//! Correlation: the outermost layer, which gives each request its [`RequestState`] (id and
//! trace from [`context`]) and stamps `X-Request-Id` on every response, errors included, whose
//! JSON body it renders.

pub(crate) mod context;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Request;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::{Response, render_body};
use crate::request_state::RequestState;
use context::{RequestId, TraceContext, X_REQUEST_ID};

/// Outermost layer: puts the request's [`RequestState`] (id and trace) into its extensions,
/// and on the way out sets `X-Request-Id` and renders any pending error body.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CorrelationLayer;

impl<S> Layer<S> for CorrelationLayer {
    type Service = Correlation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Correlation { inner }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Correlation<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Correlation<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = CorrelationFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let state = RequestState::new(
            RequestId::from_headers(req.headers()),
            TraceContext::from_headers(req.headers()),
        );
        req.extensions_mut().insert(state.clone());
        CorrelationFuture {
            inner: self.inner.call(req),
            state,
        }
    }
}

pin_project! {
    /// The inner answer, with its `X-Request-Id` and, for an error, its body.
    pub struct CorrelationFuture<F> {
        #[pin]
        inner: F,
        state: RequestState,
    }
}

impl<F, E> Future for CorrelationFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        let id = this.state.id();
        render_body(&mut response, id.as_str());
        response
            .headers_mut()
            .insert(X_REQUEST_ID, id.header_value());
        Poll::Ready(Ok(response))
    }
}
