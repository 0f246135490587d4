//! The audit log: one JSON line per decision (issuance, refusal, revocation,
//! token use) in `audit.log` of the data directory. Never a key or a token.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

/// The longest caller or identity written (a DNS name's 253, and room).
const FIELD_MAX: usize = 300;
/// The longest reason written.
const REASON_MAX: usize = 1024;

/// `text` cut to at most `max` bytes, on a character boundary, with `…`
/// when cut.
fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &text[..end]))
}

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
    caller: std::borrow::Cow<'a, str>,
    identity: Option<std::borrow::Cow<'a, str>>,
    serial: Option<&'a str>,
    outcome: &'a str,
    reason: Option<std::borrow::Cow<'a, str>>,
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
        // A field is what the caller sent at worst (a name of 60,000
        // characters): bounded, so that one line stays one line's size.
        let line = Line {
            ts: meshca_pki::rfc3339(time::OffsetDateTime::now_utc()),
            action,
            caller: clip(caller, FIELD_MAX),
            identity: identity.map(|i| clip(i, FIELD_MAX)),
            serial,
            outcome,
            reason: reason.map(|r| clip(r, REASON_MAX)),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::clip;

    #[test]
    fn fields_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip(&"a".repeat(20), 10), format!("{}…", "a".repeat(10)));
        // é is two bytes: never cut in half.
        assert_eq!(clip("éééé", 3), "é…");
    }
}
