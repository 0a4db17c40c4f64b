#!/usr/bin/env bash
# The abuse soak: an ordinary load through the gateway while attackers cycle (bench/abuse.py says
# which). Reports the gateway's memory before, at its peak and after, and the ordinary load's
# errors and latency. DURATION=120 seconds of attacks by default.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
# The binary alone, as the image builds it (see bench/run.sh).
cargo build --profile dist --locked --quiet --bin bill24-gateway
target_dir="${CARGO_TARGET_DIR:-target}"
exec python3 bench/abuse.py --bin "$target_dir/dist/bill24-gateway" "$@"
