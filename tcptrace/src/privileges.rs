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

/// Whether reading the kernel side's counters after attaching still takes a capability: before
/// Linux 5.19, `kernel.unprivileged_bpf_disabled` (on by default in many distributions) refuses
/// every bpf() command to a process without CAP_BPF, map reads and program statistics included.
/// Fixed by c8644cd0efe7 ("bpf: refine kernel.unprivileged_bpf_disabled behaviour").
pub fn bpf_needed_after_attach() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let disabled =
        std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").unwrap_or_default();
    needs_bpf_after_attach(&release, &disabled)
}

fn needs_bpf_after_attach(release: &str, unprivileged_bpf_disabled: &str) -> bool {
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version < (5, 19) && unprivileged_bpf_disabled.trim() != "0"
}

/// Gives up every capability for good and sets no_new_privs: after attaching, tcptrace only
/// reads what it already holds open. Irreversible, also for anything tcptrace might execute.
/// With `keep_bpf` (see [`bpf_needed_after_attach`]) CAP_BPF stays in the effective and permitted
/// sets, or CAP_SYS_ADMIN where the process loaded with that instead.
pub fn drop_all(keep_bpf: bool) -> anyhow::Result<()> {
    let kept: u64 = if keep_bpf {
        let effective = effective_capabilities()?;
        if effective & (1 << CAP_BPF) != 0 {
            1 << CAP_BPF
        } else {
            effective & (1 << CAP_SYS_ADMIN)
        }
    } else {
        0
    };
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
        for cap in (0..=last_cap).filter(|&cap| kept & (1 << cap) == 0) {
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
    let data = [
        Data {
            effective: kept as u32,
            permitted: kept as u32,
            inheritable: 0,
        },
        Data {
            effective: (kept >> 32) as u32,
            permitted: (kept >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: a version-3 header and two data structs, as capset(2) expects.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("failed to drop capabilities");
    }
    if effective_capabilities()? != kept {
        bail!("capabilities remain after dropping them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::needs_bpf_after_attach;

    #[test]
    fn kernels_before_5_19_with_unprivileged_bpf_disabled_keep_cap_bpf() {
        assert!(needs_bpf_after_attach("5.10.0-28-amd64\n", "2\n"));
        assert!(needs_bpf_after_attach("5.18.19", "1"));
        assert!(!needs_bpf_after_attach("5.10.0-28-amd64", "0"));
        assert!(!needs_bpf_after_attach("5.19.0", "2"));
        assert!(!needs_bpf_after_attach("6.18.0", "2"));
    }
}
