//! The etcd store: every record under one key prefix, shared by replicas.
//!
//! Key layout (`P` is the prefix, `/meshca/` by default):
//!
//! | key | value |
//! | --- | --- |
//! | `P` `certs/<serial hex>` | certificate record (JSON) |
//! | `P` `ids/<namespace>/<name>/<serial hex>` | empty: the identity index |
//! | `P` `hierarchies/<id>` | hierarchy record (JSON; CA keys sealed) |
//! | `P` `tokens/<id>` | join token record (JSON; secret hashed) |
//! | `P` `blobs/<name>` | named CA state (the shared `meshca.toml`, ...) |
//! | `P` `events/<random>` | the events of one transaction (JSON array), on a lease: the retention |
//! | `P` `leader` | the leading replica's name, on its lease |
//!
//! Every read-check-write is a compare-and-swap on the key's `mod_revision`
//! (retried when another replica got there first), so a token is consumed
//! once and a status changes once, whichever replicas race. Inserts are
//! "create if absent" transactions. An event's id is the etcd revision that
//! wrote it, which grows across the whole cluster.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meshca_etcd::{Client, Compare, EtcdConfig, EtcdError, KeyValue, Op, Txn};
use meshca_pki::Serial;
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::decide::{self, Decision};
use crate::record::{Expiry, IDENTITY_INDEX_MARKER, identity_key, identity_prefix};
use crate::{
    CertFilter, CertificateRecord, EventFeed, HierarchyRecord, HierarchyStatus, Leadership,
    RevocationReason, RevokeOutcome, Store, StoreError, StoredEvent, TokenRecord, TokenRefusal,
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

/// The etcd store. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    location: String,
    lease_ttl: Duration,
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

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        reason: e.to_string(),
    })
}

impl EtcdStore {
    /// A store on the etcd cluster of `config`. Contacts etcd once, so that
    /// a wrong address or credentials fail here with a clear error.
    pub async fn open(config: EtcdStoreConfig) -> Result<Self, StoreError> {
        let location = format!(
            "etcd://{}{}",
            config.etcd.endpoints.join(","),
            config.prefix
        );
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
        let store = EtcdStore {
            client,
            prefix: config.prefix,
            location,
            lease_ttl: config.lease_ttl,
            event_lease: Arc::new(Mutex::new(None)),
            writes,
        };
        store.check().await?;
        store.build_identity_index().await?;
        Ok(store)
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
            keys.push(self.index_key_of(kv, &decode(kv)?));
        }
        for batch in keys.chunks(OPS_PER_TXN) {
            let txn = batch
                .iter()
                .fold(Txn::new(), |txn, key| txn.then(Op::put(key, b"", None)));
            self.client.txn(&txn).await.map_err(|e| self.fail(e))?;
        }
        self.client
            .put(&marker, b"1", None)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
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
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    async fn scan<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<T>, StoreError> {
        self.client
            .get_prefix(&self.dir(kind))
            .await
            .map_err(|e| self.fail(e))?
            .iter()
            .map(decode)
            .collect()
    }

    /// Read, decide, and write only if nobody wrote in between (else again).
    async fn modify<T, R>(
        &self,
        key: &[u8],
        decide: impl Fn(Option<T>) -> Decision<T, R>,
    ) -> Result<R, StoreError>
    where
        T: Serialize + DeserializeOwned,
    {
        let name = String::from_utf8_lossy(key).into_owned();
        for _ in 0..CAS_TRIES {
            let kv = self.client.get(key).await.map_err(|e| self.fail(e))?;
            let (current, revision) = match &kv {
                Some(kv) => (Some(decode(kv)?), kv.mod_revision),
                None => (None, 0),
            };
            let (new, answer) = decide(current)?;
            let Some(new) = new else {
                return Ok(answer);
            };
            let txn = Txn::new()
                .when(Compare::mod_revision_is(key, revision))
                .then(Op::put(key, &encode(&name, &new)?, None));
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
        let txn =
            Txn::new()
                .when(Compare::absent(&key))
                .then(Op::put(&key, &encode(id, record)?, None));
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
        if let Ok(guard) = self.event_lease.lock() {
            if let Some((id, at)) = *guard {
                if at.elapsed() < EVENT_RETENTION {
                    return Ok(id);
                }
            }
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
        let (reply, answer) = tokio::sync::oneshot::channel();
        let write = Write::Create {
            key: self.key("certs", &serial),
            value: encode(&serial, record)?,
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
        expired_before: OffsetDateTime,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut expired = Vec::new();
        for kv in self
            .client
            .get_prefix(&self.dir("certs"))
            .await
            .map_err(|e| self.fail(e))?
        {
            if expired.len() >= limit {
                break;
            }
            let rec: Expiry = decode(&kv)?;
            if rec.not_after < expired_before {
                let indexed = self.index_key_of(&kv, &rec);
                expired.push((kv.key, indexed));
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
            // batch, not per certificate.
            let mut out = Vec::new();
            for batch in keys.chunks(OPS_PER_TXN) {
                let txn = batch
                    .iter()
                    .fold(Txn::new(), |txn, key| txn.then(Op::get(key)));
                let r = self.client.txn(&txn).await.map_err(|e| self.fail(e))?;
                for kv in r.ranges.iter().flatten() {
                    let rec: CertificateRecord = decode(kv)?;
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

    async fn create_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        self.insert_new("tokens", &record.id, record).await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out: Vec<TokenRecord> = self.scan("tokens").await?;
        out.sort_by_key(|t| t.created_at);
        Ok(out)
    }

    async fn delete_token(&self, id: &str) -> Result<(), StoreError> {
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
        Ok(self
            .client
            .get(&self.key("blobs", name))
            .await
            .map_err(|e| self.fail(e))?
            .map(|kv| kv.value))
    }

    async fn put_blob(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.client
            .put(&self.key("blobs", name), value, None)
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
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let name = String::from_utf8(kv.key.get(dir.len()..)?.to_vec()).ok()?;
                Some((name, kv.value))
            })
            .collect())
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
