//! Listen drops, for real: a server in a network namespace of the test's own listens with a
//! backlog of 1 and never accepts; clients in the namespace complete their handshake while an
//! iptables rule holds back everything but their SYN, two more connections fill the accept queue,
//! and then the held-back clients speak: the full queue drops each of them. The kernel's own
//! `ListenOverflows` counter in that namespace is the reference every line is checked against.
//! A kernel that does not report listen drops (before 6.15), and tracefs mode, refuse `--events
//! listen-drops` with one line. Root required.

mod support;

use std::{
    io::Write as _,
    net::{SocketAddrV4, TcpStream},
    os::fd::FromRawFd as _,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Endpoint, Netns, Tracer, assert_refused, free_port, in_netns, lossy::abort, parse_and_validate,
    sh, tracefs_mode,
};

/// The mark the held-back clients' packets carry (SO_MARK), for the iptables rule.
const HELD: u32 = 0x7d1;

/// Whether this kernel reports listen drops: its BTF names the reason (6.15+, whose `kfree_skb`
/// also names the receiving socket).
fn kernel_reports_listen_drops() -> bool {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("/sys/kernel/btf/vmlinux");
    let name = b"SKB_DROP_REASON_TCP_LISTEN_OVERFLOW\0";
    btf.windows(name.len()).any(|w| w == name)
}

/// Whether listen drop lines can be had here; otherwise checks that tcptrace refuses them with
/// one line, and says so.
fn listen_drops_refused_here() -> bool {
    if !tracefs_mode() && kernel_reports_listen_drops() {
        return false;
    }
    let mode = if tracefs_mode() { "tracefs" } else { "btf" };
    let expected = if tracefs_mode() {
        "--events listen-drops needs BTF mode"
    } else {
        "names neither the listener nor the listen overflow"
    };
    assert_refused(
        &[
            "--events",
            "listen-drops",
            "--format",
            "json",
            "--mode",
            mode,
        ],
        expected,
    );
    true
}

/// The namespace's `TcpExt: ListenOverflows`.
fn listen_overflows(netns: &Netns) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &netns.name, "cat", "/proc/net/netstat"])
        .output()
        .expect("read the namespace's netstat");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (
        tcp_ext.next().expect("names"),
        tcp_ext.next().expect("values"),
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .expect("ListenOverflows")
}

/// A connection to `to` whose packets carry `mark`; returns once the handshake completed on the
/// client's side.
fn marked_connect(to: SocketAddrV4, mark: u32) -> TcpStream {
    // SAFETY: plain socket calls on a descriptor this function owns until it hands it over.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            size_of::<u32>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_MARK: {}", std::io::Error::last_os_error());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    }
}

/// What a run of [`force_drops`] saw.
struct Forced {
    /// Drops the namespace's kernel counted (`ListenOverflows`).
    overflows: u64,
    /// The time from the first forced drop to the last.
    took: Duration,
}

/// Makes the full queue of `server` (backlog 1, in `netns`, never accepting) drop `clients`
/// connections, each at least once: their SYNs get in while the queue has room, their last ACK
/// is held back until two more connections filled it; then each writes a byte, which the full
/// queue drops, and resets its connection. With `tcp_abort_on_overflow` the server resets a
/// request socket that overflowed, so each client is dropped once.
fn force_drops(netns: &Netns, server: &Endpoint, clients: usize) -> Forced {
    let to = SocketAddrV4::new(netns.ns_ip.parse().expect("ip"), server.port);
    let before = listen_overflows(netns);
    let first = in_netns(netns, || TcpStream::connect(to).expect("connect"));
    let mark = format!("{HELD:#x}");
    let rule = [
        "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", &mark, "!", "--syn", "-j", "DROP",
    ];
    let mut add = vec!["-A"];
    add.extend_from_slice(&rule);
    netns.iptables(&add);
    let held: Vec<TcpStream> = in_netns(netns, || {
        (0..clients).map(|_| marked_connect(to, HELD)).collect()
    });
    let second = in_netns(netns, || TcpStream::connect(to).expect("connect"));
    let mut delete = vec!["-D"];
    delete.extend_from_slice(&rule);
    netns.iptables(&delete);
    let started = Instant::now();
    for mut stream in &held {
        stream.write_all(b"x").expect("write");
    }
    // Before any client retransmits (200 ms at the least).
    thread::sleep(Duration::from_millis(50));
    let took = started.elapsed();
    for stream in held {
        abort(stream);
    }
    thread::sleep(Duration::from_millis(300));
    drop((first, second));
    Forced {
        overflows: listen_overflows(netns) - before,
        took,
    }
}

