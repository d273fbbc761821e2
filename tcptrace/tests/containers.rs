//! Which container, pod, cgroup and network namespace each line belongs to, and the filters on
//! them: real cgroup v2 directories shaped as docker, containerd under kubepods, CRI-O and podman
//! make them, real processes run in them (one also in a network namespace of its own), the real
//! kernel traces them. Root required.

mod support;

use std::os::unix::fs::MetadataExt as _;

use serde_json::Value;
use support::{Endpoint, Netns, TestCgroup, Tracer, own_cgroup, serial};

const DOCKER_ID: &str = "d0c4e2b7a4d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f01";
const CONTAINERD_ID: &str = "c0417a1dd5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f0202";
const CRIO_ID: &str = "c210e2b7a4d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f03";
const PODMAN_ID: &str = "90d3a2b7a4d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f04";
const CONTAINERD_POD: &str = "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a02";
const CRIO_POD: &str = "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a03";

/// Where the test's cgroups live: a directory of its own below the mount.
fn top() -> String {
    format!("/tcptrace-test-{}", std::process::id())
}

/// A container of one shape: its cgroup, and what lines must say of it.
struct Container {
    cgroup: TestCgroup,
    id: Option<&'static str>,
    pod: Option<&'static str>,
}

/// The four shapes, below [`top`].
fn containers() -> Vec<Container> {
    (0..4).map(container).collect()
}

/// Shape `index` of the four: docker, containerd under kubepods, CRI-O, podman.
fn container(index: usize) -> Container {
    let top = top();
    let pod_ = |uid: &str| uid.replace('-', "_");
    let (path, id, pod) = match index {
        0 => (
            format!("{top}/system.slice/docker-{DOCKER_ID}.scope"),
            DOCKER_ID,
            None,
        ),
        1 => (
            format!(
                "{top}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINERD_ID}.scope",
                pod_(CONTAINERD_POD)
            ),
            CONTAINERD_ID,
            Some(CONTAINERD_POD),
        ),
        2 => (
            format!(
                "{top}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{CRIO_ID}.scope",
                pod_(CRIO_POD)
            ),
            CRIO_ID,
            Some(CRIO_POD),
        ),
        _ => (
            format!("{top}/machine.slice/libpod-{PODMAN_ID}.scope"),
            PODMAN_ID,
            None,
        ),
    };
    Container {
        cgroup: TestCgroup::new(&path),
        id: Some(id),
        pod,
    }
}

/// One connection of a test: where its server listens, and the server itself, still listening
/// until the test ends it, so that no later connection of the test gets the same port (a port
/// number is free again once its listener closes, and a line is matched to its connection by it).
struct Connection {
    addr: Addr,
    server: Endpoint,
}

/// Where a connection's server listened.
#[derive(Clone, Debug, PartialEq)]
struct Addr {
    ip: String,
    port: u16,
}

impl Connection {
    /// Closes the listener; returns where it listened.
    fn end(self) -> Addr {
        self.server.exit();
        self.addr
    }
}

/// Ends every connection's listener; returns where they listened, in order.
fn end_all(connections: Vec<Connection>) -> Vec<Addr> {
    connections.into_iter().map(Connection::end).collect()
}

/// A server and a client in `cgroup` (inside `netns` when given) that connect, exchange a byte
/// and close.
fn connect_inside(cgroup: &TestCgroup, netns: Option<&Netns>, comm: &str) -> Connection {
    let (ns, ip) = match netns {
        Some(netns) => (Some(netns.name.as_str()), netns.ns_ip.as_str()),
        None => (None, "127.0.0.1"),
    };
    connect(
        Endpoint::server_in_cgroup(cgroup, ns, ip, &format!("{comm}-s")),
        Endpoint::client_in_cgroup(cgroup, ns, &format!("{comm}-c")),
        ip,
    )
}

/// `server` (bound to `ip`) listens, `client` connects, both close the connection; the
/// listener stays.
fn connect(mut server: Endpoint, mut client: Endpoint, ip: &str) -> Connection {
    let port = server.port;
    server.step("listen");
    client.step(&format!("connect {ip}:{port}"));
    server.step("accept");
    client.step("close");
    server.step("close-all");
    client.exit();
    Connection {
        addr: Addr {
            ip: ip.to_owned(),
            port,
        },
        server,
    }
}

/// A connection in each of the four containers (the podman one, the last, in `netns`).
fn connect_in_each(containers: &[Container], netns: &Netns, tag: &str) -> Vec<Connection> {
    containers
        .iter()
        .enumerate()
        .map(|(i, container)| {
            let inside = (i == 3).then_some(netns);
            connect_inside(&container.cgroup, inside, &format!("{tag}{i}"))
        })
        .collect()
}

/// A server and a client in the test's own cgroup.
fn connect_outside(comm: &str) -> Connection {
    connect(
        Endpoint::server("127.0.0.1", &format!("{comm}-s")),
        Endpoint::client(&format!("{comm}-c")),
        "127.0.0.1",
    )
}

