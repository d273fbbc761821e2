//! BTF mode: which network namespace and cgroup a socket belongs to, read from the socket itself
//! (so also for sockets that predate tracing), and the `--netns`, `--cgroup` and `--container`
//! filters on them. `--container` is matched by cgroup id, like `--cgroup`: the cgroups whose
//! names hold the container id are found when they are made (`cgroup_mkdir`) or, for those that
//! exist at start, by userspace; the name is compared once per cgroup, not per event.

use aya_ebpf::{
    helpers::generated::{bpf_probe_read_kernel, bpf_probe_read_kernel_str},
    programs::BtfTracePointContext,
};
use tcptrace_common::{
    CONTAINER_ID_OFFSETS, ContainerFilter, FILTER_CGROUP, FILTER_CONTAINER, FILTER_NETNS,
    KERNEL_CGROUP_TAGGED, KERNEL_HAS_CGROUP, KERNEL_HAS_NETNS, KernelOffsets, MAX_CGROUP_DEPTH,
};

use crate::{CGROUP_FILTER, CONTAINER_CGROUPS, CONTAINER_FILTER, NETNS_FILTER, OFFSETS};

/// The root cgroup's id on cgroup v2.
const ROOT_CGROUP_ID: u64 = 1;

/// A socket's network namespace and cgroup; zero (and a NULL node) when unknown.
pub struct Identity {
    /// Inode number of the network namespace.
    pub netns: u32,
    /// Cgroup v2 id.
    pub cgroup_id: u64,
    /// The cgroup's kernfs node, for the filters to climb from.
    kn: *const u8,
}

/// A value of type `T` at a kernel address; zero if it cannot be read.
#[inline(always)]
unsafe fn read<T: Copy + Default>(addr: *const u8) -> T {
    let mut out = T::default();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `out`, or zeroes it.
    unsafe {
        bpf_probe_read_kernel(
            core::ptr::addr_of_mut!(out).cast(),
            size_of::<T>() as u32,
            addr.cast(),
        )
    };
    out
}

/// A field of a kernel struct at a load-time offset, loaded directly from a BTF-typed pointer:
/// the verifier types a loaded pointer from BTF, and a NULL or bad one reads as zero.
#[inline(always)]
unsafe fn field<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: the caller passes a BTF-typed kernel pointer; the verifier checks the access.
    unsafe { base.add(offset as usize).cast::<T>().read_volatile() }
}

/// Reads the identity of socket `sk` (a BTF-typed `struct sock *`). Direct loads, no helper
/// calls, but on kernels before 5.15, whose socket holds its cgroup in a tagged word the verifier
/// cannot type.
#[inline(always)]
pub unsafe fn identity(offsets: &KernelOffsets, sk: *const u8) -> Identity {
    let mut id = Identity {
        netns: 0,
        cgroup_id: 0,
        kn: core::ptr::null(),
    };
    // SAFETY: BTF-typed pointers (or, for the tagged word, reads through the helper), at offsets
    // from this kernel's BTF.
    unsafe {
        if offsets.features & KERNEL_HAS_NETNS != 0 {
            let net: *const u8 = field(sk, offsets.skc_net);
            if !net.is_null() {
                id.netns = field(net, offsets.net_inum);
            }
        }
        if offsets.features & KERNEL_HAS_CGROUP == 0 {
            return id;
        }
        let kn: *const u8 = if offsets.features & KERNEL_CGROUP_TAGGED != 0 {
            let word: u64 = read(sk.add(offsets.sk_cgroup as usize));
            if word & 1 != 0 {
                // net_prio or net_cls data in place of the pointer: the default hierarchy's root.
                // https://elixir.bootlin.com/linux/v5.14/source/include/linux/cgroup-defs.h (sock_cgroup_ptr)
                id.cgroup_id = ROOT_CGROUP_ID;
                return id;
            }
            if word == 0 {
                return id;
            }
            let kn = read::<u64>((word as *const u8).add(offsets.cgroup_kn as usize)) as *const u8;
            if !kn.is_null() {
                id.cgroup_id = read(kn.add(offsets.kernfs_id as usize));
            }
            kn
        } else {
            let cgroup: *const u8 = field(sk, offsets.sk_cgroup);
            if cgroup.is_null() {
                return id;
            }
            let kn: *const u8 = field(cgroup, offsets.cgroup_kn);
            if !kn.is_null() {
                id.cgroup_id = field(kn, offsets.kernfs_id);
            }
            kn
        };
        id.kn = kn;
    }
    id
}

