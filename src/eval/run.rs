//! Running a model over features and writing the official prediction files.

use crate::data::features::{Feature, FeatureCfg, WindowBuilder};
use crate::data::squad::Dataset;
use crate::data::tokenizer::WordPieceTokenizer;
use crate::eval::metrics;
use crate::eval::postprocess::{postprocess, PostCfg, Predictions, SpanAccumulator};
use crate::model::batch::{chunks_fitting, pack_bucketed, Padding};
use crate::model::bert::{BertQa, DropoutCfg};
use crate::model::ActPlan;
use crate::ops::Backend;
use anyhow::{anyhow, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// Per-feature start and end logits, each (T).
pub type SpanLogits = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// The start and end logits (full window length each; -1e4 past the rows a window took) of `feats`, in
/// batches that fit `plan` (at most its windows and rows) laid out as `padding` says. Padding rows are
/// masked, so the real tokens' logits do not depend on the layout.
pub fn plan_logits<B: Backend>(
    be: &B,
    model: &BertQa<B>,
    plan: &mut ActPlan<B>,
    feats: &[&Feature],
    padding: Padding,
) -> Result<SpanLogits> {
    let mut starts = Vec::with_capacity(feats.len());
    let mut ends = Vec::with_capacity(feats.len());
    for chunk in chunks_fitting(feats, padding, plan.max_windows(), plan.max_rows())? {
        let hb = pack_bucketed(chunk, 0, padding, be.row_bucket(), plan.max_rows())?;
        let (batch, acts) = plan.load(be, &hb)?;
        model.forward(be, acts, batch, DropoutCfg::OFF)?;
        let lg = acts.logits.to_f32_vec(be)?; // (N,2)
        for (b, f) in chunk.iter().enumerate() {
            let full = f.max_len;
            let (s0, rows) = (hb.layout.cu[b] as usize, hb.layout.rows(b));
            let mut s = vec![-1e4f32; full];
            let mut e = vec![-1e4f32; full];
            for j in 0..rows {
                s[j] = lg[(s0 + j) * 2];
                e[j] = lg[(s0 + j) * 2 + 1];
            }
            starts.push(s);
            ends.push(e);
        }
    }
    Ok((starts, ends))
}

/// The model's forward pass over batches of windows, with a forward-only activation plan of its own. The
/// plan is allocated at the first batch, for that batch's windows: a file with fewer windows than
/// `--batch-size` takes memory for the windows it has (it grows to `batch_size` if a larger batch comes).
pub struct WindowForward<'m, B: Backend> {
    model: &'m BertQa<B>,
    plan: Option<ActPlan<B>>,
    batch_size: usize,
    max_t: usize,
    padding: Padding,
}

impl<'m, B: Backend> WindowForward<'m, B> {
    /// For batches of up to `batch_size` windows of `max_t` tokens, laid out as `padding` says.
    pub fn new(
        model: &'m BertQa<B>,
        batch_size: usize,
        max_t: usize,
        padding: Padding,
    ) -> Result<Self> {
        let b = batch_size.max(1);
        b.checked_mul(max_t).with_context(|| {
            format!(
                "--batch-size {b}: {b} windows of {max_t} tokens are more rows than can be counted"
            )
        })?;
        Ok(WindowForward {
            model,
            plan: None,
            batch_size: b,
            max_t,
            padding,
        })
    }

    /// Start and end logits (full window length each) of one batch of windows.
    pub fn logits(&mut self, be: &B, chunk: &[&Feature]) -> Result<SpanLogits> {
        // sized for this batch, up to --batch-size (a larger one is cut into pieces that fit); a plan too
        // small for a later batch is freed before the larger one is allocated
        let b = chunk.len().clamp(1, self.batch_size);
        let plan = match self.plan.take() {
            Some(p) if p.max_windows() >= b => p,
            old => {
                if old.is_some() {
                    drop(old);
                    be.release_cached()?;
                }
                ActPlan::new(
                    be,
                    &self.model.cfg,
                    b * self.max_t,
                    b,
                    self.model.dtype(),
                    false,
                )?
            }
        };
        let plan = self.plan.insert(plan);
        plan_logits(be, self.model, plan, chunk, self.padding)
    }
}

