//! The consumer side of tcptrace alone: how many ring buffer records per second decoding and JSON
//! formatting sustain on one core, written out in the same 64 KiB chunks as the tracer writes.
//! `cargo xtask bench` runs it; it prints `events_per_second N`.

use std::{io::Write as _, time::Instant};

use tcptrace::{
    event::{WallClock, decode},
    output::Formatter,
};
use tcptrace_common::{AF_INET, AF_INET6, Bytes16, EVENT_HAS_DURATION, Event, KIND_STATE};

fn main() {
    let events: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000_000);
    // Records as the kernel side writes them: both families, every transition of a connection.
    let records: Vec<Vec<u8>> = (0..20u16)
        .map(|i| {
            let v6 = i % 2 == 1;
            let mut raw = Event {
                ts_ns: 1_000_000_000 + u64::from(i) * 1_000,
                skaddr: 0xffff_8881_0698_0000 + u64::from(i) * 0x40,
                duration_ns: 12_345 * u64::from(i),
                comm: Bytes16(*b"nginx-worker\0\0\0\0"),
                pid: 31_337,
                kind: KIND_STATE,
                flags: EVENT_HAS_DURATION,
                family: if v6 { AF_INET6 } else { AF_INET },
                sport: 40_000 + i,
                dport: 443,
                oldstate: 1 + u32::from(i % 11),
                newstate: 1 + u32::from((i + 1) % 11),
                ..Event::default()
            };
            if v6 {
                raw.saddr = Bytes16(
                    "2001:db8::1"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                );
                raw.daddr = Bytes16(
                    "2001:db8::beef"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                );
            } else {
                raw.saddr.0[..4].copy_from_slice(&[10, 1, 2, 3]);
                raw.daddr.0[..4].copy_from_slice(&[192, 168, 100, 200]);
            }
            // SAFETY: plain data viewed as bytes.
            unsafe { std::slice::from_raw_parts((&raw const raw).cast::<u8>(), size_of::<Event>()) }
                .to_vec()
        })
        .collect();
    let formatter = Formatter::Json;
    let mut sink = std::fs::File::create("/dev/null").expect("/dev/null");
    let mut buf = bytes::BytesMut::with_capacity(128 << 10);
    let mut bytes = 0u64;
    let start = Instant::now();
    let clock = WallClock::sample();
    for i in 0..events {
        let record = &records[(i % records.len() as u64) as usize];
        let event = decode(record).expect("valid record");
        formatter.event(&mut buf, &event, clock.wall_ns(event.ts_ns), None);
        if buf.len() >= 64 << 10 {
            bytes += buf.len() as u64;
            sink.write_all(&buf).expect("write");
            buf.clear();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("events_per_second {:.0}", events as f64 / elapsed);
    println!("bytes_per_event {:.1}", bytes as f64 / events as f64);
}
