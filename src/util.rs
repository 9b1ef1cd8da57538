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

/// For tests: the assets directory when it holds SQuAD v1.1 and all-MiniLM-L6-v2, else None after printing
/// why the test skips — or, with `BERTQA_REQUIRE_ASSETS=1` (CI sets it: the shared assets are there), a
/// panic, so that a test checking against them cannot pass by skipping.
pub fn assets_or_skip() -> Option<PathBuf> {
    let found = assets_dir().filter(|a| {
        a.join("squad-v1.1/train-v1.1.json").is_file()
            && a.join("squad-v1.1/dev-v1.1.json").is_file()
            && a.join("all-MiniLM-L6-v2/config.json").is_file()
    });
    if found.is_none() {
        let why = "SQuAD v1.1 and all-MiniLM-L6-v2 not found in $BERTQA_ASSETS or ../shared/assets";
        if std::env::var_os("BERTQA_REQUIRE_ASSETS").is_some_and(|v| v == "1") {
            panic!("BERTQA_REQUIRE_ASSETS=1: {why}");
        }
        println!("SKIPPED: {why} (set BERTQA_ASSETS)");
    }
    found
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder, fsync, then rename (and fsync the
/// folder). On any failure the temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_all(&[(path, bytes)])
}

/// Write several files as one: every one is written to a temporary file and synced first, and only when all
/// of them are complete are they renamed into place (then their folders synced). A failure while writing
/// (a full disk, say) removes the temporary files and leaves every destination as it was, so a set of files
/// that belong together (predictions.json beside nbest_predictions.json) is never half old, half new; only
/// a rename failing part-way, which neither a full disk nor a destination that is a folder (checked before
/// the first rename) causes, could still leave a mix.
pub fn write_atomic_all(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut tmps: Vec<PathBuf> = Vec::with_capacity(files.len());
    let written = (|| -> Result<()> {
        for (path, bytes) in files {
            let dir = parent_dir(path);
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let tmp = dir.join(format!(
                ".{}.tmp{}",
                path.file_name().and_then(|s| s.to_str()).unwrap_or("file"),
                std::process::id()
            ));
            tmps.push(tmp.clone());
            write_synced(&tmp, bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    })();
    // a destination that is a folder would fail its rename after the others had been replaced
    let written = written.and_then(|()| match files.iter().find(|(p, _)| p.is_dir()) {
        Some((p, _)) => anyhow::bail!("writing {}: it is a folder", p.display()),
        None => Ok(()),
    });
    if let Err(e) = written {
        for t in &tmps {
            let _ = std::fs::remove_file(t);
        }
        return Err(e);
    }
    for (i, ((path, _), tmp)) in files.iter().zip(&tmps).enumerate() {
        if let Err(e) = std::fs::rename(tmp, path) {
            for t in &tmps[i..] {
                let _ = std::fs::remove_file(t);
            }
            return Err(e)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
        }
    }
    let mut dirs: Vec<&Path> = files.iter().map(|(p, _)| parent_dir(p)).collect();
    dirs.dedup();
    for d in dirs {
        sync_dir(d)?;
    }
    Ok(())
}

/// The folder holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Create `path` with `bytes` and fsync it: an error of the fsync (where a file system reports a full disk
/// or an I/O error only then: NFS, quotas) is an error like one of the write.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Fsync a folder, so that the renames and removals in it are on disk before we go on (a checkpoint counted
/// as saved must survive a power loss). File systems that cannot sync a folder (EINVAL, ENOTSUP) are left
/// as they are, and so is a folder that may be written but not read; any other error is one.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let res = std::fs::File::open(dir).and_then(|f| f.sync_all());
    match res {
        Ok(()) => Ok(()),
        // a file system that cannot sync folders, or a folder we may write but not read (open fails)
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::EACCES) | Some(libc::EPERM)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("syncing the folder {}", dir.display())),
    }
}

/// A line on standard error that never panics (`eprintln!` panics when stderr is closed or full): warnings,
/// notes and progress must not end a run because nobody reads its log.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// A line of a command's result on standard output: an error (not a panic, as with `println!`) when it
/// cannot be written — a closed pipe, a full disk.
pub fn print_line(line: impl std::fmt::Display) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .context("writing to standard output")
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
    // named by process and time: a process id repeats (every container's first process is 1), and an
    // entry of another process — perhaps alive, on another machine sharing the file system — is never
    // reused or removed
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tag = format!("{}-{stamp}", std::process::id());
    let tmp = parent.join(format!(".{name}.tmp-{tag}"));
    let old = parent.join(format!(".{name}.old-{tag}"));
    // what an earlier write that was killed part-way left beside `out` is named, not removed
    let leftovers = sibling_leftovers(&parent, name);
    if !leftovers.is_empty() {
        crate::say!(
            "warning: beside {} are {}, left by a write of it that was interrupted (or that is still running \
             elsewhere): remove them by hand once no other bertqa is writing {name}",
            out.display(),
            leftovers.join(", ")
        );
    }
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
        let removed = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
        // the new `out` is in place: what is left of the old one is a warning, not a failure
        if let Err(e) = removed {
            crate::say!(
                "warning: {} is written, but its previous version, moved to {}, could not be removed ({e}): \
                 remove it by hand",
                out.display(),
                old.display()
            );
        }
    }
    sync_dir(&parent).with_context(|| format!("{} is in place", out.display()))
}

