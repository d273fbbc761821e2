//! Every aya call in one place: load the eBPF object with this kernel's tracepoint layouts and the
//! filters, attach the programs, hand back the maps userspace reads.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramFd, TracePoint},
};
use aya_obj::generated::bpf_prog_info;
use tcptrace_common::{
    CONFIG_GLOBAL, COUNTER_RINGBUF_FULL, COUNTER_SOCKETS_ADDED, COUNTER_SOCKETS_REMOVED,
    COUNTERS_MAP, Config, EVENTS_MAP, PID_FILTER_MAP, PORT_FILTER_MAP, RETRANSMIT_LAYOUT_GLOBAL,
    RetransmitLayout, SOCKETS_MAP, STATE_LAYOUT_GLOBAL, SYNACK_LAYOUT_GLOBAL, TRACE_RETRANSMITS,
};

use crate::{filter::Filters, tracefs};

/// The compiled eBPF object, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// What the rest of tcptrace needs from the loaded program.
pub struct Loaded {
    pub events: RingBuf<MapData>,
    pub attached: Attached,
}

/// The loaded programs, attached while this lives, and their counters.
pub struct Attached {
    /// Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    /// The attached programs, for the kernel's count of the runs it skipped.
    programs: Vec<ProgramFd>,
    max_sockets: u32,
}

/// The kernel side's counters, summed over CPUs, since load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events lost: dropped because the ring buffer was full, or never seen because the kernel
    /// skipped the program (a tracepoint hit while a BPF program already ran on that CPU, as in a
    /// softirq interrupting one: the kernel counts these as the program's recursion misses).
    pub lost: u64,
    /// Sockets in the per-socket map: added minus removed at CLOSE, at most its capacity (sockets
    /// forgotten by LRU eviction leave a full map behind).
    pub sockets_tracked: u64,
}

impl Attached {
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let slot = |index: u32| -> anyhow::Result<u64> {
            let per_cpu = self
                .counters
                .get(&index, 0)
                .context("failed to read the kernel side's counters")?;
            Ok(per_cpu.iter().sum())
        };
        let added = slot(COUNTER_SOCKETS_ADDED)?;
        let removed = slot(COUNTER_SOCKETS_REMOVED)?;
        let mut skipped = 0;
        for program in &self.programs {
            skipped += recursion_misses(program.as_fd())
                .context("failed to read a program's statistics")?;
        }
        Ok(Counters {
            lost: slot(COUNTER_RINGBUF_FULL)? + skipped,
            sockets_tracked: added.saturating_sub(removed).min(self.max_sockets.into()),
        })
    }
}

/// Load-time settings.
pub struct Settings<'a> {
    pub tracefs: &'a Path,
    pub filters: &'a Filters,
    pub ring_buffer_bytes: u32,
    pub max_sockets: u32,
}

