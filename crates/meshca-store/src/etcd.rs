//! The etcd store: every record under one key prefix, shared by replicas.
//!
//! Key layout (`P` is the prefix, `/meshca/` by default):
//!
//! | key | value |
//! | --- | --- |
//! | `P` `certs/<serial hex>` | certificate record (JSON), authenticated |
//! | `P` `ids/<namespace>/<name>/<serial hex>` | empty: the identity index |
//! | `P` `hierarchies/<id>` | hierarchy record (JSON; CA keys sealed), authenticated |
//! | `P` `tokens/<id>` | join token record (JSON; secret hashed), authenticated |
//! | `P` `blobs/<name>` | named CA state (the shared `meshca.toml`, the CRL, agent reports), authenticated |
//! | `P` `integrity` | the marker that the records under `P` are authenticated, authenticated |
//! | `P` `events/<random>` | the events of one transaction (JSON array), on a lease: the retention |
//! | `P` `leader` | the leading replica's name, on its lease |
//!
//! Every read-check-write is a compare-and-swap on the key's `mod_revision`
//! (retried when another replica got there first), so a token is consumed
//! once and a status changes once, whichever replicas race. Inserts are
//! "create if absent" transactions. An event's id is the etcd revision that
//! wrote it, which grows across the whole cluster.
//!
//! # Authenticated records
//! Write access to etcd is not the CA's authority. Each value marked
//! "authenticated" above is stored in a MAC envelope (see `mac.rs`:
//! HMAC-SHA256 over the key and the value, under a key derived from the seal
//! key), so nobody without the seal key can add a token, a certificate
//! record that names another identity, a hierarchy or a policy, nor move a
//! record to another key. A value that fails its check is refused and
//! logged (`ERROR`, with its key): a read of that record ([`Store::get_certificate`],
//! [`Store::get_blob`], a token use, a revocation, a status change) fails
//! with [`StoreError::Tampered`]; a listing skips it and goes on, so that one
//! forged record does not stop the CA (skipping is what its deletion would
//! have done, which write access can do anyway).
//!
//! The index keys (`ids/`) are not authenticated: they only say where to
//! look, and every record they lead to is checked and matched against the
//! identity asked for. Events and the leader key are not either: a forged
//! event makes replicas read the (authenticated) hierarchies again or mark
//! a certificate revoked in their caches, a forged leader key stops the
//! scheduled work; neither grants anything.
//!
//! Not prevented: writing back an older value meshca wrote at the same key
//! (the MAC does not cover when). See SECURITY.md.
//!
//! # Upgrading a store written before records were authenticated
//! [`EtcdStore::open`] checks the marker `P` `integrity` first. It is
//! written when a store is opened empty; a store that holds records without
//! a MAC and no marker is refused ([`StoreError::Unauthenticated`]) until
//! [`EtcdStore::authenticate_records`] (`meshca store authenticate`) has run
//! once. That run records in the marker the etcd revision it started at and
//! authenticates only records without a MAC last written before it; a
//! record written later never is, however often it runs again. A marker that
//! does not check with the seal key given is [`StoreError::SealKeyMismatch`];
//! a marker removed from a store whose records are authenticated is written
//! again (and authenticates nothing), with an `ERROR` in the log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meshca_etcd::{Client, Compare, EtcdConfig, EtcdError, KeyValue, Op, Txn};
use meshca_pki::{SealKey, Serial};
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::decide::{self, Decision};
use crate::mac::{self, RecordKey, Refusal};
use crate::record::{Expiry, IDENTITY_INDEX_MARKER, identity_key, identity_prefix};
use crate::{
    CertFilter, CertPage, CertificateRecord, EventFeed, HierarchyRecord, HierarchyStatus,
    Leadership, PruneRule, RevocationReason, RevokeOutcome, Store, StoreError, StoredEvent,
    TokenRecord, TokenRefusal,
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/meshca/";
/// How long events are kept at least (they live one to two of these).
pub const EVENT_RETENTION: Duration = Duration::from_secs(1800);
/// The default leader lease.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a compare-and-swap is tried before giving up.
const CAS_TRIES: usize = 50;

/// Operations per transaction when deleting expired records, building the
/// identity index or reading one identity's records (etcd allows 128 by
/// default).
const OPS_PER_TXN: usize = 100;
/// Most keys read per range request of a certificate listing page: a page
/// asks for what it still needs, doubling while the filter skips records,
/// up to this.
const PAGE_KEYS: usize = 256;
/// Most writes grouped into one transaction (etcd allows 128 operations
/// per transaction by default; a certificate is two puts, the record and
/// its index key, and the batch's events one more).
const MAX_BATCH: usize = 63;
/// Transactions in flight at once. One measured best (bench/etcd.sh): while
/// it is in flight the next batch grows, and etcd orders them anyway.
const BATCHES_IN_FLIGHT: usize = 1;
/// An event id is the etcd revision that wrote it, shifted, plus its place
/// in that transaction (several events share a revision when grouped).
const EVENT_SLOT_BITS: u32 = 12;
/// The kinds of record whose values are authenticated (each `P` `<kind>/`).
const AUTHENTICATED: [&str; 4] = ["certs", "hierarchies", "tokens", "blobs"];
/// What the integrity marker says to whoever reads it with etcdctl.
const MARKER_ABOUT: &str = "the records under this prefix are authenticated by meshca: HMAC-SHA256 over each key and value, under a key derived from the seal key";

/// Where the etcd store is.
#[derive(Debug, Clone)]
pub struct EtcdStoreConfig {
    /// The etcd client settings.
    pub etcd: EtcdConfig,
    /// The key prefix, ending in `/`.
    pub prefix: String,
    /// The leader lease: a dead leader is replaced within about this long.
    pub lease_ttl: Duration,
}

impl EtcdStoreConfig {
    /// Parses `etcd://host1:2379,host2:2379[/prefix]`.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::Unavailable {
            location: url.to_owned(),
            reason: format!("{reason}; expected etcd://host1:2379,host2:2379[/prefix]"),
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("not an etcd:// URL"))?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, DEFAULT_PREFIX),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let ok = h
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(bad(&format!("endpoint {h:?} is not host:port")));
            }
            endpoints.push(h.to_owned());
        }
        let mut prefix = if prefix == "/" {
            DEFAULT_PREFIX.to_owned()
        } else {
            prefix.to_owned()
        };
        if prefix.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad("the prefix holds spaces or control characters"));
        }
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(EtcdStoreConfig {
            etcd: EtcdConfig::new(endpoints),
            prefix,
            lease_ttl: DEFAULT_LEASE_TTL,
        })
    }
}

/// What [`EtcdStore::authenticate_records`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthenticateReport {
    /// The records it authenticated (their keys): they had no MAC and were
    /// last written before the upgrade first started.
    pub authenticated: Vec<String>,
    /// How many records were authenticated already.
    pub already: usize,
    /// The records it left refused (their keys): a MAC that does not check,
    /// or no MAC on a record written after the upgrade first started (or
    /// changed while it ran). Delete them or restore them from a backup.
    pub refused: Vec<String>,
}

/// The etcd store. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    location: String,
    lease_ttl: Duration,
    /// Authenticates the records (derived from the seal key).
    mac: Arc<RecordKey>,
    event_lease: Arc<Mutex<Option<(i64, Instant)>>>,
    writes: tokio::sync::mpsc::Sender<Write>,
}

/// A write the group-commit task puts into a shared transaction.
enum Write {
    /// Create `key` unless it exists; answers whether it was created.
    Create {
        key: Vec<u8>,
        value: Vec<u8>,
        /// An index key put (empty) with it.
        index: Option<Vec<u8>>,
        reply: tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Append an event (on `lease`); answers its id.
    Event {
        value: Vec<u8>,
        lease: i64,
        reply: tokio::sync::oneshot::Sender<Result<u64, StoreError>>,
    },
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// The integrity marker (`P` `integrity`), itself authenticated: the
/// records under the prefix are authenticated, with the key its MAC checks
/// with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    /// The envelope's version.
    version: u32,
    /// Records without a MAC last written before this etcd revision may be
    /// authenticated by [`EtcdStore::authenticate_records`]; 0: none may.
    legacy_before: i64,
    /// For people reading it with etcdctl.
    #[serde(default)]
    about: String,
}

impl Marker {
    fn new(legacy_before: i64) -> Self {
        Marker {
            version: 1,
            legacy_before,
            about: MARKER_ABOUT.to_owned(),
        }
    }
}

/// The authenticated kinds of record as they are, at the open of a store
/// without its marker.
#[derive(Debug, Default)]
struct Census {
    /// Values in a MAC envelope.
    enveloped: usize,
    /// Of those, how many check with this store's key.
    valid: usize,
    /// Values without an envelope.
    bare: usize,
    /// The etcd revision of the first read: every record then present was
    /// last written at or before it.
    revision: i64,
    /// The hierarchy records without an envelope.
    bare_hierarchies: Vec<KeyValue>,
}

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Logs a refused record, with its key.
fn log_refusal(key: &[u8], why: Refusal) {
    tracing::error!(
        key = %lossy(key),
        "refused a store record that fails its integrity check: {}; someone with write access to the store may have forged, altered or moved it",
        why.reason()
    );
}

/// A record that fails its check: logged, and the error naming it.
fn refuse(key: &[u8], why: Refusal) -> StoreError {
    log_refusal(key, why);
    StoreError::Tampered {
        key: lossy(key),
        reason: why.reason().to_owned(),
    }
}

/// A listing skips a refused record (logged by [`refuse`]) and goes on;
/// any other error stops it.
fn skip_refused<T>(r: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_tampered() => Ok(None),
        Err(e) => Err(e),
    }
}

