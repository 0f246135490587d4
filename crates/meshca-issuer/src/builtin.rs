//! The built-in CA: hierarchies generated or imported by `init`, keys in
//! 0600 files of the data directory, records in the store.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meshca_files::{
    PUBLIC_MODE, SECRET_MODE, create_private_dir, read_limited, read_secret, sync_dir, write_atomic,
};
use meshca_pki::{
    KeyType, LeafPublicKey, LeafSpec, PkiError, PrivateKey, Profile, SealKey, Serial, SigningCa,
    TrustDomain, check_ca_cert, check_signed_by, fingerprint, generate_intermediate, generate_root,
    intermediate_ttl, parse_certs, to_pem,
};
use meshca_store::{EmbeddedStore, HierarchyRecord, HierarchyStatus, SealedKeys, Store};
use time::OffsetDateTime;

use crate::{Authority, IssueRequest, Issuer, IssuerError, KeySource, Policy, Signed};

const MAX_FILE: u64 = 1024 * 1024;

/// The admin certificate's identity and lifetime.
pub const ADMIN_NAMESPACE: &str = meshca_pki::RESERVED_NAMESPACE;
/// The admin certificate's name.
pub const ADMIN_NAME: &str = "admin";
const ADMIN_TTL: Duration = Duration::from_secs(8760 * 3600);

/// The layout of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `meshca.toml`: the configuration written by `init`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("meshca.toml")
    }

    /// `store.redb`: the embedded store.
    pub fn store_path(&self) -> PathBuf {
        self.root.join("store.redb")
    }

    /// `ca/<id>/`: one hierarchy's certificates and keys.
    pub fn hierarchy_dir(&self, id: &str) -> PathBuf {
        self.root.join("ca").join(id)
    }

    /// `admin/`: the admin client certificate in kubernetes.io/tls layout.
    pub fn admin_dir(&self) -> PathBuf {
        self.root.join("admin")
    }

    /// Whether anything of a CA is here.
    pub fn holds_ca(&self) -> bool {
        self.config_path().exists() || self.store_path().exists() || self.root.join("ca").exists()
    }

    /// Fails with a clear [`IssuerError::NoCa`] unless a CA is here.
    pub fn require_ca(&self) -> Result<(), IssuerError> {
        let no_ca = |reason: &str| IssuerError::NoCa {
            dir: self.root.clone(),
            reason: reason.to_owned(),
        };
        if !self.root.exists() {
            return Err(no_ca("the directory does not exist"));
        }
        if !self.root.is_dir() {
            return Err(no_ca("it is not a directory"));
        }
        if !self.config_path().exists() {
            return Err(no_ca("there is no meshca.toml"));
        }
        if !self.store_path().exists() {
            return Err(no_ca("there is no store.redb"));
        }
        Ok(())
    }
}

/// The built-in issuer: the active hierarchy's intermediate signs. It
/// reads the hierarchies again on [`Issuer::reload`] (a root rotation step
/// here or on another replica), so a running server switches without a
/// restart; the bundle's changes are announced on [`Issuer::bundle_changes`].
#[derive(Debug)]
pub struct BuiltinIssuer {
    loaded: std::sync::RwLock<Arc<Loaded>>,
    source: Option<Source>,
    bundle_tx: tokio::sync::watch::Sender<u64>,
}

/// What signs now.
#[derive(Debug)]
struct Loaded {
    signing: Arc<SigningCa>,
    hierarchy_id: String,
    bundle: Vec<Vec<u8>>,
    /// The intermediates of the other hierarchies in the bundle (prepared,
    /// retiring): they sign only their own CRLs.
    others: Vec<(String, Arc<SigningCa>)>,
}

/// Where the hierarchies are read from again.
#[derive(Debug)]
struct Source {
    dir: PathBuf,
    store: Arc<dyn Store>,
    seal: Option<SealKey>,
}

impl BuiltinIssuer {
    /// Loads the active hierarchy from the store and its intermediate key:
    /// sealed in the record (shared stores; opened with `seal`), or from
    /// `dir/ca/<id>/intermediate.key` (refused unless 0600 or stricter).
    pub async fn open(
        dir: &Path,
        store: Arc<dyn Store>,
        seal: Option<&SealKey>,
    ) -> Result<Self, IssuerError> {
        let loaded = load(dir, &store, seal).await?;
        Ok(BuiltinIssuer {
            loaded: std::sync::RwLock::new(Arc::new(loaded)),
            source: Some(Source {
                dir: dir.to_owned(),
                store,
                seal: seal.cloned(),
            }),
            bundle_tx: tokio::sync::watch::channel(0).0,
        })
    }

