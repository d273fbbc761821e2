//! What the eBPF program and the loader must agree on: the ring buffer record, the load-time
//! configuration, and the names of maps and globals.
//!
//! Only integers and byte arrays cross the kernel boundary: no `bool`, no enums. The loader decodes
//! numbers into typed values and keeps unknown ones.
#![no_std]

/// Ring buffer carrying [`Event`] records to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU counters of the kernel side, indexed by the `COUNTER_*` constants.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Per-socket state (owner, last transition time, retransmits), LRU, keyed by socket address.
pub const SOCKETS_MAP: &str = "SOCKETS";
/// Owners of listening sockets keyed by local port, so passively opened sockets inherit them
/// (tracefs mode).
pub const LISTENERS_MAP: &str = "LISTENERS";
/// BTF mode: the process each process (tgid) forked last, which holds copies of its sockets.
pub const FORKED_MAP: &str = "FORKED";
/// BTF mode: for a process that exited, the process it forked last (its sockets' new holder).
pub const SUCCESSORS_MAP: &str = "SUCCESSORS";
/// BTF mode: the command name a process took at its last exec, for successors that exec'd.
pub const EXECS_MAP: &str = "EXECS";
/// BTF mode, at start only: the process holding each TCP socket that predates tracing, keyed by
/// socket address; filled by the task-file iterator, consumed by the TCP iterator.
pub const HOLDERS_MAP: &str = "HOLDERS";
/// Capacity of `HOLDERS`: sockets held at start beyond it keep pid 0 until their holder uses them.
pub const MAX_HOLDERS: u32 = 1 << 20;
/// Capacity of `FORKED`, `SUCCESSORS` and `EXECS` (LRU).
pub const MAX_PROCESSES: u32 = 16_384;
/// Set of owner pids (tgid) to keep; consulted when `FILTER_PID` is set.
pub const PID_FILTER_MAP: &str = "PID_FILTER";
/// Ports to keep, with `PORT_LOCAL`/`PORT_REMOTE` bits saying which side may match.
pub const PORT_FILTER_MAP: &str = "PORT_FILTER";
/// Socket-local storage (BTF mode): a [`SocketState`] in each socket, cloned to accepted sockets.
pub const SOCKET_STORAGE_MAP: &str = "SOCKET_STORAGE";
/// Cgroup v2 ids to keep (BTF mode), with their descendants; consulted when `FILTER_CGROUP` is set.
pub const CGROUP_FILTER_MAP: &str = "CGROUP_FILTER";
/// Network namespaces (inode numbers) to keep (BTF mode); consulted when `FILTER_NETNS` is set.
pub const NETNS_FILTER_MAP: &str = "NETNS_FILTER";
/// Cgroup v2 ids whose names hold the `--container` id (BTF mode), with their descendants.
pub const CONTAINER_CGROUPS_MAP: &str = "CONTAINER_CGROUPS";
/// The [`ContainerFilter`] global (BTF mode).
pub const CONTAINER_FILTER_GLOBAL: &str = "CONTAINER_FILTER";
/// How many cgroup levels the kernel side climbs from a socket's cgroup looking for one that
/// `--cgroup` or `--container` names.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Where a container id starts in the name of its cgroup: `<id>` (cgroupfs drivers), `crio-<id>`,
/// `docker-<id>` and `libpod-<id>`, `cri-containerd-<id>` (systemd drivers).
pub const CONTAINER_ID_OFFSETS: [u32; 4] = [0, 5, 7, 15];
/// The [`KernelOffsets`] global (BTF mode).
pub const OFFSETS_GLOBAL: &str = "OFFSETS";
/// BTF mode: the offset of `struct tcp_sock`'s `snd_cwnd`, a global of its own so that only the
/// congestion program loads it (the other programs' stacks stay as they are).
pub const SND_CWND_OFFSET_GLOBAL: &str = "SND_CWND_OFFSET";
/// BTF mode: the connections each listener's full accept queue dropped, keyed by the listener's
/// socket cookie (LRU, per CPU); userspace reads it once a second, sums the CPUs and writes a
/// line per listener whose count grew.
pub const LISTEN_DROPS_MAP: &str = "LISTEN_DROPS";
/// Capacity of `LISTEN_DROPS`: listeners that dropped connections, the least recent forgotten
/// first (their drops stay counted in `COUNTERS`).
pub const MAX_DROPPING_LISTENERS: u32 = 1_024;
/// The [`ListenDropLayout`] global (BTF mode).
pub const LISTEN_DROP_LAYOUT_GLOBAL: &str = "LISTEN_DROP_LAYOUT";
/// The [`Config`] global.
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// The [`StateLayout`] global.
pub const STATE_LAYOUT_GLOBAL: &str = "STATE_LAYOUT";
/// The [`RetransmitLayout`] global for `tcp_retransmit_skb`.
pub const RETRANSMIT_LAYOUT_GLOBAL: &str = "RETRANSMIT_LAYOUT";
/// The [`RetransmitLayout`] global for `tcp_retransmit_synack`.
pub const SYNACK_LAYOUT_GLOBAL: &str = "SYNACK_LAYOUT";

