#!/usr/bin/env python3
"""Abuse soak (bench/abuse.sh): the gateway (dist build) in front of the simulator, serving an
ordinary load (wrk), alone for 30 s and then while attackers cycle for DURATION seconds:
clients that pipeline and never read, HTTP/2 PING floods that never read, floods of wrong keys,
HTTP/2 rapid resets, CONTINUATION floods, excess HTTP/2 streams, smuggling shapes. Reports the gateway's RSS before
and after, its peak, the ordinary load's errors and latency, and how many attacks ran."""

import os
import socket
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

from run import CALLER_KEY, PATH, free_port, log, rss_kib, start, stop, wait_ready  # noqa: E402


def frame(kind, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


def lit(name, value):
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


HEADERS = (lit(b":method", b"POST") + lit(b":scheme", b"http") + lit(b":path", PATH.encode())
           + lit(b":authority", b"gw") + lit(b"authorization", f"Bearer {CALLER_KEY}".encode())
           + lit(b"content-type", b"application/json"))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)


def connect(port, rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def send_all(s, data):
    try:
        s.sendall(data)
        return True
    except OSError:
        return False


def drain(s, seconds):
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.close()


def stalled_pipeline(port):
    body = b'{"customer_sync_code":"ABUSE1"}'
    req = (f"POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CALLER_KEY}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    s = connect(port, rcvbuf=4096)
    s.settimeout(8)
    for _ in range(20000):
        if not send_all(s, req):
            break
    s.close()


def ping_flood(port):
    s = connect(port, rcvbuf=4096)
    s.settimeout(8)
    send_all(s, PREFACE)
    ping = frame(6, 0, 0, b"\0" * 8)
    for _ in range(50000):
        if not send_all(s, ping * 20):
            break
    s.close()


def wrong_keys(port):
    s = connect(port)
    body = b'{"customer_sync_code":"X"}'
    req = (f"POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer not-a-key\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    send_all(s, req * 500)
    drain(s, 1)


def rapid_reset(port):
    s = connect(port)
    out = PREFACE
    for i in range(3000):
        out += frame(1, 0x4, 1 + 2 * i, HEADERS) + frame(3, 0, 1 + 2 * i, struct.pack(">I", 8))
    send_all(s, out)
    drain(s, 2)


def continuation_flood(port):
    s = connect(port)
    send_all(s, PREFACE + frame(1, 0, 1, HEADERS))
    filler = b"".join(lit(f"x-f{i}".encode(), b"a" * 100) for i in range(100))
    for _ in range(5000):
        if not send_all(s, frame(9, 0, 1, filler)):
            break
    drain(s, 1)


def excess_streams(port):
    s = connect(port)
    out = PREFACE + b"".join(frame(1, 0x4, 1 + 2 * i, HEADERS) for i in range(300))
    send_all(s, out)
    drain(s, 1)


def smuggling(port):
    hidden = "GET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    for te in ("Content-Length: 4\r\nTransfer-Encoding: chunked", "Transfer-Encoding: xchunked",
               "Content-Length: 0\r\nContent-Length: 44"):
        s = connect(port)
        send_all(s, f"POST {PATH} HTTP/1.1\r\nHost: gw\r\n{te}\r\n\r\n0\r\n\r\n{hidden}".encode())
        drain(s, 1)


ATTACKS = [stalled_pipeline, ping_flood, wrong_keys, rapid_reset, continuation_flood,
           excess_streams, smuggling]


def main():
    work = tempfile.mkdtemp(prefix="bill24-abuse-")
    duration = int(os.environ.get("DURATION", "120"))
    sim_port = free_port()
    start([run.ARGS.bin, "simulate", "--listen", f"127.0.0.1:{sim_port}"], os.path.join(work, "sim.log"))
    wait_ready(f"http://127.0.0.1:{sim_port}/_sim/stats")
    gw, url, _admin = run.start_gateway(work, "gw", sim_port, 1,
                                        server_extra='idle_timeout = "5s"\nmax_connections = 200')
    port = int(url.rsplit(":", 1)[1])
    run.wrk(f"http://127.0.0.1:{port}{PATH}", 2, 16, 1000, mix="sequential")
    baseline = run.wrk(f"http://127.0.0.1:{port}{PATH}", min(duration, 30), 16, 1000)
    log(f"ordinary load alone: {baseline['rps']:.0f} req/s, p99 {baseline['p99_us'] / 1000:.1f} ms")
    rss_before = rss_kib(gw.pid)
    log(f"abuse soak: {duration} s, gateway RSS before {rss_before / 1024:.1f} MiB (warm, 1000 entries)")

    stop_at = time.time() + duration
    counts = {a.__name__: 0 for a in ATTACKS}
    peak = [rss_before]

    def attacker(attack):
        while time.time() < stop_at:
            try:
                attack(port)
            except OSError:
                pass
            counts[attack.__name__] += 1

    def watch():
        while time.time() < stop_at:
            peak[0] = max(peak[0], rss_kib(gw.pid))
            time.sleep(0.5)

    threads = [threading.Thread(target=attacker, args=(a,), daemon=True) for a in ATTACKS]
    threads.append(threading.Thread(target=watch, daemon=True))
    for t in threads:
        t.start()
    ordinary = run.wrk(f"http://127.0.0.1:{port}{PATH}", duration, 16, 1000, prefix="BENCH")
    for t in threads:
        t.join(timeout=30)
    time.sleep(6)  # past idle_timeout: every attacker's connection is gone
    rss_after = rss_kib(gw.pid)
    log(f"attacks run: {counts}")
    log(f"ordinary load under attack: {ordinary['rps']:.0f} req/s "
        f"({ordinary['rps'] / baseline['rps']:.2f}x alone), {ordinary['errors']:.0f} errors "
        f"({ordinary['non2xx']:.0f} non-2xx), p99 {ordinary['p99_us'] / 1000:.1f} ms, "
        f"slowest {ordinary['max_us'] / 1000:.1f} ms")
    log(f"gateway RSS: before {rss_before / 1024:.1f} MiB, peak {peak[0] / 1024:.1f} MiB, "
        f"after {rss_after / 1024:.1f} MiB; still serving: {gw.poll() is None}")
    stop(gw)


if __name__ == "__main__":
    run.main_with_bin(main)
