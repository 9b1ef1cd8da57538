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

/// Error if `out` exists and is not an empty directory, unless `force` (the flag to name is `--force`).
pub fn check_output_dir(out: &Path, force: bool) -> Result<()> {
    if !out.exists() || force {
        return Ok(());
    }
    if !out.is_dir() {
        anyhow::bail!(
            "--output {} exists and is not a directory; pass --force to replace it",
            out.display()
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let more = if names.len() > 4 {
        format!(", … ({} entries)", names.len())
    } else {
        String::new()
    };
    names.truncate(4);
    anyhow::bail!(
        "--output {} is not empty (holds {}{more}); refusing to overwrite it: choose another directory, \
         or pass --force to replace it",
        out.display(),
        names.join(", ")
    )
}

/// Build a directory in a temporary sibling of `out` with `build`, then put it in place of `out`: the old
/// `out` (if any) is moved aside and removed only once the new one is in place, so an error or a crash
/// part-way never leaves `out` half-written (the temporary directory is removed on error).
pub fn replace_dir(out: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = out
        .file_name()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
        .ok_or_else(|| anyhow::anyhow!("--output {}: needs a directory name", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    let old = parent.join(format!(".{name}.old-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = build(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let had_old = out.exists();
    if had_old {
        if let Err(e) = std::fs::rename(out, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e).with_context(|| format!("moving {} aside", out.display()));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()));
    }
    if had_old {
        if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        }
        .with_context(|| {
            format!(
                "removing the previous {} (now {})",
                out.display(),
                old.display()
            )
        })?;
    }
    Ok(())
}