/// Ring buffer size when the user does not choose one.
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 4 << 20;
/// Per-socket map capacity when the user does not choose one.
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;
/// Listener map capacity.
pub const MAX_LISTENERS: u32 = 4_096;
/// Upper bound on the number of pids or ports a filter may hold.
pub const MAX_FILTER_ENTRIES: u32 = 1_024;

/// `COUNTERS` slot: events lost because the ring buffer was full.
pub const COUNTER_RINGBUF_FULL: u32 = 0;
/// `COUNTERS` slot: transitions into the state the socket was already in (`FIN_WAIT1 ->
/// FIN_WAIT1`: close() after shutdown() while the FIN waits to go out), folded in the kernel.
pub const COUNTER_STATE_REPEATS: u32 = 1;
/// `COUNTERS` slot: connections a listener's full accept queue dropped as their handshake's
/// last ACK came (`SKB_DROP_REASON_TCP_LISTEN_OVERFLOW`).
pub const COUNTER_LISTEN_OVERFLOW: u32 = 2;
/// `COUNTERS` slot: SYN-cookie ACKs a listener's full accept queue dropped
/// (`SKB_DROP_REASON_NO_SOCKET` with the listener as the receiving socket).
pub const COUNTER_LISTEN_NO_SOCKET: u32 = 3;
/// Number of `COUNTERS` slots.
pub const COUNTER_SLOTS: u32 = 4;

/// `Event::kind`: a state transition (`sock:inet_sock_set_state`).
pub const KIND_STATE: u16 = 1;
/// `Event::kind`: a retransmitted segment (`tcp:tcp_retransmit_skb`).
pub const KIND_RETRANSMIT: u16 = 2;
/// `Event::kind`: a retransmitted SYN-ACK (`tcp:tcp_retransmit_synack`).
pub const KIND_RETRANSMIT_SYNACK: u16 = 3;

/// `Event::kind`: a socket that existed when tracing began (`--snapshot`); `oldstate` and
/// `newstate` both hold its state then.
pub const KIND_SNAPSHOT: u16 = 4;
/// `Event::kind` (BTF mode): the kernel handed a closed connection to a timewait socket, which
/// lives on in the connection's place. `oldstate` is the state the full socket left (FIN_WAIT2 or
/// CLOSING), `newstate` the timewait socket's (FIN_WAIT2 while the peer has not closed, else
/// TIME_WAIT). No CLOSE happened: the timewait scan reports its later moves and its end.
pub const KIND_TIMEWAIT: u16 = 5;
/// `Event::kind` (BTF mode): the socket's congestion state changed (`tcp:tcp_cong_state_set`);
/// `oldstate` and `newstate` hold the congestion states (`ca_state::*`) left and entered, `end`
/// a [`CongestionDetail`].
pub const KIND_CONGESTION: u16 = 6;

/// `Event::flags`: `duration_ns` is meaningful (the previous transition was seen).
pub const EVENT_HAS_DURATION: u16 = 1 << 0;
/// `Event::flags`: the kernel gave the socket state (`tcp_retransmit_skb` has `state` since 4.20).
pub const EVENT_HAS_STATE: u16 = 1 << 1;
/// `Event::flags`: the kernel gave an error code (`tcp_retransmit_skb` has `err` since 2025).
pub const EVENT_HAS_ERR: u16 = 1 << 2;
/// `Event::flags`: `comm` is the name of the thread that opened the socket, not of its process's
/// main thread (tracefs mode, which cannot read the thread group leader's name): userspace looks
/// the process's name up.
pub const EVENT_COMM_OF_THREAD: u16 = 1 << 3;
/// `Event::flags`: `end` holds the connection's summary (BTF mode, on the line that ends it).
pub const EVENT_HAS_SUMMARY: u16 = 1 << 4;
/// `Event::flags`: `end` holds a [`RetransmitDetail`] (why the segment went out again, the
/// timeout in force and the attempt; BTF mode), packed by [`RetransmitDetail::into_end`].
pub const EVENT_HAS_RETRANSMIT_DETAIL: u16 = 1 << 5;

/// `SocketState::owner_flags` bit (BTF mode): the socket connected (its own SYN counts in the
/// kernel's `bytes_acked`).
pub const SOCKET_ACTIVE_OPEN: u32 = 1 << 31;

/// `PORT_FILTER` value bit: the port may match the socket's local side.
pub const PORT_LOCAL: u8 = 1 << 0;
/// `PORT_FILTER` value bit: the port may match the socket's remote side.
pub const PORT_REMOTE: u8 = 1 << 1;