/// Start and end logits of every feature (full window length each), `batch_size` windows at a time.
pub fn logits_for<B: Backend>(
    be: &B,
    model: &BertQa<B>,
    feats: &[Feature],
    batch_size: usize,
    padding: Padding,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<SpanLogits> {
    let mut starts = Vec::with_capacity(feats.len());
    let mut ends = Vec::with_capacity(feats.len());
    let max_t = feats.first().map_or(1, |f| f.max_len);
    let mut fwd = WindowForward::new(model, batch_size, max_t, padding)?;
    for chunk in feats.chunks(batch_size.max(1)) {
        let refs: Vec<&Feature> = chunk.iter().collect();
        let (s, e) = fwd.logits(be, &refs)?;
        starts.extend(s);
        ends.extend(e);
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok((starts, ends))
}

/// Paragraphs tokenized together (in parallel) by [`predict_streaming`]; bounded by their text size too.
const BLOCK_PARAGRAPHS: usize = 256;
const BLOCK_BYTES: usize = 8 << 20;

/// Predictions for a dataset, with memory bounded by a batch of windows rather than by the dataset: contexts
/// are tokenized a block of paragraphs at a time (each once), windows are built `batch_size` at a time and
/// their logits folded into each question's running n-best. The same batches, logits and answers as
/// `featurize` + [`predict`], which hold every window of the file at once (a 50 MB context: 44,000 windows).
/// Returns the predictions and the number of windows.
pub fn predict_streaming<B: Backend>(
    be: &B,
    model: &BertQa<B>,
    ds: &Dataset,
    tok: &WordPieceTokenizer,
    fcfg: &FeatureCfg,
    batch_size: usize,
    padding: Padding,
    post: &PostCfg,
    show_progress: bool,
) -> Result<(Predictions, usize)> {
    let pb = show_progress.then(|| {
        let pb = indicatif::ProgressBar::new(ds.examples.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "eval {bar:30} {pos}/{len} questions {per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let batch_size = batch_size.max(1);
    let mut out = Predictions::new();
    let mut fwd = WindowForward::new(model, batch_size, fcfg.max_seq_length, padding)?;
    let mut pending: Vec<Feature> = Vec::with_capacity(batch_size.min(1024));
    // examples (index, accumulator) whose windows are queued or done, in dataset order
    let mut open: std::collections::VecDeque<(usize, SpanAccumulator)> = Default::default();
    let mut total_windows = 0usize;
    let flush = |pending: &mut Vec<Feature>,
                 open: &mut std::collections::VecDeque<(usize, SpanAccumulator)>,
                 fwd: &mut WindowForward<B>|
     -> Result<()> {
        let refs: Vec<&Feature> = pending.iter().collect();
        let (s, e) = fwd.logits(be, &refs)?;
        for (k, f) in pending.iter().enumerate() {
            let slot = open
                .iter_mut()
                .find(|(i, _)| *i == f.example)
                .ok_or_else(|| anyhow!("window of an unknown example {}", f.example))?;
            slot.1.add_window(f, &s[k], &e[k], post);
        }
        pending.clear();
        Ok(())
    };
    let mut i = 0;
    while i < ds.examples.len() {
        // a block of whole paragraphs (examples of a paragraph are contiguous)
        let mut j = i;
        let (mut paras, mut bytes) = (0, 0);
        while j < ds.examples.len() && paras < BLOCK_PARAGRAPHS && (bytes < BLOCK_BYTES || j == i) {
            let p = ds.examples[j].paragraph;
            bytes += ds.examples[j].context.text.len();
            paras += 1;
            while j < ds.examples.len() && ds.examples[j].paragraph == p {
                j += 1;
            }
        }
        let block = &ds.examples[i..j];
        let mut ctx_texts: Vec<&str> = vec![];
        let mut ctx_idx = Vec::with_capacity(block.len());
        for (k, ex) in block.iter().enumerate() {
            if k == 0 || ex.paragraph != block[k - 1].paragraph {
                ctx_texts.push(ex.context.text.as_str());
            }
            ctx_idx.push(ctx_texts.len() - 1);
        }
        let ctx_enc = tok.encode_batch(&ctx_texts)?;
        let q_texts: Vec<&str> = block.iter().map(|e| e.question.as_str()).collect();
        let q_enc = tok.encode_batch(&q_texts)?;
        for (k, ex) in block.iter().enumerate() {
            let ei = i + k;
            let wb = WindowBuilder::new(ei, ex, &q_enc[k], &ctx_enc[ctx_idx[k]], fcfg, false)
                .with_context(|| format!("question {:?}", ex.id))?;
            open.push_back((ei, SpanAccumulator::new()));
            for (ws, we) in wb.windows() {
                pending.push(wb.feature(tok, ws, we));
                total_windows += 1;
                if pending.len() == batch_size {
                    flush(&mut pending, &mut open, &mut fwd)?;
                    // every example before the last queued one is complete
                    while open.len() > 1 {
                        let (d, acc) = open.pop_front().expect("non-empty");
                        acc.finish(&ds.examples[d], post, &mut out);
                        if let Some(pb) = &pb {
                            pb.inc(1);
                        }
                    }
                }
            }
        }
        i = j;
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut open, &mut fwd)?;
    }
    for (d, acc) in open {
        acc.finish(&ds.examples[d], post, &mut out);
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok((out, total_windows))
}

/// Write predictions.json (id → text), nbest_predictions.json and, for v2.0, null_odds.json, atomically and
/// together ([`crate::util::write_atomic_all`]).
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
    // the files of one evaluation replace the previous ones together or not at all
    let (answers, nbest) = (
        serde_json::to_string_pretty(&answers)?,
        serde_json::to_string_pretty(&nbest)?,
    );
    let odds = serde_json::to_string_pretty(&odds)?;
    let (p_answers, p_nbest, p_odds) = (
        dir.join("predictions.json"),
        dir.join("nbest_predictions.json"),
        dir.join("null_odds.json"),
    );
    let mut files: Vec<(&Path, &[u8])> = vec![
        (&p_answers, answers.as_bytes()),
        (&p_nbest, nbest.as_bytes()),
    ];
    if version_2 {
        files.push((&p_odds, odds.as_bytes()));
    }
    crate::util::write_atomic_all(&files)?;
    // a v1.1 evaluation into a folder holding an earlier v2.0 one's null odds: they are not of these
    // predictions
    if !version_2 && p_odds.is_file() {
        std::fs::remove_file(&p_odds)
            .with_context(|| format!("removing {} (of an earlier evaluation)", p_odds.display()))?;
        crate::say!(
            "note: removed {} (of an earlier SQuAD v2.0 evaluation: not of these predictions)",
            p_odds.display()
        );
    }
    Ok(())
}

/// Whether to score `ds` as SQuAD v2.0: `flag` (--version-2-with-negative), or the file itself says so
/// ([`Dataset::is_v2`]: version 2.x, or questions marked is_impossible) — then a note on stderr says that it
/// is scored as v2.0. `bertqa score`, `eval` and `train` (its dev file) all decide this way.
pub fn resolve_version_2(ds: &Dataset, origin: &Path, flag: bool) -> bool {
    if flag {
        return true;
    }
    if ds.is_v2() {
        let n = ds.examples.iter().filter(|e| e.is_impossible).count();
        crate::say!(
            "note: {} is SQuAD v2.0 (version {:?}, {n} questions marked is_impossible): scoring as v2.0 \
             (as with --version-2-with-negative)",
            origin.display(),
            ds.version.as_deref().unwrap_or("not given")
        );
        return true;
    }
    false
}

/// Metrics of predictions against a dataset, as the JSON the commands print.
pub fn score(
    ds: &Dataset,
    answers: &HashMap<String, String>,
    na: Option<&metrics::NaProbs>,
    version_2: bool,
) -> serde_json::Value {
    let gold = metrics::gold_of(ds);
    if version_2 {
        // the keys the official v2.0 script prints: HasAns_*/NoAns_* only where there are such questions,
        // the best-threshold figures only with null odds (its --na-prob-file)
        let s = metrics::evaluate_v2(&gold, answers, na);
        let mut m = serde_json::json!({"exact": s.exact, "f1": s.f1, "total": s.total});
        let o = m.as_object_mut().expect("an object");
        if s.has_ans_total > 0 {
            o.insert("HasAns_exact".into(), s.has_ans_exact.into());
            o.insert("HasAns_f1".into(), s.has_ans_f1.into());
            o.insert("HasAns_total".into(), s.has_ans_total.into());
        }
        if s.no_ans_total > 0 {
            o.insert("NoAns_exact".into(), s.no_ans_exact.into());
            o.insert("NoAns_f1".into(), s.no_ans_f1.into());
            o.insert("NoAns_total".into(), s.no_ans_total.into());
        }
        if na.is_some_and(|n| n.sweep) {
            o.insert("best_exact".into(), s.best_exact.into());
            o.insert("best_exact_thresh".into(), s.best_exact_thresh.into());
            o.insert("best_f1".into(), s.best_f1.into());
            o.insert("best_f1_thresh".into(), s.best_f1_thresh.into());
        }
        m
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
    padding: Padding,
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
    let (s, e) = logits_for(be, model, feats, batch_size, padding, pb.as_ref())?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(postprocess(ds, feats, &s, &e, post))
}
