//! Authenticating the records of a shared store, so that write access to
//! etcd is not the CA's authority.
//!
//! Every value that grants authority (certificate, hierarchy and token
//! records, blobs: the shared configuration, the CRL, agent reports) is
//! stored in an envelope carrying an HMAC-SHA256 tag. The MAC key is derived
//! from the seal key with HKDF-SHA256 under its own label, so it is never the
//! key that seals CA keys, and etcd never sees either.
//!
//! Envelope: `mac-v1:`, the tag as 64 lower-case hex digits, `:`, then the
//! value exactly as meshca wrote it (JSON stays readable with `etcdctl get`).
//! The tag covers the length of the etcd key (8 bytes, big-endian), the key
//! itself (the store's prefix included) and the value: a record copied to
//! another key, or under another prefix, no longer checks. Tags are
//! compared in constant time ([`aws_lc_rs::hmac::verify`]).
//!
//! What the tag does not cover: when the value was written. An older value
//! that meshca wrote at the same key checks as well as the newest one.

use std::fmt;

use aws_lc_rs::{hkdf, hmac};
use meshca_pki::SealKey;

/// HKDF salt (public, fixed): separates this derivation from any other use
/// of the seal key's bytes.
const SALT: &[u8] = b"meshca record authentication";
/// HKDF info: what the derived key is for, and the envelope's version.
const LABEL: &[u8] = b"meshca etcd record mac v1";
/// How an authenticated value starts.
pub(crate) const ENVELOPE: &[u8] = b"mac-v1:";
/// Hex digits of an HMAC-SHA256 tag.
const TAG_HEX: usize = 64;

/// The key records are authenticated with. Its `Debug` prints `...`.
#[derive(Clone)]
pub(crate) struct RecordKey(hmac::Key);

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordKey(...)")
    }
}

/// Why a stored value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No envelope: written by a meshca that did not authenticate records,
    /// or by someone else.
    NoMac,
    /// An envelope that does not parse.
    Malformed,
    /// The tag does not match the key and value.
    Mismatch,
}

impl Refusal {
    /// For logs and errors.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::NoMac => {
                "it carries no MAC: written by a meshca that did not authenticate records, or by someone else"
            }
            Refusal::Malformed => "its MAC envelope is malformed",
            Refusal::Mismatch => {
                "its MAC does not match its key and value: altered, moved from another key, or made with another seal key"
            }
        }
    }
}

/// What the tag is computed over: the key's length, the key, the value.
fn message(key: &[u8], value: &[u8]) -> Vec<u8> {
    let len = u64::try_from(key.len()).unwrap_or(u64::MAX);
    let mut m = Vec::with_capacity(8 + key.len() + value.len());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(key);
    m.extend_from_slice(value);
    m
}

/// Whether a stored value is in an envelope (whether or not it checks).
pub(crate) fn is_enveloped(stored: &[u8]) -> bool {
    stored.starts_with(ENVELOPE)
}

impl RecordKey {
    /// The record key of a seal key (HKDF-SHA256, its own salt and label).
    /// `None` only if the derivation itself fails, which it cannot for a
    /// 32-byte output.
    pub(crate) fn from_seal_key(seal: &SealKey) -> Option<Self> {
        // The seal key's bytes are reachable only through its file form.
        let mut text = seal.to_file_content().into_bytes();
        let decoded = hex::decode(text.trim_ascii());
        text.fill(0);
        let mut ikm = decoded.ok()?;
        let key = Self::derive(&ikm);
        ikm.fill(0);
        key
    }

