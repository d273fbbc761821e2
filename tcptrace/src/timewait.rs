//! TIME_WAIT as `ss` and netstat show it (BTF mode). When a connection closes in an orderly way,
//! the kernel hands it to a timewait socket and closes the full socket (`tcp_time_wait`): the
//! kernel side reports that hand-over instead of a CLOSE. No tracepoint marks what the timewait
//! socket does next, so a periodic scan of the host's TCP sockets (`iter/tcp`) reports every
//! timewait socket tcptrace knows by its cookie, with its substate and its timer. From the
//! hand-overs and the scans this tracker writes what happened:
//! - `FIN_WAIT2 -> TIME_WAIT` when the peer's FIN reaches a connection handed over in FIN_WAIT2,
//!   at the time the kernel armed the 60-second TIME_WAIT timer (exact to a jiffy, once the
//!   tracker has measured the kernel's tick rate), else at the scan that saw it;
//! - `TIME_WAIT -> CLOSE` (or `FIN_WAIT2 -> CLOSE`) when the timewait socket is gone, at the scan
//!   that no longer found it (within one scan interval of its end), with the connection's summary.
//!
//! Bounded: at most `capacity` connections are followed; a hand-over beyond that is written as the
//! CLOSE it replaced, at once, and counted.

use std::{collections::HashMap, net::IpAddr};

use tcptrace_common::{TimewaitRecord, tcp_state};

use crate::{
    ending::{Ending, Reason},
    event::{Kind, TcpEvent, TcpState},
    fast_hash::Fast,
};

/// `TCP_TIMEWAIT_LEN`: the kernel arms a timewait socket's timer for 60 s when it enters
/// TIME_WAIT (`inet_twsk_reschedule(tw, TCP_TIMEWAIT_LEN)` in `tcp_timewait_state_process`).
const TIME_WAIT_SECS: u64 = 60;

/// One connection a timewait socket holds.
struct Followed {
    /// What the lines take from the hand-over: owner, addresses, the connection's summary.
    handoff: Handoff,
    /// FIN_WAIT2 or TIME_WAIT.
    state: TcpState,
    /// When it entered `state`.
    since_ns: u64,
    /// The timer's expiry (jiffies) at the last scan that saw it; 0 until one did.
    expires: u64,
    /// Handed over in FIN_WAIT2: its FIN timeout (`tcp_fin_time`, jiffies); 0 when unknown.
    fin_time: u32,
    /// The scan that last saw it.
    seen: u64,
}

/// Of a hand-over, what the connection's later lines repeat: about half of a whole event (the
/// tracker may follow tens of thousands of connections).
struct Handoff {
    ts_ns: u64,
    skaddr: u64,
    cgroup_id: u64,
    end: Option<Ending>,
    saddr: IpAddr,
    daddr: IpAddr,
    comm: [u8; 16],
    pid: u32,
    retransmits: u32,
    netns: u32,
    sport: u16,
    dport: u16,
}

impl Handoff {
    fn of(event: &TcpEvent) -> Self {
        Self {
            ts_ns: event.ts_ns,
            skaddr: event.skaddr,
            cgroup_id: event.cgroup_id,
            end: event.end,
            saddr: event.saddr,
            daddr: event.daddr,
            comm: event.comm,
            pid: event.pid,
            retransmits: event.retransmits,
            netns: event.netns,
            sport: event.sport,
            dport: event.dport,
        }
    }

    /// A line of connection `cookie`. Hand-overs come from BTF mode only, whose events name
    /// no thread and carry no retransmit detail on a state change.
    fn line(&self, cookie: u64, ts_ns: u64, kind: Kind, end: Option<Ending>) -> TcpEvent {
        TcpEvent {
            ts_ns,
            skaddr: self.skaddr,
            pid: self.pid,
            comm: self.comm,
            saddr: self.saddr,
            sport: self.sport,
            daddr: self.daddr,
            dport: self.dport,
            kind,
            retransmits: self.retransmits,
            cgroup_id: self.cgroup_id,
            netns: self.netns,
            comm_of_thread: false,
            thread: None,
            cookie,
            end,
            retransmit: None,
        }
    }
}

