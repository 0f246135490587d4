//! Certificate sets: several files of one directory switched as one.
//!
//! # Layout
//! ```text
//! dir/..set-1f2e3d4c5b6a7980/    the files of the set in use, each with its own mode
//! dir/..data -> ..set-1f2e3d4c5b6a7980
//! dir/tls.crt -> ..data/tls.crt  one symlink per file of the set
//! dir/tls.key -> ..data/tls.key
//! ```
//! This is the layout kubelet gives a mounted Secret, so readers written for
//! Kubernetes (meshca-tls among them) need no new rule, and every path a
//! reader used before (`dir/tls.crt`) still opens the file.
//!
//! # Switching
//! A new set is written whole into a fresh hidden directory and fsynced; the
//! files of the set in use that the call does not name are carried into it
//! (hard links: the same bytes and mode, no space needed); then a new symlink
//! `..data` is renamed over the old one. That rename is the switch: one
//! atomic step, so every name changes at the same instant. The old directory
//! is removed after it. Everything before the rename is undone on failure,
//! so a failure (disk full, a name that cannot be created) leaves the set in
//! use as it was and no temporary entry behind.
//!
//! A name that is a regular file (the layout before sets, or a file put
//! there by hand) is taken over without a moment of mixed content: its
//! current content first becomes a set of its own, its name is replaced by
//! the symlink by rename (the same bytes through the link), and only then is
//! the new set switched in.
//!
//! # Reading
//! A reader that opens `dir/tls.crt` and then `dir/tls.key` can still fall
//! between two switches. [`open_set`] resolves `..data` once and opens
//! every file in the directory it names, so what it reads is one set.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use crate::{FileError, parent_of, random_hex, read_open, refuse_shared_secret, sync_dir};

/// The symlink naming the set in use.
pub const SET_LINK: &str = "..data";
/// Prefix of the directories holding a set.
const GEN_PREFIX: &str = "..set-";
/// Prefix of the new `..data` symlink before it is renamed into place.
const FLIP_TMP_PREFIX: &str = "..data.tmp-";
/// Prefix of a visible name's symlink before it is renamed into place.
const NAME_TMP_PREFIX: &str = "..link.tmp-";
/// Age after which a set directory or temporary link that no switch is
/// using is taken for the leftover of a writer that died, and removed.
const STALE_AFTER: Duration = Duration::from_secs(600);
/// How many switches a reader tolerates while opening one set.
const MAX_FLIPS: usize = 8;

/// Set writes of this process, one at a time: two tasks of one server
/// switching the same directory at once would each carry over the set the
/// other is replacing, and one update would be lost.
static WRITERS: Mutex<()> = Mutex::new(());

/// Where a file of a new set comes from.
enum Source<'a> {
    /// New content, created with this mode.
    Bytes(&'a [u8], u32),
    /// An existing file: hard-linked when `link` (the same inode, so the
    /// same bytes and mode, whatever happens to the old name), else copied
    /// with its mode (a file behind someone else's symlink, perhaps on
    /// another file system, is not tied to the set by a link).
    Existing { path: PathBuf, link: bool },
}

struct Entry<'a> {
    name: String,
    source: Source<'a>,
}

/// What a visible name is now.
#[derive(Debug, PartialEq)]
enum Visible {
    /// Nothing.
    Absent,
    /// The set's own symlink `..data/<name>`.
    Linked,
    /// A regular file: its content is what readers see until it is replaced.
    File,
    /// Someone else's symlink to a regular file: the same.
    ForeignLink,
    /// Something with no content to keep that a rename replaces: a
    /// dangling symlink, a symlink to a directory, a socket.
    Other,
}

fn io(path: &Path, op: &'static str, e: std::io::Error) -> FileError {
    FileError::io(path, op, e)
}

fn bad_set(path: PathBuf, reason: impl Into<String>) -> FileError {
    FileError::BadSet {
        path,
        reason: reason.into(),
    }
}

/// Whether `path` is the set's symlink for `name`.
fn is_member_link(path: &Path, name: &str) -> bool {
    fs::read_link(path).is_ok_and(|t| t == Path::new(SET_LINK).join(name))
}

fn visible(dir: &Path, name: &str) -> Result<Visible, FileError> {
    let path = dir.join(name);
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Visible::Absent),
        Err(e) => return Err(io(&path, "inspect", e)),
    };
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(bad_set(
            path,
            "it is a directory, not a file the set can name",
        ));
    }
    if kind.is_file() {
        return Ok(Visible::File);
    }
    if kind.is_symlink() {
        if is_member_link(&path, name) {
            return Ok(Visible::Linked);
        }
        if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            return Ok(Visible::ForeignLink);
        }
    }
    Ok(Visible::Other)
}

/// Whether `name` can name a set directory: `..<something>` beside
/// `..data` (kubelet's `..2026_11_23_10_00_00.1` or meshca's `..set-<hex>`).
fn is_generation_name(name: &str) -> bool {
    name.len() > 2 && name.starts_with("..") && name != SET_LINK && !name.contains('/')
}

