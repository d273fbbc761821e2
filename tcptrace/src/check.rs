//! `tcptrace --check`: what this host offers and what tcptrace will do with it, without tracing.
//!
//! Each fact is read the way tracing would use it: the kernel's release, its BTF, ring buffer and
//! socket storage (probed with the kernel, not guessed from the version), tracefs and each
//! tracepoint's layout, the capabilities held. Then each mode `--mode` allows is loaded and
//! attached with the command line's own settings and let go at once, no event read: the mode
//! `auto` would pick is the first that works, so the answer is the kernel's, verifier included.

use std::{io::Write as _, path::Path};

use aya::{maps::MapType, sys::is_map_supported};
use bytes::{BufMut as _, BytesMut};

use crate::{
    cli::{Cli, ModeChoice},
    filter::Filters,
    kernel::{self, Mode, VMLINUX_BTF, vmlinux},
    output::json,
    privileges, tracefs,
};

/// The tracepoints tcptrace attaches to: category, name, whether tracing needs it.
const TRACEPOINTS: [(&str, &str, bool); 3] = [
    ("sock", "inet_sock_set_state", true),
    ("tcp", "tcp_retransmit_skb", true),
    ("tcp", "tcp_retransmit_synack", false),
];

/// One fact about the host: whether it holds (None: could not be told) and what was seen.
struct Fact {
    ok: Option<bool>,
    detail: String,
}

impl Fact {
    fn new(ok: bool, detail: impl Into<String>) -> Self {
        Self {
            ok: Some(ok),
            detail: detail.into(),
        }
    }

    fn unknown(detail: impl Into<String>) -> Self {
        Self {
            ok: None,
            detail: detail.into(),
        }
    }
}

struct Tracepoint {
    name: String,
    /// Its BTF-enabled form: the number of arguments, or why there is none.
    btf: Fact,
    /// Its tracefs record: the fields tcptrace reads, or why they cannot be read.
    tracefs: Fact,
}

enum Trial {
    Works,
    Fails(String),
    NotTried(String),
}

