//! What both modes share once an event is known: the filters, the owner, the counters, and the
//! ring buffer. A filter or a record field is written here once.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, generated as gen_helpers},
};
use tcptrace_common::{
    AF_INET, AF_INET6, Bytes16, Config, EVENT_COMM_OF_THREAD, Event, FILTER_IPV4, FILTER_IPV6,
    FILTER_PID, FILTER_PORT, PORT_LOCAL, PORT_REMOTE,
};

use crate::{COUNTERS, EVENTS, PID_FILTER, PORT_FILTER};

/// Who owns a socket; pid 0 and an empty comm when it was never seen.
#[derive(Clone, Copy)]
pub struct Owner {
    pub pid: u32,
    pub comm: Bytes16,
    /// tracefs mode: the owner's cgroup v2 id when it was seen (BTF mode reads the socket's).
    pub cgroup_id: u64,
    /// tracefs mode: `EVENT_COMM_OF_THREAD` when `comm` is the name of a thread other than the
    /// process's main one; 0 otherwise (BTF mode reads the main thread's).
    pub flags: u16,
}

pub const UNKNOWN_OWNER: Owner = Owner {
    pid: 0,
    comm: Bytes16::ZERO,
    cgroup_id: 0,
    flags: 0,
};

#[inline(always)]
pub fn family_wanted(filters: u32, family: u16) -> bool {
    match family {
        AF_INET => filters & FILTER_IPV6 == 0,
        AF_INET6 => filters & FILTER_IPV4 == 0,
        _ => false,
    }
}

#[inline(always)]
pub fn ports_wanted(filters: u32, sport: u16, dport: u16) -> bool {
    if filters & FILTER_PORT == 0 {
        return true;
    }
    // SAFETY: plain u8 values, read once.
    let local = unsafe { PORT_FILTER.get(sport) }.is_some_and(|side| side & PORT_LOCAL != 0);
    local || unsafe { PORT_FILTER.get(dport) }.is_some_and(|side| side & PORT_REMOTE != 0)
}

#[inline(always)]
pub fn owner_wanted(filters: u32, pid: u32) -> bool {
    filters & FILTER_PID == 0 || unsafe { PID_FILTER.get(pid) }.is_some()
}

/// The current process (tgid) with the current thread's name and its cgroup: the tracefs mode's
/// owner, where no kernel struct can be read.
#[inline(always)]
pub fn current_owner() -> Owner {
    let mut comm = Bytes16::ZERO;
    // SAFETY: the buffer holds 16 bytes; on failure the helper zeroes it. Written straight into
    // an aligned buffer: the generic helper zeroes a byte array first, a byte loop on this target.
    unsafe { gen_helpers::bpf_get_current_comm(comm.0.as_mut_ptr().cast(), 16) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    Owner {
        pid: tgid,
        comm,
        // SAFETY: no arguments; the current task's cgroup v2 id.
        cgroup_id: unsafe { gen_helpers::bpf_get_current_cgroup_id() },
        // The main thread's id is the process's: any other thread's name is its own.
        flags: if tid != tgid { EVENT_COMM_OF_THREAD } else { 0 },
    }
}

#[inline(always)]
pub fn count(slot: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Reserves, fills and submits one record. The reader is woken only once enough is waiting; it
/// drains on a short timer otherwise, which keeps wakeups (and their cost) off the hot path.
#[inline(always)]
pub fn emit(config: &Config, event: Event) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(tcptrace_common::COUNTER_RINGBUF_FULL);
        return;
    };
    entry.write(event);
    let wake = if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= u64::from(config.wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake.into());
}