/// The name of the set directory `dir/..data` points to; `None` when there
/// is no `..data` or it points to nothing (no set to carry over: the next
/// switch repairs it). Anything else named `..data` is refused rather than
/// replaced, as it is not a set this crate knows how to switch.
fn current(dir: &Path) -> Result<Option<String>, FileError> {
    let link = dir.join(SET_LINK);
    let meta = match fs::symlink_metadata(&link) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&link, "inspect", e)),
    };
    if !meta.file_type().is_symlink() {
        return Err(bad_set(link, "it is not a symlink"));
    }
    let target = fs::read_link(&link).map_err(|e| io(&link, "read the link", e))?;
    let name = match target.to_str() {
        Some(n) if is_generation_name(n) => n.to_owned(),
        _ => {
            return Err(bad_set(
                link,
                format!(
                    "it points to {}, not to a directory `..<name>` beside it",
                    target.display()
                ),
            ));
        }
    };
    match fs::symlink_metadata(dir.join(&name)) {
        Ok(m) if m.is_dir() => Ok(Some(name)),
        Ok(_) => Err(bad_set(
            link,
            format!("it points to {name}, which is not a directory"),
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&dir.join(&name), "inspect", e)),
    }
}

/// The directory holding the set in use in `dir` (what `dir/..data` points
/// to), or `None` when `dir` holds no set. A `..data` that is not a symlink
/// to a directory beside it is an error. For checks of who may write there
/// (the agent refuses a directory others could swap files in).
pub fn set_generation(dir: &Path) -> Result<Option<PathBuf>, FileError> {
    Ok(current(dir)?.map(|name| dir.join(name)))
}

/// The file name of `path` when it is a file of a set: the set's symlink
/// `..data/<name>` in a directory whose `..data` is a symlink.
pub(crate) fn member_name(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    let in_set = fs::symlink_metadata(parent_of(path).join(SET_LINK))
        .is_ok_and(|m| m.file_type().is_symlink());
    (in_set && is_member_link(path, name)).then_some(name)
}

fn check_names(dir: &Path, files: &[(&str, &[u8], u32)]) -> Result<(), FileError> {
    for (i, (name, _, _)) in files.iter().enumerate() {
        let why = if name.is_empty() || name.contains('/') || name.contains('\0') || *name == "." {
            Some("a file of a set has a plain file name")
        } else if name.starts_with("..") {
            Some("names beginning with `..` are the set's own")
        } else if files[..i].iter().any(|(n, _, _)| n == name) {
            Some("it is named twice")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(bad_set(dir.join(name), why));
        }
    }
    if files.is_empty() {
        return Err(bad_set(dir.to_owned(), "a set of no files changes nothing"));
    }
    Ok(())
}

/// The mode of a new set directory: the containing directory's, without
/// write for group and others. Whoever could read the files before still
/// can (0755 for an `--out` its owner opened to a service user, 0700 for
/// meshca's own), and no one else can put a file into the set.
fn gen_mode(dir: &Path) -> Result<u32, FileError> {
    let meta = fs::metadata(dir).map_err(|e| io(dir, "inspect", e))?;
    Ok(meta.permissions().mode() & 0o755)
}

/// Entries made for a switch that has not happened yet: removed when
/// dropped, so every early return leaves nothing behind. Disarmed piece by
/// piece as the switch makes them part of the directory.
struct Made {
    sdir: Option<PathBuf>,
    /// Temporary links.
    links: Vec<PathBuf>,
    /// Links of names that were absent, made before the switch.
    names: Vec<PathBuf>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for link in self.links.iter().chain(&self.names) {
            let _ = fs::remove_file(link);
        }
        if let Some(sdir) = &self.sdir {
            let _ = fs::remove_dir_all(sdir);
        }
    }
}

/// Creates `target` with exactly `mode` and `contents`, fsynced. Errors
/// name `shown`, the path readers know the file by.
fn write_new(target: &Path, shown: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(target)
        .map_err(|e| io(shown, "create", e))?;
    // The umask may have narrowed the mode; set it exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| io(shown, "chmod", e))?;
    f.write_all(contents).map_err(|e| io(shown, "write", e))?;
    f.sync_all().map_err(|e| io(shown, "fsync", e))
}

fn put(sdir: &Path, dir: &Path, entry: &Entry<'_>) -> Result<(), FileError> {
    let target = sdir.join(&entry.name);
    let shown = dir.join(&entry.name);
    match &entry.source {
        Source::Bytes(contents, mode) => write_new(&target, &shown, contents, *mode),
        Source::Existing { path, link } => {
            // A file system without hard links (or a file that cannot be
            // linked) gets a copy instead.
            if *link && fs::hard_link(path, &target).is_ok() {
                return Ok(());
            }
            let mut from = File::open(path).map_err(|e| io(path, "read", e))?;
            let mode = from
                .metadata()
                .map_err(|e| io(path, "read", e))?
                .permissions()
                .mode()
                & 0o777;
            let mut to = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&target)
                .map_err(|e| io(&shown, "create", e))?;
            to.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| io(&shown, "chmod", e))?;
            std::io::copy(&mut from, &mut to).map_err(|e| io(&shown, "write", e))?;
            to.sync_all().map_err(|e| io(&shown, "fsync", e))
        }
    }
}

