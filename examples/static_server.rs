//! Baseline for the benchmarks: a bare hyper server (the same hyper-util connection builder
//! the gateway uses) that answers every request with one static JSON balance. What the
//! gateway's cache-hit path is measured against.
//!
//!   cargo run --release --example static_server -- 127.0.0.1:18400

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const BODY: &[u8] = br#"{"code":"000","message":"Success","message_kh":"\xe1\x9e\x87\xe1\x9f\x84\xe1\x9e\x82\xe1\x9e\x87\xe1\x9f\x90\xe1\x9e\x99","data":[{"id":"w-6-khr","name":"BENCH1's Wallet(KHR)","balance":620100,"currency":"KHR"}]}"#;

async fn answer(req: http::Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body, as a real handler must.
    let _ = req.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    Ok(response)
}

/// The runtime the gateway would use for the same thread count: with
/// `TOKIO_WORKER_THREADS=1` a current-thread runtime (as `server.worker_threads = 1`), else a
/// multi-thread one.
fn main() -> std::io::Result<()> {
    let one_thread = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let runtime = if one_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(serve())
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
