//! BTF mode: connections a listener's full accept queue dropped (`skb:kfree_skb`, Linux 6.15+
//! for the reason, 6.11+ for the receiving socket). Two drops count, each with the listener as
//! `rx_sk`: the last ACK of a handshake whose request socket cannot become a connection
//! (`TCP_LISTEN_OVERFLOW`), and a SYN-cookie ACK in the same plight (`NO_SOCKET`). A SYN that
//! arrives at a full queue is freed without a reason (`consume_skb`): only the kernel's
//! `ListenOverflows` counter sees it.
//!
//! `kfree_skb` fires for every packet freed with a reason, about once per closed connection on
//! a busy host: everything that is not a listen drop returns before any helper or map.
//! https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_minisocks.c (tcp_check_req)

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_get_socket_cookie, bpf_skc_to_tcp_sock},
    },
    programs::BtfTracePointContext,
};
use tcptrace_common::{
    COUNTER_LISTEN_NO_SOCKET, COUNTER_LISTEN_OVERFLOW, ListenDrops, TRACE_LISTEN_DROPS, tcp_state,
};

use crate::{
    CONFIG, LISTEN_DROP_LAYOUT, LISTEN_DROPS, OFFSETS,
    btf::{endpoints, field, live_owner, storage},
    emit::{UNKNOWN_OWNER, count, family_wanted, owner_wanted, ports_wanted},
    identity::{identity, identity_wanted},
};

/// `kfree_skb(skb, location, reason, rx_sk)`.
pub fn dropped(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let layout = LISTEN_DROP_LAYOUT.load();
    let reason: u32 = ctx.arg(2);
    let overflow = if reason == layout.listen_overflow {
        true
    } else if reason == layout.no_socket {
        false
    } else {
        return Ok(());
    };
    let config = CONFIG.load();
    let filters = config.filters;
    if filters & TRACE_LISTEN_DROPS == 0 {
        return Ok(());
    }
    let sk: *mut c_void = ctx.arg(3);
    if sk.is_null() {
        return Ok(());
    }
    let offsets = OFFSETS.load();
    // SAFETY: `sk` comes typed from the tracepoint, checked for NULL.
    if unsafe { field::<u8>(sk as *const u8, offsets.skc_state) } != tcp_state::LISTEN as u8 {
        return Ok(());
    }
    // SAFETY: as above; NULL unless the listener is a TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) } as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    // SAFETY: BTF-typed socket pointers; offsets from this kernel's BTF.
    let ends = unsafe { endpoints(&offsets, sk as *const u8, tp) };
    if !family_wanted(filters, ends.family) || !ports_wanted(filters, ends.sport, 0) {
        return Ok(());
    }
    // SAFETY: as in `btf::state`.
    let owner = match unsafe { storage(sk, false).as_mut() } {
        Some(stored) => live_owner(stored),
        None => UNKNOWN_OWNER,
    };
    if !owner_wanted(filters, owner.pid) {
        return Ok(());
    }
    // SAFETY: as above.
    let id = unsafe { identity(&offsets, sk as *const u8) };
    if !identity_wanted(filters, &offsets, &id) {
        return Ok(());
    }
    count(if overflow {
        COUNTER_LISTEN_OVERFLOW
    } else {
        COUNTER_LISTEN_NO_SOCKET
    });
    // SAFETY: `sk` as above.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    // Per CPU: this CPU's entry, made (zeroed) when the listener first drops on this CPU.
    let entry = match LISTEN_DROPS.get_ptr_mut(&cookie) {
        Some(entry) => entry,
        None => {
            let _ = LISTEN_DROPS.insert(&cookie, &ListenDrops::default(), u64::from(BPF_NOEXIST));
            LISTEN_DROPS.get_ptr_mut(&cookie).ok_or(())?
        }
    };
    // SAFETY: this CPU's value, which only this CPU writes, kept alive by the kernel while the
    // program runs.
    unsafe {
        if overflow {
            (*entry).overflow += 1;
        } else {
            (*entry).no_socket += 1;
        }
        (*entry).saddr = ends.saddr;
        (*entry).comm = owner.comm;
        (*entry).cgroup_id = id.cgroup_id;
        (*entry).skaddr = sk as u64;
        (*entry).pid = owner.pid;
        (*entry).netns = id.netns;
        (*entry).family = ends.family;
        (*entry).sport = ends.sport;
        (*entry).ack_backlog = field(sk as *const u8, layout.sk_ack_backlog);
        (*entry).max_ack_backlog = field(sk as *const u8, layout.sk_max_ack_backlog);
        (*entry).last_ns = bpf_ktime_get_ns();
    }
    Ok(())
}
