//! Small shared helpers: locating the shared assets, atomic file writes.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The assets directory: `$BERTQA_ASSETS` if set, else `../shared/assets` relative to the crate root
/// (where the repository keeps the read-only SQuAD data and all-MiniLM-L6-v2), else `./assets`.
pub fn assets_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("BERTQA_ASSETS") {
        let p = PathBuf::from(p);
        if p.is_dir() {
            return Some(p);
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [
        root.join("../shared/assets"),
        PathBuf::from("../shared/assets"),
        PathBuf::from("assets"),
    ]
    .into_iter()
    .find(|c| c.is_dir())
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder, fsync, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
