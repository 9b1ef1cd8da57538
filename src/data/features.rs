//! Features: `[CLS] question [SEP] context-window [SEP]` with token types 0/1, per-token code-point offsets
//! into the context (context tokens only) and the training labels. A window holds its real tokens only: the
//! padding (and so the attention mask) exists only in the batch layouts that pad (src/model/batch.rs), which
//! read the length each window was cut for from `max_len`.
//!
//! The question is truncated to `max_query_length` tokens; the context is split into windows of at most
//! `max_seq_length − len(question) − 3` tokens, consecutive windows overlapping by `doc_stride` tokens (the
//! semantics of Hugging Face's `run_qa.py`, `stride=doc_stride`). Labels: the answer's first and last token
//! in the window, or (0, 0) — \[CLS\] — when the answer is not wholly inside the window (v1.1) or the question is
//! impossible (v2.0). Each paragraph's context is tokenized once and shared by its questions.

use crate::data::squad::{Dataset, Example};
use crate::data::tokenizer::{Encoded, WordPieceTokenizer};
use anyhow::{anyhow, bail, Result};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct FeatureCfg {
    pub max_seq_length: usize,
    pub doc_stride: usize,
    pub max_query_length: usize,
}

impl Default for FeatureCfg {
    fn default() -> Self {
        FeatureCfg {
            max_seq_length: 384,
            doc_stride: 128,
            max_query_length: 64,
        }
    }
}

/// One window of one example: its L real tokens (L ≤ `max_len`), no padding.
#[derive(Clone, Debug, PartialEq)]
pub struct Feature {
    /// index into Dataset::examples
    pub example: usize,
    /// (L)
    pub input_ids: Vec<i32>,
    /// (L)
    pub token_type_ids: Vec<i32>,
    /// (L) code-point span in the context of each token; None outside the context window
    pub offsets: Vec<Option<(usize, usize)>>,
    /// the length the window was cut for (`max_seq_length`): its rows in the `max` padding layout, the
    /// length of its logits; every window of a batch has the same
    pub max_len: usize,
    pub start_position: i64,
    pub end_position: i64,
    /// whether the answer lies wholly inside this window (false: labels are 0, 0)
    pub has_answer: bool,
}

impl Feature {
    /// Real tokens (L).
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// A window given as Hugging Face's padded arrays, all of one length (`max_len`): ids, token types and
    /// the attention mask. Its real tokens are those up to the mask's last 1 (at least one); no offsets;
    /// `has_answer` when a label is not \[CLS\] (0, 0), the only label featurization gives a window without
    /// the answer.
    pub fn from_padded(
        example: usize,
        ids: &[i32],
        types: &[i32],
        mask: &[i32],
        (start_position, end_position): (i64, i64),
    ) -> Result<Feature> {
        if types.len() != ids.len() || mask.len() != ids.len() || ids.is_empty() {
            bail!(
                "window of example {example}: input_ids ({}), token_type_ids ({}) and attention_mask ({}) \
                 must have one non-zero length",
                ids.len(),
                types.len(),
                mask.len()
            );
        }
        let l = mask.iter().rposition(|&m| m != 0).map_or(1, |p| p + 1);
        Ok(Feature {
            example,
            input_ids: ids[..l].to_vec(),
            token_type_ids: types[..l].to_vec(),
            offsets: vec![None; l],
            max_len: ids.len(),
            start_position,
            end_position,
            has_answer: start_position != 0 || end_position != 0,
        })
    }
}

pub struct Featurized {
    pub features: Vec<Feature>,
    /// examples (by index) with at least one window containing the answer
    pub answerable_in_window: usize,
    /// with labels: the examples (by index) whose answer covers no token of the context — text the
    /// tokenizer drops (control and format characters such as U+001C or a zero-width space, combining
    /// marks under accent stripping): no span could be their label, so their windows are unlabelled
    pub answer_without_tokens: Vec<usize>,
}

/// The windows (start, end) in context-token indices.
pub fn windows(n_ctx: usize, max_ctx: usize, doc_stride: usize) -> Vec<(usize, usize)> {
    let step = max_ctx.saturating_sub(doc_stride).max(1);
    let mut out = vec![];
    let mut s = 0;
    loop {
        let e = (s + max_ctx).min(n_ctx);
        out.push((s, e));
        if e >= n_ctx {
            break;
        }
        s += step;
    }
    out
}

