//! HashiCorp Vault / OpenBao PKI as meshca's upstream issuer.
//!
//! # Design
//! Where the CA keys must stay in Vault, meshca is the registration
//! authority: it authenticates the workload, applies its policy, records and
//! announces; Vault's PKI engine signs. [`VaultIssuer`] implements
//! [`meshca_issuer::Issuer`], so everything above it (the API, tokens,
//! records, events, the agent) works as with the built-in CA.
//!
//! - A CSR goes to `<mount>/sign/<role>`; a key the caller wants generated
//!   comes from `<mount>/issue/<role>`. The names are meshca's decision:
//!   meshca sends the common name, DNS, IP and URI SANs it decided, and the
//!   role must not copy names from the CSR (`use_csr_sans=false`,
//!   `use_csr_common_name=false`). [`VaultIssuer::connect`] reads every role
//!   in use and refuses to start when a role would, naming the setting; each
//!   answer is checked again (its key is the caller's, its names are exactly
//!   the ones asked for) and a certificate that fails is revoked in Vault and
//!   never handed out.
//! - TTLs are held to the role's `max_ttl` by meshca, with an error naming
//!   it, because Vault would silently cut them.
//! - The trust bundle and chain come from Vault (the chains of the mount's
//!   issuers). A background task reads them again every `refresh`, notices a
//!   new issuer and moves [`Issuer::bundle_changes`], so the server announces
//!   `bundle-changed`; it also renews the token at two thirds of its life (or
//!   logs in again with AppRole) and keeps the health that `/readyz` shows.
//! - Errors are typed ([`VaultError`]): unreachable, sealed (from
//!   `sys/seal-status`, not from prose), denied, missing, refused (Vault's
//!   reason quoted), unexpected answer.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), meshca_vault::VaultError> {
//! use meshca_vault::{VaultIssuer, VaultSettings};
//! let mut settings = VaultSettings::new("https://vault:8200", "meshca");
//! settings.token_file = Some("/run/secrets/vault-token".into());
//! let td = meshca_pki::TrustDomain::new("cluster.local").unwrap();
//! let issuer = VaultIssuer::connect(settings, td).await?;
//! println!("{}", meshca_issuer::Issuer::describe(&*issuer));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod client;
mod error;
mod settings;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meshca_issuer::{Issuer, IssuerError, KeySource, Signed, Unhealthy};
use meshca_pki::{
    IssuedLeaf, KeyType, LeafPublicKey, LeafSpec, PrivateKey, Profile, RevokedEntry, Serial,
    TrustDomain, cert_facts, describe, parse_certs, to_pem,
};
use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;

use client::{VaultClient, bad};
pub use error::VaultError;
pub use settings::{
    DEFAULT_APPROLE_MOUNT, DEFAULT_MOUNT, DEFAULT_REFRESH, DEFAULT_TIMEOUT, VaultAuth,
    VaultSettings,
};

/// How much shorter than asked a certificate may be before it counts as cut
/// (Vault backdates notBefore by 30 s; clocks and the call take a little).
const CUT_SLACK: Duration = Duration::from_secs(120);

/// What meshca needs to know of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RoleInfo {
    max_ttl: Option<Duration>,
    server_flag: bool,
    client_flag: bool,
    key_type: String,
    key_bits: u64,
}

/// What Vault's issuers say: the issuing CA and the trust bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Issuers {
    default_id: String,
    issuing_der: Vec<u8>,
    issuing_not_after: OffsetDateTime,
    bundle: Vec<Vec<u8>>,
}

/// Vault's PKI as an [`Issuer`]. See the crate docs.
#[derive(Debug)]
pub struct VaultIssuer {
    client: VaultClient,
    settings: VaultSettings,
    trust_domain: TrustDomain,
    describe: String,
    roles: RwLock<BTreeMap<String, RoleInfo>>,
    issuers: RwLock<Issuers>,
    health: RwLock<Result<(), Unhealthy>>,
    bundle_tx: watch::Sender<u64>,
    checked_at: RwLock<Instant>,
}

