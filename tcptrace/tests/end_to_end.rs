//! The real thing: the real eBPF program in the real kernel, real TCP between separate server and
//! client processes over loopback, and assertions on what tcptrace printed. Root required.

mod support;

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Endpoint, Tracer, Window, by_socket, first_closer_end, socket_addr, touches_port, transitions,
};

const CLIENT_FIRST_CLIENT: [&str; 5] = [
    "CLOSE->SYN_SENT",
    "SYN_SENT->ESTABLISHED",
    "ESTABLISHED->FIN_WAIT1",
    "FIN_WAIT1->FIN_WAIT2",
    "FIN_WAIT2->CLOSE",
];
const CLIENT_FIRST_SERVER: [&str; 5] = [
    "LISTEN->SYN_RECV",
    "SYN_RECV->ESTABLISHED",
    "ESTABLISHED->CLOSE_WAIT",
    "CLOSE_WAIT->LAST_ACK",
    "LAST_ACK->CLOSE",
];
const SERVER_FIRST_CLIENT: [&str; 5] = [
    "CLOSE->SYN_SENT",
    "SYN_SENT->ESTABLISHED",
    "ESTABLISHED->CLOSE_WAIT",
    "CLOSE_WAIT->LAST_ACK",
    "LAST_ACK->CLOSE",
];
const SERVER_FIRST_SERVER: [&str; 5] = [
    "LISTEN->SYN_RECV",
    "SYN_RECV->ESTABLISHED",
    "ESTABLISHED->FIN_WAIT1",
    "FIN_WAIT1->FIN_WAIT2",
    "FIN_WAIT2->CLOSE",
];
const LISTENER: [&str; 2] = ["CLOSE->LISTEN", "LISTEN->CLOSE"];

/// How long each scenario holds ESTABLISHED and the half-closed state.
const HOLD_ESTABLISHED: Duration = Duration::from_millis(200);
const HOLD_HALF_CLOSED: Duration = Duration::from_millis(300);

/// One connection between a server and a client process, and when each step happened.
struct Connection {
    ip: &'static str,
    server_closes_first: bool,
    server: Endpoint,
    client: Endpoint,
}

