//! The census's kernel half (BTF mode, `tcptrace top`): the `iter/tcp` program `census`, linked
//! once; each census opens a new iterator on the link and reads every socket's record.

use anyhow::Context as _;
use aya::{Btf, Ebpf};
use tcptrace_common::CensusRecord;

use super::iterator::IterLink;

pub struct Census {
    link: IterLink,
    records: Vec<u8>,
}

impl Census {
    /// Loads the `iter/tcp` program and links it.
    pub fn load(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<Self> {
        let link = IterLink::load(ebpf, btf, "census", "tcp")
            .context("failed to set up the census of sockets")?;
        Ok(Self {
            link,
            records: Vec::new(),
        })
    }

    /// Counts the host's sockets (those the family and port filters keep) by `tcp_state` value.
    pub fn count(&mut self) -> anyhow::Result<[u64; 16]> {
        self.link
            .read(&mut self.records)
            .context("the census of sockets failed")?;
        let mut counts = [0; 16];
        for chunk in self.records.chunks_exact(size_of::<CensusRecord>()) {
            // SAFETY: plain integers, any bits valid; read unaligned from the byte buffer.
            let record = unsafe { chunk.as_ptr().cast::<CensusRecord>().read_unaligned() };
            if let Some(count) = counts.get_mut(record.state as usize) {
                *count += 1;
            }
        }
        Ok(counts)
    }
}
