//! `cargo xtask soak`: many short connections under tcptrace, to show its memory stays flat. The
//! kernel side's maps are preallocated (the per-socket map is an LRU of `--max-sockets` entries),
//! so what could grow is tcptrace's own memory: sampled every second.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, ensure};

/// Memory growth allowed between the first sample after warm-up and the largest one.
const ALLOWED_GROWTH_KIB: u64 = 2048;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmRSS:")?
            .trim()
            .strip_suffix(" kB")?
            .parse()
            .ok()
    })
}

pub fn soak(root: &Path, connections: u64) -> anyhow::Result<()> {
    crate::cargo(root, &["build", "--release", "--package", "tcptrace"])?;
    let tcptrace = root.join("target/release/tcptrace");
    let (mut child, reader) =
        crate::bench::start_tcptrace(&tcptrace, &["--format", "json", "--output", "/dev/null"])?;
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let sampler_done = Arc::clone(&done);
    let sampler = thread::spawn(move || {
        let mut samples = Vec::new();
        while !sampler_done.load(Ordering::Relaxed) {
            if let Some(rss) = rss_kib(pid) {
                samples.push(rss);
            }
            thread::sleep(Duration::from_secs(1));
        }
        samples
    });
    let (made, seconds) =
        crate::bench::churn_until(Duration::from_secs(3600), connections, |_| {})?;
    thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
    let status = child.wait().context("failed to wait for tcptrace")?;
    let stderr = reader.join().unwrap_or_default();
    ensure!(status.success(), "tcptrace failed: {}", stderr.join("; "));
    let summary = stderr.last().cloned().unwrap_or_default();
    // The first two seconds are start-up (loading, first allocations).
    let steady = samples
        .get(2..)
        .filter(|s| !s.is_empty())
        .context("soak too short to sample")?;
    let (first, max, last) = (
        steady[0],
        *steady.iter().max().unwrap_or(&0),
        *steady.last().unwrap_or(&0),
    );
    println!(
        "tcptrace soak: {made} connections in {seconds:.0} s ({:.0}/s), JSON lines to /dev/null",
        made as f64 / seconds
    );
    println!("{:<36} {summary}", "tcptrace said");
    println!(
        "{:<36} {first} KiB -> {last} KiB (max {max} KiB, {} samples)",
        "tcptrace RSS, steady state",
        steady.len()
    );
    ensure!(
        max.saturating_sub(first) <= ALLOWED_GROWTH_KIB,
        "tcptrace's memory grew by {} KiB",
        max - first
    );
    Ok(())
}