/// `Config::filters` bit: keep only owners in `PID_FILTER`.
pub const FILTER_PID: u32 = 1 << 0;
/// `Config::filters` bit: keep only sockets whose ports match `PORT_FILTER`.
pub const FILTER_PORT: u32 = 1 << 1;
/// `Config::filters` bit: keep only IPv4.
pub const FILTER_IPV4: u32 = 1 << 2;
/// `Config::filters` bit: keep only IPv6.
pub const FILTER_IPV6: u32 = 1 << 3;
/// `Config::filters` bit: trace state transitions.
pub const TRACE_STATES: u32 = 1 << 4;
/// `Config::filters` bit: trace retransmits.
pub const TRACE_RETRANSMITS: u32 = 1 << 5;
/// `Config::filters` bit: the socket iterator writes a record of each socket it visits.
pub const TRACE_SNAPSHOT: u32 = 1 << 6;
/// `Config::filters` bit: keep only sockets in a cgroup of `CGROUP_FILTER` or below one.
pub const FILTER_CGROUP: u32 = 1 << 7;
/// `Config::filters` bit: keep only sockets in a network namespace of `NETNS_FILTER`.
pub const FILTER_NETNS: u32 = 1 << 8;
/// `Config::filters` bit: keep only sockets in the container `CONTAINER_FILTER` names.
pub const FILTER_CONTAINER: u32 = 1 << 9;
/// `Config::filters` bit: keep only the lines that end connections (CLOSE, and hand-overs to a
/// timewait socket, which userspace needs to see the end), no retransmits.
pub const FILTER_ENDS: u32 = 1 << 10;
/// `Config::filters` bit: of the lines that end connections, keep those that did not end with
/// an orderly FIN (with `FILTER_ENDS`).
pub const FILTER_FAILURES: u32 = 1 << 11;
/// `Config::filters` bit: trace congestion state changes (BTF mode, `tcp_cong_state_set`).
pub const TRACE_CONGESTION: u32 = 1 << 12;
/// `Config::filters` bit: count what listeners' full accept queues drop (BTF mode, `kfree_skb`).
pub const TRACE_LISTEN_DROPS: u32 = 1 << 13;
/// `Config::filters` bit, for `cargo xtask bench` only: every program on a TCP or socket
/// tracepoint returns at once, so a run measures what attaching costs (the floor under everything
/// the programs do). Every other run pays a load and a branch per program run for it.
pub const BENCH_EMPTY_PROGRAMS: u32 = 1 << 14;

/// Linux address families as the tracepoints report them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;

/// Tracepoint fields the eBPF side can read start at this offset (after the common header)...
pub const RECORD_START: usize = 8;
/// ...and end within this many bytes of it (a power of two).
pub const RECORD_WINDOW: usize = 128;

/// How many bytes of a record the eBPF side copies for a layout's `record_size`: all of them, at
/// most the window. Written as the verifier wants it (a bounded value); shared so that userspace
/// tests prove it for every layout the format parser accepts.
#[inline(always)]
pub const fn record_copy_len(record_size: u16) -> u32 {
    let size = record_size as u32;
    if size > RECORD_WINDOW as u32 {
        RECORD_WINDOW as u32
    } else {
        size
    }
}

/// An offset value meaning "this kernel's tracepoint has no such field".
pub const FIELD_ABSENT: u16 = u16::MAX;

/// BTF mode: what the drop program reads, from this kernel's BTF: the values of `enum
/// skb_drop_reason` it counts (Linux 6.15+ has `TCP_LISTEN_OVERFLOW`; 6.11+ passes the receiving
/// socket), and where `struct sock` keeps its accept queue's fill and limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenDropLayout {
    pub listen_overflow: u32,
    pub no_socket: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
}

/// `LISTEN_DROPS` value, one CPU's: what a listener dropped on this CPU since it was first seen,
/// who it is, and its accept queue's fill and limit at its latest drop here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenDrops {
    /// Dropped with `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW`.
    pub overflow: u64,
    /// SYN-cookie ACKs dropped (`SKB_DROP_REASON_NO_SOCKET` at the listener).
    pub no_socket: u64,
    pub saddr: Bytes16,
    pub comm: Bytes16,
    pub cgroup_id: u64,
    pub skaddr: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the latest drop.
    pub last_ns: u64,
    pub pid: u32,
    pub netns: u32,
    /// `sk_ack_backlog`: connections waiting in the accept queue at the latest drop.
    pub ack_backlog: u32,
    /// `sk_max_ack_backlog`: the queue's limit (the backlog `listen()` was given, capped by
    /// `net.core.somaxconn`).
    pub max_ack_backlog: u32,
    pub family: u16,
    pub sport: u16,
    pub _pad: u32,
}

/// Sixteen bytes (an address, a command name), 8-byte aligned so that both sides copy them as
/// two words: the eBPF target otherwise copies byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes16(pub [u8; 16]);

impl Bytes16 {
    pub const ZERO: Self = Self([0; 16]);
}

/// Where `sock:inet_sock_set_state` keeps each field on the running kernel, read from its tracefs
/// `format` file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateLayout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    /// Width of `protocol` in bytes: 1 before Linux 5.6, 2 since.
    pub protocol_size: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// Bytes from `RECORD_START` to the end of the last field used.
    pub record_size: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<StateLayout>() == 28);

/// Where `tcp:tcp_retransmit_skb` (or `tcp_retransmit_synack`) keeps each field. Optional fields
/// hold [`FIELD_ABSENT`] on kernels that lack them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransmitLayout {
    pub skaddr: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// Optional (4.20+).
    pub state: u16,
    /// Optional (5.12+); without it the family is inferred from the IPv6 addresses.
    pub family: u16,
    /// Optional (2025+).
    pub err: u16,
    /// Bytes from `RECORD_START` to the end of the last field used.
    pub record_size: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<RetransmitLayout>() == 24);

