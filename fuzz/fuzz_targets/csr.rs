//! CSR parsing: never panics, and what is accepted is accepted the same way
//! in both encodings with a policy-approved key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshca_pki::{csr_der, key_type_of_spki, parse_csr, to_pem};

fuzz_target!(|data: &[u8]| {
    let Ok(csr) = parse_csr(data) else { return };
    // Accepted implies: DER extractable, and the PEM and DER forms agree.
    let der = csr_der(data).expect("accepted CSR has DER");
    let again = parse_csr(&der).expect("DER of an accepted CSR parses");
    assert_eq!(again.key_type(), csr.key_type());
    let pem = to_pem("CERTIFICATE REQUEST", &der);
    let third = parse_csr(pem.as_bytes()).expect("PEM of an accepted CSR parses");
    assert_eq!(third.key_type(), csr.key_type());
    let _ = key_type_of_spki;
});
