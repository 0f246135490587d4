//! Which issuer signs: flags and `MESHCA_*` variables over the `[issuer]`
//! table of `meshca.toml`, parsed once into [`IssuerChoice`].

use std::path::{Path, PathBuf};

use clap::Args;
use meshca_pki::{GoDuration, Profile};
use meshca_vault::VaultSettings;
use serde::{Deserialize, Serialize};

/// The issuer flags, shared by every command that signs.
#[derive(Debug, Clone, Default, Args)]
pub struct IssuerArgs {
    /// Who signs: `builtin` (meshca's own CA, the default) or `vault`
    /// (a Vault / OpenBao PKI mount; meshca keeps no CA key).
    #[arg(long, global = true, env = "MESHCA_ISSUER", value_name = "KIND")]
    pub issuer: Option<IssuerKind>,
    /// Vault's address (http:// or https://).
    #[arg(long, global = true, env = "MESHCA_VAULT_ADDR", value_name = "URL")]
    pub vault_addr: Option<String>,
    /// The PKI role that signs (for the service profile, and every profile
    /// without a role of its own).
    #[arg(long, global = true, env = "MESHCA_VAULT_ROLE", value_name = "ROLE")]
    pub vault_role: Option<String>,
    /// The role of one profile, `PROFILE=ROLE` (repeatable, e.g.
    /// `server=meshca-server`): Vault takes a certificate's usages from the
    /// role, so profiles whose usages differ from the default role's need
    /// their own. Adds to `[issuer.vault.profile_roles]`.
    #[arg(
        long,
        global = true,
        env = "MESHCA_VAULT_PROFILE_ROLE",
        value_name = "PROFILE=ROLE",
        value_delimiter = ',',
        value_parser = parse_profile_role
    )]
    pub vault_profile_role: Vec<(Profile, String)>,
    /// The PKI mount [default: pki].
    #[arg(long, global = true, env = "MESHCA_VAULT_MOUNT", value_name = "PATH")]
    pub vault_mount: Option<String>,
    /// A file holding a Vault token (mode 0600).
    #[arg(
        long,
        global = true,
        env = "MESHCA_VAULT_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub vault_token_file: Option<PathBuf>,
    /// AppRole role id (with --vault-approle-secret-id-file).
    #[arg(
        long,
        global = true,
        env = "MESHCA_VAULT_APPROLE_ROLE_ID",
        value_name = "ID"
    )]
    pub vault_approle_role_id: Option<String>,
    /// A file holding the AppRole secret id (mode 0600).
    #[arg(
        long,
        global = true,
        env = "MESHCA_VAULT_APPROLE_SECRET_ID_FILE",
        value_name = "FILE"
    )]
    pub vault_approle_secret_id_file: Option<PathBuf>,
    /// The CA of Vault's HTTPS certificate (PEM).
    #[arg(long, global = true, env = "MESHCA_VAULT_CA", value_name = "FILE")]
    pub vault_ca: Option<PathBuf>,
    /// Vault namespace.
    #[arg(long, global = true, env = "MESHCA_VAULT_NAMESPACE", value_name = "NS")]
    pub vault_namespace: Option<String>,
    /// How long one call to Vault may take [default: 10s].
    #[arg(long, global = true, env = "MESHCA_VAULT_TIMEOUT", value_name = "DUR")]
    pub vault_timeout: Option<GoDuration>,
    /// How often Vault's issuers, roles and health are read [default: 30s].
    #[arg(long, global = true, env = "MESHCA_VAULT_REFRESH", value_name = "DUR")]
    pub vault_refresh: Option<GoDuration>,
}

/// Who signs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IssuerKind {
    /// meshca's own CA.
    #[default]
    Builtin,
    /// Vault / OpenBao PKI.
    Vault,
}

/// The `[issuer]` table of `meshca.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    /// `builtin` or `vault`.
    pub kind: IssuerKind,
    /// `[issuer.vault]`: where Vault is and how to log in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultSettings>,
}

/// Who signs, decided.
#[derive(Debug, Clone)]
pub enum IssuerChoice {
    /// The CA keys of the data directory or shared store.
    Builtin,
    /// Vault, with the settings that reach it.
    Vault(Box<VaultSettings>),
}

impl IssuerArgs {
    /// Whether any Vault flag was given.
    fn any_vault_flag(&self) -> bool {
        self.vault_addr.is_some()
            || self.vault_role.is_some()
            || !self.vault_profile_role.is_empty()
            || self.vault_mount.is_some()
            || self.vault_token_file.is_some()
            || self.vault_approle_role_id.is_some()
            || self.vault_approle_secret_id_file.is_some()
            || self.vault_ca.is_some()
            || self.vault_namespace.is_some()
            || self.vault_timeout.is_some()
            || self.vault_refresh.is_some()
    }

