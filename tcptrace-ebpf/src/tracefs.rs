//! tracefs mode: programs on the classic tracepoints, reading each field of the tracepoint's record
//! at the offset the running kernel's tracefs `format` file gives (the `*_LAYOUT` globals). Owners
//! live in an LRU map keyed by socket address; accepted sockets take the owner of the listener on
//! their port, and none when two listeners share it.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TracePointContext};
use aya_log_ebpf::warn;
use tcptrace_common::{
    AF_INET, AF_INET6, Bytes16, COUNTER_STATE_REPEATS, EVENT_HAS_DURATION, EVENT_HAS_ERR,
    EVENT_HAS_STATE, End, Event, FIELD_ABSENT, FILTER_ENDS, IPPROTO_TCP, KIND_RETRANSMIT_SYNACK,
    KIND_STATE, ListenerOwner, Origin, RetransmitLayout, SocketState, TRACE_RETRANSMITS,
    TRACE_STATES, tcp_state,
};

use crate::{
    CONFIG, LISTENERS, SOCKETS, STATE_LAYOUT,
    emit::{
        Owner, UNKNOWN_OWNER, count, current_owner, emit, family_wanted, owner_wanted, ports_wanted,
    },
    record::Record,
};

/// Local and remote address of an event, IPv4 in the first four bytes.
#[inline(always)]
fn addresses(record: &Record, family: u16, v4: (u16, u16), v6: (u16, u16)) -> (Bytes16, Bytes16) {
    if family == AF_INET {
        // Built from words: the address bytes stay in network order whatever the endianness.
        let word = |offset| {
            // SAFETY: any 16 bytes are a valid Bytes16.
            unsafe {
                core::mem::transmute::<[u32; 4], Bytes16>([record.get::<u32>(offset), 0, 0, 0])
            }
        };
        (word(v4.0), word(v4.1))
    } else {
        (Bytes16(record.get(v6.0)), Bytes16(record.get(v6.1)))
    }
}

