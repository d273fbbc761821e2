//! What tcptrace needs from the kernel's privilege model, checked before anything is loaded, and
//! given up as soon as the programs are attached.
//!
//! Loading and attaching: `CAP_BPF` (programs, maps) and `CAP_PERFMON` (tracepoint perf events),
//! or `CAP_SYS_ADMIN` on its own. Reading tracefs: root's uid, or `CAP_DAC_READ_SEARCH`. Mounting
//! tracefs when nobody has: `CAP_SYS_ADMIN`. Once attached, nothing: the ring buffer is already
//! mapped and the maps are read through file descriptors tcptrace holds.

use anyhow::{Context as _, anyhow, bail};

/// Capability numbers (`include/uapi/linux/capability.h`).
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
/// The highest capability number this kernel knows, read from procfs; 63 if unreadable.
const CAP_LAST_CAP_FILE: &str = "/proc/sys/kernel/cap_last_cap";

fn effective_capabilities() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| anyhow!("no CapEff line in /proc/self/status"))
}

/// Refuses early, with the fix in the message, when the process cannot load BPF programs.
pub fn check() -> anyhow::Result<()> {
    let effective = effective_capabilities()?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect();
    bail!(
        "permission denied: tracing needs root, or the capabilities CAP_BPF and CAP_PERFMON \
         (missing: {}; and CAP_DAC_READ_SEARCH to read tracefs as another user); run it with sudo",
        missing.join(", ")
    );
}

/// Gives up every capability for good and sets no_new_privs: after attaching, tcptrace only
/// reads what it already holds open. Irreversible, also for anything tcptrace might execute.
pub fn drop_all() -> anyhow::Result<()> {
    // SAFETY: plain prctl calls with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("failed to set no_new_privs");
    }
    let last_cap: u32 = std::fs::read_to_string(CAP_LAST_CAP_FILE)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    // The bounding set first: dropping from it takes CAP_SETPCAP, which goes with the rest below.
    if effective_capabilities()? & (1 << CAP_SETPCAP) != 0 {
        for cap in 0..=last_cap {
            // SAFETY: as above. EINVAL for a capability the kernel lacks is harmless.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // capset(2) with empty effective, permitted and inheritable sets.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: a version-3 header and two data structs, as capset(2) expects.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("failed to drop capabilities");
    }
    if effective_capabilities()? != 0 {
        bail!("capabilities remain after dropping them");
    }
    Ok(())
}
