//! The run loop: drain the ring buffer into the output until a signal says stop.

use std::{io, sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use bytes::BytesMut;
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{MissedTickBehavior, interval},
};

use crate::{
    event::{WallClock, decode},
    loader::{Attached, Loaded},
    metrics::Metrics,
    output::{Destination, Formatter},
    signals::Signals,
};

/// How often the ring buffer is drained when the kernel side has not woken us: the longest an
/// event waits before it is written.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// How often lost events are reported (at most one report per interval).
const LOST_INTERVAL: Duration = Duration::from_secs(1);
/// Output is written in chunks of about this size.
const WRITE_CHUNK: usize = 64 << 10;

/// What a run did, for the exit summary.
#[derive(Debug, Default)]
pub struct Summary {
    pub written: u64,
    pub lost: u64,
    pub malformed: u64,
    /// The reader of our output went away (a closed pipe): stop quietly.
    pub reader_gone: bool,
}

struct Tracer {
    formatter: Formatter,
    destination: Destination,
    metrics: Option<Arc<Metrics>>,
    attached: Attached,
    buf: BytesMut,
    summary: Summary,
}

pub async fn run(
    loaded: Loaded,
    formatter: Formatter,
    destination: Destination,
    metrics: Option<Arc<Metrics>>,
    mut signals: Signals,
) -> anyhow::Result<Summary> {
    let Loaded { events, attached } = loaded;
    let mut tracer = Tracer {
        formatter,
        destination,
        metrics,
        attached,
        buf: BytesMut::with_capacity(2 * WRITE_CHUNK),
        summary: Summary::default(),
    };
    if tracer.destination.is_empty_file() {
        tracer.formatter.header(&mut tracer.buf);
    }
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged while `ring` lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("failed to watch the ring buffer")?;
    let mut drain_tick = interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut lost_tick = interval(LOST_INTERVAL);
    lost_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    eprintln!("tcptrace: tracing; Ctrl-C to stop");

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("failed to wait for the ring buffer")?;
                tracer.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = drain_tick.tick() => tracer.drain(ring.get_mut())?,
            _ = lost_tick.tick() => tracer.report_lost()?,
            _ = signals.hangup.recv() => tracer.reopen()?,
            _ = signals.interrupt.recv() => break,
            _ = signals.terminate.recv() => break,
        }
        if tracer.summary.reader_gone {
            return Ok(tracer.summary);
        }
    }
    // Whatever the kernel wrote before we stopped still goes out.
    tracer.drain(ring.get_mut())?;
    tracer.report_lost()?;
    Ok(tracer.summary)
}

impl Tracer {
    /// Formats every waiting record and writes the lines out.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        let clock = WallClock::sample();
        while let Some(record) = ring.next() {
            match decode(&record) {
                Ok(event) => {
                    self.formatter
                        .event(&mut self.buf, &event, clock.wall_ns(event.ts_ns));
                    if let Some(metrics) = &self.metrics {
                        metrics.record(&event);
                    }
                    self.summary.written += 1;
                }
                Err(_) => self.summary.malformed += 1,
            }
            drop(record);
            if self.buf.len() >= WRITE_CHUNK {
                self.write()?;
            }
        }
        self.write()
    }

    /// Reports events the kernel dropped since the last report.
    fn report_lost(&mut self) -> anyhow::Result<()> {
        let counters = self.attached.counters()?;
        if let Some(metrics) = &self.metrics {
            metrics.update(&counters);
        }
        let total = counters.lost;
        let new = total.saturating_sub(self.summary.lost);
        if new == 0 {
            return Ok(());
        }
        self.summary.lost = total;
        if !self.formatter.lost(&mut self.buf, WallClock::now_ns(), new) {
            eprintln!(
                "tcptrace: warning: {new} events lost (ring buffer full, or program runs the kernel skipped); a larger --ring-buffer-size rides out longer bursts"
            );
        }
        self.write()
    }

    fn reopen(&mut self) -> anyhow::Result<()> {
        self.write()?;
        if let Err(e) = self.destination.reopen() {
            eprintln!("tcptrace: warning: {e:#}; still writing to the file already open");
        }
        Ok(())
    }

    fn write(&mut self) -> anyhow::Result<()> {
        let written = self.destination.write_all(&self.buf);
        self.buf.clear();
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.summary.reader_gone = true;
                Ok(())
            }
            Err(e) => Err(e)
                .with_context(|| format!("failed to write to {}", self.destination.describe())),
        }
    }
}
