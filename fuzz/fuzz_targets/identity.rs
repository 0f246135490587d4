//! Identities, DNS names, trust domains and the SANs built from them: never
//! panic; what is accepted is valid (RFC 1035 labels, lower case, no
//! wildcard, nothing that could escape a path or a SPIFFE ID), and
//! validating an accepted value again gives it back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_pki::{Identity, SanSet, TrustDomain, validate_dns_name};

fn valid_dns(n: &str) -> bool {
    n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = validate_dns_name(s) {
        assert!(valid_dns(&n), "accepted {s:?} as {n:?}");
        assert_eq!(validate_dns_name(&n).expect("accepted again"), n);
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert!(valid_dns(td.as_str()), "trust domain {s:?}");
    }
    // Two halves as namespace and name, the rest of the input as an extra SAN.
    let mut parts = s.splitn(3, '\u{1}');
    let (ns, name, extra) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next(),
    );
    if let Ok(id) = Identity::new(ns, name) {
        for part in [id.namespace(), id.name()] {
            assert!(
                valid_dns(part) && !part.contains('.'),
                "identity part {part:?}"
            );
        }
        let td = TrustDomain::default();
        let spiffe = id.spiffe_id(&td);
        assert_eq!(
            spiffe,
            format!("spiffe://{td}/ns/{}/sa/{}", id.namespace(), id.name())
        );
        let dns: Vec<String> = extra.map(|e| vec![e.to_owned()]).unwrap_or_default();
        if let Ok(sans) = SanSet::build(&id, &td, &dns, &[]) {
            assert_eq!(sans.uri, spiffe);
            assert!(sans.dns.iter().all(|d| valid_dns(d)), "{:?}", sans.dns);
        }
    }
});
