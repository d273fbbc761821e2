//! BTF mode: programs on the BTF-enabled tracepoints, which receive the `struct sock *` itself.
//! Each socket carries its owner in socket-local storage; the kernel copies a listener's storage
//! to every socket it accepts (`BPF_F_CLONE`), so an accepted socket names the owner of the very
//! listener that accepted it, in whatever network namespace. Storage dies with the socket: no
//! address reuse, no eviction. Struct fields are read at the offsets of the running kernel's BTF
//! (the `OFFSETS` global). Sockets that predate tracing get their holder from `holders`.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_task_btf, bpf_get_socket_cookie, bpf_jiffies64, bpf_probe_read_kernel,
            bpf_seq_write, bpf_sk_storage_get, bpf_skc_to_tcp_sock, bpf_skc_to_tcp_timewait_sock,
        },
    },
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use tcptrace_common::{
    AF_INET, Bytes16, COUNTER_STATE_REPEATS, EVENT_HAS_DURATION, EVENT_HAS_ERR,
    EVENT_HAS_RETRANSMIT_DETAIL, EVENT_HAS_STATE, EVENT_HAS_SUMMARY, End, Event, FILTER_ENDS,
    FILTER_FAILURES, Forked, KERNEL_FIN_TIME, KERNEL_HAS_IPV6, KERNEL_RETRANSMIT_DETAIL,
    KERNEL_RETRANSMIT_ERR, KERNEL_RST_REASON, KIND_RETRANSMIT, KIND_RETRANSMIT_SYNACK, KIND_STATE,
    KIND_TIMEWAIT, KernelOffsets, Origin, RetransmitDetail, SOCKET_ACTIVE_OPEN, SocketState,
    TRACE_RETRANSMITS, TRACE_STATES, TimewaitRecord, ca_state, errno, icsk_timer, reason,
    retransmit_kind, tcp_state,
};

use crate::{
    CONFIG, EXECS, FORKED, OFFSETS, SOCKET_STORAGE, SUCCESSION_EPOCH, SUCCESSORS,
    emit::{Owner, UNKNOWN_OWNER, count, emit, family_wanted, owner_wanted, ports_wanted},
    identity::{identity, identity_wanted},
};

/// A scalar field of a kernel struct at a load-time offset. The verifier knows the struct from
/// BTF and checks the access against it; the offset is a constant of the frozen `.rodata`.
#[inline(always)]
pub unsafe fn field<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: the caller passes a BTF-typed kernel pointer; the verifier checks the access.
    unsafe { base.add(offset as usize).cast::<T>().read_volatile() }
}

/// Sixteen bytes of a kernel struct (an IPv6 address, a command name). Byte arrays are read with
/// the helper: the verifier only allows direct loads as wide as one array element.
#[inline(always)]
pub unsafe fn bytes16(base: *const u8, offset: u32) -> Bytes16 {
    let mut out = Bytes16::ZERO;
    // SAFETY: 16 bytes into a 16-byte buffer; on failure the helper zeroes it.
    unsafe {
        bpf_probe_read_kernel(
            out.0.as_mut_ptr().cast(),
            16,
            base.add(offset as usize).cast(),
        )
    };
    out
}

/// The socket's storage; created when `create` and missing.
#[inline(always)]
pub unsafe fn storage(sk: *mut c_void, create: bool) -> *mut SocketState {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: `sk` is a socket pointer the verifier typed from BTF.
    unsafe {
        bpf_sk_storage_get(
            ptr::addr_of!(SOCKET_STORAGE).cast_mut().cast(),
            sk,
            ptr::null_mut(),
            flags,
        )
    }
    .cast()
}

/// The process running now: its tgid and its name (the thread group leader's comm, as `ps` and
/// `ss -p` show it, not the name of the thread that made the call).
#[inline(always)]
pub fn current_owner(offsets: &KernelOffsets) -> Owner {
    // SAFETY: the helper returns the current task, typed from BTF; group_leader is never NULL.
    let comm = unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        let leader: *const u8 = field(task, offsets.task_group_leader);
        bytes16(leader, offsets.task_comm)
    };
    Owner {
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        comm,
        cgroup_id: 0,
        flags: 0,
    }
}

/// A socket's addresses, ports and family as `sock_common` holds them (the local port from
/// `inet_sock`, which is still set on the way to CLOSE, unlike `skc_num`).
pub struct Endpoints {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: Bytes16,
    pub daddr: Bytes16,
}

/// Reads the endpoints of a TCP socket (`tp` is the same socket as `struct tcp_sock`).
#[inline(always)]
pub unsafe fn endpoints(offsets: &KernelOffsets, sk: *const u8, tp: *const u8) -> Endpoints {
    // SAFETY: BTF-typed socket pointers; the offsets come from this kernel's BTF.
    unsafe {
        let family: u16 = field(sk, offsets.skc_family);
        let sport = u16::from_be(field(tp, offsets.inet_sport));
        let dport = u16::from_be(field(sk, offsets.skc_dport));
        let (saddr, daddr) = addresses(offsets, sk, family);
        Endpoints {
            family,
            sport,
            dport,
            saddr,
            daddr,
        }
    }
}