/// A namespace with the SYN-cookie setting `syncookies` and `tcp_abort_on_overflow` on, and in
/// it a server that listens with a backlog of 1 and never accepts.
fn backlog_one_server(index: u8, syncookies: u8) -> (Netns, Endpoint) {
    let netns = Netns::new(index);
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "sysctl",
            "-qw",
            &format!("net.ipv4.tcp_syncookies={syncookies}"),
            "net.ipv4.tcp_abort_on_overflow=1",
        ],
    );
    let mut server = Endpoint::server_in(&netns.name, &netns.ns_ip, "tt-backlog1");
    server.step("listen 1");
    (netns, server)
}

/// Traces `netns` (with `extra` flags) while [`force_drops`] makes `server` drop `clients`.
fn traced_drops(
    netns: &Netns,
    server: &Endpoint,
    clients: usize,
    extra: &[&str],
) -> (Tracer, Forced) {
    let path = format!("/run/netns/{}", netns.name);
    let mut args = vec!["--format", "json", "--netns", &path];
    args.extend_from_slice(extra);
    let tracer = Tracer::start(&args);
    let forced = force_drops(netns, server, clients);
    assert!(
        forced.overflows >= clients as u64,
        "the kernel counted {} for {clients} clients",
        forced.overflows
    );
    (tracer, forced)
}

/// Stops the tracer: what it printed, and the checked lines of `server`'s listener.
fn stop(tracer: Tracer, netns: &Netns, server: &Endpoint) -> (support::Output, Vec<Value>) {
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let lines = drop_lines(&out.lines, server.port);
    check_lines(&lines, netns, server);
    (out, lines)
}

/// The listen drop lines of `port`; every line is checked against the schema.
fn drop_lines(lines: &[String], port: u16) -> Vec<Value> {
    parse_and_validate(lines)
        .into_iter()
        .filter(|l| l["type"] == "listen_drop" && l["sport"] == port)
        .collect()
}

fn sum(lines: &[Value], key: &str) -> u64 {
    lines.iter().map(|l| l[key].as_u64().expect(key)).sum()
}

/// Every line names the listener and its owner, and its counts add up.
fn check_lines(lines: &[Value], netns: &Netns, server: &Endpoint) {
    let inode = std::fs::metadata(format!("/run/netns/{}", netns.name))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("namespace inode");
    let mut total = 0;
    for line in lines {
        assert_eq!(line["pid"], server.pid(), "{line}");
        assert_eq!(line["comm"], "tt-backlog1", "{line}");
        assert_eq!(line["saddr"], netns.ns_ip, "{line}");
        assert_eq!(line["state"], "LISTEN", "{line}");
        assert_eq!(line["netns"], inode, "{line}");
        assert_eq!(line["max_ack_backlog"], 1, "{line}");
        // The two connections that filled it.
        assert_eq!(line["ack_backlog"], 2, "{line}");
        let drops = line["drops"].as_u64().expect("drops");
        assert!(drops > 0, "{line}");
        assert_eq!(
            drops,
            line["listen_overflow"].as_u64().unwrap() + line["no_socket"].as_u64().unwrap(),
            "{line}"
        );
        total += drops;
        assert_eq!(line["total"], total, "{line}");
    }
}

