//! The data directory's lock file. `serve` holds an exclusive advisory lock (`flock`) on
//! `DATA_DIR/relay.lock` for as long as it runs; `restore` and `admin purge` take the same lock
//! and so refuse while a relay serves from that directory, and a second `serve` on the same
//! directory refuses to start. The kernel drops the lock when the holder exits, however it exits
//! (a `kill -9` included), so a stale file never blocks anyone. The file holds the holder's pid,
//! for the message only.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "relay.lock";

/// Held while alive; dropping it (or exiting) releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "a relay (pid {pid}) is serving from {dir} (it holds {lock}); stop it first",
        dir = .dir.display(), lock = .lock.display()
    )]
    Held {
        dir: PathBuf,
        lock: PathBuf,
        pid: String,
    },
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Takes the data directory's lock (creating the directory and the file if needed), or says who
/// holds it. Never waits.
pub fn lock(data_dir: &Path) -> Result<DataDirLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    // Not truncated before the lock is ours: the file names the current holder.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::Held {
                dir: data_dir.to_path_buf(),
                lock: path.clone(),
                pid: if pid.is_empty() {
                    "?".into()
                } else {
                    pid.into()
                },
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DataDirLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let held = lock(&data).unwrap();
        match lock(&data) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("second lock: {other:?}"),
        }
        drop(held);
        lock(&data).expect("free again after the holder went");
    }
}
