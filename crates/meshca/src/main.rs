//! `meshca`: the command line over the meshca crates. It parses arguments and
//! wires parts; what it does lives in the library crates.
#![forbid(unsafe_code)]

mod cmd;
use meshca::{config, issuer, store};

/// mimalloc instead of glibc's malloc: an issuance allocates and frees a few
/// hundred small buffers (DER, PEM, JSON, TLS records) across the tokio
/// workers and the store's writer thread, and glibc's arenas spent about a
/// sixth of the server's CPU on it (`_int_malloc`, `malloc_consolidate`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

    /// Talk to this meshca server (https://host:port) instead of the data directory.
    #[arg(long, global = true, env = "MESHCA_SERVER", value_name = "URL")]
    server: Option<String>,

    /// Client certificate for --server [default: DIR/admin/tls.crt].
    #[arg(long, global = true, value_name = "FILE")]
    cert: Option<PathBuf>,

    /// Client key for --server [default: DIR/admin/tls.key].
    #[arg(long, global = true, value_name = "FILE")]
    key: Option<PathBuf>,

    /// CA bundle to verify --server with [default: DIR/admin/ca.crt].
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,

    #[command(flatten)]
    store: store::StoreArgs,

    #[command(flatten)]
    issuer: issuer::IssuerArgs,

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
    /// Run the CA service (initialises a CA first on an empty data directory).
    Serve(ServeArgs),
    /// Join tokens (online).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The CA hierarchy.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Ask the holders of one identity, or of all, to renew now (online).
    Rotate(RotateArgs),
    /// Keep one identity's tls.crt, tls.key and ca.crt fresh in a directory.
    Agent(AgentArgs),
    /// The store: move a CA between the embedded store and etcd.
    #[command(subcommand)]
    Store(StoreCommand),
    /// mTLS in front of a service (server) or to a service (client), with
    /// the identity files the agent keeps fresh.
    #[command(subcommand)]
    Proxy(ProxyCommand),
}