/// The files of the set `cur` that the new set keeps: those readers see
/// through the set (a regular file with its symlink) and `named` does not
/// replace. A name whose symlink someone replaced by a file of their own is
/// that file now; its old copy in the set is not carried.
fn carried<'a>(dir: &Path, cur: &str, named: &[Entry<'_>]) -> Result<Vec<Entry<'a>>, FileError> {
    let sdir = dir.join(cur);
    let mut out = Vec::new();
    for e in fs::read_dir(&sdir).map_err(|e| io(&sdir, "list", e))? {
        let e = e.map_err(|e| io(&sdir, "list", e))?;
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if named.iter().any(|n| n.name == name) {
            continue;
        }
        let kind = e.file_type().map_err(|er| io(&e.path(), "inspect", er))?;
        if !kind.is_file() || !is_member_link(&dir.join(&name), &name) {
            continue;
        }
        out.push(Entry {
            name,
            source: Source::Existing {
                path: e.path(),
                link: true,
            },
        });
    }
    Ok(out)
}

/// Writes a new set directory holding `named` and what [`carried`] keeps of
/// `cur`, switches `..data` to it, links the names of `named` that are not
/// linked yet, and removes `cur`. Returns the new directory's name.
fn switch(dir: &Path, cur: Option<&str>, named: &[Entry<'_>]) -> Result<String, FileError> {
    let carried = match cur {
        Some(c) => carried(dir, c, named)?,
        None => Vec::new(),
    };
    let gen_name = format!("{GEN_PREFIX}{}", random_hex(dir)?);
    let sdir = dir.join(&gen_name);
    let mode = gen_mode(dir)?;
    let mut made = Made {
        sdir: None,
        links: Vec::new(),
        names: Vec::new(),
    };
    fs::DirBuilder::new()
        .mode(mode)
        .create(&sdir)
        .map_err(|e| io(&sdir, "create directory", e))?;
    made.sdir = Some(sdir.clone());
    fs::set_permissions(&sdir, fs::Permissions::from_mode(mode))
        .map_err(|e| io(&sdir, "chmod", e))?;
    for entry in named.iter().chain(carried.iter()) {
        put(&sdir, dir, entry)?;
    }
    sync_dir(&sdir)?;

    // The symlinks of names the set adds or takes over, made now (a full
    // directory fails here, before anything changed). A name with nothing
    // there gets its link at once: it leads nowhere (or to the old set's
    // file of that name) until the switch, so the name appears with the
    // rest of the set, at the switch. A name that shows something now keeps
    // showing it until the switch, and its link is renamed over it after.
    let mut renames = Vec::new();
    for entry in named {
        match visible(dir, &entry.name)? {
            Visible::Linked => continue,
            Visible::Absent => {
                let link = dir.join(&entry.name);
                symlink(Path::new(SET_LINK).join(&entry.name), &link)
                    .map_err(|e| io(&link, "create the link", e))?;
                made.names.push(link);
                continue;
            }
            Visible::File | Visible::ForeignLink | Visible::Other => {}
        }
        let tmp = dir.join(format!("{NAME_TMP_PREFIX}{}", random_hex(dir)?));
        symlink(Path::new(SET_LINK).join(&entry.name), &tmp)
            .map_err(|e| io(&tmp, "create the link", e))?;
        made.links.push(tmp.clone());
        renames.push((tmp, dir.join(&entry.name)));
    }
    let flip = dir.join(format!("{FLIP_TMP_PREFIX}{}", random_hex(dir)?));
    symlink(&gen_name, &flip).map_err(|e| io(&flip, "create the link", e))?;
    made.links.push(flip.clone());
    let data = dir.join(SET_LINK);
    fs::rename(&flip, &data).map_err(|e| io(&data, "switch", e))?;

    // Switched: readers see the new set. From here an error is reported but
    // nothing is undone (the new set is whole; the old cannot come back
    // atomically), and the old directory stays until the switch is durable,
    // so that a crash never leaves `..data` pointing at a removed directory.
    made.sdir = None;
    made.names.clear();
    made.links.retain(|l| *l != flip);
    sync_dir(dir)?;
    for (tmp, to) in &renames {
        fs::rename(tmp, to).map_err(|e| io(to, "link into the set", e))?;
        made.links.retain(|l| l != tmp);
    }
    if !renames.is_empty() {
        sync_dir(dir)?;
    }
    if let Some(old) = cur {
        let old = dir.join(old);
        match fs::remove_dir_all(&old) {
            Ok(()) => {}
            // Gone already: nothing to clean up.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io(
                    &old,
                    "remove the replaced set (the new one is in place)",
                    e,
                ));
            }
        }
        sync_dir(dir)?;
    }
    sweep(dir, &gen_name);
    Ok(gen_name)
}

