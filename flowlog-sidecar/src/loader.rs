//! Loads the embedded eBPF object with this kernel's offsets and attaches it
//! to sock:inet_sock_set_state: BTF tracepoint first, classic tracepoint as a
//! fallback. Errors name the missing privilege or kernel feature.

use aya::{
    programs::{BtfTracePoint, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use flowlog_common::{
    socktable, KernelSettings, DESTROY_TRACEPOINT, EVENTS_MAP, LISTENERS_MAP, OFFSETS_GLOBAL, PARKED_MAP, PROG_DESTROY, PROG_TP_BTF,
    PROG_TRACEPOINT, SETTINGS_GLOBAL, SOCK_BUCKETS_MAP, SOCK_SLOTS_MAP, STATE_TRACEPOINT,
};
use tracing::{info, warn};


use crate::{
    config::{Attach, Config},
    offsets::Resolved,
};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowlog"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "not permitted to load eBPF programs: run as root or grant CAP_BPF, CAP_PERFMON and \
         CAP_SYS_RESOURCE (kernel.unprivileged_bpf_disabled does not matter with these) [{0}]"
    )]
    Privileges(String),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("attaching to sock:inet_sock_set_state failed: {0}")]
    Attach(String),
}

/// Which program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    TpBtf,
    Tracepoint,
}

impl Attached {
    pub fn program_name(self) -> &'static str {
        match self {
            Attached::TpBtf => PROG_TP_BTF,
            Attached::Tracepoint => PROG_TRACEPOINT,
        }
    }
}

fn is_permission(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("Operation not permitted") || text.contains("EPERM") || text.contains("Permission denied") {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

pub fn load(config: &Config, resolved: Resolved) -> Result<(Ebpf, Attached), LoadError> {
    let kernel_offsets = resolved.offsets;
    tracing::debug!(?kernel_offsets, "resolved from BTF");
    let buckets = socktable::buckets_for(config.max_sockets);
    let settings = KernelSettings { wakeup_bytes: config.wakeup_bytes(), sock_bucket_mask: buckets as u64 - 1 };
    // No CO-RE relocations to apply, so the loader needs no kernel BTF (which
    // would cost ~20 MB of peak memory); only the tp_btf attach needs it.
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        .override_global(OFFSETS_GLOBAL, &kernel_offsets, true)
        .override_global(SETTINGS_GLOBAL, &settings, true)
        .map_max_entries(EVENTS_MAP, config.ring_buffer_bytes)
        .map_max_entries(SOCK_BUCKETS_MAP, buckets)
        .map_max_entries(SOCK_SLOTS_MAP, buckets * socktable::BUCKET_SLOTS as u32)
        .map_max_entries(PARKED_MAP, config.max_parked)
        .map_max_entries(LISTENERS_MAP, config.max_listeners)
        .load(EBPF_OBJECT)
        .map_err(|e| if is_permission(&e) { LoadError::Privileges(chain(&e)) } else { LoadError::Load(e) })?;

    let mut tp_btf_error = None;
    if config.attach != Attach::Tracepoint {
        match attach_tp_btf(&mut ebpf) {
            Ok(()) => {
                info!("attached {PROG_TP_BTF} (tp_btf/inet_sock_set_state)");
                return Ok((ebpf, Attached::TpBtf));
            }
            Err(e) if config.attach == Attach::TpBtf => return Err(e),
            Err(e) => {
                warn!("BTF tracepoint unavailable, falling back to the classic tracepoint: {e}");
                tp_btf_error = Some(e);
            }
        }
    }
    if !resolved.have_tracepoint {
        return Err(tp_btf_error.unwrap_or_else(|| LoadError::Attach("tracepoint format missing".into())));
    }
    let prog: &mut TracePoint = program(&mut ebpf, PROG_TRACEPOINT)?;
    prog.load().map_err(fail)?;
    prog.attach("sock", STATE_TRACEPOINT).map_err(fail)?;
    info!("attached {PROG_TRACEPOINT} (tracepoint/sock/{STATE_TRACEPOINT})");
    Ok((ebpf, Attached::Tracepoint))
}

fn attach_tp_btf(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let btf = Btf::from_sys_fs().map_err(|e| LoadError::Attach(format!("kernel BTF: {e}")))?;
    let prog: &mut BtfTracePoint = program(ebpf, PROG_TP_BTF)?;
    prog.load(STATE_TRACEPOINT, &btf).map_err(fail)?;
    prog.attach().map_err(fail)?;
    // Without it a close that interrupted a run is lost (and counted).
    match attach_destroy(ebpf, &btf) {
        Ok(()) => info!("attached {PROG_DESTROY} (tp_btf/{DESTROY_TRACEPOINT})"),
        Err(e) => warn!("closes missed while the program runs will be lost (counted): {PROG_DESTROY}: {e}"),
    }
    Ok(())
}

fn attach_destroy(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), LoadError> {
    let prog: &mut BtfTracePoint = program(ebpf, PROG_DESTROY)?;
    prog.load(DESTROY_TRACEPOINT, btf).map_err(fail)?;
    prog.attach().map(drop).map_err(fail)
}

/// A program of the object as its concrete type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| LoadError::Attach(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| LoadError::Attach(chain(&e)))
}

/// Load/attach errors: missing privileges get their own message.
fn fail(e: aya::programs::ProgramError) -> LoadError {
    if is_permission(&e) { LoadError::Privileges(chain(&e)) } else { LoadError::Attach(chain(&e)) }
}