#[derive(Debug, Subcommand)]
enum ProxyCommand {
    /// Terminate mTLS on --listen and forward plaintext to --target; only
    /// --allow'ed peers get through (refused in the handshake).
    Server(ProxyRouteArgs),
    /// Accept plaintext on --listen and originate mTLS to --target, checking
    /// that the server is --server-id.
    Client(ProxyRouteArgs),
    /// Several routes from a file (`[[route]]` tables).
    Run {
        /// The file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ProxyRouteArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Where to connect: host:port, or unix:/path (server side).
    #[arg(long)]
    target: String,
    /// tls.crt, tls.key, ca.crt (what `meshca agent --out` keeps fresh).
    #[arg(long, value_name = "DIR")]
    certs: PathBuf,
    /// Server: a peer let through (SPIFFE ID, spiffe://td/ns/x/* or a DNS
    /// name; repeatable). None: any peer the bundle trusts.
    #[arg(long = "allow", value_name = "ID")]
    allow: Vec<String>,
    /// Server: also accept plaintext clients (migration).
    #[arg(long)]
    permissive: bool,
    /// Server: a client certificate whose revocation cannot be checked (no
    /// current CRL of its issuer in DIR/ca.crl): fail-open or fail-closed.
    #[arg(long, value_name = "POLICY", default_value = "fail-open")]
    revocation: meshca_tls::Revocation,
    /// Server: send a PROXY protocol v2 header with the verified identity.
    #[arg(long)]
    proxy_protocol: bool,
    /// Client: the identity the server must have (SPIFFE ID or DNS name).
    #[arg(long, value_name = "ID")]
    server_id: Option<String>,
    /// Also accept TLS 1.2.
    #[arg(long)]
    tls12: bool,
    /// Close connections idle this long [default: 5m].
    #[arg(long, value_name = "DUR")]
    idle_timeout: Option<meshca_pki::GoDuration>,
    /// On SIGTERM, how long open connections get [default: 30s].
    #[arg(long, value_name = "DUR")]
    shutdown_grace: Option<meshca_pki::GoDuration>,
    /// Serve /healthz and /metrics here (plain HTTP).
    #[arg(long, value_name = "ADDR")]
    health: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy a whole CA (hierarchies and keys, records, tokens) to an empty
    /// store, then read both back and compare. FROM/TO: a data directory
    /// (embedded store) or etcd://host:2379[,host2:2379][/prefix].
    Copy {
        /// Where the CA is now.
        #[arg(long, value_name = "DIR|URL")]
        from: String,
        /// Where it goes (empty).
        #[arg(long, value_name = "DIR|URL")]
        to: String,
    },
    /// Authenticate, once, the records of an etcd store written by a meshca
    /// that did not (stop and upgrade every replica first, and run it when
    /// the store holds only what it should). Records written after it first
    /// started, and records that fail their check, stay refused. Needs
    /// --store etcd://... and --seal-key-file.
    Authenticate,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// The identity's name.
    name: String,
    /// The namespace.
    #[arg(long, short = 'n', default_value = meshca_pki::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Join token for the first certificate (env MESHCA_TOKEN). Prefer
    /// --token-file or the environment: a command line is visible to every
    /// local user in `ps`.
    #[arg(long, env = "MESHCA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the join token (mode 0600; read once at start).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the CA root, as `meshca token create` printed it.
    #[arg(long, value_name = "FP")]
    ca_fingerprint: Option<String>,
    /// Extra DNS name (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// Extra IP (repeatable).
    #[arg(long = "ip", value_name = "IP")]
    ips: Vec<String>,
    /// Lifetime to ask for [default: the server's].
    #[arg(long)]
    ttl: Option<String>,
    /// Key type.
    #[arg(long, default_value = "ecdsa-p256")]
    key_type: String,
    /// The directory to keep (tls.crt, tls.key, ca.crt).
    #[arg(long)]
    out: PathBuf,
    /// Shell command to run after each change.
    #[arg(long, value_name = "CMD")]
    on_rotate: Option<String>,
    /// Send a signal after each change: PID:SIG (e.g. 1234:HUP).
    #[arg(long, value_name = "PID:SIG")]
    signal: Option<String>,
    /// Get one certificate (or keep a valid one) and exit.
    #[arg(long)]
    once: bool,
    /// Serve /healthz and /metrics on this address.
    #[arg(long, value_name = "ADDR")]
    health: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address of the HTTPS API.
    #[arg(long, env = "MESHCA_LISTEN", default_value = "0.0.0.0:9443")]
    listen: std::net::SocketAddr,
    /// A plain HTTP listener that redirects to the API.
    #[arg(long, value_name = "ADDR")]
    http_redirect: Option<std::net::SocketAddr>,
    /// Another DNS name for the server's certificate (repeatable).
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Trust domain, when the data directory has no CA yet.
    #[arg(long, default_value = meshca_pki::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token for one identity; prints the token alone on stdout.
    Create(TokenCreateArgs),
    /// List join tokens.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a join token by id.
    Delete {
        /// The token's id.
        id: String,
    },
}

#[derive(Debug, Args)]
struct TokenCreateArgs {
    /// The service name.
    name: String,
    /// The namespace.
    #[arg(long, short = 'n', default_value = meshca_pki::DEFAULT_NAMESPACE)]
    namespace: String,
    /// How long the token works.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// How many certificates it may get.
    #[arg(long, default_value = "1")]
    uses: u32,
    /// Print {token, ca_fingerprint, expires_at} as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// The hierarchies, their expiry, the issuer in use, the rotation's stage.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the root with no downtime, one stage at a time (online):
    /// prepare, activate, retire; abort; or auto (all of them, each once safe).
    Rotate {
        /// prepare | activate | retire | abort | auto | intermediate
        step: RotateStep,
        /// Take the step even when it is not safe yet (retire with
        /// identities still on the old root).
        #[arg(long)]
        force: bool,
        /// activate, auto: over how long identities are told to renew.
        #[arg(long, value_name = "DUR")]
        window: Option<String>,
        /// auto: give up when a stage is not safe within this long [default: 1h].
        #[arg(long, value_name = "DUR")]
        stage_timeout: Option<String>,
        /// prepare: adopt this root certificate instead of generating one.
        #[arg(long, value_name = "CERT")]
        import_root: Option<PathBuf>,
        /// prepare: the imported root's private key.
        #[arg(long, value_name = "KEY", requires = "import_root")]
        import_key: Option<PathBuf>,
        /// prepare: an intermediate signed by the imported root.
        #[arg(long, value_name = "CERT", requires = "import_root")]
        import_intermediate: Option<PathBuf>,
        /// prepare: the imported intermediate's private key.
        #[arg(long, value_name = "KEY", requires = "import_intermediate")]
        import_intermediate_key: Option<PathBuf>,
        /// prepare: key type of the new root and intermediate [default: the current one].
        #[arg(long, value_name = "TYPE")]
        key_type: Option<String>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RotateStep {
    Prepare,
    Activate,
    Retire,
    Abort,
    /// All three stages, each once it is safe (resumes a rotation under way).
    Auto,
    /// Renew the intermediate under the same root now (done by itself when
    /// a third of its life is left).
    Intermediate,
}

impl RotateStep {
    fn as_str(self) -> &'static str {
        match self {
            RotateStep::Prepare => "prepare",
            RotateStep::Activate => "activate",
            RotateStep::Retire => "retire",
            RotateStep::Abort => "abort",
            RotateStep::Auto => "auto",
            RotateStep::Intermediate => "intermediate",
        }
    }
}

#[derive(Debug, Args)]
struct RotateArgs {
    /// The identity's name.
    #[arg(required_unless_present = "all")]
    name: Option<String>,
    /// The namespace.
    #[arg(long, short = 'n', default_value = meshca_pki::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Every live identity.
    #[arg(long, conflicts_with = "name")]
    all: bool,
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
    /// At most this many, in serial order (the rest: `--after` the last one).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Only those after this serial, in serial order (the cursor a limited
    /// listing prints).
    #[arg(long, value_name = "SERIAL")]
    after: Option<String>,
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
    let online = cli.server.as_ref().map(|url| cmd::online::Target {
        url: url.clone(),
        cert: cli
            .cert
            .clone()
            .unwrap_or_else(|| dir.join("admin/tls.crt")),
        key: cli.key.clone().unwrap_or_else(|| dir.join("admin/tls.key")),
        ca: cli.ca.clone().unwrap_or_else(|| dir.join("admin/ca.crt")),
    });
    let server_url = cli.server.clone();
    let store_args = cli.store.clone();
    let issuer_args = cli.issuer.clone();
    let ca_file = cli.ca.clone();
    if matches!(
        cli.command,
        Command::Serve(_) | Command::Agent(_) | Command::Proxy(_)
    ) {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .init();
    }
    let result = runtime.block_on(async {
        match (cli.command, online) {
            (Command::Init(a), _) => cmd::init::run(&dir, &store_args, a).await,
            (Command::Agent(a), _) => cmd::agent::run(server_url, ca_file, a).await,
            (Command::Proxy(c), _) => cmd::proxy::run(c).await,
            (Command::Store(StoreCommand::Copy { from, to }), _) => {
                cmd::copy::run(&from, &to, &store_args).await
            }
            (Command::Store(StoreCommand::Authenticate), _) => {
                cmd::copy::authenticate(&store_args).await
            }
            (Command::Serve(a), _) => cmd::serve::run(&dir, &store_args, &issuer_args, a).await,
            (Command::Inspect(a), _) => cmd::inspect::run(explicit_dir.then_some(dir.as_path()), &store_args, a).await,
            (Command::Issue(a), Some(t)) => cmd::online::issue(&t, a).await,
            (Command::Issue(a), None) => cmd::issue::run(&dir, &store_args, &issuer_args, a).await,
            (Command::List(a), Some(t)) => cmd::online::list(&t, a).await,
            (Command::List(a), None) => cmd::records::list(&dir, &store_args, a).await,
            (Command::Revoke(a), Some(t)) => cmd::online::revoke(&t, a).await,
            (Command::Revoke(a), None) => cmd::records::revoke(&dir, &store_args, &issuer_args, a).await,
            (Command::Token(c), Some(t)) => cmd::online::token(&t, c).await,
            (Command::Rotate(a), Some(t)) => cmd::online::rotate(&t, a).await,
            (Command::Ca(c), Some(t)) => cmd::online::ca(&t, c).await,
            (Command::Ca(c), None) => cmd::records::ca(&dir, &store_args, &issuer_args, c).await,
            (Command::Token(_) | Command::Rotate(_), None) => Err(anyhow::anyhow!(
                "this command talks to a running server: give --server https://HOST:9443 (or MESHCA_SERVER)"
            )),
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
