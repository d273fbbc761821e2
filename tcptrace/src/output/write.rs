//! Small writers for the hot path: numbers, addresses and times appended to a byte buffer without
//! the formatting machinery (the JSON and text formats share them).

use std::{fmt::Write as _, net::IpAddr};

use bytes::{BufMut as _, BytesMut};

use super::Utc;

pub fn uint(out: &mut BytesMut, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
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
    out.extend_from_slice(b"0x");
    let width = (16 - (n.leading_zeros() / 4) as usize).max(1);
    for i in (0..width).rev() {
        out.put_u8(DIGITS[((n >> (i * 4)) & 0xf) as usize]);
    }
}

/// `n` as exactly `width` decimal digits (zero-padded; higher digits dropped).
pub fn fixed(out: &mut BytesMut, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// RFC 3339, UTC, nanoseconds: `2026-11-25T13:45:07.000000042Z`.
pub fn rfc3339(out: &mut BytesMut, wall_ns: u64) {
    let Utc {
        year,
        month,
        day,
        hour,
        minute,
        second,
        nanos,
    } = Utc::from_unix_ns(wall_ns);
    fixed(out, year.clamp(0, 9999) as u64, 4);
    out.put_u8(b'-');
    fixed(out, month.into(), 2);
    out.put_u8(b'-');
    fixed(out, day.into(), 2);
    out.put_u8(b'T');
    fixed(out, hour.into(), 2);
    out.put_u8(b':');
    fixed(out, minute.into(), 2);
    out.put_u8(b':');
    fixed(out, second.into(), 2);
    out.put_u8(b'.');
    fixed(out, nanos.into(), 9);
    out.put_u8(b'Z');
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
        for n in [0u64, 1, 9, 10, 65535, u64::MAX] {
            assert_eq!(text(|o| uint(o, n)), n.to_string());
            assert_eq!(text(|o| hex(o, n)), format!("{n:#x}"));
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
    }
}
