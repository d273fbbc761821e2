//! BTF mode at start: the process holding each socket that predates tracing (see the kernel
//! side's `holders`). The task-file iterator records every TCP socket's holder; the TCP iterator
//! then moves each into its socket's storage, and writes the `--snapshot` records. The TCP
//! iterator walks one network namespace, so it runs once in each namespace a process is in.

use std::{
    collections::HashSet,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{Btf, Ebpf, maps::HashMap};
use tcptrace_common::{HOLDERS_MAP, Holder};

use super::iterator::IterLink;

/// What the start-up pass found.
pub struct Holders {
    /// `--snapshot` records, one per socket some process holds.
    pub records: Vec<u8>,
    /// Network namespaces with processes that could not be entered (permissions): their sockets
    /// get a holder at their first send or receive.
    pub unreached: usize,
}

/// Gives every socket some process holds its holder.
pub fn take(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<Holders> {
    let holders = IterLink::load(ebpf, btf, "snapshot_holders", "task_file")?;
    let sockets = IterLink::load(ebpf, btf, "snapshot_sockets", "tcp")?;
    let mut scratch = Vec::new();
    holders
        .read(&mut scratch)
        .context("the task-file iterator failed")?;

    let mut records = Vec::new();
    sockets
        .read(&mut records)
        .context("the TCP iterator failed")?;
    let mut unreached = 0;
    for netns in other_namespaces(Path::new("/proc")) {
        // A namespace whose last process just exited is gone, and with it its sockets.
        let Ok(file) = File::open(&netns) else {
            continue;
        };
        if sockets.read_in(&file, &mut records).is_err() {
            unreached += 1;
        }
    }

    // What is left: sockets closed meanwhile, or in namespaces not reached.
    let mut map: HashMap<_, u64, Holder> = HashMap::try_from(
        ebpf.map_mut(HOLDERS_MAP)
            .context("the eBPF object has no map HOLDERS")?,
    )?;
    let left: Vec<u64> = map.keys().filter_map(Result::ok).collect();
    for key in left {
        let _ = map.remove(&key);
    }
    Ok(Holders { records, unreached })
}

/// Where iproute2 keeps the namespaces it names (`ip netns add`): such a namespace lives on
/// with no process in it, and so do its sockets, which a process outside it may hold (one that
/// made them from a thread that had joined the namespace).
const NAMED_NAMESPACES: &str = "/run/netns";

/// One path per network namespace that some process is in (`/proc/PID/ns/net`) or that is
/// named (`/run/netns/NAME`), other than this process's.
fn other_namespaces(proc: &Path) -> Vec<PathBuf> {
    let mut namespaces = process_namespaces(proc);
    let inode = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    let mut seen: HashSet<_> = namespaces.iter().filter_map(|p| inode(p)).collect();
    seen.extend(inode(&proc.join("self/ns/net")));
    if let Ok(entries) = std::fs::read_dir(NAMED_NAMESPACES) {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Some(id) = inode(&path)
                && seen.insert(id)
            {
                namespaces.push(path);
            }
        }
    }
    namespaces
}

/// One `ns/net` path per network namespace that some process is in, other than this process's.
fn process_namespaces(proc: &Path) -> Vec<PathBuf> {
    let inode = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    let mut seen = HashSet::new();
    if let Some(own) = inode(&proc.join("self/ns/net")) {
        seen.insert(own);
    }
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut namespaces = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        if let Some(id) = inode(&path)
            && seen.insert(id)
        {
            namespaces.push(path);
        }
    }
    namespaces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_namespace_is_listed_once_and_not_our_own() {
        let namespaces = other_namespaces(Path::new("/proc"));
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let mut inodes: Vec<u64> = namespaces
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.ino())
            .collect();
        assert!(!inodes.contains(&own));
        let count = inodes.len();
        inodes.sort_unstable();
        inodes.dedup();
        assert_eq!(inodes.len(), count);
    }
}