/// The connections followed, by cookie: an index into slots allocated a block at a time. A map of
/// whole entries doubles its table as it grows, and while it does holds both (18 MiB at 45,000
/// connections); the blocks grow 1,024 slots at a time, and a freed slot is used again.
#[derive(Default)]
struct Table {
    index: HashMap<u64, u32, Fast>,
    blocks: Vec<Box<[Option<Followed>]>>,
    free: Vec<u32>,
}

const BLOCK: usize = 1024;

impl Table {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn contains_key(&self, cookie: &u64) -> bool {
        self.index.contains_key(cookie)
    }

    fn slot(&self, slot: u32) -> Option<&Followed> {
        self.blocks[slot as usize / BLOCK][slot as usize % BLOCK].as_ref()
    }

    fn slot_mut(&mut self, slot: u32) -> &mut Option<Followed> {
        &mut self.blocks[slot as usize / BLOCK][slot as usize % BLOCK]
    }

    fn insert(&mut self, cookie: u64, followed: Followed) {
        let slot = match self.index.get(&cookie) {
            Some(&slot) => slot,
            None => {
                let slot = self.free.pop().unwrap_or_else(|| {
                    let first = (self.blocks.len() * BLOCK) as u32;
                    self.blocks
                        .push(std::iter::repeat_with(|| None).take(BLOCK).collect());
                    self.free.extend((first + 1..first + BLOCK as u32).rev());
                    first
                });
                self.index.insert(cookie, slot);
                slot
            }
        };
        *self.slot_mut(slot) = Some(followed);
    }

    fn get_mut(&mut self, cookie: &u64) -> Option<&mut Followed> {
        let slot = *self.index.get(cookie)?;
        self.slot_mut(slot).as_mut()
    }

    fn remove(&mut self, cookie: &u64) -> Option<Followed> {
        let slot = self.index.remove(cookie)?;
        self.free.push(slot);
        self.slot_mut(slot).take()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &Followed)> {
        self.index
            .iter()
            .filter_map(|(&cookie, &slot)| Some((cookie, self.slot(slot)?)))
    }

    fn values(&self) -> impl Iterator<Item = &Followed> {
        self.iter().map(|(_, followed)| followed)
    }
}

pub struct Timewait {
    followed: Table,
    capacity: usize,
    /// The first scan's clock (jiffies, ns), and the tick rate measured against it.
    first_clock: Option<(u64, u64)>,
    hz: Option<u64>,
    scans: u64,
    /// Hand-overs not followed (the table was full): a running total.
    pub untracked: u64,
}

impl Timewait {
    pub fn new(capacity: usize) -> Self {
        Self {
            followed: Table::default(),
            capacity,
            first_clock: None,
            hz: None,
            scans: 0,
            untracked: 0,
        }
    }

    /// Whether it follows no connection (then no scan is needed).
    pub fn is_empty(&self) -> bool {
        self.followed.is_empty()
    }

    /// Connections in TIME_WAIT now.
    pub fn in_time_wait(&self) -> usize {
        self.followed
            .values()
            .filter(|f| f.state == TcpState::TimeWait)
            .count()
    }

    /// A hand-over: the line to write now, if any (`FIN_WAIT2 -> TIME_WAIT`, or the CLOSE it
    /// replaced when the table is full).
    pub fn handoff(&mut self, event: &TcpEvent) -> Option<TcpEvent> {
        let Kind::Handoff {
            old,
            new,
            duration_ns,
            fin_time,
        } = event.kind
        else {
            return Some(*event);
        };
        if event.cookie == 0
            || (self.followed.len() >= self.capacity && !self.followed.contains_key(&event.cookie))
        {
            self.untracked += u64::from(event.cookie != 0);
            return Some(TcpEvent {
                kind: Kind::State {
                    old,
                    new: TcpState::Close,
                    duration_ns,
                },
                ..*event
            });
        }
        self.followed.insert(
            event.cookie,
            Followed {
                handoff: Handoff::of(event),
                state: new,
                since_ns: event.ts_ns,
                expires: 0,
                fin_time,
                seen: self.scans,
            },
        );
        (new == TcpState::TimeWait).then_some(TcpEvent {
            kind: Kind::State {
                old,
                new,
                duration_ns,
            },
            end: None,
            ..*event
        })
    }

