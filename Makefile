# The two entry points of the README: `make demo` and `make test`.
CARGO ?= cargo

.PHONY: test demo deps fmt-check clippy unit chart fuzz fuzz-smoke images bench bench-ztunnel bench-lab profile

test: deps fmt-check clippy unit chart fuzz-smoke

deps:
	@scripts/install-deps.sh

fmt-check:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Binaries first: the end-to-end tests run the real programs in network namespaces.
unit:
	$(CARGO) build --workspace --bins
	scripts/cargo-test.sh
	scripts/check-leftovers.sh

# The Helm chart renders and every object validates against the Kubernetes schemas.
chart:
	scripts/check-chart.sh

# Coverage-guided fuzzing (cargo-fuzz + libFuzzer, stable toolchain) of every parser that
# reads untrusted bytes: each target for FUZZ_SECONDS, from the corpus in fuzz/corpus/.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

# CI: every target briefly (replays the corpus, then explores a little), unoptimised to
# keep the build short. A fixed seed and a count of runs make it the same exploration on
# every machine (the time is only a cap: a slower machine runs a prefix of it), so CI's
# verdict never depends on the machine's speed; `make fuzz` explores at random.
FUZZ_SMOKE_SECONDS ?= 30
FUZZ_SMOKE_RUNS ?= 500
fuzz-smoke:
	FUZZ_PROFILE=dev FUZZ_SEED=1 FUZZ_RUNS=$(FUZZ_SMOKE_RUNS) scripts/fuzz.sh $(FUZZ_SMOKE_SECONDS)

bench:
	$(CARGO) bench -p hbone --bench hbone

# ztunnel's data path on two nodes (release binaries): direct vs through two ztunnels.
bench-ztunnel: deps
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p mesh-e2e --bench ztunnel_paths

# The mesh on a 2-node lab against the direct path, and the waypoint against HAProxy, in
# one run (release binaries): make bench-lab ARGS="--runs 3"
bench-lab: deps
	$(CARGO) build --release --workspace --bins
	target/release/mesh-lab --name bench bench $(ARGS)

# CPU profiles of both ztunnels and the waypoint under each bench load (perf record -g on
# a release build with line tables and frame pointers), as flame graphs:
# target/profile/<load>-<binary>.svg. make profile [PROFILE_SECONDS=5] [ARGS=...]
profile: deps
	scripts/profile.sh $(ARGS)

demo: deps
	$(CARGO) build --workspace --bins
	@scripts/demo.sh $(ARGS)

# The container image the Helm chart runs (every binary in one image).
IMAGE ?= ghcr.io/ambient-mesh/ambient-mesh
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
images:
	docker build -t $(IMAGE):$(TAG) .
