//! The settings the `meshca` binary reads: `meshca.toml` ([`config`]), and
//! the `[store]` and `[issuer]` tables shared with their flags ([`store`],
//! [`issuer`]). They are a library so that the `config` fuzz target drives
//! the very parser the binary uses.
//!
//! ```
//! let text = b"trust_domain = \"cluster.local\"\nmax_ttl = \"24h\"\n";
//! let c = meshca::config::Config::parse(text, std::path::Path::new("meshca.toml"))?;
//! assert_eq!(c.max_ttl.get(), std::time::Duration::from_secs(86_400));
//! # Ok::<(), anyhow::Error>(())
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod issuer;
pub mod store;
