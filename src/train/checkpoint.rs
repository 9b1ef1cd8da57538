//! Training checkpoints: `checkpoint-<step>/` = an HF model directory (f32 master weights, loadable by
//! transformers and `bertqa eval`) + `optimizer.safetensors` (Adam moments, by parameter name) +
//! `trainer_state.json` (step, epoch, position in the epoch, loss scale, best F1, the run's config). Written
//! into a temporary folder, then renamed: a crash never leaves a half-written checkpoint.

use super::{RunInputs, TrainConfig, TrainState, Trainer};
use crate::model::checkpoint as mc;
use crate::model::params::param_specs;
use crate::model::BertParams;
use crate::ops::Backend;
use crate::tensor::DType;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Test-only fault injection: `BERTQA_TEST_FAULT=<target>:<stage>[:<action>]` (several separated by
/// commas), read here, in the save path only. `target` is `save` (a `checkpoint-N/`) or `best` (`best/`);
/// `stage` one of `after-model` (the model files written into the temporary folder), `after-optimizer`
/// (checkpoints: optimizer.safetensors and trainer_state.json written too), `before-rename`,
/// `after-move-aside` (the previous version renamed to `X.old`, the new one not yet in place) and
/// `during-prune` (an old checkpoint renamed to `.checkpoint-N.del` and partly deleted); `action` is
/// `abort` (the default: `std::process::abort()`, like a kill -9), `error` (the save fails, like a full
/// disk) or `sleep=<ms>`. Tests use it to make crashes and signals during a save deterministic.
pub const FAULT_VAR: &str = "BERTQA_TEST_FAULT";

fn fault_armed(target: &str, stage: &str) -> bool {
    std::env::var_os(FAULT_VAR).is_some_and(|spec| {
        spec.to_string_lossy().split(',').any(|e| {
            let mut it = e.trim().splitn(3, ':');
            it.next() == Some(target) && it.next() == Some(stage)
        })
    })
}

fn fault(target: &str, stage: &str) -> Result<()> {
    let Some(spec) = std::env::var_os(FAULT_VAR) else {
        return Ok(());
    };
    let spec = spec.to_string_lossy();
    for entry in spec.split(',') {
        let mut it = entry.trim().splitn(3, ':');
        if it.next() != Some(target) || it.next() != Some(stage) {
            continue;
        }
        match it.next() {
            None | Some("abort") => {
                crate::say!("{FAULT_VAR}: aborting at {target}:{stage}");
                // no core file for an injected crash
                let zero = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: a valid rlimit struct
                unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
                std::process::abort();
            }
            Some("error") => bail!("{FAULT_VAR}: injected failure at {target}:{stage}"),
            Some(a) => match a.strip_prefix("sleep=").and_then(|m| m.parse::<u64>().ok()) {
                Some(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
                None => bail!("{FAULT_VAR}: unknown action {a:?} (abort, error or sleep=<ms>)"),
            },
        }
    }
    Ok(())
}

/// Held for the whole of every save (checkpoint or best/): a second signal waits on it so that a save in
/// progress completes before the process exits.
static SAVE_GATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The save gate (see `SAVE_GATE`): lock it to wait for a save in progress and to keep new ones from
/// starting.
pub fn save_gate() -> std::sync::MutexGuard<'static, ()> {
    SAVE_GATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The save gate if no save is in progress.
pub fn try_save_gate() -> Option<std::sync::MutexGuard<'static, ()>> {
    match SAVE_GATE.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// `dst.old`: where the previous version of `dst` waits while the new one is renamed into place.
fn old_for(dst: &Path) -> PathBuf {
    let name = dst.file_name().and_then(|s| s.to_str()).unwrap_or("dir");
    dst.with_file_name(format!("{name}.old"))
}

fn replace_dir(tmp: &Path, dst: &Path, target: &str) -> Result<()> {
    fault(target, "before-rename")?;
    // a folder of that name holding anything bertqa does not write is someone else's, and so is a file of
    // that name: never replaced
    if dst.exists() && !(dst.is_dir() && only_checkpoint_files(dst)) {
        let _ = std::fs::remove_dir_all(tmp);
        bail!(
            "{} is not bertqa's (a file, or a folder holding files bertqa does not write): not replacing it \
             with this save; move it away",
            dst.display()
        );
    }
    if dst.exists() {
        let old = old_for(dst);
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        std::fs::rename(dst, &old).with_context(|| format!("moving {} aside", dst.display()))?;
        if let Err(e) = fault(target, "after-move-aside") {
            let _ = std::fs::rename(&old, dst);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(tmp, dst) {
            let _ = std::fs::rename(&old, dst);
            return Err(e)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()));
        }
        // the new version is in place: the old one is debris from here on (a crash part-way through this
        // removal leaves `X.old` beside a complete `X`, which the next start removes)
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, dst)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    }
    // the rename on disk before the save counts as done
    crate::util::sync_dir(dst.parent().unwrap_or(Path::new(".")))
}

