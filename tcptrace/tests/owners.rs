//! Who owns a socket, where production breaks naive attribution: sockets and servers that predate
//! tcptrace, listeners on one port in two network namespaces, SO_REUSEPORT listeners of two
//! processes. Real processes, real namespaces, the real kernel; root required.
//!
//! BTF mode must name the right process on every line. tracefs mode cannot tell listeners that
//! share a port apart: it must print pid 0 there, never a wrong owner.

mod support;

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Endpoint, Netns, Tracer, lost_in, serial,
    servers::{Nginx, listener_holders},
    socket_addr,
};

const MODES: [&str; 2] = ["btf", "tracefs"];

/// The state lines of the socket whose local port is `local` and remote port `remote`.
fn lines_of(lines: &[Value], local: u16, remote: u16) -> Vec<&Value> {
    lines
        .iter()
        .filter(|l| l["type"] == "state" && l["sport"] == local && l["dport"] == remote)
        .collect()
}

/// Every state line of the server-side socket (local port `local`) whose remote port is `remote`.
/// Joined by `skaddr`: before Linux 6.x an accepted socket's `LISTEN -> SYN_RECV` line shows the
/// remote port as 0, the kernel filling it in right after.
fn accepted_lines(lines: &[Value], local: u16, remote: u16) -> Vec<&Value> {
    let sockets: Vec<&Value> = lines_of(lines, local, remote)
        .iter()
        .map(|l| &l["skaddr"])
        .collect();
    lines
        .iter()
        .filter(|l| l["type"] == "state" && l["sport"] == local && sockets.contains(&&l["skaddr"]))
        .filter(|l| l["newstate"] != "LISTEN" && l["oldstate"] != "CLOSE")
        .collect()
}

/// How long a test waits for the lines that end connections: a move to TIME_WAIT comes with the
/// timewait scan, which runs once a second, less often on a host with many sockets (the interval
/// grows with the scan's cost, up to 30 s).
const ENDS_WAIT: Duration = Duration::from_secs(45);

/// A raw line that ends a socket's connection: its CLOSE, or (BTF mode, for the side that closed
/// first) its move to TIME_WAIT, as `ss` shows it.
fn ends_connection(line: &str) -> bool {
    line.contains("\"newstate\":\"CLOSE\"") || line.contains("\"newstate\":\"TIME_WAIT\"")
}

fn pids(lines: &[&Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| l["pid"].as_u64().expect("pid"))
        .collect()
}

#[test]
fn sockets_that_predate_tracing_get_their_owners() {
    let _serial = serial();
    let mut server = Endpoint::server("127.0.0.1", "tt-old-srv");
    let port = server.port;
    let mut old_client = Endpoint::client("tt-old-cli");
    server.step("listen");
    old_client.step(&format!("connect 127.0.0.1:{port}"));
    server.step("accept");

    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--mode",
        "btf",
        "--snapshot",
        "--port",
        &port.to_string(),
    ]);
    // The snapshot comes first: the listener and both ends of the open connection.
    tracer.wait_for(Duration::from_secs(5), "three snapshot lines", |lines| {
        lines
            .iter()
            .filter(|l| l.starts_with("{\"type\":\"socket\""))
            .count()
            >= 3
    });
    let snapshot = support::parse_and_validate(&tracer.lines_so_far());
    let mut existing: Vec<(String, u64, u64)> = snapshot
        .iter()
        .filter(|l| l["type"] == "socket")
        .map(|l| {
            (
                l["state"].as_str().unwrap().to_owned(),
                l["sport"].as_u64().unwrap(),
                l["pid"].as_u64().unwrap(),
            )
        })
        .collect();
    existing.sort();
    let mut expected = vec![
        (
            "ESTABLISHED".to_owned(),
            u64::from(port),
            u64::from(server.pid()),
        ),
        (
            "LISTEN".to_owned(),
            u64::from(port),
            u64::from(server.pid()),
        ),
    ];
    // The client's end: its ephemeral port is not known here, only its owner.
    let client_end = existing
        .iter()
        .find(|(state, sport, _)| state == "ESTABLISHED" && *sport != u64::from(port))
        .cloned()
        .unwrap_or_else(|| panic!("no client end in the snapshot: {existing:?}"));
    assert_eq!(client_end.2, u64::from(old_client.pid()), "{existing:?}");
    expected.push(client_end.clone());
    expected.sort();
    assert_eq!(existing, expected);
    assert!(
        snapshot.iter().all(|l| l["type"] == "socket"),
        "the snapshot comes before live lines: {snapshot:?}"
    );
    let old_client_port = client_end.1 as u16;

    // A new connection to the old server, and the old connection's close.
    let mut new_client = Endpoint::client("tt-new-cli");
    new_client.step(&format!("connect 127.0.0.1:{port}"));
    assert_eq!(server.accept_ready(1).len(), 1);
    old_client.step("close");
    server.step("wait-eof");
    server.step("close");
    tracer.wait_for(ENDS_WAIT, "the old connection's CLOSE lines", |lines| {
        lines
            .iter()
            .filter(|l| {
                ends_connection(l)
                    && (l.contains(&format!("\"sport\":{old_client_port},"))
                        || l.contains(&format!("\"dport\":{old_client_port},")))
            })
            .count()
            >= 2
    });
    let lines = tracer.stop().json();

    let server_pid = u64::from(server.pid());
    let old_server_end = lines_of(&lines, port, old_client_port);
    let old_client_end = lines_of(&lines, old_client_port, port);
    assert!(
        !old_server_end.is_empty() && !old_client_end.is_empty(),
        "{lines:?}"
    );
    assert!(
        pids(&old_server_end).iter().all(|&p| p == server_pid),
        "{old_server_end:?}"
    );
    assert!(
        pids(&old_client_end)
            .iter()
            .all(|&p| p == u64::from(old_client.pid())),
        "{old_client_end:?}"
    );
    // Every other line of the port: the new connection, named after the server or the new client.
    for line in lines.iter().filter(|l| l["type"] == "state") {
        let pid = line["pid"].as_u64().unwrap();
        if line["sport"] == port {
            assert_eq!(pid, server_pid, "{line}");
        } else if line["sport"] != old_client_port {
            assert_eq!(pid, u64::from(new_client.pid()), "{line}");
        }
    }
    assert!(
        lines.iter().any(|l| l["type"] == "state"
            && l["oldstate"] == "LISTEN"
            && l["newstate"] == "SYN_RECV"),
        "the new connection was not seen: {lines:?}"
    );
}

