//! The run loop: drain the ring buffer, format the events and hand the lines to the writer thread
//! in chunks, until a signal says stop. It never writes itself, so a blocked output stops neither
//! the draining (until the writer's queue is full) nor signals nor `/metrics`.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use bytes::{Bytes, BytesMut};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{MissedTickBehavior, interval, sleep},
};

use crate::{
    cgroup::Cgroups,
    event::{Kind, TcpEvent, TcpState, WallClock, decode},
    kernel::{Attached, Loaded, Mode, TimewaitScan},
    listen_drops::ListenDropLines,
    metrics::Metrics,
    output::{Chunk, Destination, Formatter, MAX_LINE, Outcome, Room, Writer},
    process_names::ProcessNames,
    signals::Signals,
    timewait::Timewait,
    top::Feed,
};

/// How often the ring buffer is drained when the kernel side has not woken us: the longest an
/// event waits before it is written.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// How often the timewait scan runs (BTF mode) at most: the resolution of the ends of TIME_WAIT
/// and FIN_WAIT2 after close. It walks every TCP socket of the host, so on a host with many the
/// interval grows to keep its cost under 0.5% of a core, up to [`TIMEWAIT_SCAN_MAX_INTERVAL`].
pub const TIMEWAIT_SCAN_INTERVAL: Duration = Duration::from_secs(1);
pub const TIMEWAIT_SCAN_MAX_INTERVAL: Duration = Duration::from_secs(30);
/// The scan's CPU time is kept under 1/this of the time between scans (0.5%).
const TIMEWAIT_SCAN_BUDGET: u32 = 200;
/// How often lost events are reported (at most one report per interval).
const LOST_INTERVAL: Duration = Duration::from_secs(1);
/// Lines are formatted into buffers of this size and go to the writer in chunks cut from them,
/// one after another; a buffer is used again (or freed) once the writer has written every chunk
/// cut from it.
const BUFFER: usize = 256 << 10;
/// After SIGINT or SIGTERM, how long tcptrace waits for a blocked output to take what is queued
/// before it exits anyway; a second signal ends the wait at once.
pub const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// What a run did, for the exit summary.
#[derive(Debug, Default)]
pub struct Summary {
    pub written: u64,
    pub lost: u64,
    pub malformed: u64,
    /// Events the kernel handed over that were not written: the output was still blocked when
    /// the time to flush at exit ran out.
    pub unwritten: u64,
    /// The reader of our output went away (a closed pipe): stop quietly.
    pub reader_gone: bool,
    /// Where listen drops were traced: those counted, `listen_overflow` and `no_socket`.
    pub listen_drops: Option<(u64, u64)>,
}

/// Settings of the run loop from the command line.
pub struct Options {
    /// `--buffer-size`.
    pub buffer_size: usize,
    /// `--max-timewait`.
    pub max_timewait: usize,
    /// `--events connections`, `--failures`: only lines that end connections.
    pub ends_only: bool,
    /// `--failures`: of those, only connections that did not end with a FIN.
    pub failures_only: bool,
    /// Not `--no-time-wait`: follow connections into TIME_WAIT (BTF mode).
    pub time_wait: bool,
    /// `--events congestion`: congestion state changes are written, not only counted.
    pub congestion_lines: bool,
    /// `--events listen-drops`: listen drops are written, not only counted.
    pub listen_drop_lines: bool,
    /// `tcptrace top`: the view every event (and the census) goes to.
    pub top: Option<Feed>,
}

/// The timewait scan and what it follows.
struct Timewaits {
    scan: TimewaitScan,
    tracker: Timewait,
    records: Vec<u8>,
    lines: Vec<TcpEvent>,
}

struct Tracer {
    formatter: Formatter,
    timewaits: Option<Timewaits>,
    ends_only: bool,
    failures_only: bool,
    congestion_lines: bool,
    /// BTF mode, where the kernel reports them: the listen drop table, read once a second.
    listen_drops: Option<ListenDropLines>,
    listen_drop_lines: bool,
    /// The listen drop lines of the latest read.
    listen_drop_events: Vec<TcpEvent>,
    cgroups: Cgroups,
    /// tracefs mode: process names in place of thread names.
    process_names: Option<ProcessNames>,
    metrics: Option<Arc<Metrics>>,
    top: Option<Feed>,
    attached: Attached,
    writer: Writer,
    /// Lines not yet handed to the writer, and how many events they hold.
    buf: BytesMut,
    buf_events: u64,
    /// The buffer before `buf`: used again once the writer is done with it, which saves an
    /// allocation (and cold memory) per buffer while the writer keeps up.
    spare: BytesMut,
    /// A chunk waiting for room in the writer's queue. While one waits the ring buffer is not
    /// read: the kernel holds what it can and counts the rest as lost.
    waiting: Option<Chunk>,
    /// Events taken from the ring buffer and put into chunks.
    chunked: u64,
    lost: u64,
    malformed: u64,
    /// Events dropped by a filter only userspace can apply.
    filtered: u64,
}

