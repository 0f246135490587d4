//! Files that hold keys and certificates, written and read safely.
//!
//! # Design
//! Every write goes to a temporary file in the target's own directory (so the
//! rename cannot cross file systems), created with its final mode (0600 for
//! secrets: the key is never readable by others, not even for a moment), then
//! fsynced, renamed over the target, and the directory fsynced so the rename
//! itself survives a crash. A reader sees the old file or the new one, never
//! half of one. Files that must change together (a certificate, its key and
//! the bundle) are a set, switched as one ([`write_set_atomic`], the layout
//! of a Kubernetes Secret volume) and read as one ([`open_set`]). Reading a
//! secret refuses a file that group or others can read, as ssh does, because
//! a key that others could copy must be treated as compromised rather than
//! used.
//!
//! # Example
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let key = dir.path().join("tls.key");
//! meshca_files::write_atomic(&key, b"secret", meshca_files::SECRET_MODE).unwrap();
//! assert_eq!(meshca_files::read_secret(&key, 1024).unwrap(), b"secret");
//! ```
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

mod set;

pub use set::{SET_LINK, SetFile, open_set, set_generation, write_set_atomic};

/// Mode of files holding private keys.
pub const SECRET_MODE: u32 = 0o600;
/// Mode of files holding certificates and other public material.
pub const PUBLIC_MODE: u32 = 0o644;
/// Mode of directories holding secrets.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// What can go wrong with a file.
#[derive(Debug)]
#[non_exhaustive]
pub enum FileError {
    /// An I/O operation failed.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`write`, `rename`, `read`).
        op: &'static str,
        /// The OS error.
        reason: String,
        /// The OS error's kind, for predicates.
        kind: std::io::ErrorKind,
    },
    /// A secret file that group or others may read.
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A path that should be a directory is something else.
    NotADirectory(PathBuf),
    /// A file larger than the caller allows.
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// A set of files ([`write_set_atomic`]) that cannot be written as
    /// asked: a name it cannot hold, or a directory whose `..data` is not a
    /// set's.
    BadSet {
        /// The file or entry.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl FileError {
    fn io(path: &Path, op: &'static str, e: std::io::Error) -> Self {
        FileError::Io {
            path: path.to_owned(),
            op,
            reason: e.to_string(),
            kind: e.kind(),
        }
    }

    /// True when the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { kind, .. } if *kind == std::io::ErrorKind::NotFound)
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::Io {
                path, op, reason, ..
            } => {
                write!(f, "cannot {op} {}: {reason}", path.display())
            }
            FileError::InsecurePermissions { path, mode } => write!(
                f,
                "{} holds a private key but is readable by others (mode {:04o}); run `chmod 600 {}` and treat the key as exposed if others could read it",
                path.display(),
                mode & 0o7777,
                path.display()
            ),
            FileError::NotADirectory(p) => {
                write!(f, "{} exists and is not a directory", p.display())
            }
            FileError::TooLarge { path, limit } => {
                write!(f, "{} is larger than {limit} bytes", path.display())
            }
            FileError::BadSet { path, reason } => {
                write!(
                    f,
                    "cannot use {} in a certificate set: {reason}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for FileError {}

/// 16 random hex digits, for names no other writer picks.
pub(crate) fn random_hex(for_path: &Path) -> Result<String, FileError> {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| FileError::Io {
        path: for_path.to_owned(),
        op: "name a temporary file for",
        reason: "the random number generator failed".into(),
        kind: std::io::ErrorKind::Other,
    })?;
    Ok(hex::encode(bytes))
}

fn temp_name(target: &Path) -> Result<PathBuf, FileError> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(target.with_file_name(format!(".{name}.tmp-{}", random_hex(target)?)))
}

pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `path` with `contents` atomically, the new file having `mode`
/// from the moment it exists. See the crate docs. A file of a set (the
/// symlink `..data/<name>` that [`write_set_atomic`] makes) is replaced
/// within its set, the other files carried over.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    // Renamed over, the set's symlink would become a file of its own beside
    // the set: readers of the set (meshca-tls reads every file through one
    // `..data`) would never see it, and the set would be mixed.
    if let Some(name) = set::member_name(path) {
        return write_set_atomic(parent_of(path), &[(name, contents, mode)]);
    }
    let tmp = temp_name(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| FileError::io(&tmp, "create", e))?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| FileError::io(&tmp, "chmod", e))?;
        f.write_all(contents)
            .map_err(|e| FileError::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| FileError::io(&tmp, "fsync", e))?;
        fs::rename(&tmp, path).map_err(|e| FileError::io(path, "rename into place", e))?;
        sync_dir(parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsyncs a directory so that renames in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FileError::io(dir, "fsync directory", e))
}

/// Creates `dir` (and its parents) if needed and sets it to 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    if dir.exists() && !dir.is_dir() {
        return Err(FileError::NotADirectory(dir.to_owned()));
    }
    fs::create_dir_all(dir).map_err(|e| FileError::io(dir, "create directory", e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
        .map_err(|e| FileError::io(dir, "chmod", e))
}

/// Creates `dir` (and its parents) if needed, leaving an existing one's mode alone.
pub fn create_dir(dir: &Path) -> Result<(), FileError> {
    if dir.exists() && !dir.is_dir() {
        return Err(FileError::NotADirectory(dir.to_owned()));
    }
    fs::create_dir_all(dir).map_err(|e| FileError::io(dir, "create directory", e))
}

/// Sets an existing file to 0600.
pub fn restrict(path: &Path) -> Result<(), FileError> {
    fs::set_permissions(path, fs::Permissions::from_mode(SECRET_MODE))
        .map_err(|e| FileError::io(path, "chmod", e))
}

/// Reads a file of at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let f = File::open(path).map_err(|e| FileError::io(path, "read", e))?;
    read_open(f, path, limit)
}

pub(crate) fn read_open(f: File, path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| FileError::io(path, "read", e))?;
    if buf.len() as u64 > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(buf)
}

/// Reads a secret (a private key), refusing it when group or others have
/// any access to it.
pub fn read_secret(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let f = File::open(path).map_err(|e| FileError::io(path, "read", e))?;
    refuse_shared_secret(&f, path)?;
    read_open(f, path, limit)
}

/// Refuses an opened secret that group or others have any access to. The
/// mode of the file opened, not of whatever the path named a moment earlier
/// (a key swapped in between would be read unchecked).
pub(crate) fn refuse_shared_secret(f: &File, path: &Path) -> Result<(), FileError> {
    let mode = f
        .metadata()
        .map_err(|e| FileError::io(path, "read", e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(FileError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_0600_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_atomic(&p, b"one", SECRET_MODE).unwrap();
        write_atomic(&p, b"two", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn readable_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_atomic(&p, b"x", 0o640).unwrap();
        let e = read_secret(&p, 10).unwrap_err();
        assert!(matches!(e, FileError::InsecurePermissions { .. }));
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(matches!(
            read_limited(&p, 0),
            Err(FileError::TooLarge { .. })
        ));
    }

    #[test]
    fn write_into_missing_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_atomic(&dir.path().join("no/such/file"), b"x", SECRET_MODE).unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
    }
}
