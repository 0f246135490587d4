//! The PROXY protocol v2 header (haproxy's `proxy-protocol.txt`): tells the
//! target who connected, and with which verified identity.
//!
//! Every field says only what is true of the connection:
//! - a plaintext connection (permissive mode) gets no `PP2_TYPE_SSL` and no
//!   identity;
//! - a TLS connection gets `PP2_TYPE_SSL` (0x20) with `PP2_CLIENT_SSL` and
//!   `PP2_SUBTYPE_SSL_VERSION` (0x21, `TLSv1.3` or `TLSv1.2`); without a
//!   client certificate that is all, and the verify field is non-zero (1);
//! - with a client certificate, which the handshake verified (it refuses one
//!   that does not verify), also `PP2_CLIENT_CERT_SESS`, `PP2_CLIENT_CERT_CONN`
//!   unless the session was resumed, verify = 0, and meshca's own TLV 0xE0
//!   (the first custom type) with the certificate's SPIFFE ID, else its first
//!   DNS name.
//!
//! No `PP2_SUBTYPE_SSL_CN` is sent: meshca names peers by SPIFFE ID.

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// `PP2_TYPE_SSL`.
pub const TYPE_SSL: u8 = 0x20;
/// `PP2_SUBTYPE_SSL_VERSION`.
pub const SUBTYPE_SSL_VERSION: u8 = 0x21;
/// meshca's TLV with the verified identity.
pub const TYPE_MESHCA_IDENTITY: u8 = 0xE0;
/// `PP2_CLIENT_SSL`: the client connected over TLS.
pub const CLIENT_SSL: u8 = 0x01;
/// `PP2_CLIENT_CERT_CONN`: it presented a certificate on this connection.
pub const CLIENT_CERT_CONN: u8 = 0x02;
/// `PP2_CLIENT_CERT_SESS`: it presented one on the TLS session (this
/// connection's handshake, or the one it resumed).
pub const CLIENT_CERT_SESS: u8 = 0x04;
/// The verify field when no client certificate was verified (the
/// specification asks for anything but zero).
pub const VERIFY_NONE: u32 = 1;
/// Longest identity claimed: a SPIFFE ID's limit (DNS names are shorter).
/// A longer one is not sent, so every length in the header fits its field.
pub const MAX_IDENTITY: usize = 2048;

/// How the client reached the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext (permissive mode): no TLS, no identity.
    Plaintext,
    /// TLS.
    Tls {
        /// The protocol version, `TLSv1.3` or `TLSv1.2`.
        version: String,
        /// The client certificate, when one was presented; the handshake
        /// verified it (against the bundle and the allow-list).
        client: Option<ClientCert>,
    },
}

/// A client certificate the handshake verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Presented in this connection's handshake (false: in the one of the
    /// session it resumed).
    pub on_connection: bool,
    /// Its SPIFFE ID, else its first DNS name; `None` when it has neither.
    pub identity: Option<String>,
}