/// Twenty clients at a full queue, SYN cookies as Linux has them by default (sent once the
/// request queue is full): the first client's request socket overflows (`listen_overflow`), the
/// others' cookies do (`no_socket`). One line per second at most, naming the server, whose
/// listener predates tracing, with every drop the kernel counted.
#[test]
fn a_full_accept_queue_names_its_listener_and_counts_every_drop() {
    if listen_drops_refused_here() {
        return;
    }
    let (netns, server) = backlog_one_server(45, 1);
    let (tracer, forced) = traced_drops(&netns, &server, 20, &["--events", "listen-drops"]);
    let (out, lines) = stop(tracer, &netns, &server);
    assert_eq!(sum(&lines, "drops"), forced.overflows, "{lines:?}");
    assert!(sum(&lines, "listen_overflow") >= 1, "{lines:?}");
    assert!(sum(&lines, "no_socket") >= 1, "{lines:?}");
    // One line per listener per second, and one at exit.
    assert!(
        lines.len() as u64 <= forced.took.as_secs() + 2,
        "{} lines in {:?}",
        lines.len(),
        forced.took
    );
    assert!(
        out.stderr.contains(&format!(
            "{} connections dropped at traced listeners' full accept queues",
            forced.overflows
        )),
        "{}",
        out.stderr
    );
    server.exit();
}

/// `tcp_syncookies=2`: every SYN gets a cookie, so every drop is a cookie ACK's (`no_socket`),
/// and the metrics count them by reason.
#[test]
fn cookie_acks_at_a_full_queue_are_counted_by_reason() {
    if listen_drops_refused_here() {
        return;
    }
    let (netns, server) = backlog_one_server(46, 2);
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (tracer, forced) = traced_drops(&netns, &server, 20, &["--metrics-addr", &metrics_addr]);
    // The kernel side's counters are read once a second.
    thread::sleep(Duration::from_millis(1200));
    let metrics = support::scrape_metrics(metrics_port);
    let (_, lines) = stop(tracer, &netns, &server);
    assert_eq!(sum(&lines, "no_socket"), forced.overflows, "{lines:?}");
    assert_eq!(sum(&lines, "listen_overflow"), 0, "{lines:?}");
    let counted = format!(
        "tcptrace_listen_drops_total{{reason=\"no_socket\"}} {}",
        forced.overflows
    );
    assert!(
        metrics.lines().any(|l| l == counted),
        "{counted} in:\n{metrics}"
    );
    assert!(!metrics.contains("reason=\"listen_overflow\""), "{metrics}");
    server.exit();
}

/// A flood: 5,000 connections dropped within a second or two. A bounded number of lines (one
/// per second, and one at exit), every drop counted.
#[test]
fn a_flood_of_drops_writes_one_line_per_second_and_counts_every_drop() {
    if listen_drops_refused_here() {
        return;
    }
    raise_descriptor_limit(12_000);
    let (netns, server) = backlog_one_server(47, 2);
    let (tracer, forced) = traced_drops(&netns, &server, 5_000, &["--events", "listen-drops"]);
    let (_, lines) = stop(tracer, &netns, &server);
    assert_eq!(sum(&lines, "drops"), forced.overflows);
    assert!(
        lines.len() as u64 <= forced.took.as_secs() + 2,
        "{} lines for {} drops in {:?}",
        lines.len(),
        forced.overflows,
        forced.took
    );
    server.exit();
}

/// Room for `descriptors` open files in this process (root may raise its own limit).
fn raise_descriptor_limit(descriptors: u64) {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to rlimit structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut current);
        if current.rlim_cur < descriptors {
            let limit = libc::rlimit {
                rlim_cur: descriptors,
                rlim_max: current.rlim_max.max(descriptors),
            };
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
                0,
                "setrlimit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
