//! The aligned table, in the tcpstates tradition.

use std::{borrow::Cow, fmt::Write as _};

use bytes::{BufMut as _, BytesMut};
use unicode_width::UnicodeWidthChar;

use super::{Utc, write};
use crate::{
    cgroup::Cgroup,
    ending::{Ending, Reason, errno_name, rst_reason_name},
    event::{Kind, TcpEvent},
    listen_drops::ListenDrop,
    retransmit::Retransmit,
};

/// Table settings.
pub struct Text {
    /// Lead each line with the wall-clock time of day (UTC).
    pub timestamp: bool,
    /// Width of the address columns: 15 when only IPv4 is traced, 39 (any IPv6 address) otherwise.
    pub addr_width: usize,
    /// End each line with the CONTAINER column.
    pub wide: bool,
    /// One line per connection at its end (`--events connections`): bytes each way, lifetime
    /// and reason in place of the states.
    pub connections: bool,
}

impl Text {
    pub fn new(timestamp: bool, ipv4_only: bool) -> Self {
        Self {
            timestamp,
            addr_width: if ipv4_only { 15 } else { 39 },
            wide: false,
            connections: false,
        }
    }

    /// One line per connection (`--events connections`).
    pub fn connections(self) -> Self {
        Self {
            connections: true,
            ..self
        }
    }

    /// With the CONTAINER column.
    pub fn wide(self) -> Self {
        Self { wide: true, ..self }
    }

    pub fn header(&self, out: &mut BytesMut) {
        if self.timestamp {
            out.extend_from_slice(b"TIME            ");
        }
        let w = self.addr_width;
        if self.connections {
            let _ = write!(
                out,
                "{:<7} {:<16} {:<w$} {:<5} {:<w$} {:<5} {:<12} {:<12} {:<12} REASON",
                "PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "TX_BYTES", "RX_BYTES", "MS"
            );
            if self.wide {
                let _ = write!(out, " CONTAINER");
            }
            out.put_u8(b'\n');
            return;
        }
        let _ = write!(
            out,
            "{:<7} {:<16} {:<w$} {:<5} {:<w$} {:<5} {:<12}    {:<12} MS",
            "PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "OLDSTATE", "NEWSTATE"
        );
        if self.wide {
            // "OLDSTATE" to "MS" take 31 columns of the states' width.
            let _ = write!(out, "{:<w$} CONTAINER", "", w = STATES_WIDTH - 31);
        }
        out.put_u8(b'\n');
    }

