//! Builds the eBPF object (flowlog-ebpf) with the nightly toolchain and
//! bpf-linker, and embeds it in the sidecar binary.
use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Where scripts/setup.sh installs bpf-linker (keyed by version and LLVM).
const BPF_LINKER_DIR: &str = "bpf-linker-0.13.0-llvm22/bin";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=FLOWLOG_TOOLS");
    // Let a plain `cargo build` find the bpf-linker that `make setup` installed
    // without the user editing PATH.
    let tools = env::var_os("FLOWLOG_TOOLS")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/flowlog/tools")));
    if let Some(tools) = tools {
        let dir = tools.join(BPF_LINKER_DIR);
        if dir.join("bpf-linker").exists() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut parts = vec![dir];
            parts.extend(env::split_paths(&path));
            // SAFETY: build scripts are single-threaded here.
            unsafe { env::set_var("PATH", env::join_paths(parts)?) };
        }
    }
    let metadata = cargo_metadata_root()?;
    let ebpf = Package {
        name: "flowlog-ebpf",
        root_dir: &metadata,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .context("building the eBPF program failed; run `make setup` (needs nightly + rust-src and bpf-linker)")
}

fn cargo_metadata_root() -> anyhow::Result<String> {
    let manifest = env::var("CARGO_MANIFEST_DIR")?;
    let root = PathBuf::from(manifest)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("flowlog-ebpf");
    root.to_str().map(str::to_owned).ok_or_else(|| anyhow!("non-UTF-8 path"))
}
