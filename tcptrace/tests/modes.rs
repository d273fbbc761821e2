//! The two modes and how tcptrace picks one: BTF mode where the kernel has BTF, the tracefs mode
//! with one line saying why where it has not, a clear refusal when BTF mode is forced there, and
//! kernel-side logging that loads in both. A kernel without BTF is made by hiding
//! /sys/kernel/btf in a mount namespace of the test's own. Root required.

mod support;

use std::{process::Command, time::Duration};

use support::{Endpoint, TCPTRACE, Tracer, require_root, serial};

/// tcptrace with `args` in a mount namespace where /sys/kernel/btf is an empty directory.
fn without_btf(args: &[&str]) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs tcptrace-test /sys/kernel/btf && exec "$0" "$@""#)
        .arg(TCPTRACE)
        .args(args);
    command
}

/// One connection to a server on `port`'s listener, and its close.
fn one_connection(server: &mut Endpoint) {
    let mut client = Endpoint::client("tt-mode-cli");
    server.step("listen");
    client.step(&format!("connect 127.0.0.1:{}", server.port));
    server.step("accept");
    client.step("close");
    server.step("close");
}

#[test]
fn auto_mode_falls_back_to_tracefs_without_btf_and_says_why() {
    let _serial = serial();
    let mut server = Endpoint::server("127.0.0.1", "tt-mode-srv");
    let port = server.port.to_string();
    let tracer = Tracer::start_command(without_btf(&["--format", "json", "-4", "--port", &port]));
    one_connection(&mut server);
    tracer.wait_for(Duration::from_secs(5), "the server's CLOSE line", |lines| {
        lines.iter().any(|l| {
            l.contains("\"newstate\":\"CLOSE\"") && l.contains(&format!("\"sport\":{port}"))
        })
    });
    let output = tracer.stop();
    assert!(output.status.success(), "{}", output.stderr);
    let fallback: Vec<&str> = output
        .stderr
        .lines()
        .filter(|l| l.contains("BTF mode unavailable"))
        .collect();
    assert_eq!(
        fallback,
        [
            "tcptrace: BTF mode unavailable (/sys/kernel/btf/vmlinux does not exist (a kernel built without CONFIG_DEBUG_INFO_BTF)); using tracefs mode"
        ],
        "{}",
        output.stderr
    );
    assert!(
        output.stderr.contains("tcptrace: tracing (tracefs mode)"),
        "{}",
        output.stderr
    );
    let lines = output.json();
    assert!(
        lines
            .iter()
            .filter(|l| l["sport"] == server.port && l["dport"] != 0)
            .all(|l| l["pid"] == server.pid()),
        "{lines:?}"
    );
}

#[test]
fn forcing_btf_mode_without_btf_is_one_line_and_exit_1() {
    require_root();
    let output = without_btf(&["--mode", "btf"]).output().expect("tcptrace");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "tcptrace: BTF mode is not available on this kernel: /sys/kernel/btf/vmlinux does not exist (a kernel built without CONFIG_DEBUG_INFO_BTF)"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn snapshot_needs_btf_mode_and_says_so() {
    let _serial = serial();
    let tracer = Tracer::start(&[
        "--mode",
        "tracefs",
        "--snapshot",
        "--format",
        "json",
        "-P",
        "1",
    ]);
    let output = tracer.stop();
    assert!(output.status.success());
    assert!(
        output
            .stderr
            .contains("--snapshot needs BTF mode; no snapshot is written"),
        "{}",
        output.stderr
    );
}

#[test]
fn kernel_side_logging_loads_and_traces_in_both_modes() {
    for mode in ["btf", "tracefs"] {
        let _serial = serial();
        let mut server = Endpoint::server("127.0.0.1", "tt-debug-srv");
        let port = server.port.to_string();
        let tracer = Tracer::start(&[
            "--mode", mode, "--debug", "--format", "json", "-4", "--port", &port,
        ]);
        one_connection(&mut server);
        tracer.wait_for(Duration::from_secs(5), "the server's CLOSE line", |lines| {
            lines.iter().any(|l| {
                l.contains("\"newstate\":\"CLOSE\"") && l.contains(&format!("\"sport\":{port}"))
            })
        });
        let output = tracer.stop();
        assert!(output.status.success(), "{mode}: {}", output.stderr);
        assert!(
            output.stderr.contains(&format!("tracing ({mode} mode)")),
            "{mode}: {}",
            output.stderr
        );
        // Nothing went wrong, so the kernel side had nothing to say.
        assert!(
            !output.stderr.contains("tcptrace: kernel"),
            "{mode}: {}",
            output.stderr
        );
    }
}
