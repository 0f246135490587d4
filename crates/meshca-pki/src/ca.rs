//! CA certificates: generating a root and an intermediate, adopting existing
//! ones, and holding an issuing CA ready to sign.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::PkiError;
use crate::error::signing;
use crate::identity::TrustDomain;
use crate::keys::{KeyType, PrivateKey};
use crate::serial::Serial;

/// How far notBefore is set in the past, so that peers whose clocks run a
/// little behind accept a certificate issued a moment ago.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Default root lifetime.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(87_600 * 3600);

/// The lifetime of an intermediate under a root of lifetime `root_ttl`: half of
/// it, so the intermediate can be replaced under the same root long before the
/// root itself runs out.
pub fn intermediate_ttl(root_ttl: Duration) -> Duration {
    root_ttl / 2
}

fn ca_params(
    common_name: String,
    td: &TrustDomain,
    path_len: u8,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshca");
    dn.push(DnType::OrganizationalUnitName, td.as_str());
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        Serial::random()?.as_bytes(),
    ));
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// Generates a self-signed root: CA:TRUE, pathlen 1, keyCertSign + cRLSign.
/// `label` tells hierarchies apart in the subject (it is the hierarchy id).
pub fn generate_root(
    key: &PrivateKey,
    td: &TrustDomain,
    label: &str,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<Vec<u8>, PkiError> {
    let params = ca_params(
        format!("meshca root CA {label}"),
        td,
        1,
        now - BACKDATE,
        now + ttl,
    )?;
    Ok(params
        .self_signed(key.pair()?)
        .map_err(signing)?
        .der()
        .to_vec())
}

/// Generates an intermediate under `root`: CA:TRUE, pathlen 0. Its notAfter
/// never exceeds the root's.
pub fn generate_intermediate(
    key: &PrivateKey,
    root: &SigningCa,
    td: &TrustDomain,
    label: &str,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<Vec<u8>, PkiError> {
    let (not_before, not_after, _) = root.clip(now, ttl)?;
    let mut params = ca_params(
        format!("meshca intermediate CA {label}"),
        td,
        0,
        not_before,
        not_after,
    )?;
    params.use_authority_key_identifier_extension = true;
    Ok(params
        .signed_by(key.pair()?, &root.issuer)
        .map_err(signing)?
        .der()
        .to_vec())
}

/// A CA certificate with its key, checked and ready to sign.
pub struct SigningCa {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    key_type: KeyType,
}

impl fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningCa")
            .field("not_after", &self.not_after)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl SigningCa {
    /// Checks that `cert_der` is a CA certificate that may sign certificates,
    /// that `key` is its key, and that it is valid at `now`. `what` names the
    /// certificate in errors (`root certificate`, `/path/to/ca.crt`).
    pub fn new(
        cert_der: Vec<u8>,
        key: PrivateKey,
        what: &str,
        now: OffsetDateTime,
    ) -> Result<Self, PkiError> {
        let (not_before, not_after) = check_ca_cert(&cert_der, what, now)?;
        let cert_spki = {
            let (_, x) = X509Certificate::from_der(&cert_der)
                .map_err(|e| PkiError::MalformedCertificate(e.to_string()))?;
            x.public_key().raw.to_vec()
        };
        if cert_spki != key.public_key_der() {
            return Err(PkiError::KeyMismatch {
                what: what.to_owned(),
            });
        }
        let key_type = key.key_type();
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key.into_pair()?)
            .map_err(|e| PkiError::MalformedCertificate(e.to_string()))?;
        Ok(SigningCa {
            issuer,
            cert_der,
            not_before,
            not_after,
            key_type,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA's notAfter.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The CA's key type (and so the signature algorithm of what it signs).
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The validity of a certificate of lifetime `ttl` issued at `now`:
    /// notBefore backdated by [`BACKDATE`] (never before the CA's own),
    /// notAfter clipped to the CA's notAfter. The flag says whether it was
    /// clipped. Refuses when the CA is not valid at `now`.
    pub fn clip(
        &self,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<(OffsetDateTime, OffsetDateTime, bool), PkiError> {
        if now >= self.not_after || now < self.not_before {
            return Err(PkiError::IssuerExpired {
                not_after: rfc3339(self.not_after),
            });
        }
        let not_before = (now - BACKDATE).max(self.not_before);
        let wanted = now + ttl;
        if wanted > self.not_after {
            Ok((not_before, self.not_after, true))
        } else {
            Ok((not_before, wanted, false))
        }
    }
}

/// One revoked certificate, for a CRL.
#[derive(Debug, Clone)]
pub struct RevokedEntry {
    /// Its serial.
    pub serial: Serial,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
    /// RFC 5280 reason code (0 unspecified, 1 keyCompromise, 2 cACompromise,
    /// 3 affiliationChanged, 4 superseded, 5 cessationOfOperation, 9 privilegeWithdrawn).
    pub reason_code: u8,
}

impl SigningCa {
    /// Signs a CRL listing `revoked`, valid from `now` for `validity`.
    pub fn sign_crl(
        &self,
        revoked: &[RevokedEntry],
        crl_number: u64,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<Vec<u8>, PkiError> {
        use rcgen::{CertificateRevocationListParams, RevocationReason as R, RevokedCertParams};
        let reason = |code: u8| match code {
            1 => Some(R::KeyCompromise),
            2 => Some(R::CaCompromise),
            3 => Some(R::AffiliationChanged),
            4 => Some(R::Superseded),
            5 => Some(R::CessationOfOperation),
            9 => Some(R::PrivilegeWithdrawn),
            _ => Some(R::Unspecified),
        };
        let params = CertificateRevocationListParams {
            this_update: now - BACKDATE,
            next_update: now + validity,
            crl_number: rcgen::SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(r.serial.as_bytes()),
                    revocation_time: r.revoked_at,
                    reason_code: reason(r.reason_code),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params
            .signed_by(&self.issuer)
            .map_err(signing)?
            .der()
            .to_vec())
    }
}

/// Formats a time as RFC 3339 (UTC, seconds).
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Checks that a certificate can act as a CA at `now`: it parses, has
/// basicConstraints CA:TRUE, allows keyCertSign when it has a keyUsage, and is
/// within its validity. Returns its notBefore and notAfter.
pub fn check_ca_cert(
    der: &[u8],
    what: &str,
    now: OffsetDateTime,
) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    let not_ca = |reason: &str| PkiError::NotACa {
        what: what.to_owned(),
        reason: reason.to_owned(),
    };
    let (rest, x) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::MalformedCertificate(format!("{what}: {e}")))?;
    if !rest.is_empty() {
        return Err(PkiError::MalformedCertificate(format!(
            "{what}: trailing data after the certificate"
        )));
    }
    match x.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(not_ca("basicConstraints does not say CA:TRUE")),
        Err(e) => return Err(not_ca(&format!("bad basicConstraints: {e}"))),
    }
    match x.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return Err(not_ca("keyUsage does not allow keyCertSign"));
        }
        Ok(_) => {}
        Err(e) => return Err(not_ca(&format!("bad keyUsage: {e}"))),
    }
    let not_before = x.validity().not_before.to_datetime();
    let not_after = x.validity().not_after.to_datetime();
    if now >= not_after {
        return Err(not_ca(&format!("it expired at {}", rfc3339(not_after))));
    }
    if now < not_before {
        return Err(not_ca(&format!(
            "it is not valid before {}",
            rfc3339(not_before)
        )));
    }
    Ok((not_before, not_after))
}

/// Checks that `child` was signed by `parent`'s key and names it as issuer.
pub fn check_signed_by(child: &[u8], parent: &[u8], what: &str) -> Result<(), PkiError> {
    let (_, c) = X509Certificate::from_der(child)
        .map_err(|e| PkiError::MalformedCertificate(format!("{what}: {e}")))?;
    let (_, p) = X509Certificate::from_der(parent)
        .map_err(|e| PkiError::MalformedCertificate(format!("issuer of {what}: {e}")))?;
    if c.issuer() != p.subject() {
        return Err(PkiError::ChainInvalid(format!(
            "{what} names issuer \"{}\", not \"{}\"",
            c.issuer(),
            p.subject()
        )));
    }
    c.verify_signature(Some(p.public_key()))
        .map_err(|_| PkiError::ChainInvalid(format!("{what} is not signed by \"{}\"", p.subject())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn root_and_intermediate_are_cas_and_chain() {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::default();
        let root_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let root_der = generate_root(&root_key, &td, "t1", DEFAULT_ROOT_TTL, now).unwrap();
        let root = SigningCa::new(root_der.clone(), root_key, "root", now).unwrap();
        let int_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        // Asking for more than the root has left is clipped to the root.
        let int_der =
            generate_intermediate(&int_key, &root, &td, "t1", DEFAULT_ROOT_TTL * 2, now).unwrap();
        let int = SigningCa::new(int_der.clone(), int_key, "intermediate", now).unwrap();
        assert_eq!(int.not_after(), root.not_after());
        check_signed_by(&int_der, &root_der, "intermediate").unwrap();
        check_signed_by(&root_der, &root_der, "root").unwrap();
        assert!(check_signed_by(&root_der, &int_der, "root").is_err());
    }

    /// A CA certificate that names the right issuer but carries another
    /// key's signature: two roots with the same subject, the impostor's key
    /// signing. The names match, so only the signature tells them apart.
    #[test]
    fn the_right_issuer_name_with_another_keys_signature_is_refused() {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::default();
        let subject = |der: &[u8]| {
            X509Certificate::from_der(der)
                .unwrap()
                .1
                .subject()
                .to_string()
        };
        let real_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let real = generate_root(&real_key, &td, "same", DEFAULT_ROOT_TTL, now).unwrap();
        let impostor_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let impostor_der =
            generate_root(&impostor_key, &td, "same", DEFAULT_ROOT_TTL, now).unwrap();
        assert_eq!(subject(&real), subject(&impostor_der));
        let impostor = SigningCa::new(impostor_der.clone(), impostor_key, "impostor", now).unwrap();
        let not_signed = format!("is not signed by \"{}\"", subject(&real));

        // An intermediate the impostor signed, naming the real root's subject
        // as its issuer.
        let int_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let int =
            generate_intermediate(&int_key, &impostor, &td, "same", DEFAULT_ROOT_TTL, now).unwrap();
        assert_eq!(
            X509Certificate::from_der(&int)
                .unwrap()
                .1
                .issuer()
                .to_string(),
            subject(&real)
        );
        check_signed_by(&int, &impostor_der, "intermediate").unwrap();
        let e = check_signed_by(&int, &real, "intermediate").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PkiError::ChainInvalid(_)), "{msg}");
        assert!(msg.contains(&format!("intermediate {not_signed}")), "{msg}");
        assert!(!msg.contains("names issuer"), "{msg}");

        // A "root" whose issuer is its own subject, signed by the impostor's
        // key: not self-signed.
        let own_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let fake_root = ca_params(
            "meshca root CA same".into(),
            &td,
            1,
            now - BACKDATE,
            now + DEFAULT_ROOT_TTL,
        )
        .unwrap()
        .signed_by(own_key.pair().unwrap(), &impostor.issuer)
        .unwrap()
        .der()
        .to_vec();
        let x = X509Certificate::from_der(&fake_root).unwrap().1;
        assert_eq!(x.issuer().to_string(), x.subject().to_string());
        assert_eq!(x.subject().to_string(), subject(&real));
        let e = check_signed_by(&fake_root, &fake_root, "root").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PkiError::ChainInvalid(_)), "{msg}");
        assert!(msg.contains(&format!("root {not_signed}")), "{msg}");
    }

    #[test]
    fn wrong_key_and_expired_ca_are_refused() {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::default();
        let key = PrivateKey::generate(KeyType::Ed25519).unwrap();
        let der = generate_root(&key, &td, "x", Duration::from_secs(3600), now).unwrap();
        let other = PrivateKey::generate(KeyType::Ed25519).unwrap();
        assert!(matches!(
            SigningCa::new(der.clone(), other, "root", now),
            Err(PkiError::KeyMismatch { .. })
        ));
        let later = now + Duration::from_secs(7200);
        let e = SigningCa::new(der, key, "root", later).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
    }
}
