//! Why each segment went out again, the timeout in force and the attempt, for real: a server in a
//! network namespace of the test's own, this test's own client outside it, and iptables inside
//! the namespace dropping chosen segments. BTF mode gives every retransmit line `kind`, `rto_ms`,
//! `backoff` and `attempt` (and `srtt_us` once measured); tracefs mode has none of them, which its
//! pass of `cargo xtask test` checks on the same traffic. Root required.

mod support;

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use serde_json::Value;
use support::{
    Netns, Tracer, in_netns,
    lossy::{Blackhole, Server, WAIT, abort, client_retransmits, lose_one_segment},
    socket_addr, tracefs_mode,
};

/// The fields BTF mode adds to a retransmit line.
const DETAIL: [&str; 5] = ["kind", "rto_ms", "backoff", "attempt", "srtt_us"];

/// A tracer of retransmits to and from `port`.
fn tracer(port: u16) -> Tracer {
    Tracer::start(&[
        "--format",
        "json",
        "--events",
        "retransmits",
        "--port",
        &port.to_string(),
    ])
}

fn u64_of(line: &Value, key: &str) -> u64 {
    line[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key}: {line}"))
}

/// Whether `line` carries none of BTF mode's retransmit fields (tracefs mode).
fn has_no_detail(line: &Value) -> bool {
    DETAIL.iter().all(|key| line.get(key).is_none())
}

/// The `kind` of each line.
fn kinds(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["kind"].as_str().unwrap_or("-"))
        .collect()
}

/// A segment that is never acknowledged (everything to the server dropped): the timer fires
/// again and again, the timeout doubling each time. A tail loss probe may come first (the
/// probe timer and the RTO are close with one segment in flight).
#[test]
fn a_blackholed_segment_is_retransmitted_on_a_doubling_timeout() {
    let netns = Netns::new(61);
    let server = Server::start(&netns);
    let port = server.port;
    let tracer = tracer(port);
    let mut client = server.connect(&netns);
    let blackhole = Blackhole::start(&netns, port);
    client.write_all(&[b'x'; 100]).expect("write");
    // Four timeouts: 0.2 + 0.4 + 0.8 + 1.6 s.
    tracer.wait_for(WAIT, "five retransmits", |lines| {
        client_retransmits(lines, &netns, port).len() >= 5
    });
    drop(blackhole);
    abort(client);
    server.finish();
    let output = tracer.stop();
    let lines = client_retransmits(&output.lines, &netns, port);
    for line in &lines {
        assert_eq!(u64_of(line, "pid"), u64::from(std::process::id()), "{line}");
        assert_eq!(line["state"], "ESTABLISHED", "{line}");
    }
    if tracefs_mode() {
        assert!(lines.iter().all(has_no_detail), "{lines:?}");
        return;
    }
    let rtos: Vec<&Value> = lines.iter().skip_while(|l| l["kind"] == "tlp").collect();
    assert!(
        lines.len() - rtos.len() <= 1 && rtos.len() >= 4,
        "kinds {:?}",
        kinds(&lines)
    );
    for (n, line) in rtos.iter().take(4).enumerate() {
        assert_eq!(line["kind"], "rto", "{line}");
        assert_eq!(u64_of(line, "attempt"), n as u64 + 1, "{line}");
        assert_eq!(u64_of(line, "backoff"), n as u64, "{line}");
        assert!(u64_of(line, "srtt_us") > 0, "{line}");
    }
    let timeouts: Vec<u64> = rtos.iter().take(4).map(|l| u64_of(l, "rto_ms")).collect();
    // The kernel's minimum RTO is 200 ms; it doubles in jiffies, which a millisecond figure
    // may round by one.
    assert!(timeouts[0] >= 200, "{timeouts:?}");
    for pair in timeouts.windows(2) {
        assert!(pair[1].abs_diff(2 * pair[0]) <= 1, "{timeouts:?}");
    }
}

