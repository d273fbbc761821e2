//! The `/metrics` endpoint on a production host's port: idle or hostile clients cost a bounded
//! number of descriptors, and running out of descriptors does not make tcptrace spin. Root
//! required (tcptrace attaches its programs whatever it serves).

mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use support::Tracer;

/// The connection limit of `tcptrace::metrics`.
const MAX_CONNECTIONS: usize = 64;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

/// User plus system CPU seconds of `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A GET of /metrics; None when the connection is refused or closed without an answer.
fn scrape(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.starts_with("HTTP/1.1 200").then_some(answer)
}

fn scrape_within(port: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(answer) = scrape(port) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape succeeded within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn idle_clients_cost_a_bounded_number_of_descriptors() {
    let port = free_port();
    let tracer = Tracer::start(&[
        "--format",
        "none",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    scrape_within(port, Duration::from_secs(2));
    let before = open_descriptors(tracer.pid());
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    thread::sleep(Duration::from_millis(500));
    let during = open_descriptors(tracer.pid());
    assert!(
        during <= before + MAX_CONNECTIONS + 2,
        "{before} descriptors before 300 idle clients, {during} with them"
    );
    drop(idle);
    // Their handlers end when they see the clients gone; scrapes work again.
    assert!(scrape_within(port, Duration::from_secs(7)).contains("tcptrace_events_lost_total"));
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
}

#[test]
fn running_out_of_descriptors_does_not_spin() {
    let port = free_port();
    let tracer = Tracer::start(&[
        "--format",
        "none",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let pid = tracer.pid().to_string();
    scrape_within(port, Duration::from_secs(2));
    // Room for a few connections only: accept() then fails with EMFILE while clients wait.
    let limit = open_descriptors(tracer.pid()) + 4;
    let hard = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .expect("hard limit");
    support::sh(
        "prlimit",
        &["--pid", &pid, &format!("--nofile={limit}:{hard}")],
    );
    let waiting: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    thread::sleep(Duration::from_millis(300));
    let start = cpu_seconds(tracer.pid());
    thread::sleep(Duration::from_secs(2));
    let spent = cpu_seconds(tracer.pid()) - start;
    assert!(
        spent < 0.5,
        "tcptrace used {spent:.2} s of CPU in 2 s while out of descriptors"
    );
    drop(waiting);
    support::sh(
        "prlimit",
        &["--pid", &pid, &format!("--nofile={hard}:{hard}")],
    );
    assert!(scrape_within(port, Duration::from_secs(7)).contains("tcptrace_events_lost_total"));
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
}
