//! Vault's HTTP API: calls, error mapping, and the login that keeps a token.

use std::fmt;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::VaultError;
use crate::settings::{VaultAuth, VaultSettings};

/// Largest answer read from Vault (a sign answer is a few KiB).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Largest token or secret id file.
const MAX_SECRET_BYTES: u64 = 16 * 1024;

/// A Vault token. Never printed.
#[derive(Clone)]
pub(crate) struct Token {
    secret: String,
    /// `None`: it does not expire.
    ttl: Option<Duration>,
    renewable: bool,
    obtained: Instant,
    /// The token file's content it came from (to notice a replaced file).
    from_file: Option<String>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("secret", &"...")
            .field("ttl", &self.ttl)
            .field("renewable", &self.renewable)
            .finish()
    }
}

impl Token {
    /// Whether it is time to renew or log in again: two thirds of its life
    /// gone (linkerd's rule for certificates, applied to tokens).
    fn due(&self, now: Instant) -> bool {
        self.ttl
            .is_some_and(|ttl| now.duration_since(self.obtained) >= ttl.mul_f64(2.0 / 3.0))
    }
}

/// A client of one Vault, logged in.
#[derive(Debug)]
pub(crate) struct VaultClient {
    http: reqwest::Client,
    base: String,
    addr: String,
    namespace: Option<String>,
    auth: VaultAuth,
    token: RwLock<Option<Token>>,
}