/// Removes what a writer that died between making its entries and its
/// switch (a crash, `kill -9`) left: set directories no switch uses and
/// temporary links, once they are ten minutes old, so that a writer of
/// another process working at this moment is never disturbed. Best effort:
/// a leftover that cannot be removed now is tried at the next switch.
fn sweep(dir: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if name == keep {
            continue;
        }
        // Of the entry itself, not of what a symlink points to.
        let Ok(meta) = e.metadata() else { continue };
        let stale = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if !stale {
            continue;
        }
        if name.starts_with(GEN_PREFIX) && meta.is_dir() {
            let _ = fs::remove_dir_all(e.path());
        } else if (name.starts_with(FLIP_TMP_PREFIX) || name.starts_with(NAME_TMP_PREFIX))
            && meta.file_type().is_symlink()
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// The file writers of a directory lock (never removed: removing it would
/// let two writers lock two different files).
pub const LOCK_FILE: &str = "..lock";

/// Refuses a directory that someone else could change under the writer:
/// one not owned by the user writing, or writable by group or others. The
/// writer creates files and links by path in it; another user able to swap
/// a `..set-*` directory for a link between two steps would have it write
/// (and chmod) wherever the link points.
fn own_directory(dir: &Path, meta: &fs::Metadata) -> Result<(), FileError> {
    use std::os::unix::fs::MetadataExt;
    // The owner of /proc/self is the process's effective user.
    let me = fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if let Some(me) = me
        && meta.uid() != me
    {
        return Err(bad_set(
            dir.to_owned(),
            format!(
                "belongs to uid {}, not to the user writing (uid {me}), who could be made to write wherever that user points it; write into a directory of your own",
                meta.uid()
            ),
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(bad_set(
            dir.to_owned(),
            format!(
                "is writable by {} (mode {:o}): another user could swap its entries while they are written; `chmod go-w` it, or write into a directory of your own",
                if meta.permissions().mode() & 0o002 != 0 {
                    "others"
                } else {
                    "its group"
                },
                meta.permissions().mode() & 0o777
            ),
        ));
    }
    Ok(())
}

/// Takes the writers' lock of `dir` (an advisory lock on [`LOCK_FILE`]).
fn lock_directory(dir: &Path) -> Result<File, FileError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| io(&path, "open the writers' lock", e))?;
    f.lock()
        .map_err(|e| io(&path, "take the writers' lock", e))?;
    Ok(f)
}

/// Replaces files of one directory as one set: see the module docs for the
/// layout (`..data` and a hidden directory per set, each name a symlink into
/// `..data`). The files of the set in use that `files` does not name stay
/// in the new set; `files` may name a file the set did not hold (it is
/// added). A failure before the switch leaves the set in use as it was and
/// no temporary entry behind; the error names the file and what failed.
/// Used for a certificate and its key, which must never be seen with each
/// other's predecessors.
pub fn write_set_atomic(dir: &Path, files: &[(&str, &[u8], u32)]) -> Result<(), FileError> {
    let _writer = WRITERS.lock().unwrap_or_else(PoisonError::into_inner);
    check_names(dir, files)?;
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => own_directory(dir, &m)?,
        Ok(_) => return Err(FileError::NotADirectory(dir.to_owned())),
        Err(e) => return Err(io(dir, "open directory", e)),
    }
    // Writers of other processes (two agents, the CLI and an agent on one
    // directory) take turns: without it, one's cleanup removed the set the
    // other had just made, or a CRL-only write carried an older pair over
    // a newer one. Held until the switch and its cleanup are done.
    let _lock = lock_directory(dir)?;
    let mut cur = current(dir)?;
    // Names held by files outside the set (the layout before sets, or a
    // file put there by hand) first become a set with the content they
    // have, each name then linked to the same bytes: while they convert, a
    // reader sees the old files whole, and the new set arrives in one
    // switch like any other. A name that cannot be inspected has no content
    // to keep; writing it below reports why.
    let mut keep = Vec::new();
    for (name, _, _) in files {
        let link = match visible(dir, name) {
            Ok(Visible::File) => true,
            Ok(Visible::ForeignLink) => false,
            _ => continue,
        };
        keep.push(Entry {
            name: (*name).to_owned(),
            source: Source::Existing {
                path: dir.join(name),
                link,
            },
        });
    }
    if !keep.is_empty() {
        cur = Some(switch(dir, cur.as_deref(), &keep)?);
    }
    let named: Vec<Entry<'_>> = files
        .iter()
        .map(|(name, contents, mode)| Entry {
            name: (*name).to_owned(),
            source: Source::Bytes(contents, *mode),
        })
        .collect();
    switch(dir, cur.as_deref(), &named)?;
    Ok(())
}

/// A file opened by [`open_set`].
#[derive(Debug)]
pub struct SetFile {
    path: PathBuf,
    file: Result<File, std::io::Error>,
}

