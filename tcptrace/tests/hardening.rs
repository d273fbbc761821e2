//! Production hardening, against the real kernel: least privilege, capabilities given up while
//! tracing, signals, nothing left attached after SIGKILL, two instances at once, and a full
//! per-socket map that forgets owners rather than inventing them. Root required.

mod support;

use std::{
    collections::BTreeSet,
    net::TcpStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Endpoint, TCPTRACE, Tracer, require_root, socket_addr, status_field, unseen::Unseen,
};

/// One connection through an Endpoint pair on `port`'s server.
fn one_connection(server: &mut Endpoint, tag: &str) {
    let mut client = Endpoint::client(tag);
    server.send("accept");
    client.step(&format!(
        "connect {}",
        socket_addr("127.0.0.1", server.port)
    ));
    server.ack();
    client.step("close");
    server.step("wait-eof");
    server.step("close");
    client.exit();
}

/// Ids of the BPF programs `pid` holds open.
fn bpf_program_ids(pid: u32) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.insert(id.trim().parse().expect("prog id"));
        }
    }
    ids
}

fn program_exists(id: u32) -> bool {
    aya::programs::loaded_programs().any(|program| program.is_ok_and(|p| p.id() == id))
}

#[test]
fn capabilities_are_given_up_once_attached_and_tracing_goes_on() {
    let mut server = Endpoint::server("127.0.0.1", "tt-caps-srv");
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--port",
        &server.port.to_string(),
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    for field in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
        assert_eq!(
            status_field(tracer.pid(), field),
            "0000000000000000",
            "{field} of a tracing tcptrace"
        );
    }
    assert_eq!(status_field(tracer.pid(), "NoNewPrivs"), "1");
    server.step("listen");
    one_connection(&mut server, "tt-caps-cli");
    server.step("close-listener");
    server.exit();
    thread::sleep(Duration::from_millis(1100));
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
    assert_eq!(output.json().len(), 12, "{:?}", output.lines);
}

#[test]
fn bpf_perfmon_and_dac_read_search_are_enough_for_another_user() {
    let mut server = Endpoint::server("127.0.0.1", "tt-least-srv");
    let mut command = Command::new("setpriv");
    let caps = "-all,+bpf,+perfmon,+dac_read_search";
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(format!("--bounding-set={caps}"))
        .arg(TCPTRACE)
        .args(["--format", "json", "-4", "--port", &server.port.to_string()]);
    let tracer = Tracer::start_command(command);
    assert_eq!(
        status_field(tracer.pid(), "Uid").split_whitespace().next(),
        Some("65534")
    );
    server.step("listen");
    one_connection(&mut server, "tt-least-cli");
    server.step("close-listener");
    server.exit();
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
    let lines = output.json();
    assert_eq!(lines.len(), 12, "{lines:?}");
    assert!(lines.iter().all(|l| l["pid"] != 0));
}

#[test]
fn too_little_privilege_is_one_line_exit_1_and_nothing_attached() {
    require_root();
    for (caps, missing) in [
        ("-all,+bpf,+dac_read_search", "CAP_PERFMON"),
        ("-all,+perfmon,+dac_read_search", "CAP_BPF"),
    ] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(format!("--bounding-set={caps}"))
            .arg(TCPTRACE)
            .output()
            .expect("setpriv");
        assert_eq!(out.status.code(), Some(1), "{caps}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&format!("missing: {missing}")), "{stderr}");
    }
    // Refused by the check that runs before anything is loaded: nothing can be left attached.
}

#[test]
fn sigkill_leaves_nothing_attached() {
    let tracer = Tracer::start(&["--format", "json", "-4", "--port", "9"]);
    let programs = bpf_program_ids(tracer.pid());
    assert!(programs.len() >= 3, "{programs:?}");
    assert!(programs.iter().all(|&id| program_exists(id)));
    tracer.signal(libc::SIGKILL);
    let output = tracer.finish(Duration::from_secs(2));
    assert_eq!(output.status.code(), None, "killed by a signal");
    // Programs are freed (and so detached) once the last reference goes; that is asynchronous.
    let deadline = Instant::now() + Duration::from_secs(5);
    while programs.iter().any(|&id| program_exists(id)) {
        assert!(
            Instant::now() < deadline,
            "programs {programs:?} still loaded after SIGKILL"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigint_and_sigterm_end_it_within_a_second() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let tracer = Tracer::start(&["--format", "json", "-4", "--port", "9"]);
        let sent = Instant::now();
        tracer.signal(signal);
        let output = tracer.finish(Duration::from_secs(5));
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "signal {signal}: {:?}",
            sent.elapsed()
        );
        assert!(output.status.success());
        assert_eq!(
            output.stderr.lines().last(),
            Some("tcptrace: 0 events written, 0 events lost")
        );
    }
}