    fn derive(ikm: &[u8]) -> Option<Self> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(ikm);
        let info = [LABEL];
        let okm = prk.expand(&info, hmac::HMAC_SHA256).ok()?;
        Some(RecordKey(hmac::Key::from(okm)))
    }

    /// `value` in its envelope, bound to `key`.
    pub(crate) fn seal(&self, key: &[u8], value: &[u8]) -> Vec<u8> {
        let tag = hmac::sign(&self.0, &message(key, value));
        let mut out = Vec::with_capacity(ENVELOPE.len() + TAG_HEX + 1 + value.len());
        out.extend_from_slice(ENVELOPE);
        out.extend_from_slice(hex::encode(tag.as_ref()).as_bytes());
        out.push(b':');
        out.extend_from_slice(value);
        out
    }

    /// The value inside `stored` when its tag checks for `key`.
    pub(crate) fn open<'v>(&self, key: &[u8], stored: &'v [u8]) -> Result<&'v [u8], Refusal> {
        let rest = stored.strip_prefix(ENVELOPE).ok_or(Refusal::NoMac)?;
        let (hex_tag, rest) = (rest.get(..TAG_HEX), rest.get(TAG_HEX..));
        let (Some(hex_tag), Some(rest)) = (hex_tag, rest) else {
            return Err(Refusal::Malformed);
        };
        let value = rest.strip_prefix(b":").ok_or(Refusal::Malformed)?;
        let tag = hex::decode(hex_tag).map_err(|_| Refusal::Malformed)?;
        hmac::verify(&self.0, &message(key, value), &tag).map_err(|_| Refusal::Mismatch)?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key_of(hex_digits: &str) -> RecordKey {
        RecordKey::from_seal_key(&SealKey::from_file_content(hex_digits.as_bytes()).unwrap())
            .unwrap()
    }

    fn counting() -> RecordKey {
        key_of("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
    }

    const KEY: &[u8] = b"/meshca/tokens/abc";
    const VALUE: &[u8] = br#"{"x":1}"#;

    /// The derivation and the envelope are a format other replicas read:
    /// pinned against an independent computation (Python's hmac/hashlib:
    /// HKDF-SHA256 by RFC 5869, then HMAC-SHA256 over len(key) || key || value).
    #[test]
    fn derivation_and_envelope_are_pinned() {
        let sealed = counting().seal(KEY, VALUE);
        let expected = format!(
            "mac-v1:{}:{}",
            "fdd610030ac635317933f43651cbcd5c5223e8755da3f2570e1295a17e4972c4",
            std::str::from_utf8(VALUE).unwrap()
        );
        assert_eq!(String::from_utf8(sealed).unwrap(), expected);
    }

    #[test]
    fn round_trip() {
        let k = counting();
        let sealed = k.seal(KEY, VALUE);
        assert!(is_enveloped(&sealed));
        assert_eq!(k.open(KEY, &sealed).unwrap(), VALUE);
        // The value is readable as it was written.
        assert!(sealed.ends_with(VALUE));
        let empty = k.seal(KEY, b"");
        assert_eq!(k.open(KEY, &empty).unwrap(), b"");
    }

    #[test]
    fn every_altered_byte_is_refused() {
        let k = counting();
        let sealed = k.seal(KEY, VALUE);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(k.open(KEY, &bad).is_err(), "byte {i} altered and accepted");
        }
        // A value with something appended or cut off.
        let mut longer = sealed.clone();
        longer.push(b' ');
        assert_eq!(k.open(KEY, &longer), Err(Refusal::Mismatch));
        assert_eq!(
            k.open(KEY, &sealed[..sealed.len() - 1]),
            Err(Refusal::Mismatch)
        );
    }

    #[test]
    fn a_record_moved_to_another_key_is_refused() {
        let k = counting();
        let sealed = k.seal(KEY, VALUE);
        for other in [
            &b"/meshca/tokens/abd"[..],
            &b"/other/tokens/abc"[..],
            &b"/meshca/tokens/ab"[..],
            &b"/meshca/tokens/abc/"[..],
            &b""[..],
        ] {
            assert_eq!(k.open(other, &sealed), Err(Refusal::Mismatch), "{other:?}");
        }
        // The key's length is in the tag: bytes cannot slide from the key
        // into the value.
        let split = k.seal(b"/meshca/tokens/a", b"bc{\"x\":1}");
        assert_eq!(k.open(KEY, &split), Err(Refusal::Mismatch));
    }

    #[test]
    fn another_seal_key_is_refused() {
        let sealed = counting().seal(KEY, VALUE);
        let other = key_of(&"ab".repeat(32));
        assert_eq!(other.open(KEY, &sealed), Err(Refusal::Mismatch));
        let fresh = RecordKey::from_seal_key(&SealKey::generate().unwrap()).unwrap();
        assert_eq!(fresh.open(KEY, &sealed), Err(Refusal::Mismatch));
    }

    #[test]
    fn values_without_a_valid_envelope_are_refused() {
        let k = counting();
        assert_eq!(k.open(KEY, VALUE), Err(Refusal::NoMac));
        assert_eq!(k.open(KEY, b""), Err(Refusal::NoMac));
        assert!(!is_enveloped(VALUE));
        assert_eq!(k.open(KEY, b"mac-v1:"), Err(Refusal::Malformed));
        assert_eq!(k.open(KEY, b"mac-v1:00"), Err(Refusal::Malformed));
        let no_colon = format!("mac-v1:{}{{}}", "00".repeat(32));
        assert_eq!(k.open(KEY, no_colon.as_bytes()), Err(Refusal::Malformed));
        let not_hex = format!("mac-v1:{}:{{}}", "zz".repeat(32));
        assert_eq!(k.open(KEY, not_hex.as_bytes()), Err(Refusal::Malformed));
        let zero_tag = format!("mac-v1:{}:{}", "00".repeat(32), "{\"x\":1}");
        assert_eq!(k.open(KEY, zero_tag.as_bytes()), Err(Refusal::Mismatch));
        // Upper-case hex of the right tag still checks (the tag decides).
        let sealed = String::from_utf8(k.seal(KEY, VALUE)).unwrap();
        let upper = format!("mac-v1:{}:{}", sealed[7..71].to_uppercase(), &sealed[72..]);
        assert_eq!(k.open(KEY, upper.as_bytes()).unwrap(), VALUE);
    }

    #[test]
    fn the_key_is_not_printed() {
        assert_eq!(format!("{:?}", counting()), "RecordKey(...)");
    }
}
