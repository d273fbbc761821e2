//! Congestion state changes, for real: a server in a network namespace of the test's own, this
//! test's own client outside it, and iptables inside the namespace dropping chosen segments.
//! A timeout moves the client's socket from open to loss, a segment lost mid-transfer through
//! disorder and recovery; the lines name the client. A kernel without `tcp_cong_state_set`
//! (before 6.3), and tracefs mode, refuse `--events congestion` with one line. Root required.

mod support;

use std::{io::Write as _, process::Command, thread, time::Duration};

use serde_json::Value;
use support::{
    Netns, TCPTRACE, Tracer, assert_refused,
    lossy::{Blackhole, Server, WAIT, abort, client_retransmits, lose_one_segment},
    tracefs_mode,
};

/// Whether this kernel has the tracepoint: its BTF names the tracepoint's type.
fn kernel_has_tracepoint() -> bool {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("/sys/kernel/btf/vmlinux");
    let name = b"btf_trace_tcp_cong_state_set\0";
    btf.windows(name.len()).any(|w| w == name)
}

/// Whether lines can be had here; otherwise checks that tcptrace refuses them, and says so.
fn congestion_lines_refused_here() -> bool {
    if !tracefs_mode() && kernel_has_tracepoint() {
        return false;
    }
    let mode = if tracefs_mode() { "tracefs" } else { "btf" };
    let expected = if tracefs_mode() {
        "--events congestion needs BTF mode"
    } else {
        "this kernel has no tracepoint tcp_cong_state_set"
    };
    assert_refused(
        &["--events", "congestion", "--format", "json", "--mode", mode],
        expected,
    );
    true
}

/// The congestion lines of the host's connection to `netns`'s `port`, in order.
fn client_changes(lines: &[String], netns: &Netns, port: u16) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            l["type"] == "congestion"
                && l["saddr"] == netns.host_ip
                && l["daddr"] == netns.ns_ip
                && l["dport"] == port
        })
        .collect()
}

/// `from -> to` of each line.
fn changes(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            format!(
                "{}->{}",
                l["from"].as_str().unwrap(),
                l["to"].as_str().unwrap()
            )
        })
        .collect()
}

fn tracer(port: u16, extra: &[&str]) -> Tracer {
    let port = port.to_string();
    let mut args = vec!["--format", "json", "--port", &port];
    args.extend_from_slice(extra);
    Tracer::start(&args)
}

/// Everything to the server dropped until two timeouts went by, then let through: the client's
/// socket goes from open to loss at the first timeout (not again at the second: no change), and
/// back to open once its data is acknowledged.
#[test]
fn a_timeout_takes_the_socket_from_open_to_loss_and_back() {
    if congestion_lines_refused_here() {
        return;
    }
    let netns = Netns::new(66);
    let server = Server::start(&netns);
    let port = server.port;
    let tracer = tracer(port, &["--events", "retransmits,congestion"]);
    let mut client = server.connect(&netns);
    let blackhole = Blackhole::start(&netns, port);
    client.write_all(&[b'x'; 100]).expect("write");
    tracer.wait_for(WAIT, "two timeouts", |lines| {
        client_retransmits(lines, &netns, port)
            .iter()
            .filter(|l| l["kind"] == "rto")
            .count()
            >= 2
    });
    drop(blackhole);
    tracer.wait_for(WAIT, "the way back to open", |lines| {
        client_changes(lines, &netns, port)
            .iter()
            .any(|l| l["to"] == "open")
    });
    abort(client);
    assert_eq!(server.finish(), 100, "what the server read");
    let output = tracer.stop();
    support::parse_and_validate(&output.lines);
    let lines = client_changes(&output.lines, &netns, port);
    assert_eq!(changes(&lines), ["open->loss", "loss->open"], "{lines:?}");
    let into_loss = &lines[0];
    assert_eq!(
        into_loss["pid"].as_u64(),
        Some(u64::from(std::process::id())),
        "{into_loss}"
    );
    assert_eq!(into_loss["state"], "ESTABLISHED", "{into_loss}");
    assert_eq!(into_loss["attempt"], 0, "{into_loss}");
    assert!(into_loss["cwnd"].as_u64().unwrap() > 0, "{into_loss}");
    assert!(into_loss["rto_ms"].as_u64().unwrap() >= 200, "{into_loss}");
    assert!(into_loss["srtt_us"].as_u64().unwrap() > 0, "{into_loss}");
    // Back to open once the ACKs advance: the kernel has reset the timeouts' count by then, and
    // the window is the one segment a timeout leaves.
    assert_eq!(lines[1]["attempt"], 0, "{}", lines[1]);
    assert_eq!(lines[1]["cwnd"], 1, "{}", lines[1]);
}

