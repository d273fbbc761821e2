//! The listen drop program's table (BTF mode): per listener, what its full accept queue dropped,
//! read by userspace once a second. Its kernel half is `tcptrace-ebpf/src/listen_drops.rs`.

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap},
};
use tcptrace_common::{LISTEN_DROPS_MAP, ListenDropLayout, ListenDrops};

use super::vmlinux;

pub struct ListenDropTable {
    map: PerCpuHashMap<MapData, u64, ListenDrops>,
}

impl ListenDropTable {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            map: PerCpuHashMap::try_from(super::take_map(ebpf, LISTEN_DROPS_MAP)?)?,
        })
    }

    /// Every listener in the table, by socket cookie, its CPUs' counts summed, into `out`
    /// (emptied first). Who it is and how full its queue was come from its latest drop.
    pub fn read(&self, out: &mut Vec<(u64, ListenDrops)>) -> anyhow::Result<()> {
        out.clear();
        for entry in self.map.iter() {
            let (cookie, per_cpu) = entry.context("failed to read the listen drop table")?;
            let mut sum = ListenDrops::default();
            for cpu in per_cpu.iter() {
                if cpu.last_ns >= sum.last_ns && cpu.family != 0 {
                    sum = ListenDrops {
                        overflow: sum.overflow,
                        no_socket: sum.no_socket,
                        ..*cpu
                    };
                }
                sum.overflow += cpu.overflow;
                sum.no_socket += cpu.no_socket;
            }
            if sum.family != 0 {
                out.push((cookie, sum));
            }
        }
        Ok(())
    }
}

/// Where this kernel reports listen drops, when it does: `kfree_skb` with the receiving socket
/// (6.11+) and the reason `TCP_LISTEN_OVERFLOW` (6.15+); None otherwise.
pub fn layout(btf: &vmlinux::Btf) -> Option<ListenDropLayout> {
    if btf.tracepoint_args("kfree_skb")? < 4 {
        return None;
    }
    let reasons = btf.enum_values("skb_drop_reason")?;
    let value = |name: &str| {
        reasons
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| u32::try_from(*v).ok())
    };
    Some(ListenDropLayout {
        listen_overflow: value("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")?,
        no_socket: value("SKB_DROP_REASON_NO_SOCKET")?,
        sk_ack_backlog: btf.member_offset("sock", "sk_ack_backlog")?,
        sk_max_ack_backlog: btf.member_offset("sock", "sk_max_ack_backlog")?,
    })
}