/// What the test knows about a finished connection, to check tcptrace's lines against.
struct Expected {
    ip: &'static str,
    port: u16,
    server_pid: u32,
    server_comm: String,
    client_pid: u32,
    client_comm: String,
    client_transitions: [&'static str; 5],
    server_transitions: [&'static str; 5],
    /// (socket role, transition, lowest and highest possible time spent in its old state).
    durations: Vec<(&'static str, &'static str, (u64, u64))>,
}

impl Connection {
    fn new(ip: &'static str, server_closes_first: bool, tag: &str) -> Self {
        let server = Endpoint::server(ip, &format!("tt-srv-{tag}"));
        let client = Endpoint::client(&format!("tt-cli-{tag}"));
        Self {
            ip,
            server_closes_first,
            server,
            client,
        }
    }

    /// Drives the connection through its whole life; tcptrace must be tracing already.
    fn run(mut self) -> Expected {
        let port = self.server.port;
        self.server.step("listen");
        self.server.send("accept");
        let connect = self
            .client
            .step(&format!("connect {}", socket_addr(self.ip, port)));
        self.server.ack();
        let server_established = Window::between(connect.start, Instant::now());
        self.server.send("echo");
        self.client.step("send");
        self.server.ack();
        thread::sleep(HOLD_ESTABLISHED);

        let (first, second) = if self.server_closes_first {
            (&mut self.server, &mut self.client)
        } else {
            (&mut self.client, &mut self.server)
        };
        let close = first.step("close");
        let eof = second.step("wait-eof");
        let half_closed = Window::between(close.start, eof.end);
        thread::sleep(HOLD_HALF_CLOSED);
        let last_close = second.step("close");
        self.server.step("close-listener");

        let (client_established, server_established_w) = (connect, server_established);
        let durations = if self.server_closes_first {
            vec![
                (
                    "server",
                    "ESTABLISHED->FIN_WAIT1",
                    server_established_w.until(&close),
                ),
                (
                    "client",
                    "ESTABLISHED->CLOSE_WAIT",
                    client_established.until(&half_closed),
                ),
                (
                    "client",
                    "CLOSE_WAIT->LAST_ACK",
                    half_closed.until(&last_close),
                ),
            ]
        } else {
            vec![
                (
                    "client",
                    "ESTABLISHED->FIN_WAIT1",
                    client_established.until(&close),
                ),
                (
                    "server",
                    "ESTABLISHED->CLOSE_WAIT",
                    server_established_w.until(&half_closed),
                ),
                (
                    "server",
                    "CLOSE_WAIT->LAST_ACK",
                    half_closed.until(&last_close),
                ),
            ]
        };
        let expected = Expected {
            ip: self.ip,
            port,
            server_pid: self.server.pid(),
            server_comm: self.server.comm.clone(),
            client_pid: self.client.pid(),
            client_comm: self.client.comm.clone(),
            client_transitions: if self.server_closes_first {
                SERVER_FIRST_CLIENT
            } else {
                CLIENT_FIRST_CLIENT
            },
            server_transitions: if self.server_closes_first {
                SERVER_FIRST_SERVER
            } else {
                CLIENT_FIRST_SERVER
            },
            durations,
        };
        self.server.exit();
        self.client.exit();
        expected
    }
}

/// Whether a line names one of the connection's two processes. A port number is free again once
/// its connection closed, and a later connection of the same test may get it (as a server's or
/// a client's port); that connection's processes are others. Every socket's transitions are
/// checked in full, so a line of ours that named another process would be missed, and fail.
fn is_of(line: &Value, expected: &Expected) -> bool {
    line["pid"] == expected.server_pid || line["pid"] == expected.client_pid
}

/// Checks every line tcptrace printed about one connection.
fn check(expected: &Expected, lines: &[Value]) {
    let Expected {
        ip,
        port,
        server_pid,
        client_pid,
        ..
    } = *expected;
    // The same port number can be had once per family (127.0.0.1 and ::1 do not collide).
    let family = if ip.contains(':') { "ipv6" } else { "ipv4" };
    let ours: Vec<&Value> = lines
        .iter()
        .filter(|l| touches_port(l, port) && l["family"] == family && is_of(l, expected))
        .collect();
    let sockets = by_socket(ours.iter().copied());
    // Every line on the port, also of other processes: a line of ours with a wrong owner shows.
    let context = || {
        format!(
            "port {port} (lines of other processes marked *):\n{}",
            lines
                .iter()
                .filter(|l| touches_port(l, port) && l["family"] == family)
                .map(|l| format!("{}{l}", if is_of(l, expected) { "" } else { "* " }))
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    assert_eq!(
        sockets.len(),
        3,
        "expected a listener, a client and an accepted socket; {}",
        context()
    );

    let role_of = |socket: &[&Value]| match transitions(socket).first().map(String::as_str) {
        Some("CLOSE->LISTEN") => "listener",
        Some("CLOSE->SYN_SENT") => "client",
        Some("LISTEN->SYN_RECV") => "server",
        other => panic!("unexpected first transition {other:?}; {}", context()),
    };
    let mut client_port = None;
    for socket in sockets.values() {
        let role = role_of(socket);
        let expected_transitions: &[&str] = match role {
            "listener" => &LISTENER,
            "client" => &expected.client_transitions,
            _ => &expected.server_transitions,
        };
        // The first closer's end, as the mode writes it.
        let expected_transitions: Vec<&str> = expected_transitions
            .iter()
            .map(|&t| {
                if t == "FIN_WAIT2->CLOSE" {
                    first_closer_end()
                } else {
                    t
                }
            })
            .collect();
        assert_eq!(
            transitions(socket),
            expected_transitions,
            "{role} socket; {}",
            context()
        );
        let (pid, comm) = if role == "client" {
            (client_pid, &expected.client_comm)
        } else {
            (server_pid, &expected.server_comm)
        };
        for (i, line) in socket.iter().enumerate() {
            assert_eq!(line["pid"], pid, "owner pid of a {role} line: {line}");
            assert_eq!(
                line["comm"],
                comm.as_str(),
                "owner comm of a {role} line: {line}"
            );
            assert_eq!(line["family"], family, "{line}");
            assert_eq!(line["saddr"], ip, "{line}");
            let time = line["time"].as_str().unwrap();
            assert!(
                time.len() == 30 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
                "time {time}"
            );
            // The first transition seen of a socket has no previous one to measure from.
            if i == 0 {
                assert!(line["duration_ns"].is_null(), "{line}");
            } else {
                assert!(line["duration_ns"].is_u64(), "{line}");
            }
            if line["newstate"] == "CLOSE" {
                assert_eq!(line["retransmits"], 0, "{line}");
            }
            match role {
                "listener" => assert_eq!(line["sport"], port, "{line}"),
                // Older kernels (6.1 among them) fill in an accepted socket's remote address and
                // port only after its LISTEN -> SYN_RECV transition; that line then shows the
                // unspecified address and port 0, as the kernel reported them.
                "server" if i == 0 && line["dport"] == 0 => {
                    let unspecified = if ip.contains(':') { "::" } else { "0.0.0.0" };
                    assert_eq!(
                        (line["sport"].as_u64(), line["daddr"].as_str()),
                        (Some(port.into()), Some(unspecified)),
                        "{line}"
                    );
                }
                "server" => {
                    assert_eq!(
                        (line["sport"].as_u64(), line["daddr"].as_str()),
                        (Some(port.into()), Some(ip)),
                        "{line}"
                    );
                    client_port.get_or_insert(line["dport"].clone());
                    assert_eq!(line["dport"], *client_port.as_ref().unwrap(), "{line}");
                }
                _ => {
                    assert_eq!(
                        (line["dport"].as_u64(), line["daddr"].as_str()),
                        (Some(port.into()), Some(ip)),
                        "{line}"
                    );
                    // The local port is bound right after CLOSE -> SYN_SENT.
                    if i > 0 {
                        assert_ne!(line["sport"], 0, "{line}");
                    }
                }
            }
        }
    }
    // The client's local port is the accepted socket's remote port.
    let client_sport =
        sockets.values().find(|s| role_of(s) == "client").unwrap()[1]["sport"].clone();
    assert_eq!(Some(client_sport), client_port, "{}", context());

    for (role, transition, (lo, hi)) in &expected.durations {
        let socket = sockets.values().find(|s| role_of(s) == *role).unwrap();
        let line = socket
            .iter()
            .find(|l| {
                format!(
                    "{}->{}",
                    l["oldstate"].as_str().unwrap(),
                    l["newstate"].as_str().unwrap()
                ) == *transition
            })
            .unwrap();
        let ns = line["duration_ns"].as_u64().unwrap();
        assert!(
            (lo..=hi).contains(&&ns),
            "{role} {transition}: {ns} ns outside [{lo}, {hi}]: {line}"
        );
    }
}

#[test]
fn every_transition_of_both_sides_with_its_owner_ipv4_and_ipv6() {
    let tracer = Tracer::start(&["--format", "json"]);
    let mut expectations = Vec::new();
    for (ip, family) in [("127.0.0.1", "4"), ("::1", "6")] {
        for (server_first, order) in [(false, "c"), (true, "s")] {
            expectations.push(Connection::new(ip, server_first, &format!("{family}{order}")).run());
        }
    }
    let output = tracer.stop();
    assert!(
        output.status.success(),
        "exit {}; stderr: {}",
        output.status,
        output.stderr
    );
    // Nothing lost first: a lost line would fail the checks below for a reason they do not say.
    let summary = output.stderr.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("tcptrace: ") && summary.contains("events written, 0 events lost"),
        "{}",
        output.stderr
    );
    // Shown only when a check below fails.
    println!("tcptrace's stderr:\n{}", output.stderr);
    let lines = output.json();
    for expected in &expectations {
        check(expected, &lines);
    }
}

#[test]
fn pid_filter_keeps_exactly_the_clients_sockets() {
    let connection = Connection::new("127.0.0.1", false, "pidf");
    let client_pid = connection.client.pid().to_string();
    // Unrelated traffic, owned by another process, while the filter is on.
    let other = Connection::new("127.0.0.1", true, "other");
    let tracer = Tracer::start(&["--format", "json", "--pid", &client_pid]);
    let expected = connection.run();
    let other = other.run();
    let lines = tracer.stop().json();
    assert!(!lines.is_empty());
    for line in &lines {
        assert_eq!(
            line["pid"], expected.client_pid,
            "a line of another process passed --pid: {line}"
        );
    }
    let sockets = by_socket(lines.iter());
    assert_eq!(sockets.len(), 1, "{lines:?}");
    let client = sockets.values().next().unwrap();
    let mut client_transitions = CLIENT_FIRST_CLIENT;
    client_transitions[4] = first_closer_end();
    assert_eq!(transitions(client), client_transitions);
    assert!(
        client
            .iter()
            .all(|l| l["dport"] == expected.port && l["comm"] == expected.client_comm.as_str())
    );
    assert!(lines.iter().all(|l| !touches_port(l, other.port)));
}

#[test]
fn port_filter_keeps_both_sides_of_the_port_and_nothing_else() {
    let connection = Connection::new("::1", false, "portf");
    let port = connection.server.port.to_string();
    let other = Connection::new("::1", false, "noise");
    let tracer = Tracer::start(&["--format", "json", "-6", "--port", &port]);
    let expected = connection.run();
    other.run();
    let lines = tracer.stop().json();
    // The other connection's listener and accepted socket are on its own port (bound alongside
    // this one); its client may get this port once this connection has ended, and is then kept.
    for line in &lines {
        assert!(
            touches_port(line, expected.port),
            "a line without port {port} passed --port: {line}"
        );
    }
    check(&expected, &lines);
}

#[test]
fn text_output_is_an_aligned_table() {
    let connection = Connection::new("127.0.0.1", false, "text");
    let port = connection.server.port;
    let tracer = Tracer::start(&["--port", &port.to_string(), "-T", "-4"]);
    let expected = connection.run();
    let output = tracer.stop();
    assert!(output.status.success());
    let header = &output.lines[0];
    assert!(
        header.starts_with("TIME            PID     COMM             LADDR           LPORT RADDR"),
        "{header}"
    );
    let rows = &output.lines[1..];
    assert_eq!(rows.len(), 12, "{:#?}", output.lines);
    let ms_column = header.find("MS").unwrap();
    for row in rows {
        let mut cols: Vec<&str> = row.split_whitespace().collect();
        // BTF mode ends a connection's CLOSE line with why it ended, after the MS column.
        let mut row = row.as_str();
        if cols.len() == 12 {
            assert_eq!(cols[9], "CLOSE", "{row}");
            assert!(
                ["fin", "reset_sent(TCP_STATE)"].contains(&cols[11]),
                "{row}"
            );
            row = row.trim_end_matches(cols[11]).trim_end();
            cols.pop();
        }
        assert_eq!(cols.len(), 11, "{row}");
        let owner = if cols[2] == expected.client_comm {
            expected.client_pid
        } else {
            expected.server_pid
        };
        assert_eq!(cols[1], owner.to_string(), "{row}");
        assert!(
            cols[2] == expected.client_comm || cols[2] == expected.server_comm,
            "{row}"
        );
        assert_eq!(cols[8], "->");
        assert!(cols[10] == "-" || cols[10].parse::<f64>().is_ok(), "{row}");
        assert_eq!(
            row.rfind(' ').unwrap() + 1,
            ms_column,
            "MS column misaligned: {row}"
        );
    }
    assert!(rows.iter().any(
        |r| r.contains(&format!("127.0.0.1       {port:<5} 127.0.0.1"))
            && r.contains("CLOSE_WAIT   -> LAST_ACK")
    ));
}

#[test]
fn sparse_events_reach_the_output_within_a_second() {
    let mut server = Endpoint::server("127.0.0.1", "tt-sparse");
    let port = server.port;
    let tracer = Tracer::start(&["--format", "json", "-4", "--port", &port.to_string()]);
    let listen = server.step("listen");
    tracer.wait_for(Duration::from_secs(1), "the LISTEN line", |lines| {
        lines.iter().any(|l| l.contains("\"newstate\":\"LISTEN\""))
    });
    assert!(listen.end.elapsed() < Duration::from_secs(1));
    server.step("close-listener");
    server.exit();
    let output = tracer.stop();
    assert_eq!(output.json().len(), 2);
}

#[test]
fn sigterm_flushes_and_exits_zero_with_a_summary() {
    let mut server = Endpoint::server("127.0.0.1", "tt-term");
    let tracer = Tracer::start(&["--format", "json", "-4", "--port", &server.port.to_string()]);
    server.step("listen");
    server.exit();
    thread::sleep(Duration::from_millis(100));
    tracer.signal(libc::SIGTERM);
    let output = tracer.finish(Duration::from_secs(2));
    assert!(output.status.success(), "{}", output.status);
    assert_eq!(output.json().len(), 2, "{:?}", output.lines);
    assert_eq!(
        output.stderr.lines().last(),
        Some("tcptrace: 2 events written, 0 events lost")
    );
}

#[test]
fn without_privileges_it_says_what_is_missing() {
    support::require_root();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(support::TCPTRACE)
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("root"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_values_exit_2_before_touching_the_kernel() {
    for args in [
        &["--port", "70000"][..],
        &["--pid", "x"],
        &["--format", "yaml"],
        &["--ring-buffer-size", "3M"],
    ] {
        let out = Command::new(support::TCPTRACE).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    let many: Vec<String> = (1..=1025).map(|p| p.to_string()).collect();
    let out = Command::new(support::TCPTRACE)
        .arg("--port")
        .arg(many.join(","))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 1024"));
}