/// `KernelOffsets::features` bit: sockets have IPv6 addresses (`CONFIG_IPV6`).
pub const KERNEL_HAS_IPV6: u32 = 1 << 0;
/// `KernelOffsets::features` bit: the BTF tracepoint `tcp_retransmit_skb` passes `err` (2025+).
pub const KERNEL_RETRANSMIT_ERR: u32 = 1 << 1;
/// `KernelOffsets::features` bit: sockets record their cgroup (`CONFIG_SOCK_CGROUP_DATA`).
pub const KERNEL_HAS_CGROUP: u32 = 1 << 2;
/// `KernelOffsets::features` bit: `sock_cgroup_data` is the tagged word of kernels before 5.15:
/// a cgroup pointer, or with bit 0 set, net_prio/net_cls data (the socket is in the root cgroup).
pub const KERNEL_CGROUP_TAGGED: u32 = 1 << 3;
/// `KernelOffsets::features` bit: sockets point to their network namespace (`CONFIG_NET_NS`).
pub const KERNEL_HAS_NETNS: u32 = 1 << 4;
/// `KernelOffsets::features` bit: the BTF tracepoint `tcp_send_reset` passes the kernel's
/// `enum sk_rst_reason` (6.10+).
pub const KERNEL_RST_REASON: u32 = 1 << 5;
/// `KernelOffsets::features` bit: the `icsk_*` and `request_sock` fields a retransmit's kind,
/// timeout and attempt are read from were found.
pub const KERNEL_RETRANSMIT_DETAIL: u32 = 1 << 6;
/// `KernelOffsets::features` bit: a socket's FIN timeout can be read (`tcp_sock.linger2`, the
/// namespace's `tcp_fin_timeout`, and the RTO).
pub const KERNEL_FIN_TIME: u32 = 1 << 7;

/// Where BTF mode finds fields in kernel structs, read from the running kernel's BTF at load time.
/// Offsets are in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock_common` (the start of every socket, and of a request socket).
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `struct inet_sock` (at the start of `struct tcp_sock`): the bound local port, network order.
    pub inet_sport: u32,
    /// `struct tcp_sock`: segments retransmitted (an accepted socket starts with its SYN-ACK
    /// retransmits).
    pub tcp_total_retrans: u32,
    /// `struct task_struct`.
    pub task_tgid: u32,
    pub task_pid: u32,
    pub task_real_parent: u32,
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// `struct socket`: its `struct sock *`.
    pub socket_sk: u32,
    /// `struct sock`: the cgroup pointer (or tagged word) in `sk_cgrp_data`.
    pub sk_cgroup: u32,
    /// `struct cgroup`: its `struct kernfs_node *`, and its `struct cgroup_root *`.
    pub cgroup_kn: u32,
    pub cgroup_root: u32,
    /// `struct cgroup_root`: the hierarchy's id (0: cgroup v2).
    pub root_hierarchy_id: u32,
    /// `struct kernfs_node`: the id (a cgroup's id, the inode number of its directory), the
    /// parent and the name.
    pub kernfs_id: u32,
    pub kernfs_parent: u32,
    pub kernfs_name: u32,
    /// `struct sock_common`: its `struct net *`.
    pub skc_net: u32,
    /// `struct net`: the namespace's inode number (`ns.inum`).
    pub net_inum: u32,
    /// `struct sock`: the error a connection ended with, the soft error an ICMP message left
    /// while the owner held the socket, the flag word (`SOCK_DONE`: the peer's FIN arrived), and
    /// `struct sock_common`'s cookie.
    pub sk_err: u32,
    pub sk_err_soft: u32,
    pub sk_flags: u32,
    pub skc_cookie: u32,
    /// `struct tcp_sock`: bytes the peer acknowledged, bytes received, smoothed RTT (µs << 3),
    /// the next sequence number expected and the first one not yet read by the owner.
    pub tcp_bytes_acked: u32,
    pub tcp_bytes_received: u32,
    pub tcp_srtt_us: u32,
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    /// `struct inet_timewait_sock`: the substate and the expiry (jiffies) of its timer.
    pub tw_substate: u32,
    pub tw_expires: u32,
    /// `enum sk_rst_reason` values, plus 1 (0: this kernel has no such reason): what the kernel
    /// passes when closing drops unread data, and when it resets for the socket's state.
    pub rst_abort_on_close: u32,
    pub rst_state: u32,
    /// `struct sock`: the socket's type and protocol (`SOCK_STREAM`, `IPPROTO_TCP` for TCP).
    pub sk_type: u32,
    pub sk_protocol: u32,
    /// `struct inet_connection_sock` (at the start of `struct tcp_sock`): the retransmission
    /// timeout (jiffies), the congestion state (a 5-bit bitfield in the low bits of its byte),
    /// timeouts in a row, the pending timer and the backoff exponent.
    pub icsk_rto: u32,
    pub icsk_ca_state: u32,
    pub icsk_retransmits: u32,
    pub icsk_pending: u32,
    pub icsk_backoff: u32,
    /// `struct request_sock`: its SYN-ACK's initial timeout (jiffies) and retransmits so far.
    pub req_timeout: u32,
    pub req_num_retrans: u32,
    /// `struct tcp_sock`: the FIN timeout set with `TCP_LINGER2` (jiffies; 0: the namespace's).
    pub tcp_linger2: u32,
    /// `struct net`: `ipv4.sysctl_tcp_fin_timeout` (jiffies).
    pub net_fin_timeout: u32,
    /// `KERNEL_*` bits.
    pub features: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 200);

