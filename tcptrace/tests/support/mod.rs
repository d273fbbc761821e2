//! Shared pieces of the privileged end-to-end tests: running the real tcptrace binary, and driving
//! real TCP endpoints (separate processes) step by step.
//!
//! These tests need root and fail loudly without it: they never skip.

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod lossy;
pub mod prometheus;
pub mod servers;
pub mod unseen;

pub const TCPTRACE: &str = env!("CARGO_BIN_EXE_tcptrace");

/// When set, the mode every tracer a test starts runs in, unless the test names one.
pub const TEST_MODE_VAR: &str = "TCPTRACE_TEST_MODE";

/// Panics unless running as root: a privileged test must fail, not skip, where it cannot run.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests load eBPF programs and must run as root (cargo xtask test)"
    );
}

/// A running tcptrace, its stdout collected line by line.
pub struct Tracer {
    child: Child,
    _serial: Serial,
    /// The command line, for messages.
    args: String,
    lines: Arc<Mutex<Vec<String>>>,
    stdout_reader: Option<thread::JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
    /// It said it is tracing.
    tracing: Arc<AtomicBool>,
}

/// What a stopped tcptrace printed.
pub struct Output {
    pub status: ExitStatus,
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Output {
    /// Every stdout line parsed as JSON and validated against the published schema; panics on a
    /// line that is not JSON or breaks the schema.
    pub fn json(&self) -> Vec<Value> {
        parse_and_validate(&self.lines)
    }
}

/// The body of `GET /metrics` from tcptrace's endpoint on 127.0.0.1:`port`, which must answer 200.
pub fn scrape_metrics(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    body.to_owned()
}

/// Runs tcptrace with `args` and checks that it refuses them: exit 1, nothing on stdout, one
/// line on stderr saying `expected`.
pub fn assert_refused(args: &[&str], expected: &str) {
    let out = Command::new(TCPTRACE)
        .args(args)
        .output()
        .expect("run tcptrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.lines().count() == 1 && stderr.contains(expected),
        "{stderr}"
    );
}

/// Parses JSON lines, checking each against `schema/tcptrace-events.schema.json`.
pub fn parse_and_validate(lines: &[String]) -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schema/tcptrace-events.schema.json"
    );
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("schema file"))
        .expect("schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    lines
        .iter()
        .map(|l| {
            let value: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
            if let Err(error) = validator.validate(&value) {
                panic!("line breaks the schema ({error}): {l}");
            }
            value
        })
        .collect()
}

impl Tracer {
    /// Starts tcptrace with `args` and waits until it says it is tracing.
    pub fn start(args: &[&str]) -> Self {
        let mut command = Command::new(TCPTRACE);
        command.args(args);
        // `cargo xtask test` runs the scenarios once more in tracefs mode; a test that names a
        // mode keeps it.
        if let Ok(mode) = std::env::var(TEST_MODE_VAR)
            && !args.contains(&"--mode")
        {
            command.args(["--mode", &mode]);
        }
        Self::start_command(command)
    }

    /// Starts `command` (tcptrace, perhaps under a wrapper) and waits until it says it is tracing.
    pub fn start_command(command: Command) -> Self {
        let mut tracer = Self::spawn(command, None);
        tracer.wait_until_tracing();
        tracer
    }

    /// Starts tcptrace with `args`, its stdout going to `stdout` (not collected), and waits until
    /// it says it is tracing.
    pub fn start_with_stdout(args: &[&str], stdout: Stdio) -> Self {
        let mut command = Command::new(TCPTRACE);
        command.args(args);
        let mut tracer = Self::spawn(command, Some(stdout));
        tracer.wait_until_tracing();
        tracer
    }

