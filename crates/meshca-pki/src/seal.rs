//! Sealing CA keys for a shared store: AES-256-GCM (aws-lc-rs) under a
//! 32-byte seal key that each replica is given and the store never holds.
//!
//! Sealed form, hex: a version byte (1), a random 96-bit nonce, then the
//! ciphertext and its 128-bit tag. The associated data names what is sealed
//! (`hierarchy <id> intermediate key`), so a sealed value cannot be moved
//! to another place in the store and opened there.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::{PkiError, random_bytes};

const VERSION: u8 = 1;

/// The key that seals CA keys in a shared store. Its `Debug` prints `...`.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(...)")
    }
}

impl SealKey {
    /// A new random key.
    pub fn generate() -> Result<Self, PkiError> {
        let bytes = random_bytes(32)?;
        let mut k = [0u8; 32];
        k.copy_from_slice(&bytes);
        Ok(SealKey(k))
    }

    /// Reads a key file's content: 64 hex digits (surrounding whitespace allowed).
    pub fn from_file_content(content: &[u8]) -> Result<Self, PkiError> {
        let text = std::str::from_utf8(content)
            .map_err(|_| PkiError::BadSealKey("the file is not text".into()))?
            .trim();
        if text.len() != 64 {
            return Err(PkiError::BadSealKey(format!(
                "{} characters instead of 64 hex digits",
                text.len()
            )));
        }
        let bytes =
            hex::decode(text).map_err(|_| PkiError::BadSealKey("it is not hexadecimal".into()))?;
        let mut k = [0u8; 32];
        k.copy_from_slice(&bytes);
        Ok(SealKey(k))
    }

    /// The content of a key file (64 hex digits and a newline).
    pub fn to_file_content(&self) -> String {
        format!("{}\n", hex::encode(self.0))
    }

    fn key(&self) -> Result<LessSafeKey, PkiError> {
        UnboundKey::new(&AES_256_GCM, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| PkiError::BadSealKey("AES-256-GCM refused it".into()))
    }

    /// Seals `plaintext`, bound to `what` (which also names it in errors).
    pub fn seal(&self, plaintext: &[u8], what: &str) -> Result<String, PkiError> {
        let nonce_bytes = random_bytes(NONCE_LEN)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&nonce_bytes);
        let mut buf = plaintext.to_vec();
        self.key()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(what.as_bytes()),
                &mut buf,
            )
            .map_err(|_| PkiError::Signing(format!("sealing {what} failed")))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(hex::encode(out))
    }

    /// Opens what [`SealKey::seal`] made for the same `what`.
    pub fn open(&self, sealed: &str, what: &str) -> Result<Vec<u8>, PkiError> {
        let bytes = hex::decode(sealed.trim())
            .map_err(|_| PkiError::Unseal(format!("{what} (not hexadecimal)")))?;
        if bytes.len() < 1 + NONCE_LEN + 16 || bytes[0] != VERSION {
            return Err(PkiError::Unseal(format!("{what} (unknown format)")));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[1..1 + NONCE_LEN]);
        let mut buf = bytes[1 + NONCE_LEN..].to_vec();
        let plain = self
            .key()?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(what.as_bytes()),
                &mut buf,
            )
            .map_err(|_| PkiError::Unseal(what.to_owned()))?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let k = SealKey::generate().unwrap();
        let sealed = k
            .seal(b"secret key", "hierarchy a intermediate key")
            .unwrap();
        assert!(!sealed.contains(&hex::encode(b"secret key")));
        assert_eq!(
            k.open(&sealed, "hierarchy a intermediate key").unwrap(),
            b"secret key"
        );
        // Another key, another place, an altered byte: refused, named.
        let other = SealKey::generate().unwrap();
        let e = other
            .open(&sealed, "hierarchy a intermediate key")
            .unwrap_err();
        assert!(
            e.to_string().contains("hierarchy a intermediate key"),
            "{e}"
        );
        assert!(k.open(&sealed, "hierarchy b intermediate key").is_err());
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'0' { b'1' } else { b'0' };
        assert!(
            k.open(
                &String::from_utf8(altered).unwrap(),
                "hierarchy a intermediate key"
            )
            .is_err()
        );
        assert!(k.open("zz", "x").is_err());
    }

    #[test]
    fn key_files() {
        let k = SealKey::generate().unwrap();
        let again = SealKey::from_file_content(k.to_file_content().as_bytes()).unwrap();
        let sealed = k.seal(b"x", "w").unwrap();
        assert_eq!(again.open(&sealed, "w").unwrap(), b"x");
        for bad in [&b"short"[..], &[0xffu8; 64][..], &[b'g'; 64][..]] {
            assert!(matches!(
                SealKey::from_file_content(bad),
                Err(PkiError::BadSealKey(_))
            ));
        }
        assert_eq!(format!("{k:?}"), "SealKey(...)");
    }
}