pub fn state(ctx: &TracePointContext) -> Result<(), ()> {
    let config = CONFIG.load();
    let filters = config.filters;
    let layout = &STATE_LAYOUT.load();
    let mut record = Record::uninit();
    if record.fill(ctx, layout.record_size).is_err() {
        warn!(ctx, "the inet_sock_set_state record could not be read");
        return Err(());
    }
    // Cheapest checks first: SCTP, MPTCP and others fire this tracepoint too.
    let protocol = if layout.protocol_size == 1 {
        u16::from(record.get::<u8>(layout.protocol))
    } else {
        record.get::<u16>(layout.protocol)
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let family: u16 = record.get(layout.family);
    if !family_wanted(filters, family) {
        return Ok(());
    }
    let skaddr: u64 = record.get(layout.skaddr);
    let oldstate = record.get::<i32>(layout.oldstate) as u32;
    let newstate = record.get::<i32>(layout.newstate) as u32;
    if oldstate == newstate {
        // Set again, not entered: no line, and the time in the state runs on (as in BTF mode).
        count(COUNTER_STATE_REPEATS);
        return Ok(());
    }
    let sport: u16 = record.get(layout.sport);
    let dport: u16 = record.get(layout.dport);
    let now = unsafe { bpf_ktime_get_ns() };

    // The owner. Only connect() and listen() run in the owner's context for sure; everything else
    // may run in softirq or timer context, where "current" is whoever the CPU interrupted (on
    // loopback: the peer). Later transitions take the owner captured there.
    // https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_ipv4.c (tcp_v4_connect)
    // https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/af_inet.c (__inet_listen_sk)
    let existing = SOCKETS.get_ptr_mut(skaddr);
    let (owner, since_ns, retransmits) = match Origin::of(oldstate, newstate, existing.is_some()) {
        Origin::Opened => (current_owner(), 0, 0),
        // A passively opened child socket, cloned from its listener in softirq context: always a
        // new socket, whatever a missed CLOSE left under its address. Its owner is the listener's
        // on this port, unless several listeners of different owners share the port (other
        // network namespaces, SO_REUSEPORT): this mode cannot tell which one accepted it.
        // https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/inet_connection_sock.c (inet_csk_clone_lock)
        Origin::Accepted => match unsafe { LISTENERS.get(sport) } {
            Some(listener) => (listener_owner(listener), 0, 0),
            None => (UNKNOWN_OWNER, 0, 0),
        },
        // Out of CLOSE: an entry under this address is a dead socket's (its CLOSE was missed).
        Origin::New => (UNKNOWN_OWNER, 0, 0),
        Origin::Kept => match existing {
            // SAFETY: a value of this map; a concurrent update at worst yields a stale duration.
            Some(state) => unsafe {
                (kept_owner(&*state), (*state).since_ns, (*state).retransmits)
            },
            None => (UNKNOWN_OWNER, 0, 0),
        },
    };

    // Listeners are recorded whatever the filters say, so that a port shared by listeners of
    // different owners is known to be shared.
    if newstate == tcp_state::LISTEN {
        add_listener(sport, skaddr, owner);
    } else if oldstate == tcp_state::LISTEN && newstate == tcp_state::CLOSE {
        remove_listener(sport);
    }

    let tracked = owner_wanted(filters, owner.pid);
    if newstate == tcp_state::CLOSE {
        // Removed at CLOSE, so a reused socket address never inherits stale state.
        if existing.is_some() {
            let _ = SOCKETS.remove(skaddr);
        }
    } else if tracked {
        let state = SocketState {
            since_ns: now,
            epoch: 0,
            owned_ns: 0,
            comm: owner.comm,
            pid: owner.pid,
            retransmits,
            cgroup_id: owner.cgroup_id,
            kernel_retrans: 0,
            failed_retrans: 0,
            owner_flags: u32::from(owner.flags),
            rst_reason: 0,
            born_ns: 0,
            soft_err: 0,
            _pad: 0,
        };
        match existing {
            // SAFETY: as above; the kernel holds the socket lock across a transition.
            Some(slot) => unsafe { *slot = state },
            None => {
                let _ = SOCKETS.insert(skaddr, state, 0);
            }
        }
    }

    // With only retransmits traced this program still runs: it keeps the owners they need.
    if filters & TRACE_STATES == 0 || !tracked || !ports_wanted(filters, sport, dport) {
        return Ok(());
    }
    // `--events connections`: only the lines that end connections.
    if filters & FILTER_ENDS != 0 && newstate != tcp_state::CLOSE {
        return Ok(());
    }
    let (saddr, daddr) = addresses(
        &record,
        family,
        (layout.saddr, layout.daddr),
        (layout.saddr_v6, layout.daddr_v6),
    );
    emit(
        &config,
        Event {
            ts_ns: now,
            skaddr,
            duration_ns: now.saturating_sub(since_ns),
            saddr,
            daddr,
            comm: owner.comm,
            pid: owner.pid,
            retransmits,
            err: 0,
            kind: KIND_STATE,
            flags: if since_ns != 0 { EVENT_HAS_DURATION } else { 0 } | owner.flags,
            family,
            sport,
            dport,
            oldstate,
            newstate,
            _pad: 0,
            cgroup_id: owner.cgroup_id,
            netns: 0,
            fin_time: 0,
            cookie: 0,
            end: End::ZERO,
        },
    );
    Ok(())
}

/// The owner kept for a socket.
#[inline(always)]
fn kept_owner(state: &SocketState) -> Owner {
    Owner {
        pid: state.pid,
        comm: state.comm,
        cgroup_id: state.cgroup_id,
        flags: state.owner_flags as u16,
    }
}

/// The owner of the listeners on a port.
#[inline(always)]
fn listener_owner(listener: &ListenerOwner) -> Owner {
    Owner {
        pid: listener.pid,
        comm: listener.comm,
        cgroup_id: listener.cgroup_id,
        flags: listener.owner_flags as u16,
    }
}

/// One more listener on `port`. A second listener of another owner makes the port ambiguous
/// (pid 0) until all of its listeners have closed.
#[inline(always)]
fn add_listener(port: u16, skaddr: u64, owner: Owner) {
    let entry = match LISTENERS.get_ptr_mut(port) {
        // SAFETY: a value of this map; listen() on one port from two CPUs at once at worst
        // miscounts, which leaves the port ambiguous (pid 0) rather than wrong.
        Some(existing) => unsafe {
            let existing = &*existing;
            let same = existing.pid == owner.pid && existing.pid != 0;
            ListenerOwner {
                skaddr,
                comm: if same { owner.comm } else { Bytes16::ZERO },
                pid: if same { owner.pid } else { 0 },
                listeners: existing.listeners.saturating_add(1),
                cgroup_id: if same { owner.cgroup_id } else { 0 },
                owner_flags: if same { u32::from(owner.flags) } else { 0 },
                _pad: 0,
            }
        },
        None => ListenerOwner {
            skaddr,
            comm: owner.comm,
            pid: owner.pid,
            listeners: 1,
            cgroup_id: owner.cgroup_id,
            owner_flags: u32::from(owner.flags),
            _pad: 0,
        },
    };
    let _ = LISTENERS.insert(port, entry, 0);
}

#[inline(always)]
fn remove_listener(port: u16) {
    if let Some(existing) = LISTENERS.get_ptr_mut(port) {
        // SAFETY: as in add_listener.
        unsafe {
            if (*existing).listeners > 1 {
                (*existing).listeners -= 1;
                return;
            }
        }
        let _ = LISTENERS.remove(port);
    }
}

#[inline(always)]
pub fn retransmit(ctx: &TracePointContext, layout: &RetransmitLayout, kind: u16) -> Result<(), ()> {
    let config = CONFIG.load();
    let filters = config.filters;
    if filters & TRACE_RETRANSMITS == 0 {
        return Ok(());
    }
    let mut record = Record::uninit();
    if record.fill(ctx, layout.record_size).is_err() {
        warn!(ctx, "a retransmit record could not be read");
        return Err(());
    }
    let skaddr: u64 = record.get(layout.skaddr);
    let family = if layout.family != FIELD_ABSENT {
        record.get(layout.family)
    } else {
        // Before 5.12 the tracepoint had no family: an IPv4 socket shows a v4-mapped IPv6 address.
        let v6: [u8; 16] = record.get(layout.saddr_v6);
        if v6[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
            AF_INET
        } else {
            AF_INET6
        }
    };
    if !family_wanted(filters, family) {
        return Ok(());
    }
    let sport: u16 = record.get(layout.sport);
    let dport: u16 = record.get(layout.dport);

    let err = if layout.err != FIELD_ABSENT {
        Some(record.get::<i32>(layout.err))
    } else {
        None
    };
    // Retransmits fire from the kernel's timers, where "current" is unrelated to the socket: the
    // owner comes from the per-socket state, or for a SYN-ACK from the listener. Since 2025 the
    // tracepoint also fires for attempts that failed (`err` not 0): only what went out counts.
    let mut retransmits = 0;
    let owner = match SOCKETS.get_ptr_mut(skaddr) {
        Some(state) => unsafe {
            // A SYN-ACK is the request socket's, not the listener's this entry belongs to.
            if err.unwrap_or(0) == 0 && kind != KIND_RETRANSMIT_SYNACK {
                (*state).retransmits += 1;
            }
            retransmits = (*state).retransmits;
            kept_owner(&*state)
        },
        None => match unsafe { LISTENERS.get(sport) } {
            Some(listener) if kind == KIND_RETRANSMIT_SYNACK => listener_owner(listener),
            _ => UNKNOWN_OWNER,
        },
    };
    if !owner_wanted(filters, owner.pid) || !ports_wanted(filters, sport, dport) {
        return Ok(());
    }
    let state = if kind == KIND_RETRANSMIT_SYNACK {
        Some(tcp_state::SYN_RECV)
    } else if layout.state != FIELD_ABSENT {
        Some(record.get::<i32>(layout.state) as u32)
    } else {
        None
    };
    let (saddr, daddr) = addresses(
        &record,
        family,
        (layout.saddr, layout.daddr),
        (layout.saddr_v6, layout.daddr_v6),
    );
    let now = unsafe { bpf_ktime_get_ns() };
    emit(
        &config,
        Event {
            ts_ns: now,
            skaddr,
            duration_ns: 0,
            saddr,
            daddr,
            comm: owner.comm,
            pid: owner.pid,
            retransmits,
            err: err.unwrap_or(0),
            kind,
            flags: if state.is_some() { EVENT_HAS_STATE } else { 0 }
                | if err.is_some() { EVENT_HAS_ERR } else { 0 }
                | owner.flags,
            family,
            sport,
            dport,
            oldstate: state.unwrap_or(0),
            newstate: 0,
            _pad: 0,
            cgroup_id: owner.cgroup_id,
            netns: 0,
            fin_time: 0,
            cookie: 0,
            end: End::ZERO,
        },
    );
    Ok(())
}
