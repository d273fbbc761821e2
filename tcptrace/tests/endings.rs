//! How connections end (BTF mode), provoked for real: each reason on its CLOSE line with the
//! connection's summary, `--failures`, and TIME_WAIT as `ss` shows it (the hand-over to a
//! timewait socket, the move to TIME_WAIT, the end).

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{Netns, Tracer, free_port, in_netns, parse_and_validate};

const WAIT: Duration = Duration::from_secs(10);
/// For what the timewait scan finds: it runs once a second, less often on a host with many
/// sockets (its interval grows with its cost, up to 30 s).
const SCAN_WAIT: Duration = Duration::from_secs(45);

fn setsockopt(fd: i32, level: i32, name: i32, value: &[i32]) {
    // SAFETY: a valid socket and a value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            std::mem::size_of_val(value) as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
}

/// SO_LINGER with a zero timeout: close() resets the connection.
fn linger_zero(stream: &TcpStream) {
    setsockopt(
        stream.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &[1, 0],
    );
}

/// A connect from a socket with the given options set first, bound to `local` when given.
fn connect_with(
    to: SocketAddr,
    local: Option<SocketAddr>,
    opts: &[(i32, i32, i32)],
) -> std::io::Result<TcpStream> {
    // SAFETY: a new socket, owned by the stream made from it.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is ours.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    for &(level, name, value) in opts {
        setsockopt(fd, level, name, &[value]);
    }
    let sockaddr = |addr: SocketAddr| {
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    };
    let len = size_of::<libc::sockaddr_in>() as u32;
    if let Some(local) = local {
        let addr = sockaddr(local);
        // SAFETY: a valid sockaddr_in of `len` bytes.
        let rc = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let addr = sockaddr(to);
    // SAFETY: as above.
    let rc = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// The JSON lines so far.
fn json(tracer: &Tracer) -> Vec<Value> {
    parse_and_validate(&tracer.lines_so_far())
}

/// The line ending the connection from local port `sport` (the socket whose local port it is).
fn close_of(lines: &[Value], sport: u16, dport: u16) -> Option<Value> {
    lines
        .iter()
        .find(|l| l["newstate"] == "CLOSE" && l["sport"] == sport && l["dport"] == dport)
        .cloned()
}

fn wait_close(tracer: &Tracer, sport: u16, dport: u16) -> Value {
    tracer.wait_for(WAIT, &format!("the CLOSE of {sport} -> {dport}"), |lines| {
        close_of(&parse_and_validate(lines), sport, dport).is_some()
    });
    close_of(&json(tracer), sport, dport).expect("the CLOSE line")
}

/// A socket bound to a port of 127.0.0.1 (chosen by the kernel), not listening: the port is
/// the test's until it is dropped, and a connect to it is refused.
fn reserve_port() -> (std::os::fd::OwnedFd, u16) {
    // SAFETY: a new socket, owned by the descriptor made from it.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(fd)
    };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut len = size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: a valid sockaddr_in of `len` bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let mut bound = addr;
    // SAFETY: as above, written by the kernel.
    let rc = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut bound).cast(), &mut len) };
    assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
    (fd, u16::from_be(bound.sin_port))
}

fn port(stream: &TcpStream) -> u16 {
    stream.local_addr().unwrap().port()
}

