//! Resolves the kernel layout facts the eBPF program needs ([`KernelOffsets`])
//! from the running kernel's BTF and from the classic tracepoint's format
//! file. Rust eBPF has no CO-RE relocations, so this is how one binary runs on
//! every kernel: nothing here is a per-kernel constant.

use std::path::Path;

use btf_rs::{Btf, Type};
use flowlog_common::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
pub const TRACEPOINT_FORMAT: &str = "/sys/kernel/tracing/events/sock/inet_sock_set_state/format";
const TRACEPOINT_FORMAT_DEBUGFS: &str =
    "/sys/kernel/debug/tracing/events/sock/inet_sock_set_state/format";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("kernel BTF not readable at {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")]
    NoBtf { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member} in this kernel's BTF")]
    NoMember { strukt: String, member: String },
    #[error("{0} is a bitfield; this kernel layout is not supported")]
    Bitfield(String),
    #[error("kernel BTF has no enumerator {0}")]
    NoEnum(String),
    #[error("BTF: {0}")]
    Btf(#[from] btf_rs::Error),
    #[error("tracepoint sock:inet_sock_set_state not readable ({path}): {source}; is tracefs mounted (and readable), and the kernel >= 4.16?")]
    NoTracepoint { path: String, source: std::io::Error },
    #[error("tracepoint format has no field {0}")]
    NoTpField(String),
}

/// A member found by [`Layout::member`]: byte offset from the outer struct
/// and the member's size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Struct layouts from one BTF blob.
pub struct Layout {
    btf: Btf,
}