impl EtcdStore {
    /// A store on the etcd cluster of `config`, its records authenticated
    /// with a key derived from `seal`. Contacts etcd, so that a wrong
    /// address or credentials fail here with a clear error, and checks the
    /// store's integrity marker (see the module docs): another seal key is
    /// [`StoreError::SealKeyMismatch`], a store written before records were
    /// authenticated is [`StoreError::Unauthenticated`].
    pub async fn open(config: EtcdStoreConfig, seal: &SealKey) -> Result<Self, StoreError> {
        let store = Self::connect(config, seal)?;
        store.check().await?;
        store.check_integrity().await?;
        store.build_identity_index().await?;
        Ok(store)
    }

    /// The client and the group-commit task, nothing checked yet.
    fn connect(config: EtcdStoreConfig, seal: &SealKey) -> Result<Self, StoreError> {
        let location = format!(
            "etcd://{}{}",
            config.etcd.endpoints.join(","),
            config.prefix
        );
        let mac = RecordKey::from_seal_key(seal).ok_or_else(|| StoreError::Unavailable {
            location: location.clone(),
            reason: "the key that authenticates records cannot be derived from the seal key".into(),
        })?;
        let client = Client::new(config.etcd).map_err(|e| StoreError::Unavailable {
            location: location.clone(),
            reason: e.to_string(),
        })?;
        let (writes, rx) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(group_commit(
            client.clone(),
            format!("{}events/", config.prefix).into_bytes(),
            location.clone(),
            rx,
        ));
        Ok(EtcdStore {
            client,
            prefix: config.prefix,
            location,
            lease_ttl: config.lease_ttl,
            mac: Arc::new(mac),
            event_lease: Arc::new(Mutex::new(None)),
            writes,
        })
    }

    /// The one-time upgrade of a store written by a meshca that did not
    /// authenticate its records (`meshca store authenticate`): run it once,
    /// with every replica stopped and upgraded, when the store holds only
    /// what it should. It writes the integrity marker with the revision it
    /// started at, then authenticates each record without a MAC last written
    /// before that revision (a compare-and-swap on its `mod_revision`).
    /// Run again (after an interruption), it takes up where it stopped and
    /// authenticates nothing written since the first run started. Before
    /// anything is written, the seal key must open the CA keys sealed in the
    /// hierarchy records ([`StoreError::SealKeyMismatch`] if it opens none).
    /// On a store whose records are authenticated but whose marker was
    /// removed, it writes the marker again and authenticates nothing.
    pub async fn authenticate_records(
        config: EtcdStoreConfig,
        seal: &SealKey,
    ) -> Result<AuthenticateReport, StoreError> {
        let store = Self::connect(config, seal)?;
        store.check().await?;
        let found = store
            .client
            .get(&store.integrity_key())
            .await
            .map_err(|e| store.fail(e))?;
        let marker = match found {
            Some(kv) => store.read_marker(&kv)?,
            None => {
                let census = store.census().await?;
                if census.enveloped > 0 {
                    if census.valid == 0 {
                        return Err(store.mismatch());
                    }
                    store.log_missing_marker();
                    store.write_marker(0).await?
                } else {
                    store.check_seal_key(seal, &census.bare_hierarchies)?;
                    store
                        .write_marker(census.revision.saturating_add(1))
                        .await?
                }
            }
        };
        let mut report = AuthenticateReport::default();
        for kind in AUTHENTICATED {
            let kvs = store
                .client
                .get_prefix(&store.dir(kind))
                .await
                .map_err(|e| store.fail(e))?;
            let mut eligible = Vec::new();
            for kv in kvs {
                if mac::is_enveloped(&kv.value) {
                    match store.mac.open(&kv.key, &kv.value) {
                        Ok(_) => report.already += 1,
                        Err(why) => {
                            log_refusal(&kv.key, why);
                            report.refused.push(lossy(&kv.key));
                        }
                    }
                } else if kv.mod_revision < marker.legacy_before {
                    eligible.push(kv);
                } else {
                    log_refusal(&kv.key, Refusal::NoMac);
                    report.refused.push(lossy(&kv.key));
                }
            }
            let put = |kv: &KeyValue, txn: Txn| {
                txn.when(Compare::mod_revision_is(&kv.key, kv.mod_revision))
                    .then(Op::put(&kv.key, &store.mac.seal(&kv.key, &kv.value), None))
            };
            for batch in eligible.chunks(OPS_PER_TXN) {
                let txn = batch.iter().fold(Txn::new(), |txn, kv| put(kv, txn));
                let r = store.client.txn(&txn).await.map_err(|e| store.fail(e))?;
                if r.succeeded {
                    report
                        .authenticated
                        .extend(batch.iter().map(|kv| lossy(&kv.key)));
                    continue;
                }
                // One of them changed meanwhile: one by one, so that only
                // what changed stays refused.
                for kv in batch {
                    let r = store
                        .client
                        .txn(&put(kv, Txn::new()))
                        .await
                        .map_err(|e| store.fail(e))?;
                    if r.succeeded {
                        report.authenticated.push(lossy(&kv.key));
                    } else {
                        log_refusal(&kv.key, Refusal::NoMac);
                        report.refused.push(lossy(&kv.key));
                    }
                }
            }
        }
        Ok(report)
    }

    fn integrity_key(&self) -> Vec<u8> {
        format!("{}integrity", self.prefix).into_bytes()
    }

    fn mismatch(&self) -> StoreError {
        StoreError::SealKeyMismatch {
            location: self.location.clone(),
        }
    }

    fn log_missing_marker(&self) {
        tracing::error!(
            key = %lossy(&self.integrity_key()),
            "the store's integrity marker is missing although its records are authenticated: someone with write access to the store removed it; writing it again (it authenticates no record: records without a valid MAC stay refused)"
        );
    }

