//! What meshca decided about a certificate, held against what Vault signs.
//!
//! Twice: before Vault is asked, from the role's settings ([`RoleUsages`]),
//! so that a role that would add usages is refused without a certificate
//! being made; and on each certificate Vault returns ([`check_leaf`],
//! [`check_not_after`], [`check_chain`]; names and key are checked in
//! `accept`), because the role may have changed since it was read and
//! because Vault's answer is what gets handed out. meshca's leaves are
//! defined in `meshca_pki::SigningCa::sign_leaf`: not a CA, keyUsage
//! digitalSignature (and keyEncipherment for RSA keys), the profile's
//! extended key usages ([`Profile::server_auth`], [`Profile::client_auth`])
//! and nothing else.

use std::time::Duration;

use meshca_pki::{KeyType, Profile};
use serde_json::Value;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{ExtendedKeyUsage, KeyUsage, ParsedExtension};
use x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS;
use x509_parser::prelude::FromDer;

/// How much later than asked a certificate may end. Vault computes notAfter
/// from its own clock; meshca tolerates as much skew between the two as it
/// backdates its own certificates by, so that Vault a few minutes ahead
/// does not stop issuance.
pub(crate) const NOT_AFTER_SKEW: Duration = meshca_pki::BACKDATE;

/// The `--vault-profile-role` / `profile_roles` hint shared by the messages.
fn own_role(profile: Profile) -> String {
    format!(
        "give the {profile} profile a role of its own ([issuer.vault.profile_roles] in meshca.toml, or --vault-profile-role {profile}=ROLE)"
    )
}

/// The extended key usages of a profile, as openssl and RFC 5280 name them.
fn profile_ekus(profile: Profile) -> Vec<&'static str> {
    let mut v = Vec::new();
    if profile.server_auth() {
        v.push("serverAuth");
    }
    if profile.client_auth() {
        v.push("clientAuth");
    }
    v
}

/// The role settings under which Vault signs exactly the profile's
/// extended key usages.
fn eku_settings(profile: Profile) -> String {
    format!(
        "server_flag={} client_flag={} code_signing_flag=false email_protection_flag=false and an empty ext_key_usage and ext_key_usage_oids",
        profile.server_auth(),
        profile.client_auth()
    )
}

const KEY_USAGE_RULE: &str = "meshca's certificates have the key usage digitalSignature and nothing more (keyEncipherment as well for RSA keys)";

/// A check that a certificate from Vault failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failed {
    /// Which check: `basic_constraints`, `key_usage`, `ext_key_usage`,
    /// `not_after`, `chain` (and, in `accept`, `key`, `names`).
    pub(crate) check: &'static str,
    /// What the certificate has.
    pub(crate) found: String,
    /// What to change, naming the role setting.
    pub(crate) fix: String,
}

fn failed(check: &'static str, found: impl Into<String>, fix: impl Into<String>) -> Failed {
    Failed {
        check,
        found: found.into(),
        fix: fix.into(),
    }
}