/// The windows of one example, built one at a time (a long context has many: they need not all exist at
/// once).
pub struct WindowBuilder<'a> {
    ex_idx: usize,
    q: &'a [i32],
    ctx: &'a Encoded,
    t: usize,
    max_ctx: usize,
    doc_stride: usize,
    /// the answer's code-point span, when labels are wanted
    span: Option<(usize, usize)>,
    /// labels were wanted, but the answer covers no context token
    answer_without_tokens: bool,
}

impl<'a> WindowBuilder<'a> {
    pub fn new(
        ex_idx: usize,
        ex: &Example,
        q: &'a Encoded,
        ctx: &'a Encoded,
        cfg: &FeatureCfg,
        training: bool,
    ) -> Result<Self> {
        let t = cfg.max_seq_length;
        let qlen = q.ids.len().min(cfg.max_query_length);
        if qlen + 3 >= t {
            bail!(
                "max_seq_length {t} leaves no room for the context after a {qlen}-token question"
            );
        }
        let mut span = if training && !ex.is_impossible && ex.answer_aligned {
            ex.answers
                .first()
                .map(|a| (a.start, a.start + a.text.chars().count()))
        } else {
            None
        };
        // an answer made of characters the tokenizer drops has no token to point at (the search below would
        // label the tokens around it)
        let answer_without_tokens =
            span.is_some_and(|(a_s, a_e)| !ctx.offsets.iter().any(|&(s, e)| s < a_e && e > a_s));
        if answer_without_tokens {
            span = None;
        }
        Ok(WindowBuilder {
            ex_idx,
            q: &q.ids[..qlen],
            ctx,
            t,
            max_ctx: t - qlen - 3,
            doc_stride: cfg.doc_stride,
            span,
            answer_without_tokens,
        })
    }

    /// Labels were wanted, but the answer covers no token of the context (see [`Featurized`]).
    pub fn answer_without_tokens(&self) -> bool {
        self.answer_without_tokens
    }

    /// The windows (start, end) in context-token indices.
    pub fn windows(&self) -> Vec<(usize, usize)> {
        windows(self.ctx.ids.len(), self.max_ctx, self.doc_stride)
    }

    /// The feature of the window [ws, we) of context tokens.
    pub fn feature(&self, tok: &WordPieceTokenizer, ws: usize, we: usize) -> Feature {
        let (t, ctx) = (self.t, self.ctx);
        let l = self.q.len() + (we - ws) + 3;
        let mut ids = Vec::with_capacity(l);
        let mut types = Vec::with_capacity(l);
        let mut offsets = Vec::with_capacity(l);
        ids.push(tok.cls);
        types.push(0);
        offsets.push(None);
        for &id in self.q {
            ids.push(id);
            types.push(0);
            offsets.push(None);
        }
        ids.push(tok.sep);
        types.push(0);
        offsets.push(None);
        let ctx_start = ids.len();
        for i in ws..we {
            ids.push(ctx.ids[i]);
            types.push(1);
            offsets.push(Some(ctx.offsets[i]));
        }
        ids.push(tok.sep);
        types.push(1);
        offsets.push(None);
        let (mut sp, mut ep, mut has) = (0i64, 0i64, false);
        if let Some((a_s, a_e)) = self.span {
            if we > ws && ctx.offsets[ws].0 <= a_s && ctx.offsets[we - 1].1 >= a_e {
                // last token starting at or before the answer start; first token ending at or after its end
                let mut s_tok = ws;
                while s_tok + 1 < we && ctx.offsets[s_tok + 1].0 <= a_s {
                    s_tok += 1;
                }
                let mut e_tok = we - 1;
                while e_tok > s_tok && ctx.offsets[e_tok - 1].1 >= a_e {
                    e_tok -= 1;
                }
                sp = (ctx_start + s_tok - ws) as i64;
                ep = (ctx_start + e_tok - ws) as i64;
                has = true;
            }
        }
        Feature {
            example: self.ex_idx,
            input_ids: ids,
            token_type_ids: types,
            offsets,
            max_len: t,
            start_position: sp,
            end_position: ep,
            has_answer: has,
        }
    }
}