    /// An issuer for one hierarchy that is never read again (init).
    fn fixed(signing: SigningCa, hierarchy_id: &str, bundle: Vec<Vec<u8>>) -> Self {
        BuiltinIssuer {
            loaded: std::sync::RwLock::new(Arc::new(Loaded {
                signing: Arc::new(signing),
                hierarchy_id: hierarchy_id.to_owned(),
                bundle,
                others: Vec::new(),
            })),
            source: None,
            bundle_tx: tokio::sync::watch::channel(0).0,
        }
    }

    fn now(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .map(|l| l.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The id of the hierarchy that signs.
    pub fn hierarchy_id(&self) -> String {
        self.now().hierarchy_id.clone()
    }
}

async fn load(
    dir: &Path,
    store: &Arc<dyn Store>,
    seal: Option<&SealKey>,
) -> Result<Loaded, IssuerError> {
    let data = DataDir::new(dir);
    let hierarchies = store.list_hierarchies().await?;
    let active = hierarchies
        .iter()
        .find(|h| h.status == HierarchyStatus::Active)
        .ok_or_else(|| IssuerError::NoCa {
            dir: dir.to_owned(),
            reason: format!(
                "the store {} holds no active CA hierarchy",
                store.location()
            ),
        })?;
    let hdir = data.hierarchy_dir(&active.id);
    let signing = signing_of(&data, store, seal, active)?;
    let bundle = bundle_of(&hierarchies, &hdir)?;
    let mut others = Vec::new();
    for h in hierarchies
        .iter()
        .filter(|h| h.id != active.id && h.status.in_bundle())
    {
        // Only its CRL depends on it: a hierarchy whose key cannot be read
        // here leaves its CRL out (said), it does not stop the issuer.
        match signing_of(&data, store, seal, h) {
            Ok(ca) => others.push((h.id.clone(), Arc::new(ca))),
            Err(e) => tracing::warn!(
                hierarchy = %h.id,
                "no CRL for this hierarchy's certificates: its intermediate cannot be loaded: {e}"
            ),
        }
    }
    Ok(Loaded {
        signing: Arc::new(signing),
        hierarchy_id: active.id.clone(),
        bundle,
        others,
    })
}

/// A hierarchy's intermediate with its key: sealed in the record (shared
/// stores; opened with `seal`), or from `dir/ca/<id>/`.
fn signing_of(
    data: &DataDir,
    store: &Arc<dyn Store>,
    seal: Option<&SealKey>,
    h: &HierarchyRecord,
) -> Result<SigningCa, IssuerError> {
    let hdir = data.hierarchy_dir(&h.id);
    let key = match &h.sealed_keys {
        Some(sealed) => {
            let seal = seal.ok_or_else(|| IssuerError::NeedSealKey {
                location: store.location(),
            })?;
            let what = intermediate_seal_label(&h.id);
            let pem = seal.open(&sealed.intermediate, &what)?;
            PrivateKey::from_pem(&String::from_utf8_lossy(&pem))?
        }
        None => {
            // A renewed intermediate's key is named after the certificate
            // (written before the record switched to it); the first one is
            // `intermediate.key`.
            let renewed = hdir.join(intermediate_key_file(h.intermediate_pem.as_bytes()));
            let key_path = if renewed.exists() {
                renewed
            } else {
                hdir.join("intermediate.key")
            };
            let key_pem = read_secret(&key_path, MAX_FILE)?;
            PrivateKey::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|e| {
                IssuerError::Import {
                    path: key_path.clone(),
                    reason: e.to_string(),
                }
            })?
        }
    };
    let int_der = first_cert(h.intermediate_pem.as_bytes(), &hdir)?;
    Ok(SigningCa::new(
        int_der,
        key,
        &format!("intermediate of hierarchy {}", h.id),
        OffsetDateTime::now_utc(),
    )?)
}

/// The key file of a renewed intermediate: `intermediate-<16 hex of the
/// certificate's SHA-256>.key`.
pub(crate) fn intermediate_key_file(intermediate_pem: &[u8]) -> String {
    let fp = parse_certs(intermediate_pem)
        .ok()
        .and_then(|c| c.first().map(|d| fingerprint(d)))
        .unwrap_or_default();
    format!("intermediate-{}.key", &fp[..fp.len().min(16)])
}

/// What a hierarchy's sealed intermediate key is bound to.
pub(crate) fn intermediate_seal_label(id: &str) -> String {
    format!("the intermediate key of hierarchy {id}")
}

/// What a hierarchy's sealed root key is bound to.
pub(crate) fn root_seal_label(id: &str) -> String {
    format!("the root key of hierarchy {id}")
}

fn first_cert(pem: &[u8], context: &Path) -> Result<Vec<u8>, IssuerError> {
    parse_certs(pem)
        .map_err(|e| IssuerError::Import {
            path: context.to_owned(),
            reason: e.to_string(),
        })?
        .into_iter()
        .next()
        .ok_or_else(|| IssuerError::Import {
            path: context.to_owned(),
            reason: "no certificate".into(),
        })
}

fn bundle_of(hierarchies: &[HierarchyRecord], context: &Path) -> Result<Vec<Vec<u8>>, IssuerError> {
    let mut bundle = Vec::new();
    // Active first, then the others still in the bundle.
    let mut ordered: Vec<&HierarchyRecord> = hierarchies.iter().collect();
    ordered.sort_by_key(|h| h.status != HierarchyStatus::Active);
    for h in ordered.into_iter().filter(|h| h.status.in_bundle()) {
        let root = first_cert(h.root_pem.as_bytes(), context)?;
        if !bundle.contains(&root) {
            bundle.push(root);
        }
    }
    Ok(bundle)
}

#[async_trait]
impl Issuer for BuiltinIssuer {
    fn kind(&self) -> &'static str {
        "builtin"
    }