/// Checks that `der` is a leaf with exactly `profile`'s usages.
pub(crate) fn check_leaf(der: &[u8], profile: Profile) -> Result<(), Failed> {
    let (_, x) = X509Certificate::from_der(der).map_err(|e| {
        failed(
            "basic_constraints",
            format!("the certificate does not parse: {e}"),
            "check that --vault-addr is Vault",
        )
    })?;
    let no_ca = "Vault's sign and issue endpoints never make CA certificates: check that --vault-addr and --vault-mount name Vault's PKI mount";
    match x.get_extension_unique(&OID_X509_EXT_BASIC_CONSTRAINTS) {
        // Absent is a leaf: RFC 5280 (4.2.1.9) lets only a certificate whose
        // basicConstraints says cA TRUE sign certificates; rustls-webpki and
        // Go treat one without it as an end entity, and OpenSSL does too
        // when keyUsage is present without keyCertSign, which the keyUsage
        // check below requires. Vault leaves it out unless the role sets
        // basic_constraints_valid_for_non_ca=true, so requiring it would
        // refuse Vault's default roles for nothing.
        Ok(None) => {}
        Ok(Some(ext)) => match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) if !bc.ca => {}
            ParsedExtension::BasicConstraints(bc) => {
                let len = bc
                    .path_len_constraint
                    .map(|n| format!(", pathlen:{n}"))
                    .unwrap_or_default();
                return Err(failed(
                    "basic_constraints",
                    format!("basicConstraints says CA:TRUE{len}, a CA certificate"),
                    no_ca,
                ));
            }
            // An extension that does not parse could say anything to
            // another parser.
            _ => {
                return Err(failed(
                    "basic_constraints",
                    "its basicConstraints extension does not parse",
                    no_ca,
                ));
            }
        },
        Err(e) => {
            return Err(failed(
                "basic_constraints",
                format!("its basicConstraints cannot be read ({e})"),
                no_ca,
            ));
        }
    }

    let rsa = meshca_pki::key_type_of_spki(x.public_key().raw).is_ok_and(|k| k.is_rsa());
    let ku_fix = "set key_usage=DigitalSignature on the role (Vault's default adds KeyAgreement and KeyEncipherment)";
    let ku = match x.key_usage() {
        Ok(Some(ku)) => ku.value,
        // Without keyUsage the key may be used for anything.
        Ok(None) => {
            return Err(failed(
                "key_usage",
                format!("it has no keyUsage extension (a key for any use); {KEY_USAGE_RULE}"),
                ku_fix,
            ));
        }
        Err(e) => {
            return Err(failed(
                "key_usage",
                format!("its keyUsage cannot be read ({e})"),
                ku_fix,
            ));
        }
    };
    // Bit 0 is digitalSignature, bit 2 keyEncipherment (x509-parser's
    // accessors); any other bit, defined or not, is more than meshca gives.
    let allowed: u16 = if rsa { 0b101 } else { 0b001 };
    if !ku.digital_signature() || (ku.flags & !allowed) != 0 {
        return Err(failed(
            "key_usage",
            format!(
                "its keyUsage is {:?}; {KEY_USAGE_RULE}",
                key_usage_names(ku)
            ),
            ku_fix,
        ));
    }

    let want = profile_ekus(profile);
    let eku_fix = format!(
        "the role must set {}; or {}",
        eku_settings(profile),
        own_role(profile)
    );
    let eku = match x.extended_key_usage() {
        Ok(Some(eku)) => eku.value,
        // Without extendedKeyUsage a certificate is good for any purpose:
        // a server certificate would authenticate a client.
        Ok(None) => {
            return Err(failed(
                "ext_key_usage",
                format!(
                    "it has no extendedKeyUsage extension (a certificate for any purpose) where the {profile} profile has exactly {want:?}"
                ),
                eku_fix,
            ));
        }
        Err(e) => {
            return Err(failed(
                "ext_key_usage",
                format!("its extendedKeyUsage cannot be read ({e})"),
                eku_fix,
            ));
        }
    };
    let exact = eku.server_auth == profile.server_auth()
        && eku.client_auth == profile.client_auth()
        && !eku.any
        && !eku.code_signing
        && !eku.email_protection
        && !eku.time_stamping
        && !eku.ocsp_signing
        && eku.other.is_empty();
    if !exact {
        return Err(failed(
            "ext_key_usage",
            format!(
                "its extendedKeyUsage is {:?} where the {profile} profile has exactly {want:?}",
                eku_names(eku)
            ),
            eku_fix,
        ));
    }
    Ok(())
}

