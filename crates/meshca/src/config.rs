//! `meshca.toml`: parsed once, where it enters, into a validated struct.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use meshca_pki::{GoDuration, KeyType, TrustDomain};
use serde::{Deserialize, Serialize};

/// The CA's configuration, as `init` writes it and every command reads it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The trust domain of every identity.
    pub trust_domain: TrustDomain,
    /// Key type for keys the CA generates when none is asked for.
    #[serde(default)]
    pub key_type: KeyType,
    /// No certificate lives longer than this.
    #[serde(default = "default_max_ttl")]
    pub max_ttl: GoDuration,
    /// What workloads may ask for (`[[policy]]` tables).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy: Vec<meshca_issuer::PolicyRule>,
    /// Where the state lives (`[store]`); absent: the embedded store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::store::StoreSettings>,
    /// Who signs (`[issuer]`); absent: the built-in CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<crate::issuer::IssuerSettings>,
    /// How long a certificate's record stays in the store after it expired
    /// (the audit log keeps every issuance for good). Short-lived
    /// certificates would otherwise grow the store, and every scan of it,
    /// without bound.
    #[serde(
        default = "default_keep_expired",
        skip_serializing_if = "is_default_keep_expired"
    )]
    pub keep_expired: GoDuration,
    /// How long the record of a superseded certificate (its identity has a
    /// newer one) stays after it expired: renewals and floods do not keep
    /// a record each for `keep_expired`.
    #[serde(
        default = "default_keep_superseded",
        skip_serializing_if = "is_default_keep_superseded"
    )]
    pub keep_superseded: GoDuration,
    /// What one caller may take (`[limits]`): issuances per identity,
    /// join-token uses, event streams, connections, event retention.
    #[serde(default, skip_serializing_if = "is_default_limits")]
    pub limits: meshca_server::limits::Limits,
}

fn default_keep_superseded() -> GoDuration {
    GoDuration(meshca_server::DEFAULT_KEEP_SUPERSEDED)
}

fn is_default_keep_superseded(d: &GoDuration) -> bool {
    *d == default_keep_superseded()
}

fn is_default_limits(l: &meshca_server::limits::Limits) -> bool {
    *l == meshca_server::limits::Limits::default()
}

fn default_keep_expired() -> GoDuration {
    GoDuration(meshca_server::DEFAULT_KEEP_EXPIRED)
}

fn is_default_keep_expired(d: &GoDuration) -> bool {
    *d == default_keep_expired()
}

/// A TOML error with the line and the setting it is about: a value's own
/// message ("invalid duration ...") does not say which setting it was.
fn where_in(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_owned();
    };
    let start = span.start.min(text.len());
    let line_no = text.as_bytes()[..start]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    match line.split_once('=') {
        Some((key, _)) if !line.starts_with('[') => {
            format!("line {line_no}, {}: {}", key.trim(), e.message())
        }
        _ => format!("line {line_no}: {}", e.message()),
    }
}

fn default_max_ttl() -> GoDuration {
    GoDuration(meshca_issuer::DEFAULT_MAX_TTL)
}

impl Config {
    /// A config for a new CA.
    pub fn new(trust_domain: TrustDomain, key_type: KeyType) -> Self {
        Config {
            trust_domain,
            key_type,
            max_ttl: default_max_ttl(),
            policy: Vec::new(),
            store: None,
            issuer: None,
            keep_expired: default_keep_expired(),
            keep_superseded: default_keep_superseded(),
            limits: meshca_server::limits::Limits::default(),
        }
    }

    /// Reads and validates `path`, naming the file and the field on error.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = meshca_files::read_limited(path, 1024 * 1024)?;
        Self::parse(&bytes, path)
    }

    /// Parses and validates a configuration read from `path` (for messages).
    pub fn parse(bytes: &[u8], path: &Path) -> anyhow::Result<Self> {
        let text = std::str::from_utf8(bytes)
            .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
        let config: Config = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), where_in(text, &e)))?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> anyhow::Result<()> {
        if self.max_ttl.get() == Duration::ZERO {
            bail!("{}: max_ttl must be greater than zero", path.display());
        }
        if let Some(vault) = self.issuer.as_ref().and_then(|i| i.vault.as_ref()) {
            vault
                .validate()
                .map_err(|e| anyhow::anyhow!("{}: [issuer.vault] {e}", path.display()))?;
        }
        self.limits
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (i, rule) in self.policy.iter().enumerate() {
            rule.validate(i)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// The file's text, with a header saying what it is.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        Ok(format!(
            "# meshca configuration, written by `meshca init`.\n{}",
            toml::to_string(self).context("cannot encode the configuration")?
        ))
    }

    /// The issuing policy this config asks for.
    pub fn policy(&self) -> meshca_issuer::Policy {
        meshca_issuer::Policy {
            trust_domain: self.trust_domain.clone(),
            max_ttl: self.max_ttl.get(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_round_trips() {
        // Also the `config` fuzz target's richest seed (fuzz/seeds.py).
        let text = include_str!("../../../fuzz/seeds/meshca.toml");
        let p = Path::new("meshca.toml");
        let c = Config::parse(text.as_bytes(), p).unwrap();
        assert_eq!(c.policy.len(), 1);
        assert!(c.store.is_some() && c.issuer.is_some());
        let again = Config::parse(c.to_toml().unwrap().as_bytes(), p).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn round_trips_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meshca.toml");
        let c = Config::new(TrustDomain::default(), KeyType::Ed25519);
        std::fs::write(&p, c.to_toml().unwrap()).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);

        std::fs::write(
            &p,
            "trust_domain = \"cluster.local\"\nmax_ttl = \"forever\"\n",
        )
        .unwrap();
        let e = format!("{:#}", Config::load(&p).unwrap_err());
        assert!(e.contains("meshca.toml") && e.contains("forever"), "{e}");

        std::fs::write(&p, "trust_domain = \"cluster.local\"\nmax_tl = \"1h\"\n").unwrap();
        let e = format!("{:#}", Config::load(&p).unwrap_err());
        assert!(e.contains("max_tl"), "{e}");

        std::fs::write(&p, "trust_domain = \"cluster.local\"\nmax_ttl = \"0s\"\n").unwrap();
        let e = format!("{:#}", Config::load(&p).unwrap_err());
        assert!(e.contains("max_ttl"), "{e}");
    }
}