/// `--container` in the kernel (BTF mode): a container id prefix, lowercase hex, compared in
/// 8-byte words with the name of each new cgroup at each of [`CONTAINER_ID_OFFSETS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainerFilter {
    /// The prefix, NUL-padded.
    pub words: [u64; 8],
    /// Its length in bytes (12 to 64).
    pub len: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ContainerFilter>() == 72);

/// Load-time settings of the eBPF program, set by the loader through `CONFIG`. The tracepoint
/// layouts are globals of their own, so each program loads only what it reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `FILTER_*` and `TRACE_*` bits.
    pub filters: u32,
    /// Below this many unread bytes in the ring buffer the program does not wake the reader, which
    /// drains on its own short timer instead; above it, every submit wakes the reader.
    pub wakeup_bytes: u32,
}
const _: () = assert!(size_of::<Config>() == 8);

/// One record in the ring buffer: a state transition or a retransmit of one socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// Kernel address of the socket: joins the events of one socket.
    pub skaddr: u64,
    /// Time spent in `oldstate`, valid with `EVENT_HAS_DURATION`.
    pub duration_ns: u64,
    /// Local address: IPv4 in the first 4 bytes, network order.
    pub saddr: Bytes16,
    /// Remote address.
    pub daddr: Bytes16,
    /// Owner's command name, NUL-padded; all zero when the owner was never seen.
    pub comm: Bytes16,
    /// Owner's process id (tgid); 0 when the owner was never seen.
    pub pid: u32,
    /// Retransmits seen for this socket while traced.
    pub retransmits: u32,
    /// Kernel error code of a retransmit, valid with `EVENT_HAS_ERR`.
    pub err: i32,
    /// `KIND_*`.
    pub kind: u16,
    /// `EVENT_*` bits.
    pub flags: u16,
    pub family: u16,
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    pub _pad: u16,
    /// State left (transitions) or current state (retransmits, valid with `EVENT_HAS_STATE`).
    pub oldstate: u32,
    /// State entered (transitions).
    pub newstate: u32,
    /// The socket's cgroup v2 id (BTF mode; tracefs mode: the owner's when it was seen); 0 when
    /// unknown.
    pub cgroup_id: u64,
    /// The socket's network namespace, as an inode number (BTF mode); 0 when unknown.
    pub netns: u32,
    /// On a hand-over to a timewait socket in FIN_WAIT2 (`KIND_TIMEWAIT`): the socket's FIN
    /// timeout, `tcp_fin_time` in jiffies (`TCP_LINGER2`, or the namespace's `tcp_fin_timeout`,
    /// at least 3.5 RTOs); 0 otherwise or when unknown.
    pub fin_time: u32,
    /// The socket's cookie (BTF mode): never reused, kept by its timewait socket; 0 when unknown.
    pub cookie: u64,
    /// How a connection ended, on the line that ends it (BTF mode); on a retransmit, with
    /// `EVENT_HAS_RETRANSMIT_DETAIL`, its [`RetransmitDetail`] instead (a retransmit ends
    /// nothing). Sharing the bytes keeps the record, and the state program's stack, as small as
    /// before: on 6.1 the verifier refuses a state program that builds a larger one (E2BIG).
    pub end: End,
}
const _: () = assert!(size_of::<Event>() == 168);

/// Why a segment went out again (`RetransmitDetail::kind`), told from the socket's state, its
/// congestion state (`icsk_ca_state`) and the timer it has pending (`icsk_pending`) at the
/// tracepoint.
/// https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_timer.c (tcp_retransmit_timer)
pub mod retransmit_kind {
    /// The retransmission timer expired: congestion state Loss, no timer pending (it fired).
    pub const RTO: u8 = 1;
    /// A tail loss probe: the loss-probe timer fired (`ICSK_TIME_LOSS_PROBE`).
    pub const TLP: u8 = 2;
    /// Fast retransmit (duplicate ACKs, SACK or RACK): congestion state Recovery.
    pub const FAST: u8 = 3;
    /// Further retransmits of a loss recovery after a timeout, sent as ACKs arrive: congestion
    /// state Loss with a timer pending again.
    pub const LOSS: u8 = 4;
    /// The connect's SYN (state SYN_SENT).
    pub const SYN: u8 = 5;
    /// A SYN-ACK of a connection being accepted.
    pub const SYNACK: u8 = 6;
    /// None of those (a state or timer combination not seen here).
    pub const OTHER: u8 = 7;
}

/// `icsk_ca_state` values (`enum tcp_ca_state`).
pub mod ca_state {
    pub const OPEN: u8 = 0;
    pub const DISORDER: u8 = 1;
    pub const CWR: u8 = 2;
    pub const RECOVERY: u8 = 3;
    pub const LOSS: u8 = 4;
}

/// `icsk_pending` values (`ICSK_TIME_*`).
pub mod icsk_timer {
    pub const RETRANS: u8 = 1;
    pub const LOSS_PROBE: u8 = 5;
}

