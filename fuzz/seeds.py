"""Seeds for the api, config and sniff fuzz targets (smoke.sh runs this after
making the CSR seeds with openssl). Nothing here is committed as a blob."""
import json
import pathlib
import sys

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
