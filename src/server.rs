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
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::ServerConfig;
use crate::error::Response;

/// Largest request head accepted (HTTP/1 buffer; HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// HTTP/2 streams a client may have open on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// The connection builder shared by both listeners.
pub fn connection_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(cfg.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Accepts connections until `stop` turns true, serving each with `service` and registering it
/// with `graceful`. At most `max_connections` are open at once; beyond that, new connections
/// wait in the listen backlog. Returns (dropping the listener) once stopped.
pub async fn accept_loop<S, F>(
    listener: TcpListener,
    service: S,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
) where
    S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible, Future = F>
        + Clone
        + Send
        + 'static,
    F: Future<Output = Result<Response, Infallible>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        if *stop.borrow() {
            return;
        }
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
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
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}
