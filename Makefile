# flowlog — see README.md. Every target works on a fresh machine after `make setup`.
SHELL := /bin/bash
TOOLS ?= $(HOME)/.cache/flowlog/tools
export FLOWLOG_TOOLS := $(TOOLS)
export PATH := $(TOOLS)/bpf-linker-0.13.0-llvm22/bin:$(TOOLS)/tansu-0.6.0/bin:$(PATH)
# The eBPF crate is not a default member: it only builds for the BPF target.
# Root-only tests must run, not skip, under `make test`.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo "sudo -E")

.PHONY: setup build test test-scripts fuzz demo bench bench-ab soak clean

## Install toolchains, bpf-linker, the local broker and the Python test tools.
setup:
	bash scripts/setup.sh all

## What the demo and the benchmarks run: the sidecar, the benchmarks and the
## demo's traffic generator, and the enricher without its EC2 source (a long
## build, not needed there; `cargo build --release` builds everything).
build:
	cargo build --release -p flowlog-sidecar -p flowlog-bench -p flowlog-enricher --no-default-features < /dev/null

## Everything CI checks: generated docs up to date (gen-docs builds both
## binaries, as this user, for their --print-config-reference); unit tests and
## the tests on the real kernel (root) and the real local broker (plain `cargo
## test` skips the root-only ones); the deployment files (Helm chart, manifests,
## systemd units, alert rules, dashboard), checked with the binaries just built;
## and the demo as an end-to-end test (three sidecars, the enricher, the broker,
## the Kubernetes API fixture; its summary's statements asserted), run on the
## debug binaries the tests just built.
test:
	python3 scripts/gen-docs.py --check
	FLOWLOG_REQUIRE_ROOT_TESTS=1 $(SUDO) env "PATH=$(PATH)" cargo test < /dev/null
	cargo build -p flowlog-sidecar -p flowlog-enricher -p flowlog-bench --bins < /dev/null
	FLOWLOG_DEMO_CHECK=1 FLOWLOG_DEMO_BIN=./target/debug FLOWLOG_DEMO_SECONDS=4 FLOWLOG_DEMO_OUT=out/demo-check bash scripts/demo.sh
	FLOWLOG_DEPLOY_NO_SKIP=1 bash scripts/check-deploy.sh
	$(MAKE) test-scripts
	$(MAKE) fuzz

## The fuzz targets of fuzz/ (decoders of the flow and identity topics, the
## spool's segment reader, the enricher's settings and static map), each for
## FUZZ_SECONDS from its committed corpus; fails on any crash.
FUZZ_SECONDS ?= 20
fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

## The Python tests of scripts/ (the S3 fault proxy, the flow-lake queries and
## summaries), on the real moto S3 server and DuckDB from `make setup`.
test-scripts:
	$(TOOLS)/venv-py-1/bin/python -m unittest discover -s scripts/tests -v < /dev/null

## The main job: a few workloads in network namespaces talk while the sidecar
## captures this machine's TCP flows and the enricher attributes them; prints a
## summary read back from the enriched Avro files and leaves a picture (root: sudo).
demo: setup build
	bash scripts/demo.sh

## The pipeline for SOAK_MINUTES under steady load and faults (the sidecar
## cut off from the broker, then killed -9 mid-replay; the broker restarted;
## an enricher killed -9),
## checked exactly: every (host, epoch, sequence) in the lake once, drops by
## reason, each process's RSS over time (scripts/soak.py; root).
SOAK_MINUTES ?= 10
SOAK_RATE ?= 1000
soak: setup build
	$(SUDO) env "PATH=$(PATH)" $(TOOLS)/venv-py-1/bin/python scripts/soak.py --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE)

## All benchmarks; figures printed and written to bench/results/*.json and SUMMARY.md.
bench: setup build
	$(SUDO) ./target/release/bench-capture
	$(SUDO) env "PATH=$(PATH)" FLOWLOG_TOOLS=$(TOOLS) ./target/release/bench-transport
	$(SUDO) env "PATH=$(PATH)" FLOWLOG_TOOLS=$(TOOLS) ./target/release/bench-transport --sweep
	./target/release/bench-enrich
	# Last, and its failure (drops, sockets that do not add up) does not stop
	# the summary, which shows it.
	-$(SUDO) ./target/release/bench-long-lived
	-$(SUDO) env "PATH=$(PATH)" FLOWLOG_TOOLS=$(TOOLS) ./target/release/bench-long-lived --kafka
	python3 bench/summary.py bench/results

# Two sidecar builds' kernel time in one run (both attached at once):
# make bench-ab A=/tmp/flowlog-sidecar-main B=target/release/flowlog-sidecar
bench-ab: build
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make bench-ab A=BINARY B=BINARY"; exit 2; }
	$(SUDO) ./target/release/bench-ab --a $(A) --b $(B)

clean:
	cargo clean
