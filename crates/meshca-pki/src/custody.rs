//! The chain of custody between roots.
//!
//! An agent bootstraps by a root's fingerprint, and a pin must survive a
//! root rotation without ever trusting whatever the server sends. So at
//! `ca rotate prepare` the outgoing root's key certifies the new root's key:
//! a *link*, a CA certificate whose public key is the new root's, signed by
//! the old root. Each hierarchy carries every link from the first root to
//! its own, so an agent pinned to any earlier root (even one retired long
//! ago) can check, with nothing but the pin, that today's root was vouched
//! for by the pinned root's key, link by link.
//!
//! What a link proves is key continuity: the holder of the pinned root's
//! key, at the time of the rotation, chose the next root. A link never
//! signs leaves (it is never a trust anchor); it is checked by
//! [`reachable_roots`] only.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose,
    SubjectPublicKeyInfo,
};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::PkiError;
use crate::ca::{BACKDATE, SigningCa};
use crate::error::signing;
use crate::serial::Serial;

/// The link from `old` (the outgoing root, with its key) to `new_root`.
pub fn link_roots(
    old: &SigningCa,
    new_root: &[u8],
    now: OffsetDateTime,
) -> Result<Vec<u8>, PkiError> {
    let (_, new) = X509Certificate::from_der(new_root)
        .map_err(|e| PkiError::MalformedCertificate(format!("new root: {e}")))?;
    let spki = SubjectPublicKeyInfo::from_der(new.public_key().raw)
        .map_err(|e| PkiError::MalformedCertificate(format!("new root's key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshca");
    dn.push(DnType::CommonName, link_name(new_root));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        Serial::random()?.as_bytes(),
    ));
    params.not_before = now - BACKDATE;
    params.not_after = old.not_after().min(
        new.validity()
            .not_after
            .to_datetime()
            .max(now + std::time::Duration::from_secs(3600)),
    );
    Ok(params
        .signed_by(&spki, &old.issuer)
        .map_err(signing)?
        .der()
        .to_vec())
}

/// The subject CN of the link to `root`: it names the root by its
/// SHA-256, so no other certificate the earlier root ever signed (an
/// intermediate, a leaf under an imported root) can pass for a link.
fn link_name(root: &[u8]) -> String {
    format!("meshca custody link {}", &crate::fingerprint(root)[..40])
}

/// Whether `link` is `prev`'s key vouching for `next`: a CA certificate
/// signed by `prev` (a self-signed root), naming `next` by its SHA-256,
/// with `next`'s key; and `next` is self-signed.
pub fn check_link(link: &[u8], prev: &[u8], next: &[u8]) -> Result<(), PkiError> {
    fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, PkiError> {
        X509Certificate::from_der(der)
            .map(|(_, c)| c)
            .map_err(|e| PkiError::MalformedCertificate(format!("{what}: {e}")))
    }
    let (l, p, n) = (
        parse(link, "custody link")?,
        parse(prev, "earlier root")?,
        parse(next, "later root")?,
    );
    let named = l
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .is_some_and(|cn| cn == link_name(next));
    let ca = l
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !named || !ca || l.issuer() != p.subject() {
        return Err(PkiError::ChainInvalid(
            "not a custody link (a link is a CA certificate issued by the earlier root naming the later root by its SHA-256)".into(),
        ));
    }
    // The signatures last: the checks above are cheap and turn away
    // everything that is not a link at all.
    p.verify_signature(None)
        .map_err(|_| PkiError::ChainInvalid("the earlier root is not self-signed".into()))?;
    l.verify_signature(Some(p.public_key())).map_err(|_| {
        PkiError::ChainInvalid("the custody link is not signed by the earlier root".into())
    })?;
    if l.public_key().raw != n.public_key().raw {
        return Err(PkiError::ChainInvalid(
            "the custody link certifies another key than the later root's".into(),
        ));
    }
    n.verify_signature(None)
        .map_err(|_| PkiError::ChainInvalid("the later root is not self-signed".into()))?;
    Ok(())
}

/// The subject CN of a certificate, if it has one.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, c) = X509Certificate::from_der(der).ok()?;
    c.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// The certificates of `candidates` that `pinned` vouches for: itself, and
