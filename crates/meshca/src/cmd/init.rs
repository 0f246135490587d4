//! `meshca init`.

use std::path::Path;
use std::process::ExitCode;

use meshca_issuer::{ImportSpec, InitOptions, init_data_dir};
use meshca_pki::{KeyType, TrustDomain, parse_duration, rfc3339};
use serde_json::json;

use crate::InitArgs;
use crate::config::Config;
use crate::store::{StoreArgs, StoreChoice};

pub async fn run(dir: &Path, store_args: &StoreArgs, a: InitArgs) -> anyhow::Result<ExitCode> {
    let trust_domain = TrustDomain::new(&a.trust_domain)?;
    let key_type: KeyType = a.key_type.parse()?;
    let root_ttl = parse_duration(&a.root_ttl)?;
    if root_ttl.is_zero() {
        anyhow::bail!(
            "invalid --root-ttl {:?}: must be greater than zero",
            a.root_ttl
        );
    }
    let import = a.import_root.map(|root_cert| ImportSpec {
        root_cert,
        root_key: a.import_key,
        intermediate_cert: a.import_intermediate,
        intermediate_key: a.import_intermediate_key,
    });
    let config = Config::new(trust_domain.clone(), key_type);
    let opts = InitOptions {
        trust_domain,
        key_type,
        root_ttl,
        import,
        config_toml: config.to_toml()?,
        max_ttl: config.max_ttl.get(),
    };
    let report = match store_args.choose(None)? {
        StoreChoice::Embedded => init_data_dir(dir, opts).await?,
        StoreChoice::Etcd(settings) => super::init_shared_ca(dir, &settings, opts, &config).await?,
    };
    if a.json {
        super::print_json(&json!({
            "dir": dir,
            "hierarchy_id": report.hierarchy_id,
            "root_fingerprint": report.root_fingerprint,
            "root_not_after": rfc3339(report.root_not_after),
            "intermediate_not_after": rfc3339(report.intermediate_not_after),
            "admin_dir": report.admin_dir,
            "imported": report.imported,
        }))?;
    } else {
        let how = if report.imported {
            "Imported"
        } else {
            "Created"
        };
        println!("{how} a CA in {}", dir.display());
        println!("  hierarchy:          {}", report.hierarchy_id);
        println!(
            "  root fingerprint:   {} (SHA-256)",
            report.root_fingerprint
        );
        println!("  root expires:       {}", rfc3339(report.root_not_after));
        println!(
            "  intermediate ends:  {}",
            rfc3339(report.intermediate_not_after)
        );
        println!(
            "  admin credentials:  {}/ (tls.crt, tls.key, ca.crt)",
            report.admin_dir.display()
        );
        println!("Next: meshca issue NAME --out DIR");
    }
    Ok(ExitCode::SUCCESS)
}
