//! A client of the meshca API, for the CLI and the agent.
//!
//! # Design
//! One HTTPS request per call over its own connection (hyper's HTTP/1.1
//! client on tokio-rustls): the CLI makes a handful of calls, and the agent
//! renews once in hours. The server is verified against `ca.crt`, the
//! URL's host, and the CA's own SPIFFE ID (`spiffe://<td>/ns/meshca-system/sa/meshca`,
//! see [`verify`]: a DNS name alone could belong to a workload); the caller is authenticated by a client certificate, a join
//! token, or both absent for public endpoints. Error answers come back as
//! [`ClientError::Api`] with the server's code and message.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), meshca_client::ClientError> {
//! let client = meshca_client::Client::builder("https://localhost:9443")?
//!     .trust_pem(&std::fs::read("meshca-data/admin/ca.crt").unwrap())?
//!     .identity_pem(&std::fs::read("meshca-data/admin/tls.crt").unwrap(), &std::fs::read("meshca-data/admin/tls.key").unwrap())?
//!     .build()?;
//! let status = client.get("/v1/ca").await?;
//! println!("{status}");
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde_json::Value;

pub mod verify;

/// A handshake error in words: the CA identity check's own message rather
/// than rustls's debug form of it.
fn tls_error(e: &std::io::Error) -> String {
    let not_the_ca = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                o.0.downcast_ref::<verify::NotTheCa>()
                    .map(ToString::to_string)
            }
            _ => None,
        });
    not_the_ca.unwrap_or_else(|| e.to_string())
}

/// How long one call may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong in a call.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The server URL or credentials are unusable.
    Config(String),
    /// The server could not be reached or the TLS handshake failed.
    Connect(String),
    /// The server answered with an error.
    Api {
        /// HTTP status.
        status: u16,
        /// The server's error code.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The answer was not what the API promises.
    Protocol(String),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when retrying later may help (unreachable, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect(_) => true,
            ClientError::Api { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Config(e) => write!(f, "{e}"),
            ClientError::Connect(e) => write!(f, "cannot reach the meshca server: {e}"),
            ClientError::Api {
                status,
                code,
                message,
            } => write!(f, "the server refused ({status} {code}): {message}"),
            ClientError::Protocol(e) => write!(f, "unexpected answer from the server: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Builds a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    host: String,
    port: u16,
    roots: rustls::RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    token: Option<String>,
    extra: Vec<(String, String)>,
    trust_domain: Option<String>,
}

impl ClientBuilder {
    /// Requires the CA to be in this trust domain (else any trust domain
    /// whose roots are trusted).
    pub fn trust_domain(mut self, td: &str) -> Self {
        self.trust_domain = Some(td.to_owned());
        self
    }

    /// Trusts the CA certificates in this PEM bundle (the server's `ca.crt`).
    pub fn trust_pem(mut self, pem: &[u8]) -> Result<Self, ClientError> {
        for c in CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| ClientError::Config(format!("bad CA bundle: {e}")))?;
            self.roots
                .add(c)
                .map_err(|e| ClientError::Config(format!("bad CA certificate: {e}")))?;
        }
        if self.roots.is_empty() {
            return Err(ClientError::Config(
                "the CA bundle holds no certificate".into(),
            ));
        }
        Ok(self)
    }

    /// Presents this certificate chain and key.
    pub fn identity_pem(mut self, cert: &[u8], key: &[u8]) -> Result<Self, ClientError> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Config(format!("bad client certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| ClientError::Config(format!("bad client key: {e}")))?;
        self.identity = Some((chain, key));
        Ok(self)
    }

    /// Sends this header on every request (an agent's bundle fingerprint).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.extra.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends `Authorization: Bearer <token>`.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// The client.
    pub fn build(self) -> Result<Client, ClientError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| ClientError::Config(format!("bad CA bundle: {e}")))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::CaVerifier {
                inner: webpki,
                trust_domain: self.trust_domain,
            }));
        let config = match self.identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Config(format!("client certificate: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from(
            self.host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )
        .map_err(|e| ClientError::Config(format!("server host {:?}: {e}", self.host)))?;
        Ok(Client {
            addr: format!("{}:{}", self.host, self.port),
            host: self.host,
            name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            token: self.token,
            extra: self.extra,
            max_body: None,
        })
    }
}

