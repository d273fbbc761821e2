//! What `tcptrace top` shows, kept from the events and the census: the host's sockets per state,
//! the state machine's edges with their rates and the median time spent in the state left, a
//! row per process (or container), and the lists of the slowest and the worst. No terminal here:
//! the view reads a [`Model`] and draws it.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use crate::{
    cgroup::Cgroup,
    event::{Kind, TcpEvent, TcpState},
    fast_hash::Fast,
    retransmit::RetransmitKind,
};

/// The states `netstat -nat` counts, in the order the view lists them.
pub const STATES: [TcpState; 11] = [
    TcpState::Listen,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::Established,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Closing,
    TcpState::TimeWait,
    TcpState::Close,
];

/// Durations kept per edge for its median: the latest ones.
const DURATIONS_KEPT: usize = 1024;
/// Sockets followed at once (for the per-process CLOSE_WAIT and TIME_WAIT counts and the
/// oldest CLOSE_WAIT list); beyond it a new socket is counted, not followed.
pub const MAX_SOCKETS: usize = 1 << 20;
/// Rows of each list under the process table.
pub const LIST_ROWS: usize = 5;
/// Owners remembered by pid and comm (or cgroup), so an event costs no new name; forgotten all
/// at once when full.
const OWNERS_CACHED: usize = 1 << 16;

/// The index of a state in [`STATES`]; request sockets count as SYN_RECV, as `ss` shows them.
pub fn state_index(state: TcpState) -> Option<usize> {
    let state = match state {
        TcpState::NewSynRecv => TcpState::SynRecv,
        other => other,
    };
    STATES.iter().position(|&s| s == state)
}

/// Sockets per state at one moment, in [`STATES`] order.
pub type Counts = [u64; STATES.len()];

/// The process table's sort keys, in the order `s` cycles through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Opened,
    Closed,
    Failures,
    Retransmits,
    CloseWait,
    TimeWait,
}

impl SortKey {
    pub const ALL: [Self; 6] = [
        Self::Opened,
        Self::Closed,
        Self::Failures,
        Self::Retransmits,
        Self::CloseWait,
        Self::TimeWait,
    ];

    pub fn next(self) -> Self {
        let i = Self::ALL.iter().position(|&k| k == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Opened => "opened/s",
            Self::Closed => "closed/s",
            Self::Failures => "failures",
            Self::Retransmits => "retransmits",
            Self::CloseWait => "CLOSE_WAIT",
            Self::TimeWait => "TIME_WAIT",
        }
    }
}

/// A counter with its rate over the latest interval.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    pub total: u64,
    at_tick: u64,
    /// Per second, over the interval that ended at the latest tick.
    pub per_second: f64,
}

impl Rate {
    fn add(&mut self, n: u64) {
        self.total += n;
    }

    fn tick(&mut self, seconds: f64) {
        self.per_second = (self.total - self.at_tick) as f64 / seconds;
        self.at_tick = self.total;
    }
}

/// One edge of the state machine.
#[derive(Debug, Default)]
pub struct Edge {
    pub rate: Rate,
    durations: VecDeque<u64>,
    /// The median of the kept durations, at the latest tick.
    pub median_ns: Option<u64>,
}

impl Edge {
    fn record(&mut self, duration_ns: Option<u64>) {
        self.rate.add(1);
        if let Some(d) = duration_ns {
            if self.durations.len() == DURATIONS_KEPT {
                self.durations.pop_front();
            }
            self.durations.push_back(d);
        }
    }

    fn tick(&mut self, seconds: f64) {
        self.rate.tick(seconds);
        let mut sorted: Vec<u64> = self.durations.iter().copied().collect();
        sorted.sort_unstable();
        self.median_ns = sorted.get(sorted.len() / 2).copied();
    }
}

/// Who a row is: a process (pid and name) or, with `-w`, a container. Cloned per event: the name
/// is shared.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub name: Arc<str>,
    /// 0 for a container row.
    pub pid: u32,
}

