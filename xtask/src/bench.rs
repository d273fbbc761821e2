//! `cargo xtask bench`: what tracing costs the host. Loopback connection churn (connect, 1-byte
//! request, 1-byte reply, close) from one client thread to one server thread, run untraced and
//! traced in alternation, and the median of the per-pair ratios reported. Traced: BTF mode four
//! times, from the floor (the programs attached, returning at once) to JSON lines to a file as
//! users run it, so that each step's cost shows (`CHURN_RUNS`), and tracefs mode. Also: events
//! written against expected, events lost, the kernel's time per program run (`bpf_stats`),
//! tcptrace's CPU time per event while it traces and to start and stop, its peak RSS, the
//! consumer's decode+format throughput, a keep-alive load's traced/untraced ratio
//! (`keep_alive`), and the same churn with `tcptrace top` drawing on a terminal (`pty`).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// State transitions per connection: five on each side.
const EVENTS_PER_CONNECTION: u64 = 10;

pub struct Options {
    pub pairs: usize,
    pub seconds: f64,
    /// A short smoke run for CI: checks that every event is accounted for, not speed.
    pub quick: bool,
    /// Pin the client thread to CPU 0 and the server thread to CPU 1: every core is then busy
    /// with the workload, so whatever tracing costs shows in full and runs vary less.
    pub pin: bool,
}

impl Options {
    /// One pair of one second: checks that the bench runs and accounts for every event.
    pub const QUICK: Self = Self {
        pairs: 1,
        seconds: 1.0,
        quick: true,
        pin: true,
    };
}

/// Whether the churn's threads are pinned (`--no-pin` turns it off).
static PIN: AtomicBool = AtomicBool::new(true);

/// One traced run.
struct Traced {
    connections: u64,
    seconds: f64,
    /// The bench's own lines in the file (runs that write one).
    written: u64,
    /// Events tcptrace took from the ring buffer, the whole host's (its exit summary).
    handled: u64,
    lost: u64,
    /// CPU time in all, start and stop included.
    cpu_seconds: f64,
    /// CPU time while the churn ran, and the 200 ms after it.
    tracing_cpu_ns: u64,
    peak_rss_kib: u64,
    /// Kernel time and runs of the state program (with `kernel.bpf_stats_enabled`).
    program_ns: u64,
    program_runs: u64,
    /// Kernel time and runs of the listen drop program (`kfree_skb`), where it runs.
    drop_program_ns: u64,
    drop_program_runs: u64,
    /// Kernel time of every program that runs per packet or state change.
    all_programs_ns: u64,
}

/// The modes compared, side by side in one run.
const MODES: [&str; 2] = ["btf", "tracefs"];

/// One of the churn's traced runs.
struct ChurnRun {
    name: &'static str,
    args: &'static [&'static str],
    /// The programs on tracepoints return at once (the floor).
    empty_programs: bool,
    /// Every event is written as a JSON line to a file, and the bench counts them.
    written: bool,
}

/// The churn's traced runs, side by side in each round. BTF mode four times, each doing more than
/// the one before: what an event costs, from the floor up. Programs attached and returning at
/// once; the state program keeping owners and emitting nothing (`--events retransmits`, none of
/// which the churn makes); every event emitted, decoded and followed but not formatted or written
/// (`--format none`); and as users run it, JSON lines to a file with TIME_WAIT followed. Then
/// tracefs mode as users run it.
const CHURN_RUNS: [ChurnRun; 5] = [
    ChurnRun {
        name: "btf mode, empty programs (the floor)",
        args: &["--mode", "btf", "--format", "none"],
        empty_programs: true,
        written: false,
    },
    ChurnRun {
        name: "btf mode, owners kept, nothing emitted",
        args: &[
            "--mode",
            "btf",
            "--format",
            "none",
            "--events",
            "retransmits",
        ],
        empty_programs: false,
        written: false,
    },
    ChurnRun {
        name: "btf mode, emitted, not written",
        args: &["--mode", "btf", "--format", "none"],
        empty_programs: false,
        written: false,
    },
    ChurnRun {
        name: "btf mode, JSON lines to a file (as users run it)",
        args: &["--mode", "btf"],
        empty_programs: false,
        written: true,
    },
    ChurnRun {
        name: "tracefs mode, JSON lines to a file",
        args: &["--mode", "tracefs"],
        empty_programs: false,
        written: true,
    },
];