#[test]
fn listeners_on_one_port_in_two_network_namespaces() {
    for mode in MODES {
        let _serial = serial();
        let (ns_a, ns_b) = (Netns::new(21), Netns::new(22));
        let mut server_a = Endpoint::server_at(Some(&ns_a.name), "127.0.0.1", 0, "tt-ns-a", false);
        let port = server_a.port;
        let mut server_b =
            Endpoint::server_at(Some(&ns_b.name), "127.0.0.1", port, "tt-ns-b", false);
        let tracer = Tracer::start(&[
            "--format",
            "json",
            "-4",
            "--mode",
            mode,
            "--port",
            &port.to_string(),
        ]);
        server_a.step("listen");
        // The second namespace's server listens last.
        server_b.step("listen");
        let mut client_a = Endpoint::client_in(&ns_a.name, "tt-ns-a-cli");
        client_a.step(&format!("connect 127.0.0.1:{port}"));
        let peers_a = server_a.accept_ready(1);
        let mut client_b = Endpoint::client_in(&ns_b.name, "tt-ns-b-cli");
        client_b.step(&format!("connect 127.0.0.1:{port}"));
        let peers_b = server_b.accept_ready(1);
        assert_eq!((peers_a.len(), peers_b.len()), (1, 1));
        tracer.wait_for(Duration::from_secs(5), "both accepted sockets", |lines| {
            lines
                .iter()
                .filter(|l| l.contains("\"oldstate\":\"SYN_RECV\""))
                .count()
                >= 2
        });
        let lines = tracer.stop().json();
        for (peer, server) in [(peers_a[0], &server_a), (peers_b[0], &server_b)] {
            let accepted = accepted_lines(&lines, port, peer);
            assert!(accepted.len() + lost_in(&lines) >= 2, "{mode}: {lines:?}");
            let expected = if mode == "btf" {
                u64::from(server.pid())
            } else {
                0
            };
            assert!(
                pids(&accepted).iter().all(|&p| p == expected),
                "{mode}: the socket accepted by {} names {:?}: {accepted:?}",
                server.comm,
                pids(&accepted)
            );
        }
    }
}

