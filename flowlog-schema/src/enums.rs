//! Every enum of the records, each declared once with its symbols in the
//! schema's order (the Avro index is the position). `tests/schemas.rs`
//! checks each list against the `.avsc` files. JSON (the sidecar's printing
//! mode) uses the variant names in snake_case.

use crate::avro::{DecodeError, Encoder, Reader, Writer};

macro_rules! avro_enum {
    (
        $(#[$doc:meta])*
        $name:ident in $avro:literal { $($(#[$vdoc:meta])* $variant:ident = $symbol:literal),+ $(,)? }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The symbols, in the schema's order.
            pub const SYMBOLS: &'static [&'static str] = &[$($symbol),+];
            /// Where the symbols are declared: an Avro enum's name, or the
            /// `record.field` whose doc lists them (a string in the schema).
            pub const DECLARED_IN: &'static str = $avro;
            const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn symbol(self) -> &'static str {
                Self::SYMBOLS[self as usize]
            }
            pub fn index(self) -> i32 {
                self as i32
            }
            pub fn from_index(i: i64) -> Result<Self, DecodeError> {
                usize::try_from(i).ok().and_then(|i| Self::ALL.get(i)).copied().ok_or(DecodeError::BadEnumIndex(i))
            }
            pub fn from_symbol(s: &str) -> Option<Self> {
                Self::SYMBOLS.iter().position(|x| *x == s).map(|i| Self::ALL[i])
            }
            #[inline]
            pub fn write(self, w: &mut Writer) {
                w.int(self.index())
            }
            #[inline]
            pub fn read(r: &mut Reader) -> Result<Self, DecodeError> {
                Self::from_index(r.enum_index()?)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.symbol())
            }
        }
    };
}

avro_enum! {
    /// A connection's last record (at close) or a snapshot of a live one.
    RecordType in "RecordType" { Final = "FINAL", Interim = "INTERIM" }
}

avro_enum! {
    Family in "Family" { Ipv4 = "IPV4", Ipv6 = "IPV6" }
}

avro_enum! {
    Direction in "Direction" { Unknown = "UNKNOWN", Client = "CLIENT", Server = "SERVER" }
}

avro_enum! {
    EndReason in "EndReason" {
        /// Still open (interim records).
        Open = "OPEN",
        /// FIN handshake (either side first).
        Normal = "NORMAL",
        /// connect() never reached ESTABLISHED (refused, timed out, unreachable, aborted).
        FailedConnect = "FAILED_CONNECT",
        /// The peer sent a reset.
        ResetReceived = "RESET_RECEIVED",
        /// This side aborted the connection (close with unread data, SO_LINGER 0,
        /// or a reset sent for another reason).
        ResetSent = "RESET_SENT",
        /// Retransmissions or keepalives gave up.
        Timeout = "TIMEOUT",
        /// Any other socket error (see `error`).
        Error = "ERROR",
    }
}

avro_enum! {
    /// Where pid/comm/cgroup came from.
    OwnerSource in "OwnerSource" {
        Unknown = "UNKNOWN",
        /// connect() or the listener's listen(), in process context.
        Open = "OPEN",
        /// The process that called close()/shutdown().
        Close = "CLOSE",
    }
}

avro_enum! {
    /// Why a sidecar sent an identity record.
    IdentityReason in "IdentityReason" { Start = "START", Heartbeat = "HEARTBEAT", IpChange = "IP_CHANGE", Stop = "STOP" }
}

avro_enum! {
    /// Which metadata source attributed a side of a flow.
    Source in "Attribution.source" { Sidecar = "SIDECAR", Ec2 = "EC2", Static = "STATIC", Kubernetes = "KUBERNETES", None = "NONE" }
}

avro_enum! {
    /// Why a side of a flow has no owner.
    Unattributed in "Attribution.reason" { UnknownIp = "UNKNOWN_IP", NoOwnerAtTime = "NO_OWNER_AT_TIME" }
}

avro_enum! {
    /// What kind of workload owned a connection (see `Workload`).
    WorkloadKind in "WorkloadKind" {
        /// The host itself, or a workload that could not be resolved.
        Host = "HOST",
        /// A Kubernetes pod's container.
        Pod = "POD",
        /// A container outside Kubernetes.
        Container = "CONTAINER",
        /// A systemd service.
        Service = "SERVICE",
        /// A Kubernetes Service's virtual IP (only in the enricher's
        /// `Attribution.held_by`).
        ClusterIp = "CLUSTER_IP",
    }
}

avro_enum! {
    /// Why a flow is attributed to the host although it may belong to a
    /// workload, or (`NoPodMetadata`, kind POD) why a pod's names are missing.
    WorkloadReason in "WorkloadReason" {
        /// A reason this version does not know (the schema's default; never written).
        Other = "OTHER",
        /// No owning process (cgroup id 0) and no known pod's network namespace.
        NoOwner = "NO_OWNER",
        /// No cgroup with this id in the cgroup v2 tree.
        CgroupNotFound = "CGROUP_NOT_FOUND",
        /// A pod's or container's cgroup path that does not parse.
        UnparsablePath = "UNPARSABLE_PATH",
        /// A container scope of a runtime this version does not know.
        UnknownRuntime = "UNKNOWN_RUNTIME",
        /// No cgroup v2 hierarchy mounted.
        NoCgroupV2 = "NO_CGROUP_V2",
        /// The cgroup tree could not be read in time.
        LookupFailed = "LOOKUP_FAILED",
        /// A pod known by its UID (kind stays POD) that the Kubernetes API has
        /// not named: API unreachable, slow or garbled, or no such pod listed.
        NoPodMetadata = "NO_POD_METADATA",
    }
}

impl Family {
    pub fn of(ip: &std::net::IpAddr) -> Family {
        if ip.is_ipv6() {
            Family::Ipv6
        } else {
            Family::Ipv4
        }
    }
}