    async fn sign(&self, key: &KeySource, spec: &LeafSpec) -> Result<Signed, IssuerError> {
        let (key, private_key) = match key {
            KeySource::Csr(csr) => (csr.public_key().clone(), None),
            KeySource::Generate(kt) => {
                let private = crate::generate_key(*kt).await?;
                (LeafPublicKey::of(&private)?, Some(private))
            }
        };
        let key = &key;
        let now = self.now();
        // An EC or Ed25519 signature takes tens of microseconds, less than a
        // hand-off to another thread; an RSA one takes milliseconds and would
        // stall the reactor, so it goes to the blocking pool.
        let leaf = if now.signing.key_type().is_rsa() {
            let signing = now.signing.clone();
            let (key, spec) = (key.clone(), spec.clone());
            tokio::task::spawn_blocking(move || {
                signing.sign_leaf(&key, &spec, OffsetDateTime::now_utc())
            })
            .await
            .map_err(|e| IssuerError::Policy(format!("signing task failed: {e}")))??
        } else {
            now.signing
                .sign_leaf(key, spec, OffsetDateTime::now_utc())?
        };
        Ok(Signed {
            leaf,
            chain: vec![now.signing.cert_der().to_vec()],
            hierarchy_id: now.hierarchy_id.clone(),
            private_key,
        })
    }

    async fn trust_bundle(&self) -> Result<Vec<Vec<u8>>, IssuerError> {
        Ok(self.now().bundle.clone())
    }

    async fn reload(&self) -> Result<(), IssuerError> {
        let Some(src) = &self.source else {
            return Ok(());
        };
        let fresh = load(&src.dir, &src.store, src.seal.as_ref()).await?;
        let changed = self.now().bundle != fresh.bundle;
        let switched = self.now().hierarchy_id != fresh.hierarchy_id;
        if let Ok(mut l) = self.loaded.write() {
            *l = Arc::new(fresh);
        }
        if switched {
            tracing::info!(hierarchy = %self.hierarchy_id(), "now signing with another hierarchy");
        }
        if changed {
            self.bundle_tx.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    fn bundle_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.bundle_tx.subscribe())
    }

    async fn crl(
        &self,
        revoked: Vec<meshca_pki::RevokedEntry>,
        crl_number: u64,
        validity: Duration,
    ) -> Result<Vec<u8>, IssuerError> {
        let signing = self.now().signing.clone();
        Ok(tokio::task::spawn_blocking(move || {
            signing.sign_crl(&revoked, crl_number, OffsetDateTime::now_utc(), validity)
        })
        .await
        .map_err(|e| IssuerError::Policy(format!("CRL task failed: {e}")))??)
    }

