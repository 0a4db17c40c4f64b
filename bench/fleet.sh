#!/usr/bin/env bash
# The fleet benchmark: three gateway replicas sharing one redis-server in front of the Bill24
# simulator (bench/fleet.py says what it measures). About six minutes.
#   bench/fleet.sh           ROUNDS=5 paired rounds for the hit-cost phase
#   PHASES=faults,failover bench/fleet.sh   only some phases (stewardship, stampede, hits,
#                            faults: Redis killed/stopped/paused, failover: a Cluster master killed,
#                            limits: the fleet ceiling, fleet-scoped callers, one circuit)
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null; }
if ! need wrk || ! need redis-server || ! need redis-cli; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk redis-server redis-tools >/dev/null
fi
# The binary alone, as the image builds it (see bench/run.sh).
cargo build --profile dist --locked --quiet --bin bill24-gateway
target_dir="${CARGO_TARGET_DIR:-target}"
exec python3 bench/fleet.py --bin "$target_dir/dist/bill24-gateway" "$@"