/// Whether a state line belongs to the connection to `addr`: either side, or the listener. A
/// port is unique within one network namespace only; the address tells the test's namespace from
/// the host's (both ends of a connection to a local address have that address as their own).
fn belongs(line: &Value, addr: &Addr) -> bool {
    line["type"] == "state"
        && line["saddr"] == addr.ip.as_str()
        && (line["sport"] == addr.port || line["dport"] == addr.port)
}

/// Lines of the connection to `addr`.
fn lines_of<'a>(lines: &'a [Value], addr: &Addr) -> Vec<&'a Value> {
    lines.iter().filter(|l| belongs(l, addr)).collect()
}

/// The inode of a network namespace file.
fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path).expect("netns").ino()
}

/// Every line of the connection to `addr` (which must have the 10 transitions of a connect,
/// accept and close on both sides, and the listener's) says where it lives.
fn assert_lives_in(
    lines: &[Value],
    addr: &Addr,
    cgroup: &str,
    container: Option<&str>,
    pod: Option<&str>,
    netns: Option<u64>,
) {
    let ours = lines_of(lines, addr);
    // CLOSE -> LISTEN; the client's 5 transitions; the accepted socket's 5 (it closes on
    // close-all after the client: LAST_ACK or TIME_WAIT-free ends, at least 4 either way).
    assert!(
        ours.len() >= 10,
        "{addr:?}: {} lines: {ours:#?}",
        ours.len()
    );
    for line in ours {
        assert_eq!(line["cgroup"], cgroup, "{line}");
        assert_eq!(line["container_id"].as_str(), container, "{line}");
        assert_eq!(line["pod_uid"].as_str(), pod, "{line}");
        assert_eq!(line["netns"].as_u64(), netns, "{line}");
        assert!(
            line["cgroup_id"].as_u64().is_some_and(|id| id > 0),
            "{line}"
        );
    }
}

#[test]
fn every_line_names_its_container_pod_cgroup_and_network_namespace() {
    let _serial = serial();
    // Both modes at once, on the same traffic; the cgroups are made after tracing began.
    let btf = Tracer::start(&["--format", "json", "--mode", "btf", "-4"]);
    let tracefs = Tracer::start(&["--format", "json", "--mode", "tracefs", "-4"]);
    let containers = containers();
    let netns = Netns::new(41);
    let connections = connect_in_each(&containers, &netns, "tt-ct");
    let host = connect_outside("tt-host");
    let (addrs, host) = (end_all(connections), host.end());
    let (btf, tracefs) = (btf.stop().json(), tracefs.stop().json());

    let host_netns = netns_inode("/proc/self/ns/net");
    let own_netns = netns_inode(&format!("/run/netns/{}", netns.name));
    assert_ne!(host_netns, own_netns);
    for (i, (container, addr)) in containers.iter().zip(&addrs).enumerate() {
        let netns = if i == 3 { own_netns } else { host_netns };
        let path = &container.cgroup.path;
        assert_lives_in(&btf, addr, path, container.id, container.pod, Some(netns));
        // tracefs mode: the owner's cgroup, and no namespace (its tracepoints carry none).
        assert_lives_in(&tracefs, addr, path, container.id, container.pod, None);
        // The id is the cgroup directory's inode.
        let line = lines_of(&btf, addr)[0];
        assert_eq!(line["cgroup_id"], container.cgroup.id(), "{line}");
    }
    // Outside any container: the cgroup, and no container fields.
    assert_lives_in(&btf, &host, &own_cgroup(), None, None, Some(host_netns));
    assert_lives_in(&tracefs, &host, &own_cgroup(), None, None, None);
}

/// The connections of `addrs` that appear in `lines`.
fn seen(lines: &[Value], addrs: &[Addr]) -> Vec<Addr> {
    addrs
        .iter()
        .filter(|addr| !lines_of(lines, addr).is_empty())
        .cloned()
        .collect()
}

