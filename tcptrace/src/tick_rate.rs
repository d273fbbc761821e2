//! The kernel's tick rate (`CONFIG_HZ`), for timeouts the kernel keeps in jiffies: from the
//! kernel's build configuration when the host has it, else measured once at start against the
//! monotonic clock (`/proc/timer_list` shows both).

use std::{
    io::{BufRead as _, BufReader},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The tick rates Linux is built with.
const TICK_RATES: [u32; 4] = [100, 250, 300, 1000];

/// How far apart the measurement's two readings are at least: long enough that the rates above
/// differ by many ticks (20, 50, 60 or 200), so that one tick of jitter is within
/// [`TOLERANCE`].
const MEASURE_FOR: Duration = Duration::from_millis(200);

/// How far a measured rate may be from a real one (250 and 300 are 20% apart).
const TOLERANCE: f64 = 0.08;

static HZ: OnceLock<Option<u32>> = OnceLock::new();

/// Finding the tick rate: call [`start`] at start (as root: `/proc/timer_list` is root's), and
/// [`Measurement::finish`] once the eBPF programs are loaded (so the wait overlaps the load).
pub struct Measurement {
    /// The first reading, when the build configuration did not tell.
    first: Option<((u64, u64), Instant)>,
}

/// The build configuration's rate at once when the host has it, else the first reading.
pub fn start() -> Measurement {
    if let Some(hz) = from_build_config() {
        let _ = HZ.set(Some(hz));
        return Measurement { first: None };
    }
    Measurement {
        first: read_timer_list().map(|reading| (reading, Instant::now())),
    }
}

impl Measurement {
    /// The second reading, [`MEASURE_FOR`] after the first at least (waiting what is left).
    pub fn finish(self) {
        HZ.get_or_init(|| self.first.and_then(|(reading, at)| measure(reading, at)));
    }
}

/// The rate from a first reading taken at `at` and a second one, [`MEASURE_FOR`] later at least.
fn measure((jiffies_a, ns_a): (u64, u64), at: Instant) -> Option<u32> {
    std::thread::sleep(MEASURE_FOR.saturating_sub(at.elapsed()));
    let (jiffies_b, ns_b) = read_timer_list()?;
    let elapsed = ns_b.checked_sub(ns_a).filter(|&ns| ns > 0)?;
    nearest(jiffies_b.checked_sub(jiffies_a)? as f64 * 1e9 / elapsed as f64)
}

/// Takes `hz` as the tick rate (unit tests of what converts jiffies).
#[cfg(test)]
pub fn assume(hz: u32) {
    let _ = HZ.set(Some(hz));
}

/// The tick rate, once [`Measurement::finish`] found it.
pub fn hz() -> Option<u32> {
    HZ.get().copied().flatten()
}

/// `jiffies` in milliseconds, when the tick rate is known.
pub fn jiffies_to_ms(jiffies: u32) -> Option<u64> {
    hz().map(|hz| u64::from(jiffies) * 1000 / u64::from(hz))
}

/// The rate Linux is built with nearest to a measured one (within [`TOLERANCE`]).
pub fn nearest(rate: f64) -> Option<u32> {
    TICK_RATES
        .into_iter()
        .find(|&hz| (rate - f64::from(hz)).abs() < f64::from(hz) * TOLERANCE)
}

/// `CONFIG_HZ=` in `/boot/config-<release>` (Debian, Ubuntu, Fedora, RHEL install it).
fn from_build_config() -> Option<u32> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let config = std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    parse_config(&config)
}

fn parse_config(config: &str) -> Option<u32> {
    let hz = config
        .lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))?
        .trim()
        .parse()
        .ok()?;
    TICK_RATES.contains(&hz).then_some(hz)
}

/// `now at N nsecs` and the first `jiffies: N` of `/proc/timer_list` (read no further: the rest
/// lists every CPU's timers).
fn read_timer_list() -> Option<(u64, u64)> {
    let file = std::fs::File::open("/proc/timer_list").ok()?;
    let mut now_ns = None;
    for line in BufReader::new(file).lines().take(10_000) {
        let line = line.ok()?;
        if let Some(ns) = line
            .strip_prefix("now at ")
            .and_then(|rest| rest.strip_suffix(" nsecs"))
        {
            now_ns = ns.parse().ok();
        } else if let Some(jiffies) = line.trim_start().strip_prefix("jiffies: ") {
            return Some((jiffies.parse().ok()?, now_ns?));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_config_gives_the_rate() {
        let config =
            "CONFIG_NO_HZ_IDLE=y\n# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n";
        assert_eq!(parse_config(config), Some(250));
        assert_eq!(parse_config("CONFIG_HZ=123\n"), None);
        assert_eq!(parse_config("CONFIG_HZ_1000=y\n"), None);
    }

    #[test]
    fn a_measured_rate_is_taken_as_the_nearest_real_one() {
        assert_eq!(nearest(251.3), Some(250));
        assert_eq!(nearest(296.0), Some(300));
        assert_eq!(nearest(99.0), Some(100));
        assert_eq!(nearest(990.0), Some(1000));
        assert_eq!(nearest(275.0), None);
        // One tick off in a 200 ms measurement.
        assert_eq!(nearest(95.0), Some(100));
        assert_eq!(nearest(255.0), Some(250));
    }

    #[test]
    fn this_kernel_s_clock_can_be_read_and_measured() {
        // The kernel this runs on (as root, as the tests run): both readings exist, and the
        // rate is a real one.
        let (jiffies, ns) = read_timer_list().expect("/proc/timer_list");
        assert!(jiffies > 0 && ns > 0);
        let rate = measure((jiffies, ns), Instant::now());
        assert!(rate.is_some_and(|hz| TICK_RATES.contains(&hz)), "{rate:?}");
    }
}
