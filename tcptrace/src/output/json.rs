//! JSON lines: one object per event, the schema documented in the README and
//! `schema/tcptrace-events.schema.json`.

use std::fmt::Write as _;

use bytes::{BufMut as _, BytesMut};

use super::write;
use crate::{
    cgroup::Cgroup,
    congestion::Congestion,
    ending::{Ending, errno_name, rst_reason_name},
    event::{Kind, TcpEvent, TcpState},
    listen_drops::ListenDrop,
    retransmit::Retransmit,
};

pub fn event(out: &mut BytesMut, event: &TcpEvent, wall_ns: u64, cgroup: Option<&Cgroup>) {
    let TcpEvent {
        ts_ns: _,
        skaddr,
        pid,
        comm: _,
        saddr,
        sport,
        daddr,
        dport,
        kind,
        retransmits,
        cgroup_id,
        netns,
        comm_of_thread: _,
        thread,
        cookie,
        end,
        retransmit,
    } = *event;
    write::put(
        out,
        match kind {
            Kind::State { .. } | Kind::Handoff { .. } => b"{\"type\":\"state\",\"time\":",
            Kind::Retransmit { .. } | Kind::RetransmitSynack => {
                b"{\"type\":\"retransmit\",\"time\":"
            }
            Kind::Snapshot { .. } => b"{\"type\":\"socket\",\"time\":",
            Kind::Congestion(_) => b"{\"type\":\"congestion\",\"time\":",
            Kind::ListenDrop(_) => b"{\"type\":\"listen_drop\",\"time\":",
        },
    );
    time(out, wall_ns);
    write::put(out, b",\"pid\":");
    write::uint(out, pid);
    write::put(out, b",\"comm\":");
    name(out, event.comm_bytes());
    if let Some(thread) = &thread {
        let end = thread.iter().position(|&b| b == 0).unwrap_or(16);
        write::put(out, b",\"thread\":");
        name(out, &thread[..end]);
    }
    write::put(
        out,
        if event.is_ipv6() {
            b",\"family\":\"ipv6\",\"saddr\":\""
        } else {
            b",\"family\":\"ipv4\",\"saddr\":\""
        },
    );
    write::ip(out, saddr);
    write::put(out, b"\",\"sport\":");
    write::uint(out, sport);
    write::put(out, b",\"daddr\":\"");
    write::ip(out, daddr);
    write::put(out, b"\",\"dport\":");
    write::uint(out, dport);
    match kind {
        Kind::State {
            old,
            new,
            duration_ns,
        }
        | Kind::Handoff {
            old,
            new,
            duration_ns,
            ..
        } => {
            write::put(out, b",\"oldstate\":");
            state(out, old);
            write::put(out, b",\"newstate\":");
            state(out, new);
            match duration_ns {
                Some(ns) => {
                    write::put(out, b",\"duration_ns\":");
                    write::uint(out, ns);
                }
                None => write::put(out, b",\"duration_ns\":null"),
            }
            if new == TcpState::Close {
                write::put(out, b",\"retransmits\":");
                write::uint(out, retransmits);
                if let Some(end) = &end {
                    ending(out, end);
                }
            }
        }
        Kind::Retransmit {
            state: socket_state,
            err,
        } => {
            // A field the kernel does not give is left out, never guessed.
            if let Some(socket_state) = socket_state {
                write::put(out, b",\"state\":");
                state(out, socket_state);
            }
            if let Some(err) = err {
                write::put(out, b",\"err\":");
                write::int(out, err);
            }
            write::put(out, b",\"synack\":false");
            if let Some(detail) = &retransmit {
                retransmit_detail(out, detail);
            }
        }
        Kind::RetransmitSynack => {
            write::put(out, b",\"state\":\"SYN_RECV\",\"synack\":true");
            if let Some(detail) = &retransmit {
                retransmit_detail(out, detail);
            }
        }
        Kind::Snapshot {
            state: socket_state,
        } => {
            write::put(out, b",\"state\":");
            state(out, socket_state);
        }
        Kind::Congestion(change) => congestion(out, &change),
        Kind::ListenDrop(drop) => listen_drop(out, &drop),
    }
    write::put(out, b",\"skaddr\":\"");
    write::hex(out, skaddr);
    out.put_u8(b'"');
    if cookie != 0 {
        write::put(out, b",\"cookie\":");
        write::uint(out, cookie);
    }
    // Where the socket lives; each key only when known.
    if netns != 0 {
        write::put(out, b",\"netns\":");
        write::uint(out, netns);
    }
    if cgroup_id != 0 {
        write::put(out, b",\"cgroup_id\":");
        write::uint(out, cgroup_id);
    }
    if let Some(cgroup) = cgroup {
        write::put(out, b",\"cgroup\":");
        string(out, &cgroup.path);
        if let Some(id) = &cgroup.container_id {
            write::put(out, b",\"container_id\":\"");
            write::put(out, id.as_bytes());
            out.put_u8(b'"');
        }
        if let Some(uid) = &cgroup.pod_uid {
            write::put(out, b",\"pod_uid\":\"");
            write::put(out, uid.as_bytes());
            out.put_u8(b'"');
        }
    }
    write::put(out, b"}\n");
}