/// Whether `signal` is held (blocked) or handled by `pid`: tcptrace's `main` has begun.
fn takes(pid: u32, signal: libc::c_int) -> bool {
    let bit = 1u64 << (signal - 1);
    ["SigBlk", "SigCgt"].iter().any(|field| {
        u64::from_str_radix(&status_field(pid, field), 16).is_ok_and(|mask| mask & bit != 0)
    })
}

fn spawn_tracer(port: &str) -> Tracer {
    let mut command = Command::new(TCPTRACE);
    command.args(["--format", "json", "-4", "--port", port]);
    Tracer::spawn(command, None)
}

#[test]
fn sighup_while_starting_is_no_reason_to_die() {
    let mut server = Endpoint::server("127.0.0.1", "tt-early-srv");
    let mut tracer = spawn_tracer(&server.port.to_string());
    // systemd's ExecReload may come at any moment: SIGHUP every millisecond, from the start of
    // `main` until tcptrace traces.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    while !tracer.is_tracing() {
        assert!(
            tracer.is_running(),
            "a SIGHUP while starting ended tcptrace; stderr:\n{}",
            tracer.stderr_so_far()
        );
        assert!(Instant::now() < deadline, "tcptrace did not start tracing");
        if takes(tracer.pid(), libc::SIGHUP) {
            tracer.signal(libc::SIGHUP);
            sent += 1;
        }
        thread::sleep(Duration::from_millis(1));
    }
    assert!(sent > 0, "no SIGHUP reached tcptrace before it traced");
    tracer.signal(libc::SIGHUP);
    server.step("listen");
    one_connection(&mut server, "tt-early-cli");
    server.step("close-listener");
    tracer.wait_for(Duration::from_secs(5), "the connection's lines", |lines| {
        lines.len() == 12
    });
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
    assert_eq!(
        output.stderr.lines().last(),
        Some("tcptrace: 12 events written, 0 events lost")
    );
    server.exit();
}

#[test]
fn sigint_and_sigterm_while_starting_end_it_cleanly() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let tracer = spawn_tracer("9");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !takes(tracer.pid(), signal) {
            assert!(Instant::now() < deadline, "tcptrace did not start");
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!tracer.is_tracing(), "the signal would come too late");
        tracer.signal(signal);
        let output = tracer.finish(Duration::from_secs(10));
        assert!(
            output.status.success(),
            "signal {signal}: {}",
            output.stderr
        );
        assert_eq!(
            output.stderr.lines().last(),
            Some("tcptrace: 0 events written, 0 events lost"),
            "signal {signal}"
        );
    }
}

#[test]
fn two_instances_at_once_both_see_everything() {
    let mut server = Endpoint::server("127.0.0.1", "tt-two-srv");
    let port = server.port.to_string();
    let first = Tracer::start(&["--format", "json", "-4", "--port", &port]);
    let second = Tracer::start(&["--format", "json", "-4", "--port", &port]);
    server.step("listen");
    for i in 0..3 {
        one_connection(&mut server, &format!("tt-two-{i}"));
    }
    server.step("close-listener");
    server.exit();
    // Each instance reads the clock itself: times differ by microseconds, the rest is equal.
    let key = |l: &Value| {
        format!(
            "{} {} {} {} {} {} {}",
            l["skaddr"], l["sport"], l["dport"], l["oldstate"], l["newstate"], l["pid"], l["comm"]
        )
    };
    let sorted = |lines: Vec<Value>| {
        let mut keys: Vec<String> = lines.iter().map(key).collect();
        keys.sort();
        keys
    };
    let first = sorted(first.stop().json());
    let second = sorted(second.stop().json());
    assert_eq!(first.len(), 3 * 10 + 2);
    assert_eq!(first, second);
}