impl SetFile {
    /// The path it was asked for by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it exists (in the set that was opened).
    pub fn exists(&self) -> bool {
        self.file.is_ok()
    }

    /// Its content, at most `limit` bytes; an absent file is an error
    /// naming it.
    pub fn read(self, limit: u64) -> Result<Vec<u8>, FileError> {
        let SetFile { path, file } = self;
        let f = file.map_err(|e| io(&path, "read", e))?;
        read_open(f, &path, limit)
    }

    /// Like [`crate::read_secret`]: refused when group or others have any
    /// access to the file opened.
    pub fn read_secret(self, limit: u64) -> Result<Vec<u8>, FileError> {
        let SetFile { path, file } = self;
        let f = file.map_err(|e| io(&path, "read", e))?;
        refuse_shared_secret(&f, &path)?;
        read_open(f, &path, limit)
    }
}

/// For each directory of `paths`, what its `..data` points to now.
fn generations(paths: &[&Path]) -> Vec<(PathBuf, Option<PathBuf>)> {
    let mut out: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
    for p in paths {
        let parent = parent_of(p);
        if out.iter().any(|(d, _)| d == parent) {
            continue;
        }
        out.push((parent.to_owned(), fs::read_link(parent.join(SET_LINK)).ok()));
    }
    out
}

/// Where to open `p`: a set's symlink `..data/<name>` is followed through
/// the set directory resolved in `links`, not through `..data` again (which
/// may have switched since); any other path is opened as it is.
fn real_path(p: &Path, links: &[(PathBuf, Option<PathBuf>)]) -> PathBuf {
    let parent = parent_of(p);
    let Some(Some(target)) = links.iter().find(|(d, _)| d == parent).map(|(_, t)| t) else {
        return p.to_owned();
    };
    let Ok(link) = fs::read_link(p) else {
        return p.to_owned();
    };
    match link.strip_prefix(SET_LINK) {
        Ok(rest) if !rest.as_os_str().is_empty() => parent.join(target).join(rest),
        _ => p.to_owned(),
    }
}

