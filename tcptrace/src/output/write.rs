//! Small writers for the hot path: numbers, addresses and times appended to a byte buffer without
//! the formatting machinery (the JSON and text formats share them).

use std::{cell::Cell, fmt::Write as _, net::IpAddr};

use bytes::{BufMut as _, BytesMut};

use super::Utc;

/// Appends `bytes`. Inlined, so that a literal's copy is a few moves: `extend_from_slice` calls
/// `memcpy` for each piece, and a line has some thirty (a fifth of its formatting time).
#[inline(always)]
pub fn put(out: &mut BytesMut, bytes: &[u8]) {
    let len = out.len();
    if out.capacity() - len < bytes.len() {
        out.reserve(bytes.len());
    }
    // SAFETY: the room was reserved above; the bytes written are then part of `out`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr().add(len), bytes.len());
        out.set_len(len + bytes.len());
    }
}

/// `n` in decimal. The digits go straight into `out`: copying them from a buffer of their own
/// is a `memcpy` call per number, a dozen to a line.
pub fn uint(out: &mut BytesMut, n: impl Into<u64>) {
    const PAIRS: &[u8; 200] = b"\
        0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut n: u64 = n.into();
    let digits = decimal_digits(n);
    out.reserve(digits);
    let len = out.len();
    // SAFETY: `digits` bytes were reserved past `len`; each is written below, two at a time
    // from the last, before they become part of `out`.
    unsafe {
        let dst = out.as_mut_ptr().add(len);
        // While `n` has two digits or more, as many places are left before `end`.
        let mut end = digits;
        while n >= 10 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            *dst.add(end - 1) = PAIRS[pair + 1];
            *dst.add(end - 2) = PAIRS[pair];
            end -= 2;
        }
        if end == 1 {
            *dst = b'0' + n as u8;
        }
        out.set_len(len + digits);
    }
}

/// `n` in decimal, signed.
pub fn int(out: &mut BytesMut, n: impl Into<i64>) {
    let n: i64 = n.into();
    if n < 0 {
        out.put_u8(b'-');
    }
    uint(out, n.unsigned_abs());
}

/// How many decimal digits `n` has (1 for 0).
fn decimal_digits(n: u64) -> usize {
    let mut digits = 1;
    let mut bound = 10u64;
    while digits < 20 && n >= bound {
        digits += 1;
        bound = bound.saturating_mul(10);
    }
    digits
}

/// An address in its usual text form.
pub fn ip(out: &mut BytesMut, addr: IpAddr) {
    match addr {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            uint(out, a);
            out.put_u8(b'.');
            uint(out, b);
            out.put_u8(b'.');
            uint(out, c);
            out.put_u8(b'.');
            uint(out, d);
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `0x` and lowercase hex digits, no leading zeros.
pub fn hex(out: &mut BytesMut, n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let width = (16 - (n.leading_zeros() / 4) as usize).max(1);
    let mut text = *b"0x0000000000000000";
    for (i, slot) in text[2..2 + width].iter_mut().rev().enumerate() {
        *slot = DIGITS[((n >> (i * 4)) & 0xf) as usize];
    }
    put(out, &text[..2 + width]);
}

/// `n` as exactly `width` decimal digits (zero-padded; higher digits dropped), `width` <= 20.
pub fn fixed(out: &mut BytesMut, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let width = width.min(digits.len());
    for slot in digits[..width].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    put(out, &digits[..width]);
}

/// `2026-11-25T13:45:07.`: the part of an RFC 3339 time one second shares.
type SecondPrefix = [u8; 20];

thread_local! {
    /// The second last formatted and its prefix: events come in order, many to a second, and
    /// the civil date of each is the costliest part of a line.
    static LAST_SECOND: Cell<(u64, SecondPrefix)> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// RFC 3339, UTC, nanoseconds: `2026-11-25T13:45:07.000000042Z`.
pub fn rfc3339(out: &mut BytesMut, wall_ns: u64) {
    let second = wall_ns / 1_000_000_000;
    let prefix = LAST_SECOND.with(|last| {
        let (cached, prefix) = last.get();
        if cached == second {
            return prefix;
        }
        let prefix = second_prefix(wall_ns);
        last.set((second, prefix));
        prefix
    });
    put(out, &prefix);
    fixed(out, wall_ns % 1_000_000_000, 9);
    out.put_u8(b'Z');
}

fn second_prefix(wall_ns: u64) -> SecondPrefix {
    let Utc {
        year,
        month,
        day,
        hour,
        minute,
        second,
        nanos: _,
    } = Utc::from_unix_ns(wall_ns);
    let mut prefix = *b"0000-00-00T00:00:00.";
    let mut digits = |at: usize, width: usize, mut n: u64| {
        for slot in prefix[at..at + width].iter_mut().rev() {
            *slot = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    digits(0, 4, year.clamp(0, 9999) as u64);
    digits(5, 2, month.into());
    digits(8, 2, day.into());
    digits(11, 2, hour.into());
    digits(14, 2, minute.into());
    digits(17, 2, second.into());
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut BytesMut)) -> String {
        let mut out = BytesMut::new();
        f(&mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn writers_match_the_standard_formatting() {
        for n in [
            0u64,
            1,
            9,
            10,
            11,
            99,
            100,
            101,
            999,
            1000,
            65535,
            4_026_531_833,
            u64::MAX / 10,
            u64::MAX,
        ] {
            assert_eq!(text(|o| uint(o, n)), n.to_string());
            assert_eq!(text(|o| hex(o, n)), format!("{n:#x}"));
        }
        for n in [0i64, -1, 7, -110, i64::MIN, i64::MAX] {
            assert_eq!(text(|o| int(o, n)), n.to_string());
        }
        for addr in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "10.20.30.4",
            "::1",
            "fe80::1:2",
            "::ffff:1.2.3.4",
        ] {
            let addr: IpAddr = addr.parse().unwrap();
            assert_eq!(text(|o| ip(o, addr)), addr.to_string());
        }
        assert_eq!(text(|o| fixed(o, 42, 9)), "000000042");
        assert_eq!(
            text(|o| rfc3339(o, 1_795_614_307_000_000_042)),
            "2026-11-25T13:45:07.000000042Z"
        );
        assert_eq!(text(|o| rfc3339(o, 0)), "1970-01-01T00:00:00.000000000Z");
        // The same second again (its prefix cached), the next, and back.
        assert_eq!(
            text(|o| rfc3339(o, 999_999_999)),
            "1970-01-01T00:00:00.999999999Z"
        );
        assert_eq!(
            text(|o| rfc3339(o, 1_000_000_000)),
            "1970-01-01T00:00:01.000000000Z"
        );
        assert_eq!(
            text(|o| rfc3339(o, 1_795_614_307_000_000_042)),
            "2026-11-25T13:45:07.000000042Z"
        );
    }
}