impl VaultIssuer {
    /// Logs in, checks every role in use and reads the issuers; refuses
    /// (naming the setting) when a role would let Vault decide names. Then
    /// keeps all of it fresh in the background for as long as the issuer lives.
    pub async fn connect(
        settings: VaultSettings,
        trust_domain: TrustDomain,
    ) -> Result<Arc<Self>, VaultError> {
        let client = VaultClient::new(&settings)?;
        client.login().await?;
        let mut roles = BTreeMap::new();
        for role in settings.roles() {
            roles.insert(
                role.to_owned(),
                read_role(&client, &settings.mount, role, &trust_domain).await?,
            );
        }
        let default = &roles[settings.role.as_str()];
        // The default role serves the `service` profile: it must allow both.
        if !(default.server_flag && default.client_flag) {
            return Err(VaultError::Role {
                role: settings.role.clone(),
                rule: "it must set server_flag=true and client_flag=true (meshca's service profile authenticates both ends); give other profiles their own role with profile_roles".into(),
            });
        }
        let issuers = read_issuers(&client, &settings.mount).await?;
        let describe = format!(
            "vault {} mount {} role {}",
            client.addr(),
            settings.mount,
            settings.role
        );
        let (bundle_tx, _) = watch::channel(0);
        let issuer = Arc::new(VaultIssuer {
            client,
            trust_domain,
            describe,
            roles: RwLock::new(roles),
            issuers: RwLock::new(issuers),
            health: RwLock::new(Ok(())),
            bundle_tx,
            checked_at: RwLock::new(Instant::now()),
            settings,
        });
        tokio::spawn(keep_fresh(Arc::downgrade(&issuer)));
        tracing::info!(issuer = %issuer.describe, "signing through Vault");
        Ok(issuer)
    }

