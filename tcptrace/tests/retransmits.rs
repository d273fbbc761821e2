//! Real retransmits: a server in a network namespace of the test's own, a client process outside,
//! and iptables inside the namespace dropping the flow's packets. Root required.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Endpoint, Netns, Tracer, socket_addr};

const WAIT: Duration = Duration::from_secs(8);

fn json(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Retransmits to or from `ip`:`port` (a server in the test's namespace: a port number alone
/// may also be a host client's).
fn retransmits_to(lines: &[String], ip: &str, port: u16) -> usize {
    json(lines)
        .iter()
        .filter(|l| {
            l["type"] == "retransmit"
                && ((l["daddr"] == ip && l["dport"] == port)
                    || (l["saddr"] == ip && l["sport"] == port))
        })
        .count()
}

/// Connects `client` to the listening `server` while the namespace drops SYNs to its port, until
/// `watcher` has printed a SYN retransmit; then lets the handshake through and waits for it.
fn connect_through_dropped_syns(
    netns: &Netns,
    server: &mut Endpoint,
    client: &mut Endpoint,
    watcher: &Tracer,
) {
    let port = server.port.to_string();
    let rule = [
        "INPUT", "-p", "tcp", "--dport", &port, "--syn", "-j", "DROP",
    ];
    netns.iptables(&[&["-A"], &rule[..]].concat());
    client.send(&format!(
        "connect {}",
        socket_addr(&netns.ns_ip, server.port)
    ));
    server.send("accept");
    watcher.wait_for(WAIT, "a SYN retransmit", |l| {
        retransmits_to(l, &netns.ns_ip, server.port) >= 1
    });
    netns.iptables(&[&["-D"], &rule[..]].concat());
    client.ack();
    server.ack();
}

/// The retransmit lines whose `side` ("sport" or "dport") is `ip`:`port`; at least one.
fn retransmit_lines<'a>(lines: &'a [Value], side: &str, ip: &str, port: u16) -> Vec<&'a Value> {
    let addr = if side == "sport" { "saddr" } else { "daddr" };
    let found: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "retransmit" && l[side] == port && l[addr] == ip)
        .collect();
    assert!(
        !found.is_empty(),
        "no retransmit with {side} {port}: {lines:?}"
    );
    found
}

/// The CLOSE line of the socket that retransmitted `first`: the next one with its address (an
/// address is reused once its socket is gone, so earlier lines may belong to another socket).
/// The tracers whose CLOSE lines are read run with `--no-time-wait`: a connection that closes
/// first would otherwise get its CLOSE when its TIME_WAIT ends, 60 s later.
fn close_after<'a>(lines: &'a [Value], first: &Value) -> &'a Value {
    let start = lines
        .iter()
        .position(|l| l == first)
        .expect("line in output");
    lines[start..]
        .iter()
        .find(|l| {
            l["type"] == "state" && l["skaddr"] == first["skaddr"] && l["newstate"] == "CLOSE"
        })
        .unwrap_or_else(|| panic!("no CLOSE line after {first}"))
}

/// Checks a retransmit line: owner, orientation, family, state.
fn check_line(
    line: &Value,
    owner: &Endpoint,
    state: &str,
    local: (&str, Option<u16>),
    remote: (&str, u16),
) {
    assert_eq!(line["type"], "retransmit", "{line}");
    assert_eq!(line["pid"], owner.pid(), "retransmit owner pid: {line}");
    assert_eq!(
        line["comm"],
        owner.comm.as_str(),
        "retransmit owner comm: {line}"
    );
    assert_eq!(line["state"], state, "{line}");
    assert_eq!(line["family"], "ipv4", "{line}");
    assert_eq!(line["saddr"], local.0, "{line}");
    if let Some(port) = local.1 {
        assert_eq!(line["sport"], port, "{line}");
    }
    assert_eq!(
        (line["daddr"].as_str(), line["dport"].as_u64()),
        (Some(remote.0), Some(remote.1.into())),
        "{line}"
    );
    assert!(
        line["skaddr"].as_str().is_some_and(|s| s.starts_with("0x")),
        "{line}"
    );
    // `err` where the kernel's tcp_retransmit_skb has it (2025 on); never on SYN-ACK lines, whose
    // tracepoint has none; absent, not guessed, elsewhere.
    let expected = line["synack"] == false && kernel_has_retransmit_err();
    assert_eq!(line.get("err").is_some(), expected, "{line}");
}

