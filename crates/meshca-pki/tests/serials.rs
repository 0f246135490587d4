//! Serial numbers of 100,000 issued leaves (time-ordered, as the authority
//! makes them), read back from the DER: all
//! different, at least 64 bits long (CA/B Forum: 64 bits from a CSPRNG),
//! and every one of their low 64 bits set about half the time.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use meshca_pki::*;
use time::OffsetDateTime;

const LEAVES: usize = 100_000;

#[test]
fn serials_of_a_hundred_thousand_leaves_are_unique_and_random() {
    let now = OffsetDateTime::now_utc();
    let td = TrustDomain::default();
    let ca_key = PrivateKey::generate(KeyType::Ed25519).unwrap();
    let root = generate_root(&ca_key, &td, "serials", DEFAULT_ROOT_TTL, now).unwrap();
    let ca = std::sync::Arc::new(SigningCa::new(root, ca_key, "root", now).unwrap());
    let leaf_key = LeafPublicKey::of(&PrivateKey::generate(KeyType::Ed25519).unwrap()).unwrap();
    let id = Identity::new("default", "web").unwrap();
    let sans = SanSet::build(&id, &td, &[], &[]).unwrap();
    // Two threads: the machine has two cores.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (ca, key, id, td, sans) = (
                ca.clone(),
                leaf_key.clone(),
                id.clone(),
                td.clone(),
                sans.clone(),
            );
            std::thread::spawn(move || {
                (0..LEAVES / 2)
                    .map(|_| {
                        let spec = LeafSpec {
                            identity: id.clone(),
                            trust_domain: td.clone(),
                            profile: Profile::Service,
                            sans: sans.clone(),
                            ttl: Duration::from_secs(3600),
                            serial: Serial::time_ordered(OffsetDateTime::now_utc()).unwrap(),
                        };
                        let leaf = ca.sign_leaf(&key, &spec, now).unwrap();
                        // What a verifier sees, not what was asked for.
                        cert_facts(&leaf.der).unwrap().serial
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let serials: Vec<Serial> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(serials.len(), LEAVES);
    let unique: HashSet<&[u8]> = serials.iter().map(Serial::as_bytes).collect();
    assert_eq!(unique.len(), LEAVES, "serial numbers repeat");
    let mut ones = [0usize; 64];
    for s in &serials {
        let b = s.as_bytes();
        assert!(
            b.len() * 8 >= 64 + 8,
            "serial {} is shorter than 72 bits",
            s.to_hex()
        );
        let low = u64::from_be_bytes(b[b.len() - 8..].try_into().unwrap());
        for (bit, count) in ones.iter_mut().enumerate() {
            *count += usize::from(low >> bit & 1 == 1);
        }
    }
    // Each bit is a fair coin: 100,000 flips land within 45% and 55% with
    // overwhelming probability (about 30 standard deviations).
    for (bit, count) in ones.iter().enumerate() {
        let share = *count as f64 / LEAVES as f64;
        assert!(
            (0.45..0.55).contains(&share),
            "bit {bit} is set in {share:.3} of serials"
        );
    }
}
