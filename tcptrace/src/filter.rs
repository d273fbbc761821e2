//! The in-kernel filters, built from the command line: which bits to set in the program's
//! configuration and what goes into its pid and port maps.

use std::collections::BTreeMap;

use tcptrace_common::{
    FILTER_IPV4, FILTER_IPV6, FILTER_PID, FILTER_PORT, PORT_LOCAL, PORT_REMOTE, TRACE_RETRANSMITS,
    TRACE_STATES,
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
        let bits = [
            (!pids.is_empty(), FILTER_PID),
            (!ports.is_empty(), FILTER_PORT),
            (cli.ipv4, FILTER_IPV4),
            (cli.ipv6, FILTER_IPV6),
            (cli.traces(EventKind::States), TRACE_STATES),
            (cli.traces(EventKind::Retransmits), TRACE_RETRANSMITS),
        ]
        .into_iter()
        .filter_map(|(on, bit)| on.then_some(bit))
        .fold(0, |acc, bit| acc | bit);
        Self { bits, pids, ports }
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
                bits: TRACE_STATES | TRACE_RETRANSMITS,
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
    fn pids_dedup() {
        let f = filters(&["-p", "9,3,9", "-6", "--events", "states"]);
        assert_eq!(f.pids, [3, 9]);
        assert_eq!(f.bits, FILTER_PID | FILTER_IPV6 | TRACE_STATES);
    }
}