/// Everything `--check` found.
struct Report {
    kernel: Fact,
    btf: Fact,
    ring_buffer: Fact,
    socket_storage: Fact,
    tracefs: Fact,
    tracepoints: Vec<Tracepoint>,
    /// Each relevant capability, whether it is held, and what it is for.
    capabilities: Vec<(String, bool, &'static str)>,
    modes: Vec<(Mode, Trial)>,
}

impl Report {
    /// The mode tracing would run in: the first that loaded.
    fn mode(&self) -> Option<Mode> {
        self.modes
            .iter()
            .find_map(|(mode, trial)| matches!(trial, Trial::Works).then_some(*mode))
    }
}

/// Runs the check and prints it; whether tracing would work.
pub fn run(cli: &Cli, as_json: bool) -> anyhow::Result<bool> {
    let report = gather(cli);
    let mut out = Vec::new();
    if as_json {
        write_json(&report, &mut out);
    } else {
        write_text(&report, &mut out);
    }
    std::io::stdout().lock().write_all(&out)?;
    Ok(report.mode().is_some())
}

fn gather(cli: &Cli) -> Report {
    let release = kernel::kernel_release();
    let kernel_ok = !kernel::kernel_before(5, 8);
    let kernel = Fact::new(
        kernel_ok,
        if kernel_ok {
            release.clone()
        } else {
            format!("{release}: older than 5.8, the first with BPF ring buffers")
        },
    );
    let vmlinux = vmlinux::Btf::from_file(Path::new(VMLINUX_BTF));
    let btf = match &vmlinux {
        Ok(_) => Fact::new(true, VMLINUX_BTF),
        Err(e) => Fact::new(false, format!("{VMLINUX_BTF}: {e}")),
    };
    let effective = privileges::effective().unwrap_or_default();
    let held = |cap| effective.contains(&cap);
    let can_trace = privileges::can_trace(&effective);
    let probe = |map: MapType| match is_map_supported(map) {
        _ if !can_trace => Fact::unknown("not probed: creating a map takes CAP_BPF"),
        Ok(true) => Fact::new(true, "supported"),
        Ok(false) => Fact::new(false, "not supported by this kernel"),
        Err(e) => Fact::unknown(format!("could not probe: {e}")),
    };
    let ring_buffer = probe(MapType::RingBuf);
    let mut socket_storage = probe(MapType::SkStorage);
    if socket_storage.ok == Some(true) && kernel::kernel_before(5, 11) {
        socket_storage = Fact::new(
            false,
            "exists, but tracing programs can use it only from Linux 5.11",
        );
    }
    let found = tracefs::find();
    let tracefs = match &found {
        tracefs::Found::Mounted(path) => Fact::new(true, format!("mounted at {}", path.display())),
        tracefs::Found::Unreadable(path, e) => Fact::new(
            false,
            format!(
                "mounted at {}, but not readable ({e}): run as root",
                path.display()
            ),
        ),
        tracefs::Found::NotTracefs(path) => Fact::new(
            false,
            format!("{} is a mount point without tracefs", path.display()),
        ),
        tracefs::Found::Unmounted => {
            let known = std::fs::read_to_string("/proc/filesystems")
                .is_ok_and(|list| list.lines().any(|l| l.ends_with("\ttracefs")));
            if !known {
                Fact::new(false, "this kernel has no tracefs")
            } else if held(caps::Capability::CAP_SYS_ADMIN) {
                Fact::new(
                    true,
                    format!(
                        "not mounted; tcptrace mounts it at {}",
                        tracefs::MOUNT_POINT
                    ),
                )
            } else {
                Fact::new(
                    false,
                    format!(
                        "not mounted, and mounting it takes CAP_SYS_ADMIN: \
                         `mount -t tracefs tracefs {}`",
                        tracefs::MOUNT_POINT
                    ),
                )
            }
        }
    };
    let tracepoints = TRACEPOINTS
        .iter()
        .map(|&(category, name, _)| Tracepoint {
            name: format!("{category}:{name}"),
            btf: match &vmlinux {
                Ok(btf) => match btf.tracepoint_args(name) {
                    Some(args) => Fact::new(true, format!("{args} arguments")),
                    None => Fact::new(false, "not in this kernel's BTF"),
                },
                Err(_) => Fact::unknown("no BTF"),
            },
            tracefs: match &found {
                tracefs::Found::Mounted(path) => layout(path, category, name),
                tracefs::Found::Unmounted => Fact::unknown("read once tracefs is mounted"),
                _ => Fact::unknown("no readable tracefs"),
            },
        })
        .collect();
    let capabilities = privileges::RELEVANT
        .iter()
        .map(|&(cap, purpose)| (cap.to_string(), held(cap), purpose))
        .collect();
    let modes = try_modes(cli, kernel_ok, can_trace);
    Report {
        kernel,
        btf,
        ring_buffer,
        socket_storage,
        tracefs,
        tracepoints,
        capabilities,
        modes,
    }
}

/// The fields of a tracepoint's record tcptrace reads, or why it cannot read them.
fn layout(tracefs: &Path, category: &str, name: &str) -> Fact {
    let format = match tracefs::read_format(tracefs, category, name) {
        Ok(format) => format,
        Err(e) => return Fact::new(false, format!("{e:#}")),
    };
    let parsed = if name == "inet_sock_set_state" {
        format.state_layout().map(|_| ())
    } else {
        format.retransmit_layout().map(|_| ())
    };
    match parsed {
        Ok(()) => Fact::new(true, format.summary()),
        Err(e) => Fact::new(false, format!("unsupported layout: {e}")),
    }
}

/// Loads and attaches each mode `--mode` allows, in `auto`'s order, until one works.
fn try_modes(cli: &Cli, kernel_ok: bool, can_trace: bool) -> Vec<(Mode, Trial)> {
    let candidates: &[Mode] = match cli.mode {
        ModeChoice::Auto => &[Mode::Btf, Mode::Tracefs],
        ModeChoice::Btf => &[Mode::Btf],
        ModeChoice::Tracefs => &[Mode::Tracefs],
    };
    let filters = Filters::from_cli(cli);
    let cgroup_mount = cli.cgroup_mount();
    let settings = kernel::Settings {
        mode: cli.mode,
        filters: &filters,
        ring_buffer_bytes: cli.ring_buffer_size,
        max_sockets: cli.max_sockets,
        snapshot: false,
        snapshot_asked: false,
        debug: cli.debug,
        cgroup_mount: cgroup_mount.as_deref(),
        congestion_lines: cli.traces(crate::cli::EventKind::Congestion),
        listen_drops_required: cli.requires_listen_drops(),
        census: false,
    };
    let mut trials = Vec::new();
    for &mode in candidates {
        let trial = if !kernel_ok {
            Trial::NotTried("the kernel is too old".to_owned())
        } else if !can_trace {
            Trial::NotTried("needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN".to_owned())
        } else if trials.iter().any(|(_, t)| matches!(t, Trial::Works)) {
            Trial::NotTried("an earlier mode works".to_owned())
        } else {
            // Loaded, attached and dropped at once: detached before any event is read.
            match kernel::load_mode(mode, &settings) {
                Ok(_) => Trial::Works,
                Err(e) => Trial::Fails(one_line(&format!("{e:#}"))),
            }
        };
        trials.push((mode, trial));
    }
    trials
}

/// The first line of a (possibly multi-line) error: a verifier log stays out of the report.
fn one_line(message: &str) -> String {
    match message.split_once("Verifier output:") {
        Some((head, _)) => format!(
            "{}; --debug on a run shows the verifier's log",
            head.trim_end()
        ),
        None => message.lines().next().unwrap_or_default().to_owned(),
    }
}

fn mark(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "ok",
        Some(false) => "MISSING",
        None => "unknown",
    }
}

