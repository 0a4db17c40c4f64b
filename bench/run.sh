#!/usr/bin/env bash
# The load-test kit: builds release, starts the Bill24 simulator, the gateway and the two
# baselines (nginx proxy_cache, a static-answer hyper server), and drives them with wrk and
# oha. Prints every figure as a ratio against the baselines measured in the same run.
#
#   bench/run.sh            full run (about 6 minutes)
#   QUICK=1 bench/run.sh    shorter phases, for a smoke test
#
# Settings (environment): THREADS (serving threads of the gateway and the static server, and
# nginx's workers; 0 for one per CPU; default 1), CONNS (wrk connections, 64), KEYS (1000), ROUNDS (5), DURATION (6s),
# PHASES=hits (only the cache-hit phases), PHASES=identity (only hits over TLS and with JWTs,
# against a key-authenticated plain hit; needs python3's cryptography to sign the tokens).
# Extra arguments go to bench/run.py, e.g.
# `--baseline-bin path/to/other/bill24-gateway` measures another build beside this one.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null; }
if ! need wrk || { ! need nginx && [ "${PHASES:-}" != identity ]; }; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk nginx-light curl >/dev/null
fi
# oha for the fixed-rate and stampede phases; the identity phase is wrk's alone.
[ "${PHASES:-}" = identity ] || need oha || cargo install oha --locked --quiet

# The `dist` profile, as the shipped binary (Cargo.toml), built on its own: a build that also
# makes tests or examples would compile in their dev-dependencies' features (tokio's test-util,
# which puts a lock behind every clock read).
cargo build --profile dist --locked --quiet --bin bill24-gateway
cargo build --profile dist --locked --quiet -p bench-static-server
target_dir="${CARGO_TARGET_DIR:-target}"
exec python3 bench/run.py --bin "$target_dir/dist/bill24-gateway" \
    --static "$target_dir/dist/static_server" "$@"