/// The first runs of [`CHURN_RUNS`], BTF mode's steps, which the budget table lines up.
const BUDGET_RUNS: usize = 4;

pub fn bench(root: &Path, options: &Options) -> anyhow::Result<()> {
    crate::cargo(
        root,
        &[
            "build",
            "--release",
            "--package",
            "tcptrace",
            "--bins",
            "--examples",
        ],
    )?;
    let tcptrace = root.join("target/release/tcptrace");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let window = Duration::from_secs_f64(options.seconds);
    PIN.store(options.pin, Ordering::Relaxed);
    let _stats = BpfStats::enable();

    // Warm up: the first connections of a fresh run pay for port allocation and caches.
    churn(Duration::from_millis(500))?;
    let mut ratios = vec![Vec::new(); CHURN_RUNS.len()];
    let mut traced_runs: Vec<Vec<Traced>> = CHURN_RUNS.iter().map(|_| Vec::new()).collect();
    let mut top_runs = Vec::new();
    for pair in 0..options.pairs {
        let (base_conns, base_secs) = churn(window)?;
        let untraced = base_conns as f64 / base_secs;
        let mut line = format!("xtask: round {}: untraced {untraced:.0} conn/s", pair + 1);
        for (i, churn_run) in CHURN_RUNS.iter().enumerate() {
            let output = dir.join(format!("events-{pair}-{i}.json"));
            let run = traced(&tcptrace, churn_run, &output, window)?;
            let rate = run.connections as f64 / run.seconds;
            line.push_str(&format!(", run {} {:.3}", i + 1, rate / untraced));
            ratios[i].push(rate / untraced);
            traced_runs[i].push(run);
        }
        // The view: `tcptrace top` on a terminal, in the same round (the host's timewait
        // sockets, which every run adds to, weigh on each alike).
        let run = traced_top(&tcptrace, window)?;
        let rate = run.connections as f64 / run.seconds;
        line.push_str(&format!(", top {rate:.0} conn/s ({:.3})", rate / untraced));
        top_runs.push((rate / untraced, run));
        eprintln!("{line}");
    }
    let mut keep_alive = crate::keep_alive::compare(&tcptrace, &MODES, options.pairs, window)?;
    let consumer = consumer_throughput(root, if options.quick { 200_000 } else { 5_000_000 })?;

    println!(
        "tcptrace bench: {} rounds of {:.1} s per run, loopback churn ({}), JSON lines to a file",
        options.pairs,
        options.seconds,
        if options.pin {
            "client and server pinned to CPUs 0 and 1"
        } else {
            "threads not pinned"
        }
    );
    let mut failures = Vec::new();
    let mut budget = Vec::new();
    for (i, churn_run) in CHURN_RUNS.iter().enumerate() {
        let runs = &traced_runs[i];
        let ratios = &mut ratios[i];
        let median = median(ratios);
        let connections: u64 = runs.iter().map(|r| r.connections).sum();
        let written: u64 = runs.iter().map(|r| r.written).sum();
        let handled: u64 = runs.iter().map(|r| r.handled).sum();
        let lost: u64 = runs.iter().map(|r| r.lost).sum();
        let tracing_ns: u64 = runs.iter().map(|r| r.tracing_cpu_ns).sum();
        let total_cpu: f64 = runs.iter().map(|r| r.cpu_seconds).sum();
        let peak_rss = runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
        let (run_ns, runs_counted) = runs
            .iter()
            .fold((0, 0), |(ns, n), r| (ns + r.program_ns, n + r.program_runs));
        let kernel_ns: u64 = runs.iter().map(|r| r.all_programs_ns).sum();
        let expected = connections * EVENTS_PER_CONNECTION;
        let per_event = |ns: u64| ns as f64 / expected.max(1) as f64;
        let pairs = ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!("{}. {}:", i + 1, churn_run.name);
        println!(
            "  {:<44} {median:.3} (median; rounds: {pairs})",
            "traced/untraced connections per second"
        );
        if churn_run.written {
            println!(
                "  {:<44} {written} of {expected} expected",
                "events written"
            );
        } else {
            println!(
                "  {:<44} {handled} ({expected} of the bench's own)",
                "events taken from the ring buffer"
            );
        }
        println!("  {:<44} {lost}", "events lost");
        println!(
            "  {:<44} {}",
            "kernel ns per state program run",
            if runs_counted > 0 {
                format!(
                    "{:.0} ({runs_counted} runs)",
                    run_ns as f64 / runs_counted as f64
                )
            } else {
                "not measured (kernel.bpf_stats_enabled unavailable)".to_owned()
            }
        );
        let (drop_ns, drop_runs) = runs.iter().fold((0, 0), |(ns, n), r| {
            (ns + r.drop_program_ns, n + r.drop_program_runs)
        });
        if drop_runs > 0 {
            println!(
                "  {:<44} {:.0} ({drop_runs} runs)",
                "kernel ns per listen drop program run",
                drop_ns as f64 / drop_runs as f64
            );
        }
        println!(
            "  {:<44} {:.0}",
            "kernel ns per event, all programs",
            per_event(kernel_ns)
        );
        println!(
            "  {:<44} {:.0}",
            "tcptrace CPU ns per event while tracing",
            per_event(tracing_ns)
        );
        println!(
            "  {:<44} {:.0} ms per run",
            "tcptrace CPU to start and stop",
            (total_cpu * 1e9 - tracing_ns as f64).max(0.0) / 1e6 / runs.len().max(1) as f64
        );
        println!(
            "  {:<44} {:.1} MiB",
            "tcptrace peak RSS",
            peak_rss as f64 / 1024.0
        );
        budget.push((
            churn_run.name,
            median,
            per_event(kernel_ns),
            per_event(tracing_ns),
        ));
        // Every event of the bench's connections is written, or counted lost (lost counts the
        // whole host's events, so it may exceed what the bench missed).
        if churn_run.written && !(written <= expected && written + lost >= expected) {
            failures.push(format!(
                "{} wrote {written} and lost {lost} events for {connections} connections ({expected} expected)",
                churn_run.name
            ));
        }
    }
    println!("the budget of an event, BTF mode (ns per state change of the churn):");
    // The last column: the ratio the step costs over the one before (the first: over untraced);
    // below a few hundredths it is within the rounds' spread.
    println!(
        "  {:<50} {:>6} {:>8} {:>10} {:>9}",
        "", "ratio", "kernel", "tcptrace", "step"
    );
    let mut before = 1.0;
    for &(name, ratio, kernel, user) in budget.iter().take(BUDGET_RUNS) {
        println!(
            "  {name:<50} {ratio:>6.3} {kernel:>8.0} {user:>10.0} {:>9.3}",
            before - ratio
        );
        before = ratio;
    }
    let mut top_ratios: Vec<f64> = top_runs.iter().map(|(ratio, _)| *ratio).collect();
    let top_events: u64 = top_runs
        .iter()
        .map(|(_, r)| r.connections * EVENTS_PER_CONNECTION)
        .sum();
    let top_ns: u64 = top_runs.iter().map(|(_, r)| r.tracing_cpu_ns).sum();
    let top_rss = top_runs
        .iter()
        .map(|(_, r)| r.peak_rss_kib)
        .max()
        .unwrap_or(0);
    println!(
        "btf mode, tcptrace top (the view on a {}x{} terminal, redrawn every second):",
        crate::pty::COLUMNS,
        crate::pty::ROWS
    );
    println!(
        "  {:<44} {:.3} (median; rounds: {})",
        "traced/untraced connections per second",
        median(&mut top_ratios),
        top_ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  {:<44} {:.0}",
        "tcptrace CPU ns per event while tracing",
        top_ns as f64 / top_events.max(1) as f64
    );
    println!(
        "  {:<44} {:.1} MiB",
        "tcptrace peak RSS",
        top_rss as f64 / 1024.0
    );
    println!("keep-alive (one connection, 64-byte request and reply, no state changes):");
    for (mode, ratios) in MODES.iter().zip(&mut keep_alive.ratios) {
        let rounds = ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "  {:<44} {:.3} (median; rounds: {rounds})",
            format!("{mode} traced/untraced round trips per second"),
            median(ratios)
        );
    }
    if keep_alive.refresh_runs > 0 {
        println!(
            "  {:<44} {:.0} ({} runs)",
            "kernel ns per receive program run",
            keep_alive.refresh_ns as f64 / keep_alive.refresh_runs as f64,
            keep_alive.refresh_runs
        );
    }
    println!(
        "{:<46} {:.0} events/s",
        "consumer (decode + JSON, one core)", consumer
    );
    // Kernel-side logging is a load-time constant: off, the verifier drops its code.
    let mut sizes = Vec::new();
    for debug in [false, true] {
        let mut args = vec!["--mode", "btf", "--format", "none"];
        if debug {
            args.push("--debug");
        }
        let (mut child, reader) = start_tcptrace(&tcptrace, &args)?;
        sizes.push(program_size());
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        child.wait()?;
        let _ = reader.join();
    }
    println!(
        "{:<46} {} bytes translated with logging off, {} with --debug",
        "BTF-mode state program", sizes[0], sizes[1]
    );
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}

