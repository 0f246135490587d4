//! The embedded store's journal: how a certificate insert becomes durable.
//!
//! # Why a journal in front of redb
//! A durable redb commit writes a dozen scattered pages (the record's leaf,
//! its branches, the index, the allocator's state) and syncs them: measured
//! here at 200 µs of CPU for a group of five inserts, 40 µs per record, the
//! largest cost of an issuance after the signature. Appending the same
//! records to a journal is one `pwrite` into space that is already allocated
//! and one `fdatasync` (no metadata to write): 43 µs for the group, 9 µs per
//! record. The records then reach redb in checkpoints of up to
//! [`CHECKPOINT_RECORDS`] (at least every [`CHECKPOINT_EVERY`]), where a
//! record costs a sixth of what it does in a small commit.
//!
//! # Guarantees
//! An insert is answered only after its frame is synced. A checkpoint
//! inserts its records and the sequence number it reached in one redb
//! transaction, so after a crash every frame above that number is replayed
//! (insert-if-absent) and none below it is. Until its checkpoint a record
//! is read from memory ([`Pending`]); operations that scan or change records
//! first wait for a checkpoint of everything answered before they started.
//!
//! # Layout
//! Two files, `<store>.journal-0` and `-1` (mode 0600), written in turn: the
//! writer moves to the other file once the current one holds
//! [`SWITCH_BYTES`] and everything in the other is checkpointed, and starts
//! it from offset 0. New space is zero-filled a [`ZERO_CHUNK`] at a time
//! ahead of the writes, so that a sync never has to allocate blocks. A
//! frame is
//!
//! ```text
//! "MCJ1" | payload length u32 | seq u64 | CRC-32 of (length, seq, payload) u32 | payload
//! payload = key length u16 | key | index key length u16 | index key | value
//! ```
//!
//! (little-endian). Reading a file stops at the first frame that is torn,
//! does not check, or does not have a higher seq than the one before it
//! (what follows is an older round of the file).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A checkpoint starts once this many records wait.
pub(crate) const CHECKPOINT_RECORDS: usize = 2048;
/// A record waits at most about this long for its checkpoint.
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// The writer moves to the other file past this size.
pub(crate) const SWITCH_BYTES: u64 = 16 << 20;
/// New space is zero-filled this much at a time.
pub(crate) const ZERO_CHUNK: u64 = 1 << 20;

const MAGIC: &[u8; 4] = b"MCJ1";
const HEADER: usize = 4 + 4 + 8 + 4;
/// No payload is larger (a record is a few KiB; this bounds what a
/// corrupt length can make the reader allocate).
const MAX_PAYLOAD: usize = 1 << 24;

/// One record in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The record's key in the certificates table (the serial, hex).
    pub key: String,
    /// Its key in the identity index.
    pub index_key: String,
    /// The record as the certificates table holds it.
    pub value: Vec<u8>,
}

/// A record answered but not yet checkpointed.
#[derive(Debug)]
pub(crate) struct Pending {
    pub seq: u64,
    pub entry: Entry,
}

/// Appends one frame to `out`. `None` when a field is too long for the
/// format (never for a certificate record).
pub(crate) fn encode_frame(out: &mut Vec<u8>, seq: u64, e: &Entry) -> Option<()> {
    let klen = u16::try_from(e.key.len()).ok()?;
    let ilen = u16::try_from(e.index_key.len()).ok()?;
    let plen = 2 + e.key.len() + 2 + e.index_key.len() + e.value.len();
    if plen > MAX_PAYLOAD {
        return None;
    }
    let plen32 = u32::try_from(plen).ok()?;
    let start = out.len();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&plen32.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&klen.to_le_bytes());
    out.extend_from_slice(e.key.as_bytes());
    out.extend_from_slice(&ilen.to_le_bytes());
    out.extend_from_slice(e.index_key.as_bytes());
    out.extend_from_slice(&e.value);
    let crc = checksum(&out[start + 4..start + 16], &out[start + HEADER..]);
    out[start + 16..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Some(())
}

fn checksum(len_and_seq: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len_and_seq);
    h.update(payload);
    h.finalize()
}

/// The frames of one file, in order, up to the first that is torn, fails
/// its check or does not raise the seq. Never panics, whatever the bytes.
pub(crate) fn decode_frames(bytes: &[u8]) -> Vec<(u64, Entry)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut last_seq = 0u64;
    while let Some((seq, entry, len)) = decode_one(bytes.get(at..).unwrap_or_default()) {
        if seq <= last_seq {
            break;
        }
        last_seq = seq;
        out.push((seq, entry));
        at += len;
    }
    out
}

