//! The process each line names holds the connection, as `ss -tnp` lists it at the same moment:
//! real servers from Debian's packages whose holders change (nginx workers accepting from a
//! shared listener or each from its own, PostgreSQL's postmaster handing each connection to a
//! backend, sshd's listener handing it to a forked and re-executed child), started before
//! tcptrace and after it; and `--pid` keeping exactly one backend's connection. BTF mode, root.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Tracer, serial,
    servers::{Held, HolderSamples, Nginx, Postgres, Sshd},
};

/// How long a test waits for the lines that end connections (a move to TIME_WAIT comes with the
/// timewait scan).
const ENDS_WAIT: Duration = Duration::from_secs(45);

fn tracer(port: u16) -> Tracer {
    Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--mode",
        "btf",
        "--port",
        &port.to_string(),
    ])
}

/// Waits until `count` connections of `port` have ended on the server's side.
fn wait_for_ends(tracer: &Tracer, port: u16, count: usize) {
    tracer.wait_for(ENDS_WAIT, &format!("{count} server-side ends"), |lines| {
        lines
            .iter()
            .filter(|l| {
                l.contains(&format!("\"sport\":{port},"))
                    && (l.contains("\"newstate\":\"CLOSE\"")
                        || l.contains("\"newstate\":\"TIME_WAIT\""))
            })
            .count()
            >= count
    });
}

/// Every line that leaves ESTABLISHED or CLOSE_WAIT, on a socket `ss` saw held (the same
/// cookie), names a process `ss` listed as holding it. `hands_over` is the server's process that accepts each
/// connection and closes its copy once it has forked the connection's holder (PostgreSQL's
/// postmaster, sshd's listener): a sample taken in that moment lists it, alone or beside the
/// child, but by the time the connection ends it holds nothing, so it is not counted as a holder
/// (the callers assert that no line names it), and a connection only ever sampled in that moment
/// is not checked. Returns how many lines of the server's side (local port `port`) and of the
/// clients' side were checked.
fn check_holders(
    lines: &[Value],
    port: u16,
    held: &Held,
    hands_over: Option<u64>,
) -> (usize, usize) {
    let (mut server, mut client) = (0, 0);
    for line in lines.iter().filter(|l| {
        l["type"] == "state" && (l["oldstate"] == "ESTABLISHED" || l["oldstate"] == "CLOSE_WAIT")
    }) {
        let local = line["sport"].as_u64().unwrap() as u16;
        let remote = line["dport"].as_u64().unwrap() as u16;
        let Some(sampled) = line["cookie"].as_u64().and_then(|cookie| held.get(&cookie)) else {
            continue;
        };
        let holders: std::collections::BTreeSet<u64> = sampled
            .iter()
            .copied()
            .filter(|&pid| Some(pid) != hands_over)
            .collect();
        if holders.is_empty() {
            continue;
        }
        let pid = line["pid"].as_u64().unwrap();
        assert!(
            holders.contains(&pid),
            "{line} names {pid}; ss listed {holders:?} holding {local} -> {remote}"
        );
        if local == port {
            server += 1;
        } else {
            client += 1;
        }
    }
    (server, client)
}

/// The server side's connections (local port `port`) that ended having received nothing: the
/// server never read from them before the peer's FIN, so their `ESTABLISHED -> CLOSE_WAIT` line
/// names the listener's holder (documented), whoever accepted them.
fn never_read(lines: &[Value], port: u16) -> Vec<u64> {
    lines
        .iter()
        .filter(|l| {
            l["type"] == "state"
                && l["newstate"] == "CLOSE"
                && l["sport"] == port
                && l["bytes_received"] == 0
        })
        .map(|l| l["cookie"].as_u64().expect("a CLOSE line's cookie"))
        .collect()
}

/// nginx with two workers, its listener shared or one per worker (`reuseport`), under keep-alive
/// load and under a connection per request. A connection `ab` opened but closed without sending
/// a request (it opens spares) names the listener's holder, the master, on the line its FIN
/// causes: no worker has read from it yet; those are left out of the check, and there are few.
fn nginx_workers_hold_what_they_accepted(reuseport: bool, before: bool) {
    let _serial = serial();
    let port = support::free_port();
    let (nginx, tracer) = if before {
        let nginx = Nginx::start(port, reuseport);
        (nginx, tracer(port))
    } else {
        let tracer = tracer(port);
        (Nginx::start(port, reuseport), tracer)
    };
    let sampling = HolderSamples::start(port);
    // Keep-alive runs long enough (about a second each) that the sampler, one `ss -p` walk at a
    // time, sees each of their connections: a run of 4,000 requests could end between two walks
    // on a busy host, leaving too few connections sampled to check.
    nginx.load_with(20_000, true);
    nginx.load_with(400, false);
    nginx.load_with(20_000, true);
    wait_for_ends(&tracer, port, 8);
    let mut held = sampling.finish();
    let lines = tracer.stop().json();
    let unread = never_read(&lines, port);
    // ab keeps at most its concurrency (4) of them open per run, three runs.
    assert!(
        unread.len() <= 12,
        "{} connections never read: {unread:?}",
        unread.len()
    );
    for connection in &unread {
        held.remove(connection);
    }
    let (server, client) = check_holders(&lines, port, &held, None);
    assert!(
        server >= 8 && client >= 8,
        "{server} server-side and {client} client-side lines checked"
    );
}

#[test]
fn nginx_workers_on_a_shared_listener_started_before_tracing() {
    nginx_workers_hold_what_they_accepted(false, true);
}