/// The median of some ratios (sorted in place).
fn median(ratios: &mut [f64]) -> f64 {
    ratios.sort_by(f64::total_cmp);
    match ratios.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => ratios[n / 2],
        n => (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0,
    }
}

/// `kernel.bpf_stats_enabled` on while this lives (the kernel then times every program run),
/// restored when dropped.
struct BpfStats {
    before: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Self {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        if before.is_some() {
            let _ = std::fs::write(BPF_STATS, "1");
        }
        Self { before }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = std::fs::write(BPF_STATS, before.trim());
        }
    }
}

/// Translated size of the BTF-mode state program loaded now, from bpftool.
fn program_size() -> u64 {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .split("},{")
        .find(|p| p.contains("\"name\":\"btf_inet_sock_set_state\""))
        .and_then(|p| {
            p.split("\"bytes_xlated\":")
                .nth(1)?
                .split([',', '}'])
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Total run time (ns) and run count of the state-transition programs loaded now (the bench's
/// tcptrace, the only one running), from bpftool.
fn program_stats() -> (u64, u64) {
    programs_stats(&["btf_inet_sock_set_state", "inet_sock_set_state"])
}

/// Total run time (ns) and run count of the programs of these names loaded now, from bpftool.
pub fn programs_stats(names: &[&str]) -> (u64, u64) {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        return (0, 0);
    };
    let Ok(text) = String::from_utf8(out.stdout) else {
        return (0, 0);
    };
    // One object per program; a small scan keeps xtask free of a JSON dependency.
    let mut total = (0, 0);
    for program in text.split("},{") {
        if names
            .iter()
            .any(|name| program.contains(&format!("\"name\":\"{name}\"")))
        {
            let number = |key: &str| {
                program
                    .split(&format!("\"{key}\":"))
                    .nth(1)
                    .and_then(|rest| rest.split([',', '}']).next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            total.0 += number("run_time_ns");
            total.1 += number("run_cnt");
        }
    }
    total
}

/// Runs the churn for `window` and returns (connections completed, seconds taken).
fn churn(window: Duration) -> anyhow::Result<(u64, f64)> {
    churn_on(window, |_| {})
}

fn churn_on(window: Duration, on_port: impl FnOnce(u16)) -> anyhow::Result<(u64, f64)> {
    churn_until(window, u64::MAX, on_port)
}

/// Churns until `window` has passed or `max_connections` were made, whichever comes first.
pub fn churn_until(
    window: Duration,
    max_connections: u64,
    on_port: impl FnOnce(u16),
) -> anyhow::Result<(u64, f64)> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("failed to bind the bench server")?;
    let addr = listener.local_addr()?;
    on_port(addr.port());
    let listener_fd = listener.as_raw_fd();
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = Arc::clone(&stop);
    let server = thread::spawn(move || {
        pin_to_cpu(1);
        serve(&listener, &server_stop)
    });
    pin_to_cpu(0);
    let start = Instant::now();
    let mut connections = 0;
    let result = loop {
        if connections >= max_connections || start.elapsed() >= window {
            break Ok(());
        }
        if let Err(e) = one_connection(addr) {
            break Err(e);
        }
        connections += 1;
    };
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // Wake the server out of accept() without a connection of its own: on Linux, shutting a
    // listening socket down makes accept() fail.
    // SAFETY: the listener is open until the server thread, joined below, returns.
    unsafe { libc::shutdown(listener_fd, libc::SHUT_RDWR) };
    server
        .join()
        .map_err(|_| anyhow::anyhow!("bench server panicked"))??;
    result?;
    Ok((connections, seconds))
}

/// Keeps the client and the server on their own CPU, so runs differ by tracing, not by where the
/// scheduler happened to put the two threads.
pub fn pin_to_cpu(cpu: usize) {
    if !PIN.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % num_cpus(), &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn num_cpus() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

fn one_connection(addr: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr).context("bench connect failed")?;
    let mut byte = [b'q'];
    stream.write_all(&byte)?;
    stream.read_exact(&mut byte)?;
    // The server closes first, so TIME_WAIT lands on its side: the client's ephemeral ports never
    // run out, and the churn is bound by CPU rather than by port reuse.
    while stream.read(&mut byte)? > 0 {}
    Ok(())
}

fn serve(listener: &TcpListener, stop: &AtomicBool) -> anyhow::Result<()> {
    loop {
        let (mut stream, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
            Err(e) => return Err(e).context("bench accept failed"),
        };
        let mut byte = [0];
        stream.read_exact(&mut byte)?;
        stream.write_all(&byte)?;
    }
}

/// Starts tcptrace and waits until it traces; the thread collects its stderr lines.
pub fn start_tcptrace(
    tcptrace: &Path,
    args: &[&str],
) -> anyhow::Result<(Child, thread::JoinHandle<Vec<String>>)> {
    let mut command = Command::new(tcptrace);
    command.args(args);
    start(command, tcptrace)
}

/// Starts `command` (tcptrace) and waits until it traces; the thread collects its stderr lines.
fn start(
    mut command: Command,
    tcptrace: &Path,
) -> anyhow::Result<(Child, thread::JoinHandle<Vec<String>>)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {}", tcptrace.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("tcptrace: tracing (") {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "tcptrace did not start: {}",
            reader.join().unwrap_or_default().join("; ")
        );
    }
    Ok((child, reader))
}

/// One churn window with tcptrace running as `run` says.
fn traced(
    tcptrace: &Path,
    run: &ChurnRun,
    output: &PathBuf,
    window: Duration,
) -> anyhow::Result<Traced> {
    let _ = std::fs::remove_file(output);
    let output_arg = output.to_string_lossy();
    let mut command = Command::new(tcptrace);
    command.args(run.args);
    if run.written {
        command.args(["--format", "json", "--output", &output_arg]);
    }
    if run.empty_programs {
        command.env("TCPTRACE_BENCH_EMPTY_PROGRAMS", "1");
    }
    let (child, reader) = start(command, tcptrace)?;
    let pid = child.id();
    let cpu_before = process_cpu_ns(pid);
    let mut port = 0;
    let (connections, seconds) = churn_on(window, |p| port = p)?;
    // What the ring buffer still holds is drained within a tick.
    thread::sleep(Duration::from_millis(200));
    let tracing_cpu_ns = process_cpu_ns(pid).saturating_sub(cpu_before);
    // tcptrace's own high-water mark (wait4's ru_maxrss would also count the image it was
    // spawned from).
    let peak_rss_kib = peak_rss_kib(pid)?;
    let (program_ns, program_runs) = program_stats();
    let (drop_program_ns, drop_program_runs) = programs_stats(&["btf_kfree_skb"]);
    let (all_programs_ns, _) = programs_stats(&PER_EVENT_PROGRAMS);
    let (status, cpu_seconds) = stop(pid, libc::SIGINT)?;
    let stderr = reader.join().unwrap_or_default();
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "tcptrace failed: {}",
        stderr.join("; ")
    );
    // `tcptrace: N events written, M events lost[, more][; listen drops]`.
    let summary = stderr
        .iter()
        .rev()
        .find_map(|l| {
            let mut counts = l.strip_prefix("tcptrace: ")?.split(';').next()?.split(", ");
            let handled = counts
                .next()?
                .strip_suffix(" events written")?
                .parse()
                .ok()?;
            let lost = counts.next()?.strip_suffix(" events lost")?.parse().ok()?;
            Some((handled, lost))
        })
        .with_context(|| format!("no summary from tcptrace: {}", stderr.join("; ")))?;
    let (handled, lost) = summary;
    let written = if run.written {
        count_written(output, port)?
    } else {
        0
    };
    Ok(Traced {
        connections,
        seconds,
        written,
        handled,
        lost,
        cpu_seconds,
        tracing_cpu_ns,
        peak_rss_kib,
        program_ns,
        program_runs,
        drop_program_ns,
        drop_program_runs,
        all_programs_ns,
    })
}

/// The programs that run for the churn's packets and state changes, BTF and tracefs mode.
const PER_EVENT_PROGRAMS: [&str; 6] = [
    "btf_inet_sock_set_state",
    "inet_sock_set_state",
    "btf_kfree_skb",
    "btf_sock_recv_length",
    "btf_tcp_send_reset",
    "btf_inet_sk_error_report",
];

/// The bench's own connections' lines in `output`, then removed: other traffic on the host is
/// traced too.
fn count_written(output: &Path, port: u16) -> anyhow::Result<u64> {
    let file = std::fs::File::open(output)
        .with_context(|| format!("failed to read {}", output.display()))?;
    let (sport, dport) = (format!("\"sport\":{port},"), format!("\"dport\":{port},"));
    let written = BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|l| {
            l.starts_with("{\"type\":\"state\"") && (l.contains(&sport) || l.contains(&dport))
        })
        // The listener's own CLOSE -> LISTEN and LISTEN -> CLOSE are not the connections'. Nor
        // is the end of a server side's TIME_WAIT that a client port used again ended early
        // (BTF mode): its FIN_WAIT2 -> TIME_WAIT is the connection's tenth line.
        .filter(|l| {
            !l.contains("\"newstate\":\"LISTEN\"")
                && !l.contains("\"oldstate\":\"LISTEN\",\"newstate\":\"CLOSE\"")
                && !l.contains("\"oldstate\":\"TIME_WAIT\"")
        })
        .count() as u64;
    // Written and counted; the next run should not pay for writing it back to disk.
    let _ = std::fs::remove_file(output);
    Ok(written)
}

