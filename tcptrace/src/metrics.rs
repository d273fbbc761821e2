//! Prometheus metrics: what passed the filters, counted whatever the output format, encoded in the
//! text format by prometheus-client and served by [`crate::metrics_endpoint`]. No label carries an address, a port or a
//! pid, so the number of series stays bounded on any host; the opt-in `container` label is
//! bounded by the containers the host runs.

use std::{fmt::Write as _, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    cgroup::Cgroup,
    congestion::CaState,
    ending::Reason,
    event::{Kind, TcpEvent, TcpState},
    kernel::Counters,
    retransmit::RetransmitKind,
};

/// Why a segment went out again, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct KindName(pub RetransmitKind);

impl EncodeLabelValue for KindName {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.name())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: KindName,
}

/// Why a connection ended, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ReasonName(pub Reason);

impl EncodeLabelValue for ReasonName {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.name())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: ReasonName,
}

/// A TCP state as a label value: the kernel's name, or `STATE_n`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct StateName(pub TcpState);

impl EncodeLabelValue for StateName {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}", self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: StateName,
    to: StateName,
}

/// A congestion state as a label value: `open`, `recovery`, ..., or `ca_n`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct CaStateName(pub CaState);

impl EncodeLabelValue for CaStateName {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}", self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CongestionLabels {
    from: CaStateName,
    to: CaStateName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenDropLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: StateName,
}

/// The `container` label: absent unless `--metrics-container-label`, then the short container
/// id, or empty outside containers.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct ContainerLabel(Option<Box<str>>);

impl EncodeLabelSet for ContainerLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(id) => [("container", &**id)].encode(encoder),
            None => Ok(()),
        }
    }
}

pub struct Metrics {
    registry: Registry,
    transitions: Family<(TransitionLabels, ContainerLabel), Counter>,
    retransmits: Family<(StateLabels, ContainerLabel), Counter>,
    retransmit_failures: Family<(StateLabels, ContainerLabel), Counter>,
    retransmit_kinds: Family<(KindLabels, ContainerLabel), Counter>,
    congestion: Family<(CongestionLabels, ContainerLabel), Counter>,
    listen_drops: Family<ListenDropLabels, Counter>,
    durations: Family<(StateLabels, ContainerLabel), Histogram>,
    closed: Family<(ReasonLabels, ContainerLabel), Counter>,
    time_wait: Gauge,
    time_wait_durations: Histogram,
    timewait_untracked: Counter,
    lost: Counter,
    state_repeats: Counter,
    container_label: bool,
}

