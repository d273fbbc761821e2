//! BPF iterators run from userspace: a program linked once, read through a new iterator each
//! time. aya opens an iterator only by consuming its link, so the link and the iterators are made
//! here with the `bpf` syscall. An iterator over a network namespace's sockets (`iter/tcp`) walks
//! the namespace its reader was in when it was opened: [`IterLink::read_in`] opens it from a
//! thread that joined the namespace first.

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

/// An iterator program, loaded and linked.
pub struct IterLink {
    link: OwnedFd,
}

impl IterLink {
    /// Loads `program` for the iterator `target` ("tcp", "task_file") and links it.
    pub fn load(ebpf: &mut Ebpf, btf: &Btf, program: &str, target: &str) -> anyhow::Result<Self> {
        let iter: &mut Iter = ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
            .try_into()?;
        iter.load(target, btf)
            .with_context(|| format!("the kernel refused the {target} iterator"))?;
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
        let link = bpf(BPF_LINK_CREATE, &attr)
            .with_context(|| format!("failed to link the {target} iterator"))?;
        Ok(Self { link })
    }

    /// Runs the iterator once, in this thread's network namespace: its records, back to back.
    pub fn read(&self, records: &mut Vec<u8>) -> anyhow::Result<()> {
        let iterator = self.open().context("failed to open the iterator")?;
        records.clear();
        File::from(iterator)
            .read_to_end(records)
            .context("failed to run the iterator")?;
        Ok(())
    }

    /// Runs the iterator once in the network namespace `netns` (an open `/proc/PID/ns/net`),
    /// appending its records to `records`.
    pub fn read_in(&self, netns: &File, records: &mut Vec<u8>) -> anyhow::Result<()> {
        let iterator = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this thread only (a network namespace may be joined by one
                    // thread of a process); the thread ends right after.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error())
                            .context("failed to join the network namespace");
                    }
                    self.open().context("failed to open the iterator")
                })
                .join()
                .map_err(|_| anyhow!("the iterator's thread panicked"))?
        })?;
        File::from(iterator)
            .read_to_end(records)
            .context("failed to run the iterator")?;
        Ok(())
    }

    fn open(&self) -> std::io::Result<OwnedFd> {
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
        bpf(BPF_ITER_CREATE, &attr)
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