    /// One scan's records (`started_ns`: when it began, `CLOCK_MONOTONIC`): appends the lines
    /// they imply to `lines`.
    pub fn scan(&mut self, records: &[u8], started_ns: u64, lines: &mut Vec<TcpEvent>) {
        self.scans += 1;
        let records: Vec<TimewaitRecord> = records
            .chunks_exact(size_of::<TimewaitRecord>())
            // SAFETY: plain integers, any bits valid; read unaligned from the byte buffer.
            .map(|chunk| unsafe { chunk.as_ptr().cast::<TimewaitRecord>().read_unaligned() })
            .collect();
        // The clock record comes last; without one (a truncated scan) nothing is judged.
        let Some(clock) = records.iter().rev().find(|r| r.cookie == 0).copied() else {
            return;
        };
        let (now_jiffies, now_ns) = (clock.expires, clock.now_ns);
        self.measure_tick_rate(now_jiffies, now_ns);
        for record in records.iter().filter(|r| r.cookie != 0) {
            let Some(followed) = self.followed.get_mut(&record.cookie) else {
                continue;
            };
            followed.seen = self.scans;
            followed.expires = record.expires;
            if followed.state == TcpState::FinWait2 && record.substate == tcp_state::TIME_WAIT {
                // Entered TIME_WAIT when its 60-second timer was armed.
                let entered = self
                    .hz
                    .map_or(now_ns, |hz| {
                        let armed = record.expires.saturating_sub(TIME_WAIT_SECS * hz);
                        let ago = now_jiffies.saturating_sub(armed) * 1_000_000_000 / hz;
                        now_ns.saturating_sub(ago)
                    })
                    .clamp(followed.since_ns, now_ns);
                lines.push(followed.handoff.line(
                    record.cookie,
                    entered,
                    Kind::State {
                        old: TcpState::FinWait2,
                        new: TcpState::TimeWait,
                        duration_ns: Some(entered - followed.since_ns),
                    },
                    None,
                ));
                followed.state = TcpState::TimeWait;
                followed.since_ns = entered;
            }
        }
        // Gone: those handed over before this scan began that it did not find.
        let scans = self.scans;
        let gone: Vec<u64> = self
            .followed
            .iter()
            .filter(|(_, f)| f.seen != scans && f.handoff.ts_ns < started_ns)
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in gone {
            let Some(followed) = self.followed.remove(&cookie) else {
                continue;
            };
            let end_ns = now_ns.max(followed.since_ns);
            let mut ending = followed.handoff.end;
            if let Some(ending) = &mut ending {
                // Still in FIN_WAIT2: the peer never closed. At its timer's expiry that is the
                // FIN timeout; before it, a reset the peer sent ended it (`tcp_timewait_state_
                // process` kills a FIN_WAIT2 timewait socket on a reset).
                if followed.state == TcpState::FinWait2 && followed.expires != 0 {
                    ending.reason = if now_jiffies >= followed.expires {
                        Reason::Timeout
                    } else {
                        Reason::ResetReceived
                    };
                } else if followed.state == TcpState::FinWait2
                    && self
                        .fin_deadline_ns(&followed)
                        .is_some_and(|at| end_ns >= at)
                {
                    // No scan saw it (they came further apart than its FIN timeout, on a host
                    // with many sockets): gone after its timer could have run out.
                    ending.reason = Reason::Timeout;
                }
                ending.lifetime_ns += end_ns.saturating_sub(followed.handoff.ts_ns);
            }
            lines.push(followed.handoff.line(
                cookie,
                end_ns,
                Kind::State {
                    old: followed.state,
                    new: TcpState::Close,
                    duration_ns: Some(end_ns - followed.since_ns),
                },
                ending,
            ));
        }
    }

    /// When the timer of a connection handed over in FIN_WAIT2 ran out at the earliest. The
    /// kernel arms it for the FIN timeout, or, when that is longer than TIME_WAIT's 60 s, for
    /// what exceeds them (as long as the full socket waited in FIN_WAIT2 before its hand-over);
    /// counted from the hand-over less a tick, as the timer may have been armed up to a tick
    /// before. None when the tick rate is not known (neither from the build configuration nor
    /// measured).
    /// https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c (__tcp_close)
    /// https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_timer.c (tcp_keepalive_timer)
    fn fin_deadline_ns(&self, followed: &Followed) -> Option<u64> {
        if followed.fin_time == 0 {
            return None;
        }
        let hz = self.hz.or_else(|| crate::tick_rate::hz().map(u64::from))?;
        let fin_time = u64::from(followed.fin_time);
        let timer = if fin_time > TIME_WAIT_SECS * hz {
            fin_time - TIME_WAIT_SECS * hz
        } else {
            fin_time
        };
        Some(followed.handoff.ts_ns + timer.saturating_sub(1) * 1_000_000_000 / hz)
    }

