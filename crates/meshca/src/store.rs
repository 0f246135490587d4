//! Which store a command uses: flags and `MESHCA_*` variables over the
//! `[store]` table of `meshca.toml`, parsed once into [`StoreChoice`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use meshca_etcd::{EtcdTls, EtcdUser};
use meshca_pki::SealKey;
use meshca_store::{EtcdStore, EtcdStoreConfig, Store};
use serde::{Deserialize, Serialize};

/// The store flags, shared by every command.
#[derive(Debug, Clone, Default, Args)]
pub struct StoreArgs {
    /// Where the CA's state lives: `embedded` (DIR/store.redb, the default) or
    /// etcd://host1:2379,host2:2379[/prefix] (shared by replicas).
    #[arg(long, global = true, env = "MESHCA_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// The key that seals CA keys in a shared store (64 hex digits, mode
    /// 0600); `init` creates it when the file does not exist.
    #[arg(long, global = true, env = "MESHCA_SEAL_KEY_FILE", value_name = "FILE")]
    pub seal_key_file: Option<PathBuf>,
    /// CA certificate(s) for TLS to etcd (turns TLS on).
    #[arg(long, global = true, env = "MESHCA_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, global = true, env = "MESHCA_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long, global = true, env = "MESHCA_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name (with --etcd-password-file).
    #[arg(long, global = true, env = "MESHCA_ETCD_USER", value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (mode 0600).
    #[arg(
        long,
        global = true,
        env = "MESHCA_ETCD_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

/// The `[store]` table of `meshca.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `embedded` or `etcd://...`.
    pub url: String,
    /// See [`StoreArgs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_key_file: Option<PathBuf>,
    /// See [`StoreArgs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<PathBuf>,
    /// See [`StoreArgs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_cert: Option<PathBuf>,
    /// See [`StoreArgs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_key: Option<PathBuf>,
    /// See [`StoreArgs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_user: Option<String>,
    /// See [`StoreArgs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_password_file: Option<PathBuf>,
}

/// Where the state is.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// `DIR/store.redb`.
    Embedded,
    /// etcd, with the settings that reach it.
    Etcd(StoreSettings),
}

impl StoreArgs {
    /// Flags over the file's `[store]` table.
    pub fn choose(&self, file: Option<&StoreSettings>) -> anyhow::Result<StoreChoice> {
        let base = file.cloned().unwrap_or_default();
        let s = StoreSettings {
            url: self.store.clone().unwrap_or(base.url),
            seal_key_file: self.seal_key_file.clone().or(base.seal_key_file),
            etcd_ca: self.etcd_ca.clone().or(base.etcd_ca),
            etcd_cert: self.etcd_cert.clone().or(base.etcd_cert),
            etcd_key: self.etcd_key.clone().or(base.etcd_key),
            etcd_user: self.etcd_user.clone().or(base.etcd_user),
            etcd_password_file: self.etcd_password_file.clone().or(base.etcd_password_file),
        };
        match s.url.as_str() {
            "" | "embedded" => Ok(StoreChoice::Embedded),
            u if u.starts_with("etcd://") => Ok(StoreChoice::Etcd(s)),
            other => anyhow::bail!(
                "invalid --store {other:?}: expected `embedded` or etcd://host1:2379,host2:2379[/prefix]"
            ),
        }
    }
}

impl StoreSettings {
    fn etcd_config(&self) -> anyhow::Result<EtcdStoreConfig> {
        let mut c = EtcdStoreConfig::from_url(&self.url)?;
        if self.etcd_ca.is_some() || self.etcd_cert.is_some() || self.etcd_key.is_some() {
            c.etcd.tls = Some(EtcdTls {
                ca: self.etcd_ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
        }
        match (&self.etcd_user, &self.etcd_password_file) {
            (Some(name), Some(file)) => {
                let bytes = meshca_files::read_secret(file, 4096)?;
                let password = String::from_utf8(bytes)
                    .with_context(|| format!("{} is not text", file.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                c.etcd.user = Some(EtcdUser {
                    name: name.clone(),
                    password,
                });
            }
            (None, None) => {}
            _ => anyhow::bail!("give both --etcd-user and --etcd-password-file, or neither"),
        }
        Ok(c)
    }

    /// Connects to etcd with the seal key of its file (fails with a clear
    /// error when it cannot).
    pub async fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        let seal = self.seal_key(false)?;
        self.open_with(&seal).await
    }

    /// Connects to etcd; the store's records are authenticated with a key
    /// derived from `seal` (another seal key is refused here, clearly).
    pub async fn open_with(&self, seal: &SealKey) -> anyhow::Result<Arc<dyn Store>> {
        let store = EtcdStore::open(self.etcd_config()?, seal).await?;
        Ok(Arc::new(store))
    }

    /// `meshca store authenticate`: the one-time upgrade of a store written
    /// by a meshca that did not authenticate its records.
    pub async fn authenticate(
        &self,
        seal: &SealKey,
    ) -> anyhow::Result<meshca_store::AuthenticateReport> {
        Ok(EtcdStore::authenticate_records(self.etcd_config()?, seal).await?)
    }

    /// Reads the seal key; with `create`, makes a new one (0600) when the
    /// file does not exist. Says which file when it cannot.
    pub fn seal_key(&self, create: bool) -> anyhow::Result<SealKey> {
        let path = self.seal_key_file.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "a shared store needs a seal key for the CA keys: give --seal-key-file FILE (or MESHCA_SEAL_KEY_FILE)"
            )
        })?;
        if create && !path.exists() {
            let key = SealKey::generate()?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            meshca_files::write_atomic(
                path,
                key.to_file_content().as_bytes(),
                meshca_files::SECRET_MODE,
            )?;
            eprintln!(
                "Created the seal key {} (give the same file to every replica; keep it out of etcd)",
                path.display()
            );
            return Ok(key);
        }
        let bytes = meshca_files::read_secret(path, 4096)?;
        SealKey::from_file_content(&bytes).with_context(|| format!("seal key {}", path.display()))
    }
}

/// The `[store]` table to write into a replica's `meshca.toml`.
pub fn settings_for_file(s: &StoreSettings) -> StoreSettings {
    let abs = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
    };
    StoreSettings {
        url: s.url.clone(),
        seal_key_file: abs(&s.seal_key_file),
        etcd_ca: abs(&s.etcd_ca),
        etcd_cert: abs(&s.etcd_cert),
        etcd_key: abs(&s.etcd_key),
        etcd_user: s.etcd_user.clone(),
        etcd_password_file: abs(&s.etcd_password_file),
    }
}