/// 1500 connections held open at once, then closed together: 15,002 transitions (10 per
/// connection and the listener's two) in bursts, once all transitions are printed, counted lost
/// or unseen by the kernel (or 10 s have passed).
fn held_connections_burst(extra: &[&str]) -> Burst {
    let mut server = Endpoint::server("127.0.0.1", "tt-burst-srv");
    let port = server.port;
    let port_arg = port.to_string();
    let mut args = vec!["--format", "json", "-4", "--port", &port_arg];
    args.extend_from_slice(extra);
    let tracer = Tracer::start(&args);
    let unseen = Unseen::start(tracer.pid());
    server.step("listen");
    server.send("accept-many 1500");
    let clients: Vec<TcpStream> = (0..1500)
        .map(|_| TcpStream::connect(socket_addr("127.0.0.1", port)).expect("connect"))
        .collect();
    server.ack();
    drop(clients);
    server.step("close-all");
    server.step("close-listener");
    let server_pid = server.pid();
    server.exit();
    let accounted = |lines: &[String]| {
        let events = lines
            .iter()
            .filter(|l| l.starts_with("{\"type\":\"state\""))
            .count() as u64;
        events + lost_count(lines)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while accounted(&tracer.lines_so_far()) + unseen.count() < 15_002 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let unseen = unseen.count();
    let output = tracer.stop();
    let lost = lost_count(&output.lines);
    Burst {
        lines: output.json(),
        lost,
        unseen,
        server_pid,
        port,
    }
}

/// What a burst of held connections printed.
struct Burst {
    lines: Vec<Value>,
    /// The `lost` lines' counts, summed.
    lost: u64,
    /// Transitions on the host the kernel ran no state program for, over the burst.
    unseen: u64,
    server_pid: u32,
    port: u16,
}

/// The sum of the `lost` lines' counts.
fn lost_count(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == "lost")
        .filter_map(|l| l["count"].as_u64())
        .sum()
}

/// Checks every state line names its real owner or, where `forgetful`, pid 0; returns how many
/// name pid 0.
fn check_owners(lines: &[Value], server_pid: u32, port: u16) -> usize {
    let me = std::process::id();
    let mut forgotten = 0;
    // `lost` lines carry a count, not a socket: only state lines name owners.
    for line in lines.iter().filter(|l| l["type"] == "state") {
        let owner = if line["sport"] == port {
            server_pid
        } else {
            me
        };
        let pid = line["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("a state line without pid: {line}")) as u32;
        assert!(pid == owner || pid == 0, "a wrong owner: {line}");
        if pid == 0 {
            assert_eq!(line["comm"], "");
            forgotten += 1;
        }
    }
    forgotten
}

#[test]
fn btf_mode_accounts_for_every_transition_of_a_burst() {
    let Burst {
        lines,
        lost,
        unseen,
        server_pid,
        port,
    } = held_connections_burst(&["--mode", "btf"]);
    // The kernel counts every run it skips of a BTF tracepoint program (bpf_trace_run), so each
    // of the test's transitions it ran the program for is printed or counted lost. The lost and
    // unseen counts are host-wide: they may also hold another socket's transitions, never fewer
    // than the test's own.
    let printed = lines.iter().filter(|l| l["type"] == "state").count() as u64;
    assert!(
        unseen * 1000 <= 15_002,
        "the kernel ran the state program for all but {unseen} of 15,002 transitions"
    );
    assert!(
        printed <= 15_002 && printed + lost + unseen >= 15_002,
        "{printed} printed + {lost} lost + {unseen} unseen by the kernel, for 15,002 transitions"
    );
    // No map to fill: every owner is known.
    assert_eq!(check_owners(&lines, server_pid, port), 0);
}

#[test]
fn a_full_socket_map_forgets_owners_and_never_invents_one() {
    // 1024 tracked sockets; the test holds 1500 connections, 3000 sockets, open at once.
    let Burst {
        lines,
        lost,
        server_pid,
        port,
        ..
    } = held_connections_burst(&["--mode", "tracefs", "--max-sockets", "1024"]);
    // Transitions are printed, or reported lost when the kernel skipped the program (a tracepoint
    // firing while a BPF program already runs on that CPU). The kernel's perf path can also drop a
    // nested classic tracepoint hit before any program runs, uncounted, so completeness is only
    // bounded in this mode.
    let printed = lines.iter().filter(|l| l["type"] == "state").count() as u64;
    let seen = printed + lost;
    assert!(
        (13_500..).contains(&seen) && printed <= 15_002,
        "{printed} printed + {lost} lost, for 15,002 transitions"
    );
    let forgotten = check_owners(&lines, server_pid, port);
    assert!(forgotten > 0, "the map never filled: {} lines", lines.len());
}
