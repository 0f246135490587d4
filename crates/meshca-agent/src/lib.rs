//! The agent: keeps one identity's `tls.crt`, `tls.key` and `ca.crt` fresh
//! on disk, and tells the service when they change.
//!
//! # Design
//! Trust is never taken on first use: the agent fetches the trust bundle
//! without sending anything secret ([`danger::PinningFetch`]), keeps it only if
//! a root in it has the SHA-256 fingerprint the operator gave
//! (`--ca-fingerprint`, printed by `meshca token create`), and from then on
//! verifies the server against that bundle. The key is made here and never
//! leaves the machine: the CA sees a CSR. The first certificate is bought
//! with the join token; each renewal is authenticated by the current
//! certificate and uses a fresh key. Renewal is at 2/3 of the lifetime, moved
//! by up to ±10% at random so that agents started together do not renew
//! together. The event stream says when to renew early (`rotate`) or to
//! refetch the bundle (`bundle-changed`); it is opened from the last event
//! the server had seen when it issued the certificate (`last_event_id` of
//! the answer), so that a `rotate` made between the bootstrap and the
//! stream is not missed; the bundle is also polled in case the stream is
//! down. The files are one set, switched as one (meshca-files'
//! `..data` layout, that of a Kubernetes Secret volume: a service reading
//! through `..data` never pairs a key with another certificate), key 0600;
//! then the hook runs or the signal is sent. With the server away the agent
//! keeps the files it has and retries with exponential backoff and jitter.
#![forbid(unsafe_code)]

pub mod danger;
mod health;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshca_client::{Client, ClientError};
use meshca_pki::{
    KeyType, PrivateKey, build_csr, describe, fingerprint, parse_certs, to_pem, verify_chain,
};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// Where the CA's root comes from.
#[derive(Debug, Clone)]
pub enum CaPin {
    /// The SHA-256 fingerprint of a root (hex, colons and a `sha256:` prefix allowed).
    Fingerprint(String),
    /// A file holding the trust bundle.
    File(PathBuf),
}

/// What the agent keeps.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `https://host:port` of a meshca server.
    pub server: String,
    /// A join token, for the first certificate (and to recover after expiry).
    pub token: Option<String>,
    /// How to trust the server.
    pub ca: CaPin,
    /// The identity's namespace.
    pub namespace: String,
    /// The identity's name.
    pub name: String,
    /// Extra DNS names to ask for.
    pub dns: Vec<String>,
    /// Extra IPs to ask for.
    pub ips: Vec<String>,
    /// Lifetime to ask for (Go syntax), else the server's default.
    pub ttl: Option<String>,
    /// Key type.
    pub key_type: KeyType,
    /// The directory to keep.
    pub out: PathBuf,
    /// A shell command to run after each change.
    pub on_rotate: Option<String>,
    /// `PID:SIGNAL` to send after each change.
    pub signal: Option<(u32, String)>,
    /// Get one certificate and stop.
    pub once: bool,
    /// Serve `/healthz` and `/metrics` here.
    pub health: Option<std::net::SocketAddr>,
}

/// Why the agent stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum AgentError {
    /// The server's CA does not match the pin: nothing was sent to it.
    Untrusted(String),
    /// The server refused (bad token, wrong identity, policy).
    Refused(String),
    /// The server could not be reached, or failed (5xx): worth retrying.
    Unavailable(String),
    /// The certificate expired and there is no usable token to recover.
    Expired(String),
    /// Files could not be written or read.
    Files(String),
    /// Bad configuration.
    Config(String),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Untrusted(e) => write!(f, "refusing to talk to the server: {e}"),
            AgentError::Refused(e) => write!(f, "{e}"),
            AgentError::Unavailable(e) => write!(f, "{e}"),
            AgentError::Expired(e) => write!(f, "{e}"),
            AgentError::Files(e) => write!(f, "{e}"),
            AgentError::Config(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for AgentError {}

fn normalise_fp(fp: &str) -> String {
    fp.trim()
        .trim_start_matches("sha256:")
        .replace(':', "")
        .to_ascii_lowercase()
}

/// The certificate the agent holds.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    cert_pem: String,
    key_pem: String,
    pub(crate) serial: String,
    /// When it was received (or, for one found on disk, when it was found).
    start: OffsetDateTime,
    pub(crate) not_after: OffsetDateTime,
    /// The last event the server had seen when it began issuing this
    /// certificate (`last_event_id` of its answer; `None` for one found on
    /// disk, or from a server that does not say): the event stream, when it
    /// has seen no event itself, resumes from there, so that a `rotate`
    /// made after the issuance but before the stream was up is not missed.
    events_from: Option<String>,
}

impl Held {
    fn renew_at(&self, jitter: f64) -> OffsetDateTime {
        let life = (self.not_after - self.start).as_seconds_f64().max(1.0);
        // 2/3 of the lifetime, moved by up to ±10% of it.
        let at = life * (2.0 / 3.0 + 0.1 * (2.0 * jitter - 1.0));
        self.start + time::Duration::seconds_f64(at)
    }
}

/// A uniform random number in [0, 1).
fn random_unit() -> f64 {
    let b = meshca_pki::random_bytes(8).unwrap_or_else(|_| vec![0; 8]);
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_le_bytes(a) >> 11) as f64 / (1u64 << 53) as f64
}

struct Agent {
    cfg: AgentConfig,
    bundle_pem: String,
    /// The chain of custody last seen (written next to `ca.crt`).
    custody_pem: String,
    /// The CRLs of the bundle's issuing CAs last fetched (`ca.crl`).
    crl_pem: String,
    roots: Vec<Vec<u8>>,
    /// The bundle in use, for the event stream (which reconnects with it,
    /// to report it and to trust a server of the new root).
    bundle_tx: tokio::sync::watch::Sender<String>,
}

