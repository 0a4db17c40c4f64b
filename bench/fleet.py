#!/usr/bin/env python3
"""The fleet benchmark behind bench/fleet.sh (see README, "The fleet"): three gateway replicas
(the dist build) in front of one Bill24 simulator, sharing one redis-server, on this machine.

Phases, each against the same setup without Redis where there is something to compare:
  * stewardship: a Zipf load over 10 000 customers spread over the three replicas for 30 s
    with a 10 s TTL: Bill24 balance calls against distinct customers per TTL window, and
    authorize calls over 20 s tokens (refreshed 2 s before expiry);
  * stampede: 200 concurrent requests for one cold customer spread over the replicas while
    Bill24 answers in 100 ms (wrk on open connections, timed from the send): Bill24 calls and
    the slowest answer;
  * L1 hits with Redis on and off (paired rounds, CPU per request), and L2 hits (a replica
    whose own cache holds one entry, so nearly every request is read from Redis): the extra
    CPU per request and latency;
  * Redis killed, stopped (SIGSTOP) and paused (`CLIENT PAUSE ALL`) during a load run, and a
    master of a 6-node Redis Cluster (3 masters, 3 replicas) killed so that its replica is
    promoted: failed requests (a fill lock that outlives its fill shows as 504s), p99 and the
    slowest answer, and fill locks left behind.
"""

import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the helpers of bench/run.py)

from run import (  # noqa: E402
    CALLER_KEY, PATH, free_port, log, metric_sum, metrics, sim_control, sim_stats,
    start, stop, wait_ready, wrk,
)

PROCS = run.PROCS


def redis_server(work, port):
    p = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no"], os.path.join(work, f"redis-{port}.log"))
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                          text=True).stdout.strip() == "PONG":
            return p
        time.sleep(0.05)
    sys.exit("bench: redis-server did not start")


