//! PEM/DER certificate bundles: never panic; what parses can be described,
//! and re-encoding it as PEM gives back the same certificates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_pki::{describe, parse_certs, to_pem};

fuzz_target!(|data: &[u8]| {
    let Ok(certs) = parse_certs(data) else { return };
    assert!(!certs.is_empty());
    let now = time::OffsetDateTime::UNIX_EPOCH;
    let mut pem = String::new();
    for c in &certs {
        describe(c, now).expect("a parsed certificate can be described");
        pem.push_str(&to_pem("CERTIFICATE", c));
    }
    assert_eq!(parse_certs(pem.as_bytes()).expect("round trip"), certs);
});
