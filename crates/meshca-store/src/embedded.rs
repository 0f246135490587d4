//! The embedded store: one redb file.
//!
//! redb commits with an fsync and switches to the new B-tree root only after
//! the data is durable (copy-on-write with a double-buffered commit slot), so
//! a crash at any moment leaves either the previous or the new commit, never a
//! torn one, and an issuance is answered only after its record is committed.
//! Records are JSON values in two tables keyed by serial and by hierarchy id.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use meshca_pki::Serial;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::decide;
use crate::events::MemoryLog;
use crate::record::{Expiry, IDENTITY_INDEX_MARKER, identity_key, identity_prefix};
use crate::{
    CertFilter, CertificateRecord, EventFeed, HierarchyRecord, HierarchyStatus, Leadership,
    RevocationReason, RevokeOutcome, Store, StoreError, TokenRecord, TokenRefusal,
};

const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
const HIERARCHIES: TableDefinition<&str, &[u8]> = TableDefinition::new("hierarchies");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// The identity index: `namespace/name/serial` to nothing.
const IDENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("identities");

/// redb's page cache. Its default (1 GiB) kept the whole file in memory: a
/// server that had issued 130,000 certificates held 490 MB. Inserts touch
/// the right edge of the certificates tree (serials are time-ordered) and
/// lookups a few pages, so a small cache costs them nothing measurable.
const CACHE_BYTES: usize = 64 << 20;

/// Most certificate inserts committed together.
const MAX_BATCH: usize = 512;

type InsertReply = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// The embedded store. Cheap to clone; all clones share one database.
///
/// Certificate inserts go through one writer thread that commits whatever
/// has queued up in a single transaction (group commit): each caller is
/// answered after the fsync that made its record durable, and under load one
/// fsync covers many issuances instead of capping throughput at the disk's
/// fsync rate.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    writer: Arc<Writer>,
    events: Arc<MemoryLog>,
    // One process owns the file, so it always leads.
    leader: Arc<tokio::sync::watch::Sender<bool>>,
}

/// The group-commit writer thread. Dropping the last handle closes its queue
/// and waits for it, so the database file is closed when the store is.
struct Writer {
    tx: Option<std::sync::mpsc::SyncSender<(CertificateRecord, InsertReply)>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Creates the database file if it does not exist and opens it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Arc::new(
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(path)
                .map_err(|e| unavailable(path, e))?,
        );
        // Create the tables once so that readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| unavailable(path, e))?;
        txn.open_table(CERTS).map_err(|e| unavailable(path, e))?;
        txn.open_table(HIERARCHIES)
            .map_err(|e| unavailable(path, e))?;
        txn.open_table(TOKENS).map_err(|e| unavailable(path, e))?;
        txn.open_table(BLOBS).map_err(|e| unavailable(path, e))?;
        build_identity_index(&txn).map_err(|e| unavailable(path, e))?;
        txn.commit().map_err(|e| unavailable(path, e))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(4 * MAX_BATCH);
        let (writer_db, writer_path) = (db.clone(), path.to_owned());
        let handle = std::thread::Builder::new()
            .name("meshca-store-writer".into())
            .spawn(move || insert_writer(&writer_db, &writer_path, &rx))
            .map_err(|e| unavailable(path, e))?;
        Ok(EmbeddedStore {
            db,
            path: path.to_owned(),
            writer: Arc::new(Writer {
                tx: Some(tx),
                handle: Some(handle),
            }),
            events: Arc::new(MemoryLog::new()),
            leader: Arc::new(tokio::sync::watch::channel(true).0),
        })
    }

    /// Opens an existing database file; [`StoreError::Unavailable`] when absent.
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Unavailable {
                location: path.display().to_string(),
                reason: "no store file there".into(),
            });
        }
        Self::open(path)
    }

    fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        unavailable(&self.path, e)
    }

    /// Runs a read inline: a redb read transaction is a lock-free snapshot of
    /// memory-mapped pages, microseconds, cheaper than a thread hand-off.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        f(self)
    }

    /// Reads the record under `key`, lets `decide` say what to store instead
    /// (or nothing) and what to answer, and commits, all in one write
    /// transaction: the read-check-write steps of revocation, status changes
    /// and token use cannot interleave with another writer.
    fn modify<T, R>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        decide: impl FnOnce(Option<T>) -> Result<(Option<T>, R), StoreError>,
    ) -> Result<R, StoreError>
    where
        T: Serialize + DeserializeOwned,
    {
        let txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        let answer = {
            let mut t = txn.open_table(table).map_err(|e| self.fail(e))?;
            let current: Option<T> = match t.get(key).map_err(|e| self.fail(e))? {
                Some(v) => Some(decode(key, v.value())?),
                None => None,
            };
            let (new, answer) = decide(current)?;
            match new {
                Some(rec) => {
                    let bytes = encode(key, &rec)?;
                    t.insert(key, bytes.as_slice()).map_err(|e| self.fail(e))?;
                }
                // Nothing changes: drop the transaction without a commit.
                None => return Ok(answer),
            }
            answer
        };
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(answer)
    }

    /// Stores `record` under `key` unless something is there already
    /// ([`StoreError::Conflict`] naming the `kind`).
    fn insert_new<T: Serialize + DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        kind: &'static str,
        key: &str,
        record: T,
    ) -> Result<(), StoreError> {
        self.modify(table, key, |current: Option<T>| {
            decide::insert_new(kind, key, current, record)
        })
    }

    /// Every record of a table, in key order.
    fn scan<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let t = txn.open_table(table).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.fail(e))? {
            let (k, v) = item.map_err(|e| self.fail(e))?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Runs blocking database work (a commit, with its fsync) off the async reactor.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| self.fail(format!("store task failed: {e}")))?
    }
}