def gateway(work, name, sim_port, redis_port=None, ttl="10s", max_entries=200000, prefix="bench",
            redis_ports=None, upstream_extra="", caller_extra=""):
    redis = ""
    ports = redis_ports or ([redis_port] if redis_port else [])
    if ports:
        urls = ", ".join(f'"redis://127.0.0.1:{p}"' for p in ports)
        redis = f'[redis]\nurls = [{urls}]\nkey_prefix = "{prefix}"\n'
    port, admin = free_port(), free_port()
    key_hash = subprocess.run([run.ARGS.bin, "hash-key"], input=CALLER_KEY + "\n",
                              capture_output=True, text=True, check=True).stdout.strip()
    config = os.path.join(work, f"{name}.toml")
    with open(config, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
worker_threads = 1
[upstream]
base_url = "http://127.0.0.1:{sim_port}"
merchant_token = "demo-merchant-token"
client_id = "demo-client"
client_secret = "demo-client-secret"
token_refresh_margin = "2s"
{upstream_extra}
{redis}
[cache]
ttl = "{ttl}"
max_entries = {max_entries}
[log]
level = "warn"
[[callers]]
name = "bench"
key_sha256 = "{key_hash}"
{caller_extra}
""")
    p = start([run.ARGS.bin, "--config", config], os.path.join(work, f"{name}.log"))
    wait_ready(f"http://127.0.0.1:{admin}/readyz")
    return {"proc": p, "url": f"http://127.0.0.1:{port}", "admin": f"http://127.0.0.1:{admin}"}


def fleet(work, sim_port, redis_port, n=3, **kw):
    tag = "redis" if redis_port or kw.get("redis_ports") else "alone"
    return [gateway(work, f"{tag}-{i}-{time.time_ns()}", sim_port, redis_port, **kw) for i in range(n)]


def stop_all(gateways):
    for g in gateways:
        stop(g["proc"])


def wrk_many(gateways, seconds, conns, keys, mix, prefix):
    """wrk against each replica at once; the results in order."""
    procs = []
    for g in gateways:
        env = dict(os.environ, KEYS=str(keys), MIX=mix, KEY=CALLER_KEY, PREFIX=prefix)
        procs.append(subprocess.Popen(
            ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s",
             os.path.join(run.HERE, "wrk", "balance.lua"), g["url"] + PATH],
            stdout=subprocess.PIPE, text=True, env=env))
    results = []
    for p in procs:
        out = p.communicate()[0]
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        results.append({k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])})
    return results


def stewardship(work, sim, sim_port, redis_port):
    seconds, ttl, keys = 30, 10, 10000
    sim_control(sim, {"token_lifetime_ms": 20000, "reset_counters": True})
    gws = fleet(work, sim_port, redis_port, ttl=f"{ttl}s")
    time.sleep(0.5)
    before = sim_stats(sim)
    res = wrk_many(gws, seconds, 32, keys, "zipf", f"Z{'R' if redis_port else 'A'}{time.time_ns()}-")
    after = sim_stats(sim)
    calls = after["balance_calls"] - before["balance_calls"]
    distinct_bound = keys * math.ceil(seconds / ttl)
    requests = sum(r["requests"] for r in res)
    errors = sum(r["errors"] for r in res)
    # Authorize calls over a longer span of token lifetimes: the load above, then idle.
    time.sleep(5)
    authorizes = sim_stats(sim)["authorize_calls"]
    lifetimes = (seconds + 5.5) / 20
    stop_all(gws)
    return {"calls": calls, "bound": distinct_bound, "requests": requests, "errors": errors,
            "authorizes": authorizes, "lifetimes": lifetimes}


def stampede(work, sim, sim_port, redis_port):
    gws = fleet(work, sim_port, redis_port)
    sim_control(sim, {"latency_ms": 100})
    runs = []
    for i in range(3):
        prefix = f"ST{'R' if redis_port else 'A'}{i}-{time.time_ns()}-"
        before = sim_stats(sim)["balance_calls"]
        # 67 + 67 + 66 connections: 200 concurrent first requests for one cold key.
        res = wrk_many(gws, 1, 67, 1, "single", prefix)
        calls = sim_stats(sim)["balance_calls"] - before
        runs.append({"calls": calls, "slowest_ms": max(r["max_us"] for r in res) / 1000,
                     "errors": sum(r["errors"] for r in res)})
    sim_control(sim, {"latency_ms": 0})
    stop_all(gws)
    return runs


def gateway_rounds(gateways, rounds, seconds, keys, prefix):
    """run.paired_rounds over gateways started by `gateway` (wrk -c64)."""
    targets = {name: (g["url"] + PATH, lambda g=g: [g["proc"].pid]) for name, g in gateways.items()}
    return run.paired_rounds(targets, rounds, seconds, 64, keys, prefix)


def hit_cost(work, sim_port, redis_port, rounds):
    """CPU per request: an L1 hit with Redis on, with it off; an L2 hit."""
    with_redis = gateway(work, "l1-redis", sim_port, redis_port, ttl="1h", prefix="hits")
    without = gateway(work, "l1-alone", sim_port, None, ttl="1h")
    # A replica whose own cache holds almost nothing: its requests are read from Redis.
    l2 = gateway(work, "l2", sim_port, redis_port, ttl="1h", prefix="hits", max_entries=1)
    for g in (with_redis, without):
        wrk(g["url"] + PATH, 3, 64, 1000, mix="sequential", prefix="HIT")
    targets = {"L1 hit, Redis on": with_redis, "L1 hit, Redis off": without, "L2 hit": l2}
    samples = gateway_rounds(targets, rounds, 6, 1000, "HIT")
    tiers = metrics(l2["admin"])
    l2_hits = metric_sum(tiers, 'gateway_cache_hits_total{tier="l2"}')
    all_hits = metric_sum(tiers, "gateway_cache_hits_total")
    stop_all([with_redis, without, l2])
    med = {n: {k: statistics.median(s[k] for s in v) for k in v[0]} for n, v in samples.items()}
    return med, {
        "l1_on_vs_off": run.paired(samples, "L1 hit, Redis on", "L1 hit, Redis off"),
        "l2_minus_l1_cpu_us": [x["cpu_us"] - y["cpu_us"] for x, y in
                               zip(samples["L2 hit"], samples["L1 hit, Redis on"])],
        "l2_share": l2_hits / max(all_hits, 1),
    }


def fill_locks(ports, prefix):
    """Fill locks left in these Redis nodes, with their remaining time (ms)."""
    left = []
    for port in ports:
        keys = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}:*:fill"],
                              capture_output=True, text=True).stdout.split()
        for key in keys:
            ttl = subprocess.run(["redis-cli", "-p", str(port), "PTTL", key], capture_output=True,
                                 text=True).stdout.strip()
            left.append((key, ttl))
    return left


def load_results(procs):
    out = [p.communicate()[0] for p in procs]
    return [{k: float(v) for k, v in (kv.split("=") for kv in
             next(l for l in o.splitlines() if l.startswith("RESULT ")).split()[1:])} for o in out]


def start_load(gws, prefix, seconds=10):
    env = dict(os.environ, KEYS="5000", MIX="zipf", KEY=CALLER_KEY, PREFIX=prefix)
    return [subprocess.Popen(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", os.path.join(run.HERE, "wrk", "balance.lua"),
         g["url"] + PATH], stdout=subprocess.PIPE, text=True, env=env) for g in gws]


def summary(res, back_after_s, up, locks):
    return {"back_after_s": back_after_s,
            "requests": sum(r["requests"] for r in res),
            "errors": sum(r["errors"] for r in res),
            "non2xx": sum(r["non2xx"] for r in res),
            "p99_ms": max(r["p99_us"] for r in res) / 1000,
            "max_ms": max(r["max_us"] for r in res) / 1000,
            "redis_up_after": up,
            "locks_left": locks}


def back_on_redis(gws):
    t0 = time.time()
    up = []
    while time.time() - t0 < 30:
        up = [metric_sum(metrics(g["admin"]), "gateway_redis_up") for g in gws]
        if all(u == 1.0 for u in up):
            break
        time.sleep(0.1)
    return round(time.time() - t0, 1), up


def redis_faults(work, sim, sim_port, redis_port, redis_proc, timeout_ms=50):
    """A 10 s Zipf load over all replicas; Redis killed at 3 s (and started again once the run
    is over), stopped at 3 s for 4 s, or paused (`CLIENT PAUSE 4000 ALL`) at 3 s."""
    results = {}
    for fault in ("killed", "stopped", "paused"):
        sim_control(sim, {"reset_counters": True})
        gws = fleet(work, sim_port, redis_port, ttl="2s", prefix=f"fault{fault}")
        time.sleep(0.5)
        procs = start_load(gws, f"F{fault}-")
        time.sleep(3)
        if fault == "killed":
            redis_proc.kill()
            redis_proc.wait()
        elif fault == "stopped":
            os.kill(redis_proc.pid, signal.SIGSTOP)
            time.sleep(4)
            os.kill(redis_proc.pid, signal.SIGCONT)
        else:
            subprocess.run(["redis-cli", "-p", str(redis_port), "CLIENT", "PAUSE", "4000", "ALL"],
                           capture_output=True, check=True)
        res = load_results(procs)
        if fault == "killed":
            redis_proc = redis_server(work, redis_port)
        # The tier resumes by itself: how long after the load run every replica is back on it.
        back, up = back_on_redis(gws)
        results[fault] = summary(res, back, up, fill_locks([redis_port], f"fault{fault}"))
        stop_all(gws)
    return results, redis_proc


def cluster_failover(work, sim, sim_port):
    """A 6-node Redis Cluster (3 masters, 3 replicas, node timeout 2 s); a 12 s Zipf load over
    all replicas, one master killed at 3 s and its replica promoted."""
    ports = []
    procs = []
    for _ in range(6):
        port = free_port()
        while port + 10000 > 65535:
            port = free_port()
        d = os.path.join(work, f"cluster-{port}")
        os.makedirs(d)
        procs.append(start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--cluster-enabled", "yes",
                            "--cluster-config-file", os.path.join(d, "nodes.conf"),
                            "--cluster-node-timeout", "2000"], os.path.join(d, "redis.log")))
        ports.append(port)
    for port in ports:
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                              text=True).stdout.strip() == "PONG":
                break
            time.sleep(0.05)
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, check=True)
    def cluster_ok(ps):
        return all("cluster_state:ok" in subprocess.run(["redis-cli", "-p", str(p), "CLUSTER", "INFO"],
                                                         capture_output=True, text=True).stdout
                   for p in ps)
    def replication(p):
        return subprocess.run(["redis-cli", "-p", str(p), "INFO", "replication"],
                              capture_output=True, text=True).stdout

    def synced(ps):
        # A replica that has not synced with its master cannot take over from it.
        infos = [replication(p) for p in ps]
        slaves = [i for i in infos if "role:slave" in i]
        return len(slaves) == 3 and all("master_link_status:up" in i for i in slaves)
    t0 = time.time()
    while not (cluster_ok(ports) and synced(ports)) and time.time() - t0 < 30:
        time.sleep(0.1)
    sim_control(sim, {"reset_counters": True})
    gws = fleet(work, sim_port, None, ttl="2s", prefix="failover", redis_ports=ports)
    time.sleep(0.5)
    load = start_load(gws, "FAILOVER-", seconds=12)
    time.sleep(3)
    victim = next(i for i, p in enumerate(ports) if subprocess.run(
        ["redis-cli", "-p", str(p), "ROLE"], capture_output=True, text=True).stdout.startswith("master"))
    procs[victim].kill()
    procs[victim].wait()
    killed_at = time.time()
    survivors = [p for i, p in enumerate(ports) if i != victim]

    def masters(ps):
        return sum(subprocess.run(["redis-cli", "-p", str(p), "ROLE"], capture_output=True,
                                  text=True).stdout.startswith("master") for p in ps)
    # Promoted: three masters among the survivors again, and the cluster ok.
    while (masters(survivors) < 3 or not cluster_ok(survivors)) and time.time() - killed_at < 30:
        time.sleep(0.1)
    promoted_after = round(time.time() - killed_at, 1)
    res = load_results(load)
    back, up = back_on_redis(gws)
    result = summary(res, back, up, fill_locks(survivors, "failover"))
    result["promoted_after_s"] = promoted_after
    stop_all(gws)
    for i, p in enumerate(procs):
        if i != victim:
            stop(p)
    return result


def limits(work, sim, sim_port, redis_port, rounds):
    """The fleet's limits (CONTRACT §13): what the ceiling costs a Bill24 call, what a
    fleet-scoped caller costs a request against a replica-scoped one, and an outage replayed
    over three replicas with and without one circuit."""
    out = {}
    # The ceiling: cold misses (every request a new customer) under a ceiling they never
    # reach; the Redis step's own time, from the gateway's histogram.
    g = gateway(work, "ceiling", sim_port, redis_port, ttl="1s", prefix="ceiling",
                upstream_extra="fleet_max_rps = 1000000")
    wrk(g["url"] + PATH, 5, 16, 10_000_000, mix="sequential", prefix=f"CEIL{time.time_ns()}-")
    m = metrics(g["admin"])
    steps = metric_sum(m, 'gateway_redis_duration_seconds_count{op="ceiling"}')
    took = metric_sum(m, 'gateway_redis_duration_seconds_sum{op="ceiling"}')
    out["ceiling_steps"] = steps
    out["ceiling_us"] = took * 1e6 / max(steps, 1)
    stop_all([g])
    # A fleet-scoped caller against a replica-scoped one: hits (one key), a rate never reached.
    scoped = {scope: gateway(work, f"scope-{scope}", sim_port, redis_port, ttl="1h", prefix="scope",
                             caller_extra=f'rate_limit_rps = 100000000\nlimit_scope = "{scope}"')
              for scope in ("fleet", "replica")}
    for g in scoped.values():
        wrk(g["url"] + PATH, 2, 64, 1, prefix="SCOPE")
    samples = gateway_rounds(scoped, rounds, 5, 1, "SCOPE")
    stop_all(scoped.values())
    out["scope_ratio"] = [f["cpu_us"] / r["cpu_us"] for f, r in zip(samples["fleet"], samples["replica"])]
    out["scope_extra_us"] = [f["cpu_us"] - r["cpu_us"] for f, r in zip(samples["fleet"], samples["replica"])]
    out["scope_med"] = {k: statistics.median(x["cpu_us"] for x in v) for k, v in samples.items()}
    # An outage of 10 s over three replicas (circuit_failures 5, cool-down 1 s).
    for label, circuit in (("one circuit", "true"), ("a circuit each", "false")):
        gws = fleet(work, sim_port, redis_port, ttl="1s", prefix=f"outage{circuit}",
                    upstream_extra=f"fleet_circuit = {circuit}\ncircuit_cooldown = \"1s\"\nretries = 0")
        time.sleep(0.5)
        sim_control(sim, {"latency_ms": 20, "balance_fault": {"status": 500}})
        before = sim_stats(sim)["balance_calls"]
        load = start_load(gws, f"OUT{circuit}-", seconds=10)
        load_results(load)
        out[label] = sim_stats(sim)["balance_calls"] - before
        sim_control(sim, {"latency_ms": 0, "balance_fault": None})
        stop_all(gws)
    return out


def limits_phase(work, sim, sim_port, redis_port):
    rounds = int(os.environ.get("ROUNDS", "5"))
    log(f"\n== the fleet's limits: the ceiling's step, fleet- vs replica-scoped callers ({rounds} paired "
        f"rounds), an outage over three replicas")
    r = limits(work, sim, sim_port, redis_port, rounds)
    log(f"  ceiling: {r['ceiling_steps']:.0f} steps (one per Bill24 call), {r['ceiling_us']:.0f} µs each "
        f"on average (one Redis round trip)")
    ratio = r["scope_ratio"]
    extra = r["scope_extra_us"]
    log(f"  fleet-scoped caller over a replica-scoped one: {statistics.median(ratio):.2f}x CPU per request "
        f"(per round {min(ratio):.2f}-{max(ratio):.2f}; +{statistics.median(extra):.1f} µs); medians "
        f"{r['scope_med']['fleet']:.2f} / {r['scope_med']['replica']:.2f} µs")
    log(f"  a 10 s Bill24 outage over three replicas (circuit_failures 5, cool-down 1 s): "
        f"{r['one circuit']} Bill24 calls with one circuit, {r['a circuit each']} with a circuit each")


def main():
    work = tempfile.mkdtemp(prefix="bill24-fleet-")
    log(f"fleet bench: {run.machine()}; 3 replicas (1 runtime thread each), one redis-server, "
        f"work dir {work}")
    sim_port = free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    start([run.ARGS.bin, "simulate", "--listen", f"127.0.0.1:{sim_port}", "--token-lifetime", "20s"],
          os.path.join(work, "sim.log"))
    wait_ready(f"{sim}/_sim/stats")
    redis_port = free_port()
    redis_proc = redis_server(work, redis_port)

    phases = os.environ.get("PHASES", "stewardship,stampede,hits,faults,failover,limits").split(",")
    if "stewardship" in phases:
        stewardship_phase(work, sim, sim_port, redis_port)
    if "stampede" in phases:
        stampede_phase(work, sim, sim_port, redis_port)
    if "hits" in phases:
        hits_phase(work, sim_port, redis_port)
    if "faults" in phases:
        redis_proc = faults_phase(work, sim, sim_port, redis_port, redis_proc)
    if "failover" in phases:
        failover_phase(work, sim, sim_port)
    if "limits" in phases:
        limits_phase(work, sim, sim_port, redis_port)
    for p in PROCS:
        stop(p)


def stewardship_phase(work, sim, sim_port, redis_port):
    log("\n== stewardship: Zipf over 10 000 customers, 30 s over three replicas, ttl 10 s, 20 s tokens")
    for label, rp in (("no Redis", None), ("Redis", redis_port)):
        s = stewardship(work, sim, sim_port, rp)
        log(f"  {label:<9} Bill24 balance calls {s['calls']} (bound K x ceil(30/10) = {s['bound']}), "
            f"{s['requests']:.0f} requests, {s['errors']:.0f} errors; authorize calls "
            f"{s['authorizes']} over {s['lifetimes']:.1f} token lifetimes")


def stampede_phase(work, sim, sim_port, redis_port):
    log("\n== stampede: 200 concurrent requests for one cold customer over three replicas, Bill24 100 ms")
    for label, rp in (("no Redis", None), ("Redis", redis_port)):
        for r in stampede(work, sim, sim_port, rp):
            log(f"  {label:<9} Bill24 calls {r['calls']}, slowest answer {r['slowest_ms']:.1f} ms "
                f"(wrk, open connections), errors {r['errors']:.0f}")


def hits_phase(work, sim_port, redis_port):
    rounds = int(os.environ.get("ROUNDS", "5"))
    log(f"\n== hit cost: {rounds} paired rounds of 6 s, wrk -t1 -c64 over 1000 keys")
    med, ratios = hit_cost(work, sim_port, redis_port, rounds)
    for name, m in med.items():
        log(f"  {name:<18} {m['rps']:>9.0f} req/s  CPU {m['cpu_us']:.2f} µs/req  p50 {m['p50_us']:.0f} µs"
            f"  p99 {m['p99_us']:.0f} µs")
    on_off = ratios["l1_on_vs_off"]
    extra = ratios["l2_minus_l1_cpu_us"]
    log(f"  L1 hit CPU, Redis on vs off: {statistics.median(on_off):.3f}x "
        f"(per round {min(on_off):.2f}-{max(on_off):.2f})")
    log(f"  L2 hit CPU over an L1 hit: +{statistics.median(extra):.1f} µs/req "
        f"(per round {min(extra):.1f}-{max(extra):.1f}); share of the L2 replica's hits read "
        f"from Redis: {ratios['l2_share']:.3f}; p50 {med['L2 hit']['p50_us'] - med['L1 hit, Redis on']['p50_us']:+.0f} µs")


def faults_phase(work, sim, sim_port, redis_port, redis_proc):
    log("\n== Redis faults during a load run (three replicas, Zipf over 5 000, ttl 2 s, redis.timeout 50 ms)")
    faults, redis_proc = redis_faults(work, sim, sim_port, redis_port, redis_proc)
    for fault, r in faults.items():
        log(f"  Redis {fault:<8} {r['requests']:.0f} requests, {r['errors']:.0f} failed "
            f"({r['non2xx']:.0f} non-2xx), p99 {r['p99_ms']:.1f} ms, slowest {r['max_ms']:.1f} ms, "
            f"all replicas back on Redis {r['back_after_s']} s after the run "
            f"(gateway_redis_up {r['redis_up_after']}); fill locks left {r['locks_left']}")
    return redis_proc


def failover_phase(work, sim, sim_port):
    log("\n== Cluster failover during a load run (6 nodes: 3 masters + 3 replicas, a master killed at 3 s "
        "of 12 s, ttl 2 s)")
    r = cluster_failover(work, sim, sim_port)
    log(f"  master killed: replica promoted after {r['promoted_after_s']} s; {r['requests']:.0f} requests, "
        f"{r['errors']:.0f} failed ({r['non2xx']:.0f} non-2xx), p99 {r['p99_ms']:.1f} ms, slowest "
        f"{r['max_ms']:.1f} ms, all replicas on Redis {r['back_after_s']} s after the run; fill locks "
        f"left {r['locks_left']}")


if __name__ == "__main__":
    run.main_with_bin(main)
