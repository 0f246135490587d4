//! Hot reload: the credential files are watched and every good new set is
//! published; a bad one is logged and the last good set stays in use.
//!
//! The files are polled (every 500 ms by default) and compared by content.
//! Polling content, rather than file events, sees every way a file can be
//! replaced: written in place, renamed over, or swapped the way Kubernetes
//! updates a mounted secret (a `..data` symlink flipped to a new directory),
//! including on file systems where inotify says nothing. Three small reads
//! twice a second cost nothing measurable. A directory switched through
//! `..data` is read as one set (see `creds::read_raw`): the poll never pairs
//! files of two sets, whatever moment the switch happens at.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::TlsError;
use crate::creds::{CertPaths, CertSet, read_raw};

/// How often the files are checked by default.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// A watched credential directory. Cloning shares the watcher; it stops when
/// the last clone and every subscriber are gone.
#[derive(Debug, Clone)]
pub struct CertSource {
    rx: watch::Receiver<Arc<CertSet>>,
    paths: Arc<CertPaths>,
}

impl CertSource {
    /// Loads the set in `dir` (failing with an error that names the file and
    /// the problem) and starts watching it. Needs a tokio runtime.
    pub fn watch(dir: &Path, poll: Duration) -> Result<Self, TlsError> {
        let paths = CertPaths::in_dir(dir);
        let raw = read_raw(&paths)?;
        let first = CertSet::from_bytes(&paths, &raw, OffsetDateTime::now_utc())?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let task_paths = paths.clone();
        tokio::spawn(async move { poll_loop(task_paths, raw, tx, poll).await });
        Ok(CertSource {
            rx,
            paths: Arc::new(paths),
        })
    }

    /// The set in use now.
    pub fn current(&self) -> Arc<CertSet> {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every new set.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CertSet>> {
        self.rx.clone()
    }

    /// The files watched.
    pub fn paths(&self) -> &CertPaths {
        &self.paths
    }
}

async fn poll_loop(
    paths: CertPaths,
    mut last_raw: [Vec<u8>; 4],
    tx: watch::Sender<Arc<CertSet>>,
    poll: Duration,
) {
    // The last content that failed, so one bad set is logged once.
    let mut last_bad: Option<[Vec<u8>; 4]> = None;
    // The last refusal of a key others can read, so it is logged once.
    let mut last_refusal: Option<String> = None;
    loop {
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(poll) => {}
        }
        let mut read = read_raw(&paths);
        if matches!(read, Err(TlsError::InsecureKey { .. })) {
            // A writer that creates the key and then narrows its mode passes
            // through this state: look again shortly before refusing.
            tokio::time::sleep(Duration::from_millis(100)).await;
            read = read_raw(&paths);
        }
        let raw = match read {
            Ok(raw) => raw,
            Err(e @ TlsError::InsecureKey { .. }) => {
                // Never served with, whatever the other files hold; the set
                // loaded before stays in use (its key was read while it was
                // private).
                let text = e.to_string();
                if last_refusal.as_ref() != Some(&text) {
                    tracing::error!(
                        serial = %tx.borrow().serial,
                        "refusing the TLS credentials on disk, keeping the last good set: {text}"
                    );
                    last_refusal = Some(text);
                }
                continue;
            }
            Err(e) => {
                // A file missing for a moment (mid-rename) is normal; keep serving.
                tracing::debug!("credentials not readable now, keeping the last good set: {e}");
                continue;
            }
        };
        last_refusal = None;
        if raw == last_raw || last_bad.as_ref() == Some(&raw) {
            continue;
        }
        match CertSet::from_bytes(&paths, &raw, OffsetDateTime::now_utc()) {
            Ok(set) => {
                tracing::info!(serial = %set.serial, not_after = %set.not_after, "reloaded TLS credentials");
                last_raw = raw;
                last_bad = None;
                if tx.send(Arc::new(set)).is_err() {
                    return;
                }
            }
            Err(e) => {
                // The files may be mid-update (one written, the next not yet):
                // look again shortly before calling the set broken.
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(again) = read_raw(&paths)
                    && again != raw
                {
                    continue;
                }
                tracing::error!("ignoring new TLS credentials, keeping the last good set: {e}");
                last_bad = Some(raw);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    use super::*;
    use crate::creds::test_pki::Pki;

    /// What the poll loop logged.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
        }
    }

    // Single-threaded, so the poll loop runs on this thread and logs to the
    // subscriber set here.
    #[tokio::test]
    async fn a_new_key_others_can_read_is_refused_logged_and_the_old_set_kept() {
        let logs = Logs::default();
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let first = pki.write(dir.path(), "web", 0o600);
        let source = CertSource::watch(dir.path(), Duration::from_millis(50)).unwrap();
        assert_eq!(source.current().serial, first);

        let next = pki.write(dir.path(), "web", 0o644);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            source.current().serial,
            first,
            "a key others can read was taken"
        );
        let key = dir.path().join("tls.key").display().to_string();
        let text = logs.text();
        assert!(
            text.contains("ERROR")
                && text.contains("keeping the last good set")
                && text.contains("(mode 0644)")
                && text.contains(&format!("`chmod 600 {key}`")),
            "{text}"
        );
        assert_eq!(
            text.matches("refusing the TLS credentials").count(),
            1,
            "logged once: {text}"
        );

        // Fixed: the new set is taken.
        std::fs::set_permissions(
            dir.path().join("tls.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while source.current().serial != next {
            assert!(
                std::time::Instant::now() < deadline,
                "the set with a private key was not taken"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
