//! Hostile and careless clients, through the built binary: clients that stop reading, requests
//! without a Host, floods of wrong keys, HTTP/2 clients that open too many streams, reset
//! them in a rush or never end their headers, request smuggling shapes. Each either gets a
//! clear answer or loses its own connection, and the gateway keeps serving everyone else.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::process::*;
use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// One raw HTTP/1.1 balance request, keep-alive.
fn raw_request(key: &str, code: &str) -> String {
    let body = body_for(code);
    format!(
        "POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Everything the gateway sends on `stream` until it closes it or goes quiet for `quiet`.
async fn read_all(stream: &mut TcpStream, quiet: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// A gateway with `server` settings `extra`, logging its connections' ends (debug lines of
/// the serving module).
async fn gateway_with_server_debug(
    extra: &str,
) -> (bill24_sim::Simulator, Running, tempfile::TempDir) {
    gateway_with_sim(
        |sim| {
            gateway_toml(sim, extra).replace(
                "[upstream]",
                "[log]\nlevel = \"info,bill24_gateway::server=debug\"\n[upstream]",
            )
        },
        &[],
    )
    .await
}

/// A connection with a small receive buffer, so that what the gateway sends and nobody
/// reads fills up fast.
async fn tight_connection(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket.connect(addr).await.expect("connect")
}

// ---------------------------------------------------------------------------------------------
// Clients that stop reading
// ---------------------------------------------------------------------------------------------

/// Clients that send (pipelined HTTP/1.1 requests, HTTP/2 PINGs) but never read leave the
/// gateway unable to write: a write that makes no progress for the write limit
/// (`idle_timeout`, here 2 s) ends the connection. With every connection slot taken by such
/// clients, an ordinary client waits only until they are cut, then is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_cut_and_others_are_served() {
    let (_sim, gw, _dir) =
        gateway_with_server_debug("idle_timeout = \"2s\"\nmax_connections = 4").await;
    let (main, _) = gw.addresses().await;
    let mut held = Vec::new();
    for i in 0..3 {
        let stream = tight_connection(main).await;
        let (reader, mut writer) = stream.into_split();
        let request = raw_request(ORDERS_KEY, &format!("PIPELINED{i}"));
        tokio::spawn(async move {
            for _ in 0..20_000 {
                if writer.write_all(request.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        held.push(reader);
    }
    // HTTP/2: the preface, SETTINGS, then PINGs the gateway must answer, never read.
    let stream = tight_connection(main).await;
    let (reader, mut writer) = stream.into_split();
    tokio::spawn(async move {
        let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let _ = writer.write_all(&frames).await;
        let ping = [0u8, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        for _ in 0..500_000 {
            if writer.write_all(&ping).await.is_err() {
                break;
            }
        }
    });
    held.push(reader);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Every slot is taken: this one waits in the backlog until the stalled ones are cut.
    let start = Instant::now();
    let r = balance(main, ORDERS_KEY, "ORDINARY").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "served once a slot freed: {:?}",
        start.elapsed()
    );
    // All four were cut for not reading (the gateway's debug lines say so).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cut = gw
            .output()
            .iter()
            .filter(|l| l.contains("the peer has taken no data"))
            .count();
        if cut >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{cut} of 4 cut:\n{}",
            gw.output().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------------------------

/// RFC 9112 §3.2: an HTTP/1.1 request without a Host, or with two, gets 400 (`invalid_host`)
/// on both listeners; HTTP/1.0 may omit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_requests_need_exactly_one_host() {
    let (_sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, admin) = gw.addresses().await;
    let body = body_for("HOSTLESS");
    let head = |version: &str, hosts: &str| {
        format!(
            "POST {PATH} {version}\r\n{hosts}Authorization: Bearer {ORDERS_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    for (request, expected) in [
        (head("HTTP/1.1", ""), "HTTP/1.1 400"),
        (head("HTTP/1.1", "Host: a\r\nHost: b\r\n"), "HTTP/1.1 400"),
        (head("HTTP/1.1", "Host: gw\r\n"), "HTTP/1.1 200"),
        (head("HTTP/1.0", ""), "HTTP/1.0 200"),
    ] {
        let mut stream = TcpStream::connect(main).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let (text, _) = read_all(&mut stream, Duration::from_secs(5)).await;
        assert!(text.starts_with(expected), "{request:?} -> {text}");
        if expected.ends_with("400") {
            assert!(text.contains("\"code\":\"invalid_host\""), "{text}");
        }
    }
    let mut stream = TcpStream::connect(admin).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let (text, _) = read_all(&mut stream, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "admin: {text}");
}

// ---------------------------------------------------------------------------------------------
// Floods of wrong keys
// ---------------------------------------------------------------------------------------------

/// 2 000 requests with wrong keys as fast as they come: every one counted, but only about 20
/// access lines a second written for them, and the next line says how many were not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_keys_does_not_flood_the_log() {
    let (_sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, admin) = gw.addresses().await;
    // None left out yet: `sampled` is null, as on every other line.
    let first = balance(main, "wrong-first", "F").await;
    let line = gw.wait_for_line(&request_id(&first)).await;
    let json: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert!(json["sampled"].is_null(), "{line}");
    let start = Instant::now();
    let lanes: Vec<_> = (0..20)
        .map(|lane| {
            tokio::spawn(async move {
                for i in 0..100 {
                    let r = balance(main, &format!("wrong-{lane}-{i}"), "F").await;
                    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
                }
            })
        })
        .collect();
    for lane in lanes {
        lane.await.expect("lane");
    }
    let elapsed = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let last = balance(main, "wrong-last", "F").await;
    let line = gw.wait_for_line(&request_id(&last)).await;
    let json: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert!(json["sampled"].as_u64().is_some_and(|n| n > 0), "{line}");
    let lines = gw
        .output()
        .iter()
        .filter(|l| l.contains("\"target\":\"access\"") && l.contains("\"status\":401"))
        .count();
    let allowed = 20.0 + 20.0 * (elapsed + 0.5);
    assert!(
        (lines as f64) <= allowed,
        "{lines} lines for 2002 wrong keys in {elapsed:.2} s"
    );
    let metrics = get(admin, "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert_eq!(
        metric_value(
            &text,
            r#"gateway_requests_total{caller="-",status="401",cache="-"}"#
        ),
        2002.0,
        "every 401 counted"
    );
}

fn request_id(reply: &Reply) -> String {
    reply.header("x-request-id").unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------------
// HTTP/2
// ---------------------------------------------------------------------------------------------

/// Raw HTTP/2 frames on a TCP connection: for clients no well-behaved library would be.
struct H2Raw {
    stream: TcpStream,
    received: Vec<u8>,
}

/// A frame as the gateway sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    RstStream { stream: u32, code: u32 },
    GoAway { code: u32 },
    PingAck,
    Other(u8),
}

impl H2Raw {
    /// Connects and sends the preface and an empty SETTINGS.
    async fn connect(addr: SocketAddr) -> H2Raw {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(4, 0, 0, &[]));
        stream.write_all(&hello).await.expect("preface");
        H2Raw {
            stream,
            received: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// The frames that arrive until the gateway closes the connection (true) or goes quiet.
    async fn frames(&mut self, quiet: Duration) -> (Vec<Frame>, bool) {
        let mut buf = [0u8; 65536];
        let closed = loop {
            match tokio::time::timeout(quiet, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => self.received.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        let mut frames = Vec::new();
        let mut at = 0;
        let r = &self.received;
        while at + 9 <= r.len() {
            let len = u32::from_be_bytes([0, r[at], r[at + 1], r[at + 2]]) as usize;
            if at + 9 + len > r.len() {
                break;
            }
            let (kind, flags) = (r[at + 3], r[at + 4]);
            let id = u32::from_be_bytes([r[at + 5], r[at + 6], r[at + 7], r[at + 8]]) & 0x7fff_ffff;
            let payload = &r[at + 9..at + 9 + len];
            let word = |i: usize| {
                payload
                    .get(i..i + 4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0)
            };
            frames.push(match kind {
                3 => Frame::RstStream {
                    stream: id,
                    code: word(0),
                },
                7 => Frame::GoAway { code: word(4) },
                6 if flags & 1 == 1 => Frame::PingAck,
                other => Frame::Other(other),
            });
            at += 9 + len;
        }
        self.received.drain(..at);
        (frames, closed)
    }
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header block for a balance POST: literal fields, no Huffman, no indexing.
fn header_block(authorization: &str) -> Vec<u8> {
    literal_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", PATH),
        (":authority", "gw"),
        ("authorization", authorization),
        ("content-type", "application/json"),
    ])
}

/// A header block of `fields` as literals (no Huffman, no indexing; short names and values).
fn literal_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A client that opens more streams at once than `MAX_CONCURRENT_STREAMS` (256) before it has
/// read the gateway's SETTINGS: the excess streams are refused one by one (REFUSED_STREAM, safe
/// to retry), and the connection, with its other streams, stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_http2_streams_are_refused_one_by_one() {
    let (_sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, _) = gw.addresses().await;
    let mut h2 = H2Raw::connect(main).await;
    let block = header_block(&format!("Bearer {ORDERS_KEY}"));
    // 300 streams whose bodies never come: each stays open.
    let mut burst = Vec::new();
    for i in 0..300u32 {
        burst.extend(frame(1, END_HEADERS, 1 + 2 * i, &block));
    }
    assert!(h2.send(&burst).await);
    let (frames, closed) = h2.frames(Duration::from_secs(2)).await;
    let refused: Vec<u32> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::RstStream { stream, code } if *code == REFUSED_STREAM => Some(*stream),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 44, "the excess only: {frames:?}");
    assert!(
        refused.iter().all(|s| *s > 2 * 256),
        "the streams over the limit"
    );
    assert!(!closed && !frames.iter().any(|f| matches!(f, Frame::GoAway { .. })));
    // The connection is alive, and an open stream is still served once its body comes.
    let body = body_for("H2-EAGER");
    let mut more = frame(0, END_STREAM, 1, body.as_bytes());
    more.extend(frame(6, 0, 0, &[0; 8]));
    assert!(h2.send(&more).await);
    let (frames, _) = h2.frames(Duration::from_secs(2)).await;
    assert!(frames.contains(&Frame::PingAck), "{frames:?}");
    assert!(
        frames.contains(&Frame::Other(1)),
        "stream 1 answered: {frames:?}"
    );
}

/// Rapid reset (CVE-2023-44487): streams opened and reset at once, thousands of them, cost the
/// client its connection (GOAWAY, ENHANCE_YOUR_CALM); the gateway serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_ends_that_connection_only() {
    let (_sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, _) = gw.addresses().await;
    let mut h2 = H2Raw::connect(main).await;
    let block = header_block(&format!("Bearer {ORDERS_KEY}"));
    let mut flood = Vec::new();
    for i in 0..5_000u32 {
        let id = 1 + 2 * i;
        flood.extend(frame(1, END_HEADERS, id, &block));
        flood.extend(frame(3, 0, id, &8u32.to_be_bytes()));
    }
    let _ = h2.send(&flood).await;
    let (frames, closed) = h2.frames(Duration::from_secs(5)).await;
    assert!(
        frames.contains(&Frame::GoAway {
            code: ENHANCE_YOUR_CALM
        }),
        "{:?}",
        &frames[frames.len().saturating_sub(5)..]
    );
    assert!(closed);
    assert_eq!(
        balance(main, ORDERS_KEY, "AFTER-RESET").await.status,
        StatusCode::OK
    );
}

/// CONTINUATION flood: a header block that never ends (HEADERS, then CONTINUATION frames
/// without END_HEADERS) is cut once it passes the 16 KiB header limit, not buffered on; the
/// gateway serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_continuation_flood_ends_that_connection_only() {
    let (_sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, _) = gw.addresses().await;
    let mut h2 = H2Raw::connect(main).await;
    let mut flood = frame(1, 0, 1, &header_block("Bearer x"));
    let mut filler = Vec::new();
    for i in 0..100 {
        let name = format!("x-filler-{i}");
        filler.push(0);
        filler.push(name.len() as u8);
        filler.extend_from_slice(name.as_bytes());
        filler.push(100);
        filler.extend_from_slice(&[b'a'; 100]);
    }
    let mut sent = 0usize;
    let mut open = h2.send(&flood).await;
    flood.clear();
    while open && sent < 50 * 1024 * 1024 {
        open = h2.send(&frame(9, 0, 1, &filler)).await;
        sent += filler.len();
    }
    let (_, closed) = h2.frames(Duration::from_secs(5)).await;
    assert!(
        !open || closed,
        "the connection outlived {} MiB of one header block",
        sent >> 20
    );
    assert!(
        sent < 50 * 1024 * 1024,
        "cut early, not after everything was sent"
    );
    assert_eq!(
        balance(main, ORDERS_KEY, "AFTER-FLOOD").await.status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// Request smuggling
// ---------------------------------------------------------------------------------------------

/// Shapes that smuggle a second request past a front proxy (Content-Length against
/// Transfer-Encoding, two lengths, an obfuscated coding, a space before the colon) get at most
/// one answer (a 4xx, or none) and the connection closed: the hidden request is never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_never_reach_a_second_request() {
    let (_sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, _) = gw.addresses().await;
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n";
    let auth = format!("Authorization: Bearer {ORDERS_KEY}\r\nContent-Type: application/json\r\n");
    let shapes = [
        format!(
            "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
        ),
        format!(
            "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Transfer-Encoding: chunked\r\nContent-Length: 50\r\n\r\n0\r\n\r\n{hidden}"
        ),
        format!(
            "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: 0\r\nContent-Length: 44\r\n\r\n{hidden}"
        ),
        format!(
            "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{hidden}"
        ),
        format!(
            "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{hidden}"
        ),
        format!(
            "POST {PATH} HTTP/1.1\r\nHost: gw\r\n{auth}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{hidden}"
        ),
    ];
    for shape in shapes {
        let mut stream = TcpStream::connect(main).await.expect("connect");
        stream.write_all(shape.as_bytes()).await.expect("write");
        let (text, closed) = read_all(&mut stream, Duration::from_secs(3)).await;
        let answers = text.matches("HTTP/1.1 ").count();
        assert!(answers <= 1, "{shape:?} -> {text}");
        assert!(
            !text.contains("not_found"),
            "the hidden request was answered: {text}"
        );
        if answers == 1 {
            assert!(text.starts_with("HTTP/1.1 4"), "{shape:?} -> {text}");
        }
        assert!(closed, "{shape:?}: connection closed");
    }
    assert_eq!(
        balance(main, ORDERS_KEY, "AFTER-SMUGGLING").await.status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// Silent connections, and the admin listener under siege
// ---------------------------------------------------------------------------------------------

/// Connections that send nothing, or only the HTTP/2 preface and SETTINGS, are closed once
/// `header_read_timeout` (here 1 s) has passed since they were accepted, well before
/// `idle_timeout` (30 s): with every connection slot taken by them, a fresh client waits about
/// that long and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_cut_at_header_read_timeout() {
    let (_sim, gw, _dir) = gateway_with_sim(
        |sim| {
            gateway_toml(
                sim,
                "header_read_timeout = \"1s\"\nidle_timeout = \"30s\"\nmax_connections = 8",
            )
        },
        &[],
    )
    .await;
    let (main, _) = gw.addresses().await;
    let start = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(TcpStream::connect(main).await.expect("connect"));
    }
    let mut prefaces = Vec::new();
    for _ in 0..2 {
        prefaces.push(H2Raw::connect(main).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every slot is taken: this one waits in the backlog until the silent ones are cut.
    let asked = Instant::now();
    let r = balance(main, ORDERS_KEY, "AFTER-SILENCE").await;
    assert_eq!(r.status, StatusCode::OK);
    let waited = asked.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "served once the silent ones were cut: {waited:?}"
    );
    for mut stream in silent {
        let (text, closed) = read_all(&mut stream, Duration::from_secs(5)).await;
        assert!(
            closed && text.is_empty(),
            "closed without an answer: {text:?}"
        );
    }
    for mut h2 in prefaces {
        let (frames, closed) = h2.frames(Duration::from_secs(5)).await;
        assert!(
            closed,
            "an HTTP/2 preface and nothing more is cut: {frames:?}"
        );
    }
    let cut = start.elapsed();
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_secs(6),
        "cut after about header_read_timeout: {cut:?}"
    );
    eprintln!("fresh client served after {waited:?}; silent connections cut by {cut:?}");
}

/// Every connection the admin listener allows (256) held by silent clients, with
/// `header_read_timeout` long enough not to help: `/healthz` and `/readyz` are still answered
/// at once, since the oldest connection without a request is closed for each newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_get_through_when_every_admin_connection_is_taken() {
    let (_sim, gw, _dir) =
        gateway_with_server_debug("header_read_timeout = \"60s\"\nidle_timeout = \"60s\"").await;
    let (_, admin) = gw.addresses().await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(admin).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in ["/healthz", "/readyz", "/healthz", "/readyz"] {
        let asked = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), get(admin, path))
            .await
            .unwrap_or_else(|_| panic!("{path} not answered within 10 s"));
        let took = asked.elapsed();
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert!(took < Duration::from_secs(2), "{path} took {took:?}");
        eprintln!("{path} answered in {took:?} with every admin connection taken");
    }
    let evicted = gw
        .output()
        .iter()
        .filter(|l| l.contains("connection closed to make room"))
        .count();
    assert!(evicted >= 4, "{evicted} closed to make room");
    drop(silent);
}

/// The resident set of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// HTTP/2 clients that open a window of 0 and ask for `/metrics` on every stream they can (64
/// connections of 256 streams each) never get a byte of the pages; each open stream keeps its
/// page alive. Admin connections take 8 streams and at most 16 pages are alive at once (the
/// rest get 503 `metrics_busy`), so the gateway holds a few MiB for them, not one page per
/// stream, and gives it back when they leave; a page not taken stops counting after 10 s, so
/// real scrapes are kept out that long at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_flood_of_metrics_requests_holds_little_memory() {
    const CONNECTIONS: usize = 64;
    const STREAMS: u32 = 256;
    let (_sim, gw, _dir) = gateway_with_sim(|sim| gateway_toml(sim, ""), &[]).await;
    let (main, admin) = gw.addresses().await;
    // Some series, so the page is of a realistic size.
    for i in 0..20 {
        balance(main, ORDERS_KEY, &format!("RSS{i}")).await;
    }
    let page = get(admin, "/metrics").await.body.len();
    let pid = gw.child.id();
    let before = rss(pid);

    let block = literal_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/metrics"),
        (":authority", "gw"),
    ]);
    let mut attackers = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(admin).await.expect("connect");
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE = 0: no stream may be sent a byte of DATA.
        hello.extend(frame(4, 0, 0, &[0, 4, 0, 0, 0, 0]));
        for i in 0..STREAMS {
            hello.extend(frame(1, END_STREAM | END_HEADERS, 1 + 2 * i, &block));
        }
        stream.write_all(&hello).await.expect("flood");
        attackers.push(stream);
    }
    // Drain what the gateway sends (SETTINGS, heads, resets) so that only the window holds
    // the pages back.
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let readers: Vec<_> = attackers
        .into_iter()
        .map(|stream| {
            let mut stop = stop.subscribe();
            tokio::spawn(async move {
                let mut stream = stream;
                let mut buf = [0u8; 16384];
                loop {
                    tokio::select! {
                        n = stream.read(&mut buf) => if matches!(n, Ok(0) | Err(_)) { break },
                        _ = stop.recv() => break,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = rss(pid);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "page {page} B; RSS before {:.1} MiB, during the flood {:.1} MiB",
        mib(before),
        mib(during)
    );
    // One page per stream would be CONNECTIONS * STREAMS pages.
    let per_stream = (CONNECTIONS as u64) * u64::from(STREAMS) * page as u64;
    assert!(
        during < before + 48 * 1024 * 1024,
        "RSS grew from {:.1} to {:.1} MiB (one page per stream would be {:.1} MiB)",
        mib(before),
        mib(during),
        mib(per_stream)
    );

    let asked = Instant::now();
    let health = get(admin, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    // The pages nobody takes keep real scrapes out for 10 s at most, not for the whole
    // idle timeout (60 s) while their connections stay open.
    assert_eq!(
        get(admin, "/metrics").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let scrape = get(admin, "/metrics").await;
    assert_eq!(
        scrape.status,
        StatusCode::OK,
        "with the stalled pages still open"
    );

    let _ = stop.send(());
    for reader in readers {
        let _ = reader.await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(pid);
    eprintln!("RSS after the clients left {:.1} MiB", mib(after));
    assert!(
        after < before + 32 * 1024 * 1024,
        "RSS {:.1} MiB after the clients left (before: {:.1})",
        mib(after),
        mib(before)
    );
    // Scrapes work again once the pages are gone.
    let scrape = get(admin, "/metrics").await;
    assert_eq!(scrape.status, StatusCode::OK);
}