    /// Starts `command` without waiting for it; its stdout is collected unless `stdout` is given.
    pub fn spawn(mut command: Command, stdout: Option<Stdio>) -> Self {
        require_root();
        let serial = serial();
        let collect = stdout.is_none();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(stdout.unwrap_or_else(Stdio::piped))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {TCPTRACE}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout_reader = collect.then(|| {
            let stdout = child.stdout.take().expect("piped stdout");
            let sink = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            })
        });
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let tracing = Arc::new(AtomicBool::new(false));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr_text);
        let ready = Arc::clone(&tracing);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("tcptrace: tracing (") {
                    ready.store(true, Ordering::SeqCst);
                }
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Self {
            child,
            _serial: serial,
            args: format!("{command:?}"),
            lines,
            stdout_reader,
            stderr: stderr_text,
            stderr_reader: Some(stderr_reader),
            tracing,
        }
    }

    /// Whether it has said it is tracing.
    pub fn is_tracing(&self) -> bool {
        self.tracing.load(Ordering::SeqCst)
    }

    /// Waits until it says it is tracing; panics if it does not within 20 s.
    pub fn wait_until_tracing(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.is_tracing() {
            if Instant::now() > deadline || !self.is_running() {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "{} did not start tracing (exit: {status:?}); stderr:\n{}",
                    self.args,
                    self.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// What it printed on stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Lines printed so far.
    pub fn lines_so_far(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until `predicate` holds for the lines printed so far (or panics after `timeout`).
    pub fn wait_for(&self, timeout: Duration, what: &str, predicate: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !predicate(&self.lines.lock().unwrap()) {
            if Instant::now() >= deadline {
                let lines = self.lines.lock().unwrap();
                panic!(
                    "timed out waiting for {what}; stderr:\n{}\nthe last of {} lines:\n{}",
                    self.stderr.lock().unwrap(),
                    lines.len(),
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Sends SIGINT, as Ctrl-C would, and collects everything it printed.
    pub fn stop(self) -> Output {
        // Everything the kernel produced reaches the output within the drain interval.
        thread::sleep(Duration::from_millis(300));
        self.signal(libc::SIGINT);
        self.finish(Duration::from_secs(5))
    }

    /// Waits for tcptrace to exit by itself and collects its output.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "tcptrace did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        if let Some(reader) = self.stdout_reader.take() {
            reader.join().expect("stdout reader");
        }
        if let Some(reader) = self.stderr_reader.take() {
            reader.join().expect("stderr reader");
        }
        Output {
            status,
            lines: std::mem::take(&mut *self.lines.lock().unwrap()),
            stderr: std::mem::take(&mut *self.stderr.lock().unwrap()),
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The workload example, built by `cargo test` next to the test binaries.
/// The workload, inside network namespace `netns` when given.
fn workload_in(netns: Option<&str>) -> Command {
    match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", netns])
                .arg(workload_binary());
            command
        }
        None => Command::new(workload_binary()),
    }
}

fn workload_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/examples/tcp_workload
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples/tcp_workload");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo test` (it builds examples)",
        path.display()
    );
    path
}

/// One TCP endpoint in its own process, driven step by step.
pub struct Endpoint {
    child: Child,
    _serial: Serial,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub comm: String,
    /// The server's bound port.
    pub port: u16,
}

impl Endpoint {
    /// A server bound to `ip` (port chosen by the kernel), not yet listening.
    pub fn server(ip: &str, comm: &str) -> Self {
        Self::bound(Command::new(workload_binary()), ip, comm)
    }

    /// A server bound to `ip` and `port` (0: chosen by the kernel), with SO_REUSEPORT when
    /// `reuseport`, inside network namespace `netns` when given; not yet listening.
    pub fn server_at(
        netns: Option<&str>,
        ip: &str,
        port: u16,
        comm: &str,
        reuseport: bool,
    ) -> Self {
        let mut command = workload_in(netns);
        let addr = SocketAddr::new(ip.parse().expect("ip"), port).to_string();
        command.args(["server", &addr, comm]);
        if reuseport {
            command.arg("reuseport");
        }
        let mut endpoint = Self::spawn_command(command, comm);
        endpoint.read_port();
        endpoint
    }

    /// Accepts every connection waiting, after waiting (up to 10 s) for at least `min` whose
    /// handshake the kernel may not have finished yet; returns their remote ports.
    pub fn accept_ready(&mut self, min: usize) -> Vec<u16> {
        self.send(&format!("accept-ready {min}"));
        let line = self.read_line();
        let peers = line
            .strip_prefix("peers")
            .unwrap_or_else(|| panic!("{} answered {line:?}", self.comm))
            .trim();
        self.ack();
        peers
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().expect("port"))
            .collect()
    }

    /// Starts `command` (the workload, perhaps under a wrapper) as a server and reads its port.
    fn bound(mut command: Command, ip: &str, comm: &str) -> Self {
        let addr = if ip.contains(':') {
            format!("[{ip}]:0")
        } else {
            format!("{ip}:0")
        };
        command.args(["server", &addr, comm]);
        let mut endpoint = Self::spawn_command(command, comm);
        endpoint.read_port();
        endpoint
    }

    fn read_port(&mut self) {
        let bound = self.read_line();
        self.port = bound
            .strip_prefix("bound ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("server said {bound:?}"));
    }

    pub fn client(comm: &str) -> Self {
        Self::spawn(&["client", comm], comm)
    }

    /// Like [`Endpoint::client`], but the process runs inside network namespace `netns`.
    pub fn client_in(netns: &str, comm: &str) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(workload_binary())
            .args(["client", comm]);
        Self::spawn_command(command, comm)
    }

    /// Like [`Endpoint::server`], inside network namespace `netns`.
    pub fn server_in(netns: &str, ip: &str, comm: &str) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(workload_binary());
        Self::bound(command, ip, comm)
    }

    /// A server bound to `ip` (port chosen by the kernel), not yet listening, whose process runs
    /// in `cgroup` from its start (so its sockets are the cgroup's), inside `netns` when given.
    pub fn server_in_cgroup(
        cgroup: &TestCgroup,
        netns: Option<&str>,
        ip: &str,
        comm: &str,
    ) -> Self {
        Self::bound(cgroup.command(netns), ip, comm)
    }

    /// A client whose process runs in `cgroup` from its start, inside `netns` when given.
    pub fn client_in_cgroup(cgroup: &TestCgroup, netns: Option<&str>, comm: &str) -> Self {
        let mut command = cgroup.command(netns);
        command.args(["client", comm]);
        Self::spawn_command(command, comm)
    }

    fn spawn(args: &[&str], comm: &str) -> Self {
        let mut command = Command::new(workload_binary());
        command.args(args);
        Self::spawn_command(command, comm)
    }

    fn spawn_command(mut command: Command, comm: &str) -> Self {
        let serial = serial();
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start the workload: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            _serial: serial,
            stdin,
            stdout,
            comm: comm.to_owned(),
            port: 0,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a step without waiting for it to finish.
    pub fn send(&mut self, step: &str) {
        writeln!(self.stdin, "{step}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("{}: {step}: {e}", self.comm));
    }

    /// Waits for the acknowledgement of a step sent earlier.
    pub fn ack(&mut self) {
        let line = self.read_line();
        assert_eq!(line, "ok", "{} answered {line:?}", self.comm);
    }

    /// Runs a step and waits for it; returns when it was sent and when it was done.
    pub fn step(&mut self, step: &str) -> Window {
        let start = Instant::now();
        self.send(step);
        self.ack();
        Window {
            start,
            end: Instant::now(),
        }
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{}: {e}", self.comm));
        assert!(!line.is_empty(), "{} exited early", self.comm);
        line.trim_end().to_owned()
    }

    /// Ends the process and waits for it.
    pub fn exit(mut self) {
        self.send("exit");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{} exited with {status}", self.comm);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// When a step was sent and when it was acknowledged: the transition it causes lies inside.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn between(start: Instant, end: Instant) -> Self {
        Self { start, end }
    }

    /// Bounds of the time from a transition inside `self` to one inside `later`, in nanoseconds.
    pub fn until(&self, later: &Window) -> (u64, u64) {
        let lo = later.start.saturating_duration_since(self.end);
        let hi = later.end.saturating_duration_since(self.start);
        (lo.as_nanos() as u64, hi.as_nanos() as u64)
    }
}

/// Groups JSON state lines by socket (`skaddr`), in output order.
pub fn by_socket<'a>(
    lines: impl IntoIterator<Item = &'a Value>,
) -> BTreeMap<String, Vec<&'a Value>> {
    let mut sockets: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for line in lines {
        let skaddr = line["skaddr"]
            .as_str()
            .unwrap_or_else(|| panic!("no skaddr: {line}"))
            .to_owned();
        sockets.entry(skaddr).or_default().push(line);
    }
    sockets
}

/// Events the tracer reported lost in `lines` (its `lost` lines): the kernel skips a program
/// that a tracepoint hits while it already runs on that CPU (a softirq interrupting it), and
/// says so. A test that counts lines may find that many fewer, and no more.
pub fn lost_in(lines: &[Value]) -> usize {
    lines
        .iter()
        .filter(|l| l["type"] == "lost")
        .filter_map(|l| l["count"].as_u64())
        .sum::<u64>() as usize
}

/// Whether the tests run tcptrace in tracefs mode (`cargo xtask test`'s second pass).
pub fn tracefs_mode() -> bool {
    std::env::var(TEST_MODE_VAR).is_ok_and(|mode| mode == "tracefs")
}

/// The last transition written for the side that closes a connection first, once the peer has
/// closed too: BTF mode follows the connection into TIME_WAIT; tracefs mode writes the kernel's
/// hand-over to the timewait socket as a CLOSE.
pub fn first_closer_end() -> &'static str {
    if tracefs_mode() {
        "FIN_WAIT2->CLOSE"
    } else {
        "FIN_WAIT2->TIME_WAIT"
    }
}

/// `OLD->NEW` of each state line.
pub fn transitions(lines: &[&Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l["type"] == "state")
        .map(|l| {
            format!(
                "{}->{}",
                l["oldstate"].as_str().unwrap(),
                l["newstate"].as_str().unwrap()
            )
        })
        .collect()
}

/// Whether a line belongs to a socket with `port` on either side.
pub fn touches_port(line: &Value, port: u16) -> bool {
    line["sport"] == port || line["dport"] == port
}

pub fn socket_addr(ip: &str, port: u16) -> SocketAddr {
    let ip: std::net::IpAddr = ip.parse().expect("ip");
    SocketAddr::new(ip, port)
}

/// One privileged test at a time, however the tests are run (`cargo test` runs a binary's tests
/// on parallel threads, and its binaries one after another): a burst of one test's traffic makes
/// the kernel skip BPF runs that another test's exact counts would notice, and a port number is
/// unique only within one address family and one network namespace. Every tracer, endpoint and
/// namespace holds this while it lives, and a test may hold it for longer; the thread that holds
/// it may take it again. Test binaries of two checkouts on one machine share the kernel too, so
/// the lock is also a `flock` on a file that every run opens.
pub struct Serial {
    _not_send: std::marker::PhantomData<*const ()>,
}

static SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    /// How many `Serial`s this thread holds, and the lock while it holds any.
    static HELD: std::cell::RefCell<(usize, Option<Held>)> =
        const { std::cell::RefCell::new((0, None)) };
}

