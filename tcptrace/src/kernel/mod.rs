//! Every aya call in one place: pick the mode this kernel supports, load the eBPF object with the
//! filters and this kernel's offsets or layouts, attach the programs, hand back the maps userspace
//! reads. Decode, outputs and metrics never learn which mode runs: the ring buffer record is the
//! contract.
//!
//! - BTF mode ([`btf_mode`]): BTF-enabled tracepoints, owners in socket-local storage, sockets that
//!   predate tracing found by a task-file iterator. Needs `/sys/kernel/btf/vmlinux` and 5.11+.
//! - tracefs mode ([`tracefs_mode`]): classic tracepoints read at tracefs `format` offsets, owners
//!   in an LRU map. For kernels without BTF (5.8 to 5.10).

mod btf_mode;
mod census;
mod diagnostics;
mod holders;
mod iterator;
mod listen_drop_table;
mod timewait_scan;
mod tracefs_mode;
pub mod vmlinux;

use std::{
    fmt,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::ProgramFd,
};
use aya_obj::generated::bpf_prog_info;
pub use census::Census;
pub use listen_drop_table::ListenDropTable;
use tcptrace_common::{
    CGROUP_FILTER_MAP, CONFIG_GLOBAL, CONTAINER_CGROUPS_MAP, COUNTER_LISTEN_NO_SOCKET,
    COUNTER_LISTEN_OVERFLOW, COUNTER_RINGBUF_FULL, COUNTER_STATE_REPEATS, COUNTERS_MAP, Config,
    EVENTS_MAP, NETNS_FILTER_MAP, PID_FILTER_MAP, PORT_FILTER_MAP,
};
pub use timewait_scan::TimewaitScan;

use crate::{cli::ModeChoice, filter::Filters};

/// The compiled eBPF object, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The mode that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Btf,
    Tracefs,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Btf => "btf",
            Self::Tracefs => "tracefs",
        })
    }
}

/// What the rest of tcptrace needs from the loaded program.
pub struct Loaded {
    pub events: RingBuf<MapData>,
    pub attached: Attached,
    pub mode: Mode,
    /// Records of the sockets that existed at start (`--snapshot`, BTF mode), as the ring buffer
    /// carries them, back to back.
    pub snapshot: Vec<u8>,
    /// BTF mode: the scan that follows connections held by timewait sockets.
    pub timewait: Option<TimewaitScan>,
    /// BTF mode, on kernels that report them: what listeners' full accept queues dropped.
    pub listen_drops: Option<ListenDropTable>,
    /// BTF mode, when asked for (`tcptrace top`): the census of the host's sockets.
    pub census: Option<Census>,
}

/// The loaded programs, attached while this lives, and their counters.
pub struct Attached {
    /// Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    /// The attached programs, for the kernel's count of the runs it skipped.
    programs: Vec<ProgramFd>,
    /// The programs' own log (`--debug`, `RUST_LOG`).
    log: Option<aya_log::EbpfLogger<diagnostics::StderrLogger>>,
}

/// The kernel side's counters, summed over CPUs, since load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events lost: dropped because the ring buffer was full, or never seen because the kernel
    /// skipped the program (a tracepoint hit while a BPF program already ran on that CPU, as in a
    /// softirq interrupting one: the kernel counts these as the program's recursion misses).
    pub lost: u64,
    /// Transitions into the state a socket was already in, folded in the kernel (no line).
    pub state_repeats: u64,
    /// Connections listeners' full accept queues dropped at the handshake's last ACK.
    pub listen_overflow: u64,
    /// SYN-cookie ACKs listeners' full accept queues dropped.
    pub listen_no_socket: u64,
}

impl Attached {
    /// Writes what the programs logged since the last call (nothing unless logging is on).
    pub fn flush_log(&mut self) {
        if let Some(log) = &mut self.log {
            log.flush();
        }
    }

    pub fn counters(&self) -> anyhow::Result<Counters> {
        let slot = |index: u32| -> anyhow::Result<u64> {
            let per_cpu = self
                .counters
                .get(&index, 0)
                .context("failed to read the kernel side's counters")?;
            Ok(per_cpu.iter().sum())
        };
        let mut skipped = 0;
        for program in &self.programs {
            skipped += recursion_misses(program.as_fd())
                .context("failed to read a program's statistics")?;
        }
        Ok(Counters {
            lost: slot(COUNTER_RINGBUF_FULL)? + skipped,
            state_repeats: slot(COUNTER_STATE_REPEATS)?,
            listen_overflow: slot(COUNTER_LISTEN_OVERFLOW)?,
            listen_no_socket: slot(COUNTER_LISTEN_NO_SOCKET)?,
        })
    }
}

