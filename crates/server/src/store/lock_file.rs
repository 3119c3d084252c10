//! SQLite's data-plane lock: an exclusive `flock` on a file beside the database (decision 79). The kernel frees it
//! when the holder dies; a shared `flock` asks whether it is held without taking it.

use std::time::Duration;

use crate::store::StoreError;

/// The lock file of a SQLite database: beside it, named after its real path, so that every spelling of the
/// path (relative, through a symbolic link) finds the same file.
pub(super) fn lock_path(db_file: &str) -> String {
    let real = std::fs::canonicalize(db_file)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| db_file.to_owned());
    format!("{real}.lock")
}

/// How long taking the SQLite lock file keeps trying: another process's check (`lock_file_held`) holds a shared
/// lock for a moment.
const FILE_LOCK_PATIENCE: Duration = Duration::from_millis(500);

/// Open (creating it readable by its owner only) and `flock` the SQLite lock file.
pub(super) async fn lock_file(path: &str) -> Result<std::fs::File, StoreError> {
    let file = open_lock_file(path)?;
    let deadline = std::time::Instant::now() + FILE_LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::DataPlaneLocked {
                    held_by: format!("another process, through the lock file {path}"),
                })
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StoreError::LockFile {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// True when another process holds the SQLite lock file: a shared lock cannot be had beside it.
pub(super) fn lock_file_held(path: &str) -> Result<bool, StoreError> {
    let file = open_lock_file(path)?;
    match file.try_lock_shared() {
        // Dropping the file frees the shared lock at once.
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::LockFile {
            path: path.to_owned(),
            source,
        }),
    }
}

fn open_lock_file(path: &str) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| StoreError::LockFile {
            path: path.to_owned(),
            source,
        })
}
