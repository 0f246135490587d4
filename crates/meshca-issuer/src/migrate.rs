//! Moving a CA between stores (embedded to etcd and back) with its keys:
//! key files become sealed keys and sealed keys become 0600 key files, so the
//! copy works on its own. A second pass reads everything back and compares.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use meshca_files::{PUBLIC_MODE, SECRET_MODE, create_private_dir, read_secret, write_atomic};
use meshca_pki::{PrivateKey, SealKey, SigningCa, parse_certs};
use meshca_store::{CertFilter, HierarchyRecord, SealedKeys, Store};
use time::OffsetDateTime;

use crate::builtin::{intermediate_seal_label, root_seal_label};
use crate::{DataDir, IssuerError};

const MAX_KEY_FILE: u64 = 1024 * 1024;
/// Inserts in flight while copying certificates.
const PARALLEL: usize = 32;

/// One side of a copy: a store and where its CA keys are.
#[derive(Debug, Clone)]
pub struct CaPlace {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Keys as files under `DIR/ca/<id>/` (the embedded layout).
    pub key_dir: Option<PathBuf>,
    /// Keys sealed in the hierarchy records (shared stores).
    pub seal: Option<SealKey>,
}

/// What was copied (or verified).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Hierarchies, with their keys.
    pub hierarchies: usize,
    /// Certificate records.
    pub certificates: usize,
    /// Join tokens.
    pub tokens: usize,
}

fn policy(msg: String) -> IssuerError {
    IssuerError::Policy(msg)
}

/// The PEM keys of a hierarchy (intermediate, root if held).
fn keys_of(place: &CaPlace, h: &HierarchyRecord) -> Result<(String, Option<String>), IssuerError> {
    if let Some(sealed) = &h.sealed_keys {
        let seal = place
            .seal
            .as_ref()
            .ok_or_else(|| IssuerError::NeedSealKey {
                location: place.store.location(),
            })?;
        let int = seal.open(&sealed.intermediate, &intermediate_seal_label(&h.id))?;
        let root = match &sealed.root {
            Some(r) => Some(seal.open(r, &root_seal_label(&h.id))?),
            None => None,
        };
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        return Ok((text(int), root.map(text)));
    }
    let dir = place.key_dir.as_ref().ok_or_else(|| {
        policy(format!(
            "the keys of hierarchy {} are not sealed in {} and no data directory holds them",
            h.id,
            place.store.location()
        ))
    })?;
    let hdir = DataDir::new(dir).hierarchy_dir(&h.id);
    let read = |name: &str| -> Result<String, IssuerError> {
        Ok(String::from_utf8_lossy(&read_secret(&hdir.join(name), MAX_KEY_FILE)?).into_owned())
    };
    let root = if h.has_root_key {
        Some(read("root.key")?)
    } else {
        None
    };
    Ok((read("intermediate.key")?, root))
}

/// Checks that a key belongs to a certificate (PEM).
fn check_pair(cert_pem: &str, key_pem: &str, what: &str) -> Result<(), IssuerError> {
    let der = parse_certs(cert_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| policy(format!("{what}: no certificate")))?;
    let key = PrivateKey::from_pem(key_pem)?;
    SigningCa::new(der, key, what, OffsetDateTime::now_utc())?;
    Ok(())
}

/// Puts a hierarchy's keys where `to` keeps them; returns the record to store.
fn place_keys(
    to: &CaPlace,
    h: &HierarchyRecord,
    int_key: &str,
    root_key: Option<&str>,
) -> Result<HierarchyRecord, IssuerError> {
    let mut rec = h.clone();
    if let Some(seal) = &to.seal {
        rec.sealed_keys = Some(SealedKeys {
            intermediate: seal.seal(int_key.as_bytes(), &intermediate_seal_label(&h.id))?,
            root: match root_key {
                Some(k) => Some(seal.seal(k.as_bytes(), &root_seal_label(&h.id))?),
                None => None,
            },
        });
        return Ok(rec);
    }
    let dir = to
        .key_dir
        .as_ref()
        .ok_or_else(|| policy("the target has neither a seal key nor a data directory".into()))?;
    let data = DataDir::new(dir);
    create_private_dir(&dir.join("ca"))?;
    let hdir = data.hierarchy_dir(&h.id);
    create_private_dir(&hdir)?;
    write_atomic(&hdir.join("root.crt"), h.root_pem.as_bytes(), PUBLIC_MODE)?;
    write_atomic(
        &hdir.join("intermediate.crt"),
        h.intermediate_pem.as_bytes(),
        PUBLIC_MODE,
    )?;
    write_atomic(
        &hdir.join("intermediate.key"),
        int_key.as_bytes(),
        SECRET_MODE,
    )?;
    if let Some(k) = root_key {
        write_atomic(&hdir.join("root.key"), k.as_bytes(), SECRET_MODE)?;
    }
    rec.sealed_keys = None;
    Ok(rec)
}

