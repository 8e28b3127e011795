//! The backup file format: what a snapshot writes and a restore reads.
//!
//! `SABACKUP2\n`, then entries `u32 key length, key, u32 value length, value` (all big-endian),
//! then a trailer: `u64 0xFFFF_FFFF_FFFF_FFFF` (no key is that long), `u64` entry count, `u32`
//! CRC-32 of everything before the trailer's CRC. A restore reads and checks the whole file
//! before it writes anything.
//!
//! The entries are records, not a backend's keyspace, so a backup restores into any backend:
//! a kind byte and the record's natural key, then its encoding (`store::records`, the same on
//! every backend). `s` + session id: a session; `e` + big-endian sequence: an event; `p` +
//! tenant: a policy (JSON); `l` / `o` / `q` + tenant, 0, user, 0: a user's last place / recent
//! logins / login quota (sled keeps them elsewhere, see `store::keys`);
//! `a` + big-endian id: an audit record (JSON); `n` + tenant: a policy change whose enforcement
//! is unfinished (resumed at start); `m` + name: the store's id, installation secret, event head
//! and audit head. Indexes, the format marker and the log epoch are not in it: each
//! backend rebuilds its indexes, and a restore starts a new log epoch. Files of version 1
//! (`SABACKUP1\n`, sled's whole keyspace) still restore.

use std::{
    fs::File,
    io::{BufReader, BufWriter, Read, Write},
    path::Path,
};

use crate::error::{Error, Result};

const MAGIC: &[u8] = b"SABACKUP2\n";
const MAGIC_V1: &[u8] = b"SABACKUP1\n";

/// What a backup file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// sled's keyspace, indexes included (written before records).
    Keyspace,
    /// Records only (see the module documentation).
    Records,
}
const TRAILER_MARK: u64 = u64::MAX;

/// Writes entries in the backup format, counting and checksumming as it goes.
pub struct SnapshotWriter {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    count: u64,
}

/// An I/O error on a backup file as a storage error naming what was done to which file.
pub fn io<'a>(what: &'a str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::Storage(format!("{what} {}: {e}", path.display()))
}

impl SnapshotWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(io("creating", path))?;
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            count: 0,
        };
        w.write(MAGIC).map_err(io("writing", path))?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }

    pub fn entry(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
        self.write(&len(key.len()))?;
        self.write(key)?;
        self.write(&len(value.len()))?;
        self.write(value)?;
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer and syncs the file; returns the number of entries.
    pub fn finish(mut self) -> std::io::Result<u64> {
        self.write(&TRAILER_MARK.to_be_bytes())?;
        self.write(&self.count.to_be_bytes())?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_be_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(self.count)
    }
}

/// A backup's entries, in order: key and value.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Reads and checks a whole backup file: its version and entries.
pub fn read_snapshot(path: &Path) -> Result<(Version, Entries)> {
    let bad =
        |why: &str| Error::DataDir(format!("{} is not a valid backup: {why}", path.display()));
    let mut bytes = Vec::new();
    BufReader::new(File::open(path).map_err(io("opening", path))?)
        .read_to_end(&mut bytes)
        .map_err(io("reading", path))?;
    let version = if bytes.starts_with(MAGIC) {
        Version::Records
    } else if bytes.starts_with(MAGIC_V1) {
        Version::Keyspace
    } else {
        return Err(bad("no backup header"));
    };
    if bytes.len() < MAGIC.len() + 20 {
        return Err(bad("truncated"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_be_bytes(crc.try_into().map_err(|_| bad("truncated"))?);
    if crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch (damaged or truncated)"));
    }
    let mut pos = MAGIC.len();
    let mut entries = Vec::new();
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        let slice = body
            .get(*pos..*pos + n)
            .ok_or_else(|| bad("truncated entry"))?;
        *pos += n;
        Ok(slice)
    };
    loop {
        if body.len() - pos == 16 {
            let mark =
                u64::from_be_bytes(take(&mut pos, 8)?.try_into().map_err(|_| bad("trailer"))?);
            let count =
                u64::from_be_bytes(take(&mut pos, 8)?.try_into().map_err(|_| bad("trailer"))?);
            if mark != TRAILER_MARK || count != entries.len() as u64 {
                return Err(bad("trailer does not match the entries"));
            }
            return Ok((version, entries));
        }
        let klen = u32::from_be_bytes(take(&mut pos, 4)?.try_into().map_err(|_| bad("length"))?);
        let key = take(&mut pos, klen as usize)?.to_vec();
        let vlen = u32::from_be_bytes(take(&mut pos, 4)?.try_into().map_err(|_| bad("length"))?);
        let value = take(&mut pos, vlen as usize)?.to_vec();
        entries.push((key, value));
    }
}

/// Whether a key holds a record that a backup carries, whichever backend wrote it: not an index
/// (sled's user and deadline keys, etcd's guards; a restore rebuilds them), not sled's last uses
/// (its snapshot folds them into the records), not the format
/// marker or the log epoch (a restore sets its own), not etcd's leader key (a lease's).
pub fn is_record(key: &[u8]) -> bool {
    use super::keys;
    match key.first() {
        // Last uses are folded into the session records by sled's snapshot.
        Some(&keys::USER)
        | Some(&keys::DEADLINE)
        | Some(&keys::GUARD)
        | Some(&keys::TOUCH)
        | Some(&keys::TOUCH_LOG) => false,
        _ => ![keys::META_FORMAT, keys::META_LOG_EPOCH, keys::META_LEADER].contains(&key),
    }
}