impl VaultClient {
    pub(crate) fn new(settings: &VaultSettings) -> Result<Self, VaultError> {
        settings.validate()?;
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout.get())
            .connect_timeout(settings.timeout.get().min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // No redirect is followed: reqwest would send X-Vault-Token
            // (a header it does not know to be secret) and, on a 307 or
            // 308, an AppRole login's body with its secret id again, to
            // wherever the redirect points. A 3xx is an error (`exchange`).
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some(ca) = &settings.ca_file {
            let pem = meshca_files::read_limited(ca, 1024 * 1024)?;
            let certs = meshca_pki::parse_certs(&pem).map_err(|e| VaultError::Config {
                field: "ca_file",
                rule: format!("{}: {e}", ca.display()),
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for der in certs {
                roots
                    .add(rustls_pki_types::CertificateDer::from(der))
                    .map_err(|e| VaultError::Config {
                        field: "ca_file",
                        rule: format!("{}: {e}", ca.display()),
                    })?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| VaultError::Config {
                field: "ca_file",
                rule: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
            builder = builder.tls_backend_preconfigured(tls);
        }
        let http = builder.build().map_err(|e| VaultError::Config {
            field: "addr",
            rule: format!("cannot build an HTTP client: {e}"),
        })?;
        let addr = settings.addr.trim_end_matches('/').to_owned();
        Ok(VaultClient {
            http,
            base: format!("{addr}/v1/"),
            addr,
            namespace: settings.namespace.clone(),
            auth: settings.auth()?,
            token: RwLock::new(None),
        })
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    fn current_token(&self) -> Option<Token> {
        self.token.read().ok().and_then(|t| t.clone())
    }

    fn set_token(&self, token: Token) {
        if let Ok(mut t) = self.token.write() {
            *t = Some(token);
        }
    }

    /// Logs in (or reads the token file) when there is no token yet.
    pub(crate) async fn ensure_login(&self) -> Result<(), VaultError> {
        if self.current_token().is_none() {
            self.login().await?;
        }
        Ok(())
    }

    /// Gets a fresh token: reads the token file (and looks the token up for
    /// its lifetime) or logs in with AppRole.
    pub(crate) async fn login(&self) -> Result<(), VaultError> {
        let token = match &self.auth {
            VaultAuth::TokenFile(path) => {
                let raw = meshca_files::read_secret(path, MAX_SECRET_BYTES)?;
                let secret = String::from_utf8(raw)
                    .map_err(|_| VaultError::Config {
                        field: "token_file",
                        rule: format!("{} is not UTF-8 text", path.display()),
                    })?
                    .trim()
                    .to_owned();
                if secret.is_empty() {
                    return Err(VaultError::Config {
                        field: "token_file",
                        rule: format!("{} is empty", path.display()),
                    });
                }
                let look = self
                    .send(Method::GET, "auth/token/lookup-self", None, Some(&secret))
                    .await?;
                let data = &look["data"];
                let ttl = data["ttl"]
                    .as_u64()
                    .ok_or_else(|| bad("auth/token/lookup-self", "no ttl"))?;
                Token {
                    from_file: Some(secret.clone()),
                    secret,
                    ttl: (ttl > 0).then(|| Duration::from_secs(ttl)),
                    renewable: data["renewable"].as_bool().unwrap_or(false),
                    obtained: Instant::now(),
                }
            }
            VaultAuth::AppRole {
                role_id,
                secret_id_file,
                mount,
            } => {
                let raw = meshca_files::read_secret(secret_id_file, MAX_SECRET_BYTES)?;
                let secret_id = String::from_utf8_lossy(&raw).trim().to_owned();
                let path = format!("auth/{mount}/login");
                let body = serde_json::json!({"role_id": role_id, "secret_id": secret_id});
                let answer = self.send(Method::POST, &path, Some(&body), None).await?;
                token_from_auth(&path, &answer, None)?
            }
        };
        tracing::info!(
            vault = %self.addr,
            ttl_seconds = token.ttl.map(|t| t.as_secs()),
            renewable = token.renewable,
            "logged in to Vault"
        );
        self.set_token(token);
        Ok(())
    }

    /// Keeps the token alive: renews it at two thirds of its life, logs in
    /// again when it cannot be renewed (or renewal no longer extends it),
    /// and picks up a replaced token file.
    pub(crate) async fn keep_fresh(&self) -> Result<(), VaultError> {
        let Some(token) = self.current_token() else {
            return self.login().await;
        };
        if let VaultAuth::TokenFile(path) = &self.auth
            && let Ok(raw) = meshca_files::read_secret(path, MAX_SECRET_BYTES)
            && token.from_file.as_deref() != Some(String::from_utf8_lossy(&raw).trim())
        {
            tracing::info!(file = %path.display(), "the Vault token file changed; using the new token");
            return self.login().await;
        }
        if !token.due(Instant::now()) {
            return Ok(());
        }
        if token.renewable {
            let path = "auth/token/renew-self";
            match self
                .send(
                    Method::POST,
                    path,
                    Some(&serde_json::json!({})),
                    Some(&token.secret),
                )
                .await
                .and_then(|a| token_from_auth(path, &a, Some(&token)))
            {
                // Renewal that no longer extends the token (its max TTL is
                // near) is no renewal: log in again below.
                Ok(renewed)
                    if renewed
                        .ttl
                        .zip(token.ttl)
                        .is_none_or(|(new, old)| new >= old / 2) =>
                {
                    tracing::debug!(
                        ttl_seconds = renewed.ttl.map(|t| t.as_secs()),
                        "renewed the Vault token"
                    );
                    self.set_token(renewed);
                    return Ok(());
                }
                Ok(renewed) => self.set_token(renewed),
                Err(e) => tracing::warn!("renewing the Vault token failed: {e}"),
            }
        }
        match &self.auth {
            VaultAuth::AppRole { .. } => self.login().await,
            // A token from a file cannot be replaced by meshca: say so while
            // it still works.
            VaultAuth::TokenFile(path) => {
                tracing::warn!(
                    file = %path.display(),
                    "the Vault token cannot be renewed and will expire; put a new token in the file"
                );
                Ok(())
            }
        }
    }

    /// An authenticated call; on a refused token it logs in once more and
    /// tries again (an AppRole token may have expired while idle).
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, VaultError> {
        self.ensure_login().await?;
        let token = self.current_token().map(|t| t.secret);
        match self
            .send(method.clone(), path, body, token.as_deref())
            .await
        {
            Err(e) if e.is_denied() => {
                self.login().await?;
                let token = self.current_token().map(|t| t.secret);
                self.send(method, path, body, token.as_deref()).await
            }
            other => other,
        }
    }

    /// An unauthenticated GET of raw bytes (the CRL).
    pub(crate) async fn get_raw(&self, path: &str) -> Result<Vec<u8>, VaultError> {
        let (status, bytes) = self.exchange(Method::GET, path, None, None).await?;
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(self.error_for(status, path, &bytes).await)
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<Value, VaultError> {
        let (status, bytes) = self.exchange(method, path, body, token).await?;
        if !status.is_success() {
            return Err(self.error_for(status, path, &bytes).await);
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| bad(path, &format!("not JSON: {e}")))
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<(StatusCode, Vec<u8>), VaultError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let mut resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp.headers().get(reqwest::header::LOCATION).map_or_else(
                || "nowhere (no Location header)".to_owned(),
                |l| truncate(&String::from_utf8_lossy(l.as_bytes())),
            );
            return Err(VaultError::Redirected {
                addr: self.addr.clone(),
                path: path.to_owned(),
                status: status.as_u16(),
                location,
            });
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(&e))? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_ANSWER_BYTES {
                return Err(bad(path, "the answer is larger than 4 MiB"));
            }
        }
        Ok((status, bytes))
    }

    fn unreachable(&self, e: &reqwest::Error) -> VaultError {
        let mut reason = if e.is_timeout() {
            "timed out".to_owned()
        } else if e.is_connect() {
            "connection failed".to_owned()
        } else {
            "request failed".to_owned()
        };
        // reqwest's Display hides the cause (refused, TLS, ...): walk it.
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        VaultError::Unreachable {
            addr: self.addr.clone(),
            reason,
        }
    }

    async fn error_for(&self, status: StatusCode, path: &str, body: &[u8]) -> VaultError {
        let reason = vault_errors(body);
        match status {
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => VaultError::Denied {
                path: path.to_owned(),
                reason,
            },
            StatusCode::NOT_FOUND => VaultError::NotFound {
                path: path.to_owned(),
            },
            StatusCode::BAD_REQUEST => VaultError::Refused {
                path: path.to_owned(),
                reason,
            },
            // A 503 may mean sealed: ask the seal status, which says so as a
            // typed field rather than in prose.
            StatusCode::SERVICE_UNAVAILABLE if self.is_sealed().await => VaultError::Sealed {
                addr: self.addr.clone(),
            },
            s if s.is_server_error() => VaultError::Unreachable {
                addr: self.addr.clone(),
                reason: format!("HTTP {}: {reason}", s.as_u16()),
            },
            s => VaultError::BadAnswer {
                path: path.to_owned(),
                reason: format!("HTTP {}: {reason}", s.as_u16()),
            },
        }
    }

    async fn is_sealed(&self) -> bool {
        let path = "sys/seal-status";
        match self.exchange(Method::GET, path, None, None).await {
            Ok((_, bytes)) => serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["sealed"].as_bool())
                .unwrap_or(false),
            Err(_) => false,
        }
    }
}

/// Vault's `{"errors": [...]}`, joined; the start of the body otherwise.
fn vault_errors(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v["errors"].as_array() {
            Some(list) if !list.is_empty() => list
                .iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join("; "),
            Some(_) => "no reason given".to_owned(),
            None => truncate(&v.to_string()),
        },
        Err(_) => truncate(&String::from_utf8_lossy(body)),
    }
}

fn truncate(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None if s.is_empty() => "an empty body".to_owned(),
        None => s.to_owned(),
    }
}

pub(crate) fn bad(path: &str, reason: &str) -> VaultError {
    VaultError::BadAnswer {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The token in an `auth` block (login or renew-self).
fn token_from_auth(path: &str, answer: &Value, old: Option<&Token>) -> Result<Token, VaultError> {
    let auth = &answer["auth"];
    let secret = match auth["client_token"].as_str() {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => match old {
            Some(t) => t.secret.clone(),
            None => return Err(bad(path, "no auth.client_token")),
        },
    };
    let lease = auth["lease_duration"]
        .as_u64()
        .ok_or_else(|| bad(path, "no auth.lease_duration"))?;
    Ok(Token {
        secret,
        ttl: (lease > 0).then(|| Duration::from_secs(lease)),
        renewable: auth["renewable"].as_bool().unwrap_or(false),
        obtained: Instant::now(),
        from_file: old.and_then(|t| t.from_file.clone()),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn vault_errors_are_quoted_and_bounded() {
        assert_eq!(vault_errors(br#"{"errors":["a","b"]}"#), "a; b");
        assert_eq!(vault_errors(br#"{"errors":[]}"#), "no reason given");
        assert_eq!(vault_errors(b""), "an empty body");
        assert!(vault_errors(&[b'x'; 1000]).len() < 300);
    }

    #[test]
    fn tokens_are_due_at_two_thirds_and_never_printed() {
        let t = Token {
            secret: "s.hunter2".into(),
            ttl: Some(Duration::from_secs(30)),
            renewable: true,
            obtained: Instant::now(),
            from_file: None,
        };
        assert!(!t.due(Instant::now()));
        assert!(t.due(Instant::now() + Duration::from_secs(21)));
        assert!(!format!("{t:?}").contains("hunter2"));
        let forever = Token { ttl: None, ..t };
        assert!(!forever.due(Instant::now() + Duration::from_secs(1_000_000)));
        let answer = serde_json::json!({"auth": {"client_token": "t2", "lease_duration": 60, "renewable": true}});
        let renewed = token_from_auth("p", &answer, Some(&forever)).unwrap();
        assert_eq!(renewed.ttl, Some(Duration::from_secs(60)));
        assert!(token_from_auth("p", &serde_json::json!({}), None).is_err());
    }

    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// An HTTP/1.1 server on a real loopback socket: it records every
    /// request (head and body) and answers each with `answer(request)`.
    struct Http {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl Http {
        fn start(answer: impl Fn(&str) -> String + Send + 'static) -> Http {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let Some(request) = read_request(&mut stream) else {
                        continue;
                    };
                    let reply = answer(&request);
                    log.lock().unwrap().push(request);
                    let _ = stream.write_all(reply.as_bytes());
                }
            });
            Http { addr, seen }
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        fn seen(&self) -> Vec<String> {
            self.seen.lock().unwrap().clone()
        }
    }

    fn read_request(stream: &mut TcpStream) -> Option<String> {
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                while buf.len() < end + 4 + length {
                    let n = stream.read(&mut chunk).ok()?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn reply(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> std::path::PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        f.write_all(secret.as_bytes()).unwrap();
        path
    }

    #[tokio::test]
    async fn redirects_are_not_followed_and_carry_no_secret_elsewhere() {
        // Elsewhere: a host that would gladly take the token, and answers
        // as Vault would, so that a followed redirect logs in.
        let elsewhere = Http::start(|request| {
            let body = if request.contains("/login") {
                r#"{"auth":{"client_token":"s.elsewhere","lease_duration":0,"renewable":false}}"#
            } else {
                r#"{"data":{"ttl":0,"renewable":false}}"#
            };
            reply("200 OK", "Content-Type: application/json\r\n", body)
        });
        let to = elsewhere.url();
        // "Vault": every answer a 307 to the same path elsewhere.
        let vault = Http::start(move |request| {
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            reply(
                "307 Temporary Redirect",
                &format!("Location: {to}{path}\r\n"),
                "",
            )
        });
        let dir = tempfile::tempdir().unwrap();

        let mut settings = VaultSettings::new(&vault.url(), "meshca");
        settings.token_file = Some(secret_file(dir.path(), "token", "s.the-vault-token"));
        let client = VaultClient::new(&settings).unwrap();
        let result = client.login().await;
        assert!(
            elsewhere.seen().is_empty(),
            "the redirect was followed: {:?}",
            elsewhere.seen()
        );
        let e = result.unwrap_err();
        assert!(
            matches!(&e, VaultError::Redirected { status: 307, .. }),
            "{e:?}"
        );
        let text = e.to_string();
        for needle in [
            format!("{}/v1/auth/token/lookup-self", elsewhere.url()),
            "HTTP 307".to_owned(),
            "does not follow redirects".to_owned(),
            "--vault-addr".to_owned(),
        ] {
            assert!(text.contains(&needle), "{needle}: {text}");
        }
        assert!(!text.contains("the-vault-token"), "{text}");
        // The one request went to the configured address only.
        let asked = vault.seen();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert!(
            asked[0]
                .to_ascii_lowercase()
                .contains("x-vault-token: s.the-vault-token")
        );

        // AppRole: the login (a POST, which a 307 would repeat with its
        // body) does not send the secret id anywhere else either.
        let mut settings = VaultSettings::new(&vault.url(), "meshca");
        settings.approle_role_id = Some("role-id".into());
        settings.approle_secret_id_file =
            Some(secret_file(dir.path(), "secret-id", "the-secret-id"));
        let client = VaultClient::new(&settings).unwrap();
        let result = client.login().await;
        assert!(
            elsewhere.seen().is_empty(),
            "the redirect was followed: {:?}",
            elsewhere.seen()
        );
        let e = result.unwrap_err();
        assert!(matches!(&e, VaultError::Redirected { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("{}/v1/auth/approle/login", elsewhere.url())),
            "{e}"
        );
        assert!(vault.seen().iter().any(|r| r.contains("the-secret-id")));
        // Unhealthy as a setting, so /readyz and `ca status` say so.
        assert_eq!(e.unhealthy().map(|u| u.label()), Some("misconfigured"));
    }
}