/// Indexes every certificate record by identity, once: a store made before
/// the index existed gets it here, in the transaction that opens it.
fn build_identity_index(txn: &redb::WriteTransaction) -> Result<(), String> {
    let mut blobs = txn.open_table(BLOBS).map_err(|e| e.to_string())?;
    if blobs
        .get(IDENTITY_INDEX_MARKER)
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(());
    }
    let certs = txn.open_table(CERTS).map_err(|e| e.to_string())?;
    let mut index = txn.open_table(IDENTITIES).map_err(|e| e.to_string())?;
    for item in certs.iter().map_err(|e| e.to_string())? {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let rec: Expiry = decode(k.value(), v.value()).map_err(|e| e.to_string())?;
        index
            .insert(
                identity_key(&rec.namespace, &rec.name, k.value()).as_str(),
                &[][..],
            )
            .map_err(|e| e.to_string())?;
    }
    blobs
        .insert(IDENTITY_INDEX_MARKER, &b"1"[..])
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The group-commit writer: takes the first queued insert, drains whatever
/// else is queued (up to [`MAX_BATCH`]), commits them in one transaction and
/// answers each. Ends when every store handle is gone.
fn insert_writer(
    db: &Database,
    path: &Path,
    rx: &std::sync::mpsc::Receiver<(CertificateRecord, InsertReply)>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
        let outcome = (|| -> Result<(), StoreError> {
            let txn = db.begin_write().map_err(|e| unavailable(path, e))?;
            {
                let mut t = txn.open_table(CERTS).map_err(|e| unavailable(path, e))?;
                let mut index = txn
                    .open_table(IDENTITIES)
                    .map_err(|e| unavailable(path, e))?;
                for (record, _) in &batch {
                    let key = record.serial.to_hex();
                    if t.get(key.as_str())
                        .map_err(|e| unavailable(path, e))?
                        .is_some()
                    {
                        results.push(Err(StoreError::Conflict(format!(
                            "serial {key} is already recorded"
                        ))));
                        continue;
                    }
                    let bytes = encode(&key, record)?;
                    t.insert(key.as_str(), bytes.as_slice())
                        .map_err(|e| unavailable(path, e))?;
                    index
                        .insert(
                            identity_key(&record.namespace, &record.name, &key).as_str(),
                            &[][..],
                        )
                        .map_err(|e| unavailable(path, e))?;
                    results.push(Ok(()));
                }
            }
            txn.commit().map_err(|e| unavailable(path, e))
        })();
        match outcome {
            Ok(()) => {
                for ((_, reply), result) in batch.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                // Nothing of the batch is stored: every caller hears so.
                for (_, reply) in batch {
                    let _ = reply.send(Err(StoreError::Unavailable {
                        location: path.display().to_string(),
                        reason: e.to_string(),
                    }));
                }
            }
        }
    }
}

