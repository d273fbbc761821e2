//! BTF mode: the process that holds each socket, as `ss -tnp` lists it, for sockets that predate
//! tracing and for sockets whose holder changes (an accept in a worker, a fork and close as in
//! PostgreSQL's postmaster or sshd, a descriptor passed with SCM_RIGHTS).
//!
//! At start, two iterators: `iter/task_file` walks every open file of every process and records
//! which process holds each TCP socket in `HOLDERS`, by socket address (its socket pointer is
//! untrusted there: only direct loads, no helper may take it); `iter/tcp`, run once per network
//! namespace, hands the same sockets as trusted pointers and moves each holder into the socket's
//! storage. While tracing, every receive on a TCP socket (`sock_recv_length`, Linux 6.3+) makes
//! the process doing it the socket's holder when it is not already: only a process holding the
//! socket can read from it. Receives only: each program run costs every send or receive of the
//! host about 100 ns, and a server reads each connection before it answers on it.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_socket_cookie, bpf_skc_to_tcp_sock, bpf_sock_from_file},
    },
    programs::BtfTracePointContext,
};
use tcptrace_common::{
    AF_INET, AF_INET6, End, Event, Holder, KIND_SNAPSHOT, TRACE_SNAPSHOT, tcp_state,
};

use crate::{
    CONFIG, HOLDERS, OFFSETS,
    btf::{TcpIterContext, bytes16, current_owner, endpoints, epoch, field, seq_write, storage},
    emit::{family_wanted, owner_wanted, ports_wanted},
    identity::{identity, identity_wanted},
};

const SOCK_STREAM: u16 = 1;
const IPPROTO_TCP: u16 = 6;

/// The context of an `iter/task_file` program (`struct bpf_iter__task_file`).
#[repr(C)]
pub struct TaskFileContext {
    meta: *const u8,
    task: *const u8,
    fd: u32,
    file: *mut c_void,
}

/// One open file of one process: when it is a TCP socket, the process is recorded as its holder
/// (the first one seen, when several processes hold it).
pub fn record_holder(ctx: *const TaskFileContext) -> Result<(), ()> {
    // SAFETY: the iterator's context, read as the kernel lays it out.
    let (task, file) = unsafe { ((*ctx).task, (*ctx).file) };
    if task.is_null() || file.is_null() {
        return Ok(());
    }
    // SAFETY: `file` is a BTF-typed file pointer; NULL unless it is a socket.
    let socket = unsafe { bpf_sock_from_file(file.cast()) } as *const u8;
    if socket.is_null() {
        return Ok(());
    }
    let offsets = OFFSETS.load();
    // SAFETY: direct loads, which the verifier allows (and guards) on an untrusted pointer;
    // offsets from this kernel's BTF.
    let (sk, family, kind, protocol, state) = unsafe {
        let sk: *const u8 = field(socket, offsets.socket_sk);
        if sk.is_null() {
            return Ok(());
        }
        (
            sk,
            field::<u16>(sk, offsets.skc_family),
            field::<u16>(sk, offsets.sk_type),
            field::<u16>(sk, offsets.sk_protocol),
            u32::from(field::<u8>(sk, offsets.skc_state)),
        )
    };
    if (family != AF_INET && family != AF_INET6) || kind != SOCK_STREAM || protocol != IPPROTO_TCP {
        return Ok(());
    }
    // A socket never connected nor listening is in no table the TCP iterator walks, and its first
    // transition (connect, listen) names whoever makes it.
    if state == tcp_state::CLOSE {
        return Ok(());
    }
    // SAFETY: as above; group_leader is never NULL.
    let holder = unsafe {
        let leader: *const u8 = field(task, offsets.task_group_leader);
        Holder {
            at_ns: bpf_ktime_get_ns(),
            comm: bytes16(leader, offsets.task_comm),
            pid: field::<i32>(task, offsets.task_tgid) as u32,
            _pad: 0,
        }
    };
    let _ = HOLDERS.insert(&(sk as u64), &holder, u64::from(BPF_NOEXIST));
    Ok(())
}