/// A retransmit as the kernel saw it (BTF mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransmitDetail {
    /// The retransmission timeout in force (`icsk_rto`, jiffies): for an RTO, the timeout that
    /// just expired (the kernel doubles it afterwards); a SYN-ACK's is its request socket's.
    pub rto_jiffies: u32,
    /// The socket's smoothed round-trip time, in microseconds; 0 before any was measured.
    pub srtt_us: u32,
    /// `retransmit_kind::*`.
    pub kind: u8,
    /// The timeouts in a row so far (`icsk_retransmits`; a SYN-ACK's: its request socket's
    /// retransmits, this one included).
    pub attempt: u8,
    /// The exponential backoff's exponent (`icsk_backoff`).
    pub backoff: u8,
    /// `icsk_ca_state` (`ca_state::*`).
    pub ca_state: u8,
    pub _pad: u32,
}
const _: () = assert!(size_of::<RetransmitDetail>() == 16);

impl RetransmitDetail {
    /// Packed into a record's `end` (its first two words; the rest zero).
    pub const fn into_end(self) -> End {
        let mut end = End::ZERO;
        end.bytes_acked = self.rto_jiffies as u64 | (self.srtt_us as u64) << 32;
        end.bytes_received = self.kind as u64
            | (self.attempt as u64) << 8
            | (self.backoff as u64) << 16
            | (self.ca_state as u64) << 24;
        end
    }

    /// What [`Self::into_end`] packed.
    pub const fn from_end(end: &End) -> Self {
        Self {
            rto_jiffies: end.bytes_acked as u32,
            srtt_us: (end.bytes_acked >> 32) as u32,
            kind: end.bytes_received as u8,
            attempt: (end.bytes_received >> 8) as u8,
            backoff: (end.bytes_received >> 16) as u8,
            ca_state: (end.bytes_received >> 24) as u8,
            _pad: 0,
        }
    }

    pub const ZERO: Self = Self {
        rto_jiffies: 0,
        srtt_us: 0,
        kind: 0,
        attempt: 0,
        backoff: 0,
        ca_state: 0,
        _pad: 0,
    };
}

/// A congestion state change as the kernel side saw it (BTF mode): what the socket held when
/// its congestion state was about to change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CongestionDetail {
    /// The retransmission timeout in force (`icsk_rto`, jiffies).
    pub rto_jiffies: u32,
    /// The smoothed round-trip time, in microseconds; 0 before any was measured.
    pub srtt_us: u32,
    /// The congestion window, in segments (`snd_cwnd`), before the change.
    pub cwnd: u32,
    /// The socket's TCP state (`tcp_state::*`).
    pub state: u8,
    /// Timeouts in a row so far (`icsk_retransmits`), and the backoff's exponent.
    pub attempt: u8,
    pub backoff: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<CongestionDetail>() == 16);

impl CongestionDetail {
    /// Packed into a record's `end` (its first two words; the rest zero).
    pub const fn into_end(self) -> End {
        let mut end = End::ZERO;
        end.bytes_acked = self.rto_jiffies as u64 | (self.srtt_us as u64) << 32;
        end.bytes_received = self.cwnd as u64
            | (self.state as u64) << 32
            | (self.attempt as u64) << 40
            | (self.backoff as u64) << 48;
        end
    }

    /// What [`Self::into_end`] packed.
    pub const fn from_end(end: &End) -> Self {
        Self {
            rto_jiffies: end.bytes_acked as u32,
            srtt_us: (end.bytes_acked >> 32) as u32,
            cwnd: end.bytes_received as u32,
            state: (end.bytes_received >> 32) as u8,
            attempt: (end.bytes_received >> 40) as u8,
            backoff: (end.bytes_received >> 48) as u8,
            _pad: 0,
        }
    }
}

/// How a connection ended and what it carried: on its CLOSE line (and on a hand-over to a
/// timewait socket, for the CLOSE userspace writes when that ends). BTF mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct End {
    /// Data bytes the peer acknowledged, and data bytes received (the kernel's counts, which
    /// include the SYN and FIN sequence numbers, less those).
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Since the socket's first transition seen (valid with `EVENT_HAS_SUMMARY`).
    pub lifetime_ns: u64,
    /// Smoothed round-trip time, in microseconds.
    pub srtt_us: u32,
    /// `reason::*`; 0 when not a connection's end.
    pub reason: u16,
    /// The kernel's `enum sk_rst_reason` value plus 1 when a reset was sent; 0 when none or unknown.
    pub rst_reason: u16,
    /// The socket's error (`sk_err`, a positive errno) when it ended; 0 when none.
    pub error: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<End>() == 40);

impl End {
    pub const ZERO: Self = Self {
        bytes_acked: 0,
        bytes_received: 0,
        lifetime_ns: 0,
        srtt_us: 0,
        reason: 0,
        rst_reason: 0,
        error: 0,
        _pad: 0,
    };
}

/// Why a connection ended (`End::reason`).
pub mod reason {
    /// An orderly close: FINs both ways.
    pub const FIN: u16 = 1;
    /// This side sent a reset (closed with unread data, SO_LINGER 0, out of memory, ...).
    pub const RESET_SENT: u16 = 2;
    /// The peer sent a reset (`ECONNRESET`, or `EPIPE` in CLOSE_WAIT).
    pub const RESET_RECEIVED: u16 = 3;
    /// A connect answered with a reset or an ICMP port unreachable (`ECONNREFUSED`).
    pub const REFUSED: u16 = 4;
    /// The handshake, a retransmission, keepalive or the peer's FIN timed out.
    pub const TIMEOUT: u16 = 5;
    /// `EHOSTUNREACH`, `ENETUNREACH` (ICMP errors, at once or after retransmitting).
    pub const UNREACHABLE: u16 = 6;
    /// Another error: `End::error` names it.
    pub const ERROR: u16 = 7;
    /// Closed by its owner before the handshake completed; nothing was sent.
    pub const ABORTED: u16 = 8;
}

