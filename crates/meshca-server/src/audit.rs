//! The audit log: one JSON line per decision (issuance, refusal, revocation,
//! token use) in `audit.log` of the data directory. Never a key or a token.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct Audit {
    file: std::fs::File,
}

/// One line, serialized straight from borrowed fields.
#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    action: &'a str,
    caller: &'a str,
    identity: Option<&'a str>,
    serial: Option<&'a str>,
    outcome: &'a str,
    reason: Option<&'a str>,
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
        Ok(Audit { file })
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
        let line = Line {
            ts: meshca_pki::rfc3339(time::OffsetDateTime::now_utc()),
            action,
            caller,
            identity,
            serial,
            outcome,
            reason,
        };
        let mut text = match serde_json::to_vec(&line) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("cannot format an audit line: {e}");
                return;
            }
        };
        text.push(b'\n');
        // One write(2) per line on a file opened with O_APPEND: the kernel
        // appends it whole, so concurrent writers need no lock and a line is
        // in the file entirely or not at all.
        if let Err(e) = (&self.file).write_all(&text) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}
