//! Serving: the accept loops of both listeners (HTTP/1.1 keep-alive and h2c prior knowledge on
//! one port), a cap on open connections, and graceful shutdown (CONTRACT §7).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use bill24::chain::Chain;

use crate::config::ServerConfig;
use crate::connection::{Activity, Roster, Ticket, TimedIo, Tracked};
use crate::error::Response;
use crate::identity::tls::ListenerTls;

/// The runtime for `server.worker_threads`: that many workers, or one per CPU when 0. One
/// thread means a current-thread runtime: accepting and serving on the same thread, with no
/// work-stealing machinery and no second thread running the accept loops.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

/// Largest request head accepted (HTTP/1 read buffer; HTTP/2 header list).
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// HTTP/2 streams a client may have open on one connection.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 streams reset by the client before being served that a connection may pile up
/// (rapid reset, CVE-2023-44487): past it, GOAWAY.
pub(crate) const MAX_PENDING_RESETS: usize = 32;
/// HTTP/2 streams the gateway may reset because the client erred, over a connection's life
/// (a client provoking resets, CVE-2025-8671): past it, GOAWAY. h2's default. Streams opened
/// beyond `MAX_CONCURRENT_STREAMS` count here: each is refused alone (REFUSED_STREAM, safe to
/// retry) while the client's other streams go on, so a client that merely opens too many
/// before reading the gateway's SETTINGS keeps its connection (with 32 it lost it, and every
/// stream in flight, after 32 excess streams).
pub(crate) const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The connection builder shared by both listeners: limits on heads and HTTP/2 streams.
pub(crate) fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // `TimedIo` applies `server.header_read_timeout` and `server.idle_timeout`.
        .header_read_timeout(None)
        // hyper's own limit of 100 header fields applies: setting one explicitly makes it
        // initialise a 100-slot array on every request (measured: 1.5k instructions).
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        // Rapid-reset (CVE-2023-44487) and error-reset floods close the connection.
        .max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    builder
}

/// HTTP/2 streams a client may have open on one admin connection: probes and scrapes need one
/// or two, and each open stream may hold an answer the client does not take (an HTTP/2 window
/// of 0), so few keep what a connection can make the gateway hold small.
pub(crate) const ADMIN_MAX_CONCURRENT_STREAMS: u32 = 8;

/// The admin listener's connection builder: [`connection_builder`] with fewer HTTP/2 streams.
pub(crate) fn admin_connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = connection_builder();
    builder
        .http2()
        .max_concurrent_streams(ADMIN_MAX_CONCURRENT_STREAMS);
    builder
}

/// Pending connections the kernel may queue per listener (capped by `net.core.somaxconn`).
/// The default of 128 drops SYNs when a few hundred clients connect at once, costing each a
/// one-second retransmit.
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// The kernel's send buffer for each accepted connection (it inherits the listener's). Fixed
/// rather than auto-tuned: answers are small, and a client that stops reading must not make
/// the kernel hold megabytes of unsent answers per connection (auto-tuning grew them to about
/// 3 MB each in an attack) for as long as the write limit lets it.
pub(crate) const SEND_BUFFER: u32 = 64 * 1024;

/// A listener on `addr` with [`LISTEN_BACKLOG`], [`SEND_BUFFER`] and `SO_REUSEADDR` (so a
/// restart does not wait for old connections in TIME_WAIT).
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket_for(addr)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn socket_for(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_send_buffer_size(SEND_BUFFER)?;
    Ok(socket)
}

/// `count` listeners on one port (`addr`'s, or one the kernel picks for port 0), sharing it
/// with `SO_REUSEPORT`: the kernel spreads new connections over them, one per serving thread,
/// as nginx's workers do. Returned unregistered, for each thread's runtime to take.
///
/// A port in use fails as with [`listen`], also when its holder shares it the same way (a
/// second gateway on the same port would otherwise quietly take half the connections): a
/// socket without `SO_REUSEPORT` is bound to the port first, which only a free port allows,
/// and closed before the group binds.
#[cfg(unix)]
pub(crate) fn listen_group(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let addr = {
        let probe = socket_for(addr)?;
        probe.bind(addr)?;
        probe.local_addr()?
    };
    (0..count.max(1))
        .map(|_| {
            let socket = socket_for(addr)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)?.into_std()
        })
        .collect()
}

