//! The timewait scan's kernel half (BTF mode): the `iter/tcp` program, linked once; each scan
//! opens a new iterator on the link and reads it to the end. aya opens an iterator only by
//! consuming its link, so the link and the iterators are made here with the `bpf` syscall.

use std::{
    fs::File,
    io::Read as _,
    os::fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, anyhow};
use aya::{Btf, Ebpf, programs::Iter};

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

pub struct TimewaitScan {
    link: OwnedFd,
}

impl TimewaitScan {
    /// Loads the `iter/tcp` program and links it.
    pub fn load(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<Self> {
        let iter: &mut Iter = ebpf
            .program_mut("timewait_scan")
            .ok_or_else(|| anyhow!("the eBPF object has no program timewait_scan"))?
            .try_into()?;
        iter.load("tcp", btf)
            .context("the kernel refused the timewait scan")?;
        let program = iter.fd()?;
        /// `union bpf_attr` for `BPF_LINK_CREATE` (no iterator options).
        #[repr(C)]
        struct LinkCreate {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
            iter_info: u64,
            iter_info_len: u32,
            _pad: u32,
        }
        let attr = LinkCreate {
            prog_fd: program.as_fd().as_raw_fd() as u32,
            target_fd: 0,
            attach_type: BPF_TRACE_ITER,
            flags: 0,
            iter_info: 0,
            iter_info_len: 0,
            _pad: 0,
        };
        let link = bpf(BPF_LINK_CREATE, &attr).context("failed to link the timewait scan")?;
        Ok(Self { link })
    }

    /// Runs one scan: its records, back to back.
    pub fn run(&self, records: &mut Vec<u8>) -> anyhow::Result<()> {
        /// `union bpf_attr` for `BPF_ITER_CREATE`.
        #[repr(C)]
        struct IterCreate {
            link_fd: u32,
            flags: u32,
        }
        let attr = IterCreate {
            link_fd: self.link.as_raw_fd() as u32,
            flags: 0,
        };
        let iterator = bpf(BPF_ITER_CREATE, &attr).context("failed to open the timewait scan")?;
        records.clear();
        File::from(iterator)
            .read_to_end(records)
            .context("failed to run the timewait scan")?;
        Ok(())
    }
}

/// The `bpf` syscall for a command that returns a new file descriptor.
fn bpf<T>(command: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid `union bpf_attr` prefix of its size for `command`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_ref(attr),
            size_of::<T>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