/// A retransmit's kind, timeout and attempt; `rto_ms` only when the tick rate is known, and
/// `srtt_us` once the socket measured one.
fn retransmit_detail(out: &mut BytesMut, detail: &Retransmit) {
    write::put(out, b",\"kind\":\"");
    write::put(out, detail.kind.name().as_bytes());
    out.put_u8(b'"');
    timer(
        out,
        detail.rto_ms(),
        detail.backoff,
        detail.attempt,
        detail.srtt_us,
    );
}

/// The timeout in force (when the tick rate is known), its backoff, the timeouts in a row and
/// the smoothed round-trip time (once measured): on retransmit and congestion lines.
fn timer(out: &mut BytesMut, rto_ms: Option<u64>, backoff: u8, attempt: u8, srtt_us: Option<u32>) {
    if let Some(rto_ms) = rto_ms {
        write::put(out, b",\"rto_ms\":");
        write::uint(out, rto_ms);
    }
    write::put(out, b",\"backoff\":");
    write::uint(out, backoff);
    write::put(out, b",\"attempt\":");
    write::uint(out, attempt);
    if let Some(srtt_us) = srtt_us {
        write::put(out, b",\"srtt_us\":");
        write::uint(out, srtt_us);
    }
}

/// A congestion state change: the socket's state, the congestion states left and entered, and
/// what the socket held before the change (`rto_ms` only when the tick rate is known, `srtt_us`
/// once the socket measured one).
fn congestion(out: &mut BytesMut, change: &Congestion) {
    write::put(out, b",\"state\":");
    state(out, change.state);
    write::put(out, b",\"from\":\"");
    let _ = write!(out, "{}", change.from);
    write::put(out, b"\",\"to\":\"");
    let _ = write!(out, "{}", change.to);
    write::put(out, b"\",\"cwnd\":");
    write::uint(out, change.cwnd);
    timer(
        out,
        change.rto_ms(),
        change.backoff,
        change.attempt,
        change.srtt_us,
    );
}

/// What a listener's full accept queue dropped since its last line, by reason, and how full the
/// queue was at the latest drop.
fn listen_drop(out: &mut BytesMut, drop: &ListenDrop) {
    write::put(out, b",\"state\":\"LISTEN\",\"drops\":");
    write::uint(out, drop.drops());
    write::put(out, b",\"listen_overflow\":");
    write::uint(out, drop.overflow);
    write::put(out, b",\"no_socket\":");
    write::uint(out, drop.no_socket);
    write::put(out, b",\"total\":");
    write::uint(out, drop.total);
    write::put(out, b",\"ack_backlog\":");
    write::uint(out, drop.ack_backlog);
    write::put(out, b",\"max_ack_backlog\":");
    write::uint(out, drop.max_ack_backlog);
}