    /// The kernel's tick rate, from the jiffies and nanoseconds of two scans at least a second
    /// apart, taken as the nearest rate Linux is built with.
    fn measure_tick_rate(&mut self, jiffies: u64, now_ns: u64) {
        if self.hz.is_some() {
            return;
        }
        let Some((first_jiffies, first_ns)) = self.first_clock else {
            self.first_clock = Some((jiffies, now_ns));
            return;
        };
        let elapsed = now_ns.saturating_sub(first_ns);
        if elapsed < 1_000_000_000 {
            return;
        }
        let rate = jiffies.saturating_sub(first_jiffies) as f64 * 1e9 / elapsed as f64;
        self.hz = crate::tick_rate::nearest(rate).map(u64::from);
    }
}

#[cfg(test)]
mod tests {
    use tcptrace_common::{
        EVENT_HAS_DURATION, EVENT_HAS_SUMMARY, End, KIND_TIMEWAIT, reason, tcp_state,
    };

    use super::*;
    use crate::event::{
        decode,
        tests::{bytes, raw_state},
    };

    const SEC: u64 = 1_000_000_000;
    const HZ: u64 = 250;

    fn handoff(cookie: u64, old: u32, new: u32, at_ns: u64) -> TcpEvent {
        handoff_in_fin_wait2(cookie, old, new, at_ns, 0)
    }

    /// A hand-over with its FIN timeout, in jiffies.
    fn handoff_in_fin_wait2(
        cookie: u64,
        old: u32,
        new: u32,
        at_ns: u64,
        fin_time: u32,
    ) -> TcpEvent {
        let mut raw = raw_state(old, new);
        raw.fin_time = fin_time;
        raw.kind = KIND_TIMEWAIT;
        raw.flags = EVENT_HAS_DURATION | EVENT_HAS_SUMMARY;
        raw.ts_ns = at_ns;
        raw.cookie = cookie;
        raw.end = End {
            bytes_acked: 100,
            bytes_received: 200,
            lifetime_ns: SEC,
            srtt_us: 50,
            reason: reason::FIN,
            ..End::ZERO
        };
        decode(&bytes(&raw)).unwrap()
    }

