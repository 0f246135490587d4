//! Policy, serials and records around an [`Issuer`].

use std::sync::Arc;
use std::time::Duration;

use meshca_pki::{
    Identity, KeyType, LeafSpec, PrivateKey, Profile, SanSet, Serial, TrustDomain, VerifiedCsr,
    check_ttl, fingerprint, to_pem,
};
use meshca_store::{CertStatus, CertificateRecord, Store};
use time::OffsetDateTime;

use crate::{Issuer, IssuerError};

/// Default ceiling on any lifetime: the bootstrap and webhook profiles' 87600h.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(87_600 * 3600);

/// What the authority allows.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The trust domain of every SPIFFE ID and CN.
    pub trust_domain: TrustDomain,
    /// No certificate lives longer than this.
    pub max_ttl: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            trust_domain: TrustDomain::default(),
            max_ttl: DEFAULT_MAX_TTL,
        }
    }
}

/// Where the leaf's key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// The workload's own key, from a CSR whose signature verified.
    Csr(VerifiedCsr),
    /// A key the CA generates and returns with the certificate.
    Generate(KeyType),
}

/// A request for a certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    identity: Identity,
    profile: Profile,
    dns: Vec<String>,
    ips: Vec<String>,
    ttl: Option<Duration>,
    key: KeySource,
    renewed_from: Option<meshca_pki::Serial>,
    /// One of meshca's own identities, asked for by meshca itself (its
    /// server certificate, the admin's): the only way into the reserved
    /// namespace.
    own: bool,
}

impl IssueRequest {
    /// A request for identity `namespace/name` (each must be a DNS label),
    /// with the defaults: `service` profile, its default lifetime, no extra
    /// names, a generated ECDSA P-256 key.
    pub fn new(namespace: &str, name: &str) -> Result<Self, IssuerError> {
        Ok(IssueRequest {
            identity: Identity::new(namespace, name)?,
            profile: Profile::Service,
            dns: Vec::new(),
            ips: Vec::new(),
            ttl: None,
            key: KeySource::Generate(KeyType::EcdsaP256),
            renewed_from: None,
            own: false,
        })
    }

    /// A request for meshca's own identity `meshca-system/<name>` (the
    /// server, the admin), made by meshca itself, never from a caller's
    /// input: [`Authority::issue`] refuses the reserved namespace otherwise.
    pub fn meshca_own(name: &str) -> Result<Self, IssuerError> {
        let mut req = Self::new(meshca_pki::RESERVED_NAMESPACE, name)?;
        req.own = true;
        Ok(req)
    }

    /// Sets the profile.
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// Adds extra DNS SANs (validated when issuing).
    pub fn dns(mut self, dns: Vec<String>) -> Self {
        self.dns = dns;
        self
    }

    /// Adds extra IP SANs (validated when issuing).
    pub fn ips(mut self, ips: Vec<String>) -> Self {
        self.ips = ips;
        self
    }

    /// Asks for a lifetime (else the profile's default).
    pub fn ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        self
    }

    /// Notes that the holder of `serial` renews into this certificate
    /// (it authenticated the request): rotation safety counts holders.
    pub fn renewing(mut self, serial: meshca_pki::Serial) -> Self {
        self.renewed_from = Some(serial);
        self
    }

    /// Certifies the key of a verified CSR.
    pub fn csr(mut self, csr: VerifiedCsr) -> Self {
        self.key = KeySource::Csr(csr);
        self
    }

    /// Has the CA generate a key of this type.
    pub fn generate_key(mut self, key_type: KeyType) -> Self {
        self.key = KeySource::Generate(key_type);
        self
    }

    /// The identity asked for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Extra DNS names asked for.
    pub fn extra_dns(&self) -> &[String] {
        &self.dns
    }

    /// Extra IPs asked for.
    pub fn extra_ips(&self) -> &[String] {
        &self.ips
    }

    /// The lifetime asked for, if any.
    pub fn requested_ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// The profile asked for.
    pub fn requested_profile(&self) -> Profile {
        self.profile
    }

    /// Where the key comes from.
    pub fn key_source(&self) -> &KeySource {
        &self.key
    }
}

/// An issued certificate, recorded.
#[derive(Debug)]
pub struct Issued {
    /// The store record.
    pub record: CertificateRecord,
    /// The leaf then its chain, PEM (the `tls.crt` file).
    pub certificate_pem: String,
    /// The trust bundle, PEM (the `ca.crt` file).
    pub ca_bundle_pem: String,
    /// The generated key, when the CA generated one.
    pub private_key: Option<PrivateKey>,
    /// The lifetime the request asked for (or the profile default).
    pub requested_ttl: Duration,
    /// True when notAfter was cut to the issuing CA's own notAfter.
    pub clipped: bool,
}

