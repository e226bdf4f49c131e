//! Kernel layout facts the eBPF program needs, resolved by the sidecar from
//! the running kernel's BTF and the tracepoint's format file at load time
//! (there are no per-kernel constants in the program).

/// Byte offsets into kernel structures and the classic tracepoint record.
/// Written into the program's `FLOWLOG_OFFSETS` global before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sock (struct sock_common is its first member)
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    /// sock_common.skc_num: the local port, host order, read where only a
    /// `struct sock` is at hand (a passive open's listener lookup). 0 once
    /// the port is released (at CLOSE).
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    /// sock_common.skc_state (a byte): the state snapshots read.
    pub skc_state: u32,
    pub sk_protocol: u32,
    pub sk_err: u32,
    pub sk_flags: u32,
    // struct inet_sock
    pub inet_sport: u32,
    // struct tcp_sock
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    pub total_retrans: u32,
    pub srtt_us: u32,
    /// tcp_sock.rtt_min.s[0].v
    pub rtt_min: u32,
    pub snd_una: u32,
    pub write_seq: u32,
    /// Limits: tcp_sock.chrono_start, chrono_stat[0] (3 u32), and the byte
    /// and shift of chrono_type (a 2-bit bitfield in older kernels, a byte in
    /// newer ones; the program masks 2 bits either way).
    pub chrono_start: u32,
    pub chrono_stat: u32,
    pub chrono_type_byte: u32,
    pub chrono_type_shift: u32,
    pub rate_delivered: u32,
    pub rate_interval_us: u32,
    pub mss_cache: u32,
    pub bytes_retrans: u32,
    pub reordering: u32,
    pub reord_seen: u32,
    /// tcp_sock.total_rto, total_rto_recoveries, total_rto_time; 0 when the
    /// kernel has none (before 6.7).
    pub total_rto: u32,
    pub total_rto_recoveries: u32,
    pub total_rto_time: u32,
    // struct net
    /// net.ns.inum
    pub net_ns_inum: u32,
    /// task_struct.comm (16 bytes): under tp_btf the current task's name is
    /// two loads from it; the helper's string copy cost about 120 ns.
    pub task_comm: u32,
    /// Bit number of SOCK_DONE in sk_flags (enum sock_flags).
    pub sock_done_bit: u32,
    /// 1 when sk_protocol is 16 bits wide, 0 when 8 bits.
    pub sk_protocol_u16: u32,
    // Classic tracepoint record (events/sock/inet_sock_set_state/format)
    pub tp_skaddr: u32,
    pub tp_oldstate: u32,
    pub tp_newstate: u32,
    pub tp_protocol: u32,
    /// Bytes of the socket the close path copies at once: covers every
    /// socket field above, at most SCRATCH_BYTES.
    pub sock_read_len: u32,
}

/// Settings the program reads, written into `FLOWLOG_SETTINGS` before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSettings {
    /// Wake user space only when this many bytes are waiting in the ring
    /// buffer; below it user space drains on its own timer. Batching the
    /// wake-ups is most of the per-event cost saved in the kernel.
    pub wakeup_bytes: u64,
    /// The socket table's buckets - 1 ([`crate::socktable::buckets_for`]).
    pub sock_bucket_mask: u64,
}

pub const OFFSETS_GLOBAL: &str = "FLOWLOG_OFFSETS";
pub const SETTINGS_GLOBAL: &str = "FLOWLOG_SETTINGS";
pub const EVENTS_MAP: &str = "FLOWLOG_EVENTS";
pub const SOCK_BUCKETS_MAP: &str = "FLOWLOG_SOCK_BUCKETS";
pub const SOCK_SLOTS_MAP: &str = "FLOWLOG_SOCK_SLOTS";
pub const LISTENERS_MAP: &str = "FLOWLOG_LISTENERS";
pub const STATS_MAP: &str = "FLOWLOG_STATS";
pub const PARKED_MAP: &str = "FLOWLOG_PARKED";
pub const STAGE_HEAD_MAP: &str = "FLOWLOG_STAGE_HEAD";
/// The tracepoint of [`PROG_TP_BTF`] and [`PROG_TRACEPOINT`] (category
/// `sock`), and that of [`PROG_DESTROY`]. The eBPF crate's attribute macros
/// name them again: they take only literals.
pub const STATE_TRACEPOINT: &str = "inet_sock_set_state";
pub const DESTROY_TRACEPOINT: &str = "tcp_destroy_sock";
pub const PROG_TP_BTF: &str = "flowlog_tp_btf";
pub const PROG_TRACEPOINT: &str = "flowlog_tracepoint";
/// Reports the closes [`PROG_TP_BTF`] missed, at `tcp:tcp_destroy_sock`.
pub const PROG_DESTROY: &str = "flowlog_destroy";
pub const PROG_SNAPSHOT: &str = "flowlog_snapshot";
