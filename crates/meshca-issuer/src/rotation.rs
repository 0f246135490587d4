//! Root rotation as stages the operator can watch: prepare (a new root and
//! intermediate join the trust bundle), activate (the new hierarchy signs;
//! the old one stays trusted), retire (the old root leaves the bundle once
//! no identity's newest certificate chains to it), or abort.
//!
//! Every step is a compare-and-swap on the hierarchies' status in the store,
//! so two operators (or replicas) cannot both move a rotation; the running
//! issuers pick the change up with [`crate::Issuer::reload`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshca_files::{PUBLIC_MODE, SECRET_MODE, create_private_dir, write_atomic};
use meshca_pki::{KeyType, SealKey, TrustDomain, to_pem};
use meshca_store::{CertFilter, CertStatus, HierarchyRecord, HierarchyStatus, Store};
use serde::Serialize;
use time::OffsetDateTime;

use crate::IssuerError;
use crate::builtin::{
    DataDir, InitOptions, build_material, hierarchy_id, hierarchy_record, intermediate_key_file,
    intermediate_seal_label, root_seal_label,
};

/// Where a rotation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// No rotation under way.
    Idle,
    /// A new hierarchy is in the bundle; the old one still signs.
    Prepared,
    /// The new hierarchy signs; the old root is still trusted.
    Activated,
}

/// A rotation's progress, for `ca status`.
#[derive(Debug, Clone, Serialize)]
pub struct RotationStatus {
    /// The stage.
    pub stage: Stage,
    /// The hierarchy being replaced.
    pub old: Option<String>,
    /// The hierarchy replacing it.
    pub new: Option<String>,
    /// Live certificates of the old root whose holders have not been seen
    /// holding a newer one (holders, not identities: each pod counts).
    pub remaining_under_old: usize,
    /// Those certificates (the first 20).
    pub waiting_for: Vec<Stranded>,
    /// Identities with a live certificate.
    pub identities: usize,
    /// Whether the next step can be taken without `--force`.
    pub safe_to_continue: bool,
    /// What the next step is and what it waits for.
    pub next: String,
}

fn find(hs: &[HierarchyRecord], status: HierarchyStatus) -> Option<&HierarchyRecord> {
    hs.iter().find(|h| h.status == status)
}

fn refuse(why: impl Into<String>) -> IssuerError {
    IssuerError::Rotation(why.into())
}

/// The rotation's stage and progress.
pub async fn status(store: &Arc<dyn Store>) -> Result<RotationStatus, IssuerError> {
    let hs = store.list_hierarchies().await?;
    let active = find(&hs, HierarchyStatus::Active).map(|h| h.id.clone());
    let prepared = find(&hs, HierarchyStatus::Prepared).map(|h| h.id.clone());
    let retiring = find(&hs, HierarchyStatus::Retiring).map(|h| h.id.clone());
    let (stage, old, new) = match (&prepared, &retiring) {
        (Some(p), _) => (Stage::Prepared, active.clone(), Some(p.clone())),
        (None, Some(r)) => (Stage::Activated, Some(r.clone()), active.clone()),
        (None, None) => (Stage::Idle, None, None),
    };
    let (waiting_for, remaining, identities) = match (&stage, &old) {
        (Stage::Idle, _) | (_, None) => (Vec::new(), 0, 0),
        (_, Some(old)) => stranded_under(store, old).await?,
    };
    let (safe, next) = match stage {
        Stage::Idle => (
            true,
            "prepare: a new root joins the trust bundle".to_owned(),
        ),
        Stage::Prepared => (
            true,
            "activate, once every agent has fetched the new bundle (bundle-changed went out)"
                .to_owned(),
        ),
        Stage::Activated if remaining == 0 => (
            true,
            "retire: every holder of a live certificate of the old root holds a newer one"
                .to_owned(),
        ),
        Stage::Activated => (
            false,
            format!(
                "retire waits for {remaining} live certificate(s) of the old root whose holders have not renewed (or renewed less than 5s ago): see waiting_for"
            ),
        ),
    };
    Ok(RotationStatus {
        stage,
        old,
        new,
        remaining_under_old: remaining,
        waiting_for,
        identities,
        safe_to_continue: safe,
        next,
    })
}

/// How long after the last renewal retire waits, for its holder to load
/// the new files (agents write at once; services reload within a second).
pub const SETTLE: Duration = Duration::from_secs(5);