/// The process-wide lock, then the machine-wide one (released when the file closes).
type Held = (std::sync::MutexGuard<'static, ()>, std::fs::File);

const MACHINE_LOCK: &str = "/tmp/tcptrace-privileged-tests.lock";

pub fn serial() -> Serial {
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if held.0 == 0 {
            let guard = SERIAL
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(MACHINE_LOCK)
                .unwrap_or_else(|e| panic!("{MACHINE_LOCK}: {e}"));
            // SAFETY: flock on a descriptor this function owns.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            assert_eq!(locked, 0, "flock {MACHINE_LOCK}");
            held.1 = Some((guard, file));
        }
        held.0 += 1;
    });
    Serial {
        _not_send: std::marker::PhantomData,
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            held.0 -= 1;
            if held.0 == 0 {
                held.1 = None;
            }
        });
    }
}

/// `Name:\tvalue` from /proc/PID/status.
pub fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name}"))
        .trim()
        .to_owned()
}

/// Runs a command that must succeed.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cgroup v2 mount: the first `cgroup2` line of /proc/self/mountinfo with root `/`.
pub fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let fields: Vec<&str> = fields.split(' ').collect();
            (rest.starts_with("cgroup2 ") && fields.get(3) == Some(&"/"))
                .then(|| PathBuf::from(fields[4]))
        })
        .expect("no cgroup2 mount: these tests need cgroup v2")
}

