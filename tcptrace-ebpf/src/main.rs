//! tcptrace's kernel side: programs on TCP state changes and retransmits that attribute each event
//! to the process owning the socket, filter it, and hand it to userspace through one ring buffer.
//!
//! Two modes, one object: `btf` (BTF-enabled tracepoints, owners in socket-local storage, a
//! task-file iterator for sockets that predate tracing) and `tracefs` (classic tracepoints, read at
//! the offsets of the running kernel's tracefs `format` files, owners in an LRU map). Userspace
//! loads the programs of one mode; maps, globals and `emit` are shared.
#![no_std]
#![no_main]

mod btf;
mod census;
mod congestion;
mod emit;
mod holders;
mod identity;
mod listen_drops;
mod record;
mod tracefs;

use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    macros::{btf_map, btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use tcptrace_common::{
    BENCH_EMPTY_PROGRAMS, Bytes16, COUNTER_SLOTS, Config, ContainerFilter, DEFAULT_MAX_SOCKETS,
    DEFAULT_RING_BUFFER_BYTES, Forked, Holder, KIND_RETRANSMIT, KIND_RETRANSMIT_SYNACK,
    KernelOffsets, ListenDropLayout, ListenDrops, ListenerOwner, MAX_DROPPING_LISTENERS,
    MAX_FILTER_ENTRIES, MAX_HOLDERS, MAX_LISTENERS, MAX_PROCESSES, RetransmitLayout, SocketState,
    StateLayout,
};

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config {
    filters: 0,
    wakeup_bytes: 0,
});

#[unsafe(no_mangle)]
static STATE_LAYOUT: Global<StateLayout> = Global::new(unsafe { core::mem::zeroed() });

#[unsafe(no_mangle)]
static RETRANSMIT_LAYOUT: Global<RetransmitLayout> = Global::new(unsafe { core::mem::zeroed() });

#[unsafe(no_mangle)]
static SYNACK_LAYOUT: Global<RetransmitLayout> = Global::new(unsafe { core::mem::zeroed() });

#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(unsafe { core::mem::zeroed() });

/// `struct tcp_sock`'s `snd_cwnd`, for the congestion program only.
#[unsafe(no_mangle)]
static SND_CWND_OFFSET: Global<u32> = Global::new(0);

/// The drop reasons and accept-queue fields, for the listen drop program only.
#[unsafe(no_mangle)]
static LISTEN_DROP_LAYOUT: Global<ListenDropLayout> = Global::new(ListenDropLayout {
    listen_overflow: 0,
    no_socket: 0,
    sk_ack_backlog: 0,
    sk_max_ack_backlog: 0,
});

#[unsafe(no_mangle)]
static CONTAINER_FILTER: Global<ContainerFilter> = Global::new(unsafe { core::mem::zeroed() });

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static SOCKETS: LruHashMap<u64, SocketState> = LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map]
static LISTENERS: LruHashMap<u16, ListenerOwner> = LruHashMap::with_max_entries(MAX_LISTENERS, 0);

/// BTF mode: what each listener's full accept queue dropped, by the listener's cookie. Per CPU:
/// the counts are added to without atomics (the BPF target has no 64-bit fetch-and-add in Rust),
/// and a flood at one listener from every CPU shares no cache line.
#[map]
static LISTEN_DROPS: LruPerCpuHashMap<u64, ListenDrops> =
    LruPerCpuHashMap::with_max_entries(MAX_DROPPING_LISTENERS, 0);

#[map]
static FORKED: LruHashMap<u32, Forked> = LruHashMap::with_max_entries(MAX_PROCESSES, 0);

#[map]
static SUCCESSORS: LruHashMap<u32, Forked> = LruHashMap::with_max_entries(MAX_PROCESSES, 0);

#[map]
static EXECS: LruHashMap<u32, Bytes16> = LruHashMap::with_max_entries(MAX_PROCESSES, 0);

/// At start: the process holding each TCP socket that predates tracing, by socket address.
#[map]
static HOLDERS: HashMap<u64, Holder> = HashMap::with_max_entries(MAX_HOLDERS, BPF_F_NO_PREALLOC);