/// The last segment of a burst lost: the probe timer sends it again (a tail loss probe), it is
/// acknowledged, and no timeout follows.
#[test]
fn a_lost_tail_is_probed_and_no_timeout_follows() {
    let netns = Netns::new(62);
    let server = Server::start(&netns);
    let port = server.port;
    let tracer = tracer(port);
    lose_one_segment(&netns, server, &tracer, 4, 3, Duration::from_millis(5));
    let output = tracer.stop();
    let lines = client_retransmits(&output.lines, &netns, port);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let probe = &lines[0];
    if tracefs_mode() {
        assert!(has_no_detail(probe), "{probe}");
        return;
    }
    assert_eq!(probe["kind"], "tlp", "{probe}");
    assert_eq!(u64_of(probe, "attempt"), 0, "{probe}");
    assert_eq!(u64_of(probe, "backoff"), 0, "{probe}");
    assert!(u64_of(probe, "rto_ms") >= 200, "{probe}");
    assert!(u64_of(probe, "srtt_us") > 0, "{probe}");
}

/// One segment in the middle of a transfer lost: the ones after it are acknowledged selectively,
/// the sender enters recovery and sends the hole again at once (fast retransmit), no timer. The
/// metrics count it by its kind.
#[test]
fn a_lost_segment_mid_transfer_is_fast_retransmitted() {
    let netns = Netns::new(63);
    let server = Server::start(&netns);
    let port = server.port;
    let metrics_port = support::free_port();
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "--events",
        "retransmits",
        "--port",
        &port.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    lose_one_segment(&netns, server, &tracer, 12, 4, Duration::from_millis(3));
    let page = support::prometheus::http_get(metrics_port, "/metrics").expect("GET /metrics");
    let output = tracer.stop();
    let lines = client_retransmits(&output.lines, &netns, port);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let fast = &lines[0];
    let kinds: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("tcptrace_retransmit_kinds_total{"))
        .collect();
    if tracefs_mode() {
        assert!(kinds.is_empty(), "{page}");
    } else {
        assert_eq!(
            kinds,
            ["tcptrace_retransmit_kinds_total{kind=\"fast\"} 1"],
            "{page}"
        );
    }
    if tracefs_mode() {
        assert!(has_no_detail(fast), "{fast}");
        return;
    }
    assert_eq!(fast["kind"], "fast", "{fast}");
    assert_eq!(u64_of(fast, "attempt"), 0, "{fast}");
    assert_eq!(u64_of(fast, "backoff"), 0, "{fast}");
    assert!(u64_of(fast, "srtt_us") > 0, "{fast}");
}

/// `net.ipv4.tcp_syn_linear_timeouts` of the host's namespace: how many SYN timeouts keep the
/// initial timeout before the doubling starts (0 where the kernel has no such setting).
fn syn_linear_timeouts() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syn_linear_timeouts").map_or(0, |text| {
        text.trim().parse().expect("tcp_syn_linear_timeouts")
    })
}

/// How long the SYN test's connect waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(9);

