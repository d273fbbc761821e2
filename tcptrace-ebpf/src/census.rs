//! The census (`tcptrace top`, BTF mode): every TCP socket of the host that passes the family and
//! port filters, as `ss -tan` counts it, one record each to the iterator's output.

use aya_ebpf::helpers::generated::bpf_skc_to_tcp_timewait_sock;
use tcptrace_common::{CensusRecord, tcp_state};

use crate::{
    CONFIG, OFFSETS,
    btf::{TcpIterContext, field, seq_write},
    emit::{family_wanted, ports_wanted},
};

pub fn census(ctx: *const TcpIterContext) -> Result<(), ()> {
    // SAFETY: the iterator's context, read as the kernel lays it out.
    let (meta, skc) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if skc.is_null() {
        return Ok(());
    }
    let skc = skc as *const u8;
    let offsets = OFFSETS.load();
    let filters = CONFIG.load().filters;
    // SAFETY: a BTF-typed `sock_common` (full, request or timewait socket); offsets from this
    // kernel's BTF.
    let (family, state, sport, dport, cookie) = unsafe {
        (
            field::<u16>(skc, offsets.skc_family),
            field::<u8>(skc, offsets.skc_state),
            field::<u16>(skc, offsets.skc_num),
            u16::from_be(field::<u16>(skc, offsets.skc_dport)),
            field::<u64>(skc, offsets.skc_cookie),
        )
    };
    if !family_wanted(filters, family) || !ports_wanted(filters, sport, dport) {
        return Ok(());
    }
    let state = match u32::from(state) {
        tcp_state::TIME_WAIT => {
            // SAFETY: as above; NULL unless a TCP timewait socket.
            let tw = unsafe { bpf_skc_to_tcp_timewait_sock(skc.cast_mut().cast()) } as *const u8;
            if tw.is_null() {
                return Ok(());
            }
            // SAFETY: as above.
            u32::from(unsafe { field::<u8>(tw, offsets.tw_substate) })
        }
        tcp_state::NEW_SYN_RECV => tcp_state::SYN_RECV,
        state => state,
    };
    let record = CensusRecord {
        cookie,
        state,
        family,
        sport,
        dport,
        _pad: [0; 3],
    };
    // SAFETY: the iterator's own `meta`.
    unsafe { seq_write(meta, &record) };
    Ok(())
}
