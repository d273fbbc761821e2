//! Why a segment went out again, the timeout in force and the attempt, as the kernel side read
//! them at the retransmit (BTF mode).

use tcptrace_common::{RetransmitDetail, retransmit_kind};

use crate::tick_rate;

/// What made the kernel send a segment again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetransmitKind {
    /// The retransmission timer expired.
    Rto,
    /// A tail loss probe.
    Tlp,
    /// Fast retransmit (duplicate ACKs, SACK, RACK), in recovery.
    Fast,
    /// Further retransmits of a recovery after a timeout.
    Loss,
    Syn,
    Synack,
    Other,
}

impl RetransmitKind {
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            retransmit_kind::RTO => Self::Rto,
            retransmit_kind::TLP => Self::Tlp,
            retransmit_kind::FAST => Self::Fast,
            retransmit_kind::LOSS => Self::Loss,
            retransmit_kind::SYN => Self::Syn,
            retransmit_kind::SYNACK => Self::Synack,
            _ => Self::Other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Rto => "rto",
            Self::Tlp => "tlp",
            Self::Fast => "fast",
            Self::Loss => "loss",
            Self::Syn => "syn",
            Self::Synack => "synack",
            Self::Other => "other",
        }
    }
}

/// A retransmit, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retransmit {
    pub kind: RetransmitKind,
    /// The retransmission timeout in force, in jiffies (see [`Self::rto_ms`]).
    pub rto_jiffies: u32,
    /// Timeouts in a row so far (`icsk_retransmits`); a SYN-ACK's: its retransmits, this one
    /// included.
    pub attempt: u8,
    /// The backoff's exponent.
    pub backoff: u8,
    /// The socket's smoothed round-trip time; None before any was measured (a SYN, a SYN-ACK).
    pub srtt_us: Option<u32>,
}

impl Retransmit {
    pub fn decode(detail: &RetransmitDetail) -> Self {
        Self {
            kind: RetransmitKind::from_raw(detail.kind),
            rto_jiffies: detail.rto_jiffies,
            attempt: detail.attempt,
            backoff: detail.backoff,
            srtt_us: (detail.srtt_us != 0).then_some(detail.srtt_us),
        }
    }

    /// The timeout in milliseconds, when the kernel's tick rate is known.
    pub fn rto_ms(&self) -> Option<u64> {
        tick_rate::jiffies_to_ms(self.rto_jiffies)
    }
}
