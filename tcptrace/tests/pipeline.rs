//! tcptrace in a log pipeline: file output and SIGHUP reopen, a reader going away, a full disk,
//! lost events under a stalled reader, and metrics scraped by a real Prometheus server. Root
//! required.

mod support;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{Endpoint, TCPTRACE, Tracer, parse_and_validate, require_root, sh, socket_addr};

/// A directory of the test's own, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("tcptrace-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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
    tracer.signal(libc::SIGSTOP);
    connections(&listener, 200);
    tracer.signal(libc::SIGCONT);
    // Tracing goes on normally afterwards.
    thread::sleep(Duration::from_millis(300));
    connections(&listener, 3);
    drop(listener);
    thread::sleep(Duration::from_millis(1200));
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
    // Every transition the workload caused: 10 per connection, and the listener's close (it
    // listened before tracing began).
    assert_eq!(
        written + lost,
        203 * 10 + 1,
        "written {written}, lost {lost}"
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
    let tail: Vec<&Value> = lines
        .iter()
        .rev()
        .filter(|l| l["type"] == "state")
        .take(31)
        .collect();
    assert_eq!(
        tail.iter().filter(|l| l["newstate"] == "CLOSE").count(),
        7,
        "{tail:#?}"
    );
}

/// A Prometheus server of the test's own, on loopback, killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tcptrace\n    static_configs:\n      - targets: ['{target}']\n"),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus; cargo xtask setup installs it)");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of an instant query with one result, if it has one yet.
    fn query(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'_' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let body = http_get(self.port, &format!("/api/v1/query?query={encoded}"))?;
        let value: Value = serde_json::from_str(&body).ok()?;
        value["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    listener().local_addr().unwrap().port()
}

/// A plain HTTP GET on loopback; the body, if the answer was 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

#[test]
fn metrics_scraped_by_a_real_prometheus_reflect_the_connections() {
    let listener = listener();
    let port = listener.local_addr().unwrap().port().to_string();
    let metrics_port = free_port();
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