/// Local and remote address of a socket or request socket (both start with `sock_common`), IPv4
/// in the first four bytes, network order.
#[inline(always)]
unsafe fn addresses(offsets: &KernelOffsets, sk: *const u8, family: u16) -> (Bytes16, Bytes16) {
    // SAFETY: as in `endpoints`.
    unsafe {
        if family == AF_INET || offsets.features & KERNEL_HAS_IPV6 == 0 {
            let word = |offset| {
                core::mem::transmute::<[u32; 4], Bytes16>([field::<u32>(sk, offset), 0, 0, 0])
            };
            (word(offsets.skc_rcv_saddr), word(offsets.skc_daddr))
        } else {
            (
                bytes16(sk, offsets.skc_v6_rcv_saddr),
                bytes16(sk, offsets.skc_v6_daddr),
            )
        }
    }
}

/// The current succession epoch.
#[inline(always)]
pub fn epoch() -> u64 {
    SUCCESSION_EPOCH.get(0).copied().unwrap_or(0)
}

/// The socket's owner, or the process that holds its sockets now that the owner exited: a
/// daemon's listener is made by a process that forks and exits. Followed for a few generations
/// (a double fork); checked again only when some owner has exited since the last check.
#[inline(always)]
pub fn live_owner(state: &mut SocketState) -> Owner {
    let now = epoch();
    if state.epoch != now && state.pid != 0 {
        let (mut pid, mut owned_ns) = (state.pid, state.owned_ns);
        for _ in 0..4 {
            // SAFETY: plain integers.
            match unsafe { SUCCESSORS.get(pid) } {
                // Only a process forked after its parent took the socket holds a copy of it.
                Some(next) if next.at_ns > owned_ns => {
                    pid = next.pid;
                    owned_ns = next.at_ns;
                }
                _ => break,
            }
        }
        state.owned_ns = owned_ns;
        if pid != state.pid {
            // A forked child starts with its parent's comm, unless it exec'd since.
            // SAFETY: plain bytes.
            if let Some(comm) = unsafe { EXECS.get(pid) } {
                state.comm = *comm;
            }
            state.pid = pid;
        }
        state.epoch = now;
    }
    Owner {
        pid: state.pid,
        comm: state.comm,
        cgroup_id: 0,
        flags: 0,
    }
}

/// `sched_process_fork(parent, child)`: remember the newest process each process forked; it
/// holds copies of the parent's sockets.
pub fn forked(ctx: &BtfTracePointContext) {
    let parent: *const u8 = ctx.arg(0);
    let child: *const u8 = ctx.arg(1);
    let offsets = OFFSETS.load();
    // SAFETY: BTF-typed task pointers; offsets from this kernel's BTF.
    let (parent_tgid, child_pid, child_tgid) = unsafe {
        (
            field::<i32>(parent, offsets.task_tgid) as u32,
            field::<i32>(child, offsets.task_pid) as u32,
            field::<i32>(child, offsets.task_tgid) as u32,
        )
    };
    if child_pid != child_tgid {
        // A new thread, not a new process.
        return;
    }
    let forked = Forked {
        at_ns: unsafe { bpf_ktime_get_ns() },
        pid: child_tgid,
        _pad: 0,
    };
    let _ = FORKED.insert(parent_tgid, forked, 0);
    // The pid is in use again: whatever once ran under it is gone.
    let _ = SUCCESSORS.remove(child_tgid);
    let _ = EXECS.remove(child_tgid);
}

/// `sched_process_exec(task, old_pid, bprm)`: the process's new command name, for when it takes
/// over the sockets of the parent that forked it (a launcher that hands a listener to the server
/// it starts).
pub fn executed(ctx: &BtfTracePointContext) {
    let task: *const u8 = ctx.arg(0);
    let offsets = OFFSETS.load();
    // SAFETY: as in `forked`; after exec the task is its process's leader.
    let (tgid, comm) = unsafe {
        (
            field::<i32>(task, offsets.task_tgid) as u32,
            bytes16(task, offsets.task_comm),
        )
    };
    let _ = EXECS.insert(tgid, comm, 0);
}