    async fn crls(
        &self,
        revoked: Vec<(String, meshca_pki::RevokedEntry)>,
        crl_number: u64,
        validity: Duration,
    ) -> Result<Vec<Vec<u8>>, IssuerError> {
        let loaded = self.now();
        tokio::task::spawn_blocking(move || {
            let now = OffsetDateTime::now_utc();
            let of = |id: &str| -> Vec<meshca_pki::RevokedEntry> {
                revoked
                    .iter()
                    .filter(|(h, _)| h == id)
                    .map(|(_, e)| e.clone())
                    .collect()
            };
            let mut out = vec![loaded.signing.sign_crl(
                &of(&loaded.hierarchy_id),
                crl_number,
                now,
                validity,
            )?];
            for (id, ca) in &loaded.others {
                out.push(ca.sign_crl(&of(id), crl_number, now, validity)?);
            }
            Ok::<_, IssuerError>(out)
        })
        .await
        .map_err(|e| IssuerError::Policy(format!("CRL task failed: {e}")))?
    }

    fn issuing_key_type(&self) -> Option<KeyType> {
        Some(self.now().signing.key_type())
    }

    fn issuing_ca(&self) -> (Vec<u8>, OffsetDateTime) {
        let now = self.now();
        (now.signing.cert_der().to_vec(), now.signing.not_after())
    }
}

/// An existing CA to adopt instead of generating one.
#[derive(Debug, Clone, Default)]
pub struct ImportSpec {
    /// The root certificate (PEM or DER).
    pub root_cert: PathBuf,
    /// The root's key (PEM). Needed unless an intermediate is imported too.
    pub root_key: Option<PathBuf>,
    /// An intermediate under the root.
    pub intermediate_cert: Option<PathBuf>,
    /// The intermediate's key.
    pub intermediate_key: Option<PathBuf>,
}

/// What `init` creates.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Key type of generated CA keys and of the admin key.
    pub key_type: KeyType,
    /// The root's lifetime (the intermediate gets half).
    pub root_ttl: Duration,
    /// Adopt an existing CA instead.
    pub import: Option<ImportSpec>,
    /// The configuration file to write (`meshca.toml`).
    pub config_toml: String,
    /// The policy the admin certificate is issued under.
    pub max_ttl: Duration,
}

/// What `init` did.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The new hierarchy's id.
    pub hierarchy_id: String,
    /// SHA-256 of the root, hex: what agents pin.
    pub root_fingerprint: String,
    /// The root's notAfter.
    pub root_not_after: OffsetDateTime,
    /// The intermediate's notAfter.
    pub intermediate_not_after: OffsetDateTime,
    /// Where the admin credentials are.
    pub admin_dir: PathBuf,
    /// Whether the CA was imported.
    pub imported: bool,
    /// When the admin certificate expires.
    pub admin_not_after: OffsetDateTime,
}

pub(crate) struct Material {
    pub(crate) root_der: Vec<u8>,
    pub(crate) root_key: Option<PrivateKey>,
    pub(crate) intermediate: SigningCa,
    pub(crate) intermediate_key_pem: String,
    pub(crate) imported: bool,
}

impl Material {
    /// The keys sealed for a shared store, bound to hierarchy `id`.
    pub(crate) fn seal(&self, seal: &SealKey, id: &str) -> Result<SealedKeys, IssuerError> {
        Ok(SealedKeys {
            intermediate: seal.seal(
                self.intermediate_key_pem.as_bytes(),
                &intermediate_seal_label(id),
            )?,
            root: match &self.root_key {
                Some(k) => Some(seal.seal(k.to_pem().as_bytes(), &root_seal_label(id))?),
                None => None,
            },
        })
    }

    /// The certificates and keys as files of a hierarchy directory (keys
    /// 0600), next to an embedded store.
    pub(crate) fn write_files(&self, hdir: &Path) -> Result<(), IssuerError> {
        write_atomic(
            &hdir.join("root.crt"),
            to_pem("CERTIFICATE", &self.root_der).as_bytes(),
            PUBLIC_MODE,
        )?;
        if let Some(k) = &self.root_key {
            write_atomic(&hdir.join("root.key"), k.to_pem().as_bytes(), SECRET_MODE)?;
        }
        write_atomic(
            &hdir.join("intermediate.crt"),
            to_pem("CERTIFICATE", self.intermediate.cert_der()).as_bytes(),
            PUBLIC_MODE,
        )?;
        write_atomic(
            &hdir.join("intermediate.key"),
            self.intermediate_key_pem.as_bytes(),
            SECRET_MODE,
        )?;
        Ok(())
    }
}

