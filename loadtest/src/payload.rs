//! The probe carried inside every chat message the load generator sends: which step and sender
//! it belongs to, its sequence number and its send time, padded to the requested size. Receivers
//! decode it from the delivered text to count deliveries and compute end-to-end latency.
//!
//! Text format (ASCII, no characters that JSON must escape):
//! `lg1 <step> <sender> <seq> <sent_unix_us> ` followed by `.` padding.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: &str = "lg1 ";

/// Identity and send time of one generated message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub step: u32,
    pub sender: u32,
    pub seq: u64,
    /// Wall clock at send, Unix microseconds.
    pub sent_us: u64,
}

impl Probe {
    /// Write the probe into `out` (cleared first), padded with `.` to `size` bytes. A `size`
    /// smaller than the probe itself yields just the probe.
    pub fn encode_into(&self, size: usize, out: &mut String) {
        out.clear();
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "{MAGIC}{} {} {} {} ",
            self.step, self.sender, self.seq, self.sent_us
        );
        while out.len() < size {
            out.push('.');
        }
    }

    /// Read a probe from a delivered message; `None` for text that is not one. Runs for every
    /// delivery, so the four numbers are parsed by hand (accepting what `str::parse` accepts: an
    /// optional `+`, then digits, without overflow).
    pub fn decode(text: &str) -> Option<Probe> {
        let mut rest = text.strip_prefix(MAGIC)?.as_bytes();
        let mut field = || {
            // Each number ends at a space; the last one's space starts the padding.
            let end = rest.iter().position(|&b| b == b' ')?;
            let n = parse_decimal(&rest[..end]);
            rest = &rest[end + 1..];
            n
        };
        let step = u32::try_from(field()?).ok()?;
        let sender = u32::try_from(field()?).ok()?;
        let seq = field()?;
        let sent_us = field()?;
        Some(Probe {
            step,
            sender,
            seq,
            sent_us,
        })
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    let digits = digits.strip_prefix(b"+").unwrap_or(digits);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Wall clock now, Unix microseconds. Senders and receivers run in one process (or on hosts
/// with synchronised clocks), so the difference to [`Probe::sent_us`] is the end-to-end latency.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_padding() {
        let p = Probe {
            step: 3,
            sender: 17,
            seq: 123_456,
            sent_us: 1_732_532_000_123_456,
        };
        let mut s = String::new();
        p.encode_into(64, &mut s);
        assert_eq!(s.len(), 64);
        assert!(s.starts_with("lg1 3 17 123456 1732532000123456 ."));
        assert_eq!(Probe::decode(&s), Some(p));
    }

    #[test]
    fn size_below_probe_length_keeps_the_probe_whole() {
        let p = Probe {
            step: 0,
            sender: 0,
            seq: 0,
            sent_us: 1,
        };
        let mut s = String::new();
        p.encode_into(1, &mut s);
        assert_eq!(s, "lg1 0 0 0 1 ");
        assert_eq!(Probe::decode(&s), Some(p));
    }

    #[test]
    fn decoding_agrees_with_str_parse() {
        assert_eq!(
            Probe::decode("lg1 +1 2 3 4 ..."),
            Some(Probe {
                step: 1,
                sender: 2,
                seq: 3,
                sent_us: 4
            })
        );
        assert_eq!(
            Probe::decode("lg1 4294967295 0 18446744073709551615 0 "),
            Some(Probe {
                step: u32::MAX,
                sender: 0,
                seq: u64::MAX,
                sent_us: 0
            })
        );
    }

    #[test]
    fn foreign_text_is_not_a_probe() {
        for t in [
            "hello",
            "lg1 ",
            "lg1 1 2 3",
            "lg1 1 2 3 4",
            "lg1 a 2 3 4 ",
            "lg2 1 2 3 4 ",
            "lg1 1 2 3 -4 ",
            "lg1 1 2 3 4x ",
            "lg1 1  3 4 ",
            "lg1 + 2 3 4 ",
            "lg1 4294967296 2 3 4 ",
            "lg1 1 2 3 18446744073709551616 ",
        ] {
            assert_eq!(Probe::decode(t), None, "{t:?}");
        }
    }
}
