//! Helpers shared by the integration tests: run the real binary and real
//! peers (openssl, curl, pkilint) in temporary directories.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn meshca() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshca"));
    c.env_remove("MESHCA_DIR");
    c
}

/// Runs meshca with `args` and returns its output.
pub fn run(args: &[&str]) -> Output {
    meshca().args(args).output().expect("run meshca")
}

/// Runs meshca and requires success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "meshca {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs meshca and requires failure whose stderr contains every one of `needles`.
pub fn fails(args: &[&str], needles: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "meshca {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "meshca {args:?} panicked: {stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "meshca {args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
    stderr
}

/// Runs a real tool and requires success; returns stdout.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? ./test.sh installs it): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary directory with an initialised CA in `dir/ca`.
pub struct Ca {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl Ca {
    pub fn new(extra: &[&str]) -> Ca {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let mut args = vec!["init", "--dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(&args);
        Ca { tmp, dir }
    }

    pub fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    pub fn p(&self, rel: &str) -> String {
        self.path(rel).to_str().unwrap().to_owned()
    }

    /// `meshca issue` into `tmp/<out>`; returns the out dir.
    pub fn issue(&self, name: &str, out: &str, extra: &[&str]) -> PathBuf {
        let outp = self.p(out);
        let mut args = vec!["--dir", self.d(), "issue", name, "--out", &outp];
        args.extend_from_slice(extra);
        ok(&args);
        self.path(out)
    }

    /// The hierarchy directory `ca/<id>`.
    pub fn hierarchy_dir(&self) -> PathBuf {
        let mut entries = std::fs::read_dir(self.dir.join("ca")).unwrap();
        entries.next().unwrap().unwrap().path()
    }

    pub fn count(&self) -> usize {
        let out = ok(&["--dir", self.d(), "list", "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .unwrap()
            .len()
    }
}

pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listened on port {port} within 10s");
}

/// Splits a PEM chain into its certificates' PEM texts.
pub fn split_pem(text: &str) -> Vec<String> {
    text.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|s| s.contains("BEGIN CERTIFICATE"))
        .map(str::to_owned)
        .collect()
}

/// A child process killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(program: &str, args: &[&str]) -> Child {
    Child(
        Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}")),
    )
}