/// `sched_process_exit(task)`: when a process that forked exits, its newest child becomes the
/// holder of its sockets.
pub fn exited(ctx: &BtfTracePointContext) {
    let task: *const u8 = ctx.arg(0);
    let offsets = OFFSETS.load();
    // SAFETY: as in `forked`; real_parent is never NULL.
    let (pid, tgid, parent_tgid) = unsafe {
        let parent: *const u8 = field(task, offsets.task_real_parent);
        (
            field::<i32>(task, offsets.task_pid) as u32,
            field::<i32>(task, offsets.task_tgid) as u32,
            field::<i32>(parent, offsets.task_tgid) as u32,
        )
    };
    if pid != tgid {
        // A thread other than the leader: the process lives on.
        return;
    }
    // A child that dies hands nothing over through its parent.
    // SAFETY: plain u32 values.
    if unsafe { FORKED.get(parent_tgid) }.is_some_and(|f| f.pid == tgid) {
        let _ = FORKED.remove(parent_tgid);
    }
    let Some(&child) = (unsafe { FORKED.get(tgid) }) else {
        return;
    };
    let _ = SUCCESSORS.insert(tgid, child, 0);
    let _ = FORKED.remove(tgid);
    if let Some(counter) = SUCCESSION_EPOCH.get_ptr_mut(0) {
        // SAFETY: the map's only value. Two CPUs adding at once may add once: the epoch changes
        // either way, which is all a reader needs.
        unsafe { *counter += 1 };
    }
}

