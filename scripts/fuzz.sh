#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer, AddressSanitizer,
# debug assertions and overflow checks on) for SECONDS each, starting from
# its committed corpus (fuzz/corpus/<target>/, seeds and past crashes).
# Fails on any crash: a panic, a sanitizer report, an input slower than
# 10 s, one allocation over 64 MiB or 1 GiB resident (inputs are at most
# 64 KiB: no decoder may allocate what the input does not pay for).
# libFuzzer leaves the failing input in fuzz/artifacts/<target>/; once it
# is fixed, commit the input under fuzz/corpus/<target>/ as a regression.
#
#   scripts/fuzz.sh [SECONDS]          # default 20 s per target
#
# New inputs found go to $TARGET_DIR/fuzz-corpus/<target>/ (kept between
# runs, so repeated runs go deeper), not to the committed corpus.
set -euo pipefail

SECONDS_EACH="${1:-20}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# The workspace's target dir: fuzz builds are for an explicit --target, so
# they land in their own x86_64-*/ folder there and touch nothing else.
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
TARGETS=(flow_decode identity_decode spool_segment config_toml)

log() { printf '[fuzz] %s\n' "$*" >&2; }

# cargo-fuzz, installed (cached) if missing.
PATH="$(bash "$ROOT/scripts/setup.sh" fuzz):$PATH"

cd "$ROOT"
# Built once for every target; `run` then finds it up to date. The same
# flags for both, or `run` builds again. 16 codegen units (cargo-fuzz's
# default is 1): a faster cold build for slightly slower fuzzing.
BUILD=(--codegen-units 16 --target-dir "$TARGET_DIR")
cargo +nightly fuzz build "${BUILD[@]}" < /dev/null

for t in "${TARGETS[@]}"; do
    found="$TARGET_DIR/fuzz-corpus/$t"
    mkdir -p "$found"
    log "$t: ${SECONDS_EACH}s"
    cargo +nightly fuzz run "${BUILD[@]}" "$t" "$found" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -max_len=65536 -timeout=10 \
        -rss_limit_mb=1024 -malloc_limit_mb=64 -print_final_stats=1 < /dev/null
done
log "no crashes: ${TARGETS[*]}"