/// Load-time settings.
pub struct Settings<'a> {
    pub mode: ModeChoice,
    pub filters: &'a Filters,
    pub ring_buffer_bytes: u32,
    pub max_sockets: u32,
    /// Write a record of every existing socket (BTF mode).
    pub snapshot: bool,
    /// `--snapshot` given: a kernel that cannot list the existing sockets is an error (BTF
    /// mode), and tracefs mode says it writes none. Without it (`tcptrace top`), the records are
    /// taken where the kernel can.
    pub snapshot_asked: bool,
    /// Log the kernel side's diagnostics.
    pub debug: bool,
    /// The cgroup v2 hierarchy, where `--container`'s cgroups are looked for at start.
    pub cgroup_mount: Option<&'a std::path::Path>,
    /// `--events congestion`: lines of congestion state changes, which need BTF mode and the
    /// tracepoint (the metrics count them where they can).
    pub congestion_lines: bool,
    /// `--events listen-drops` named on the command line: an error where the kernel cannot
    /// report them (by default they are traced where it can).
    pub listen_drops_required: bool,
    /// `tcptrace top`: load the census of the host's sockets (BTF mode).
    pub census: bool,
}

/// Loads and attaches the mode `settings.mode` asks for; `auto` takes BTF mode where the kernel
/// has it and says on stderr why it falls back when it does not.
pub fn load(settings: &Settings<'_>) -> anyhow::Result<Loaded> {
    match settings.mode {
        ModeChoice::Btf => load_mode(Mode::Btf, settings),
        ModeChoice::Tracefs => load_mode(Mode::Tracefs, settings),
        ModeChoice::Auto => {
            let why = match btf_mode::supported() {
                Ok(()) => match btf_mode::load(settings) {
                    Ok(loaded) => return Ok(loaded),
                    Err(e) if e.is::<btf_mode::SnapshotRefused>() => return Err(e),
                    Err(e) => brief(&format!("{e:#}"), settings.debug),
                },
                Err(e) => format!("{e:#}"),
            };
            eprintln!("tcptrace: BTF mode unavailable ({why}); using tracefs mode");
            tracefs_mode::load(settings)
        }
    }
}

/// Loads and attaches one mode, or says why it cannot run here.
pub fn load_mode(mode: Mode, settings: &Settings<'_>) -> anyhow::Result<Loaded> {
    match mode {
        Mode::Btf => {
            btf_mode::supported().context("BTF mode is not available on this kernel")?;
            btf_mode::load(settings).context("BTF mode failed")
        }
        Mode::Tracefs => tracefs_mode::load(settings),
    }
}

/// A reason on one short line: the kernel's verifier log, which can run to thousands of lines,
/// only with `--debug`.
fn brief(message: &str, debug: bool) -> String {
    match message.split_once("Verifier output:") {
        Some((head, _)) if !debug => {
            format!("{}; --debug shows the verifier's log", head.trim_end())
        }
        _ => message.to_owned(),
    }
}

/// Set to `1`, the programs on tracepoints return at once (`cargo xtask bench`'s floor: what
/// attaching costs the host). Nothing is traced then; tcptrace says so at start.
pub const BENCH_EMPTY_PROGRAMS_VAR: &str = "TCPTRACE_BENCH_EMPTY_PROGRAMS";

/// The configuration every program reads.
fn config(settings: &Settings<'_>, extra_bits: u32) -> Config {
    let bench = std::env::var_os(BENCH_EMPTY_PROGRAMS_VAR).is_some_and(|v| v == "1");
    if bench {
        eprintln!(
            "tcptrace: warning: {BENCH_EMPTY_PROGRAMS_VAR}=1: the programs return at once, nothing is traced"
        );
    }
    Config {
        filters: settings.filters.bits
            | extra_bits
            | if bench {
                tcptrace_common::BENCH_EMPTY_PROGRAMS
            } else {
                0
            },
        // Wake the reader only once a quarter of the buffer waits; it drains on a timer otherwise.
        wakeup_bytes: settings.ring_buffer_bytes / 4,
    }
}

