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

use crate::{
    CertFilter, CertStatus, CertificateRecord, HierarchyRecord, HierarchyStatus, RevocationReason,
    RevokeOutcome, Store, StoreError,
};

const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
const HIERARCHIES: TableDefinition<&str, &[u8]> = TableDefinition::new("hierarchies");

/// The embedded store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
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
        let db = Database::create(path).map_err(|e| unavailable(path, e))?;
        let store = EmbeddedStore {
            db: Arc::new(db),
            path: path.to_owned(),
        };
        // Create the tables once so that readers never meet a missing table.
        let txn = store.db.begin_write().map_err(|e| store.fail(e))?;
        txn.open_table(CERTS).map_err(|e| store.fail(e))?;
        txn.open_table(HIERARCHIES).map_err(|e| store.fail(e))?;
        txn.commit().map_err(|e| store.fail(e))?;
        Ok(store)
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

    /// Runs blocking database work off the async reactor.
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
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(|e| s.fail(e))?;
            {
                let mut t = txn.open_table(HIERARCHIES).map_err(|e| s.fail(e))?;
                if t.get(record.id.as_str()).map_err(|e| s.fail(e))?.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "hierarchy {} already exists",
                        record.id
                    )));
                }
                let bytes = encode(&record.id, &record)?;
                t.insert(record.id.as_str(), bytes.as_slice())
                    .map_err(|e| s.fail(e))?;
            }
            txn.commit().map_err(|e| s.fail(e))
        })
        .await
    }

    async fn list_hierarchies(&self) -> Result<Vec<HierarchyRecord>, StoreError> {
        self.blocking(|s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(HIERARCHIES).map_err(|e| s.fail(e))?;
            let mut out: Vec<HierarchyRecord> = Vec::new();
            for item in t.iter().map_err(|e| s.fail(e))? {
                let (k, v) = item.map_err(|e| s.fail(e))?;
                out.push(decode(k.value(), v.value())?);
            }
            out.sort_by_key(|h| h.created_at);
            Ok(out)
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
            let txn = s.db.begin_write().map_err(|e| s.fail(e))?;
            let updated = {
                let mut t = txn.open_table(HIERARCHIES).map_err(|e| s.fail(e))?;
                let mut rec: HierarchyRecord = match t.get(id.as_str()).map_err(|e| s.fail(e))? {
                    Some(v) => decode(&id, v.value())?,
                    None => {
                        return Err(StoreError::NotFound {
                            kind: "hierarchy",
                            key: id,
                        });
                    }
                };
                if rec.status != from {
                    return Err(StoreError::Conflict(format!(
                        "hierarchy {id} is {:?}, not {from:?}",
                        rec.status
                    )));
                }
                rec.status = to;
                let bytes = encode(&id, &rec)?;
                t.insert(id.as_str(), bytes.as_slice())
                    .map_err(|e| s.fail(e))?;
                rec
            };
            txn.commit().map_err(|e| s.fail(e))?;
            Ok(updated)
        })
        .await
    }

    async fn insert_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.blocking(move |s| {
            let key = record.serial.to_hex();
            let txn = s.db.begin_write().map_err(|e| s.fail(e))?;
            {
                let mut t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
                if t.get(key.as_str()).map_err(|e| s.fail(e))?.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "serial {key} is already recorded"
                    )));
                }
                let bytes = encode(&key, &record)?;
                t.insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| s.fail(e))?;
            }
            txn.commit().map_err(|e| s.fail(e))
        })
        .await
    }

    async fn serial_exists(&self, serial: &Serial) -> Result<bool, StoreError> {
        let key = serial.to_hex();
        self.blocking(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
            Ok(t.get(key.as_str()).map_err(|e| s.fail(e))?.is_some())
        })
        .await
    }

    async fn get_certificate(&self, serial: &Serial) -> Result<CertificateRecord, StoreError> {
        let key = serial.to_hex();
        self.blocking(move |s| {
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

    async fn list_certificates(
        &self,
        filter: &CertFilter,
    ) -> Result<Vec<CertificateRecord>, StoreError> {
        let filter = filter.clone();
        self.blocking(move |s| {
            let txn = s.db.begin_read().map_err(|e| s.fail(e))?;
            let t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
            let mut out = Vec::new();
            for item in t.iter().map_err(|e| s.fail(e))? {
                let (k, v) = item.map_err(|e| s.fail(e))?;
                let rec: CertificateRecord = decode(k.value(), v.value())?;
                if filter.matches(&rec) {
                    out.push(rec);
                }
            }
            out.sort_by(|a, b| a.not_after.cmp(&b.not_after).then(a.serial.cmp(&b.serial)));
            Ok(out)
        })
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
            let txn = s.db.begin_write().map_err(|e| s.fail(e))?;
            let outcome = {
                let mut t = txn.open_table(CERTS).map_err(|e| s.fail(e))?;
                let mut rec: CertificateRecord = match t.get(key.as_str()).map_err(|e| s.fail(e))? {
                    Some(v) => decode(&key, v.value())?,
                    None => {
                        return Err(StoreError::NotFound {
                            kind: "certificate",
                            key,
                        });
                    }
                };
                if rec.status == CertStatus::Revoked {
                    return Ok(RevokeOutcome::AlreadyRevoked(rec));
                }
                rec.status = CertStatus::Revoked;
                rec.revoked_at = Some(at);
                rec.revocation_reason = Some(reason);
                let bytes = encode(&key, &rec)?;
                t.insert(key.as_str(), bytes.as_slice())
                    .map_err(|e| s.fail(e))?;
                RevokeOutcome::Revoked(rec)
            };
            txn.commit().map_err(|e| s.fail(e))?;
            Ok(outcome)
        })
        .await
    }
}
