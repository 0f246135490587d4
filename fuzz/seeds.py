"""Seeds for the api, config, sniff and journal fuzz targets (smoke.sh runs this after
making the CSR seeds with openssl). Nothing here is committed as a blob."""
import json
import pathlib
import struct
import sys
import zlib

seeds = pathlib.Path(sys.argv[1])
csrs = sorted((seeds / "csr").glob("*.pem"))

# api: the first byte picks the body (0 sign, 1 issue, 2 token, 3 rotation and revoke).
bodies = [
    (0, {"name": "web", "csr": csrs[0].read_text()}),
    (0, {"name": "db", "namespace": "shop", "csr": csrs[-1].read_text(), "ttl": "1h",
         "dns": ["db.example.com"]}),
    (1, {"name": "web", "namespace": "shop", "ttl": "90m", "profile": "server",
         "key_type": "ed25519", "dns": ["web.shop.example.com"], "ips": ["10.0.0.1", "::1"]}),
    (1, {"name": "cli", "profile": "client"}),
    (2, {"name": "web", "namespace": "shop", "ttl": "30m", "uses": 3}),
    (3, {"window": "1m", "key_type": "ecdsa-p384", "force": True}),
    (3, {"reason": "keyCompromise"}),
]
for i, (which, body) in enumerate(bodies):
    (seeds / "api" / str(i)).write_bytes(bytes([which]) + json.dumps(body).encode())

# Also read by crates/meshca/src/config.rs's test: one file, two users.
here = pathlib.Path(__file__).parent
(seeds / "config" / "full.toml").write_text((here / "seeds" / "meshca.toml").read_text())
(seeds / "config" / "small.toml").write_text('trust_domain = "example.org"\n')

for name, data in {
    "http": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "h2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "tls": b"\x16\x03\x01\x00\x05hello",
    "tls-short": b"\x16",
    "empty": b"",
}.items():
    (seeds / "sniff" / name).write_bytes(data)


# journal: frames as crates/meshca-store/src/journal.rs writes them
# ("MCJ1" | payload length u32 | seq u64 | CRC-32 of length, seq, payload | payload),
# each holding a certificate record as the store keeps it.
def frame(seq, key, index_key, value):
    payload = b"".join(struct.pack("<H", len(x)) + x for x in (key, index_key)) + value
    head = struct.pack("<IQ", len(payload), seq)
    return b"MCJ1" + head + struct.pack("<I", zlib.crc32(head + payload)) + payload

def record(serial, name):
    return json.dumps({
        "serial": serial, "namespace": "default", "name": name, "profile": "service",
        "spiffe_id": f"spiffe://cluster.local/ns/default/sa/{name}",
        "dns_names": [name, f"{name}.default"], "ip_addresses": [], "key_type": "ecdsa-p256",
        "hierarchy_id": "h1", "issued_at": "2026-12-01T00:00:00Z",
        "not_before": "2026-11-30T23:55:00Z", "not_after": "2026-12-02T00:00:00Z",
        "fingerprint": "00" * 32, "status": "active",
        "certificate_pem": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    }).encode()

frames = []
for seq, (serial, name) in enumerate([("019ad7a2c3e4aa01", "web"), ("019ad7a2c3e4aa02", "api")], 1):
    frames.append(frame(seq, serial.encode(), f"default/{name}/{serial}".encode(), record(serial, name)))
(seeds / "journal" / "two").write_bytes(b"".join(frames))
(seeds / "journal" / "torn").write_bytes(b"".join(frames)[:-7])
(seeds / "journal" / "zeros").write_bytes(bytes(4096))