/// A loader with what both modes set: the configuration, the ring buffer's size, the log level.
fn loader<'a>(config: &'a Config, ring_buffer_bytes: u32, log_level: &'a u8) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    // The object has no CO-RE relocations, so the loader needs no kernel BTF of its own (it
    // parses one when created; dropping it here keeps tcptrace's peak memory to one copy).
    loader
        .btf(None)
        .override_global(CONFIG_GLOBAL, config, true)
        .override_global(aya_log::LEVEL, log_level, true)
        .map_max_entries(EVENTS_MAP, ring_buffer_bytes);
    loader
}

/// Fills the pid, port, cgroup and namespace filter maps.
fn fill_filters(ebpf: &mut Ebpf, filters: &Filters) -> anyhow::Result<()> {
    let mut pid_filter: HashMap<_, u32, u8> = HashMap::try_from(map_mut(ebpf, PID_FILTER_MAP)?)?;
    for &pid in &filters.pids {
        pid_filter
            .insert(pid, 1, 0)
            .with_context(|| format!("failed to add pid {pid} to the filter"))?;
    }
    let mut port_filter: HashMap<_, u16, u8> = HashMap::try_from(map_mut(ebpf, PORT_FILTER_MAP)?)?;
    for (&port, &sides) in &filters.ports {
        port_filter
            .insert(port, sides, 0)
            .with_context(|| format!("failed to add port {port} to the filter"))?;
    }
    let mut cgroup_filter: HashMap<_, u64, u8> =
        HashMap::try_from(map_mut(ebpf, CGROUP_FILTER_MAP)?)?;
    for &id in &filters.cgroups {
        cgroup_filter
            .insert(id, 1, 0)
            .with_context(|| format!("failed to add cgroup {id} to the filter"))?;
    }
    let mut netns_filter: HashMap<_, u32, u8> =
        HashMap::try_from(map_mut(ebpf, NETNS_FILTER_MAP)?)?;
    for &inode in &filters.netns {
        netns_filter
            .insert(inode, 1, 0)
            .with_context(|| format!("failed to add network namespace {inode} to the filter"))?;
    }
    Ok(())
}

/// Adds cgroups (ids) of the `--container` filter.
fn fill_container_cgroups(ebpf: &mut Ebpf, ids: &[u64]) -> anyhow::Result<()> {
    // aya's HashMap serves LRU hash maps too.
    let mut map: HashMap<_, u64, u8> = HashMap::try_from(map_mut(ebpf, CONTAINER_CGROUPS_MAP)?)?;
    for &id in ids {
        map.insert(id, 1, 0)
            .with_context(|| format!("failed to add cgroup {id} to the container filter"))?;
    }
    Ok(())
}

/// Takes the maps userspace reads and wraps up the attached programs.
fn finish(
    mut ebpf: Ebpf,
    programs: Vec<ProgramFd>,
    mode: Mode,
    snapshot: Vec<u8>,
    log_level: u8,
) -> anyhow::Result<Loaded> {
    let log = diagnostics::reader(&mut ebpf, log_level)?;
    let events = RingBuf::try_from(take_map(&mut ebpf, EVENTS_MAP)?)?;
    let counters = PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS_MAP)?)?;
    Ok(Loaded {
        events,
        attached: Attached {
            _ebpf: ebpf,
            counters,
            programs,
            log,
        },
        mode,
        snapshot,
        timewait: None,
        listen_drops: None,
        census: None,
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

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Whether the running kernel is older than `major.minor`.
pub fn kernel_before(major: u32, minor: u32) -> bool {
    let release = kernel_release();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) < (major, minor)
}

/// The oldest kernel tcptrace runs on: BPF ring buffers arrived in 5.8.
pub fn check_kernel() -> anyhow::Result<()> {
    if kernel_before(5, 8) {
        bail!(
            "this kernel ({}) is too old: tcptrace needs Linux 5.8 or newer (BPF ring buffer)",
            kernel_release()
        );
    }
    Ok(())
}

/// Hands the heap's free pages back to the system (glibc keeps them otherwise; musl, which the
/// static binary uses, returns them on its own).
pub(crate) fn return_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: no arguments to get wrong; it only releases memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}
