//! Files both programs keep to themselves (keys, state, verified credentials).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Write `contents` to `path`, readable by the owner only (mode 0600), replacing what was there atomically: it goes
/// to `path.tmp` first, is synced, then renamed, so a crash leaves the old file or the new one, never half of one.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
