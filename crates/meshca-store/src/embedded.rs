//! The embedded store: one redb file.
//!
//! redb commits with an fsync and switches to the new B-tree root only after
//! the data is durable (copy-on-write with a double-buffered commit slot), so
//! a crash at any moment leaves either the previous or the new commit, never a
//! torn one, and an issuance is answered only after its record is committed.
//! Records are JSON values in two tables keyed by serial and by hierarchy id.
//!
//! Certificate inserts are made durable by the store's journal
//! ([`crate::journal`]: one append and one `fdatasync` per group of
//! inserts) and reach redb in large checkpoints; until then they are read
//! from memory, and scans and changes of certificate records wait for the
//! checkpoint of everything answered before them.

use std::collections::HashSet;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use async_trait::async_trait;
use meshca_pki::Serial;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::decide;
use crate::events::MemoryLog;
use crate::journal::{self, Entry, Files, Pending, Shared};
use crate::record::{Expiry, IDENTITY_INDEX_MARKER, identity_key, identity_prefix};
use crate::{
    CertFilter, CertPage, CertificateRecord, EventFeed, HierarchyRecord, HierarchyStatus,
    Leadership, PruneRule, RevocationReason, RevokeOutcome, Store, StoreError, TokenRecord,
    TokenRefusal,
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

/// Most records answered and not yet checkpointed. Past it (checkpoints
/// keep failing: redb's disk full, say) inserts are refused with the reason,
/// instead of memory and the journal growing without bound.
const MAX_PENDING: usize = 65_536;

/// The blob that holds the highest journal seq in redb (8 bytes, LE).
const CHECKPOINT_BLOB: &str = "journal/checkpointed";

type InsertReply = tokio::sync::oneshot::Sender<Result<(), StoreError>>;
/// A record on its way to the writer: encoded by the caller, so that the
/// one writer thread only checks, appends and syncs.
type Insert = (Entry, InsertReply);

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
    journal: Arc<Journal>,
    events: Arc<MemoryLog>,
    // One process owns the file, so it always leads.
    leader: Arc<tokio::sync::watch::Sender<bool>>,
}

/// The group-commit writer and the checkpointer threads. Dropping the last
/// handle closes the writer's queue, waits for it, lets the checkpointer
/// move what is left into redb and removes the journal files, so the
/// database file alone holds everything once the store is closed.
struct Writer {
    tx: Option<std::sync::mpsc::SyncSender<Insert>>,
    handle: Option<std::thread::JoinHandle<Files>>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    journal: Arc<Journal>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        let files = self.handle.take().and_then(|h| h.join().ok());
        self.journal.lock().closing = true;
        self.journal.wake.notify_all();
        if let Some(h) = self.checkpointer.take() {
            let _ = h.join();
        }
        if let Some(files) = files
            && self.journal.lock().queue.is_empty()
            && let Err(e) = files.remove()
        {
            tracing::warn!("could not remove the store's journal files: {e}");
        }
    }
}

/// What the writer, the checkpointer and readers of the store share about
/// records answered but not yet checkpointed.
#[derive(Debug)]
struct Journal {
    shared: Mutex<Shared>,
    /// Wakes the checkpointer.
    wake: Condvar,
    /// The highest seq answered.
    acked: AtomicU64,
    /// Where the checkpoints are.
    state: tokio::sync::watch::Sender<Checkpoints>,
}

#[derive(Debug, Clone, Default)]
struct Checkpoints {
    /// The highest seq in redb.
    seq: u64,
    /// How many checkpoints failed, and the last reason.
    failures: u64,
    last_error: String,
}

