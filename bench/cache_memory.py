#!/usr/bin/env python3
"""What large Bill24 answers cost the cache (README, "Cache memory").

Starts the simulator and a gateway (release binary), makes every "000" answer ANSWER_BYTES
long (the simulator's `answer_bytes`), asks for REQUESTS distinct customers, and prints the
gateway's RSS before and after, the cache's entry count and the Bill24 calls.

    bench/cache_memory.py [--bin PATH] [--answer-bytes N] [--requests N] [--cache KEY=VALUE ...]

e.g. `bench/cache_memory.py --answer-bytes 1000000 --requests 200` (the case that used to cost
+222 MB), or `--answer-bytes 60000 --requests 4000 --cache max_bytes=67108864`.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import free_port, rss_kib  # noqa: E402  (the load-test kit's helpers)

KEY = "memory-caller-key"
PATH = "/instant_payment/get_wallet_balance"


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ready(port, path, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if request(port, "GET", path)[0] < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"cache_memory: port {port} did not come up")


def metric(port, name):
    text = request(port, "GET", "/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def ask(port, codes):
    """One keep-alive connection asking for each code in turn; answers by status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses = {}
    for code in codes:
        conn.request("POST", PATH, body=json.dumps({"customer_sync_code": code}),
                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        statuses[r.status] = statuses.get(r.status, 0) + 1
    conn.close()
    return statuses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "..", "target")), "release", "bill24-gateway"))
    p.add_argument("--answer-bytes", type=int, default=1_000_000)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--cache", action="append", default=[], help="extra [cache] KEY=VALUE")
    a = p.parse_args()

    work = tempfile.mkdtemp()
    sim_port, gw_port, admin_port = free_port(), free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([a.bin, "simulate", "--listen", f"127.0.0.1:{sim_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(sim_port, "/_sim/stats")
        key_hash = subprocess.run([a.bin, "hash-key"], input=KEY, capture_output=True, text=True,
                                  check=True).stdout.strip()
        extra = "\n".join(a.cache)
        with open(os.path.join(work, "gw.toml"), "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{gw_port}"
admin_listen = "127.0.0.1:{admin_port}"
[upstream]
base_url = "http://127.0.0.1:{sim_port}"
merchant_token = "demo-merchant-token"
client_id = "demo-client"
client_secret = "demo-client-secret"
[cache]
ttl = "1h"
{extra}
[log]
level = "error"
[[callers]]
name = "memory"
key_sha256 = "{key_hash}"
""")
        gw = subprocess.Popen([a.bin, "--config", os.path.join(work, "gw.toml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(gw)
        wait_ready(admin_port, "/readyz")
        request(sim_port, "POST", "/_sim/control", json.dumps({"answer_bytes": a.answer_bytes}))
        ask(gw_port, ["WARM-UP"])
        time.sleep(0.5)
        before = rss_kib(gw.pid)
        codes = [f"M{i}" for i in range(a.requests)]
        chunks = [codes[i::a.concurrency] for i in range(a.concurrency)]
        statuses = {}
        with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
            for s in pool.map(lambda c: ask(gw_port, c), chunks):
                for k, v in s.items():
                    statuses[k] = statuses.get(k, 0) + v
        time.sleep(0.5)
        after = rss_kib(gw.pid)
        entries = metric(admin_port, "gateway_cache_entries")
        calls = json.loads(request(sim_port, "GET", "/_sim/stats")[1])["balance_calls"]
        offered = a.answer_bytes * a.requests / 2**20
        print(f"answers of {a.answer_bytes} B x {a.requests} ({offered:.1f} MiB offered), "
              f"cache {a.cache or 'defaults'}: statuses {statuses}, Bill24 calls {calls}, "
              f"cache entries {entries:.0f}, RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB "
              f"(+{(after - before) / 1024:.1f} MiB)")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