/// Signals our child tcptrace `pid` and reaps it: its wait status and the CPU time (user and
/// system, seconds) it used in all.
fn stop(pid: u32, signal: libc::c_int) -> anyhow::Result<(libc::c_int, f64)> {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage; wait4 fills it for our child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    ensure!(
        waited > 0,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    let cpu = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((status, cpu(usage.ru_utime) + cpu(usage.ru_stime)))
}

/// CPU time a process's threads have used so far, in nanoseconds (`schedstat`, exact where
/// `/proc/PID/stat` counts ticks).
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One churn window with `tcptrace top` drawing on a terminal of its own (BTF mode, the census
/// on): what the view costs next to the JSON stream.
fn traced_top(tcptrace: &Path, window: Duration) -> anyhow::Result<Traced> {
    let mut command = Command::new(tcptrace);
    command.args(["top", "--mode", "btf"]);
    let mut top = crate::pty::OnPty::spawn(command)?;
    // The view is up once the programs are attached; its title says so.
    let started = Instant::now();
    while !top.drawn() {
        if started.elapsed() > Duration::from_secs(20) || top.child.try_wait()?.is_some() {
            let _ = top.child.kill();
            let _ = top.child.wait();
            bail!("tcptrace top did not start: {}", top.tail());
        }
        thread::sleep(Duration::from_millis(20));
    }
    let pid = top.child.id();
    let cpu_before = process_cpu_ns(pid);
    let (connections, seconds) = churn(window)?;
    thread::sleep(Duration::from_millis(200));
    let tracing_cpu_ns = process_cpu_ns(pid).saturating_sub(cpu_before);
    let peak_rss_kib = peak_rss_kib(pid)?;
    let (program_ns, program_runs) = program_stats();
    let (all_programs_ns, _) = programs_stats(&PER_EVENT_PROGRAMS);
    let (status, cpu_seconds) = stop(pid, libc::SIGTERM)?;
    let tail = top.tail();
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "tcptrace top failed: {tail}"
    );
    Ok(Traced {
        connections,
        seconds,
        written: 0,
        handled: 0,
        lost: 0,
        cpu_seconds,
        tracing_cpu_ns,
        peak_rss_kib,
        program_ns,
        program_runs,
        drop_program_ns: 0,
        drop_program_runs: 0,
        all_programs_ns,
    })
}

/// A process's resident-memory high-water mark (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .context("no VmHWM in tcptrace's /proc status")
}

