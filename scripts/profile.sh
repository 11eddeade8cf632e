#!/usr/bin/env bash
# `make profile`: a CPU profile of both ztunnels (mesh path) and the waypoint (waypoint
# path) under each load of `mesh-lab bench`, recorded with `perf record -g` and drawn as
# flame graphs: target/profile/<load>-<binary>.svg (binary: ztunnel1 = client side,
# ztunnel2 = server side, waypoint). Extra arguments go to `mesh-lab bench`.
#
#   PROFILE_SECONDS   length of each load (default 5)
#   CARGO_PROFILE     the build profiled (default `profiling`: release with line tables
#                     and frame pointers, so stacks and names are ours)
#   KEEP_PERF_DATA=1  keep the perf.data files next to the graphs
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${PROFILE_SECONDS:-5}
cargo_profile=${CARGO_PROFILE:-profiling}
target=${CARGO_TARGET_DIR:-target}
out=target/profile
inferno_version=0.12.8
tools="$target/tools"

if ! command -v perf >/dev/null 2>&1; then
  echo "installing linux-perf"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends linux-perf >/dev/null
fi
if [ ! -x "$tools/bin/inferno-flamegraph" ] || [ ! -x "$tools/bin/inferno-collapse-perf" ]; then
  echo "installing inferno $inferno_version (flame graphs) into $tools"
  cargo install inferno --locked --version "$inferno_version" --root "$tools"
fi

# perf must be allowed to attach and to name kernel frames for the run; both settings
# are put back as they were afterwards, whatever happens.
paranoid=/proc/sys/kernel/perf_event_paranoid
kptr=/proc/sys/kernel/kptr_restrict
old_paranoid=$(cat "$paranoid")
old_kptr=$(cat "$kptr")
restore() {
  echo "$old_paranoid" >"$paranoid" || true
  echo "$old_kptr" >"$kptr" || true
}
trap restore EXIT
if ! perf record -q -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then
  echo "perf cannot record with perf_event_paranoid=$old_paranoid: setting -1 for the run"
  echo -1 >"$paranoid"
fi
echo 0 >"$kptr" || true

if [ "$cargo_profile" = dev ]; then
  bin="$target/debug"
  cargo build --workspace --bins
else
  bin="$target/$cargo_profile"
  # Frame pointers: `perf record -g` walks stacks by them (DWARF unwinding would write
  # hundreds of MB per load). RUSTFLAGS replaces .cargo/config.toml's flags, so its
  # packed relocations are repeated here (the profiled binary is the released one).
  RUSTFLAGS="${RUSTFLAGS:-} -C force-frame-pointers=yes -C link-arg=-Wl,-z,pack-relative-relocs" \
    cargo build --profile "$cargo_profile" --workspace --bins
fi

rm -rf "$out"
mkdir -p "$out/data"
"$bin/mesh-lab" --name profile bench --runs 1 --seconds "$seconds" --scale 100 --settle 1 \
  --profile "$out/data" --out "$out/bench.json" "$@"

for data in "$out"/data/*.perf.data; do
  name=$(basename "$data" .perf.data)
  perf script -i "$data" --no-inline 2>/dev/null |
    "$tools/bin/inferno-collapse-perf" |
    "$tools/bin/inferno-flamegraph" --title "$name ($cargo_profile build, $seconds s)" \
      >"$out/$name.svg"
done
if [ "${KEEP_PERF_DATA:-0}" != 1 ]; then
  rm -rf "$out/data"
fi
echo "flame graphs:"
ls -s "$out"/*.svg
