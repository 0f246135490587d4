//! `meshca`: the command line over the meshca crates. It parses arguments and
//! wires parts; what it does lives in the library crates.
#![forbid(unsafe_code)]

mod cmd;
mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Built-in TLS and mTLS for the components of a cluster.
#[derive(Debug, Parser)]
#[command(name = "meshca", version, about, propagate_version = true)]
struct Cli {
    /// The data directory [default: ./meshca-data].
    #[arg(long, global = true, env = "MESHCA_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a CA: root, intermediate, store, config and admin credentials.
    Init(InitArgs),
    /// Issue a certificate for an identity and write tls.crt, tls.key and ca.crt.
    Issue(IssueArgs),
    /// Show what a certificate, chain or bundle says (FILE or - for stdin).
    Inspect(InspectArgs),
    /// List issued certificates.
    List(ListArgs),
    /// Revoke a certificate by serial.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
struct InitArgs {
    /// The trust domain of every SPIFFE ID.
    #[arg(long, default_value = meshca_pki::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Key type of the CA and admin keys: ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, rsa-4096.
    #[arg(long, default_value = "ecdsa-p256")]
    key_type: String,
    /// Lifetime of the root (the intermediate gets half).
    #[arg(long, default_value = "87600h", allow_hyphen_values = true)]
    root_ttl: String,
    /// Adopt this root certificate instead of generating one.
    #[arg(long, value_name = "CERT")]
    import_root: Option<PathBuf>,
    /// The imported root's private key.
    #[arg(long, value_name = "KEY", requires = "import_root")]
    import_key: Option<PathBuf>,
    /// Adopt this intermediate (signed by the imported root) as the issuing CA.
    #[arg(long, value_name = "CERT", requires = "import_root")]
    import_intermediate: Option<PathBuf>,
    /// The imported intermediate's private key.
    #[arg(long, value_name = "KEY", requires = "import_intermediate")]
    import_intermediate_key: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct IssueArgs {
    /// The service name (a DNS label).
    name: String,
    /// The namespace (a DNS label).
    #[arg(long, short = 'n', default_value = meshca_pki::DEFAULT_NAMESPACE)]
    namespace: String,
    /// An extra DNS SAN (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// An extra IP SAN (repeatable).
    #[arg(long = "ip", value_name = "IP")]
    ips: Vec<String>,
    /// Lifetime, Go syntax (24h, 90m, 1h30m) [default: the profile's].
    #[arg(long, allow_hyphen_values = true)]
    ttl: Option<String>,
    /// What the certificate is for: service, server, client, bootstrap, webhook.
    #[arg(long, default_value = "service")]
    profile: String,
    /// Type of the key the CA generates [default: the CA config's].
    #[arg(long)]
    key_type: Option<String>,
    /// Certify the key of this CSR (PEM or DER) instead of generating one.
    #[arg(long, value_name = "FILE", conflicts_with = "key_type")]
    csr: Option<PathBuf>,
    /// Directory to write tls.crt, tls.key and ca.crt into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// A PEM or DER file, or - for standard input.
    file: String,
    /// Verify the chain against this trust bundle (else against the data
    /// directory's, when --dir or MESHCA_DIR is given).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only certificates that expire within this long (Go syntax), not yet expired.
    #[arg(long, value_name = "DUR")]
    expiring_within: Option<String>,
    /// Only this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only this name.
    #[arg(long)]
    name: Option<String>,
    /// Only this status: active, revoked.
    #[arg(long)]
    status: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RevokeArgs {
    /// The serial, hex (colons allowed).
    serial: String,
    /// RFC 5280 reason: unspecified, keyCompromise, cACompromise, affiliationChanged, superseded, cessationOfOperation, privilegeWithdrawn.
    #[arg(long, default_value = "unspecified")]
    reason: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let explicit_dir = cli.dir.is_some();
    let dir = cli.dir.unwrap_or_else(|| PathBuf::from("meshca-data"));
    let result = runtime.block_on(async {
        match cli.command {
            Command::Init(a) => cmd::init::run(&dir, a).await,
            Command::Issue(a) => cmd::issue::run(&dir, a).await,
            Command::Inspect(a) => {
                cmd::inspect::run(explicit_dir.then_some(dir.as_path()), a).await
            }
            Command::List(a) => cmd::records::list(&dir, a).await,
            Command::Revoke(a) => cmd::records::revoke(&dir, a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
