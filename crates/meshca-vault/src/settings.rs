//! Where Vault is and how meshca logs in: parsed once, validated, shared by
//! the flags, the environment and the `[issuer.vault]` table of meshca.toml.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use meshca_pki::{GoDuration, Profile};
use serde::{Deserialize, Serialize};

use crate::VaultError;

/// Default mount of the PKI secrets engine.
pub const DEFAULT_MOUNT: &str = "pki";
/// Default mount of the AppRole auth method.
pub const DEFAULT_APPROLE_MOUNT: &str = "approle";
/// Default time a call to Vault may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval between reads of Vault's issuers and roles.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);

/// The Vault (or OpenBao) PKI meshca has sign for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultSettings {
    /// `http://host:8200` or `https://host:8200`.
    pub addr: String,
    /// The PKI engine's mount path.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The role that signs (for every profile not in `profile_roles`).
    pub role: String,
    /// Other roles for some profiles (`server = "meshca-server"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub profile_roles: BTreeMap<Profile, String>,
    /// A file holding a Vault token (0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The AppRole role id (not a secret on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approle_role_id: Option<String>,
    /// A file holding the AppRole secret id (0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approle_secret_id_file: Option<PathBuf>,
    /// The AppRole auth method's mount path.
    #[serde(default = "default_approle_mount")]
    pub approle_mount: String,
    /// The CA that signed Vault's HTTPS certificate (PEM); without it the
    /// system's roots are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A Vault Enterprise / OpenBao namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// How long one call may take.
    #[serde(default = "default_timeout")]
    pub timeout: GoDuration,
    /// How often issuers, roles and health are read again.
    #[serde(default = "default_refresh")]
    pub refresh: GoDuration,
}

fn default_mount() -> String {
    DEFAULT_MOUNT.to_owned()
}
fn default_approle_mount() -> String {
    DEFAULT_APPROLE_MOUNT.to_owned()
}
fn default_timeout() -> GoDuration {
    GoDuration(DEFAULT_TIMEOUT)
}
fn default_refresh() -> GoDuration {
    GoDuration(DEFAULT_REFRESH)
}

/// How meshca logs in to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// A token read from a file (renewed when renewable; read again when
    /// the file changes).
    TokenFile(PathBuf),
    /// AppRole login (renewed, and logged in again before the token's
    /// maximum lifetime).
    AppRole {
        /// The role id.
        role_id: String,
        /// The file holding the secret id.
        secret_id_file: PathBuf,
        /// The auth method's mount.
        mount: String,
    },
}

impl VaultSettings {
    /// Settings with the defaults for everything but the address, role and login.
    pub fn new(addr: &str, role: &str) -> Self {
        VaultSettings {
            addr: addr.to_owned(),
            mount: default_mount(),
            role: role.to_owned(),
            profile_roles: BTreeMap::new(),
            token_file: None,
            approle_role_id: None,
            approle_secret_id_file: None,
            approle_mount: default_approle_mount(),
            ca_file: None,
            namespace: None,
            timeout: default_timeout(),
            refresh: default_refresh(),
        }
    }

    /// Checks every field; the error names the field and the rule.
    pub fn validate(&self) -> Result<(), VaultError> {
        let bad = |field: &'static str, rule: String| Err(VaultError::Config { field, rule });
        let rest = self
            .addr
            .strip_prefix("https://")
            .or_else(|| self.addr.strip_prefix("http://"));
        match rest {
            Some(host)
                if !host.trim_end_matches('/').is_empty()
                    && !host.contains(char::is_whitespace) => {}
            _ => {
                return bad(
                    "addr",
                    format!(
                        "{:?} is not an http:// or https:// address of Vault",
                        self.addr
                    ),
                );
            }
        }
        if !self.addr.starts_with("https://") && self.ca_file.is_some() {
            return bad(
                "ca_file",
                "a CA file was given for a plain http:// address; use https:// or drop it".into(),
            );
        }
        for (field, value) in [
            ("mount", &self.mount),
            ("approle_mount", &self.approle_mount),
        ] {
            if !is_path(value) {
                return bad(
                    field,
                    format!(
                        "{value:?} is not a mount path (letters, digits, `-`, `_`, `.`, inner `/`)"
                    ),
                );
            }
        }
        let roles = std::iter::once(("role", &self.role))
            .chain(self.profile_roles.values().map(|r| ("profile_roles", r)));
        for (field, role) in roles {
            if !is_name(role) {
                return bad(
                    field,
                    format!("{role:?} is not a role name (letters, digits, `-`, `_`, `.`)"),
                );
            }
        }
        if let Some(ns) = &self.namespace
            && !is_path(ns)
        {
            return bad("namespace", format!("{ns:?} is not a namespace path"));
        }
        if self.timeout.get().is_zero() {
            return bad("timeout", "must be greater than zero".into());
        }
        if self.refresh.get() < Duration::from_millis(100) {
            return bad("refresh", "must be at least 100ms".into());
        }
        self.auth().map(|_| ())
    }