fn tmp_for(dst: &Path) -> PathBuf {
    let name = dst.file_name().and_then(|s| s.to_str()).unwrap_or("ckpt");
    dst.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Write the model (master weights) as an HF directory into a fresh temporary folder for `dst`; `extra` adds
/// more files there; then the folder replaces `dst` in one rename. A failed save removes its temporary
/// folder. The save gate is held throughout.
fn write_dir<B: Backend>(
    tr: &Trainer<B>,
    inp: &RunInputs,
    dst: &Path,
    target: &str,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let _gate = save_gate();
    let tmp = tmp_for(dst);
    let _ = std::fs::remove_dir_all(&tmp);
    let res = (|| {
        let raw = mc::raw_config(&inp.model_dir);
        mc::save(
            tr.be,
            &tmp,
            &tr.model.cfg,
            tr.master_params(),
            Some(&inp.model_dir),
            raw.as_ref(),
        )?;
        fault(target, "after-model")?;
        extra(&tmp)?;
        replace_dir(&tmp, dst, target)
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res.with_context(|| format!("saving {}", dst.display()))
}

/// Save the model (master weights) as an HF directory at `dst`, atomically.
pub fn save_model_dir<B: Backend>(tr: &Trainer<B>, inp: &RunInputs, dst: &Path) -> Result<()> {
    write_dir(tr, inp, dst, "best", |_| Ok(()))
}

fn moments_bytes<B: Backend>(tr: &Trainer<B>) -> Result<Vec<u8>> {
    let mut host = mc::HostTensors::new();
    for (((name, shape), m), v) in param_specs(&tr.model.cfg)
        .into_iter()
        .zip(tr.m.tensors())
        .zip(tr.v.tensors())
    {
        host.insert(format!("m.{name}"), (shape.clone(), m.to_f32_vec(tr.be)?));
        host.insert(format!("v.{name}"), (shape, v.to_f32_vec(tr.be)?));
    }
    mc::safetensors_bytes(&host, None)
}

/// Save `checkpoint-<step>/` and prune old ones beyond `save_total_limit`: each is renamed to a hidden
/// `.checkpoint-N.del` first, then deleted, so that no directory that looks like a checkpoint is ever
/// half-deleted.
pub fn save<B: Backend>(tr: &Trainer<B>, inp: &RunInputs) -> Result<()> {
    let dst = inp
        .output_dir
        .join(format!("checkpoint-{}", tr.state.global_step));
    write_dir(tr, inp, &dst, "save", |tmp| {
        crate::util::write_atomic(&tmp.join("optimizer.safetensors"), &moments_bytes(tr)?)?;
        let st = serde_json::json!({"state": tr.state, "config": tr.cfg, "precision": tr.model.dtype().to_string(),
            "dropout_stream": crate::rng::DROPOUT_STREAM_VERSION});
        crate::util::write_atomic(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(&st)?.as_bytes(),
        )?;
        fault("save", "after-optimizer")
    })?;
    if tr.cfg.save_total_limit > 0 {
        let _gate = save_gate();
        let mut all = list_checkpoints(&inp.output_dir);
        all.sort();
        while all.len() > tr.cfg.save_total_limit {
            let (step, p) = all.remove(0);
            let del = inp.output_dir.join(format!(".checkpoint-{step}.del"));
            let _ = std::fs::remove_dir_all(&del);
            // a checkpoint that cannot be pruned stays (and complete): say so, since --save-total-limit then
            // no longer bounds the disk the run takes
            match std::fs::rename(&p, &del) {
                Ok(()) => {
                    if fault_armed("save", "during-prune") {
                        // a crash part-way through the deletion
                        let _ = std::fs::remove_file(del.join("model.safetensors"));
                    }
                    fault("save", "during-prune")?;
                    if let Err(e) = std::fs::remove_dir_all(&del) {
                        crate::say!(
                            "warning: --save-total-limit: could not remove {} ({e}); the next start removes it",
                            del.display()
                        );
                    }
                }
                // (once per checkpoint: every later save tries it again)
                Err(e) if warn_once(&p) => crate::say!(
                    "warning: --save-total-limit: could not prune {} ({e}); it stays",
                    p.display()
                ),
                Err(_) => {}
            }
        }
    }
    Ok(())
}

/// True the first time it is called with `p` in this process.
fn warn_once(p: &Path) -> bool {
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut w = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if w.iter().any(|q| q == p) {
        return false;
    }
    w.push(p.to_path_buf());
    true
}

/// The files a checkpoint directory must hold (written into its temporary folder before the rename).
const CHECKPOINT_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
];

/// Whether `dir` holds every file of a checkpoint.
pub fn is_complete(dir: &Path) -> bool {
    CHECKPOINT_FILES.iter().all(|f| dir.join(f).is_file())
}

/// Whether every entry of `dir` is a plain file of a bertqa checkpoint (its own files and the tokenizer's
/// copied beside the model); an empty directory counts. False when it cannot be read.
fn only_checkpoint_files(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.into_iter().all(|e| {
        e.is_ok_and(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            e.file_type().is_ok_and(|t| t.is_file())
                && (CHECKPOINT_FILES.contains(&name.as_ref())
                    || crate::model::checkpoint::TOKENIZER_FILES.contains(&name.as_ref()))
        })
    })
}

/// `N` of a directory named `checkpoint-N`.
fn checkpoint_step(name: &str) -> Option<usize> {
    let n = name.strip_prefix("checkpoint-")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The files `bertqa train` writes at the top of its output directory besides `checkpoint-N/` and `best/`.
pub const RUN_FILES: &[&str] = &[
    "metrics.jsonl",
    "predictions.json",
    "nbest_predictions.json",
    "null_odds.json",
    "curves.svg",
    "summary.json",
];

/// The entries of `dir` that belong to an earlier run (checkpoints, best/, the run files), sorted.
pub fn run_contents(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| checkpoint_step(n).is_some() || n == "best" || RUN_FILES.contains(&n.as_str()))
        .collect();
    v.sort();
    v
}

/// What to do with an entry of an output directory left by an earlier run that stopped part-way.
enum Debris {
    /// a temporary, half-deleted or incomplete directory/file: remove it
    Remove,
    /// `X.old` whose `X` is missing: the complete previous version, renamed back to `X`
    Restore(PathBuf),
}

/// Whether `name` (an entry of `dir`) is debris of bertqa's own saves.
fn classify(dir: &Path, name: &str) -> Option<Debris> {
    let path = dir.join(name);
    // checkpoint-N that is not complete: half-deleted by an older bertqa's pruning — only when every entry
    // in it is a file bertqa writes into a checkpoint; anything else (a checkpoint of another tool, a file
    // of the user's) is not ours to remove, and the directory then holds a run (run_contents)
    // — and only without weights in it: a checkpoint-N that still holds model.safetensors (one whose
    // optimizer state was stripped to save space, say) is left as it is, incomplete (never resumed from)
    if checkpoint_step(name).is_some() {
        return (path.is_dir()
            && !is_complete(&path)
            && !path.join("model.safetensors").exists()
            && only_checkpoint_files(&path))
        .then_some(Debris::Remove);
    }
    if let Some(base) = name.strip_suffix(".old") {
        if checkpoint_step(base).is_some() || base == "best" {
            let x = dir.join(base);
            return Some(if x.exists() {
                Debris::Remove
            } else {
                Debris::Restore(x)
            });
        }
        return None;
    }
    let hidden = name.strip_prefix('.')?;
    // .checkpoint-N.del: a pruned checkpoint being deleted
    if let Some(base) = hidden.strip_suffix(".del") {
        return checkpoint_step(base).is_some().then_some(Debris::Remove);
    }
    // .X.tmpPID: the temporary folder of a save, or a file written atomically
    let (base, pid) = hidden.rsplit_once(".tmp")?;
    let ours = checkpoint_step(base).is_some() || base == "best" || RUN_FILES.contains(&base);
    (ours && pid.bytes().all(|b| b.is_ascii_digit())).then_some(Debris::Remove)
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// Clean up what earlier runs that stopped part-way left in `dir` (call only while holding the run lock):
/// temporary folders and files of saves (`.checkpoint-N.tmp*`, `.best.tmp*`, `.metrics.jsonl.tmp*`, …),
/// pruned checkpoints being deleted (`.checkpoint-N.del`), incomplete `checkpoint-N/` (half-deleted by
/// older versions' pruning), `X.old` beside a complete `X`; an `X.old` whose `X` is missing is the complete
/// previous version and is renamed back. Returns one line per entry handled.
pub fn clean_debris(dir: &Path) -> Result<Vec<String>> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(vec![]);
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // incomplete checkpoints first (an X.old beside one is then restored), then the rest
    names.sort_by_key(|n| (checkpoint_step(n).is_none(), n.clone()));
    let mut notes = vec![];
    for name in names {
        let path = dir.join(&name);
        match classify(dir, &name) {
            None => {}
            Some(Debris::Remove) => {
                remove_any(&path).with_context(|| format!("removing {}", path.display()))?;
                notes.push(format!("removed {name}"));
            }
            Some(Debris::Restore(x)) => {
                std::fs::rename(&path, &x).with_context(|| {
                    format!("renaming {} back to {}", path.display(), x.display())
                })?;
                notes.push(format!(
                    "restored {} from {name} (a save stopped between its two renames)",
                    x.file_name().and_then(|s| s.to_str()).unwrap_or("")
                ));
            }
        }
    }
    Ok(notes)
}

/// The `checkpoint-N/` and `best/` folders of `dir` that hold anything bertqa does not write (another tool's
/// or the user's): never removed or replaced.
pub fn foreign_dirs(dir: &Path) -> Vec<String> {
    run_contents(dir)
        .into_iter()
        .filter(|n| {
            let p = dir.join(n);
            // a checkpoint-N or best that is not a folder (a file of that name) is not bertqa's either
            let ours_a_folder = checkpoint_step(n).is_some() || n == "best";
            (p.is_dir() && !only_checkpoint_files(&p)) || (ours_a_folder && !p.is_dir())
        })
        .collect()
}

/// Remove what `bertqa train` writes in `dir` — `checkpoint-N/`, `best/`, [`RUN_FILES`] and the debris of
/// its saves — and nothing else (--overwrite-output-dir). Returns the names removed.
pub fn remove_run(dir: &Path) -> Result<Vec<String>> {
    let mut removed = clean_debris(dir)?;
    // a checkpoint-N/ or best/ holding anything bertqa does not write is not removed, nor is anything else
    let foreign = foreign_dirs(dir);
    if !foreign.is_empty() {
        bail!(
            "--overwrite-output-dir: {} in {} hold(s) files bertqa does not write (or are files where bertqa \
             writes folders): not removing anything; move them away first",
            foreign.join(", "),
            dir.display()
        );
    }
    for name in run_contents(dir) {
        let p = dir.join(&name);
        remove_any(&p).with_context(|| format!("removing {}", p.display()))?;
        removed.push(name);
    }
    Ok(removed)
}

/// `--resume CKPT` into the output directory `dir`: refused where it would mix two runs' files.
/// - CKPT in `dir` (`dir/checkpoint-K`) while `dir` holds later checkpoints: they are the future of the run
///   being continued from step K; the continuation would write its own beside them (and a later `--resume`
///   would pick theirs). Branching from step K goes into another directory.
/// - CKPT elsewhere while `dir` holds a run: that run's files would be mixed with the continued one's.
pub fn check_resume_target(dir: &Path, ckpt: &Path) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    // a bare `checkpoint-4` is in the current directory
    let parent = ckpt
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .map(canon);
    if parent.as_deref() == Some(canon(dir).as_path()) {
        let name = ckpt.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(k) = name.as_deref().and_then(checkpoint_step) {
            // every later checkpoint-N/, complete or not (a save of the continued run would replace it)
            let mut later: Vec<usize> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| checkpoint_step(&e.file_name().to_string_lossy()))
                .filter(|&s| s > k)
                .collect();
            later.sort_unstable();
            if !later.is_empty() {
                let steps: Vec<String> = later.iter().map(|s| format!("checkpoint-{s}")).collect();
                bail!(
                    "--resume {}: {} also holds later checkpoints of the same run ({}); continuing from step {k} \
                     here would mix two continuations of it. To branch from step {k}, resume into another \
                     --output-dir (e.g. {}-from-{k}); or move the later checkpoints away",
                    ckpt.display(),
                    dir.display(),
                    steps.join(", "),
                    dir.display()
                );
            }
        }
        return Ok(());
    }
    let held = run_contents(dir);
    if !held.is_empty() {
        bail!(
            "--resume {} continues a run from another directory, and --output-dir {} already holds a run ({}): \
             their files would be mixed; resume into an --output-dir that holds no run",
            ckpt.display(),
            dir.display(),
            held[..held.len().min(5)].join(", ")
        );
    }
    Ok(())
}

