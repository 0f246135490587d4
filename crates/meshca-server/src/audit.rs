//! The audit log: one JSON line per decision (issuance, refusal, revocation,
//! token use) in `audit.log` of the data directory. Never a key or a token.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde_json::json;

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct Audit {
    file: Mutex<std::fs::File>,
}

impl Audit {
    /// Opens (creating, mode 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Audit {
            file: Mutex::new(file),
        })
    }

    /// Writes one decision. `caller` says who asked (`admin`, `workload ns/name`,
    /// `token <id>`, `anonymous`); `outcome` is `allowed` or `refused`.
    pub fn record(
        &self,
        action: &str,
        caller: &str,
        identity: Option<&str>,
        serial: Option<&str>,
        outcome: &str,
        reason: Option<&str>,
    ) {
        let line = json!({
            "ts": meshca_pki::rfc3339(time::OffsetDateTime::now_utc()),
            "action": action,
            "caller": caller,
            "identity": identity,
            "serial": serial,
            "outcome": outcome,
            "reason": reason,
        });
        // One write per line: the line is whole in the file or not at all,
        // and formatting does not turn into a system call per fragment.
        let mut text = line.to_string();
        text.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(text.as_bytes()) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}
