#!/usr/bin/env bash
# The demo: a 2-node lab cluster built from network namespaces, a sample app, its traffic
# in plaintext, then the same traffic carried over the mesh. `make demo ARGS=--keep`
# leaves the lab up afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
exec "$target/debug/mesh-lab" --name demo demo "$@"