/// The header an agent reports the fingerprint of its bundle in (the CA
/// counts who holds the new bundle before a root rotation activates).
const BUNDLE_HEADER: &str = "x-meshca-bundle";

fn bundle_fingerprint_of(pem: &str) -> String {
    meshca_pki::bundle_fingerprint(&parse_certs(pem.as_bytes()).unwrap_or_default())
}

/// The environment variable a join token may come in; never passed on to
/// the hook or the signal's `kill`.
pub const TOKEN_ENV: &str = "MESHCA_TOKEN";

/// Runs the agent until it is stopped (or once, with `--once`).
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    meshca_pki::Identity::new(&cfg.namespace, &cfg.name)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    // An existing directory first: a ca.crt found there is trusted only if
    // no one else could have put it there. A new one is made only once the
    // server is trusted.
    let existed = cfg.out.exists();
    if existed {
        check_writable(&cfg.out)?;
    }
    let Trust {
        bundle_pem,
        custody_pem,
    } = establish_trust(&cfg).await?;
    if !existed {
        check_writable(&cfg.out)?;
    }
    let roots =
        parse_certs(bundle_pem.as_bytes()).map_err(|e| AgentError::Untrusted(e.to_string()))?;
    let cfg_out = cfg.out.clone();
    let mut agent = Agent {
        cfg,
        bundle_tx: tokio::sync::watch::channel(bundle_pem.clone()).0,
        bundle_pem,
        custody_pem,
        crl_pem: std::fs::read_to_string(cfg_out_crl(&cfg_out)).unwrap_or_default(),
        roots,
    };
    // What services read must be what the pin vouches for, from the start:
    // a ca.crt that held more (a root put there by someone else) is
    // rewritten now, not at the next renewal.
    if matches!(agent.cfg.ca, CaPin::Fingerprint(_)) {
        let on_disk = std::fs::read_to_string(agent.cfg.out.join("ca.crt")).ok();
        if on_disk.is_some_and(|t| t != agent.bundle_pem) {
            tracing::warn!(
                "{} held roots --ca-fingerprint does not vouch for; rewritten with those it does",
                agent.cfg.out.join("ca.crt").display()
            );
            meshca_files::write_set_atomic(
                &agent.cfg.out,
                &[
                    (
                        CUSTODY_FILE,
                        agent.custody_pem.as_bytes(),
                        meshca_files::PUBLIC_MODE,
                    ),
                    (
                        "ca.crt",
                        agent.bundle_pem.as_bytes(),
                        meshca_files::PUBLIC_MODE,
                    ),
                ],
            )
            .map_err(|e| AgentError::Files(e.to_string()))?;
        }
    }
    // The CRLs next to ca.crt from the start (a server away keeps the last).
    agent.refresh_crl().await;

    let mut held = match agent.on_disk() {
        Some(h) => {
            tracing::info!(serial = %h.serial, not_after = %h.not_after, "reusing the certificate already in {}", agent.cfg.out.display());
            h
        }
        None => {
            let mut backoff = Duration::from_secs(1);
            let h = loop {
                match agent.bootstrap().await {
                    Ok(h) => break h,
                    // The server away at start: wait for it, unless asked for one try.
                    Err(AgentError::Unavailable(e)) if !agent.cfg.once => {
                        tracing::warn!(
                            "cannot get the first certificate yet, retrying in {backoff:?}: {e}"
                        );
                        tokio::time::sleep(backoff.mul_f64(0.5 + random_unit())).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                    Err(e) => return Err(e),
                }
            };
            agent.write(&h)?;
            agent.notify().await;
            h
        }
    };
    // A pinned start kept only what the pin vouches for; the rest of the
    // bundle (a root that is not linked, say one added while this agent
    // was away) now comes over a connection verified against it.
    if matches!(agent.cfg.ca, CaPin::Fingerprint(_)) {
        agent.refresh_bundle().await;
    }
    // From here on the certificate renews itself: the token is not kept
    // around for anyone who can read this process's memory (or its event
    // follower's copy of the config). A certificate that expires while the
    // server is away needs a new token, as the error then says.
    agent.cfg.token = None;
    if agent.cfg.once {
        return Ok(());
    }
    let (tx, mut rx) = mpsc::channel::<Nudge>(16);
    let held_now = Arc::new(std::sync::Mutex::new(held.clone()));
    let renewals = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(addr) = agent.cfg.health {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Config(format!("cannot listen on {addr} for health: {e}")))?;
        tokio::spawn(health::serve(listener, held_now.clone(), renewals.clone()));
    }
    tokio::spawn(follow_events(
        agent.cfg.clone(),
        agent.bundle_tx.subscribe(),
        held_now.clone(),
        tx,
    ));
    let mut jitter = random_unit();
    let mut backoff = Duration::from_secs(1);
    let mut bundle_poll = tokio::time::interval(Duration::from_secs(300));
    bundle_poll.tick().await;
    let mut crl_poll = tokio::time::interval(CRL_POLL);
    crl_poll.tick().await;
    loop {
        let due = held.renew_at(jitter);
        let step = next_step(OffsetDateTime::now_utc(), due);
        let renew = tokio::select! {
            () = tokio::time::sleep(step) => OffsetDateTime::now_utc() >= due,
            Some(n) = rx.recv() => match n {
                Nudge::Rotate => {
                    // Spread a rotation of many agents over a window.
                    let window = ((held.not_after - held.start).as_seconds_f64() / 10.0).clamp(0.0, 30.0);
                    tokio::time::sleep(Duration::from_secs_f64(window * random_unit())).await;
                    true
                }
                Nudge::Bundle => {
                    agent.refresh_bundle().await;
                    false
                }
                Nudge::Resync => {
                    agent.refresh_bundle().await;
                    // Spread like a rotation: a reset may reach many agents.
                    let window = ((held.not_after - held.start).as_seconds_f64() / 10.0).clamp(0.0, 30.0);
                    tokio::time::sleep(Duration::from_secs_f64(window * random_unit())).await;
                    true
                }
            },
            _ = bundle_poll.tick() => {
                agent.refresh_bundle().await;
                false
            }
            _ = crl_poll.tick() => {
                agent.refresh_crl().await;
                false
            }
        };
        if !renew {
            continue;
        }
        match agent.renew(&held).await {
            Ok(new) => {
                if let Err(e) = agent.write(&new) {
                    tracing::error!("{e}; keeping the current files and retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                    continue;
                }
                tracing::info!(serial = %new.serial, not_after = %new.not_after, "renewed");
                held = new;
                *held_now.lock().unwrap_or_else(|e| e.into_inner()) = held.clone();
                renewals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                agent.notify().await;
                jitter = random_unit();
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                let left = held.not_after - OffsetDateTime::now_utc();
                tracing::warn!(
                    seconds_left = left.whole_seconds(),
                    "renewal failed, retrying in {backoff:?}: {e}"
                );
                if let AgentError::Expired(_) = e {
                    return Err(e);
                }
                let sleep = backoff.mul_f64(0.5 + random_unit());
                tokio::time::sleep(sleep).await;
                // Never wait longer than a quarter of the time left (and at
                // most a minute): the closer to expiry, the more often to try.
                let left = (held.not_after - OffsetDateTime::now_utc()).as_seconds_f64();
                let cap = Duration::from_secs_f64((left / 4.0).clamp(1.0, 60.0));
                backoff = (backoff * 2).min(cap);
                // Not due again until the backoff passes: pretend it is due now.
                held.start = OffsetDateTime::now_utc()
                    - (held.not_after - OffsetDateTime::now_utc()).max(time::Duration::ZERO) * 2;
            }
        }
    }
}