#[test]
fn each_reason_is_provoked_for_real_and_failures_keeps_the_failed_ones() {
    let netns = Netns::new(41);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lport = listener.local_addr().unwrap().port();
    // Bound and never listening, to the end: a connect to the first is refused, and no two
    // ports of the test (a client's included) are ever the same number.
    let reserved = [reserve_port(), reserve_port(), reserve_port()];
    let [closed_port, drop_port, reject_port] = reserved.each_ref().map(|r| r.1);
    let ports = format!("{lport},{closed_port},{drop_port},{reject_port}");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let all = Tracer::start(&[
        "--mode",
        "btf",
        "--format",
        "json",
        "--port",
        &ports,
        "--metrics-addr",
        &metrics_addr,
    ]);
    let failures = Tracer::start(&[
        "--mode",
        "btf",
        "--format",
        "json",
        "--failures",
        "--port",
        &ports,
    ]);

    // fin: a transfer of a known size each way, the client closing first.
    let mut client = TcpStream::connect(("127.0.0.1", lport)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(&[7; 3000]).unwrap();
    let mut got = vec![0; 3000];
    server.read_exact(&mut got).unwrap();
    server.write_all(&[9; 1234]).unwrap();
    let mut got = vec![0; 1234];
    client.read_exact(&mut got).unwrap();
    let (fin_client, fin_server) = (port(&client), lport);
    drop(client);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    drop(server);
    let fin = wait_close(&all, fin_server, fin_client);
    assert_eq!(fin["oldstate"], "LAST_ACK");
    assert_eq!(fin["reason"], "fin", "{fin}");
    assert_eq!(
        (fin["bytes_sent"].as_u64(), fin["bytes_received"].as_u64()),
        (Some(1234), Some(3000)),
        "{fin}"
    );
    let srtt = fin["srtt_us"].as_u64().unwrap();
    assert!(srtt > 0 && srtt < 1_000_000, "{fin}");
    assert!(fin["lifetime_ns"].as_u64().unwrap() > 0, "{fin}");

    // refused: nothing listens.
    let err = TcpStream::connect(("127.0.0.1", closed_port)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let refused = {
        all.wait_for(WAIT, "the refused connect", |lines| {
            parse_and_validate(lines)
                .iter()
                .any(|l| l["dport"] == closed_port && l["newstate"] == "CLOSE")
        });
        json(&all)
            .into_iter()
            .find(|l| l["dport"] == closed_port && l["newstate"] == "CLOSE")
            .unwrap()
    };
    assert_eq!(
        (&refused["oldstate"], &refused["reason"], &refused["error"]),
        (
            &"SYN_SENT".into(),
            &"refused".into(),
            &"ECONNREFUSED".into()
        ),
        "{refused}"
    );

    // reset_sent by SO_LINGER 0 (the kernel's reason TCP_STATE), reset_received by its peer.
    let client = TcpStream::connect(("127.0.0.1", lport)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let linger_port = port(&client);
    linger_zero(&client);
    drop(client);
    let sent = wait_close(&all, linger_port, lport);
    assert_eq!(
        (&sent["oldstate"], &sent["reason"], &sent["rst_reason"]),
        (
            &"ESTABLISHED".into(),
            &"reset_sent".into(),
            &"TCP_STATE".into()
        ),
        "{sent}"
    );
    let _ = server.read(&mut [0; 16]);
    drop(server);
    let received = wait_close(&all, lport, linger_port);
    assert_eq!(
        (&received["reason"], &received["error"]),
        (&"reset_received".into(), &"ECONNRESET".into()),
        "{received}"
    );

    // reset_sent by a close with unread data (TCP_ABORT_ON_CLOSE).
    let mut client = TcpStream::connect(("127.0.0.1", lport)).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.write_all(b"never read").unwrap();
    let unread_port = port(&client);
    thread::sleep(Duration::from_millis(100));
    drop(server);
    let unread = wait_close(&all, lport, unread_port);
    assert_eq!(
        (&unread["reason"], &unread["rst_reason"]),
        (&"reset_sent".into(), &"TCP_ABORT_ON_CLOSE".into()),
        "{unread}"
    );
    assert_eq!(unread["bytes_received"], 10, "{unread}");
    drop(client);
    let unread_peer = wait_close(&all, unread_port, lport);
    assert_eq!(unread_peer["reason"], "reset_received", "{unread_peer}");

    // timeout: the namespace drops the SYNs; one retry (TCP_SYNCNT) fails in about 3 s.
    netns.iptables(&[
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &drop_port.to_string(),
        "-j",
        "DROP",
    ]);
    // unreachable: the namespace answers with ICMP host unreachable.
    netns.iptables(&[
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &reject_port.to_string(),
        "-j",
        "REJECT",
        "--reject-with",
        "icmp-host-unreachable",
    ]);
    let ns_ip: std::net::Ipv4Addr = netns.ns_ip.parse().unwrap();
    let err = connect_with(
        SocketAddr::from((ns_ip, drop_port)),
        None,
        &[(libc::IPPROTO_TCP, libc::TCP_SYNCNT, 1)],
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT));
    let err = connect_with(SocketAddr::from((ns_ip, reject_port)), None, &[]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH));
    all.wait_for(WAIT, "the timeout and the unreachable host", |lines| {
        let lines = parse_and_validate(lines);
        [drop_port, reject_port].iter().all(|&p| {
            lines
                .iter()
                .any(|l| l["dport"] == p && l["newstate"] == "CLOSE")
        })
    });
    let lines = json(&all);
    let end_at = |p: u16| {
        lines
            .iter()
            .find(|l| {
                l["daddr"] == netns.ns_ip.as_str() && l["dport"] == p && l["newstate"] == "CLOSE"
            })
            .unwrap()
            .clone()
    };
    let timeout = end_at(drop_port);
    assert_eq!(
        (&timeout["reason"], &timeout["error"]),
        (&"timeout".into(), &"ETIMEDOUT".into()),
        "{timeout}"
    );
    assert!(timeout["retransmits"].as_u64().unwrap() >= 1, "{timeout}");
    let unreachable = end_at(reject_port);
    assert_eq!(
        (&unreachable["reason"], &unreachable["error"]),
        (&"unreachable".into(), &"EHOSTUNREACH".into()),
        "{unreachable}"
    );

    // Every line of a connection carries one cookie; connections differ.
    let cookies = |sport: u16, dport: u16| -> Vec<u64> {
        lines
            .iter()
            .filter(|l| l["sport"] == sport && l["dport"] == dport)
            // An accepted socket's first line carries none (see the README).
            .filter(|l| l["oldstate"] != "LISTEN")
            .map(|l| l["cookie"].as_u64().expect("a cookie"))
            .collect()
    };
    let server_side = cookies(lport, fin_client);
    assert!(
        server_side.len() >= 4 && server_side.iter().all(|&c| c == server_side[0]),
        "{server_side:?}"
    );
    assert_ne!(server_side[0], cookies(fin_client, lport)[0]);

    // The metric counts each connection's end by its reason.
    let metrics = support::prometheus::http_get(metrics_port, "/metrics").expect("metrics");
    let closed = |reason: &str| {
        let series = format!("tcptrace_connections_closed_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |n| n.parse::<u64>().expect("a count"))
    };
    for (reason, count) in [
        ("fin", 1),
        ("refused", 1),
        ("reset_sent", 2),
        ("reset_received", 2),
        ("timeout", 1),
        ("unreachable", 1),
    ] {
        assert_eq!(closed(reason), count, "{reason}: {metrics}");
    }

    // --failures: exactly the connections that did not end with a FIN, nothing else.
    let failed = {
        thread::sleep(Duration::from_millis(300));
        json(&failures)
    };
    let mut got: Vec<(u64, u64, String)> = failed
        .iter()
        .map(|l| {
            assert_eq!(l["newstate"], "CLOSE", "{l}");
            (
                l["sport"].as_u64().unwrap(),
                l["dport"].as_u64().unwrap(),
                l["reason"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(s, d, _)| *s != 0 || *d != 0)
        .collect();
    got.sort();
    let mut want: Vec<(u64, u64, String)> = [
        &refused,
        &sent,
        &received,
        &unread,
        &unread_peer,
        &timeout,
        &unreachable,
    ]
    .iter()
    .map(|l| {
        (
            l["sport"].as_u64().unwrap(),
            l["dport"].as_u64().unwrap(),
            l["reason"].as_str().unwrap().to_owned(),
        )
    })
    .collect();
    want.sort();
    assert_eq!(got, want);
    drop(all.stop());
    drop(failures.stop());
}

/// `ss`'s state for the connection from `local` to `remote` ("TIME-WAIT", "FIN-WAIT-2", or empty).
fn ss_state(local: u16, remote: u16) -> String {
    let out = Command::new("ss")
        .args([
            "-tanH",
            &format!("( sport = :{local} and dport = :{remote} )"),
        ])
        .output()
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// A listener on loopback and a BTF-mode tracer of its port, writing JSON.
fn traced_listener() -> (TcpListener, u16, Tracer) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lport = listener.local_addr().unwrap().port();
    let tracer = Tracer::start(&[
        "--mode",
        "btf",
        "--format",
        "json",
        "--port",
        &lport.to_string(),
    ]);
    (listener, lport, tracer)
}

/// Waits for a line of the socket from `sport` to `dport` that `wanted` accepts.
fn wait_line(
    tracer: &Tracer,
    timeout: Duration,
    what: &str,
    (sport, dport): (u16, u16),
    wanted: impl Fn(&Value) -> bool,
) {
    tracer.wait_for(timeout, what, |lines| {
        parse_and_validate(lines)
            .iter()
            .any(|l| l["sport"] == sport && l["dport"] == dport && wanted(l))
    });
}

fn lines_of(tracer: &Tracer, sport: u16, dport: u16) -> Vec<Value> {
    json(tracer)
        .into_iter()
        .filter(|l| l["sport"] == sport && l["dport"] == dport)
        .collect()
}

#[test]
fn time_wait_is_shown_as_ss_shows_it_and_ends_with_its_socket() {
    let (listener, lport, tracer) = traced_listener();

    // The server closes first; the peer closes a second later.
    let client = TcpStream::connect(("127.0.0.1", lport)).unwrap();
    let (server, _) = listener.accept().unwrap();
    let cport = port(&client);
    let closed = Instant::now();
    drop(server);
    wait_line(
        &tracer,
        WAIT,
        "FIN_WAIT1 -> FIN_WAIT2",
        (lport, cport),
        |l| l["newstate"] == "FIN_WAIT2",
    );
    assert_eq!(ss_state(lport, cport), "FIN-WAIT-2");
    thread::sleep(Duration::from_secs(1).saturating_sub(closed.elapsed()));
    // No CLOSE at the hand-over.
    assert!(
        lines_of(&tracer, lport, cport)
            .iter()
            .all(|l| l["newstate"] != "CLOSE"),
        "{:?}",
        lines_of(&tracer, lport, cport)
    );
    drop(client);
    wait_line(
        &tracer,
        SCAN_WAIT,
        "FIN_WAIT2 -> TIME_WAIT",
        (lport, cport),
        |l| l["newstate"] == "TIME_WAIT",
    );
    assert_eq!(ss_state(lport, cport), "TIME-WAIT");
    let lines = lines_of(&tracer, lport, cport);
    let tw = lines.iter().find(|l| l["newstate"] == "TIME_WAIT").unwrap();
    assert_eq!(tw["oldstate"], "FIN_WAIT2");
    // About a second in FIN_WAIT2 (the peer's FIN came a second after close).
    let in_fin_wait2 = tw["duration_ns"].as_u64().unwrap();
    assert!((700_000_000..2_000_000_000).contains(&in_fin_wait2), "{tw}");
    assert_eq!(tw["pid"], std::process::id());

    // An early end: the client's port connects again. The server's timewait socket takes the new
    // SYN (its sequence is newer) and is gone: TIME_WAIT -> CLOSE, reason fin, same cookie.
    thread::sleep(Duration::from_millis(1100));
    let again = connect_with(
        SocketAddr::from(([127, 0, 0, 1], lport)),
        Some(SocketAddr::from(([127, 0, 0, 1], cport))),
        &[(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)],
    )
    .expect("reconnect from the same port");
    let (reaccepted, _) = listener.accept().unwrap();
    wait_line(
        &tracer,
        SCAN_WAIT,
        "TIME_WAIT -> CLOSE",
        (lport, cport),
        |l| l["oldstate"] == "TIME_WAIT",
    );
    let lines = lines_of(&tracer, lport, cport);
    let end = lines.iter().find(|l| l["oldstate"] == "TIME_WAIT").unwrap();
    assert_eq!(
        (&end["newstate"], &end["reason"]),
        (&"CLOSE".into(), &"fin".into()),
        "{end}"
    );
    assert_eq!(end["cookie"], tw["cookie"]);
    // From the accepted socket's second line on (its first is written while the kernel clones
    // it from the listener, and carries no cookie).
    let first = lines.iter().find(|l| l["cookie"] == tw["cookie"]).unwrap();
    assert_eq!(first["oldstate"], "SYN_RECV", "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["oldstate"] == "LISTEN" && l.get("cookie").is_none())
    );
    // Ended early: well before the kernel's 60 s, within a scan interval of the new SYN.
    let in_time_wait = end["duration_ns"].as_u64().unwrap();
    assert!(in_time_wait < 35_000_000_000, "{end}");
    drop((again, reaccepted));
    drop(tracer.stop());
}

#[test]
fn a_peer_that_never_closes_ends_in_fin_wait2_after_the_fin_timeout() {
    let (listener, lport, tracer) = traced_listener();
    let client = TcpStream::connect(("127.0.0.1", lport)).unwrap();
    let (server, _) = listener.accept().unwrap();
    let cport = port(&client);
    // A FIN timeout of 2 s for this socket (TCP_LINGER2), then the server closes first.
    setsockopt(
        server.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_LINGER2,
        &[2],
    );
    drop(server);
    wait_line(
        &tracer,
        SCAN_WAIT,
        "FIN_WAIT2 -> CLOSE",
        (lport, cport),
        |l| l["newstate"] == "CLOSE",
    );
    let lines = lines_of(&tracer, lport, cport);
    let end = lines.iter().find(|l| l["newstate"] == "CLOSE").unwrap();
    assert_eq!(
        (&end["oldstate"], &end["reason"]),
        (&"FIN_WAIT2".into(), &"timeout".into()),
        "{lines:?}"
    );
    // The FIN timeout of 2 s, seen within a scan interval.
    let in_fin_wait2 = end["duration_ns"].as_u64().unwrap();
    assert!(
        (1_500_000_000..35_000_000_000).contains(&in_fin_wait2),
        "{end}"
    );
    assert!(
        lines.iter().all(|l| l["newstate"] != "TIME_WAIT"),
        "{lines:?}"
    );
    drop(client);
    drop(tracer.stop());
}

#[test]
fn the_connections_view_has_one_line_per_connection_and_cannot_be_mixed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lport = listener.local_addr().unwrap().port();
    // The client closes first: followed through TIME_WAIT (the default), its line would come when
    // its timewait socket is gone, 60 s on; handed over, it comes at once.
    let tracer = Tracer::start(&[
        "--mode",
        "btf",
        "-4",
        "--events",
        "connections",
        "--no-time-wait",
        "--port",
        &lport.to_string(),
    ]);
    let mut client = TcpStream::connect(("127.0.0.1", lport)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(&[1; 777]).unwrap();
    let mut got = vec![0; 777];
    server.read_exact(&mut got).unwrap();
    let cport = port(&client);
    drop(client);
    server.read_to_end(&mut Vec::new()).unwrap();
    drop(server);
    tracer.wait_for(WAIT, "two connection lines", |lines| lines.len() >= 3);
    let output = tracer.stop();
    let header = &output.lines[0];
    assert!(
        header.contains("TX_BYTES") && header.ends_with("REASON"),
        "{header}"
    );
    let rows: Vec<Vec<&str>> = output.lines[1..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Each side once: the client sent 777 bytes, the server received them; both ended with FIN.
    assert_eq!(rows.len(), 2, "{:#?}", output.lines);
    for row in &rows {
        assert_eq!(row[0], std::process::id().to_string(), "{row:?}");
    }
    let client_row = rows
        .iter()
        .find(|r| r[3] == cport.to_string())
        .expect("the client's line");
    assert_eq!(
        (client_row[6], client_row[7], client_row[9]),
        ("777", "0", "fin"),
        "{client_row:?}"
    );
    let server_row = rows
        .iter()
        .find(|r| r[3] == lport.to_string())
        .expect("the server's line");
    assert_eq!(
        (server_row[6], server_row[7], server_row[9]),
        ("0", "777", "fin"),
        "{server_row:?}"
    );

    let mixed = Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(["--events", "connections,states"])
        .output()
        .unwrap();
    assert_eq!(mixed.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&mixed.stderr);
    assert!(
        stderr.contains("--events connections cannot be combined"),
        "{stderr}"
    );
}

#[test]
fn data_the_peer_never_acknowledges_times_out_after_tcp_retries2() {
    let netns = Netns::new(43);
    // Two retries of unacknowledged data, for sockets of the namespace only.
    support::sh(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_retries2=2",
        ],
    );
    let listener = TcpListener::bind((netns.host_ip.as_str(), 0)).unwrap();
    let lport = listener.local_addr().unwrap().port();
    let tracer = Tracer::start(&[
        "--mode",
        "btf",
        "--format",
        "json",
        "--port",
        &lport.to_string(),
    ]);
    let mut client = support::Endpoint::client_in(&netns.name, "tt-end-r2");
    client.step(&format!("connect {}:{lport}", netns.host_ip));
    let (server, _) = listener.accept().unwrap();
    // Nothing the server sends reaches the client: its data is never acknowledged.
    netns.iptables(&[
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--sport",
        &lport.to_string(),
        "-j",
        "DROP",
    ]);
    client.step("write");
    tracer.wait_for(Duration::from_secs(30), "the client's CLOSE", |lines| {
        parse_and_validate(lines)
            .iter()
            .any(|l| l["dport"] == lport && l["newstate"] == "CLOSE" && l["pid"] == client.pid())
    });
    let lines = json(&tracer);
    let end = lines
        .iter()
        .find(|l| l["dport"] == lport && l["newstate"] == "CLOSE" && l["pid"] == client.pid())
        .unwrap();
    assert_eq!(
        (&end["oldstate"], &end["reason"], &end["error"]),
        (
            &"ESTABLISHED".into(),
            &"timeout".into(),
            &"ETIMEDOUT".into()
        ),
        "{end}"
    );
    assert!(end["retransmits"].as_u64().unwrap() >= 2, "{end}");
    assert_eq!(end["bytes_sent"], 0, "{end}");
    drop(server);
    client.exit();
    drop(tracer.stop());
}

#[test]
fn time_wait_ends_when_its_60_seconds_run_out() {
    let (listener, lport, tracer) = traced_listener();
    let client = TcpStream::connect(("127.0.0.1", lport)).unwrap();
    let (server, _) = listener.accept().unwrap();
    let cport = port(&client);
    drop(server);
    let mut rest = Vec::new();
    (&client).read_to_end(&mut rest).unwrap();
    drop(client);
    wait_line(
        &tracer,
        SCAN_WAIT,
        "FIN_WAIT2 -> TIME_WAIT",
        (lport, cport),
        |l| l["newstate"] == "TIME_WAIT",
    );
    assert_eq!(ss_state(lport, cport), "TIME-WAIT");
    // The kernel's 60 s, then its timer's slack and a scan interval.
    wait_line(
        &tracer,
        Duration::from_secs(120),
        "TIME_WAIT -> CLOSE",
        (lport, cport),
        |l| l["oldstate"] == "TIME_WAIT",
    );
    assert_eq!(ss_state(lport, cport), "");
    let lines = lines_of(&tracer, lport, cport);
    let end = lines.iter().find(|l| l["oldstate"] == "TIME_WAIT").unwrap();
    assert_eq!(
        (&end["newstate"], &end["reason"]),
        (&"CLOSE".into(), &"fin".into()),
        "{end}"
    );
    let in_time_wait = end["duration_ns"].as_u64().unwrap();
    assert!(
        (60_000_000_000..95_000_000_000).contains(&in_time_wait),
        "{end}"
    );
    drop(tracer.stop());
}

/// getsockopt(SOL_SOCKET, SO_ERROR): the pending error, the soft one when there is no other
/// (taking it: the kernel clears what it returns).
fn so_error(stream: &TcpStream) -> i32 {
    let mut value = 0i32;
    let mut len = size_of::<i32>() as u32;
    // SAFETY: a valid socket, and a value of the size given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_ERROR: {}", std::io::Error::last_os_error());
    value
}

/// The socket's TCP state (`tcpi_state`, the first byte of `struct tcp_info`).
fn tcp_state(stream: &TcpStream) -> u8 {
    let mut info = [0u8; 256];
    let mut len = info.len() as u32;
    // SAFETY: a valid socket, and a buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info[0]
}

const TCP_SYN_SENT: u8 = 2;

/// Waits up to `timeout` for the socket to be writable or in error; whether it was.
fn poll_out(stream: &TcpStream, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as i32) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    n > 0
}

/// What happened to one connect whose first SYN the namespace rejected: its local port, and
/// whether the reject left the socket connecting (the ICMP error processed while connect() held
/// the socket, kept as a soft error), as the case under test needs.
struct Rejected {
    sport: u16,
    soft: bool,
}

/// A connect from inside `netns` to `port` on the host end, whose SYN the namespace's own output
/// rule rejects with ICMP host unreachable: the error reaches the socket while connect() holds
/// it. The application gives up as its own timeout would (`read_error`: after reading SO_ERROR,
/// which takes the soft error) and closes.
fn rejected_then_closed(netns: &Netns, port: u16, read_error: bool) -> Rejected {
    let to = SocketAddr::new(netns.host_ip.parse().unwrap(), port);
    in_netns(netns, || {
        let stream = connect_nonblocking(to, &[]);
        // The application's connect timeout (shorter than the SYN's first retransmit at 1 s).
        poll_out(&stream, Duration::from_millis(300));
        let soft = tcp_state(&stream) == TCP_SYN_SENT;
        if read_error {
            assert_eq!(so_error(&stream), libc::EHOSTUNREACH);
        }
        Rejected {
            sport: port_of(&stream),
            soft,
        }
    })
}

/// As [`rejected_then_closed`], but only the first SYN is rejected and its retry dropped, with one
/// retry (TCP_SYNCNT): the application reads SO_ERROR (the soft error, taken) and waits; the
/// kernel ends the connect when the retries run out, and the application is told ETIMEDOUT.
fn rejected_then_timed_out(netns: &Netns, port: u16) -> Rejected {
    let to = SocketAddr::new(netns.host_ip.parse().unwrap(), port);
    in_netns(netns, || {
        let stream = connect_nonblocking(to, &[(libc::IPPROTO_TCP, libc::TCP_SYNCNT, 1)]);
        thread::sleep(Duration::from_millis(100));
        let soft = tcp_state(&stream) == TCP_SYN_SENT;
        assert_eq!(so_error(&stream), libc::EHOSTUNREACH);
        if soft {
            // SYN at 0 s, its retry at 1 s, the end at 3 s. (poll() says POLLERR all along
            // here, so the application watches the state.)
            let deadline = Instant::now() + Duration::from_secs(10);
            while tcp_state(&stream) == TCP_SYN_SENT {
                assert!(Instant::now() < deadline, "the connect never ended");
                thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(so_error(&stream), libc::ETIMEDOUT);
        }
        Rejected {
            sport: port_of(&stream),
            soft,
        }
    })
}

fn port_of(stream: &TcpStream) -> u16 {
    // A connecting socket's local address (getsockname works before the handshake completes).
    stream.local_addr().expect("local address").port()
}

/// A non-blocking connect (EINPROGRESS) from a socket with `opts` set first.
fn connect_nonblocking(to: SocketAddr, opts: &[(i32, i32, i32)]) -> TcpStream {
    let SocketAddr::V4(v4) = to else {
        panic!("IPv4 only")
    };
    // SAFETY: a new socket, owned by the stream made from it.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    assert!(fd >= 0);
    // SAFETY: `fd` is ours.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    for &(level, name, value) in opts {
        setsockopt(fd, level, name, &[value]);
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of the size given.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    let err = std::io::Error::last_os_error();
    assert!(
        rc == 0 || err.raw_os_error() == Some(libc::EINPROGRESS),
        "connect {to}: {err}"
    );
    stream
}

/// One way a rejected connect ends, run against a port of its own.
type Case = fn(&Netns, u16) -> Rejected;

#[test]
fn an_icmp_error_a_connect_kept_as_soft_names_why_it_ended() {
    let netns = Netns::new(44);
    let netns_path = format!("/run/netns/{}", netns.name);
    let tracer = Tracer::start(&["--mode", "btf", "--format", "json", "--netns", &netns_path]);
    let reject = |port: u16, first_only: bool| {
        let port = port.to_string();
        let mut rule = vec!["-A", "OUTPUT", "-p", "tcp", "--dport", &port];
        if first_only {
            rule.extend(["-m", "limit", "--limit", "1/hour", "--limit-burst", "1"]);
        }
        rule.extend(["-j", "REJECT", "--reject-with", "icmp-host-unreachable"]);
        netns.iptables(&rule);
        if first_only {
            netns.iptables(&["-A", "OUTPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"]);
        }
    };
    // Each case until the reject was kept as a soft error (it is, unless the kernel deferred the
    // ICMP message to ksoftirqd: then it ended the connect at once, as the existing test of
    // `unreachable` has it); every attempt's CLOSE must say unreachable either way.
    let cases: [(&str, Case); 3] = [
        ("the application's timeout, SO_ERROR read", |netns, port| {
            rejected_then_closed(netns, port, true)
        }),
        (
            "the application's timeout, SO_ERROR unread",
            |netns, port| rejected_then_closed(netns, port, false),
        ),
        (
            "the kernel's SYN retries, SO_ERROR read",
            rejected_then_timed_out,
        ),
    ];
    for (i, (case, run)) in cases.iter().enumerate() {
        let mut soft_seen = false;
        for attempt in 0..3u16 {
            let port = 47_100 + 10 * i as u16 + attempt;
            reject(port, i == 2);
            let rejected = run(&netns, port);
            let close = wait_close(&tracer, rejected.sport, port);
            assert_eq!(
                (&close["oldstate"], &close["reason"], &close["error"]),
                (
                    &"SYN_SENT".into(),
                    &"unreachable".into(),
                    &"EHOSTUNREACH".into()
                ),
                "{case}: {close}"
            );
            if rejected.soft {
                soft_seen = true;
                break;
            }
        }
        assert!(
            soft_seen,
            "{case}: the reject never left the socket connecting"
        );
    }
    drop(tracer.stop());
}

/// The `tcptrace_state_repeats_total` sample, once it is above `above` (None: as soon as it
/// can be scraped).
fn state_repeats(metrics_port: u16, above: Option<u64>) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let sample = support::prometheus::http_get(metrics_port, "/metrics").and_then(|metrics| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("tcptrace_state_repeats_total "))
                .map(|n| n.parse::<u64>().expect("a count"))
        });
        match (sample, above) {
            (Some(n), None) => return n,
            (Some(n), Some(floor)) if n > floor => return n,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "tcptrace_state_repeats_total: {sample:?}, wanted above {above:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_state_set_again_is_folded_counted_and_its_time_runs_on() {
    // The peer never reads: the sender's data stays unsent, and so does its FIN.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    setsockopt(
        listener.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        &[4096],
    );
    let lport = listener.local_addr().unwrap().port();
    let metrics_port = free_port();
    let tracer = Tracer::start(&[
        "--mode",
        "btf",
        "--format",
        "json",
        "--port",
        &lport.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    let tracefs = Tracer::start(&[
        "--mode",
        "tracefs",
        "--format",
        "json",
        "--port",
        &lport.to_string(),
    ]);
    let mut client = TcpStream::connect(("127.0.0.1", lport)).unwrap();
    let (server, _) = listener.accept().unwrap();
    let cport = port(&client);
    client.set_nonblocking(true).unwrap();
    loop {
        match client.write(&[5; 65536]) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    let before = state_repeats(metrics_port, None);
    // shutdown() enters FIN_WAIT1 (the FIN queued behind the data); close() sets it again.
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let shut = Instant::now();
    thread::sleep(Duration::from_millis(300));
    drop(client);
    thread::sleep(Duration::from_millis(300));
    // The reader closes with data unread: its reset ends the sender.
    let reset = Instant::now();
    drop(server);
    for (mode, tracer) in [("btf", &tracer), ("tracefs", &tracefs)] {
        let close = wait_close(tracer, cport, lport);
        let ended = Instant::now();
        let lines = lines_of(tracer, cport, lport);
        let transitions: Vec<String> = lines
            .iter()
            .map(|l| {
                format!(
                    "{}->{}",
                    l["oldstate"].as_str().unwrap(),
                    l["newstate"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            transitions,
            [
                "SYN_SENT->ESTABLISHED",
                "ESTABLISHED->FIN_WAIT1",
                "FIN_WAIT1->CLOSE"
            ],
            "{mode}: {lines:#?}"
        );
        // FIN_WAIT1 from shutdown() to the reset, not from close().
        let duration = Duration::from_nanos(close["duration_ns"].as_u64().expect("a duration"));
        assert!(
            duration >= reset - shut && duration <= ended - shut + Duration::from_millis(1),
            "{mode}: FIN_WAIT1 lasted {duration:?}, from shutdown to reset {:?}: {close}",
            reset - shut
        );
        if mode == "btf" {
            assert_eq!(close["reason"], "reset_received", "{close}");
        }
    }
    // Counted (the kernel side counts every socket's, so at least this one).
    state_repeats(metrics_port, Some(before));
    drop(tracer.stop());
    drop(tracefs.stop());
}
