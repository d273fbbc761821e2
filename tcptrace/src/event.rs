//! Decoding ring buffer records into typed events.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use tcptrace_common::{
    AF_INET, AF_INET6, Bytes16, CongestionDetail, EVENT_COMM_OF_THREAD, EVENT_HAS_DURATION,
    EVENT_HAS_ERR, EVENT_HAS_RETRANSMIT_DETAIL, EVENT_HAS_STATE, EVENT_HAS_SUMMARY, Event,
    KIND_CONGESTION, KIND_RETRANSMIT, KIND_RETRANSMIT_SYNACK, KIND_SNAPSHOT, KIND_STATE,
    KIND_TIMEWAIT, RetransmitDetail, tcp_state,
};

use crate::{
    congestion::Congestion, ending::Ending, listen_drops::ListenDrop, retransmit::Retransmit,
};

/// A kernel TCP state; numbers this build does not know are kept as `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    Unknown(u32),
}

impl From<u32> for TcpState {
    fn from(n: u32) -> Self {
        match n {
            tcp_state::ESTABLISHED => Self::Established,
            tcp_state::SYN_SENT => Self::SynSent,
            tcp_state::SYN_RECV => Self::SynRecv,
            tcp_state::FIN_WAIT1 => Self::FinWait1,
            tcp_state::FIN_WAIT2 => Self::FinWait2,
            tcp_state::TIME_WAIT => Self::TimeWait,
            tcp_state::CLOSE => Self::Close,
            tcp_state::CLOSE_WAIT => Self::CloseWait,
            tcp_state::LAST_ACK => Self::LastAck,
            tcp_state::LISTEN => Self::Listen,
            tcp_state::CLOSING => Self::Closing,
            tcp_state::NEW_SYN_RECV => Self::NewSynRecv,
            n => Self::Unknown(n),
        }
    }
}

impl TcpState {
    /// Every known state.
    #[cfg(test)]
    pub const KNOWN: [Self; 12] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
    ];

    /// The kernel's name without `TCP_`; `None` for unknown numbers (shown as `STATE_n`).
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
            Self::Unknown(_) => return None,
        })
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name(), self) {
            (Some(name), _) => f.pad(name),
            (None, Self::Unknown(n)) => f.pad(&format!("STATE_{n}")),
            (None, _) => Ok(()),
        }
    }
}

/// What happened to the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A state transition; `duration_ns` is the time spent in `old`, when its start was seen.
    State {
        old: TcpState,
        new: TcpState,
        duration_ns: Option<u64>,
    },
    /// A retransmitted segment (or SYN); `state` and `err` when the kernel gives them.
    Retransmit {
        state: Option<TcpState>,
        err: Option<i32>,
    },
    /// A retransmitted SYN-ACK of a connection being accepted.
    RetransmitSynack,
    /// A socket that existed when tracing began, in `state` (`--snapshot`).
    Snapshot { state: TcpState },
    /// BTF mode: a closed connection handed to a timewait socket, which starts in `new`
    /// (FIN_WAIT2 or TIME_WAIT). Never written as such: the timewait tracker makes it a
    /// transition to TIME_WAIT, or keeps it until the timewait socket moves.
    Handoff {
        old: TcpState,
        new: TcpState,
        duration_ns: Option<u64>,
        /// In FIN_WAIT2: how long the timewait socket waits for the peer's FIN, in kernel
        /// ticks (`tcp_fin_time`); 0 when unknown.
        fin_time: u32,
    },
    /// BTF mode: the socket's congestion state changed.
    Congestion(Congestion),
    /// BTF mode: what a listener's full accept queue dropped since its last such line (made by
    /// userspace from the kernel side's table, never a ring buffer record).
    ListenDrop(ListenDrop),
}

impl Kind {
    /// The state a transition or hand-over left; the socket's state otherwise, when known.
    pub fn old_state(&self) -> TcpState {
        match *self {
            Self::State { old, .. } | Self::Handoff { old, .. } => old,
            Self::Retransmit { state, .. } => state.unwrap_or(TcpState::Unknown(0)),
            Self::RetransmitSynack => TcpState::SynRecv,
            Self::Snapshot { state } => state,
            Self::Congestion(change) => change.state,
            Self::ListenDrop(_) => TcpState::Listen,
        }
    }

