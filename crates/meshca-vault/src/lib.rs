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
//!   in use and refuses to start when a role would, naming the setting.
//! - The usages are meshca's decision too, but Vault's `sign` and `issue`
//!   take them from the role only (the request cannot narrow them; only
//!   `sign-verbatim` can, and it copies the CSR's names). So each set of
//!   usages needs its role: the default role serves the `service` profile
//!   (serverAuth and clientAuth), and `server`/`webhook` and
//!   `client`/`bootstrap` need roles of their own (`profile_roles`) unless
//!   the default role matches them. Before Vault is asked, the role's
//!   settings are held against the profile (`check::RoleUsages`: flags,
//!   `ext_key_usage`, `ext_key_usage_oids`, `key_usage`); a role that would
//!   add a usage is refused by setting, without a certificate being made.
//!   [`VaultIssuer::connect`] does so for the profiles meshca itself issues
//!   (service, its server certificate, the admin's client certificate) and
//!   every profile given its own role.
//! - Each answer is checked again before it is handed out (the role may have
//!   changed since it was read; Vault's answer is what gets handed out): its
//!   key is the caller's, its names are exactly the ones asked for, it is not
//!   a CA, its key usage and extended key usages are the profile's and
//!   nothing more, it ends no later than asked (a few minutes of clock skew
//!   allowed), and it chains to the mount's issuers. A certificate that fails
//!   is revoked in Vault and never handed out; the error names the check and
//!   the role setting to fix.
//! - TTLs are held to the role's `max_ttl` by meshca, with an error naming
//!   it, because Vault would silently cut them.
//! - The trust bundle and chain come from Vault (the chains of the mount's
//!   issuers). A background task reads them again every `refresh`, notices a
//!   new issuer and moves [`Issuer::bundle_changes`], so the server announces
//!   `bundle-changed`; it also renews the token at two thirds of its life (or
//!   logs in again with AppRole) and keeps the health that `/readyz` shows.
//! - The HTTP client follows no redirects: a redirect would carry the token
//!   (or an AppRole login's secret id) to wherever it points. A 3xx is an
//!   error naming its `Location` and the address setting.
//! - Errors are typed ([`VaultError`]): unreachable, sealed (from
//!   `sys/seal-status`, not from prose), denied, missing, refused (Vault's
//!   reason quoted), redirected, unsafe certificate, unexpected answer.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), meshca_vault::VaultError> {
//! use meshca_vault::{VaultIssuer, VaultSettings};
//! let mut settings = VaultSettings::new("https://vault:8200", "meshca");
//! settings.token_file = Some("/run/secrets/vault-token".into());
//! settings.profile_roles.insert(meshca_pki::Profile::Server, "meshca-server".into());
//! settings.profile_roles.insert(meshca_pki::Profile::Client, "meshca-client".into());
//! let td = meshca_pki::TrustDomain::new("cluster.local").unwrap();
//! let issuer = VaultIssuer::connect(settings, td).await?;
//! println!("{}", meshca_issuer::Issuer::describe(&*issuer));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod check;
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

use check::{Failed, RoleUsages, check_chain, check_leaf, check_not_after};
use client::{VaultClient, bad};
pub use error::VaultError;
pub use settings::{
    DEFAULT_APPROLE_MOUNT, DEFAULT_MOUNT, DEFAULT_REFRESH, DEFAULT_TIMEOUT, VaultAuth,
    VaultSettings,
};

/// How much shorter than asked a certificate may be before it counts as cut
/// (Vault backdates notBefore by 30 s; clocks and the call take a little).
const CUT_SLACK: Duration = Duration::from_secs(120);

/// The profiles meshca issues itself whatever the workloads ask for: the
/// default for workloads, its own server certificate, the admin's
/// certificate. Their roles are checked when meshca connects.
const OWN_PROFILES: [Profile; 3] = [Profile::Service, Profile::Server, Profile::Client];

/// What meshca needs to know of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RoleInfo {
    max_ttl: Option<Duration>,
    /// The usages its certificates get.
    usages: RoleUsages,
    key_type: String,
    key_bits: u64,
}

/// A certificate (or an answer) from Vault that meshca will not hand out,
/// with the serial to revoke when one was read from the certificate. (The
/// error is boxed to keep the `Err` small.)
#[derive(Debug)]
struct Refused {
    serial: Option<Serial>,
    error: Box<VaultError>,
}

impl Refused {
    fn bad(error: VaultError) -> Self {
        Refused {
            serial: None,
            error: Box::new(error),
        }
    }

