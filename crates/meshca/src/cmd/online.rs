//! The commands that talk to a running server (`--server URL`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use meshca_client::Client;
use serde_json::{Value, json};

use crate::{CaCommand, IssueArgs, ListArgs, RevokeArgs, RotateArgs, TokenCommand};

/// Where to connect and with which credentials.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The admin credentials, opened as one set: `ca rotate` reissues them while
/// a command may be reading them, and a new key must never pair with the old
/// certificate. The key is refused when group or others can read it (as
/// everywhere meshca reads a private key).
fn client(t: &Target) -> anyhow::Result<Client> {
    let files = meshca_files::open_set(&[&t.ca, &t.cert, &t.key])
        .with_context(|| "opening the client credentials (set them with --ca, --cert, --key)")?;
    let Ok([ca, cert, key]) = <[meshca_files::SetFile; 3]>::try_from(files) else {
        anyhow::bail!("the client credentials did not open as three files");
    };
    let ca = ca
        .read(1 << 20)
        .with_context(|| format!("reading the ca {} (set it with --ca)", t.ca.display()))?;
    let cert = cert
        .read(1 << 20)
        .with_context(|| format!("reading the cert {} (set it with --cert)", t.cert.display()))?;
    let key = key
        .read_secret(1 << 20)
        .with_context(|| format!("reading the key {} (set it with --key)", t.key.display()))?;
    Ok(Client::builder(&t.url)?
        .trust_pem(&ca)?
        .identity_pem(&cert, &key)?
        .build()?)
}