#[test]
fn so_reuseport_listeners_of_two_processes() {
    for mode in MODES {
        let _serial = serial();
        let mut first = Endpoint::server_at(None, "127.0.0.1", 0, "tt-reuse-1", true);
        let port = first.port;
        let mut second = Endpoint::server_at(None, "127.0.0.1", port, "tt-reuse-2", true);
        let tracer = Tracer::start(&[
            "--format",
            "json",
            "-4",
            "--mode",
            mode,
            "--port",
            &port.to_string(),
        ]);
        first.step("listen");
        second.step("listen");
        // The kernel spreads connections over the two listeners by a hash of each 4-tuple.
        let clients: Vec<TcpStream> = (0..32)
            .map(|_| TcpStream::connect(socket_addr("127.0.0.1", port)).expect("connect"))
            .collect();
        // Each listener's share is not known, only the sum: taken until all have come (or 10 s).
        let (mut peers_first, mut peers_second) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        while peers_first.len() + peers_second.len() < clients.len() && Instant::now() < deadline {
            peers_first.extend(first.accept_ready(0));
            peers_second.extend(second.accept_ready(0));
        }
        assert_eq!(peers_first.len() + peers_second.len(), clients.len());
        assert!(
            !peers_first.is_empty() && !peers_second.is_empty(),
            "one listener took all 32 connections"
        );
        tracer.wait_for(Duration::from_secs(5), "every accepted socket", |lines| {
            lines
                .iter()
                .filter(|l| l.contains("\"oldstate\":\"SYN_RECV\""))
                .count()
                >= 32
        });
        let lines = tracer.stop().json();
        for (peers, server) in [(&peers_first, &first), (&peers_second, &second)] {
            let expected = if mode == "btf" {
                u64::from(server.pid())
            } else {
                0
            };
            for &peer in peers {
                let accepted = accepted_lines(&lines, port, peer);
                assert_eq!(accepted.len(), 2, "{mode}: {accepted:?}");
                assert!(
                    pids(&accepted).iter().all(|&p| p == expected),
                    "{mode}: accepted by {} but named {:?}",
                    server.comm,
                    pids(&accepted)
                );
            }
        }
        drop(clients);
    }
}

/// Every server-side line names a process that holds the listener, and every client-side line
/// names ab.
fn check_nginx_lines(lines: &[Value], nginx: &Nginx, holders: &[u64], ab: u32) {
    let server_side: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "state" && l["sport"] == nginx.port && l["dport"] != 0)
        .collect();
    assert!(
        server_side.len() >= 200 * 4,
        "{} server-side lines",
        server_side.len()
    );
    for line in &server_side {
        let pid = line["pid"].as_u64().unwrap();
        assert!(
            holders.contains(&pid),
            "{line} names {pid}, not one of {holders:?}"
        );
        assert_eq!(line["comm"], "nginx", "{line}");
    }
    for line in lines
        .iter()
        .filter(|l| l["type"] == "state" && l["dport"] == nginx.port)
    {
        assert_eq!(line["pid"].as_u64(), Some(u64::from(ab)), "{line}");
    }
}

#[test]
fn nginx_started_before_tracing() {
    let _serial = serial();
    let port = support::free_port();
    let nginx = Nginx::start(port, false);
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--mode",
        "btf",
        "--port",
        &port.to_string(),
    ]);
    let ab = nginx.load(200);
    tracer.wait_for(ENDS_WAIT, "200 server-side CLOSE lines", |lines| {
        lines
            .iter()
            .filter(|l| ends_connection(l) && l.contains(&format!("\"sport\":{port}")))
            .count()
            >= 200
    });
    let holders = nginx.listener_holders();
    assert!(holders.len() >= 3, "ss lists {holders:?}");
    check_nginx_lines(&tracer.stop().json(), &nginx, &holders, ab);
}

#[test]
fn nginx_started_after_tracing() {
    let _serial = serial();
    let port = support::free_port();
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--mode",
        "btf",
        "--port",
        &port.to_string(),
    ]);
    let nginx = Nginx::start(port, false);
    let ab = nginx.load(200);
    tracer.wait_for(ENDS_WAIT, "200 server-side CLOSE lines", |lines| {
        lines
            .iter()
            .filter(|l| ends_connection(l) && l.contains(&format!("\"sport\":{port}")))
            .count()
            >= 200
    });
    let holders = nginx.listener_holders();
    assert!(holders.len() >= 3, "ss lists {holders:?}");
    let lines = tracer.stop().json();
    // The listener's own line names the process that called listen(), before it daemonized.
    check_nginx_lines(&lines, &nginx, &holders, ab);
}

/// A `handover_server` (see tcptrace/examples/handover_server.rs); ended by the pid it reports.
struct Handover {
    child: std::process::Child,
    pid: i32,
    port: u16,
}

