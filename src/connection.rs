//! Per-connection timeouts, in the shape the contract gives them:
//! - `server.idle_timeout`: a connection with no request in progress is closed after this long
//!   (HTTP/1.1 keep-alive between requests, HTTP/2 with no open stream);
//! - `server.header_read_timeout`: once the first byte of an HTTP/1.1 request has arrived, its
//!   head must be complete within this (slowloris); and a connection's first request must have
//!   reached the service within this of the connection's start, so that a connection that
//!   sends nothing, or only the HTTP/2 preface and SETTINGS, does not hold its slot for the
//!   whole `server.idle_timeout`;
//! - a write that makes no progress for [`write_stall_limit`] (`server.idle_timeout`, at most
//!   10 s) ends the connection: a client that sends (pipelined requests, HTTP/2 PINGs) but
//!   never reads would otherwise hold its connection, and the unsent answers, for ever, since
//!   the read deadlines only run while the gateway waits to read.
//!
//! hyper's own header timer starts as soon as it waits for a head, so it would also close
//! keep-alive connections that are merely idle; hence this wrapper. [`TimedIo`] watches the
//! bytes, [`Tracked`] tells it when the service has a request; when a deadline passes, the next
//! read fails with `TimedOut` and hyper closes the connection.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::holding::Holding;

/// What the connection's service is doing, shared with its [`TimedIo`].
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    in_service: AtomicUsize,
    /// Requests handed to the service so far.
    started: AtomicU64,
    /// When the service last finished a request (nanoseconds since `epoch`).
    idle_since: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_service: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
        })
    }

    fn begin(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_service.fetch_add(1, Ordering::AcqRel);
    }

    fn end(&self) {
        let since = self.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.idle_since.store(since, Ordering::Release);
        self.in_service.fetch_sub(1, Ordering::AcqRel);
    }

    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.idle_since.load(Ordering::Acquire))
    }

    /// Whether a request is in the service now.
    fn serving(&self) -> bool {
        self.in_service.load(Ordering::Acquire) > 0
    }

    /// Whether the connection has ever had a request.
    fn ever_asked(&self) -> bool {
        self.started.load(Ordering::Acquire) > 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Unknown,
    Http1,
    Http2,
}

/// The longest a write may make no progress: `server.idle_timeout`, and never more than 10 s
/// (a peer that takes no data for that long is not reading).
pub(crate) fn write_stall_limit(idle_timeout: Duration) -> Duration {
    idle_timeout.min(Duration::from_secs(10))
}

/// A connection's IO with the idle and header deadlines applied to its reads, and the
/// write-progress deadline to its writes.
pub(crate) struct TimedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    header_timeout: Duration,
    idle_timeout: Duration,
    write_limit: Duration,
    protocol: Protocol,
    /// An HTTP/1 head is arriving: since when, and how many requests had started then.
    head_started: Option<(Instant, u64)>,
    timer: Pin<Box<Sleep>>,
    /// While writes make no progress: since when, and the timer that ends the connection
    /// (made on the first stall only: writes on a healthy connection never wait).
    write_stall: Option<(Instant, Pin<Box<Sleep>>)>,
}

impl<T> TimedIo<T> {
    pub(crate) fn new(
        inner: T,
        activity: Arc<Activity>,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let timer = Box::pin(tokio::time::sleep(idle_timeout));
        TimedIo {
            inner,
            activity,
            header_timeout,
            idle_timeout,
            write_limit: write_stall_limit(idle_timeout),
            protocol: Protocol::Unknown,
            head_started: None,
            timer,
            write_stall: None,
        }
    }