    /// Flags over the file's `[issuer]` table.
    pub fn choose(&self, file: Option<&IssuerSettings>) -> anyhow::Result<IssuerChoice> {
        let kind = self.issuer.or(file.map(|f| f.kind)).unwrap_or_default();
        if kind == IssuerKind::Builtin {
            if self.any_vault_flag() {
                anyhow::bail!(
                    "--vault-* flags were given but the issuer is builtin; add --issuer vault"
                );
            }
            return Ok(IssuerChoice::Builtin);
        }
        let base = file.and_then(|f| f.vault.clone());
        let addr = self
            .vault_addr
            .clone()
            .or(base.as_ref().map(|b| b.addr.clone()))
            .ok_or_else(|| {
                anyhow::anyhow!("--issuer vault needs --vault-addr (or MESHCA_VAULT_ADDR)")
            })?;
        let role = self
            .vault_role
            .clone()
            .or(base.as_ref().map(|b| b.role.clone()))
            .ok_or_else(|| {
                anyhow::anyhow!("--issuer vault needs --vault-role (or MESHCA_VAULT_ROLE)")
            })?;
        let mut s = base.unwrap_or_else(|| VaultSettings::new(&addr, &role));
        s.addr = addr;
        s.role = role;
        if let Some(m) = &self.vault_mount {
            s.mount = m.clone();
        }
        // Profile by profile, flags win over the file.
        for (profile, role) in &self.vault_profile_role {
            s.profile_roles.insert(*profile, role.clone());
        }
        // A login given by flags replaces the file's whole login.
        if self.vault_token_file.is_some()
            || self.vault_approle_role_id.is_some()
            || self.vault_approle_secret_id_file.is_some()
        {
            s.token_file = self.vault_token_file.clone();
            s.approle_role_id = self.vault_approle_role_id.clone();
            s.approle_secret_id_file = self.vault_approle_secret_id_file.clone();
        }
        if let Some(c) = &self.vault_ca {
            s.ca_file = Some(c.clone());
        }
        if let Some(ns) = &self.vault_namespace {
            s.namespace = Some(ns.clone());
        }
        if let Some(t) = self.vault_timeout {
            s.timeout = t;
        }
        if let Some(r) = self.vault_refresh {
            s.refresh = r;
        }
        // Files named on the command line are kept absolute in meshca.toml,
        // so that a later `serve` from elsewhere finds them.
        for p in [
            &mut s.token_file,
            &mut s.approle_secret_id_file,
            &mut s.ca_file,
        ] {
            if let Some(path) = p.as_mut() {
                *path = absolute(path);
            }
        }
        s.validate()?;
        Ok(IssuerChoice::Vault(Box::new(s)))
    }
}

/// `PROFILE=ROLE`, for --vault-profile-role.
fn parse_profile_role(s: &str) -> Result<(Profile, String), String> {
    let (profile, role) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PROFILE=ROLE (e.g. server=meshca-server)"))?;
    let profile = profile
        .trim()
        .parse::<Profile>()
        .map_err(|e| e.to_string())?;
    let role = role.trim();
    if role.is_empty() {
        return Err(format!("{s:?} names no role"));
    }
    Ok((profile, role.to_owned()))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

impl IssuerChoice {
    /// The `[issuer]` table that records this choice.
    pub fn settings(&self) -> Option<IssuerSettings> {
        match self {
            IssuerChoice::Builtin => None,
            IssuerChoice::Vault(s) => Some(IssuerSettings {
                kind: IssuerKind::Vault,
                vault: Some((**s).clone()),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_missing_settings_are_named() {
        let none = IssuerArgs::default();
        assert!(matches!(none.choose(None).unwrap(), IssuerChoice::Builtin));

        let vault = IssuerArgs {
            issuer: Some(IssuerKind::Vault),
            ..Default::default()
        };
        let e = vault.choose(None).unwrap_err().to_string();
        assert!(e.contains("--vault-addr"), "{e}");

        let mut file_vault = VaultSettings::new("http://127.0.0.1:8200", "meshca");
        file_vault.token_file = Some("/run/token".into());
        let file = IssuerSettings {
            kind: IssuerKind::Vault,
            vault: Some(file_vault),
        };
        let IssuerChoice::Vault(s) = none.choose(Some(&file)).unwrap() else {
            panic!("the file says vault")
        };
        assert_eq!(s.role, "meshca");
        let flags = IssuerArgs {
            vault_role: Some("other".into()),
            vault_approle_role_id: Some("id".into()),
            vault_approle_secret_id_file: Some("/run/sid".into()),
            ..Default::default()
        };
        let IssuerChoice::Vault(s) = flags.choose(Some(&file)).unwrap() else {
            panic!("the file says vault")
        };
        assert_eq!(s.role, "other");
        assert_eq!(s.token_file, None, "a login by flags replaces the file's");

        let per_profile = IssuerArgs {
            vault_profile_role: vec![parse_profile_role("server=meshca-server").unwrap()],
            ..Default::default()
        };
        let IssuerChoice::Vault(s) = per_profile.choose(Some(&file)).unwrap() else {
            panic!("the file says vault")
        };
        assert_eq!(s.role_for(Profile::Server), "meshca-server");
        assert_eq!(s.role_for(Profile::Client), "meshca");
        assert!(parse_profile_role("server").is_err());
        assert!(parse_profile_role("admin=x").is_err());
        assert!(parse_profile_role("client=").is_err());

        let stray = IssuerArgs {
            vault_addr: Some("http://v".into()),
            ..Default::default()
        };
        assert!(
            stray
                .choose(None)
                .unwrap_err()
                .to_string()
                .contains("--issuer vault")
        );
    }
}