fn consumer_throughput(root: &Path, events: u64) -> anyhow::Result<f64> {
    let out = Command::new(root.join("target/release/examples/consumer_throughput"))
        .arg(events.to_string())
        .output()
        .context("failed to run the consumer benchmark")?;
    ensure!(
        out.status.success(),
        "consumer benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("events_per_second ")?.parse().ok())
        .context("consumer benchmark printed no figure")
}

/// `cargo xtask bench --startup`: tcptrace starting on a host that already holds `connections`
/// established loopback connections (two sockets each): how long until it traces, its peak
/// memory, and (with `--snapshot`) that every socket is listed.
pub fn startup(root: &Path, connections: usize) -> anyhow::Result<()> {
    crate::cargo(
        root,
        &["build", "--release", "--package", "tcptrace", "--bins"],
    )?;
    let tcptrace = root.join("target/release/tcptrace");
    // A process may hold only so many descriptors: the connections are spread over holders.
    let holders = Holders::start(connections)?;
    let ports = holders.ports.clone();
    let sockets = 2 * connections;
    println!(
        "tcptrace startup bench: {connections} established loopback connections ({sockets} sockets) open in {} processes",
        ports.len()
    );
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let output = dir.join("startup.json");
    for snapshot in [false, true] {
        let _ = std::fs::remove_file(&output);
        let output_arg = output.to_string_lossy();
        let mut args = vec!["--mode", "btf", "--format", "json", "--output", &output_arg];
        if snapshot {
            args.push("--snapshot");
        }
        let start = Instant::now();
        let (child, reader) = start_tcptrace(&tcptrace, &args)?;
        let ready = start.elapsed();
        thread::sleep(Duration::from_millis(500));
        let peak_rss_kib = peak_rss_kib(child.id())?;
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let mut child = child;
        child.wait()?;
        let _ = reader.join();
        let listed = if snapshot {
            let file = std::fs::File::open(&output)?;
            BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter(|l| {
                    l.starts_with("{\"type\":\"socket\"")
                        && ports.iter().any(|p| {
                            l.contains(&format!("\"sport\":{p},"))
                                || l.contains(&format!("\"dport\":{p},"))
                        })
                        && l.contains("\"state\":\"ESTABLISHED\"")
                })
                .count()
        } else {
            0
        };
        let what = if snapshot {
            "with --snapshot"
        } else {
            "without --snapshot"
        };
        println!(
            "  {what:<22} tracing after {:.2} s, peak RSS {:.1} MiB{}",
            ready.as_secs_f64(),
            peak_rss_kib as f64 / 1024.0,
            if snapshot {
                format!(", {listed} of {sockets} sockets listed")
            } else {
                String::new()
            }
        );
        if snapshot {
            ensure!(
                listed == sockets,
                "the snapshot listed {listed} of {sockets} sockets"
            );
        }
    }
    let _ = std::fs::remove_file(&output);
    drop(holders);
    Ok(())
}

/// Child processes holding both ends of the startup bench's connections, each with a listener
/// of its own; they exit when dropped (their pipe closes).
struct Holders {
    children: Vec<libc::pid_t>,
    ports: Vec<u16>,
    /// Closing it tells the children to exit.
    release: Option<std::fs::File>,
}

impl Holders {
    /// Connections per child: two descriptors each, under the usual 20,000 descriptor limit.
    const PER_CHILD: usize = 9_000;

    fn start(connections: usize) -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        let pipe = || -> anyhow::Result<(std::fs::File, std::fs::File)> {
            let mut fds = [0; 2];
            // SAFETY: a valid array of two descriptors.
            ensure!(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, "pipe failed");
            // SAFETY: fresh descriptors we own.
            Ok(unsafe {
                (
                    std::fs::File::from_raw_fd(fds[0]),
                    std::fs::File::from_raw_fd(fds[1]),
                )
            })
        };
        let (ready_read, ready_write) = pipe()?;
        let (release_read, release_write) = pipe()?;
        let mut holders = Self {
            children: Vec::new(),
            ports: Vec::new(),
            release: Some(release_write),
        };
        let mut left = connections;
        while left > 0 {
            let count = left.min(Self::PER_CHILD);
            left -= count;
            // SAFETY: xtask is single-threaded here; the child only uses the pipes and sockets
            // and leaves with _exit.
            match unsafe { libc::fork() } {
                0 => {
                    drop(holders.release.take());
                    let code = match hold(count, &ready_write, &release_read) {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("xtask: startup holder: {e:#}");
                            1
                        }
                    };
                    // SAFETY: ends the child without running the parent's destructors.
                    unsafe { libc::_exit(code) };
                }
                -1 => bail!("fork failed: {}", std::io::Error::last_os_error()),
                child => holders.children.push(child),
            }
        }
        drop(ready_write);
        drop(release_read);
        let mut ready = ready_read;
        for _ in 0..holders.children.len() {
            let mut port = [0u8; 2];
            ready
                .read_exact(&mut port)
                .context("a holder of the startup bench's connections failed")?;
            holders.ports.push(u16::from_le_bytes(port));
        }
        Ok(holders)
    }
}

/// A child's work: `count` connections to a listener of its own, then wait for the release.
fn hold(count: usize, ready: &std::fs::File, release: &std::fs::File) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let mut held = Vec::with_capacity(2 * count);
    for _ in 0..count {
        held.push(TcpStream::connect(addr)?);
        held.push(listener.accept()?.0);
    }
    (&*ready).write_all(&addr.port().to_le_bytes())?;
    let _ = (&*release).read(&mut [0]);
    Ok(())
}

impl Drop for Holders {
    fn drop(&mut self) {
        drop(self.release.take());
        for &child in &self.children {
            // SAFETY: our own children, which exit once the release pipe closes.
            unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
        }
    }
}
