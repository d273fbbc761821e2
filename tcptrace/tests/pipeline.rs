//! tcptrace in a log pipeline: file output and SIGHUP reopen, a reader going away, a full disk,
//! lost events under a stalled reader, and metrics scraped by a real Prometheus server. Root
//! required.

mod support;

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    Endpoint, TCPTRACE, TempDir, Tracer, parse_and_validate,
    prometheus::{Prometheus, http_get},
    require_root, sh, socket_addr, status_field, tracefs_mode,
    unseen::Unseen,
};

/// `count` connections to a listener of this test on 127.0.0.1; returns its port.
fn connections(listener: &TcpListener, count: usize) {
    let addr = listener.local_addr().unwrap();
    for _ in 0..count {
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        drop(server);
    }
}

fn listener() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind")
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn output_file_is_reopened_on_sighup_without_losing_a_line() {
    let dir = TempDir::new("reopen");
    let path = dir.0.join("events.json");
    let rotated = dir.0.join("events.json.1");
    let mut server = Endpoint::server("127.0.0.1", "tt-rotate-srv");
    let port = server.port;
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--port",
        &port.to_string(),
        "--output",
        path.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );

    server.step("listen");
    let mut first = Endpoint::client("tt-rotate-1");
    server.send("accept");
    first.step(&format!("connect {}", socket_addr("127.0.0.1", port)));
    server.ack();
    first.step("close");
    server.step("wait-eof");
    server.step("close");
    // CLOSE -> LISTEN and the connection's ten transitions.
    wait_until(
        Duration::from_secs(5),
        "the first connection in the file",
        || read_lines(&path).len() == 11,
    );

    // logrotate: rename, then signal.
    std::fs::rename(&path, &rotated).unwrap();
    tracer.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(5), "the reopened file", || {
        path.exists()
    });

    let mut second = Endpoint::client("tt-rotate-2");
    server.send("accept");
    second.step(&format!("connect {}", socket_addr("127.0.0.1", port)));
    server.ack();
    second.step("close");
    server.step("wait-eof");
    server.step("close");
    server.step("close-listener");
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
    assert!(
        output.lines.is_empty(),
        "nothing goes to stdout with --output"
    );

    let old = parse_and_validate(&read_lines(&rotated));
    let new = parse_and_validate(&read_lines(&path));
    assert_eq!(old.len(), 11, "{old:#?}");
    assert!(
        old.iter().all(|l| l["comm"] != "tt-rotate-2"),
        "the old file got a line after the reopen"
    );
    // The second connection's ten transitions and the listener's close, all in the new file.
    assert_eq!(new.len(), 11, "{new:#?}");
    assert_eq!(new.iter().filter(|l| l["comm"] == "tt-rotate-2").count(), 5);
    assert!(new.iter().all(|l| l["comm"] != "tt-rotate-1"));
    first.exit();
    second.exit();
    server.exit();
}

#[test]
fn the_reader_going_away_ends_tcptrace_quietly() {
    require_root();
    let listener = listener();
    let port = listener.local_addr().unwrap().port().to_string();
    let mut child = Command::new(TCPTRACE)
        .args(["--format", "json", "-4", "--port", &port])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut ready = String::new();
    stderr.read_line(&mut ready).unwrap();
    assert!(
        ready.starts_with("tcptrace: tracing (")
            && ready.trim_end().ends_with(" mode); Ctrl-C to stop"),
        "{ready}"
    );
    // `| head -n 1`: read one line, then close the pipe.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    connections(&listener, 1);
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("{\"type\":\"state\""), "{first}");
    drop(stdout);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        connections(&listener, 5);
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tcptrace kept running with nobody reading"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "a closed pipe is not an error");
}

#[test]
fn a_full_disk_is_one_clear_error_and_exit_1() {
    let dir = TempDir::new("full");
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=16k",
            "tcptrace-test",
            dir.0.to_str().unwrap(),
        ],
    );
    let path = dir.0.join("events.json");
    let listener = listener();
    let port = listener.local_addr().unwrap().port().to_string();
    let mut tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--port",
        &port,
        "--output",
        path.to_str().unwrap(),
    ]);
    // About 2,800 bytes a connection: 16 KiB fills after a handful.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracer.is_running() {
        assert!(
            Instant::now() < deadline,
            "tcptrace kept running on a full disk"
        );
        connections(&listener, 10);
        thread::sleep(Duration::from_millis(20));
    }
    let output = tracer.finish(Duration::from_secs(1));
    assert_eq!(output.status.code(), Some(1), "{}", output.stderr);
    let last = output.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tcptrace: failed to write to ")
            && last.contains("No space left on device"),
        "{}",
        output.stderr
    );
}

