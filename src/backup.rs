//! Backups: restoring one (offline) and fetching one from a running server. The file format and
//! the snapshot that writes it belong to the store (`store::snapshot`); they are re-exported here.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};
use crate::store::snapshot::io;
pub use crate::store::snapshot::{read_snapshot, Entries, SnapshotWriter, Version};

/// Restores a backup into `data_dir`. Refuses a non-empty directory unless `force`, and then moves
/// it aside (to `<data_dir>.before-restore`) rather than deleting it. Returns the entry count.
pub fn restore(from: &Path, data_dir: &Path, force: bool) -> Result<u64> {
    let (version, entries) = read_snapshot(from)?;
    let occupied = std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some());
    if occupied {
        if !force {
            return Err(Error::DataDir(format!(
                "{} is not empty; restore into an empty directory, or pass --force to move it aside",
                data_dir.display()
            )));
        }
        let aside = PathBuf::from(format!("{}.before-restore", data_dir.display()));
        if aside.exists() {
            return Err(Error::DataDir(format!(
                "{} already exists; remove it first",
                aside.display()
            )));
        }
        std::fs::rename(data_dir, &aside).map_err(io("moving aside", data_dir))?;
    }
    crate::store::SledStore::restore_entries(data_dir, version, &entries)?;
    Ok(entries.len() as u64)
}

/// Fetches a backup from a server over `channel` into `out`, checks it, and returns its entry
/// count. `api_key`, if given, is sent as `authorization: Bearer`. A bad download never
/// replaces `out`.
pub async fn fetch(
    channel: tonic::transport::Channel,
    api_key: Option<&str>,
    out: &Path,
) -> Result<u64> {
    use crate::proto::v1::{backup_service_client::BackupServiceClient, BackupRequest};
    let mut request = tonic::Request::new(BackupRequest {});
    if let Some(key) = api_key {
        let value = format!("Bearer {key}")
            .parse()
            .map_err(|_| Error::invalid("api_key", "must be printable ASCII"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let unavailable =
        |s: tonic::Status| Error::Server(format!("backup failed: {:?}: {}", s.code(), s.message()));
    let mut stream = BackupServiceClient::new(channel)
        .backup(request)
        .await
        .map_err(unavailable)?
        .into_inner();
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let mut file = BufWriter::new(File::create(&partial).map_err(io("creating", &partial))?);
    while let Some(chunk) = stream.message().await.map_err(unavailable)? {
        file.write_all(&chunk.data)
            .map_err(io("writing", &partial))?;
    }
    let file = file
        .into_inner()
        .map_err(|e| Error::Storage(e.to_string()))?;
    file.sync_all().map_err(io("syncing", &partial))?;
    let entries = read_snapshot(&partial)?.1.len() as u64;
    std::fs::rename(&partial, out).map_err(io("renaming", &partial))?;
    Ok(entries)
}
