#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/, their own cargo workspace) and runs each one for a
# bounded time, starting from the corpus kept in the repository (fuzz/corpus/TARGET).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      default: $FUZZ_SECONDS (60) each, every target
#   FUZZ_SEED=1 FUZZ_RUNS=500 scripts/fuzz.sh 30  the same inputs on every machine (CI)
#   make fuzz FUZZ_SECONDS=600                  a longer run
#   FUZZ_PROFILE=dev scripts/fuzz.sh 10         unoptimised: builds in about half the time,
#                                               runs slower (the brief CI run, make fuzz-smoke)
#
# Stable toolchain: `--sanitizer none` needs no -Z flag, and libfuzzer-sys builds
# libFuzzer itself with cc. (Should a cargo-fuzz version ever insist on nightly-only
# flags, set RUSTC_BOOTSTRAP=1 here, for this build only.) New inputs found during a run
# go to a scratch directory, so the repository's corpus stays small; a crash stops the
# run with the input under fuzz/artifacts/TARGET/: fix the bug, then add that input to
# fuzz/corpus/TARGET/ so it is replayed from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-${FUZZ_SECONDS:-60}}
shift || true

cargo_fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
  echo "fuzz: installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

# Its own target directory: every crate is built with coverage instrumentation.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/fuzz/target}
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)

# cargo-fuzz defaults to one codegen unit per crate: far slower to build on few cores.
case ${FUZZ_PROFILE:-release} in
  release) profile=(--release --codegen-units 16) ;;
  dev) profile=(--dev) ;;
  *) echo "fuzz: FUZZ_PROFILE is release or dev" >&2; exit 2 ;;
esac
start=$(date +%s)
cargo fuzz build --fuzz-dir fuzz --sanitizer none "${profile[@]}"
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - start)) s"

# FUZZ_SEED and FUZZ_RUNS (make fuzz-smoke): the same inputs on every machine.
extra=()
[[ -n ${FUZZ_SEED:-} ]] && extra+=("-seed=$FUZZ_SEED")
[[ -n ${FUZZ_RUNS:-} ]] && extra+=("-runs=$FUZZ_RUNS")

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "fuzz/corpus/$t"
  echo "fuzz: $t for ${seconds} s"
  # -rss_limit_mb: a parser that balloons on a small input is a finding too.
  if ! cargo fuzz run --fuzz-dir fuzz --sanitizer none "${profile[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1 "${extra[@]}" \
    >"$scratch/$t.log" 2>&1; then
    tail -40 "$scratch/$t.log" >&2
    echo "fuzz: $t FAILED (the input is under fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$scratch/$t.log" | tr '\n' ' '  || true
  echo "$(grep -oE 'cov: [0-9]+' "$scratch/$t.log" | tail -1)"
done
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no crash (total $(($(date +%s) - start)) s)"