/// One segment in the middle of a transfer lost: the selective ACKs after it put the sender in
/// recovery (perhaps through disorder), which ends when the hole is acknowledged.
#[test]
fn a_segment_lost_mid_transfer_takes_the_socket_into_recovery_and_back() {
    if congestion_lines_refused_here() {
        return;
    }
    let netns = Netns::new(67);
    let server = Server::start(&netns);
    let port = server.port;
    let tracer = tracer(port, &["--events", "retransmits,congestion"]);
    lose_one_segment(&netns, server, &tracer, 12, 4, Duration::from_millis(3));
    let output = tracer.stop();
    let lines = client_changes(&output.lines, &netns, port);
    // Straight into recovery when the first selective ACK already shows the segment lost
    // (RACK), through disorder when it takes more: both seen here.
    let seen = changes(&lines);
    assert!(
        seen == ["open->recovery", "recovery->open"]
            || seen == ["open->disorder", "disorder->recovery", "recovery->open"],
        "{lines:?}"
    );
    for line in &lines {
        assert_eq!(
            line["pid"].as_u64(),
            Some(u64::from(std::process::id())),
            "{line}"
        );
        assert_eq!(line["attempt"], 0, "{line}");
    }
}

/// Without `--events congestion` the metrics count the changes, and no line is written.
#[test]
fn the_metrics_count_changes_without_lines() {
    if tracefs_mode() || !kernel_has_tracepoint() {
        // No program for them: the metric stays absent, and tracing works.
        let metrics_port = support::free_port();
        let tracer = tracer(
            support::free_port(),
            &["--metrics-addr", &format!("127.0.0.1:{metrics_port}")],
        );
        let page = support::prometheus::http_get(metrics_port, "/metrics").expect("GET /metrics");
        assert!(
            !page.contains("tcptrace_congestion_changes_total"),
            "{page}"
        );
        drop(tracer.stop());
        return;
    }
    let netns = Netns::new(68);
    let server = Server::start(&netns);
    let port = server.port;
    let metrics_port = support::free_port();
    let tracer = tracer(
        port,
        &["--metrics-addr", &format!("127.0.0.1:{metrics_port}")],
    );
    let mut client = server.connect(&netns);
    let blackhole = Blackhole::start(&netns, port);
    client.write_all(&[b'x'; 100]).expect("write");
    tracer.wait_for(WAIT, "a timeout", |lines| {
        client_retransmits(lines, &netns, port)
            .iter()
            .any(|l| l["kind"] == "rto")
    });
    drop(blackhole);
    thread::sleep(Duration::from_secs(2));
    let page = support::prometheus::http_get(metrics_port, "/metrics").expect("GET /metrics");
    abort(client);
    server.finish();
    let output = tracer.stop();
    let counted: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("tcptrace_congestion_changes_total{"))
        .collect();
    assert!(
        counted.contains(&"tcptrace_congestion_changes_total{from=\"open\",to=\"loss\"} 1"),
        "{page}"
    );
    assert!(
        output.lines.iter().all(|l| !l.contains("\"congestion\"")),
        "{:?}",
        output.lines
    );
}

/// `--failures` keeps only the lines that end connections: `--events congestion` with it is
/// refused before the kernel is touched.
#[test]
fn congestion_lines_and_failures_do_not_mix() {
    let out = Command::new(TCPTRACE)
        .args(["--failures", "--events", "states,congestion"])
        .output()
        .expect("run tcptrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--events congestion"), "{stderr}");
}