    /// How to log in: exactly one of a token file or an AppRole pair.
    pub fn auth(&self) -> Result<VaultAuth, VaultError> {
        match (
            &self.token_file,
            &self.approle_role_id,
            &self.approle_secret_id_file,
        ) {
            (Some(file), None, None) => Ok(VaultAuth::TokenFile(file.clone())),
            (None, Some(role_id), Some(file)) if !role_id.trim().is_empty() => Ok(VaultAuth::AppRole {
                role_id: role_id.trim().to_owned(),
                secret_id_file: file.clone(),
                mount: self.approle_mount.clone(),
            }),
            (None, None, None) => Err(VaultError::Config {
                field: "token_file",
                rule: "give a Vault token file (--vault-token-file) or an AppRole (--vault-approle-role-id and --vault-approle-secret-id-file)".into(),
            }),
            (Some(_), _, _) => Err(VaultError::Config {
                field: "token_file",
                rule: "give either a token file or an AppRole, not both".into(),
            }),
            _ => Err(VaultError::Config {
                field: "approle_role_id",
                rule: "AppRole needs both the role id and the secret id file".into(),
            }),
        }
    }

    /// The role that signs for `profile`.
    pub fn role_for(&self, profile: Profile) -> &str {
        self.profile_roles
            .get(&profile)
            .map_or(self.role.as_str(), String::as_str)
    }

    /// Every role in use, the default first, without duplicates.
    pub fn roles(&self) -> Vec<&str> {
        let mut roles = vec![self.role.as_str()];
        for r in self.profile_roles.values() {
            if !roles.contains(&r.as_str()) {
                roles.push(r);
            }
        }
        roles
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_path(s: &str) -> bool {
    !s.is_empty() && s.split('/').all(is_name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn with_token() -> VaultSettings {
        let mut s = VaultSettings::new("http://127.0.0.1:8200", "meshca");
        s.token_file = Some("/run/vault-token".into());
        s
    }

    #[test]
    fn valid_settings_round_trip_through_toml() {
        let mut s = with_token();
        s.profile_roles
            .insert(Profile::Server, "meshca-server".into());
        s.validate().unwrap();
        let text = toml::to_string(&s).unwrap();
        let back: VaultSettings = toml::from_str(&text).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.role_for(Profile::Server), "meshca-server");
        assert_eq!(back.role_for(Profile::Client), "meshca");
        assert_eq!(back.roles(), ["meshca", "meshca-server"]);
    }

    type Change = Box<dyn Fn(&mut VaultSettings)>;

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.addr = "vault:8200".into()), "addr"),
            (Box::new(|s| s.addr = "https://".into()), "addr"),
            (Box::new(|s| s.role = "../sys".into()), "role"),
            (Box::new(|s| s.role = String::new()), "role"),
            (Box::new(|s| s.mount = "/pki".into()), "mount"),
            (Box::new(|s| s.mount = "pki/../sys".into()), "mount"),
            (
                Box::new(|s| s.timeout = GoDuration(Duration::ZERO)),
                "timeout",
            ),
            (Box::new(|s| s.ca_file = Some("/ca.pem".into())), "ca_file"),
            (Box::new(|s| s.token_file = None), "token_file"),
            (
                Box::new(|s| s.approle_role_id = Some("r".into())),
                "token_file",
            ),
            (
                Box::new(|s| {
                    s.token_file = None;
                    s.approle_role_id = Some("r".into());
                }),
                "approle_role_id",
            ),
        ];
        for (change, field) in cases {
            let mut s = with_token();
            change(&mut s);
            let e = s.validate().unwrap_err();
            assert!(
                matches!(&e, VaultError::Config { field: f, .. } if *f == field),
                "{field}: {e}"
            );
            assert!(e.to_string().contains(field), "{e}");
        }
        let mut s = with_token();
        s.token_file = None;
        s.approle_role_id = Some("role-id".into());
        s.approle_secret_id_file = Some("/run/secret-id".into());
        assert!(matches!(s.auth().unwrap(), VaultAuth::AppRole { .. }));
        assert!(
            toml::from_str::<VaultSettings>("addr = \"http://v\"\nrole = \"r\"\nrol = \"x\"\n")
                .is_err()
        );
    }
}