/// The temporary and moved-aside entries `replace_dir` names `.NAME.tmp-PID-TIME` / `.NAME.old-PID-TIME`
/// (and, before, `.NAME.tmp-PID`) in `parent`, sorted.
fn sibling_leftovers(parent: &Path, name: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|f| {
            [".tmp-", ".old-"].iter().any(|k| {
                f.strip_prefix(&format!(".{name}{k}")).is_some_and(|p| {
                    p.bytes().next().is_some_and(|b| b.is_ascii_digit())
                        && p.bytes().all(|b| b.is_ascii_digit() || b == b'-')
                })
            })
        })
        .collect();
    found.sort();
    found
}

/// The name of the lock file `bertqa train` keeps in its output directory while it runs.
pub const LOCK_FILE: &str = "bertqa.lock";

/// Who holds a run lock: written into the lock file as JSON.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LockOwner {
    pub pid: u32,
    pub host: String,
    /// when the run started (seconds since the Unix epoch)
    pub started: u64,
    /// the process's start time in clock ticks after boot (/proc/PID/stat field 22), to tell a live owner
    /// from a later process that reuses its pid (None where /proc is not available)
    #[serde(default)]
    pub proc_start: Option<u64>,
}

impl LockOwner {
    fn me() -> LockOwner {
        let pid = std::process::id();
        LockOwner {
            pid,
            host: hostname(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            proc_start: proc_start_ticks(pid),
        }
    }

    /// Whether this owner is a live process on this machine (a lock written on another host counts as
    /// live: its process cannot be checked from here).
    fn alive(&self) -> bool {
        if self.host != hostname() {
            return true;
        }
        if !pid_alive(self.pid) {
            return false;
        }
        match (self.proc_start, proc_start_ticks(self.pid)) {
            (Some(a), Some(b)) => a == b,
            // without start times: a live pid is taken as the owner (unless it is this process)
            _ => self.pid != std::process::id(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "pid {} on {}, started {}",
            self.pid, self.host, self.started
        )
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or truncates
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Whether a process with this pid exists (kill(pid, 0); EPERM means it exists but is not ours).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks that the process exists
    let rc = unsafe { libc::kill(p, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Field 22 of /proc/PID/stat (start time in clock ticks after boot), where /proc exists.
fn proc_start_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) is in parentheses and may hold spaces: count fields after its ')'
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The lock of a run on its output directory: `bertqa.lock` holding the owner (pid, host, start time) as
/// JSON, created with `create_new` and held with an exclusive `flock` for the life of the run (the kernel
/// drops the flock when the process dies, even by kill -9). A second run on the directory fails naming the
/// owner while the owner lives; a lock left by a dead process is taken over with a note. Removed when
/// dropped (the run ends, however it ends), or by [`DirLockHandle::release`] (the signal handler's quick
/// exit).
pub struct DirLock {
    handle: DirLockHandle,
}

/// A shareable handle that removes the lock file once (the guard's Drop, or a quick exit on a signal).
#[derive(Clone)]
pub struct DirLockHandle {
    inner: std::sync::Arc<LockInner>,
}

struct LockInner {
    path: PathBuf,
    released: std::sync::atomic::AtomicBool,
    /// the open lock file: its flock lasts as long as the descriptor
    file: std::sync::Mutex<Option<std::fs::File>>,
}

impl DirLockHandle {
    /// Remove the lock file (once; later calls do nothing).
    pub fn release(&self) {
        if self
            .inner
            .released
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let _ = std::fs::remove_file(&self.inner.path);
        if let Ok(mut f) = self.inner.file.lock() {
            f.take();
        }
    }
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// flock(LOCK_EX | LOCK_NB): Ok(true) taken, Ok(false) held by another process, Err: not supported here.
fn try_flock(f: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid open descriptor
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether `f` is still the file at `path` (not unlinked or replaced since it was opened).
fn same_file(f: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl DirLock {
    /// Take the lock of `dir` (which must exist). Errors name the lock file and the live owner.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(LOCK_FILE);
        let me = LockOwner::me();
        for _ in 0..5 {
            let (mut f, created) = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => (f, true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    match std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                    {
                        Ok(f) => (f, false),
                        // removed between the two opens: try again
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            return Err(e).with_context(|| format!("opening {}", path.display()))
                        }
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            };
            let flocked = match try_flock(&f) {
                Ok(true) => true,
                Ok(false) => {
                    let owner = read_owner(&path);
                    anyhow::bail!(
                        "{} is in use by another bertqa run ({}; lock file {}): one run per output \
                         directory. Wait for it to finish or choose another --output-dir (if that run is gone, \
                         delete the lock file)",
                        dir.display(),
                        owner.map(|o| o.describe()).unwrap_or_else(|| "owner unknown".into()),
                        path.display()
                    );
                }
                // a file system without flock: the pid check below is the only guard
                Err(_) => false,
            };
            if !same_file(&f, &path) {
                continue; // its owner removed it as we opened it: start again
            }
            let mut previous = None;
            if !created {
                let mut text = String::new();
                f.read_to_string(&mut text)
                    .with_context(|| format!("reading {}", path.display()))?;
                match serde_json::from_str::<LockOwner>(&text) {
                    Ok(o) if o.alive() => anyhow::bail!(
                        "{} is in use by another bertqa run ({}; lock file {}): one run per output \
                         directory. Wait for it to finish or choose another --output-dir (if that run is gone, \
                         delete the lock file)",
                        dir.display(),
                        o.describe(),
                        path.display()
                    ),
                    Ok(o) => previous = Some(format!("{}: no such process any more", o.describe())),
                    Err(_) => {
                        // empty or partial: maybe a run that is writing it right now (without flock)
                        let young = std::fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.elapsed().ok())
                            .map(|d| d.as_secs() < 5)
                            .unwrap_or(true);
                        if young && !flocked {
                            anyhow::bail!(
                                "{}: another run is taking this lock right now; try again",
                                path.display()
                            );
                        }
                        previous = Some(
                            "its contents are unreadable: left by a run that died writing it".into(),
                        );
                    }
                }
            }
            let written = f
                .set_len(0)
                .and_then(|_| f.seek(std::io::SeekFrom::Start(0)))
                .and_then(|_| f.write_all(serde_json::to_string(&me)?.as_bytes()))
                .and_then(|_| f.sync_all());
            if let Err(e) = written {
                // (a full disk): no lock file left behind without an owner in it — unlinked while still
                // flocked, so that no other run can take it in between (as in release)
                let _ = std::fs::remove_file(&path);
                drop(f);
                return Err(e).with_context(|| format!("writing {}", path.display()));
            }
            if let Some(p) = previous {
                crate::say!("note: {}: taking over a stale lock ({p})", path.display());
            }
            return Ok(DirLock {
                handle: DirLockHandle {
                    inner: std::sync::Arc::new(LockInner {
                        path,
                        released: false.into(),
                        file: std::sync::Mutex::new(Some(f)),
                    }),
                },
            });
        }
        anyhow::bail!(
            "{}: could not take the lock (it kept changing); try again",
            path.display()
        )
    }

    pub fn handle(&self) -> DirLockHandle {
        self.handle.clone()
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        self.handle.release();
    }
}

fn read_owner(path: &Path) -> Option<LockOwner> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Files written together replace their previous versions all or none: a failure writing the second
    /// (here its folder is a file) leaves the first as it was and no temporary file behind.
    #[test]
    fn write_atomic_all_replaces_all_or_none() {
        let d = std::env::temp_dir().join(format!("bertqa-util-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a.json"), d.join("b.json"));
        write_atomic_all(&[(&a, b"old a"), (&b, b"old b")]).unwrap();
        std::fs::write(d.join("blocker"), "a file").unwrap();
        let bad = d.join("blocker/c.json");
        let e = write_atomic_all(&[(&a, b"new a"), (&bad, b"new c")]).unwrap_err();
        assert!(format!("{e:#}").contains("blocker"), "{e:#}");
        assert_eq!(std::fs::read(&a).unwrap(), b"old a");
        assert_eq!(names(&d), ["a.json", "b.json", "blocker"]);
        // a destination that is a folder: found before the first rename
        std::fs::create_dir(d.join("c.json")).unwrap();
        let e = write_atomic_all(&[(&a, b"new a"), (&d.join("c.json"), b"new c")]).unwrap_err();
        assert!(format!("{e:#}").contains("it is a folder"), "{e:#}");
        assert_eq!(std::fs::read(&a).unwrap(), b"old a");
        std::fs::remove_dir(d.join("c.json")).unwrap();
        write_atomic_all(&[(&a, b"new a"), (&b, b"new b")]).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"new a");
        assert_eq!(std::fs::read(&b).unwrap(), b"new b");
        assert_eq!(names(&d), ["a.json", "b.json", "blocker"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
