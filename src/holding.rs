//! A future that keeps a guard alive until its inner future is ready: a caller's concurrency
//! slot, a connection's "request in service" mark.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

pin_project! {
    /// The inner future's output; the guard is dropped as soon as that output is ready (or with
    /// this future, when it is dropped first).
    pub struct Holding<F, G> {
        #[pin]
        inner: F,
        guard: Option<G>,
    }
}

impl<F, G> Holding<F, G> {
    pub(crate) fn new(inner: F, guard: Option<G>) -> Self {
        Holding { inner, guard }
    }
}

impl<F: Future, G> Future for Holding<F, G> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx));
        this.guard.take();
        Poll::Ready(output)
    }
}