fn key_usage_names(ku: &KeyUsage) -> Vec<&'static str> {
    [
        (ku.digital_signature(), "digitalSignature"),
        (ku.non_repudiation(), "contentCommitment"),
        (ku.key_encipherment(), "keyEncipherment"),
        (ku.data_encipherment(), "dataEncipherment"),
        (ku.key_agreement(), "keyAgreement"),
        (ku.key_cert_sign(), "keyCertSign"),
        (ku.crl_sign(), "cRLSign"),
        (ku.encipher_only(), "encipherOnly"),
        (ku.decipher_only(), "decipherOnly"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect()
}

fn eku_names(eku: &ExtendedKeyUsage<'_>) -> Vec<String> {
    let mut names: Vec<String> = [
        (eku.any, "anyExtendedKeyUsage"),
        (eku.server_auth, "serverAuth"),
        (eku.client_auth, "clientAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_owned())
    .collect();
    names.extend(eku.other.iter().map(|o| o.to_id_string()));
    names
}

/// Checks that a certificate answered at `answered_at` for `ttl` ends no
/// later than that (with [`NOT_AFTER_SKEW`] for Vault's clock).
pub(crate) fn check_not_after(
    not_after: OffsetDateTime,
    answered_at: OffsetDateTime,
    ttl: Duration,
) -> Result<(), Failed> {
    let asked = answered_at + ttl;
    if not_after <= asked + NOT_AFTER_SKEW {
        return Ok(());
    }
    let over = Duration::try_from(not_after - asked).unwrap_or_default();
    Err(failed(
        "not_after",
        format!(
            "it is valid until {}, {} past the {} meshca asked for ({} of clock skew is allowed)",
            meshca_pki::rfc3339(not_after),
            meshca_pki::humanize(over),
            meshca_pki::format_duration(ttl),
            meshca_pki::humanize(NOT_AFTER_SKEW)
        ),
        "Vault signs for the ttl meshca sends unless the role decides otherwise: check the role's ttl, max_ttl, not_after and not_after_bound (bao read MOUNT/roles/ROLE), and that Vault's clock is right",
    ))
}

/// Checks that `leaf`, with the intermediates Vault sent, chains to a root
/// of the mount's trust bundle at `at`.
pub(crate) fn check_chain(
    leaf: &[u8],
    chain: &[Vec<u8>],
    bundle: &[Vec<u8>],
    at: OffsetDateTime,
) -> Result<(), Failed> {
    let mut full = Vec::with_capacity(chain.len() + 1);
    full.push(leaf.to_vec());
    full.extend(chain.iter().cloned());
    meshca_pki::verify_chain(&full, bundle, at).map_err(|e| {
        failed(
            "chain",
            format!(
                "it does not chain to the mount's issuers ({} certificate(s) in the trust bundle meshca read from the mount): {e}",
                bundle.len()
            ),
            "the role's issuer_ref must name an issuer of this mount, and the answer must come from the Vault and mount meshca reads its issuers from (--vault-addr, --vault-mount)",
        )
    })
}

/// What a role makes of the usages of the certificates it signs (Vault's
/// `parseKeyUsages` and `parseExtKeyUsages`: flags, then the lists).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RoleUsages {
    pub(crate) server_flag: bool,
    pub(crate) client_flag: bool,
    code_signing_flag: bool,
    email_protection_flag: bool,
    ext_key_usage: Vec<String>,
    ext_key_usage_oids: Vec<String>,
    /// `None` when the role does not say (then only the answer is checked).
    key_usage: Option<Vec<String>>,
    /// `any`, `ec`, `rsa`, `ed25519`.
    key_type: String,
}

/// A list setting: a JSON list, or a comma-separated string (Vault takes
/// both); entries trimmed, empty ones dropped.
fn list(v: &Value) -> Vec<String> {
    let items: Vec<&str> = match v {
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        Value::String(s) => s.split(',').collect(),
        _ => Vec::new(),
    };
    items
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl RoleUsages {
    /// Reads them from a role's `data` (its flags already read as booleans).
    pub(crate) fn from_role(d: &Value, server_flag: bool, client_flag: bool) -> Self {
        RoleUsages {
            server_flag,
            client_flag,
            code_signing_flag: d["code_signing_flag"].as_bool().unwrap_or(false),
            email_protection_flag: d["email_protection_flag"].as_bool().unwrap_or(false),
            ext_key_usage: list(&d["ext_key_usage"]),
            ext_key_usage_oids: list(&d["ext_key_usage_oids"]),
            key_usage: (!d["key_usage"].is_null()).then(|| list(&d["key_usage"])),
            key_type: d["key_type"].as_str().unwrap_or("any").to_owned(),
        }
    }

    fn lists(&self, eku: &str) -> bool {
        self.ext_key_usage
            .iter()
            .any(|e| e.eq_ignore_ascii_case(eku))
    }

    /// Whatever keeps this role from signing exactly `profile`'s usages for
    /// a key of type `key` (when known; else for the key types the role
    /// takes), each problem naming the setting and its fix. Empty: it fits.
    pub(crate) fn misfits(&self, profile: Profile, key: Option<KeyType>) -> Vec<String> {
        let mut out = Vec::new();

        let server = self.server_flag || self.lists("ServerAuth");
        let client = self.client_flag || self.lists("ClientAuth");
        let mut needs = Vec::new();
        if profile.server_auth() && !server {
            needs.push("server_flag=true");
        }
        if profile.client_auth() && !client {
            needs.push("client_flag=true");
        }
        if !needs.is_empty() {
            out.push(format!(
                "ext_key_usage check: the {profile} profile needs {}; set {} on the role or {}",
                needs.join(" and "),
                if needs.len() == 1 { "it" } else { "them" },
                own_role(profile)
            ));
        }

        let mut extra: Vec<String> = Vec::new();
        let mut fix: Vec<&str> = Vec::new();
        if !profile.server_auth() && self.server_flag {
            extra.push("serverAuth (server_flag=true)".into());
            fix.push("server_flag=false");
        }
        if !profile.client_auth() && self.client_flag {
            extra.push("clientAuth (client_flag=true)".into());
            fix.push("client_flag=false");
        }
        if self.code_signing_flag {
            extra.push("codeSigning (code_signing_flag=true)".into());
            fix.push("code_signing_flag=false");
        }
        if self.email_protection_flag {
            extra.push("emailProtection (email_protection_flag=true)".into());
            fix.push("email_protection_flag=false");
        }
        // An entry Vault does not know is ignored by Vault; it is refused
        // here all the same (an empty list is the only one meshca needs).
        let listed: Vec<&str> = self
            .ext_key_usage
            .iter()
            .filter(|e| {
                !((e.eq_ignore_ascii_case("ServerAuth") && profile.server_auth())
                    || (e.eq_ignore_ascii_case("ClientAuth") && profile.client_auth()))
            })
            .map(String::as_str)
            .collect();
        if !listed.is_empty() {
            extra.push(format!("{} (ext_key_usage)", listed.join(", ")));
            fix.push("an empty ext_key_usage");
        }
        if !self.ext_key_usage_oids.is_empty() {
            extra.push(format!(
                "{} (ext_key_usage_oids)",
                self.ext_key_usage_oids.join(", ")
            ));
            fix.push("an empty ext_key_usage_oids");
        }
        if !extra.is_empty() {
            out.push(format!(
                "ext_key_usage check: the {profile} profile's certificates have exactly the extended key usages {:?}, and this role adds {}; set {} on the role, or {}",
                profile_ekus(profile),
                extra.join(", "),
                fix.join(" "),
                own_role(profile)
            ));
        }

        if let Some(ku) = &self.key_usage {
            let rsa = match key {
                Some(k) => k.is_rsa(),
                None => self.key_type.eq_ignore_ascii_case("rsa"),
            };
            let more: Vec<&str> = ku
                .iter()
                .filter(|k| {
                    !(k.eq_ignore_ascii_case("DigitalSignature")
                        || rsa && k.eq_ignore_ascii_case("KeyEncipherment"))
                })
                .map(String::as_str)
                .collect();
            let signs = ku
                .iter()
                .any(|k| k.eq_ignore_ascii_case("DigitalSignature"));
            if !more.is_empty() || !signs {
                let what = if more.is_empty() {
                    "lacks DigitalSignature, which TLS needs".to_owned()
                } else {
                    format!("adds {}", more.join(", "))
                };
                out.push(format!(
                    "key_usage check: {KEY_USAGE_RULE}, and this role's key_usage {ku:?} {what}; set key_usage=DigitalSignature on the role"
                ));
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair, KeyUsagePurpose as Ku, SanType,
    };
    use serde_json::json;

    fn root(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(2);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    /// A leaf as a `server` role that does it right would sign, changed by `f`.
    fn leaf(
        ca: &CertifiedIssuer<'static, KeyPair>,
        f: impl FnOnce(&mut CertificateParams),
    ) -> Vec<u8> {
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://cluster.local/ns/default/sa/web").unwrap(),
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![Ku::DigitalSignature];
        p.extended_key_usages = vec![Eku::ServerAuth];
        p.not_before = now - time::Duration::seconds(30);
        p.not_after = now + time::Duration::hours(1);
        p.use_authority_key_identifier_extension = true;
        f(&mut p);
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &**ca).unwrap().der().to_vec()
    }

    fn check_of(r: Result<(), Failed>) -> &'static str {
        r.err().map_or("ok", |f| f.check)
    }

    #[test]
    fn a_leaf_with_exactly_the_profiles_usages_passes() {
        let ca = root("r");
        assert_eq!(
            check_of(check_leaf(&leaf(&ca, |_| {}), Profile::Server)),
            "ok"
        );
        assert_eq!(
            check_of(check_leaf(&leaf(&ca, |_| {}), Profile::Webhook)),
            "ok"
        );
        // Vault's default: no basicConstraints at all. Still a leaf.
        let absent = leaf(&ca, |p| p.is_ca = IsCa::NoCa);
        assert_eq!(check_of(check_leaf(&absent, Profile::Server)), "ok");
        let service = leaf(&ca, |p| {
            p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth]
        });
        assert_eq!(check_of(check_leaf(&service, Profile::Service)), "ok");
        let client = leaf(&ca, |p| p.extended_key_usages = vec![Eku::ClientAuth]);
        assert_eq!(check_of(check_leaf(&client, Profile::Client)), "ok");
        assert_eq!(check_of(check_leaf(&client, Profile::Bootstrap)), "ok");
    }

    #[test]
    fn meshcas_own_leaves_pass_for_every_profile_and_key_type() {
        // The definition compared against is sign_leaf's: a leaf meshca's
        // built-in CA makes must pass, RSA (keyEncipherment) included.
        use meshca_pki::{
            Identity, LeafPublicKey, LeafSpec, PrivateKey, SanSet, Serial, SigningCa, TrustDomain,
        };
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::default();
        let ca_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let der =
            meshca_pki::generate_root(&ca_key, &td, "t", Duration::from_secs(7200), now).unwrap();
        let ca = SigningCa::new(der.clone(), ca_key, "ca", now).unwrap();
        let id = Identity::new("default", "web").unwrap();
        for kt in [KeyType::EcdsaP256, KeyType::Ed25519, KeyType::Rsa2048] {
            let key = PrivateKey::generate(kt).unwrap();
            for profile in Profile::ALL {
                let spec = LeafSpec {
                    sans: SanSet::build(&id, &td, &[], &[]).unwrap(),
                    identity: id.clone(),
                    trust_domain: td.clone(),
                    profile,
                    ttl: Duration::from_secs(3600),
                    serial: Serial::random().unwrap(),
                };
                let leaf = ca
                    .sign_leaf(&LeafPublicKey::of(&key).unwrap(), &spec, now)
                    .unwrap();
                assert_eq!(check_leaf(&leaf.der, profile), Ok(()), "{kt} {profile}");
                assert_eq!(
                    check_chain(&leaf.der, &[], std::slice::from_ref(&der), now),
                    Ok(())
                );
            }
        }
    }

    #[test]
    fn extra_extended_key_usages_are_refused_by_name() {
        let ca = root("r");
        // What the role the README used to document signs for a server.
        let documented = leaf(&ca, |p| {
            p.extended_key_usages = vec![
                Eku::ServerAuth,
                Eku::ClientAuth,
                Eku::CodeSigning,
                Eku::EmailProtection,
            ]
        });
        let f = check_leaf(&documented, Profile::Server).unwrap_err();
        assert_eq!(f.check, "ext_key_usage");
        for needle in [
            "clientAuth",
            "codeSigning",
            "emailProtection",
            "[\"serverAuth\"]",
        ] {
            assert!(f.found.contains(needle), "{needle}: {f:?}");
        }
        for needle in [
            "client_flag=false",
            "code_signing_flag=false",
            "--vault-profile-role server=",
        ] {
            assert!(f.fix.contains(needle), "{needle}: {f:?}");
        }
        // A service certificate is not a client certificate, nor the reverse.
        let service = leaf(&ca, |p| {
            p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth]
        });
        assert_eq!(
            check_of(check_leaf(&service, Profile::Client)),
            "ext_key_usage"
        );
        assert_eq!(
            check_of(check_leaf(&service, Profile::Server)),
            "ext_key_usage"
        );
        let server = leaf(&ca, |_| {});
        assert_eq!(
            check_of(check_leaf(&server, Profile::Service)),
            "ext_key_usage"
        );
        for ekus in [
            vec![],
            vec![Eku::ServerAuth, Eku::Any],
            vec![Eku::ServerAuth, Eku::TimeStamping],
            vec![Eku::ServerAuth, Eku::OcspSigning],
            vec![Eku::ServerAuth, Eku::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 5])],
        ] {
            let c = leaf(&ca, |p| p.extended_key_usages = ekus.clone());
            assert_eq!(
                check_of(check_leaf(&c, Profile::Server)),
                "ext_key_usage",
                "{ekus:?}"
            );
        }
    }

    #[test]
    fn ca_certificates_and_extra_key_usages_are_refused() {
        let ca = root("r");
        let as_ca = leaf(&ca, |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0))
        });
        let f = check_leaf(&as_ca, Profile::Server).unwrap_err();
        assert_eq!(f.check, "basic_constraints");
        assert!(f.found.contains("CA:TRUE, pathlen:0"), "{f:?}");
        // Vault's default key_usage on an EC key.
        let default_ku = leaf(&ca, |p| {
            p.key_usages = vec![Ku::DigitalSignature, Ku::KeyAgreement, Ku::KeyEncipherment]
        });
        let f = check_leaf(&default_ku, Profile::Server).unwrap_err();
        assert_eq!(f.check, "key_usage");
        assert!(
            f.found.contains("keyAgreement") && f.fix.contains("key_usage=DigitalSignature"),
            "{f:?}"
        );
        for ku in [
            vec![],
            vec![Ku::KeyEncipherment],
            vec![Ku::DigitalSignature, Ku::KeyCertSign],
            vec![Ku::DigitalSignature, Ku::ContentCommitment],
            vec![Ku::DigitalSignature, Ku::KeyEncipherment],
        ] {
            let c = leaf(&ca, |p| p.key_usages = ku.clone());
            assert_eq!(
                check_of(check_leaf(&c, Profile::Server)),
                "key_usage",
                "{ku:?}"
            );
        }
    }

    #[test]
    fn lifetimes_past_what_was_asked_are_refused() {
        let now = OffsetDateTime::now_utc();
        let hour = Duration::from_secs(3600);
        assert_eq!(check_of(check_not_after(now + hour, now, hour)), "ok");
        // Vault's clock a few minutes ahead is tolerated...
        assert_eq!(
            check_of(check_not_after(
                now + hour + Duration::from_secs(240),
                now,
                hour
            )),
            "ok"
        );
        // ...more is not.
        let f = check_not_after(now + hour + Duration::from_secs(600), now, hour).unwrap_err();
        assert_eq!(f.check, "not_after");
        assert!(f.found.contains("1h") && f.fix.contains("max_ttl"), "{f:?}");
        assert_eq!(
            check_of(check_not_after(now + 48 * hour, now, hour)),
            "not_after"
        );
    }

    #[test]
    fn chains_must_reach_the_mounts_bundle() {
        let now = OffsetDateTime::now_utc();
        let mount = root("the mount's root");
        let other = root("another CA");
        let bundle = vec![mount.der().to_vec()];
        let ours = leaf(&mount, |_| {});
        assert_eq!(check_of(check_chain(&ours, &[], &bundle, now)), "ok");
        let theirs = leaf(&other, |_| {});
        let f = check_chain(&theirs, &[], &bundle, now).unwrap_err();
        assert_eq!(f.check, "chain");
        assert!(f.fix.contains("issuer_ref"), "{f:?}");
        // Sending the other CA along does not make it trusted.
        assert_eq!(
            check_of(check_chain(&theirs, &[other.der().to_vec()], &bundle, now)),
            "chain"
        );
    }

    #[test]
    fn roles_are_read_for_the_usages_they_add() {
        let documented = json!({
            "server_flag": true, "client_flag": true, "code_signing_flag": false,
            "email_protection_flag": false, "ext_key_usage": [], "ext_key_usage_oids": [],
            "key_usage": ["DigitalSignature", "KeyAgreement", "KeyEncipherment"], "key_type": "any",
        });
        let r = RoleUsages::from_role(&documented, true, true);
        let service = r.misfits(Profile::Service, None);
        assert_eq!(service.len(), 1, "{service:?}");
        assert!(
            service[0].starts_with("key_usage check") && service[0].contains("KeyAgreement"),
            "{service:?}"
        );
        let server = r
            .misfits(Profile::Server, Some(KeyType::EcdsaP256))
            .join("; ");
        assert!(
            server.contains("ext_key_usage check")
                && server.contains("clientAuth (client_flag=true)")
                && server.contains("client_flag=false")
                && server.contains("--vault-profile-role server=ROLE"),
            "{server}"
        );

        let exact = |server_flag: bool, client_flag: bool| {
            let mut d = documented.clone();
            d["key_usage"] = json!("DigitalSignature");
            RoleUsages::from_role(&d, server_flag, client_flag)
        };
        for (role, profiles) in [
            (exact(true, true), &[Profile::Service][..]),
            (exact(true, false), &[Profile::Server, Profile::Webhook][..]),
            (
                exact(false, true),
                &[Profile::Client, Profile::Bootstrap][..],
            ),
        ] {
            for p in Profile::ALL {
                let fits = role.misfits(p, Some(KeyType::EcdsaP256)).is_empty();
                assert_eq!(fits, profiles.contains(&p), "{p}: {role:?}");
            }
        }

        let mut d = documented.clone();
        d["key_usage"] = json!(["DigitalSignature", "KeyEncipherment"]);
        d["code_signing_flag"] = json!(true);
        d["ext_key_usage"] = json!(["TimeStamping"]);
        d["ext_key_usage_oids"] = json!("1.3.6.1.5.5.7.3.5");
        let r = RoleUsages::from_role(&d, true, true);
        let m = r
            .misfits(Profile::Service, Some(KeyType::EcdsaP256))
            .join("; ");
        for needle in [
            "codeSigning (code_signing_flag=true)",
            "TimeStamping (ext_key_usage)",
            "1.3.6.1.5.5.7.3.5 (ext_key_usage_oids)",
            "adds KeyEncipherment",
        ] {
            assert!(m.contains(needle), "{needle}: {m}");
        }
        // keyEncipherment is meshca's for RSA keys.
        let m = r.misfits(Profile::Service, Some(KeyType::Rsa2048));
        assert!(m.iter().all(|p| !p.starts_with("key_usage")), "{m:?}");
        // A client-only role cannot serve the service profile.
        let m = exact(false, true)
            .misfits(Profile::Service, None)
            .join("; ");
        assert!(m.contains("needs server_flag=true"), "{m}");
    }
}
