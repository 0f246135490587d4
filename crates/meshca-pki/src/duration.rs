//! Durations written the Go way (`24h`, `90m`, `1.5h`, `1h30m`, `10s`).
//!
//! Go's `time.ParseDuration` is the syntax operators already know from
//! Kubernetes, Vault and cert-manager, so lifetimes are written the same way
//! here. Negative durations are refused (a lifetime cannot be negative) and
//! the result must fit in 64 bits of nanoseconds, as in Go.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::PkiError;

const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
];

fn err(input: &str, reason: &'static str) -> PkiError {
    PkiError::InvalidDuration {
        input: input.to_owned(),
        reason,
    }
}

/// Parses a Go duration string.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(meshca_pki::parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
/// assert_eq!(meshca_pki::parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
/// assert!(meshca_pki::parse_duration("1 hour").is_err());
/// ```
pub fn parse_duration(input: &str) -> Result<Duration, PkiError> {
    let mut s = input;
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    } else if s.starts_with('-') {
        return Err(err(input, "negative durations are not allowed"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err(input, "empty duration"));
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        // Integer part.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(int_len);
        s = rest;
        // Fraction.
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(err(input, "expected a number"));
        }
        // Unit.
        let unit_len = s
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(s.len(), |(i, _)| i);
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        if unit.is_empty() {
            return Err(err(input, "missing unit (ns, us, ms, s, m, h)"));
        }
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(err(input, "unknown unit (use ns, us, ms, s, m, h)"));
        };
        let too_big = || err(input, "too large (at most about 2562047h)");
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| too_big())?
        };
        let mut value = int.checked_mul(scale).ok_or_else(too_big)?;
        // Fraction digits beyond what the unit can resolve are dropped, as Go does.
        let mut place = scale;
        for d in frac_part.bytes() {
            place /= 10;
            if place == 0 {
                break;
            }
            value += u128::from(d - b'0') * place;
        }
        total = total.checked_add(value).ok_or_else(too_big)?;
        if total > u128::from(i64::MAX as u64) {
            return Err(too_big());
        }
    }
    let nanos = u64::try_from(total).map_err(|_| err(input, "too large"))?;
    Ok(Duration::from_nanos(nanos))
}

/// Formats a duration the Go way, leaving out zero parts: `24h`, `1h30m`,
/// `1m30.5s`, `0s`. `parse_duration(format_duration(d)) == d` for every `d`
/// that `parse_duration` can return.
pub fn format_duration(d: Duration) -> String {
    let total = d.as_nanos();
    if total == 0 {
        return "0s".to_owned();
    }
    let h = total / 3_600_000_000_000;
    let m = (total / 60_000_000_000) % 60;
    let ns = total % 60_000_000_000;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if ns > 0 {
        let secs = ns / 1_000_000_000;
        let frac = ns % 1_000_000_000;
        if frac == 0 {
            out.push_str(&format!("{secs}s"));
        } else {
            let digits = format!("{frac:09}");
            out.push_str(&format!("{secs}.{}s", digits.trim_end_matches('0')));
        }
    }
    out
}

/// Says how long a span is in words, with its two largest units:
/// `9 years 364 days`, `23 hours 59 minutes`, `42 seconds`.
pub fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    let parts = [
        (secs / (365 * 86_400), "year"),
        ((secs / 86_400) % 365, "day"),
        ((secs / 3_600) % 24, "hour"),
        ((secs / 60) % 60, "minute"),
        (secs % 60, "second"),
    ];
    let words: Vec<String> = parts
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n} {unit}{}", if *n == 1 { "" } else { "s" }))
        .collect();
    if words.is_empty() {
        "0 seconds".to_owned()
    } else {
        words.join(" ")
    }
}

/// A [`Duration`] that reads and writes itself in Go syntax, for config files,
/// flags and JSON.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// The wrapped duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Debug for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl FromStr for GoDuration {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(GoDuration)
    }
}

impl From<Duration> for GoDuration {
    fn from(d: Duration) -> Self {
        GoDuration(d)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn go_examples() {
        let h = Duration::from_secs(3600);
        assert_eq!(parse_duration("24h").unwrap(), 24 * h);
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(
            parse_duration("2h45m10.5s").unwrap(),
            Duration::from_millis(9_910_500)
        );
        assert_eq!(parse_duration(".5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1µs").unwrap(), Duration::from_micros(1));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("87600h").unwrap(), 87600 * h);
    }

    #[test]
    fn bad_durations_quote_the_input() {
        for bad in [
            "",
            "h",
            "1",
            "1x",
            "1 h",
            "-1h",
            "1h-",
            "1..5h",
            ".h",
            "1hh",
            "24H",
            "999999999999h",
            "1e3s",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_duration(Duration::from_secs(86400)), "24h");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn humanizes() {
        assert_eq!(humanize(Duration::from_secs(86399)), "23 hours 59 minutes");
        assert_eq!(humanize(Duration::from_secs(87600 * 3600)), "10 years");
        assert_eq!(humanize(Duration::from_secs(61)), "1 minute 1 second");
        assert_eq!(humanize(Duration::ZERO), "0 seconds");
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(n in 0u64..=(i64::MAX as u64)) {
            let d = Duration::from_nanos(n);
            prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }

        #[test]
        fn parser_never_panics_and_accepts_only_ascii_forms(s in "\\PC{0,24}") {
            if let Ok(d) = parse_duration(&s) {
                // Whatever was accepted formats to something that parses back the same.
                prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
            }
        }

        #[test]
        fn hours_and_minutes_add_up(h in 0u64..100_000, m in 0u64..60) {
            let d = parse_duration(&format!("{h}h{m}m")).unwrap();
            prop_assert_eq!(d, Duration::from_secs(h * 3600 + m * 60));
        }
    }
}