pub async fn run(
    loaded: Loaded,
    formatter: Formatter,
    cgroups: Cgroups,
    destination: Destination,
    metrics: Option<Arc<Metrics>>,
    mut signals: Signals,
    options: Options,
) -> anyhow::Result<Summary> {
    let Loaded {
        events,
        attached,
        mode,
        snapshot,
        timewait,
        listen_drops,
        census,
    } = loaded;
    let top = options.top.map(|feed| feed.with_census(census));
    let mut buf = BytesMut::with_capacity(BUFFER);
    if destination.is_empty_file() {
        formatter.header(&mut buf);
    }
    let mut tracer = Tracer {
        formatter,
        timewaits: timewait
            .filter(|_| options.time_wait)
            .map(|scan| Timewaits {
                scan,
                tracker: Timewait::new(options.max_timewait),
                records: Vec::new(),
                lines: Vec::new(),
            }),
        ends_only: options.ends_only,
        failures_only: options.failures_only,
        congestion_lines: options.congestion_lines,
        listen_drops: listen_drops.map(ListenDropLines::new),
        listen_drop_lines: options.listen_drop_lines,
        listen_drop_events: Vec::new(),
        cgroups,
        process_names: (mode == Mode::Tracefs).then(ProcessNames::default),
        metrics,
        top,
        attached,
        writer: Writer::spawn(destination, options.buffer_size)?,
        buf,
        buf_events: 0,
        spare: BytesMut::new(),
        waiting: None,
        chunked: 0,
        lost: 0,
        malformed: 0,
        filtered: 0,
    };
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged while `ring` lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("failed to watch the ring buffer")?;
    let mut drain_tick = interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut lost_tick = interval(LOST_INTERVAL);
    lost_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut listen_drop_tick = interval(crate::listen_drops::INTERVAL);
    listen_drop_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let census = tracer.top.as_ref().is_some_and(Feed::has_census);
    let mut next_census = tokio::time::Instant::now();
    let scans = tracer.timewaits.is_some();
    // The first scan reads the kernel's clock, and what a scan costs on this host.
    let cost = if scans {
        tracer.scan_timewait(true).unwrap_or_else(|e| {
            eprintln!("tcptrace: warning: {e:#}");
            Duration::ZERO
        })
    } else {
        Duration::ZERO
    };
    let mut next_scan = tokio::time::Instant::now() + scan_interval(cost);
    // The sockets that existed at start, before anything that happened since.
    tracer.snapshot(&snapshot);
    eprintln!("tcptrace: tracing ({mode} mode); Ctrl-C to stop");

    loop {
        let waiting = tracer.waiting.as_ref().map(Chunk::cost);
        tokio::select! {
            guard = ring.readable_mut(), if waiting.is_none() => {
                let mut guard = guard.context("failed to wait for the ring buffer")?;
                tracer.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            room = tracer.writer.room(waiting.unwrap_or_default()), if waiting.is_some() => {
                tracer.send_waiting(room);
                tracer.drain(ring.get_mut());
            }
            _ = drain_tick.tick() => {
                tracer.drain(ring.get_mut());
                tracer.attached.flush_log();
            }
            _ = lost_tick.tick() => tracer.report_lost()?,
            _ = listen_drop_tick.tick(), if tracer.listen_drops.is_some() => {
                tracer.read_listen_drops();
            }
            () = tokio::time::sleep_until(next_census), if census => {
                // What the ring buffer holds happened before the census: counted in it, not
                // again on top of it.
                tracer.drain(ring.get_mut());
                if let Some(top) = &mut tracer.top {
                    next_census = tokio::time::Instant::now() + top.take_census(monotonic_ns());
                }
            }
            () = tokio::time::sleep_until(next_scan), if scans && waiting.is_none() => {
                // What the ring buffer holds first: the hand-overs the scan judges.
                tracer.drain(ring.get_mut());
                let cost = tracer.scan_timewait(false).unwrap_or_else(|e| {
                    // Out of descriptors, say: the next scan tries again.
                    eprintln!("tcptrace: warning: {e:#}");
                    Duration::ZERO
                });
                next_scan = tokio::time::Instant::now() + scan_interval(cost);
            }
            outcome = tracer.writer.finished() => return tracer.ended(outcome),
            // `top`: the terminal hung up. Otherwise: reopen the output (logrotate).
            _ = signals.hangup.recv() => if tracer.top.is_some() { break } else { tracer.writer.reopen() },
            _ = signals.interrupt.recv() => break,
            _ = signals.terminate.recv() => break,
        }
    }
    // The drops since the last read get their lines.
    tracer.read_listen_drops();
    // A last scan: connections that entered TIME_WAIT since the last one get their line.
    if scans {
        tracer.drain(ring.get_mut());
        if let Err(e) = tracer.scan_timewait(false) {
            eprintln!("tcptrace: warning: {e:#}");
        }
    }
    tracer.stop(ring.get_mut(), &mut signals).await
}

impl Tracer {
    /// Formats the snapshot's records, each socket once (a socket several processes or
    /// descriptors hold comes once per holder), and hands them to the writer.
    fn snapshot(&mut self, records: &[u8]) {
        let clock = WallClock::sample();
        let mut seen = std::collections::HashSet::new();
        for record in records.chunks(size_of::<tcptrace_common::Event>()) {
            match decode(record) {
                Ok(event) => {
                    if !seen.insert(event.skaddr) {
                        continue;
                    }
                    let Ok(cgroup) = self.cgroups.of(&event) else {
                        continue;
                    };
                    if let Some(top) = &self.top {
                        top.event(&event, cgroup);
                    }
                    self.buf.reserve(MAX_LINE);
                    self.formatter
                        .event(&mut self.buf, &event, clock.wall_ns(event.ts_ns), cgroup);
                    self.buf_events += 1;
                }
                Err(_) => self.malformed += 1,
            }
        }
        self.push();
    }

    /// Formats waiting records into chunks for the writer, as long as its queue has room.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        let clock = WallClock::sample();
        loop {
            self.push();
            if self.waiting.is_some() {
                return;
            }
            // `buf` is empty here. Once its buffer cannot take another line, the spare one if the
            // writer is done with it, a new one otherwise.
            if self.buf.capacity() < MAX_LINE {
                std::mem::swap(&mut self.buf, &mut self.spare);
                if !self.buf.try_reclaim(BUFFER) {
                    self.buf.reserve(BUFFER);
                }
            }
            let before = self.buf_events + self.malformed + self.filtered;
            while self.buf.len() + MAX_LINE <= self.buf.capacity()
                && let Some(record) = ring.next()
            {
                match decode(&record) {
                    Ok(mut event) => {
                        if let Some(names) = &mut self.process_names {
                            names.apply(&mut event);
                        }
                        if let Kind::Handoff { .. } = event.kind {
                            match self.timewaits.as_mut().map(|t| t.tracker.handoff(&event)) {
                                Some(Some(line)) => event = line,
                                Some(None) => {
                                    // Followed, nothing to write yet.
                                    self.filtered += 1;
                                    continue;
                                }
                                // Not followed: the CLOSE the kernel made of the hand-over.
                                None => {
                                    event.kind = Kind::State {
                                        old: event.kind.old_state(),
                                        new: TcpState::Close,
                                        duration_ns: event.kind.duration_ns(),
                                    }
                                }
                            }
                        }
                        self.write(&event, &clock);
                    }
                    Err(_) => self.malformed += 1,
                }
            }
            if self.buf_events + self.malformed + self.filtered == before {
                // The ring buffer is empty.
                return;
            }
        }
    }

    /// Formats one event (and counts it), unless a filter only userspace can apply drops it:
    /// tracefs mode's --cgroup and --container, and for the lines the timewait tracker makes,
    /// `--events connections` and `--failures`. Congestion state changes the metrics asked for
    /// but `--events` did not are counted in the metrics, and not written.
    fn write(&mut self, event: &TcpEvent, clock: &WallClock) {
        let (line, counted) = match event.kind {
            Kind::Congestion(_) => (self.congestion_lines && !self.ends_only, true),
            Kind::ListenDrop(_) => (self.listen_drop_lines && !self.ends_only, true),
            _ => {
                let line = !self.ends_only || self.ends_connection(event);
                (line, line)
            }
        };
        if !counted {
            self.filtered += 1;
            return;
        }
        match self.cgroups.of(event) {
            Ok(cgroup) => {
                if let Some(metrics) = &self.metrics {
                    metrics.record(event, cgroup);
                }
                if let Some(top) = &self.top {
                    top.event(event, cgroup);
                }
                if line {
                    self.formatter
                        .event(&mut self.buf, event, clock.wall_ns(event.ts_ns), cgroup);
                    self.buf_events += 1;
                } else {
                    self.filtered += 1;
                }
            }
            Err(_) => self.filtered += 1,
        }
    }

    /// Whether `event` is a line `--events connections` (or `--failures`) keeps.
    fn ends_connection(&self, event: &TcpEvent) -> bool {
        match (event.kind, &event.end) {
            (
                Kind::State {
                    new: TcpState::Close,
                    ..
                },
                Some(end),
            ) => !self.failures_only || end.failed(),
            // tracefs mode: no reasons, every CLOSE.
            (
                Kind::State {
                    new: TcpState::Close,
                    ..
                },
                None,
            ) => !self.failures_only,
            _ => false,
        }
    }

    /// Runs the timewait scan, when it follows any connection (or `even_if_idle`: the first
    /// scan, whose clock the tracker measures the kernel's tick rate against), and writes what it found:
    /// connections that entered TIME_WAIT, and those whose timewait socket is gone. Returns the
    /// CPU time the scan took.
    fn scan_timewait(&mut self, even_if_idle: bool) -> anyhow::Result<Duration> {
        let Some(timewaits) = &mut self.timewaits else {
            return Ok(Duration::ZERO);
        };
        if timewaits.tracker.is_empty() && !even_if_idle {
            if let Some(metrics) = &self.metrics {
                metrics.timewait(0, timewaits.tracker.untracked);
            }
            return Ok(Duration::ZERO);
        }
        let started_ns = monotonic_ns();
        let cpu_before = thread_cpu_ns();
        timewaits.scan.run(&mut timewaits.records)?;
        let mut lines = std::mem::take(&mut timewaits.lines);
        timewaits
            .tracker
            .scan(&timewaits.records, started_ns, &mut lines);
        let cost = Duration::from_nanos(thread_cpu_ns().saturating_sub(cpu_before));
        if let Some(metrics) = &self.metrics {
            metrics.timewait(
                timewaits.tracker.in_time_wait(),
                timewaits.tracker.untracked,
            );
        }
        self.write_lines(&mut lines);
        if let Some(timewaits) = &mut self.timewaits {
            timewaits.lines = lines;
        }
        self.push();
        Ok(cost)
    }

    /// Hands the waiting chunk, then what `buf` holds, to the writer if its queue has room.
    fn push(&mut self) {
        if let Some(chunk) = self.waiting.take()
            && let Err(chunk) = self.writer.try_send(chunk)
        {
            self.waiting = Some(chunk);
            return;
        }
        if self.buf.is_empty() && self.buf_events == 0 {
            return;
        }
        let chunk = Chunk {
            bytes: if self.buf.is_empty() {
                Bytes::new()
            } else {
                self.buf.split().freeze()
            },
            events: std::mem::take(&mut self.buf_events),
        };
        self.chunked += chunk.events;
        if let Err(chunk) = self.writer.try_send(chunk) {
            self.waiting = Some(chunk);
        }
    }

    fn send_waiting(&mut self, room: Room) {
        if let Some(chunk) = self.waiting.take() {
            self.writer.send(chunk, room);
        }
    }

    /// Writes the lines userspace made (the timewait scan's, the listen drops'), emptying `lines`.
    fn write_lines(&mut self, lines: &mut Vec<TcpEvent>) {
        let clock = WallClock::sample();
        for line in lines.drain(..) {
            if self.buf.capacity() - self.buf.len() < MAX_LINE {
                self.push();
                self.buf.reserve(BUFFER);
            }
            self.write(&line, &clock);
        }
    }

    /// Writes a line per listener whose accept queue dropped connections since the last read.
    fn read_listen_drops(&mut self) {
        let Some(table) = &mut self.listen_drops else {
            return;
        };
        let mut lines = std::mem::take(&mut self.listen_drop_events);
        if let Err(e) = table.read(&mut lines) {
            eprintln!("tcptrace: warning: {e:#}");
        }
        self.write_lines(&mut lines);
        self.listen_drop_events = lines;
        self.push();
    }

    /// Reports events the kernel dropped since the last report.
    fn report_lost(&mut self) -> anyhow::Result<()> {
        let counters = self.attached.counters()?;
        if let Some(metrics) = &self.metrics {
            metrics.update(&counters);
        }
        let total = counters.lost;
        let new = total.saturating_sub(self.lost);
        if new == 0 {
            return Ok(());
        }
        self.lost = total;
        if let Some(top) = &self.top {
            top.lost(new);
        }
        if !self.formatter.lost(&mut self.buf, WallClock::now_ns(), new) {
            eprintln!(
                "tcptrace: warning: {new} events lost (ring buffer full, or program runs the kernel skipped); a larger --ring-buffer-size or --buffer-size rides out longer bursts"
            );
        }
        self.push();
        Ok(())
    }

    /// After SIGINT or SIGTERM: what the kernel handed over still goes out, as far as the output
    /// takes it within [`FLUSH_AT_EXIT`] (or until a second signal).
    async fn stop(
        mut self,
        ring: &mut RingBuf<MapData>,
        signals: &mut Signals,
    ) -> anyhow::Result<Summary> {
        let flush = sleep(FLUSH_AT_EXIT);
        tokio::pin!(flush);
        let mut reported = false;
        let mut gave_up = false;
        loop {
            self.drain(ring);
            let Some(cost) = self.waiting.as_ref().map(Chunk::cost) else {
                if reported {
                    break;
                }
                self.report_lost()?;
                reported = true;
                continue;
            };
            tokio::select! {
                room = self.writer.room(cost) => self.send_waiting(room),
                outcome = self.writer.finished() => return self.ended(outcome),
                () = &mut flush => { gave_up = true; break; }
                _ = signals.interrupt.recv() => { gave_up = true; break; }
                _ = signals.terminate.recv() => { gave_up = true; break; }
            }
        }
        self.writer.close();
        if !gave_up {
            tokio::select! {
                outcome = self.writer.finished() => match outcome {
                    Outcome::Done => {}
                    outcome => return self.ended(outcome),
                },
                () = &mut flush => gave_up = true,
                _ = signals.interrupt.recv() => gave_up = true,
                _ = signals.terminate.recv() => gave_up = true,
            }
        }
        let mut unread = 0;
        if gave_up {
            // What is still in the ring buffer was handed over too, and is not written either.
            while let Some(record) = ring.next() {
                match decode(&record) {
                    Ok(_) => unread += 1,
                    Err(_) => self.malformed += 1,
                }
            }
        }
        // Losses since the last report count too: a blocked output is given up on without one
        // (kernel runs skipped while the output waited are lost events all the same).
        if let Ok(counters) = self.attached.counters() {
            self.lost = self.lost.max(counters.lost);
        }
        let written = self.writer.written();
        Ok(Summary {
            written,
            lost: self.lost,
            malformed: self.malformed,
            unwritten: (self.chunked + self.buf_events + unread).saturating_sub(written),
            reader_gone: false,
            listen_drops: self.listen_drops_counted(),
        })
    }

    /// The writer ended while tracing: the reader went away, or a write failed.
    fn ended(self, outcome: Outcome) -> anyhow::Result<Summary> {
        match outcome {
            Outcome::ReaderGone => Ok(Summary {
                reader_gone: true,
                ..Summary::default()
            }),
            Outcome::Failed(e) => Err(e),
            Outcome::Done => Ok(Summary {
                written: self.writer.written(),
                lost: self.lost,
                malformed: self.malformed,
                listen_drops: self.listen_drops_counted(),
                ..Summary::default()
            }),
        }
    }

    /// The listen drops the kernel side counted, where it traces them.
    fn listen_drops_counted(&self) -> Option<(u64, u64)> {
        self.listen_drops.as_ref()?;
        let counters = self.attached.counters().ok()?;
        Some((counters.listen_overflow, counters.listen_no_socket))
    }
}

/// The time to the next timewait scan after one that cost `cost` of CPU: its budget's worth.
fn scan_interval(cost: Duration) -> Duration {
    (cost * TIMEWAIT_SCAN_BUDGET).clamp(TIMEWAIT_SCAN_INTERVAL, TIMEWAIT_SCAN_MAX_INTERVAL)
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the kernel side's clock.
pub(crate) fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time this thread has used (user and system), in nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer; these clocks cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