#[test]
fn container_cgroup_and_namespace_filters_keep_exactly_the_matching_sockets() {
    let _serial = serial();
    // The docker container exists before tracing begins (found by a walk of the hierarchy); the
    // others are made after (the kernel side sees their cgroups made).
    let docker = container(0);
    let netns = Netns::new(42);
    let top = top();
    let netns_path = format!("/run/netns/{}", netns.name);
    let kubepods = format!("{top}/kubepods.slice");
    // `--cgroup` names a cgroup that exists; the pods below it come after tracing began.
    let _kubepods = TestCgroup::new(&kubepods);
    let filters: [(&str, Vec<&str>, &[usize]); 6] = [
        // A docker-style short id, in the kernel (BTF mode) and in userspace (tracefs mode).
        ("btf", vec!["--container", &DOCKER_ID[..12]], &[0]),
        ("tracefs", vec!["--container", &DOCKER_ID[..12]], &[0]),
        // A container whose cgroup is made after tracing began; the whole id.
        ("btf", vec!["--container", CONTAINERD_ID], &[1]),
        ("tracefs", vec!["--container", CONTAINERD_ID], &[1]),
        // A cgroup and everything below it: both pods.
        ("btf", vec!["--cgroup", &kubepods], &[1, 2]),
        ("tracefs", vec!["--cgroup", &kubepods], &[1, 2]),
    ];
    let mut tracers: Vec<Tracer> = filters
        .iter()
        .map(|(mode, args, _)| {
            let mut all = vec!["--format", "json", "-4", "--mode", mode];
            all.extend(args.iter().copied());
            Tracer::start(&all)
        })
        .collect();
    tracers.push(Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--netns",
        &netns_path,
    ]));
    let mut containers = vec![docker];
    containers.extend((1..4).map(container));

    let mut connections = connect_in_each(&containers, &netns, "tt-f");
    connections.push(connect_outside("tt-fhost"));
    let all = end_all(connections);

    let mut outputs: Vec<Vec<Value>> = tracers.into_iter().map(|t| t.stop().json()).collect();
    let netns_only = outputs.pop().expect("netns tracer");
    for ((mode, args, kept), lines) in filters.iter().zip(&outputs) {
        let expected: Vec<Addr> = kept.iter().map(|&i| all[i].clone()).collect();
        assert_eq!(
            seen(lines, &all),
            expected,
            "{mode} {args:?}: kept the wrong connections"
        );
        // Nothing else at all, and every line of what is kept: the listener and both sides.
        for line in lines.iter().filter(|l| l["type"] == "state") {
            assert!(
                expected.iter().any(|addr| belongs(line, addr)),
                "{mode} {args:?}: {line}"
            );
        }
        for addr in &expected {
            let ours = lines_of(lines, addr);
            assert!(
                ours.iter().any(|l| l["newstate"] == "LISTEN"),
                "{mode} {args:?}"
            );
            assert!(
                ours.iter().any(|l| l["newstate"] == "SYN_SENT"),
                "{mode} {args:?}"
            );
            assert!(
                ours.iter().any(|l| l["newstate"] == "SYN_RECV"),
                "{mode} {args:?}"
            );
        }
    }
    // The namespace: only the podman container's connection, which lives there.
    assert_eq!(seen(&netns_only, &all), [all[3].clone()]);
    let inode = netns_inode(&netns_path);
    assert!(
        netns_only
            .iter()
            .filter(|l| l["type"] == "state")
            .all(|l| l["netns"] == inode),
        "{netns_only:#?}"
    );
}

#[test]
fn namespace_filter_needs_btf_mode_and_bad_values_are_refused() {
    let _serial = serial();
    for (args, message) in [
        (
            vec!["--mode", "tracefs", "--netns", "/proc/self/ns/net"],
            "--netns needs BTF mode",
        ),
        (vec!["--netns", "/etc/hostname/x"], "--netns"),
        (vec!["--netns", "lo"], "--netns"),
        (vec!["--container", "docker-abc"], "--container"),
        (vec!["--cgroup", "/no/such/cgroup/tcptrace"], "--cgroup"),
        (vec!["--cgroup-root", "/tmp"], "--cgroup-root"),
    ] {
        let out = std::process::Command::new(support::TCPTRACE)
            .args(&args)
            .output()
            .expect("run tcptrace");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        if !args.contains(&"tracefs") {
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn a_cgroup_removed_while_its_sockets_live_keeps_its_id_and_output_goes_on() {
    let _serial = serial();
    let tracer = Tracer::start(&["--format", "json", "-4", "--mode", "btf"]);
    let gone = TestCgroup::new(&format!("{}/short-lived", top()));
    let gone_id = gone.id();
    // The socket is made in the cgroup (bound, no transition yet); then its process leaves and
    // the cgroup is removed before tcptrace ever saw an event of it.
    let mut server = Endpoint::server_in_cgroup(&gone, None, "127.0.0.1", "tt-gone-s");
    let port = server.port;
    gone.evacuate();
    drop(gone);
    let mut client = Endpoint::client("tt-gone-c");
    server.step("listen");
    client.step(&format!("connect 127.0.0.1:{port}"));
    server.step("accept");
    client.step("close");
    server.step("close-all");
    let after = connect_outside("tt-after").end();
    let lines = tracer.stop().json();

    let gone_addr = Addr {
        ip: "127.0.0.1".to_owned(),
        port,
    };
    let listener: Vec<&Value> = lines_of(&lines, &gone_addr)
        .into_iter()
        .filter(|l| l["sport"] == port)
        .collect();
    assert!(!listener.is_empty(), "{lines:#?}");
    for line in listener {
        // The socket's own cgroup: its id stays, its path is gone with it.
        assert_eq!(line["cgroup_id"], gone_id, "{line}");
        assert!(line.get("cgroup").is_none(), "{line}");
        assert!(line.get("container_id").is_none(), "{line}");
    }
    assert_lives_in(
        &lines,
        &after,
        &own_cgroup(),
        None,
        None,
        Some(netns_inode("/proc/self/ns/net")),
    );
}