/// Whether the running kernel's `tcp_retransmit_skb` has an `err` field, from its tracefs format
/// (mounted here when nobody has: BTF mode does not need tracefs, so tcptrace may not have).
fn kernel_has_retransmit_err() -> bool {
    let read = || {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|tracefs| {
                std::fs::read_to_string(format!("{tracefs}/events/tcp/tcp_retransmit_skb/format"))
                    .ok()
            })
    };
    read()
        .or_else(|| {
            support::sh(
                "mount",
                &["-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
            );
            read()
        })
        .expect("tcp_retransmit_skb format")
        .contains(" err;")
}

#[test]
fn data_syn_and_synack_retransmits_with_their_owners_and_filters() {
    let _serial = support::serial();
    let netns = Netns::new(1);
    let mut data_server = Endpoint::server_in(&netns.name, &netns.ns_ip, "tt-rtx-dsrv");
    let mut data_client = Endpoint::client("tt-rtx-dcli");
    let mut syn_server = Endpoint::server_in(&netns.name, &netns.ns_ip, "tt-rtx-ssrv");
    let mut syn_client = Endpoint::client("tt-rtx-scli");
    let mut synack_server = Endpoint::server_in(&netns.name, &netns.ns_ip, "tt-rtx-asrv");
    let mut synack_client = Endpoint::client("tt-rtx-acli");
    let (dport, sport, aport) = (data_server.port, syn_server.port, synack_server.port);

    let all = Tracer::start(&["--format", "json", "--no-time-wait"]);
    let by_pid = Tracer::start(&[
        "--format",
        "json",
        "--events",
        "retransmits",
        "--pid",
        &data_client.pid().to_string(),
    ]);
    let by_port = Tracer::start(&[
        "--format",
        "json",
        "--events",
        "retransmits",
        "--port",
        &aport.to_string(),
    ]);

    // Data: drop what the client sends once the connection is up.
    data_server.step("listen");
    data_server.send("accept");
    data_client.step(&format!("connect {}", socket_addr(&netns.ns_ip, dport)));
    data_server.ack();
    netns.iptables(&[
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &dport.to_string(),
        "-j",
        "DROP",
    ]);
    data_server.send("echo");
    data_client.send("send");
    all.wait_for(WAIT, "data retransmits", |l| {
        retransmits_to(l, &netns.ns_ip, dport) >= 2
    });
    netns.iptables(&[
        "-D",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &dport.to_string(),
        "-j",
        "DROP",
    ]);
    data_client.ack();
    data_server.ack();
    data_client.step("close");
    data_server.step("wait-eof");
    data_server.step("close");

    // SYN: drop the client's SYNs until one retransmit was seen.
    syn_server.step("listen");
    connect_through_dropped_syns(&netns, &mut syn_server, &mut syn_client, &all);
    syn_client.step("close");
    syn_server.step("wait-eof");
    syn_server.step("close");

    // SYN-ACK: drop the client's pure ACKs, so the handshake's last ACK never arrives.
    synack_server.step("listen");
    let drop_ack = [
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &aport.to_string(),
        "--tcp-flags",
        "ALL",
        "ACK",
        "-j",
        "DROP",
    ];
    netns.iptables(&[&["-A"], &drop_ack[..]].concat());
    synack_server.send("accept");
    synack_client.step(&format!("connect {}", socket_addr(&netns.ns_ip, aport)));
    all.wait_for(WAIT, "a SYN-ACK retransmit", |l| {
        retransmits_to(l, &netns.ns_ip, aport) >= 1
    });
    netns.iptables(&[&["-D"], &drop_ack[..]].concat());
    // Data carries the ACK the server waits for.
    synack_client.send("send");
    synack_server.ack();
    synack_server.step("echo");
    synack_client.ack();
    synack_client.step("close");
    synack_server.step("wait-eof");
    synack_server.step("close");

    let everything = all.stop().json();
    let pid_lines = by_pid.stop().json();
    let port_lines = by_port.stop().json();

    // Data retransmits: the client owns them, state ESTABLISHED, and its CLOSE line counts them.
    let data = retransmit_lines(&everything, "dport", &netns.ns_ip, dport);
    assert!(data.len() >= 2, "{everything:?}");
    let client_port = data[0]["sport"].as_u64().unwrap() as u16;
    for line in &data {
        check_line(
            line,
            &data_client,
            "ESTABLISHED",
            (&netns.host_ip, Some(client_port)),
            (&netns.ns_ip, dport),
        );
    }
    let skaddr = &data[0]["skaddr"];
    let close = close_after(&everything, data[0]);
    let traced = data.iter().filter(|l| l["skaddr"] == *skaddr).count() as u64;
    let counted = close["retransmits"].as_u64().expect("retransmits");
    if btf_mode() {
        // The kernel's own count also holds retransmits the tracepoint does not show (tail loss
        // probes).
        assert!(counted >= traced, "{traced} traced: {close}");
    } else {
        assert_eq!(counted, traced, "{close}");
    }
    assert_eq!(close["pid"], data_client.pid());

    // SYN retransmits: state SYN_SENT, owner the process that called connect().
    let syn = retransmit_lines(&everything, "dport", &netns.ns_ip, sport);
    for line in &syn {
        check_line(
            line,
            &syn_client,
            "SYN_SENT",
            (&netns.host_ip, None),
            (&netns.ns_ip, sport),
        );
        assert_eq!(line["synack"], false);
    }
    let syn_close = close_after(&everything, syn[0]);
    assert_eq!(syn_close["pid"], syn_client.pid());
    let counted = syn_close["retransmits"].as_u64().expect("retransmits");
    if btf_mode() {
        assert!(
            counted >= syn.len() as u64,
            "{} traced: {syn_close}",
            syn.len()
        );
    } else {
        assert_eq!(counted, syn.len() as u64, "{syn_close}");
    }

    // SYN-ACK retransmits: attributed to the server that listens, local side the server's.
    let synack = retransmit_lines(&everything, "sport", &netns.ns_ip, aport);
    for line in &synack {
        check_line(
            line,
            &synack_server,
            "SYN_RECV",
            (&netns.ns_ip, Some(aport)),
            (&netns.host_ip, line["dport"].as_u64().unwrap() as u16),
        );
        assert_eq!(line["synack"], true);
    }
    // The accepted socket's CLOSE line counts its SYN-ACK retransmits in BTF mode (the kernel's
    // own count, copied from the request socket); tracefs mode cannot see them there. Neither
    // counts them on the listener.
    let accepted_close = everything
        .iter()
        .find(|l| {
            l["type"] == "state"
                && l["saddr"] == netns.ns_ip.as_str()
                && l["sport"] == aport
                && l["newstate"] == "CLOSE"
                && l["oldstate"] != "LISTEN"
        })
        .unwrap_or_else(|| panic!("no CLOSE line of the accepted socket: {everything:?}"));
    let counted = accepted_close["retransmits"].as_u64().expect("retransmits");
    if btf_mode() {
        assert!(
            counted >= synack.len() as u64,
            "{} traced: {accepted_close}",
            synack.len()
        );
    } else {
        assert_eq!(counted, 0, "{accepted_close}");
    }

    // --events retransmits --pid CLIENT: only that client's retransmits.
    assert!(!pid_lines.is_empty());
    for line in &pid_lines {
        assert_eq!(line["type"], "retransmit", "{line}");
        assert_eq!(line["pid"], data_client.pid(), "{line}");
    }
    assert_eq!(pid_lines.len(), data.len());

    // --events retransmits --port P: the SYN-ACK retransmits of P and nothing else.
    assert!(!port_lines.is_empty());
    for line in &port_lines {
        assert_eq!(
            (line["type"].as_str(), line["sport"].as_u64()),
            (Some("retransmit"), Some(aport.into())),
            "{line}"
        );
    }
    assert_eq!(port_lines.len(), synack.len());

    for endpoint in [
        data_server,
        data_client,
        syn_server,
        syn_client,
        synack_server,
        synack_client,
    ] {
        endpoint.exit();
    }
}

