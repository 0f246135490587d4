//! Where meshca keeps its state: the [`Store`] trait and its backends.
//!
//! # Design
//! A store holds records, not keys: certificate records (one per issuance,
//! keyed by serial) and CA hierarchy records (one per root/intermediate pair,
//! each with an id and a [`HierarchyStatus`], so that an old and a new
//! hierarchy can live side by side during a root rotation). The trait is
//! object-safe, `Debug + Send + Sync`, and held as `Arc<dyn Store>`; every
//! backend passes the same behaviour tests.
//!
//! Writes that must not race are expressed as conditional operations the
//! backend makes atomic: [`Store::insert_certificate`] fails with
//! [`StoreError::Conflict`] when the serial exists, [`Store::create_hierarchy`]
//! when the id exists, [`Store::set_hierarchy_status`] when the status is not
//! the expected one. The embedded backend ([`EmbeddedStore`]) is redb: ACID,
//! copy-on-write B-trees, an fsync on each commit, so an answered issuance is
//! on disk and a crash at any moment leaves the last committed state.
//!
//! # Example
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use meshca_store::{EmbeddedStore, Store, CertFilter};
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
//! assert!(store.list_certificates(&CertFilter::default()).await.unwrap().is_empty());
//! # });
//! ```
#![forbid(unsafe_code)]

mod decide;
mod embedded;
mod error;
mod etcd;
mod events;
mod journal;
mod mac;
mod record;

use std::pin::Pin;

use async_trait::async_trait;
use meshca_pki::Serial;
use time::OffsetDateTime;

pub use embedded::EmbeddedStore;
pub use error::StoreError;
pub use etcd::{AuthenticateReport, EtcdStore, EtcdStoreConfig};
pub use events::RETENTION as EMBEDDED_EVENT_RETENTION;
pub use record::{
    CertFilter, CertPage, CertStatus, CertificateRecord, HierarchyRecord, HierarchyStatus,
    IntermediateUpdate, PruneRule, RevocationReason, RevokeOutcome, SealedKeys, TokenRecord,
    TokenRefusal,
};

/// An event as the store keeps it: an id that only grows (the SSE `id:`)
/// and the body the server wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its id; later events have larger ids, on every replica.
    pub id: u64,
    /// What the server recorded (JSON).
    pub body: Vec<u8>,
}

/// Events as they come: first those still retained after the id asked for,
/// then new ones, from wherever they were appended. It does not end while
/// the store is open (a backend reconnects by itself).
pub type EventFeed = Pin<Box<dyn futures_util::Stream<Item = StoredEvent> + Send>>;

/// Whether this process leads: `true` while it holds the leadership. The
/// value changes as leadership is won and lost.
pub type Leadership = tokio::sync::watch::Receiver<bool>;

/// The state of a meshca CA. See the crate docs.
#[async_trait]
pub trait Store: std::fmt::Debug + Send + Sync {
    /// Records a new hierarchy; [`StoreError::Conflict`] when its id exists.
    async fn create_hierarchy(&self, record: &HierarchyRecord) -> Result<(), StoreError>;

    /// Every hierarchy, oldest first.
    async fn list_hierarchies(&self) -> Result<Vec<HierarchyRecord>, StoreError>;

    /// Replaces hierarchy `id`'s intermediate (a renewal under the same
    /// root), atomically; [`StoreError::Conflict`] when its intermediate is
    /// no longer `expected_pem` (someone renewed it first).
    async fn replace_intermediate(
        &self,
        id: &str,
        expected_pem: &str,
        new: IntermediateUpdate,
    ) -> Result<HierarchyRecord, StoreError>;

    /// Moves hierarchy `id` from status `from` to `to`, atomically;
    /// [`StoreError::Conflict`] when its status is not `from`.
    async fn set_hierarchy_status(
        &self,
        id: &str,
        from: HierarchyStatus,
        to: HierarchyStatus,
    ) -> Result<HierarchyRecord, StoreError>;

    /// Records an issued certificate; [`StoreError::Conflict`] when the serial
    /// is already recorded (the caller picks a new serial and signs again).
    async fn insert_certificate(&self, record: &CertificateRecord) -> Result<(), StoreError>;

    /// Whether a serial is recorded.
    async fn serial_exists(&self, serial: &Serial) -> Result<bool, StoreError>;

