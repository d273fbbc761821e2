//! `tcptrace --check` on the real host, and on the same host with parts hidden from it: BTF and
//! tracefs covered by empty mounts in a mount namespace of the test's own, capabilities taken
//! away with setpriv. Root required.

mod support;

use std::process::{Command, Output};

use serde_json::Value;

/// Runs `tcptrace --check ARGS` through `wrapper` (a command line that ends by running it).
fn check(wrapper: &[&str], args: &[&str]) -> (Output, String) {
    support::require_root();
    let _serial = support::serial();
    let output = match wrapper.split_first() {
        Some((program, rest)) => Command::new(program)
            .args(rest)
            .arg(support::TCPTRACE)
            .arg("--check")
            .args(args)
            .output(),
        None => Command::new(support::TCPTRACE)
            .arg("--check")
            .args(args)
            .output(),
    }
    .expect("run tcptrace --check");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

fn check_json(wrapper: &[&str]) -> (Option<i32>, Value) {
    let (output, stdout) = check(wrapper, &["--format", "json"]);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "--check --format json printed no JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(
        stdout.lines().count(),
        1,
        "one object on one line: {stdout}"
    );
    (output.status.code(), report)
}

/// The hosts these tests stand for have tracefs mounted, as tcptrace leaves it after a first run;
/// a fresh machine may not yet. Mounted inside the private namespace only, unless hidden after.
const TRACEFS_MOUNTED: &str =
    "mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing; ";

/// A shell in a new mount namespace that covers `dirs` with empty tmpfs mounts, then runs
/// tcptrace: the host's own mounts are untouched.
fn hiding(dirs: &[&str]) -> Vec<String> {
    let mounts: String = dirs
        .iter()
        .map(|dir| format!("mount -t tmpfs tcptrace-test-empty {dir} && "))
        .collect();
    vec![
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        format!("{TRACEFS_MOUNTED}{mounts}exec \"$0\" \"$@\""),
    ]
}

#[test]
fn this_host_traces_in_btf_mode() {
    let (code, report) = check_json(&[]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["ready"], true, "{report}");
    assert_eq!(report["mode"], "btf", "{report}");
    for fact in ["kernel", "btf", "ring_buffer", "socket_storage", "tracefs"] {
        assert_eq!(report[fact]["ok"], true, "{fact}: {report}");
    }
    let tracepoints = report["tracepoints"].as_array().expect("tracepoints");
    let names: Vec<&str> = tracepoints
        .iter()
        .map(|t| t["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        [
            "sock:inet_sock_set_state",
            "tcp:tcp_retransmit_skb",
            "tcp:tcp_retransmit_synack"
        ]
    );
    for tracepoint in tracepoints {
        assert_eq!(tracepoint["btf"]["ok"], true, "{tracepoint}");
        // Read from tracefs when it is mounted (tcptrace mounts it on a first run).
        assert_ne!(tracepoint["tracefs"]["ok"], false, "{tracepoint}");
    }
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"] {
        assert_eq!(report["capabilities"][cap], true, "{report}");
    }
    assert_eq!(report["modes"]["btf"]["result"], "works", "{report}");
    assert_eq!(report["modes"]["tracefs"]["result"], "skipped", "{report}");

    let (output, text) = check(&[], &[]);
    assert!(output.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l == "verdict: tracing works here, in btf mode"),
        "{text}"
    );
}

#[test]
fn without_btf_it_falls_back_to_tracefs_mode() {
    let wrapper = hiding(&["/sys/kernel/btf"]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let (code, report) = check_json(&wrapper);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["btf"]["ok"], false, "{report}");
    assert_eq!(report["modes"]["btf"]["result"], "fails", "{report}");
    assert!(
        report["modes"]["btf"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("/sys/kernel/btf/vmlinux does not exist")),
        "{report}"
    );
    assert_eq!(report["modes"]["tracefs"]["result"], "works", "{report}");
    assert_eq!(report["mode"], "tracefs", "{report}");
    // The layouts tracefs mode reads are shown.
    assert!(
        report["tracepoints"][0]["tracefs"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("skaddr@") && d.contains("newstate@")),
        "{report}"
    );
}

#[test]
fn without_btf_and_tracefs_it_says_what_is_missing_and_exits_1() {
    let wrapper = hiding(&[
        "/sys/kernel/btf",
        "/sys/kernel/tracing",
        "/sys/kernel/debug",
    ]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let (code, report) = check_json(&wrapper);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["ready"], false, "{report}");
    assert_eq!(report["mode"], Value::Null, "{report}");
    assert_eq!(report["btf"]["ok"], false, "{report}");
    assert_eq!(report["tracefs"]["ok"], false, "{report}");
    assert_eq!(report["modes"]["btf"]["result"], "fails", "{report}");
    assert_eq!(report["modes"]["tracefs"]["result"], "fails", "{report}");

    let (output, text) = check(&wrapper, &[]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("tracefs ") && l.contains("MISSING")),
        "{text}"
    );
    assert!(
        text.contains("verdict: tracing does NOT work here"),
        "{text}"
    );
}

#[test]
fn without_capabilities_it_names_the_missing_ones_and_exits_1() {
    let (code, report) = check_json(&[
        "setpriv",
        "--bounding-set=-bpf,-perfmon,-sys_admin",
        "--inh-caps=-all",
    ]);
    assert_eq!(code, Some(1), "{report}");
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"] {
        assert_eq!(report["capabilities"][cap], false, "{report}");
    }
    for mode in ["btf", "tracefs"] {
        assert_eq!(report["modes"][mode]["result"], "skipped", "{report}");
    }
    assert_eq!(report["ready"], false, "{report}");
}

#[test]
fn bad_combinations_exit_2_with_one_line() {
    for args in [
        &["--format", "none"][..],
        &["--output", "/tmp/tcptrace-check-never-written"],
        &["--metrics-addr", "127.0.0.1:1"],
    ] {
        let (output, stdout) = check(&[], args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }
    assert!(!std::path::Path::new("/tmp/tcptrace-check-never-written").exists());
}
