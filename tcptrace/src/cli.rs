//! The command line: every flag, its validation and its documentation.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum, builder::RangedU64ValueParser};
use tcptrace_common::MAX_FILTER_ENTRIES;

/// Trace every TCP state transition and retransmit on this host, with the process that owns the
/// socket.
///
/// Runs until Ctrl-C or SIGTERM, then prints a one-line summary on stderr and exits 0. Needs root
/// (or CAP_BPF and CAP_PERFMON).
#[derive(Debug, Parser)]
#[command(name = "tcptrace", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Keep only sockets owned by these processes (pid, i.e. the thread group id). Matches the
    /// owner, so transitions that run in softirq or timer context are kept too.
    #[arg(global = true, short = 'p', long = "pid", value_name = "PID[,PID...]", value_delimiter = ',',
          value_parser = RangedU64ValueParser::<u32>::new().range(1..=u64::from(u32::MAX)))]
    pub pids: Vec<u32>,

    /// Keep only sockets with this port on either side (local or remote).
    #[arg(global = true, short = 'P', long = "port", value_name = "PORT[,PORT...]", value_delimiter = ',',
          value_parser = port_parser())]
    pub ports: Vec<u16>,

    /// Keep only sockets with this local port. A connecting socket's local port is still 0 on
    /// its CLOSE -> SYN_SENT transition, so that line cannot match.
    #[arg(global = true, short = 'L', long = "local-port", value_name = "PORT[,PORT...]", value_delimiter = ',',
          value_parser = port_parser())]
    pub local_ports: Vec<u16>,

    /// Keep only sockets with this remote port.
    #[arg(global = true, short = 'D', long = "remote-port", value_name = "PORT[,PORT...]", value_delimiter = ',',
          value_parser = port_parser())]
    pub remote_ports: Vec<u16>,

    /// Keep only sockets in this cgroup (v2) or below it: a path below the cgroup2 mount
    /// (`/system.slice/nginx.service`) or under it (`/sys/fs/cgroup/system.slice/nginx.service`).
    /// Repeat for more. In BTF mode the socket's cgroup (where it was created) is matched in the
    /// kernel, up to 16 levels below the given one; in tracefs mode the owner's, in userspace.
    #[arg(global = true, long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<String>,

    /// Keep only sockets in this network namespace: its inode number (`ls -L -i
    /// /proc/PID/ns/net`, `lsns -t net`) or a path to it (`/proc/PID/ns/net`,
    /// `/run/netns/NAME`). Repeat or separate with commas for more. BTF mode only.
    #[arg(global = true, long = "netns", value_name = "INODE|PATH", value_delimiter = ',',
          value_parser = parse_netns)]
    pub netns: Vec<u32>,

    /// Keep only sockets in this container: its id or a prefix of it of at least 12 hex digits,
    /// as `docker ps` or `crictl ps` print it. Matched against the names of the socket's cgroup
    /// and its ancestors (docker, containerd, CRI-O and podman shapes; see the README).
    #[arg(global = true, long = "container", value_name = "ID",
          value_parser = crate::cgroup::container_prefix)]
    pub container: Option<String>,

    /// Where the host's cgroup v2 hierarchy is mounted, when it is not the first cgroup2 mount in
    /// /proc/self/mountinfo (in a container: a hostPath mount of the host's /sys/fs/cgroup; on a
    /// hybrid host its unified/ directory is taken).
    #[arg(global = true, long = "cgroup-root", value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// The ids of the `--cgroup` paths, resolved by `parse_checked`.
    #[arg(skip)]
    pub cgroup_ids: Vec<u64>,

    /// Whether `--events` was given (set by `parse_checked`): a kind it names must be traced, one
    /// of the defaults only where the kernel can.
    #[arg(skip)]
    pub events_given: bool,

    /// Trace IPv4 sockets only.
    #[arg(global = true, short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Trace IPv6 sockets only.
    #[arg(global = true, short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Which events to trace. listen-drops is on by default where the kernel reports them (BTF
    /// mode, Linux 6.15+); named here, a kernel that does not is an error.
    #[arg(
        long = "events",
        value_name = "KIND[,KIND...]",
        value_delimiter = ',',
        default_value = "states,retransmits,listen-drops"
    )]
    pub events: Vec<EventKind>,

    /// Keep only the lines that end connections which did not end with an orderly FIN: resets
    /// sent or received, refused connects, timeouts, unreachable hosts, errors, aborted connects
    /// (each line with its reason and the connection's summary). Filtered in the kernel; no
    /// retransmit lines. BTF mode only.
    #[arg(long = "failures")]
    pub failures: bool,

    /// BTF mode: write the kernel's hand-over of a closed connection to a timewait socket as
    /// `FIN_WAIT2 -> CLOSE` (or `CLOSING -> CLOSE`), as tcpstates does, and run no timewait
    /// scan. By default the connection is followed as `ss` shows it: `FIN_WAIT2 -> TIME_WAIT`
    /// when it enters TIME_WAIT, `TIME_WAIT -> CLOSE` when that ends.
    #[arg(long = "no-time-wait")]
    pub no_time_wait: bool,

    /// BTF mode: how many connections held by timewait sockets (FIN_WAIT2 after close, TIME_WAIT)
    /// are followed at once. Beyond it, a connection handed to a timewait socket gets its CLOSE
    /// line at once, and tcptrace_timewait_untracked_total counts it.
    #[arg(long = "max-timewait", value_name = "N", default_value = "65536",
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=4_194_304))]
    pub max_timewait: usize,

    /// Output format: an aligned table, one JSON object per line, or nothing (with
    /// --metrics-addr: a pure exporter).
    #[arg(
        short = 'o',
        long = "format",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub format: Format,

    /// Text format: start each line with the event's wall-clock time (UTC, microseconds).
    #[arg(short = 'T', long = "timestamp")]
    pub timestamp: bool,

    /// Text format: end each line with a CONTAINER column: the short container id (12 hex
    /// digits), or the last component of the socket's cgroup when it is in no container.
    #[arg(global = true, short = 'w', long = "wide")]
    pub wide: bool,

    /// Size of the ring buffer carrying events from the kernel, in bytes (K, M and G suffixes
    /// accepted). A power of two, at least 4K. A bigger buffer rides out longer bursts.
    #[arg(long = "ring-buffer-size", value_name = "BYTES", default_value = "4M",
          value_parser = parse_ring_buffer_size)]
    pub ring_buffer_size: u32,

    /// tracefs mode: how many sockets the kernel side tracks at once (owner and time of last
    /// transition). When full, the least recently active socket is forgotten: its later lines
    /// show pid 0 and no duration, never a wrong owner. BTF mode keeps this state in the sockets
    /// themselves and has no such limit.
    #[arg(long = "max-sockets", value_name = "N", default_value = "65536",
          value_parser = RangedU64ValueParser::<u32>::new().range(1024..=4_194_304))]
    pub max_sockets: u32,

    /// How much formatted output may wait for a slow or stalled reader (a pipe under
    /// backpressure, a collector restarting), in bytes (K, M and G suffixes accepted), at least
    /// 1M. When it is full, tcptrace stops draining: the ring buffer holds what it can and counts
    /// the rest as lost.
    #[arg(long = "buffer-size", value_name = "BYTES", default_value = "64M",
          value_parser = parse_buffer_size)]
    pub buffer_size: usize,

    /// Append output to this file (created with mode 0640) instead of stdout. SIGHUP reopens
    /// it, for logrotate's rename-then-signal.
    #[arg(long = "output", value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// How the kernel side attaches. `btf`: BTF-enabled tracepoints with the owner kept in each
    /// socket (Linux 5.11+ with /sys/kernel/btf/vmlinux): accepted sockets name the owner of the
    /// listener that accepted them, in any network namespace, and sockets opened before tracing
    /// began get their owner. `tracefs`: classic tracepoints, owners in a map of --max-sockets
    /// entries (kernels without BTF). `auto` takes btf where the kernel has it and says why when
    /// it falls back.
    #[arg(
        global = true,
        long = "mode",
        value_name = "MODE",
        default_value = "auto"
    )]
    pub mode: ModeChoice,

    /// Before the live transitions, print one line per TCP socket that exists when tracing
    /// begins, with its state and owner (what `netstat -tanp` shows), in every network namespace
    /// a process is in. BTF mode: exits 1 when the kernel refuses the iterators that list them.
    /// Sockets no process holds (orphans, TIME_WAIT) are not listed.
    #[arg(long = "snapshot")]
    pub snapshot: bool,

    /// Write the kernel side's own diagnostics to stderr (a socket whose owner could not be
    /// kept, a tracepoint record that could not be read). Also on when RUST_LOG is set (its
    /// level: error, warn, info, debug, trace). Off by default, and then compiled out of the
    /// programs at load time.
    #[arg(long = "debug")]
    pub debug: bool,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics. They count everything that passes
    /// the filters, whatever the output format.
    #[arg(long = "metrics-addr", value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,

    /// Label the event metrics with `container` (the short container id; empty outside
    /// containers). Off by default: it multiplies the series by the containers on the host.
    #[arg(long = "metrics-container-label", requires = "metrics_addr")]
    pub metrics_container_label: bool,

    /// Instead of tracing: print what this host offers (kernel, BTF, ring buffer, socket storage,
    /// tracefs, each tracepoint's layout, the capabilities held) and the mode tracing would run
    /// in. Each mode --mode allows is loaded with the other flags given and let go at once, no
    /// event read. Exits 0 when tracing would work, 1 when not; `--format json` prints one JSON
    /// object (for fleet inventories).
    #[arg(long = "check", conflicts_with_all = ["output", "metrics_addr", "snapshot"])]
    pub check: bool,
}