/// every root reached from it through `links`, link by link.
///
/// Cost: every certificate is parsed once to index the links by the root
/// they name; signatures are checked only for a link that names a root
/// under consideration, against the roots already reached. Junk offered by
/// an unverified server costs a parse each, never a signature per pair.
pub fn reachable_roots(pinned: &[u8], links: &[Vec<u8>], candidates: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut named: std::collections::HashMap<String, Vec<&[u8]>> = std::collections::HashMap::new();
    for l in links {
        if let Some(cn) = common_name(l) {
            named.entry(cn).or_default().push(l);
        }
    }
    // Earlier roots of the chain travel with the links: they are reached
    // (and then vouch further) like any candidate, but are not returned.
    let pool: Vec<(&[u8], String)> = candidates
        .iter()
        .chain(links.iter())
        .map(|c| (c.as_slice(), link_name(c)))
        .collect();
    let mut reached: Vec<&[u8]> = vec![pinned];
    loop {
        let before = reached.len();
        for (c, name) in &pool {
            if reached.contains(c) {
                continue;
            }
            let Some(ls) = named.get(name) else {
                continue;
            };
            let vouched = ls
                .iter()
                .any(|l| reached.iter().any(|r| check_link(l, r, c).is_ok()));
            if vouched {
                reached.push(c);
            }
        }
        if reached.len() == before {
            break;
        }
    }
    // Only what the caller offered, in its order (the pinned root counts
    // only when offered too: a bundle without it is judged by its links).
    candidates
        .iter()
        .filter(|c| reached.contains(&c.as_slice()))
        .cloned()
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{KeyType, PrivateKey, TrustDomain, generate_root};
    use std::time::Duration;

    fn root(label: &str) -> (Vec<u8>, PrivateKey) {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let now = OffsetDateTime::now_utc();
        let der = generate_root(
            &key,
            &TrustDomain::default(),
            label,
            Duration::from_secs(86400),
            now,
        )
        .unwrap();
        (der, key)
    }

    #[test]
    fn links_carry_a_pin_across_rotations_and_nothing_else() {
        let now = OffsetDateTime::now_utc();
        let (r1, k1) = root("one");
        let (r2, k2) = root("two");
        let (r3, _) = root("three");
        let (evil, evil_key) = root("evil");
        let ca1 = SigningCa::new(r1.clone(), k1, "r1", now).unwrap();
        let l12 = link_roots(&ca1, &r2, now).unwrap();
        // Another certificate the root signed (an intermediate) whose key
        // the attacker holds is not a link to a root of that key.
        let stolen = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let int = crate::generate_intermediate(
            &stolen,
            &ca1,
            &TrustDomain::default(),
            "int",
            Duration::from_secs(3600),
            now,
        )
        .unwrap();
        let fake = generate_root(
            &stolen,
            &TrustDomain::default(),
            "fake",
            Duration::from_secs(3600),
            now,
        )
        .unwrap();
        assert!(check_link(&int, &r1, &fake).is_err());
        assert!(reachable_roots(&r1, &[int], std::slice::from_ref(&fake)).is_empty());
        let l23 = link_roots(
            &SigningCa::new(r2.clone(), k2, "r2", now).unwrap(),
            &r3,
            now,
        )
        .unwrap();
        check_link(&l12, &r1, &r2).unwrap();
        assert!(check_link(&l12, &r2, &r1).is_err());
        assert!(check_link(&l12, &r1, &r3).is_err());
        // Pinned to r1, after two rotations: r3 is reached through r2 (the
        // custody chain carries the earlier roots with the links).
        let links = vec![l12.clone(), r2.clone(), l23.clone()];
        assert_eq!(
            reachable_roots(&r1, &links, std::slice::from_ref(&r3)),
            vec![r3.clone()]
        );
        // A root the attacker links from its own root is not reached, nor
        // one it links from nowhere.
        let evil_link = link_roots(
            &SigningCa::new(evil.clone(), evil_key, "evil", now).unwrap(),
            &r3,
            now,
        )
        .unwrap();
        assert!(reachable_roots(&r1, &[evil_link], std::slice::from_ref(&r3)).is_empty());
        assert_eq!(
            reachable_roots(&r1, &links, &[r1.clone(), evil.clone(), r3.clone()]),
            vec![r1.clone(), r3.clone()]
        );
        // Without the middle link, no way across.
        assert!(reachable_roots(&r1, &[r2, l23], &[r3]).is_empty());
    }

    #[test]
    fn a_link_is_named_for_its_root_valid_now_and_a_ca_certificate() {
        let now = OffsetDateTime::now_utc();
        let (r1, k1) = root("one");
        let (r2, k2) = root("two");
        let ca1 = SigningCa::new(r1.clone(), k1, "r1", now).unwrap();
        let link = link_roots(&ca1, &r2, now).unwrap();
        let (_, l) = X509Certificate::from_der(&link).unwrap();
        assert_eq!(
            common_name(&link).unwrap(),
            format!("meshca custody link {}", &crate::fingerprint(&r2)[..40])
        );
        let from = l.validity().not_before.to_datetime();
        let to = l.validity().not_after.to_datetime();
        assert!(
            from <= now && from >= now - BACKDATE - Duration::from_secs(1),
            "{from}"
        );
        // Never past the root that signed it.
        assert!(to > now && to <= ca1.not_after(), "{to}");
        // Signed by the earlier root, with the later root's key, named for
        // it, but not a CA certificate: not a link.
        let (_, r2c) = X509Certificate::from_der(&r2).unwrap();
        let spki = SubjectPublicKeyInfo::from_der(r2c.public_key().raw).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, link_name(&r2));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        let not_ca = params.signed_by(&spki, &ca1.issuer).unwrap().der().to_vec();
        let e = check_link(&not_ca, &r1, &r2).unwrap_err();
        assert!(e.to_string().contains("not a custody link"), "{e}");
        // Nor a CA certificate under another name.
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "meshca custody link");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let unnamed = params.signed_by(&spki, &ca1.issuer).unwrap().der().to_vec();
        assert!(check_link(&unnamed, &r1, &r2).is_err());
        // A new root shorter-lived than an hour still gets a link good for
        // an hour (within the signing root's life): agents fetching it
        // meanwhile must not find it expired.
        let short_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let short = generate_root(
            &short_key,
            &TrustDomain::default(),
            "short",
            Duration::from_secs(600),
            now,
        )
        .unwrap();
        let link = link_roots(&ca1, &short, now).unwrap();
        let (_, l) = X509Certificate::from_der(&link).unwrap();
        let to = l.validity().not_after.to_datetime();
        assert!(to >= now + Duration::from_secs(3599), "{to}");
        // Nor the right certificate checked against the wrong earlier root.
        let ca2 = SigningCa::new(r2.clone(), k2, "r2", now).unwrap();
        let (r3, _) = root("three");
        let l23 = link_roots(&ca2, &r3, now).unwrap();
        let e = check_link(&l23, &r1, &r3).unwrap_err();
        assert!(e.to_string().contains("not a custody link"), "{e}");
    }
}