impl Handover {
    fn start(args: &[&str], port: u16) -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let binary = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target dir")
            .join("examples/handover_server");
        let mut child = std::process::Command::new(binary)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("handover_server");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read");
        let pid = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("handover_server said {line:?}"));
        Self { child, pid, port }
    }

    /// Connections that each send a byte and read it back.
    fn load(&self, connections: usize) {
        for _ in 0..connections {
            let mut stream =
                TcpStream::connect(socket_addr("127.0.0.1", self.port)).expect("connect");
            std::io::Write::write_all(&mut stream, b"x").expect("write");
            let mut byte = [0];
            std::io::Read::read_exact(&mut stream, &mut byte).expect("read");
        }
    }

    fn listener_holders(&self) -> Vec<u64> {
        listener_holders(self.port)
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        // SAFETY: signalling the server this test started (the launcher's pid when it stays).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The server side's state lines (not the listener's own).
fn server_side(lines: &[Value], port: u16) -> Vec<&Value> {
    lines
        .iter()
        .filter(|l| l["type"] == "state" && l["sport"] == port && l["dport"] != 0)
        .collect()
}

#[test]
fn a_pre_forked_server_is_named_after_a_holder_of_its_listener() {
    for mode in MODES {
        let _serial = serial();
        let port = support::free_port();
        let tracer = Tracer::start(&[
            "--format",
            "json",
            "-4",
            "--mode",
            mode,
            "--port",
            &port.to_string(),
        ]);
        let server = Handover::start(&["prefork", &port.to_string(), "3"], port);
        server.load(20);
        tracer.wait_for(ENDS_WAIT, "20 server-side CLOSE lines", |lines| {
            lines
                .iter()
                .filter(|l| {
                    ends_connection(l)
                        && l.contains(&format!("\"sport\":{port},\"daddr\":\"127.0.0.1\""))
                })
                .count()
                >= 20
        });
        let holders = server.listener_holders();
        assert_eq!(holders.len(), 4, "ss lists {holders:?}");
        let lines = tracer.stop().json();
        let served = server_side(&lines, port);
        assert!(
            served.len() + lost_in(&lines) >= 20 * 4,
            "{mode}: {} lines",
            served.len()
        );
        for line in served {
            let pid = line["pid"].as_u64().unwrap();
            assert!(
                holders.contains(&pid),
                "{mode}: {line} names {pid}, not one of {holders:?}"
            );
            assert_eq!(line["comm"], "tt-prefork", "{mode}: {line}");
        }
    }
}

#[test]
fn a_listener_handed_over_exec_is_named_after_the_server_that_holds_it() {
    let _serial = serial();
    let port = support::free_port();
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--mode",
        "btf",
        "--port",
        &port.to_string(),
    ]);
    let server = Handover::start(&["exec", &port.to_string()], port);
    server.load(20);
    tracer.wait_for(ENDS_WAIT, "20 server-side CLOSE lines", |lines| {
        lines
            .iter()
            .filter(|l| {
                ends_connection(l)
                    && l.contains(&format!("\"sport\":{port},\"daddr\":\"127.0.0.1\""))
            })
            .count()
            >= 20
    });
    assert_eq!(server.listener_holders(), [server.pid as u64]);
    let lines = tracer.stop().json();
    // The listen() call itself was the launcher's.
    let listen = lines
        .iter()
        .find(|l| l["type"] == "state" && l["newstate"] == "LISTEN")
        .expect("the LISTEN line");
    assert_eq!(listen["comm"], "tt-launcher");
    let served = server_side(&lines, port);
    assert!(served.len() >= 20 * 4, "{} lines", served.len());
    for line in served {
        assert_eq!(line["pid"].as_i64(), Some(i64::from(server.pid)), "{line}");
        assert_eq!(line["comm"], "handover_server", "{line}");
    }
}

