//! `meshca agent`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use meshca_agent::{AgentConfig, CaPin};

use crate::AgentArgs;

pub async fn run(
    server: Option<String>,
    ca_file: Option<PathBuf>,
    a: AgentArgs,
) -> anyhow::Result<ExitCode> {
    let Some(server) = server else {
        bail!("the agent needs --server https://HOST:9443 (or MESHCA_SERVER)");
    };
    let ca = match (a.ca_fingerprint, ca_file) {
        (Some(fp), _) => CaPin::Fingerprint(fp),
        (None, Some(f)) => CaPin::File(f),
        (None, None) => bail!(
            "give --ca-fingerprint FP (printed by `meshca token create`) or --ca FILE: the agent never trusts a server on first use"
        ),
    };
    let signal = a
        .signal
        .map(|s| {
            let (pid, sig) = s
                .split_once(':')
                .with_context(|| format!("--signal {s:?} must be PID:SIGNAL, e.g. 1234:HUP"))?;
            let pid: u32 = pid
                .parse()
                .with_context(|| format!("--signal {s:?}: {pid:?} is not a process id"))?;
            anyhow::Ok((pid, sig.to_owned()))
        })
        .transpose()?;
    let token = match (a.token, a.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => {
            let bytes = meshca_files::read_secret(&f, 4096).with_context(|| {
                format!("reading the join token from --token-file {}", f.display())
            })?;
            let text = String::from_utf8(bytes)
                .with_context(|| format!("--token-file {}: the token is not text", f.display()))?;
            Some(text.trim().to_owned())
        }
        (None, None) => None,
    };
    let cfg = AgentConfig {
        server,
        token,
        ca,
        namespace: a.namespace,
        name: a.name,
        dns: a.dns,
        ips: a.ips,
        ttl: a.ttl,
        key_type: a.key_type.parse()?,
        out: a.out,
        on_rotate: a.on_rotate,
        signal,
        once: a.once,
        health: a.health,
    };
    meshca_agent::run(cfg).await?;
    Ok(ExitCode::SUCCESS)
}