    /// A scan at `at_ns` finding `(cookie, substate, expires)`; jiffies run at HZ from 0 at 0 ns.
    fn scan(found: &[(u64, u32, u64)], at_ns: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |r: TimewaitRecord| {
            // SAFETY: plain data, read as bytes.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts((&raw const r).cast::<u8>(), size_of::<TimewaitRecord>())
            });
        };
        for &(cookie, substate, expires) in found {
            push(TimewaitRecord {
                cookie,
                expires,
                substate,
                ..TimewaitRecord::default()
            });
        }
        push(TimewaitRecord {
            expires: at_ns / (SEC / HZ),
            now_ns: at_ns,
            ..TimewaitRecord::default()
        });
        out
    }

    fn jiffies(ns: u64) -> u64 {
        ns / (SEC / HZ)
    }

    #[test]
    fn the_table_reuses_freed_slots_and_grows_a_block_at_a_time() {
        let followed = |cookie: u64| Followed {
            handoff: Handoff::of(&handoff(
                cookie,
                tcp_state::FIN_WAIT2,
                tcp_state::FIN_WAIT2,
                cookie,
            )),
            state: TcpState::FinWait2,
            since_ns: cookie,
            expires: 0,
            fin_time: 0,
            seen: 0,
        };
        let mut table = Table::default();
        for cookie in 1..=(BLOCK as u64 + 10) {
            table.insert(cookie, followed(cookie));
        }
        assert_eq!(table.len(), BLOCK + 10);
        assert_eq!(table.blocks.len(), 2);
        // Followed again: replaced in place.
        table.insert(5, followed(500));
        assert_eq!(table.len(), BLOCK + 10);
        assert_eq!(table.get_mut(&5).map(|f| f.since_ns), Some(500));
        for cookie in 1..=100 {
            let handed = if cookie == 5 { 500 } else { cookie };
            assert_eq!(table.remove(&cookie).map(|f| f.handoff.ts_ns), Some(handed));
        }
        assert!(table.remove(&1).is_none());
        assert!(!table.contains_key(&1));
        // The freed slots take the next hundred: no new block.
        for cookie in 5000..5100 {
            table.insert(cookie, followed(cookie));
        }
        assert_eq!(table.blocks.len(), 2);
        assert_eq!(table.len(), BLOCK + 10);
        let mut seen: Vec<u64> = table.iter().map(|(cookie, _)| cookie).collect();
        seen.sort_unstable();
        let mut expected: Vec<u64> = (101..=BLOCK as u64 + 10).chain(5000..5100).collect();
        expected.sort_unstable();
        assert_eq!(seen, expected);
        assert!(table.iter().all(|(cookie, f)| f.handoff.ts_ns == cookie));
    }

    #[test]
    fn a_server_first_close_enters_time_wait_when_its_timer_was_armed_and_closes_when_gone() {
        let mut tw = Timewait::new(16);
        let mut lines = Vec::new();
        // Handed over in FIN_WAIT2 at 10 s: nothing written.
        let h = handoff(7, tcp_state::FIN_WAIT2, tcp_state::FIN_WAIT2, 10 * SEC);
        assert_eq!(tw.handoff(&h), None);
        // Scans at 10.5 s and 11.5 s: still FIN_WAIT2 (timer 60 s out); the tick rate is known.
        let fin_timeout = jiffies(70 * SEC);
        tw.scan(
            &scan(
                &[(7, tcp_state::FIN_WAIT2, fin_timeout)],
                10 * SEC + SEC / 2,
            ),
            10 * SEC + SEC / 2,
            &mut lines,
        );
        tw.scan(
            &scan(
                &[(7, tcp_state::FIN_WAIT2, fin_timeout)],
                11 * SEC + SEC / 2,
            ),
            11 * SEC + SEC / 2,
            &mut lines,
        );
        assert!(lines.is_empty());
        assert_eq!(tw.hz, Some(HZ));
        // The peer's FIN at 12 s re-arms the timer for 60 s; the scan at 12.9 s sees TIME_WAIT.
        let armed = jiffies(72 * SEC);
        tw.scan(
            &scan(&[(7, tcp_state::TIME_WAIT, armed)], 12 * SEC + 900_000_000),
            12 * SEC + 900_000_000,
            &mut lines,
        );
        let [line] = lines.as_slice() else {
            panic!("{lines:?}")
        };
        assert_eq!(line.ts_ns, 12 * SEC);
        assert_eq!(
            line.kind,
            Kind::State {
                old: TcpState::FinWait2,
                new: TcpState::TimeWait,
                duration_ns: Some(2 * SEC)
            }
        );
        assert_eq!(line.end, None);
        assert_eq!(tw.in_time_wait(), 1);
        // Gone at the scan at 72.5 s: TIME_WAIT -> CLOSE, the summary carried, reason fin.
        lines.clear();
        tw.scan(
            &scan(&[], 72 * SEC + SEC / 2),
            72 * SEC + SEC / 2,
            &mut lines,
        );
        let [line] = lines.as_slice() else {
            panic!("{lines:?}")
        };
        assert_eq!(
            line.kind,
            Kind::State {
                old: TcpState::TimeWait,
                new: TcpState::Close,
                duration_ns: Some(60 * SEC + SEC / 2)
            }
        );
        let end = line.end.expect("the summary");
        assert_eq!(
            (end.reason, end.bytes_sent, end.bytes_received),
            (Reason::Fin, 100, 200)
        );
        assert_eq!(end.lifetime_ns, SEC + 62 * SEC + SEC / 2);
        assert_eq!((line.cookie, line.pid), (7, 4242));
        assert_eq!(tw.in_time_wait(), 0);
    }

    #[test]
    fn fin_wait2_no_scan_saw_ends_in_a_timeout_once_its_fin_timeout_could_have_run_out() {
        let mut tw = Timewait::new(16);
        let mut lines = Vec::new();
        // The first scan starts the tick rate's measurement.
        tw.scan(&scan(&[], SEC / 2), SEC / 2, &mut lines);
        // FIN timeouts of 2 s and 10 s, of 62 s (the timewait socket gets the 2 s beyond
        // TIME_WAIT's 60), and one unknown.
        let fin_time = |secs: u64| u32::try_from(secs * HZ).unwrap();
        for (cookie, secs) in [(1, 2), (2, 10), (3, 62), (4, 0)] {
            tw.handoff(&handoff_in_fin_wait2(
                cookie,
                tcp_state::FIN_WAIT2,
                tcp_state::FIN_WAIT2,
                SEC,
                fin_time(secs),
            ));
        }
        // Scans further apart than the FIN timeout: none saw the timewait sockets.
        tw.scan(&scan(&[], 4 * SEC), 4 * SEC, &mut lines);
        let mut reasons: Vec<_> = lines
            .iter()
            .map(|l| (l.cookie, l.end.unwrap().reason))
            .collect();
        reasons.sort_unstable_by_key(|&(cookie, _)| cookie);
        assert_eq!(
            reasons,
            [
                (1, Reason::Timeout),
                // Gone before its timer could run out: what ended it is not known.
                (2, Reason::Fin),
                (3, Reason::Timeout),
                (4, Reason::Fin),
            ]
        );
    }

    #[test]
    fn fin_wait2_ends_in_a_timeout_at_its_expiry_and_a_reset_before_it() {
        let mut tw = Timewait::new(16);
        let mut lines = Vec::new();
        for cookie in [1, 2] {
            tw.handoff(&handoff(
                cookie,
                tcp_state::FIN_WAIT2,
                tcp_state::FIN_WAIT2,
                SEC,
            ));
        }
        let expires = jiffies(4 * SEC);
        tw.scan(
            &scan(
                &[
                    (1, tcp_state::FIN_WAIT2, expires),
                    (2, tcp_state::FIN_WAIT2, expires),
                ],
                2 * SEC,
            ),
            2 * SEC,
            &mut lines,
        );
        // At 3 s cookie 2 is gone before its expiry; at 5 s cookie 1, after it.
        tw.scan(
            &scan(&[(1, tcp_state::FIN_WAIT2, expires)], 3 * SEC),
            3 * SEC,
            &mut lines,
        );
        tw.scan(&scan(&[], 5 * SEC), 5 * SEC, &mut lines);
        let reasons: Vec<_> = lines
            .iter()
            .map(|l| (l.cookie, l.end.unwrap().reason))
            .collect();
        assert_eq!(reasons, [(2, Reason::ResetReceived), (1, Reason::Timeout)]);
        assert!(lines.iter().all(|l| matches!(
            l.kind,
            Kind::State {
                old: TcpState::FinWait2,
                new: TcpState::Close,
                ..
            }
        )));
    }

    #[test]
    fn a_handoff_into_time_wait_is_written_at_once_and_one_after_the_scan_began_waits() {
        let mut tw = Timewait::new(16);
        let mut lines = Vec::new();
        let line = tw
            .handoff(&handoff(
                3,
                tcp_state::CLOSING,
                tcp_state::TIME_WAIT,
                5 * SEC,
            ))
            .expect("a line");
        assert!(matches!(
            line.kind,
            Kind::State {
                old: TcpState::Closing,
                new: TcpState::TimeWait,
                ..
            }
        ));
        // A scan that began before the hand-over cannot judge it.
        tw.scan(&scan(&[], 6 * SEC), 4 * SEC, &mut lines);
        assert!(lines.is_empty());
        assert_eq!(tw.in_time_wait(), 1);
    }

    #[test]
    fn beyond_its_capacity_a_handoff_is_the_close_it_replaced() {
        let mut tw = Timewait::new(1);
        assert_eq!(
            tw.handoff(&handoff(1, tcp_state::FIN_WAIT2, tcp_state::FIN_WAIT2, SEC)),
            None
        );
        let line = tw
            .handoff(&handoff(2, tcp_state::FIN_WAIT2, tcp_state::FIN_WAIT2, SEC))
            .expect("a line");
        assert!(matches!(
            line.kind,
            Kind::State {
                old: TcpState::FinWait2,
                new: TcpState::Close,
                ..
            }
        ));
        assert_eq!(line.end.unwrap().reason, Reason::Fin);
        assert_eq!(tw.untracked, 1);
    }
}
