//! The PROXY protocol v2 header (haproxy's `proxy-protocol.txt`): tells the
//! target who connected, and with which verified identity.
//!
//! TLVs sent: `PP2_TYPE_SSL` (0x20) with the client bits "TLS, certificate
//! on this connection" and verify = 0 (verified), carrying
//! `PP2_SUBTYPE_SSL_VERSION` (0x21, `TLSv1.3` or `TLSv1.2`); and meshca's own
//! 0xE0 (the first custom type): the peer's SPIFFE ID, else its first DNS
//! name. A plaintext connection (permissive mode) gets neither.

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// `PP2_TYPE_SSL`.
pub const TYPE_SSL: u8 = 0x20;
/// `PP2_SUBTYPE_SSL_VERSION`.
pub const SUBTYPE_SSL_VERSION: u8 = 0x21;
/// meshca's TLV with the verified identity.
pub const TYPE_MESHCA_IDENTITY: u8 = 0xE0;

/// What the header says about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The client's address.
    pub source: SocketAddr,
    /// The address it connected to.
    pub destination: SocketAddr,
    /// The TLS version, when the connection was TLS.
    pub tls_version: Option<String>,
    /// The verified identity, when there was one.
    pub identity: Option<String>,
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    // Values here are short (an identity is at most a few hundred bytes).
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
        if let Some(version) = &self.tls_version {
            let mut ssl = vec![0x01 | 0x02 | 0x04];
            ssl.extend_from_slice(&0u32.to_be_bytes());
            tlv(&mut ssl, SUBTYPE_SSL_VERSION, version.as_bytes());
            tlv(&mut body, TYPE_SSL, &ssl);
        }
        if let Some(id) = &self.identity {
            tlv(&mut body, TYPE_MESHCA_IDENTITY, id.as_bytes());
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
        let mut header = Header {
            source,
            destination,
            tls_version: None,
            identity: None,
        };
        while !rest.is_empty() {
            let (kind, value, next) = read_tlv(rest)?;
            match kind {
                TYPE_SSL => {
                    let mut sub = value.get(5..).ok_or("short SSL TLV")?;
                    while !sub.is_empty() {
                        let (k, v, n) = read_tlv(sub)?;
                        if k == SUBTYPE_SSL_VERSION {
                            header.tls_version = Some(String::from_utf8_lossy(v).into_owned());
                        }
                        sub = n;
                    }
                }
                TYPE_MESHCA_IDENTITY => {
                    header.identity = Some(
                        String::from_utf8(value.to_vec()).map_err(|_| "identity is not UTF-8")?,
                    );
                }
                _ => {}
            }
            rest = next;
        }
        Ok((header, 16 + len))
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

    #[test]
    fn headers_round_trip() {
        let cases = [
            Header {
                source: "10.1.2.3:40000".parse().unwrap(),
                destination: "10.0.0.1:8443".parse().unwrap(),
                tls_version: Some("TLSv1.3".into()),
                identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            },
            Header {
                source: "[::1]:1".parse().unwrap(),
                destination: "127.0.0.1:2".parse().unwrap(),
                tls_version: None,
                identity: None,
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
        let h = cases_first();
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        for cut in 0..h.len() {
            assert!(Header::decode(&h[..cut]).is_err(), "{cut}");
        }
    }

    fn cases_first() -> Vec<u8> {
        Header {
            source: "10.1.2.3:40000".parse().unwrap(),
            destination: "10.0.0.1:8443".parse().unwrap(),
            tls_version: Some("TLSv1.3".into()),
            identity: Some("web".into()),
        }
        .encode()
    }
}
