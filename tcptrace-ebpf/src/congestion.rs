//! BTF mode: congestion state changes (`tcp:tcp_cong_state_set`, Linux 6.3+). The tracepoint
//! fires in `tcp_set_ca_state` before the kernel writes the new state: the socket still holds
//! the state it leaves, the argument is the one it enters. A timeout sets Loss again on every
//! attempt; such a "change" into the state the socket is in is no change, and writes nothing.
//! https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_cong.c (tcp_set_ca_state)

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_get_socket_cookie, bpf_skc_to_tcp_sock},
    },
    programs::BtfTracePointContext,
};
use tcptrace_common::{
    CongestionDetail, EVENT_HAS_STATE, End, Event, KIND_CONGESTION, TRACE_CONGESTION,
};

use crate::{
    CONFIG, OFFSETS, SND_CWND_OFFSET,
    btf::{endpoints, field, live_owner, storage},
    emit::{UNKNOWN_OWNER, emit, family_wanted, owner_wanted, ports_wanted},
    identity::{identity, identity_wanted},
};

/// `tcp_cong_state_set(sk, ca_state)`.
pub fn changed(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let config = CONFIG.load();
    let filters = config.filters;
    if filters & TRACE_CONGESTION == 0 {
        return Ok(());
    }
    let sk: *mut c_void = ctx.arg(0);
    let to: u8 = ctx.arg(1);
    // SAFETY: `sk` comes typed from the tracepoint.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    let offsets = OFFSETS.load();
    // SAFETY: `tp` is the BTF-typed tcp_sock of `sk`; offsets from this kernel's BTF.
    let from = unsafe { field::<u8>(tp, offsets.icsk_ca_state) } & 0x1f;
    if from == to {
        return Ok(());
    }
    // SAFETY: as above.
    let ends = unsafe { endpoints(&offsets, sk as *const u8, tp) };
    if !family_wanted(filters, ends.family) {
        return Ok(());
    }
    // SAFETY: as in `btf::state`.
    let owner = match unsafe { storage(sk, false).as_mut() } {
        Some(stored) => live_owner(stored),
        None => UNKNOWN_OWNER,
    };
    if !owner_wanted(filters, owner.pid) || !ports_wanted(filters, ends.sport, ends.dport) {
        return Ok(());
    }
    // SAFETY: as above.
    let id = unsafe { identity(&offsets, sk as *const u8) };
    if !identity_wanted(filters, &offsets, &id) {
        return Ok(());
    }
    // SAFETY: as above.
    let detail = unsafe {
        CongestionDetail {
            rto_jiffies: field(tp, offsets.icsk_rto),
            srtt_us: field::<u32>(tp, offsets.tcp_srtt_us) >> 3,
            cwnd: field(tp, SND_CWND_OFFSET.load()),
            state: field(sk as *const u8, offsets.skc_state),
            attempt: field(tp, offsets.icsk_retransmits),
            backoff: field(tp, offsets.icsk_backoff),
            _pad: 0,
        }
    };
    let end: End = detail.into_end();
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
            retransmits: 0,
            err: 0,
            kind: KIND_CONGESTION,
            flags: EVENT_HAS_STATE,
            family: ends.family,
            sport: ends.sport,
            dport: ends.dport,
            oldstate: u32::from(from),
            newstate: u32::from(to),
            _pad: 0,
            cgroup_id: id.cgroup_id,
            netns: id.netns,
            fin_time: 0,
            // SAFETY: `sk` as above.
            cookie: unsafe { bpf_get_socket_cookie(sk) },
            end,
        },
    );
    Ok(())
}