impl Metrics {
    /// `container_label`: label the event metrics with the container.
    pub fn new(container_label: bool) -> Self {
        let mut registry = Registry::with_prefix("tcptrace");
        let transitions = Family::default();
        registry.register(
            "state_transitions",
            "TCP state transitions, by the state left and the state entered",
            transitions.clone(),
        );
        let retransmits = Family::default();
        registry.register(
            "retransmits",
            "Retransmitted segments, SYNs and SYN-ACKs, by the socket's state",
            retransmits.clone(),
        );
        let retransmit_failures = Family::default();
        registry.register(
            "retransmit_failures",
            "Retransmit attempts the kernel reports as failed (err not 0: nothing went out), by the socket's state",
            retransmit_failures.clone(),
        );
        let retransmit_kinds = Family::default();
        registry.register(
            "retransmit_kinds",
            "Retransmits that went out, by why (BTF mode): rto, tlp, fast, loss, syn, synack, other",
            retransmit_kinds.clone(),
        );
        let congestion = Family::default();
        registry.register(
            "congestion_changes",
            "Congestion state changes (BTF mode, Linux 6.3+), by the state left and entered: open, disorder, cwr, recovery, loss",
            congestion.clone(),
        );
        let listen_drops = Family::default();
        registry.register(
            "listen_drops",
            "Connections listeners' full accept queues dropped (BTF mode, Linux 6.15+), by reason: listen_overflow (a handshake's last ACK), no_socket (a SYN-cookie ACK). SYNs dropped at a full queue are not among them: see the kernel's ListenOverflows",
            listen_drops.clone(),
        );
        // 10 us to about 42 s: connect latency on a LAN through slow closers.
        let durations = Family::<_, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1e-5, 4.0, 12))
        });
        registry.register(
            "state_duration_seconds",
            "Time sockets spent in a state before leaving it (SYN_SENT: connect latency)",
            durations.clone(),
        );
        let closed = Family::default();
        registry.register(
            "connections_closed",
            "Connections that ended, by why (BTF mode): fin, reset_sent, reset_received, refused, timeout, unreachable, error, aborted",
            closed.clone(),
        );
        let time_wait = Gauge::default();
        registry.register(
            "time_wait_sockets",
            "Traced connections in TIME_WAIT now (BTF mode; what `ss -tan state time-wait` counts of them)",
            time_wait.clone(),
        );
        // 1 s to about 17 min: 60 s is the kernel's TIME_WAIT, less when ended early.
        let time_wait_durations = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "time_wait_duration_seconds",
            "Time connections spent in TIME_WAIT (BTF mode; to the timewait scan's resolution)",
            time_wait_durations.clone(),
        );
        let timewait_untracked = Counter::default();
        registry.register(
            "timewait_untracked",
            "Connections handed to a timewait socket while --max-timewait were followed: written as CLOSE at once",
            timewait_untracked.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "events_lost",
            "Events lost: the ring buffer was full, or the kernel skipped the program",
            lost.clone(),
        );
        let state_repeats = Counter::default();
        registry.register(
            "state_repeats",
            "Transitions into the state a socket was already in (close() after shutdown() while the FIN waits: FIN_WAIT1, LAST_ACK): counted, not printed",
            state_repeats.clone(),
        );
        Self {
            registry,
            transitions,
            retransmits,
            retransmit_failures,
            retransmit_kinds,
            congestion,
            listen_drops,
            durations,
            closed,
            time_wait,
            time_wait_durations,
            timewait_untracked,
            lost,
            state_repeats,
            container_label,
        }
    }

    /// Counts one event of a socket in `cgroup`. Families are looked up per event; their series
    /// are few.
    pub fn record(&self, event: &TcpEvent, cgroup: Option<&Cgroup>) {
        let container = ContainerLabel(self.container_label.then(|| {
            cgroup
                .and_then(|c| c.container_id.as_deref())
                .map_or("", |id| &id[..12])
                .into()
        }));
        match event.kind {
            Kind::State {
                old,
                new,
                duration_ns,
            } => {
                let labels = TransitionLabels {
                    from: StateName(old),
                    to: StateName(new),
                };
                self.transitions
                    .get_or_create(&(labels, container.clone()))
                    .inc();
                if let Some(ns) = duration_ns {
                    let labels = StateLabels {
                        state: StateName(old),
                    };
                    self.durations
                        .get_or_create(&(labels, container.clone()))
                        .observe(Duration::from_nanos(ns).as_secs_f64());
                    if old == TcpState::TimeWait {
                        self.time_wait_durations
                            .observe(Duration::from_nanos(ns).as_secs_f64());
                    }
                }
                if let (TcpState::Close, Some(end)) = (new, &event.end) {
                    let labels = ReasonLabels {
                        reason: ReasonName(end.reason),
                    };
                    self.closed
                        .get_or_create(&(labels, container.clone()))
                        .inc();
                }
            }
            Kind::Handoff { .. } => {}
            Kind::Retransmit { state, err } => {
                let state = StateName(state.unwrap_or(TcpState::Unknown(0)));
                // An attempt the kernel reports as failed (`err` not 0) sent nothing.
                let family = match err {
                    Some(err) if err != 0 => &self.retransmit_failures,
                    _ => &self.retransmits,
                };
                family
                    .get_or_create(&(StateLabels { state }, container.clone()))
                    .inc();
                if err.is_none_or(|err| err == 0) {
                    self.retransmit_kind(event, container);
                }
            }
            // Counted from the kernel side's counters, every drop (`update`).
            Kind::Snapshot { .. } | Kind::ListenDrop(_) => {}
            Kind::Congestion(change) => {
                let labels = CongestionLabels {
                    from: CaStateName(change.from),
                    to: CaStateName(change.to),
                };
                self.congestion.get_or_create(&(labels, container)).inc();
            }
            Kind::RetransmitSynack => {
                self.retransmits
                    .get_or_create(&(
                        StateLabels {
                            state: StateName(TcpState::SynRecv),
                        },
                        container.clone(),
                    ))
                    .inc();
                self.retransmit_kind(event, container);
            }
        }
    }

    /// Counts a retransmit that went out by its kind, when the kernel side told it.
    fn retransmit_kind(&self, event: &TcpEvent, container: ContainerLabel) {
        if let Some(detail) = &event.retransmit {
            self.retransmit_kinds
                .get_or_create(&(
                    KindLabels {
                        kind: KindName(detail.kind),
                    },
                    container,
                ))
                .inc();
        }
    }

    /// The timewait tracker's state: connections in TIME_WAIT, and hand-overs it could not follow
    /// (a running total).
    pub fn timewait(&self, in_time_wait: usize, untracked: u64) {
        self.time_wait
            .set(i64::try_from(in_time_wait).unwrap_or(i64::MAX));
        self.timewait_untracked
            .inc_by(untracked.saturating_sub(self.timewait_untracked.get()));
    }

    /// Takes the kernel side's counters.
    pub fn update(&self, counters: &Counters) {
        let Counters {
            lost,
            state_repeats,
            listen_overflow,
            listen_no_socket,
        } = *counters;
        self.lost.inc_by(lost.saturating_sub(self.lost.get()));
        for (reason, total) in [
            ("listen_overflow", listen_overflow),
            ("no_socket", listen_no_socket),
        ] {
            // A series appears with the first drop.
            if total > 0 {
                let counter = self
                    .listen_drops
                    .get_or_create(&ListenDropLabels { reason });
                counter.inc_by(total.saturating_sub(counter.get()));
            }
        }
        self.state_repeats
            .inc_by(state_repeats.saturating_sub(self.state_repeats.get()));
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

#[cfg(test)]
mod tests {
    use tcptrace_common::{KIND_RETRANSMIT, tcp_state};

    use super::*;
    use crate::event::{
        decode,
        tests::{bytes, raw_state},
    };

    #[test]
    fn counts_transitions_durations_and_retransmits_without_addresses() {
        let metrics = Metrics::new(false);
        for _ in 0..3 {
            metrics.record(
                &decode(&bytes(&raw_state(
                    tcp_state::SYN_SENT,
                    tcp_state::ESTABLISHED,
                )))
                .unwrap(),
                None,
            );
        }
        let mut raw = raw_state(tcp_state::ESTABLISHED, 0);
        raw.kind = KIND_RETRANSMIT;
        raw.flags = tcptrace_common::EVENT_HAS_STATE;
        metrics.record(&decode(&bytes(&raw)).unwrap(), None);
        // Two tail loss probes, with their kind.
        raw.flags |= tcptrace_common::EVENT_HAS_RETRANSMIT_DETAIL;
        raw.end = tcptrace_common::RetransmitDetail {
            kind: tcptrace_common::retransmit_kind::TLP,
            ..tcptrace_common::RetransmitDetail::ZERO
        }
        .into_end();
        metrics.record(&decode(&bytes(&raw)).unwrap(), None);
        metrics.record(&decode(&bytes(&raw)).unwrap(), None);
        // Two attempts that failed (`err` -1, EPERM): not retransmits, failures.
        raw.flags |= tcptrace_common::EVENT_HAS_ERR;
        raw.err = -1;
        metrics.record(&decode(&bytes(&raw)).unwrap(), None);
        metrics.record(&decode(&bytes(&raw)).unwrap(), None);
        // A congestion state change, open to loss.
        let mut raw = raw_state(tcp_state::ESTABLISHED, 0);
        raw.kind = tcptrace_common::KIND_CONGESTION;
        raw.oldstate = u32::from(tcptrace_common::ca_state::OPEN);
        raw.newstate = u32::from(tcptrace_common::ca_state::LOSS);
        metrics.record(&decode(&bytes(&raw)).unwrap(), None);
        metrics.update(&Counters {
            lost: 7,
            state_repeats: 1,
            listen_overflow: 0,
            listen_no_socket: 4,
        });
        metrics.update(&Counters {
            lost: 9,
            state_repeats: 3,
            listen_overflow: 0,
            listen_no_socket: 6,
        });
        let text = metrics.encode();
        assert!(
            text.contains(
                "tcptrace_state_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"} 3\n"
            ),
            "{text}"
        );
        // Listen drops: the kernel side's running totals, a series per reason seen.
        assert!(
            text.contains("tcptrace_listen_drops_total{reason=\"no_socket\"} 6\n"),
            "{text}"
        );
        assert!(!text.contains("reason=\"listen_overflow\""), "{text}");
        assert!(
            text.contains("tcptrace_state_duration_seconds_count{state=\"SYN_SENT\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tcptrace_state_duration_seconds_sum{state=\"SYN_SENT\"} 0.0045"),
            "{text}"
        );
        assert!(
            text.contains("tcptrace_retransmits_total{state=\"ESTABLISHED\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tcptrace_retransmit_kinds_total{kind=\"tlp\"} 2\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("tcptrace_retransmit_kinds_total{").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("tcptrace_retransmit_failures_total{state=\"ESTABLISHED\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("tcptrace_congestion_changes_total{from=\"open\",to=\"loss\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("tcptrace_events_lost_total 9\n"), "{text}");
        assert!(text.contains("tcptrace_state_repeats_total 3\n"), "{text}");
        assert!(!text.contains("sockets_tracked"), "{text}");
        assert!(!text.contains("127.0.0.1") && !text.contains("4242") && !text.contains("40000"));
        assert!(!text.contains("container"), "{text}");
    }

    #[test]
    fn the_container_label_is_opt_in() {
        let metrics = Metrics::new(true);
        let event = decode(&bytes(&raw_state(
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
        )))
        .unwrap();
        let docker = Cgroup::new(
            "/system.slice/docker-3f1c9e2b7a4d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7.scope",
        );
        metrics.record(&event, Some(&docker));
        metrics.record(&event, Some(&Cgroup::new("/user.slice")));
        metrics.record(&event, None);
        let text = metrics.encode();
        assert!(
            text.contains("tcptrace_state_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\",container=\"3f1c9e2b7a4d\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tcptrace_state_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\",container=\"\"} 2\n"),
            "{text}"
        );
    }
}