/// SYNs dropped: each timeout sends the SYN again; the timeout stays at its initial second for
/// the kernel's linear timeouts, then doubles.
#[test]
fn dropped_syns_are_retransmitted_linearly_then_doubling() {
    let netns = Netns::new(64);
    let listener = in_netns(&netns, || {
        TcpListener::bind((netns.ns_ip.as_str(), 0)).expect("bind")
    });
    let port = listener.local_addr().expect("address").port();
    let tracer = tracer(port);
    netns.iptables(&[
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &port.to_string(),
        "--syn",
        "-j",
        "DROP",
    ]);
    let linear = syn_linear_timeouts();
    // With linear timeouts, up to the first doubled one (at 7 s with 4 linear); without, three
    // (1 + 2 + 4 s).
    let expected = if linear > 0 { (linear + 2).min(6) } else { 3 } as usize;
    let target = socket_addr(&netns.ns_ip, port);
    // Past the last SYN waited for, and short of the one after it (at 11 s, or at 15 s).
    let connect = thread::spawn(move || TcpStream::connect_timeout(&target, CONNECT_TIMEOUT));
    tracer.wait_for(WAIT, &format!("{expected} SYN retransmits"), |lines| {
        client_retransmits(lines, &netns, port).len() >= expected
    });
    let attempt = connect.join().expect("connect");
    assert!(
        attempt
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "{attempt:?}"
    );
    let output = tracer.stop();
    drop(listener);
    let lines = client_retransmits(&output.lines, &netns, port);
    assert!(lines.len() >= expected, "{lines:?}");
    for line in &lines {
        assert_eq!(line["state"], "SYN_SENT", "{line}");
        assert_eq!(u64_of(line, "pid"), u64::from(std::process::id()), "{line}");
    }
    if tracefs_mode() {
        assert!(lines.iter().all(has_no_detail), "{lines:?}");
        return;
    }
    for (n, line) in lines.iter().take(expected).enumerate() {
        let attempt = n as u64 + 1;
        let backoff = attempt.saturating_sub(1 + linear);
        assert_eq!(line["kind"], "syn", "{line}");
        assert_eq!(u64_of(line, "attempt"), attempt, "{line}");
        assert_eq!(u64_of(line, "backoff"), backoff, "{line}");
        // The initial timeout is a second (TCP_TIMEOUT_INIT).
        assert_eq!(u64_of(line, "rto_ms"), 1000 << backoff, "{line}");
        assert!(line.get("srtt_us").is_none(), "{line}");
    }
}

/// The handshake's last ACK dropped: the listener sends its SYN-ACK again, on a timeout that
/// starts at a second and doubles (the request socket's timer).
#[test]
fn a_server_whose_final_ack_is_lost_retransmits_its_synack_on_a_doubling_timeout() {
    let netns = Netns::new(65);
    // BTF mode names the owner of a listener that predates tracing, also one in a namespace no
    // process is in (only its name, /run/netns, keeps it): this one. tracefs mode cannot, so
    // there the listener comes after the tracer.
    let (server, tracer) = if tracefs_mode() {
        let port = support::free_port();
        let tracer = tracer(port);
        (Server::start_on(&netns, port), tracer)
    } else {
        let server = Server::start(&netns);
        let tracer = tracer(server.port);
        (server, tracer)
    };
    let port = server.port;
    let final_ack = [
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &port.to_string(),
        "--tcp-flags",
        "ALL",
        "ACK",
        "-j",
        "DROP",
    ];
    netns.iptables(&[&["-A"], &final_ack[..]].concat());
    // The client's side completes at once; the server's waits for the ACK (1 s, then 2 s).
    let mut client = TcpStream::connect(socket_addr(&netns.ns_ip, port)).expect("connect");
    let synacks = |lines: &[String]| -> Vec<Value> {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| {
                l["type"] == "retransmit"
                    && l["synack"] == true
                    && l["saddr"] == netns.ns_ip
                    && l["sport"] == port
            })
            .collect()
    };
    tracer.wait_for(WAIT, "two SYN-ACK retransmits", |lines| {
        synacks(lines).len() >= 2
    });
    netns.iptables(&[&["-D"], &final_ack[..]].concat());
    // Data carries the ACK the server waits for.
    client.write_all(b"hello").expect("write");
    server
        .accepted
        .recv_timeout(Duration::from_secs(5))
        .expect("the server accepted nothing");
    drop(client);
    assert_eq!(server.finish(), 5);
    let output = tracer.stop();
    let lines = synacks(&output.lines);
    for line in &lines {
        assert_eq!(line["state"], "SYN_RECV", "{line}");
        assert_eq!(u64_of(line, "pid"), u64::from(std::process::id()), "{line}");
    }
    if tracefs_mode() {
        assert!(lines.iter().all(has_no_detail), "{lines:?}");
        return;
    }
    for (n, line) in lines.iter().take(2).enumerate() {
        assert_eq!(line["kind"], "synack", "{line}");
        assert_eq!(u64_of(line, "attempt"), n as u64 + 1, "{line}");
        assert_eq!(u64_of(line, "backoff"), n as u64, "{line}");
        assert_eq!(u64_of(line, "rto_ms"), 1000 << n, "{line}");
    }
}