    pub fn event(
        &self,
        out: &mut BytesMut,
        event: &TcpEvent,
        wall_ns: u64,
        cgroup: Option<&Cgroup>,
    ) {
        if self.timestamp {
            let Utc {
                hour,
                minute,
                second,
                nanos,
                ..
            } = Utc::from_unix_ns(wall_ns);
            let _ = write!(
                out,
                "{hour:02}:{minute:02}:{second:02}.{:06} ",
                nanos / 1000
            );
        }
        let _ = write!(out, "{:<7} ", event.pid);
        name(out, event.comm_bytes(), 16);
        for (addr, port) in [(event.saddr, event.sport), (event.daddr, event.dport)] {
            out.put_u8(b' ');
            padded(out, self.addr_width, |out| write::ip(out, addr));
            out.put_u8(b' ');
            padded(out, 5, |out| write::uint(out, port));
        }
        out.put_u8(b' ');
        if self.connections {
            self.connection(out, event, cgroup);
            return;
        }
        let states = out.len();
        let _ = match event.kind {
            Kind::State {
                old,
                new,
                duration_ns: Some(ns),
            }
            | Kind::Handoff {
                old,
                new,
                duration_ns: Some(ns),
                ..
            } => {
                write!(
                    out,
                    "{old:<12} -> {new:<12} {}.{:03}",
                    ns / 1_000_000,
                    ns / 1000 % 1000
                )
            }
            Kind::State {
                old,
                new,
                duration_ns: None,
            }
            | Kind::Handoff {
                old,
                new,
                duration_ns: None,
                ..
            } => write!(out, "{old:<12} -> {new:<12} -"),
            Kind::Retransmit { state, err } => {
                // An attempt the kernel reports as failed sent nothing.
                let what = match err {
                    Some(err) if err != 0 => "RETRANS_FAIL",
                    _ => "RETRANS",
                };
                match state {
                    Some(state) => write!(out, "{state:<12} !! {what:<12} -"),
                    None => write!(out, "{:<12} !! {what:<12} -", "-"),
                }
            }
            Kind::RetransmitSynack => write!(out, "{:<12} !! {:<12} -", "SYN_RECV", "RETRANS"),
            Kind::Snapshot { state } => write!(out, "{state:<12} :: {:<12} -", "EXISTING"),
            Kind::Congestion(change) => {
                write!(out, "{:<12} ~~ {:<12} -", change.state, "CONGESTION")
            }
            Kind::ListenDrop(_) => write!(out, "{:<12} !! {:<12} -", "LISTEN", "DROPPED"),
        };
        if self.wide {
            // The states and the duration, padded so that the column after them lines up.
            out.resize(out.len().max(states + STATES_WIDTH), b' ');
            out.put_u8(b' ');
            match cgroup {
                Some(cgroup) => name(out, cgroup.short().as_bytes(), 0),
                None => out.put_u8(b'-'),
            }
        }
        if let (Kind::State { .. }, Some(end)) = (event.kind, &event.end) {
            reason(out, end);
        }
        if let Some(detail) = &event.retransmit {
            retransmit(out, detail);
        }
        if let Kind::Congestion(change) = &event.kind {
            let _ = write!(
                out,
                " {} -> {} cwnd={}",
                change.from, change.to, change.cwnd
            );
        }
        if let Kind::ListenDrop(drop) = &event.kind {
            listen_drop(out, drop);
        }
        out.put_u8(b'\n');
    }
}

impl Text {
    /// The rest of a `--events connections` line: bytes each way, lifetime, reason (`-` where
    /// tracefs mode cannot tell).
    fn connection(&self, out: &mut BytesMut, event: &TcpEvent, cgroup: Option<&Cgroup>) {
        match &event.end {
            Some(end) => {
                padded(out, 12, |out| write::uint(out, end.bytes_sent));
                out.put_u8(b' ');
                padded(out, 12, |out| write::uint(out, end.bytes_received));
                out.put_u8(b' ');
                let ns = end.lifetime_ns;
                padded(out, 12, |out| {
                    let _ = write!(out, "{}.{:03}", ns / 1_000_000, ns / 1000 % 1000);
                });
                // `reason` leads with the separating space.
                reason(out, end);
            }
            None => {
                let _ = write!(out, "{:<12} {:<12} {:<12} -", "-", "-", "-");
            }
        }
        if self.wide {
            out.put_u8(b' ');
            match cgroup {
                Some(cgroup) => name(out, cgroup.short().as_bytes(), 0),
                None => out.put_u8(b'-'),
            }
        }
        out.put_u8(b'\n');
    }
}

/// ` rto rto=204ms #3`: the kind, the timeout in force (when the tick rate is known) and the
/// attempt (when it is one of a series).
fn retransmit(out: &mut BytesMut, detail: &Retransmit) {
    out.put_u8(b' ');
    out.extend_from_slice(detail.kind.name().as_bytes());
    if let Some(ms) = detail.rto_ms() {
        let _ = write!(out, " rto={ms}ms");
    }
    if detail.attempt > 0 {
        let _ = write!(out, " #{}", detail.attempt);
    }
}

/// ` 20 dropped (listen_overflow 1, no_socket 19) queue 2/1`: the drops since the listener's
/// last line, by reason (those that happened), and the accept queue's fill and limit.
fn listen_drop(out: &mut BytesMut, drop: &ListenDrop) {
    let _ = write!(out, " {} dropped (", drop.drops());
    let mut first = true;
    for (name, count) in [
        ("listen_overflow", drop.overflow),
        ("no_socket", drop.no_socket),
    ] {
        if count > 0 {
            if !first {
                out.extend_from_slice(b", ");
            }
            let _ = write!(out, "{name} {count}");
            first = false;
        }
    }
    let _ = write!(out, ") queue {}/{}", drop.ack_backlog, drop.max_ack_backlog);
}

