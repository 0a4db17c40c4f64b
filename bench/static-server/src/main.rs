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

/// The gateway's serving for the same thread count (`TOKIO_WORKER_THREADS`, else one per
/// CPU): with 1, one current-thread runtime, as `server.worker_threads = 1`; with more, as
/// many threads, each a current-thread runtime with a listener of its own on the one port
/// (`SO_REUSEPORT`), as the gateway serves its main listener.
fn main() -> std::io::Result<()> {
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let threads = bill24_gateway::serving_threads(threads);
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18400".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if threads <= 1 {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        return bill24_gateway::runtime(1)?.block_on(serve(listener));
    }
    let listeners = (0..threads)
        .map(|_| {
            let socket = match addr {
                std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            Ok(socket)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|socket| {
            std::thread::spawn(move || {
                let runtime = bill24_gateway::runtime(1)?;
                let listener = runtime.block_on(async { socket.listen(4096)?.into_std() })?;
                runtime.block_on(serve(listener))
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| std::io::Error::other("a serving thread panicked"))??;
    }
    Ok(())
}

async fn serve(listener: std::net::TcpListener) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
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