/// Linux errno values the kernel side classifies.
pub mod errno {
    pub const EPIPE: u32 = 32;
    pub const EADDRNOTAVAIL: u32 = 99;
    pub const ENETUNREACH: u32 = 101;
    pub const ECONNRESET: u32 = 104;
    pub const ETIMEDOUT: u32 = 110;
    pub const ECONNREFUSED: u32 = 111;
    pub const EHOSTUNREACH: u32 = 113;
}

/// Per-socket state kept by the kernel side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// When the socket entered its current state (`CLOCK_MONOTONIC` ns); 0 when unknown.
    pub since_ns: u64,
    /// BTF mode: the value of `SUCCESSION_EPOCH` when the owner was last checked for having
    /// exited (and handed its sockets to the process it forked).
    pub epoch: u64,
    /// BTF mode: when the owner took the socket (`CLOCK_MONOTONIC` ns): only a process forked
    /// after that holds a copy of it.
    pub owned_ns: u64,
    pub comm: Bytes16,
    pub pid: u32,
    pub retransmits: u32,
    /// tracefs mode: the owner's cgroup v2 id when it was seen.
    pub cgroup_id: u64,
    /// BTF mode: the kernel's `tcp_sock.total_retrans` when last read (at the socket's last
    /// transition or retransmit), so that a failed attempt's share of it is known.
    pub kernel_retrans: u32,
    /// BTF mode: what the kernel added to `total_retrans` for attempts that failed while traced
    /// (it counts an attempt before sending it): taken off the count on the CLOSE line.
    pub failed_retrans: u32,
    /// tracefs mode: `EVENT_COMM_OF_THREAD` when `comm` is a thread's name, else 0. BTF mode:
    /// `SOCKET_ACTIVE_OPEN`.
    pub owner_flags: u32,
    /// BTF mode: the kernel's `enum sk_rst_reason` plus 1 of a reset this socket sent (the
    /// largest value: a reset whose reason this kernel does not pass); 0 when none.
    pub rst_reason: u32,
    /// BTF mode: when the socket's first transition was seen (`CLOCK_MONOTONIC` ns).
    pub born_ns: u64,
    /// BTF mode: the soft error (`sk_err_soft`, a positive errno) an ICMP message left while the
    /// socket connected, seen when the kernel reported it; 0 when none.
    pub soft_err: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SocketState>() == 88);

/// One record of the timewait scan (`iter/tcp`, BTF mode): a timewait socket, or (cookie 0) the
/// clock at the scan's end, `expires` then holding jiffies and `now_ns` nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimewaitRecord {
    pub cookie: u64,
    /// When the timewait socket's timer expires, in jiffies.
    pub expires: u64,
    /// `CLOCK_MONOTONIC` ns (the clock record only).
    pub now_ns: u64,
    /// `tcp_state::FIN_WAIT2` or `TIME_WAIT`.
    pub substate: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<TimewaitRecord>() == 32);

/// One TCP socket of the host as the census (`iter/tcp`, `tcptrace top`) counts it, what
/// `ss -tan` shows: a timewait socket in its substate, a request socket as SYN_RECV.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CensusRecord {
    /// 0 when no one ever took it.
    pub cookie: u64,
    /// A `tcp_state` value.
    pub state: u32,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: [u16; 3],
}
const _: () = assert!(size_of::<CensusRecord>() == 24);

/// A process forked by another (BTF mode's `FORKED` and `SUCCESSORS` values).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forked {
    /// When it was forked (`CLOCK_MONOTONIC` ns).
    pub at_ns: u64,
    /// Its tgid.
    pub pid: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Forked>() == 16);

/// A process holding a socket when tracing began (BTF mode's `HOLDERS` values).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    /// When the iterator saw it hold the socket (`CLOCK_MONOTONIC` ns).
    pub at_ns: u64,
    /// Its name (the thread group leader's comm).
    pub comm: Bytes16,
    /// Its tgid.
    pub pid: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Holder>() == 32);

/// Owner of the listening sockets on one port (tracefs mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerOwner {
    /// The most recent listening socket on the port.
    pub skaddr: u64,
    /// All zero when `pid` is 0.
    pub comm: Bytes16,
    /// 0 when listeners of different owners share the port: no guess.
    pub pid: u32,
    /// Listening sockets open on the port.
    pub listeners: u32,
    /// The owner's cgroup v2 id; 0 when `pid` is 0.
    pub cgroup_id: u64,
    /// `EVENT_COMM_OF_THREAD` when `comm` is a thread's name, else 0.
    pub owner_flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ListenerOwner>() == 48);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `repr(C)` plain integers and byte arrays with explicit padding.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::StateLayout {}
    unsafe impl aya::Pod for super::RetransmitLayout {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::SocketState {}
    unsafe impl aya::Pod for super::ListenerOwner {}
    unsafe impl aya::Pod for super::ContainerFilter {}
    unsafe impl aya::Pod for super::TimewaitRecord {}
    unsafe impl aya::Pod for super::CensusRecord {}
    unsafe impl aya::Pod for super::Holder {}
    unsafe impl aya::Pod for super::ListenDropLayout {}
    unsafe impl aya::Pod for super::ListenDrops {}
}