/// Bumped whenever an owner may have handed its sockets to a successor: a socket whose storage
/// holds an older value checks its owner again.
#[map]
static SUCCESSION_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static PORT_FILTER: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static NETNS_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

/// `--container`: the cgroups whose names hold the container id. LRU: a container restarted
/// over and over leaves cgroups that are gone.
#[map]
static CONTAINER_CGROUPS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

/// A socket-local storage map definition with the flags aya-ebpf's own `SkStorage` cannot set:
/// `BPF_F_CLONE`, so that accepted sockets get a copy of their listener's storage. Laid out as
/// aya-ebpf's `btf_map_def!` lays out a BTF map: each field's pointee encodes a value in its type.
#[repr(C)]
pub struct SocketStorage {
    r#type: *const [i32; 24], // BPF_MAP_TYPE_SK_STORAGE
    key: *const i32,
    value: *const SocketState,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; 0x201], // BPF_F_NO_PREALLOC | BPF_F_CLONE
}

// SAFETY: the fields are never dereferenced: the loader reads the map's shape from BTF.
unsafe impl Sync for SocketStorage {}

#[btf_map]
static SOCKET_STORAGE: SocketStorage = SocketStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// The bench's floor run: the programs on tracepoints do nothing.
#[inline(always)]
fn empty() -> bool {
    CONFIG.load().filters & BENCH_EMPTY_PROGRAMS != 0
}

// tracefs mode.

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if empty() {
        return 0;
    }
    match tracefs::state(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    if empty() {
        return 0;
    }
    match tracefs::retransmit(&ctx, &RETRANSMIT_LAYOUT.load(), KIND_RETRANSMIT) {
        Ok(()) | Err(()) => 0,
    }
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    if empty() {
        return 0;
    }
    match tracefs::retransmit(&ctx, &SYNACK_LAYOUT.load(), KIND_RETRANSMIT_SYNACK) {
        Ok(()) | Err(()) => 0,
    }
}

// BTF mode.

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    if empty() {
        return 0;
    }
    match btf::state(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn btf_tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    if empty() {
        return 0;
    }
    match btf::retransmit(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn btf_tcp_retransmit_synack(ctx: BtfTracePointContext) -> i32 {
    if empty() {
        return 0;
    }
    match btf::retransmit_synack(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[btf_tracepoint(function = "tcp_cong_state_set")]
pub fn btf_tcp_cong_state_set(ctx: BtfTracePointContext) -> i32 {
    if empty() {
        return 0;
    }
    match congestion::changed(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn btf_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    if empty() {
        return 0;
    }
    match listen_drops::dropped(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn btf_inet_sk_error_report(ctx: BtfTracePointContext) -> i32 {
    if empty() {
        return 0;
    }
    btf::error_reported(&ctx);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn btf_tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    if empty() {
        return 0;
    }
    btf::reset_sent(&ctx);
    0
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn btf_sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    btf::forked(&ctx);
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn btf_sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    btf::exited(&ctx);
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn btf_sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    btf::executed(&ctx);
    0
}

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn btf_cgroup_mkdir(ctx: BtfTracePointContext) -> i32 {
    identity::cgroup_created(&ctx);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn btf_sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    if empty() {
        return 0;
    }
    holders::used(&ctx);
    0
}

/// `iter/task_file`: every open file of every process, run once at start (aya-ebpf has no macro
/// for iterators).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn snapshot_holders(ctx: *mut core::ffi::c_void) -> i32 {
    match holders::record_holder(ctx.cast()) {
        Ok(()) | Err(()) => 0,
    }
}

/// `iter/tcp`: every TCP socket of one network namespace, run at start once per namespace after
/// `snapshot_holders`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn snapshot_sockets(ctx: *mut core::ffi::c_void) -> i32 {
    match holders::take_holder(ctx.cast()) {
        Ok(()) | Err(()) => 0,
    }
}

/// `iter/tcp`: every TCP socket of the host, timewait sockets included, run by userspace once
/// per scan interval.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn timewait_scan(ctx: *mut core::ffi::c_void) -> i32 {
    match btf::timewait_scan(ctx.cast()) {
        Ok(()) | Err(()) => 0,
    }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn census(ctx: *mut core::ffi::c_void) -> i32 {
    match census::census(ctx.cast()) {
        Ok(()) | Err(()) => 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