/// Whether the tracers of this run are in BTF mode (`cargo xtask test` runs these tests in both).
fn btf_mode() -> bool {
    std::env::var(support::TEST_MODE_VAR).as_deref() != Ok("tracefs")
}

#[test]
fn states_only_leaves_retransmits_out() {
    let _serial = support::serial();
    let netns = Netns::new(2);
    let mut server = Endpoint::server_in(&netns.name, &netns.ns_ip, "tt-rtx-only");
    let mut client = Endpoint::client("tt-rtx-onlyc");
    let port = server.port;
    let states = Tracer::start(&[
        "--format",
        "json",
        "--events",
        "states",
        "--port",
        &port.to_string(),
    ]);
    let both = Tracer::start(&[
        "--format",
        "json",
        "--no-time-wait",
        "--port",
        &port.to_string(),
    ]);
    server.step("listen");
    connect_through_dropped_syns(&netns, &mut server, &mut client, &both);
    let (states, both) = (states.stop(), both.stop());
    for output in [&states, &both] {
        assert!(
            output.status.success(),
            "{}: {}",
            output.status,
            output.stderr
        );
    }
    // What each said on stderr (its summary counts what it wrote and lost), for a failure.
    let stderr = format!("--events states: {}both: {}", states.stderr, both.stderr);
    let (states, both) = (states.json(), both.json());
    assert!(states.iter().all(|l| l["type"] == "state"), "{states:?}");
    // Both trace states: each has the client's connect, which runs in the client's own
    // connect(). Not its ESTABLISHED: that comes in the SYN retransmit timer's softirq, on top
    // of whatever task the CPU runs, and where the kernel runs no tracing program on top of a
    // task (a sandbox's agent), no tracer sees it, and none can count it.
    let connected = |l: &Value| l["newstate"] == "SYN_SENT" && l["dport"] == port;
    assert!(
        states.iter().any(connected),
        "--events states:\n{states:#?}\nboth:\n{both:#?}\n{stderr}"
    );
    assert!(both.iter().any(|l| l["type"] == "retransmit"));
    assert!(both.iter().any(connected), "{both:#?}");
    server.exit();
    client.exit();
}

