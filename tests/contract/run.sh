#!/usr/bin/env bash
# Contract fuzzing: schemathesis runs all of its checks (server errors, status code, content
# type, header and schema conformance, negative and positive data, auth, methods) against the
# live gateway in front of the Bill24 simulator, for both OpenAPI documents.
#
#   tests/contract/run.sh path/to/bill24-gateway      (EXAMPLES=N per operation, default 300)
# Needs schemathesis and openapi-spec-validator (PyPI); .ci/run installs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="$(realpath "${1:?usage: tests/contract/run.sh path/to/bill24-gateway}")"
examples="${EXAMPLES:-300}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== the documents are valid OpenAPI"
openapi-spec-validator openapi.yaml openapi-admin.yaml

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
sim_port="$(port)"; gw_port="$(port)"; admin_port="$(port)"
caller_key="contract-caller-key"
admin_key="contract-admin-key"

"$bin" simulate --listen "127.0.0.1:$sim_port" >"$work/sim.log" 2>&1 &
cat >"$work/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$gw_port"
admin_listen = "127.0.0.1:$admin_port"
admin_key_sha256 = "$(echo "$admin_key" | "$bin" hash-key)"
[upstream]
base_url = "http://127.0.0.1:$sim_port"
merchant_token = "demo-merchant-token"
client_id = "demo-client"
client_secret = "demo-client-secret"
[log]
level = "warn"
[[callers]]
name = "contract"
key_sha256 = "$(echo "$caller_key" | "$bin" hash-key)"
TOML
"$bin" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done

run() {
    local document="$1" url="$2" key="$3"
    echo "== schemathesis: $document"
    st run "$document" --url "$url" \
        --header "Authorization: Bearer $key" \
        --checks all \
        --max-examples "$examples" \
        --seed 20261125 \
        --request-timeout 10 \
        --warnings off \
        --report junit --report-dir "$work/reports"
}
status=0
run openapi.yaml "http://127.0.0.1:$gw_port" "$caller_key" || status=1
run openapi-admin.yaml "http://127.0.0.1:$admin_port" "$admin_key" || status=1
if [ "$status" -ne 0 ]; then
    echo "contract: schemathesis found problems; the gateway's log follows" >&2
    tail -20 "$work/gateway.log" >&2
fi
exit "$status"