/// Whether the filters on namespaces, cgroups and containers keep a socket of this identity.
#[inline(always)]
pub fn identity_wanted(filters: u32, offsets: &KernelOffsets, id: &Identity) -> bool {
    if filters & (FILTER_NETNS | FILTER_CGROUP | FILTER_CONTAINER) == 0 {
        return true;
    }
    // SAFETY: plain integers.
    if filters & FILTER_NETNS != 0 && unsafe { NETNS_FILTER.get(id.netns) }.is_none() {
        return false;
    }
    let in_cgroup = || {
        // SAFETY: plain integers.
        unsafe { below(offsets, id, |cgroup| CGROUP_FILTER.get(cgroup).is_some()) }
    };
    let in_container = || {
        // SAFETY: plain integers.
        unsafe {
            below(offsets, id, |cgroup| {
                CONTAINER_CGROUPS.get(cgroup).is_some()
            })
        }
    };
    (filters & FILTER_CGROUP == 0 || in_cgroup())
        && (filters & FILTER_CONTAINER == 0 || in_container())
}

/// The socket's cgroup or one of its ancestors (up to [`MAX_CGROUP_DEPTH`] levels up) is one
/// `wanted` says yes to.
#[inline(always)]
unsafe fn below(offsets: &KernelOffsets, id: &Identity, wanted: impl Fn(u64) -> bool) -> bool {
    if wanted(id.cgroup_id) {
        return true;
    }
    let mut kn = id.kn;
    for _ in 0..MAX_CGROUP_DEPTH {
        if kn.is_null() {
            return false;
        }
        // SAFETY: read through the helper.
        kn = unsafe { read::<u64>(kn.add(offsets.kernfs_parent as usize)) } as *const u8;
        if kn.is_null() {
            return false;
        }
        if wanted(unsafe { read(kn.add(offsets.kernfs_id as usize)) }) {
            return true;
        }
    }
    false
}

/// `cgroup_mkdir(cgrp, path)`, attached with `--container`: a new cgroup v2 whose name holds the
/// container id (at one of [`CONTAINER_ID_OFFSETS`]) joins `CONTAINER_CGROUPS`, before any
/// process can enter it. Userspace adds those that exist at start.
pub fn cgroup_created(ctx: &BtfTracePointContext) {
    let cgroup: *const u8 = ctx.arg(0);
    let offsets = OFFSETS.load();
    // SAFETY: a BTF-typed cgroup pointer; offsets from this kernel's BTF.
    let (hierarchy, kn) = unsafe {
        let root: *const u8 = read::<u64>(cgroup.add(offsets.cgroup_root as usize)) as *const u8;
        (
            read::<i32>(root.add(offsets.root_hierarchy_id as usize)),
            read::<u64>(cgroup.add(offsets.cgroup_kn as usize)) as *const u8,
        )
    };
    // Hierarchy 0 is cgroup v2; ids of the v1 hierarchies are another numbering.
    if hierarchy != 0 || kn.is_null() {
        return;
    }
    // SAFETY: read through the helper.
    let (name, id) = unsafe {
        (
            read::<u64>(kn.add(offsets.kernfs_name as usize)) as *const u8,
            read::<u64>(kn.add(offsets.kernfs_id as usize)),
        )
    };
    if !name.is_null() && unsafe { name_holds(&CONTAINER_FILTER.load(), name) } {
        let _ = CONTAINER_CGROUPS.insert(id, 1, 0);
    }
}

/// `name` (a kernel string) holds the filter's prefix at one of [`CONTAINER_ID_OFFSETS`].
#[inline(always)]
unsafe fn name_holds(filter: &ContainerFilter, name: *const u8) -> bool {
    // Long enough that the length read covers a full id after the longest prefix (15 + 64).
    let mut buf = [0u64; 11];
    // SAFETY: at most the buffer's size; the string's length includes its NUL.
    let len = unsafe {
        bpf_probe_read_kernel_str(
            buf.as_mut_ptr().cast(),
            size_of_val(&buf) as u32,
            name.cast(),
        )
    };
    if len <= 0 {
        return false;
    }
    let chars = len as u32 - 1;
    let full = filter.len / 8;
    let rest = filter.len % 8;
    // The bytes of the last, partial word (little-endian: the low bytes come first).
    let mask = if rest == 0 {
        0
    } else {
        (1u64 << (rest * 8)) - 1
    };
    for offset in CONTAINER_ID_OFFSETS {
        // A prefix that would run past the name cannot be in it.
        if filter.len == 0 || offset + filter.len > chars {
            continue;
        }
        buf = [0; 11];
        // SAFETY: as above; the id is within the string, which is at least this long.
        unsafe {
            bpf_probe_read_kernel_str(
                buf.as_mut_ptr().cast(),
                size_of_val(&buf) as u32,
                name.add(offset as usize).cast(),
            )
        };
        let mut same = true;
        for w in 0..8 {
            if w < full as usize {
                same &= buf[w] == filter.words[w];
            } else if w == full as usize && rest != 0 {
                same &= buf[w] & mask == filter.words[w];
            }
        }
        if same {
            return true;
        }
    }
    false
}
