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
        }
    }
}

impl std::error::Error for StoreError {}
