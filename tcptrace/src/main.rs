//! tcptrace: every TCP state transition and retransmit on this host, with the process that owns
//! the socket. `main` only wires the pipeline: cli -> kernel -> tracer -> output.

use std::{
    io::Write as _,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use tcptrace::{
    cgroup::Cgroups,
    check,
    cli::{Cli, EventKind, Format},
    filter::Filters,
    kernel,
    listen_drops::HostCounters,
    metrics::Metrics,
    metrics_endpoint,
    output::{Destination, Formatter, text::Text},
    privileges, signals,
    top::{self, Feed, Model, Screen},
    tracer,
};

fn main() -> ExitCode {
    // First: a SIGHUP (systemd's reload), SIGINT or SIGTERM while starting must not kill us.
    let held = signals::hold();
    let cli = Cli::parse_checked();
    if cli.check {
        return match check::run(&cli, cli.format == Format::Json) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("tcptrace: {}", one_line(&format!("{e:#}")));
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime");
    match runtime.and_then(|runtime| runtime.block_on(run(cli, held))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcptrace: {}", one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, held: signals::Held) -> anyhow::Result<()> {
    if cli.top() {
        top::check_terminal()?;
    }
    kernel::check_kernel()?;
    privileges::check()?;
    let filters = Filters::from_cli(&cli);
    let destination = match &cli.output {
        Some(path) => Destination::file(path)?,
        None => Destination::stdout(),
    };
    let formatter = match cli.format {
        _ if cli.top() => Formatter::None,
        Format::Text => {
            let mut text = Text::new(cli.timestamp, cli.ipv4);
            if cli.wide {
                text = text.wide();
            }
            if cli.traces(EventKind::Connections) {
                text = text.connections();
            }
            Formatter::Text(text)
        }
        Format::Json => Formatter::Json,
        Format::None => Formatter::None,
    };
    let metrics = match cli.metrics_addr {
        Some(addr) => {
            let listener = metrics_endpoint::bind(addr).await?;
            let metrics = Arc::new(Metrics::new(cli.metrics_container_label));
            tokio::spawn(metrics_endpoint::serve(listener, Arc::clone(&metrics)));
            Some(metrics)
        }
        None => None,
    };
    let cgroup_mount = cli.cgroup_mount();
    // The kernel's tick rate, for the timeouts on retransmit and congestion lines: measured while the programs load
    // when the host has no build configuration (its clock's file is root's).
    let tick_rate = (cli.traces(EventKind::Retransmits) || cli.traces(EventKind::Congestion))
        .then(tcptrace::tick_rate::start);
    let host_listen_counters = HostCounters::read();
    let loaded = kernel::load(&kernel::Settings {
        mode: cli.mode,
        filters: &filters,
        ring_buffer_bytes: cli.ring_buffer_size,
        max_sockets: cli.max_sockets,
        // The view counts the sockets that exist at start too.
        snapshot: cli.snapshot || cli.top(),
        snapshot_asked: cli.snapshot,
        debug: cli.debug,
        cgroup_mount: cgroup_mount.as_deref(),
        congestion_lines: cli.traces(EventKind::Congestion),
        listen_drops_required: cli.requires_listen_drops(),
        census: cli.top(),
    })?;
    if let Some(tick_rate) = tick_rate {
        tick_rate.finish();
    }
    // Attached: nothing from here on needs a capability (but CAP_BPF to read the kernel side's
    // counters on kernels before 5.19 with unprivileged BPF disabled).
    privileges::drop_all(privileges::bpf_needed_after_attach())?;
    // Held until now: a signal during BPF_PROG_LOAD would make the verifier give up (EAGAIN).
    let signals = held.handle()?;
    // Cgroup paths for the lines and the container label; in tracefs mode also the cgroup and
    // container filters, which its kernel side cannot apply.
    let cgroups = Cgroups::new(
        cgroup_mount,
        formatter.shows_cgroup() || cli.metrics_container_label,
        &filters,
        loaded.mode == kernel::Mode::Tracefs,
    );
    // The view takes the terminal once everything is attached: what failed before is printed
    // as usual.
    let (feed, screen) = if cli.top() {
        let model = Arc::new(Mutex::new(Model::new(cli.wide)));
        let owner_filters = !(cli.pids.is_empty()
            && cli.cgroups.is_empty()
            && cli.container.is_none()
            && cli.netns.is_empty());
        let title = top::Title::new(&cli, &loaded.mode.to_string());
        (
            Some(Feed::new(Arc::clone(&model), !owner_filters)),
            Some(Screen::start(model, title)?),
        )
    } else {
        (None, None)
    };
    let summary = tracer::run(
        loaded,
        formatter,
        cgroups,
        destination,
        metrics,
        signals,
        tracer::Options {
            buffer_size: cli.buffer_size,
            max_timewait: cli.max_timewait,
            ends_only: cli.ends_only(),
            failures_only: cli.failures,
            time_wait: !cli.no_time_wait,
            congestion_lines: cli.traces(EventKind::Congestion),
            listen_drop_lines: cli.traces(EventKind::ListenDrops),
            top: feed,
        },
    )
    .await;
    if let Some(screen) = screen {
        screen.finish()?;
    }
    let summary = summary?;
    if !summary.reader_gone {
        let unwritten = match summary.unwritten {
            0 => String::new(),
            n => format!(", {n} events not written (the output was still blocked at exit)"),
        };
        let malformed = match summary.malformed {
            0 => String::new(),
            n => format!(", {n} malformed records skipped"),
        };
        // What listeners dropped, when anything was: per listener where tcptrace traces them,
        // and the kernel's own count, which includes the SYNs no listener can be named for.
        let counted = summary.listen_drops.filter(|&(o, n)| o + n > 0);
        let grew = host_listen_counters
            .zip(HostCounters::read())
            .map(|(before, after)| after.since(&before))
            .filter(|grew| *grew != HostCounters::default());
        let mut listen = String::new();
        if counted.is_some() || grew.is_some() {
            if let Some((overflow, no_socket)) = summary.listen_drops {
                listen.push_str(&format!(
                    "; {} connections dropped at traced listeners' full accept queues (listen_overflow {overflow}, no_socket {no_socket})",
                    overflow + no_socket
                ));
            }
            let grew = grew.unwrap_or_default();
            listen.push_str(&format!(
                "; the kernel's counters (this network namespace): ListenOverflows +{}, ListenDrops +{}",
                grew.overflows, grew.drops
            ));
        }
        // Not eprintln: after `top`, the terminal may have hung up, and that is no panic.
        let _ = writeln!(
            std::io::stderr(),
            "tcptrace: {} events written, {} events lost{unwritten}{malformed}{listen}",
            summary.written,
            summary.lost
        );
    }
    Ok(())
}

/// Errors end up on one line: the kernel's verifier log and similar multi-line causes are joined.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
