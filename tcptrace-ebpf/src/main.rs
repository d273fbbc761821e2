//! tcptrace's kernel side: programs on `sock:inet_sock_set_state`, `tcp:tcp_retransmit_skb` and
//! `tcp:tcp_retransmit_synack` that attribute each event to the process owning the socket, filter
//! it, and hand it to userspace through one ring buffer.
//!
//! Field offsets come from the running kernel's tracefs `format` files through the `*_LAYOUT` globals,
//! so the same object works on kernels whose tracepoint layouts differ.
#![no_std]
#![no_main]

mod record;

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated as gen_helpers},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use record::Record;
use tcptrace_common::{
    AF_INET, AF_INET6, Bytes16, COUNTER_RINGBUF_FULL, COUNTER_SLOTS, COUNTER_SOCKETS_ADDED,
    COUNTER_SOCKETS_FULL, COUNTER_SOCKETS_REMOVED, Config, DEFAULT_MAX_SOCKETS,
    DEFAULT_RING_BUFFER_BYTES, EVENT_HAS_DURATION, EVENT_HAS_ERR, EVENT_HAS_STATE, Event,
    FIELD_ABSENT, FILTER_IPV4, FILTER_IPV6, FILTER_PID, FILTER_PORT, IPPROTO_TCP, KIND_RETRANSMIT,
    KIND_RETRANSMIT_SYNACK, KIND_STATE, ListenerOwner, MAX_FILTER_ENTRIES, MAX_LISTENERS,
    PORT_LOCAL, PORT_REMOTE, RetransmitLayout, SocketState, StateLayout, TRACE_RETRANSMITS,
    TRACE_STATES, tcp_state,
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

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static SOCKETS: LruHashMap<u64, SocketState> = LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

#[map]
static LISTENERS: LruHashMap<u16, ListenerOwner> = LruHashMap::with_max_entries(MAX_LISTENERS, 0);

#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static PORT_FILTER: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

/// Who owns a socket; pid 0 and an empty comm when it was never seen.
#[derive(Clone, Copy)]
struct Owner {
    pid: u32,
    comm: Bytes16,
}

const UNKNOWN_OWNER: Owner = Owner {
    pid: 0,
    comm: Bytes16::ZERO,
};

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    match try_retransmit(&ctx, &RETRANSMIT_LAYOUT.load(), KIND_RETRANSMIT) {
        Ok(()) | Err(()) => 0,
    }
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    match try_retransmit(&ctx, &SYNACK_LAYOUT.load(), KIND_RETRANSMIT_SYNACK) {
        Ok(()) | Err(()) => 0,
    }
}

#[inline(always)]
fn family_wanted(filters: u32, family: u16) -> bool {
    match family {
        AF_INET => filters & FILTER_IPV6 == 0,
        AF_INET6 => filters & FILTER_IPV4 == 0,
        _ => false,
    }
}

#[inline(always)]
fn ports_wanted(filters: u32, sport: u16, dport: u16) -> bool {
    if filters & FILTER_PORT == 0 {
        return true;
    }
    // SAFETY: plain u8 values, read once.
    let local = unsafe { PORT_FILTER.get(sport) }.is_some_and(|side| side & PORT_LOCAL != 0);
    local || unsafe { PORT_FILTER.get(dport) }.is_some_and(|side| side & PORT_REMOTE != 0)
}

#[inline(always)]
fn owner_wanted(filters: u32, pid: u32) -> bool {
    filters & FILTER_PID == 0 || unsafe { PID_FILTER.get(pid) }.is_some()
}

#[inline(always)]
fn current_owner() -> Owner {
    Owner {
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        comm: current_comm(),
    }
}