/// What runs instead of the stream of lines.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A live, full-screen view for a person at a terminal, refreshed every second: the host's
    /// sockets per state (what `netstat -nat` counts) with their change per second, the state
    /// machine's transitions per second with the median time spent in the state left, a table
    /// of processes (containers with -w), the connections longest in CLOSE_WAIT, the peers with
    /// most retransmits and the listeners that dropped connections. Every filter applies. Keys:
    /// q quits, s cycles the sort, p pauses, / filters by comm or port.
    Top,
}

/// Kinds of events `--events` can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EventKind {
    /// TCP state transitions (sock:inet_sock_set_state).
    States,
    /// Retransmitted segments, SYNs and SYN-ACKs (tcp:tcp_retransmit_skb, tcp:tcp_retransmit_synack).
    Retransmits,
    /// Congestion state changes: open, disorder, cwr, recovery, loss (tcp:tcp_cong_state_set;
    /// BTF mode, Linux 6.3+). The metrics count them without it.
    Congestion,
    /// Connections a listener's full accept queue dropped: one line per listener per second
    /// with the count (skb:kfree_skb; BTF mode, Linux 6.15+). The metrics count them without it.
    ListenDrops,
    /// One line per connection when it ends, with its bytes each way, lifetime and why it ended
    /// (what tcplife shows). Not with the other kinds.
    Connections,
}

