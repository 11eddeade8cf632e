# The two entry points of the README: `make demo` and `make test`.
CARGO ?= cargo

.PHONY: test demo deps fmt-check clippy unit bench

test: deps fmt-check clippy unit

deps:
	@scripts/install-deps.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Binaries first: the end-to-end tests run the real programs in network namespaces.
unit:
	$(CARGO) build --workspace --bins
	scripts/cargo-test.sh
	scripts/check-leftovers.sh

bench:
	$(CARGO) bench -p hbone --bench hbone

demo: deps
	$(CARGO) build --workspace --bins
	@scripts/demo.sh $(ARGS)