/// What the header says about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The client's address.
    pub source: SocketAddr,
    /// The address it connected to.
    pub destination: SocketAddr,
    /// Plaintext or TLS, and the client certificate.
    pub transport: Transport,
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    // Values here are short: a TLS version, an identity of at most
    // MAX_IDENTITY bytes.
    out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&value[..value.len().min(usize::from(u16::MAX))]);
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let family = match (self.source.ip(), self.destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                body.extend_from_slice(&s.octets());
                body.extend_from_slice(&d.octets());
                0x11
            }
            (s, d) => {
                body.extend_from_slice(&v6(s));
                body.extend_from_slice(&v6(d));
                0x21
            }
        };
        body.extend_from_slice(&self.source.port().to_be_bytes());
        body.extend_from_slice(&self.destination.port().to_be_bytes());
        if let Transport::Tls { version, client } = &self.transport {
            let (bits, verify) = match client {
                None => (CLIENT_SSL, VERIFY_NONE),
                Some(cert) => {
                    let conn = if cert.on_connection {
                        CLIENT_CERT_CONN
                    } else {
                        0
                    };
                    (CLIENT_SSL | CLIENT_CERT_SESS | conn, 0)
                }
            };
            let mut ssl = vec![bits];
            ssl.extend_from_slice(&verify.to_be_bytes());
            tlv(&mut ssl, SUBTYPE_SSL_VERSION, version.as_bytes());
            tlv(&mut body, TYPE_SSL, &ssl);
            // Only a verified certificate's name is ever claimed.
            if let Some(id) = client
                .as_ref()
                .and_then(|c| c.identity.as_deref())
                .filter(|id| id.len() <= MAX_IDENTITY)
            {
                tlv(&mut body, TYPE_MESHCA_IDENTITY, id.as_bytes());
            }
        }
        let mut out = SIGNATURE.to_vec();
        out.push(0x21);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads a header from the start of `bytes`; returns it and its length.
    /// (meshca only writes headers; this is for tests and targets in Rust.)
    pub fn decode(bytes: &[u8]) -> Result<(Header, usize), String> {
        let fixed = bytes.get(..16).ok_or("shorter than a v2 header")?;
        if fixed[..12] != SIGNATURE {
            return Err("no PROXY v2 signature".into());
        }
        if fixed[12] != 0x21 {
            return Err(format!(
                "version/command byte {:#x} is not v2 PROXY",
                fixed[12]
            ));
        }
        let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let body = bytes.get(16..16 + len).ok_or("truncated header")?;
        let (source, destination, mut rest) = match fixed[13] {
            0x11 if body.len() >= 12 => {
                let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
                let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
                (
                    SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                    SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
                    &body[12..],
                )
            }
            0x21 if body.len() >= 36 => {
                let ip = |b: &[u8]| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(b);
                    IpAddr::from(a)
                };
                let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
                (
                    SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                    SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
                    &body[36..],
                )
            }
            f => return Err(format!("family {f:#x} with {} address bytes", body.len())),
        };
        // (client bits, verify, version) of the SSL TLV, and the identity.
        let mut ssl: Option<(u8, u32, String)> = None;
        let mut identity = None;
        while !rest.is_empty() {
            let (kind, value, next) = read_tlv(rest)?;
            match kind {
                TYPE_SSL => {
                    let fixed = value.get(..5).ok_or("short SSL TLV")?;
                    let verify = u32::from_be_bytes([fixed[1], fixed[2], fixed[3], fixed[4]]);
                    let mut version = String::new();
                    let mut sub = &value[5..];
                    while !sub.is_empty() {
                        let (k, v, n) = read_tlv(sub)?;
                        if k == SUBTYPE_SSL_VERSION {
                            version = String::from_utf8_lossy(v).into_owned();
                        }
                        sub = n;
                    }
                    ssl = Some((fixed[0], verify, version));
                }
                TYPE_MESHCA_IDENTITY => {
                    identity = Some(
                        String::from_utf8(value.to_vec()).map_err(|_| "identity is not UTF-8")?,
                    );
                }
                _ => {}
            }
            rest = next;
        }
        let transport = match ssl {
            Some((bits, verify, version)) if bits & CLIENT_SSL != 0 => {
                // A certificate counts only when the header says it was
                // presented and verified.
                let verified = bits & (CLIENT_CERT_CONN | CLIENT_CERT_SESS) != 0 && verify == 0;
                Transport::Tls {
                    version,
                    client: verified.then(|| ClientCert {
                        on_connection: bits & CLIENT_CERT_CONN != 0,
                        identity: identity.take(),
                    }),
                }
            }
            _ => Transport::Plaintext,
        };
        if identity.is_some() {
            return Err("an identity without a verified client certificate".into());
        }
        Ok((
            Header {
                source,
                destination,
                transport,
            },
            16 + len,
        ))
    }
}

