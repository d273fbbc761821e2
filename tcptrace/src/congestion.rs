//! Congestion state changes (BTF mode, `tcp:tcp_cong_state_set`): the state the socket's
//! congestion control left and entered, with what the socket held just before the change.

use tcptrace_common::{CongestionDetail, ca_state};

use crate::{event::TcpState, tick_rate};

/// `enum tcp_ca_state`; numbers this build does not know are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaState {
    /// Nothing wrong seen.
    Open,
    /// Duplicate or selective ACKs seen: a segment may be lost or reordered.
    Disorder,
    /// The window was cut for a congestion notification (ECN) or local congestion.
    Cwr,
    /// Fast recovery: a segment was found lost and is being sent again.
    Recovery,
    /// A retransmission timeout (or an SACK reneging): everything in flight counts as lost.
    Loss,
    Unknown(u32),
}

impl CaState {
    pub fn from_raw(raw: u32) -> Self {
        match u8::try_from(raw) {
            Ok(ca_state::OPEN) => Self::Open,
            Ok(ca_state::DISORDER) => Self::Disorder,
            Ok(ca_state::CWR) => Self::Cwr,
            Ok(ca_state::RECOVERY) => Self::Recovery,
            Ok(ca_state::LOSS) => Self::Loss,
            _ => Self::Unknown(raw),
        }
    }

    /// The name in lines and metric labels; `None` for a number this build does not know
    /// (written `ca_<n>`).
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::Open => "open",
            Self::Disorder => "disorder",
            Self::Cwr => "cwr",
            Self::Recovery => "recovery",
            Self::Loss => "loss",
            Self::Unknown(_) => return None,
        })
    }
}

impl std::fmt::Display for CaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.name(), self) {
            (Some(name), _) => f.write_str(name),
            (None, Self::Unknown(n)) => write!(f, "ca_{n}"),
            (None, _) => Ok(()),
        }
    }
}

/// A congestion state change, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Congestion {
    pub from: CaState,
    pub to: CaState,
    /// The socket's TCP state.
    pub state: TcpState,
    /// The congestion window before the change, in segments.
    pub cwnd: u32,
    /// The retransmission timeout in force, in jiffies (see [`Self::rto_ms`]).
    pub rto_jiffies: u32,
    /// Timeouts in a row so far, and the backoff's exponent.
    pub attempt: u8,
    pub backoff: u8,
    /// The smoothed round-trip time; None before any was measured.
    pub srtt_us: Option<u32>,
}

impl Congestion {
    pub fn decode(from: u32, to: u32, detail: &CongestionDetail) -> Self {
        Self {
            from: CaState::from_raw(from),
            to: CaState::from_raw(to),
            state: u32::from(detail.state).into(),
            cwnd: detail.cwnd,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_named_and_unknown_numbers_kept() {
        let names: Vec<String> = (0..6).map(|n| CaState::from_raw(n).to_string()).collect();
        assert_eq!(
            names,
            ["open", "disorder", "cwr", "recovery", "loss", "ca_5"]
        );
        assert_eq!(CaState::from_raw(300), CaState::Unknown(300));
    }
}