    /// What the integrity marker `kv` says, when it checks with this key.
    fn read_marker(&self, kv: &KeyValue) -> Result<Marker, StoreError> {
        let value = self
            .mac
            .open(&kv.key, &kv.value)
            .map_err(|_| self.mismatch())?;
        serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
            key: lossy(&kv.key),
            reason: e.to_string(),
        })
    }

    /// Writes the integrity marker unless there is one; answers the marker
    /// in force (another replica's, when it wrote first).
    async fn write_marker(&self, legacy_before: i64) -> Result<Marker, StoreError> {
        let key = self.integrity_key();
        let marker = Marker::new(legacy_before);
        let value = self.mac.seal(&key, &encode(&lossy(&key), &marker)?);
        let txn = Txn::new()
            .when(Compare::absent(&key))
            .then(Op::put(&key, &value, None))
            .otherwise(Op::get(&key));
        let r = self.client.txn(&txn).await.map_err(|e| self.fail(e))?;
        if r.succeeded {
            return Ok(marker);
        }
        match r.ranges.into_iter().flatten().next() {
            Some(kv) => self.read_marker(&kv),
            None => Err(StoreError::Conflict(format!(
                "{} kept changing while it was written",
                lossy(&key)
            ))),
        }
    }

    /// At open: the marker must check with this key; a store without one
    /// gets it when it is empty (or its records are authenticated) and is
    /// refused when it holds records written before authentication.
    async fn check_integrity(&self) -> Result<(), StoreError> {
        let found = self
            .client
            .get(&self.integrity_key())
            .await
            .map_err(|e| self.fail(e))?;
        if let Some(kv) = found {
            return self.read_marker(&kv).map(|_| ());
        }
        let census = self.census().await?;
        if census.enveloped == 0 && census.bare > 0 {
            return Err(StoreError::Unauthenticated {
                location: self.location.clone(),
                records: census.bare,
            });
        }
        if census.enveloped > 0 {
            if census.valid == 0 {
                return Err(self.mismatch());
            }
            self.log_missing_marker();
        }
        self.write_marker(0).await.map(|_| ())
    }

    /// Counts the authenticated kinds of record, with and without a MAC
    /// (the identity index's marker aside: it grants nothing).
    async fn census(&self) -> Result<Census, StoreError> {
        let index_marker = self.key("blobs", IDENTITY_INDEX_MARKER);
        let mut c = Census::default();
        for kind in AUTHENTICATED {
            let (kvs, revision) = self
                .client
                .get_prefix_at(&self.dir(kind))
                .await
                .map_err(|e| self.fail(e))?;
            if c.revision == 0 {
                c.revision = revision;
            }
            for kv in kvs {
                if kv.key == index_marker {
                    continue;
                }
                if mac::is_enveloped(&kv.value) {
                    c.enveloped += 1;
                    if self.mac.open(&kv.key, &kv.value).is_ok() {
                        c.valid += 1;
                    }
                } else {
                    c.bare += 1;
                    if kind == "hierarchies" {
                        c.bare_hierarchies.push(kv);
                    }
                }
            }
        }
        Ok(c)
    }

    /// Before a store is authenticated: `seal` must open the intermediate
    /// keys sealed in its hierarchy records, or the records would be
    /// authenticated with a key the replicas do not hold. Opening none is
    /// [`StoreError::SealKeyMismatch`]; opening some but not all names the
    /// first record that does not open.
    fn check_seal_key(&self, seal: &SealKey, hierarchies: &[KeyValue]) -> Result<(), StoreError> {
        let mut opened = 0usize;
        let mut failed = None;
        for kv in hierarchies {
            let Ok(h) = serde_json::from_slice::<HierarchyRecord>(&kv.value) else {
                continue;
            };
            let Some(sealed) = &h.sealed_keys else {
                continue;
            };
            // The label meshca-issuer seals an intermediate key under
            // (`intermediate_seal_label` in crates/meshca-issuer/src/builtin.rs).
            let what = format!("the intermediate key of hierarchy {}", h.id);
            if seal.open(&sealed.intermediate, &what).is_ok() {
                opened += 1;
            } else if failed.is_none() {
                failed = Some(lossy(&kv.key));
            }
        }
        match failed {
            None => Ok(()),
            Some(_) if opened == 0 => Err(self.mismatch()),
            Some(key) => Err(StoreError::Tampered {
                key,
                reason: "its sealed intermediate key does not open with this seal key".into(),
            }),
        }
    }

    /// The value of `kv` when its MAC checks; else the record is refused
    /// (logged, [`StoreError::Tampered`]).
    fn open_value<'a>(&self, kv: &'a KeyValue) -> Result<&'a [u8], StoreError> {
        self.mac
            .open(&kv.key, &kv.value)
            .map_err(|why| refuse(&kv.key, why))
    }

    /// The record `kv` holds, when its MAC checks.
    fn decode<T: DeserializeOwned>(&self, kv: &KeyValue) -> Result<T, StoreError> {
        serde_json::from_slice(self.open_value(kv)?).map_err(|e| StoreError::Corrupt {
            key: lossy(&kv.key),
            reason: e.to_string(),
        })
    }

    /// `value` as it is stored at `key`: in its MAC envelope.
    fn sealed(&self, key: &[u8], value: &[u8]) -> Vec<u8> {
        self.mac.seal(key, value)
    }

    /// Indexes every certificate record by identity, once: a store made
    /// before the index existed gets it when a replica first opens it. The
    /// puts are idempotent, so replicas opening it together do no harm.
    async fn build_identity_index(&self) -> Result<(), StoreError> {
        let marker = self.key("blobs", IDENTITY_INDEX_MARKER);
        if self
            .client
            .get(&marker)
            .await
            .map_err(|e| self.fail(e))?
            .is_some()
        {
            return Ok(());
        }
        let kvs = self
            .client
            .get_prefix(&self.dir("certs"))
            .await
            .map_err(|e| self.fail(e))?;
        let mut keys = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            if let Some(rec) = skip_refused(self.decode::<Expiry>(kv))? {
                keys.push(self.index_key_of(kv, &rec));
            }
        }
        for batch in keys.chunks(OPS_PER_TXN) {
            let txn = batch
                .iter()
                .fold(Txn::new(), |txn, key| txn.then(Op::put(key, b"", None)));
            self.client.txn(&txn).await.map_err(|e| self.fail(e))?;
        }
        self.client
            .put(&marker, &self.sealed(&marker, b"1"), None)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// The certificate records the index keys `kvs` (under `prefix`, one
    /// identity's) lead to, in their order, read in transactions of many
    /// gets (one round trip per batch, not per record). An index key
    /// whose record is gone leads nowhere and is left out.
    async fn records_of_index(
        &self,
        prefix: &[u8],
        kvs: &[KeyValue],
    ) -> Result<Vec<KeyValue>, StoreError> {
        let keys: Vec<Vec<u8>> = kvs
            .iter()
            .map(|kv| {
                let serial = kv.key.get(prefix.len()..).unwrap_or_default();
                self.key("certs", &String::from_utf8_lossy(serial))
            })
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(OPS_PER_TXN) {
            let txn = batch
                .iter()
                .fold(Txn::new(), |txn, key| txn.then(Op::get(key)));
            let r = self.client.txn(&txn).await.map_err(|e| self.fail(e))?;
            out.extend(r.ranges.into_iter().flatten());
        }
        Ok(out)
    }

    /// The index key of the certificate record `kv` (`certs/<serial>`).
    fn index_key_of(&self, kv: &KeyValue, rec: &Expiry) -> Vec<u8> {
        let serial = kv.key.rsplit(|b| *b == b'/').next().unwrap_or_default();
        let serial = String::from_utf8_lossy(serial);
        self.key("ids", &identity_key(&rec.namespace, &rec.name, &serial))
    }

    fn fail(&self, e: EtcdError) -> StoreError {
        StoreError::Unavailable {
            location: self.location.clone(),
            reason: e.to_string(),
        }
    }

    fn key(&self, kind: &str, id: &str) -> Vec<u8> {
        format!("{}{kind}/{id}", self.prefix).into_bytes()
    }

    fn dir(&self, kind: &str) -> Vec<u8> {
        format!("{}{kind}/", self.prefix).into_bytes()
    }

    async fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.client.get(key).await.map_err(|e| self.fail(e))? {
            Some(kv) => Ok(Some(self.decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Every record of a kind whose MAC checks (the others are skipped,
    /// logged).
    async fn scan<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>, StoreError> {
        let kvs = self
            .client
            .get_prefix(&self.dir(kind))
            .await
            .map_err(|e| self.fail(e))?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            if let Some(v) = skip_refused(self.decode(kv))? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Read, decide, and write only if nobody wrote in between (else again).
    /// A record that fails its check is refused, never decided on.
    async fn modify<T, R>(
        &self,
        key: &[u8],
        decide: impl Fn(Option<T>) -> Decision<T, R>,
    ) -> Result<R, StoreError>
    where
        T: Serialize + DeserializeOwned,
    {
        let name = lossy(key);
        for _ in 0..CAS_TRIES {
            let kv = self.client.get(key).await.map_err(|e| self.fail(e))?;
            let (current, revision) = match &kv {
                Some(kv) => (Some(self.decode(kv)?), kv.mod_revision),
                None => (None, 0),
            };
            let (new, answer) = decide(current)?;
            let Some(new) = new else {
                return Ok(answer);
            };
            let value = self.sealed(key, &encode(&name, &new)?);
            let txn = Txn::new()
                .when(Compare::mod_revision_is(key, revision))
                .then(Op::put(key, &value, None));
            if self
                .client
                .txn(&txn)
                .await
                .map_err(|e| self.fail(e))?
                .succeeded
            {
                return Ok(answer);
            }
        }
        Err(StoreError::Conflict(format!(
            "{name} kept changing under {CAS_TRIES} tries"
        )))
    }

    async fn insert_new<T: Serialize>(
        &self,
        kind: &str,
        id: &str,
        record: &T,
    ) -> Result<(), StoreError> {
        let key = self.key(kind, id);
        let value = self.sealed(&key, &encode(id, record)?);
        let txn = Txn::new()
            .when(Compare::absent(&key))
            .then(Op::put(&key, &value, None));
        if self
            .client
            .txn(&txn)
            .await
            .map_err(|e| self.fail(e))?
            .succeeded
        {
            Ok(())
        } else {
            Err(StoreError::Conflict(format!("{kind} {id} already exists")))
        }
    }

    /// Hands a write to the group-commit task and waits for its answer.
    async fn submit<T>(
        &self,
        write: Write,
        answer: tokio::sync::oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let stopped = || StoreError::Unavailable {
            location: self.location.clone(),
            reason: "the store's writer has stopped".into(),
        };
        self.writes.send(write).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// The lease events are written on: renewed every half retention, so
    /// each event lives between one and two retention periods.
    async fn event_lease(&self) -> Result<i64, StoreError> {
        if let Ok(guard) = self.event_lease.lock()
            && let Some((id, at)) = *guard
            && at.elapsed() < EVENT_RETENTION
        {
            return Ok(id);
        }
        let ttl = i64::try_from(2 * EVENT_RETENTION.as_secs()).unwrap_or(3600);
        let id = self
            .client
            .lease_grant(ttl)
            .await
            .map_err(|e| self.fail(e))?;
        if let Ok(mut guard) = self.event_lease.lock() {
            *guard = Some((id, Instant::now()));
        }
        Ok(id)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn create_hierarchy(&self, record: &HierarchyRecord) -> Result<(), StoreError> {
        self.insert_new("hierarchies", &record.id, record).await
    }

    async fn list_hierarchies(&self) -> Result<Vec<HierarchyRecord>, StoreError> {
        let mut out: Vec<HierarchyRecord> = self.scan("hierarchies").await?;
        out.sort_by_key(|h| h.created_at);
        Ok(out)
    }

    async fn replace_intermediate(
        &self,
        id: &str,
        expected_pem: &str,
        new: crate::IntermediateUpdate,
    ) -> Result<HierarchyRecord, StoreError> {
        self.modify(&self.key("hierarchies", id), |rec| {
            decide::intermediate_update(id, rec, expected_pem, &new)
        })
        .await
    }

    async fn set_hierarchy_status(
        &self,
        id: &str,
        from: HierarchyStatus,
        to: HierarchyStatus,
    ) -> Result<HierarchyRecord, StoreError> {
        self.modify(&self.key("hierarchies", id), |rec| {
            decide::hierarchy_status(id, rec, from, to)
        })
        .await
    }

    async fn insert_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        let serial = record.serial.to_hex();
        let key = self.key("certs", &serial);
        let value = self.sealed(&key, &encode(&serial, record)?);
        let (reply, answer) = tokio::sync::oneshot::channel();
        let write = Write::Create {
            key,
            value,
            index: Some(self.key(
                "ids",
                &identity_key(&record.namespace, &record.name, &serial),
            )),
            reply,
        };
        self.submit(write, answer).await.and_then(|created| {
            if created {
                Ok(())
            } else {
                Err(StoreError::Conflict(format!(
                    "serial {serial} is already recorded"
                )))
            }
        })
    }

    async fn serial_exists(&self, serial: &Serial) -> Result<bool, StoreError> {
        // Taken is taken, authenticated or not: a forged record at a serial
        // only makes the caller draw another.
        let key = self.key("certs", &serial.to_hex());
        Ok(self
            .client
            .get(&key)
            .await
            .map_err(|e| self.fail(e))?
            .is_some())
    }

    async fn get_certificate(&self, serial: &Serial) -> Result<CertificateRecord, StoreError> {
        let key = serial.to_hex();
        self.get(&self.key("certs", &key))
            .await?
            .ok_or(StoreError::NotFound {
                kind: "certificate",
                key,
            })
    }

    async fn delete_expired_certificates(
        &self,
        rule: &PruneRule,
        limit: usize,
    ) -> Result<usize, StoreError> {
        // First pass: every record's expiry and identity, and the newest
        // record (greatest key: serials are time-ordered) of each identity.
        // A record that fails its check is left alone (its expiry is not to
        // be believed), and logged at every sweep; nor does it count as a
        // newer record, so a forged one supersedes nothing. (The identity
        // index is not authenticated, hence not asked.)
        let mut records: Vec<(KeyValue, Expiry)> = Vec::new();
        for kv in self
            .client
            .get_prefix(&self.dir("certs"))
            .await
            .map_err(|e| self.fail(e))?
        {
            if let Some(rec) = skip_refused(self.decode::<Expiry>(&kv))? {
                records.push((kv, rec));
            }
        }
        // In key order, so the last record seen of an identity is its newest.
        let mut newest: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, (_, rec)) in records.iter().enumerate() {
            newest.insert((rec.namespace.as_str(), rec.name.as_str()), i);
        }
        let mut expired = Vec::new();
        for (i, (kv, rec)) in records.iter().enumerate() {
            if expired.len() >= limit {
                break;
            }
            let superseded = newest
                .get(&(rec.namespace.as_str(), rec.name.as_str()))
                .is_some_and(|n| *n != i);
            if rule.deletes(rec.not_after, superseded) {
                expired.push((kv.key.clone(), self.index_key_of(kv, rec)));
            }
        }
        // A record's notAfter never changes, so no comparison is needed;
        // batches stay under etcd's limit of operations per transaction.
        for batch in expired.chunks(OPS_PER_TXN / 2) {
            let txn = batch.iter().fold(Txn::new(), |txn, (key, indexed)| {
                txn.then(Op::delete(key)).then(Op::delete(indexed))
            });
            self.client.txn(&txn).await.map_err(|e| self.fail(e))?;
        }
        Ok(expired.len())
    }

    async fn list_certificates(
        &self,
        filter: &CertFilter,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        if let (Some(ns), Some(name)) = (&filter.namespace, &filter.name) {
            // One identity: its keys in the index, not every record.
            let prefix = self.key("ids", &identity_prefix(ns, name));
            let keys: Vec<Vec<u8>> = self
                .client
                .get_prefix(&prefix)
                .await
                .map_err(|e| self.fail(e))?
                .iter()
                .map(|kv| {
                    let serial = String::from_utf8_lossy(&kv.key[prefix.len()..]);
                    self.key("certs", &serial)
                })
                .collect();
            // The records in transactions of many gets: one round trip per
            // batch, not per certificate. The index is not authenticated:
            // each record is checked, and must be of the identity asked for.
            let mut out = Vec::new();
            for batch in keys.chunks(OPS_PER_TXN) {
                let txn = batch
                    .iter()
                    .fold(Txn::new(), |txn, key| txn.then(Op::get(key)));
                let r = self.client.txn(&txn).await.map_err(|e| self.fail(e))?;
                for kv in r.ranges.iter().flatten() {
                    let Some(rec) = skip_refused(self.decode::<CertificateRecord>(kv))? else {
                        continue;
                    };
                    if filter.matches(&rec) {
                        out.push(rec);
                    }
                }
            }
            decide::sort_certificates(&mut out);
            return Ok(out);
        }
        let mut out: Vec<CertificateRecord> = self
            .scan::<CertificateRecord>("certs")
            .await?
            .into_iter()
            .filter(|r| filter.matches(r))
            .collect();
        decide::sort_certificates(&mut out);
        Ok(out)
    }

    async fn list_certificates_page(
        &self,
        filter: &CertFilter,
        after: Option<&Serial>,
        limit: usize,
    ) -> Result<CertPage, StoreError> {
        let limit = limit.max(1);
        // One identity: its keys in the index (not authenticated: each
        // record they lead to is checked and must match the filter, which
        // names the identity). Else the records themselves. Either way
        // the keys end in the serial key, so they come in its order.
        let index = match (&filter.namespace, &filter.name) {
            (Some(ns), Some(name)) => Some(self.key("ids", &identity_prefix(ns, name))),
            _ => None,
        };
        let prefix = index.clone().unwrap_or_else(|| self.dir("certs"));
        let mut cursor: Option<Vec<u8>> = after.map(|serial| {
            let mut key = prefix.clone();
            key.extend_from_slice(serial.to_hex().as_bytes());
            key
        });
        let mut page = CertPage {
            records: Vec::new(),
            next: None,
        };
        // What is still needed, then twice as much each time the filter
        // left records out, up to PAGE_KEYS: a page whose records mostly
        // match reads about what it returns.
        let mut ask = limit.min(PAGE_KEYS);
        loop {
            let (kvs, more) = self
                .client
                .get_page(&prefix, cursor.as_deref(), i64::try_from(ask).unwrap_or(1))
                .await
                .map_err(|e| self.fail(e))?;
            let Some(last) = kvs.last() else {
                return Ok(page);
            };
            cursor = Some(last.key.clone());
            let found = match &index {
                None => kvs,
                Some(_) => self.records_of_index(&prefix, &kvs).await?,
            };
            let total = found.len();
            for (i, kv) in found.iter().enumerate() {
                let Some(rec) = skip_refused(self.decode::<CertificateRecord>(kv))? else {
                    continue;
                };
                if !filter.matches(&rec) {
                    continue;
                }
                let serial = rec.serial.clone();
                page.records.push(rec);
                if page.records.len() >= limit {
                    // More may follow when any key does (whether it
                    // matches is the next page's to find out).
                    if i + 1 < total || more {
                        page.next = Some(serial);
                    }
                    return Ok(page);
                }
            }
            if !more {
                return Ok(page);
            }
            ask = ask.saturating_mul(2).min(PAGE_KEYS);
        }
    }

    async fn create_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.insert_new("tokens", &record.id, record).await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out: Vec<TokenRecord> = self.scan("tokens").await?;
        out.sort_by_key(|t| t.created_at);
        Ok(out)
    }

    async fn delete_token(&self, id: &str) -> Result<(), StoreError> {
        // No check: deleting is how a forged token is got rid of.
        match self
            .client
            .delete(&self.key("tokens", id))
            .await
            .map_err(|e| self.fail(e))?
        {
            0 => Err(StoreError::NotFound {
                kind: "token",
                key: id.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    async fn consume_token(
        &self,
        id: &str,
        secret_sha256: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        self.modify(&self.key("tokens", id), |rec| {
            decide::token_use(rec, secret_sha256, now)
        })
        .await
    }

    async fn refund_token(&self, id: &str) -> Result<(), StoreError> {
        self.modify(&self.key("tokens", id), decide::token_refund)
            .await
    }

    async fn revoke_certificate(
        &self,
        serial: &Serial,
        reason: RevocationReason,
        at: OffsetDateTime,
    ) -> Result<RevokeOutcome, StoreError> {
        let key = serial.to_hex();
        self.modify(&self.key("certs", &key), |rec| {
            decide::revocation(&key, rec, reason, at)
        })
        .await
    }

    async fn append_event(&self, body: &[u8]) -> Result<u64, StoreError> {
        let lease = self.event_lease().await?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let write = Write::Event {
            value: body.to_vec(),
            lease,
            reply,
        };
        self.submit(write, answer).await
    }

    async fn watch_events(&self, after: u64) -> Result<EventFeed, StoreError> {
        // Fail now, not in the background, when etcd cannot be reached.
        self.check().await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<StoredEvent>(1024);
        let (client, dir) = (self.client.clone(), self.dir("events"));
        tokio::spawn(async move {
            let mut last = after;
            // Each round: what is retained after `last`, then a watch from
            // the snapshot on; when the watch breaks, round again.
            while !tx.is_closed() {
                if let Err(e) = follow_events(&client, &dir, &mut last, &tx).await {
                    tracing::warn!("event watch on etcd: {e}; starting again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        Ok(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|e| (e, rx))
        })))
    }

    async fn campaign(&self, candidate: &str) -> Result<Leadership, StoreError> {
        self.check().await?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (client, key, ttl) = (
            self.client.clone(),
            format!("{}leader", self.prefix).into_bytes(),
            self.lease_ttl,
        );
        let candidate = candidate.to_owned();
        tokio::spawn(async move { run_campaign(client, key, candidate, ttl, tx).await });
        Ok(rx)
    }

    async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self
            .client
            .get(&self.key("blobs", name))
            .await
            .map_err(|e| self.fail(e))?
        {
            Some(kv) => Ok(Some(self.open_value(&kv)?.to_vec())),
            None => Ok(None),
        }
    }

    async fn put_blob(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.key("blobs", name);
        self.client
            .put(&key, &self.sealed(&key, value), None)
            .await
            .map(|_| ())
            .map_err(|e| self.fail(e))
    }

    async fn list_blobs(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let dir = self.dir("blobs");
        let kvs = self
            .client
            .get_prefix(&self.key("blobs", prefix))
            .await
            .map_err(|e| self.fail(e))?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let Some(name) = kv
                .key
                .get(dir.len()..)
                .and_then(|n| String::from_utf8(n.to_vec()).ok())
            else {
                continue;
            };
            if let Some(value) = skip_refused(self.open_value(kv))? {
                out.push((name, value.to_vec()));
            }
        }
        Ok(out)
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.client.status().await.map_err(|e| self.fail(e))
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

/// The events one key holds: the events of one transaction, as a JSON
/// array of their bodies; the id of each is the revision that wrote the
/// key, shifted, plus its place in the array.
fn events_of(kv: &KeyValue) -> Vec<StoredEvent> {
    let revision = u64::try_from(kv.mod_revision).unwrap_or(0);
    let bodies: Vec<Box<serde_json::value::RawValue>> = match serde_json::from_slice(&kv.value) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(
                key = %String::from_utf8_lossy(&kv.key),
                "skipping an event record that does not decode: {e}"
            );
            return Vec::new();
        }
    };
    bodies
        .into_iter()
        .enumerate()
        .take(1 << EVENT_SLOT_BITS)
        .map(|(i, b)| StoredEvent {
            id: (revision << EVENT_SLOT_BITS) | i as u64,
            body: b.get().as_bytes().to_vec(),
        })
        .collect()
}

/// The value of an events key: the bodies as a JSON array.
fn events_value<'a>(bodies: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = b"[".to_vec();
    for (i, b) in bodies.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b);
    }
    out.push(b']');
    out
}

/// The group-commit task: takes the first waiting write and whatever else is
/// queued (up to [`MAX_BATCH`]), and commits them in one transaction, with
/// up to [`BATCHES_IN_FLIGHT`] transactions in flight. Under load one raft
/// round trip carries many issuances instead of capping throughput at
/// etcd's commit rate.
async fn group_commit(
    client: Client,
    events_dir: Vec<u8>,
    location: String,
    mut rx: tokio::sync::mpsc::Receiver<Write>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        // The slot first, then the batch: while every slot is busy, writes
        // pile up in the queue and all go into the next transaction.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let (client, dir, location) = (client.clone(), events_dir.clone(), location.clone());
        tokio::spawn(async move {
            commit_batch(&client, &dir, &location, batch).await;
            drop(permit);
        });
    }
}

async fn commit_batch(client: &Client, events_dir: &[u8], location: &str, batch: Vec<Write>) {
    let fail = |e: &EtcdError| StoreError::Unavailable {
        location: location.to_owned(),
        reason: e.to_string(),
    };
    let events_key = || {
        let mut key = events_dir.to_vec();
        key.extend_from_slice(
            Serial::random()
                .map(|s| s.to_hex())
                .unwrap_or_default()
                .as_bytes(),
        );
        key
    };
    let mut txn = Txn::new();
    let mut lease = None;
    // etcd refuses a transaction that puts one key twice: a key asked for
    // again in the same batch (one serial drawn twice) goes in once, and
    // the later writes of it lose, as they would one after the other.
    let mut seen = std::collections::HashSet::new();
    let mut repeated = vec![false; batch.len()];
    for (i, w) in batch.iter().enumerate() {
        match w {
            Write::Create {
                key, value, index, ..
            } => {
                if !seen.insert(key.clone()) {
                    repeated[i] = true;
                    continue;
                }
                txn = txn
                    .when(Compare::absent(key))
                    .then(Op::put(key, value, None));
                if let Some(index) = index {
                    txn = txn.then(Op::put(index, b"", None));
                }
            }
            Write::Event { lease: l, .. } => lease = Some(*l),
        }
    }
    // All the batch's events in one key: one put, whatever their number.
    let events: Vec<&[u8]> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Event { value, .. } => Some(value.as_slice()),
            Write::Create { .. } => None,
        })
        .collect();
    if !events.is_empty() {
        txn = txn.then(Op::put(
            &events_key(),
            &events_value(events.into_iter()),
            lease,
        ));
    }
    match client.txn(&txn).await {
        Ok(r) if r.succeeded => {
            let revision = u64::try_from(r.revision).unwrap_or(0);
            let mut slot = 0u64;
            for (w, again) in batch.into_iter().zip(repeated) {
                match w {
                    Write::Create { reply, .. } => {
                        let _ = reply.send(Ok(!again));
                    }
                    Write::Event { reply, .. } => {
                        let _ = reply.send(Ok((revision << EVENT_SLOT_BITS) | slot));
                        slot += 1;
                    }
                }
            }
        }
        // Some key exists already (a serial collision, or a retried batch
        // that had landed): each write on its own, so only that one fails.
        Ok(_) => {
            for w in batch {
                match w {
                    Write::Create {
                        key,
                        value,
                        index,
                        reply,
                    } => {
                        let mut one = Txn::new()
                            .when(Compare::absent(&key))
                            .then(Op::put(&key, &value, None));
                        if let Some(index) = index {
                            one = one.then(Op::put(&index, b"", None));
                        }
                        let r = client.txn(&one).await;
                        let _ = reply.send(r.map(|r| r.succeeded).map_err(|e| fail(&e)));
                    }
                    Write::Event {
                        value,
                        lease,
                        reply,
                    } => {
                        let value = events_value(std::iter::once(value.as_slice()));
                        let r = client.put(&events_key(), &value, Some(lease)).await;
                        let _ = reply.send(
                            r.map(|rev| u64::try_from(rev).unwrap_or(0) << EVENT_SLOT_BITS)
                                .map_err(|e| fail(&e)),
                        );
                    }
                }
            }
        }
        Err(e) => {
            for w in batch {
                match w {
                    Write::Create { reply, .. } => {
                        let _ = reply.send(Err(fail(&e)));
                    }
                    Write::Event { reply, .. } => {
                        let _ = reply.send(Err(fail(&e)));
                    }
                }
            }
        }
    }
}

