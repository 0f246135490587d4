//! Routes: parsed once (flags or a TOML file with `[[route]]` tables) into
//! validated settings.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use meshca_pki::GoDuration;
use meshca_tls::{PeerMatcher, Revocation, ServerIdentity, TlsVersion};
use serde::{Deserialize, Serialize};

use crate::ProxyError;

/// Default idle timeout of a proxied connection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time open connections get to finish on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Which side of mTLS a route is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Terminates mTLS and forwards plaintext to the target.
    Server,
    /// Accepts plaintext and originates mTLS to the target.
    Client,
}

/// Where a route connects: `host:port` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP address (a name is resolved at each connection).
    Tcp(String),
    /// A Unix socket.
    Unix(PathBuf),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path (unix:/run/app.sock)".into());
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Ok(Target::Tcp(s.to_owned()))
            }
            _ => Err(format!("{s:?} is not host:port or unix:/path")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => f.write_str(a),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One listener and where its connections go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A name for logs and metrics.
    pub name: String,
    /// `server` or `client`.
    pub side: Side,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to connect.
    pub target: Target,
    /// The identity's files (`tls.crt`, `tls.key`, `ca.crt`: what the agent
    /// keeps fresh); reloaded when they change.
    pub certs: PathBuf,
    /// Server side: the peers let through: exact SPIFFE IDs,
    /// `spiffe://td/ns/x/*` for every ID below a path, exact DNS names
    /// ([`PeerMatcher`]); empty: any peer the bundle trusts. Not with
    /// `permissive`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<PeerMatcher>,
    /// Server side: also accept plaintext and TLS without a client
    /// certificate (migration), passed through without an identity. Takes
    /// no `allow`: those clients would get past it.
    #[serde(default)]
    pub permissive: bool,
    /// Server side: send a PROXY protocol v2 header with the client's
    /// address and verified identity to the target.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Client side: who the server must be: an exact SPIFFE ID,
    /// `spiffe://td/ns/x/*`, or an exact DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
    /// Oldest TLS version (1.3 unless told).
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Server side: a client certificate whose revocation cannot be checked
    /// (no current CRL of its issuer in `certs/ca.crl`): `fail-open` lets it
    /// in, `fail-closed` refuses it. A listed certificate is refused either way.
    #[serde(default)]
    pub revocation: Revocation,
    /// A connection with no byte either way for this long is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout: GoDuration,
}

fn default_idle() -> GoDuration {
    GoDuration(DEFAULT_IDLE_TIMEOUT)
}
fn default_grace() -> GoDuration {
    GoDuration(DEFAULT_SHUTDOWN_GRACE)
}

/// A whole proxy process: its routes and what they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// `/healthz` and `/metrics` on this address (plain HTTP, for probes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<SocketAddr>,
    /// On SIGTERM, how long open connections get to finish.
    #[serde(default = "default_grace")]
    pub shutdown_grace: GoDuration,
    /// The routes (`[[route]]` tables).
    #[serde(rename = "route")]
    pub routes: Vec<Route>,
}

impl Route {
    /// A route with the defaults.
    pub fn new(name: &str, side: Side, listen: SocketAddr, target: Target, certs: PathBuf) -> Self {
        Route {
            name: name.to_owned(),
            side,
            listen,
            target,
            certs,
            allow: Vec::new(),
            permissive: false,
            proxy_protocol: false,
            server_id: None,
            min_version: TlsVersion::default(),
            revocation: Revocation::default(),
            idle_timeout: default_idle(),
        }
    }

    /// The expected server identity of a client route.
    pub fn server_identity(&self) -> Result<ServerIdentity, ProxyError> {
        let id = self.server_id.as_deref().ok_or_else(|| self.bad(
            "a client route needs server_id (--server-id): the SPIFFE ID or DNS name the server must have",
        ))?;
        ServerIdentity::parse(id).map_err(|e| self.bad(&format!("server_id: {e}")))
    }

    fn bad(&self, rule: &str) -> ProxyError {
        ProxyError::Config {
            route: self.name.clone(),
            rule: rule.to_owned(),
        }
    }

    fn validate(&self) -> Result<(), ProxyError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(self.bad("name must be letters, digits, `-`, `_` or `.`"));
        }
        if self.idle_timeout.get().is_zero() {
            return Err(self.bad("idle_timeout must be greater than zero"));
        }
        match self.side {
            Side::Server => {
                if self.server_id.is_some() {
                    return Err(self.bad(
                        "server_id is for client routes; a server route checks clients with allow",
                    ));
                }
                // In permissive mode a client without a certificate, or in
                // plaintext, reaches the target while a certificate outside
                // the list is refused: the list would only stop those who
                // identify themselves.
                if self.permissive && !self.allow.is_empty() {
                    return Err(self.bad(
                        "permissive (--permissive) and allow (--allow) do not go together: \
                         permissive lets clients without a certificate, and plaintext clients, \
                         reach the target, so the allow-list would refuse only certificates outside it; \
                         drop permissive to enforce the list (mtls), or drop allow while migrating",
                    ));
                }
            }
            Side::Client => {
                if !self.allow.is_empty() || self.permissive || self.proxy_protocol {
                    return Err(self.bad(
                        "allow, permissive and proxy_protocol are for server routes; a client route checks the server with server_id",
                    ));
                }
                if let Target::Unix(_) = self.target {
                    return Err(
                        self.bad("a client route's target is a remote mTLS server: host:port")
                    );
                }
                self.server_identity()?;
            }
        }
        Ok(())
    }
}

