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

fn replace_dir(tmp: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        let old = dst.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dst, &old).with_context(|| format!("moving {} aside", dst.display()))?;
        std::fs::rename(tmp, dst)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, dst)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    }
    Ok(())
}

fn tmp_for(dst: &Path) -> PathBuf {
    let name = dst.file_name().and_then(|s| s.to_str()).unwrap_or("ckpt");
    dst.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Write the model (master weights) as an HF directory into a fresh temporary folder for `dst`; `extra` adds
/// more files there; then the folder replaces `dst` in one rename.
fn write_dir<B: Backend>(
    tr: &Trainer<B>,
    inp: &RunInputs,
    dst: &Path,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = tmp_for(dst);
    let _ = std::fs::remove_dir_all(&tmp);
    let raw = mc::raw_config(&inp.model_dir);
    mc::save(
        tr.be,
        &tmp,
        &tr.model.cfg,
        tr.master_params(),
        Some(&inp.model_dir),
        raw.as_ref(),
    )?;
    extra(&tmp)?;
    replace_dir(&tmp, dst)
}

/// Save the model (master weights) as an HF directory at `dst`, atomically.
pub fn save_model_dir<B: Backend>(tr: &Trainer<B>, inp: &RunInputs, dst: &Path) -> Result<()> {
    write_dir(tr, inp, dst, |_| Ok(()))
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

/// Save `checkpoint-<step>/` and prune old ones beyond `save_total_limit`.
pub fn save<B: Backend>(tr: &Trainer<B>, inp: &RunInputs) -> Result<()> {
    let dst = inp
        .output_dir
        .join(format!("checkpoint-{}", tr.state.global_step));
    write_dir(tr, inp, &dst, |tmp| {
        crate::util::write_atomic(&tmp.join("optimizer.safetensors"), &moments_bytes(tr)?)?;
        let st = serde_json::json!({"state": tr.state, "config": tr.cfg, "precision": tr.model.dtype().to_string(),
            "dropout_stream": crate::rng::DROPOUT_STREAM_VERSION});
        crate::util::write_atomic(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(&st)?.as_bytes(),
        )?;
        Ok(())
    })?;
    if tr.cfg.save_total_limit > 0 {
        let mut all = list_checkpoints(&inp.output_dir);
        all.sort();
        while all.len() > tr.cfg.save_total_limit {
            let (_, p) = all.remove(0);
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(())
}

/// (step, path) of every `checkpoint-<step>` in `dir`.
pub fn list_checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then_some((step, e.path()))
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
    let state: TrainState = serde_json::from_value(st["state"].clone())
        .with_context(|| format!("{}: bad \"state\"", st_path.display()))?;
    let config: TrainConfig = serde_json::from_value(st["config"].clone())
        .with_context(|| format!("{}: bad \"config\"", st_path.display()))?;
    let precision = DType::parse(st["precision"].as_str().unwrap_or("f32"))?;
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