impl Journal {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record under `key` if it is answered but not yet in redb.
    fn pending(&self, key: &str) -> Option<Arc<Pending>> {
        self.lock().by_key.get(key).cloned()
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
        let (files, frames) = Files::open(path).map_err(|e| unavailable(path, e))?;
        let next_seq = replay_journal(&db, path, &frames)?;
        drop(frames);
        let journal = Arc::new(Journal {
            shared: Mutex::new(Shared::default()),
            wake: Condvar::new(),
            acked: AtomicU64::new(next_seq - 1),
            state: tokio::sync::watch::channel(Checkpoints {
                seq: next_seq - 1,
                ..Checkpoints::default()
            })
            .0,
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(4 * MAX_BATCH);
        let (writer_db, writer_path, writer_journal) =
            (db.clone(), path.to_owned(), journal.clone());
        let handle = std::thread::Builder::new()
            .name("meshca-store-writer".into())
            .spawn(move || {
                insert_writer(
                    &writer_db,
                    &writer_path,
                    &rx,
                    &writer_journal,
                    files,
                    next_seq,
                )
            })
            .map_err(|e| unavailable(path, e))?;
        let (ck_db, ck_path, ck_journal) = (db.clone(), path.to_owned(), journal.clone());
        let checkpointer = std::thread::Builder::new()
            .name("meshca-store-checkpoint".into())
            .spawn(move || checkpointer(&ck_db, &ck_path, &ck_journal))
            .map_err(|e| unavailable(path, e))?;
        Ok(EmbeddedStore {
            db,
            path: path.to_owned(),
            writer: Arc::new(Writer {
                tx: Some(tx),
                handle: Some(handle),
                checkpointer: Some(checkpointer),
                journal: journal.clone(),
            }),
            journal,
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

    /// Waits until every certificate insert answered before the call is in
    /// redb: scans and changes of certificate records go through redb only.
    async fn settle(&self) -> Result<(), StoreError> {
        let target = self.journal.acked.load(Ordering::Acquire);
        let mut rx = self.journal.state.subscribe();
        let failures = {
            let now = rx.borrow_and_update();
            if now.seq >= target {
                return Ok(());
            }
            now.failures
        };
        self.journal.lock().asked = true;
        self.journal.wake.notify_all();
        loop {
            if rx.changed().await.is_err() {
                return Err(self.fail("the store is closing"));
            }
            let now = rx.borrow_and_update();
            if now.seq >= target {
                return Ok(());
            }
            if now.failures > failures {
                return Err(self.fail(format!(
                    "records could not be moved from the journal: {}",
                    now.last_error
                )));
            }
        }
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

/// Moves into redb every journal frame that a checkpoint has not: what was
/// answered before a crash. Returns the first seq the writer may use.
fn replay_journal(db: &Database, path: &Path, frames: &[(u64, Entry)]) -> Result<u64, StoreError> {
    let checkpointed = {
        let txn = db.begin_read().map_err(|e| unavailable(path, e))?;
        let blobs = txn.open_table(BLOBS).map_err(|e| unavailable(path, e))?;
        blobs
            .get(CHECKPOINT_BLOB)
            .map_err(|e| unavailable(path, e))?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(0, u64::from_le_bytes)
    };
    let highest = frames.last().map_or(0, |(seq, _)| *seq).max(checkpointed);
    let todo: Vec<&Entry> = frames
        .iter()
        .filter(|(seq, _)| *seq > checkpointed)
        .map(|(seq, e)| check_entry(path, *seq, e).map(|()| e))
        .collect::<Result<_, _>>()?;
    if !todo.is_empty() {
        let txn = db.begin_write().map_err(|e| unavailable(path, e))?;
        let added =
            write_entries(&txn, todo.iter().copied(), highest).map_err(|e| unavailable(path, e))?;
        txn.commit().map_err(|e| unavailable(path, e))?;
        tracing::info!(
            store = %path.display(),
            "{added} certificate record(s) recovered from the journal"
        );
    }
    // A frame of a group that was never answered may lie on disk behind a
    // torn one, unread: the writer starts above any seq it could have, so
    // that such a frame is never read back after newer ones.
    Ok(highest + MAX_BATCH as u64 + 1)
}

/// A frame whose checksum holds but whose record does not decode, or is
/// filed under another key, was not written by this meshca: the store is
/// not opened (it may hold an answered issuance), and the error says where.
fn check_entry(path: &Path, seq: u64, e: &Entry) -> Result<(), StoreError> {
    let wrong = |reason: String| StoreError::Corrupt {
        key: format!(
            "{} (journal frame {seq} of {}.journal-0/-1)",
            e.key,
            path.display()
        ),
        reason: format!("{reason}; move the journal files away to open the store without them"),
    };
    let rec: CertificateRecord = serde_json::from_slice(&e.value)
        .map_err(|err| wrong(format!("not a certificate record: {err}")))?;
    let key = rec.serial.to_hex();
    if e.key != key || e.index_key != identity_key(&rec.namespace, &rec.name, &key) {
        return Err(wrong(format!(
            "filed under {:?} and {:?}, not under its serial {key} and identity {}/{}",
            e.key, e.index_key, rec.namespace, rec.name
        )));
    }
    Ok(())
}

/// Inserts journal entries that redb does not hold yet (with their index
/// keys) and records `through` as checkpointed, in `txn`. Returns how many
/// were new.
fn write_entries<'a>(
    txn: &redb::WriteTransaction,
    entries: impl Iterator<Item = &'a Entry>,
    through: u64,
) -> Result<usize, redb::Error> {
    let mut added = 0;
    {
        let mut t = txn.open_table(CERTS)?;
        let mut index = txn.open_table(IDENTITIES)?;
        for e in entries {
            if t.get(e.key.as_str())?.is_some() {
                continue;
            }
            t.insert(e.key.as_str(), e.value.as_slice())?;
            index.insert(e.index_key.as_str(), &[][..])?;
            added += 1;
        }
        let mut blobs = txn.open_table(BLOBS)?;
        blobs.insert(CHECKPOINT_BLOB, &through.to_le_bytes()[..])?;
    }
    Ok(added)
}

/// The group-commit writer: takes the first queued insert, drains whatever
/// else is queued (up to [`MAX_BATCH`]), appends them to the journal with
/// one sync and answers each. Ends when every store handle is gone, giving
/// back the journal files.
fn insert_writer(
    db: &Database,
    path: &Path,
    rx: &std::sync::mpsc::Receiver<Insert>,
    journal: &Journal,
    mut files: Files,
    mut next_seq: u64,
) -> Files {
    let mut frames = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        frames.clear();
        let (entries, replies): (Vec<Entry>, Vec<InsertReply>) = batch.into_iter().unzip();
        let backlog = journal.lock().queue.len();
        let taken = if backlog >= MAX_PENDING {
            let why = journal.state.borrow().last_error.clone();
            Err(unavailable(
                path,
                format!("{backlog} records wait for a checkpoint that keeps failing ({why})"),
            ))
        } else {
            taken_keys(db, path, journal, &entries)
        };
        match taken {
            Err(e) => results.extend(entries.iter().map(|_| Err(e.clone()))),
            Ok(taken) => {
                for (entry, taken) in entries.into_iter().zip(taken) {
                    if taken {
                        results.push(Err(StoreError::Conflict(format!(
                            "serial {} is already recorded",
                            entry.key
                        ))));
                        continue;
                    }
                    if journal::encode_frame(&mut frames, next_seq, &entry).is_none() {
                        results.push(Err(StoreError::Corrupt {
                            key: entry.key,
                            reason: "the record is too large for the journal".into(),
                        }));
                        continue;
                    }
                    pending.push(Pending {
                        seq: next_seq,
                        entry,
                    });
                    next_seq += 1;
                    results.push(Ok(()));
                }
            }
        }
        if let Some(last) = pending.last().map(|p| p.seq) {
            let checkpointed = journal.state.borrow().seq;
            match files.append(&frames, last, checkpointed) {
                Ok(()) => {
                    let mut shared = journal.lock();
                    for p in pending {
                        let p = Arc::new(p);
                        shared.by_key.insert(p.entry.key.clone(), p.clone());
                        shared.queue.push(p);
                    }
                    journal.acked.store(last, Ordering::Release);
                    if shared.queue.len() >= journal::CHECKPOINT_RECORDS {
                        journal.wake.notify_all();
                    }
                }
                Err(e) => {
                    // Nothing of the group counts as stored: every caller hears so.
                    let err = unavailable(path, format!("the journal could not be written: {e}"));
                    for r in results.iter_mut().filter(|r| r.is_ok()) {
                        *r = Err(err.clone());
                    }
                }
            }
        }
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
    files
}

/// For each of `entries`, whether its key is already recorded: answered and
/// waiting for a checkpoint, in redb, or earlier in the same list.
fn taken_keys(
    db: &Database,
    path: &Path,
    journal: &Journal,
    entries: &[Entry],
) -> Result<Vec<bool>, StoreError> {
    let keys = entries.iter().map(|e| e.key.as_str());
    let mut seen = HashSet::with_capacity(entries.len());
    let mut taken: Vec<bool> = {
        // Looked up before the redb snapshot is taken: a record leaves the
        // memory only once its checkpoint is committed, so it is in one or
        // the other.
        let shared = journal.lock();
        keys.clone()
            .map(|k| shared.by_key.contains_key(k) || !seen.insert(k))
            .collect()
    };
    let txn = db.begin_read().map_err(|e| unavailable(path, e))?;
    let t = txn.open_table(CERTS).map_err(|e| unavailable(path, e))?;
    for (k, taken) in keys.zip(taken.iter_mut()) {
        if !*taken && t.get(k).map_err(|e| unavailable(path, e))?.is_some() {
            *taken = true;
        }
    }
    Ok(taken)
}

/// Moves answered records from memory into redb: when
/// [`journal::CHECKPOINT_RECORDS`] wait, when someone asks
/// ([`EmbeddedStore::settle`]), when the oldest has waited about
/// [`journal::CHECKPOINT_EVERY`], and a last time when the store closes.
fn checkpointer(db: &Database, path: &Path, journal: &Journal) {
    loop {
        let batch: Vec<Arc<Pending>> = {
            let mut shared = journal.lock();
            loop {
                if shared.queue.is_empty() {
                    if shared.closing {
                        return;
                    }
                    shared.asked = false;
                    shared = journal.wake.wait(shared).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                if shared.queue.len() >= journal::CHECKPOINT_RECORDS
                    || shared.asked
                    || shared.closing
                {
                    break;
                }
                let (s, waited) = journal
                    .wake
                    .wait_timeout(shared, journal::CHECKPOINT_EVERY)
                    .unwrap_or_else(|e| e.into_inner());
                shared = s;
                if waited.timed_out() {
                    break;
                }
            }
            shared.asked = false;
            shared.queue.clone()
        };
        let Some(through) = batch.last().map(|p| p.seq) else {
            continue;
        };
        let outcome = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            write_entries(&txn, batch.iter().map(|p| &p.entry), through)?;
            txn.commit()?;
            Ok(())
        })();
        match outcome {
            Ok(()) => {
                let mut shared = journal.lock();
                for p in &batch {
                    if shared
                        .by_key
                        .get(&p.entry.key)
                        .is_some_and(|q| Arc::ptr_eq(p, q))
                    {
                        shared.by_key.remove(&p.entry.key);
                    }
                }
                shared.queue.drain(..batch.len());
                drop(shared);
                journal.state.send_modify(|s| s.seq = through);
            }
            Err(e) => {
                // The records stay in memory and in the journal; try again.
                tracing::warn!(store = %path.display(), "checkpoint failed, retrying: {e}");
                journal.state.send_modify(|s| {
                    s.failures += 1;
                    s.last_error = e.to_string();
                });
                if journal.lock().closing {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
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
        let key = record.serial.to_hex();
        let entry = Entry {
            index_key: identity_key(&record.namespace, &record.name, &key),
            value: encode(&key, record)?,
            key,
        };
        let inserts = self
            .writer
            .tx
            .clone()
            .ok_or_else(|| self.fail("the store is closing"))?;
        match inserts.try_send((entry, tx)) {
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
        // In memory first: a record leaves it only once it is in redb.
        if self.journal.pending(&key).is_some() {
            return Ok(true);
        }
        self.read(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
            Ok(t.get(key.as_str()).map_err(|e| s.fail(e))?.is_some())
        })
        .await
    }

    async fn get_certificate(&self, serial: &Serial) -> Result<CertificateRecord, StoreError> {
        let key = serial.to_hex();
        if let Some(p) = self.journal.pending(&key) {
            return decode(&key, &p.entry.value);
        }
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
        rule: &PruneRule,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let rule = *rule;
        self.settle().await?;
        self.blocking(move |s| {
            // Found in a read snapshot, so that the scan never holds up the
            // insert writer; serials are time-ordered, so the oldest (the
            // expired) come first.
            let mut expired: Vec<(String, String)> = Vec::new();
            {
                let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
                let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
                let index = txn.open_table(IDENTITIES).map_err(|e| s.fail(e))?;
                for item in t.iter().map_err(|e| s.fail(e))? {
                    if expired.len() >= limit {
                        break;
                    }
                    let (k, v) = item.map_err(|e| s.fail(e))?;
                    let rec: Expiry = decode(k.value(), v.value())?;
                    let indexed = identity_key(&rec.namespace, &rec.name, k.value());
                    let (if_newest, if_superseded) = (
                        rule.deletes(rec.not_after, false),
                        rule.deletes(rec.not_after, true),
                    );
                    let delete = if if_newest == if_superseded {
                        if_newest
                    } else {
                        // Superseded: the identity has a newer record, i.e.
                        // a key after this one under its prefix in the
                        // index (one lookup, not a first pass over the
                        // store, so the scan still stops at `limit`). The
                        // index is in this snapshot, and every record is
                        // in it: inserts and deletions write both.
                        let prefix = identity_prefix(&rec.namespace, &rec.name);
                        let mut later = index
                            .range::<&str>((Bound::Excluded(indexed.as_str()), Bound::Unbounded))
                            .map_err(|e| s.fail(e))?;
                        let superseded = match later.next() {
                            Some(item) => {
                                let (next, _) = item.map_err(|e| s.fail(e))?;
                                next.value().starts_with(prefix.as_str())
                            }
                            None => false,
                        };
                        rule.deletes(rec.not_after, superseded)
                    };
                    if delete {
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
        self.settle().await?;
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

    async fn list_certificates_page(
        &self,
        filter: &CertFilter,
        after: Option<&Serial>,
        limit: usize,
    ) -> Result<CertPage, StoreError> {
        let filter = filter.clone();
        let after = after.map(Serial::to_hex);
        let limit = limit.max(1);
        self.settle().await?;
        self.blocking(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
            let mut page = CertPage {
                records: Vec::new(),
                next: None,
            };
            // The last serial returned once the page is full.
            let mut full: Option<Serial> = None;
            if let (Some(ns), Some(name)) = (&filter.namespace, &filter.name) {
                // One identity: its keys in the index, not every record.
                // They are the identity's prefix and the serial key, so
                // within the prefix they are in serial key order too.
                let index = txn.open_table(IDENTITIES).map_err(|e| s.fail(e))?;
                let prefix = identity_prefix(ns, name);
                let cursor = after.as_deref().map(|k| identity_key(ns, name, k));
                let from = match &cursor {
                    Some(k) => Bound::Excluded(k.as_str()),
                    None => Bound::Included(prefix.as_str()),
                };
                let mut keys = index
                    .range::<&str>((from, Bound::Unbounded))
                    .map_err(|e| s.fail(e))?;
                for item in keys.by_ref() {
                    let (k, _) = item.map_err(|e| s.fail(e))?;
                    let Some(serial) = k.value().strip_prefix(prefix.as_str()) else {
                        break;
                    };
                    let Some(v) = t.get(serial).map_err(|e| s.fail(e))? else {
                        continue;
                    };
                    let rec: CertificateRecord = decode(serial, v.value())?;
                    if filter.matches(&rec) {
                        let last = rec.serial.clone();
                        page.records.push(rec);
                        if page.records.len() >= limit {
                            full = Some(last);
                            break;
                        }
                    }
                }
                // More may follow when the identity has another key.
                if let Some(last) = full {
                    let more = match keys.next() {
                        Some(Ok((k, _))) => k.value().starts_with(prefix.as_str()),
                        Some(Err(_)) => true,
                        None => false,
                    };
                    if more {
                        page.next = Some(last);
                    }
                }
                return Ok(page);
            }
            let from = match &after {
                Some(k) => Bound::Excluded(k.as_str()),
                None => Bound::Unbounded,
            };
            let mut items = t
                .range::<&str>((from, Bound::Unbounded))
                .map_err(|e| s.fail(e))?;
            for item in items.by_ref() {
                let (k, v) = item.map_err(|e| s.fail(e))?;
                let rec: CertificateRecord = decode(k.value(), v.value())?;
                if filter.matches(&rec) {
                    let last = rec.serial.clone();
                    page.records.push(rec);
                    if page.records.len() >= limit {
                        full = Some(last);
                        break;
                    }
                }
            }
            // More may follow when any record does (whether it matches is
            // the next page's to find out).
            if let Some(last) = full
                && items.next().is_some()
            {
                page.next = Some(last);
            }
            Ok(page)
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
        // Decided first in a read snapshot (lock-free): an unknown token, a
        // wrong secret, one expired or used up is refused without taking the
        // write lock that issuance needs. A use that passes is decided again
        // in the write transaction, where it is atomic.
        let key = id.clone();
        let precheck = self
            .read(move |s| {
                let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
                let t = txn.open_table(TOKENS).map_err(|e| s.fail(e))?;
                let current: Option<TokenRecord> =
                    match t.get(key.as_str()).map_err(|e| s.fail(e))? {
                        Some(v) => Some(decode(&key, v.value())?),
                        None => None,
                    };
                Ok(decide::token_use(current, &hash, now)?.1)
            })
            .await?;
        if let Err(refusal) = precheck {
            return Ok(Err(refusal));
        }
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
        self.settle().await?;
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

    fn event_floor(&self) -> u64 {
        self.events.floor()
    }

    fn appends_events_in_memory(&self) -> bool {
        true
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn journal_with(dir: &Path, entry: &Entry) -> PathBuf {
        let path = dir.join("store.redb");
        drop(EmbeddedStore::open(&path).unwrap());
        let mut frames = Vec::new();
        journal::encode_frame(&mut frames, 1, entry).unwrap();
        std::fs::write(dir.join("store.redb.journal-0"), frames).unwrap();
        path
    }

    #[test]
    fn a_frame_that_checks_but_is_no_record_of_its_key_stops_the_opening() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = Entry {
            key: "00ab".into(),
            index_key: "default/web/00ab".into(),
            value: br#"{"not": "a record"}"#.to_vec(),
        };
        let path = journal_with(dir.path(), &garbage);
        let e = EmbeddedStore::open(&path).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{msg}");
        assert!(
            msg.contains("journal frame 1") && msg.contains("store.redb.journal-0"),
            "{msg}"
        );
        assert!(msg.contains("not a certificate record"), "{msg}");
        // Nothing was written: the journal is still there, and redb holds nothing.
        assert!(dir.path().join("store.redb.journal-0").exists());
        std::fs::remove_file(dir.path().join("store.redb.journal-0")).unwrap();
        let store = EmbeddedStore::open(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(
            rt.block_on(store.list_certificates(&CertFilter::default()))
                .unwrap()
                .is_empty()
        );
    }

    fn record(serial: &str) -> CertificateRecord {
        let now = OffsetDateTime::now_utc();
        CertificateRecord {
            serial: serial.parse().unwrap(),
            namespace: "default".into(),
            name: "web".into(),
            profile: meshca_pki::Profile::Service,
            spiffe_id: "spiffe://cluster.local/ns/default/sa/web".into(),
            dns_names: vec!["web".into()],
            ip_addresses: vec![],
            key_type: meshca_pki::KeyType::EcdsaP256,
            hierarchy_id: "h1".into(),
            issued_at: now,
            not_before: now,
            not_after: now + time::Duration::hours(1),
            fingerprint: "00".into(),
            status: crate::CertStatus::Active,
            revoked_at: None,
            revocation_reason: None,
            certificate_pem: String::new(),
            renewed_from: None,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Puts `MAX_PENDING` records (that are nowhere else) in the checkpoint
    /// queue, after what is there, until [`drop_backlog`]: an idle
    /// checkpointer sleeps until the writer wakes it, which a refused group
    /// never does, and one whose checkpoints fail cannot drain it.
    fn put_backlog(store: &EmbeddedStore) {
        let mut shared = store.journal.lock();
        for seq in 0..MAX_PENDING as u64 {
            shared.queue.push(Arc::new(Pending {
                seq,
                entry: Entry {
                    key: format!("{seq:x}"),
                    index_key: String::new(),
                    value: Vec::new(),
                },
            }));
        }
    }

    fn drop_backlog(store: &EmbeddedStore) {
        let mut shared = store.journal.lock();
        let real = shared.queue.len() - MAX_PENDING;
        shared.queue.truncate(real);
    }

    /// Too many records waiting for a checkpoint (a backlog put in place)
    /// stop new inserts, and say so; once the backlog drains, inserts are
    /// taken again. (The reason quoted from a checkpoint that really failed
    /// is asserted by `a_checkpoint_that_fails_on_disk_...`.)
    #[test]
    fn inserts_are_refused_while_too_many_records_wait_for_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let rt = runtime();
        put_backlog(&store);
        let e = rt
            .block_on(store.insert_certificate(&record("01aa")))
            .unwrap_err();
        let msg = e.to_string();
        assert!(e.is_unavailable(), "{msg}");
        assert!(
            msg.contains("65536 records wait for a checkpoint that keeps failing"),
            "{msg}"
        );
        assert!(
            !rt.block_on(store.serial_exists(&"01aa".parse().unwrap()))
                .unwrap()
        );
        drop_backlog(&store);
        rt.block_on(store.insert_certificate(&record("01aa")))
            .unwrap();
        assert!(
            rt.block_on(store.serial_exists(&"01aa".parse().unwrap()))
                .unwrap()
        );
    }

    /// This process's soft limit on the size of the files it writes
    /// (RLIMIT_FSIZE), set and read with util-linux's `prlimit`: `0` makes
    /// every write to a regular file fail with EFBIG, for root too (a
    /// full disk, to the writer), once SIGXFSZ is ignored.
    fn file_size_limit(set: Option<&str>) -> String {
        let pid = format!("--pid={}", std::process::id());
        let args: Vec<String> = match set {
            Some(limit) => vec![pid, format!("--fsize={limit}:")],
            None => vec![
                pid,
                "--fsize".into(),
                "--output=SOFT".into(),
                "--noheadings".into(),
                "--raw".into(),
            ],
        };
        let out = std::process::Command::new("prlimit")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run prlimit (util-linux): {e}"));
        assert!(
            out.status.success(),
            "prlimit {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A checkpoint that really fails: redb's commit cannot write its file
    /// (no file may grow, RLIMIT_FSIZE 0, set on this process between the
    /// inserts and the checkpoint). The limit is the process's, so the test
    /// runs in a child process of its own: this test binary again, for this
    /// test only, with SIGXFSZ ignored.
    ///
    /// What the store does: it says why (the OS's error) to whoever waits
    /// for the checkpoint, and refuses inserts with that reason once too many
    /// wait; it keeps serving the answered records from memory and keeps them
    /// in its journal. A failed write latches redb (every later operation is
    /// "Previous I/O error ... close and re-open the database"), so the
    /// checkpoints keep failing, and saying so, until the store is reopened,
    /// even once the disk takes writes again; reopened, it has every record,
    /// and checkpoints and closes as usual.
    #[test]
    fn a_checkpoint_that_fails_on_disk_keeps_every_record_and_says_why() {
        const CHILD: &str = "MESHCA_STORE_CHECKPOINT_CHILD";
        let name = "a_checkpoint_that_fails_on_disk_keeps_every_record_and_says_why";
        if std::env::var_os(CHILD).is_none() {
            let path = module_path!()
                .split_once("::")
                .map_or(module_path!(), |(_, p)| p);
            let test = format!("{path}::{name}");
            let out = std::process::Command::new("sh")
                .args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\""])
                .arg(std::env::current_exe().unwrap())
                .args([test.as_str(), "--exact", "--test-threads", "1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("test result: ok. 1 passed"),
                "the child running {test}: {:?}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let journal_files = journal::paths(&path);
        let all = CertFilter::default();
        let rt = runtime();
        let store = EmbeddedStore::open(&path).unwrap();
        // One record checkpointed, in redb before the failure; two answered
        // (synced to the journal) and waiting for their checkpoint.
        rt.block_on(store.insert_certificate(&record("01aa")))
            .unwrap();
        assert_eq!(rt.block_on(store.list_certificates(&all)).unwrap().len(), 1);
        for serial in ["02bb", "03cc"] {
            rt.block_on(store.insert_certificate(&record(serial)))
                .unwrap();
        }
        let original = file_size_limit(None);
        file_size_limit(Some("0"));
        assert_eq!(
            store.journal.lock().queue.len(),
            2,
            "the two records were checkpointed before the disk failed"
        );
        // The checkpoint fails, and whoever waits for it hears why.
        let e = rt.block_on(store.list_certificates(&all)).unwrap_err();
        let msg = e.to_string();
        assert!(e.is_unavailable(), "{msg}");
        assert!(
            msg.contains("records could not be moved from the journal: I/O error: File too large"),
            "{msg}"
        );
        // The answered records are still served, from memory.
        for serial in ["02bb", "03cc"] {
            let serial: Serial = serial.parse().unwrap();
            assert_eq!(
                rt.block_on(store.get_certificate(&serial)).unwrap().serial,
                serial
            );
            assert!(rt.block_on(store.serial_exists(&serial)).unwrap());
        }
        // Too many waiting: inserts are refused with the failure's reason,
        // and nothing of them is kept.
        put_backlog(&store);
        let e = rt
            .block_on(store.insert_certificate(&record("04dd")))
            .unwrap_err();
        let msg = e.to_string();
        assert!(e.is_unavailable(), "{msg}");
        assert!(
            msg.contains("records wait for a checkpoint that keeps failing (I/O error"),
            "{msg}"
        );
        drop_backlog(&store);
        assert!(store.journal.pending("04dd").is_none());
        // The disk takes writes again, but redb stays latched until the
        // store is reopened: the checkpoint still fails, and says so.
        file_size_limit(Some(&original));
        let e = rt.block_on(store.list_certificates(&all)).unwrap_err();
        let msg = e.to_string();
        assert!(
            e.is_unavailable()
                && msg.contains("records could not be moved from the journal")
                && msg.contains("close and re-open the database"),
            "{msg}"
        );
        assert!(
            rt.block_on(store.serial_exists(&"03cc".parse().unwrap()))
                .unwrap()
        );
        // Closed, it keeps its journal (two records are in no checkpoint);
        // reopened, it has all three in redb, and checkpoints again.
        drop(store);
        assert!(journal_files[0].exists(), "the journal was removed");
        let store = EmbeddedStore::open(&path).unwrap();
        let serials = |store: &EmbeddedStore| -> Vec<String> {
            let mut v: Vec<String> = rt
                .block_on(store.list_certificates(&all))
                .unwrap()
                .iter()
                .map(|r| r.serial.to_hex())
                .collect();
            v.sort();
            v
        };
        assert_eq!(serials(&store), ["01aa", "02bb", "03cc"]);
        rt.block_on(store.insert_certificate(&record("04dd")))
            .unwrap();
        assert_eq!(serials(&store), ["01aa", "02bb", "03cc", "04dd"]);
        drop(store);
        assert!(
            !journal_files[0].exists() && !journal_files[1].exists(),
            "everything checkpointed, the journal files go"
        );
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(serials(&store), ["01aa", "02bb", "03cc", "04dd"]);
    }
}
