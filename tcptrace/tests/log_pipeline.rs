//! A real log pipeline end to end: tcptrace writing JSON lines to a file under real TCP traffic,
//! Debian's logrotate rotating it several times with the packaged rule
//! (packaging/tcptrace.logrotate, only its paths changed), and Debian's syslog-ng following the
//! file across the rotations, parsing each line as JSON and writing what it collected. Every line
//! tcptrace wrote must arrive exactly once, its fields parsed. Root required.

mod support;

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{TempDir, Tracer, parse_and_validate, require_root};

/// Rotations under load; the packaged rule keeps 7 files, so none is deleted.
const ROTATIONS: usize = 5;
/// Lines in the live file before each rotation.
const LINES_PER_FILE: usize = 200;
const PACKAGED_PATH: &str = "/var/log/tcptrace/events.json";
const PACKAGED_UNIT: &str = "tcptrace.service";

/// The collector, stopped (by its handle) when the test ends, also when it fails.
struct Collector {
    child: Child,
    log: PathBuf,
}

impl Collector {
    fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for syslog-ng");
        assert!(status.success(), "syslog-ng: {status}\n{}", self.said());
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connections to a listener of the test's own on 127.0.0.1 until told to stop (at most a
/// minute), a couple of milliseconds apart, but while paused.
struct Load {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Load {
    fn start(listener: TcpListener) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let pause = Arc::clone(&paused);
        let thread = thread::spawn(move || {
            let addr = listener.local_addr().expect("local addr");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                if pause.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let client = TcpStream::connect(addr).expect("connect");
                let (server, _) = listener.accept().expect("accept");
                drop(client);
                drop(server);
                thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            stop,
            paused,
            thread: Some(thread),
        }
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("load thread");
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A rotated file's lines, decompressing `.gz` ones with gzip.
fn rotated_lines(path: &Path) -> Vec<String> {
    if path.extension().is_some_and(|e| e == "gz") {
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(path)
            .output()
            .expect("gzip");
        assert!(out.status.success(), "gzip -dc {}", path.display());
        String::from_utf8(out.stdout)
            .expect("UTF-8")
            .lines()
            .map(str::to_owned)
            .collect()
    } else {
        lines(path)
    }
}

/// Lines in the live file and the `rotations` rotated ones so far.
fn written_so_far(dir: &Path, rotations: usize) -> usize {
    let mut files = vec![dir.join("events.json")];
    if rotations >= 1 {
        files.push(dir.join("events.json.1"));
    }
    files.extend((2..=rotations).map(|n| dir.join(format!("events.json.{n}.gz"))));
    files.iter().map(|f| rotated_lines(f).len()).sum()
}

fn wait_until(timeout: Duration, what: &str, said: impl Fn() -> String, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            said()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The packaged rule for `log` instead of /var/log/tcptrace/events.json, and with a unit name no
/// machine has, so its postrotate takes the branch for a tcptrace that systemd does not run:
/// pkill of the tcptrace writing `log`. Everything else stays as packaged.
fn rule_for(log: &Path) -> String {
    let packaged = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/tcptrace.logrotate"
    ))
    .expect("packaging/tcptrace.logrotate");
    // The rule itself, comments aside.
    let rule: String = packaged
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    // The rule's path, and pkill's pattern for the tcptrace writing it; systemctl's unit twice.
    assert_eq!(rule.matches(PACKAGED_PATH).count(), 2, "{rule}");
    assert_eq!(rule.matches(PACKAGED_UNIT).count(), 2, "{rule}");
    rule.replace(PACKAGED_PATH, log.to_str().expect("UTF-8 path"))
        .replace(PACKAGED_UNIT, "tcptrace-log-pipeline-test-absent.service")
}

/// The pattern the rule's postrotate gives pkill.
fn pkill_pattern(rule: &str) -> String {
    rule.split("pkill -HUP -f '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the rule signals with pkill -HUP -f '...'")
        .to_owned()
}

fn syslog_ng(dir: &Path, log: &Path, collected: &Path) -> Collector {
    let config = dir.join("syslog-ng.conf");
    std::fs::write(
        &config,
        format!(
            r#"@version: 3.38
options {{ stats-freq(0); mark-freq(0); }};
# Follow the file by name: at its end, switch to the file now at the path (a new inode).
source s_events {{ file("{log}" follow-freq(0.2) flags(no-parse)); }};
parser p_json {{ json-parser(prefix(".json.")); }};
destination d_collected {{
    file("{collected}" template("${{.json.time}}\t${{.json.skaddr}}\t${{MSG}}\n") flush-lines(1));
}};
log {{ source(s_events); parser(p_json); destination(d_collected); }};
"#,
            log = log.display(),
            collected = collected.display(),
        ),
    )
    .expect("write syslog-ng.conf");
    let said = dir.join("syslog-ng.out");
    let out = File::create(&said).expect("syslog-ng.out");
    let child = Command::new("syslog-ng")
        .arg("--foreground")
        .arg("--no-caps")
        .arg("--stderr")
        .arg(format!("--cfgfile={}", config.display()))
        .arg(format!(
            "--persist-file={}",
            dir.join("syslog-ng.persist").display()
        ))
        .arg(format!("--pidfile={}", dir.join("syslog-ng.pid").display()))
        .arg(format!("--control={}", dir.join("syslog-ng.ctl").display()))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("syslog-ng (cargo xtask setup installs syslog-ng-core)");
    Collector { child, log: said }
}

#[test]
fn logrotate_and_syslog_ng_collect_every_line_exactly_once_across_rotations() {
    require_root();
    let dir = TempDir::new("log-pipeline");
    let log = dir.0.join("events.json");
    let collected = dir.0.join("collected");
    let rule = rule_for(&log);
    let config = dir.0.join("logrotate.conf");
    std::fs::write(&config, &rule).expect("write logrotate.conf");
    let state = dir.0.join("logrotate.state");

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = listener
        .local_addr()
        .expect("local addr")
        .port()
        .to_string();
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--port",
        &port,
        "--output",
        log.to_str().expect("UTF-8 path"),
    ]);
    // The rule's pkill finds this tcptrace, and nothing else.
    let pgrep = Command::new("pgrep")
        .args(["-f", &pkill_pattern(&rule)])
        .output()
        .expect("pgrep (procps)");
    assert_eq!(
        String::from_utf8_lossy(&pgrep.stdout).trim(),
        tracer.pid().to_string(),
        "what the rule's pkill would signal"
    );

