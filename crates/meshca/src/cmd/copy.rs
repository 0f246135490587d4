//! `meshca store copy`: moves a CA between the embedded store and etcd.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use meshca_issuer::{CaPlace, DataDir, SHARED_CONFIG_BLOB, copy_ca, verify_copy};
use meshca_store::{EmbeddedStore, Store};

use crate::config::Config;
use crate::store::{StoreArgs, StoreChoice};

/// One side, opened.
struct Side {
    place: CaPlace,
    /// The data directory (embedded side).
    dir: Option<PathBuf>,
    name: String,
}

async fn open_side(spec: &str, args: &StoreArgs, target: bool) -> anyhow::Result<Side> {
    if spec.starts_with("etcd://") {
        let mut a = args.clone();
        a.store = Some(spec.to_owned());
        let StoreChoice::Etcd(settings) = a.choose(None)? else {
            anyhow::bail!("{spec}: not an etcd URL");
        };
        let seal = settings.seal_key(target)?;
        let store = settings.open_with(&seal).await?;
        return Ok(Side {
            place: CaPlace {
                store,
                key_dir: None,
                seal: Some(seal),
            },
            dir: None,
            name: spec.to_owned(),
        });
    }
    let dir = PathBuf::from(spec.strip_prefix("embedded:").unwrap_or(spec));
    let data = DataDir::new(&dir);
    let store: Arc<dyn Store> = if target {
        if data.holds_ca() {
            anyhow::bail!(
                "--to {}: the directory already holds a CA; copy into an empty directory",
                dir.display()
            );
        }
        meshca_files::create_private_dir(&dir)?;
        let s = EmbeddedStore::open(&data.store_path())?;
        meshca_files::restrict(&data.store_path())?;
        Arc::new(s)
    } else {
        data.require_ca()?;
        Arc::new(EmbeddedStore::open_existing(&data.store_path())?)
    };
    Ok(Side {
        place: CaPlace {
            store,
            key_dir: Some(dir.clone()),
            seal: None,
        },
        name: dir.display().to_string(),
        dir: Some(dir),
    })
}

/// The CA's shared configuration (`meshca.toml` without `[store]`).
async fn read_config(side: &Side) -> anyhow::Result<Config> {
    match &side.dir {
        Some(dir) => {
            let mut c = Config::load(&DataDir::new(dir).config_path())?;
            c.store = None;
            Ok(c)
        }
        None => {
            let blob = side
                .place
                .store
                .get_blob(SHARED_CONFIG_BLOB)
                .await?
                .with_context(|| format!("{} holds no CA configuration", side.name))?;
            Config::parse(&blob, Path::new(&side.name))
        }
    }
}

async fn write_config(side: &Side, config: &Config) -> anyhow::Result<()> {
    let text = config.to_toml()?;
    match &side.dir {
        Some(dir) => meshca_files::write_atomic(
            &DataDir::new(dir).config_path(),
            text.as_bytes(),
            meshca_files::SECRET_MODE,
        )?,
        None => {
            side.place
                .store
                .put_blob(SHARED_CONFIG_BLOB, text.as_bytes())
                .await?
        }
    }
    Ok(())
}

pub async fn run(from: &str, to: &str, args: &StoreArgs) -> anyhow::Result<ExitCode> {
    let src = open_side(from, args, false).await?;
    let target_dir = (!to.starts_with("etcd://"))
        .then(|| PathBuf::from(to.strip_prefix("embedded:").unwrap_or(to)));
    let existed = target_dir.as_ref().is_some_and(|d| d.exists());
    let dst = open_side(to, args, true).await?;
    let result = copy(&src, &dst).await;
    // An embedded target was made from nothing by this run: when the copy
    // fails, what it made goes again, so the directory is as it was.
    if let (Err(_), Some(dir)) = (&result, &target_dir) {
        drop(dst);
        let _ = std::fs::remove_file(DataDir::new(dir).config_path());
        let _ = std::fs::remove_file(DataDir::new(dir).store_path());
        let _ = std::fs::remove_dir_all(dir.join("ca"));
        if !existed {
            let _ = std::fs::remove_dir(dir);
        }
    }
    result
}

async fn copy(src: &Side, dst: &Side) -> anyhow::Result<ExitCode> {
    let config = read_config(src).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} records ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("copying");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let copied = copy_ca(&src.place, &dst.place, &progress).await?;
    // The configuration last: on an embedded target it marks a complete CA.
    write_config(dst, &config).await?;
    bar.finish_and_clear();
    eprintln!(
        "Copied {} hierarchies, {} certificate records and {} join tokens from {} to {}; verifying...",
        copied.hierarchies, copied.certificates, copied.tokens, src.name, dst.name
    );
    let verified = verify_copy(&src.place, &dst.place).await?;
    if verified != copied {
        anyhow::bail!("verification failed: copied {copied:?}, found {verified:?}");
    }
    println!(
        "Verified: {} hierarchies (keys open and match), {} certificate records, {} join tokens are identical in {}",
        verified.hierarchies, verified.certificates, verified.tokens, dst.name
    );
    if dst.dir.is_none() {
        println!(
            "Next: meshca serve --dir NEW_DIR --store {} --seal-key-file FILE (each replica)",
            dst.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `meshca store authenticate`: the one-time upgrade of an etcd store
/// written by a meshca that did not authenticate its records. Lists what it
/// authenticated (stdout) and what it left refused (stderr; exit status 1).
pub async fn authenticate(args: &StoreArgs) -> anyhow::Result<ExitCode> {
    let StoreChoice::Etcd(settings) = args.choose(None)? else {
        anyhow::bail!(
            "`store authenticate` upgrades an etcd store: give --store etcd://host:2379[/prefix] and --seal-key-file FILE"
        );
    };
    let seal = settings.seal_key(false)?;
    let report = settings.authenticate(&seal).await?;
    for key in &report.authenticated {
        println!("authenticated {key}");
    }
    for key in &report.refused {
        eprintln!(
            "refused {key}: it fails its integrity check (delete it, or restore it from a backup)"
        );
    }
    eprintln!(
        "{} records authenticated now, {} were already, {} refused",
        report.authenticated.len(),
        report.already,
        report.refused.len()
    );
    Ok(if report.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
