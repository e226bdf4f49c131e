//! The floor of the kernel-time benchmark: a program that does nothing, on
//! the same tracepoint the flow program uses. bench-capture attaches it under
//! the same load, so the flow program's kernel time per flow is reported
//! beside what attaching any program at all costs. Never loaded by the sidecar.
#![no_std]
#![no_main]

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn flowlog_floor(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