/// What a listener does with a new connection when `max_connections` are open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WhenFull {
    /// It waits in the listen backlog until one closes (the main listener).
    Wait,
    /// One without a request in service is closed to make room (the admin listener: probes
    /// must get through however many connections others hold).
    Evict,
}

/// How connections are accepted and timed out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    pub max_connections: usize,
    pub when_full: WhenFull,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    pub(crate) fn from_config(cfg: &ServerConfig) -> Self {
        ConnectionLimits {
            max_connections: cfg.max_connections,
            when_full: WhenFull::Wait,
            header_read_timeout: cfg.header_read_timeout,
            idle_timeout: cfg.idle_timeout,
        }
    }
}

/// Accepts connections until `stop` turns true, serving each with `service` and registering it
/// with `graceful`; over TLS when `tls` is given (the handshake within
/// `limits.header_read_timeout`, in the connection's own task). At most as many connections as
/// `slots` has permits are open at once (several listeners may share them, one per serving
/// thread); beyond that, new connections wait in the listen backlog (this listener holds at
/// most one accepted connection until a slot frees, so a slot never waits idle behind a
/// listener the kernel did not pick) or another is closed for them, as `limits.when_full`
/// says. Returns (dropping the listener) once stopped.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn accept_loop<S, F>(
    listener: TcpListener,
    tls: Option<Arc<ListenerTls>>,
    service: S,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) where
    S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible, Future = F>
        + Clone
        + Send
        + 'static,
    F: Future<Output = Result<Response, Infallible>> + Send + 'static,
{
    let roster = (limits.when_full == WhenFull::Evict).then(|| Arc::new(Roster::default()));
    loop {
        if *stop.borrow() {
            return;
        }
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full. The admin listener closes one that is not serving; either way this
                // connection takes the next slot to free up, and the listener accepts no
                // other meanwhile.
                if let Some(roster) = &roster {
                    roster.evict_one();
                }
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = stop.changed() => return,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let ticket = roster.as_ref().map(|r| r.join(activity.clone()));
        let Some(tls) = &tls else {
            let conn = serve(stream, service.clone(), builder, limits, activity);
            // Boxed once here: the connection's state is large (HTTP/1 and HTTP/2 both), and
            // a task's future is otherwise moved several times as the task is set up.
            let conn = Box::pin(graceful.watch(conn));
            tokio::spawn(finish(conn, ticket, permit));
            continue;
        };
        let tls = tls.clone();
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some((stream, peer)) = tls.accept(stream, limits.header_read_timeout).await else {
                return;
            };
            // Every request on the connection carries what its client certificate said.
            let service = tower::util::MapRequest::new(service, move |mut req: Request<_>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            let conn = watcher.watch(serve(stream, service, &builder, limits, activity));
            finish(Box::pin(conn), ticket, permit).await;
        });
    }
}

/// Runs a connection to its end, or until its roster closes it to make room; then frees its
/// slot.
async fn finish<C>(conn: C, ticket: Option<Ticket>, permit: OwnedSemaphorePermit)
where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Unpin,
{
    let evicted = async {
        match &ticket {
            Some(ticket) => ticket.evicted().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = conn => if let Err(e) = ended {
            tracing::debug!(error = %Chain(&*e), "connection ended with an error");
        },
        () = evicted => tracing::debug!("connection closed to make room for a new one"),
    }
    drop(ticket);
    drop(permit);
}

/// One connection, plain or TLS, with the per-connection timers.
fn serve<I, S, F>(
    io: I,
    service: S,
    builder: &auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    activity: Arc<Activity>,
) -> auto::Connection<'static, TokioIo<TimedIo<I>>, TowerToHyperService<Tracked<S>>, TokioExecutor>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible, Future = F>
        + Clone
        + Send
        + 'static,
    F: Future<Output = Result<Response, Infallible>> + Send + 'static,
{
    let io = TimedIo::new(
        io,
        activity.clone(),
        limits.header_read_timeout,
        limits.idle_timeout,
    );
    let service = Tracked::new(service, activity);
    builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .into_owned()
}
