//! The API's JSON bodies (`/v1/sign`, `/v1/issue`, `/v1/tokens`, revoke and
//! rotation): never a panic; a certificate request that parses survives a
//! JSON round trip unchanged, and one that is accepted is valid (its
//! identity, its limits, the key source its endpoint allows); a token is
//! accepted only within its limits. The first byte picks the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_api::{
    CertRequestBody, Endpoint, KeyChoice, MAX_CSR, MAX_SANS, MAX_TOKEN_TTL, MAX_TOKEN_USES,
    RevokeBody, RotateRootBody, TokenRequestBody,
};
use meshca_pki::{Identity, format_duration, parse_csr, parse_duration};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => cert(body, Endpoint::Sign),
        1 => cert(body, Endpoint::Issue),
        2 => {
            if let Ok(t) = TokenRequestBody::parse(body) {
                assert!(!t.ttl.is_zero() && t.ttl <= MAX_TOKEN_TTL, "{:?}", t.ttl);
                assert!((1..=MAX_TOKEN_USES).contains(&t.uses), "{}", t.uses);
                Identity::new(t.identity.namespace(), t.identity.name())
                    .expect("an accepted token's identity is valid");
            }
        }
        _ => {
            // Accepted implies: the window and the token TTL are durations
            // that format and parse back equal (what the CLI shows them as).
            if let Ok(r) = RotateRootBody::parse(body)
                && let Some(w) = r.window
            {
                assert_eq!(parse_duration(&format_duration(w)).ok(), Some(w));
            }
            let _ = RevokeBody::parse(body);
        }
    }
});

fn cert(body: &[u8], endpoint: Endpoint) {
    let Ok(b) = CertRequestBody::from_json(body) else {
        return;
    };
    let again = serde_json::to_vec(&b).expect("a parsed body encodes");
    assert_eq!(
        CertRequestBody::from_json(&again).expect("an encoded body parses"),
        b
    );
    let Ok(req) = b.validate(endpoint) else {
        return;
    };
    assert!(req.dns.len() + req.ips.len() <= MAX_SANS);
    assert_eq!(req.identity.namespace(), b.namespace);
    assert_eq!(req.identity.name(), b.name);
    assert_eq!(
        Identity::new(&b.namespace, &b.name).ok(),
        Some(req.identity.clone())
    );
    match (endpoint, &req.key) {
        (Endpoint::Sign, KeyChoice::Csr(csr)) => {
            assert!(b.csr.as_ref().is_some_and(|c| c.len() <= MAX_CSR));
            parse_csr(csr.der()).expect("an accepted CSR's DER parses");
        }
        (Endpoint::Issue, KeyChoice::Generate(_)) => assert!(b.csr.is_none()),
        (e, k) => panic!("{e:?} accepted {k:?}"),
    }
}