/// Why a connection ended, last on its CLOSE line: `reset_sent(TCP_ABORT_ON_CLOSE)`,
/// `error(ECONNABORTED)`, `refused`.
fn reason(out: &mut BytesMut, end: &Ending) {
    out.put_u8(b' ');
    out.extend_from_slice(end.reason.name().as_bytes());
    let detail = match end.reason {
        Reason::ResetSent => end.rst_reason.and_then(rst_reason_name).map(Cow::Borrowed),
        Reason::Error | Reason::Unknown(_) => end.error.map(errno_name),
        _ => None,
    };
    if let Some(detail) = detail {
        let _ = write!(out, "({detail})");
    }
}

/// What `write` appends, then spaces up to `width` bytes (addresses and ports are ASCII).
fn padded(out: &mut BytesMut, width: usize, write: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    write(out);
    let written = out.len() - start;
    out.resize(out.len() + width.saturating_sub(written), b' ');
}

/// The old and new state and the duration in milliseconds, when another column follows them.
/// Durations of 10 characters fit (under 11 days); longer ones push the next column right.
const STATES_WIDTH: usize = 12 + 4 + 12 + 1 + 10;

/// A name (a comm, a cgroup) padded to `width` display columns, with anything that could break
/// the line, reorder it or disturb the columns shown as `?`.
fn name(out: &mut BytesMut, raw: &[u8], width: usize) {
    let pad = width;
    let mut columns_used = 0;
    for c in String::from_utf8_lossy(raw).chars() {
        // Control characters, whitespace, and characters of no width (format characters such as
        // U+202E, which reorders the rest of the line, joiners, combining marks) become `?`.
        let (c, columns) = match UnicodeWidthChar::width(c) {
            Some(columns) if columns > 0 && !c.is_whitespace() => (c, columns),
            _ => ('?', 1),
        };
        let mut buf = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        columns_used += columns;
    }
    // Padded by display columns: a CJK character takes two.
    out.resize(out.len() + pad.saturating_sub(columns_used), b' ');
}

#[cfg(test)]
mod tests {
    use tcptrace_common::{EVENT_HAS_STATE, KIND_RETRANSMIT, tcp_state};

    use super::*;
    use crate::event::{
        decode,
        tests::{bytes, raw_state},
    };

    const WALL: u64 = 1_795_614_307_123_456_789;