/// A live certificate of the old hierarchy whose holder has not been seen
/// holding a newer one: retire would cut it off.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stranded {
    /// `namespace/name`.
    pub identity: String,
    /// The certificate's serial.
    pub serial: String,
    /// Its notAfter, RFC 3339.
    pub not_after: String,
    /// Whether its holder renewed (less than [`SETTLE`] ago: it may still
    /// be serving this one).
    pub renewed_just_now: bool,
}

/// Most stranded certificates listed (the count is complete).
const STRANDED_LISTED: usize = 20;

/// Counts holders, not identities: every live, unrevoked leaf of `old`
/// (several pods of one identity each hold their own) is stranded unless
/// its holder renewed, with it, into a certificate of another hierarchy
/// (directly, or through renewals still under `old`) at least [`SETTLE`]
/// ago. meshca's own identities (the server's certificate, the admin's)
/// are replaced by meshca itself and do not count. Returns the stranded
/// (the first [`STRANDED_LISTED`]), their number, and the identities with
/// a live certificate.
async fn stranded_under(
    store: &Arc<dyn Store>,
    old: &str,
) -> Result<(Vec<Stranded>, usize, usize), IssuerError> {
    let now = OffsetDateTime::now_utc();
    let live = store
        .list_certificates(&CertFilter {
            status: Some(CertStatus::Active),
            exclude_expired_before: Some(now),
            ..Default::default()
        })
        .await?;
    // What each certificate was renewed into, by serial.
    let mut children: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in live.iter().enumerate() {
        if let Some(from) = &r.renewed_from {
            children.entry(from.to_hex()).or_default().push(i);
        }
    }
    let settle = time::Duration::try_from(SETTLE).unwrap_or(time::Duration::ZERO);
    // Whether the holder of `i` has moved off `old` for good: the earliest
    // such renewal below it, if any (bounded walk: each step is a later
    // issuance of the same holder).
    let moved_at = |start: usize| -> Option<OffsetDateTime> {
        let mut stack = vec![start];
        let mut best: Option<OffsetDateTime> = None;
        let mut steps = 0;
        while let Some(i) = stack.pop() {
            steps += 1;
            if steps > 1000 {
                break;
            }
            for &c in children
                .get(&live[i].serial.to_hex())
                .map_or(&[][..], Vec::as_slice)
            {
                if live[c].hierarchy_id != old {
                    best = Some(best.map_or(live[c].issued_at, |b| b.min(live[c].issued_at)));
                } else {
                    stack.push(c);
                }
            }
        }
        best
    };
    let mut identities = std::collections::BTreeSet::new();
    let mut stranded = Vec::new();
    let mut count = 0;
    for (i, r) in live.iter().enumerate() {
        identities.insert((r.namespace.clone(), r.name.clone()));
        if r.hierarchy_id != old || r.namespace == meshca_pki::RESERVED_NAMESPACE {
            continue;
        }
        let renewed_just_now = match moved_at(i) {
            Some(at) if now - at >= settle => continue,
            Some(_) => true,
            None => false,
        };
        count += 1;
        if stranded.len() < STRANDED_LISTED {
            stranded.push(Stranded {
                identity: format!("{}/{}", r.namespace, r.name),
                serial: r.serial.to_hex(),
                not_after: meshca_pki::rfc3339(r.not_after),
                renewed_just_now,
            });
        }
    }
    Ok((stranded, count, identities.len()))
}

/// The settings of a new hierarchy.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// The trust domain (the CA's).
    pub trust_domain: TrustDomain,
    /// Key type of the new root and intermediate.
    pub key_type: KeyType,
    /// The new root's lifetime (the intermediate gets half).
    pub root_ttl: Duration,
    /// Adopt an existing root (and intermediate) instead of generating one.
    pub import: Option<crate::ImportSpec>,
}

