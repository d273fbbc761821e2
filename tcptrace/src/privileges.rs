//! What tcptrace needs from the kernel's privilege model, checked before anything is loaded, and
//! given up as soon as the programs are attached.
//!
//! Loading and attaching: `CAP_BPF` (programs, maps) and `CAP_PERFMON` (tracepoint perf events),
//! or `CAP_SYS_ADMIN` on its own. Reading tracefs: root's uid, or `CAP_DAC_READ_SEARCH`. Mounting
//! tracefs when nobody has: `CAP_SYS_ADMIN`. Once attached, nothing: the ring buffer is already
//! mapped and the maps are read through file descriptors tcptrace holds.

use anyhow::{Context as _, bail};
use caps::{CapSet, Capability, CapsHashSet};

/// What loading and attaching take: both of these, or `CAP_SYS_ADMIN` alone.
const TRACING: [Capability; 2] = [Capability::CAP_BPF, Capability::CAP_PERFMON];

/// The capabilities tcptrace cares about, in the order `--check` lists them, with what each is for.
pub const RELEVANT: [(Capability, &str); 4] = [
    (Capability::CAP_BPF, "load programs and create maps"),
    (Capability::CAP_PERFMON, "attach to tracepoints"),
    (
        Capability::CAP_SYS_ADMIN,
        "all of the above on its own; mount tracefs",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "read tracefs as a user other than root",
    ),
];

/// The calling thread's effective capabilities.
pub fn effective() -> anyhow::Result<CapsHashSet> {
    caps::read(None, CapSet::Effective).context("failed to read this process's capabilities")
}

/// Whether `effective` is enough to load and attach the programs.
pub fn can_trace(effective: &CapsHashSet) -> bool {
    effective.contains(&Capability::CAP_SYS_ADMIN) || TRACING.iter().all(|c| effective.contains(c))
}

/// Refuses early, with the fix in the message, when the process cannot load BPF programs.
pub fn check() -> anyhow::Result<()> {
    let effective = effective()?;
    if can_trace(&effective) {
        return Ok(());
    }
    let missing: Vec<String> = TRACING
        .iter()
        .filter(|c| !effective.contains(c))
        .map(ToString::to_string)
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
    let effective = effective()?;
    let kept: CapsHashSet = if !keep_bpf {
        CapsHashSet::new()
    } else if effective.contains(&Capability::CAP_BPF) {
        [Capability::CAP_BPF].into()
    } else {
        effective
            .intersection(&[Capability::CAP_SYS_ADMIN].into())
            .copied()
            .collect()
    };
    // SAFETY: a plain prctl call with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("failed to set no_new_privs");
    }
    // The bounding set first: dropping from it takes CAP_SETPCAP, which goes with the rest below.
    if effective.contains(&Capability::CAP_SETPCAP) {
        let bounding = caps::read(None, CapSet::Bounding)
            .context("failed to read the capability bounding set")?;
        for &cap in bounding.difference(&kept) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("failed to drop {cap} from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).context("failed to clear the ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable)
        .context("failed to clear the inheritable capabilities")?;
    // Effective before permitted: the effective set must stay within the permitted one.
    caps::set(None, CapSet::Effective, &kept).context("failed to drop capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("failed to drop capabilities")?;
    if self::effective()? != kept {
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