#[test]
fn nginx_workers_on_a_shared_listener_started_after_tracing() {
    nginx_workers_hold_what_they_accepted(false, false);
}

#[test]
fn nginx_workers_with_reuseport_started_before_tracing() {
    nginx_workers_hold_what_they_accepted(true, true);
}

#[test]
fn nginx_workers_with_reuseport_started_after_tracing() {
    nginx_workers_hold_what_they_accepted(true, false);
}

/// PostgreSQL under `pgbench -C`: each connection is accepted by the postmaster and held by the
/// backend it forks; no line of a connection names the postmaster.
fn postgres_backends_hold_their_connections(before: bool) {
    let _serial = serial();
    let port = support::free_port();
    let (postgres, tracer) = if before {
        let postgres = Postgres::start(port);
        (postgres, tracer(port))
    } else {
        let tracer = tracer(port);
        (Postgres::start(port), tracer)
    };
    let sampling = HolderSamples::start(port);
    let pgbench = u64::from(postgres.pgbench(4, 15, 40));
    wait_for_ends(&tracer, port, 60);
    let held = sampling.finish();
    let lines = tracer.stop().json();
    let postmaster = u64::from(postgres.postmaster());
    let (server, client) = check_holders(&lines, port, &held, Some(postmaster));
    assert!(
        server >= 20 && client >= 20,
        "{server} server-side and {client} client-side lines checked"
    );
    for line in lines
        .iter()
        .filter(|l| l["type"] == "state" && l["dport"] != 0)
        .filter(|l| l["oldstate"] == "ESTABLISHED" || l["oldstate"] == "CLOSE_WAIT")
    {
        let pid = line["pid"].as_u64().unwrap();
        if line["sport"] == port {
            assert_ne!(pid, postmaster, "{line}");
            assert_eq!(line["comm"], "postgres", "{line}");
        } else {
            assert_eq!(pid, pgbench, "{line}");
        }
    }
}

#[test]
fn postgres_backends_started_before_tracing() {
    postgres_backends_hold_their_connections(true);
}

#[test]
fn postgres_backends_started_after_tracing() {
    postgres_backends_hold_their_connections(false);
}

/// `--pid BACKEND`: exactly that backend's connection, and nothing of the other backends'.
#[test]
fn pid_filter_keeps_exactly_one_backend_s_connection() {
    let _serial = serial();
    let port = support::free_port();
    let postgres = Postgres::start(port);
    let mut psql = postgres.psql();
    // Its backend, as ss lists the server's side of the session.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (backend, client_port) = loop {
        let out = std::process::Command::new("ss")
            .args(["-Htnp", "state", "established", &format!("sport = :{port}")])
            .output()
            .expect("ss");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let found = text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let peer = fields.get(3)?.rsplit_once(':')?.1.parse::<u16>().ok()?;
            let pid = fields
                .get(4)?
                .split("pid=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()?;
            Some((pid, peer))
        });
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no psql session in ss: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let tracer = Tracer::start(&[
        "--format",
        "json",
        "-4",
        "--mode",
        "btf",
        "--port",
        &port.to_string(),
        "--pid",
        &backend.to_string(),
    ]);
    postgres.pgbench(2, 10, 10);
    drop(psql.stdin.take());
    psql.wait().expect("psql");
    wait_for_ends(&tracer, port, 1);
    let lines = tracer.stop().json();
    let states: Vec<&Value> = lines.iter().filter(|l| l["type"] == "state").collect();
    assert!(states.len() >= 2, "{lines:?}");
    for line in &states {
        assert_eq!(line["pid"].as_u64(), Some(backend), "{line}");
        assert_eq!(line["sport"], port, "{line}");
        assert_eq!(line["dport"], client_port, "{line}");
    }
}

/// sshd: the listener accepts and forks a child that re-executes sshd and forks its privilege
/// separated child; clients without keys are refused. No line of a connection names the
/// listener.
fn sshd_children_hold_their_connections(before: bool) {
    let _serial = serial();
    let port = support::free_port();
    let (sshd, tracer) = if before {
        let sshd = Sshd::start(port);
        (sshd, tracer(port))
    } else {
        let tracer = tracer(port);
        (Sshd::start(port), tracer)
    };
    let sampling = HolderSamples::start(port);
    let clients = sshd.refused_clients(12, 3);
    wait_for_ends(&tracer, port, 12);
    let held = sampling.finish();
    let lines = tracer.stop().json();
    let listener = u64::from(sshd.listener());
    let (server, client) = check_holders(&lines, port, &held, Some(listener));
    assert!(
        server >= 6 && client >= 6,
        "{server} server-side and {client} client-side lines checked"
    );
    for line in lines
        .iter()
        .filter(|l| l["type"] == "state" && l["dport"] != 0)
        .filter(|l| l["oldstate"] == "ESTABLISHED" || l["oldstate"] == "CLOSE_WAIT")
    {
        let pid = line["pid"].as_u64().unwrap();
        if line["sport"] == port {
            assert_ne!(pid, listener, "{line}");
            assert_eq!(line["comm"], "sshd", "{line}");
        } else {
            assert!(clients.iter().any(|&c| u64::from(c) == pid), "{line}");
        }
    }
}

#[test]
fn sshd_children_started_before_tracing() {
    sshd_children_hold_their_connections(true);
}

#[test]
fn sshd_children_started_after_tracing() {
    sshd_children_hold_their_connections(false);
}