    fn line(text: &Text, raw: &tcptrace_common::Event) -> String {
        let mut out = BytesMut::new();
        text.event(&mut out, &decode(&bytes(raw)).unwrap(), WALL, None);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn golden_lines_align_with_the_header() {
        let text = Text::new(true, true);
        let mut header = BytesMut::new();
        text.header(&mut header);
        let header = String::from_utf8(header.to_vec()).unwrap();
        assert_eq!(
            header,
            "TIME            PID     COMM             LADDR           LPORT RADDR           RPORT OLDSTATE        NEWSTATE     MS\n"
        );
        let state = line(
            &text,
            &raw_state(tcp_state::SYN_SENT, tcp_state::ESTABLISHED),
        );
        assert_eq!(
            state,
            "13:45:07.123456 4242    curl             127.0.0.1       40000 127.0.0.2       80    SYN_SENT     -> ESTABLISHED  1.500\n"
        );
        assert_eq!(header.find("MS"), state.find("1.500"));
        assert_eq!(header.find("NEWSTATE"), state.find("ESTABLISHED"));
    }

    #[test]
    fn the_wide_table_ends_with_an_aligned_container_column() {
        let text = Text::new(false, true).wide();
        let mut header = BytesMut::new();
        text.header(&mut header);
        let header = String::from_utf8(header.to_vec()).unwrap();
        let docker = Cgroup::new(
            "/system.slice/docker-3f1c9e2b7a4d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7.scope",
        );
        let service = Cgroup::new("/system.slice/nginx.service");
        let raw = raw_state(tcp_state::SYN_SENT, tcp_state::ESTABLISHED);
        let mut retransmit = raw_state(tcp_state::ESTABLISHED, 0);
        retransmit.kind = KIND_RETRANSMIT;
        retransmit.flags = EVENT_HAS_STATE;
        let column = header.find("CONTAINER").unwrap();
        for (raw, cgroup, shown) in [
            (&raw, Some(&docker), "3f1c9e2b7a4d\n"),
            (&retransmit, Some(&service), "nginx.service\n"),
            (&raw, None, "-\n"),
        ] {
            let mut out = BytesMut::new();
            text.event(&mut out, &decode(&bytes(raw)).unwrap(), WALL, cgroup);
            let out = String::from_utf8(out.to_vec()).unwrap();
            assert_eq!(out.find(shown), Some(column), "{header}{out}");
        }
    }

    fn closed(reason: u16, error: u32) -> tcptrace_common::Event {
        let mut raw = raw_state(tcp_state::SYN_SENT, tcp_state::CLOSE);
        raw.flags |= tcptrace_common::EVENT_HAS_SUMMARY;
        raw.end = tcptrace_common::End {
            bytes_acked: 4096,
            bytes_received: 123,
            lifetime_ns: 2_500_000,
            srtt_us: 40,
            reason,
            error,
            ..tcptrace_common::End::ZERO
        };
        raw
    }

    #[test]
    fn a_close_line_ends_with_why_and_the_connections_view_has_its_own_columns() {
        use tcptrace_common::reason;
        let text = Text::new(false, true);
        let refused = line(&text, &closed(reason::REFUSED, 111));
        assert!(
            refused.ends_with("SYN_SENT     -> CLOSE        1.500 refused\n"),
            "{refused:?}"
        );
        let error = line(&text, &closed(reason::ERROR, 99));
        assert!(error.ends_with(" error(EADDRNOTAVAIL)\n"), "{error:?}");

        let view = Text::new(false, true).connections();
        let mut header = BytesMut::new();
        view.header(&mut header);
        let header = String::from_utf8(header.to_vec()).unwrap();
        let row = line(&view, &closed(reason::FIN, 0));
        for (column, value) in [
            ("TX_BYTES", "4096"),
            ("RX_BYTES", "123"),
            ("MS", "2.500"),
            ("REASON", "fin"),
        ] {
            assert_eq!(
                header.find(column),
                row.find(&format!(" {value} "))
                    .map(|at| at + 1)
                    .or_else(|| row.find(&format!(" {value}\n")).map(|at| at + 1)),
                "{column}: {header}{row}"
            );
        }
        // tracefs mode: no summary, dashes.
        let mut raw = closed(reason::FIN, 0);
        raw.flags = 0;
        let row = line(&view, &raw);
        assert!(
            row.ends_with("-            -            -            -\n"),
            "{row:?}"
        );
    }

    #[test]
    fn retransmits_are_marked_and_unknown_durations_dashed() {
        let text = Text::new(false, false);
        let mut raw = raw_state(tcp_state::ESTABLISHED, 0);
        raw.kind = KIND_RETRANSMIT;
        raw.flags = EVENT_HAS_STATE;
        let out = line(&text, &raw);
        assert!(out.contains("ESTABLISHED  !! RETRANS      -\n"), "{out:?}");
        raw.flags |= tcptrace_common::EVENT_HAS_ERR;
        raw.err = -1;
        let out = line(&text, &raw);
        assert!(out.contains("ESTABLISHED  !! RETRANS_FAIL -\n"), "{out:?}");
        let mut raw = raw_state(tcp_state::CLOSE, tcp_state::SYN_SENT);
        raw.flags = 0;
        assert!(line(&text, &raw).ends_with("CLOSE        -> SYN_SENT     -\n"));
    }

    #[test]
    fn a_retransmit_ends_with_its_kind_timeout_and_attempt() {
        crate::tick_rate::assume(250);
        let text = Text::new(false, false);
        let mut raw = raw_state(tcp_state::ESTABLISHED, 0);
        raw.kind = KIND_RETRANSMIT;
        raw.flags = EVENT_HAS_STATE | tcptrace_common::EVENT_HAS_RETRANSMIT_DETAIL;
        let mut detail = tcptrace_common::RetransmitDetail {
            rto_jiffies: 204,
            kind: tcptrace_common::retransmit_kind::RTO,
            attempt: 3,
            backoff: 2,
            ..tcptrace_common::RetransmitDetail::ZERO
        };
        raw.end = detail.into_end();
        let out = line(&text, &raw);
        assert!(
            out.ends_with("!! RETRANS      - rto rto=816ms #3\n"),
            "{out:?}"
        );
        detail.kind = tcptrace_common::retransmit_kind::TLP;
        detail.attempt = 0;
        raw.end = detail.into_end();
        let out = line(&text, &raw);
        assert!(
            out.ends_with("!! RETRANS      - tlp rto=816ms\n"),
            "{out:?}"
        );
    }

    #[test]
    fn a_congestion_change_shows_the_states_and_the_window() {
        let text = Text::new(false, false);
        let mut raw = raw_state(tcp_state::ESTABLISHED, 0);
        raw.kind = tcptrace_common::KIND_CONGESTION;
        raw.flags = EVENT_HAS_STATE;
        raw.oldstate = u32::from(tcptrace_common::ca_state::RECOVERY);
        raw.newstate = u32::from(tcptrace_common::ca_state::OPEN);
        raw.end = tcptrace_common::CongestionDetail {
            cwnd: 7,
            state: tcp_state::CLOSE_WAIT as u8,
            ..Default::default()
        }
        .into_end();
        let out = line(&text, &raw);
        assert!(
            out.ends_with("CLOSE_WAIT   ~~ CONGESTION   - recovery -> open cwnd=7\n"),
            "{out:?}"
        );
    }

    #[test]
    fn a_listen_drop_shows_its_counts_and_the_queue() {
        let text = Text::new(false, false);
        let mut event = decode(&bytes(&raw_state(tcp_state::LISTEN, 0))).unwrap();
        event.kind = Kind::ListenDrop(ListenDrop {
            overflow: 0,
            no_socket: 19,
            total: 40,
            ack_backlog: 2,
            max_ack_backlog: 1,
        });
        let mut out = BytesMut::new();
        text.event(&mut out, &event, WALL, None);
        let out = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            out.ends_with("LISTEN       !! DROPPED      - 19 dropped (no_socket 19) queue 2/1\n"),
            "{out:?}"
        );
    }