/// Why a connection ended and what it carried (BTF mode's CLOSE lines).
fn ending(out: &mut BytesMut, end: &Ending) {
    write::put(out, b",\"reason\":\"");
    write::put(out, end.reason.name().as_bytes());
    out.put_u8(b'"');
    if let Some(name) = end.rst_reason.and_then(rst_reason_name) {
        write::put(out, b",\"rst_reason\":");
        string(out, name);
    }
    if let Some(errno) = end.error {
        write::put(out, b",\"error\":");
        string(out, &errno_name(errno));
    }
    write::put(out, b",\"bytes_sent\":");
    write::uint(out, end.bytes_sent);
    write::put(out, b",\"bytes_received\":");
    write::uint(out, end.bytes_received);
    write::put(out, b",\"srtt_us\":");
    write::uint(out, end.srtt_us);
    write::put(out, b",\"lifetime_ns\":");
    write::uint(out, end.lifetime_ns);
}

pub fn lost(out: &mut BytesMut, wall_ns: u64, count: u64) {
    write::put(out, b"{\"type\":\"lost\",\"time\":");
    time(out, wall_ns);
    write::put(out, b",\"count\":");
    write::uint(out, count);
    write::put(out, b"}\n");
}

fn state(out: &mut BytesMut, state: TcpState) {
    match state.name() {
        Some(name) => {
            out.put_u8(b'"');
            write::put(out, name.as_bytes());
            out.put_u8(b'"');
        }
        None => {
            let _ = write!(out, "\"{state}\"");
        }
    }
}

fn time(out: &mut BytesMut, wall_ns: u64) {
    out.put_u8(b'"');
    write::rfc3339(out, wall_ns);
    out.put_u8(b'"');
}

/// A process or thread name, as a JSON string: bytes that are not UTF-8 become U+FFFD.
fn name(out: &mut BytesMut, raw: &[u8]) {
    // The usual name is valid UTF-8: no lossy decoding (which walks it in chunks) for it.
    match std::str::from_utf8(raw) {
        Ok(name) => string(out, name),
        Err(_) => string(out, &String::from_utf8_lossy(raw)),
    }
}