/// A hierarchy's root certificate and its key (which it must hold).
fn root_of(
    dir: &Path,
    store: &Arc<dyn Store>,
    seal: Option<&SealKey>,
    h: &HierarchyRecord,
) -> Result<(Vec<u8>, meshca_pki::PrivateKey), IssuerError> {
    let hdir = DataDir::new(dir).hierarchy_dir(&h.id);
    let root_key_pem = match (&h.sealed_keys, seal) {
        (Some(sealed), Some(seal)) => {
            let root = sealed
                .root
                .as_ref()
                .ok_or_else(|| refuse("the sealed root key is missing"))?;
            seal.open(root, &root_seal_label(&h.id))?
        }
        (Some(_), None) => {
            return Err(IssuerError::NeedSealKey {
                location: store.location(),
            });
        }
        (None, _) => meshca_files::read_secret(&hdir.join("root.key"), 1 << 20)?,
    };
    let root_key = meshca_pki::PrivateKey::from_pem(&String::from_utf8_lossy(&root_key_pem))?;
    let root_der = meshca_pki::parse_certs(h.root_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| refuse(format!("hierarchy {} has no root certificate", h.id)))?;
    Ok((root_der, root_key))
}

/// The new root's chain of custody: the active hierarchy's links, then the
/// active root's key certifying the new root. Empty (with a warning) when
/// the active root's key is not held: agents pinned to it must then be
/// given the new root's fingerprint.
fn custody_for(
    dir: &Path,
    store: &Arc<dyn Store>,
    seal: Option<&SealKey>,
    active: Option<&HierarchyRecord>,
    new_root: &[u8],
    now: OffsetDateTime,
) -> Result<Vec<String>, IssuerError> {
    let Some(active) = active else {
        return Ok(Vec::new());
    };
    if !active.has_root_key {
        tracing::warn!(
            hierarchy = %active.id,
            "the active root's key is not held: the new root is not linked to it, and agents pinned to the old root's fingerprint need the new one"
        );
        return Ok(Vec::new());
    }
    let (root_der, root_key) = root_of(dir, store, seal, active)?;
    let mut custody = active.custody_pem.clone();
    // The earlier root itself too: an agent holding only its fingerprint
    // needs its key to check the link, after it left the bundle.
    let root_pem = to_pem("CERTIFICATE", &root_der);
    if !custody.contains(&root_pem) {
        custody.push(root_pem);
    }
    let old = meshca_pki::SigningCa::new(root_der, root_key, "active root", now)?;
    let link = meshca_pki::link_roots(&old, new_root, now)?;
    custody.push(to_pem("CERTIFICATE", &link));
    Ok(custody)
}

/// Stage 1: a new root and intermediate, in the bundle, not signing. The
/// keys go where the CA's keys are: 0600 files in `dir/ca/<id>/` next to
/// an embedded store, or sealed into the record with `seal` (shared store).
pub async fn prepare(
    dir: &Path,
    store: &Arc<dyn Store>,
    seal: Option<&SealKey>,
    opts: PrepareOptions,
) -> Result<HierarchyRecord, IssuerError> {
    let hs = store.list_hierarchies().await?;
    if let Some(p) = find(&hs, HierarchyStatus::Prepared) {
        return Err(refuse(format!(
            "hierarchy {} is already prepared; activate or abort that rotation first",
            p.id
        )));
    }
    if let Some(r) = find(&hs, HierarchyStatus::Retiring) {
        return Err(refuse(format!(
            "hierarchy {} is still retiring; retire it (or abort) before the next rotation",
            r.id
        )));
    }
    let shared = hs.iter().any(|h| h.sealed_keys.is_some());
    if shared && seal.is_none() {
        return Err(IssuerError::NeedSealKey {
            location: store.location(),
        });
    }
    let id = hierarchy_id()?;
    let now = OffsetDateTime::now_utc();
    let init = InitOptions {
        trust_domain: opts.trust_domain,
        key_type: opts.key_type,
        root_ttl: opts.root_ttl,
        import: opts.import,
        config_toml: String::new(),
        max_ttl: Duration::ZERO,
    };
    let id2 = id.clone();
    let m = tokio::task::spawn_blocking(move || build_material(&init, &id2, now))
        .await
        .map_err(|e| IssuerError::Policy(format!("CA generation task failed: {e}")))??;
    let sealed = match (shared, seal) {
        (true, Some(seal)) => Some(m.seal(seal, &id)?),
        _ => {
            // Keys first, the record last: a record never points at keys
            // that are not there.
            let hdir = DataDir::new(dir).hierarchy_dir(&id);
            create_private_dir(&hdir)?;
            m.write_files(&hdir)?;
            None
        }
    };
    let custody = custody_for(
        dir,
        store,
        seal,
        find(&hs, HierarchyStatus::Active),
        &m.root_der,
        now,
    )?;
    let mut record = hierarchy_record(&id, &m, sealed, now)?;
    record.status = HierarchyStatus::Prepared;
    record.custody_pem = custody;
    store.create_hierarchy(&record).await?;
    Ok(record)
}