#[test]
fn a_stalled_reader_loses_events_and_says_how_many() {
    let listener = listener();
    let port = listener.local_addr().unwrap().port().to_string();
    // 4 KiB holds a few dozen events.
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--port",
        &port,
        "--ring-buffer-size",
        "4K",
    ]);
    let unseen = Unseen::start(tracer.pid());
    tracer.signal(libc::SIGSTOP);
    connections(&listener, 200);
    tracer.signal(libc::SIGCONT);
    // Tracing goes on normally afterwards. One connection at a time: its ten records (1,760
    // bytes) fit the 4 KiB ring buffer, the three together would not.
    thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        connections(&listener, 1);
        thread::sleep(Duration::from_millis(150));
    }
    drop(listener);
    thread::sleep(Duration::from_millis(1200));
    let unseen = unseen.count();
    let output = tracer.stop();
    assert!(output.status.success());
    let lines = output.json();
    let lost: u64 = lines
        .iter()
        .filter(|l| l["type"] == "lost")
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    let written = lines.iter().filter(|l| l["type"] == "state").count() as u64;
    assert!(
        lost > 0,
        "nothing lost with a 4 KiB ring buffer and a stopped reader"
    );
    // Every transition the workload caused (10 per connection, and the listener's close: it
    // listened before tracing began) is written or counted lost; the lost count is the host's
    // (see a_small_buffer_loses_events_and_counts_every_one).
    let expected = 203 * 10 + 1 + time_wait_ends(&lines);
    assert_few_unseen(unseen, expected);
    assert!(
        written <= expected && written + lost + unseen >= expected,
        "written {written}, lost {lost}, expected {expected}, {unseen} unseen by the kernel"
    );
    assert!(
        output
            .stderr
            .lines()
            .last()
            .unwrap()
            .ends_with(&format!("{written} events written, {lost} events lost")),
        "{}",
        output.stderr
    );
    // The connections after the stall are complete.
    assert_tail_complete(&lines);
}

/// One connection to `listener` that the server closes first, so TIME_WAIT stays on the
/// listener's side and thousands of them do not use up the client's ephemeral ports. Ten
/// transitions: five on each side.
fn server_closes_first(listener: &TcpListener) {
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    drop(server);
    // The server's FIN: the client is in CLOSE_WAIT before it closes.
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("read to EOF");
    drop(client);
}

/// Connections at `per_second` (paced) until `duration` has passed, counted in `made`.
fn churn(listener: &TcpListener, per_second: u32, duration: Duration, made: &AtomicU64) {
    let start = Instant::now();
    while start.elapsed() < duration {
        let due = start + Duration::from_secs(made.load(Ordering::SeqCst)) / per_second;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        server_closes_first(listener);
        made.fetch_add(1, Ordering::SeqCst);
    }
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let hwm = status_field(pid, "VmHWM");
    let kib: u64 = hwm
        .strip_suffix(" kB")
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("VmHWM: {hwm}"));
    kib << 10
}

