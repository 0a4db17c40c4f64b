#!/usr/bin/env python3
"""The load-test kit behind bench/run.sh (see README, "Performance").

Runs, on one machine and in one go:
  * cache hits: the gateway, nginx proxy_cache and a static-answer hyper server, all warm,
    driven alternately by wrk (uniform over KEYS keys) for ROUNDS rounds; medians of
    req/s, p50/p99/p99.9 and server CPU microseconds per request;
  * a stampede: 200 concurrent requests for one cold key with a 100 ms Bill24 (oha with new
    connections, wrk with open ones);
  * a cold uniform phase and a Zipf-like phase over 10 000 keys with a 10 s TTL: hit ratio,
    Bill24 calls against the K x ceil(duration/TTL) bound, authorize calls per token lifetime;
  * memory: RSS per cached entry at 100 000 entries.
Every figure is printed with its ratio to the baselines of the same run.

PHASES=identity runs instead the caller-identity phase: cache hits over TLS (keep-alive) and
JWT-authenticated hits, against a key-authenticated hit over plain HTTP in the same rounds.
"""

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CALLER_KEY = "bench-caller-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATH = "/instant_payment/get_wallet_balance"
PROCS = []


def log(msg):
    print(msg, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, logfile, env=None):
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.Popen(cmd, stdout=open(logfile, "w"), stderr=subprocess.STDOUT, env=full_env)
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def http(method, url, body=None, headers=None):
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def wait_ready(url, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            http("GET", url)
            return
        except Exception:
            time.sleep(0.05)
    sys.exit(f"bench: {url} did not come up")


def wait_port(port, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: port {port} did not open")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def wrk(url, seconds, conns, keys, mix="uniform", prefix="BENCH", bearer=CALLER_KEY, tokens=None):
    """wrk -t1 over bench/wrk/balance.lua; `bearer` is the Authorization value of every
    request, or `tokens` a file of them, one per request in turn."""
    env = dict(os.environ, KEYS=str(keys), MIX=mix, KEY=bearer, PREFIX=prefix)
    if tokens:
        env["TOKENS"] = tokens
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", os.path.join(HERE, "wrk", "balance.lua"), url],
        capture_output=True, text=True, env=env, check=True,
    ).stdout
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def paired_rounds(targets, rounds, seconds, conns, keys, prefix="BENCH"):
    """wrk against each target in turn, `rounds` times, the order rotating each round (the
    machine's load drifts between rounds and moves targets run back to back alike). A target
    is (url, a function giving its server's pids[, wrk keyword arguments, or a function
    giving them for each run]). Each run's wrk
    figures, with the server's CPU microseconds per request (`cpu_us`, user + system from
    /proc) and its RSS (`rss_kib`)."""
    samples = {name: [] for name in targets}
    order = list(targets)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            url, pids, *more = targets[name]
            options = (more[0]() if callable(more[0]) else more[0]) if more else {}
            c0 = cpu_seconds(pids())
            res = wrk(url, seconds, conns, keys, prefix=prefix, **options)
            c1 = cpu_seconds(pids())
            res["cpu_us"] = (c1 - c0) * 1e6 / max(res["requests"], 1)
            res["rss_kib"] = sum(rss_kib(p) for p in pids())
            samples[name].append(res)
            log(f"  round {r + 1} {name:<24} {res['rps']:>9.0f} req/s  {res['cpu_us']:6.2f} µs CPU/req  "
                f"p50 {fmt_us(res['p50_us'])}  p99 {fmt_us(res['p99_us'])}  errors {res['errors']:.0f}")
    return samples


def paired(samples, name, base, key="cpu_us"):
    """The per-round ratios of `name`'s figure `key` to `base`'s."""
    return [x[key] / y[key] for x, y in zip(samples[name], samples[base])]


def sim_control(sim, body):
    return json.loads(http("POST", f"{sim}/_sim/control", json.dumps(body)))


def sim_stats(sim):
    return json.loads(http("GET", f"{sim}/_sim/stats"))


def metrics(admin):
    values = {}
    for line in http("GET", f"{admin}/metrics").splitlines():
        if line.startswith("gateway_") and " " in line:
            name, value = line.rsplit(" ", 1)
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


def metric_sum(values, prefix, needle=""):
    return sum(v for k, v in values.items() if k.startswith(prefix) and needle in k)


def gateway_config(path, port, admin_port, sim_port, threads, ttl="1h", extra="", server_extra="", tail=""):
    key_hash = subprocess.run(
        [ARGS.bin, "hash-key"], input=CALLER_KEY + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()
    with open(path, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
worker_threads = {threads}
{server_extra}
[upstream]
base_url = "http://127.0.0.1:{sim_port}"
merchant_token = "demo-merchant-token"
client_id = "demo-client"
client_secret = "demo-client-secret"
{extra}
[cache]
ttl = "{ttl}"
max_entries = 200000
[log]
level = "warn"
[[callers]]
name = "bench"
key_sha256 = "{key_hash}"
{tail}""")


def start_gateway(work, name, sim_port, threads, ttl="1h", extra="", binary=None, server_extra="", tail=""):
    port, admin_port = free_port(), free_port()
    config = os.path.join(work, f"{name}.toml")
    gateway_config(config, port, admin_port, sim_port, threads, ttl, extra, server_extra, tail)
    p = start([binary or ARGS.bin, "--config", config], os.path.join(work, f"{name}.log"))
    admin = f"http://127.0.0.1:{admin_port}"
    wait_ready(f"{admin}/readyz")
    return p, f"http://127.0.0.1:{port}", admin


def oha_stampede(url, key):
    out = subprocess.run(
        ["oha", "-n", "200", "-c", "200", "--no-tui", "--output-format", "json", "-m", "POST",
         "-H", f"Authorization: Bearer {CALLER_KEY}", "-H", "Content-Type: application/json",
         "-d", json.dumps({"customer_sync_code": key}), url + PATH],
        capture_output=True, text=True, check=True,
    ).stdout
    result = json.loads(out)
    codes = result.get("statusCodeDistribution", {})
    return result["summary"]["slowest"], codes


def machine():
    """The machine a run's figures come from: CPUs, CPU model, kernel."""
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{os.cpu_count()} CPUs, {model}, kernel {os.uname().release}"


def fmt_us(v):
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"


def main_with_bin(main, more_args=lambda parser: None):
    """Runs a benchmark's `main` with `--bin` (and what `more_args` adds) parsed into ARGS;
    stops every process it started."""
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    more_args(parser)
    ARGS = parser.parse_args()
    try:
        main()
    finally:
        for p in PROCS:
            stop(p)


def main():
    quick = os.environ.get("QUICK") == "1"
    threads = int(os.environ.get("THREADS", "1"))
    conns = int(os.environ.get("CONNS", "64"))
    keys = int(os.environ.get("KEYS", "1000"))
    rounds = int(os.environ.get("ROUNDS", "1" if quick else "5"))
    duration = int(os.environ.get("DURATION", "4" if quick else "6").rstrip("s"))
    work = tempfile.mkdtemp(prefix="bill24-bench-")
    # nginx workers run as another user when started as root: they must reach the cache dir.
    os.chmod(work, 0o755)
    nproc = os.cpu_count()
    log(f"bench: {machine()}; runtime threads {threads or f'{nproc} (0: one per CPU)'}, "
        f"wrk -t1 -c{conns}, {keys} keys, {rounds} rounds of {duration}s; work dir {work}")

    sim_port = free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    start([ARGS.bin, "simulate", "--listen", f"127.0.0.1:{sim_port}"], os.path.join(work, "sim.log"))
    wait_ready(f"{sim}/_sim/stats")
    if os.environ.get("PHASES") == "identity":
        identity_phase(work, sim_port, threads, rounds, duration, conns, keys)
        return
    token = json.loads(http(
        "POST", f"{sim}/merchantsecurity/authorize",
        json.dumps({"token": "demo-merchant-token", "clientId": "demo-client", "secret": "demo-client-secret"}),
        {"Content-Type": "application/json"},
    ))["data"]["token"]

    # --- targets ---------------------------------------------------------------------------
    static_port = free_port()
    static = start([ARGS.static, f"127.0.0.1:{static_port}"], os.path.join(work, "static.log"),
                   {"TOKIO_WORKER_THREADS": str(threads)})
    wait_port(static_port)

    nginx_dir = os.path.join(work, "nginx")
    os.makedirs(nginx_dir)
    os.chmod(nginx_dir, 0o777)
    nginx_port = free_port()
    template = open(os.path.join(HERE, "nginx", "proxy_cache.conf.template")).read()
    conf = (template.replace("@WORK@", nginx_dir).replace("@SIM_PORT@", str(sim_port))
            .replace("@PORT@", str(nginx_port)).replace("@TOKEN@", token).replace("@TTL@", "1h")
            .replace("worker_processes auto;", f"worker_processes {threads or 'auto'};"))
    with open(os.path.join(nginx_dir, "nginx.conf"), "w") as f:
        f.write(conf)
    nginx = start(["nginx", "-c", os.path.join(nginx_dir, "nginx.conf"), "-p", nginx_dir],
                  os.path.join(work, "nginx.log"))
    wait_port(nginx_port)

    gateway, gw_url, gw_admin = start_gateway(work, "gateway", sim_port, threads)

    targets = {
        "static hyper": (f"http://127.0.0.1:{static_port}{PATH}", lambda: [static.pid]),
        "nginx proxy_cache": (f"http://127.0.0.1:{nginx_port}{PATH}", lambda: [nginx.pid] + children(nginx.pid)),
        "bill24-gateway": (gw_url + PATH, lambda: [gateway.pid]),
    }
    if ARGS.baseline_bin:
        # Another build of the gateway (before a change), measured in the same rounds.
        before, before_url, _ = start_gateway(work, "baseline", sim_port, threads, binary=ARGS.baseline_bin)
        targets["gateway (baseline)"] = (before_url + PATH, lambda: [before.pid])

    # --- hit path --------------------------------------------------------------------------
    log("\n== warm-up: every key once, then some")
    for name, (url, _) in targets.items():
        wrk(url, 3, conns, keys, mix="sequential")
    hits_before = metric_sum(metrics(gw_admin), "gateway_requests_total", 'cache="hit"')
    misses_before = metric_sum(metrics(gw_admin), "gateway_requests_total", 'cache="miss"')
    calls_before = sim_stats(sim)["balance_calls"]

    samples = paired_rounds(targets, rounds, duration, conns, keys)
    order = list(targets)
    gm = metrics(gw_admin)
    hit_hits = metric_sum(gm, "gateway_requests_total", 'cache="hit"') - hits_before
    hit_misses = metric_sum(gm, "gateway_requests_total", 'cache="miss"') - misses_before
    hit_calls = sim_stats(sim)["balance_calls"] - calls_before

    med = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
    log("\n== cache hits (medians)")
    log(f"{'':<20}{'req/s':>10}{'p50':>10}{'p99':>10}{'p99.9':>10}{'CPU µs/req':>12}{'RSS':>10}")
    for name in targets:
        m = med[name]
        log(f"{name:<20}{m['rps']:>10.0f}{fmt_us(m['p50_us']):>10}{fmt_us(m['p99_us']):>10}"
            f"{fmt_us(m['p999_us']):>10}{m['cpu_us']:>12.2f}{m['rss_kib'] / 1024:>8.1f} MiB")
    log(f"gateway hit ratio in this phase: {hit_hits / max(hit_hits + hit_misses, 1):.4f}, "
        f"Bill24 calls: {hit_calls}")
    # The same hits at a fixed rate well below saturation (oha -q): CPU per request without
    # the wake-up pattern of a saturated server skewing it.
    rate = int(os.environ.get("RATE", "20000"))
    log(f"\n== cache hits at a fixed {rate} req/s (oha, 64 connections, one key), CPU µs/req")
    fixed_rounds = max(1, rounds // 2 + 1)
    fixed_samples = {name: [] for name in targets}
    for r in range(fixed_rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            url, pids = targets[name]
            c0 = cpu_seconds(pids())
            out = subprocess.run(
                ["oha", "-z", f"{duration}s", "-q", str(rate), "-c", str(conns), "--no-tui",
                 "--output-format", "json", "-m", "POST",
                 "-H", f"Authorization: Bearer {CALLER_KEY}", "-H", "Content-Type: application/json",
                 "-d", json.dumps({"customer_sync_code": "BENCH1"}), url],
                capture_output=True, text=True, check=True,
            ).stdout
            c1 = cpu_seconds(pids())
            done = sum(json.loads(out).get("statusCodeDistribution", {}).values())
            fixed_samples[name].append((c1 - c0) * 1e6 / max(done, 1))
            log(f"  round {r + 1} {name:<18} {fixed_samples[name][-1]:6.2f} µs CPU/req over {done} requests")
    fixed = {name: statistics.median(v) for name, v in fixed_samples.items()}
    log("  medians: " + ", ".join(f"{name} {v:.2f}" for name, v in fixed.items()))

    def fixed_paired(base):
        return statistics.median(g / b for g, b in zip(fixed_samples["bill24-gateway"], fixed_samples[base]))

    # Ratios are taken within each round (the three targets ran back to back under the same
    # conditions) and their median reported: the machine's load drifts between rounds.
    def gw_paired(key, base):
        return statistics.median(paired(samples, "bill24-gateway", base, key))

    def paired_range(key, base):
        ratios = paired(samples, "bill24-gateway", base, key)
        return f"{min(ratios):.2f}-{max(ratios):.2f}"

    results = {
        "fixed_cpu_vs_nginx": fixed_paired("nginx proxy_cache"),
        "fixed_cpu_vs_static": fixed_paired("static hyper"),
        "cpu_vs_nginx": gw_paired("cpu_us", "nginx proxy_cache"),
        "cpu_vs_static": gw_paired("cpu_us", "static hyper"),
        "rps_vs_nginx": gw_paired("rps", "nginx proxy_cache"),
        "rps_vs_static": gw_paired("rps", "static hyper"),
    }
    log(f"per-round ratios, gateway CPU/req vs nginx {paired_range('cpu_us', 'nginx proxy_cache')}, "
        f"vs static {paired_range('cpu_us', 'static hyper')}; req/s vs nginx "
        f"{paired_range('rps', 'nginx proxy_cache')}")
    if ARGS.baseline_bin:
        base = "gateway (baseline)"
        results["cpu_vs_baseline"] = gw_paired("cpu_us", base)
        results["rps_vs_baseline"] = gw_paired("rps", base)
        results["fixed_cpu_vs_baseline"] = fixed_paired(base)
        log(f"vs the baseline build: CPU/req {results['cpu_vs_baseline']:.3f}x "
            f"(per round {paired_range('cpu_us', base)}), req/s {results['rps_vs_baseline']:.3f}x "
            f"(per round {paired_range('rps', base)}), CPU/req at a fixed rate "
            f"{results['fixed_cpu_vs_baseline']:.3f}x")

    if os.environ.get("PHASES") == "hits":
        for key, value in results.items():
            log(f"  {key:<22}{value:.2f}x")
        return

    # --- stampede --------------------------------------------------------------------------
    # Measured two ways, three times each with a fresh cold key: oha opens 200 connections and
    # sends at once (its latency includes connecting and its own start-up of 200 tasks); wrk
    # sends each request as soon as its connection is open and times from the send (wrk keeps
    # asking for the same key for the rest of its second: answers from cache, far faster).
    log("\n== stampede: 200 concurrent requests, one cold key, Bill24 answering in 100 ms")
    sim_control(sim, {"latency_ms": 100})
    stampede = {}
    for name, url in (("bill24-gateway", gw_url), ("nginx proxy_cache", f"http://127.0.0.1:{nginx_port}")):
        tag = name.split()[0]
        runs = {"oha": [], "wrk": []}
        calls = []
        for i in range(3):
            before = sim_stats(sim)["balance_calls"]
            # Keys of at most 50 characters, fresh each run.
            slowest, codes = oha_stampede(url, f"ST-{tag[:5]}-o{i}-{time.time_ns()}")
            calls.append(sim_stats(sim)["balance_calls"] - before)
            runs["oha"].append(slowest)
            before = sim_stats(sim)["balance_calls"]
            res = wrk(url + PATH, 1, 200, 1, mix="single", prefix=f"ST-{tag[:5]}-w{i}-{time.time_ns()}-")
            calls.append(sim_stats(sim)["balance_calls"] - before)
            runs["wrk"].append(res["max_us"] / 1e6)
            if codes.keys() - {"200"} or res["errors"]:
                log(f"  {name}: unexpected answers: oha {codes}, wrk errors {res['errors']:.0f}")
        stampede[name] = {"calls": calls, **runs}
        log(f"  {name:<18} Bill24 calls per run {calls}; slowest answer, oha (new connections): "
            f"{', '.join(f'{v * 1000:.1f}' for v in runs['oha'])} ms; "
            f"wrk (open connections): {', '.join(f'{v * 1000:.1f}' for v in runs['wrk'])} ms")
    sim_control(sim, {"latency_ms": 0})
    stop(gateway)

    # --- cold and Zipf phases: stewardship --------------------------------------------------
    phase = 20 if quick else 60
    ttl = 10
    lifetime, margin = 20, 2
    log(f"\n== stewardship: {phase}s, 10000 keys, ttl {ttl}s, tokens of {lifetime}s "
        f"refreshed {margin}s before expiry")
    sim_control(sim, {"token_lifetime_ms": lifetime * 1000, "reset_counters": True})
    gw2, gw2_url, gw2_admin = start_gateway(work, "stewardship", sim_port, threads, ttl=f"{ttl}s",
                                            extra=f'token_refresh_margin = "{margin}s"')
    stewardship = {}
    # The uniform phase is shorter than the ttl: every key must be fetched exactly once (a
    # phase as long as the ttl would let wrk's overshoot of a few ms refetch the earliest keys,
    # legitimately).
    uniform_seconds = 8 if not quick else 5
    for mix, seconds in (("uniform", uniform_seconds), ("zipf", phase)):
        before = sim_stats(sim)
        m0 = metrics(gw2_admin)
        res = wrk(gw2_url + PATH, seconds, conns, 10000, mix=mix, prefix=f"COLD-{mix}-")
        m1 = metrics(gw2_admin)
        after = sim_stats(sim)
        hits = metric_sum(m1, "gateway_requests_total", 'cache="hit"') - metric_sum(m0, "gateway_requests_total", 'cache="hit"')
        total = metric_sum(m1, "gateway_requests_total", 'status="200"') - metric_sum(m0, "gateway_requests_total", 'status="200"')
        calls = after["balance_calls"] - before["balance_calls"]
        bound = 10000 * math.ceil(seconds / ttl)
        stewardship[mix] = (res, hits / max(total, 1), calls, bound)
        log(f"  {mix:<8} cold start: {res['rps']:.0f} req/s, hit ratio {hits / max(total, 1):.4f}, "
            f"Bill24 calls {calls} (bound K x ceil({seconds}/{ttl}) = {bound}), errors {res['errors']:.0f}")
    authorizes = sim_stats(sim)["authorize_calls"]
    elapsed_lifetimes = (uniform_seconds + phase) / lifetime
    log(f"  authorize calls: {authorizes} over {elapsed_lifetimes:.1f} token lifetimes "
        f"(one at start, then one per refresh at lifetime - margin = {lifetime - margin}s)")
    stop(gw2)
    sim_control(sim, {"token_lifetime_ms": 3600 * 1000})

    # --- memory ----------------------------------------------------------------------------
    log("\n== memory: RSS per cached entry at 100 000 entries")
    gw3, gw3_url, gw3_admin = start_gateway(work, "memory", sim_port, threads)
    wrk(gw3_url + PATH, 1, 4, 10, prefix="WARM")
    time.sleep(0.5)
    rss0 = rss_kib(gw3.pid)
    deadline = time.time() + 120
    entries = 0
    while time.time() < deadline:
        wrk(gw3_url + PATH, 3, conns, 100000, mix="sequential", prefix="MEM")
        entries = metrics(gw3_admin).get("gateway_cache_entries", 0)
        if entries >= 100000:
            break
    time.sleep(0.5)
    rss1 = rss_kib(gw3.pid)
    entries = metrics(gw3_admin).get("gateway_cache_entries", 0)
    per_entry = (rss1 - rss0) * 1024 / max(entries, 1)
    log(f"  RSS {rss0 / 1024:.1f} MiB -> {rss1 / 1024:.1f} MiB for {entries:.0f} entries: "
        f"{per_entry:.0f} bytes per entry")
    stop(gw3)

    # --- summary ---------------------------------------------------------------------------
    gs, ns = stampede["bill24-gateway"], stampede["nginx proxy_cache"]
    uni, zipf = stewardship["uniform"], stewardship["zipf"]
    rows = [
        ("hit CPU vs nginx proxy_cache", f"{results['cpu_vs_nginx']:.2f}x", "<= 0.60x", results["cpu_vs_nginx"] <= 0.60),
        ("hit CPU vs static hyper", f"{results['cpu_vs_static']:.2f}x", "<= 1.30x", results["cpu_vs_static"] <= 1.30),
        ("hit CPU vs nginx, fixed rate", f"{results['fixed_cpu_vs_nginx']:.2f}x", "<= 0.60x", results["fixed_cpu_vs_nginx"] <= 0.60),
        ("hit CPU vs static, fixed rate", f"{results['fixed_cpu_vs_static']:.2f}x", "<= 1.30x", results["fixed_cpu_vs_static"] <= 1.30),
        ("hit throughput vs nginx", f"{results['rps_vs_nginx']:.2f}x", ">= 1.30x", results["rps_vs_nginx"] >= 1.30),
        ("hit throughput vs static hyper", f"{results['rps_vs_static']:.2f}x", "", True),
        ("stampede: Bill24 calls, every run", f"{max(gs['calls'])}", "== 1", set(gs["calls"]) == {1}),
        ("stampede: slowest, open connections (wrk)", f"{max(gs['wrk']) * 1000:.1f} ms (nginx {max(ns['wrk']) * 1000:.1f} ms)", "<= 110 ms", max(gs["wrk"]) <= 0.110),
        ("stampede: slowest, connecting too (oha)", f"{max(gs['oha']) * 1000:.1f} ms (nginx {max(ns['oha']) * 1000:.1f} ms)", "", True),
        ("RSS per cached entry", f"{per_entry:.0f} B", "<= 1024 B", per_entry <= 1024),
        ("Bill24 calls, uniform cold", f"{uni[2]}", f"<= {uni[3]}", uni[2] <= uni[3]),
        ("Bill24 calls, Zipf", f"{zipf[2]}", f"<= {zipf[3]}", zipf[2] <= zipf[3]),
    ]
    log("\n== summary")
    for label, value, target, ok in rows:
        log(f"  {label:<44}{value:>28}  {target:<10}{'ok' if ok else 'MISSED'}")
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump({"medians": med, "fixed_rate_medians": fixed, "ratios": results, "stampede": stampede,
                   "stewardship": {k: v[1:] for k, v in stewardship.items()},
                   "per_entry_bytes": per_entry, "authorize_calls": authorizes}, f, indent=2)
    log(f"\nraw figures: {work}/summary.json")


JWT_ISSUER = "https://kubernetes.default.svc.cluster.local"
JWT_SUBJECT = "system:serviceaccount:bench:bench"


class Es256Issuer:
    """An ES256 signing key, its JWKS, and distinct tokens shaped like Kubernetes projected
    service-account tokens (audience bill24-gateway, an hour to live)."""

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.key = ec.generate_private_key(ec.SECP256R1())
        self.issued = 0
        public = self.key.public_key().public_numbers()
        self.jwks = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "bench", "use": "sig", "alg": "ES256",
                               "x": b64url(public.x.to_bytes(32, "big")),
                               "y": b64url(public.y.to_bytes(32, "big"))}]}

    def tokens(self, n):
        """`n` tokens never issued before."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = b64url(json.dumps({"alg": "ES256", "kid": "bench", "typ": "JWT"}).encode())
        now = int(time.time())
        tokens = []
        for i in range(self.issued, self.issued + n):
            claims = {"aud": ["bill24-gateway"], "exp": now + 3600, "iat": now, "nbf": now,
                      "iss": JWT_ISSUER, "jti": f"bench-{i}", "sub": JWT_SUBJECT,
                      "kubernetes.io": {"namespace": "bench",
                                        "serviceaccount": {"name": "bench", "uid": f"{i:032x}"}}}
            signing_input = f"{header}.{b64url(json.dumps(claims).encode())}"
            der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
            r, s_ = decode_dss_signature(der)
            tokens.append(f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s_.to_bytes(32, 'big'))}")
        self.issued += n
        return tokens


def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def identity_phase(work, sim_port, threads, rounds, duration, conns, keys):
    """Cache hits by how the caller is identified and how it connects, in paired rounds
    against a key-authenticated hit over plain HTTP: over TLS (wrk's connections stay open,
    so this is the record layer, not handshakes); with a JWT, the same token on every request
    (verified once, then one hash and a lookup); with a new JWT on every request (a signature
    check each: every run gets tokens never seen, more than it can send)."""
    try:
        issuer = Es256Issuer()
    except ImportError:
        sys.exit("bench: PHASES=identity needs python3's cryptography package (to sign tokens)")
    with open(os.path.join(work, "jwks.json"), "w") as f:
        json.dump(issuer.jwks, f)
    token = issuer.tokens(1)[0]
    tokens_file = os.path.join(work, "tokens.txt")
    per_run = int(os.environ.get("FRESH_TOKENS", "150000"))

    def fresh_tokens():
        with open(tokens_file, "w") as f:
            f.write("\n".join(issuer.tokens(per_run)) + "\n")
        return {"tokens": tokens_file}
    cert, key = os.path.join(work, "tls.crt"), os.path.join(work, "tls.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    tail = (f'[[callers]]\nname = "bench-jwt"\njwt_subject = "{JWT_SUBJECT}"\n'
            f'[jwt]\nissuer = "{JWT_ISSUER}"\njwks_file = "{work}/jwks.json"\n')
    plain, plain_url, _ = start_gateway(work, "identity-plain", sim_port, threads, tail=tail)
    tls, tls_url, _ = start_gateway(work, "identity-tls", sim_port, threads, tail=tail,
                                    server_extra=f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"')
    tls_url = tls_url.replace("http://", "https://")
    targets = {
        "plain, key": (plain_url + PATH, lambda: [plain.pid]),
        "plain, JWT": (plain_url + PATH, lambda: [plain.pid], {"bearer": token}),
        "plain, a new JWT each": (plain_url + PATH, lambda: [plain.pid], fresh_tokens),
        "TLS, key": (tls_url + PATH, lambda: [tls.pid]),
        "TLS, JWT": (tls_url + PATH, lambda: [tls.pid], {"bearer": token}),
    }
    log(f"\n== caller identity: {rounds} paired rounds of {duration}s, wrk -t1 -c{conns} over {keys} "
        f"keys, every answer a cache hit; ES256 tokens of {len(token)} bytes")
    for url in (plain_url, tls_url):
        wrk(url + PATH, 3, conns, keys, mix="sequential")
    samples = paired_rounds(targets, rounds, duration, conns, keys)
    sent = max(r["requests"] for r in samples["plain, a new JWT each"])
    if sent > per_run:
        log(f"  a run sent {sent:.0f} requests with {per_run} fresh tokens: raise FRESH_TOKENS")
    errors = {name: sum(r["errors"] for r in runs) for name, runs in samples.items()}
    if any(errors.values()):
        log(f"  errors (non-2xx included): {errors}")
    log(f"\n{'':<26}{'req/s':>10}{'p50':>10}{'p99':>10}{'CPU µs/req':>12}{'CPU vs plain, key':>26}")
    results = {}
    for name, runs in samples.items():
        ratios = paired(samples, name, "plain, key")
        results[name] = {"cpu_us": statistics.median(r["cpu_us"] for r in runs),
                         "rps": statistics.median(r["rps"] for r in runs),
                         "cpu_vs_plain_key": statistics.median(ratios),
                         "cpu_vs_plain_key_range": [min(ratios), max(ratios)]}
        m = results[name]
        log(f"{name:<26}{m['rps']:>10.0f}{fmt_us(statistics.median(r['p50_us'] for r in runs)):>10}"
            f"{fmt_us(statistics.median(r['p99_us'] for r in runs)):>10}{m['cpu_us']:>12.2f}"
            f"{m['cpu_vs_plain_key']:>11.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    jwt_vs_key = paired(samples, "TLS, JWT", "TLS, key")
    log(f"TLS, JWT vs TLS, key: {statistics.median(jwt_vs_key):.2f}x "
        f"({min(jwt_vs_key):.2f}-{max(jwt_vs_key):.2f})")
    with open(os.path.join(work, "identity.json"), "w") as f:
        json.dump({"results": results, "samples": samples}, f, indent=2)
    log(f"\nraw figures: {work}/identity.json")


def hit_args(parser):
    parser.add_argument("--static", required=True)
    parser.add_argument("--baseline-bin", help="another gateway build, measured beside this one in the hit rounds")


if __name__ == "__main__":
    main_with_bin(main, hit_args)