/// (step, path) of every complete `checkpoint-<step>` in `dir`.
pub fn list_checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = checkpoint_step(&name)?;
            is_complete(&e.path()).then_some((step, e.path()))
        })
        .collect()
}

/// The latest checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list_checkpoints(dir)
        .into_iter()
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// Everything needed to rebuild a trainer from a checkpoint.
pub struct Restored<B: Backend> {
    pub bcfg: crate::model::BertConfig,
    pub master: BertParams<B>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub state: TrainState,
    pub config: TrainConfig,
    pub precision: DType,
}

pub fn restore<B: Backend>(be: &B, ckpt: &Path) -> Result<Restored<B>> {
    let st_path = ckpt.join("trainer_state.json");
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&st_path)
            .with_context(|| format!("reading {}", st_path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", st_path.display()))?;
    // the dropout masks of the rest of the run must continue the stream the run started with
    let stream = st["dropout_stream"].as_u64().unwrap_or(1);
    if stream != crate::rng::DROPOUT_STREAM_VERSION as u64 {
        bail!(
            "{}: this run was written with dropout stream {stream}, this bertqa draws stream {} (src/rng.rs): \
             resuming would change the masks mid-run. Finish it with the bertqa that wrote it, or start a new \
             run from {} as --model (its weights; the optimizer state starts afresh)",
            st_path.display(),
            crate::rng::DROPOUT_STREAM_VERSION,
            ckpt.display()
        );
    }
    let state: TrainState = serde_path_to_error::deserialize(st["state"].clone())
        .map_err(|e| anyhow!("{}: state.{}: {}", st_path.display(), e.path(), e.inner()))?;
    let config: TrainConfig = serde_path_to_error::deserialize(st["config"].clone())
        .map_err(|e| anyhow!("{}: config.{}: {}", st_path.display(), e.path(), e.inner()))?;
    // the stored settings get the command line's checks: a hand-edited or corrupt file must not crash
    config
        .validate()
        .with_context(|| format!("{}: \"config\"", st_path.display()))?;
    let precision = DType::parse(st["precision"].as_str().unwrap_or("f32"))
        .with_context(|| format!("{}: \"precision\"", st_path.display()))?;
    let (bcfg, master, _) = mc::load(be, ckpt, DType::F32, 0)?;
    let opt = mc::read_safetensors(&ckpt.join("optimizer.safetensors"))?;
    let mut m = vec![];
    let mut v = vec![];
    for (name, shape) in param_specs(&bcfg) {
        let get = |k: String| -> Result<Vec<f32>> {
            let (s, vals) = opt.get(&k).ok_or_else(|| {
                anyhow!(
                    "{}: missing {k}",
                    ckpt.join("optimizer.safetensors").display()
                )
            })?;
            if *s != shape {
                bail!(
                    "{}: {k} has shape {s:?}, expected {shape:?}",
                    ckpt.display()
                );
            }
            Ok(vals.clone())
        };
        m.push(get(format!("m.{name}"))?);
        v.push(get(format!("v.{name}"))?);
    }
    Ok(Restored {
        bcfg,
        master,
        m,
        v,
        state,
        config,
        precision,
    })
}

/// Build a trainer from a restored checkpoint.
pub fn into_trainer<B: Backend>(be: &B, r: Restored<B>) -> Result<Trainer<'_, B>> {
    let mut tr = Trainer::new(be, r.bcfg, r.master, r.precision, r.config)?;
    for ((t, vals), u) in
        tr.m.tensors_mut()
            .into_iter()
            .zip(&r.m)
            .zip(tr.v.tensors_mut().into_iter().zip(&r.v))
    {
        t.copy_from_f64(be, &vals.iter().map(|&x| x as f64).collect::<Vec<_>>())?;
        let (vt, vv) = u;
        vt.copy_from_f64(be, &vv.iter().map(|&x| x as f64).collect::<Vec<_>>())?;
    }
    if let Some(s) = &r.state.scaler {
        tr.scaler = s.clone();
    }
    tr.state = r.state;
    Ok(tr)
}