/// The sum of a counter over all its label sets.
fn counter_total(page: &str, name: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .map(|l| {
            let value = l.rsplit(' ').next().expect("a value");
            value.parse::<u64>().unwrap_or_else(|e| panic!("{l}: {e}"))
        })
        .sum()
}

/// Retransmits that went out, then attempts that failed, traced in both modes at once: inside a
/// namespace of the test's own, the server's input is dropped (the client's retransmits leave,
/// and are lost), then also the client's output (netfilter refuses each attempt on its way out:
/// `err` -1, EPERM, on kernels whose tracepoint has `err`). Lines report the failures with their
/// `err`, `tcptrace_retransmit_failures_total` counts them, and neither the socket's CLOSE line
/// nor `tcptrace_retransmits_total` does: the kernel's own count (BTF mode's) includes them, since
/// the kernel counts an attempt before it sends it.
#[test]
fn failed_retransmit_attempts_are_reported_and_not_counted() {
    let _serial = support::serial();
    let netns = Netns::new(3);
    let mut server = Endpoint::server_in(&netns.name, &netns.ns_ip, "tt-rtf-srv");
    let mut client = Endpoint::client_in(&netns.name, "tt-rtf-cli");
    let port = server.port.to_string();
    let tracers: Vec<(&str, u16, Tracer)> = ["btf", "tracefs"]
        .into_iter()
        .map(|mode| {
            let metrics_port = support::free_port();
            let tracer = Tracer::start(&[
                "--format",
                "json",
                "--no-time-wait",
                "--mode",
                mode,
                "--port",
                &port,
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ]);
            (mode, metrics_port, tracer)
        })
        .collect();

    server.step("listen");
    server.send("accept");
    client.step(&format!(
        "connect {}",
        socket_addr(&netns.ns_ip, server.port)
    ));
    server.ack();
    let drop_input = ["INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"];
    let drop_output = ["OUTPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"];
    netns.iptables(&[&["-A"], &drop_input[..]].concat());
    server.send("echo");
    client.send("send");
    let client_retransmits = |lines: &[String], failed: bool| {
        json(lines)
            .iter()
            .filter(|l| l["type"] == "retransmit" && l["dport"] == server.port)
            .filter(|l| (l["err"].as_i64().unwrap_or(0) != 0) == failed)
            .count()
    };
    for (mode, _, tracer) in &tracers {
        tracer.wait_for(WAIT, &format!("{mode}: a retransmit that went out"), |l| {
            client_retransmits(l, false) >= 1
        });
    }
    netns.iptables(&[&["-A"], &drop_output[..]].concat());
    let has_err = kernel_has_retransmit_err();
    if has_err {
        for (mode, _, tracer) in &tracers {
            tracer.wait_for(WAIT, &format!("{mode}: a failed retransmit attempt"), |l| {
                client_retransmits(l, true) >= 1
            });
        }
    } else {
        // Without `err` the kernel does not report failed attempts: wait out two backoffs.
        std::thread::sleep(Duration::from_secs(2));
    }
    netns.iptables(&[&["-D"], &drop_output[..]].concat());
    netns.iptables(&[&["-D"], &drop_input[..]].concat());
    client.ack();
    server.ack();
    client.step("close");
    server.step("wait-eof");
    server.step("close");

    for (mode, metrics_port, tracer) in tracers {
        // Both ends' CLOSE lines: past them, nothing on this port retransmits, so the page
        // scraped now has counted every retransmit line the tracer writes.
        let closed = |lines: &[String]| {
            json(lines)
                .iter()
                .filter(|l| l["type"] == "state" && l["newstate"] == "CLOSE")
                .filter(|l| {
                    l["dport"] == server.port
                        || (l["sport"] == server.port && l["oldstate"] != "LISTEN")
                })
                .count()
                >= 2
        };
        tracer.wait_for(WAIT, &format!("{mode}: both CLOSE lines"), closed);
        let page = support::scrape_metrics(metrics_port);
        let lines = tracer.stop().json();

        let retransmits = retransmit_lines(&lines, "dport", &netns.ns_ip, server.port);
        let went_out = retransmits
            .iter()
            .filter(|l| l.get("err").is_none_or(|err| err == 0))
            .count() as u64;
        let refused: Vec<_> = retransmits
            .iter()
            .filter(|l| l.get("err").is_some_and(|err| err != 0))
            .collect();
        assert!(went_out >= 1, "{mode}: {lines:?}");
        if has_err {
            assert!(!refused.is_empty(), "{mode}: {lines:?}");
            for line in &refused {
                // EPERM: netfilter dropped it on the way out.
                assert_eq!(line["err"], -1, "{mode}: {line}");
                assert_eq!(line["pid"], client.pid(), "{mode}: {line}");
                assert_eq!(line["state"], "ESTABLISHED", "{mode}: {line}");
            }
        } else {
            assert!(refused.is_empty(), "{mode}: {lines:?}");
        }
        let close = close_after(&lines, retransmits[0]);
        let counted = close["retransmits"].as_u64().expect("retransmits");
        if mode == "tracefs" {
            // tracefs mode counts the lines that went out.
            assert_eq!(
                counted,
                went_out,
                "{mode}: {went_out} went out, {} refused: {close}",
                refused.len()
            );
        } else if has_err {
            // BTF mode gives the kernel's count less what it counted for the attempts seen
            // failing: for a socket opened under tracing, on a kernel whose tracepoint fires for
            // every attempt, what went out. Once in CI a refused attempt's share was not seen
            // (2 counted, 1 out, 1 refused): what is guaranteed is that the count lies between
            // what went out and what was attempted.
            assert!(
                counted >= went_out && counted <= went_out + refused.len() as u64,
                "{mode}: {went_out} went out, {} refused: {close}",
                refused.len()
            );
        } else {
            // Older kernels: the kernel's count includes failed attempts nobody reports.
            assert!(counted >= went_out, "{mode}: {went_out} went out: {close}");
        }
        // The metrics count every retransmit line of the run, by what became of it.
        let all: Vec<&Value> = lines.iter().filter(|l| l["type"] == "retransmit").collect();
        let failures = all
            .iter()
            .filter(|l| l.get("err").is_some_and(|err| err != 0))
            .count() as u64;
        assert_eq!(
            counter_total(&page, "tcptrace_retransmit_failures_total"),
            failures,
            "{mode}: {page}"
        );
        assert_eq!(
            counter_total(&page, "tcptrace_retransmits_total"),
            all.len() as u64 - failures,
            "{mode}: {page}"
        );
        assert!(failures >= refused.len() as u64);
    }
    server.exit();
    client.exit();
}