/// Tokenize a dataset (each paragraph once) and build all features. `training` adds labels.
pub fn featurize(
    ds: &Dataset,
    tok: &WordPieceTokenizer,
    cfg: &FeatureCfg,
    training: bool,
) -> Result<Featurized> {
    // one encoding per paragraph (examples of a paragraph are contiguous in the file)
    let mut para_first: Vec<usize> = vec![usize::MAX; ds.num_paragraphs];
    for (i, ex) in ds.examples.iter().enumerate() {
        if para_first[ex.paragraph] == usize::MAX {
            para_first[ex.paragraph] = i;
        }
    }
    let used: Vec<usize> = (0..ds.num_paragraphs)
        .filter(|&p| para_first[p] != usize::MAX)
        .collect();
    let ctx_texts: Vec<&str> = used
        .iter()
        .map(|&p| ds.examples[para_first[p]].context.text.as_str())
        .collect();
    let ctx_enc = tok.encode_batch(&ctx_texts)?;
    let mut ctx_of_para: Vec<Option<usize>> = vec![None; ds.num_paragraphs];
    for (k, &p) in used.iter().enumerate() {
        ctx_of_para[p] = Some(k);
    }
    let q_texts: Vec<&str> = ds.examples.iter().map(|e| e.question.as_str()).collect();
    let q_enc = tok.encode_batch(&q_texts)?;
    // the windows of each example on the rayon pool, gathered in example order (the same features as one
    // thread builds: each example's windows depend on that example alone); an error is the first example's
    let per_example: Vec<Result<(Vec<Feature>, bool)>> = ds
        .examples
        .par_iter()
        .enumerate()
        .map(|(i, ex)| {
            let ctx = ctx_of_para[ex.paragraph]
                .map(|k| &ctx_enc[k])
                .ok_or_else(|| {
                    anyhow!(
                        "example {i}: its paragraph {} was not encoded",
                        ex.paragraph
                    )
                })?;
            let wb = WindowBuilder::new(i, ex, &q_enc[i], ctx, cfg, training)?;
            let feats = wb
                .windows()
                .into_iter()
                .map(|(ws, we)| wb.feature(tok, ws, we))
                .collect();
            Ok((feats, wb.answer_without_tokens()))
        })
        .collect();
    let per_example = per_example.into_iter().collect::<Result<Vec<_>>>()?;
    let answerable = per_example
        .iter()
        .filter(|(f, _)| f.iter().any(|x| x.has_answer))
        .count();
    let answer_without_tokens = (0..per_example.len())
        .filter(|&i| per_example[i].1)
        .collect();
    let mut features = Vec::with_capacity(per_example.iter().map(|(f, _)| f.len()).sum());
    for (f, _) in per_example {
        features.extend(f);
    }
    Ok(Featurized {
        features,
        answerable_in_window: answerable,
        answer_without_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_padded_keeps_the_real_tokens_and_the_length() {
        let f = Feature::from_padded(
            3,
            &[101, 7, 102, 8, 102, 0, 0],
            &[0, 0, 0, 1, 1, 0, 0],
            &[1, 1, 1, 1, 1, 0, 0],
            (3, 3),
        )
        .unwrap();
        assert_eq!(f.input_ids, [101, 7, 102, 8, 102]);
        assert_eq!(f.token_type_ids, [0, 0, 0, 1, 1]);
        assert_eq!((f.len(), f.max_len, f.offsets.len()), (5, 7, 5));
        assert!(f.has_answer);
        // no real token: the first row stands in (a window has at least one)
        let g = Feature::from_padded(0, &[5, 0], &[0, 0], &[0, 0], (0, 0)).unwrap();
        assert_eq!((g.input_ids, g.max_len, g.has_answer), (vec![5], 2, false));
        let e = Feature::from_padded(9, &[1, 2, 3], &[0, 0], &[1, 1, 1], (0, 0)).unwrap_err();
        assert!(
            e.to_string().contains("example 9") && e.to_string().contains("token_type_ids (2)"),
            "{e}"
        );
        assert!(Feature::from_padded(0, &[], &[], &[], (0, 0)).is_err());
    }
}
