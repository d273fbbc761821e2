//! Transitions the kernel made without running tcptrace's state program: the kernel's own record
//! of `sock:inet_sock_set_state` (a tracefs instance of the test's) against the program's run
//! count (bpf_stats), host-wide, over the same window.
//!
//! On some kernels a tracepoint's BPF programs do not run for work done on top of certain tasks
//! (on the CI machines' kernel, softirq work on top of one host process that the kernel keeps out
//! of tracing: about one timer softirq transition in 300), and the kernel counts none of those
//! runs as misses, while ftrace still records the transition. A test that counts every event of a burst can only hold tcptrace
//! to the transitions its program ran for: this is the number it may be short by. On a kernel that
//! runs the program for every hit it is 0, and the test's count stays exact.

use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
};

use super::TempDir;

/// `BPF_ENABLE_STATS` and `BPF_STATS_RUN_TIME` (include/uapi/linux/bpf.h).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

pub struct Unseen {
    tracer_pid: u32,
    /// The state program's id, and its runs and counted misses when the window opened.
    program: u32,
    runs_at_start: u64,
    instance: PathBuf,
    /// Keeps run counting on while the window is open; closed, the kernel stops counting.
    _stats: OwnedFd,
    /// A tracefs mount of the test's own (it is unmounted when this goes).
    mount: TempDir,
}

impl Unseen {
    /// Opens the window on a tracer that is attached: from now on, every `inet_sock_set_state`
    /// hit is recorded by the kernel and every run of the tracer's state program counted.
    pub fn start(tracer_pid: u32) -> Self {
        let attr = BPF_STATS_RUN_TIME;
        // SAFETY: `bpf(BPF_ENABLE_STATS)` reads a `u32` type from the attribute union, which is
        // the size passed; it returns a new file descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                &attr as *const u32,
                size_of::<u32>() as u32,
            )
        };
        assert!(
            fd >= 0,
            "bpf(BPF_ENABLE_STATS): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
        let stats = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let program = state_program(tracer_pid);
        let mount = TempDir::new(&format!("tracefs-{program}"));
        super::sh(
            "mount",
            &["-t", "tracefs", "tracefs", mount.0.to_str().unwrap()],
        );
        let instance = mount.0.join("instances").join(format!(
            "tcptrace-test-unseen-{}-{program}",
            std::process::id()
        ));
        std::fs::create_dir(&instance).expect("create a tracefs instance");
        let mut unseen = Self {
            tracer_pid,
            program,
            runs_at_start: 0,
            instance,
            _stats: stats,
            mount,
        };
        // A small buffer, overwritten when full: what counts is the kernel's count of what it
        // recorded (entries plus what was overwritten), not the records.
        unseen.write("buffer_size_kb", "256");
        unseen.write("options/overwrite", "1");
        unseen.write("events/sock/inet_sock_set_state/enable", "1");
        unseen.write("tracing_on", "1");
        unseen.runs_at_start = unseen.runs();
        unseen
    }

    /// How many transitions the kernel recorded beyond the program's runs and the runs it
    /// skipped and counted (`recursion_misses`, which tcptrace reports as lost) since the window
    /// opened. Exact once the traffic is over; while transitions go on, what was recorded is
    /// read before the runs, so a transition in flight is never counted unseen.
    pub fn count(&self) -> u64 {
        let recorded = self.recorded();
        let runs = self.runs() - self.runs_at_start;
        recorded.saturating_sub(runs)
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.instance.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {file}: {e}"));
    }

    /// The state program's runs plus its counted misses, from the tracer's descriptor for it.
    fn runs(&self) -> u64 {
        program_runs(self.tracer_pid)
            .get(&self.program)
            .copied()
            .unwrap_or_else(|| panic!("tcptrace holds no state program {}", self.program))
    }

    /// What the instance recorded on every CPU, written over or not.
    fn recorded(&self) -> u64 {
        let per_cpu = std::fs::read_dir(self.instance.join("per_cpu")).expect("per_cpu");
        let mut total = 0;
        for cpu in per_cpu {
            let stats = std::fs::read_to_string(cpu.expect("per_cpu entry").path().join("stats"))
                .expect("per-CPU stats");
            for line in stats.lines() {
                let Some((name, value)) = line.split_once(": ") else {
                    continue;
                };
                if matches!(
                    name,
                    "entries" | "overrun" | "commit overrun" | "dropped events"
                ) {
                    total += value.trim().parse::<u64>().expect("a count");
                }
            }
        }
        total
    }
}

impl Drop for Unseen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.instance.join("tracing_on"), "0");
        let _ = std::fs::write(
            self.instance.join("events/sock/inet_sock_set_state/enable"),
            "0",
        );
        let _ = std::fs::remove_dir(&self.instance);
    }
}

/// Runs plus counted misses of the BPF programs a process holds descriptors for, by program id.
fn program_runs(pid: u32) -> BTreeMap<u32, u64> {
    let fdinfo = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo");
    let mut runs = BTreeMap::new();
    for entry in fdinfo.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(count)) = (field("prog_id:"), field("run_cnt:")) {
            // Older kernels have no miss count: none were counted there.
            let misses = field("recursion_misses:").unwrap_or(0);
            runs.insert(id as u32, count + misses);
        }
    }
    runs
}

/// The id of the tracer's program on `inet_sock_set_state`, in either mode. The kernel keeps 15
/// bytes of a program's name, so the names are matched as the kernel cut them.
fn state_program(tracer_pid: u32) -> u32 {
    const NAMES: [&str; 2] = ["inet_sock_set_state", "btf_inet_sock_set_state"];
    let held = program_runs(tracer_pid);
    let ids: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(|program| program.ok())
        .filter(|program| {
            program
                .name_as_str()
                .is_some_and(|name| NAMES.iter().any(|full| kernel_name(full) == name))
        })
        .map(|program| program.id())
        .filter(|id| held.contains_key(id))
        .collect();
    match ids.as_slice() {
        [id] => *id,
        _ => panic!("tcptrace {tracer_pid} holds {ids:?} programs on inet_sock_set_state"),
    }
}

/// A program's name as the kernel keeps it (`BPF_OBJ_NAME_LEN`, 16 bytes with the NUL).
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}