    /// The time spent in the state left, when known.
    pub fn duration_ns(&self) -> Option<u64> {
        match *self {
            Self::State { duration_ns, .. } | Self::Handoff { duration_ns, .. } => duration_ns,
            _ => None,
        }
    }
}

/// One decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEvent {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
    pub skaddr: u64,
    pub pid: u32,
    /// Owner's command name, NUL-padded raw bytes.
    pub comm: [u8; 16],
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub kind: Kind,
    /// Retransmits seen on this socket while traced.
    pub retransmits: u32,
    /// The socket's cgroup v2 id (tracefs mode: its owner's); 0 when unknown.
    pub cgroup_id: u64,
    /// The socket's network namespace (inode number); 0 when unknown (tracefs mode).
    pub netns: u32,
    /// tracefs mode: `comm` is the name of the thread that opened the socket, not its process's
    /// main thread's (until `ProcessNames` puts the process's name there).
    pub comm_of_thread: bool,
    /// tracefs mode: the name of the thread that opened the socket, when `comm` became its
    /// process's name and the two differ.
    pub thread: Option<[u8; 16]>,
    /// The socket's cookie (BTF mode): one connection's lines share it; 0 when unknown.
    pub cookie: u64,
    /// On the line that ends a connection (BTF mode): why, and what it carried.
    pub end: Option<Ending>,
    /// On a retransmit (BTF mode): why, the timeout in force and the attempt.
    pub retransmit: Option<Retransmit>,
}

impl TcpEvent {
    pub fn is_ipv6(&self) -> bool {
        self.saddr.is_ipv6()
    }

    /// The comm bytes up to the first NUL.
    pub fn comm_bytes(&self) -> &[u8] {
        let end = self
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.comm.len());
        &self.comm[..end]
    }
}

/// Why a record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {size}", size = size_of::<Event>())]
    WrongSize(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u16),
    #[error("unknown address family {0}")]
    UnknownFamily(u16),
}

