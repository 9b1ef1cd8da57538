//! Running a model over features and writing the official prediction files.

use crate::data::features::Feature;
use crate::data::squad::Dataset;
use crate::eval::metrics;
use crate::eval::postprocess::{postprocess, PostCfg, Predictions};
use crate::model::bert::{Acts, Batch, BertQa, DropoutCfg};
use crate::ops::Backend;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// Per-feature start and end logits, each (T).
pub type SpanLogits = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Start and end logits of every feature (length T each). Batches are trimmed to their longest window
/// (rounded up to 32): the padded positions are masked, so the logits of real tokens are unchanged.
pub fn logits_for<B: Backend>(
    be: &B,
    model: &BertQa<B>,
    feats: &[Feature],
    batch_size: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<SpanLogits> {
    let mut starts = Vec::with_capacity(feats.len());
    let mut ends = Vec::with_capacity(feats.len());
    let mut acts_cache: Option<Acts<B>> = None;
    for chunk in feats.chunks(batch_size.max(1)) {
        let full_t = chunk[0].input_ids.len();
        let refs: Vec<&Feature> = chunk.iter().collect();
        let pk = crate::data::features::pack(&refs, Some(32));
        let (b, t) = (chunk.len(), pk.t);
        let batch = Batch::new(be, b, t, &pk.ids, &pk.types, &pk.mask, &[], &[])?;
        let reuse = matches!(&acts_cache, Some(a) if a.b == b && a.t == t);
        if !reuse {
            drop(acts_cache.take()); // free the old buffers first
            acts_cache = Some(Acts::new(be, &model.cfg, b, t, model.dtype())?);
        }
        let acts = acts_cache.as_mut().expect("set above");
        model.forward(be, acts, &batch, DropoutCfg::OFF)?;
        let lg = acts.logits.to_f32_vec(be)?;
        for bi in 0..b {
            let mut s = vec![-1e4f32; full_t];
            let mut e = vec![-1e4f32; full_t];
            for j in 0..t {
                s[j] = lg[(bi * t + j) * 2];
                e[j] = lg[(bi * t + j) * 2 + 1];
            }
            starts.push(s);
            ends.push(e);
        }
        if let Some(pb) = progress {
            pb.inc(b as u64);
        }
    }
    Ok((starts, ends))
}

/// Write predictions.json (id → text), nbest_predictions.json and, for v2.0, null_odds.json, atomically.
pub fn write_predictions(dir: &Path, p: &Predictions, version_2: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut answers = serde_json::Map::new();
    let mut nbest = serde_json::Map::new();
    let mut odds = serde_json::Map::new();
    for id in &p.order {
        answers.insert(id.clone(), serde_json::Value::String(p.answers[id].clone()));
        nbest.insert(id.clone(), serde_json::to_value(&p.nbest[id])?);
        if let Some(o) = p.null_odds.get(id) {
            odds.insert(id.clone(), serde_json::json!(o));
        }
    }
    crate::util::write_atomic(
        &dir.join("predictions.json"),
        serde_json::to_string_pretty(&answers)?.as_bytes(),
    )?;
    crate::util::write_atomic(
        &dir.join("nbest_predictions.json"),
        serde_json::to_string_pretty(&nbest)?.as_bytes(),
    )?;
    if version_2 {
        crate::util::write_atomic(
            &dir.join("null_odds.json"),
            serde_json::to_string_pretty(&odds)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Metrics of predictions against a dataset, as the JSON the commands print.
pub fn score(
    ds: &Dataset,
    answers: &HashMap<String, String>,
    null_odds: Option<&HashMap<String, f64>>,
    version_2: bool,
) -> serde_json::Value {
    let gold = metrics::gold_of(ds);
    if version_2 {
        serde_json::to_value(metrics::evaluate_v2(&gold, answers, null_odds)).unwrap_or_default()
    } else {
        let s = metrics::evaluate_v1(&gold, answers);
        serde_json::json!({"exact_match": s.exact_match, "f1": s.f1})
    }
}

/// Features → logits → predictions for a dataset.
pub fn predict<B: Backend>(
    be: &B,
    model: &BertQa<B>,
    ds: &Dataset,
    feats: &[Feature],
    batch_size: usize,
    post: &PostCfg,
    show_progress: bool,
) -> Result<Predictions> {
    let pb = if show_progress {
        let pb = indicatif::ProgressBar::new(feats.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "eval {bar:30} {pos}/{len} windows {per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let (s, e) = logits_for(be, model, feats, batch_size, pb.as_ref())?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(postprocess(ds, feats, &s, &e, post))
}
