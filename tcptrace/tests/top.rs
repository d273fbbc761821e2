//! `tcptrace top` in a real terminal: tmux runs it on a pane of a known size, the test reads the
//! screen as a person would (`capture-pane`), presses its keys (`send-keys`), and compares the
//! sockets it counts with what `ss -tan` lists at the same moment.

mod support;

use std::{
    collections::BTreeMap,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use support::{Endpoint, TCPTRACE, TEST_MODE_VAR, require_root, serial};

/// One tmux server of the test's own (its own socket), one pane running tcptrace top under a
/// shell that prints its exit status (tmux itself does not always reap a pane's process at once,
/// so its `pane_dead_status` cannot be waited for).
struct Terminal {
    socket: String,
    /// tcptrace's pid (the shell's child), ended by this pid if the test fails.
    pid: u32,
}

const EXIT_STATUS: &str = "tcptrace exit status ";

impl Terminal {
    /// Starts `tcptrace top ARGS` on a 140x45 pane whose content stays once it exits, so its exit
    /// status and the summary it prints after the view can be read.
    fn start(args: &[&str]) -> Self {
        let socket = format!("tcptrace-test-top-{}", std::process::id());
        let script = format!("\"$0\" \"$@\"; echo \"{EXIT_STATUS}$?\"");
        let mut command = vec!["sh", "-c", &script, TCPTRACE, "top"];
        command.extend_from_slice(args);
        let mode = std::env::var(TEST_MODE_VAR).ok();
        if let Some(mode) = &mode {
            command.extend_from_slice(&["--mode", mode]);
        }
        // The option is set before the session starts, so even an instant exit leaves the pane.
        let status = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null"])
            .args(["set-option", "-g", "remain-on-exit", "on", ";"])
            .args(["new-session", "-d", "-x", "140", "-y", "45", "-s", "top"])
            .args(command)
            .status()
            .expect("tmux (cargo xtask setup installs it)");
        assert!(status.success(), "tmux new-session failed");
        let mut terminal = Self { socket, pid: 0 };
        let shell: u32 = terminal
            .query("#{pane_pid}")
            .parse()
            .expect("the pane's pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        terminal.pid = loop {
            let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
                .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                break pid.parse().expect("a pid");
            }
            assert!(
                Instant::now() < deadline,
                "the pane's shell started no tcptrace; the screen:\n{}",
                terminal.screen()
            );
            thread::sleep(Duration::from_millis(10));
        };
        terminal
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 from tmux")
    }

    fn query(&self, format: &str) -> String {
        self.tmux(&["display-message", "-p", "-t", "top", format])
            .trim()
            .to_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "top"])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// Waits up to `timeout` for a screen `predicate` accepts, and returns it.
    fn wait_for(&self, timeout: Duration, what: &str, predicate: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if predicate(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; the screen:\n{screen}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// tcptrace's exit status, as the shell printed it once tcptrace exited (up to `timeout`).
    fn exit_status(&self, timeout: Duration) -> i32 {
        let screen = self.wait_for(timeout, "exit", |s| s.contains(EXIT_STATUS));
        screen
            .lines()
            .find_map(|l| l.trim().strip_prefix(EXIT_STATUS))
            .and_then(|status| status.parse().ok())
            .unwrap_or_else(|| panic!("no exit status; the screen:\n{screen}"))
    }

    fn tcptrace_running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|stat| Some(stat.rsplit_once(") ")?.1.starts_with('Z')))
            .is_some_and(|zombie| !zombie)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if self.pid != 0 && self.tcptrace_running() {
            // SAFETY: a signal to the tcptrace this test started, by its pid (alive and no
            // zombie, so the pid is still its own).
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.tcptrace_running() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// The state table's counts as the screen shows them: `│ESTABLISHED  40  +0.0/s │`.
fn screen_counts(screen: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in screen.lines() {
        let mut words = line.trim_start_matches('│').split_whitespace();
        if let (Some(state), Some(count)) = (words.next(), words.next())
            && state
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && state.len() > 3
            && let Ok(count) = count.parse()
        {
            counts.insert(state.to_owned(), count);
        }
    }
    counts
}

/// What `ss -tan` lists for sockets with `port` on either side, by tcptrace's state names.
fn ss_counts(port: u16) -> BTreeMap<String, u64> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let out = Command::new("ss")
        .args(["-tanH", "state", "all", &filter])
        .output()
        .expect("ss");
    assert!(out.status.success(), "ss failed");
    let mut counts = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(state) = line.split_whitespace().next() else {
            continue;
        };
        let name = match state {
            "ESTAB" => "ESTABLISHED".to_owned(),
            "UNCONN" => "CLOSE".to_owned(),
            "FIN-WAIT-1" => "FIN_WAIT1".to_owned(),
            "FIN-WAIT-2" => "FIN_WAIT2".to_owned(),
            other => other.replace('-', "_"),
        };
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// The process table's row of the process named `comm`: its cells.
fn process_row(screen: &str, comm: &str, pid: u32) -> Vec<String> {
    let label = format!("{comm}[{pid}]");
    let line = screen
        .lines()
        .find(|l| l.contains(&label) && !l.contains('→'))
        .unwrap_or_else(|| panic!("no process row {label}; the screen:\n{screen}"));
    line.trim_matches(|c| c == '│' || c == ' ')
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_view_counts_what_ss_lists_and_answers_its_keys() {
    require_root();
    let _serial = serial();
    let mut server = Endpoint::server("127.0.0.1", "tt-top-srv");
    let port = server.port;
    let terminal = Terminal::start(&["--port", &port.to_string()]);
    // The view is drawn once the programs are attached: connections made from now on are
    // followed in either mode.
    terminal.wait_for(Duration::from_secs(30), "view", |s| {
        s.contains("tcptrace top ·") && s.contains("STATE")
    });

    server.step("listen");
    let mut client = Endpoint::client("tt-top-cli");
    client.step(&format!("connect-many 30 127.0.0.1:{port}"));
    let accepted = server.accept_ready(30);
    assert_eq!(accepted.len(), 30, "the server took every connection");
    // The client closes ten: their server sides wait in CLOSE_WAIT, the client's in FIN_WAIT2.
    client.step("close-some 10");

    let expected = BTreeMap::from([
        ("CLOSE_WAIT".to_owned(), 10),
        ("ESTABLISHED".to_owned(), 40),
        ("FIN_WAIT2".to_owned(), 10),
        ("LISTEN".to_owned(), 1),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let screen = loop {
        let before = ss_counts(port);
        let screen = terminal.screen();
        let after = ss_counts(port);
        let shown: BTreeMap<String, u64> = screen_counts(&screen)
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        // ss around the capture agreed with itself: nothing moved while the screen was read.
        if before == after && before == expected && shown == expected {
            break screen;
        }
        assert!(
            Instant::now() < deadline,
            "the view's counts {shown:?}, ss {before:?} then {after:?}, expected {expected:?}; \
             the screen:\n{screen}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    let server_row = process_row(&screen, "tt-top-srv", server.pid());
    assert_eq!(
        server_row[server_row.len() - 2],
        "10",
        "the server holds ten in CLOSE_WAIT: {server_row:?}"
    );
    assert!(screen.contains("Processes, by opened/s"), "{screen}");

    terminal.keys(&["s"]);
    terminal.wait_for(Duration::from_secs(5), "sort by closed/s", |s| {
        s.contains("Processes, by closed/s") && s.contains("CLOSED/S▼")
    });
    terminal.keys(&["p"]);
    terminal.wait_for(Duration::from_secs(5), "pause", |s| s.contains("PAUSED"));
    terminal.keys(&["p"]);
    terminal.wait_for(Duration::from_secs(5), "resume", |s| !s.contains("PAUSED"));
    terminal.keys(&["/", "tt-top-cli", "Enter"]);
    let filtered = terminal.wait_for(Duration::from_secs(5), "filter", |s| {
        s.contains("filter: tt-top-cli")
    });
    assert!(
        filtered.contains(&format!("tt-top-cli[{}]", client.pid()))
            && !filtered.contains(&format!("tt-top-srv[{}]", server.pid())),
        "the filter keeps the client's row only:\n{filtered}"
    );

    terminal.keys(&["q"]);
    assert_eq!(terminal.exit_status(Duration::from_secs(10)), 0);
    assert_eq!(
        terminal.query("#{alternate_on}"),
        "0",
        "the terminal is back on its main screen"
    );
    let after = terminal.screen();
    assert!(
        after.contains("events written") && !after.contains("STATE"),
        "after q the summary is printed and the view is gone:\n{after}"
    );

    client.step("close-all");
    client.exit();
    server.exit();
}

#[test]
fn a_terminal_too_small_says_so_and_q_still_quits() {
    require_root();
    let _serial = serial();
    let terminal = Terminal::start(&["--port", "9"]);
    terminal.tmux(&["resize-window", "-t", "top", "-x", "80", "-y", "24"]);
    terminal.wait_for(Duration::from_secs(30), "too-small message", |s| {
        s.contains("The terminal is too small: 80x24")
    });
    terminal.tmux(&["resize-window", "-t", "top", "-x", "140", "-y", "45"]);
    terminal.wait_for(Duration::from_secs(5), "view after resize", |s| {
        s.contains("STATE") && s.contains("Processes, by")
    });
    terminal.keys(&["q"]);
    assert_eq!(terminal.exit_status(Duration::from_secs(10)), 0);
}

#[test]
fn a_terminal_that_hangs_up_ends_it() {
    require_root();
    let _serial = serial();
    let terminal = Terminal::start(&["--port", "9"]);
    terminal.wait_for(Duration::from_secs(30), "view", |s| s.contains("STATE"));
    // The terminal goes (an ssh session closed): tmux's server ends, its terminals hang up.
    let status = Command::new("tmux")
        .args(["-L", &terminal.socket, "kill-server"])
        .status()
        .expect("tmux");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    // Exited: gone, or a zombie nobody has reaped yet.
    let state = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(") ")?.1.chars().next())
    };
    while state(terminal.pid).is_some_and(|s| s != 'Z') {
        assert!(
            Instant::now() < deadline,
            "tcptrace top still runs 5 s after its terminal hung up (state {:?})",
            state(terminal.pid)
        );
        thread::sleep(Duration::from_millis(50));
    }
}
