//! The deployment files parse, and every tcptrace flag they use exists (checked by tcptrace's own
//! command-line parser). No root needed.

use std::collections::BTreeMap;

use clap::Parser as _;
use serde_json::Value;
use tcptrace::cli::Cli;

fn read(path: &str) -> String {
    let path = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A systemd unit as sections of key/value lists (keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_owned());
            sections.entry(name.to_owned()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {line}", n + 1));
        let section = current
            .clone()
            .unwrap_or_else(|| panic!("line {}: outside a section", n + 1));
        sections
            .entry(section)
            .or_default()
            .push((key.trim().to_owned(), value.trim().to_owned()));
    }
    sections
}

fn value<'a>(section: &'a [(String, String)], key: &str) -> &'a str {
    section
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key}"))
}

#[test]
fn systemd_unit_runs_tcptrace_with_flags_that_exist_and_least_privilege() {
    let unit = parse_unit(&read("packaging/tcptrace.service"));
    assert_eq!(
        unit.keys().collect::<Vec<_>>(),
        ["Install", "Service", "Unit"]
    );
    let service = &unit["Service"];
    let exec: Vec<&str> = value(service, "ExecStart").split_whitespace().collect();
    assert!(exec[0].ends_with("/tcptrace"), "{exec:?}");
    let cli = Cli::try_parse_from(&exec).unwrap_or_else(|e| panic!("ExecStart: {e}"));
    assert!(cli.output.is_some() && cli.metrics_addr.is_some());
    assert_eq!(
        value(service, "ExecReload"),
        "/bin/kill -HUP $MAINPID",
        "SIGHUP reopens --output"
    );
    assert_eq!(
        value(service, "CapabilityBoundingSet"),
        "CAP_BPF CAP_PERFMON"
    );
    assert_eq!(value(service, "AmbientCapabilities"), "CAP_BPF CAP_PERFMON");
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectKernelModules", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(value(service, key), want, "{key}");
    }
    // --output must be writable under ProtectSystem=strict: inside LogsDirectory.
    let output = cli.output.unwrap();
    assert!(
        output.starts_with(format!("/var/log/{}", value(service, "LogsDirectory"))),
        "{}",
        output.display()
    );
}

#[test]
fn daemonset_runs_tcptrace_with_flags_that_exist_and_announces_its_metrics_port() {
    let manifest: Value =
        serde_yaml_ng::from_str(&read("deploy/daemonset.yaml")).expect("daemonset.yaml is YAML");
    assert_eq!(manifest["kind"], "DaemonSet");
    assert_eq!(manifest["apiVersion"], "apps/v1");
    let template = &manifest["spec"]["template"];
    assert_eq!(
        manifest["spec"]["selector"]["matchLabels"],
        template["metadata"]["labels"]
    );
    let container = &template["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("tcptrace").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("args: {e}"));
    // JSON lines on stdout, for the cluster's log collector.
    assert_eq!(cli.format, tcptrace::cli::Format::Json);
    assert!(cli.output.is_none());
    let port = cli.metrics_addr.expect("--metrics-addr").port();
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(container["ports"][0]["containerPort"], port);
    let security = &container["securityContext"];
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["BPF", "PERFMON"])
    );
    assert_eq!(security["privileged"], false);
    // The socket iterator must see the node's processes, and lines carry the node's pids.
    assert_eq!(manifest["spec"]["template"]["spec"]["hostPID"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
}