/// Decodes one ring buffer record. Copies it out first: ring buffer memory is not trusted to be
/// aligned or to stay put.
pub fn decode(bytes: &[u8]) -> Result<TcpEvent, DecodeError> {
    if bytes.len() != size_of::<Event>() {
        return Err(DecodeError::WrongSize(bytes.len()));
    }
    // SAFETY: the length was checked; `Event` is plain integers and byte arrays, valid for any bits.
    let raw: Event = unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() };
    let Event {
        ts_ns,
        skaddr,
        duration_ns,
        saddr: Bytes16(saddr),
        daddr: Bytes16(daddr),
        comm: Bytes16(comm),
        pid,
        retransmits,
        err,
        kind,
        flags,
        family,
        sport,
        dport,
        oldstate,
        newstate,
        _pad: _,
        cgroup_id,
        netns,
        fin_time,
        cookie,
        end,
    } = raw;
    let (saddr, daddr) = match family {
        AF_INET => (ipv4(saddr), ipv4(daddr)),
        AF_INET6 => (
            IpAddr::V6(Ipv6Addr::from(saddr)),
            IpAddr::V6(Ipv6Addr::from(daddr)),
        ),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    let has = |flag| flags & flag != 0;
    let kind = match kind {
        KIND_STATE => Kind::State {
            old: oldstate.into(),
            new: newstate.into(),
            duration_ns: has(EVENT_HAS_DURATION).then_some(duration_ns),
        },
        KIND_RETRANSMIT => Kind::Retransmit {
            state: has(EVENT_HAS_STATE).then(|| oldstate.into()),
            err: has(EVENT_HAS_ERR).then_some(err),
        },
        KIND_RETRANSMIT_SYNACK => Kind::RetransmitSynack,
        KIND_SNAPSHOT => Kind::Snapshot {
            state: oldstate.into(),
        },
        KIND_CONGESTION => Kind::Congestion(Congestion::decode(
            oldstate,
            newstate,
            &CongestionDetail::from_end(&end),
        )),
        KIND_TIMEWAIT => Kind::Handoff {
            old: oldstate.into(),
            new: newstate.into(),
            duration_ns: has(EVENT_HAS_DURATION).then_some(duration_ns),
            fin_time,
        },
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(TcpEvent {
        ts_ns,
        skaddr,
        pid,
        comm,
        saddr,
        sport,
        daddr,
        dport,
        kind,
        retransmits,
        cgroup_id,
        netns,
        comm_of_thread: has(EVENT_COMM_OF_THREAD),
        thread: None,
        cookie,
        end: if has(EVENT_HAS_SUMMARY) {
            Ending::decode(&end)
        } else {
            None
        },
        retransmit: has(EVENT_HAS_RETRANSMIT_DETAIL)
            .then(|| Retransmit::decode(&RetransmitDetail::from_end(&end))),
    })
}

fn ipv4(addr: [u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
}

/// Converts the kernel's monotonic timestamps to wall-clock time. Sample once per batch: the
/// offset only moves when the wall clock is stepped.
#[derive(Clone, Copy, Debug, Default)]
pub struct WallClock {
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, in nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    pub fn sample() -> Self {
        let realtime = clock_ns(libc::CLOCK_REALTIME);
        let monotonic = clock_ns(libc::CLOCK_MONOTONIC);
        Self {
            offset_ns: realtime - monotonic,
        }
    }

    #[cfg(test)]
    pub const fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// Nanoseconds since the Unix epoch (0 if before it).
    pub fn wall_ns(&self, monotonic_ns: u64) -> u64 {
        u64::try_from(i128::from(monotonic_ns) + self.offset_ns).unwrap_or(0)
    }

    /// Now, in nanoseconds since the Unix epoch.
    pub fn now_ns() -> u64 {
        u64::try_from(clock_ns(libc::CLOCK_REALTIME)).unwrap_or(0)
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer; these clocks cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A raw record as the kernel side would write it.
    pub fn raw_state(old: u32, new: u32) -> Event {
        Event {
            ts_ns: 5_000_000_000,
            skaddr: 0xffff_8880_1234_5678,
            duration_ns: 1_500_000,
            saddr: Bytes16([127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            daddr: Bytes16([127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            comm: Bytes16(*b"curl\0\0\0\0\0\0\0\0\0\0\0\0"),
            pid: 4242,
            kind: KIND_STATE,
            flags: EVENT_HAS_DURATION,
            family: AF_INET,
            sport: 40000,
            dport: 80,
            oldstate: old,
            newstate: new,
            ..Event::default()
        }
    }

    pub fn bytes(event: &Event) -> Vec<u8> {
        // SAFETY: plain data, read as bytes.
        unsafe {
            std::slice::from_raw_parts((event as *const Event).cast::<u8>(), size_of::<Event>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_a_state_transition() {
        let event = decode(&bytes(&raw_state(
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
        )))
        .unwrap();
        assert_eq!(event.pid, 4242);
        assert_eq!(event.comm_bytes(), b"curl");
        assert_eq!(event.saddr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(event.daddr.to_string(), "127.0.0.2");
        assert_eq!((event.sport, event.dport), (40000, 80));
        assert_eq!(
            event.kind,
            Kind::State {
                old: TcpState::SynSent,
                new: TcpState::Established,
                duration_ns: Some(1_500_000)
            }
        );
    }

    #[test]
    fn duration_is_absent_without_its_flag() {
        let mut raw = raw_state(tcp_state::CLOSE, tcp_state::SYN_SENT);
        raw.flags = 0;
        let Kind::State { duration_ns, .. } = decode(&bytes(&raw)).unwrap().kind else {
            panic!()
        };
        assert_eq!(duration_ns, None);
    }

    #[test]
    fn decodes_ipv6_and_unknown_states() {
        let mut raw = raw_state(99, tcp_state::CLOSE);
        raw.family = AF_INET6;
        raw.saddr = Bytes16(Ipv6Addr::LOCALHOST.octets());
        let event = decode(&bytes(&raw)).unwrap();
        assert_eq!(event.saddr.to_string(), "::1");
        let Kind::State { old, .. } = event.kind else {
            panic!()
        };
        assert_eq!(old, TcpState::Unknown(99));
        assert_eq!(old.to_string(), "STATE_99");
    }

    #[test]
    fn decodes_retransmits_with_and_without_optional_fields() {
        let mut raw = raw_state(tcp_state::ESTABLISHED, 0);
        raw.kind = KIND_RETRANSMIT;
        raw.flags = EVENT_HAS_STATE | EVENT_HAS_ERR;
        raw.err = -105;
        assert_eq!(
            decode(&bytes(&raw)).unwrap().kind,
            Kind::Retransmit {
                state: Some(TcpState::Established),
                err: Some(-105)
            }
        );
        raw.flags = 0;
        assert_eq!(
            decode(&bytes(&raw)).unwrap().kind,
            Kind::Retransmit {
                state: None,
                err: None
            }
        );
        raw.kind = KIND_RETRANSMIT_SYNACK;
        assert_eq!(decode(&bytes(&raw)).unwrap().kind, Kind::RetransmitSynack);
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let good = bytes(&raw_state(1, 2));
        assert_eq!(decode(&good[..50]), Err(DecodeError::WrongSize(50)));
        assert_eq!(decode(&[]), Err(DecodeError::WrongSize(0)));
        let mut raw = raw_state(1, 2);
        raw.kind = 77;
        assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownKind(77)));
        raw.kind = KIND_STATE;
        raw.family = 1;
        assert_eq!(decode(&bytes(&raw)), Err(DecodeError::UnknownFamily(1)));
    }

    #[test]
    fn every_known_state_round_trips_its_number() {
        for (n, state) in (1..=12).zip(TcpState::KNOWN) {
            assert_eq!(TcpState::from(n), state);
            assert!(state.name().is_some());
        }
    }

    #[test]
    fn wall_clock_applies_the_offset() {
        assert_eq!(WallClock::with_offset(10).wall_ns(5), 15);
        assert_eq!(WallClock::with_offset(-10).wall_ns(5), 0);
        let now = WallClock::now_ns();
        let converted = WallClock::sample().wall_ns(clock_ns(libc::CLOCK_MONOTONIC) as u64);
        assert!(converted.abs_diff(now) < 1_000_000_000);
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::output::{Formatter, MAX_LINE, text::Text};

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

            /// Any bytes: refused or decoded, never a panic or an out-of-bounds read.
            #[test]
            fn decode_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = decode(&bytes);
            }

            /// Any record of the right size that decodes formats to exactly one line, and the JSON
            /// line is valid JSON.
            #[test]
            fn any_decoded_record_is_one_line(
                mut bytes in proptest::collection::vec(any::<u8>(), size_of::<Event>()),
                kind in 1u16..=3,
                v6 in any::<bool>(),
                // A cgroup path: up to 4096 bytes (PATH_MAX), of any characters.
                path in "(/[^/]{1,255}){0,16}",
            ) {
                // Valid kind and family, so that the rest (comm, states, numbers) reaches the formatters.
                let family = if v6 { AF_INET6 } else { AF_INET };
                bytes[std::mem::offset_of!(Event, kind)..][..2].copy_from_slice(&kind.to_ne_bytes());
                bytes[std::mem::offset_of!(Event, family)..][..2].copy_from_slice(&family.to_ne_bytes());
                let event = decode(&bytes);
                prop_assert!(event.is_ok());
                if let Ok(event) = decode(&bytes) {
                    let cgroup = crate::cgroup::Cgroup::new(&path);
                    for formatter in [
                        Formatter::Json,
                        Formatter::Text(Text::new(true, false)),
                        Formatter::Text(Text::new(true, false).wide()),
                    ] {
                        let mut out = bytes::BytesMut::new();
                        formatter.event(&mut out, &event, u64::MAX, Some(&cgroup));
                        let text = String::from_utf8(out.to_vec()).expect("UTF-8");
                        prop_assert_eq!(text.matches('\n').count(), 1);
                        prop_assert!(text.len() <= MAX_LINE, "{} bytes: {}", text.len(), text);
                        prop_assert!(text.ends_with('\n'));
                        if matches!(formatter, Formatter::Json) {
                            serde_json::from_str::<serde_json::Value>(&text).expect("valid JSON");
                        }
                    }
                }
            }
        }
    }
}