fn decode_one(b: &[u8]) -> Option<(u64, Entry, usize)> {
    let header = b.get(..HEADER)?;
    if &header[..4] != MAGIC {
        return None;
    }
    let plen = usize::try_from(u32::from_le_bytes(header[4..8].try_into().ok()?)).ok()?;
    if plen > MAX_PAYLOAD {
        return None;
    }
    let seq = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let crc = u32::from_le_bytes(header[16..20].try_into().ok()?);
    let payload = b.get(HEADER..HEADER.checked_add(plen)?)?;
    if checksum(&header[4..16], payload) != crc {
        return None;
    }
    let (key, rest) = take_str(payload)?;
    let (index_key, value) = take_str(rest)?;
    Some((
        seq,
        Entry {
            key,
            index_key,
            value: value.to_vec(),
        },
        HEADER + plen,
    ))
}

fn take_str(b: &[u8]) -> Option<(String, &[u8])> {
    let len = usize::from(u16::from_le_bytes(b.get(..2)?.try_into().ok()?));
    let s = std::str::from_utf8(b.get(2..2 + len)?).ok()?.to_owned();
    Some((s, b.get(2 + len..)?))
}

/// The journal's files and where the writer is.
#[derive(Debug)]
pub(crate) struct Files {
    paths: [PathBuf; 2],
    files: [File; 2],
    /// How far each file is zero-filled or written (its length).
    allocated: [u64; 2],
    /// The highest seq written to each file in its current round.
    last_seq: [u64; 2],
    current: usize,
    offset: u64,
}

/// The paths of the journal files of the store at `store`.
pub(crate) fn paths(store: &Path) -> [PathBuf; 2] {
    let name = store
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    [0, 1].map(|i| store.with_file_name(format!("{name}.journal-{i}")))
}

impl Files {
    /// Opens (creating, 0600) both files and reads every frame in them.
    pub(crate) fn open(store: &Path) -> io::Result<(Files, Vec<(u64, Entry)>)> {
        let paths = paths(store);
        let mut created = false;
        let open = |p: &Path, created: &mut bool| -> io::Result<File> {
            *created |= !p.exists();
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(p)
        };
        let files = [
            open(&paths[0], &mut created)?,
            open(&paths[1], &mut created)?,
        ];
        if created {
            // The new names must survive a crash as much as what is in them.
            if let Some(dir) = store.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        let mut frames = Vec::new();
        let mut allocated = [0; 2];
        for i in 0..2 {
            let bytes = std::fs::read(&paths[i])?;
            allocated[i] = bytes.len() as u64;
            frames.extend(decode_frames(&bytes));
        }
        frames.sort_by_key(|(seq, _)| *seq);
        Ok((
            Files {
                paths,
                files,
                allocated,
                last_seq: [0; 2],
                current: 0,
                offset: 0,
            },
            frames,
        ))
    }

    /// Writes `frames` (whose highest seq is `last_seq`) at the writer's
    /// position and syncs them. `checkpointed` is the highest seq in redb:
    /// the writer moves to the other file only when all of it is there. On
    /// an error the position stays, so the next group overwrites what this
    /// one may have left (its seqs are higher, so nothing of this one is
    /// read back after it).
    pub(crate) fn append(
        &mut self,
        frames: &[u8],
        last_seq: u64,
        checkpointed: u64,
    ) -> io::Result<()> {
        let other = 1 - self.current;
        if self.offset >= SWITCH_BYTES && self.last_seq[other] <= checkpointed {
            self.current = other;
            self.offset = 0;
        }
        let i = self.current;
        let end = self.offset + frames.len() as u64;
        while self.allocated[i] < end {
            self.files[i].write_all_at(&vec![0; ZERO_CHUNK as usize], self.allocated[i])?;
            self.allocated[i] += ZERO_CHUNK;
        }
        self.files[i].write_all_at(frames, self.offset)?;
        self.files[i].sync_data()?;
        self.offset = end;
        self.last_seq[i] = last_seq;
        Ok(())
    }

    /// Removes both files: called once everything is checkpointed.
    pub(crate) fn remove(self) -> io::Result<()> {
        drop(self.files);
        for p in &self.paths {
            std::fs::remove_file(p)?;
        }
        Ok(())
    }
}

/// What the writer, the checkpointer and readers share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Answered records not yet in redb, by key.
    pub by_key: HashMap<String, Arc<Pending>>,
    /// The same, in seq order.
    pub queue: Vec<Arc<Pending>>,
    /// Someone waits for a checkpoint of everything answered.
    pub asked: bool,
    /// The writer has stopped: checkpoint what is left and end.
    pub closing: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(k: &str, v: &[u8]) -> Entry {
        Entry {
            key: k.into(),
            index_key: format!("default/web/{k}"),
            value: v.to_vec(),
        }
    }