/// One TCP socket of this network namespace: when `HOLDERS` names a process holding it and its
/// storage has no owner yet, that process becomes its owner. With `--snapshot`, each such socket
/// is written to the iterator's output as a `KIND_SNAPSHOT` record.
pub fn take_holder(ctx: *const TcpIterContext) -> Result<(), ()> {
    // SAFETY: the iterator's context, read as the kernel lays it out.
    let (meta, skc) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if skc.is_null() {
        return Ok(());
    }
    // SAFETY: a BTF-typed socket pointer; NULL unless a full TCP socket (not timewait, not a
    // request socket).
    let tp = unsafe { bpf_skc_to_tcp_sock(skc.cast_mut()) } as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    let key = tp as u64;
    // SAFETY: a plain value, copied out before the entry goes.
    let Some(holder) = (unsafe { HOLDERS.get(&key) }).copied() else {
        return Ok(());
    };
    let _ = HOLDERS.remove(&key);
    let sk = tp.cast_mut().cast::<c_void>();
    // SAFETY: `sk` as above; the iterator holds the socket's lock.
    let Some(stored) = (unsafe { storage(sk, true).as_mut() }) else {
        return Ok(());
    };
    if stored.pid == 0 {
        stored.epoch = epoch();
        // It held the socket then; what it forked before may not.
        stored.owned_ns = holder.at_ns;
        stored.pid = holder.pid;
        stored.comm = holder.comm;
    }

    let config = CONFIG.load();
    let filters = config.filters;
    if filters & TRACE_SNAPSHOT == 0 || !owner_wanted(filters, stored.pid) {
        return Ok(());
    }
    let offsets = OFFSETS.load();
    // SAFETY: BTF-typed pointers; offsets from this kernel's BTF.
    let ends = unsafe { endpoints(&offsets, tp, tp) };
    if !family_wanted(filters, ends.family) || !ports_wanted(filters, ends.sport, ends.dport) {
        return Ok(());
    }
    let id = unsafe { identity(&offsets, tp) };
    if !identity_wanted(filters, &offsets, &id) {
        return Ok(());
    }
    let state = u32::from(unsafe { field::<u8>(tp, offsets.skc_state) });
    let event = Event {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr: key,
        duration_ns: 0,
        saddr: ends.saddr,
        daddr: ends.daddr,
        comm: stored.comm,
        pid: stored.pid,
        retransmits: stored.retransmits,
        err: 0,
        kind: KIND_SNAPSHOT,
        flags: 0,
        family: ends.family,
        sport: ends.sport,
        dport: ends.dport,
        oldstate: state,
        newstate: state,
        _pad: 0,
        cgroup_id: id.cgroup_id,
        netns: id.netns,
        fin_time: 0,
        // SAFETY: `sk` as above.
        cookie: unsafe { bpf_get_socket_cookie(sk) },
        end: End::ZERO,
    };
    // SAFETY: the iterator's own `meta`.
    unsafe { seq_write(meta, &event) };
    Ok(())
}

/// `sock_recv_length(sk, ret, flags)`: a process receives from a socket (or tries to: `ret` may be
/// an error such as EAGAIN), so it holds it. When the socket's storage names another process, this
/// one becomes its holder. Sockets without storage (never seen by tracing: in a namespace the
/// iterator did not reach) get it here.
pub fn used(ctx: &BtfTracePointContext) {
    let sk: *mut c_void = ctx.arg(0);
    let offsets = OFFSETS.load();
    // SAFETY: `sk` comes typed from the tracepoint; offsets from this kernel's BTF.
    let (kind, protocol) = unsafe {
        (
            field::<u16>(sk as *const u8, offsets.sk_type),
            field::<u16>(sk as *const u8, offsets.sk_protocol),
        )
    };
    if kind != SOCK_STREAM || protocol != IPPROTO_TCP {
        return;
    }
    // SAFETY: as above.
    let Some(stored) = (unsafe { storage(sk, true).as_mut() }) else {
        return;
    };
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if stored.pid == pid {
        return;
    }
    let owner = current_owner(&offsets);
    stored.pid = owner.pid;
    stored.comm = owner.comm;
    stored.epoch = epoch();
    // SAFETY: no arguments.
    stored.owned_ns = unsafe { bpf_ktime_get_ns() };
}