pub fn load(settings: &Settings<'_>) -> anyhow::Result<Loaded> {
    let Settings {
        tracefs,
        filters,
        ring_buffer_bytes,
        max_sockets,
    } = *settings;
    let retransmits = filters.bits & TRACE_RETRANSMITS != 0;

    let config = Config {
        filters: filters.bits,
        // Wake the reader only once a quarter of the buffer waits; it drains on a timer otherwise.
        wakeup_bytes: ring_buffer_bytes / 4,
    };
    // Always needed: the state program keeps the socket owners that retransmit lines carry.
    let state_layout = layout(
        tracefs,
        "sock",
        "inet_sock_set_state",
        tracefs::Format::state_layout,
    )?;
    let mut retransmit_layout = RetransmitLayout::default();
    let mut synack_layout = RetransmitLayout::default();
    let mut synack_present = false;
    if retransmits {
        retransmit_layout = layout(
            tracefs,
            "tcp",
            "tcp_retransmit_skb",
            tracefs::Format::retransmit_layout,
        )?;
        match layout(
            tracefs,
            "tcp",
            "tcp_retransmit_synack",
            tracefs::Format::retransmit_layout,
        ) {
            Ok(synack) => {
                synack_layout = synack;
                synack_present = true;
            }
            Err(e) => eprintln!("tcptrace: warning: SYN-ACK retransmits not traced: {e:#}"),
        }
    }

    raise_memlock_limit();
    let mut ebpf = EbpfLoader::new()
        .override_global(CONFIG_GLOBAL, &config, true)
        .override_global(STATE_LAYOUT_GLOBAL, &state_layout, true)
        .override_global(RETRANSMIT_LAYOUT_GLOBAL, &retransmit_layout, true)
        .override_global(SYNACK_LAYOUT_GLOBAL, &synack_layout, true)
        .map_max_entries(EVENTS_MAP, ring_buffer_bytes)
        .map_max_entries(SOCKETS_MAP, max_sockets)
        .load(EBPF_OBJECT)
        .context("failed to load the eBPF program")?;

    let mut pid_filter: HashMap<_, u32, u8> =
        HashMap::try_from(map_mut(&mut ebpf, PID_FILTER_MAP)?)?;
    for &pid in &filters.pids {
        pid_filter
            .insert(pid, 1, 0)
            .with_context(|| format!("failed to add pid {pid} to the filter"))?;
    }
    let mut port_filter: HashMap<_, u16, u8> =
        HashMap::try_from(map_mut(&mut ebpf, PORT_FILTER_MAP)?)?;
    for (&port, &sides) in &filters.ports {
        port_filter
            .insert(port, sides, 0)
            .with_context(|| format!("failed to add port {port} to the filter"))?;
    }

    let mut programs = Vec::new();
    let mut attach = |program: &str, category: &str| -> anyhow::Result<()> {
        let tracepoint: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
            .try_into()?;
        tracepoint
            .load()
            .with_context(|| format!("the kernel refused the program for {category}:{program}"))?;
        tracepoint
            .attach(category, program)
            .with_context(|| format!("failed to attach {category}:{program}"))?;
        programs.push(tracepoint.fd()?.try_clone()?);
        Ok(())
    };
    attach("inet_sock_set_state", "sock")?;
    if retransmits {
        attach("tcp_retransmit_skb", "tcp")?;
        if synack_present {
            attach("tcp_retransmit_synack", "tcp")?;
        }
    }

    let events = RingBuf::try_from(take_map(&mut ebpf, EVENTS_MAP)?)?;
    let counters = PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS_MAP)?)?;
    Ok(Loaded {
        events,
        attached: Attached {
            _ebpf: ebpf,
            counters,
            programs,
            max_sockets,
        },
    })
}

/// How many times the kernel skipped this program (`bpf_prog_info.recursion_misses`, 5.12+;
/// reads 0 on kernels that do not count).
fn recursion_misses(program: BorrowedFd<'_>) -> std::io::Result<u64> {
    /// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: all-zero is a valid bpf_prog_info.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: program.as_raw_fd() as u32,
        info_len: size_of::<bpf_prog_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: the attr names a buffer of info_len bytes that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

fn layout<T>(
    tracefs: &Path,
    category: &str,
    name: &str,
    parse: impl FnOnce(&tracefs::Format) -> Result<T, tracefs::FormatError>,
) -> anyhow::Result<T> {
    let format = tracefs::read_format(tracefs, category, name)?;
    parse(&format).with_context(|| format!("unsupported layout of tracepoint {category}:{name}"))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones to the memory cgroup.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid resource and a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 && kernel_before(5, 11) {
        eprintln!(
            "tcptrace: warning: could not raise RLIMIT_MEMLOCK ({}); loading may fail on this kernel",
            std::io::Error::last_os_error()
        );
    }
}

fn kernel_before(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) < (major, minor)
}

/// The oldest kernel tcptrace runs on: BPF ring buffers arrived in 5.8.
pub fn check_kernel() -> anyhow::Result<()> {
    if kernel_before(5, 8) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        bail!(
            "this kernel ({}) is too old: tcptrace needs Linux 5.8 or newer (BPF ring buffer)",
            release.trim()
        );
    }
    Ok(())
}
