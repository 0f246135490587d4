//! Certificate serial numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PkiError;

/// A certificate serial number, kept as its minimal big-endian magnitude.
///
/// New serials are 16 bytes: [`Serial::time_ordered`] for leaves (what the
/// authority issues), [`Serial::random`] (128 CSPRNG bits) for CA
/// certificates; the DER encoding adds a zero byte when the top bit is set, so
/// the value is always positive and at most 17 bytes long.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Serial(Vec<u8>);

impl Serial {
    /// A fresh random serial: 16 bytes with a non-zero first byte, so that the
    /// number really has 128 bits and its encoding is minimal.
    pub fn random() -> Result<Self, PkiError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut bytes = [0u8; 16];
        loop {
            aws_lc_rs::rand::SecureRandom::fill(&rng, &mut bytes).map_err(|_| PkiError::Random)?;
            if bytes[0] != 0 {
                return Ok(Serial(bytes.to_vec()));
            }
        }
    }

    /// A fresh serial that sorts by issuance time: the first 6 bytes are the
    /// Unix time in milliseconds, the other 10 (80 bits, CA/B Forum asks for
    /// 64) come from the system CSPRNG. The store keys certificates by
    /// serial, so serials issued together land in the same B-tree leaf: a
    /// group commit writes a few pages instead of one per certificate. The
    /// first byte is 0x01 from 2004 to 2039 and larger after, never zero, so
    /// the number keeps 16 bytes.
    pub fn time_ordered(now: time::OffsetDateTime) -> Result<Self, PkiError> {
        let ms = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        let rng = aws_lc_rs::rand::SystemRandom::new();
        aws_lc_rs::rand::SecureRandom::fill(&rng, &mut bytes[6..]).map_err(|_| PkiError::Random)?;
        Ok(Serial::from_bytes(&bytes))
    }

    /// From the magnitude bytes of a certificate (leading zeros dropped).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Serial(bytes[first..].to_vec())
    }

    /// The magnitude bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lower-case hex without separators: the form used in the store, the API
    /// and on the command line.
    pub fn to_hex(&self) -> String {
        if self.0.is_empty() {
            "00".to_owned()
        } else {
            hex::encode(&self.0)
        }
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

impl FromStr for Serial {
    type Err = PkiError;
    /// Accepts hex in either case, with or without `:` separators (as openssl
    /// prints them) and an optional `0x`.
    fn from_str(s: &str) -> Result<Self, PkiError> {
        let bad = |reason: &str| PkiError::InvalidName {
            field: "serial",
            value: s.to_owned(),
            reason: reason.to_owned(),
        };
        let t = s.trim();
        let t = t.strip_prefix("0x").unwrap_or(t);
        let mut digits: String = t.chars().filter(|c| *c != ':').collect();
        if digits.is_empty() || digits.len() > 42 {
            return Err(bad("expected 1 to 40 hex digits"));
        }
        if digits.len() % 2 == 1 {
            digits.insert(0, '0');
        }
        let bytes = hex::decode(&digits).map_err(|_| bad("not hexadecimal"))?;
        Ok(Serial::from_bytes(&bytes))
    }
}

impl TryFrom<String> for Serial {
    type Error = PkiError;
    fn try_from(s: String) -> Result<Self, PkiError> {
        s.parse()
    }
}

impl From<Serial> for String {
    fn from(s: Serial) -> String {
        s.to_hex()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn random_serials_are_128_bit_and_distinct() {
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let s = Serial::random().unwrap();
            assert_eq!(s.as_bytes().len(), 16);
            assert_ne!(s.as_bytes()[0], 0);
            assert!(seen.insert(s));
        }
    }

    #[test]
    fn time_ordered_serials_sort_by_time_and_keep_80_random_bits() {
        let t0 = time::macros::datetime!(2026-11-23 12:00 UTC);
        let mut seen = HashSet::new();
        let mut last: Option<Serial> = None;
        for i in 0..2_000i64 {
            let s = Serial::time_ordered(t0 + time::Duration::milliseconds(i)).unwrap();
            assert_eq!(s.as_bytes().len(), 16, "{s}");
            assert_eq!(s.as_bytes()[0], 0x01, "{s}");
            assert!(
                seen.insert(s.as_bytes()[6..].to_vec()),
                "random part repeats"
            );
            if let Some(prev) = &last {
                assert!(prev.to_hex() < s.to_hex(), "{prev} then {s}");
            }
            last = Some(s);
        }
        // Same millisecond: the same prefix, different random parts.
        let a = Serial::time_ordered(t0).unwrap();
        let b = Serial::time_ordered(t0).unwrap();
        assert_eq!(a.as_bytes()[..6], b.as_bytes()[..6]);
        assert_ne!(a, b);
    }

    #[test]
    fn parses_openssl_forms() {
        let s: Serial = "0A:1b:FF".parse().unwrap();
        assert_eq!(s.to_hex(), "0a1bff");
        assert_eq!("abc".parse::<Serial>().unwrap().to_hex(), "0abc");
        assert!("xyz".parse::<Serial>().is_err());
        assert!("".parse::<Serial>().is_err());
    }

    proptest! {
        #[test]
        fn hex_round_trips(bytes in proptest::collection::vec(1u8..=255, 1..20)) {
            let s = Serial::from_bytes(&bytes);
            prop_assert_eq!(s.to_hex().parse::<Serial>().unwrap(), s);
        }
    }
}