/// `inet_sock_set_state(sk, oldstate, newstate)`.
pub fn state(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let sk: *mut c_void = ctx.arg(0);
    // NULL unless a full TCP socket: SCTP, MPTCP and others fire this tracepoint too.
    // SAFETY: `sk` comes typed from the tracepoint.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    let config = CONFIG.load();
    let filters = config.filters;
    let offsets = OFFSETS.load();
    // SAFETY: as above.
    let family: u16 = unsafe { field(sk as *const u8, offsets.skc_family) };
    if !family_wanted(filters, family) {
        return Ok(());
    }
    let oldstate = ctx.arg::<i32>(1) as u32;
    let newstate = ctx.arg::<i32>(2) as u32;
    if oldstate == newstate {
        // Set again, not entered (close() after shutdown() while the FIN waits behind unsent
        // data): no line, and the time in the state runs on.
        count(COUNTER_STATE_REPEATS);
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };

    // connect() and listen() run in the owner's context: the owner is whoever runs now. Every
    // other transition may run in softirq or timer context ("current" is then whoever the CPU
    // interrupted; on loopback, the peer) and takes the owner from the socket's storage. A child
    // socket's storage is its listener's, copied before this first transition of the child.
    // https://elixir.bootlin.com/linux/v6.18/source/net/core/bpf_sk_storage.c (bpf_sk_storage_clone)
    // SAFETY: `sk` as above; a storage value is this socket's, and the kernel holds the socket
    // lock across a transition.
    let stored = unsafe { storage(sk, newstate != tcp_state::CLOSE) };
    let origin = Origin::of(oldstate, newstate, !stored.is_null());
    let opened = origin == Origin::Opened;
    if stored.is_null() && newstate != tcp_state::CLOSE {
        warn!(
            ctx,
            "no socket storage could be created: this socket's owner is not kept"
        );
    }
    // What a socket carries from one transition to the next; a new socket (an accepted one
    // included: its storage is its listener's copy) starts afresh.
    let mut kept = Kept {
        active_open: opened && newstate == tcp_state::SYN_SENT,
        ..Kept::default()
    };
    let owner = if opened {
        current_owner(&offsets)
    } else if let Some(state) = unsafe { stored.as_mut() } {
        let owner = live_owner(state);
        if origin == Origin::Kept {
            kept = Kept {
                since_ns: state.since_ns,
                retransmits: state.retransmits,
                failed_retrans: state.failed_retrans,
                rst_reason: state.rst_reason,
                born_ns: state.born_ns,
                active_open: state.owner_flags & SOCKET_ACTIVE_OPEN != 0,
                soft_err: state.soft_err,
            };
        }
        owner
    } else {
        UNKNOWN_OWNER
    };
    let Kept {
        since_ns,
        retransmits,
        failed_retrans,
        rst_reason,
        born_ns,
        active_open,
        soft_err,
    } = kept;
    // The first transition seen starts the connection's lifetime.
    let born_ns = if born_ns == 0 { now } else { born_ns };
    // SAFETY: `tp` is the BTF-typed tcp_sock of this socket.
    let kernel_retrans = unsafe { field::<u32>(tp, offsets.tcp_total_retrans) };
    if let Some(state) = unsafe { stored.as_mut() } {
        let owned_ns = if opened { now } else { state.owned_ns };
        *state = SocketState {
            since_ns: now,
            epoch: epoch(),
            owned_ns,
            comm: owner.comm,
            pid: owner.pid,
            retransmits,
            cgroup_id: 0,
            kernel_retrans,
            failed_retrans,
            owner_flags: if active_open { SOCKET_ACTIVE_OPEN } else { 0 },
            rst_reason,
            born_ns,
            // Only SYN_SENT keeps it: the connect's soft error is what its CLOSE names.
            soft_err: if newstate == tcp_state::SYN_SENT {
                soft_err
            } else {
                0
            },
            _pad: 0,
        };
    }

    if filters & TRACE_STATES == 0 || !owner_wanted(filters, owner.pid) {
        return Ok(());
    }
    // How the connection ended, when it did: a CLOSE, or a hand-over to a timewait socket
    // (FIN_WAIT2 or CLOSING to CLOSE after an orderly close: the connection lives on).
    let ended = newstate == tcp_state::CLOSE && oldstate != tcp_state::LISTEN;
    let mut kind = KIND_STATE;
    let mut entered = newstate;
    let mut end = End::ZERO;
    let mut fin_time = 0;
    if ended {
        // SAFETY: BTF-typed socket pointers; offsets from this kernel's BTF.
        end = unsafe {
            ending(
                &offsets,
                sk as *const u8,
                tp,
                oldstate,
                rst_reason,
                active_open,
                soft_err,
            )
        };
        end.lifetime_ns = now.saturating_sub(born_ns);
        if end.reason == reason::FIN
            && (oldstate == tcp_state::FIN_WAIT2 || oldstate == tcp_state::CLOSING)
        {
            kind = KIND_TIMEWAIT;
            // The timewait socket starts in TIME_WAIT once the peer's FIN is in (CLOSING, or
            // FIN_WAIT2 with `SOCK_DONE`); in FIN_WAIT2 while the peer has not closed.
            // SAFETY: as above.
            let flags: u64 = unsafe { field(sk as *const u8, offsets.sk_flags) };
            entered = if oldstate == tcp_state::CLOSING || flags & SOCK_DONE != 0 {
                tcp_state::TIME_WAIT
            } else {
                tcp_state::FIN_WAIT2
            };
            if entered == tcp_state::FIN_WAIT2 && offsets.features & KERNEL_FIN_TIME != 0 {
                // SAFETY: as above.
                fin_time = unsafe { fin_timeout(&offsets, sk as *const u8, tp) };
            }
        }
    }
    if filters & FILTER_ENDS != 0 {
        // Only the lines that end connections; with `--failures`, those not ended by a FIN (a
        // hand-over still goes up: its end may be a failure, seen by the timewait scan).
        if !ended
            || (filters & FILTER_FAILURES != 0 && kind == KIND_STATE && end.reason == reason::FIN)
        {
            return Ok(());
        }
    }
    // The CLOSE line carries the kernel's own count: it covers retransmits from before tracing
    // began, and an accepted socket's SYN-ACK retransmits (copied from its request socket). The
    // kernel counts an attempt before sending it: what it counted for attempts seen failing is
    // taken off.
    // https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_minisocks.c (tcp_create_openreq_child)
    // https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_output.c (__tcp_retransmit_skb)
    let retransmits = if newstate == tcp_state::CLOSE {
        kernel_retrans.saturating_sub(failed_retrans)
    } else {
        retransmits
    };
    // SAFETY: as above.
    let ends = unsafe { endpoints(&offsets, sk as *const u8, tp) };
    if !ports_wanted(filters, ends.sport, ends.dport) {
        return Ok(());
    }
    // SAFETY: as above.
    let id = unsafe { identity(&offsets, sk as *const u8) };
    if !identity_wanted(filters, &offsets, &id) {
        return Ok(());
    }
    let mut flags = if since_ns != 0 { EVENT_HAS_DURATION } else { 0 };
    if ended {
        flags |= EVENT_HAS_SUMMARY;
    }
    emit(
        &config,
        Event {
            ts_ns: now,
            skaddr: sk as u64,
            duration_ns: now.saturating_sub(since_ns),
            saddr: ends.saddr,
            daddr: ends.daddr,
            comm: owner.comm,
            pid: owner.pid,
            retransmits,
            err: 0,
            kind,
            flags,
            family: ends.family,
            sport: ends.sport,
            dport: ends.dport,
            oldstate,
            newstate: entered,
            _pad: 0,
            cgroup_id: id.cgroup_id,
            netns: id.netns,
            fin_time,
            // An accepted socket's first transition runs while the kernel clones it from its
            // listener: older kernels (6.1) have copied the listener's cookie by then.
            // SAFETY: `sk` as above.
            cookie: if origin == Origin::Accepted {
                0
            } else {
                unsafe { bpf_get_socket_cookie(sk) }
            },
            end,
        },
    );
    Ok(())
}

