//! `BackupService`: a consistent snapshot (taken by the store's writer to a local file), streamed
//! to an unbound admin in chunks, then deleted. One backup at a time; the snapshot is taken after
//! the call has started, so a large store's copy is not cut short by `request_timeout` (which
//! bounds only a stream's start).

use std::{path::PathBuf, pin::Pin, sync::Arc};

use futures_core::Stream;
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};

use crate::{
    proto::v1::{self as pb, backup_service_server::BackupService},
    security::layer::caller,
    sessions::Sessions,
    store::SessionStore,
};

const CHUNK: usize = 64 * 1024;

/// The stream type of `Backup`.
pub type BackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

pub struct BackupApi<S> {
    sessions: Arc<Sessions<S>>,
    /// Where snapshots are written before they stream: the data directory, so the copy stays on
    /// the same disk.
    dir: PathBuf,
    /// Held by the backup in progress: writes wait while a snapshot is copied, so two at once
    /// would only make them wait twice as long.
    running: Arc<tokio::sync::Semaphore>,
}

impl<S> BackupApi<S> {
    /// Also removes snapshot files left by a backup that a crash interrupted.
    pub fn new(sessions: Arc<Sessions<S>>, dir: PathBuf) -> Self {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("backup-") && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Self {
            sessions,
            dir,
            running: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

/// Deletes the snapshot file when the stream ends, however it ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tonic::async_trait]
impl<S: SessionStore> BackupService for BackupApi<S> {
    type BackupStream = BackupStream;

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let caller = caller(&request)?;
        if caller.tenant.is_some() {
            return Err(Status::permission_denied(format!(
                "{caller} is bound to a tenant; a backup holds every tenant"
            )));
        }
        let running = self.running.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("a backup is already running; retry when it is done")
        })?;
        let mut suffix = [0u8; 8];
        let _ = getrandom::fill(&mut suffix);
        let temp = TempFile(self.dir.join(format!("backup-{}.tmp", hex::encode(suffix))));
        let sessions = self.sessions.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _running = running;
            let file = match snapshot(&sessions, &caller, &temp).await {
                Ok(file) => file,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            stream_file(file, &tx).await;
            drop(temp);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Takes the snapshot into `temp`, audits it, and opens it for streaming.
async fn snapshot<S: SessionStore>(
    sessions: &Sessions<S>,
    caller: &crate::security::Caller,
    temp: &TempFile,
) -> Result<tokio::fs::File, Status> {
    let entries = sessions.store().snapshot(temp.0.clone()).await?;
    sessions
        .audit(
            &caller.name,
            caller.role_name(),
            "Backup",
            None,
            format!("entries={entries}"),
        )
        .await?;
    tracing::info!(entries, caller = %caller, "backup taken");
    tokio::fs::File::open(&temp.0)
        .await
        .map_err(|e| Status::unavailable(format!("opening the snapshot: {e}")))
}

/// Sends the file in chunks until it ends, the reader goes away, or reading fails.
async fn stream_file(
    mut file: tokio::fs::File,
    tx: &tokio::sync::mpsc::Sender<Result<pb::BackupChunk, Status>>,
) {
    loop {
        let mut data = vec![0u8; CHUNK];
        match file.read(&mut data).await {
            Ok(0) => return,
            Ok(n) => {
                data.truncate(n);
                if tx.send(Ok(pb::BackupChunk { data })).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "reading the snapshot: {e}"
                    ))))
                    .await;
                return;
            }
        }
    }
}
