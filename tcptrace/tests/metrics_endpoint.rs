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

use support::{Tracer, prometheus::Prometheus};

/// The connection limit of `tcptrace::metrics_endpoint`.
const MAX_CONNECTIONS: usize = 64;

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
    let port = support::free_port();
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
    let port = support::free_port();
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

/// Lets this test process hold `n` more sockets: the soft descriptor limit up to the hard one.
fn allow_descriptors(n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and a valid pointer.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) },
        0
    );
    assert!(
        limit.rlim_max >= n + 256,
        "the hard RLIMIT_NOFILE ({}) is too low for {n} connections",
        limit.rlim_max
    );
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) },
        0
    );
}

/// Loopback connections to a listener of the test's own, one every 10 ms, until `stop` is set;
/// returns how many were made.
fn steady_connections(
    listener: std::net::TcpListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let addr = listener.local_addr().expect("listener address");
        let mut made = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let client = TcpStream::connect(addr).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            drop(client);
            drop(server);
            made += 1;
            thread::sleep(Duration::from_millis(10));
        }
        made
    })
}

/// Descriptors `pid` holds, at their fewest over a few looks (a scrape may be in flight).
fn settled_descriptors(pid: u32) -> usize {
    (0..5)
        .map(|_| {
            thread::sleep(Duration::from_millis(100));
            open_descriptors(pid)
        })
        .min()
        .unwrap_or(usize::MAX)
}

#[test]
fn two_thousand_idle_connections_neither_lock_out_scrapes_nor_slow_tracing() {
    const IDLE: usize = 2000;
    const HOLD: Duration = Duration::from_secs(6);
    allow_descriptors(IDLE as u64);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let workload_port = listener.local_addr().expect("address").port().to_string();
    let metrics_port = support::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let tracer = Tracer::start(&[
        "--format",
        "none",
        "--port",
        &workload_port,
        "--metrics-addr",
        &metrics_addr,
    ]);
    let prometheus = Prometheus::start(&metrics_addr);
    let wait_for = |query: &str, done: &dyn Fn(f64) -> bool| -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = prometheus.query(query);
            if let Some(value) = got.filter(|&v| done(v)) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: {query} = {got:?} after 30 s"
            );
            thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for("up{job=\"tcptrace\"}", &|up| up == 1.0);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = steady_connections(listener, std::sync::Arc::clone(&stop));
    let before = settled_descriptors(tracer.pid());
    let start = cpu_seconds(tracer.pid());
    thread::sleep(HOLD);
    let untroubled = cpu_seconds(tracer.pid()) - start;

    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(("127.0.0.1", metrics_port)).expect("connect"))
        .collect();
    let held_from = Instant::now();
    let start = cpu_seconds(tracer.pid());
    // A scrape while they are held is answered at once.
    let during = scrape(metrics_port).expect("a scrape with 2000 idle connections open");
    assert!(during.contains("tcptrace_events_lost_total"), "{during}");
    assert!(
        open_descriptors(tracer.pid()) <= before + MAX_CONNECTIONS + 2,
        "descriptors beyond the connection limit"
    );
    thread::sleep(HOLD.saturating_sub(held_from.elapsed()));
    let troubled = cpu_seconds(tracer.pid()) - start;
    // Every scrape Prometheus made while they were held succeeded.
    let window = format!("{}s", HOLD.as_secs());
    let scrapes = wait_for(
        &format!("count_over_time(up{{job=\"tcptrace\"}}[{window}])"),
        &|n| n >= 1.0,
    );
    assert!(
        scrapes >= (HOLD.as_secs() - 2) as f64,
        "only {scrapes} scrapes in {window}"
    );
    let worst = prometheus
        .query(&format!("min_over_time(up{{job=\"tcptrace\"}}[{window}])"))
        .expect("up over the window");
    assert_eq!(
        worst, 1.0,
        "a scrape failed while the idle connections were held"
    );
    drop(idle);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = workload.join().expect("workload thread") as f64;
    // Every connection of the workload is counted on both sides. The kernel guarantees no more
    // than that a program run it skips (a tracepoint hit while the program already runs on that
    // CPU) is counted: under other load on the host, an event may be missing, and then it is in
    // the lost count.
    let lost = wait_for("tcptrace_events_lost_total", &|_| true);
    for (from, to) in [("SYN_SENT", "ESTABLISHED"), ("LISTEN", "SYN_RECV")] {
        let query = format!("tcptrace_state_transitions_total{{from=\"{from}\",to=\"{to}\"}}");
        let counted = wait_for(&query, &|n| n >= made - lost);
        assert!(
            counted <= made && made - counted <= lost,
            "{query}: {counted} of {made} connections, {lost} events lost"
        );
    }
    // Holding them cost next to nothing: no spinning, no per-connection work while they idle.
    assert!(
        troubled < untroubled + 0.3,
        "tcptrace used {troubled:.2} s of CPU in {HOLD:?} with {IDLE} idle connections, \
         {untroubled:.2} s without"
    );
    // Once they are gone, so are their descriptors.
    let deadline = Instant::now() + Duration::from_secs(10);
    while settled_descriptors(tracer.pid()) > before {
        assert!(
            Instant::now() < deadline,
            "{} descriptors 10 s after the idle clients left, {before} before",
            open_descriptors(tracer.pid())
        );
    }
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
}
