//! One module per command. Each parses its arguments into typed values,
//! wires the library parts together and prints the result.

pub mod agent;
pub mod copy;
pub mod init;
pub mod inspect;
pub mod issue;
pub mod online;
pub mod proxy;
pub mod records;
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use meshca_issuer::{
    Authority, BuiltinIssuer, DataDir, InitOptions, InitReport, Issuer, SHARED_CONFIG_BLOB,
    init_shared,
};
use meshca_pki::SealKey;
use meshca_store::{EmbeddedStore, Store};
use meshca_vault::VaultIssuer;

use crate::config::Config;
use crate::issuer::{IssuerArgs, IssuerChoice};
use crate::store::{StoreArgs, StoreChoice, StoreSettings};

/// Opens the store of a data directory that must hold a CA: the embedded
/// `DIR/store.redb`, or the shared store its `[store]` table (or the flags)
/// name, with the seal key of the CA keys.
pub async fn open_store(
    dir: &Path,
    args: &StoreArgs,
) -> anyhow::Result<(Config, Arc<dyn Store>, Option<SealKey>)> {
    let data = DataDir::new(dir);
    let file = if data.config_path().exists() {
        Some(Config::load(&data.config_path())?)
    } else {
        None
    };
    match args.choose(file.as_ref().and_then(|c| c.store.as_ref()))? {
        StoreChoice::Embedded => {
            data.require_ca()?;
            let config = Config::load(&data.config_path())?;
            let store = EmbeddedStore::open_existing(&data.store_path())
                .with_context(|| format!("opening the store of {}", dir.display()))?;
            Ok((config, Arc::new(store), None))
        }
        StoreChoice::Etcd(settings) => {
            let Some(config) = file else {
                // Fails with the clear "no CA here" message.
                data.require_ca()?;
                anyhow::bail!("no meshca.toml in {}", dir.display());
            };
            let seal = settings.seal_key(false)?;
            let store = settings.open_with(&seal).await?;
            Ok((config, store, Some(seal)))
        }
    }
}

/// Opens everything needed to issue from a data directory: its store and
/// the issuer its `[issuer]` table (or the flags) name, and the seal key
/// of a shared store.
pub async fn open_authority(
    dir: &Path,
    args: &StoreArgs,
    issuer_args: &IssuerArgs,
) -> anyhow::Result<(Config, Authority, Option<SealKey>)> {
    let (config, store, seal) = open_store(dir, args).await?;
    let issuer: Arc<dyn Issuer> = match issuer_args.choose(config.issuer.as_ref())? {
        IssuerChoice::Builtin => {
            Arc::new(BuiltinIssuer::open(dir, store.clone(), seal.as_ref()).await?)
        }
        IssuerChoice::Vault(settings) => {
            VaultIssuer::connect(*settings, config.trust_domain.clone()).await?
        }
    };
    let policy = config.policy();
    Ok((config, Authority::new(issuer, store, policy), seal))
}

/// `init` on a shared store: the seal key (created when its file does not
/// exist), the CA sealed into the store with `opts.config_toml` (the CA's
/// configuration, `config` without `[store]`) as its shared configuration,
/// and in `dir` the admin credentials and a `meshca.toml` whose `[store]`
/// table points at the store.
pub async fn init_shared_ca(
    dir: &Path,
    settings: &StoreSettings,
    opts: InitOptions,
    config: &Config,
) -> anyhow::Result<InitReport> {
    let seal = settings.seal_key(true)?;
    let store = settings.open_with(&seal).await?;
    let mut local = config.clone();
    local.store = Some(crate::store::settings_for_file(settings));
    Ok(init_shared(dir, store, &seal, opts, &local.to_toml()?).await?)
}

/// A new replica of a CA that lives in a shared store: checks that the seal
/// key opens the CA's keys, then writes `dir/meshca.toml` from the store's
/// shared configuration with this replica's `[store]` table.
pub async fn join_shared_ca(dir: &Path, settings: &StoreSettings) -> anyhow::Result<()> {
    let seal = settings.seal_key(false)?;
    let store = settings.open_with(&seal).await?;
    let Some(blob) = store.get_blob(SHARED_CONFIG_BLOB).await? else {
        anyhow::bail!(
            "the store {} holds no CA configuration (was it initialised by `meshca init --store ...`?)",
            store.location()
        );
    };
    let origin = PathBuf::from(format!("{}blobs/{SHARED_CONFIG_BLOB}", store.location()));
    let mut config = Config::parse(&blob, &origin)?;
    // Refuse now, before anything is written, when the seal key is wrong.
    BuiltinIssuer::open(dir, store.clone(), Some(&seal)).await?;
    config.store = Some(crate::store::settings_for_file(settings));
    meshca_files::create_private_dir(dir)?;
    meshca_files::write_atomic(
        &DataDir::new(dir).config_path(),
        config.to_toml()?.as_bytes(),
        meshca_files::SECRET_MODE,
    )?;
    eprintln!(
        "Joined the CA in {} as a new replica ({} written; admin credentials stay where `meshca init` put them)",
        store.location(),
        DataDir::new(dir).config_path().display()
    );
    Ok(())
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