#[test]
fn an_exited_owner_hands_nothing_to_a_child_forked_before_the_socket() {
    let _serial = serial();
    let port = support::free_port();
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--mode",
        "btf",
        "--port",
        &port.to_string(),
    ]);
    let exe = std::env::current_exe().expect("current_exe");
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples/handover_server");
    let mut server = std::process::Command::new(binary)
        .args(["early-fork", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("handover_server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    let pids: Vec<i32> = line
        .trim()
        .strip_prefix("ready ")
        .map(|rest| rest.split(' ').filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default();
    let [parent, child] = pids[..] else {
        panic!("handover_server said {line:?}");
    };
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: signalling the sleeping child this test's server forked.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _child = Kill(child);
    let mut stream = TcpStream::connect(socket_addr("127.0.0.1", port)).expect("connect");
    std::io::Write::write_all(&mut stream, b"x").expect("write");
    let mut byte = [0];
    std::io::Read::read_exact(&mut stream, &mut byte).expect("read");
    assert!(server.wait().expect("wait").success());
    drop(stream);
    tracer.wait_for(ENDS_WAIT, "the server side's CLOSE line", |lines| {
        lines.iter().any(|l| {
            ends_connection(l) && l.contains(&format!("\"sport\":{port},\"daddr\":\"127.0.0.1\""))
        })
    });
    let lines = tracer.stop().json();
    let served = server_side(&lines, port);
    assert!(served.len() >= 4, "{served:?}");
    for line in served {
        // Its transitions after the exit (FIN_WAIT1 and on) still name the server, not the
        // child that never held the socket.
        assert_eq!(line["pid"].as_i64(), Some(i64::from(parent)), "{line}");
    }
}

/// A server that listens from a thread named `tt-listener` and a client that connects from one
/// named `tt-worker`: every line of their sockets names the process, as `ps` does, in both modes;
/// tracefs mode, whose kernel side sees only the thread, adds the thread's name as `thread`.
#[test]
fn a_worker_thread_s_socket_is_named_after_its_process() {
    let _serial = serial();
    let mut server = Endpoint::server("127.0.0.1", "tt-thr-srv");
    let mut client = Endpoint::client("tt-thr-cli");
    let port = server.port;
    let tracers: Vec<Tracer> = MODES
        .iter()
        .map(|mode| {
            Tracer::start(&[
                "--format",
                "json",
                "--mode",
                mode,
                "--port",
                &port.to_string(),
            ])
        })
        .collect();
    server.step("listen-from-thread");
    client.step(&format!("connect-from-thread 127.0.0.1:{port}"));
    server.step("accept");
    client.step("close");
    server.step("close-all");
    server.step("close-listener");
    for (mode, tracer) in MODES.iter().zip(tracers) {
        let lines = tracer.stop().json();
        let states: Vec<&Value> = lines.iter().filter(|l| l["type"] == "state").collect();
        let sides = [
            // SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE.
            ("dport", &client, "tt-worker", 4),
            // LISTEN and its CLOSE; the child's SYN_RECV, ESTABLISHED, CLOSE_WAIT, ...
            ("sport", &server, "tt-listener", 5),
        ];
        for (side, owner, thread, at_least) in sides {
            let owned: Vec<&&Value> = states.iter().filter(|l| l[side] == port).collect();
            assert!(
                owned.len() + lost_in(&lines) >= at_least,
                "{mode}: {side}: {lines:?}"
            );
            for line in owned {
                assert_eq!(line["pid"], owner.pid(), "{mode}: {line}");
                assert_eq!(line["comm"], owner.comm.as_str(), "{mode}: {line}");
                let thread = (*mode == "tracefs").then_some(thread);
                assert_eq!(line["thread"].as_str(), thread, "{mode}: {line}");
            }
        }
    }
    server.exit();
    client.exit();
}

/// A process that renames itself after connecting on its main thread: its lines keep the name
/// it had then, in both modes, and carry no `thread` (tracefs mode looks a name up only for a
/// socket opened on another thread). Past the name cache's second, a lookup would give the new
/// name and call the old one a thread's.
#[test]
fn a_main_thread_s_socket_keeps_the_name_it_was_opened_under() {
    let _serial = serial();
    let mut server = Endpoint::server("127.0.0.1", "tt-ren-srv");
    let mut client = Endpoint::client("tt-ren-cli");
    let port = server.port;
    let tracers: Vec<Tracer> = MODES
        .iter()
        .map(|mode| {
            Tracer::start(&[
                "--format",
                "json",
                "--mode",
                mode,
                "--pid",
                &client.pid().to_string(),
            ])
        })
        .collect();
    server.step("listen");
    client.step(&format!("connect 127.0.0.1:{port}"));
    server.step("accept");
    client.step("rename tt-renamed");
    std::thread::sleep(Duration::from_millis(1200));
    client.step("close");
    server.step("close-all");
    for (mode, tracer) in MODES.iter().zip(tracers) {
        let lines = tracer.stop().json();
        let client_lines: Vec<&Value> = lines
            .iter()
            .filter(|l| l["type"] == "state" && l["dport"] == port)
            .collect();
        // SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE.
        assert!(
            client_lines.len() + lost_in(&lines) >= 4,
            "{mode}: {lines:?}"
        );
        for line in client_lines {
            assert_eq!(line["pid"], client.pid(), "{mode}: {line}");
            assert_eq!(line["comm"], "tt-ren-cli", "{mode}: {line}");
            assert!(line.get("thread").is_none(), "{mode}: {line}");
        }
    }
    server.exit();
    client.exit();
}