/// Where a state transition's owner, time in the old state and retransmit count come from. tracefs
/// mode keeps them in a map keyed by the socket's address, an address the kernel reuses once a
/// socket is freed: an entry a missed CLOSE left there belongs to a dead socket. BTF mode keeps
/// them in the socket's own storage, which a child socket copies from its listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `connect()` or `listen()`: the process running now owns the socket.
    Opened,
    /// A child socket a listener accepted (`LISTEN -> SYN_RECV`): the listener's owner, and no
    /// time or count of its own yet, whatever an entry under its address says.
    Accepted,
    /// A socket new to tracing (out of CLOSE), or a later transition with nothing kept: time and
    /// count unknown; tracefs mode knows no owner either (an entry under the address of a socket
    /// leaving CLOSE is a dead socket's).
    New,
    /// A later transition of a socket: what is kept for it.
    Kept,
}

impl Origin {
    /// The origin of `oldstate -> newstate`, with `has_entry` telling whether something is kept
    /// under the socket (a map entry under its address, or its storage). Decided here, whole, so
    /// that a stale entry can never win over a socket's start: a transition out of CLOSE, or a
    /// listener's child's first one, never takes what is kept.
    #[inline(always)]
    pub const fn of(oldstate: u32, newstate: u32, has_entry: bool) -> Self {
        use tcp_state::{CLOSE, LISTEN, SYN_RECV, SYN_SENT};
        if (oldstate == CLOSE && newstate == SYN_SENT) || newstate == LISTEN {
            Self::Opened
        } else if oldstate == LISTEN && newstate == SYN_RECV {
            Self::Accepted
        } else if oldstate == CLOSE || !has_entry {
            Self::New
        } else {
            Self::Kept
        }
    }
}

/// Kernel TCP state numbers (`include/net/tcp_states.h`); the eBPF side acts on a few of them.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::format;

    use super::{CongestionDetail, Origin, RetransmitDetail, tcp_state::*};

    #[test]
    fn a_congestion_detail_round_trips_through_the_end_bytes() {
        let detail = CongestionDetail {
            rto_jiffies: 0xdead_beef,
            srtt_us: 0x0102_0304,
            cwnd: 0xfedc_ba98,
            state: 11,
            attempt: 255,
            backoff: 15,
            _pad: 0,
        };
        assert_eq!(CongestionDetail::from_end(&detail.into_end()), detail);
    }

    #[test]
    fn a_retransmit_detail_round_trips_through_the_end_bytes() {
        let detail = RetransmitDetail {
            rto_jiffies: 0xdead_beef,
            srtt_us: 0x0102_0304,
            kind: 7,
            attempt: 255,
            backoff: 15,
            ca_state: 4,
            _pad: 0,
        };
        assert_eq!(RetransmitDetail::from_end(&detail.into_end()), detail);
    }

    const STATES: [u32; 12] = [
        ESTABLISHED,
        SYN_SENT,
        SYN_RECV,
        FIN_WAIT1,
        FIN_WAIT2,
        TIME_WAIT,
        CLOSE,
        CLOSE_WAIT,
        LAST_ACK,
        LISTEN,
        CLOSING,
        NEW_SYN_RECV,
    ];

    /// Every pair of states, with and without an entry, against what each transition means
    /// (written out here, not derived from `Origin::of`). A socket's start never takes a kept
    /// entry: with a stale one under a reused address (a missed CLOSE), a new accepted socket
    /// would name a dead socket's owner and give a duration it cannot have. Taking the entry
    /// before looking for a listener's child, as tracefs mode once did, fails here.
    #[test]
    fn a_socket_s_start_never_takes_a_kept_entry() {
        for old in STATES {
            for new in STATES {
                for has_entry in [false, true] {
                    let origin = Origin::of(old, new, has_entry);
                    let at = format!("{old} -> {new}, entry {has_entry}");
                    let expected = match (old, new) {
                        // connect(), listen(): whoever runs now.
                        (CLOSE, SYN_SENT) | (_, LISTEN) => Origin::Opened,
                        // A listener's child, cloned in softirq context.
                        (LISTEN, SYN_RECV) => Origin::Accepted,
                        // Out of CLOSE otherwise: a socket new to tracing.
                        (CLOSE, _) => Origin::New,
                        // Within a socket's life: the entry, when there is one.
                        _ if has_entry => Origin::Kept,
                        _ => Origin::New,
                    };
                    assert_eq!(origin, expected, "{at}");
                    if origin == Origin::Kept {
                        assert!(has_entry, "{at}: took an entry that is not there");
                    }
                }
            }
        }
        // The cases the stale-entry defect was about, spelled out.
        assert_eq!(Origin::of(LISTEN, SYN_RECV, true), Origin::Accepted);
        assert_eq!(Origin::of(CLOSE, SYN_SENT, true), Origin::Opened);
        assert_eq!(Origin::of(CLOSE, CLOSE, true), Origin::New);
        // The listener's own close keeps its entry (its time in LISTEN, its owner).
        assert_eq!(Origin::of(LISTEN, CLOSE, true), Origin::Kept);
    }
}