/// `tcp_fin_time`: how long the timewait socket a connection is handed to in FIN_WAIT2 waits for
/// the peer's FIN (jiffies), from the socket's `TCP_LINGER2` or its namespace's
/// `tcp_fin_timeout`, at least 3.5 RTOs. Userspace judges by it whether a FIN_WAIT2 timewait
/// socket no scan saw timed out.
/// https://elixir.bootlin.com/linux/v6.18/source/include/net/tcp.h (tcp_fin_time)
#[inline(always)]
unsafe fn fin_timeout(offsets: &KernelOffsets, sk: *const u8, tp: *const u8) -> u32 {
    // SAFETY: BTF-typed socket pointers, and the socket's namespace; offsets from this kernel's
    // BTF.
    unsafe {
        let mut timeout: i32 = field(tp, offsets.tcp_linger2);
        if timeout == 0 {
            let net: *const u8 = field(sk, offsets.skc_net);
            timeout = field(net, offsets.net_fin_timeout);
        }
        let rto: u32 = field(tp, offsets.icsk_rto);
        let floor = ((rto << 2) - (rto >> 1)) as i32;
        timeout.max(floor).max(0) as u32
    }
}

/// What a socket's storage carries from one transition to the next.
#[derive(Default)]
struct Kept {
    since_ns: u64,
    retransmits: u32,
    failed_retrans: u32,
    rst_reason: u32,
    born_ns: u64,
    active_open: bool,
    soft_err: u32,
}

/// `sock_flags` bit `SOCK_DONE`: the peer's FIN arrived (`tcp_fin`).
const SOCK_DONE: u64 = 1 << 1;

/// Why a connection ended, read at its transition to CLOSE, and what it carried. The kernel sets
/// `sk_err` before it closes a socket for an error (`tcp_done_with_error`, `tcp_write_err`,
/// `tcp_v4_err`), so an error is known here. A reset this socket sent before (out of memory,
/// keepalive, `tcp_abort`) was kept by `reset_sent`. The kernel closes a socket that drops unread
/// data, or disconnects it (SO_LINGER 0), *before* it sends the reset: a socket leaving a state
/// where a reset is due (`tcp_need_reset`) with no error is one of those, its reason read from
/// what was left unread, as `__tcp_close` decides it.
/// An ICMP error that reaches a connecting socket while its owner holds it (a reject processed on
/// the same CPU before connect() returns) is kept as a soft error (`sk_err_soft`) and ends
/// nothing: the owner's close then finds `sk_err` 0, and the SYN retries' timeout ETIMEDOUT when
/// getsockopt(SO_ERROR) took the soft error first. A SYN_SENT socket closing with either takes
/// the soft error, read now or kept by `error_reported`.
/// https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c (__tcp_close, tcp_disconnect)
/// https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_ipv4.c (tcp_v4_err)
#[inline(always)]
unsafe fn ending(
    offsets: &KernelOffsets,
    sk: *const u8,
    tp: *const u8,
    oldstate: u32,
    rst_reason: u32,
    active_open: bool,
    soft_err: u32,
) -> End {
    // SAFETY: BTF-typed socket pointers; offsets from this kernel's BTF.
    let (mut error, bytes_acked, bytes_received, srtt, flags) = unsafe {
        (
            field::<i32>(sk, offsets.sk_err).max(0) as u32,
            field::<u64>(tp, offsets.tcp_bytes_acked),
            field::<u64>(tp, offsets.tcp_bytes_received),
            field::<u32>(tp, offsets.tcp_srtt_us),
            field::<u64>(sk, offsets.sk_flags),
        )
    };
    if oldstate == tcp_state::SYN_SENT && (error == 0 || error == errno::ETIMEDOUT) {
        // SAFETY: as above.
        let soft = unsafe { field::<i32>(sk, offsets.sk_err_soft) }.max(0) as u32;
        // The one kept when the kernel reported it, in case getsockopt(SO_ERROR) took it since
        // (the SYN retries' timeout then says ETIMEDOUT, the owner's close nothing).
        let soft = if soft != 0 { soft } else { soft_err };
        if soft != 0 {
            error = soft;
        }
    }
    // The peer's FIN takes a sequence number but is no data.
    let fin_in = u32::from(flags & SOCK_DONE != 0);
    let mut end = End {
        bytes_acked,
        bytes_received,
        srtt_us: srtt >> 3,
        rst_reason: rst_reason.min(u32::from(u16::MAX)) as u16,
        error,
        ..End::ZERO
    };
    end.reason = match error {
        errno::ECONNREFUSED => reason::REFUSED,
        errno::ECONNRESET | errno::EPIPE => reason::RESET_RECEIVED,
        errno::ETIMEDOUT => reason::TIMEOUT,
        errno::EHOSTUNREACH | errno::ENETUNREACH => reason::UNREACHABLE,
        _ if rst_reason != 0 => reason::RESET_SENT,
        0 => match oldstate {
            tcp_state::SYN_SENT => {
                // A connect that never got a local port (every port in use) fails in
                // `tcp_v4_connect` after SYN_SENT, its error returned, not kept.
                // SAFETY: as above.
                if unsafe { field::<u16>(tp, offsets.inet_sport) } == 0 {
                    end.error = errno::EADDRNOTAVAIL;
                    reason::ERROR
                } else {
                    reason::ABORTED
                }
            }
            tcp_state::ESTABLISHED
            | tcp_state::CLOSE_WAIT
            | tcp_state::FIN_WAIT1
            | tcp_state::SYN_RECV => {
                // SAFETY: as above.
                let (rcv_nxt, copied_seq) = unsafe {
                    (
                        field::<u32>(tp, offsets.tcp_rcv_nxt),
                        field::<u32>(tp, offsets.tcp_copied_seq),
                    )
                };
                let unread = rcv_nxt.wrapping_sub(copied_seq).wrapping_sub(fin_in);
                end.rst_reason = if unread != 0 && unread < 1 << 31 {
                    offsets.rst_abort_on_close
                } else {
                    offsets.rst_state
                } as u16;
                reason::RESET_SENT
            }
            _ => reason::FIN,
        },
        _ => reason::ERROR,
    };
    // Data bytes: the kernel's counts include our SYN (when we connected) and our FIN once the
    // peer acknowledged them (an orderly close from LAST_ACK, FIN_WAIT2 or CLOSING), and the
    // peer's FIN.
    let syn_out = u64::from(active_open && bytes_acked != 0);
    let fin_out = u64::from(
        end.reason == reason::FIN
            && matches!(
                oldstate,
                tcp_state::LAST_ACK | tcp_state::FIN_WAIT2 | tcp_state::CLOSING
            ),
    );
    end.bytes_acked = bytes_acked.saturating_sub(syn_out + fin_out);
    end.bytes_received = bytes_received.saturating_sub(u64::from(fin_in));
    end
}