    /// Reads roles and issuers again; notices a changed bundle.
    async fn refresh(&self) -> Result<(), VaultError> {
        self.client.keep_fresh().await?;
        let mut roles = BTreeMap::new();
        for role in self.settings.roles() {
            roles.insert(
                role.to_owned(),
                read_role(&self.client, &self.settings.mount, role, &self.trust_domain).await?,
            );
        }
        if let Ok(mut r) = self.roles.write() {
            *r = roles;
        }
        let fresh = read_issuers(&self.client, &self.settings.mount).await?;
        let changed = self
            .issuers
            .read()
            .map(|old| old.bundle != fresh.bundle)
            .unwrap_or(false);
        if let Ok(mut i) = self.issuers.write() {
            *i = fresh;
        }
        if changed {
            tracing::info!(issuer = %self.describe, "Vault's trust bundle changed");
            self.bundle_tx.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Notes what a call said about Vault's health.
    fn note<T>(&self, result: &Result<T, VaultError>) {
        let health = match result {
            Ok(_) => Ok(()),
            Err(e) => match e.unhealthy() {
                Some(problem) => Err(problem),
                None => return,
            },
        };
        if let Ok(mut h) = self.health.write()
            && *h != health
        {
            match &health {
                Ok(()) => tracing::info!(issuer = %self.describe, "Vault is healthy again"),
                Err(p) => tracing::warn!(issuer = %self.describe, "Vault: {p}"),
            }
            *h = health;
        }
    }

    fn fail(&self, e: VaultError) -> IssuerError {
        e.into_issuer_error(&self.describe)
    }

    fn role_info(&self, role: &str) -> Result<RoleInfo, VaultError> {
        self.roles
            .read()
            .ok()
            .and_then(|r| r.get(role).cloned())
            .ok_or_else(|| VaultError::Role {
                role: role.to_owned(),
                rule: "it was not readable at the last check".into(),
            })
    }

    /// The request body Vault gets: meshca's names, meshca's lifetime.
    fn request_body(
        &self,
        role: &str,
        info: &RoleInfo,
        spec: &LeafSpec,
    ) -> Result<Value, VaultError> {
        let profile = spec.profile;
        if (profile.server_auth() && !info.server_flag)
            || (profile.client_auth() && !info.client_flag)
        {
            return Err(VaultError::Role {
                role: role.to_owned(),
                rule: format!(
                    "the {} profile needs {}; set them on the role or give the profile its own role (profile_roles)",
                    profile_name(profile),
                    match (profile.server_auth(), profile.client_auth()) {
                        (true, true) => "server_flag=true and client_flag=true",
                        (true, false) => "server_flag=true",
                        _ => "client_flag=true",
                    }
                ),
            });
        }
        if let Some(max) = info.max_ttl
            && spec.ttl > max
        {
            return Err(VaultError::Refused {
                path: format!("{}/roles/{role}", self.settings.mount),
                reason: format!(
                    "the lifetime asked for ({}) is above the role's max_ttl ({}); ask for less or raise max_ttl on the role",
                    meshca_pki::format_duration(spec.ttl),
                    meshca_pki::format_duration(max)
                ),
            });
        }
        let mut body = json!({
            "alt_names": spec.sans.dns.join(","),
            "ip_sans": spec.sans.ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(","),
            "uri_sans": spec.sans.uri,
            "ttl": format!("{}s", spec.ttl.as_secs()),
            "exclude_cn_from_sans": true,
            "format": "pem",
        });
        if let Some(cn) = spec.identity.common_name(&spec.trust_domain) {
            body["common_name"] = json!(cn);
        }
        Ok(body)
    }

    /// Checks Vault's answer and turns it into a [`Signed`].
    fn accept(
        &self,
        path: &str,
        answer: &Value,
        spec: &LeafSpec,
        key: &KeySource,
    ) -> Result<Signed, VaultError> {
        let data = &answer["data"];
        let leaf_pem = data["certificate"]
            .as_str()
            .ok_or_else(|| bad(path, "no data.certificate"))?;
        let der = parse_certs(leaf_pem.as_bytes())
            .ok()
            .and_then(|mut c| (!c.is_empty()).then(|| c.swap_remove(0)))
            .ok_or_else(|| bad(path, "data.certificate is not a PEM certificate"))?;
        let private_key = match key {
            KeySource::Csr(csr) => {
                if !csr.public_key().is_in(&der).unwrap_or(false) {
                    return Err(bad(path, "the certificate does not certify the CSR's key"));
                }
                None
            }
            KeySource::Generate(_) => {
                let pem = data["private_key"]
                    .as_str()
                    .ok_or_else(|| bad(path, "no data.private_key"))?;
                let key = PrivateKey::from_pem(pem)
                    .map_err(|e| bad(path, &format!("data.private_key: {e}")))?;
                let public = LeafPublicKey::of(&key)
                    .map_err(|e| bad(path, &format!("data.private_key: {e}")))?;
                if !public.is_in(&der).unwrap_or(false) {
                    return Err(bad(
                        path,
                        "the certificate does not certify the key sent with it",
                    ));
                }
                Some(key)
            }
        };
        let now = OffsetDateTime::now_utc();
        let info = describe(&der, now).map_err(|e| bad(path, &e.to_string()))?;
        let asked_dns: HashSet<&str> = spec.sans.dns.iter().map(String::as_str).collect();
        let got_dns: HashSet<&str> = info.dns_names.iter().map(String::as_str).collect();
        let asked_ips: HashSet<IpAddr> = spec.sans.ips.iter().copied().collect();
        let got_ips: HashSet<IpAddr> = info
            .ip_addresses
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if info.uris != [spec.sans.uri.clone()]
            || asked_dns != got_dns
            || asked_ips != got_ips
            || got_ips.len() != info.ip_addresses.len()
        {
            return Err(VaultError::Role {
                role: self.settings.role_for(spec.profile).to_owned(),
                rule: format!(
                    "Vault's certificate names {:?} {:?} {:?} where meshca asked for {:?} {:?} {:?}; the role must not add names (use_csr_sans=false, use_csr_common_name=false, no default SANs)",
                    info.uris,
                    info.dns_names,
                    info.ip_addresses,
                    spec.sans.uri,
                    spec.sans.dns,
                    spec.sans.ips
                ),
            });
        }
        let facts = cert_facts(&der).map_err(|e| bad(path, &e.to_string()))?;
        let mut chain = Vec::new();
        let chain_pems: Vec<&str> = match data["ca_chain"].as_array() {
            Some(list) => list.iter().filter_map(Value::as_str).collect(),
            None => data["issuing_ca"].as_str().into_iter().collect(),
        };
        for pem in chain_pems {
            for c in
                parse_certs(pem.as_bytes()).map_err(|e| bad(path, &format!("ca_chain: {e}")))?
            {
                // Roots belong in the trust bundle, not in the served chain.
                if !cert_facts(&c).map(|f| f.self_signed).unwrap_or(false) {
                    chain.push(c);
                }
            }
        }
        let asked_until = now + spec.ttl;
        let clipped = facts.not_after + CUT_SLACK < asked_until;
        if clipped {
            tracing::warn!(
                serial = %facts.serial.to_hex(),
                warnings = %answer["warnings"],
                "Vault issued a certificate shorter than asked"
            );
        }
        let hierarchy_id = self
            .issuers
            .read()
            .map(|i| i.default_id.clone())
            .unwrap_or_default();
        Ok(Signed {
            leaf: IssuedLeaf {
                der,
                serial: facts.serial,
                not_before: facts.not_before,
                not_after: facts.not_after,
                clipped,
            },
            chain,
            hierarchy_id,
            private_key,
        })
    }

    async fn revoke_in_vault(&self, serial: &Serial) -> Result<(), VaultError> {
        let path = format!("{}/revoke", self.settings.mount);
        let body = json!({"serial_number": colon_hex(serial)});
        self.client
            .call(Method::POST, &path, Some(&body))
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Issuer for VaultIssuer {
    fn kind(&self) -> &'static str {
        "vault"
    }

    async fn sign(&self, key: &KeySource, spec: &LeafSpec) -> Result<Signed, IssuerError> {
        // A role found unsafe at the last check (names from the CSR) is not
        // used until a check finds it safe again.
        if let Err(problem @ Unhealthy::Misconfigured(_)) = self.health() {
            return Err(IssuerError::Upstream {
                issuer: self.describe.clone(),
                problem,
            });
        }
        let role = self.settings.role_for(spec.profile).to_owned();
        let info = self.role_info(&role).map_err(|e| self.fail(e))?;
        let mut body = self
            .request_body(&role, &info, spec)
            .map_err(|e| self.fail(e))?;
        let mount = &self.settings.mount;
        let path = match key {
            KeySource::Csr(csr) => {
                body["csr"] = json!(to_pem("CERTIFICATE REQUEST", csr.der()));
                format!("{mount}/sign/{role}")
            }
            KeySource::Generate(kt) => {
                let (key_type, key_bits) = vault_key_type(*kt);
                body["key_type"] = json!(key_type);
                body["key_bits"] = json!(key_bits);
                body["private_key_format"] = json!("pkcs8");
                format!("{mount}/issue/{role}")
            }
        };
        let answer = self.client.call(Method::POST, &path, Some(&body)).await;
        self.note(&answer);
        let answer = answer.map_err(|e| self.fail(e))?;
        match self.accept(&path, &answer, spec, key) {
            Ok(signed) => Ok(signed),
            Err(e) => {
                // Whatever Vault signed that meshca will not hand out is
                // revoked, so that it cannot turn up anywhere.
                if let Some(serial) = answer["data"]["serial_number"]
                    .as_str()
                    .and_then(parse_colon_hex)
                    && let Err(r) = self.revoke_in_vault(&serial).await
                {
                    tracing::warn!(
                        "revoking refused certificate {} in Vault: {r}",
                        serial.to_hex()
                    );
                }
                tracing::error!(issuer = %self.describe, "refused Vault's answer: {e}");
                self.note(&Err::<(), _>(VaultError::BadAnswer {
                    path: path.clone(),
                    reason: e.to_string(),
                }));
                Err(self.fail(e))
            }
        }
    }

    async fn trust_bundle(&self) -> Result<Vec<Vec<u8>>, IssuerError> {
        Ok(self
            .issuers
            .read()
            .map(|i| i.bundle.clone())
            .unwrap_or_default())
    }

    /// Vault's own CRL of the default issuer: revocations reach it through
    /// [`Issuer::revoke`], so `revoked`, the number and the validity that
    /// meshca would use are Vault's business here.
    async fn crl(
        &self,
        _revoked: Vec<RevokedEntry>,
        _crl_number: u64,
        _validity: Duration,
    ) -> Result<Vec<u8>, IssuerError> {
        let path = format!("{}/crl", self.settings.mount);
        let der = self.client.get_raw(&path).await;
        self.note(&der);
        der.map_err(|e| self.fail(e))
    }

    fn issuing_ca(&self) -> (Vec<u8>, OffsetDateTime) {
        self.issuers
            .read()
            .map(|i| (i.issuing_der.clone(), i.issuing_not_after))
            .unwrap_or((Vec::new(), OffsetDateTime::UNIX_EPOCH))
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn max_ttl(&self, profile: Profile) -> Option<Duration> {
        self.role_info(self.settings.role_for(profile))
            .ok()
            .and_then(|r| r.max_ttl)
    }

    fn health(&self) -> Result<(), Unhealthy> {
        self.health.read().map(|h| h.clone()).unwrap_or(Ok(()))
    }

    async fn revoke(&self, serial: &Serial) -> Result<(), IssuerError> {
        let r = self.revoke_in_vault(serial).await;
        self.note(&r);
        r.map_err(|e| self.fail(e))
    }

    fn bundle_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.bundle_tx.subscribe())
    }
}

/// The background task: token, roles, issuers and health, every `refresh`
/// (sooner while Vault is unhealthy, to notice its return quickly).
async fn keep_fresh(issuer: Weak<VaultIssuer>) {
    loop {
        let Some(me) = issuer.upgrade() else { return };
        let every = me.settings.refresh.get();
        let wait = if me.health().is_ok() {
            every
        } else {
            every.min(Duration::from_secs(1))
        };
        let since = me.checked_at.read().map(|t| t.elapsed()).unwrap_or(wait);
        let sleep = wait.saturating_sub(since).max(Duration::from_millis(100));
        drop(me);
        tokio::time::sleep(sleep.min(Duration::from_secs(1))).await;
        let Some(me) = issuer.upgrade() else { return };
        let due = me
            .checked_at
            .read()
            .map(|t| t.elapsed() >= wait)
            .unwrap_or(true);
        if due {
            let r = me.refresh().await;
            if let Err(e) = &r {
                tracing::warn!(issuer = %me.describe, "checking Vault: {e}");
            }
            me.note(&r);
            if let Ok(mut t) = me.checked_at.write() {
                *t = Instant::now();
            }
        } else if let Err(e) = me.client.keep_fresh().await {
            // The token is checked every second: an AppRole token with a
            // short TTL must be renewed on time even when refresh is long.
            me.note(&Err::<(), _>(e));
        }
    }
}

/// Reads a role and checks that meshca can use it.
async fn read_role(
    client: &VaultClient,
    mount: &str,
    role: &str,
    td: &TrustDomain,
) -> Result<RoleInfo, VaultError> {
    let path = format!("{mount}/roles/{role}");
    let answer = client.call(Method::GET, &path, None).await.map_err(|e| match e {
        VaultError::NotFound { .. } => VaultError::Role {
            role: role.to_owned(),
            rule: format!(
                "it does not exist in the mount {mount:?}; create it as the README shows (bao write {mount}/roles/{role} ...)"
            ),
        },
        other => other,
    })?;
    let d = &answer["data"];
    let flag = |name: &str| {
        d[name]
            .as_bool()
            .ok_or_else(|| bad(&path, &format!("no boolean data.{name}")))
    };
    for setting in ["use_csr_sans", "use_csr_common_name"] {
        if flag(setting)? {
            return Err(VaultError::Role {
                role: role.to_owned(),
                rule: format!(
                    "{setting}=true lets Vault copy names from the CSR into certificates, and names are meshca's decision; set {setting}=false (bao write {mount}/roles/{role} {setting}=false ...)"
                ),
            });
        }
    }
    let probe = format!("spiffe://{td}/ns/meshca-probe/sa/meshca-probe");
    let uri_globs: Vec<&str> = d["allowed_uri_sans"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let templated = d["allowed_uri_sans_template"].as_bool().unwrap_or(false);
    if !templated && !uri_globs.iter().any(|g| glob_match(g, &probe)) {
        return Err(VaultError::Role {
            role: role.to_owned(),
            rule: format!(
                "allowed_uri_sans ({uri_globs:?}) does not allow meshca's SPIFFE IDs; set allowed_uri_sans=\"spiffe://{td}/*\""
            ),
        });
    }
    let max_ttl = d["max_ttl"]
        .as_u64()
        .ok_or_else(|| bad(&path, "no numeric data.max_ttl"))?;
    Ok(RoleInfo {
        max_ttl: (max_ttl > 0).then(|| Duration::from_secs(max_ttl)),
        server_flag: flag("server_flag")?,
        client_flag: flag("client_flag")?,
        key_type: d["key_type"].as_str().unwrap_or("any").to_owned(),
        key_bits: d["key_bits"].as_u64().unwrap_or(0),
    })
}

/// Reads the mount's issuers: the default one signs, and every issuer's
/// top certificate is in the trust bundle (the default's first).
async fn read_issuers(client: &VaultClient, mount: &str) -> Result<Issuers, VaultError> {
    let path = format!("{mount}/issuer/default/json");
    let default = client.call(Method::GET, &path, None).await?;
    let d = &default["data"];
    let default_id = d["issuer_id"]
        .as_str()
        .ok_or_else(|| bad(&path, "no data.issuer_id"))?
        .to_owned();
    let issuing_der = d["certificate"]
        .as_str()
        .and_then(|p| parse_certs(p.as_bytes()).ok())
        .and_then(|mut c| (!c.is_empty()).then(|| c.swap_remove(0)))
        .ok_or_else(|| bad(&path, "no PEM data.certificate"))?;
    let issuing_not_after = cert_facts(&issuing_der)
        .map_err(|e| bad(&path, &e.to_string()))?
        .not_after;
    let mut bundle = Vec::new();
    let mut add_top = |issuer: &Value, path: &str| -> Result<(), VaultError> {
        let mut chain = Vec::new();
        for pem in issuer["ca_chain"].as_array().into_iter().flatten() {
            if let Some(p) = pem.as_str() {
                chain.extend(parse_certs(p.as_bytes()).map_err(|e| bad(path, &e.to_string()))?);
            }
        }
        if chain.is_empty()
            && let Some(p) = issuer["certificate"].as_str()
        {
            chain.extend(parse_certs(p.as_bytes()).map_err(|e| bad(path, &e.to_string()))?);
        }
        // The root when the chain reaches one, else the top of what Vault has.
        let top = chain
            .iter()
            .find(|c| cert_facts(c).map(|f| f.self_signed).unwrap_or(false))
            .or(chain.last())
            .cloned()
            .ok_or_else(|| bad(path, "an issuer without a certificate"))?;
        if !bundle.contains(&top) {
            bundle.push(top);
        }
        Ok(())
    };
    add_top(d, &path)?;
    let list_path = format!("{mount}/issuers?list=true");
    let list = client.call(Method::GET, &list_path, None).await?;
    for id in list["data"]["keys"].as_array().into_iter().flatten() {
        let Some(id) = id.as_str() else { continue };
        if id == default_id {
            continue;
        }
        let one = format!("{mount}/issuer/{id}/json");
        let answer = client.call(Method::GET, &one, None).await?;
        add_top(&answer["data"], &one)?;
    }
    Ok(Issuers {
        default_id,
        issuing_der,
        issuing_not_after,
        bundle,
    })
}

fn vault_key_type(kt: KeyType) -> (&'static str, u32) {
    match kt {
        KeyType::EcdsaP256 => ("ec", 256),
        KeyType::EcdsaP384 => ("ec", 384),
        KeyType::Ed25519 => ("ed25519", 0),
        KeyType::Rsa2048 => ("rsa", 2048),
        KeyType::Rsa3072 => ("rsa", 3072),
        KeyType::Rsa4096 => ("rsa", 4096),
    }
}

fn profile_name(p: Profile) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Vault writes serials as colon-separated hex bytes.
fn colon_hex(serial: &Serial) -> String {
    serial
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_colon_hex(s: &str) -> Option<Serial> {
    let bytes: Option<Vec<u8>> = s
        .split([':', '-'])
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    bytes
        .filter(|b| !b.is_empty())
        .map(|b| Serial::from_bytes(&b))
}

/// Vault's glob for allowed_uri_sans: `*` matches any run of characters.
fn glob_match(glob: &str, s: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    if parts.len() == 1 {
        return glob == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || !s[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_vault() {
        let id = "spiffe://cluster.local/ns/a/sa/b";
        assert!(glob_match("spiffe://cluster.local/*", id));
        assert!(glob_match("*", id));
        assert!(glob_match("spiffe://*/ns/*/sa/*", id));
        assert!(glob_match(id, id));
        assert!(!glob_match("spiffe://other/*", id));
        assert!(!glob_match("spiffe://cluster.local/ns/x/*", id));
        assert!(!glob_match("spiffe://cluster.local", id));
        assert!(!glob_match("*x*y", "xy-short"));
    }

    #[test]
    fn serials_round_trip_vault_notation() {
        let s = Serial::from_bytes(&[0x00, 0x56, 0xae, 0x07]);
        assert_eq!(colon_hex(&s), "56:ae:07");
        assert_eq!(parse_colon_hex("56:ae:07").unwrap(), s);
        assert_eq!(parse_colon_hex("56-ae-07").unwrap(), s);
        assert!(parse_colon_hex("zz:01").is_none());
        assert!(parse_colon_hex("").is_none());
    }
}