impl ProxyConfig {
    /// Reads and validates a TOML file; errors name the file and the field.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ProxyError> {
        let config: ProxyConfig = toml::from_str(text).map_err(|e| ProxyError::Config {
            route: origin.to_owned(),
            rule: e.message().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every route and that names and listen addresses are unique.
    pub fn validate(&self) -> Result<(), ProxyError> {
        if self.routes.is_empty() {
            return Err(ProxyError::Config {
                route: "proxy".into(),
                rule: "no route: give at least one [[route]]".into(),
            });
        }
        let (mut names, mut addrs) = (HashSet::new(), HashSet::new());
        for r in &self.routes {
            r.validate()?;
            if !names.insert(&r.name) {
                return Err(r.bad("the name is used by another route"));
            }
            if !addrs.insert(r.listen) {
                return Err(r.bad(&format!(
                    "{} is the listen address of another route",
                    r.listen
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "unix:/run/a.sock".parse::<Target>().unwrap(),
            Target::Unix("/run/a.sock".into())
        );
        assert_eq!(
            "db:5432".parse::<Target>().unwrap(),
            Target::Tcp("db:5432".into())
        );
        assert_eq!(
            "[::1]:80".parse::<Target>().unwrap(),
            Target::Tcp("[::1]:80".into())
        );
        for bad in ["db", "db:0", ":80", "unix:", "db:port"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn files_round_trip_and_mistakes_are_named() {
        let text = r#"
health = "127.0.0.1:9901"
shutdown_grace = "5s"

[[route]]
name = "api"
side = "server"
listen = "0.0.0.0:8443"
target = "unix:/run/api.sock"
certs = "/var/run/meshca/api"
allow = ["spiffe://cluster.local/ns/shop/*"]
proxy_protocol = true

[[route]]
name = "db"
side = "client"
listen = "127.0.0.1:5432"
target = "db.data.svc:5433"
certs = "/var/run/meshca/api"
server_id = "spiffe://cluster.local/ns/data/sa/db"
"#;
        let c = ProxyConfig::parse(text, "proxy.toml").unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.shutdown_grace.get(), Duration::from_secs(5));
        let again = ProxyConfig::parse(&toml::to_string(&c).unwrap(), "again").unwrap();
        assert_eq!(again, c);

        let cases = [
            (
                text.replace("side = \"client\"", "side = \"sideways\""),
                "sideways",
            ),
            (
                text.replace("server_id = \"spiffe://cluster.local/ns/data/sa/db\"", ""),
                "server_id",
            ),
            (
                text.replace("\"127.0.0.1:5432\"", "\"0.0.0.0:8443\""),
                "listen address of another route",
            ),
            (
                text.replace("name = \"db\"", "name = \"api\""),
                "name is used",
            ),
            (
                text.replace(
                    "proxy_protocol = true",
                    "proxy_protocol = true\nidle_timeout = \"0s\"",
                ),
                "idle_timeout",
            ),
            (
                text.replace("target = \"db.data.svc:5433\"", "target = \"unix:/x\""),
                "host:port",
            ),
            (text.replace("allow = [", "alow = ["), "alow"),
            (
                text.replace(
                    "proxy_protocol = true",
                    "proxy_protocol = true\npermissive = true",
                ),
                "route api: permissive (--permissive) and allow (--allow) do not go together",
            ),
            (
                text.replace(
                    "spiffe://cluster.local/ns/shop/*",
                    "spiffe://cluster.local/ns/shop*",
                ),
                "invalid allow rule \"spiffe://cluster.local/ns/shop*\"",
            ),
            (
                text.replace("\"spiffe://cluster.local/ns/shop/*\"", "\"api*\""),
                "invalid allow rule \"api*\"",
            ),
            (
                text.replace(
                    "server_id = \"spiffe://cluster.local/ns/data/sa/db\"",
                    "server_id = \"spiffe://cluster.local/ns/data*\"",
                ),
                "route db: server_id: invalid TLS configuration: invalid server identity",
            ),
            (
                "health = \"127.0.0.1:1\"\nroute = []\n".to_owned(),
                "no route",
            ),
        ];
        for (bad, needle) in cases {
            let e = ProxyConfig::parse(&bad, "proxy.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    fn server_route() -> Route {
        Route::new(
            "api",
            Side::Server,
            "127.0.0.1:8443".parse().unwrap(),
            Target::Tcp("127.0.0.1:8080".into()),
            "/run/meshca/api".into(),
        )
    }

    #[test]
    fn permissive_routes_take_no_allow_list() {
        let mut route = server_route();
        route.permissive = true;
        route.validate().unwrap();
        route.allow = vec!["spiffe://cluster.local/ns/shop/*".parse().unwrap()];
        let e = route.validate().unwrap_err().to_string();
        for needle in [
            "route api:",
            "permissive",
            "allow",
            "without a certificate",
            "plaintext",
            "drop permissive to enforce the list (mtls), or drop allow",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        route.permissive = false;
        route.validate().unwrap();
    }
}
