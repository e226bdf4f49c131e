#!/usr/bin/env bash
# Installs everything the build, the tests and the demo need on a fresh machine
# of this kind (Debian, root, rustup with stable + nightly). Idempotent: every
# step checks first, so a second run takes seconds.
#
# Slow installs go to a per-user cache keyed by version (FLOWLOG_TOOLS), so a
# fresh clone on the same machine reuses them and a new machine still works.
#
#   scripts/setup.sh            # everything (build + tests + demo)
#   scripts/setup.sh build      # only what `cargo build` needs
#   scripts/setup.sh fuzz       # cargo-fuzz (scripts/fuzz.sh); prints its bin dir
set -euo pipefail

WHAT="${1:-all}"
TOOLS="${FLOWLOG_TOOLS:-$HOME/.cache/flowlog/tools}"
BPF_LINKER_VERSION=0.13.0
LLVM_MAJOR=22
TANSU_VERSION=0.6.0
MOTO_VERSION=5.2.5
DUCKDB_VERSION=2.0.0
CARGO_FUZZ_VERSION=0.13.2

log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    # apt has been seen failing transiently here ("failed to read archive"): retry.
    for attempt in 1 2 3; do
        if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"; then
            return 0
        fi
        log "apt attempt $attempt failed, retrying"
        sleep 5
    done
    log "apt-get install failed: ${missing[*]}"
    return 1
}

# --- Rust toolchains -------------------------------------------------------
# User space builds on the pinned stable (rust-toolchain.toml); the eBPF crate
# needs a nightly with rust-src for -Z build-std=core.
setup_rust() {
    command -v rustup >/dev/null || { log "rustup is required (https://rustup.rs)"; exit 1; }
    rustup toolchain list | grep -q '^1.95.0' || rustup toolchain install 1.95.0 --profile minimal
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
        log "adding rust-src to nightly"
        rustup component add rust-src --toolchain nightly
    fi
}

# --- bpf-linker, built against the same LLVM major as the nightly rustc ----
setup_bpf_linker() {
    local nightly_llvm
    nightly_llvm="$(rustup run nightly rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
    if [ "$nightly_llvm" != "$LLVM_MAJOR" ]; then
        log "nightly rustc uses LLVM $nightly_llvm but bpf-linker is pinned to LLVM $LLVM_MAJOR"
        exit 1
    fi
    local root="$TOOLS/bpf-linker-$BPF_LINKER_VERSION-llvm$LLVM_MAJOR"
    if [ -x "$root/bin/bpf-linker" ]; then return 0; fi
    apt_install "llvm-$LLVM_MAJOR-dev" libzstd-dev zlib1g-dev
    log "building bpf-linker $BPF_LINKER_VERSION (about 5 minutes on 2 cores)"
    PATH="/usr/lib/llvm-$LLVM_MAJOR/bin:$PATH" CARGO_TARGET_DIR="$TOOLS/.build/bpf-linker" \
        cargo +1.95.0 install "bpf-linker@$BPF_LINKER_VERSION" --locked --root "$root" \
        --no-default-features --features "llvm-$LLVM_MAJOR,llvm-link-static"
    rm -rf "$TOOLS/.build/bpf-linker"
}

# --- Kafka-protocol broker for tests and the demo ---------------------------
setup_tansu() {
    local root="$TOOLS/tansu-$TANSU_VERSION"
    if [ -x "$root/bin/tansu" ]; then return 0; fi
    log "building tansu $TANSU_VERSION (20-25 minutes cold on 2 cores)"
    CARGO_TARGET_DIR="$TOOLS/.build/tansu" \
        cargo +1.95.0 install tansu --version "$TANSU_VERSION" --locked --root "$root" \
        --features dynostore,libsql
    rm -rf "$TOOLS/.build/tansu"
}

# --- cargo-fuzz: the fuzz targets of fuzz/ (libFuzzer, on nightly) ----------
setup_cargo_fuzz() {
    local root="$TOOLS/cargo-fuzz-$CARGO_FUZZ_VERSION"
    if [ -x "$root/bin/cargo-fuzz" ]; then return 0; fi
    log "building cargo-fuzz $CARGO_FUZZ_VERSION (about a minute)"
    CARGO_TARGET_DIR="$TOOLS/.build/cargo-fuzz" \
        cargo +1.95.0 install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$root"
    rm -rf "$TOOLS/.build/cargo-fuzz"
}

# --- Python venv: Avro reader for tests, moto EC2/S3 endpoint, Kafka client,
# DuckDB (queries the Parquet flow lake) ----------------------------------
PY_PACKAGES=(fastavro==1.12.1 confluent-kafka==2.12.1 "moto[server]==$MOTO_VERSION" boto3 "duckdb==$DUCKDB_VERSION" zstandard==0.25.0)
setup_python() {
    local venv="$TOOLS/venv-py-1"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "
import fastavro, confluent_kafka, moto, boto3, duckdb, zstandard
assert duckdb.__version__ == '$DUCKDB_VERSION', duckdb.__version__" 2>/dev/null; then
        return 0
    fi
    log "installing into the python venv: ${PY_PACKAGES[*]}"
    # An existing venv gets what it lacks (pip skips what is there).
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
}

setup_system() {
    # bpftrace: the peer bench-capture runs beside the sidecar (bench/peers/).
    apt_install iproute2 procps clang pkg-config nftables bpftrace
}

case "$WHAT" in
    build) setup_rust; setup_system; setup_bpf_linker ;;
    all) setup_rust; setup_system; setup_bpf_linker; setup_python; setup_tansu; setup_cargo_fuzz ;;
    # Logs on stderr; stdout is the directory to put on PATH.
    fuzz) { setup_rust; setup_cargo_fuzz; } >&2; echo "$TOOLS/cargo-fuzz-$CARGO_FUZZ_VERSION/bin" ;;
    *) log "usage: $0 [build|all|fuzz]"; exit 2 ;;
esac
log "done (tools in $TOOLS)"
