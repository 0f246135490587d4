//! The one error type of `meshca-store`.

use std::fmt;

/// What can go wrong in a store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreError {
    /// The record asked for does not exist.
    NotFound {
        /// What kind of record (`certificate`, `hierarchy`).
        kind: &'static str,
        /// Its key.
        key: String,
    },
    /// A conditional write lost: the key exists, or the state was not the
    /// expected one. Nothing was written.
    Conflict(String),
    /// The store cannot be opened or read (missing, locked, corrupt, I/O).
    Unavailable {
        /// Where the store is.
        location: String,
        /// What happened.
        reason: String,
    },
    /// A stored record does not decode: the store was written by an
    /// incompatible version or damaged.
    Corrupt {
        /// Its key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A record that grants authority failed its integrity check (its MAC,
    /// made with a key derived from the seal key, is missing or does not
    /// match its key and value): someone who can write to the store forged,
    /// altered or moved it. It was refused (and logged).
    Tampered {
        /// Its key.
        key: String,
        /// Why it failed.
        reason: String,
    },
    /// The store's records are authenticated with another seal key than
    /// the one given.
    SealKeyMismatch {
        /// Where the store is.
        location: String,
    },
    /// The store holds records written before meshca authenticated them and
    /// has not been upgraded (`meshca store authenticate`).
    Unauthenticated {
        /// Where the store is.
        location: String,
        /// How many records carry no MAC.
        records: usize,
    },
}

impl StoreError {
    /// True for [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// True for [`StoreError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }

    /// True for [`StoreError::Tampered`]: a record failed its integrity check.
    pub fn is_tampered(&self) -> bool {
        matches!(self, StoreError::Tampered { .. })
    }

    /// True when retrying later may succeed (the store is unreachable).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NotFound { kind, key } => write!(f, "no {kind} {key} in the store"),
            StoreError::Conflict(what) => write!(f, "conflict: {what}; nothing was changed"),
            StoreError::Unavailable { location, reason } => {
                write!(f, "the store at {location} is unavailable: {reason}")
            }
            StoreError::Corrupt { key, reason } => write!(
                f,
                "the record {key} in the store does not decode ({reason}): the store was written by an incompatible meshca or is damaged"
            ),
            StoreError::Tampered { key, reason } => write!(
                f,
                "refused the record {key}: it fails its integrity check ({reason}), so it was not written by a meshca holding this seal key; someone with write access to the store forged, altered or moved it. Delete it (etcdctl del {key}) or restore it from a backup, and find out who can write to the store"
            ),
            StoreError::SealKeyMismatch { location } => write!(
                f,
                "the seal key does not open the store at {location}: its records are authenticated with another seal key (give every replica the same --seal-key-file), or its marker {location}integrity was altered"
            ),
            StoreError::Unauthenticated { location, records } => write!(
                f,
                "the store at {location} holds {records} records without a MAC, written by a meshca that did not authenticate its records: stop every replica, upgrade them all, make sure the store holds only what you expect, then run `meshca store authenticate --store {location} --seal-key-file FILE` once. If this store was upgraded before, do not: someone with write access removed its marker and these records are not meshca's"
            ),
        }
    }
}

impl std::error::Error for StoreError {}