/// Longest sleep between two looks at the wall clock.
const MAX_STEP: Duration = Duration::from_secs(30);

/// How long to sleep before looking at the clock again: until `due`, but at
/// most [`MAX_STEP`], so that a wall clock that jumps forward (a suspended VM
/// resumed, NTP stepping) is noticed within 30 s instead of letting the
/// certificate expire before a long sleep ends. Zero when `due` has passed.
fn next_step(now: OffsetDateTime, due: OffsetDateTime) -> Duration {
    Duration::try_from((due - now).max(time::Duration::ZERO))
        .unwrap_or(Duration::ZERO)
        .min(MAX_STEP)
}

enum Nudge {
    Rotate,
    Bundle,
    /// The server said this agent missed events (`reset`): whatever it
    /// missed, fetching the bundle and renewing now covers it.
    Resync,
}

fn check_writable(out: &Path) -> Result<(), AgentError> {
    if out.exists() && !out.is_dir() {
        return Err(AgentError::Files(format!(
            "--out {} is not a directory",
            out.display()
        )));
    }
    if !out.exists() {
        meshca_files::create_private_dir(out).map_err(|e| AgentError::Files(e.to_string()))?;
    }
    let probe = out.join(".meshca-agent-probe");
    meshca_files::write_atomic(&probe, b"", 0o600)
        .map_err(|e| AgentError::Files(format!("{} is not writable: {e}", out.display())))?;
    // Who this agent runs as: the owner of the file it just made.
    let me = std::fs::metadata(&probe).map(|m| m.uid());
    let _ = std::fs::remove_file(&probe);
    let me = me.map_err(|e| AgentError::Files(format!("{}: {e}", out.display())))?;
    let meta =
        std::fs::metadata(out).map_err(|e| AgentError::Files(format!("{}: {e}", out.display())))?;
    // Whoever else may write here could swap ca.crt (what the service
    // trusts) or the key: such a directory is refused before anything in
    // it is read.
    if meta.uid() != me {
        return Err(AgentError::Files(format!(
            "--out {} belongs to uid {}, not to the user this agent runs as (uid {me}): that user could replace ca.crt or the key; give a directory of the agent's own",
            out.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(AgentError::Files(format!(
            "--out {} is writable by group or others (mode {:04o}): they could replace ca.crt or the key; run `chmod go-w {}`",
            out.display(),
            meta.mode() & 0o7777,
            out.display()
        )));
    }
    // The files themselves live in the directory `..data` names: whoever
    // else may write there could swap them just as well.
    let set = meshca_files::set_generation(out).map_err(|e| AgentError::Files(e.to_string()))?;
    if let Some(set) = set {
        let meta = std::fs::metadata(&set)
            .map_err(|e| AgentError::Files(format!("{}: {e}", set.display())))?;
        if meta.uid() != me {
            return Err(AgentError::Files(format!(
                "--out {}: the directory of its files, {}, belongs to uid {}, not to the user this agent runs as (uid {me}): that user could replace ca.crt or the key; give a directory of the agent's own",
                out.display(),
                set.display(),
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(AgentError::Files(format!(
                "--out {}: the directory of its files, {}, is writable by group or others (mode {:04o}): they could replace ca.crt or the key; run `chmod go-w {}`",
                out.display(),
                set.display(),
                meta.mode() & 0o7777,
                set.display()
            )));
        }
    }
    Ok(())
}

/// Where the agent keeps the chain of custody it was shown, next to
/// `ca.crt`: what lets a restarted agent re-check `ca.crt` against its pin
/// after the pinned root has been rotated out.
pub const CUSTODY_FILE: &str = "ca-custody.pem";

/// The file the CRLs are kept in, next to `ca.crt` (what meshca-tls and
/// the proxy check client certificates against).
pub const CRL_FILE: &str = "ca.crl";

/// The id of the last event the server had published when it issued the
/// certificate of the set: an agent restarted from its files resumes its
/// event stream there, so a `rotate` made while it was down (or before its
/// stream opened) still reaches it.
pub const EVENTS_FILE: &str = "events-from";

/// How often the CRLs are fetched: with the CA's own CRL remade at once on
/// a revocation and meshca-tls reloading within a second, a revoked peer
/// is refused by the data plane within about this long.
const CRL_POLL: Duration = Duration::from_secs(20);

fn cfg_out_crl(out: &Path) -> PathBuf {
    out.join(CRL_FILE)
}

/// Most roots taken from an unverified bundle.
const MAX_ROOTS: usize = 16;
/// Most certificates taken from an unverified custody chain: two per
/// rotation, so 512 rotations (a pinned root found in the bundle needs no
/// chain at all). 1,024 certificates of about 700 bytes of PEM each stay
/// within what [`parse_certs`] reads ([`meshca_pki::MAX_CERT_FILE_BYTES`]):
/// a bound above it would be one no chain could ever reach (2,048 was, and
/// a chain past 1 MiB was dropped without a word).
const MAX_CUSTODY: usize = 1024;
/// Largest `ca.crt` or custody file read back: what [`vouched`] reads of a
/// custody chain at most (a larger one is ignored there as here).
const MAX_TRUST_FILE: u64 = meshca_pki::MAX_CERT_FILE_BYTES as u64;

/// `ca.crt` and the custody chain an earlier run wrote, read from one set
/// (they are switched together: a restart between two switches must not
/// judge one bundle by another's chain); `None` without a readable
/// `ca.crt`. A missing or unreadable custody file reads as empty.
fn trust_on_disk(out: &Path) -> Option<(String, String)> {
    let opened = meshca_files::open_set(&[&out.join("ca.crt"), &out.join(CUSTODY_FILE)]).ok()?;
    let [bundle, custody] = <[meshca_files::SetFile; 2]>::try_from(opened).ok()?;
    let bundle = String::from_utf8(bundle.read(MAX_TRUST_FILE).ok()?).ok()?;
    let custody = custody
        .read(MAX_TRUST_FILE)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    Some((bundle, custody))
}

/// What the agent trusts, and the custody links that justified it.
struct Trust {
    bundle_pem: String,
    custody_pem: String,
}

/// Gets the trust bundle: from the pinned file, or checked against the
/// fingerprint (see [`vouched`]): first the `ca.crt` an earlier run wrote,
/// re-checked, else the server's, fetched without verifying the server.
async fn establish_trust(cfg: &AgentConfig) -> Result<Trust, AgentError> {
    match &cfg.ca {
        CaPin::File(p) => std::fs::read_to_string(p)
            .map(|bundle_pem| Trust {
                bundle_pem,
                custody_pem: String::new(),
            })
            .map_err(|e| {
                AgentError::Config(format!("cannot read the CA file {}: {e}", p.display()))
            }),
        CaPin::Fingerprint(fp) => {
            let want = normalise_fp(fp);
            if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(AgentError::Config(format!(
                    "--ca-fingerprint {fp:?} is not a SHA-256 fingerprint (64 hex digits)"
                )));
            }
            // Written by an earlier run? Held to the same rules as the
            // server's answer: a root only the pin vouches for stays.
            if let Some((existing, custody)) = trust_on_disk(&cfg.out) {
                match vouched(&existing, &custody, &want) {
                    Some(t) => return Ok(t),
                    None => tracing::warn!(
                        "{} holds no root that --ca-fingerprint vouches for; fetching the server's bundle",
                        cfg.out.join("ca.crt").display()
                    ),
                }
            }
            let bundle = danger::PinningFetch::bundle(&cfg.server)
                .await
                .map_err(|e| AgentError::Untrusted(e.to_string()))?;
            let custody = danger::PinningFetch::custody(&cfg.server)
                .await
                .map_err(|e| AgentError::Untrusted(e.to_string()))?;
            vouched(&bundle, &custody, &want).ok_or_else(|| {
                AgentError::Untrusted(format!(
                    "no root in the server's trust bundle has fingerprint {want}, and no chain of custody leads from that root to one that does; check --ca-fingerprint against `meshca token create` (after a root rotation without the old root's key, pin the new root)"
                ))
            })
        }
    }
}

/// Of an unverified `bundle`, the roots the pin vouches for: the root whose
/// fingerprint is `want`, and roots its key certified through the custody
/// links, link by link. Never the rest: a man in the middle serving the
/// real root next to its own gets its own root nowhere. `None` when none.
fn vouched(bundle: &str, custody: &str, want: &str) -> Option<Trust> {
    let roots = parse_certs(bundle.as_bytes()).ok()?;
    if roots.len() > MAX_ROOTS {
        tracing::warn!(
            roots = roots.len(),
            "ignoring a trust bundle larger than meshca makes"
        );
        return None;
    }
    // The pinned root in the bundle is trusted by its fingerprint alone;
    // the custody chain is read only to reach the bundle's other roots.
    let links = if custody.trim().is_empty() {
        Vec::new()
    } else {
        match parse_certs(custody.as_bytes()) {
            Ok(links) => links,
            Err(e) => {
                tracing::warn!("ignoring a custody chain that does not parse: {e}");
                Vec::new()
            }
        }
    };
    // An unverified answer is bounded before any signature is checked: a
    // real bundle holds at most three roots, and the chain grows by two
    // certificates per rotation.
    let links = if links.len() > MAX_CUSTODY {
        tracing::warn!(
            links = links.len(),
            "ignoring a custody chain larger than meshca makes"
        );
        Vec::new()
    } else {
        links
    };
    // The pinned root itself: in the bundle, or (rotated out) among the
    // custody chain's earlier roots. Its fingerprint authenticates it.
    let pinned = roots
        .iter()
        .chain(links.iter())
        .find(|c| fingerprint(c) == want)?
        .clone();
    let kept = meshca_pki::reachable_roots(&pinned, &links, &roots);
    if kept.is_empty() {
        return None;
    }
    Some(Trust {
        bundle_pem: kept.iter().map(|d| to_pem("CERTIFICATE", d)).collect(),
        custody_pem: links.iter().map(|d| to_pem("CERTIFICATE", d)).collect(),
    })
}

fn api_err(e: ClientError) -> AgentError {
    if e.is_transient() {
        AgentError::Unavailable(e.to_string())
    } else {
        AgentError::Refused(e.to_string())
    }
}

impl Agent {
    /// A client of the server, verified against the bundle: presenting
    /// `identity` when given, else the join token for a signing call
    /// (`token`), else nothing (the bundle, the CRLs: no secret goes out).
    fn client(&self, identity: Option<&Held>) -> Result<Client, AgentError> {
        self.client_with(identity, true)
    }

    fn anonymous(&self) -> Result<Client, AgentError> {
        self.client_with(None, false)
    }

    fn client_with(&self, identity: Option<&Held>, token: bool) -> Result<Client, AgentError> {
        let mut b = Client::builder(&self.cfg.server)
            .map_err(|e| AgentError::Config(e.to_string()))?
            .trust_pem(self.bundle_pem.as_bytes())
            .map_err(|e| AgentError::Untrusted(e.to_string()))?
            .header(BUNDLE_HEADER, &meshca_pki::bundle_fingerprint(&self.roots));
        if let Some(h) = identity {
            b = b
                .identity_pem(h.cert_pem.as_bytes(), h.key_pem.as_bytes())
                .map_err(|e| AgentError::Files(e.to_string()))?;
        } else if let (true, Some(t)) = (token, &self.cfg.token) {
            b = b.token(t);
        }
        b.build().map_err(|e| AgentError::Config(e.to_string()))
    }

    fn request(&self, csr_pem: &str) -> Result<Value, AgentError> {
        let body = meshca_api::CertRequestBody {
            name: self.cfg.name.clone(),
            namespace: self.cfg.namespace.clone(),
            csr: Some(csr_pem.to_owned()),
            ttl: self.cfg.ttl.clone(),
            profile: None,
            key_type: None,
            dns: self.cfg.dns.clone(),
            ips: self.cfg.ips.clone(),
        };
        serde_json::to_value(&body).map_err(|e| AgentError::Config(e.to_string()))
    }

    async fn sign(&self, identity: Option<&Held>) -> Result<Held, AgentError> {
        let key = PrivateKey::generate(self.cfg.key_type)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let csr = to_pem(
            "CERTIFICATE REQUEST",
            &build_csr(&key).map_err(|e| AgentError::Config(e.to_string()))?,
        );
        let start = OffsetDateTime::now_utc();
        let v = self
            .client(identity)?
            .post("/v1/sign", &self.request(&csr)?)
            .await
            .map_err(api_err)?;
        let cert_pem = v["certificate"]
            .as_str()
            .ok_or_else(|| AgentError::Refused("the answer has no certificate".into()))?
            .to_owned();
        let chain = parse_certs(cert_pem.as_bytes()).map_err(|e| {
            AgentError::Unavailable(format!("the server sent a bad certificate: {e}"))
        })?;
        // Never install what does not verify against the pinned bundle.
        verify_chain(&chain, &self.roots, OffsetDateTime::now_utc())
            .map_err(|e| AgentError::Untrusted(e.to_string()))?;
        let info = describe(&chain[0], start).map_err(|e| AgentError::Refused(e.to_string()))?;
        self.check_answer(&chain[0], &info, &key)?;
        let not_after = OffsetDateTime::parse(
            &info.not_after,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| AgentError::Refused(e.to_string()))?;
        let events_from = answer_event_id(&v);
        Ok(Held {
            cert_pem,
            key_pem: key.to_pem(),
            serial: info.serial,
            start,
            not_after,
            events_from,
        })
    }

    /// What the server answered must be what was asked for: a certificate
    /// of the key just made, for this identity, with the service profile's
    /// usages. A server (or a man in the middle holding a certificate of the
    /// bundle) answering with another identity's certificate gets nothing
    /// installed.
    fn check_answer(
        &self,
        leaf: &[u8],
        info: &meshca_pki::CertInfo,
        key: &PrivateKey,
    ) -> Result<(), AgentError> {
        let refuse = |why: String| {
            AgentError::Untrusted(format!(
                "the server answered with a certificate that {why}; nothing was installed"
            ))
        };
        let spki = meshca_pki::cert_spki(leaf).map_err(|e| refuse(e.to_string()))?;
        if spki != key.public_key_der() {
            return Err(refuse("is not for the key this agent just made".into()));
        }
        let want = format!("/ns/{}/sa/{}", self.cfg.namespace, self.cfg.name);
        let id_ok = info.spiffe_id.as_deref().is_some_and(|id| {
            spiffe_td(&info.uris).is_some_and(|td| id == format!("spiffe://{td}{want}"))
        }) && info
            .uris
            .iter()
            .filter(|u| u.starts_with("spiffe://"))
            .count()
            == 1;
        if !id_ok {
            return Err(refuse(format!(
                "carries {} instead of spiffe://<trust domain>{want}",
                info.spiffe_id.as_deref().unwrap_or("no SPIFFE ID")
            )));
        }
        if info.is_ca || info.profile.as_deref() != Some("service") {
            return Err(refuse(format!(
                "has the usages of {} instead of the service profile (serverAuth and clientAuth, CA:FALSE)",
                info.profile.as_deref().unwrap_or("no meshca profile")
            )));
        }
        Ok(())
    }

    async fn bootstrap(&self) -> Result<Held, AgentError> {
        if self.cfg.token.is_none() {
            return Err(AgentError::Expired(format!(
                "no valid certificate in {} and no --token: create one with `meshca token create {} --namespace {}`",
                self.cfg.out.display(),
                self.cfg.name,
                self.cfg.namespace
            )));
        }
        self.sign(None).await
    }

    async fn renew(&self, held: &Held) -> Result<Held, AgentError> {
        if held.not_after <= OffsetDateTime::now_utc() {
            // Expired while the server was away: only the token can help now.
            return match self.bootstrap().await {
                Ok(h) => Ok(h),
                Err(AgentError::Unavailable(e)) => Err(AgentError::Unavailable(e)),
                Err(e) => Err(AgentError::Expired(format!(
                    "the certificate expired at {} and the token cannot replace it ({e}); create a new one with `meshca token create {} --namespace {}` and restart the agent with it",
                    meshca_pki::rfc3339(held.not_after),
                    self.cfg.name,
                    self.cfg.namespace
                ))),
            };
        }
        self.sign(Some(held)).await
    }

    /// A still-valid set on disk that chains to the trusted bundle.
    fn on_disk(&self) -> Option<Held> {
        // The pair of one set, read through one `..data`: an agent killed
        // and restarted around a switch never takes a key for the wrong
        // certificate.
        let opened = meshca_files::open_set(&[
            &self.cfg.out.join("tls.crt"),
            &self.cfg.out.join("tls.key"),
            &self.cfg.out.join(EVENTS_FILE),
        ])
        .ok()?;
        let [cert, key, events] = <[meshca_files::SetFile; 3]>::try_from(opened).ok()?;
        // Absent (a set written before it existed, a server that gives no
        // id): the stream starts live, as it did.
        let events_from = events
            .read(64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|id| event_id(&id));
        let cert_pem = String::from_utf8(cert.read(1 << 20).ok()?).ok()?;
        let key_pem = String::from_utf8(key.read_secret(1 << 20).ok()?).ok()?;
        let chain = parse_certs(cert_pem.as_bytes()).ok()?;
        let now = OffsetDateTime::now_utc();
        verify_chain(&chain, &self.roots, now).ok()?;
        let key = PrivateKey::from_pem(&key_pem).ok()?;
        if meshca_pki::cert_spki(&chain[0]).ok()? != key.public_key_der() {
            return None;
        }
        let info = describe(&chain[0], now).ok()?;
        if info.spiffe_id.as_deref()
            != Some(&format!(
                "spiffe://{}/ns/{}/sa/{}",
                spiffe_td(&info.uris)?,
                self.cfg.namespace,
                self.cfg.name
            ))
        {
            return None;
        }
        let not_after = OffsetDateTime::parse(
            &info.not_after,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let not_before = OffsetDateTime::parse(
            &info.not_before,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        // The backdating of notBefore is not part of the lifetime the CA gave.
        let start = (not_before + meshca_pki::BACKDATE).min(now);
        Some(Held {
            cert_pem,
            key_pem,
            serial: info.serial,
            start,
            not_after,
            events_from,
        })
    }

    fn write(&self, h: &Held) -> Result<(), AgentError> {
        // The key, the certificate and the bundle switch together: all are
        // on disk in a new set before it replaces the old one, so a full
        // disk leaves the old set intact and no reader ever pairs them with
        // another set's. The CRLs held go in too (a ca.crl of the layout
        // before sets becomes part of the set here).
        let mut files = vec![
            ("tls.key", h.key_pem.as_bytes(), meshca_files::SECRET_MODE),
            ("tls.crt", h.cert_pem.as_bytes(), meshca_files::PUBLIC_MODE),
            (
                "ca.crt",
                self.bundle_pem.as_bytes(),
                meshca_files::PUBLIC_MODE,
            ),
            (
                CUSTODY_FILE,
                self.custody_pem.as_bytes(),
                meshca_files::PUBLIC_MODE,
            ),
        ];
        if !self.crl_pem.is_empty() {
            files.push((CRL_FILE, self.crl_pem.as_bytes(), meshca_files::PUBLIC_MODE));
        }
        // The id goes with the certificate it came with; a certificate of a
        // server that gave none must not keep its predecessor's.
        let events = h.events_from.as_deref().unwrap_or("");
        files.push((EVENTS_FILE, events.as_bytes(), meshca_files::PUBLIC_MODE));
        meshca_files::write_set_atomic(&self.cfg.out, &files)
            .map_err(|e| AgentError::Files(e.to_string()))
    }

    async fn refresh_bundle(&mut self) {
        let Ok(client) = self.anonymous() else {
            return;
        };
        let Ok((status, body)) = client.raw(http::Method::GET, "/v1/bundle", None, &[]).await
        else {
            return;
        };
        let Ok(text) = String::from_utf8(body.to_vec()) else {
            return;
        };
        if !status.is_success() || text == self.bundle_pem {
            return;
        }
        // The custody links that justify the new roots to a restarted agent
        // (over the same verified connection; none from an older server).
        let custody = match client
            .raw(http::Method::GET, "/v1/bundle/custody", None, &[])
            .await
        {
            Ok((st, body)) if st.is_success() => {
                String::from_utf8(body.to_vec()).unwrap_or_default()
            }
            _ => String::new(),
        };
        // The new bundle came over a connection verified with the old one.
        match parse_certs(text.as_bytes()) {
            Ok(roots) => {
                self.roots = roots;
                self.bundle_pem = text;
                self.custody_pem = custody;
                if meshca_files::write_set_atomic(
                    &self.cfg.out,
                    &[
                        (
                            CUSTODY_FILE,
                            self.custody_pem.as_bytes(),
                            meshca_files::PUBLIC_MODE,
                        ),
                        (
                            "ca.crt",
                            self.bundle_pem.as_bytes(),
                            meshca_files::PUBLIC_MODE,
                        ),
                    ],
                )
                .is_ok()
                {
                    tracing::info!("trust bundle changed");
                    self.bundle_tx.send_replace(self.bundle_pem.clone());
                    self.notify().await;
                }
            }
            Err(e) => tracing::warn!("ignoring an unreadable trust bundle: {e}"),
        }
    }

    /// Fetches the CRLs (`/v1/crls`, over a connection verified against the
    /// bundle) and writes `ca.crl` when they changed. Only CRLs that parse
    /// are written; a server away, or an older one without the endpoint,
    /// leaves the file as it is.
    async fn refresh_crl(&mut self) {
        let Ok(client) = self.anonymous() else {
            return;
        };
        let Ok((status, body)) = client.raw(http::Method::GET, "/v1/crls", None, &[]).await else {
            return;
        };
        let Ok(text) = String::from_utf8(body.to_vec()) else {
            return;
        };
        if !status.is_success()
            || text == self.crl_pem
            || !text.contains("-----BEGIN X509 CRL-----")
        {
            return;
        }
        // Into the set, beside the bundle whose issuers signed them (the
        // other files carried over): a file of its own beside the set would
        // not be read with it.
        match meshca_files::write_set_atomic(
            &self.cfg.out,
            &[(CRL_FILE, text.as_bytes(), meshca_files::PUBLIC_MODE)],
        ) {
            Ok(()) => {
                tracing::debug!("CRLs changed");
                self.crl_pem = text;
            }
            Err(e) => tracing::warn!("cannot write {}: {e}", CRL_FILE),
        }
    }

    async fn notify(&self) {
        if let Some(cmd) = &self.cfg.on_rotate {
            match tokio::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .env_remove(TOKEN_ENV)
                .current_dir(&self.cfg.out)
                .output()
                .await
            {
                Ok(out) => {
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    if out.status.success() {
                        tracing::info!(
                            status = %out.status,
                            stdout = %stdout.trim(),
                            stderr = %stderr.trim(),
                            "ran the on-rotate hook"
                        );
                    } else {
                        // The service may still run with the old files: an
                        // error, with what the hook said in the message
                        // itself. Nothing is undone or retried: the new
                        // files are in place and stay (the old certificate
                        // may not be valid much longer), and the next
                        // change runs the hook again.
                        tracing::error!(
                            "the on-rotate hook failed ({}): stdout {:?}, stderr {:?}; the new files are in place and the agent goes on",
                            out.status,
                            stdout.trim(),
                            stderr.trim()
                        );
                    }
                }
                Err(e) => tracing::error!("cannot run the on-rotate hook: {e}"),
            }
        }
        if let Some((pid, sig)) = &self.cfg.signal {
            match tokio::process::Command::new("kill")
                .env_remove(TOKEN_ENV)
                .arg("-s")
                .arg(sig)
                .arg(pid.to_string())
                .status()
                .await
            {
                Ok(s) if s.success() => tracing::info!(pid, signal = %sig, "signalled the service"),
                Ok(s) => tracing::error!(pid, signal = %sig, "kill failed: {s}"),
                Err(e) => tracing::error!("cannot send the signal: {e}"),
            }
        }
    }
}

/// The `last_event_id` of a signing answer, when it is an event id as the
/// server makes them (decimal digits, a `u64`): it goes into a request
/// header, so nothing else is taken.
fn answer_event_id(answer: &Value) -> Option<String> {
    answer["last_event_id"].as_str().and_then(event_id)
}

/// An event id as the server gives it: digits of a u64 (it goes into a
/// request header, so nothing else passes).
fn event_id(id: &str) -> Option<String> {
    let id = id.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && id.parse::<u64>().is_ok())
        .then(|| id.to_owned())
}

fn spiffe_td(uris: &[String]) -> Option<String> {
    uris.iter().find_map(|u| {
        u.strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())
            .map(str::to_owned)
    })
}

/// Follows the event stream with the current certificate; nudges the main
/// loop on `rotate` for this identity and on `bundle-changed`. Reconnects
/// with backoff, resuming from the last event seen; until it has seen one,
/// from the last event the server had seen when it issued the certificate
/// held ([`Held::events_from`]): the first stream opens a moment after the
/// bootstrap, and a `rotate` made in that moment must reach the agent.
async fn follow_events(
    cfg: AgentConfig,
    mut bundle: tokio::sync::watch::Receiver<String>,
    held: Arc<std::sync::Mutex<Held>>,
    tx: mpsc::Sender<Nudge>,
) {
    let mut last: Option<String> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let h = held.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if last.is_none() {
            last.clone_from(&h.events_from);
        }
        // The bundle as it is now: after a root rotation the server's
        // certificate chains to the new root, and the CA counts the agents
        // that hold it.
        let pem = bundle.borrow_and_update().clone();
        let client = Client::builder(&cfg.server)
            .and_then(|b| b.trust_pem(pem.as_bytes()))
            .and_then(|b| b.identity_pem(h.cert_pem.as_bytes(), h.key_pem.as_bytes()))
            .map(|b| b.header(BUNDLE_HEADER, &bundle_fingerprint_of(&pem)))
            .and_then(|b| b.build());
        let opened = match client {
            Ok(client) => client
                .events(last.as_deref())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &opened {
            // A refusal (429: too many streams of this identity) is said, so
            // that a missed rotate has a trace; the schedule still renews.
            tracing::warn!("the event stream is not open (retrying in about {backoff:?}): {e}");
        }
        if let Ok(mut stream) = opened {
            backoff = Duration::from_secs(1);
            let mut new_bundle = false;
            loop {
                let ev = tokio::select! {
                    ev = stream.next() => ev,
                    // A new bundle: reconnect to report it (resuming
                    // from the last event, so nothing is missed).
                    changed = bundle.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        new_bundle = true;
                        break;
                    }
                };
                let Some(Ok(ev)) = ev else { break };
                if ev.id.is_some() {
                    last.clone_from(&ev.id);
                }
                let nudge = match ev.kind.as_str() {
                    "rotate" => {
                        let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        let mine = v["namespace"] == cfg.namespace.as_str()
                            && v["name"] == cfg.name.as_str();
                        mine.then_some(Nudge::Rotate)
                    }
                    "bundle-changed" => Some(Nudge::Bundle),
                    "reset" => {
                        let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        tracing::warn!(
                            "the CA says this agent missed events (reset: {}): fetching the bundle again and renewing",
                            v["reason"].as_str().unwrap_or("no reason given")
                        );
                        Some(Nudge::Resync)
                    }
                    _ => None,
                };
                if let Some(n) = nudge
                    && tx.send(n).await.is_err()
                {
                    return;
                }
            }
            if new_bundle {
                continue;
            }
        }
        tokio::time::sleep(backoff.mul_f64(0.5 + random_unit())).await;
        // Short cap: a missed rotate event costs a renewal only as late as the schedule.
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn held(life_secs: i64) -> Held {
        let start = OffsetDateTime::now_utc();
        Held {
            cert_pem: String::new(),
            key_pem: String::new(),
            serial: "01".into(),
            start,
            not_after: start + time::Duration::seconds(life_secs),
            events_from: None,
        }
    }

    #[test]
    fn renewal_is_at_two_thirds_within_the_jitter() {
        let h = held(3000);
        for (jitter, lo, hi) in [
            (0.0, 1699.0, 1701.0),
            (0.5, 1999.0, 2001.0),
            (0.999, 2298.0, 2301.0),
        ] {
            let at = (h.renew_at(jitter) - h.start).as_seconds_f64();
            assert!(at > lo && at < hi, "jitter {jitter}: {at}");
        }
    }

    #[test]
    fn clock_jumps_are_noticed_within_a_step() {
        let h = held(24 * 3600);
        let due = h.renew_at(0.5);
        // Far from due: wake after at most 30 s to look again.
        assert_eq!(next_step(h.start, due), MAX_STEP);
        // The wall clock jumped past the renewal point (or past expiry): renew now.
        assert_eq!(
            next_step(due + time::Duration::hours(3), due),
            Duration::ZERO
        );
        // Close to due: sleep exactly until then.
        assert_eq!(
            next_step(due - time::Duration::seconds(5), due),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn the_event_id_of_an_answer_is_taken_only_when_it_is_one() {
        let id = |v: Value| answer_event_id(&serde_json::json!({ "last_event_id": v }));
        assert_eq!(id("1764633600123".into()), Some("1764633600123".into()));
        assert_eq!(id("0".into()), Some("0".into()));
        for bad in ["", "-1", "12a", "1\r\nx-evil: 1", "99999999999999999999999"] {
            assert_eq!(id(bad.into()), None, "{bad:?}");
        }
        assert_eq!(id(serde_json::json!(12)), None, "a number, not a string");
        assert_eq!(
            answer_event_id(&serde_json::json!({})),
            None,
            "an older server"
        );
    }

    #[test]
    fn fingerprints_are_normalised() {
        assert_eq!(normalise_fp("sha256:AB:cd"), "abcd");
        let u = random_unit();
        assert!((0.0..1.0).contains(&u));
    }

    /// A root, its signing CA, and its DER.
    fn root(label: &str) -> (Vec<u8>, meshca_pki::SigningCa) {
        let now = OffsetDateTime::now_utc();
        let key = PrivateKey::generate(meshca_pki::KeyType::EcdsaP256).unwrap();
        let td = meshca_pki::TrustDomain::default();
        let der =
            meshca_pki::generate_root(&key, &td, label, Duration::from_secs(86_400), now).unwrap();
        let ca = meshca_pki::SigningCa::new(der.clone(), key, label, now).unwrap();
        (der, ca)
    }

    fn pems(ders: &[&Vec<u8>]) -> String {
        ders.iter().map(|d| to_pem("CERTIFICATE", d)).collect()
    }

    #[test]
    fn a_pin_vouches_for_its_root_and_what_its_custody_chain_reaches_only() {
        let now = OffsetDateTime::now_utc();
        let (r1, ca1) = root("one");
        let (r2, _) = root("two");
        let (evil, _) = root("evil");
        let want = fingerprint(&r1);
        // The pinned root next to another: only the pinned one is kept.
        let t = vouched(&pems(&[&r1, &evil]), "", &want).unwrap();
        assert_eq!(t.bundle_pem, pems(&[&r1]));
        assert_eq!(t.custody_pem, "");
        // Rotated out of the bundle: reached through its link, the earlier
        // root travelling in the chain; the chain is kept as it came.
        let l12 = meshca_pki::link_roots(&ca1, &r2, now).unwrap();
        let chain = pems(&[&r1, &l12]);
        let t = vouched(&pems(&[&r2, &evil]), &chain, &want).unwrap();
        assert_eq!(t.bundle_pem, pems(&[&r2]));
        assert_eq!(t.custody_pem, chain);
        // No link, or a pin nobody offered: nothing.
        assert!(vouched(&pems(&[&r2, &evil]), &pems(&[&r1]), &want).is_none());
        assert!(vouched(&pems(&[&r1]), "", &fingerprint(&r2)).is_none());
        assert!(vouched("not pem", "", &want).is_none());
        // Bounds on unverified answers, at the bound and one past it.
        let many = |n: usize| pems(&vec![&r1; n]);
        assert!(vouched(&many(MAX_ROOTS), "", &want).is_some());
        assert!(vouched(&many(MAX_ROOTS + 1), "", &want).is_none());
        let mut long = vec![&r1, &l12];
        long.resize(MAX_CUSTODY, &l12);
        assert!(vouched(&pems(&[&r2]), &pems(&long), &want).is_some());
        long.push(&l12);
        assert!(vouched(&pems(&[&r2]), &pems(&long), &want).is_none());
    }
}