    #[test]
    fn frames_round_trip_and_stop_at_a_torn_tail() {
        let mut buf = Vec::new();
        for seq in 1..=3 {
            encode_frame(&mut buf, seq, &entry(&format!("0{seq}"), b"{\"a\":1}")).unwrap();
        }
        let whole = decode_frames(&buf);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[2], (3, entry("03", b"{\"a\":1}")));
        // Any cut inside the last frame loses exactly that frame.
        let frame_len = buf.len() / 3;
        for cut in [buf.len() - 1, buf.len() - 10, 2 * frame_len + HEADER] {
            assert_eq!(decode_frames(&buf[..cut]).len(), 2, "cut at {cut}");
        }
        // A flipped bit anywhere in the second frame ends the file there.
        for at in [frame_len + 5, frame_len + 12, frame_len + HEADER + 3] {
            let mut bad = buf.clone();
            bad[at] ^= 0x10;
            assert_eq!(decode_frames(&bad).len(), 1, "flip at {at}");
        }
    }

    #[test]
    fn an_older_round_after_the_newest_frames_is_not_read() {
        let mut old = Vec::new();
        for seq in 1..=5 {
            encode_frame(&mut old, seq, &entry("aa", b"old")).unwrap();
        }
        let mut new = Vec::new();
        encode_frame(&mut new, 9, &entry("bb", b"new")).unwrap();
        let mut file = old.clone();
        file[..new.len()].copy_from_slice(&new);
        let frames = decode_frames(&file);
        assert_eq!(frames, vec![(9, entry("bb", b"new"))]);
    }

    #[test]
    fn the_writer_switches_files_only_when_the_other_is_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store.redb");
        let (mut files, frames) = Files::open(&store).unwrap();
        assert!(frames.is_empty());
        let big = vec![7u8; 1 << 20];
        let mut seq = 0;
        let frame = |seq: u64| {
            let mut b = Vec::new();
            encode_frame(&mut b, seq, &entry(&format!("{seq:04}"), &big)).unwrap();
            b
        };
        // Fill file 0 past the switch point; file 1 is empty, so it is
        // "checkpointed" and the writer moves there.
        while files.offset < SWITCH_BYTES {
            seq += 1;
            files.append(&frame(seq), seq, 0).unwrap();
        }
        assert_eq!(files.current, 0);
        seq += 1;
        files.append(&frame(seq), seq, 0).unwrap();
        assert_eq!(files.current, 1, "moved to the empty file");
        let in_zero = files.last_seq[0];
        // File 1 fills up too, but file 0 is not checkpointed: stay.
        while files.offset < SWITCH_BYTES {
            seq += 1;
            files.append(&frame(seq), seq, 0).unwrap();
        }
        seq += 1;
        files.append(&frame(seq), seq, in_zero - 1).unwrap();
        assert_eq!(files.current, 1, "file 0 still holds unchecked records");
        seq += 1;
        files.append(&frame(seq), seq, in_zero).unwrap();
        assert_eq!(files.current, 0, "file 0 reused once checkpointed");
        drop(files);
        // Reading back: every frame of file 1 and the new round of file 0.
        let (_files, frames) = Files::open(&store).unwrap();
        let seqs: Vec<u64> = frames.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs.first().copied(), Some(in_zero + 1));
        assert_eq!(seqs.last().copied(), Some(seq));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&paths(&store)[0]).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frames(&bytes);
        }

        #[test]
        fn encoded_frames_decode_to_themselves(
            entries in proptest::collection::vec(("[0-9a-f]{1,32}", "[a-z/]{0,40}", proptest::collection::vec(any::<u8>(), 0..300)), 0..8),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = Vec::new();
            let mut want = Vec::new();
            for (i, (k, ix, v)) in entries.iter().enumerate() {
                let e = Entry { key: k.clone(), index_key: ix.clone(), value: v.clone() };
                encode_frame(&mut buf, i as u64 + 1, &e).unwrap();
                want.push((i as u64 + 1, e));
            }
            // Garbage after the last frame (a file's unused tail) is not read
            // as a frame unless it happens to be one with a higher seq.
            buf.extend_from_slice(&tail);
            let got = decode_frames(&buf);
            prop_assert_eq!(&got[..want.len()], &want[..]);
        }
    }
}
