//! Output: formatters (one file per format), the destination lines go to, and the writer thread
//! that owns it.

mod destination;
pub mod json;
pub mod text;
mod write;
mod writer;

use bytes::BytesMut;
pub use destination::Destination;
pub use writer::{Chunk, Outcome, Room, Writer};

use crate::{cgroup::Cgroup, event::TcpEvent};

/// The most one line takes, in bytes, whatever the event (a JSON line with an IPv6 pair and a
/// fully escaped command name is about 600; a cgroup path takes at most 4096 bytes, six times
/// that escaped): room the run loop keeps free in a buffer before it formats the next event.
/// Checked by the formatters' fuzz test.
pub const MAX_LINE: usize = 1024 + 6 * 4096;

/// The chosen line format. Formatters append to a `BytesMut`, which grows as needed and cannot
/// fail, so a hostile input can at worst produce an odd line, never an error or a panic.
pub enum Formatter {
    Text(text::Text),
    Json,
    /// No event lines (`--format none`: metrics only).
    None,
}

impl Formatter {
    /// What goes first in a fresh output (the text table's header).
    pub fn header(&self, out: &mut BytesMut) {
        match self {
            Self::Text(text) => text.header(out),
            Self::Json | Self::None => {}
        }
    }

    /// One event's line; `cgroup` is what the event's cgroup id resolved to, if anything.
    pub fn event(
        &self,
        out: &mut BytesMut,
        event: &TcpEvent,
        wall_ns: u64,
        cgroup: Option<&Cgroup>,
    ) {
        match self {
            Self::Text(text) => text.event(out, event, wall_ns, cgroup),
            Self::Json => json::event(out, event, wall_ns, cgroup),
            Self::None => {}
        }
    }

    /// Whether lines show the cgroup's path or container (JSON, the wide table).
    pub fn shows_cgroup(&self) -> bool {
        match self {
            Self::Text(text) => text.wide,
            Self::Json => true,
            Self::None => false,
        }
    }

    /// A report of events the kernel dropped. JSON gets a line in the stream; the text table keeps
    /// its shape and the caller warns on stderr instead.
    pub fn lost(&self, out: &mut BytesMut, wall_ns: u64, count: u64) -> bool {
        match self {
            Self::Text(_) | Self::None => false,
            Self::Json => {
                json::lost(out, wall_ns, count);
                true
            }
        }
    }
}

/// Civil date and time (UTC) of a Unix time in nanoseconds.
pub(crate) struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub nanos: u32,
}

impl Utc {
    pub fn from_unix_ns(ns: u64) -> Self {
        let secs = ns / 1_000_000_000;
        let nanos = (ns % 1_000_000_000) as u32;
        let days = (secs / 86_400) as i64;
        let rem = (secs % 86_400) as u32;
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            nanos,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time_of_known_instants() {
        let t = Utc::from_unix_ns(0);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (1970, 1, 1, 0, 0, 0)
        );
        // 2026-11-25T13:45:07.000000042Z
        let t = Utc::from_unix_ns(1_795_614_307_000_000_042);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.nanos),
            (2026, 11, 25, 13, 45, 7, 42)
        );
        // 2024-02-29 (leap day) 23:59:59
        let t = Utc::from_unix_ns(1_709_251_199_000_000_000);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2024, 2, 29, 23, 59, 59)
        );
    }
}