    let collector = syslog_ng(&dir.0, &log, &collected);
    let said = || format!("syslog-ng said:\n{}", collector.said());
    let load = Load::start(listener);

    for rotation in 1..=ROTATIONS {
        wait_until(
            Duration::from_secs(30),
            &format!("{LINES_PER_FILE} lines before rotation {rotation}"),
            said,
            || lines(&log).len() >= LINES_PER_FILE,
        );
        // syslog-ng's file source can miss the last lines written to a file in the instant it is
        // renamed: it may notice the new file at the path before it reads the old one to its
        // end (its follow poll; seen once in about ten runs). So the rotations happen at a quiet
        // moment, once the collector has every line so far; tcptrace's own side of a rotation
        // under load (rename, reopen, nothing lost or split) is tests/pipeline.rs's.
        load.pause(true);
        thread::sleep(Duration::from_millis(500));
        let so_far = written_so_far(&dir.0, rotation - 1);
        wait_until(
            Duration::from_secs(30),
            &format!("the collector to have the {so_far} lines before rotation {rotation}"),
            said,
            || lines(&collected).len() >= so_far,
        );
        let out = Command::new("logrotate")
            .arg("--force")
            .arg("--verbose")
            .arg(format!("--state={}", state.display()))
            .arg(&config)
            .output()
            .expect("logrotate (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "logrotate failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dir.0.join("events.json.1").exists(), "nothing rotated");
        load.pause(false);
        // tcptrace reopened (the rule's nocreate: it makes the new file itself) and writes there;
        // the collector switched to it once it was done with the old one. Rotations come a day
        // apart in production: here, no faster than the collector follows.
        wait_until(
            Duration::from_secs(30),
            &format!("lines in the new file after rotation {rotation}"),
            said,
            || !lines(&log).is_empty(),
        );
        let first = lines(&log).remove(0);
        wait_until(
            Duration::from_secs(30),
            &format!("the collector to follow rotation {rotation}"),
            said,
            || {
                lines(&collected)
                    .iter()
                    .any(|l| l.rsplit('\t').next() == Some(first.as_str()))
            },
        );
    }
    load.stop();
    let output = tracer.stop();
    assert!(output.status.success(), "tcptrace: {}", output.stderr);

    // What tcptrace wrote: the live file and every rotated one (the older ones compressed).
    let mut files = vec![log.clone(), dir.0.join("events.json.1")];
    files.extend((2..=ROTATIONS).map(|n| dir.0.join(format!("events.json.{n}.gz"))));
    let mut written = Vec::new();
    for file in &files {
        let file_lines = rotated_lines(file);
        assert!(!file_lines.is_empty(), "{} is empty", file.display());
        written.extend(file_lines);
    }
    eprintln!("{} lines in {} files", written.len(), files.len());
    let events: Vec<Value> = parse_and_validate(&written);
    assert!(
        events.iter().all(|e| e["type"] == "state"),
        "only transitions of the test's connections (no losses)"
    );
    let summary = format!("tcptrace: {} events written, 0 events lost", written.len());
    assert!(
        output.stderr.contains(&summary),
        "tcptrace's count differs from the files' {} lines: {}",
        written.len(),
        output.stderr
    );

    // Every line collected exactly once: wait until the counts match, then a little longer for
    // a duplicate that would come late.
    wait_until(
        Duration::from_secs(60),
        &format!("the collector to catch up with {} lines", written.len()),
        said,
        || lines(&collected).len() >= written.len(),
    );
    thread::sleep(Duration::from_secs(1));
    collector.stop();

    let mut want: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &written {
        *want.entry(line).or_default() += 1;
    }
    let got_lines = lines(&collected);
    let mut got: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &got_lines {
        let [time, skaddr, raw] = line.splitn(3, '\t').collect::<Vec<_>>()[..] else {
            panic!("not time, skaddr and the line: {line:?}");
        };
        // The collector parsed the JSON: its fields are the line's.
        let event: Value = serde_json::from_str(raw).expect("the collected line is JSON");
        assert_eq!(event["time"].as_str(), Some(time), "{line}");
        assert_eq!(event["skaddr"].as_str(), Some(skaddr), "{line}");
        *got.entry(raw).or_default() += 1;
    }
    assert!(
        want.values().all(|&n| n == 1),
        "tcptrace wrote a line twice"
    );
    let missing: Vec<_> = want.keys().filter(|l| !got.contains_key(*l)).collect();
    let doubled: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    let foreign: Vec<_> = got.keys().filter(|l| !want.contains_key(*l)).collect();
    assert!(
        missing.is_empty() && doubled.is_empty() && foreign.is_empty(),
        "{} written, {} collected; missing {missing:?}; more than once {doubled:?}; never \
         written {foreign:?}",
        written.len(),
        got_lines.len()
    );
}