/// `inet_sk_error_report(sk)`: the kernel reports an error to the socket's owner, a soft one too
/// (`sk_err` 0). A connecting socket keeps its soft error for its CLOSE line: the owner may take
/// it with getsockopt(SO_ERROR) before it closes.
pub fn error_reported(ctx: &BtfTracePointContext) {
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` comes typed from the tracepoint; NULL unless a full TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    if tp.is_null() {
        return;
    }
    let offsets = OFFSETS.load();
    // SAFETY: BTF-typed socket pointer; offsets from this kernel's BTF.
    let (state, error, soft) = unsafe {
        (
            field::<u8>(sk as *const u8, offsets.skc_state),
            field::<i32>(sk as *const u8, offsets.sk_err),
            field::<i32>(sk as *const u8, offsets.sk_err_soft),
        )
    };
    if u32::from(state) != tcp_state::SYN_SENT || error != 0 || soft <= 0 {
        return;
    }
    // SAFETY: as in `reset_sent`.
    if let Some(state) = unsafe { storage(sk, false).as_mut() } {
        state.soft_err = soft as u32;
    }
}

/// `tcp_send_reset(sk, skb[, reason])`: a socket that sends a reset keeps the kernel's reason
/// for its CLOSE line. NULL or not a full socket (a reply for no socket, a timewait socket):
/// nothing to keep.
pub fn reset_sent(ctx: &BtfTracePointContext) {
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return;
    }
    let offsets = OFFSETS.load();
    // SAFETY: `sk` is typed from the tracepoint; the helper returns NULL for other than full
    // sockets.
    if let Some(state) = unsafe { storage(sk, false).as_mut() } {
        state.rst_reason = if offsets.features & KERNEL_RST_REASON != 0 {
            ctx.arg::<u32>(2).saturating_add(1)
        } else {
            u32::from(u16::MAX)
        };
    }
}

/// The context of an `iter/tcp` program (`struct bpf_iter__tcp`).
#[repr(C)]
pub struct TcpIterContext {
    pub meta: *const u8,
    pub sk_common: *const c_void,
    pub uid: u32,
}

/// Writes `record` to an iterator's output. `meta` is the iterator's `struct bpf_iter_meta`,
/// whose first field is the seq_file.
#[inline(always)]
pub unsafe fn seq_write<T>(meta: *const u8, record: &T) {
    // SAFETY: the caller passes the iterator context's `meta`; `record` is `size_of::<T>()` bytes.
    unsafe {
        let seq: *mut c_void = field(meta, 0);
        bpf_seq_write(
            seq.cast(),
            ptr::from_ref(record).cast(),
            size_of::<T>() as u32,
        );
    }
}

/// One TCP socket of the host, timewait sockets included: for each timewait socket whose cookie
/// was ever taken, its cookie, substate and timer expiry go to the iterator's output; at the end,
/// the clock (jiffies and nanoseconds) that userspace reads the expiries against.
pub fn timewait_scan(ctx: *const TcpIterContext) -> Result<(), ()> {
    // SAFETY: the iterator's context, read as the kernel lays it out.
    let (meta, skc) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    let mut record = TimewaitRecord::default();
    if skc.is_null() {
        // SAFETY: no arguments.
        unsafe {
            record.expires = bpf_jiffies64();
            record.now_ns = bpf_ktime_get_ns();
        }
    } else {
        let offsets = OFFSETS.load();
        // SAFETY: a BTF-typed socket pointer; offsets from this kernel's BTF.
        let state: u8 = unsafe { field(skc as *const u8, offsets.skc_state) };
        if u32::from(state) != tcp_state::TIME_WAIT {
            return Ok(());
        }
        // SAFETY: as above; NULL unless a TCP timewait socket.
        let tw = unsafe { bpf_skc_to_tcp_timewait_sock(skc.cast_mut()) } as *const u8;
        if tw.is_null() {
            return Ok(());
        }
        // SAFETY: as above.
        unsafe {
            record.cookie = field(tw, offsets.skc_cookie);
            if record.cookie == 0 {
                // Never traced: tcptrace takes the cookie of every socket it reports.
                return Ok(());
            }
            record.substate = u32::from(field::<u8>(tw, offsets.tw_substate));
            record.expires = field(tw, offsets.tw_expires);
        }
    }
    // SAFETY: the iterator's own `meta`.
    unsafe { seq_write(meta, &record) };
    Ok(())
}

/// `tcp_retransmit_skb(sk, skb[, err])`: a segment (data, SYN or FIN) sent again. Since 2025 it
/// also fires for attempts that failed (`err` not 0): only segments that went out are counted.
pub fn retransmit(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let config = CONFIG.load();
    let filters = config.filters;
    if filters & TRACE_RETRANSMITS == 0 {
        return Ok(());
    }
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` comes typed from the tracepoint.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    let offsets = OFFSETS.load();
    let has_err = offsets.features & KERNEL_RETRANSMIT_ERR != 0;
    let err = if has_err { ctx.arg::<i32>(2) } else { 0 };
    // SAFETY: as above.
    let ends = unsafe { endpoints(&offsets, sk as *const u8, tp) };
    if !family_wanted(filters, ends.family) {
        return Ok(());
    }
    let state: u8 = unsafe { field(sk as *const u8, offsets.skc_state) };
    let has_detail = offsets.features & KERNEL_RETRANSMIT_DETAIL != 0;
    let retransmit = if has_detail {
        // SAFETY: `tp` is the BTF-typed tcp_sock of this socket.
        unsafe { retransmit_detail(&offsets, tp, state) }
    } else {
        RetransmitDetail::ZERO
    };
    // SAFETY: as in `state`.
    let stored = unsafe { storage(sk, false) };
    let (owner, retransmits) = match unsafe { stored.as_mut() } {
        Some(stored) => {
            // The kernel's count after this attempt. Where the tracepoint has `err`, it fires
            // for every attempt, and only attempts grow the count (but for a fast-open
            // listener's SYN-ACKs): the growth since the last look is this attempt's share, 0
            // for one that failed before being counted (no route, no memory, ...).
            // SAFETY: `tp` is the BTF-typed tcp_sock of this socket.
            let kernel_retrans = unsafe { field::<u32>(tp, offsets.tcp_total_retrans) };
            if err == 0 {
                stored.retransmits += 1;
            } else {
                stored.failed_retrans = stored
                    .failed_retrans
                    .saturating_add(kernel_retrans.saturating_sub(stored.kernel_retrans));
            }
            stored.kernel_retrans = kernel_retrans;
            (live_owner(stored), stored.retransmits)
        }
        None => (UNKNOWN_OWNER, 0),
    };
    if !owner_wanted(filters, owner.pid) || !ports_wanted(filters, ends.sport, ends.dport) {
        return Ok(());
    }
    // SAFETY: as above.
    let id = unsafe { identity(&offsets, sk as *const u8) };
    if !identity_wanted(filters, &offsets, &id) {
        return Ok(());
    }
    emit(
        &config,
        Event {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            skaddr: sk as u64,
            duration_ns: 0,
            saddr: ends.saddr,
            daddr: ends.daddr,
            comm: owner.comm,
            pid: owner.pid,
            retransmits,
            err,
            kind: KIND_RETRANSMIT,
            flags: EVENT_HAS_STATE
                | if has_err { EVENT_HAS_ERR } else { 0 }
                | if has_detail {
                    EVENT_HAS_RETRANSMIT_DETAIL
                } else {
                    0
                },
            family: ends.family,
            sport: ends.sport,
            dport: ends.dport,
            oldstate: u32::from(state),
            newstate: 0,
            _pad: 0,
            cgroup_id: id.cgroup_id,
            netns: id.netns,
            fin_time: 0,
            // SAFETY: `sk` as above.
            cookie: unsafe { bpf_get_socket_cookie(sk) },
            end: retransmit.into_end(),
        },
    );
    Ok(())
}

