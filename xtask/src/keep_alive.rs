//! The bench's keep-alive load: one loopback connection carrying back-to-back 64-byte requests
//! and replies, untraced and traced in each mode in alternation. No state changes happen on it:
//! what BTF mode costs here beyond tracefs mode is what runs on every receive (the holder
//! refresh), timed by the kernel (`kernel.bpf_stats_enabled`).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use crate::bench::{pin_to_cpu, programs_stats, start_tcptrace};

const MESSAGE: usize = 64;

/// Round trips per second over one connection for `window`.
fn round_trips(window: Duration) -> anyhow::Result<f64> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("failed to bind the bench server")?;
    let addr = listener.local_addr()?;
    let server = thread::spawn(move || -> anyhow::Result<()> {
        pin_to_cpu(1);
        let (mut stream, _) = listener.accept().context("bench accept failed")?;
        let mut buf = [0; MESSAGE];
        // Echo until the client closes.
        while stream.read_exact(&mut buf).is_ok() {
            stream.write_all(&buf)?;
        }
        Ok(())
    });
    pin_to_cpu(0);
    let mut stream = TcpStream::connect(addr).context("bench connect failed")?;
    stream.set_nodelay(true)?;
    let mut buf = [b'k'; MESSAGE];
    let start = Instant::now();
    let mut trips = 0u64;
    while start.elapsed() < window {
        for _ in 0..64 {
            stream.write_all(&buf)?;
            stream.read_exact(&mut buf)?;
        }
        trips += 64;
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(stream);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("bench server panicked"))??;
    Ok(trips as f64 / seconds)
}

/// The keep-alive comparison: per mode, the traced/untraced ratio of each round, and the kernel
/// time per run of BTF mode's receive program.
pub struct KeepAlive {
    pub ratios: Vec<Vec<f64>>,
    pub refresh_ns: u64,
    pub refresh_runs: u64,
}

/// `pairs` rounds of an untraced keep-alive run, then one traced in each of `modes`.
pub fn compare(
    tcptrace: &Path,
    modes: &[&str],
    pairs: usize,
    window: Duration,
) -> anyhow::Result<KeepAlive> {
    round_trips(Duration::from_millis(300))?;
    let mut result = KeepAlive {
        ratios: vec![Vec::new(); modes.len()],
        refresh_ns: 0,
        refresh_runs: 0,
    };
    for pair in 0..pairs {
        let untraced = round_trips(window)?;
        let mut line = format!(
            "xtask: keep-alive round {}: untraced {untraced:.0} round trips/s",
            pair + 1
        );
        for (i, mode) in modes.iter().enumerate() {
            let (mut child, reader) = start_tcptrace(
                tcptrace,
                &["--mode", mode, "--format", "json", "--output", "/dev/null"],
            )?;
            let traced = round_trips(window);
            let (ns, runs) = programs_stats(&["btf_sock_recv_length"]);
            result.refresh_ns += ns;
            result.refresh_runs += runs;
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let status = child.wait()?;
            let stderr = reader.join().unwrap_or_default();
            ensure!(status.success(), "tcptrace failed: {}", stderr.join("; "));
            let traced = traced?;
            line.push_str(&format!(", {mode} {traced:.0} ({:.3})", traced / untraced));
            result.ratios[i].push(traced / untraced);
        }
        eprintln!("{line}");
    }
    Ok(result)
}
