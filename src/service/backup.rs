//! `BackupService`: a consistent snapshot (taken by the store's writer to a local file), streamed
//! to an unbound admin in chunks, then deleted.

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
        Self { sessions, dir }
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
        let mut suffix = [0u8; 8];
        let _ = getrandom::fill(&mut suffix);
        let temp = TempFile(self.dir.join(format!("backup-{}.tmp", hex::encode(suffix))));
        let entries = self
            .sessions
            .store()
            .snapshot(temp.0.clone())
            .await
            .map_err(Status::from)?;
        self.sessions
            .audit(
                &caller.name,
                caller.role_name(),
                "Backup",
                None,
                format!("entries={entries}"),
            )
            .await?;
        tracing::info!(entries, caller = %caller, "backup taken");
        let mut file = tokio::fs::File::open(&temp.0)
            .await
            .map_err(|e| Status::unavailable(format!("opening the snapshot: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _temp = temp;
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
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
