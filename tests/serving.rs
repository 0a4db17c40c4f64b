//! The main listener served on threads of their own (`server.worker_threads` ≥ 2): listeners
//! sharing one port, one current-thread runtime each, over one cache, one Bill24 client and
//! one connection cap (CONTRACT §2, §7). Connections here are raw sockets, each a connection of
//! its own, so that the kernel spreads them over every listener.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The tests here count threads by name: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const THREADS: usize = 2;

fn request_for(code: &str, key: &str) -> Vec<u8> {
    let body = body_for(code);
    format!(
        "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one response off `stream`: its status and `X-Cache`.
async fn read_reply(stream: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("status line");
            let x_cache = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("x-cache")
                        .then(|| value.trim().to_string())
                })
                .unwrap_or_default();
            return (status, x_cache);
        }
        let n = stream.read(&mut chunk).await.expect("read head");
        assert!(n > 0, "connection closed before an answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One request on a new connection.
async fn ask_once(addr: SocketAddr, code: String) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&request_for(&code, ORDERS_KEY))
        .await
        .expect("send");
    read_reply(&mut stream).await
}

/// The gateway's serving threads in this process.
fn serving_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with("bill24-serve-"))
                .count()
        })
        .unwrap_or(0)
}

/// Hits and misses from many connections spread over the threads: every answer 200, each key
/// fetched from Bill24 exactly once (concurrent misses on different threads share one call),
/// and the threads are the gateway's own, gone once it has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_every_thread_share_one_cache_and_one_call_per_key() {
    let _one = ONE_AT_A_TIME.lock().await;
    let app = spawn_app_on(
        THREADS,
        Default::default(),
        |sim| sim.set_latency(Duration::from_millis(100)),
        |_| {},
    )
    .await;
    until("the serving threads start", || serving_threads() == THREADS).await;
    let addr = app.addr;
    // 10 keys × 12 connections each, all at once: 120 connections, each asking once.
    let asks: Vec<_> = (0..120)
        .map(|i| tokio::spawn(ask_once(addr, format!("K{}", i % 10))))
        .collect();
    for ask in asks {
        assert_eq!(ask.await.expect("ask").0, 200);
    }
    assert_eq!(app.sim.balance_calls(), 10, "one Bill24 call per key");
    // And then hits, again from new connections.
    for i in 0..40 {
        assert_eq!(
            ask_once(addr, format!("K{}", i % 10)).await,
            (200, "HIT".to_string())
        );
    }
    assert_eq!(app.sim.balance_calls(), 10);
    app.stop().await;
    until("the serving threads exit", || serving_threads() == 0).await;
}

/// `server.max_connections` is one cap over every thread's listener: with 2, two connections
/// are served and others wait; when one closes, exactly one waiting connection is served next,
/// whichever listener the kernel gave it to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_is_one_cap_over_all_threads() {
    let _one = ONE_AT_A_TIME.lock().await;
    let app = spawn_app_on(
        THREADS,
        Default::default(),
        |_| {},
        |c| {
            c.server.max_connections = 2;
        },
    )
    .await;
    // Warmed on a connection of its own, closed at once (the test client's pool would keep
    // one open, holding a slot).
    assert_eq!(ask_once(app.addr, "WARM".into()).await.0, 200);
    for round in 0..2 {
        let mut conns = Vec::new();
        for _ in 0..6 {
            let mut stream = TcpStream::connect(app.addr).await.expect("connect");
            stream
                .write_all(&request_for("WARM", ORDERS_KEY))
                .await
                .expect("send");
            conns.push(Some(stream));
        }
        let answered = answered_within(&mut conns, Duration::from_millis(300)).await;
        assert_eq!(answered.len(), 2, "round {round}: the cap is 2");
        // Closing one served connection lets exactly one more in.
        conns[answered[0]] = None;
        let next = answered_within(&mut conns, Duration::from_millis(500)).await;
        let waiting: Vec<_> = next.iter().filter(|i| !answered.contains(i)).collect();
        assert_eq!(waiting.len(), 1, "round {round}: one slot freed, {next:?}");
    }
    app.stop().await;
}

