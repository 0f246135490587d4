//! Leaf certificates: the one place where what goes into a workload's
//! certificate is decided.

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType, SignatureAlgorithm, SubjectPublicKeyInfo,
};
use time::OffsetDateTime;

use crate::PkiError;
use crate::ca::SigningCa;
use crate::error::signing;
use crate::identity::{Identity, SanSet, TrustDomain};
use crate::keys::{KeyType, PrivateKey};
use crate::profile::Profile;
use crate::serial::Serial;

/// The public key a leaf certifies: from a verified CSR or a key the CA made.
#[derive(Debug, Clone)]
pub struct LeafPublicKey {
    spki: SubjectPublicKeyInfo,
    key_type: KeyType,
}

impl LeafPublicKey {
    pub(crate) fn from_spki_der(spki_der: &[u8], key_type: KeyType) -> Result<Self, PkiError> {
        let spki = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| PkiError::RejectedKey(e.to_string()))?;
        Ok(LeafPublicKey { spki, key_type })
    }

    /// The public half of a private key.
    pub fn of(key: &PrivateKey) -> Result<Self, PkiError> {
        Self::from_spki_der(&key.public_key_der(), key.key_type())
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// Whether this is the key a certificate certifies.
    pub fn is_in(&self, cert_der: &[u8]) -> Result<bool, PkiError> {
        let facts = crate::inspect::cert_facts(cert_der)?;
        Ok(crate::constant_time_eq(
            &facts.public_key,
            self.spki.der_bytes(),
        ))
    }
}

impl PublicKeyData for LeafPublicKey {
    fn der_bytes(&self) -> &[u8] {
        self.spki.der_bytes()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.spki.algorithm()
    }
}

/// Checks a requested lifetime: not zero, not above `max`. `None` takes the
/// profile's default (which is also held to `max`).
pub fn check_ttl(
    requested: Option<Duration>,
    profile: Profile,
    max: Duration,
) -> Result<Duration, PkiError> {
    let ttl = requested.unwrap_or_else(|| profile.default_ttl());
    let shown = crate::duration::format_duration(ttl);
    if ttl.is_zero() {
        return Err(PkiError::InvalidTtl {
            ttl: shown,
            reason: "must be greater than zero".into(),
        });
    }
    if ttl > max {
        return Err(PkiError::InvalidTtl {
            ttl: shown,
            reason: format!(
                "longer than the configured maximum of {}",
                crate::duration::format_duration(max)
            ),
        });
    }
    Ok(ttl)
}

/// Everything that goes into a leaf, already validated.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Whose certificate it is.
    pub identity: Identity,
    /// The trust domain of the SPIFFE ID and the CN.
    pub trust_domain: TrustDomain,
    /// What it is for.
    pub profile: Profile,
    /// The names it carries.
    pub sans: SanSet,
    /// Its lifetime (clipped to the issuer's).
    pub ttl: Duration,
    /// Its serial number.
    pub serial: Serial,
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its serial.
    pub serial: Serial,
    /// Its notBefore.
    pub not_before: OffsetDateTime,
    /// Its notAfter.
    pub not_after: OffsetDateTime,
    /// True when notAfter was cut to the issuer's notAfter.
    pub clipped: bool,
}

impl SigningCa {
    /// Signs a leaf for `key` as `spec` says.
    ///
    /// keyUsage is digitalSignature (plus keyEncipherment for RSA keys), the
    /// extended key usages follow the profile, basicConstraints says CA:FALSE,
    /// and the authority key identifier names this CA.
    pub fn sign_leaf(
        &self,
        key: &LeafPublicKey,
        spec: &LeafSpec,
        now: OffsetDateTime,
    ) -> Result<IssuedLeaf, PkiError> {
        let (not_before, not_after, clipped) = self.clip(now, spec.ttl)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = spec.identity.common_name(&spec.trust_domain) {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        let ia5 = |s: &str| {
            rcgen::string::Ia5String::try_from(s)
                .map_err(|e| PkiError::Signing(format!("SAN {s:?}: {e}")))
        };
        params
            .subject_alt_names
            .push(SanType::URI(ia5(&spec.sans.uri)?));
        for d in &spec.sans.dns {
            params.subject_alt_names.push(SanType::DnsName(ia5(d)?));
        }
        for ip in &spec.sans.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if key.key_type().is_rsa() {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        if spec.profile.server_auth() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.profile.client_auth() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(spec.serial.as_bytes()));
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(key, &self.issuer).map_err(signing)?;
        Ok(IssuedLeaf {
            der: cert.der().to_vec(),
            serial: spec.serial.clone(),
            not_before,
            not_after,
            clipped,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ca::{DEFAULT_ROOT_TTL, generate_root};

    #[test]
    fn ttl_rules() {
        let max = Duration::from_secs(87_600 * 3600);
        assert_eq!(
            check_ttl(None, Profile::Service, max).unwrap(),
            Duration::from_secs(86_400)
        );
        assert!(
            check_ttl(Some(Duration::ZERO), Profile::Service, max)
                .unwrap_err()
                .to_string()
                .contains("greater than zero")
        );
        assert!(
            check_ttl(Some(max * 2), Profile::Service, max)
                .unwrap_err()
                .to_string()
                .contains("maximum")
        );
        // A profile default above a lower maximum is refused, not silently cut.
        assert!(check_ttl(None, Profile::Bootstrap, Duration::from_secs(3600)).is_err());
    }

    #[test]
    fn leaf_carries_what_the_spec_says_and_is_clipped() {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::default();
        let ca_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let der = generate_root(&ca_key, &td, "t", Duration::from_secs(7200), now).unwrap();
        let ca = SigningCa::new(der, ca_key, "ca", now).unwrap();
        let id = Identity::new("default", "web").unwrap();
        let spec = LeafSpec {
            sans: SanSet::build(&id, &td, &["web.example.com".into()], &["10.1.2.3".into()])
                .unwrap(),
            identity: id,
            trust_domain: td,
            profile: Profile::Service,
            ttl: DEFAULT_ROOT_TTL,
            serial: Serial::random().unwrap(),
        };
        let key = PrivateKey::generate(KeyType::Rsa2048).unwrap();
        let leaf = ca
            .sign_leaf(&LeafPublicKey::of(&key).unwrap(), &spec, now)
            .unwrap();
        assert!(leaf.clipped);
        assert_eq!(leaf.not_after, ca.not_after());
        let info = crate::inspect::describe(&leaf.der, now).unwrap();
        assert_eq!(
            info.spiffe_id.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/web")
        );
        assert!(info.dns_names.contains(&"web.example.com".to_owned()));
        assert_eq!(info.ip_addresses, ["10.1.2.3"]);
        assert_eq!(info.key_usage, ["digitalSignature", "keyEncipherment"]);
        assert_eq!(info.extended_key_usage, ["serverAuth", "clientAuth"]);
        assert_eq!(info.serial, spec.serial.to_hex());
        assert!(!info.is_ca);
        // The facts an upstream-signed leaf is recorded with, and key matching.
        let facts = crate::inspect::cert_facts(&leaf.der).unwrap();
        assert_eq!(facts.serial, spec.serial);
        assert_eq!(facts.not_after, leaf.not_after);
        assert!(!facts.self_signed);
        assert!(LeafPublicKey::of(&key).unwrap().is_in(&leaf.der).unwrap());
        let other = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        assert!(!LeafPublicKey::of(&other).unwrap().is_in(&leaf.der).unwrap());
        assert!(
            crate::inspect::cert_facts(ca.cert_der())
                .unwrap()
                .self_signed
        );
    }
}