/// The cgroup (v2) this process runs in, as a path below the mount.
pub fn own_cgroup() -> String {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no cgroup v2 line")
        .to_owned()
}

/// A cgroup (v2) directory of the test's own, with its parents, below the mount. Removed when
/// dropped, also when the test fails: processes still in it are moved to the test's own cgroup
/// (they are the test's: only the test puts processes there), then the directories go, deepest
/// first.
pub struct TestCgroup {
    _serial: Serial,
    /// Below the mount, starting with `/`.
    pub path: String,
    mount: PathBuf,
    /// The directories this created, outermost first.
    created: Vec<PathBuf>,
}

impl TestCgroup {
    /// `path` is below the mount, starting with `/`.
    pub fn new(path: &str) -> Self {
        require_root();
        let mount = cgroup2_mount();
        let mut created = Vec::new();
        let mut dir = mount.clone();
        for component in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(component);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        Self {
            _serial: serial(),
            path: path.to_owned(),
            mount,
            created,
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.mount.join(self.path.trim_start_matches('/'))
    }

    /// The cgroup's id: its directory's inode number.
    pub fn id(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(self.dir()).expect("cgroup dir"))
    }

    /// The workload, to run in this cgroup from its start (inside `netns` when given).
    pub fn command(&self, netns: Option<&str>) -> Command {
        let mut command = workload_in(netns);
        let procs = std::ffi::CString::new(
            self.dir()
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("path");
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on
        // memory prepared before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }

    /// Moves every process in this cgroup to the test's own cgroup.
    pub fn evacuate(&self) {
        let home = self.mount.join(own_cgroup().trim_start_matches('/'));
        let procs = std::fs::read_to_string(self.dir().join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(home.join("cgroup.procs"), pid);
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.evacuate();
        let leaf = self.dir();
        // A cgroup whose last process just left may take a moment to be empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&leaf).is_ok() || !leaf.exists() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Then the parents it made, and those that other cgroups of the test made and left to
        // the last one out (a parent with other children stays).
        let mut shared = self.path.as_str();
        while let Some((parent, _)) = shared.rsplit_once('/') {
            shared = parent;
            let dir = self.mount.join(parent.trim_start_matches('/'));
            let ours = self.created.contains(&dir)
                || parent.trim_start_matches('/').starts_with("tcptrace-test-");
            if parent.is_empty() || !ours || std::fs::remove_dir(&dir).is_err() {
                break;
            }
        }
    }
}

/// A network namespace of the test's own, joined to the host by a veth pair: the host end has
/// `host_ip`, the namespace end `ns_ip`. Removed (with the veth pair and any iptables rules
/// inside) when dropped, also when the test fails.
pub struct Netns {
    _serial: Serial,
    pub name: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl Netns {
    /// `index` keeps concurrent tests apart (names and subnet).
    pub fn new(index: u8) -> Self {
        require_root();
        let id = format!("{}{index}", std::process::id() % 100_000);
        let name = format!("tcptrace-test-{id}");
        let netns = Self {
            _serial: serial(),
            name: name.clone(),
            host_ip: format!("10.213.{index}.1"),
            ns_ip: format!("10.213.{index}.2"),
        };
        // Leftovers of an earlier run killed before its cleanup would collide. A deleted
        // namespace also lives on (with its veth pair and the host end's address) while sockets
        // in it are still closing: remove any host end of the test's that holds the subnet.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let subnet = format!("10.213.{index}.0/24");
        if let Ok(out) = Command::new("ip")
            .args(["-o", "addr", "show", "to", &subnet])
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(interface) = line.split_whitespace().nth(1)
                    && interface.starts_with("tth")
                {
                    let _ = Command::new("ip").args(["link", "del", interface]).output();
                }
            }
        }
        let (host_if, ns_if) = (format!("tth{id}"), format!("ttn{id}"));
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        sh("ip", &["netns", "add", &name]);
        sh(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &name,
            ],
        );
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", netns.host_ip),
                "dev",
                &host_if,
            ],
        );
        sh("ip", &["link", "set", &host_if, "up"]);
        sh(
            "ip",
            &[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", netns.ns_ip),
                "dev",
                &ns_if,
            ],
        );
        sh("ip", &["-n", &name, "link", "set", &ns_if, "up"]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        netns
    }

    /// Runs iptables inside the namespace.
    pub fn iptables(&self, args: &[&str]) {
        let mut full = vec!["netns", "exec", &self.name, "iptables"];
        full.extend_from_slice(args);
        sh("ip", &full);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Rules that drop packets first, so that sockets still closing in the namespace can
        // finish; then the namespace, which removes its veth end, and with it the host end.
        for table in ["filter", "raw", "mangle"] {
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.name, "iptables", "-t", table, "-F"])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        // The host end goes at once even while the namespace lingers.
        let id = self.name.trim_start_matches("tcptrace-test-");
        let _ = Command::new("ip")
            .args(["link", "del", &format!("tth{id}")])
            .output();
    }
}

/// Runs `f` on a thread of its own that has joined network namespace `netns` (the sockets it
/// makes live there).
pub fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{}", netns.name);
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: a namespace file this thread holds open; only this thread moves.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A directory of the test's own, removed afterwards.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
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

/// A port on 127.0.0.1 that nothing listens on at the moment.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