    #[test]
    fn format_characters_are_replaced_and_wide_names_keep_the_columns() {
        let text = Text::new(false, true);
        let mut raw = raw_state(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1);
        // "ab" U+202E (right-to-left override) "cd" U+200B (zero width space).
        let mut comm = [0u8; 16];
        let name = "ab\u{202e}cd\u{200b}".as_bytes();
        comm[..name.len()].copy_from_slice(name);
        raw.comm = tcptrace_common::Bytes16(comm);
        let out = line(&text, &raw);
        assert!(
            out.starts_with("4242    ab?cd?           127.0.0.1"),
            "{out:?}"
        );
        // Five CJK characters: 10 columns, padded to 16 like any other name.
        let mut comm = [0u8; 16];
        let name = "数据库服务".as_bytes();
        comm[..name.len()].copy_from_slice(name);
        raw.comm = tcptrace_common::Bytes16(comm);
        let out = line(&text, &raw);
        assert!(
            out.starts_with("4242    数据库服务       127.0.0.1"),
            "{out:?}"
        );
    }

    #[test]
    fn hostile_comm_keeps_one_line_and_the_columns() {
        let text = Text::new(false, true);
        let mut raw = raw_state(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1);
        raw.comm = tcptrace_common::Bytes16(*b"a b\nc\td\x1b\xff\xfe  zz\0\0");
        let out = line(&text, &raw);
        assert_eq!(out.matches('\n').count(), 1);
        assert_eq!(out.split_whitespace().count(), 10, "{out:?}");
        assert!(
            out.starts_with("4242    a?b?c?d?\u{fffd}\u{fffd}??zz "),
            "{out:?}"
        );
    }
}
