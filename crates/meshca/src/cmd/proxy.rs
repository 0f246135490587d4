//! `meshca proxy server|client|run`: the flags (or a file) into a
//! [`ProxyConfig`], then `meshca_proxy::run` until SIGTERM or Ctrl-C.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use meshca_pki::GoDuration;
use meshca_proxy::{ProxyConfig, Route, Side};

use crate::{ProxyCommand, ProxyRouteArgs};

pub async fn run(c: ProxyCommand) -> anyhow::Result<ExitCode> {
    let config = match c {
        ProxyCommand::Server(a) => single(Side::Server, a)?,
        ProxyCommand::Client(a) => single(Side::Client, a)?,
        ProxyCommand::Run { config } => load(&config)?,
    };
    config.validate()?;
    meshca_proxy::run(config, stop_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

fn load(path: &Path) -> anyhow::Result<ProxyConfig> {
    let bytes = meshca_files::read_limited(path, 1024 * 1024)?;
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    Ok(ProxyConfig::parse(text, &path.display().to_string())?)
}

fn single(side: Side, a: ProxyRouteArgs) -> anyhow::Result<ProxyConfig> {
    let target = a
        .target
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--target: {e}"))?;
    let mut route = Route::new(
        match side {
            Side::Server => "server",
            Side::Client => "client",
        },
        side,
        a.listen,
        target,
        a.certs,
    );
    route.allow = a
        .allow
        .iter()
        .map(|r| r.parse().map_err(|e| anyhow::anyhow!("--allow {r:?}: {e}")))
        .collect::<anyhow::Result<_>>()?;
    route.permissive = a.permissive;
    route.revocation = a.revocation;
    route.proxy_protocol = a.proxy_protocol;
    route.server_id = a.server_id;
    if a.tls12 {
        route.min_version = meshca_tls::TlsVersion::V1_2;
    }
    if let Some(idle) = a.idle_timeout {
        route.idle_timeout = idle;
    }
    Ok(ProxyConfig {
        health: a.health,
        shutdown_grace: a
            .shutdown_grace
            .unwrap_or(GoDuration(meshca_proxy::DEFAULT_SHUTDOWN_GRACE)),
        routes: vec![route],
    })
}

/// SIGTERM (what orchestrators send) or Ctrl-C.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: no new connections");
}