/// The current task's comm, written straight into an aligned buffer (the generic helper
/// zeroes a byte array first, a byte loop on this target).
#[inline(always)]
fn current_comm() -> Bytes16 {
    let mut comm = Bytes16::ZERO;
    // SAFETY: the buffer holds 16 bytes; on failure the helper zeroes it.
    unsafe { gen_helpers::bpf_get_current_comm(comm.0.as_mut_ptr().cast(), 16) };
    comm
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

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

/// Reserves, fills and submits one record. The reader is woken only once enough is waiting; it
/// drains on a short timer otherwise, which keeps wakeups (and their cost) off the hot path.
#[inline(always)]
fn emit(config: &Config, event: Event) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(COUNTER_RINGBUF_FULL);
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

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), ()> {
    let config = CONFIG.load();
    let filters = config.filters;
    let layout = &STATE_LAYOUT.load();
    let mut record = Record::uninit();
    record.fill(ctx, layout.record_size)?;
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
    let sport: u16 = record.get(layout.sport);
    let dport: u16 = record.get(layout.dport);
    let now = unsafe { bpf_ktime_get_ns() };

    // The owner. Only connect() and listen() run in the owner's context for sure; everything else
    // may run in softirq or timer context, where "current" is whoever the CPU interrupted (on
    // loopback: the peer). Later transitions take the owner captured there.
    // https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_ipv4.c (tcp_v4_connect)
    // https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/af_inet.c (__inet_listen_sk)
    let existing = SOCKETS.get_ptr_mut(skaddr);
    let (owner, since_ns, retransmits) = if (oldstate == tcp_state::CLOSE
        && newstate == tcp_state::SYN_SENT)
        || newstate == tcp_state::LISTEN
    {
        (current_owner(), 0, 0)
    } else if let Some(state) = existing {
        // SAFETY: a value of this map; a concurrent update at worst yields a stale duration.
        let state = unsafe { &*state };
        (
            Owner {
                pid: state.pid,
                comm: state.comm,
            },
            state.since_ns,
            state.retransmits,
        )
    } else if oldstate == tcp_state::LISTEN && newstate == tcp_state::SYN_RECV {
        // A passively opened child socket, cloned from its listener in softirq context:
        // https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/inet_connection_sock.c (inet_csk_clone_lock)
        match unsafe { LISTENERS.get(sport) } {
            Some(listener) => (
                Owner {
                    pid: listener.pid,
                    comm: listener.comm,
                },
                0,
                0,
            ),
            None => (UNKNOWN_OWNER, 0, 0),
        }
    } else {
        (UNKNOWN_OWNER, 0, 0)
    };

    let tracked = owner_wanted(filters, owner.pid);
    if newstate == tcp_state::CLOSE {
        // Removed at CLOSE, so a reused socket address never inherits stale state.
        if existing.is_some() && SOCKETS.remove(skaddr).is_ok() {
            count(COUNTER_SOCKETS_REMOVED);
        }
        if oldstate == tcp_state::LISTEN
            && unsafe { LISTENERS.get(sport) }.is_some_and(|listener| listener.skaddr == skaddr)
        {
            let _ = LISTENERS.remove(sport);
        }
    } else if tracked {
        let state = SocketState {
            since_ns: now,
            comm: owner.comm,
            pid: owner.pid,
            retransmits,
        };
        match existing {
            // SAFETY: as above; the kernel holds the socket lock across a transition.
            Some(slot) => unsafe { *slot = state },
            None => {
                if SOCKETS.insert(skaddr, state, 0).is_ok() {
                    count(COUNTER_SOCKETS_ADDED);
                } else {
                    count(COUNTER_SOCKETS_FULL);
                }
            }
        }
        if newstate == tcp_state::LISTEN {
            let listener = ListenerOwner {
                skaddr,
                comm: owner.comm,
                pid: owner.pid,
                _pad: 0,
            };
            let _ = LISTENERS.insert(sport, listener, 0);
        }
    }

    // With only retransmits traced this program still runs: it keeps the owners they need.
    if filters & TRACE_STATES == 0 || !tracked || !ports_wanted(filters, sport, dport) {
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
            flags: if since_ns != 0 { EVENT_HAS_DURATION } else { 0 },
            family,
            sport,
            dport,
            oldstate,
            newstate,
            _pad: 0,
        },
    );
    Ok(())
}

#[inline(always)]
fn try_retransmit(ctx: &TracePointContext, layout: &RetransmitLayout, kind: u16) -> Result<(), ()> {
    let config = CONFIG.load();
    let filters = config.filters;
    if filters & TRACE_RETRANSMITS == 0 {
        return Ok(());
    }
    let mut record = Record::uninit();
    record.fill(ctx, layout.record_size)?;
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

    // Retransmits fire from the kernel's timers, where "current" is unrelated to the socket: the
    // owner comes from the per-socket state, or for a SYN-ACK from the listener.
    let mut retransmits = 0;
    let owner = match SOCKETS.get_ptr_mut(skaddr) {
        Some(state) => unsafe {
            (*state).retransmits += 1;
            retransmits = (*state).retransmits;
            Owner {
                pid: (*state).pid,
                comm: (*state).comm,
            }
        },
        None => match unsafe { LISTENERS.get(sport) } {
            Some(listener) if kind == KIND_RETRANSMIT_SYNACK => Owner {
                pid: listener.pid,
                comm: listener.comm,
            },
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
    let err = if layout.err != FIELD_ABSENT {
        Some(record.get::<i32>(layout.err))
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
                | if err.is_some() { EVENT_HAS_ERR } else { 0 },
            family,
            sport,
            dport,
            oldstate: state.unwrap_or(0),
            newstate: 0,
            _pad: 0,
        },
    );
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
