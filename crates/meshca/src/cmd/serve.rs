//! `meshca serve`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use meshca_issuer::{InitOptions, init_data_dir};
use meshca_pki::{DEFAULT_ROOT_TTL, TrustDomain};
use meshca_server::{AppState, ServeOptions};

use crate::ServeArgs;
use crate::config::Config;

pub async fn run(dir: &Path, a: ServeArgs) -> anyhow::Result<ExitCode> {
    let data = meshca_issuer::DataDir::new(dir);
    if !data.holds_ca() {
        // `meshca serve` alone gives a working CA.
        let trust_domain = TrustDomain::new(&a.trust_domain)?;
        let config = Config::new(trust_domain.clone(), meshca_pki::KeyType::default());
        let report = init_data_dir(
            dir,
            InitOptions {
                trust_domain,
                key_type: config.key_type,
                root_ttl: DEFAULT_ROOT_TTL,
                import: None,
                config_toml: config.to_toml()?,
                max_ttl: config.max_ttl.get(),
            },
        )
        .await?;
        eprintln!(
            "Created a CA in {} (root fingerprint {}); admin credentials in {}/ (tls.crt, tls.key, ca.crt)",
            dir.display(),
            report.root_fingerprint,
            report.admin_dir.display()
        );
    }
    let (config, authority) = super::open_authority(dir).await?;
    let state = Arc::new(AppState::new(
        dir,
        authority,
        config.policy.clone(),
        config.key_type,
    )?);
    let opts = ServeOptions {
        dir: dir.to_owned(),
        listen: a.listen,
        http_redirect: a.http_redirect,
        server_names: a.server_names,
    };
    meshca_server::run(opts, state).await?;
    Ok(ExitCode::SUCCESS)
}