    /// A write (or flush) that could not go on: pending until the peer takes data, or an error
    /// once it has taken none for the write limit.
    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let now = Instant::now();
        let limit = self.write_limit;
        let (since, timer) = self
            .write_stall
            .get_or_insert_with(|| (now, Box::pin(tokio::time::sleep(limit))));
        if now >= *since + limit || timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer has taken no data for the write limit",
            )));
        }
        Poll::Pending
    }

    /// The outcome of a write or flush, stall bookkeeping done.
    fn wrote<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
        progressed: impl FnOnce(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        match result {
            Poll::Pending => self.stalled(cx),
            Poll::Ready(Ok(r)) => {
                if progressed(&r) {
                    self.write_stall = None;
                }
                Poll::Ready(Ok(r))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    fn saw_bytes(&mut self, bytes: &[u8]) {
        if self.protocol == Protocol::Unknown {
            // The HTTP/2 connection preface starts with "PRI * HTTP/2.0".
            self.protocol = if bytes.starts_with(b"PRI") {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
        }
        if self.protocol == Protocol::Http1
            && self.head_started.is_none()
            && self.activity.in_service.load(Ordering::Acquire) == 0
        {
            self.head_started = Some((
                Instant::now(),
                self.activity.started.load(Ordering::Acquire),
            ));
        }
    }

    /// The deadline that applies while waiting for bytes, if any.
    fn deadline(&mut self) -> Option<Instant> {
        if self.activity.serving() {
            // A request is being served: `server.request_timeout` governs it.
            return None;
        }
        let idle = self.activity.idle_since() + self.idle_timeout;
        if !self.activity.ever_asked() {
            // No request yet: silent, a head still arriving, or an HTTP/2 preface and nothing
            // more. The first request has `server.header_read_timeout` from the start.
            return Some(idle.min(self.activity.epoch + self.header_timeout));
        }
        if let Some((since, started)) = self.head_started {
            if self.activity.started.load(Ordering::Acquire) == started {
                return Some(since + self.header_timeout);
            }
            // That head was read and its request served.
            self.head_started = None;
        }
        Some(idle)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.saw_bytes(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(deadline) = this.deadline() else {
                    return Poll::Pending;
                };
                // Re-arm only for an earlier deadline: moving the timer on every request
                // costs a timer-wheel update each time, while a timer that fires early is
                // simply set again below.
                if deadline < this.timer.deadline() {
                    this.timer.as_mut().reset(deadline);
                }
                loop {
                    match this.timer.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) if Instant::now() >= deadline => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "connection idle or request head too slow",
                            )));
                        }
                        Poll::Ready(()) => this.timer.as_mut().reset(deadline),
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(cx, result, |n| *n > 0)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(cx, result, |_| true)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, result, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The connection's service, telling [`Activity`] when a request is in it.
#[derive(Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

pub(crate) struct InService(Arc<Activity>);

impl Drop for InService {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl<S, R> Service<R> for Tracked<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    /// The request counts as in service until its answer is ready (or dropped).
    type Future = Holding<S::Future, InService>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.activity.begin();
        let guard = InService(self.activity.clone());
        Holding::new(self.inner.call(req), Some(guard))
    }
}

/// The open connections of a listener that makes room for a new connection rather than make
/// it wait (the admin listener: a probe must get through however many connections others
/// hold). Oldest first: the ids grow with each connection.
#[derive(Default)]
pub(crate) struct Roster {
    open: Mutex<RosterState>,
}

#[derive(Default)]
struct RosterState {
    next: u64,
    members: BTreeMap<u64, (Arc<Activity>, Arc<Notify>)>,
}

/// A connection's place on a [`Roster`]; leaves it when dropped.
pub(crate) struct Ticket {
    id: u64,
    roster: Arc<Roster>,
    evict: Arc<Notify>,
}

impl Ticket {
    /// Resolves when the roster has picked this connection to make room.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.roster.state().members.remove(&self.id);
    }
}

impl Roster {
    fn state(&self) -> std::sync::MutexGuard<'_, RosterState> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn join(self: &Arc<Self>, activity: Arc<Activity>) -> Ticket {
        let evict = Arc::new(Notify::new());
        let mut state = self.state();
        let id = state.next;
        state.next += 1;
        state.members.insert(id, (activity, evict.clone()));
        Ticket {
            id,
            roster: self.clone(),
            evict,
        }
    }

    /// Tells one connection to close: the oldest that has never had a request, else the
    /// oldest with no request in service. False when every connection is serving one.
    pub(crate) fn evict_one(&self) -> bool {
        let mut state = self.state();
        let idle = |a: &Activity| !a.serving();
        let pick = state
            .members
            .iter()
            .find(|(_, (a, _))| idle(a) && !a.ever_asked())
            .or_else(|| state.members.iter().find(|(_, (a, _))| idle(a)))
            .map(|(id, _)| *id);
        let Some((_, evict)) = pick.and_then(|id| state.members.remove(&id)) else {
            return false;
        };
        // Stored if the connection is not waiting yet: it sees it when it next looks.
        evict.notify_one();
        true
    }
}