/// The connections in `conns` whose answer arrived within `within` (reading each only once).
async fn answered_within(conns: &mut [Option<TcpStream>], within: Duration) -> Vec<usize> {
    let mut answered = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    for (i, conn) in conns.iter_mut().enumerate() {
        let Some(stream) = conn else { continue };
        let mut peek = [0u8; 1];
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(Ok(n)) = tokio::time::timeout(left, stream.peek(&mut peek)).await
            && n > 0
        {
            answered.push(i);
        }
    }
    answered
}

/// A port in use is refused as with one listener (exit 1 in the binary), also when its holder
/// is another gateway sharing its port the same way, which would otherwise split the
/// connections with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_refused_even_by_another_threaded_gateway() {
    let _one = ONE_AT_A_TIME.lock().await;
    let app = spawn_app_on(THREADS, Default::default(), |_| {}, |_| {}).await;
    let mut config = app.config.clone();
    config.server.listen = app.addr;
    match bill24_gateway::Gateway::bind_threads(config.clone(), THREADS).await {
        Err(e) => assert!(e.to_string().contains("server.listen"), "{e}"),
        Ok(_) => panic!("a second gateway bound {} beside the first", app.addr),
    }
    // A port held by a plain listener.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    config.server.listen = plain.local_addr().expect("addr");
    assert!(
        bill24_gateway::Gateway::bind_threads(config, THREADS)
            .await
            .is_err()
    );
    // The first gateway still answers every connection.
    for i in 0..20 {
        assert_eq!(ask_once(app.addr, format!("P{}", i % 4)).await.0, 200);
    }
    app.stop().await;
}

/// Shutdown drains every thread: requests in flight on any of them (here waiting on a slow
/// Bill24) are answered, and the gateway then stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight_on_every_thread() {
    let _one = ONE_AT_A_TIME.lock().await;
    let app = spawn_app_on(
        THREADS,
        Default::default(),
        |sim| sim.set_latency(Duration::from_millis(400)),
        |c| c.server.drain_delay = Duration::ZERO,
    )
    .await;
    let addr = app.addr;
    let asks: Vec<_> = (0..16)
        .map(|i| tokio::spawn(ask_once(addr, format!("D{i}"))))
        .collect();
    until("every request reaches Bill24", || {
        app.sim.balance_calls() == 16
    })
    .await;
    let stopped = tokio::spawn(app.stop());
    for ask in asks {
        assert_eq!(ask.await.expect("ask"), (200, "MISS".to_string()));
    }
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("stops")
        .expect("stop task");
    until("the serving threads exit", || serving_threads() == 0).await;
    assert!(TcpStream::connect(addr).await.is_err(), "no listener left");
}

/// A reload reaches every thread: a caller added is let in, and one removed is refused, on
/// every listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_on_every_thread() {
    let _one = ONE_AT_A_TIME.lock().await;
    let app = spawn_app_on(THREADS, Default::default(), |_| {}, |_| {}).await;
    let mut new = app.config.clone();
    new.callers.retain(|c| &*c.name == "billing");
    app.reloader
        .apply(new, Default::default())
        .expect("applied");
    for _ in 0..24 {
        let mut orders = TcpStream::connect(app.addr).await.expect("connect");
        orders
            .write_all(&request_for("R", ORDERS_KEY))
            .await
            .expect("send");
        assert_eq!(read_reply(&mut orders).await.0, 401);
        let mut billing = TcpStream::connect(app.addr).await.expect("connect");
        billing
            .write_all(&request_for("R", BILLING_KEY))
            .await
            .expect("send");
        assert_eq!(read_reply(&mut billing).await.0, 200);
    }
    app.stop().await;
}
