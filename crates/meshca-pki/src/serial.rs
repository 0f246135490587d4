//! Certificate serial numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PkiError;

/// A certificate serial number, kept as its minimal big-endian magnitude.
///
/// New serials have 128 bits from the system CSPRNG (CA/B Forum asks for at
/// least 64); the DER encoding adds a zero byte when the top bit is set, so
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