fn import_err(path: &Path, e: impl std::fmt::Display) -> IssuerError {
    IssuerError::Import {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn read_cert_file(path: &Path) -> Result<Vec<u8>, IssuerError> {
    let bytes = read_limited(path, MAX_FILE).map_err(|e| import_err(path, e))?;
    let certs = parse_certs(&bytes).map_err(|e| import_err(path, e))?;
    if certs.len() != 1 {
        return Err(import_err(
            path,
            format!("expected one certificate, found {}", certs.len()),
        ));
    }
    Ok(certs.into_iter().next().unwrap_or_default())
}

fn read_key_file(path: &Path) -> Result<PrivateKey, IssuerError> {
    let bytes = read_secret(path, MAX_FILE)?;
    PrivateKey::from_pem(&String::from_utf8_lossy(&bytes)).map_err(|e| import_err(path, e))
}

pub(crate) fn build_material(
    opts: &InitOptions,
    id: &str,
    now: OffsetDateTime,
) -> Result<Material, IssuerError> {
    let Some(import) = &opts.import else {
        let root_key = PrivateKey::generate(opts.key_type)?;
        let root_der = generate_root(&root_key, &opts.trust_domain, id, opts.root_ttl, now)?;
        let root_pem = root_key.to_pem();
        let root = SigningCa::new(root_der.clone(), root_key, "new root", now)?;
        let int_key = PrivateKey::generate(opts.key_type)?;
        let int_der = generate_intermediate(
            &int_key,
            &root,
            &opts.trust_domain,
            id,
            intermediate_ttl(opts.root_ttl),
            now,
        )?;
        let intermediate_key_pem = int_key.to_pem();
        let intermediate = SigningCa::new(int_der, int_key, "new intermediate", now)?;
        return Ok(Material {
            root_der,
            root_key: Some(PrivateKey::from_pem(&root_pem)?),
            intermediate,
            intermediate_key_pem,
            imported: false,
        });
    };
    let root_path = &import.root_cert;
    let root_der = read_cert_file(root_path)?;
    check_ca_cert(&root_der, "root certificate", now).map_err(|e| import_err(root_path, e))?;
    check_signed_by(&root_der, &root_der, "root certificate")
        .map_err(|e| import_err(root_path, format!("not a self-signed root: {e}")))?;
    let root_key = match &import.root_key {
        Some(p) => {
            let key = read_key_file(p)?;
            let pem = key.to_pem();
            SigningCa::new(root_der.clone(), key, "root certificate", now)
                .map_err(|e| import_err(p, e))?;
            Some(PrivateKey::from_pem(&pem)?)
        }
        None => None,
    };
    match (&import.intermediate_cert, &import.intermediate_key) {
        (Some(cert_path), Some(key_path)) => {
            let int_der = read_cert_file(cert_path)?;
            check_signed_by(&int_der, &root_der, "intermediate certificate")
                .map_err(|e| import_err(cert_path, e))?;
            let key = read_key_file(key_path)?;
            let intermediate_key_pem = key.to_pem();
            let intermediate = SigningCa::new(int_der, key, "intermediate certificate", now)
                .map_err(|e| match e {
                    PkiError::KeyMismatch { .. } => import_err(key_path, e),
                    other => import_err(cert_path, other),
                })?;
            Ok(Material {
                root_der,
                root_key,
                intermediate,
                intermediate_key_pem,
                imported: true,
            })
        }
        (None, None) => {
            let Some(root_key) = root_key else {
                return Err(import_err(
                    root_path,
                    "the root's key is needed to create an intermediate: give --import-key, or import an intermediate and its key too",
                ));
            };
            let root_key_pem = root_key.to_pem();
            let root = SigningCa::new(root_der.clone(), root_key, "root certificate", now)?;
            let int_key = PrivateKey::generate(opts.key_type)?;
            let ttl = intermediate_ttl(opts.root_ttl);
            let int_der = generate_intermediate(&int_key, &root, &opts.trust_domain, id, ttl, now)?;
            let intermediate_key_pem = int_key.to_pem();
            let intermediate = SigningCa::new(int_der, int_key, "new intermediate", now)?;
            Ok(Material {
                root_der,
                root_key: Some(PrivateKey::from_pem(&root_key_pem)?),
                intermediate,
                intermediate_key_pem,
                imported: true,
            })
        }
        (Some(p), None) | (None, Some(p)) => Err(import_err(
            p,
            "an intermediate is imported as a pair: give both --import-intermediate and --import-intermediate-key",
        )),
    }
}

pub(crate) fn hierarchy_id() -> Result<String, IssuerError> {
    Ok(Serial::random()?.to_hex()[..8].to_owned())
}

/// Creates a CA in `dir`: hierarchy, keys, store, admin credentials, config.
///
/// Everything is built in a staging directory inside `dir` and moved into
/// place only when all of it succeeded, so a failure leaves `dir` as it was.
/// A directory that already holds a CA is refused untouched.
pub async fn init_data_dir(dir: &Path, opts: InitOptions) -> Result<InitReport, IssuerError> {
    let data = DataDir::new(dir);
    if data.holds_ca() {
        return Err(IssuerError::AlreadyInitialised {
            dir: dir.to_owned(),
        });
    }
    let now = OffsetDateTime::now_utc();
    let id = hierarchy_id()?;
    // Every check and all key generation happen before anything is written.
    let opts2 = opts.clone();
    let id2 = id.clone();
    let material = tokio::task::spawn_blocking(move || build_material(&opts2, &id2, now))
        .await
        .map_err(|e| IssuerError::Policy(format!("CA generation task failed: {e}")))??;

    let existed = dir.exists();
    create_private_dir(dir)?;
    let staging = dir.join(format!(".init-{id}"));
    let result = write_staged(&staging, &data, &id, &opts, material, now).await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            if !existed {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
    };
    // The config file last, as it marks a complete CA.
    move_into_place(&staging, dir, &["ca", "store.redb", "admin", "meshca.toml"])?;
    Ok(InitReport {
        admin_dir: data.admin_dir(),
        ..report
    })
}

async fn write_staged(
    staging: &Path,
    data: &DataDir,
    id: &str,
    opts: &InitOptions,
    m: Material,
    now: OffsetDateTime,
) -> Result<InitReport, IssuerError> {
    create_private_dir(staging)?;
    let stage = DataDir::new(staging);
    let hdir = stage.hierarchy_dir(id);
    create_private_dir(&staging.join("ca"))?;
    create_private_dir(&hdir)?;
    m.write_files(&hdir)?;

    let record = hierarchy_record(id, &m, None, now)?;
    let root_not_after = record.root_not_after;
    // Records are the CA's business (and later hold token hashes): 0600.
    let store = Arc::new(EmbeddedStore::open(&stage.store_path())?);
    meshca_files::restrict(&stage.store_path())?;
    store.create_hierarchy(&record).await?;
    let issuer = Arc::new(BuiltinIssuer::fixed(
        m.intermediate,
        id,
        vec![m.root_der.clone()],
    ));
    let policy = Policy {
        trust_domain: opts.trust_domain.clone(),
        max_ttl: opts.max_ttl,
    };
    let authority = Authority::new(issuer, store.clone(), policy);
    let admin = authority
        .issue(
            IssueRequest::meshca_own(ADMIN_NAME)?
                .profile(Profile::Client)
                .ttl(Some(ADMIN_TTL.min(opts.max_ttl)))
                .generate_key(opts.key_type),
        )
        .await?;
    drop(authority);
    drop(store);
    write_admin(&stage.admin_dir(), &admin)?;
    write_atomic(&stage.config_path(), opts.config_toml.as_bytes(), 0o600)?;
    Ok(InitReport {
        hierarchy_id: id.to_owned(),
        root_fingerprint: fingerprint(&m.root_der),
        root_not_after,
        intermediate_not_after: record.intermediate_not_after,
        admin_dir: data.admin_dir(),
        imported: m.imported,
        admin_not_after: admin.record.not_after,
    })
}

/// Creates a data directory whose certificates an upstream CA signs (Vault):
/// an embedded store with no hierarchy (meshca holds no CA key), admin
/// credentials signed by `issuer`, and `opts.config_toml`. Staged and moved
/// into place like [`init_data_dir`]; `opts.root_ttl` and `opts.import` do
/// not apply.
pub async fn init_with_issuer(
    dir: &Path,
    issuer: Arc<dyn Issuer>,
    opts: InitOptions,
) -> Result<InitReport, IssuerError> {
    let data = DataDir::new(dir);
    if data.holds_ca() {
        return Err(IssuerError::AlreadyInitialised {
            dir: dir.to_owned(),
        });
    }
    let bundle = issuer.trust_bundle().await?;
    let root = bundle.first().ok_or_else(|| IssuerError::Upstream {
        issuer: issuer.describe(),
        problem: crate::Unhealthy::BadAnswer("it has no CA certificate".into()),
    })?;
    let root_not_after = meshca_pki::cert_facts(root)?.not_after;
    let existed = dir.exists();
    create_private_dir(dir)?;
    let staging = dir.join(format!(".init-{}", hierarchy_id()?));
    let staged = async {
        create_private_dir(&staging)?;
        let stage = DataDir::new(&staging);
        let store = Arc::new(EmbeddedStore::open(&stage.store_path())?);
        meshca_files::restrict(&stage.store_path())?;
        let policy = Policy {
            trust_domain: opts.trust_domain.clone(),
            max_ttl: opts.max_ttl,
        };
        let authority = Authority::new(issuer.clone(), store.clone(), policy);
        let ttl = ADMIN_TTL
            .min(opts.max_ttl)
            .min(issuer.max_ttl(Profile::Client).unwrap_or(ADMIN_TTL));
        let admin = authority
            .issue(
                IssueRequest::meshca_own(ADMIN_NAME)?
                    .profile(Profile::Client)
                    .ttl(Some(ttl))
                    .generate_key(opts.key_type),
            )
            .await?;
        drop(authority);
        drop(store);
        write_admin(&stage.admin_dir(), &admin)?;
        write_atomic(&stage.config_path(), opts.config_toml.as_bytes(), 0o600)?;
        Ok::<_, IssuerError>((admin.record.hierarchy_id, admin.record.not_after))
    }
    .await;
    let (hierarchy_id, admin_not_after) = match staged {
        Ok(done) => done,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            if !existed {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
    };
    move_into_place(&staging, dir, &["store.redb", "admin", "meshca.toml"])?;
    Ok(InitReport {
        hierarchy_id,
        root_fingerprint: fingerprint(root),
        root_not_after,
        intermediate_not_after: issuer.issuing_ca().1,
        admin_dir: data.admin_dir(),
        imported: true,
        admin_not_after,
    })
}

/// Moves `names` from `staging` into `dir`, in that order, then removes the
/// staging directory and syncs `dir` so that the renames are durable.
fn move_into_place(staging: &Path, dir: &Path, names: &[&str]) -> Result<(), IssuerError> {
    for name in names {
        fs::rename(staging.join(name), dir.join(name)).map_err(|e| {
            IssuerError::File(meshca_files::FileError::Io {
                path: dir.join(name),
                op: "move into place",
                reason: e.to_string(),
                kind: e.kind(),
            })
        })?;
    }
    let _ = fs::remove_dir_all(staging);
    sync_dir(dir)?;
    Ok(())
}

/// Writes the admin credentials (kubernetes.io/tls layout).
fn write_admin(admin_dir: &Path, admin: &crate::Issued) -> Result<(), IssuerError> {
    create_private_dir(admin_dir)?;
    let key = admin.private_key.as_ref().map(|k| k.to_pem());
    let mut files: Vec<(&str, &[u8], u32)> = vec![
        ("tls.crt", admin.certificate_pem.as_bytes(), PUBLIC_MODE),
        ("ca.crt", admin.ca_bundle_pem.as_bytes(), PUBLIC_MODE),
    ];
    if let Some(k) = &key {
        files.push(("tls.key", k.as_bytes(), SECRET_MODE));
    }
    // The pair switches together (a running CLI never reads a new key with
    // an old certificate).
    meshca_files::write_set_atomic(admin_dir, &files)?;
    Ok(())
}

/// Issues new admin credentials into `dir/admin/` from the issuer that
/// signs now: a root rotation's activation does it, so that the operator
/// still gets in once the old root has left the bundle.
pub async fn reissue_admin(
    authority: &Authority,
    dir: &Path,
    key_type: KeyType,
) -> Result<crate::Issued, IssuerError> {
    let ttl = ADMIN_TTL.min(authority.policy().max_ttl).min(
        authority
            .issuer()
            .max_ttl(Profile::Client)
            .unwrap_or(ADMIN_TTL),
    );
    let admin = authority
        .issue(
            IssueRequest::meshca_own(ADMIN_NAME)?
                .profile(Profile::Client)
                .ttl(Some(ttl))
                .generate_key(key_type),
        )
        .await?;
    write_admin(&DataDir::new(dir).admin_dir(), &admin)?;
    Ok(admin)
}

pub(crate) fn hierarchy_record(
    id: &str,
    m: &Material,
    sealed_keys: Option<SealedKeys>,
    now: OffsetDateTime,
) -> Result<HierarchyRecord, IssuerError> {
    Ok(HierarchyRecord {
        id: id.to_owned(),
        status: HierarchyStatus::Active,
        root_pem: to_pem("CERTIFICATE", &m.root_der),
        intermediate_pem: to_pem("CERTIFICATE", m.intermediate.cert_der()),
        key_type: m.intermediate.key_type(),
        has_root_key: m.root_key.is_some(),
        created_at: now,
        root_not_after: check_ca_cert(&m.root_der, "root", now)?.1,
        intermediate_not_after: m.intermediate.not_after(),
        sealed_keys,
        custody_pem: Vec::new(),
    })
}

/// The name under which a shared store keeps the CA's `meshca.toml`, so that
/// a replica joining later starts from the same configuration.
pub const SHARED_CONFIG_BLOB: &str = "config";

/// Creates a CA in a shared store (etcd): the hierarchy with its keys sealed
/// under `seal`, the shared configuration, and, in the local `dir`, the
/// admin credentials and `local_config_toml`.
///
/// The local files are staged first; the hierarchy record is the commit
/// point, created only if the store holds none (two replicas racing to
/// initialise: one wins, the other is told and changes nothing locally).
pub async fn init_shared(
    dir: &Path,
    store: Arc<dyn Store>,
    seal: &SealKey,
    opts: InitOptions,
    local_config_toml: &str,
) -> Result<InitReport, IssuerError> {
    let data = DataDir::new(dir);
    if data.holds_ca() {
        return Err(IssuerError::AlreadyInitialised {
            dir: dir.to_owned(),
        });
    }
    if !store.list_hierarchies().await?.is_empty() {
        return Err(IssuerError::StoreHoldsCa {
            location: store.location(),
        });
    }
    let now = OffsetDateTime::now_utc();
    let id = hierarchy_id()?;
    let (opts2, id2) = (opts.clone(), id.clone());
    let m = tokio::task::spawn_blocking(move || build_material(&opts2, &id2, now))
        .await
        .map_err(|e| IssuerError::Policy(format!("CA generation task failed: {e}")))??;
    let record = hierarchy_record(&id, &m, Some(m.seal(seal, &id)?), now)?;
    let root_fingerprint = fingerprint(&m.root_der);
    let imported = m.imported;
    let bundle = vec![m.root_der.clone()];
    let issuer = Arc::new(BuiltinIssuer::fixed(m.intermediate, &id, bundle));
    let authority = Authority::new(
        issuer,
        store.clone(),
        Policy {
            trust_domain: opts.trust_domain.clone(),
            max_ttl: opts.max_ttl,
        },
    );
    let admin = authority
        .issue(
            IssueRequest::meshca_own(ADMIN_NAME)?
                .profile(Profile::Client)
                .ttl(Some(ADMIN_TTL.min(opts.max_ttl)))
                .generate_key(opts.key_type),
        )
        .await?;

    let existed = dir.exists();
    create_private_dir(dir)?;
    let staging = dir.join(format!(".init-{id}"));
    let cleanup = |staging: &Path| {
        let _ = fs::remove_dir_all(staging);
        if !existed {
            let _ = fs::remove_dir(dir);
        }
    };
    let staged = (|| -> Result<(), IssuerError> {
        create_private_dir(&staging)?;
        let stage = DataDir::new(&staging);
        write_admin(&stage.admin_dir(), &admin)?;
        write_atomic(&stage.config_path(), local_config_toml.as_bytes(), 0o600)?;
        Ok(())
    })();
    if let Err(e) = staged {
        cleanup(&staging);
        return Err(e);
    }
    let committed = async {
        store
            .put_blob(SHARED_CONFIG_BLOB, opts.config_toml.as_bytes())
            .await?;
        store.create_hierarchy(&record).await
    }
    .await;
    if let Err(e) = committed {
        cleanup(&staging);
        return Err(if e.is_conflict() {
            IssuerError::StoreHoldsCa {
                location: store.location(),
            }
        } else {
            e.into()
        });
    }
    move_into_place(&staging, dir, &["admin", "meshca.toml"])?;
    Ok(InitReport {
        hierarchy_id: id,
        root_fingerprint,
        root_not_after: record.root_not_after,
        intermediate_not_after: record.intermediate_not_after,
        admin_dir: data.admin_dir(),
        imported,
        admin_not_after: admin.record.not_after,
    })
}