/// A JSON string: quotes, backslashes and control characters escaped.
pub fn string(out: &mut BytesMut, s: &str) {
    out.put_u8(b'"');
    // The usual comm needs no escaping: copy it whole.
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f)
    {
        write::put(out, s.as_bytes());
        out.put_u8(b'"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => write::put(out, b"\\\""),
            '\\' => write::put(out, b"\\\\"),
            '\n' => write::put(out, b"\\n"),
            '\r' => write::put(out, b"\\r"),
            '\t' => write::put(out, b"\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => {
                let mut buf = [0; 4];
                write::put(out, c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.put_u8(b'"');
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use tcptrace_common::{
        AF_INET6, Bytes16, EVENT_HAS_STATE, KIND_RETRANSMIT, KIND_RETRANSMIT_SYNACK, tcp_state,
    };

    use super::*;
    use crate::event::{
        decode,
        tests::{bytes, raw_state},
    };

    const WALL: u64 = 1_795_614_307_000_000_042;

    fn line(raw: &tcptrace_common::Event) -> String {
        let mut out = BytesMut::new();
        event(&mut out, &decode(&bytes(raw)).unwrap(), WALL, None);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn state_line_golden() {
        assert_eq!(
            line(&raw_state(tcp_state::SYN_SENT, tcp_state::ESTABLISHED)),
            "{\"type\":\"state\",\"time\":\"2026-11-25T13:45:07.000000042Z\",\"pid\":4242,\"comm\":\"curl\",\
             \"family\":\"ipv4\",\"saddr\":\"127.0.0.1\",\"sport\":40000,\"daddr\":\"127.0.0.2\",\"dport\":80,\
             \"oldstate\":\"SYN_SENT\",\"newstate\":\"ESTABLISHED\",\"duration_ns\":1500000,\
             \"skaddr\":\"0xffff888012345678\"}\n"
        );
    }

    #[test]
    fn close_lines_carry_retransmits_and_unknown_durations_are_null() {
        let mut raw = raw_state(tcp_state::FIN_WAIT2, tcp_state::CLOSE);
        raw.retransmits = 3;
        raw.flags = 0;
        let v: Value = serde_json::from_str(&line(&raw)).unwrap();
        assert_eq!(v["retransmits"], 3);
        assert!(v["duration_ns"].is_null());
        assert_eq!(v["newstate"], "CLOSE");
    }

    #[test]
    fn retransmit_lines() {
        let mut raw = raw_state(tcp_state::SYN_SENT, 0);
        raw.kind = KIND_RETRANSMIT;
        raw.flags = EVENT_HAS_STATE;
        raw.family = AF_INET6;
        raw.saddr = Bytes16(std::net::Ipv6Addr::LOCALHOST.octets());
        raw.daddr = Bytes16("fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        let v: Value = serde_json::from_str(&line(&raw)).unwrap();
        assert_eq!(v["type"], "retransmit");
        assert_eq!(v["state"], "SYN_SENT");
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["daddr"], "fd00::2");
        assert!(
            v.get("err").is_none(),
            "err must be absent when the kernel lacks it"
        );
        assert_eq!(v["synack"], false);
        raw.kind = KIND_RETRANSMIT_SYNACK;
        let v: Value = serde_json::from_str(&line(&raw)).unwrap();
        assert_eq!(
            (v["state"].as_str(), v["synack"].as_bool()),
            (Some("SYN_RECV"), Some(true))
        );
    }

    #[test]
    fn a_retransmit_s_kind_timeout_and_attempt() {
        crate::tick_rate::assume(250);
        let mut raw = raw_state(tcp_state::ESTABLISHED, 0);
        raw.kind = KIND_RETRANSMIT;
        raw.flags = EVENT_HAS_STATE | tcptrace_common::EVENT_HAS_RETRANSMIT_DETAIL;
        let mut detail = tcptrace_common::RetransmitDetail {
            rto_jiffies: 102,
            srtt_us: 85,
            kind: tcptrace_common::retransmit_kind::RTO,
            attempt: 2,
            backoff: 1,
            ..tcptrace_common::RetransmitDetail::ZERO
        };
        raw.end = detail.into_end();
        let v: Value = serde_json::from_str(&line(&raw)).unwrap();
        assert_eq!(
            (
                &v["kind"],
                &v["rto_ms"],
                &v["backoff"],
                &v["attempt"],
                &v["srtt_us"]
            ),
            (&json!("rto"), &json!(408), &json!(1), &json!(2), &json!(85))
        );
        // A SYN: no round trip measured yet.
        detail.kind = tcptrace_common::retransmit_kind::SYN;
        detail.srtt_us = 0;
        raw.end = detail.into_end();
        let v: Value = serde_json::from_str(&line(&raw)).unwrap();
        assert_eq!(v["kind"], "syn");
        assert!(v.get("srtt_us").is_none(), "{v}");
        // Without the detail (tracefs mode, or a kernel without the fields): none of them.
        raw.flags = EVENT_HAS_STATE;
        let v: Value = serde_json::from_str(&line(&raw)).unwrap();
        for key in ["kind", "rto_ms", "backoff", "attempt", "srtt_us"] {
            assert!(v.get(key).is_none(), "{key} in {v}");
        }
    }

    #[test]
    fn a_listen_drop_golden() {
        let mut event = decode(&bytes(&raw_state(tcp_state::LISTEN, 0))).unwrap();
        event.kind = Kind::ListenDrop(ListenDrop {
            overflow: 1,
            no_socket: 19,
            total: 20,
            ack_backlog: 2,
            max_ack_backlog: 1,
        });
        event.cookie = 77;
        let mut out = BytesMut::new();
        super::event(&mut out, &event, WALL, None);
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "{\"type\":\"listen_drop\",\"time\":\"2026-11-25T13:45:07.000000042Z\",\"pid\":4242,\"comm\":\"curl\",\
             \"family\":\"ipv4\",\"saddr\":\"127.0.0.1\",\"sport\":40000,\"daddr\":\"127.0.0.2\",\"dport\":80,\
             \"state\":\"LISTEN\",\"drops\":20,\"listen_overflow\":1,\"no_socket\":19,\"total\":20,\
             \"ack_backlog\":2,\"max_ack_backlog\":1,\"skaddr\":\"0xffff888012345678\",\"cookie\":77}\n"
        );
    }

    #[test]
    fn a_congestion_change_golden() {
        crate::tick_rate::assume(250);
        let mut raw = raw_state(tcp_state::ESTABLISHED, 0);
        raw.kind = tcptrace_common::KIND_CONGESTION;
        raw.flags = EVENT_HAS_STATE;
        raw.oldstate = u32::from(tcptrace_common::ca_state::OPEN);
        raw.newstate = u32::from(tcptrace_common::ca_state::RECOVERY);
        raw.cookie = 77;
        raw.end = tcptrace_common::CongestionDetail {
            rto_jiffies: 51,
            srtt_us: 85,
            cwnd: 10,
            state: tcp_state::ESTABLISHED as u8,
            attempt: 0,
            backoff: 0,
            _pad: 0,
        }
        .into_end();
        assert_eq!(
            line(&raw),
            "{\"type\":\"congestion\",\"time\":\"2026-11-25T13:45:07.000000042Z\",\"pid\":4242,\"comm\":\"curl\",\
             \"family\":\"ipv4\",\"saddr\":\"127.0.0.1\",\"sport\":40000,\"daddr\":\"127.0.0.2\",\"dport\":80,\
             \"state\":\"ESTABLISHED\",\"from\":\"open\",\"to\":\"recovery\",\"cwnd\":10,\"rto_ms\":204,\
             \"backoff\":0,\"attempt\":0,\"srtt_us\":85,\"skaddr\":\"0xffff888012345678\",\"cookie\":77}\n"
        );
    }

    #[test]
    fn any_comm_gives_exactly_one_valid_line() {
        let hostile: [&[u8]; 6] = [
            b"a\"b\\c\nd\re\tf",
            b"\x01\x02\x1b[31m\x7f",
            b"\xff\xfe\xc3\x28",
            b"}{\",\"pid\":1,",
            "\u{2028}日本".as_bytes(),
            b"\0hidden",
        ];
        for comm in hostile {
            let mut raw = raw_state(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1);
            raw.comm = Bytes16::ZERO;
            raw.comm.0[..comm.len().min(16)].copy_from_slice(&comm[..comm.len().min(16)]);
            let text = line(&raw);
            assert_eq!(text.matches('\n').count(), 1, "{text:?}");
            assert!(text.ends_with('\n'));
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(v["pid"], 4242);
            let expected = String::from_utf8_lossy(
                &comm[..comm.iter().position(|&b| b == 0).unwrap_or(comm.len())],
            )
            .into_owned();
            assert_eq!(v["comm"], expected.as_str());
        }
    }

    #[test]
    fn where_the_socket_lives() {
        let mut raw = raw_state(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1);
        let v: Value = serde_json::from_str(&line(&raw)).unwrap();
        for key in ["netns", "cgroup_id", "cgroup", "container_id", "pod_uid"] {
            assert!(v.get(key).is_none(), "{key} must be absent when unknown");
        }
        raw.netns = 4_026_531_840;
        raw.cgroup_id = 7_654;
        let path = "/kubepods/besteffort/pod1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b/\
                    3f1c9e2b7a4d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
        let cgroup = Cgroup::new(path);
        let mut out = BytesMut::new();
        event(
            &mut out,
            &decode(&bytes(&raw)).unwrap(),
            WALL,
            Some(&cgroup),
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["netns"], 4_026_531_840u64);
        assert_eq!(v["cgroup_id"], 7_654);
        assert_eq!(v["cgroup"], path);
        assert_eq!(
            v["container_id"],
            "3f1c9e2b7a4d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"
        );
        assert_eq!(v["pod_uid"], "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b");
    }

    #[test]
    fn lost_line() {
        let mut out = BytesMut::new();
        lost(&mut out, WALL, 17);
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "{\"type\":\"lost\",\"time\":\"2026-11-25T13:45:07.000000042Z\",\"count\":17}\n"
        );
    }
}
