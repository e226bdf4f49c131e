//! Counters the eBPF program keeps in a per-CPU array (index = counter).

pub mod stat {
    /// Flow events submitted to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Final flow events lost because the ring buffer had no room and the
    /// parking queue was full too.
    pub const RINGBUF_FULL: u32 = 1;
    /// Opens not tracked because the per-socket map was full (the flow is
    /// still reported at close, without start time and owner).
    pub const SOCK_MAP_FULL: u32 = 2;
    /// listen() calls not recorded because the listener map was full.
    pub const LISTEN_MAP_FULL: u32 = 3;
    /// Kernel memory reads that failed (the event is still sent with zeros).
    pub const READ_ERRORS: u32 = 4;
    /// Final flow events that found the ring buffer full and waited in the
    /// parking queue for user space instead (not lost).
    pub const PARKED: u32 = 5;
    /// Closes the state-change program missed (it was running on that CPU
    /// when a softirq closed the socket), reported as the socket was
    /// destroyed instead (not lost; the state path ends at the last state
    /// recorded).
    pub const CLOSED_AT_DESTROY: u32 = 6;
    /// Socket-table entries a new socket at the same address found left
    /// behind: an earlier socket whose close and destroy the kernel ran
    /// neither program for (a flow lost unseen, see README "Known
    /// limitations"), or, rarely, a socket that lost a state change of its
    /// own. Replaced, so the new socket does not inherit them.
    pub const STALE_SOCKETS: u32 = 7;
    pub const COUNT: u32 = 8;

    /// Names for user space, index = counter.
    pub const NAMES: [&str; 8] = [
        "events",
        "ringbuf_full",
        "sock_map_full",
        "listen_map_full",
        "read_errors",
        "parked",
        "closed_at_destroy",
        "stale_sockets",
    ];
}
