//! How a connection ended: the reason the kernel side read at its close, the reset reason and
//! error it names, and what the connection carried (BTF mode).

use std::sync::OnceLock;

use tcptrace_common::{End, reason};

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Fin,
    ResetSent,
    ResetReceived,
    Refused,
    Timeout,
    Unreachable,
    Error,
    Aborted,
    Unknown(u16),
}

impl Reason {
    /// Every reason this build names, in the README's order.
    pub const KNOWN: [Self; 8] = [
        Self::Fin,
        Self::ResetSent,
        Self::ResetReceived,
        Self::Refused,
        Self::Timeout,
        Self::Unreachable,
        Self::Error,
        Self::Aborted,
    ];

    /// None for 0: not a connection's end (a listener's close, tracefs mode).
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            0 => return None,
            reason::FIN => Self::Fin,
            reason::RESET_SENT => Self::ResetSent,
            reason::RESET_RECEIVED => Self::ResetReceived,
            reason::REFUSED => Self::Refused,
            reason::TIMEOUT => Self::Timeout,
            reason::UNREACHABLE => Self::Unreachable,
            reason::ERROR => Self::Error,
            reason::ABORTED => Self::Aborted,
            n => Self::Unknown(n),
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::ResetSent => "reset_sent",
            Self::ResetReceived => "reset_received",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Error => "error",
            Self::Aborted => "aborted",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// A connection's end, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    pub reason: Reason,
    /// The kernel's `enum sk_rst_reason` value of the reset this side sent, when it sent one and
    /// the kernel names it.
    pub rst_reason: Option<u16>,
    /// The socket's error (a positive errno).
    pub error: Option<u32>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub srtt_us: u32,
    pub lifetime_ns: u64,
}

impl Ending {
    /// None when the record ends no connection.
    pub fn decode(end: &End) -> Option<Self> {
        Some(Self {
            reason: Reason::from_raw(end.reason)?,
            // u16::MAX: a reset whose reason this kernel does not pass.
            rst_reason: match end.rst_reason {
                0 | u16::MAX => None,
                n => Some(n - 1),
            },
            error: (end.error != 0).then_some(end.error),
            bytes_sent: end.bytes_acked,
            bytes_received: end.bytes_received,
            srtt_us: end.srtt_us,
            lifetime_ns: end.lifetime_ns,
        })
    }

    /// Whether the connection ended other than with an orderly FIN (`--failures`).
    pub fn failed(&self) -> bool {
        self.reason != Reason::Fin
    }
}

/// The names of this kernel's `enum sk_rst_reason` values, without `SK_RST_REASON_`, read from
/// its BTF when BTF mode loads.
static RST_REASONS: OnceLock<Vec<String>> = OnceLock::new();

/// Keeps the kernel's reset reason names (indexed by value).
pub fn set_rst_reasons(names: Vec<(String, i64)>) {
    let len = names
        .iter()
        .filter_map(|(_, v)| usize::try_from(*v).ok())
        .max()
        .map_or(0, |max| max + 1)
        .min(1024);
    let mut table = vec![String::new(); len];
    for (name, value) in names {
        if let Some(slot) = usize::try_from(value).ok().and_then(|v| table.get_mut(v)) {
            *slot = name.trim_start_matches("SK_RST_REASON_").to_string();
        }
    }
    let _ = RST_REASONS.set(table);
}

/// The kernel's name of reset reason `value`, if known.
pub fn rst_reason_name(value: u16) -> Option<&'static str> {
    RST_REASONS
        .get()?
        .get(usize::from(value))
        .map(String::as_str)
        .filter(|name| !name.is_empty())
}

/// The symbolic name of a Linux errno (`ECONNABORTED`); `E<n>` for one this table lacks.
pub fn errno_name(errno: u32) -> std::borrow::Cow<'static, str> {
    let name = match errno {
        1 => "EPERM",
        2 => "ENOENT",
        4 => "EINTR",
        5 => "EIO",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        16 => "EBUSY",
        22 => "EINVAL",
        23 => "ENFILE",
        24 => "EMFILE",
        28 => "ENOSPC",
        32 => "EPIPE",
        71 => "EPROTO",
        74 => "EBADMSG",
        75 => "EOVERFLOW",
        90 => "EMSGSIZE",
        92 => "ENOPROTOOPT",
        95 => "EOPNOTSUPP",
        97 => "EAFNOSUPPORT",
        98 => "EADDRINUSE",
        99 => "EADDRNOTAVAIL",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        102 => "ENETRESET",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        105 => "ENOBUFS",
        106 => "EISCONN",
        107 => "ENOTCONN",
        108 => "ESHUTDOWN",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        112 => "EHOSTDOWN",
        113 => "EHOSTUNREACH",
        114 => "EALREADY",
        115 => "EINPROGRESS",
        125 => "ECANCELED",
        132 => "ERFKILL",
        n => return format!("E{n}").into(),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_its_number() {
        for (raw, reason) in (1..).zip(Reason::KNOWN) {
            assert_eq!(Reason::from_raw(raw), Some(reason));
            assert_ne!(reason.name(), "unknown");
        }
        assert_eq!(Reason::from_raw(0), None);
        assert_eq!(Reason::from_raw(99), Some(Reason::Unknown(99)));
    }

    #[test]
    fn decodes_resets_errors_and_the_summary() {
        let end = End {
            bytes_acked: 10,
            bytes_received: 20,
            lifetime_ns: 30,
            srtt_us: 40,
            reason: reason::RESET_SENT,
            rst_reason: 12,
            error: 103,
            _pad: 0,
        };
        let ending = Ending::decode(&end).expect("an end");
        assert_eq!(ending.rst_reason, Some(11));
        assert_eq!(ending.error, Some(103));
        assert_eq!(errno_name(103), "ECONNABORTED");
        assert_eq!(errno_name(250), "E250");
        assert!(ending.failed());
        let unnamed = End {
            rst_reason: u16::MAX,
            error: 0,
            reason: reason::FIN,
            ..end
        };
        let ending = Ending::decode(&unnamed).expect("an end");
        assert_eq!((ending.rst_reason, ending.error), (None, None));
        assert!(!ending.failed());
        assert_eq!(Ending::decode(&End::ZERO), None);
    }
}
