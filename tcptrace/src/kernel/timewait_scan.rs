//! The timewait scan's kernel half (BTF mode): the `iter/tcp` program `timewait_scan`, linked
//! once; each scan opens a new iterator on the link and reads it to the end.

use anyhow::Context as _;
use aya::{Btf, Ebpf};

use super::iterator::IterLink;

pub struct TimewaitScan {
    link: IterLink,
}

impl TimewaitScan {
    /// Loads the `iter/tcp` program and links it.
    pub fn load(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<Self> {
        let link = IterLink::load(ebpf, btf, "timewait_scan", "tcp")
            .context("failed to set up the timewait scan")?;
        Ok(Self { link })
    }

    /// Runs one scan: its records, back to back.
    pub fn run(&self, records: &mut Vec<u8>) -> anyhow::Result<()> {
        self.link.read(records).context("the timewait scan failed")
    }
}