/// Values of `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeChoice {
    /// BTF mode where the kernel has it, tracefs mode otherwise.
    Auto,
    /// BTF-enabled tracepoints and socket storage; fails where the kernel lacks them.
    Btf,
    /// Classic tracepoints read through tracefs.
    Tracefs,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns with a header.
    Text,
    /// One JSON object per line (see the README for the schema).
    Json,
    /// No event output (metrics only).
    None,
}

fn port_parser() -> RangedU64ValueParser<u16> {
    RangedU64ValueParser::<u16>::new().range(1..=65535)
}

/// A size in bytes, with an optional K, M or G suffix.
fn parse_size(value: &str) -> Result<u64, String> {
    let (digits, unit) = match value.as_bytes().last() {
        Some(b'k' | b'K') => (&value[..value.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&value[..value.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&value[..value.len() - 1], 1 << 30),
        _ => (value, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("`{value}` is not a size in bytes (for example 4M)"))
}

fn parse_ring_buffer_size(value: &str) -> Result<u32, String> {
    let bytes = parse_size(value)?;
    if !bytes.is_power_of_two() || !(4096..=1 << 30).contains(&bytes) {
        return Err(format!("{bytes} is not a power of two between 4K and 1G"));
    }
    u32::try_from(bytes).map_err(|_| format!("{bytes} is too large"))
}

/// A network namespace: an inode number, or a path whose inode is one.
fn parse_netns(value: &str) -> Result<u32, String> {
    if let Ok(inode) = value.parse::<u32>() {
        return if inode == 0 {
            Err("0 is not a namespace inode".to_owned())
        } else {
            Ok(inode)
        };
    }
    if !value.starts_with('/') {
        return Err(format!(
            "`{value}` is neither an inode number nor a path like /run/netns/NAME"
        ));
    }
    let meta = std::fs::metadata(value).map_err(|e| format!("{value}: {e}"))?;
    // A namespace file (nsfs) has an inode that fits in 32 bits; anything else is not one.
    u32::try_from(std::os::unix::fs::MetadataExt::ino(&meta))
        .ok()
        .filter(|_| !meta.is_dir())
        .ok_or_else(|| format!("{value} is not a network namespace"))
}

fn parse_buffer_size(value: &str) -> Result<usize, String> {
    let bytes = parse_size(value)?;
    if !(1 << 20..=1 << 40).contains(&bytes) {
        return Err(format!("{bytes} is not between 1M and 1024G"));
    }
    usize::try_from(bytes).map_err(|_| format!("{bytes} is too large"))
}

impl Cli {
    /// Parses the command line; exits 2 with a message on bad input, before the kernel is touched.
    pub fn parse_checked() -> Self {
        let matches = <Self as clap::CommandFactory>::command().get_matches();
        let mut cli =
            <Self as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.events_given =
            matches.value_source("events") == Some(clap::parser::ValueSource::CommandLine);
        for (flag, len) in [
            ("--pid", cli.pids.len()),
            ("--netns", cli.netns.len()),
            (
                "--port, --local-port and --remote-port",
                cli.ports.len() + cli.local_ports.len() + cli.remote_ports.len(),
            ),
        ] {
            if len > MAX_FILTER_ENTRIES as usize {
                let message = format!("{flag}: at most {MAX_FILTER_ENTRIES} values, got {len}");
                <Self as clap::CommandFactory>::command()
                    .error(clap::error::ErrorKind::TooManyValues, message)
                    .exit();
            }
        }
        if cli.traces(EventKind::Connections) && cli.events.len() > 1 {
            <Self as clap::CommandFactory>::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--events connections cannot be combined with other kinds",
                )
                .exit();
        }
        if cli.failures && cli.traces(EventKind::Congestion) {
            <Self as clap::CommandFactory>::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--failures keeps only the lines that end connections, not --events congestion",
                )
                .exit();
        }
        if cli.check && cli.format == Format::None {
            <Self as clap::CommandFactory>::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--check prints its report as text or json, not none",
                )
                .exit();
        }
        if let Some(conflict) = cli.top_conflict(&matches) {
            <Self as clap::CommandFactory>::command()
                .error(clap::error::ErrorKind::ArgumentConflict, conflict)
                .exit();
        }
        if let Err(e) = cli.resolve_cgroups() {
            <Self as clap::CommandFactory>::command()
                .error(clap::error::ErrorKind::ValueValidation, format!("{e:#}"))
                .exit();
        }
        cli
    }

    /// The cgroup v2 mount tcptrace reads: `--cgroup-root` (or its `unified` directory, on a
    /// hybrid host) or the one mountinfo lists.
    pub fn cgroup_mount(&self) -> Option<PathBuf> {
        match &self.cgroup_root {
            Some(root) => [root.clone(), root.join("unified")]
                .into_iter()
                .find(|dir| dir.join("cgroup.procs").exists()),
            None => crate::cgroup::mount_point(),
        }
    }

    /// Resolves `--cgroup` paths to ids (and checks `--cgroup-root`).
    fn resolve_cgroups(&mut self) -> anyhow::Result<()> {
        if let Some(root) = &self.cgroup_root
            && self.cgroup_mount().is_none()
        {
            anyhow::bail!(
                "--cgroup-root {}: neither it nor its unified/ is the root of a cgroup2 hierarchy",
                root.display()
            );
        }
        if self.cgroups.is_empty() {
            return Ok(());
        }
        if self.cgroups.len() > MAX_FILTER_ENTRIES as usize {
            anyhow::bail!("--cgroup: at most {MAX_FILTER_ENTRIES} values");
        }
        let mount = match self.cgroup_mount() {
            Some(mount) => mount,
            None => crate::cgroup::require_mount("--cgroup")?,
        };
        self.cgroup_ids = self
            .cgroups
            .iter()
            .map(|path| crate::cgroup::id_of(&mount, path))
            .collect::<anyhow::Result<_>>()?;
        Ok(())
    }

    /// `tcptrace top`.
    pub fn top(&self) -> bool {
        matches!(self.command, Some(Command::Top))
    }

    /// A flag `tcptrace top` cannot take: the view is its output.
    fn top_conflict(&self, matches: &clap::ArgMatches) -> Option<String> {
        if !self.top() {
            return None;
        }
        let given =
            |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        let flag = [
            ("format", "--format"),
            ("output", "--output"),
            ("timestamp", "--timestamp"),
            ("snapshot", "--snapshot"),
            ("check", "--check"),
            ("failures", "--failures"),
        ]
        .into_iter()
        .find(|(id, _)| given(id))
        .map(|(_, flag)| flag)
        .or_else(|| {
            self.traces(EventKind::Connections)
                .then_some("--events connections")
        })?;
        Some(format!(
            "tcptrace top draws its own view: {flag} cannot be used with it"
        ))
    }

    pub fn traces(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }

    /// `--events listen-drops` named on the command line.
    pub fn requires_listen_drops(&self) -> bool {
        self.events_given && self.traces(EventKind::ListenDrops)
    }

    /// Only the lines that end connections: `--events connections` or `--failures`.
    pub fn ends_only(&self) -> bool {
        self.failures || self.traces(EventKind::Connections)
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tcptrace").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_trace_everything_as_text() {
        let cli = parse(&[]).unwrap();
        assert!(cli.pids.is_empty() && cli.ports.is_empty());
        assert_eq!(cli.format, Format::Text);
        assert_eq!(
            cli.events,
            [
                EventKind::States,
                EventKind::Retransmits,
                EventKind::ListenDrops
            ]
        );
        assert_eq!(cli.ring_buffer_size, 4 << 20);
        assert_eq!(cli.max_sockets, 65536);
        assert_eq!(cli.mode, ModeChoice::Auto);
        assert!(!cli.snapshot);
        assert_eq!(cli.buffer_size, 64 << 20);
    }

    #[test]
    fn lists_split_on_commas_and_repeat() {
        let cli = parse(&[
            "-p", "1,2", "--pid", "3", "-P", "80,443", "-L", "22", "-D", "53",
        ])
        .unwrap();
        assert_eq!(cli.pids, [1, 2, 3]);
        assert_eq!(cli.ports, [80, 443]);
        assert_eq!(cli.local_ports, [22]);
        assert_eq!(cli.remote_ports, [53]);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["--port", "70000"][..],
            &["--port", "0"],
            &["--port", "http"],
            &["--pid", "x"],
            &["--pid", "0"],
            &["--pid", "-5"],
            &["--format", "xml"],
            &["--events", "drops"],
            &["-4", "-6"],
            &["--ring-buffer-size", "5000"],
            &["--ring-buffer-size", "2G"],
            &["--max-sockets", "10"],
            &["--mode", "kprobe"],
            &["--buffer-size", "64K"],
            &["--buffer-size", "2000G"],
            &["--buffer-size", "lots"],
            &["--metrics-addr", "localhost"],
            &["--metrics-addr", "1.2.3.4:99999"],
            &["--netns", "0"],
            &["--netns", "net"],
            &["--netns", "/nonexistent/ns"],
            &["--netns", "/proc"],
            &["--container", "abc"],
            &["--container", "zzzzzzzzzzzzzz"],
            &["--metrics-container-label"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} must be refused"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn ring_buffer_sizes_take_suffixes() {
        assert_eq!(parse_ring_buffer_size("64K"), Ok(65536));
        assert_eq!(parse_ring_buffer_size("16m"), Ok(16 << 20));
        assert_eq!(parse_ring_buffer_size("4096"), Ok(4096));
        assert!(parse_ring_buffer_size("").is_err());
        assert!(parse_ring_buffer_size("99999999999999999999G").is_err());
        assert_eq!(parse_buffer_size("1M"), Ok(1 << 20));
        assert_eq!(parse_buffer_size("3000000"), Ok(3_000_000));
        assert_eq!(parse_buffer_size("2g"), Ok(2 << 30));
    }

    #[test]
    fn help_documents_every_flag() {
        let help = Cli::command().render_long_help().to_string();
        for flag in Cli::command().get_arguments() {
            if let Some(long) = flag.get_long() {
                assert!(
                    help.contains(&format!("--{long}")),
                    "--{long} missing from help"
                );
            }
            assert!(
                flag.get_help().is_some() || flag.get_long_help().is_some(),
                "{:?} undocumented",
                flag.get_id()
            );
        }
    }

    #[test]
    fn command_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn error_kind_for_too_many_values_exits_2() {
        let err = Cli::command().error(ErrorKind::TooManyValues, "x");
        assert_eq!(err.exit_code(), 2);
    }
}