impl Layout {
    pub fn from_file(path: &Path) -> Result<Layout, OffsetError> {
        let btf = Btf::from_file(path).map_err(|source| OffsetError::NoBtf {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Layout { btf })
    }

    fn strukt(&self, name: &str) -> Result<btf_rs::Struct, OffsetError> {
        for t in self.btf.resolve_types_by_name(name).unwrap_or_default() {
            if let Type::Struct(s) = t {
                if !s.members.is_empty() {
                    return Ok(s);
                }
            }
        }
        Err(OffsetError::NoStruct(name.to_string()))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut t: Type) -> Result<Type, OffsetError> {
        loop {
            t = match &t {
                Type::Typedef(x) => self.btf.resolve_chained_type(x)?,
                Type::Volatile(x) | Type::Const(x) | Type::Restrict(x) => {
                    self.btf.resolve_chained_type(x)?
                }
                Type::TypeTag(x) => self.btf.resolve_chained_type(x)?,
                _ => return Ok(t),
            };
        }
    }

    fn size_of(&self, t: &Type) -> Result<u32, OffsetError> {
        Ok(match self.resolve(t.clone())? {
            Type::Int(i) => i.size() as u32,
            Type::Ptr(_) => 8,
            Type::Struct(s) | Type::Union(s) => s.size() as u32,
            Type::Enum(e) => e.size() as u32,
            Type::Enum64(e) => e.size() as u32,
            Type::Array(a) => {
                let elem = self.btf.resolve_chained_type(&a)?;
                self.size_of(&elem)? * a.len() as u32
            }
            _ => 0,
        })
    }

    /// Finds `member` (one name) in `s`, looking through anonymous struct and
    /// union members the way C does. Returns its bit offset and type.
    /// The last item is the bitfield's width in bits (0: not a bitfield,
    /// including a whole member of a struct that has bitfields).
    fn find(&self, s: &btf_rs::Struct, member: &str) -> Result<Option<(u32, Type, u32)>, OffsetError> {
        for m in &s.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            let ty = self.btf.resolve_chained_type(m)?;
            if name == member {
                return Ok(Some((m.bit_offset(), ty, m.bitfield_size().unwrap_or(0))));
            }
            if name.is_empty() {
                if let Type::Struct(inner) | Type::Union(inner) = self.resolve(ty)? {
                    if let Some((off, t, bf)) = self.find(&inner, member)? {
                        return Ok(Some((m.bit_offset() + off, t, bf)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Byte offset and size of a dotted member path, e.g. `member("net", "ns.inum")`.
    /// Array elements are written `s[0]`.
    pub fn member(&self, strukt: &str, path: &str) -> Result<Field, OffsetError> {
        let missing = || OffsetError::NoMember { strukt: strukt.into(), member: path.into() };
        let mut current = Type::Struct(self.strukt(strukt)?);
        let mut bits = 0u32;
        for part in path.split('.') {
            let (name, index) = match part.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<u32>().ok()),
                None => (part, None),
            };
            let s = match self.resolve(current)? {
                Type::Struct(s) | Type::Union(s) => s,
                _ => return Err(missing()),
            };
            let (off, mut ty, bitfield) = self.find(&s, name)?.ok_or_else(missing)?;
            if bitfield != 0 {
                return Err(OffsetError::Bitfield(format!("{strukt}.{path}")));
            }
            bits += off;
            if let Some(i) = index {
                let Type::Array(a) = self.resolve(ty)? else { return Err(missing()) };
                let elem = self.btf.resolve_chained_type(&a)?;
                bits += self.size_of(&elem)? * 8 * i;
                ty = elem;
            }
            current = ty;
        }
        Ok(Field { offset: bits / 8, size: self.size_of(&current)? })
    }

    /// Bit offset and width in bits of a member of `strukt`, a bitfield or
    /// not (found through anonymous members, as [`Layout::member`] does).
    pub fn bits(&self, strukt: &str, name: &str) -> Result<(u32, u32), OffsetError> {
        let missing = || OffsetError::NoMember { strukt: strukt.into(), member: name.into() };
        let (bit, ty, width) = self.find(&self.strukt(strukt)?, name)?.ok_or_else(missing)?;
        Ok((bit, if width > 0 { width } else { self.size_of(&ty)? * 8 }))
    }

    /// Value of a C enumerator of a named enum, e.g. `("sock_flags", "SOCK_DONE")`.
    pub fn enumerator(&self, enum_name: &str, name: &str) -> Result<u32, OffsetError> {
        for t in self.btf.resolve_types_by_name(enum_name).unwrap_or_default() {
            if let Type::Enum(e) = t {
                for m in &e.members {
                    if self.btf.resolve_name(m).ok().as_deref() == Some(name) {
                        return Ok(m.val());
                    }
                }
            }
        }
        Err(OffsetError::NoEnum(name.to_string()))
    }
}

/// Offsets of the classic tracepoint's fields, from its format file.
fn tracepoint_fields(format: &str) -> Result<[(String, u32); 4], OffsetError> {
    let find = |field: &str| -> Result<(String, u32), OffsetError> {
        for line in format.lines() {
            let line = line.trim();
            let Some(decl) = line.strip_prefix("field:") else { continue };
            let decl = decl.split(';').next().unwrap_or("");
            let name = decl.split_whitespace().last().unwrap_or("");
            if name != field {
                continue;
            }
            let offset = line
                .split(';')
                .find_map(|p| p.trim().strip_prefix("offset:"))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| OffsetError::NoTpField(field.into()))?;
            return Ok((field.to_string(), offset));
        }
        Err(OffsetError::NoTpField(field.into()))
    };
    Ok([find("skaddr")?, find("oldstate")?, find("newstate")?, find("protocol")?])
}

/// Reads the tracepoint format file from tracefs (or the debugfs mirror),
/// mounting tracefs first if it is not mounted (needs CAP_SYS_ADMIN; without
/// it the BTF tracepoint still works).
pub fn read_tracepoint_format() -> Result<String, OffsetError> {
    if !Path::new(TRACEPOINT_FORMAT).exists() && Path::new("/sys/kernel/tracing").is_dir() {
        let mounted = nix::mount::mount(
            Some("nodev"),
            "/sys/kernel/tracing",
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        if mounted.is_ok() {
            tracing::info!("mounted tracefs at /sys/kernel/tracing");
        }
    }
    match std::fs::read_to_string(TRACEPOINT_FORMAT) {
        Ok(s) => Ok(s),
        Err(first) => std::fs::read_to_string(TRACEPOINT_FORMAT_DEBUGFS)
            .map_err(|_| OffsetError::NoTracepoint { path: TRACEPOINT_FORMAT.into(), source: first }),
    }
}

/// Everything the program needs. `tp_format` is the classic tracepoint's
/// format file, or None when only the BTF tracepoint will be used.
pub fn resolve(layout: &Layout, tp_format: Option<&str>) -> Result<KernelOffsets, OffsetError> {
    let sock = |p: &str| layout.member("sock", p).map(|f| f.offset);
    let tcp = |p: &str| layout.member("tcp_sock", p).map(|f| f.offset);
    // A field the program reads with a fixed width: any other width is refused.
    let tcp_sized = |p: &str, size: u32| match layout.member("tcp_sock", p)? {
        f if f.size == size => Ok(f.offset),
        f => Err(OffsetError::NoMember { strukt: "tcp_sock".into(), member: format!("{p} of {size} bytes (found {})", f.size) }),
    };
    let protocol = layout.member("sock", "sk_protocol")?;
    // enum tcp_chrono (0-3): a 2-bit field in older kernels, a byte in newer
    // ones. The program reads the byte and masks 2 bits from the shift.
    let chrono_type = layout.bits("tcp_sock", "chrono_type")?;
    if !(chrono_type.1 == 2 && chrono_type.0 % 8 <= 6 || chrono_type.1 == 8 && chrono_type.0 % 8 == 0) {
        return Err(OffsetError::Bitfield(format!("tcp_sock.chrono_type ({} bits at bit {})", chrono_type.1, chrono_type.0)));
    }
    let mut o = KernelOffsets {
        skc_family: sock("__sk_common.skc_family")?,
        skc_daddr: sock("__sk_common.skc_daddr")?,
        skc_rcv_saddr: sock("__sk_common.skc_rcv_saddr")?,
        skc_dport: sock("__sk_common.skc_dport")?,
        skc_num: sock("__sk_common.skc_num")?,
        skc_v6_daddr: sock("__sk_common.skc_v6_daddr")?,
        skc_v6_rcv_saddr: sock("__sk_common.skc_v6_rcv_saddr")?,
        skc_net: sock("__sk_common.skc_net")?,
        skc_state: sock("__sk_common.skc_state")?,
        sk_protocol: protocol.offset,
        sk_protocol_u16: u32::from(protocol.size == 2),
        sk_err: sock("sk_err")?,
        // Newer kernels keep the flags in sock_common (skc_flags).
        sk_flags: sock("sk_flags").or_else(|_| sock("__sk_common.skc_flags"))?,
        inet_sport: layout.member("inet_sock", "inet_sport")?.offset,
        bytes_acked: tcp("bytes_acked")?,
        bytes_received: tcp("bytes_received")?,
        segs_in: tcp("segs_in")?,
        segs_out: tcp("segs_out")?,
        total_retrans: tcp("total_retrans")?,
        srtt_us: tcp("srtt_us")?,
        rtt_min: tcp("rtt_min.s[0].v")?,
        snd_una: tcp("snd_una")?,
        write_seq: tcp("write_seq")?,
        chrono_start: tcp_sized("chrono_start", 4)?,
        chrono_stat: tcp_sized("chrono_stat", 12)?,
        chrono_type_byte: chrono_type.0 / 8,
        chrono_type_shift: chrono_type.0 % 8,
        rate_delivered: tcp_sized("rate_delivered", 4)?,
        rate_interval_us: tcp_sized("rate_interval_us", 4)?,
        mss_cache: tcp_sized("mss_cache", 4)?,
        bytes_retrans: tcp_sized("bytes_retrans", 8)?,
        reordering: tcp_sized("reordering", 4)?,
        reord_seen: tcp_sized("reord_seen", 4)?,
        net_ns_inum: layout.member("net", "ns.inum")?.offset,
        task_comm: match layout.member("task_struct", "comm")? {
            f if f.size == flowlog_common::COMM_LEN as u32 => f.offset,
            f => return Err(OffsetError::NoMember { strukt: "task_struct".into(), member: format!("comm of 16 bytes (found {})", f.size) }),
        },
        sock_done_bit: layout.enumerator("sock_flags", "SOCK_DONE")?,
        ..Default::default()
    };
    // Linux 6.7+; all three or none (0: the program leaves them out).
    if let (Ok(n), Ok(r), Ok(t)) =
        (tcp_sized("total_rto", 2), tcp_sized("total_rto_recoveries", 2), tcp_sized("total_rto_time", 4))
    {
        (o.total_rto, o.total_rto_recoveries, o.total_rto_time) = (n, r, t);
    }
    let socket_fields = [
        o.skc_family + 2, o.skc_daddr + 4, o.skc_rcv_saddr + 4, o.skc_dport + 2, o.skc_num + 2, o.skc_v6_daddr + 16,
        o.skc_v6_rcv_saddr + 16, o.skc_net + 8, o.skc_state + 1, o.sk_protocol + 2, o.sk_err + 4, o.sk_flags + 8,
        o.inet_sport + 2, o.bytes_acked + 8, o.bytes_received + 8, o.segs_in + 4, o.segs_out + 4,
        o.total_retrans + 4, o.srtt_us + 4, o.rtt_min + 4, o.snd_una + 4, o.write_seq + 4,
        o.chrono_start + 4, o.chrono_stat + 12, o.chrono_type_byte + 1, o.rate_delivered + 4,
        o.rate_interval_us + 4, o.mss_cache + 4, o.bytes_retrans + 8, o.reordering + 4, o.reord_seen + 4,
        o.total_rto + 2, o.total_rto_recoveries + 2, o.total_rto_time + 4,
    ];
    let end = socket_fields.into_iter().max().unwrap_or(0).next_multiple_of(8);
    if end as usize > flowlog_common::SCRATCH_BYTES {
        return Err(OffsetError::NoMember {
            strukt: "tcp_sock".into(),
            member: format!("fields within the first {} bytes (need {end})", flowlog_common::SCRATCH_BYTES),
        });
    }
    o.sock_read_len = end;
    if let Some(format) = tp_format {
        let [skaddr, old, new, proto] = tracepoint_fields(format)?;
        o.tp_skaddr = skaddr.1;
        o.tp_oldstate = old.1;
        o.tp_newstate = new.1;
        o.tp_protocol = proto.1;
    }
    Ok(o)
}

/// The kernel's tick rate (CONFIG_HZ), the unit of TCP's chronographs
/// ([`flowlog_common::Limits`]). From the installed kernel config when there
/// is one, else measured: jiffies against CLOCK_MONOTONIC over 100 ms, both
/// read from /proc/timer_list, snapped to the rates x86 and arm64 kernels
/// are built with. None when neither works.
pub fn kernel_hz() -> Option<u32> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if let Ok(config) = std::fs::read_to_string(format!("/boot/config-{}", release.trim())) {
        if let Some(hz) = config.lines().find_map(|l| l.strip_prefix("CONFIG_HZ=")?.trim().parse().ok()) {
            return Some(hz);
        }
    }
    let (ns0, j0) = timer_list_sample()?;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (ns1, j1) = timer_list_sample()?;
    let measured = j1.checked_sub(j0)? as f64 * 1e9 / ns1.checked_sub(ns0)?.max(1) as f64;
    let nearest = [100u32, 250, 300, 1000]
        .into_iter()
        .min_by(|a, b| (*a as f64 - measured).abs().total_cmp(&(*b as f64 - measured).abs()))?;
    // One jiffy of error over 100 ms is 10 % at HZ=100.
    ((nearest as f64 - measured).abs() <= nearest as f64 * 0.15).then_some(nearest)
}

/// "now at N nsecs" (CLOCK_MONOTONIC) and the first "jiffies: J" of
/// /proc/timer_list, read only as far as both.
fn timer_list_sample() -> Option<(u64, u64)> {
    use std::io::BufRead;
    let file = std::io::BufReader::new(std::fs::File::open("/proc/timer_list").ok()?);
    let mut now = None;
    for line in file.lines().take(10_000) {
        let line = line.ok()?;
        if let Some(rest) = line.strip_prefix("now at ") {
            now = rest.split_whitespace().next()?.parse().ok();
        } else if let Some(j) = line.trim().strip_prefix("jiffies: ") {
            return Some((now?, j.trim().parse().ok()?));
        }
    }
    None
}

/// What the loader needs from BTF and tracefs.
#[derive(Debug, Clone, Copy)]
pub struct Resolved {
    pub offsets: KernelOffsets,
    /// The classic tracepoint's format was readable (its fields are filled in).
    pub have_tracepoint: bool,
    /// The kernel's tick rate ([`kernel_hz`]); None: unknown, and records
    /// carry no limits.
    pub hz: Option<u32>,
}

/// Resolves everything from the running kernel (and its tick rate, which
/// needs no BTF, in this process). Parsing vmlinux BTF takes
/// ~30 MB for a moment, so it runs in a forked child: the sidecar's own peak
/// memory never includes it.
pub fn resolve_running_kernel(require_tracepoint: bool) -> Result<Resolved, String> {
    let work = || -> Result<Resolved, String> {
        let layout = Layout::from_file(Path::new(VMLINUX_BTF)).map_err(|e| e.to_string())?;
        let format = match read_tracepoint_format() {
            Ok(f) => Some(f),
            Err(e) if require_tracepoint => return Err(e.to_string()),
            Err(e) => {
                tracing::warn!("{e}; only the BTF tracepoint can be used");
                None
            }
        };
        let offsets = resolve(&layout, format.as_deref()).map_err(|e| e.to_string())?;
        Ok(Resolved { offsets, have_tracepoint: format.is_some(), hz: None })
    };
    // The tick rate here too: measuring it may take 100 ms, which is better
    // spent before the program is attached than while events wait.
    in_child(work).map(|r| Resolved { hz: kernel_hz(), ..r })
}

/// Runs `f` in a forked child and returns its result through a pipe. Must be
/// called while the process is single-threaded (before the runtime starts).
fn in_child(f: impl FnOnce() -> Result<Resolved, String>) -> Result<Resolved, String> {
    use std::io::{Read, Write};

    use nix::{
        fcntl::OFlag,
        sys::wait::waitpid,
        unistd::{fork, pipe2, ForkResult},
    };
    let Ok((read_end, write_end)) = pipe2(OFlag::O_CLOEXEC) else {
        return f();
    };
    // SAFETY: the caller guarantees a single-threaded process.
    let child = match unsafe { fork() } {
        Err(_) => return f(),
        Ok(ForkResult::Parent { child }) => child,
        Ok(ForkResult::Child) => {
            drop(read_end);
            let msg = match f() {
                Ok(r) => {
                    let mut out = vec![0u8, r.have_tracepoint as u8];
                    // SAFETY: KernelOffsets is Pod.
                    out.extend_from_slice(unsafe {
                        std::slice::from_raw_parts((&r.offsets as *const KernelOffsets).cast::<u8>(), std::mem::size_of::<KernelOffsets>())
                    });
                    out
                }
                Err(e) => {
                    let mut out = vec![1u8];
                    out.extend_from_slice(e.as_bytes());
                    out
                }
            };
            let _ = std::fs::File::from(write_end).write_all(&msg);
            // SAFETY: leave the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
    };
    // The child holds the write end now: read until it closes it.
    drop(write_end);
    let mut buf = Vec::new();
    let _ = std::fs::File::from(read_end).read_to_end(&mut buf);
    let status = waitpid(child, None);
    match buf.split_first() {
        Some((0, rest)) if rest.len() == 1 + std::mem::size_of::<KernelOffsets>() => {
            // SAFETY: length checked, Pod.
            let offsets: KernelOffsets = unsafe { std::ptr::read_unaligned(rest[1..].as_ptr().cast()) };
            Ok(Resolved { offsets, have_tracepoint: rest[0] == 1, hz: None })
        }
        Some((1, msg)) => Err(String::from_utf8_lossy(msg).into_owned()),
        _ => Err(format!("resolving kernel offsets failed (child: {status:?})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The measured rate is the configured one (this kernel's config, when
    /// it ships one in /proc/config.gz).
    #[test]
    fn kernel_hz_is_the_configured_rate() {
        let Some(hz) = kernel_hz() else {
            eprintln!("skipping: no kernel config and no readable /proc/timer_list");
            return;
        };
        assert!([100, 250, 300, 1000].contains(&hz), "{hz}");
        let configured = std::process::Command::new("zcat").arg("/proc/config.gz").output().ok().and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| l.strip_prefix("CONFIG_HZ=")?.parse::<u32>().ok())
        });
        if let Some(c) = configured {
            assert_eq!(hz, c);
        }
    }

    const FORMAT: &str = "name: inet_sock_set_state
ID: 1400
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
";

    #[test]
    fn parses_tracepoint_format() {
        let f = tracepoint_fields(FORMAT).unwrap();
        let offs: Vec<u32> = f.iter().map(|(_, o)| *o).collect();
        assert_eq!(offs, vec![8, 16, 20, 30]);
        assert!(matches!(
            tracepoint_fields("field:int x;\toffset:1;"),
            Err(OffsetError::NoTpField(f)) if f == "skaddr"
        ));
    }

    /// Reads the running kernel's BTF when there is one (no privileges needed).
    #[test]
    fn resolves_running_kernel() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipping: no {VMLINUX_BTF}");
            return;
        }
        let layout = Layout::from_file(path).unwrap();
        let o = resolve(&layout, None).unwrap();
        // struct sock starts with struct sock_common; skc_daddr is its first word.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert!(o.bytes_acked > o.inet_sport && o.bytes_received > o.inet_sport);
        assert_eq!(layout.member("sock", "__sk_common.skc_dport").unwrap().size, 2);
        assert_eq!(layout.member("tcp_sock", "bytes_acked").unwrap().size, 8);
        assert_eq!(o.sock_done_bit, 1);
        // The current task's name: task_struct.comm, 16 bytes.
        assert!(o.task_comm > 0);
        assert_eq!(layout.member("task_struct", "comm").unwrap().size, 16);
        // The limits: chrono_stat follows chrono_start; chrono_type is 2 bits.
        assert_eq!(o.chrono_stat, o.chrono_start + 4);
        assert!(matches!(layout.bits("tcp_sock", "chrono_type").unwrap().1, 2 | 8));
        assert_eq!(layout.bits("tcp_sock", "chrono_start").unwrap(), (o.chrono_start * 8, 32));
        assert!(o.rate_delivered > 0 && o.bytes_retrans > 0 && o.reord_seen > 0);
        assert!(matches!(layout.bits("tcp_sock", "no_such_member"), Err(OffsetError::NoMember { .. })));
        assert!(matches!(
            layout.member("tcp_sock", "no_such_member"),
            Err(OffsetError::NoMember { .. })
        ));
    }
}
