//! Types shared by the eBPF program and the sidecar.
//!
//! Everything here is `#[repr(C)]` and crosses the kernel/user boundary as raw
//! bytes, so layouts are pinned by compile-time size checks. User-space
//! helpers (Pod impls, decoding) live behind the `user` feature.
#![no_std]
// The socket table's atomics on BPF (see socktable::atomic).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics), allow(internal_features))]

pub mod event;
pub mod offsets;
pub mod socktable;
pub mod stats;

pub use event::*;
pub use offsets::*;
pub use stats::*;

#[cfg(feature = "user")]
extern crate alloc;
#[cfg(feature = "user")]
pub mod user;