pub async fn issue(t: &Target, a: IssueArgs) -> anyhow::Result<ExitCode> {
    if a.out.exists() && !a.out.is_dir() {
        anyhow::bail!(
            "--out {} is a file; give a directory to write tls.crt, tls.key and ca.crt into",
            a.out.display()
        );
    }
    let mut body = meshca_api::CertRequestBody {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        csr: None,
        ttl: a.ttl.clone(),
        profile: Some(a.profile.clone()),
        key_type: None,
        dns: a.dns.clone(),
        ips: a.ips.clone(),
    };
    let path = match &a.csr {
        Some(p) => {
            body.csr = Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading the CSR {}", p.display()))?,
            );
            "/v1/sign"
        }
        None => {
            body.key_type = a.key_type.clone();
            "/v1/issue"
        }
    };
    let v = client(t)?.post(path, &serde_json::to_value(&body)?).await?;
    let text = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .with_context(|| format!("the answer lacks {k}"))
    };
    let (crt, _, _) = super::issue::write_out(
        &a.out,
        &text("certificate")?,
        &text("ca_bundle")?,
        v["private_key"].as_str(),
    )?;
    if a.json {
        let mut out = v.clone();
        out.as_object_mut().map(|o| o.remove("private_key"));
        super::print_json(&out)?;
    } else {
        println!(
            "Issued {} serial {}, expires {}",
            text("spiffe_id")?,
            text("serial")?,
            text("not_after")?
        );
        println!(
            "  wrote {} and the rest of {}",
            crt.display(),
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Records asked for per page when listing (the API's maximum).
const PAGE: usize = 5000;

pub async fn list(t: &Target, a: ListArgs) -> anyhow::Result<ExitCode> {
    let mut query = Vec::new();
    if let (Some(ns), Some(n)) = (&a.namespace, &a.name) {
        query.push(format!("identity={ns}/{n}"));
    }
    if let Some(s) = &a.status {
        query.push(format!("status={s}"));
    }
    if let Some(w) = &a.expiring_within {
        query.push(format!("expiring_within={w}"));
    }
    if a.limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    // Page after page (the API's pages are bounded), up to --limit.
    let c = client(t)?;
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut after = a.after.clone();
    let more = loop {
        let want = a.limit.map_or(PAGE, |l| (l - rows.len()).min(PAGE));
        let mut q = query.clone();
        q.push(format!("limit={want}"));
        if let Some(s) = &after {
            q.push(format!("after={s}"));
        }
        let v = c.get(&format!("/v1/certificates?{}", q.join("&"))).await?;
        if let Some(page) = v["certificates"].as_array() {
            rows.extend(page.iter().cloned());
        }
        after = v["next"].as_str().map(str::to_owned);
        if after.is_none() || a.limit.is_some_and(|l| rows.len() >= l) {
            break after;
        }
    };
    // A whole listing reads as the offline one: soonest expiry first.
    if a.limit.is_none() && a.after.is_none() {
        rows.sort_by(|x, y| x["not_after"].as_str().cmp(&y["not_after"].as_str()));
    }
    if let Some(next) = &more {
        eprintln!("more certificates follow: --after {next}");
    }
    let rows = &rows;
    if a.json {
        super::print_json(rows)?;
    } else {
        println!(
            "{:<34} {:<32} {:<9} {:<20} STATUS",
            "SERIAL", "IDENTITY", "PROFILE", "NOT AFTER"
        );
        for r in rows {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            println!(
                "{:<34} {:<32} {:<9} {:<20} {}",
                s("serial"),
                format!("{}/{}", s("namespace"), s("name")),
                s("profile"),
                s("not_after"),
                s("status")
            );
        }
        eprintln!("{} certificate(s)", rows.len());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn revoke(t: &Target, a: RevokeArgs) -> anyhow::Result<ExitCode> {
    let serial: meshca_pki::Serial = a.serial.parse()?;
    let v = client(t)?
        .post(
            &format!("/v1/certificates/{serial}/revoke"),
            &serde_json::to_value(meshca_api::RevokeBody {
                reason: Some(a.reason.clone()),
            })?,
        )
        .await?;
    if a.json {
        super::print_json(&v)?;
    } else if v["already_revoked"] == Value::Bool(true) {
        println!("{serial} was already revoked; nothing changed");
    } else {
        println!(
            "Revoked {serial} ({}/{})",
            v["namespace"].as_str().unwrap_or(""),
            v["name"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn token(t: &Target, c: TokenCommand) -> anyhow::Result<ExitCode> {
    let client = client(t)?;
    match c {
        TokenCommand::Create(a) => {
            let v = client
                .post(
                    "/v1/tokens",
                    &serde_json::to_value(meshca_api::TokenRequestBody {
                        name: a.name.clone(),
                        namespace: a.namespace.clone(),
                        ttl: Some(a.ttl.clone()),
                        uses: Some(a.uses),
                    })?,
                )
                .await?;
            if a.json {
                super::print_json(
                    &json!({"token": v["token"], "ca_fingerprint": v["ca_fingerprint"], "expires_at": v["expires_at"], "id": v["id"]}),
                )?;
            } else {
                // The token alone on stdout, for `TOKEN=$(meshca token create web)`.
                println!("{}", v["token"].as_str().unwrap_or(""));
                eprintln!(
                    "ca fingerprint: {}",
                    v["ca_fingerprint"].as_str().unwrap_or("")
                );
                eprintln!("expires at:     {}", v["expires_at"].as_str().unwrap_or(""));
            }
        }
        TokenCommand::List { json } => {
            let v = client.get("/v1/tokens").await?;
            if json {
                super::print_json(&v["tokens"])?;
            } else {
                for tk in v["tokens"].as_array().into_iter().flatten() {
                    println!(
                        "{} {}/{} uses {}/{} expires {}",
                        tk["id"].as_str().unwrap_or(""),
                        tk["namespace"].as_str().unwrap_or(""),
                        tk["name"].as_str().unwrap_or(""),
                        tk["uses"],
                        tk["uses_allowed"],
                        tk["expires_at"].as_str().unwrap_or("")
                    );
                }
            }
        }
        TokenCommand::Delete { id } => {
            client.delete(&format!("/v1/tokens/{id}")).await?;
            println!("Deleted token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rotate(t: &Target, a: RotateArgs) -> anyhow::Result<ExitCode> {
    let v = match (&a.name, a.all) {
        (_, true) => client(t)?.post("/v1/rotate", &json!({})).await?,
        (Some(n), false) => {
            client(t)?
                .post(
                    &format!("/v1/identities/{}/{n}/rotate", a.namespace),
                    &json!({}),
                )
                .await?
        }
        (None, false) => anyhow::bail!("give NAME or --all"),
    };
    let n = v["rotating"].as_array().map_or(0, Vec::len);
    println!(
        "Asked {n} identit{} to renew",
        if n == 1 { "y" } else { "ies" }
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn ca(t: &Target, c: CaCommand) -> anyhow::Result<ExitCode> {
    let json = match c {
        CaCommand::Status { json } => json,
        CaCommand::Rotate {
            step: crate::RotateStep::Auto,
            window,
            key_type,
            stage_timeout,
            ..
        } => {
            return rotate_auto(t, window, key_type, stage_timeout).await;
        }
        CaCommand::Rotate {
            step,
            force,
            window,
            key_type,
            json,
            import_root,
            import_key,
            import_intermediate,
            import_intermediate_key,
            ..
        } => {
            let mut body =
                serde_json::json!({"force": force, "window": window, "key_type": key_type});
            if let Some(root) = &import_root {
                // The files go to the CA over the admin's mTLS connection.
                let read = |p: &Option<PathBuf>| -> anyhow::Result<Option<String>> {
                    p.as_ref()
                        .map(|p| {
                            let bytes = meshca_files::read_limited(p, 1 << 20)?;
                            String::from_utf8(bytes)
                                .with_context(|| format!("{} is not PEM text", p.display()))
                        })
                        .transpose()
                };
                let read_secret = |p: &Option<PathBuf>| -> anyhow::Result<Option<String>> {
                    p.as_ref()
                        .map(|p| {
                            let bytes = meshca_files::read_secret(p, 1 << 20)?;
                            String::from_utf8(bytes)
                                .with_context(|| format!("{} is not PEM text", p.display()))
                        })
                        .transpose()
                };
                body["import"] = serde_json::json!({
                    "root_cert": read(&Some(root.clone()))?,
                    "root_key": read_secret(&import_key)?,
                    "intermediate_cert": read(&import_intermediate)?,
                    "intermediate_key": read_secret(&import_intermediate_key)?,
                });
            }
            let v = client(t)?
                .post(&format!("/v1/ca/rotate/{}", step.as_str()), &body)
                .await?;
            if json {
                super::print_json(&v)?;
            } else {
                println!("{}", v["done"].as_str().unwrap_or_default());
                print_rotation(&v["rotation"]);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let v = client(t)?.get("/v1/ca").await?;
    if json {
        super::print_json(&v)?;
    } else {
        super::records::print_ca_status(&v);
    }
    Ok(ExitCode::SUCCESS)
}

/// A rotation status for people.
pub fn print_rotation(r: &Value) {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_owned();
    println!(
        "rotation: {} (old {}, new {}); {} of {} identities still on the old root; next: {}",
        s(&r["stage"]),
        s(&r["old"]),
        s(&r["new"]),
        r["remaining_under_old"],
        r["identities"],
        s(&r["next"])
    );
}

/// `ca rotate auto`: takes each stage once `ca status` says it is safe
/// (every live agent holds the new bundle; no identity's newest certificate
/// on the old root), from wherever the rotation is. The server enforces the
/// same checks: this loop only waits for them.
async fn rotate_auto(
    t: &Target,
    window: Option<String>,
    key_type: Option<String>,
    stage_timeout: Option<String>,
) -> anyhow::Result<ExitCode> {
    let limit = match &stage_timeout {
        Some(d) => meshca_pki::parse_duration(d).context("--stage-timeout")?,
        None => std::time::Duration::from_secs(3600),
    };
    // The credentials are read again for every call: activation replaces
    // the admin files and the server's certificate under this loop.
    let started = std::time::Instant::now();
    loop {
        let status = client(t)?.get("/v1/ca").await?;
        let r = &status["rotation"];
        let stage = r["stage"].as_str().unwrap_or_default().to_owned();
        let step = match stage.as_str() {
            "idle" => "prepare",
            "prepared" => "activate",
            "activated" => "retire",
            other => anyhow::bail!("unexpected rotation stage {other:?}"),
        };
        if step != "prepare" {
            let since = std::time::Instant::now();
            loop {
                let r = client(t)?.get("/v1/ca").await?["rotation"].clone();
                if r["safe_to_continue"] == true {
                    break;
                }
                if since.elapsed() > limit {
                    anyhow::bail!(
                        "the rotation is not safe to continue after {}: {}; it stays at stage {stage} (run `meshca ca rotate auto` again to resume, or abort)",
                        meshca_pki::format_duration(limit),
                        r["next"].as_str().unwrap_or_default()
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        let t0 = std::time::Instant::now();
        let body = json!({"window": window, "key_type": key_type});
        let v = client(t)?
            .post(&format!("/v1/ca/rotate/{step}"), &body)
            .await?;
        eprintln!(
            "[{:>6.1}s] {step}: {} ({} ms)",
            started.elapsed().as_secs_f64(),
            v["done"].as_str().unwrap_or_default(),
            t0.elapsed().as_millis()
        );
        if step == "retire" {
            break;
        }
    }
    let status = client(t)?.get("/v1/ca").await?;
    print_rotation(&status["rotation"]);
    println!(
        "root rotation done in {:.1}s; the trust bundle holds the new root alone",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