/// A meshca API client.
#[derive(Clone)]
pub struct Client {
    addr: String,
    host: String,
    name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    token: Option<String>,
    extra: Vec<(String, String)>,
    /// Largest answer body read (none: as large as the server sends).
    max_body: Option<usize>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Reads at most `max` bytes of any answer (an unverified server must
    /// not be able to fill the caller's memory).
    pub fn with_body_limit(mut self, max: usize) -> Self {
        self.max_body = Some(max);
        self
    }

    /// Starts building a client of `url` (`https://host[:port]`, port 9443 by default).
    pub fn builder(url: &str) -> Result<ClientBuilder, ClientError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| {
                ClientError::Config(format!("server URL {url:?} must start with https://"))
            })?
            .trim_end_matches('/');
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| ClientError::Config(format!("bad server URL {url:?}")))?;
            let port = after.strip_prefix(':').map(str::parse::<u16>).transpose();
            (format!("[{h}]"), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse::<u16>().map(Some)),
                None => (rest.to_owned(), Ok(None)),
            }
        };
        let port = port
            .map_err(|_| ClientError::Config(format!("bad port in server URL {url:?}")))?
            .unwrap_or(9443);
        if host.is_empty() || host.contains('/') {
            return Err(ClientError::Config(format!(
                "bad host in server URL {url:?}"
            )));
        }
        Ok(ClientBuilder {
            host,
            port,
            roots: rustls::RootCertStore::empty(),
            identity: None,
            token: None,
            extra: Vec::new(),
            trust_domain: None,
        })
    }

    /// `GET path`, JSON answer.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.json(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body, JSON answer.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.json(Method::POST, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.json(Method::DELETE, path, None).await
    }

    /// Any call with a JSON answer (an empty answer is `null`).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let (status, bytes) = self
            .raw(method, path, body.map(|b| b.to_string().into_bytes()), &[])
            .await?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(format!("{status}: not JSON: {e}")))?
        };
        if status.is_success() {
            Ok(value)
        } else {
            Err(ClientError::Api {
                status: status.as_u16(),
                code: value["error"]["code"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
                message: value["error"]["message"]
                    .as_str()
                    .unwrap_or("(no message)")
                    .to_owned(),
            })
        }
    }

    /// Any call; the status and body as they came.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), ClientError> {
        tokio::time::timeout(TIMEOUT, self.raw_inner(method, path, body, headers))
            .await
            .map_err(|_| {
                ClientError::Connect(format!("no answer from {} within {TIMEOUT:?}", self.addr))
            })?
    }

    /// A new HTTP/1.1 connection to the server over TLS.
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| ClientError::Connect(format!("{}: {e}", self.addr)))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| {
                ClientError::Connect(format!("TLS with {}: {}", self.addr, tls_error(&e)))
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn raw_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut sender = self.connect().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in &self.extra {
            req = req.header(k.as_str(), v.as_str());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let status = resp.status();
        let bytes = match self.max_body {
            None => resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Connect(e.to_string()))?
                .to_bytes(),
            Some(max) => http_body_util::Limited::new(resp.into_body(), max)
                .collect()
                .await
                .map_err(|e| {
                    ClientError::Protocol(format!(
                        "the answer is larger than the {max} bytes taken from this server ({e})"
                    ))
                })?
                .to_bytes(),
        };
        Ok((status, bytes))
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field.
    pub id: Option<String>,
    /// The `event:` field.
    pub kind: String,
    /// The `data:` field (JSON for meshca events).
    pub data: String,
}

/// A stream of server-sent events (`GET /v1/events`).
pub struct EventStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl EventStream {
    /// The next event; `None` when the server closed the stream.
    pub async fn next(&mut self) -> Option<Result<SseEvent, ClientError>> {
        loop {
            if let Some(end) = find_blank_line(&self.buf) {
                let block: Vec<u8> = self.buf.drain(..end).collect();
                let text = String::from_utf8_lossy(&block);
                let mut ev = SseEvent {
                    id: None,
                    kind: "message".into(),
                    data: String::new(),
                };
                let mut any = false;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim().to_owned());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.kind = v.trim().to_owned();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !ev.data.is_empty() {
                            ev.data.push('\n');
                        }
                        ev.data.push_str(v.trim_start());
                        any = true;
                    }
                }
                if any {
                    return Some(Ok(ev));
                }
                continue; // a keep-alive comment
            }
            if self.buf.len() > 1 << 20 {
                return Some(Err(ClientError::Protocol(
                    "an event larger than 1 MiB".into(),
                )));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Some(Err(ClientError::Connect(e.to_string()))),
                None => return None,
            }
        }
    }
}

/// The end of the first event block (after its blank line), if complete.
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

impl Client {
    /// Opens `GET /v1/events`, resuming after `last_id` when given.
    pub async fn events(&self, last_id: Option<&str>) -> Result<EventStream, ClientError> {
        let mut sender = self.connect().await?;
        let mut req = Request::builder()
            .method(Method::GET)
            .uri("/v1/events")
            .header(http::header::HOST, &self.host);
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        for (k, v) in &self.extra {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(ClientError::Api {
                status,
                code: v["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
                message: v["error"]["message"]
                    .as_str()
                    .unwrap_or("(no message)")
                    .to_owned(),
            });
        }
        Ok(EventStream {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// Builds a client from a `ClientConfig` made elsewhere (for pinning).
    pub fn with_config(url: &str, config: rustls::ClientConfig) -> Result<Client, ClientError> {
        let b = Client::builder(url)?;
        let name = ServerName::try_from(
            b.host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )
        .map_err(|e| ClientError::Config(format!("server host {:?}: {e}", b.host)))?;
        Ok(Client {
            addr: format!("{}:{}", b.host, b.port),
            host: b.host,
            name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            token: None,
            extra: Vec::new(),
            max_body: None,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let b = Client::builder("https://localhost").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("localhost", 9443));
        let b = Client::builder("https://[::1]:8443/").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("[::1]", 8443));
        assert!(Client::builder("http://localhost").is_err());
        assert!(Client::builder("https://localhost:x").is_err());
    }
}
