//! `meshca serve`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use meshca_issuer::{InitOptions, init_data_dir};
use meshca_pki::{DEFAULT_ROOT_TTL, TrustDomain};
use meshca_server::{AppState, ServeOptions};

use crate::ServeArgs;
use crate::config::Config;
use crate::issuer::{IssuerArgs, IssuerChoice};
use crate::store::{StoreArgs, StoreChoice};

pub async fn run(
    dir: &Path,
    store_args: &StoreArgs,
    issuer_args: &IssuerArgs,
    a: ServeArgs,
) -> anyhow::Result<ExitCode> {
    let data = meshca_issuer::DataDir::new(dir);
    if !data.holds_ca()
        && let IssuerChoice::Vault(settings) = issuer_args.choose(None)?
    {
        init_vault_dir(dir, store_args, *settings, &a).await?;
    }
    if !data.holds_ca() {
        let choice = store_args.choose(None)?;
        // A shared store that holds a CA is joined; otherwise a CA is made.
        let joined = match &choice {
            StoreChoice::Etcd(settings) => {
                // The seal key is made when its file does not exist (for a
                // new CA); a store that holds a CA refuses any key but its own.
                let seal = settings.seal_key(true)?;
                let holds_ca = !settings
                    .open_with(&seal)
                    .await?
                    .list_hierarchies()
                    .await?
                    .is_empty();
                if holds_ca {
                    super::join_shared_ca(dir, settings).await?;
                }
                holds_ca
            }
            StoreChoice::Embedded => false,
        };
        if !joined {
            // `meshca serve` alone gives a working CA.
            let trust_domain = TrustDomain::new(&a.trust_domain)?;
            let config = Config::new(trust_domain.clone(), meshca_pki::KeyType::default());
            let opts = InitOptions {
                trust_domain,
                key_type: config.key_type,
                root_ttl: DEFAULT_ROOT_TTL,
                import: None,
                config_toml: config.to_toml()?,
                max_ttl: config.max_ttl.get(),
            };
            let (report, place) = match &choice {
                StoreChoice::Etcd(settings) => (
                    super::init_shared_ca(dir, settings, opts, &config).await?,
                    settings.url.clone(),
                ),
                StoreChoice::Embedded => {
                    (init_data_dir(dir, opts).await?, dir.display().to_string())
                }
            };
            eprintln!(
                "Created a CA in {place} (root fingerprint {}); admin credentials in {}/ (tls.crt, tls.key, ca.crt)",
                report.root_fingerprint,
                report.admin_dir.display()
            );
        }
    }
    let (config, authority, seal) = super::open_authority(dir, store_args, issuer_args).await?;
    let state = Arc::new(
        AppState::new(dir, authority, config.policy.clone(), config.key_type)?
            .with_seal(seal)
            .with_keep_expired(config.keep_expired.get())
            .with_keep_superseded(config.keep_superseded.get())
            .with_limits(config.limits),
    );
    let opts = ServeOptions {
        dir: dir.to_owned(),
        listen: a.listen,
        http_redirect: a.http_redirect,
        server_names: a.server_names,
    };
    meshca_server::run(opts, state).await?;
    Ok(ExitCode::SUCCESS)
}

/// A data directory whose certificates Vault signs: the role is checked,
/// the admin credentials come from Vault, and `meshca.toml` records the
/// `[issuer]` table so that a later `serve --dir` needs no flags.
async fn init_vault_dir(
    dir: &Path,
    store_args: &StoreArgs,
    settings: meshca_vault::VaultSettings,
    a: &ServeArgs,
) -> anyhow::Result<()> {
    if let StoreChoice::Etcd(_) = store_args.choose(None)? {
        anyhow::bail!(
            "--issuer vault with a shared (etcd) store is not supported yet: run the Vault issuer with the embedded store"
        );
    }
    let trust_domain = TrustDomain::new(&a.trust_domain)?;
    let mut config = Config::new(trust_domain.clone(), meshca_pki::KeyType::default());
    let choice = IssuerChoice::Vault(Box::new(settings.clone()));
    config.issuer = choice.settings();
    let issuer = meshca_vault::VaultIssuer::connect(settings, trust_domain.clone()).await?;
    let opts = InitOptions {
        trust_domain,
        key_type: config.key_type,
        root_ttl: DEFAULT_ROOT_TTL,
        import: None,
        config_toml: config.to_toml()?,
        max_ttl: config.max_ttl.get(),
    };
    let describe = meshca_issuer::Issuer::describe(&*issuer);
    let report = meshca_issuer::init_with_issuer(dir, issuer, opts).await?;
    eprintln!(
        "Created a CA front in {} signed by {describe} (root fingerprint {}); admin credentials in {}/ (tls.crt, tls.key, ca.crt), valid until {} (the role's max_ttl bounds it)",
        dir.display(),
        report.root_fingerprint,
        report.admin_dir.display(),
        meshca_pki::rfc3339(report.admin_not_after)
    );
    Ok(())
}
