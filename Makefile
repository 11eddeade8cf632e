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

unit:
	scripts/cargo-test.sh

bench:
	$(CARGO) bench -p hbone --bench hbone

demo: deps
	$(CARGO) build --workspace
	@scripts/demo.sh