/// `cat` between tcptrace and the test: a reader of tcptrace's stdout that the test stops
/// (SIGSTOP) and resumes. Its output is collected line by line; it is killed when dropped.
struct Cat {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Cat {
    fn start() -> Self {
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cat");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The write end of cat's stdin, for tcptrace's stdout (the test keeps no copy of it).
    fn input(&mut self) -> Stdio {
        Stdio::from(self.child.stdin.take().expect("piped stdin"))
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits for cat to see the end of its input (tcptrace exited) and returns what it passed on.
    fn finish(mut self) -> Vec<String> {
        let status = self.child.wait().expect("wait for cat");
        assert!(status.success(), "cat: {status}");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("cat reader");
        }
        std::mem::take(&mut *self.lines.lock().unwrap())
    }
}

impl Drop for Cat {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SIGKILL ends a stopped process too.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a run with a reader stopped for three seconds produced.
struct Stall {
    /// Transitions the workload made: ten a connection, the listener's close, and the ends of
    /// TIME_WAIT that came early.
    expected: u64,
    /// Transitions on the host the kernel ran no state program for, over the run.
    unseen: u64,
    /// Connections made while the reader was stopped.
    during_stall: u64,
    lines: Vec<Value>,
    written: u64,
    lost: u64,
    peak_rss: u64,
}

/// About 50,000 events a second (5,000 connections) for five seconds through `cat`, which is
/// stopped for the middle three; then three more connections once the reader has caught up.
fn stalled_reader(extra_args: &[&str]) -> Stall {
    let listener = listener();
    let port = listener.local_addr().unwrap().port().to_string();
    let mut cat = Cat::start();
    let mut args = vec!["--format", "json", "-4", "--port", &port];
    args.extend_from_slice(extra_args);
    let tracer = Tracer::start_with_stdout(&args, cat.input());
    let unseen = Unseen::start(tracer.pid());
    let made = AtomicU64::new(0);
    let (lines_before_stall, during_stall) = thread::scope(|scope| {
        scope.spawn(|| churn(&listener, 5_000, Duration::from_secs(5), &made));
        thread::sleep(Duration::from_secs(1));
        let lines_before_stall = cat.line_count();
        cat.signal(libc::SIGSTOP);
        let before = made.load(Ordering::SeqCst);
        thread::sleep(Duration::from_secs(3));
        let during_stall = made.load(Ordering::SeqCst) - before;
        cat.signal(libc::SIGCONT);
        (lines_before_stall, during_stall)
    });
    // Three connections after the backlog is through: tracing goes on normally.
    thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        server_closes_first(&listener);
    }
    drop(listener);
    let connections = made.into_inner() + 3;
    let peak_rss = peak_rss(tracer.pid());
    // Let the backlog through cat before stopping.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = cat.line_count();
        if now == seen {
            break;
        }
        assert!(Instant::now() < deadline, "the backlog is still coming");
        seen = now;
    }
    let unseen = unseen.count();
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
    let &[written, lost] = summary_counts(&output.stderr).as_slice() else {
        panic!("{}", output.stderr);
    };
    let lines = parse_and_validate(&cat.finish());
    assert!(
        lines.len() > lines_before_stall,
        "nothing came through after the stall"
    );
    let expected = connections * 10 + 1 + time_wait_ends(&lines);
    assert_few_unseen(unseen, expected);
    Stall {
        expected,
        unseen,
        during_stall,
        lines,
        written,
        lost,
        peak_rss,
    }
}

/// The transitions the kernel ran no program for are few: beyond that, a count short by them
/// says nothing about tcptrace.
fn assert_few_unseen(unseen: u64, expected: u64) {
    assert!(
        unseen * 1000 <= expected,
        "the kernel ran the state program for all but {unseen} of {expected} transitions"
    );
}

/// The summary's counts, in order (`tcptrace: 12 events written, 0 events lost, ...`).
fn summary_counts(stderr: &str) -> Vec<u64> {
    let summary = stderr.lines().last().unwrap_or_default();
    summary
        .strip_prefix("tcptrace: ")
        .map(|s| {
            s.split(", ")
                .filter_map(|part| part.split(' ').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every line once (a line holds its event's time in nanoseconds and its socket).
fn assert_each_line_once(lines: &[Value]) {
    let distinct: HashSet<String> = lines.iter().map(Value::to_string).collect();
    assert_eq!(distinct.len(), lines.len(), "a line was written twice");
}

/// The three connections made after the stall are complete: their thirty transitions and the
/// listener's close are the last lines.
/// In BTF mode the lines that end the server sides (their moves to TIME_WAIT, the ends of it, and
/// a FIN_WAIT2 -> CLOSE where no timewait socket was found) are written by the timewait scan,
/// after later lines: they are left out here (callers count them).
fn assert_tail_complete(lines: &[Value]) {
    let (take, closes) = if tracefs_mode() { (31, 7) } else { (28, 4) };
    let tail: Vec<&Value> = lines
        .iter()
        .rev()
        .filter(|l| {
            l["type"] == "state"
                && (tracefs_mode()
                    || (l["newstate"] != "TIME_WAIT"
                        && l["oldstate"] != "TIME_WAIT"
                        && l["oldstate"] != "FIN_WAIT2"))
        })
        .take(take)
        .collect();
    assert_eq!(
        tail.iter().filter(|l| l["newstate"] == "CLOSE").count(),
        closes,
        "{tail:#?}"
    );
}

/// Lines beyond ten per connection: in BTF mode, the end of a server side's TIME_WAIT that a
/// client port used again ended early (the server's timewait socket takes the new SYN). Each
/// follows that connection's FIN_WAIT2 -> TIME_WAIT.
fn time_wait_ends(lines: &[Value]) -> u64 {
    let ends: Vec<&Value> = lines
        .iter()
        .filter(|l| l["oldstate"] == "TIME_WAIT")
        .collect();
    let entered: HashSet<u64> = lines
        .iter()
        .filter(|l| l["newstate"] == "TIME_WAIT")
        .filter_map(|l| l["cookie"].as_u64())
        .collect();
    for end in &ends {
        assert!(
            end["cookie"].as_u64().is_some_and(|c| entered.contains(&c)),
            "a TIME_WAIT end without its entry: {end}"
        );
    }
    ends.len() as u64
}

/// For a failure's message: the client ports whose lines (both sides', every connection that
/// used the port) do not come to nine a connection (ten but the client's `CLOSE -> SYN_SENT`,
/// which has no port yet; early TIME_WAIT ends aside), with their transitions.
fn unusual_connections(lines: &[Value]) -> Vec<(u64, Vec<String>)> {
    let server = lines
        .iter()
        .find(|l| l["oldstate"] == "LISTEN")
        .and_then(|l| l["sport"].as_u64());
    let mut by_port: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for line in lines
        .iter()
        .filter(|l| l["oldstate"] != "TIME_WAIT" && l["dport"] != 0 && l["sport"] != 0)
    {
        let (sport, dport) = (line["sport"].as_u64(), line["dport"].as_u64());
        let client = if sport == server { dport } else { sport };
        by_port
            .entry(client.unwrap_or(0))
            .or_default()
            .push(format!(
                "{}:{}->{}",
                line["sport"], line["oldstate"], line["newstate"]
            ));
    }
    by_port
        .into_iter()
        .filter(|(_, transitions)| transitions.len() % 9 != 0)
        .take(10)
        .collect()
}

/// A ring buffer record: the event and the ring buffer's 8-byte header.
const RECORD_BYTES: u64 = size_of::<tcptrace_common::Event>() as u64 + 8;
/// What the tracer took before the writer had a queue: the bench's peak RSS is about 22 MiB.
const FOOTPRINT: u64 = 32 << 20;

#[test]
fn a_reader_stopped_for_3_s_costs_no_event_with_the_default_buffer() {
    let stall = stalled_reader(&[]);
    // The stall caused more events than the kernel's 4 MiB ring buffer holds: draining went on
    // into the writer's queue.
    let ring_holds = (4 << 20) / RECORD_BYTES;
    assert!(
        stall.during_stall * 10 > 2 * ring_holds,
        "only {} connections during the stall",
        stall.during_stall
    );
    let expected = stall.expected;
    assert_eq!(
        stall.lost,
        0,
        "lost; connections whose lines are not ten each: {:?}",
        unusual_connections(&stall.lines)
    );
    // Every transition the kernel ran the program for is written.
    assert!(
        stall.written <= expected && stall.written + stall.unseen >= expected,
        "written {}, expected {expected}, {} unseen by the kernel; connections whose lines are \
         not ten each: {:?}",
        stall.written,
        stall.unseen,
        unusual_connections(&stall.lines)
    );
    assert!(stall.lines.iter().all(|l| l["type"] == "state"));
    assert_eq!(stall.lines.len() as u64, stall.written);
    assert_each_line_once(&stall.lines);
    assert_tail_complete(&stall.lines);
    assert!(
        stall.peak_rss < (64 << 20) + FOOTPRINT,
        "peak RSS {} MiB",
        stall.peak_rss >> 20
    );
}

#[test]
fn a_small_buffer_loses_events_and_counts_every_one() {
    let stall = stalled_reader(&["--buffer-size", "1M", "--ring-buffer-size", "64K"]);
    let expected = stall.expected;
    let lost: u64 = stall
        .lines
        .iter()
        .filter(|l| l["type"] == "lost")
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    let written = stall.lines.iter().filter(|l| l["type"] == "state").count() as u64;
    assert!(
        lost > 0,
        "nothing lost with a 1 MiB queue and a 64 KiB ring buffer"
    );
    assert_eq!(
        (written, lost),
        (stall.written, stall.lost),
        "lines against the summary"
    );
    // Every event is written or counted lost. The lost count is the kernel's for the whole host
    // (a program run it skipped may have been another socket's), so it may exceed what this
    // test's traffic lost. Transitions the kernel ran no program for are not events.
    assert!(
        written <= expected && written + lost + stall.unseen >= expected,
        "written {written}, lost {lost}, expected {expected}, {} unseen by the kernel",
        stall.unseen
    );
    assert_each_line_once(&stall.lines);
    assert_tail_complete(&stall.lines);
    assert!(
        stall.peak_rss < (1 << 20) + FOOTPRINT,
        "peak RSS {} MiB",
        stall.peak_rss >> 20
    );
}

/// tcptrace writing JSON lines into a pipe nobody reads, with metrics served: a thousand
/// connections (about 3 MB of lines, far more than a pipe holds) block its writer.
struct Blocked {
    tracer: Tracer,
    /// Transitions on the host the kernel ran no state program for, over the workload.
    unseen: u64,
    metrics_port: u16,
    _reader: std::io::PipeReader,
}

/// Events the blocked run's workload causes: a thousand connections and the listener's close.
const BLOCKED_EVENTS: u64 = 1000 * 10 + 1;

/// Every transition of the blocked run that the kernel ran the program for is written, lost or
/// said to be unwritten.
fn assert_every_blocked_event(accounted: u64, unseen: u64, stderr: &str) {
    assert!(
        accounted <= BLOCKED_EVENTS && accounted + unseen >= BLOCKED_EVENTS,
        "{accounted} of {BLOCKED_EVENTS} accounted for, {unseen} unseen by the kernel: {stderr}"
    );
}

fn blocked_output() -> Blocked {
    let (reader, writer) = std::io::pipe().expect("pipe");
    let listener = listener();
    let port = listener.local_addr().unwrap().port().to_string();
    let metrics_port = support::free_port();
    let tracer = Tracer::start_with_stdout(
        &[
            "--format",
            "json",
            "-4",
            "--port",
            &port,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
        ],
        Stdio::from(writer),
    );
    let unseen = Unseen::start(tracer.pid());
    for _ in 0..1000 {
        server_closes_first(&listener);
    }
    drop(listener);
    let unseen = unseen.count();
    assert_few_unseen(unseen, BLOCKED_EVENTS);
    Blocked {
        tracer,
        unseen,
        metrics_port,
        _reader: reader,
    }
}

#[test]
fn a_blocked_output_keeps_metrics_and_sigterm_answering() {
    let blocked = blocked_output();
    // /metrics answers at once, and counts every connection: draining went on.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let asked = Instant::now();
        let page = http_get(blocked.metrics_port, "/metrics")
            .expect("GET /metrics while the output is blocked");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "/metrics took {:?}",
            asked.elapsed()
        );
        if page
            .contains("tcptrace_state_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"} 1000")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{page}");
        thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM: tcptrace waits for the output at most 2 s, then exits saying what it could not
    // write.
    let sent = Instant::now();
    blocked.tracer.signal(libc::SIGTERM);
    let output = blocked.tracer.finish(Duration::from_secs(10));
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM took {took:?} to end it"
    );
    assert!(output.status.success(), "{}", output.stderr);
    assert!(
        output
            .stderr
            .ends_with(" events not written (the output was still blocked at exit)\n"),
        "{}",
        output.stderr
    );
    let &[written, lost, unwritten] = summary_counts(&output.stderr).as_slice() else {
        panic!("{}", output.stderr);
    };
    assert!(unwritten > 0);
    assert_every_blocked_event(written + lost + unwritten, blocked.unseen, &output.stderr);
}

#[test]
fn a_second_signal_ends_the_wait_for_a_blocked_output() {
    let mut blocked = blocked_output();
    thread::sleep(Duration::from_millis(300));
    blocked.tracer.signal(libc::SIGINT);
    thread::sleep(Duration::from_millis(300));
    assert!(
        blocked.tracer.is_running(),
        "tcptrace did not wait for its output"
    );
    let sent = Instant::now();
    blocked.tracer.signal(libc::SIGINT);
    let output = blocked.tracer.finish(Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "the second SIGINT took {:?}",
        sent.elapsed()
    );
    assert!(output.status.success(), "{}", output.stderr);
    let &[written, lost, unwritten] = summary_counts(&output.stderr).as_slice() else {
        panic!("{}", output.stderr);
    };
    assert_every_blocked_event(written + lost + unwritten, blocked.unseen, &output.stderr);
}

#[test]
fn metrics_scraped_by_a_real_prometheus_reflect_the_connections() {
    let listener = listener();
    let port = listener.local_addr().unwrap().port().to_string();
    let metrics_port = support::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let tracer = Tracer::start(&[
        "--format",
        "none",
        "-4",
        "--port",
        &port,
        "--metrics-addr",
        &metrics_addr,
    ]);
    let prometheus = Prometheus::start(&metrics_addr);
    connections(&listener, 7);

    // The page itself passes promtool and carries no address, port or pid.
    thread::sleep(Duration::from_millis(300));
    let page = http_get(metrics_port, "/metrics").expect("GET /metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    // promtool parses the page (exit 1 would be a parse error). Its linter (exit 3) knows only the
    // older text format, where a counter's HELP names the `_total` series; the page is
    // OpenMetrics, where HELP names the family. That finding, and no other, is allowed.
    let findings = String::from_utf8_lossy(&checked.stdout).into_owned()
        + &String::from_utf8_lossy(&checked.stderr);
    match checked.status.code() {
        Some(0) => {}
        Some(3) => {
            for finding in findings.lines().filter(|l| !l.trim().is_empty()) {
                let family = finding
                    .strip_suffix("_total no help text")
                    .unwrap_or_else(|| panic!("promtool: {finding}\n{page}"));
                assert!(
                    page.contains(&format!("# HELP {family} ")),
                    "promtool: {finding}\n{page}"
                );
            }
        }
        other => panic!("promtool check metrics exited {other:?}: {findings}\n{page}"),
    }
    assert!(
        page.contains("tcptrace_state_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"} 7"),
        "{page}"
    );
    assert!(
        !page.contains("127.0.0.1") && !page.contains(&format!("\"{port}\"")),
        "{page}"
    );
    assert!(http_get(metrics_port, "/nothing").is_none());

    let expect = |query: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = prometheus.query(query);
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus says {query} = {got:?}, expected {want}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    };
    expect(
        "tcptrace_state_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"}",
        7.0,
    );
    expect(
        "tcptrace_state_transitions_total{from=\"LISTEN\",to=\"SYN_RECV\"}",
        7.0,
    );
    expect(
        "tcptrace_state_duration_seconds_count{state=\"SYN_SENT\"}",
        7.0,
    );
    // Loopback connects take well under 10 ms.
    expect(
        "tcptrace_state_duration_seconds_bucket{state=\"SYN_SENT\",le=\"0.01024\"}",
        7.0,
    );
    expect("tcptrace_events_lost_total", 0.0);
    let output = tracer.stop();
    assert!(output.status.success());
    assert!(output.lines.is_empty(), "--format none prints no events");
}

#[test]
fn the_schema_refuses_what_the_format_forbids() {
    let good = r#"{"type":"state","time":"2026-11-25T00:11:08.462059522Z","pid":1,"comm":"x","family":"ipv4","saddr":"127.0.0.1","sport":1,"daddr":"127.0.0.1","dport":2,"oldstate":"SYN_SENT","newstate":"ESTABLISHED","duration_ns":5,"skaddr":"0xffff"}"#;
    assert_eq!(parse_and_validate(&[good.to_owned()]).len(), 1);
    for bad in [
        good.replace(r#","duration_ns":5"#, ""),
        good.replace("ESTABLISHED", "ESTABLISHD"),
        good.replace(r#""newstate":"ESTABLISHED""#, r#""newstate":"CLOSE""#),
        good.replace("ipv4", "inet"),
        good.replace("0xffff", "ffff"),
        good.replace(r#""pid":1"#, r#""pid":-1"#),
    ] {
        let result = std::panic::catch_unwind(|| parse_and_validate(std::slice::from_ref(&bad)));
        assert!(result.is_err(), "the schema accepted {bad}");
    }
}
