//! Connections listeners' full accept queues dropped (BTF mode, Linux 6.15+): the kernel side
//! counts them per listener; once a second each listener whose count grew gets one line with
//! the drops since its last line, however many packets a flood dropped.
//!
//! A SYN that arrives at a full accept queue is freed without a drop reason: no listener can be
//! named for it. The kernel's own counters (`ListenOverflows`, `ListenDrops` in
//! /proc/net/netstat) count those too; the exit summary states both.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use tcptrace_common::{AF_INET6, ListenDrops};

use crate::{
    event::{Kind, TcpEvent},
    kernel::ListenDropTable,
};

/// How often the table is read: at most one line per listener per interval.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What one listen drop line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenDrop {
    /// Handshakes whose last ACK the full queue dropped, since the listener's last line.
    pub overflow: u64,
    /// SYN-cookie ACKs the full queue dropped, since the listener's last line.
    pub no_socket: u64,
    /// Every drop counted at this listener since tracing began.
    pub total: u64,
    /// Connections waiting in the accept queue at the latest drop.
    pub ack_backlog: u32,
    /// The accept queue's limit.
    pub max_ack_backlog: u32,
}

impl ListenDrop {
    /// The drops this line reports.
    pub fn drops(&self) -> u64 {
        self.overflow + self.no_socket
    }
}

/// Reads the table and turns growth into lines.
pub struct ListenDropLines {
    table: ListenDropTable,
    /// Per listener cookie: the counts its last line reported. Rebuilt from the table at each
    /// read, so a listener the table forgot is forgotten here too.
    reported: HashMap<u64, (u64, u64)>,
    entries: Vec<(u64, ListenDrops)>,
}

impl ListenDropLines {
    pub fn new(table: ListenDropTable) -> Self {
        Self {
            table,
            reported: HashMap::new(),
            entries: Vec::new(),
        }
    }

    /// One line per listener whose drops grew since the last call, into `out`.
    pub fn read(&mut self, out: &mut Vec<TcpEvent>) -> anyhow::Result<()> {
        self.table.read(&mut self.entries)?;
        let mut reported = HashMap::with_capacity(self.entries.len());
        for (cookie, entry) in &self.entries {
            let now = (entry.overflow, entry.no_socket);
            // A listener the table forgot and saw again starts from zero.
            let before = self
                .reported
                .get(cookie)
                .copied()
                .filter(|&(o, n)| o <= now.0 && n <= now.1)
                .unwrap_or((0, 0));
            reported.insert(*cookie, now);
            if now == before {
                continue;
            }
            out.push(line(
                *cookie,
                entry,
                ListenDrop {
                    overflow: now.0 - before.0,
                    no_socket: now.1 - before.1,
                    total: now.0 + now.1,
                    ack_backlog: entry.ack_backlog,
                    max_ack_backlog: entry.max_ack_backlog,
                },
            ));
        }
        self.reported = reported;
        Ok(())
    }
}

/// The line of one listener.
fn line(cookie: u64, entry: &ListenDrops, drop: ListenDrop) -> TcpEvent {
    let (saddr, daddr) = if entry.family == AF_INET6 {
        (
            IpAddr::from(entry.saddr.0),
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        )
    } else {
        let [a, b, c, d, ..] = entry.saddr.0;
        (
            IpAddr::from([a, b, c, d]),
            IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
        )
    };
    TcpEvent {
        ts_ns: entry.last_ns,
        skaddr: entry.skaddr,
        pid: entry.pid,
        comm: entry.comm.0,
        saddr,
        sport: entry.sport,
        daddr,
        dport: 0,
        kind: Kind::ListenDrop(drop),
        retransmits: 0,
        cgroup_id: entry.cgroup_id,
        netns: entry.netns,
        comm_of_thread: false,
        thread: None,
        cookie,
        end: None,
        retransmit: None,
    }
}

/// The kernel's own listen queue counters for the network namespace tcptrace runs in
/// (`TcpExt: ListenOverflows ListenDrops` of /proc/net/netstat).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// Connections (SYNs and handshakes' last ACKs) dropped because an accept queue was full.
    pub overflows: u64,
    /// Every connection a listener dropped (overflows, and others: no memory, a SYN queue full).
    pub drops: u64,
}

impl HostCounters {
    /// None when the file cannot be read or has no such counters.
    pub fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/net/netstat").ok()?)
    }

    fn parse(netstat: &str) -> Option<Self> {
        // Pairs of lines: `TcpExt: Name Name ...` then `TcpExt: 1 2 ...`.
        let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
        let names = lines.next()?.split_whitespace().skip(1);
        let values = lines.next()?.split_whitespace().skip(1);
        let mut counters = (None, None);
        for (name, value) in names.zip(values) {
            match name {
                "ListenOverflows" => counters.0 = value.parse().ok(),
                "ListenDrops" => counters.1 = value.parse().ok(),
                _ => {}
            }
        }
        Some(Self {
            overflows: counters.0?,
            drops: counters.1?,
        })
    }

    /// What the counters grew by since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            overflows: self.overflows.saturating_sub(earlier.overflows),
            drops: self.drops.saturating_sub(earlier.drops),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_counters_come_from_the_tcpext_lines() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\n\
                       TcpExt: 4 17 19 100\n\
                       IpExt: InNoRoutes\n\
                       IpExt: 0\n";
        assert_eq!(
            HostCounters::parse(netstat),
            Some(HostCounters {
                overflows: 17,
                drops: 19
            })
        );
        assert_eq!(HostCounters::parse("IpExt: A\nIpExt: 1\n"), None);
    }
}
