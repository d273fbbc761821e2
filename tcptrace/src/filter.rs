//! The in-kernel filters, built from the command line: which bits to set in the program's
//! configuration and what goes into its pid, port, cgroup and namespace maps.

use std::collections::BTreeMap;

use tcptrace_common::{
    FILTER_CGROUP, FILTER_CONTAINER, FILTER_ENDS, FILTER_FAILURES, FILTER_IPV4, FILTER_IPV6,
    FILTER_NETNS, FILTER_PID, FILTER_PORT, PORT_LOCAL, PORT_REMOTE, TRACE_CONGESTION,
    TRACE_LISTEN_DROPS, TRACE_RETRANSMITS, TRACE_STATES,
};

use crate::cli::{Cli, EventKind};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filters {
    /// `FILTER_*` and `TRACE_*` bits for the program's configuration.
    pub bits: u32,
    /// Owner pids to keep.
    pub pids: Vec<u32>,
    /// Ports to keep, with the sides (`PORT_LOCAL`, `PORT_REMOTE`) each may match.
    pub ports: BTreeMap<u16, u8>,
    /// Cgroup ids to keep, with their descendants.
    pub cgroups: Vec<u64>,
    /// Network namespaces (inode numbers) to keep.
    pub netns: Vec<u32>,
    /// Container id prefix to keep (lowercase hex).
    pub container: Option<String>,
}

impl Filters {
    pub fn from_cli(cli: &Cli) -> Self {
        let mut ports = BTreeMap::new();
        for (list, sides) in [
            (&cli.ports, PORT_LOCAL | PORT_REMOTE),
            (&cli.local_ports, PORT_LOCAL),
            (&cli.remote_ports, PORT_REMOTE),
        ] {
            for &port in list {
                *ports.entry(port).or_insert(0) |= sides;
            }
        }
        let mut pids = cli.pids.clone();
        pids.sort_unstable();
        pids.dedup();
        let mut cgroups = cli.cgroup_ids.clone();
        cgroups.sort_unstable();
        cgroups.dedup();
        let mut netns = cli.netns.clone();
        netns.sort_unstable();
        netns.dedup();
        let bits = [
            (!pids.is_empty(), FILTER_PID),
            (!ports.is_empty(), FILTER_PORT),
            (!cli.cgroups.is_empty(), FILTER_CGROUP),
            (!netns.is_empty(), FILTER_NETNS),
            (cli.container.is_some(), FILTER_CONTAINER),
            (cli.ipv4, FILTER_IPV4),
            (cli.ipv6, FILTER_IPV6),
            (
                cli.traces(EventKind::States) || cli.ends_only(),
                TRACE_STATES,
            ),
            (
                cli.traces(EventKind::Retransmits) && !cli.ends_only(),
                TRACE_RETRANSMITS,
            ),
            // Counted in the metrics whether or not `--events` asks for their lines.
            (
                cli.traces(EventKind::Congestion) || cli.metrics_addr.is_some(),
                TRACE_CONGESTION,
            ),
            (
                (cli.traces(EventKind::ListenDrops) && !cli.ends_only())
                    || cli.metrics_addr.is_some(),
                TRACE_LISTEN_DROPS,
            ),
            (cli.ends_only(), FILTER_ENDS),
            (cli.failures, FILTER_FAILURES),
        ]
        .into_iter()
        .filter_map(|(on, bit)| on.then_some(bit))
        .fold(0, |acc, bit| acc | bit);
        Self {
            bits,
            pids,
            ports,
            cgroups,
            netns,
            container: cli.container.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn filters(args: &[&str]) -> Filters {
        Filters::from_cli(
            &Cli::try_parse_from(std::iter::once("tcptrace").chain(args.iter().copied())).unwrap(),
        )
    }

    #[test]
    fn no_flags_trace_everything() {
        assert_eq!(
            filters(&[]),
            Filters {
                bits: TRACE_STATES | TRACE_RETRANSMITS | TRACE_LISTEN_DROPS,
                ..Filters::default()
            }
        );
    }

    #[test]
    fn port_sides_merge() {
        let f = filters(&[
            "-P",
            "80",
            "-L",
            "22,80",
            "-D",
            "53",
            "-4",
            "--events",
            "retransmits",
        ]);
        assert_eq!(
            f.ports,
            BTreeMap::from([
                (22, PORT_LOCAL),
                (53, PORT_REMOTE),
                (80, PORT_LOCAL | PORT_REMOTE)
            ])
        );
        assert_eq!(f.bits, FILTER_PORT | FILTER_IPV4 | TRACE_RETRANSMITS);
    }

    #[test]
    fn namespaces_and_containers() {
        let f = filters(&[
            "--netns",
            "4026531840,4026531840",
            "--container",
            "ABCDEF012345",
        ]);
        assert_eq!(f.netns, [4_026_531_840]);
        assert_eq!(f.container.as_deref(), Some("abcdef012345"));
        assert_eq!(
            f.bits,
            FILTER_NETNS | FILTER_CONTAINER | TRACE_STATES | TRACE_RETRANSMITS | TRACE_LISTEN_DROPS
        );
    }

    #[test]
    fn pids_dedup() {
        let f = filters(&["-p", "9,3,9", "-6", "--events", "states"]);
        assert_eq!(f.pids, [3, 9]);
        assert_eq!(f.bits, FILTER_PID | FILTER_IPV6 | TRACE_STATES);
    }
}
