//! Baseline for the benchmarks: a bare hyper server (the same hyper-util connection builder
//! the gateway uses) that answers every request with one static JSON balance. What the
//! gateway's cache-hit path is measured against.
//!
//!   cargo run --profile dist -p bench-static-server -- 127.0.0.1:18400

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const BODY: &[u8] = r#"{"code":"000","message":"Success","message_kh":"ជោគជ័យ","data":[{"id":"w-6-khr","name":"BENCH1's Wallet(KHR)","balance":620100,"currency":"KHR"}]}"#.as_bytes();

async fn answer(req: http::Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body, as a real handler must.
    let _ = req.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    Ok(response)
}

/// The gateway's runtime for the same thread count (`TOKIO_WORKER_THREADS`, else one per
/// CPU): with 1, a current-thread runtime, as `server.worker_threads = 1`.
fn main() -> std::io::Result<()> {
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    bill24_gateway::runtime(threads)?.block_on(serve())
}

async fn serve() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18400".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                .await;
        });
    }
}