/// Copies every hierarchy (with keys), certificate record and join token from
/// `from` to `to`, which must hold no CA. `progress(done, total)` is called
/// as records go. Events are not copied: they are a retention window, not
/// state.
pub async fn copy_ca(
    from: &CaPlace,
    to: &CaPlace,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<CopyReport, IssuerError> {
    if !to.store.list_hierarchies().await?.is_empty() {
        return Err(IssuerError::StoreHoldsCa {
            location: to.store.location(),
        });
    }
    let hierarchies = from.store.list_hierarchies().await?;
    if hierarchies.is_empty() {
        return Err(policy(format!(
            "{} holds no CA to copy",
            from.store.location()
        )));
    }
    let certs = from.store.list_certificates(&CertFilter::default()).await?;
    let tokens = from.store.list_tokens().await?;
    let total = (hierarchies.len() + certs.len() + tokens.len()) as u64;
    let mut done = 0u64;
    // Every key is read and checked before anything is written.
    let mut records = Vec::new();
    for h in &hierarchies {
        let (int_key, root_key) = keys_of(from, h)?;
        check_pair(
            &h.intermediate_pem,
            &int_key,
            &intermediate_seal_label(&h.id),
        )?;
        if let Some(k) = &root_key {
            check_pair(&h.root_pem, k, &root_seal_label(&h.id))?;
        }
        records.push(place_keys(to, h, &int_key, root_key.as_deref())?);
    }
    // A copy that stopped half-way (no hierarchy yet) is taken up again:
    // records already there and equal are fine.
    for t in &tokens {
        match to.store.create_token(t).await {
            Err(e) if e.is_conflict() => {
                if !to.store.list_tokens().await?.contains(t) {
                    return Err(policy(format!(
                        "the target holds another join token {}",
                        t.id
                    )));
                }
            }
            r => r?,
        }
        done += 1;
        progress(done, total);
    }
    let insert = |c: &meshca_store::CertificateRecord| {
        let c = c.clone();
        let store = to.store.clone();
        async move {
            match store.insert_certificate(&c).await {
                Err(e) if e.is_conflict() => {
                    if store.get_certificate(&c.serial).await? == c {
                        Ok(())
                    } else {
                        Err(policy(format!(
                            "the target holds another certificate record {}",
                            c.serial.to_hex()
                        )))
                    }
                }
                r => r.map_err(IssuerError::from),
            }
        }
    };
    let mut inserts =
        futures_util::stream::iter(certs.iter().map(insert)).buffer_unordered(PARALLEL);
    while let Some(r) = inserts.next().await {
        r?;
        done += 1;
        if done.is_multiple_of(64) || done + records.len() as u64 == total {
            progress(done, total);
        }
    }
    drop(inserts);
    // The hierarchies last: a target with a hierarchy is a complete CA.
    for rec in &records {
        to.store.create_hierarchy(rec).await?;
        done += 1;
        progress(done, total);
    }
    Ok(CopyReport {
        hierarchies: records.len(),
        certificates: certs.len(),
        tokens: tokens.len(),
    })
}

/// Reads both sides back and compares them record by record; the target's
/// keys must open (or be readable) and match their certificates.
pub async fn verify_copy(from: &CaPlace, to: &CaPlace) -> Result<CopyReport, IssuerError> {
    let differ = |what: String| policy(format!("verification failed: {what}"));
    let (hf, ht) = (
        from.store.list_hierarchies().await?,
        to.store.list_hierarchies().await?,
    );
    if hf.len() != ht.len() {
        return Err(differ(format!(
            "{} hierarchies, {} copied",
            hf.len(),
            ht.len()
        )));
    }
    for (a, b) in hf.iter().zip(&ht) {
        let (mut a2, mut b2) = (a.clone(), b.clone());
        a2.sealed_keys = None;
        b2.sealed_keys = None;
        if a2 != b2 {
            return Err(differ(format!("hierarchy {} differs", a.id)));
        }
        let (ka, ra) = keys_of(from, a)?;
        let (kb, rb) = keys_of(to, b)?;
        if ka != kb || ra != rb {
            return Err(differ(format!("the keys of hierarchy {} differ", a.id)));
        }
    }
    let all = CertFilter::default();
    let (mut cf, mut ct) = (
        from.store.list_certificates(&all).await?,
        to.store.list_certificates(&all).await?,
    );
    cf.sort_by(|a, b| a.serial.cmp(&b.serial));
    ct.sort_by(|a, b| a.serial.cmp(&b.serial));
    if cf != ct {
        return Err(differ(format!(
            "{} certificate records in the source, {} in the target, or some differ",
            cf.len(),
            ct.len()
        )));
    }
    let (tf, tt) = (
        from.store.list_tokens().await?,
        to.store.list_tokens().await?,
    );
    if tf != tt {
        return Err(differ("the join tokens differ".into()));
    }
    Ok(CopyReport {
        hierarchies: ht.len(),
        certificates: ct.len(),
        tokens: tt.len(),
    })
}