fn read_tlv(b: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let head = b.get(..3).ok_or("truncated TLV")?;
    let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
    let value = b.get(3..3 + len).ok_or("truncated TLV value")?;
    Ok((head[0], value, &b[3 + len..]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header(transport: Transport) -> Header {
        Header {
            source: "10.1.2.3:40000".parse().unwrap(),
            destination: "10.0.0.1:8443".parse().unwrap(),
            transport,
        }
    }

    fn tls(client: Option<ClientCert>) -> Transport {
        Transport::Tls {
            version: "TLSv1.3".into(),
            client,
        }
    }

    fn verified(identity: Option<&str>) -> Option<ClientCert> {
        Some(ClientCert {
            on_connection: true,
            identity: identity.map(str::to_owned),
        })
    }

    /// The top-level TLVs after the IPv4 addresses, as (type, value).
    fn tlvs(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        assert_eq!(bytes.len(), 16 + len);
        let mut rest = &bytes[16 + 12..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let (kind, value, next) = read_tlv(rest).unwrap();
            out.push((kind, value.to_vec()));
            rest = next;
        }
        out
    }

    /// The SSL TLV's client bits and verify field.
    fn ssl_fields(tlvs: &[(u8, Vec<u8>)]) -> Option<(u8, u32)> {
        tlvs.iter()
            .find(|(k, _)| *k == TYPE_SSL)
            .map(|(_, v)| (v[0], u32::from_be_bytes([v[1], v[2], v[3], v[4]])))
    }

    #[test]
    fn tls_with_a_verified_certificate_says_so_and_names_it() {
        let bytes = header(tls(verified(Some("spiffe://cluster.local/ns/shop/sa/web")))).encode();
        let t = tlvs(&bytes);
        assert_eq!(ssl_fields(&t), Some((0x07, 0)));
        let ssl = &t.iter().find(|(k, _)| *k == TYPE_SSL).unwrap().1;
        assert_eq!(&ssl[5..], b"\x21\x00\x07TLSv1.3");
        assert!(t.contains(&(
            TYPE_MESHCA_IDENTITY,
            b"spiffe://cluster.local/ns/shop/sa/web".to_vec()
        )));
        // A verified certificate without a SPIFFE ID or DNS name: verified,
        // and no name claimed.
        let t = tlvs(&header(tls(verified(None))).encode());
        assert_eq!(ssl_fields(&t), Some((0x07, 0)));
        assert!(t.iter().all(|(k, _)| *k != TYPE_MESHCA_IDENTITY), "{t:?}");
    }

    #[test]
    fn tls_without_a_certificate_claims_none() {
        let t = tlvs(&header(tls(None)).encode());
        // PP2_CLIENT_SSL alone, and a verify field that is not "verified".
        assert_eq!(ssl_fields(&t), Some((CLIENT_SSL, VERIFY_NONE)));
        assert_ne!(VERIFY_NONE, 0);
        assert_eq!(t.len(), 1, "nothing but the SSL TLV: {t:?}");
    }

    #[test]
    fn plaintext_gets_no_tls_and_no_identity() {
        let bytes = header(Transport::Plaintext).encode();
        assert!(tlvs(&bytes).is_empty());
        assert_eq!(bytes.len(), 16 + 12, "addresses only");
    }

    #[test]
    fn a_resumed_session_has_its_certificate_on_the_session_only() {
        let cert = ClientCert {
            on_connection: false,
            identity: Some("web.shop.svc".into()),
        };
        let t = tlvs(&header(tls(Some(cert))).encode());
        assert_eq!(ssl_fields(&t), Some((CLIENT_SSL | CLIENT_CERT_SESS, 0)));
    }

    #[test]
    fn an_identity_longer_than_a_spiffe_id_is_not_claimed() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_IDENTITY));
        let bytes = header(tls(verified(Some(&long)))).encode();
        let t = tlvs(&bytes);
        assert_eq!(ssl_fields(&t), Some((0x07, 0)));
        assert!(t.iter().all(|(k, _)| *k != TYPE_MESHCA_IDENTITY));
    }

    #[test]
    fn headers_round_trip() {
        let cases = [
            header(tls(verified(Some("spiffe://cluster.local/ns/shop/sa/web")))),
            header(tls(verified(None))),
            header(tls(Some(ClientCert {
                on_connection: false,
                identity: Some("web".into()),
            }))),
            header(tls(None)),
            header(Transport::Plaintext),
            Header {
                source: "[::1]:1".parse().unwrap(),
                destination: "127.0.0.1:2".parse().unwrap(),
                transport: Transport::Plaintext,
            },
        ];
        for h in cases {
            let mut bytes = h.encode();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (back, len) = Header::decode(&bytes).unwrap();
            assert_eq!(&bytes[len..], b"GET / HTTP/1.1\r\n");
            let want = if h.source.is_ipv4() && h.destination.is_ipv4() {
                h.clone()
            } else {
                Header {
                    source: SocketAddr::new(IpAddr::V6(v6(h.source.ip()).into()), h.source.port()),
                    destination: SocketAddr::new(
                        IpAddr::V6(v6(h.destination.ip()).into()),
                        h.destination.port(),
                    ),
                    ..h.clone()
                }
            };
            assert_eq!(back, want);
        }
        // The fixed part is haproxy's.
        let h = header(tls(verified(Some("web")))).encode();
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        for cut in 0..h.len() {
            assert!(Header::decode(&h[..cut]).is_err(), "{cut}");
        }
    }

    #[test]
    fn decoding_refuses_an_identity_without_a_verified_certificate() {
        let mut bytes = header(tls(verified(Some("web")))).encode();
        // Say "no certificate verified" in the SSL TLV's verify field.
        let at = 16 + 12 + 3 + 1;
        bytes[at..at + 4].copy_from_slice(&1u32.to_be_bytes());
        let e = Header::decode(&bytes).unwrap_err();
        assert!(e.contains("without a verified client certificate"), "{e}");
    }
}