fn write_text(report: &Report, out: &mut Vec<u8>) {
    let mut row = |label: &str, fact: &Fact| {
        let _ = writeln!(out, "{label:<20} {:<8} {}", mark(fact.ok), fact.detail);
    };
    row("kernel", &report.kernel);
    row("btf", &report.btf);
    row("ring buffer", &report.ring_buffer);
    row("socket storage", &report.socket_storage);
    row("tracefs", &report.tracefs);
    for tracepoint in &report.tracepoints {
        let _ = writeln!(out, "tracepoint {}", tracepoint.name);
        for (form, fact) in [("btf", &tracepoint.btf), ("tracefs", &tracepoint.tracefs)] {
            let _ = writeln!(out, "  {form:<18} {:<8} {}", mark(fact.ok), fact.detail);
        }
    }
    for (name, held, purpose) in &report.capabilities {
        let state = if *held { "held" } else { "missing" };
        let _ = writeln!(out, "{name:<20} {state:<8} {purpose}");
    }
    for (mode, trial) in &report.modes {
        let (state, detail) = match trial {
            Trial::Works => ("works", ""),
            Trial::Fails(why) => ("FAILS", why.as_str()),
            Trial::NotTried(why) => ("skipped", why.as_str()),
        };
        let _ = writeln!(out, "{:<20} {state:<8} {detail}", format!("{mode} mode"));
    }
    let _ = match report.mode() {
        Some(mode) => writeln!(out, "verdict: tracing works here, in {mode} mode"),
        None => writeln!(out, "verdict: tracing does NOT work here (see above)"),
    };
}

fn write_json(report: &Report, out: &mut Vec<u8>) {
    let mut buf = BytesMut::with_capacity(2048);
    let fact = |buf: &mut BytesMut, key: &str, fact: &Fact| {
        json::string(buf, key);
        buf.put_slice(b":{\"ok\":");
        buf.put_slice(match fact.ok {
            Some(true) => b"true",
            Some(false) => b"false",
            None => b"null",
        });
        buf.put_slice(b",\"detail\":");
        json::string(buf, &fact.detail);
        buf.put_u8(b'}');
    };
    buf.put_u8(b'{');
    fact(&mut buf, "kernel", &report.kernel);
    for (key, value) in [
        ("btf", &report.btf),
        ("ring_buffer", &report.ring_buffer),
        ("socket_storage", &report.socket_storage),
        ("tracefs", &report.tracefs),
    ] {
        buf.put_u8(b',');
        fact(&mut buf, key, value);
    }
    buf.put_slice(b",\"tracepoints\":[");
    for (i, tracepoint) in report.tracepoints.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        buf.put_slice(b"{\"name\":");
        json::string(&mut buf, &tracepoint.name);
        buf.put_u8(b',');
        fact(&mut buf, "btf", &tracepoint.btf);
        buf.put_u8(b',');
        fact(&mut buf, "tracefs", &tracepoint.tracefs);
        buf.put_u8(b'}');
    }
    buf.put_slice(b"],\"capabilities\":{");
    for (i, (name, held, _)) in report.capabilities.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        json::string(&mut buf, name);
        buf.put_slice(if *held { b":true" } else { b":false" });
    }
    buf.put_slice(b"},\"modes\":{");
    for (i, (mode, trial)) in report.modes.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        json::string(&mut buf, &mode.to_string());
        let (state, detail) = match trial {
            Trial::Works => ("works", None),
            Trial::Fails(why) => ("fails", Some(why)),
            Trial::NotTried(why) => ("skipped", Some(why)),
        };
        buf.put_slice(b":{\"result\":");
        json::string(&mut buf, state);
        if let Some(detail) = detail {
            buf.put_slice(b",\"detail\":");
            json::string(&mut buf, detail);
        }
        buf.put_u8(b'}');
    }
    buf.put_slice(b"},\"mode\":");
    match report.mode() {
        Some(mode) => json::string(&mut buf, &mode.to_string()),
        None => buf.put_slice(b"null"),
    }
    buf.put_slice(b",\"ready\":");
    buf.put_slice(if report.mode().is_some() {
        b"true"
    } else {
        b"false"
    });
    buf.put_slice(b"}\n");
    out.extend_from_slice(&buf);
}
