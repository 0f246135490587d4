//! A credential set: `tls.crt`, `tls.key` and `ca.crt` of one directory,
//! loaded and checked together.

use std::path::{Path, PathBuf};

use meshca_pki::{PrivateKey, cert_spki, describe, parse_certs, verify_chain};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::OffsetDateTime;

use crate::TlsError;

/// Largest credential file read.
const MAX_FILE: u64 = 1024 * 1024;

/// The three files of a kubernetes.io/tls directory.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// `tls.crt`: the certificate, then its chain.
    pub cert: PathBuf,
    /// `tls.key`: its private key.
    pub key: PathBuf,
    /// `ca.crt`: the trust bundle.
    pub ca: PathBuf,
}

impl CertPaths {
    /// The files of directory `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        CertPaths {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }
}

/// A checked credential set. Its `Debug` leaves out the key.
#[derive(Clone)]
pub struct CertSet {
    /// The certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust bundle.
    pub roots: Vec<CertificateDer<'static>>,
    pub(crate) key: std::sync::Arc<PrivateKeyDer<'static>>,
    /// The leaf's serial, hex.
    pub serial: String,
    /// The leaf's notAfter.
    pub not_after: OffsetDateTime,
    /// SHA-256 over the three files' bytes: tells one set from another.
    pub digest: String,
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| TlsError::Unreadable {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut buf = Vec::new();
    f.take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| TlsError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if buf.len() as u64 > MAX_FILE {
        return Err(TlsError::Unparsable {
            path: path.to_owned(),
            reason: format!("larger than {MAX_FILE} bytes"),
        });
    }
    Ok(buf)
}

/// The raw bytes of the three files, read at one moment. Comparing them is
/// how a change is noticed, whatever way the files were replaced.
pub(crate) fn read_raw(paths: &CertPaths) -> Result<[Vec<u8>; 3], TlsError> {
    Ok([read(&paths.cert)?, read(&paths.key)?, read(&paths.ca)?])
}

impl CertSet {
    /// Reads and checks a set: each file parses, the key is the
    /// certificate's, the certificate is valid now and chains to the bundle.
    pub fn load(paths: &CertPaths) -> Result<Self, TlsError> {
        let raw = read_raw(paths)?;
        Self::from_bytes(paths, &raw, OffsetDateTime::now_utc())
    }

    pub(crate) fn from_bytes(
        paths: &CertPaths,
        raw: &[Vec<u8>; 3],
        now: OffsetDateTime,
    ) -> Result<Self, TlsError> {
        let [cert_pem, key_pem, ca_pem] = raw;
        let unparsable = |path: &Path, reason: String| TlsError::Unparsable {
            path: path.to_owned(),
            reason,
        };
        let chain = parse_certs(cert_pem).map_err(|e| unparsable(&paths.cert, e.to_string()))?;
        let roots = parse_certs(ca_pem).map_err(|e| unparsable(&paths.ca, e.to_string()))?;
        let key_text = std::str::from_utf8(key_pem)
            .map_err(|_| unparsable(&paths.key, "not PEM text".into()))?;
        let key =
            PrivateKey::from_pem(key_text).map_err(|e| unparsable(&paths.key, e.to_string()))?;
        let leaf = describe(&chain[0], now).map_err(|e| unparsable(&paths.cert, e.to_string()))?;
        let leaf_spki = cert_spki(&chain[0]).map_err(|e| unparsable(&paths.cert, e.to_string()))?;
        if leaf_spki != key.public_key_der() {
            return Err(TlsError::KeyMismatch {
                key: paths.key.clone(),
                cert: paths.cert.clone(),
            });
        }
        if leaf.expired {
            return Err(TlsError::Expired {
                path: paths.cert.clone(),
                reason: format!("it expired at {} ({})", leaf.not_after, leaf.time_left),
            });
        }
        verify_chain(&chain, &roots, now).map_err(|e| TlsError::Untrusted {
            cert: paths.cert.clone(),
            bundle: paths.ca.clone(),
            reason: e.to_string(),
        })?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| unparsable(&paths.key, e.to_string()))?;
        let not_after = time::OffsetDateTime::parse(
            &leaf.not_after,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| unparsable(&paths.cert, e.to_string()))?;
        let mut all = Vec::new();
        for part in raw {
            all.extend_from_slice(&(part.len() as u64).to_be_bytes());
            all.extend_from_slice(part);
        }
        Ok(CertSet {
            chain: chain.into_iter().map(CertificateDer::from).collect(),
            roots: roots.into_iter().map(CertificateDer::from).collect(),
            key: std::sync::Arc::new(key_der),
            serial: leaf.serial,
            not_after,
            digest: meshca_pki::fingerprint(&all),
        })
    }

    /// The private key (for building rustls configs).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}