/// Opens `paths` so that the files of one directory all come from one set:
/// its `..data` is resolved once and each file opened in the directory it
/// names. Opened files stay readable after a switch removes their
/// directory. When a file is missing and `..data` has switched meanwhile
/// (the directory resolved was removed after the switch), the new set is
/// opened instead; a file missing from an unchanged set is reported as
/// absent ([`SetFile::exists`]). Files that are not part of a set are
/// opened as they are. Any other error names the path and the operation.
pub fn open_set(paths: &[&Path]) -> Result<Vec<SetFile>, FileError> {
    for _ in 0..MAX_FLIPS {
        let links = generations(paths);
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            match File::open(real_path(p, &links)) {
                Ok(f) => files.push(SetFile {
                    path: p.to_path_buf(),
                    file: Ok(f),
                }),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    files.push(SetFile {
                        path: p.to_path_buf(),
                        file: Err(e),
                    });
                }
                Err(e) => return Err(io(p, "read", e)),
            }
        }
        // Whatever was opened, `..data` must not have moved meanwhile (nor
        // appeared: a directory converting from the layout before sets):
        // else the files may be of two sets.
        if generations(paths) == links {
            return Ok(files);
        }
    }
    let dir = match paths.first() {
        Some(p) => parent_of(p),
        None => Path::new("."),
    };
    Err(FileError::Io {
        path: dir.to_owned(),
        op: "read one set of",
        reason: format!("its {SET_LINK} switched {MAX_FLIPS} times while the files were opened"),
        kind: ErrorKind::Other,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn names(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn text(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    /// Checks that `dir` holds the set `files` and nothing else but
    /// `others`: each name the symlink `..data/<name>`, `..data` pointing to
    /// the one set directory, which holds exactly `files`. Returns that
    /// directory's name.
    fn assert_layout(dir: &Path, files: &[&str], others: &[&str]) -> String {
        let all = names(dir);
        let gens: Vec<&String> = all.iter().filter(|n| n.starts_with(GEN_PREFIX)).collect();
        assert_eq!(gens.len(), 1, "one set directory: {all:?}");
        let sdir = gens[0].clone();
        let mut want: BTreeSet<String> = files
            .iter()
            .chain(others)
            .map(|f| (*f).to_owned())
            .collect();
        want.insert(SET_LINK.to_owned());
        want.insert(LOCK_FILE.to_owned());
        want.insert(sdir.clone());
        assert_eq!(all, want, "entries of {}", dir.display());
        assert_eq!(fs::read_link(dir.join(SET_LINK)).unwrap(), Path::new(&sdir));
        for f in files {
            assert_eq!(
                fs::read_link(dir.join(f)).unwrap(),
                Path::new(SET_LINK).join(f),
                "{f}"
            );
        }
        let inside: BTreeSet<String> = files.iter().map(|f| (*f).to_owned()).collect();
        assert_eq!(names(&dir.join(&sdir)), inside);
        sdir
    }

    #[test]
    fn a_set_is_switched_as_one_and_keeps_its_modes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).unwrap();
        write_set_atomic(d, &[("tls.key", b"k1", 0o600), ("tls.crt", b"c1", 0o644)]).unwrap();
        let first = assert_layout(d, &["tls.key", "tls.crt"], &[]);
        // The modes of the files themselves, seen through the links.
        assert_eq!(mode_of(&d.join("tls.key")), 0o600);
        assert_eq!(mode_of(&d.join("tls.crt")), 0o644);
        assert_eq!(mode_of(&d.join(&first)), 0o700);
        write_set_atomic(d, &[("tls.key", b"k2", 0o600), ("tls.crt", b"c2", 0o644)]).unwrap();
        let second = assert_layout(d, &["tls.key", "tls.crt"], &[]);
        assert_ne!(first, second, "a new directory, the old one removed");
        assert_eq!(text(&d.join("tls.key")), "k2");
        assert_eq!(text(&d.join("tls.crt")), "c2");
        assert_eq!(mode_of(&d.join("tls.key")), 0o600);
        // A directory its owner opened to others for reading: they may read
        // the set's directory as they could read the files before.
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        write_set_atomic(d, &[("tls.crt", b"c3", 0o644)]).unwrap();
        let third = assert_layout(d, &["tls.key", "tls.crt"], &[]);
        assert_eq!(mode_of(&d.join(&third)), 0o755);
        // One others may write to: refused, naming the directory and the
        // rule, and nothing changes (another user could swap a `..set-*`
        // for a link to anywhere between two steps of the writer).
        for (mode, who) in [(0o775, "its group"), (0o777, "others"), (0o1777, "others")] {
            fs::set_permissions(d, fs::Permissions::from_mode(mode)).unwrap();
            let e = write_set_atomic(d, &[("tls.crt", b"c4", 0o644)]).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&d.display().to_string())
                    && msg.contains(&format!("is writable by {who}")),
                "{msg}"
            );
            assert_eq!(assert_layout(d, &["tls.key", "tls.crt"], &[]), third);
            assert_eq!(text(&d.join("tls.crt")), "c3");
        }
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn writers_of_two_processes_take_turns() {
        // The lock is a file lock: a second open file description of it
        // (as another process has) waits while the first holds it.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_set_atomic(d, &[("tls.crt", b"c1", 0o644)]).unwrap();
        let held = lock_directory(d).unwrap();
        let other = File::open(d.join(LOCK_FILE)).unwrap();
        assert!(other.try_lock().is_err(), "the lock is not held");
        drop(held);
        other.try_lock().unwrap();
        drop(other);
        // A lock file that is a link is never followed.
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("x");
        fs::remove_file(d.join(LOCK_FILE)).unwrap();
        symlink(&target, d.join(LOCK_FILE)).unwrap();
        assert!(write_set_atomic(d, &[("tls.crt", b"c2", 0o644)]).is_err());
        assert!(!target.exists());
    }

    #[test]
    fn files_the_call_does_not_name_are_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_set_atomic(
            d,
            &[
                ("tls.key", b"k1", 0o600),
                ("tls.crt", b"c1", 0o644),
                ("ca.crt", b"b1", 0o644),
            ],
        )
        .unwrap();
        // The agent writes its CRLs alone, and its bundle without the pair.
        write_set_atomic(d, &[("ca.crl", b"r1", 0o644)]).unwrap();
        assert_layout(d, &["tls.key", "tls.crt", "ca.crt", "ca.crl"], &[]);
        write_set_atomic(d, &[("ca.crt", b"b2", 0o644)]).unwrap();
        assert_layout(d, &["tls.key", "tls.crt", "ca.crt", "ca.crl"], &[]);
        assert_eq!(text(&d.join("tls.key")), "k1");
        assert_eq!(mode_of(&d.join("tls.key")), 0o600);
        assert_eq!(text(&d.join("tls.crt")), "c1");
        assert_eq!(text(&d.join("ca.crt")), "b2");
        assert_eq!(text(&d.join("ca.crl")), "r1");
    }

    #[test]
    fn write_atomic_of_a_file_of_the_set_goes_through_the_set() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_set_atomic(d, &[("tls.key", b"k1", 0o600), ("ca.crt", b"b1", 0o644)]).unwrap();
        let before = assert_layout(d, &["tls.key", "ca.crt"], &[]);
        // What the server does with its ca.crt when the bundle changes.
        crate::write_atomic(&d.join("ca.crt"), b"b2", 0o644).unwrap();
        let after = assert_layout(d, &["tls.key", "ca.crt"], &[]);
        assert_ne!(before, after);
        assert_eq!(text(&d.join("ca.crt")), "b2");
        assert_eq!(text(&d.join("tls.key")), "k1");
        // A file beside the set stays a file of its own.
        crate::write_atomic(&d.join("notes"), b"n", 0o644).unwrap();
        assert!(fs::symlink_metadata(d.join("notes")).unwrap().is_file());
        assert_layout(d, &["tls.key", "ca.crt"], &["notes"]);
    }

    #[test]
    fn a_failure_between_files_leaves_the_old_set_whole_and_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_set_atomic(d, &[("tls.key", b"k1", 0o600), ("tls.crt", b"c1", 0o644)]).unwrap();
        let before = assert_layout(d, &["tls.key", "tls.crt"], &[]);
        // The key is written, then a name no file system can create (over
        // 255 bytes), before the certificate.
        let long = "x".repeat(300);
        let e = write_set_atomic(
            d,
            &[
                ("tls.key", b"k2", 0o600),
                (&long, b"?", 0o644),
                ("tls.crt", b"c2", 0o644),
            ],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("cannot create ") && msg.contains(&long),
            "{msg}"
        );
        assert_eq!(assert_layout(d, &["tls.key", "tls.crt"], &[]), before);
        assert_eq!(text(&d.join("tls.key")), "k1");
        assert_eq!(text(&d.join("tls.crt")), "c1");
        let read: Vec<Vec<u8>> = open_set(&[&d.join("tls.key"), &d.join("tls.crt")])
            .unwrap()
            .into_iter()
            .map(|f| f.read(10).unwrap())
            .collect();
        assert_eq!(read, [b"k1".to_vec(), b"c1".to_vec()]);

        // A name the set cannot take over (a directory there), found after
        // the files are written: the same.
        fs::create_dir(d.join("ca.crt")).unwrap();
        let e =
            write_set_atomic(d, &[("tls.key", b"k3", 0o600), ("ca.crt", b"b", 0o644)]).unwrap_err();
        assert!(matches!(e, FileError::BadSet { .. }), "{e}");
        assert!(e.to_string().contains("is a directory"), "{e}");
        // The same after the link of a name new to the set was made: it
        // goes again.
        let e =
            write_set_atomic(d, &[("ca.crl", b"r", 0o644), ("ca.crt", b"b", 0o644)]).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert!(fs::symlink_metadata(d.join("ca.crl")).is_err());
        assert_eq!(
            assert_layout(d, &["tls.key", "tls.crt"], &["ca.crt"]),
            before
        );
        assert_eq!(text(&d.join("tls.key")), "k1");

        // Names a set cannot hold are refused before anything is written.
        for bad in ["", ".", "..", "..data", "..set-1", "a/b", "tls.key"] {
            let files: Vec<(&str, &[u8], u32)> = if bad == "tls.key" {
                vec![("tls.key", b"k", 0o600), ("tls.key", b"k", 0o600)]
            } else {
                vec![(bad, b"x", 0o644)]
            };
            let e = write_set_atomic(d, &files).unwrap_err();
            assert!(matches!(e, FileError::BadSet { .. }), "{bad:?}: {e}");
        }
        assert_eq!(
            assert_layout(d, &["tls.key", "tls.crt"], &["ca.crt"]),
            before
        );
    }

    #[test]
    fn the_layout_before_sets_is_converted_with_the_old_content_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        crate::write_atomic(&d.join("tls.key"), b"k0", 0o600).unwrap();
        crate::write_atomic(&d.join("tls.crt"), b"c0", 0o644).unwrap();
        crate::write_atomic(&d.join("other"), b"o", 0o644).unwrap();
        // The new set fails to be written: the names are links now, to the
        // old content, whole.
        let long = "y".repeat(300);
        write_set_atomic(
            d,
            &[
                ("tls.key", b"k1", 0o600),
                (&long, b"?", 0o644),
                ("tls.crt", b"c1", 0o644),
            ],
        )
        .unwrap_err();
        assert_layout(d, &["tls.key", "tls.crt"], &["other"]);
        assert_eq!(text(&d.join("tls.key")), "k0");
        assert_eq!(text(&d.join("tls.crt")), "c0");
        assert_eq!(mode_of(&d.join("tls.key")), 0o600);
        // Then it is written; the file it does not name stays as it was.
        let d2 = tempfile::tempdir().unwrap();
        let d2 = d2.path();
        crate::write_atomic(&d2.join("tls.key"), b"k0", 0o600).unwrap();
        crate::write_atomic(&d2.join("tls.crt"), b"c0", 0o644).unwrap();
        crate::write_atomic(&d2.join("other"), b"o", 0o644).unwrap();
        write_set_atomic(d2, &[("tls.key", b"k1", 0o600), ("tls.crt", b"c1", 0o644)]).unwrap();
        assert_layout(d2, &["tls.key", "tls.crt"], &["other"]);
        assert_eq!(text(&d2.join("tls.key")), "k1");
        assert_eq!(text(&d2.join("tls.crt")), "c1");
        assert_eq!(mode_of(&d2.join("tls.key")), 0o600);
        assert!(fs::symlink_metadata(d2.join("other")).unwrap().is_file());
        assert_eq!(text(&d2.join("other")), "o");
        // A name someone replaced by a file of their own is taken over the
        // same way, its content kept until the new set arrives.
        fs::remove_file(d2.join("tls.crt")).unwrap();
        fs::write(d2.join("tls.crt"), b"mine").unwrap();
        write_set_atomic(d2, &[("tls.key", b"k2", 0o600)]).unwrap();
        // Not named: the file stays the reader's tls.crt, out of the set.
        assert!(fs::symlink_metadata(d2.join("tls.crt")).unwrap().is_file());
        assert_layout(d2, &["tls.key"], &["tls.crt", "other"]);
        write_set_atomic(d2, &[("tls.crt", b"c3", 0o644)]).unwrap();
        assert_layout(d2, &["tls.key", "tls.crt"], &["other"]);
        assert_eq!(text(&d2.join("tls.crt")), "c3");
        assert_eq!(text(&d2.join("tls.key")), "k2");
    }

    #[test]
    fn a_reader_of_the_set_never_sees_two_sets_mixed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let set = |n: u32| {
            let v = n.to_string();
            write_set_atomic(
                d,
                &[
                    ("tls.key", v.as_bytes(), 0o600),
                    ("tls.crt", v.as_bytes(), 0o644),
                    ("ca.crt", v.as_bytes(), 0o644),
                ],
            )
            .unwrap();
        };
        set(0);
        let done = AtomicBool::new(false);
        let paths = [d.join("tls.key"), d.join("tls.crt"), d.join("ca.crt")];
        let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let reads = std::thread::scope(|s| {
            s.spawn(|| {
                for n in 1..=200 {
                    set(n);
                }
                done.store(true, Ordering::SeqCst);
            });
            let (mut reads, mut last) = (0u32, 0u32);
            let mut seen = BTreeSet::new();
            while !done.load(Ordering::SeqCst) {
                let got: Vec<String> = open_set(&paths)
                    .unwrap()
                    .into_iter()
                    .map(|f| String::from_utf8(f.read(16).unwrap()).unwrap())
                    .collect();
                assert!(
                    got.iter().all(|g| *g == got[0]),
                    "a mixed set after {reads} reads: {got:?}"
                );
                let n: u32 = got[0].parse().unwrap();
                assert!(n >= last, "set {n} read after set {last}");
                last = n;
                seen.insert(n);
                reads += 1;
            }
            (reads, seen.len())
        });
        // Evidence only if the reads raced the switches: many reads, of
        // several sets (one set read 1,000 times proves nothing).
        let (reads, sets) = reads;
        assert!(reads >= 50 && sets >= 5, "{reads} reads of {sets} sets");
        assert_layout(d, &["tls.key", "tls.crt", "ca.crt"], &[]);
        assert_eq!(text(&d.join("tls.crt")), "200");
    }

    #[test]
    fn leftovers_of_a_dead_writer_go_once_old_and_a_live_writers_stay() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_set_atomic(d, &[("tls.key", b"k1", 0o600)]).unwrap();
        let dead = d.join("..set-00000000000000aa");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("tls.key"), b"lost").unwrap();
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        File::open(&dead).unwrap().set_modified(hour_ago).unwrap();
        let busy = d.join("..set-00000000000000bb");
        fs::create_dir(&busy).unwrap();
        write_set_atomic(d, &[("tls.key", b"k2", 0o600)]).unwrap();
        assert!(!dead.exists(), "a leftover an hour old is removed");
        assert!(busy.exists(), "a fresh directory may be another writer's");
    }

    #[test]
    fn open_set_reads_files_outside_a_set_and_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("tls.crt"), b"c").unwrap();
        let mut got = open_set(&[&d.join("tls.crt"), &d.join("ca.crl")]).unwrap();
        let crl = got.pop().unwrap();
        assert!(!crl.exists());
        let e = crl.read(10).unwrap_err();
        assert!(e.is_not_found() && e.to_string().contains("ca.crl"), "{e}");
        assert_eq!(got.pop().unwrap().read(10).unwrap(), b"c");
        // A key others can read, in a set: refused by the path it was asked by.
        let s = tempfile::tempdir().unwrap();
        write_set_atomic(s.path(), &[("tls.key", b"k", 0o644)]).unwrap();
        let key = s.path().join("tls.key");
        let e = open_set(&[&key])
            .unwrap()
            .pop()
            .unwrap()
            .read_secret(10)
            .unwrap_err();
        assert!(
            matches!(&e, FileError::InsecurePermissions { path, .. } if *path == key),
            "{e}"
        );
    }

    #[test]
    fn a_data_entry_that_is_not_a_sets_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join(SET_LINK), b"x").unwrap();
        let e = write_set_atomic(d, &[("tls.key", b"k", 0o600)]).unwrap_err();
        assert!(e.to_string().contains("not a symlink"), "{e}");
        fs::remove_file(d.join(SET_LINK)).unwrap();
        symlink("/etc", d.join(SET_LINK)).unwrap();
        let e = write_set_atomic(d, &[("tls.key", b"k", 0o600)]).unwrap_err();
        assert!(e.to_string().contains("points to /etc"), "{e}");
        assert!(!d.join("tls.key").exists());
        assert!(set_generation(d).is_err());
    }
}
