//! One module per command. Each parses its arguments into typed values,
//! wires the library parts together and prints the result.

pub mod agent;
pub mod init;
pub mod inspect;
pub mod issue;
pub mod online;
pub mod records;
pub mod serve;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use meshca_issuer::{Authority, BuiltinIssuer, DataDir};
use meshca_store::{EmbeddedStore, Store};

use crate::config::Config;

/// Opens the store of a data directory that must hold a CA.
pub fn open_store(dir: &Path) -> anyhow::Result<(Config, Arc<dyn Store>)> {
    let data = DataDir::new(dir);
    data.require_ca()?;
    let config = Config::load(&data.config_path())?;
    let store = EmbeddedStore::open_existing(&data.store_path())
        .with_context(|| format!("opening the store of {}", dir.display()))?;
    Ok((config, Arc::new(store)))
}

/// Opens everything needed to issue from a data directory.
pub async fn open_authority(dir: &Path) -> anyhow::Result<(Config, Authority)> {
    let (config, store) = open_store(dir)?;
    let issuer = BuiltinIssuer::open(dir, store.clone()).await?;
    let policy = config.policy();
    Ok((config, Authority::new(Arc::new(issuer), store, policy)))
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A certificate record as `--json` output shows it (the API's shape).
pub fn record_json(r: &meshca_store::CertificateRecord) -> serde_json::Value {
    meshca_server::views::record_json(r, false)
}