/// Why a segment goes out again, the timeout in force and the attempt, as the socket shows
/// them at the tracepoint (the rules checked on 6.18 are in `retransmit_kind`'s docs).
#[inline(always)]
unsafe fn retransmit_detail(offsets: &KernelOffsets, tp: *const u8, state: u8) -> RetransmitDetail {
    // SAFETY: the caller passes the BTF-typed tcp_sock; offsets from this kernel's BTF.
    let (rto, ca, attempt, pending, backoff, srtt) = unsafe {
        (
            field::<u32>(tp, offsets.icsk_rto),
            field::<u8>(tp, offsets.icsk_ca_state) & 0x1f,
            field::<u8>(tp, offsets.icsk_retransmits),
            field::<u8>(tp, offsets.icsk_pending),
            field::<u8>(tp, offsets.icsk_backoff),
            field::<u32>(tp, offsets.tcp_srtt_us),
        )
    };
    let kind = match u32::from(state) {
        tcp_state::SYN_SENT => retransmit_kind::SYN,
        // A fast-open server's SYN-ACK, from the full socket.
        tcp_state::SYN_RECV => retransmit_kind::SYNACK,
        _ => match (ca, pending) {
            (ca_state::OPEN | ca_state::CWR, icsk_timer::LOSS_PROBE) => retransmit_kind::TLP,
            (ca_state::LOSS, 0) => retransmit_kind::RTO,
            (ca_state::LOSS, _) => retransmit_kind::LOSS,
            (ca_state::RECOVERY, _) => retransmit_kind::FAST,
            _ => retransmit_kind::OTHER,
        },
    };
    RetransmitDetail {
        rto_jiffies: rto,
        srtt_us: srtt >> 3,
        kind,
        attempt,
        backoff,
        ca_state: ca,
        _pad: 0,
    }
}

