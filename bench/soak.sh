#!/usr/bin/env bash
# Soak test: the release gateway in front of the Bill24 simulator, minutes of mixed load with
# faults switched on and off. Prints requests sent/answered (must be equal), answers by
# status, the gateway's RSS at start and end, and Bill24 calls per 1000 requests.
#
#   bench/soak.sh [DURATION] [CONCURRENCY]      e.g. bench/soak.sh 5m 64
set -euo pipefail
cd "$(dirname "$0")/.."

duration="${1:-3m}"
concurrency="${2:-32}"
sim_port="${SIM_PORT:-19099}"
gw_port="${GW_PORT:-18080}"
admin_port="${ADMIN_PORT:-19090}"
key="soak-caller-key"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cargo build --release --quiet --bin bill24-gateway --example soak
bin=target/release/bill24-gateway
[ -n "${CARGO_TARGET_DIR:-}" ] && bin="$CARGO_TARGET_DIR/release/bill24-gateway"
soak="$(dirname "$bin")/examples/soak"

"$bin" simulate --listen "127.0.0.1:$sim_port" >"$work/sim.log" 2>&1 &

cat >"$work/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$gw_port"
admin_listen = "127.0.0.1:$admin_port"
request_timeout = "2s"
[upstream]
base_url = "http://127.0.0.1:$sim_port"
merchant_token = "demo-merchant-token"
client_id = "demo-client"
client_secret_file = "$work/secret"
timeout = "1s"
[cache]
ttl = "5s"
stale_if_error = "10s"
refresh_ahead = "1s"
ttl_jitter = 0.2
[log]
level = "warn"
[[callers]]
name = "soak"
key_sha256 = "$(echo "$key" | "$bin" hash-key)"
TOML
echo "demo-client-secret" >"$work/secret"

"$bin" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
gw_pid=$!
for _ in $(seq 50); do
    curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done

status=0
"$soak" --gateway "http://127.0.0.1:$gw_port" --sim "http://127.0.0.1:$sim_port" \
    --pid "$gw_pid" --key "$key" --duration "$duration" --concurrency "$concurrency" \
    --phase "${PHASE:-15s}" || status=$?

echo "gateway metrics (selection):"
curl -fsS "http://127.0.0.1:$admin_port/metrics" | grep -E '^gateway_(circuit|upstream_retries|coalesced|cache_entries|token_refreshes)' || true
kill -TERM "$gw_pid"
wait "$gw_pid" && echo "gateway exited 0 on SIGTERM"
exit $status