    /// One certificate record; [`StoreError::NotFound`] when unknown.
    async fn get_certificate(&self, serial: &Serial) -> Result<CertificateRecord, StoreError>;

    /// Deletes up to `limit` expired certificate records that `rule`
    /// deletes ([`PruneRule::deletes`]: a record superseded by a newer one
    /// of its identity sooner than the newest) and returns how many it
    /// deleted (fewer than `limit`: none is left). The records are the CA's
    /// working state; the audit log keeps the history of every issuance.
    async fn delete_expired_certificates(
        &self,
        rule: &PruneRule,
        limit: usize,
    ) -> Result<usize, StoreError>;

    /// Certificate records matching `filter`, soonest expiry first.
    async fn list_certificates(
        &self,
        filter: &CertFilter,
    ) -> Result<Vec<CertificateRecord>, StoreError>;

    /// Up to `limit` certificate records matching `filter`, in key (serial)
    /// order, after the serial `after` (exclusive; `None`: from the start;
    /// a serial not in the store is a position all the same). `next` is the
    /// last serial returned when more records may follow (pass it as
    /// `after` for the next page), `None` when the listing is complete. A
    /// page costs what it returns plus the non-matching records skipped,
    /// never a scan of the whole store when the filter matches often. Each
    /// page is read on its own: records inserted or deleted between pages
    /// show or not by where they fall, and none is returned twice. A
    /// `limit` of 0 counts as 1.
    async fn list_certificates_page(
        &self,
        filter: &CertFilter,
        after: Option<&Serial>,
        limit: usize,
    ) -> Result<CertPage, StoreError>;

    /// Records a new join token; [`StoreError::Conflict`] when its id exists.
    async fn create_token(&self, record: &TokenRecord) -> Result<(), StoreError>;

    /// Every join token.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Deletes a token; [`StoreError::NotFound`] when unknown.
    async fn delete_token(&self, id: &str) -> Result<(), StoreError>;

    /// Uses a token once, atomically: checks the secret's hash in constant
    /// time, the expiry and the uses left, and counts the use, all in one
    /// transaction, so two concurrent uses of a one-use token cannot both pass.
    async fn consume_token(
        &self,
        id: &str,
        secret_sha256: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError>;

    /// Gives back a use taken by [`Store::consume_token`] when the
    /// certificate could not be issued after all.
    async fn refund_token(&self, id: &str) -> Result<(), StoreError>;

    /// Marks a certificate revoked (once: a second call reports
    /// [`RevokeOutcome::AlreadyRevoked`] and changes nothing).
    async fn revoke_certificate(
        &self,
        serial: &Serial,
        reason: RevocationReason,
        at: OffsetDateTime,
    ) -> Result<RevokeOutcome, StoreError>;

    /// Appends an event to the event log; returns its id.
    async fn append_event(&self, body: &[u8]) -> Result<u64, StoreError>;

    /// True when [`Store::append_event`] completes without waiting on
    /// anything (the log is in this process's memory), so that a caller may
    /// run it in place instead of on a task of its own.
    fn appends_events_in_memory(&self) -> bool {
        false
    }

    /// The events after id `after` still retained, then new ones.
    async fn watch_events(&self, after: u64) -> Result<EventFeed, StoreError>;

    /// Ids at or below this may have been given to events this store no
    /// longer holds (the embedded store's log lives in memory: after a
    /// restart, the events of the process before are gone). A subscriber
    /// resuming from below it may have missed some. 0: none were lost.
    fn event_floor(&self) -> u64 {
        0
    }

    /// Starts campaigning for leadership as `candidate` (a replica's name):
    /// exactly one process of those sharing the store leads at a time, and
    /// another takes over when the leader stops renewing. The campaign runs
    /// until the store is dropped.
    async fn campaign(&self, candidate: &str) -> Result<Leadership, StoreError>;

    /// A small named piece of CA state (the shared configuration, ...).
    async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Sets a named piece of CA state.
    async fn put_blob(&self, name: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Every blob whose name starts with `prefix`, by name.
    async fn list_blobs(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Whether the store answers now ([`StoreError::Unavailable`] if not).
    async fn check(&self) -> Result<(), StoreError>;

    /// Where the store is, for messages (`/var/lib/meshca/store.redb`,
    /// `etcd://host:2379/meshca/`).
    fn location(&self) -> String;
}