    fn is_chain(&self) -> bool {
        matches!(*self.error, VaultError::Unsafe { check: "chain", .. })
    }
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
    /// (naming the setting) when a role would let Vault decide names, or
    /// when the role of a profile meshca issues itself (service, server,
    /// client) or of a profile given its own role would sign other usages
    /// than the profile's. Then keeps all of it fresh in the background for
    /// as long as the issuer lives.
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
        // The roles of the profiles meshca issues itself, and of every
        // profile given its own role, must sign exactly their usages: found
        // now, before Vault has signed anything, rather than at the first
        // issuance.
        let mut profiles = OWN_PROFILES.to_vec();
        profiles.extend(
            settings
                .profile_roles
                .keys()
                .filter(|p| !OWN_PROFILES.contains(p)),
        );
        check_roles_fit(&settings, &roles, &profiles)?;
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
        self.reload_issuers().await
    }

    /// Reads the mount's issuers again; notices a changed bundle.
    async fn reload_issuers(&self) -> Result<(), VaultError> {
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

    /// Reads one role again (and keeps what it says), so that a role fixed
    /// since the last check is used at once rather than after the next one.
    async fn reread_role(&self, role: &str) -> Result<RoleInfo, VaultError> {
        let fresh = read_role(&self.client, &self.settings.mount, role, &self.trust_domain).await;
        if fresh.is_err() {
            self.note(&fresh);
        }
        let fresh = fresh?;
        if let Ok(mut r) = self.roles.write() {
            r.insert(role.to_owned(), fresh.clone());
        }
        Ok(fresh)
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

    /// The request body Vault gets: meshca's names, meshca's lifetime. The
    /// usages cannot be asked for (Vault takes them from the role), so the
    /// role is held against the profile first: a role that would sign other
    /// usages is refused here, before a certificate exists.
    fn request_body(
        &self,
        role: &str,
        info: &RoleInfo,
        spec: &LeafSpec,
        key_type: KeyType,
    ) -> Result<Value, VaultError> {
        let misfits = info.usages.misfits(spec.profile, Some(key_type));
        if !misfits.is_empty() {
            return Err(VaultError::Role {
                role: role.to_owned(),
                rule: misfits.join("; "),
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

    /// Checks Vault's answer against everything meshca decided and turns it
    /// into a [`Signed`]; a certificate that fails is refused with the
    /// check it failed (the caller revokes it).
    fn accept(
        &self,
        path: &str,
        answer: &Value,
        spec: &LeafSpec,
        key: &KeySource,
    ) -> Result<Signed, Refused> {
        let data = &answer["data"];
        let leaf_pem = data["certificate"]
            .as_str()
            .ok_or_else(|| Refused::bad(bad(path, "no data.certificate")))?;
        let der = parse_certs(leaf_pem.as_bytes())
            .ok()
            .and_then(|mut c| (!c.is_empty()).then(|| c.swap_remove(0)))
            .ok_or_else(|| Refused::bad(bad(path, "data.certificate is not a PEM certificate")))?;
        let facts = cert_facts(&der).map_err(|e| Refused::bad(bad(path, &e.to_string())))?;
        let role = self.settings.role_for(spec.profile).to_owned();
        // From here on there is a certificate: a failure names its check
        // and the certificate is revoked.
        let refuse = |f: Failed| Refused {
            serial: Some(facts.serial.clone()),
            error: Box::new(VaultError::Unsafe {
                role: role.clone(),
                mount: self.settings.mount.clone(),
                serial: colon_hex(&facts.serial),
                check: f.check,
                reason: format!("{}; {}", f.found, f.fix),
                revoked: false,
            }),
        };
        let private_key = match key {
            KeySource::Csr(csr) => {
                if !csr.public_key().is_in(&der).unwrap_or(false) {
                    return Err(refuse(Failed {
                        check: "key",
                        found: "it does not certify the CSR's key".into(),
                        fix: "a PKI role cannot cause this: check that --vault-addr is Vault"
                            .into(),
                    }));
                }
                None
            }
            KeySource::Generate(_) => {
                let pem = data["private_key"].as_str().ok_or_else(|| {
                    refuse(Failed {
                        check: "key",
                        found: "no data.private_key came with it".into(),
                        fix: "check that --vault-addr is Vault".into(),
                    })
                })?;
                let parsed =
                    PrivateKey::from_pem(pem).and_then(|k| LeafPublicKey::of(&k).map(|p| (k, p)));
                let (key, public) = parsed.map_err(|e| {
                    refuse(Failed {
                        check: "key",
                        found: format!("data.private_key: {e}"),
                        fix: "check that --vault-addr is Vault".into(),
                    })
                })?;
                if !public.is_in(&der).unwrap_or(false) {
                    return Err(refuse(Failed {
                        check: "key",
                        found: "it does not certify the key sent with it".into(),
                        fix: "a PKI role cannot cause this: check that --vault-addr is Vault"
                            .into(),
                    }));
                }
                Some(key)
            }
        };
        let now = OffsetDateTime::now_utc();
        let info = describe(&der, now).map_err(|e| Refused::bad(bad(path, &e.to_string())))?;
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
            return Err(refuse(Failed {
                check: "names",
                found: format!(
                    "it names {:?} {:?} {:?} where meshca asked for {:?} {:?} {:?}",
                    info.uris,
                    info.dns_names,
                    info.ip_addresses,
                    spec.sans.uri,
                    spec.sans.dns,
                    spec.sans.ips
                ),
                fix: "the role must not add names (use_csr_sans=false, use_csr_common_name=false, no default SANs)".into(),
            }));
        }
        check_leaf(&der, spec.profile).map_err(refuse)?;
        check_not_after(facts.not_after, now, spec.ttl).map_err(refuse)?;
        let mut chain = Vec::new();
        let chain_pems: Vec<&str> = match data["ca_chain"].as_array() {
            Some(list) => list.iter().filter_map(Value::as_str).collect(),
            None => data["issuing_ca"].as_str().into_iter().collect(),
        };
        for pem in chain_pems {
            let certs = parse_certs(pem.as_bytes())
                .map_err(|e| Refused::bad(bad(path, &format!("ca_chain: {e}"))))?;
            for c in certs {
                // Roots belong in the trust bundle, not in the served chain.
                if !cert_facts(&c).map(|f| f.self_signed).unwrap_or(false) {
                    chain.push(c);
                }
            }
        }
        let (bundle, hierarchy_id) = self
            .issuers
            .read()
            .map(|i| (i.bundle.clone(), i.default_id.clone()))
            .unwrap_or_default();
        // At notBefore when Vault's clock is ahead of meshca's: the chain
        // is what is checked here, not the clocks.
        check_chain(&der, &chain, &bundle, now.max(facts.not_before)).map_err(refuse)?;
        let asked_until = now + spec.ttl;
        let clipped = facts.not_after + CUT_SLACK < asked_until;
        if clipped {
            tracing::warn!(
                serial = %facts.serial.to_hex(),
                warnings = %answer["warnings"],
                "Vault issued a certificate shorter than asked"
            );
        }
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
        let key_type = match key {
            KeySource::Csr(csr) => csr.key_type(),
            KeySource::Generate(kt) => *kt,
        };
        let info = self.role_info(&role).map_err(|e| self.fail(e))?;
        let mut body = match self.request_body(&role, &info, spec, key_type) {
            Ok(body) => body,
            // The role may have been fixed since it was read: read it again
            // before refusing, so that the fix counts at once.
            Err(_) => {
                let fresh = self.reread_role(&role).await.map_err(|e| self.fail(e))?;
                self.request_body(&role, &fresh, spec, key_type)
                    .map_err(|e| self.fail(e))?
            }
        };
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
        let mut accepted = self.accept(&path, &answer, spec, key);
        if matches!(&accepted, Err(refused) if refused.is_chain()) {
            // An issuer made the mount's default since the last refresh
            // signs before meshca has read it: read the issuers again once
            // before refusing.
            match self.reload_issuers().await {
                Ok(()) => accepted = self.accept(&path, &answer, spec, key),
                Err(e) => {
                    tracing::warn!(issuer = %self.describe, "reading Vault's issuers again: {e}")
                }
            }
        }
        match accepted {
            Ok(signed) => Ok(signed),
            Err(Refused { serial, mut error }) => {
                // Whatever Vault signed that meshca will not hand out is
                // revoked, so that it cannot turn up anywhere. The serial is
                // the certificate's own; Vault's field when it did not parse.
                let serial = serial.or_else(|| {
                    answer["data"]["serial_number"]
                        .as_str()
                        .and_then(parse_colon_hex)
                });
                if let Some(serial) = serial {
                    match self.revoke_in_vault(&serial).await {
                        Ok(()) => {
                            if let VaultError::Unsafe { revoked, .. } = &mut *error {
                                *revoked = true;
                            }
                        }
                        Err(r) => tracing::warn!(
                            "revoking refused certificate {} in Vault: {r}",
                            serial.to_hex()
                        ),
                    }
                }
                tracing::error!(issuer = %self.describe, "refused Vault's answer: {error}");
                self.note(&Err::<(), _>(VaultError::BadAnswer {
                    path: path.clone(),
                    reason: error.to_string(),
                }));
                Err(self.fail(*error))
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
        usages: RoleUsages::from_role(d, flag("server_flag")?, flag("client_flag")?),
        key_type: d["key_type"].as_str().unwrap_or("any").to_owned(),
        key_bits: d["key_bits"].as_u64().unwrap_or(0),
    })
}

/// Checks that the role of each of `profiles` signs exactly its usages
/// (for any key the role takes). Refuses with every problem of the first
/// role that has one, each naming its setting.
fn check_roles_fit(
    settings: &VaultSettings,
    roles: &BTreeMap<String, RoleInfo>,
    profiles: &[Profile],
) -> Result<(), VaultError> {
    let mut problems: Vec<(&str, Vec<String>)> = Vec::new();
    for &profile in profiles {
        let role = settings.role_for(profile);
        let Some(info) = roles.get(role) else {
            continue;
        };
        let at = match problems.iter().position(|(r, _)| *r == role) {
            Some(at) => at,
            None => {
                problems.push((role, Vec::new()));
                problems.len() - 1
            }
        };
        for m in info.usages.misfits(profile, None) {
            // The key_usage problem is the same for every profile.
            if !problems[at].1.contains(&m) {
                problems[at].1.push(m);
            }
        }
    }
    match problems.into_iter().find(|(_, p)| !p.is_empty()) {
        Some((role, p)) => Err(VaultError::Role {
            role: role.to_owned(),
            rule: p.join("; "),
        }),
        None => Ok(()),
    }
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