/// `tcp_retransmit_synack(sk, req)`: the listener `sk` sent a SYN-ACK again for the request
/// socket `req`, whose addresses and ports are its `sock_common`'s.
pub fn retransmit_synack(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let config = CONFIG.load();
    let filters = config.filters;
    if filters & TRACE_RETRANSMITS == 0 {
        return Ok(());
    }
    let sk: *mut c_void = ctx.arg(0);
    let req: *const u8 = ctx.arg(1);
    let offsets = OFFSETS.load();
    // SAFETY: BTF-typed pointers from the tracepoint.
    let family: u16 = unsafe { field(req, offsets.skc_family) };
    if !family_wanted(filters, family) {
        return Ok(());
    }
    let sport: u16 = unsafe { field(req, offsets.skc_num) };
    let dport = u16::from_be(unsafe { field(req, offsets.skc_dport) });
    // SAFETY: as in `state`.
    let owner = match unsafe { storage(sk, false).as_mut() } {
        Some(listener) => live_owner(listener),
        None => UNKNOWN_OWNER,
    };
    if !owner_wanted(filters, owner.pid) || !ports_wanted(filters, sport, dport) {
        return Ok(());
    }
    // SAFETY: as above; the request socket's namespace and cgroup are its listener's.
    let id = unsafe { identity(&offsets, sk as *const u8) };
    if !identity_wanted(filters, &offsets, &id) {
        return Ok(());
    }
    let (saddr, daddr) = unsafe { addresses(&offsets, req, family) };
    let has_detail = offsets.features & KERNEL_RETRANSMIT_DETAIL != 0;
    let synack = if has_detail {
        // The request socket's timer doubles its initial timeout on each retransmit
        // (`reqsk_timer_handler`); `num_retrans` grows after the tracepoint.
        // SAFETY: as above.
        let (timeout, sent) = unsafe {
            (
                field::<u32>(req, offsets.req_timeout),
                field::<u8>(req, offsets.req_num_retrans),
            )
        };
        RetransmitDetail {
            rto_jiffies: timeout.checked_shl(u32::from(sent)).unwrap_or(u32::MAX),
            kind: retransmit_kind::SYNACK,
            attempt: sent.saturating_add(1),
            backoff: sent,
            ..RetransmitDetail::ZERO
        }
    } else {
        RetransmitDetail::ZERO
    };
    emit(
        &config,
        Event {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            skaddr: sk as u64,
            duration_ns: 0,
            saddr,
            daddr,
            comm: owner.comm,
            pid: owner.pid,
            retransmits: 0,
            err: 0,
            kind: KIND_RETRANSMIT_SYNACK,
            flags: EVENT_HAS_STATE
                | if has_detail {
                    EVENT_HAS_RETRANSMIT_DETAIL
                } else {
                    0
                },
            family,
            sport,
            dport,
            oldstate: tcp_state::SYN_RECV,
            newstate: 0,
            _pad: 0,
            cgroup_id: id.cgroup_id,
            netns: id.netns,
            fin_time: 0,
            cookie: 0,
            end: synack.into_end(),
        },
    );
    Ok(())
}