async fn follow_events(
    client: &Client,
    dir: &[u8],
    last: &mut u64,
    tx: &tokio::sync::mpsc::Sender<StoredEvent>,
) -> Result<(), EtcdError> {
    let (mut kvs, revision) = client.get_prefix_at(dir).await?;
    kvs.sort_by_key(|kv| kv.mod_revision);
    for event in kvs.iter().flat_map(events_of) {
        if event.id > *last {
            *last = event.id;
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
    let mut watch = client.watch_prefix(dir, revision + 1).await?;
    while let Some(batch) = watch.next().await {
        for e in batch? {
            // Deletions are events leaving the retention window.
            if e.deleted {
                continue;
            }
            for event in events_of(&e.kv) {
                if event.id <= *last {
                    continue;
                }
                *last = event.id;
                if tx.send(event).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    Err(EtcdError::Unavailable {
        endpoints: client.endpoints(),
        reason: "the watch stream ended".into(),
    })
}

/// The campaign: hold a lease, keep it alive, and own the leader key while
/// it is free or ours. Leadership is given up (false) before the lease can
/// have expired at etcd, so two replicas never both believe they lead.
async fn run_campaign(
    client: Client,
    key: Vec<u8>,
    candidate: String,
    ttl: Duration,
    tx: tokio::sync::watch::Sender<bool>,
) {
    let tick = (ttl / 5).max(Duration::from_millis(200));
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(10).max(2);
    let mut lease: Option<(i64, Instant)> = None;
    let set = |leading: bool| {
        tx.send_if_modified(|v| {
            let changed = *v != leading;
            *v = leading;
            changed
        });
    };
    while !tx.is_closed() {
        match lease {
            None => match client.lease_grant(ttl_secs).await {
                Ok(id) => lease = Some((id, Instant::now())),
                Err(e) => {
                    set(false);
                    tracing::debug!("leader election: no lease: {e}");
                }
            },
            Some((id, last_ok)) => match client.lease_keep_alive(id).await {
                Ok(left) if left > 0 => lease = Some((id, Instant::now())),
                Ok(_) => {
                    // Expired at etcd: whatever it held is gone.
                    lease = None;
                    set(false);
                }
                Err(e) => {
                    if last_ok.elapsed() + tick >= ttl {
                        tracing::warn!(
                            "leader election: cannot renew the lease ({e}); stepping down"
                        );
                        lease = None;
                        set(false);
                    }
                }
            },
        }
        if let Some((id, _)) = lease {
            let txn = Txn::new()
                .when(Compare::absent(&key))
                .then(Op::put(&key, candidate.as_bytes(), Some(id)))
                .otherwise(Op::get(&key));
            match client.txn(&txn).await {
                Ok(r) => {
                    let ours = r.succeeded
                        || r.ranges
                            .first()
                            .and_then(|kv| kv.as_ref())
                            .is_some_and(|kv| kv.lease == id);
                    if ours && !*tx.borrow() {
                        tracing::info!("{candidate} leads");
                    }
                    set(ours);
                }
                Err(e) => tracing::debug!("leader election: {e}"),
            }
        }
        tokio::time::sleep(tick).await;
    }
    // Nobody listens any more: let another replica lead at once.
    if let Some((id, _)) = lease {
        let _ = client.lease_revoke(id).await;
    }
}

#[cfg(test)]
mod tests {
    //! Against a real etcd (Debian's etcd-server, one member on loopback),
    //! writing into it directly as someone with write access would.
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{CertStatus, SealedKeys};
    use meshca_pki::{KeyType, Profile};
    use meshca_testkit::EtcdCluster;

    /// The hash a test token's secret has (the store only compares hashes).
    const SECRET_HASH: [u8; 32] = [7; 32];

    fn seal_key(byte: u8) -> SealKey {
        SealKey::from_file_content(hex::encode([byte; 32]).as_bytes()).unwrap()
    }

    fn config(etcd: &EtcdCluster, prefix: &str) -> EtcdStoreConfig {
        EtcdStoreConfig::from_url(&etcd.store_url(prefix)).unwrap()
    }

    /// A plain etcd client: what someone with write access to etcd has.
    fn raw(etcd: &EtcdCluster) -> Client {
        Client::new(EtcdConfig::new(etcd.endpoints())).unwrap()
    }

    fn token(id: &str, name: &str) -> TokenRecord {
        let now = OffsetDateTime::now_utc();
        TokenRecord {
            id: id.into(),
            secret_sha256: hex::encode(SECRET_HASH),
            namespace: "default".into(),
            name: name.into(),
            created_at: now,
            expires_at: now + Duration::from_secs(3600),
            uses_allowed: 1,
            uses: 0,
        }
    }

    fn cert(name: &str) -> CertificateRecord {
        let now = OffsetDateTime::now_utc();
        CertificateRecord {
            serial: Serial::random().unwrap(),
            namespace: "default".into(),
            name: name.into(),
            profile: Profile::Service,
            spiffe_id: format!("spiffe://cluster.local/ns/default/sa/{name}"),
            dns_names: vec![],
            ip_addresses: vec![],
            key_type: KeyType::EcdsaP256,
            hierarchy_id: "h1".into(),
            issued_at: now,
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            fingerprint: "00".into(),
            status: CertStatus::Active,
            revoked_at: None,
            revocation_reason: None,
            certificate_pem: String::new(),
            renewed_from: None,
        }
    }

    /// A hierarchy whose intermediate "key" is sealed with `seal` under the
    /// label meshca-issuer uses.
    fn hierarchy(id: &str, seal: &SealKey) -> HierarchyRecord {
        let now = OffsetDateTime::now_utc();
        HierarchyRecord {
            id: id.into(),
            status: HierarchyStatus::Active,
            root_pem: String::new(),
            intermediate_pem: String::new(),
            key_type: KeyType::EcdsaP256,
            has_root_key: false,
            created_at: now,
            root_not_after: now,
            intermediate_not_after: now,
            sealed_keys: Some(SealedKeys {
                intermediate: seal
                    .seal(
                        b"not a key",
                        &format!("the intermediate key of hierarchy {id}"),
                    )
                    .unwrap(),
                root: None,
            }),
            custody_pem: Vec::new(),
        }
    }

    fn json<T: Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forged_altered_and_moved_records_are_refused() {
        let etcd = EtcdCluster::start(1);
        let seal = seal_key(1);
        let store = EtcdStore::open(config(&etcd, "/mac/"), &seal)
            .await
            .unwrap();
        let client = raw(&etcd);
        let now = OffsetDateTime::now_utc();
        store.create_token(&token("aa", "web")).await.unwrap();
        let c = cert("web");
        store.insert_certificate(&c).await.unwrap();
        store.put_blob("config", b"one").await.unwrap();
        store.put_blob("agents/r1", b"{}").await.unwrap();
        store
            .create_hierarchy(&hierarchy("h1", &seal))
            .await
            .unwrap();

        // What meshca writes is in an envelope, and still readable.
        let real_token = client.get(b"/mac/tokens/aa").await.unwrap().unwrap();
        assert!(mac::is_enveloped(&real_token.value));
        assert!(lossy(&real_token.value).contains(r#""namespace":"default""#));

        // A token record written by someone else: refused when used, and
        // the error names it.
        client
            .put(b"/mac/tokens/bb", &json(&token("bb", "db")), None)
            .await
            .unwrap();
        let e = store
            .consume_token("bb", &SECRET_HASH, now)
            .await
            .unwrap_err();
        assert!(e.is_tampered(), "{e}");
        assert!(e.to_string().contains("/mac/tokens/bb"), "{e}");
        // A real token altered under its own MAC (more uses): refused.
        let more = lossy(&real_token.value).replace(r#""uses_allowed":1"#, r#""uses_allowed":9"#);
        assert!(more.contains(r#""uses_allowed":9"#), "{more}");
        client
            .put(b"/mac/tokens/aa", more.as_bytes(), None)
            .await
            .unwrap();
        let e = store
            .consume_token("aa", &SECRET_HASH, now)
            .await
            .unwrap_err();
        assert!(e.is_tampered(), "{e}");
        assert!(store.refund_token("aa").await.unwrap_err().is_tampered());
        // Listings leave both out and go on; a forged token can be deleted.
        store.create_token(&token("cc", "db")).await.unwrap();
        let ids: Vec<String> = store
            .list_tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["cc"]);
        store.delete_token("bb").await.unwrap();
        assert!(
            store
                .consume_token("cc", &SECRET_HASH, now)
                .await
                .unwrap()
                .is_ok()
        );

        // A certificate record copied to another serial's key: refused there.
        let cert_key = format!("/mac/certs/{}", c.serial.to_hex());
        let real_cert = client.get(cert_key.as_bytes()).await.unwrap().unwrap();
        let other = Serial::random().unwrap();
        client
            .put(
                format!("/mac/certs/{}", other.to_hex()).as_bytes(),
                &real_cert.value,
                None,
            )
            .await
            .unwrap();
        assert!(
            store
                .get_certificate(&other)
                .await
                .unwrap_err()
                .is_tampered()
        );
        assert_eq!(store.get_certificate(&c.serial).await.unwrap().name, "web");
        // The record re-targeted at the admin identity, its MAC kept:
        // refused when read, left out of listings, left alone by the sweep.
        let admin = lossy(&real_cert.value)
            .replace(r#""namespace":"default""#, r#""namespace":"meshca-system""#);
        assert!(admin.contains("meshca-system"));
        client
            .put(cert_key.as_bytes(), admin.as_bytes(), None)
            .await
            .unwrap();
        let e = store.get_certificate(&c.serial).await.unwrap_err();
        assert!(e.is_tampered() && e.to_string().contains(&cert_key), "{e}");
        assert!(
            store
                .revoke_certificate(&c.serial, RevocationReason::KeyCompromise, now)
                .await
                .unwrap_err()
                .is_tampered()
        );
        assert!(
            store
                .list_certificates(&CertFilter::default())
                .await
                .unwrap()
                .is_empty()
        );
        let web = CertFilter {
            namespace: Some("default".into()),
            name: Some("web".into()),
            ..CertFilter::default()
        };
        assert!(store.list_certificates(&web).await.unwrap().is_empty());
        let later = now + Duration::from_secs(400 * 86400);
        let rule = PruneRule {
            expired_before: later,
            superseded_expired_before: later,
        };
        assert_eq!(
            store.delete_expired_certificates(&rule, 100).await.unwrap(),
            0
        );
        assert!(store.serial_exists(&other).await.unwrap());

        // A hierarchy added with another root: not listed, not changed.
        let mut evil = hierarchy("h2", &seal);
        evil.root_pem = "the attacker's root".into();
        client
            .put(b"/mac/hierarchies/h2", &json(&evil), None)
            .await
            .unwrap();
        let ids: Vec<String> = store
            .list_hierarchies()
            .await
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(ids, ["h1"]);
        let e = store
            .set_hierarchy_status("h2", HierarchyStatus::Active, HierarchyStatus::Retired)
            .await
            .unwrap_err();
        assert!(e.is_tampered(), "{e}");
        // The same hierarchy record moved under another prefix: refused.
        let h1 = client.get(b"/mac/hierarchies/h1").await.unwrap().unwrap();
        let elsewhere = EtcdStore::open(config(&etcd, "/mac2/"), &seal)
            .await
            .unwrap();
        client
            .put(b"/mac2/hierarchies/h1", &h1.value, None)
            .await
            .unwrap();
        assert!(elsewhere.list_hierarchies().await.unwrap().is_empty());

        // Blobs: the shared configuration replaced, an agent report added.
        client
            .put(
                b"/mac/blobs/config",
                b"[[policy]]\nnamespace = \"*\"\n",
                None,
            )
            .await
            .unwrap();
        assert!(store.get_blob("config").await.unwrap_err().is_tampered());
        client
            .put(b"/mac/blobs/agents/r2", b"{}", None)
            .await
            .unwrap();
        let names: Vec<String> = store
            .list_blobs("agents/")
            .await
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["agents/r1"]);
        // What meshca writes again is read again.
        store.put_blob("config", b"two").await.unwrap();
        assert_eq!(
            store.get_blob("config").await.unwrap().as_deref(),
            Some(&b"two"[..])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_seal_key_does_not_open_the_store_and_a_removed_marker_authenticates_nothing() {
        let etcd = EtcdCluster::start(1);
        let client = raw(&etcd);
        let (right, wrong) = (seal_key(1), seal_key(2));
        let store = EtcdStore::open(config(&etcd, "/keys/"), &right)
            .await
            .unwrap();
        store.create_token(&token("aa", "web")).await.unwrap();
        drop(store);
        let e = EtcdStore::open(config(&etcd, "/keys/"), &wrong)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::SealKeyMismatch { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("seal key does not open") && text.contains("--seal-key-file"),
            "{text}"
        );
        // Another prefix is another store.
        EtcdStore::open(config(&etcd, "/other/"), &wrong)
            .await
            .unwrap();

        // The marker removed: the records decide which key is right...
        assert_eq!(client.delete(b"/keys/integrity").await.unwrap(), 1);
        let e = EtcdStore::open(config(&etcd, "/keys/"), &wrong)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::SealKeyMismatch { .. }), "{e}");
        // ...and with the right one it is written again, authenticating
        // nothing: a token planted meanwhile stays refused, and the upgrade
        // does not take it either.
        client
            .put(b"/keys/tokens/bb", &json(&token("bb", "web")), None)
            .await
            .unwrap();
        let store = EtcdStore::open(config(&etcd, "/keys/"), &right)
            .await
            .unwrap();
        assert!(client.get(b"/keys/integrity").await.unwrap().is_some());
        let now = OffsetDateTime::now_utc();
        let e = store
            .consume_token("bb", &SECRET_HASH, now)
            .await
            .unwrap_err();
        assert!(e.is_tampered(), "{e}");
        let report = EtcdStore::authenticate_records(config(&etcd, "/keys/"), &right)
            .await
            .unwrap();
        assert!(report.authenticated.is_empty(), "{report:?}");
        assert_eq!(report.refused, ["/keys/tokens/bb"], "{report:?}");
        // tokens/aa and the identity index's marker.
        assert_eq!(report.already, 2, "{report:?}");
        assert!(
            store
                .consume_token("bb", &SECRET_HASH, now)
                .await
                .unwrap_err()
                .is_tampered()
        );
        assert!(
            store
                .consume_token("aa", &SECRET_HASH, now)
                .await
                .unwrap()
                .is_ok()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_written_before_authentication_is_upgraded_once() {
        let etcd = EtcdCluster::start(1);
        let client = raw(&etcd);
        let seal = seal_key(3);
        // What an older meshca left: records without a MAC.
        let c = cert("web");
        let old: Vec<(String, Vec<u8>)> = vec![
            (format!("/old/certs/{}", c.serial.to_hex()), json(&c)),
            ("/old/hierarchies/h1".into(), json(&hierarchy("h1", &seal))),
            ("/old/tokens/aa".into(), json(&token("aa", "web"))),
            (
                "/old/blobs/config".into(),
                b"trust_domain = \"x\"\n".to_vec(),
            ),
            ("/old/blobs/index/identity-v1".into(), b"1".to_vec()),
        ];
        for (key, value) in &old {
            client.put(key.as_bytes(), value, None).await.unwrap();
        }
        // Refused until upgraded, saying how.
        let e = EtcdStore::open(config(&etcd, "/old/"), &seal)
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::Unauthenticated { records: 4, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("meshca store authenticate"), "{e}");
        // With a seal key that does not open the CA keys, the upgrade is
        // refused before anything is written.
        let e = EtcdStore::authenticate_records(config(&etcd, "/old/"), &seal_key(4))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::SealKeyMismatch { .. }), "{e}");
        assert!(client.get(b"/old/integrity").await.unwrap().is_none());

        let report = EtcdStore::authenticate_records(config(&etcd, "/old/"), &seal)
            .await
            .unwrap();
        let mut done = report.authenticated.clone();
        done.sort();
        let mut expected: Vec<String> = old.iter().map(|(k, _)| k.clone()).collect();
        expected.sort();
        assert_eq!(done, expected, "{report:?}");
        assert!(
            report.refused.is_empty() && report.already == 0,
            "{report:?}"
        );

        // The upgraded store opens and reads as before.
        let store = EtcdStore::open(config(&etcd, "/old/"), &seal)
            .await
            .unwrap();
        assert_eq!(store.list_hierarchies().await.unwrap().len(), 1);
        assert_eq!(store.get_certificate(&c.serial).await.unwrap().name, "web");
        assert_eq!(
            store.get_blob("config").await.unwrap().as_deref(),
            Some(&b"trust_domain = \"x\"\n"[..])
        );
        let now = OffsetDateTime::now_utc();
        assert!(
            store
                .consume_token("aa", &SECRET_HASH, now)
                .await
                .unwrap()
                .is_ok()
        );
        // A record without a MAC written after the upgrade started is
        // refused, and running the upgrade again does not authenticate it.
        client
            .put(b"/old/tokens/bb", &json(&token("bb", "web")), None)
            .await
            .unwrap();
        assert!(
            store
                .consume_token("bb", &SECRET_HASH, now)
                .await
                .unwrap_err()
                .is_tampered()
        );
        let again = EtcdStore::authenticate_records(config(&etcd, "/old/"), &seal)
            .await
            .unwrap();
        assert!(again.authenticated.is_empty(), "{again:?}");
        assert_eq!(again.refused, ["/old/tokens/bb"], "{again:?}");
        assert_eq!(again.already, old.len(), "{again:?}");
        assert!(
            store
                .consume_token("bb", &SECRET_HASH, now)
                .await
                .unwrap_err()
                .is_tampered()
        );
    }
}

/// Records that do not decode although their MAC checks: written by a
/// meshca holding the seal key (an incompatible version, a bug), unlike the
/// forged ones of `tests` above. And event records that do not decode,
/// which anyone with write access can put under the prefix.
#[cfg(test)]
mod corrupt_records {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::CertStatus;
    use futures_util::StreamExt;
    use meshca_pki::{KeyType, Profile};
    use meshca_testkit::EtcdCluster;

    const SECRET_HASH: [u8; 32] = [9; 32];

    async fn open(etcd: &EtcdCluster, prefix: &str) -> EtcdStore {
        let seal = SealKey::from_file_content("24".repeat(32).as_bytes()).unwrap();
        EtcdStore::open(
            EtcdStoreConfig::from_url(&etcd.store_url(prefix)).unwrap(),
            &seal,
        )
        .await
        .unwrap()
    }

    fn raw(etcd: &EtcdCluster) -> Client {
        Client::new(EtcdConfig::new(etcd.endpoints())).unwrap()
    }

    fn cert(name: &str) -> CertificateRecord {
        let now = OffsetDateTime::now_utc();
        CertificateRecord {
            serial: Serial::random().unwrap(),
            namespace: "default".into(),
            name: name.into(),
            profile: Profile::Service,
            spiffe_id: format!("spiffe://cluster.local/ns/default/sa/{name}"),
            dns_names: vec![],
            ip_addresses: vec![],
            key_type: KeyType::EcdsaP256,
            hierarchy_id: "h1".into(),
            issued_at: now,
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            fingerprint: "00".into(),
            status: CertStatus::Active,
            revoked_at: None,
            revocation_reason: None,
            certificate_pem: String::new(),
            renewed_from: None,
        }
    }

    fn token(id: &str) -> TokenRecord {
        let now = OffsetDateTime::now_utc();
        TokenRecord {
            id: id.into(),
            secret_sha256: hex::encode(SECRET_HASH),
            namespace: "default".into(),
            name: "web".into(),
            created_at: now,
            expires_at: now + Duration::from_secs(3600),
            uses_allowed: 1,
            uses: 0,
        }
    }

    /// The key a [`StoreError::Corrupt`] names, or a panic saying what `e` is.
    #[track_caller]
    fn corrupt_key(e: StoreError) -> String {
        let text = e.to_string();
        match e {
            StoreError::Corrupt { key, .. } => {
                assert!(
                    text.contains(&format!("the record {key} in the store does not decode")),
                    "{text}"
                );
                key
            }
            other => panic!("expected a record that does not decode, got: {other}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sealed_record_that_does_not_decode_is_named_and_stops_the_listings_that_meet_it() {
        let etcd = EtcdCluster::start(1);
        let store = open(&etcd, "/sealed/").await;
        let client = raw(&etcd);
        let now = OffsetDateTime::now_utc();
        let (web, db) = (cert("web"), cert("db"));
        store.insert_certificate(&web).await.unwrap();
        store.insert_certificate(&db).await.unwrap();
        store.create_token(&token("aa")).await.unwrap();
        store.create_token(&token("bb")).await.unwrap();

        // A forged record (no MAC) is skipped by a listing...
        let forged = Serial::random().unwrap();
        client
            .put(
                format!("/sealed/certs/{}", forged.to_hex()).as_bytes(),
                b"garbage",
                None,
            )
            .await
            .unwrap();
        let all = store
            .list_certificates(&CertFilter::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 2);

        // ...a record whose MAC checks but that is no record stops it.
        let key = format!("/sealed/certs/{}", web.serial.to_hex());
        let sealed = store.sealed(key.as_bytes(), br#"{"serial": 7}"#);
        client.put(key.as_bytes(), &sealed, None).await.unwrap();
        let e = store.get_certificate(&web.serial).await.unwrap_err();
        assert_eq!(corrupt_key(e), key);
        let e = store
            .list_certificates(&CertFilter::default())
            .await
            .unwrap_err();
        assert_eq!(corrupt_key(e), key);
        let of = |name: &str| CertFilter {
            namespace: Some("default".into()),
            name: Some(name.into()),
            ..CertFilter::default()
        };
        let e = store.list_certificates(&of("web")).await.unwrap_err();
        assert_eq!(corrupt_key(e), key);
        let e = store
            .revoke_certificate(&web.serial, RevocationReason::KeyCompromise, now)
            .await
            .unwrap_err();
        assert_eq!(corrupt_key(e), key);
        let later = now + Duration::from_secs(400 * 86_400);
        let rule = PruneRule {
            expired_before: later,
            superseded_expired_before: later,
        };
        let e = store
            .delete_expired_certificates(&rule, 100)
            .await
            .unwrap_err();
        assert_eq!(corrupt_key(e), key);
        // Nothing was written over it, and the rest reads as before.
        assert_eq!(
            client.get(key.as_bytes()).await.unwrap().unwrap().value,
            sealed
        );
        let listed = store.list_certificates(&of("db")).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].serial, db.serial);

        // A token likewise: its use is an error naming it (no use taken),
        // listings stop at it, deleting it is the way out.
        let key = b"/sealed/tokens/aa".to_vec();
        let sealed = store.sealed(&key, b"[]");
        client.put(&key, &sealed, None).await.unwrap();
        let e = store
            .consume_token("aa", &SECRET_HASH, now)
            .await
            .unwrap_err();
        assert_eq!(corrupt_key(e), "/sealed/tokens/aa");
        assert_eq!(client.get(&key).await.unwrap().unwrap().value, sealed);
        let e = store.list_tokens().await.unwrap_err();
        assert_eq!(corrupt_key(e), "/sealed/tokens/aa");
        assert!(
            store
                .consume_token("bb", &SECRET_HASH, now)
                .await
                .unwrap()
                .is_ok()
        );
        store.delete_token("aa").await.unwrap();
        let ids: Vec<String> = store
            .list_tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["bb"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_records_that_do_not_decode_are_skipped_and_the_feed_goes_on() {
        let etcd = EtcdCluster::start(1);
        let store = open(&etcd, "/ev/").await;
        let client = raw(&etcd);
        let mut feed = store.watch_events(0).await.unwrap();
        // Not JSON; JSON but not a list; a list of what are not events (the
        // store does not look inside an event: the server does).
        client
            .put(b"/ev/events/garbage-1", b"not json", None)
            .await
            .unwrap();
        client
            .put(b"/ev/events/garbage-2", br#"{"kind":"rotate"}"#, None)
            .await
            .unwrap();
        client
            .put(b"/ev/events/garbage-3", br#"[1,"x"]"#, None)
            .await
            .unwrap();
        let id = store.append_event(br#"{"kind":"after"}"#).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            let e = tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .expect("the feed stopped")
                .expect("the feed ended");
            got.push(e);
        }
        let bodies: Vec<&[u8]> = got.iter().map(|e| e.body.as_slice()).collect();
        assert_eq!(bodies, [&b"1"[..], br#""x""#, br#"{"kind":"after"}"#]);
        assert!(got[0].id < got[1].id && got[1].id < got[2].id, "{got:?}");
        assert_eq!(got[2].id, id);
        // A feed started afterwards reads them from the snapshot the same way.
        let mut again = store.watch_events(0).await.unwrap();
        for want in &got {
            let e = tokio::time::timeout(Duration::from_secs(10), again.next())
                .await
                .expect("the feed stopped")
                .expect("the feed ended");
            assert_eq!(&e, want);
        }
    }

    #[test]
    fn an_events_record_that_does_not_decode_holds_no_event() {
        let kv = |value: &[u8]| KeyValue {
            key: b"/p/events/x".to_vec(),
            value: value.to_vec(),
            create_revision: 5,
            mod_revision: 5,
            lease: 0,
        };
        for value in [
            &b"not json"[..],
            b"",
            b"[",
            b"{}",
            b"\"x\"",
            b"7",
            b"\xff\xfe",
        ] {
            assert!(events_of(&kv(value)).is_empty(), "{value:?}");
        }
        let events = events_of(&kv(br#"[{"a":1}, 2]"#));
        assert_eq!(
            events,
            [
                StoredEvent {
                    id: 5 << EVENT_SLOT_BITS,
                    body: br#"{"a":1}"#.to_vec(),
                },
                StoredEvent {
                    id: (5 << EVENT_SLOT_BITS) | 1,
                    body: b"2".to_vec(),
                },
            ]
        );
    }
}