/// Applies policy, signs through an issuer, records. See the crate docs.
#[derive(Debug, Clone)]
pub struct Authority {
    issuer: Arc<dyn Issuer>,
    store: Arc<dyn Store>,
    policy: Policy,
    bundle_pem: Arc<PemMemo>,
    chain_pem: Arc<PemMemo>,
}

/// The PEM of the last list of certificates asked for: the trust bundle and
/// the chain change only on rotation, and every issuance returns both.
#[derive(Debug, Default)]
struct PemMemo(std::sync::Mutex<Option<(Vec<Vec<u8>>, String)>>);

impl PemMemo {
    fn pem(&self, ders: &[Vec<u8>]) -> String {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, pem)) = last.as_ref()
            && seen.as_slice() == ders
        {
            return pem.clone();
        }
        let pem: String = ders.iter().map(|d| to_pem("CERTIFICATE", d)).collect();
        *last = Some((ders.to_vec(), pem.clone()));
        pem
    }
}

impl Authority {
    /// Wires an issuer, a store and a policy.
    pub fn new(issuer: Arc<dyn Issuer>, store: Arc<dyn Store>, policy: Policy) -> Self {
        Authority {
            issuer,
            store,
            policy,
            bundle_pem: Arc::default(),
            chain_pem: Arc::default(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The issuer.
    pub fn issuer(&self) -> &Arc<dyn Issuer> {
        &self.issuer
    }

    /// The trust bundle as PEM.
    pub async fn trust_bundle_pem(&self) -> Result<String, IssuerError> {
        Ok(self.bundle_pem.pem(&self.issuer.trust_bundle().await?))
    }

    /// Issues and records a certificate. Every check happens before anything
    /// is signed; the record is committed before the certificate is returned.
    pub async fn issue(&self, req: IssueRequest) -> Result<Issued, IssuerError> {
        // Whoever asks (the API for the admin, a workload or a token, the
        // offline CLI): a certificate in meshca-system could pose as the CA.
        if req.identity.is_reserved() && !req.own {
            return Err(IssuerError::Policy(format!(
                "namespace {} is reserved for meshca itself: no certificate for {} is issued on request (meshca makes its server's and the admin's)",
                meshca_pki::RESERVED_NAMESPACE,
                req.identity
            )));
        }
        let mut requested_ttl = check_ttl(req.ttl, req.profile, self.policy.max_ttl)?;
        if req.ttl.is_none()
            && let Some(max) = self.issuer.max_ttl(req.profile)
        {
            requested_ttl = requested_ttl.min(max);
        }
        let sans = SanSet::build(&req.identity, &self.policy.trust_domain, &req.dns, &req.ips)?;
        let mut spec = LeafSpec {
            identity: req.identity,
            trust_domain: self.policy.trust_domain.clone(),
            profile: req.profile,
            sans,
            ttl: requested_ttl,
            serial: Serial::time_ordered(OffsetDateTime::now_utc())?,
        };
        for _attempt in 0..4 {
            let signed = self.issuer.sign(&req.key, &spec).await?;
            let leaf = &signed.leaf;
            let key_type = match (&req.key, &signed.private_key) {
                (KeySource::Csr(csr), _) => csr.key_type(),
                (KeySource::Generate(_), Some(k)) => k.key_type(),
                (KeySource::Generate(kt), None) => *kt,
            };
            let leaf_pem = to_pem("CERTIFICATE", &leaf.der);
            let certificate_pem = leaf_pem.clone() + &self.chain_pem.pem(&signed.chain);
            let record = CertificateRecord {
                serial: leaf.serial.clone(),
                namespace: spec.identity.namespace().to_owned(),
                name: spec.identity.name().to_owned(),
                profile: spec.profile,
                spiffe_id: spec.sans.uri.clone(),
                dns_names: spec.sans.dns.clone(),
                ip_addresses: spec.sans.ips.iter().map(|ip| ip.to_string()).collect(),
                key_type,
                hierarchy_id: signed.hierarchy_id.clone(),
                issued_at: OffsetDateTime::now_utc(),
                not_before: leaf.not_before,
                not_after: leaf.not_after,
                fingerprint: fingerprint(&leaf.der),
                status: CertStatus::Active,
                revoked_at: None,
                revocation_reason: None,
                certificate_pem: leaf_pem,
                renewed_from: req.renewed_from.clone(),
            };
            match self.store.insert_certificate(&record).await {
                Ok(()) => {
                    return Ok(Issued {
                        record,
                        certificate_pem,
                        ca_bundle_pem: self.trust_bundle_pem().await?,
                        private_key: signed.private_key,
                        requested_ttl,
                        clipped: leaf.clipped,
                    });
                }
                Err(e) if e.is_conflict() => {
                    spec.serial = Serial::time_ordered(OffsetDateTime::now_utc())?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(IssuerError::Policy(
            "could not find an unused serial number after 4 attempts".into(),
        ))
    }
}