fn unavailable(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        location: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create_hierarchy(&self, record: &HierarchyRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.blocking(move |s| s.insert_new(HIERARCHIES, "hierarchy", &record.id.clone(), record))
            .await
    }

    async fn list_hierarchies(&self) -> Result<Vec<HierarchyRecord>, StoreError> {
        self.read(|s| {
            let mut out: Vec<HierarchyRecord> = s.scan(HIERARCHIES)?;
            out.sort_by_key(|h| h.created_at);
            Ok(out)
        })
        .await
    }

    async fn replace_intermediate(
        &self,
        id: &str,
        expected_pem: &str,
        new: crate::IntermediateUpdate,
    ) -> Result<HierarchyRecord, StoreError> {
        let (id, expected) = (id.to_owned(), expected_pem.to_owned());
        self.blocking(move |s| {
            s.modify(HIERARCHIES, &id, |rec: Option<HierarchyRecord>| {
                decide::intermediate_update(&id, rec, &expected, &new)
            })
        })
        .await
    }

    async fn set_hierarchy_status(
        &self,
        id: &str,
        from: HierarchyStatus,
        to: HierarchyStatus,
    ) -> Result<HierarchyRecord, StoreError> {
        let id = id.to_owned();
        self.blocking(move |s| {
            s.modify(HIERARCHIES, &id, |rec: Option<HierarchyRecord>| {
                decide::hierarchy_status(&id, rec, from, to)
            })
        })
        .await
    }

    async fn insert_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inserts = self
            .writer
            .tx
            .clone()
            .ok_or_else(|| self.fail("the store is closing"))?;
        match inserts.try_send((record.clone(), tx)) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(item)) => {
                // The queue is bounded: a full queue waits, off the reactor.
                self.blocking(move |s| {
                    inserts
                        .send(item)
                        .map_err(|_| s.fail("the store writer has stopped"))
                })
                .await?;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(self.fail("the store writer has stopped"));
            }
        }
        rx.await
            .map_err(|_| self.fail("the store writer has stopped"))?
    }

    async fn serial_exists(&self, serial: &Serial) -> Result<bool, StoreError> {
        let key = serial.to_hex();
        self.read(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
            Ok(t.get(key.as_str()).map_err(|e| s.fail(e))?.is_some())
        })
        .await
    }

    async fn get_certificate(&self, serial: &Serial) -> Result<CertificateRecord, StoreError> {
        let key = serial.to_hex();
        self.read(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
            match t.get(key.as_str()).map_err(|e| s.fail(e))? {
                Some(v) => decode(&key, v.value()),
                None => Err(StoreError::NotFound {
                    kind: "certificate",
                    key,
                }),
            }
        })
        .await
    }

    async fn delete_expired_certificates(
        &self,
        expired_before: OffsetDateTime,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.blocking(move |s| {
            // Found in a read snapshot, so that the scan never holds up the
            // insert writer; serials are time-ordered, so the oldest (the
            // expired) come first.
            let mut expired: Vec<(String, String)> = Vec::new();
            {
                let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
                let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
                for item in t.iter().map_err(|e| s.fail(e))? {
                    if expired.len() >= limit {
                        break;
                    }
                    let (k, v) = item.map_err(|e| s.fail(e))?;
                    let rec: Expiry = decode(k.value(), v.value())?;
                    if rec.not_after < expired_before {
                        let indexed = identity_key(&rec.namespace, &rec.name, k.value());
                        expired.push((k.value().to_owned(), indexed));
                    }
                }
            }
            if expired.is_empty() {
                return Ok(0);
            }
            // A record's notAfter never changes, so what the snapshot found
            // expired still is; only records deleted meanwhile are skipped.
            let txn = s.db.begin_write().map_err(|e| s.fail(e))?;
            let mut gone = 0;
            {
                let mut t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
                let mut index = txn.open_table(IDENTITIES).map_err(|e| s.fail(e))?;
                for (key, indexed) in &expired {
                    if t.remove(key.as_str()).map_err(|e| s.fail(e))?.is_some() {
                        gone += 1;
                    }
                    index.remove(indexed.as_str()).map_err(|e| s.fail(e))?;
                }
            }
            txn.commit().map_err(|e| s.fail(e))?;
            Ok(gone)
        })
        .await
    }

    async fn list_certificates(
        &self,
        filter: &CertFilter,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let filter = filter.clone();
        self.blocking(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
            let mut out = Vec::new();
            if let (Some(ns), Some(name)) = (&filter.namespace, &filter.name) {
                // One identity: its keys in the index, not every record.
                let index = txn.open_table(IDENTITIES).map_err(|e| s.fail(e))?;
                let prefix = identity_prefix(ns, name);
                for item in index.range(prefix.as_str()..).map_err(|e| s.fail(e))? {
                    let (k, _) = item.map_err(|e| s.fail(e))?;
                    let Some(serial) = k.value().strip_prefix(prefix.as_str()) else {
                        break;
                    };
                    if let Some(v) = t.get(serial).map_err(|e| s.fail(e))? {
                        let rec: CertificateRecord = decode(serial, v.value())?;
                        if filter.matches(&rec) {
                            out.push(rec);
                        }
                    }
                }
                decide::sort_certificates(&mut out);
                return Ok(out);
            }
            for item in t.iter().map_err(|e| s.fail(e))? {
                let (k, v) = item.map_err(|e| s.fail(e))?;
                let rec: CertificateRecord = decode(k.value(), v.value())?;
                if filter.matches(&rec) {
                    out.push(rec);
                }
            }
            decide::sort_certificates(&mut out);
            Ok(out)
        })
        .await
    }

    async fn create_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.blocking(move |s| s.insert_new(TOKENS, "token", &record.id.clone(), record))
            .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|s| {
            let mut out: Vec<TokenRecord> = s.scan(TOKENS)?;
            out.sort_by_key(|t| t.created_at);
            Ok(out)
        })
        .await
    }

    async fn delete_token(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(|e| s.fail(e))?;
            {
                let mut t = txn.open_table(TOKENS).map_err(|e| s.fail(e))?;
                if t.remove(id.as_str()).map_err(|e| s.fail(e))?.is_none() {
                    return Err(StoreError::NotFound {
                        kind: "token",
                        key: id,
                    });
                }
            }
            txn.commit().map_err(|e| s.fail(e))
        })
        .await
    }

    async fn consume_token(
        &self,
        id: &str,
        secret_sha256: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let id = id.to_owned();
        let hash = *secret_sha256;
        self.blocking(move |s| {
            s.modify(TOKENS, &id, |rec: Option<TokenRecord>| {
                decide::token_use(rec, &hash, now)
            })
        })
        .await
    }

    async fn refund_token(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.blocking(move |s| s.modify(TOKENS, &id, decide::token_refund))
            .await
    }

    async fn revoke_certificate(
        &self,
        serial: &Serial,
        reason: RevocationReason,
        at: OffsetDateTime,
    ) -> Result<RevokeOutcome, StoreError> {
        let key = serial.to_hex();
        self.blocking(move |s| {
            s.modify(CERTS, &key, |rec: Option<CertificateRecord>| {
                decide::revocation(&key, rec, reason, at)
            })
        })
        .await
    }

    async fn append_event(&self, body: &[u8]) -> Result<u64, StoreError> {
        Ok(self.events.append(body))
    }

    async fn watch_events(&self, after: u64) -> Result<EventFeed, StoreError> {
        Ok(self.events.feed(after))
    }

    async fn campaign(&self, _candidate: &str) -> Result<Leadership, StoreError> {
        Ok(self.leader.subscribe())
    }

    async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let name = name.to_owned();
        self.read(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(BLOBS).map_err(|e| s.fail(e))?;
            Ok(t.get(name.as_str())
                .map_err(|e| s.fail(e))?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn put_blob(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let (name, value) = (name.to_owned(), value.to_vec());
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(|e| s.fail(e))?;
            {
                let mut t = txn.open_table(BLOBS).map_err(|e| s.fail(e))?;
                t.insert(name.as_str(), value.as_slice())
                    .map_err(|e| s.fail(e))?;
            }
            txn.commit().map_err(|e| s.fail(e))
        })
        .await
    }

    async fn list_blobs(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = prefix.to_owned();
        self.read(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(BLOBS).map_err(|e| s.fail(e))?;
            let mut out = Vec::new();
            for item in t.range(prefix.as_str()..).map_err(|e| s.fail(e))? {
                let (k, v) = item.map_err(|e| s.fail(e))?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.read(|s| s.db.begin_read().map(|_| ()).map_err(|e| s.fail(e)))
            .await
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}
