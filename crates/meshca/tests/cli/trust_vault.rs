//! Trust-model attacks (issue 19): trust_vault.