/// A row of the process table.
#[derive(Debug, Default)]
pub struct Process {
    pub opened: Rate,
    pub closed: Rate,
    /// Connection ends that were not an orderly FIN, by reason.
    pub failures: Vec<(&'static str, u64)>,
    /// Retransmits by kind.
    pub retransmits: Vec<(&'static str, u64)>,
    /// Sockets followed in CLOSE_WAIT and TIME_WAIT, at the latest tick.
    pub close_wait: u64,
    pub time_wait: u64,
}

impl Process {
    pub fn failures_total(&self) -> u64 {
        self.failures.iter().map(|&(_, n)| n).sum()
    }

    pub fn retransmits_total(&self) -> u64 {
        self.retransmits.iter().map(|&(_, n)| n).sum()
    }

    fn sort_value(&self, key: SortKey) -> f64 {
        match key {
            SortKey::Opened => self.opened.per_second,
            SortKey::Closed => self.closed.per_second,
            SortKey::Failures => self.failures_total() as f64,
            SortKey::Retransmits => self.retransmits_total() as f64,
            SortKey::CloseWait => self.close_wait as f64,
            SortKey::TimeWait => self.time_wait as f64,
        }
    }
}

fn bump(counts: &mut Vec<(&'static str, u64)>, name: &'static str) {
    match counts.iter_mut().find(|(n, _)| *n == name) {
        Some((_, count)) => *count += 1,
        None => counts.push((name, 1)),
    }
}

/// A socket followed from its first transition (or the snapshot) to its CLOSE.
#[derive(Clone, Debug)]
pub struct Socket {
    pub state: TcpState,
    /// When it entered `state`; None when it was in it before tracing began.
    pub since_ns: Option<u64>,
    pub owner: Owner,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

/// A listener that dropped connections.
#[derive(Clone, Debug)]
pub struct Listener {
    pub owner: Owner,
    pub local: (IpAddr, u16),
    pub drops: u64,
    pub backlog: (u32, u32),
}

/// Everything the view shows.
#[derive(Debug)]
pub struct Model {
    /// With `-w`: rows per container.
    by_container: bool,
    /// The counts at the latest and the previous tick, with their times: the census's (BTF mode)
    /// moved on by every transition since it was taken, or the followed sockets'.
    counts: Option<(u64, Counts)>,
    previous: Option<(u64, Counts)>,
    /// The latest census, and what the transitions since changed per state.
    census_base: Option<Counts>,
    since_census: [i64; STATES.len()],
    /// Whether the counts are the kernel's census of every socket, or only what was followed.
    pub census: bool,
    /// How often the census runs (more seldom than the redraw on a host where it costs).
    pub census_interval: Duration,
    sockets: HashMap<u64, Socket, Fast>,
    /// Sockets not followed because [`MAX_SOCKETS`] were.
    pub unfollowed: u64,
    edges: HashMap<(TcpState, TcpState), Edge, Fast>,
    processes: HashMap<Owner, Process, Fast>,
    /// Owners by pid and comm, or (with `-w`) by cgroup id.
    owners: HashMap<(u32, [u8; 16]), Owner, Fast>,
    /// Retransmits per remote address.
    peers: HashMap<IpAddr, u64>,
    listeners: HashMap<(IpAddr, u16), Listener>,
    last_tick_ns: Option<u64>,
    /// Events seen, and events the kernel or the output lost (from the `lost` reports).
    pub events: u64,
    pub lost: u64,
}

impl Model {
    pub fn new(by_container: bool) -> Self {
        Self {
            by_container,
            counts: None,
            previous: None,
            census_base: None,
            since_census: [0; STATES.len()],
            census: false,
            census_interval: Duration::from_secs(1),
            sockets: HashMap::default(),
            unfollowed: 0,
            edges: HashMap::default(),
            processes: HashMap::default(),
            owners: HashMap::default(),
            peers: HashMap::new(),
            listeners: HashMap::new(),
            last_tick_ns: None,
            events: 0,
            lost: 0,
        }
    }

    /// Whose row an event counts in.
    fn owner(&mut self, event: &TcpEvent, cgroup: Option<&Cgroup>) -> Owner {
        let key = if self.by_container {
            let mut id = [0; 16];
            id[..8].copy_from_slice(&event.cgroup_id.to_ne_bytes());
            (0, id)
        } else {
            (event.pid, event.comm)
        };
        if let Some(owner) = self.owners.get(&key) {
            return owner.clone();
        }
        let owner = if self.by_container {
            Owner {
                name: cgroup.map_or("-", Cgroup::short).into(),
                pid: 0,
            }
        } else {
            Owner {
                name: String::from_utf8_lossy(event.comm_bytes()).into(),
                pid: event.pid,
            }
        };
        if self.owners.len() >= OWNERS_CACHED {
            self.owners.clear();
        }
        self.owners.insert(key, owner.clone());
        owner
    }

    /// One event that passed the filters.
    pub fn event(&mut self, event: &TcpEvent, cgroup: Option<&Cgroup>) {
        self.events += 1;
        let owner = self.owner(event, cgroup);
        match event.kind {
            Kind::Snapshot { state } => self.follow(event, state, None, owner),
            Kind::State {
                old,
                new,
                duration_ns,
            } => {
                self.edges
                    .entry((old, new))
                    .or_default()
                    .record(duration_ns);
                self.census_moves(old, new);
                let process = self.processes.entry(owner.clone()).or_default();
                if new == TcpState::Established
                    && matches!(old, TcpState::SynSent | TcpState::SynRecv)
                {
                    process.opened.add(1);
                }
                if new == TcpState::Close && !matches!(old, TcpState::Listen | TcpState::Close) {
                    process.closed.add(1);
                    if let Some(end) = &event.end
                        && end.failed()
                    {
                        bump(&mut process.failures, end.reason.name());
                    }
                }
                if new == TcpState::Close {
                    self.sockets.remove(&key(event));
                } else {
                    self.follow(event, new, Some(event.ts_ns), owner);
                }
            }
            Kind::Retransmit { .. } | Kind::RetransmitSynack => {
                let kind = match (&event.retransmit, event.kind) {
                    (Some(r), _) => r.kind,
                    (None, Kind::RetransmitSynack) => RetransmitKind::Synack,
                    (None, _) => RetransmitKind::Other,
                };
                bump(
                    &mut self.processes.entry(owner).or_default().retransmits,
                    kind.name(),
                );
                *self.peers.entry(event.daddr).or_default() += 1;
            }
            Kind::ListenDrop(drop) => {
                let listener = self
                    .listeners
                    .entry((event.saddr, event.sport))
                    .or_insert_with(|| Listener {
                        owner: owner.clone(),
                        local: (event.saddr, event.sport),
                        drops: 0,
                        backlog: (0, 0),
                    });
                listener.drops += drop.drops();
                listener.backlog = (drop.ack_backlog, drop.max_ack_backlog);
                listener.owner = owner;
            }
            Kind::Handoff { .. } | Kind::Congestion(_) => {}
        }
    }

    /// Events lost on the way (the kernel's ring buffer, the output's queue).
    pub fn lost(&mut self, count: u64) {
        self.lost += count;
    }

    fn follow(&mut self, event: &TcpEvent, state: TcpState, since_ns: Option<u64>, owner: Owner) {
        let socket = Socket {
            state,
            since_ns,
            owner,
            local: (event.saddr, event.sport),
            remote: (event.daddr, event.dport),
        };
        // An accepted socket's first transition comes before its cookie: found again by address.
        let pending = addressed(event.skaddr);
        if event.cookie != 0
            && let Some(first) = self.sockets.remove(&pending)
        {
            self.sockets.insert(
                event.cookie,
                Socket {
                    since_ns: socket.since_ns.or(first.since_ns),
                    ..socket
                },
            );
            return;
        }
        let key = key(event);
        if self.sockets.len() >= MAX_SOCKETS && !self.sockets.contains_key(&key) {
            self.unfollowed += 1;
            return;
        }
        self.sockets.insert(key, socket);
    }

    /// The kernel's count of the host's sockets per state (`ss -tan`), at `now_ns`; the next
    /// comes in `interval`.
    pub fn census_counts(&mut self, now_ns: u64, counts: Counts, interval: Duration) {
        let first = self.census_base.is_none();
        self.census = true;
        self.census_interval = interval;
        self.census_base = Some(counts);
        self.since_census = [0; STATES.len()];
        if first {
            // Counts to show before the first tick.
            self.counts = Some((now_ns, counts));
        }
    }

    /// A transition moves one socket from `old` to `new` in the census's counts until the next
    /// census. A listener's child (LISTEN -> SYN_RECV) is a new socket: the listener stays.
    fn census_moves(&mut self, old: TcpState, new: TcpState) {
        if self.census_base.is_none() {
            return;
        }
        let child = old == TcpState::Listen && new == TcpState::SynRecv;
        if let Some(i) = state_index(old).filter(|_| old != TcpState::Close && !child) {
            self.since_census[i] -= 1;
        }
        if let Some(i) = state_index(new).filter(|_| new != TcpState::Close) {
            self.since_census[i] += 1;
        }
    }

    /// Once a refresh: rates over the interval since the previous tick, medians, the followed
    /// sockets' counts.
    pub fn tick(&mut self, now_ns: u64) {
        let seconds = self.last_tick_ns.map_or(1.0, |last| {
            (now_ns.saturating_sub(last) as f64 / 1e9).max(1e-3)
        });
        self.last_tick_ns = Some(now_ns);
        for edge in self.edges.values_mut() {
            edge.tick(seconds);
        }
        for process in self.processes.values_mut() {
            process.opened.tick(seconds);
            process.closed.tick(seconds);
            process.close_wait = 0;
            process.time_wait = 0;
        }
        let mut followed = Counts::default();
        for socket in self.sockets.values() {
            if let Some(i) = state_index(socket.state) {
                followed[i] += 1;
            }
            let in_close_wait = socket.state == TcpState::CloseWait;
            let in_time_wait = socket.state == TcpState::TimeWait;
            if in_close_wait || in_time_wait {
                let process = self.processes.entry(socket.owner.clone()).or_default();
                process.close_wait += u64::from(in_close_wait);
                process.time_wait += u64::from(in_time_wait);
            }
        }
        // Rows that have nothing to show any more go.
        self.processes.retain(|_, p| {
            p.opened.total + p.closed.total + p.close_wait + p.time_wait > 0
                || !p.failures.is_empty()
                || !p.retransmits.is_empty()
        });
        let counts = match self.census_base {
            Some(base) => {
                let mut counts = base;
                for (count, moved) in counts.iter_mut().zip(self.since_census) {
                    *count = count.saturating_add_signed(moved);
                }
                counts
            }
            None => followed,
        };
        self.previous = self.counts.replace((now_ns, counts));
    }

    /// Sockets per state now, and their change per second since the count before.
    pub fn counts(&self) -> Option<(Counts, [f64; STATES.len()])> {
        let (now, counts) = self.counts?;
        let mut change = [0.0; STATES.len()];
        if let Some((then, before)) = self.previous {
            let seconds = (now.saturating_sub(then) as f64 / 1e9).max(1e-3);
            for (i, c) in change.iter_mut().enumerate() {
                *c = (counts[i] as f64 - before[i] as f64) / seconds;
            }
        }
        Some((counts, change))
    }

    /// When the latest tick was (`CLOCK_MONOTONIC`).
    pub fn now_ns(&self) -> u64 {
        self.last_tick_ns.unwrap_or(0)
    }

    pub fn edge(&self, old: TcpState, new: TcpState) -> Option<&Edge> {
        self.edges.get(&(old, new))
    }

    /// The process table, sorted by `key` (highest first, then by name), rows whose name holds
    /// `filter` (or, when it is a port, rows with a followed socket on it).
    pub fn processes(&self, key: SortKey, filter: &str) -> Vec<(&Owner, &Process)> {
        let port: Option<u16> = filter.parse().ok();
        // By port: the owners of a followed socket on it, found in one pass.
        let on_port: std::collections::HashSet<&Owner, Fast> = match port {
            Some(port) => self
                .sockets
                .values()
                .filter(|s| s.local.1 == port || s.remote.1 == port)
                .map(|s| &s.owner)
                .collect(),
            None => Default::default(),
        };
        let mut rows: Vec<(&Owner, &Process)> = self
            .processes
            .iter()
            .filter(|(owner, _)| match port {
                Some(_) => on_port.contains(owner),
                None => owner.name.contains(filter),
            })
            .collect();
        rows.sort_by(|a, b| {
            b.1.sort_value(key)
                .total_cmp(&a.1.sort_value(key))
                .then_with(|| a.0.cmp(b.0))
        });
        rows
    }

    /// The sockets longest in CLOSE_WAIT (those there before tracing began first).
    pub fn oldest_close_wait(&self, filter: &str) -> Vec<&Socket> {
        let mut waiting: Vec<&Socket> = self
            .sockets
            .values()
            .filter(|s| s.state == TcpState::CloseWait && socket_matches(s, filter))
            .collect();
        waiting.sort_by_key(|s| (s.since_ns.unwrap_or(0), s.local.1, s.remote.1));
        waiting.truncate(LIST_ROWS);
        waiting
    }

    /// Remote addresses by retransmits, most first.
    pub fn peers(&self) -> Vec<(IpAddr, u64)> {
        let mut peers: Vec<(IpAddr, u64)> = self.peers.iter().map(|(&a, &n)| (a, n)).collect();
        peers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        peers.truncate(LIST_ROWS);
        peers
    }

    /// Listeners by drops, most first.
    pub fn listeners(&self, filter: &str) -> Vec<&Listener> {
        let port: Option<u16> = filter.parse().ok();
        let mut listeners: Vec<&Listener> = self
            .listeners
            .values()
            .filter(|l| match port {
                Some(port) => l.local.1 == port,
                None => l.owner.name.contains(filter),
            })
            .collect();
        listeners.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.local.cmp(&b.local)));
        listeners.truncate(LIST_ROWS);
        listeners
    }
}

fn socket_matches(socket: &Socket, filter: &str) -> bool {
    match filter.parse::<u16>() {
        Ok(port) => socket.local.1 == port || socket.remote.1 == port,
        Err(_) => socket.owner.name.contains(filter),
    }
}

/// A socket's key: its cookie, or (tracefs mode, an accepted socket's first transition) its
/// address, marked so that it cannot be a cookie.
fn key(event: &TcpEvent) -> u64 {
    match event.cookie {
        0 => addressed(event.skaddr),
        cookie => cookie,
    }
}

fn addressed(skaddr: u64) -> u64 {
    skaddr | 1 << 63 | 1
}

/// A transition of socket `cookie` (nginx, pid 42, port 80 to 10.0.0.2:40000+cookie) at
/// `ts_s` seconds, 1 ms in the state it left: the unit tests' event.
#[cfg(test)]
pub fn transition(cookie: u64, old: TcpState, new: TcpState, ts_s: u64) -> TcpEvent {
    let mut comm = [0; 16];
    comm[..5].copy_from_slice(b"nginx");
    TcpEvent {
        ts_ns: ts_s * 1_000_000_000,
        skaddr: 0xffff_8881_0000_0000 + cookie * 0x100,
        pid: 42,
        comm,
        saddr: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        sport: 80,
        daddr: IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
        dport: 40000 + cookie as u16,
        kind: Kind::State {
            old,
            new,
            duration_ns: Some(1_000_000),
        },
        retransmits: 0,
        cgroup_id: 0,
        netns: 0,
        comm_of_thread: false,
        thread: None,
        cookie,
        end: None,
        retransmit: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ending::{Ending, Reason};

    fn ending(reason: Reason) -> Option<Ending> {
        Some(Ending {
            reason,
            rst_reason: None,
            error: None,
            bytes_sent: 0,
            bytes_received: 0,
            srtt_us: 0,
            lifetime_ns: 0,
        })
    }

    #[test]
    fn followed_sockets_are_counted_per_state_and_leave_at_close() {
        let mut model = Model::new(false);
        for cookie in 1..=3 {
            model.event(
                &transition(cookie, TcpState::SynRecv, TcpState::Established, 1),
                None,
            );
        }
        model.event(
            &transition(1, TcpState::Established, TcpState::CloseWait, 1),
            None,
        );
        model.event(
            &transition(2, TcpState::Established, TcpState::Close, 1),
            None,
        );
        model.tick(2_000_000_000);
        let (counts, _) = model.counts().unwrap();
        assert_eq!(counts[state_index(TcpState::Established).unwrap()], 1);
        assert_eq!(counts[state_index(TcpState::CloseWait).unwrap()], 1);
        assert_eq!(counts.iter().sum::<u64>(), 2);
        let rows = model.processes(SortKey::Opened, "");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1.close_wait, 1);
        assert_eq!(rows[0].1.opened.total, 3);
        assert_eq!(rows[0].1.closed.total, 1);
    }

    #[test]
    fn rates_are_per_second_over_the_interval_and_medians_of_the_durations() {
        let mut model = Model::new(false);
        model.tick(0);
        for cookie in 1..=10 {
            let mut event = transition(cookie, TcpState::SynSent, TcpState::Established, 1);
            event.kind = Kind::State {
                old: TcpState::SynSent,
                new: TcpState::Established,
                duration_ns: Some(cookie * 1000),
            };
            model.event(&event, None);
        }
        model.tick(2_000_000_000);
        let edge = model
            .edge(TcpState::SynSent, TcpState::Established)
            .unwrap();
        assert_eq!(edge.rate.per_second, 5.0);
        assert_eq!(edge.median_ns, Some(6000));
        model.tick(3_000_000_000);
        let edge = model
            .edge(TcpState::SynSent, TcpState::Established)
            .unwrap();
        assert_eq!(edge.rate.per_second, 0.0);
        assert_eq!(edge.rate.total, 10);
    }

    #[test]
    fn the_census_counts_win_over_the_followed_sockets_and_give_the_change() {
        let mut model = Model::new(false);
        let mut counts = Counts::default();
        counts[state_index(TcpState::TimeWait).unwrap()] = 100;
        model.census_counts(1_000_000_000, counts, Duration::from_secs(1));
        model.tick(1_000_000_000);
        counts[state_index(TcpState::TimeWait).unwrap()] = 40;
        counts[state_index(TcpState::SynRecv).unwrap()] = 1;
        model.census_counts(3_000_000_000, counts, Duration::from_secs(1));
        model.tick(3_000_000_000);
        let (now, change) = model.counts().unwrap();
        assert_eq!(now, counts);
        let tw = state_index(TcpState::TimeWait).unwrap();
        assert_eq!(change[tw], -30.0);
        assert_eq!(
            state_index(TcpState::NewSynRecv),
            state_index(TcpState::SynRecv)
        );
    }

    #[test]
    fn transitions_move_the_census_counts_until_the_next_census() {
        let mut model = Model::new(false);
        let mut counts = Counts::default();
        let index = |state| state_index(state).unwrap();
        counts[index(TcpState::Listen)] = 1;
        counts[index(TcpState::Established)] = 10;
        model.census_counts(0, counts, Duration::from_secs(5));
        // A connection accepted (the listener's child), one closed by its peer, one opened.
        for (old, new) in [
            (TcpState::Listen, TcpState::SynRecv),
            (TcpState::SynRecv, TcpState::Established),
            (TcpState::Established, TcpState::CloseWait),
            (TcpState::Close, TcpState::SynSent),
            (TcpState::SynSent, TcpState::Established),
            (TcpState::Established, TcpState::FinWait1),
            (TcpState::FinWait1, TcpState::Close),
        ] {
            model.event(&transition(1, old, new, 1), None);
        }
        model.tick(1_000_000_000);
        let (now, _) = model.counts().unwrap();
        assert_eq!(now[index(TcpState::Listen)], 1);
        assert_eq!(now[index(TcpState::Established)], 10);
        assert_eq!(now[index(TcpState::CloseWait)], 1);
        assert_eq!(now[index(TcpState::SynRecv)], 0);
        assert_eq!(now[index(TcpState::FinWait1)], 0);
        // The next census is the truth again.
        model.census_counts(2_000_000_000, counts, Duration::from_secs(5));
        model.tick(2_000_000_000);
        assert_eq!(model.counts().unwrap().0, counts);
    }

    #[test]
    fn the_process_table_sorts_by_each_key_and_filters_by_name_or_port() {
        let mut model = Model::new(false);
        let mut other = transition(9, TcpState::Established, TcpState::CloseWait, 1);
        other.pid = 7;
        other.comm = *b"redis-server\0\0\0\0";
        other.sport = 6379;
        model.event(&other, None);
        model.event(
            &transition(1, TcpState::SynRecv, TcpState::Established, 1),
            None,
        );
        let mut reset = transition(2, TcpState::Established, TcpState::Close, 1);
        reset.end = ending(Reason::ResetReceived);
        model.event(&reset, None);
        model.tick(1_000_000_000);
        let names = |key, filter| -> Vec<String> {
            model
                .processes(key, filter)
                .iter()
                .map(|(o, _)| o.name.to_string())
                .collect()
        };
        assert_eq!(names(SortKey::Opened, ""), ["nginx", "redis-server"]);
        assert_eq!(names(SortKey::CloseWait, ""), ["redis-server", "nginx"]);
        assert_eq!(names(SortKey::Failures, ""), ["nginx", "redis-server"]);
        assert_eq!(names(SortKey::Opened, "redis"), ["redis-server"]);
        assert_eq!(names(SortKey::Opened, "6379"), ["redis-server"]);
        let rows = model.processes(SortKey::Failures, "nginx");
        assert_eq!(rows[0].1.failures, [("reset_received", 1)]);
        let mut key = SortKey::Opened;
        for _ in 0..SortKey::ALL.len() {
            key = key.next();
        }
        assert_eq!(key, SortKey::Opened);
    }

    #[test]
    fn an_accepted_socket_is_found_again_when_its_cookie_comes() {
        let mut model = Model::new(false);
        let mut first = transition(5, TcpState::Listen, TcpState::SynRecv, 1);
        first.cookie = 0;
        model.event(&first, None);
        model.event(
            &transition(5, TcpState::SynRecv, TcpState::Established, 1),
            None,
        );
        model.tick(1_000_000_000);
        let (counts, _) = model.counts().unwrap();
        assert_eq!(counts.iter().sum::<u64>(), 1);
        assert_eq!(counts[state_index(TcpState::Established).unwrap()], 1);
    }

    #[test]
    fn the_oldest_close_wait_comes_first_and_snapshot_sockets_before_all() {
        let mut model = Model::new(false);
        model.event(
            &transition(1, TcpState::Established, TcpState::CloseWait, 5),
            None,
        );
        model.event(
            &transition(2, TcpState::Established, TcpState::CloseWait, 3),
            None,
        );
        let mut held = transition(3, TcpState::CloseWait, TcpState::CloseWait, 9);
        held.kind = Kind::Snapshot {
            state: TcpState::CloseWait,
        };
        model.event(&held, None);
        let ports: Vec<u16> = model
            .oldest_close_wait("")
            .iter()
            .map(|s| s.remote.1)
            .collect();
        assert_eq!(ports, [40003, 40002, 40001]);
    }
}