/// Stage 2: the prepared hierarchy signs; the old one keeps its place in
/// the bundle (retiring).
pub async fn activate(store: &Arc<dyn Store>) -> Result<(String, String), IssuerError> {
    let hs = store.list_hierarchies().await?;
    let new = find(&hs, HierarchyStatus::Prepared)
        .ok_or_else(|| refuse("no prepared hierarchy: run `meshca ca rotate prepare` first"))?
        .id
        .clone();
    let old = find(&hs, HierarchyStatus::Active)
        .ok_or_else(|| refuse("no active hierarchy to replace"))?
        .id
        .clone();
    store
        .set_hierarchy_status(&old, HierarchyStatus::Active, HierarchyStatus::Retiring)
        .await?;
    if let Err(e) = store
        .set_hierarchy_status(&new, HierarchyStatus::Prepared, HierarchyStatus::Active)
        .await
    {
        // Put the old one back: there must always be an active hierarchy.
        let _ = store
            .set_hierarchy_status(&old, HierarchyStatus::Retiring, HierarchyStatus::Active)
            .await;
        return Err(e.into());
    }
    Ok((old, new))
}

/// Stage 3: the old root leaves the bundle, once no identity's newest
/// certificate chains to it (or with `force`).
pub async fn retire(store: &Arc<dyn Store>, force: bool) -> Result<String, IssuerError> {
    let hs = store.list_hierarchies().await?;
    let old = find(&hs, HierarchyStatus::Retiring)
        .ok_or_else(|| refuse("nothing to retire: activate a prepared hierarchy first"))?
        .id
        .clone();
    let (stranded, remaining, _) = stranded_under(store, &old).await?;
    if remaining > 0 && !force {
        let listed: Vec<String> = stranded
            .iter()
            .map(|s| {
                format!(
                    "{} serial {} (expires {}{})",
                    s.identity,
                    s.serial,
                    s.not_after,
                    if s.renewed_just_now {
                        ", renewed just now"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        return Err(refuse(format!(
            "{remaining} live certificate(s) of hierarchy {old} are held by holders not seen with a newer one: {}{}; have each renewed (`meshca rotate <name>` nudges agents), revoke the ones no longer in use (`meshca revoke <serial>`), wait for them to expire, or give --force to cut them off",
            listed.join(", "),
            if remaining > listed.len() {
                ", ..."
            } else {
                ""
            }
        )));
    }
    store
        .set_hierarchy_status(&old, HierarchyStatus::Retiring, HierarchyStatus::Retired)
        .await?;
    Ok(old)
}

/// Goes back to the old root alone: before activation the prepared
/// hierarchy is dropped; after it, the old hierarchy signs again and the new
/// one becomes the retiring one (retire it once identities renewed back).
pub async fn abort(store: &Arc<dyn Store>) -> Result<String, IssuerError> {
    let hs = store.list_hierarchies().await?;
    if let Some(p) = find(&hs, HierarchyStatus::Prepared) {
        store
            .set_hierarchy_status(&p.id, HierarchyStatus::Prepared, HierarchyStatus::Retired)
            .await?;
        return Ok(format!("dropped the prepared hierarchy {}", p.id));
    }
    let (Some(old), Some(new)) = (
        find(&hs, HierarchyStatus::Retiring),
        find(&hs, HierarchyStatus::Active),
    ) else {
        return Err(refuse("no rotation under way"));
    };
    store
        .set_hierarchy_status(&new.id, HierarchyStatus::Active, HierarchyStatus::Retiring)
        .await?;
    store
        .set_hierarchy_status(&old.id, HierarchyStatus::Retiring, HierarchyStatus::Active)
        .await?;
    Ok(format!(
        "hierarchy {} signs again; {} is retiring (retire it once identities renewed)",
        old.id, new.id
    ))
}

/// Whether an intermediate valid from `not_before` to `not_after` is due
/// for renewal at `now`: with a third of its life left (linkerd's rule for
/// leaves, applied to the CA that signs them), so that an expiring
/// intermediate never takes a cluster down.
pub fn intermediate_due(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    not_after - now < (not_after - not_before) / 3
}

/// Renews the active hierarchy's intermediate under the same root when it
/// is due (or `force`): a new key and certificate, the key where the CA's
/// keys are (a file named after the certificate, or sealed), then the
/// record switched by compare-and-swap. The trust bundle does not change;
/// leaves of the old intermediate stay valid until they expire. `None`
/// when nothing was due or another replica renewed it first.
pub async fn renew_intermediate(
    dir: &Path,
    store: &Arc<dyn Store>,
    seal: Option<&SealKey>,
    trust_domain: &TrustDomain,
    force: bool,
) -> Result<Option<String>, IssuerError> {
    let hs = store.list_hierarchies().await?;
    let h = find(&hs, HierarchyStatus::Active)
        .ok_or_else(|| refuse("no active hierarchy"))?
        .clone();
    let hdir = DataDir::new(dir).hierarchy_dir(&h.id);
    let int_der = meshca_pki::parse_certs(h.intermediate_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| refuse("the active hierarchy has no intermediate certificate"))?;
    let facts = meshca_pki::cert_facts(&int_der)?;
    let now = OffsetDateTime::now_utc();
    if !force && !intermediate_due(facts.not_before, facts.not_after, now) {
        return Ok(None);
    }
    if !h.has_root_key {
        return Err(refuse(format!(
            "the intermediate of hierarchy {} expires {} and cannot be renewed here: the root's key is not held; import a new intermediate, or rotate the root (`meshca ca rotate prepare`)",
            h.id,
            meshca_pki::rfc3339(facts.not_after)
        )));
    }
    let (root_der, root_key) = root_of(dir, store, seal, &h)?;
    let lifetime = (facts.not_after - facts.not_before).unsigned_abs();
    let (td, id, key_type) = (trust_domain.clone(), h.id.clone(), h.key_type);
    let (new_der, new_key) = tokio::task::spawn_blocking(move || {
        let root = meshca_pki::SigningCa::new(root_der, root_key, "root", now)?;
        let key = meshca_pki::PrivateKey::generate(key_type)?;
        let der = meshca_pki::generate_intermediate(&key, &root, &td, &id, lifetime, now)?;
        Ok::<_, meshca_pki::PkiError>((der, key))
    })
    .await
    .map_err(|e| IssuerError::Policy(format!("intermediate generation task failed: {e}")))??;
    let new_pem = to_pem("CERTIFICATE", &new_der);
    let new_facts = meshca_pki::cert_facts(&new_der)?;
    let (sealed_intermediate, key_file) = match (&h.sealed_keys, seal) {
        (Some(_), Some(seal)) => (
            Some(seal.seal(new_key.to_pem().as_bytes(), &intermediate_seal_label(&h.id))?),
            None,
        ),
        _ => {
            // The key first, named after its certificate: the record never
            // points at a certificate whose key is not on disk.
            let file = hdir.join(intermediate_key_file(new_pem.as_bytes()));
            write_atomic(&file, new_key.to_pem().as_bytes(), SECRET_MODE)?;
            // The certificate beside it, for people (the record is what counts).
            write_atomic(&file.with_extension("crt"), new_pem.as_bytes(), PUBLIC_MODE)?;
            (None, Some(file))
        }
    };
    let update = meshca_store::IntermediateUpdate {
        intermediate_pem: new_pem,
        intermediate_not_after: new_facts.not_after,
        sealed_intermediate,
    };
    match store
        .replace_intermediate(&h.id, &h.intermediate_pem, update)
        .await
    {
        Ok(_) => Ok(Some(format!(
            "renewed the intermediate of hierarchy {} (the old one expires {}, the new one {})",
            h.id,
            meshca_pki::rfc3339(facts.not_after),
            meshca_pki::rfc3339(new_facts.not_after)
        ))),
        Err(e) if e.is_conflict() => {
            if let Some(f) = key_file {
                let _ = std::fs::remove_file(f);
            }
            Ok(None)
        }
        Err(e) => {
            if let Some(f) = key_file {
                let _ = std::fs::remove_file(f);
            }
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intermediates_renew_with_a_third_of_their_life_left() {
        let start = OffsetDateTime::UNIX_EPOCH;
        let end = start + time::Duration::days(300);
        assert!(!intermediate_due(start, end, start));
        assert!(!intermediate_due(
            start,
            end,
            start + time::Duration::days(199)
        ));
        assert!(intermediate_due(
            start,
            end,
            start + time::Duration::days(201)
        ));
        assert!(intermediate_due(start, end, end + time::Duration::days(1)));
    }
}
