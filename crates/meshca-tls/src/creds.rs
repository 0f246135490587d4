//! A credential set: `tls.crt`, `tls.key`, `ca.crt` (and `ca.crl`) of one
//! directory, read as one set and checked together.

use std::path::{Path, PathBuf};

use meshca_pki::{PrivateKey, cert_spki, describe, parse_certs, verify_chain};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject,
};
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
    /// `ca.crl`: the CRLs of the bundle's issuing CAs (optional; the agent
    /// writes it from the CA's `/v1/crls`).
    pub crl: PathBuf,
}

impl CertPaths {
    /// The files of directory `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        CertPaths {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
            crl: dir.join("ca.crl"),
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
    /// The CRLs of `ca.crl` (none when the file is absent).
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// SHA-256 over the files' bytes: tells one set from another.
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

/// A meshca-files error as the TLS error naming the file: a key others can
/// read is refused as meshca-files refuses it everywhere (the agent and the
/// CA follow the same rule), a file too large is unparsable, anything else
/// unreadable. `path` names the file when the error itself does not.
fn file_error(e: meshca_files::FileError, path: &Path) -> TlsError {
    use meshca_files::FileError;
    match e {
        FileError::InsecurePermissions { path, mode } => TlsError::InsecureKey { path, mode },
        FileError::TooLarge { path, limit } => TlsError::Unparsable {
            path,
            reason: format!("larger than {limit} bytes"),
        },
        FileError::Io { path, reason, .. } => TlsError::Unreadable { path, reason },
        other => TlsError::Unreadable {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// The raw bytes of the four files, read as one set. Comparing them is how
/// a change is noticed, whatever way the files were replaced. In a
/// directory switched through `..data` (what the agent, the CA and kubelet
/// write) the files are all opened in the directory `..data` names at one
/// moment: a switch between two reads cannot pair a key with another set's
/// certificate, or a certificate with another set's bundle.
pub(crate) fn read_raw(paths: &CertPaths) -> Result<[Vec<u8>; 4], TlsError> {
    let opened = meshca_files::open_set(&[&paths.cert, &paths.key, &paths.ca, &paths.crl])
        .map_err(|e| file_error(e, &paths.cert))?;
    let [cert, key, ca, crl] =
        <[meshca_files::SetFile; 4]>::try_from(opened).map_err(|got| TlsError::Unreadable {
            path: paths.cert.clone(),
            reason: format!("{} files opened for 4", got.len()),
        })?;
    // The CRL file is optional: absent reads as empty.
    let crl = if crl.exists() {
        crl.read(MAX_FILE).map_err(|e| file_error(e, &paths.crl))?
    } else {
        Vec::new()
    };
    Ok([
        cert.read(MAX_FILE)
            .map_err(|e| file_error(e, &paths.cert))?,
        // Refused when group or others have any access to it: a key
        // others could copy must be treated as exposed, not served with.
        key.read_secret(MAX_FILE)
            .map_err(|e| file_error(e, &paths.key))?,
        ca.read(MAX_FILE).map_err(|e| file_error(e, &paths.ca))?,
        crl,
    ])
}

impl CertSet {
    /// Reads and checks a set: the key file is readable by its owner only,
    /// each file parses, the key is the certificate's, the certificate is
    /// valid now and chains to the bundle.
    pub fn load(paths: &CertPaths) -> Result<Self, TlsError> {
        let raw = read_raw(paths)?;
        Self::from_bytes(paths, &raw, OffsetDateTime::now_utc())
    }

    pub(crate) fn from_bytes(
        paths: &CertPaths,
        raw: &[Vec<u8>; 4],
        now: OffsetDateTime,
    ) -> Result<Self, TlsError> {
        let [cert_pem, key_pem, ca_pem, crl_pem] = raw;
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
        let crls = CertificateRevocationListDer::pem_slice_iter(crl_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unparsable(&paths.crl, format!("not PEM CRLs: {e}")))?;
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
            crls,
            digest: meshca_pki::fingerprint(&all),
        })
    }

    /// The private key (for building rustls configs).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// A small PKI for the unit tests: a root that signs leaves directly.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_pki {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Duration;

    use meshca_pki::{
        DEFAULT_ROOT_TTL, Identity, KeyType, LeafPublicKey, LeafSpec, PrivateKey, Profile, SanSet,
        Serial, SigningCa, TrustDomain, generate_root, to_pem,
    };
    use time::OffsetDateTime;

    pub(crate) struct Pki {
        root_der: Vec<u8>,
        root: SigningCa,
        td: TrustDomain,
    }

    impl Pki {
        pub(crate) fn new() -> Pki {
            let now = OffsetDateTime::now_utc() - Duration::from_secs(60);
            let td = TrustDomain::default();
            let rk = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
            let root_der = generate_root(&rk, &td, "test", DEFAULT_ROOT_TTL, now).unwrap();
            let root = SigningCa::new(root_der.clone(), rk, "root", now).unwrap();
            Pki { root_der, root, td }
        }

        /// Writes a set for `default/<name>` into `dir`, the key (first)
        /// with `key_mode`; returns the leaf's serial.
        pub(crate) fn write(&self, dir: &Path, name: &str, key_mode: u32) -> String {
            let id = Identity::new("default", name).unwrap();
            let spec = LeafSpec {
                sans: SanSet::build(&id, &self.td, &[], &[]).unwrap(),
                identity: id,
                trust_domain: self.td.clone(),
                profile: Profile::Service,
                ttl: Duration::from_secs(3600),
                serial: Serial::random().unwrap(),
            };
            let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
            let leaf = self
                .root
                .sign_leaf(
                    &LeafPublicKey::of(&key).unwrap(),
                    &spec,
                    OffsetDateTime::now_utc(),
                )
                .unwrap();
            std::fs::create_dir_all(dir).unwrap();
            replace(&dir.join("tls.key"), key.to_pem().as_bytes(), key_mode);
            replace(
                &dir.join("tls.crt"),
                to_pem("CERTIFICATE", &leaf.der).as_bytes(),
                0o644,
            );
            replace(
                &dir.join("ca.crt"),
                to_pem("CERTIFICATE", &self.root_der).as_bytes(),
                0o644,
            );
            leaf.serial.to_hex()
        }
    }

    /// Replaces `path` by a file with `mode` from the moment it appears.
    pub(crate) fn replace(path: &Path, bytes: &[u8], mode: u32) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_key_others_can_read_is_refused_naming_the_file_mode_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::Pki::new();
        pki.write(dir.path(), "web", 0o644);
        let paths = CertPaths::in_dir(dir.path());
        let e = CertSet::load(&paths).unwrap_err();
        assert!(matches!(e, TlsError::InsecureKey { .. }), "{e}");
        assert!(e.is_credentials());
        let key = paths.key.display().to_string();
        let text = e.to_string();
        assert!(
            text.starts_with(&key)
                && text.contains("(mode 0644)")
                && text.contains(&format!("`chmod 600 {key}`")),
            "{text}"
        );
        let chmod = |mode: u32| {
            std::fs::set_permissions(&paths.key, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        // Any access for group or others: read, write or execute.
        for mode in [0o640, 0o620, 0o610, 0o604, 0o602, 0o601, 0o660, 0o666] {
            chmod(mode);
            let e = CertSet::load(&paths).unwrap_err();
            assert!(
                e.to_string().contains(&format!("(mode {mode:04o})")),
                "{mode:o}: {e}"
            );
        }
        // The owner alone: the same files load.
        for mode in [0o600, 0o400] {
            chmod(mode);
            CertSet::load(&paths).unwrap();
        }
    }

    /// What the agent and the CA do on renewal, 200 times under a reader:
    /// every load is one whole set (a certificate with another set's key
    /// would fail as a key mismatch).
    #[test]
    fn a_set_switched_through_data_is_never_read_mixed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::Pki::new();
        type Files = Vec<(&'static str, Vec<u8>, u32)>;
        let sets: Vec<(String, Files)> = ["a", "b"]
            .iter()
            .map(|n| {
                let src = dir.path().join(n);
                let serial = pki.write(&src, "web", 0o600);
                let files = [("tls.key", 0o600), ("tls.crt", 0o644), ("ca.crt", 0o644)]
                    .map(|(f, m)| (f, std::fs::read(src.join(f)).unwrap(), m));
                (serial, files.to_vec())
            })
            .collect();
        let live = dir.path().join("live");
        std::fs::create_dir(&live).unwrap();
        // The writer refuses a directory others may write to, whatever
        // the umask made of it.
        std::fs::set_permissions(&live, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let switch = |i: usize| {
            let files: Vec<(&str, &[u8], u32)> = sets[i % 2]
                .1
                .iter()
                .map(|(f, b, m)| (*f, b.as_slice(), *m))
                .collect();
            meshca_files::write_set_atomic(&live, &files).unwrap();
        };
        switch(0);
        let paths = CertPaths::in_dir(&live);
        let done = AtomicBool::new(false);
        let loads = std::thread::scope(|s| {
            s.spawn(|| {
                for i in 1..=200 {
                    switch(i);
                }
                done.store(true, Ordering::SeqCst);
            });
            let (mut loads, mut seen) = (0u32, std::collections::BTreeSet::new());
            while !done.load(Ordering::SeqCst) {
                let set = CertSet::load(&paths)
                    .unwrap_or_else(|e| panic!("load {loads} read a broken set: {e}"));
                assert!(sets.iter().any(|(serial, _)| *serial == set.serial));
                seen.insert(set.serial.clone());
                loads += 1;
            }
            (loads, seen.len())
        });
        // Evidence only if the loads raced the switches, seeing both sets.
        assert!(
            loads.0 >= 20 && loads.1 == 2,
            "{} loads of {} sets",
            loads.0,
            loads.1
        );
    }

    #[test]
    fn a_missing_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        test_pki::Pki::new().write(dir.path(), "web", 0o600);
        std::fs::remove_file(dir.path().join("tls.key")).unwrap();
        let e = CertSet::load(&CertPaths::in_dir(dir.path())).unwrap_err();
        assert!(matches!(e, TlsError::Unreadable { .. }), "{e}");
        assert!(e.to_string().contains("tls.key"), "{e}");
    }
}
