//! From start/end logits to answer texts (the procedure of Hugging Face's `postprocess_qa_predictions`).
//!
//! Per example, over all its windows: the `n_best_size` highest start and end logits; valid spans only (both
//! tokens inside the context, end ≥ start, length ≤ `max_answer_length`); score = start + end logit; the
//! answer is the original context substring given by the character offsets. v2.0: the null score is the
//! \[CLS\] start + end logit (the minimum over windows; the first window of equal score), the answer is ""
//! when null − best non-null > `null_score_diff_threshold`, and the n-best list holds the null as an entry
//! of its own (text "", ranked by its score, added back last when the cut dropped it), the probabilities
//! normalised over that list — as transformers' n-best. No valid span: the answer is "" (transformers
//! writes the text "empty"), the null odds are the null score minus 0 (transformers' placeholder score).

use crate::data::features::Feature;
use crate::data::squad::{Dataset, Example};
use serde::Serialize;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug)]
pub struct PostCfg {
    pub n_best_size: usize,
    pub max_answer_length: usize,
    pub version_2: bool,
    pub null_score_diff_threshold: f64,
}

impl Default for PostCfg {
    fn default() -> Self {
        PostCfg {
            n_best_size: 20,
            max_answer_length: 30,
            version_2: false,
            null_score_diff_threshold: 0.0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct NBest {
    pub text: String,
    pub start_logit: f64,
    pub end_logit: f64,
    pub probability: f64,
    /// code-point span in the context
    pub char_start: usize,
    pub char_end: usize,
    /// the v2.0 null entry (\[CLS\]), or the placeholder of an example with no valid span
    #[serde(skip)]
    pub is_null: bool,
}

pub struct Predictions {
    /// id → answer text (the official predictions.json)
    pub answers: HashMap<String, String>,
    /// id → n-best list, best first
    pub nbest: HashMap<String, Vec<NBest>>,
    /// id → null score − best non-null score (v2.0 null_odds.json)
    pub null_odds: HashMap<String, f64>,
    /// ids in dataset order
    pub order: Vec<String>,
    /// ids whose windows held no valid span (their n-best is a single empty placeholder)
    pub no_valid_span: Vec<String>,
}

impl Predictions {
    pub fn new() -> Self {
        Predictions {
            answers: HashMap::new(),
            nbest: HashMap::new(),
            null_odds: HashMap::new(),
            order: vec![],
            no_valid_span: vec![],
        }
    }
}

impl Predictions {
    /// The null odds (v2.0) as the metrics' no-answer values, in dataset order, with no threshold: the
    /// scores are those of predictions.json as written (the null-score threshold already chose its "").
    pub fn na_probs(&self) -> crate::eval::metrics::NaProbs {
        crate::eval::metrics::NaProbs {
            values: self
                .order
                .iter()
                .filter_map(|id| self.null_odds.get(id).map(|v| (id.clone(), *v)))
                .collect(),
            thresh: None,
            sweep: true,
        }
    }
}

impl Default for Predictions {
    fn default() -> Self {
        Self::new()
    }
}

fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap_or(std::cmp::Ordering::Equal));
    idx.truncate(k);
    idx
}

/// score, start logit, end logit, char start, char end
type Cand = (f64, f64, f64, usize, usize);

/// The running n-best of one example over its windows, which may arrive one batch at a time: keeping the
/// best `n_best_size` after each window gives the same list as sorting all windows' candidates at the end
/// (stable sort, so ties keep window order either way).
pub struct SpanAccumulator {
    cands: Vec<Cand>,
    /// the lowest \[CLS\] start + end logit over the windows: (score, start logit, end logit)
    null: Option<(f64, f64, f64)>,
    windows: usize,
}

impl Default for SpanAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl SpanAccumulator {
    pub fn new() -> Self {
        SpanAccumulator {
            cands: vec![],
            null: None,
            windows: 0,
        }
    }

    /// Fold in one window: its feature and start/end logits (its real tokens first; any positions past
    /// them — padding of a `longest` or `max` batch — are ignored, so the n-best lists and the answers do not
    /// depend on how the windows were batched; the training loss leaves padding out the same way).
    pub fn add_window(&mut self, f: &Feature, sl: &[f32], el: &[f32], cfg: &PostCfg) {
        self.windows += 1;
        let (ns, ne) = (sl[0] as f64, el[0] as f64);
        // strictly lower: the first window keeps a tie (transformers' min_null_prediction)
        if self.null.is_none_or(|(score, _, _)| ns + ne < score) {
            self.null = Some((ns + ne, ns, ne));
        }
        let real = f.len();
        let si = top_k(&sl[..real.min(sl.len())], cfg.n_best_size);
        let eix = top_k(&el[..real.min(el.len())], cfg.n_best_size);
        for &s in &si {
            for &e in &eix {
                let (Some(os), Some(oe)) = (
                    f.offsets.get(s).copied().flatten(),
                    f.offsets.get(e).copied().flatten(),
                ) else {
                    continue;
                };
                if e < s || e - s + 1 > cfg.max_answer_length {
                    continue;
                }
                self.cands.push((
                    sl[s] as f64 + el[e] as f64,
                    sl[s] as f64,
                    el[e] as f64,
                    os.0,
                    oe.1,
                ));
            }
        }
        self.cands
            .sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
        self.cands.truncate(cfg.n_best_size);
    }

    /// The example's answer, n-best list and (v2.0) null odds, into `out`. Nothing when no window was added.
    pub fn finish(self, ex: &Example, cfg: &PostCfg, out: &mut Predictions) {
        if self.windows == 0 {
            return; // not featurized (e.g. --max-examples)
        }
        let cands = self.cands;
        let mut nb: Vec<NBest> = cands
            .iter()
            .map(|&(_, s, e, cs, ce)| NBest {
                text: ex.context.slice(cs, ce).to_string(),
                start_logit: s,
                end_logit: e,
                probability: 0.0,
                char_start: cs,
                char_end: ce,
                is_null: false,
            })
            .collect();
        let null = self.null.filter(|_| cfg.version_2).map(|(_, s, e)| NBest {
            text: String::new(),
            start_logit: s,
            end_logit: e,
            probability: 0.0,
            char_start: 0,
            char_end: 0,
            is_null: true,
        });
        if let Some(null) = null.clone() {
            // ranked among the spans (after those of equal score), cut to n_best, added back if cut
            let score = null.start_logit + null.end_logit;
            let at = nb
                .iter()
                .position(|n| n.start_logit + n.end_logit < score)
                .unwrap_or(nb.len());
            nb.insert(at, null.clone());
            nb.truncate(cfg.n_best_size.max(1));
            if !nb.iter().any(|n| n.is_null) {
                nb.push(null);
            }
        }
        if cands.is_empty() {
            out.no_valid_span.push(ex.id.clone());
            if null.is_none() {
                nb.push(NBest {
                    text: String::new(),
                    start_logit: 0.0,
                    end_logit: 0.0,
                    probability: 1.0,
                    char_start: 0,
                    char_end: 0,
                    is_null: true,
                });
            }
        }
        let best = nb
            .iter()
            .map(|n| n.start_logit + n.end_logit)
            .fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = nb
            .iter()
            .map(|n| (n.start_logit + n.end_logit - best).exp())
            .sum();
        for n in nb.iter_mut() {
            n.probability = (n.start_logit + n.end_logit - best).exp() / z;
        }
        let answer = match (cfg.version_2, cands.first()) {
            (false, Some(_)) => nb[0].text.clone(),
            (false, None) => String::new(),
            (true, best) => {
                // no valid span: transformers' placeholder scores 0
                let best_non_null = best.map_or(0.0, |c| c.0);
                let null_score = self.null.map_or(0.0, |(score, _, _)| score);
                let diff = null_score - best_non_null;
                out.null_odds.insert(ex.id.clone(), diff);
                match best {
                    Some(_) if diff <= cfg.null_score_diff_threshold => nb
                        .iter()
                        .find(|n| !n.is_null)
                        .map_or(String::new(), |n| n.text.clone()),
                    _ => String::new(),
                }
            }
        };
        out.answers.insert(ex.id.clone(), answer);
        out.nbest.insert(ex.id.clone(), nb);
        out.order.push(ex.id.clone());
    }
}

/// `start`/`end` logits per feature, each of length T, aligned with `features`.
pub fn postprocess(
    ds: &Dataset,
    features: &[Feature],
    start: &[Vec<f32>],
    end: &[Vec<f32>],
    cfg: &PostCfg,
) -> Predictions {
    let mut acc: Vec<SpanAccumulator> = (0..ds.examples.len())
        .map(|_| SpanAccumulator::new())
        .collect();
    for (i, f) in features.iter().enumerate() {
        acc[f.example].add_window(f, &start[i], &end[i], cfg);
    }
    let mut out = Predictions::new();
    for (a, ex) in acc.into_iter().zip(&ds.examples) {
        a.finish(ex, cfg, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One example whose context is "abc def ghi"; a window of 6 positions: [CLS], a question token,
    /// the three words, [SEP].
    fn example() -> (Dataset, Feature) {
        let js = serde_json::json!({"version": "v2.0", "data": [{"title": "t", "paragraphs": [{
            "context": "abc def ghi",
            "qas": [{"id": "q", "question": "?", "answers": [], "is_impossible": true}]}]}]});
        let ds = Dataset::parse(&js.to_string(), "t").unwrap();
        let f = Feature {
            example: 0,
            input_ids: vec![0; 6],
            token_type_ids: vec![0; 6],
            offsets: vec![None, None, Some((0, 3)), Some((4, 7)), Some((8, 11)), None],
            max_len: 6,
            start_position: 0,
            end_position: 0,
            has_answer: false,
        };
        (ds, f)
    }

    fn finish(
        ds: &Dataset,
        windows: &[(Feature, Vec<f32>, Vec<f32>)],
        cfg: &PostCfg,
    ) -> Predictions {
        let mut acc = SpanAccumulator::new();
        for (f, s, e) in windows {
            acc.add_window(f, s, e, cfg);
        }
        let mut out = Predictions::new();
        acc.finish(&ds.examples[0], cfg, &mut out);
        out
    }

    /// transformers' tie rules: the null after spans of equal score (its prelim list appends the null
    /// last and sorts stably), and the first window's null among equal ones (a strict `>`).
    #[test]
    fn v2_ties_follow_transformers() {
        let (ds, f) = example();
        let v2 = PostCfg {
            version_2: true,
            n_best_size: 3,
            ..PostCfg::default()
        };
        // the span "def" (1 + 1) ties with the null (1 + 1)
        let (mut s, mut e) = (vec![-9.0f32; 6], vec![-9.0f32; 6]);
        s[0] = 1.0;
        e[0] = 1.0;
        s[3] = 1.0;
        e[3] = 1.0;
        let p = finish(&ds, &[(f.clone(), s.clone(), e.clone())], &v2);
        let nb = &p.nbest["q"];
        assert_eq!((nb[0].text.as_str(), nb[0].is_null), ("def", false));
        assert!(nb[1].is_null && nb[1].text.is_empty());
        // diff 0 is not above the threshold 0: the span is the answer
        assert_eq!((p.answers["q"].as_str(), p.null_odds["q"]), ("def", 0.0));
        // two windows whose nulls tie (1.5 + 0.5 and 0.5 + 1.5): the first one's logits are kept
        let (mut s2, mut e2) = (s.clone(), e.clone());
        s[0] = 1.5;
        e[0] = 0.5;
        s2[0] = 0.5;
        e2[0] = 1.5;
        let p = finish(&ds, &[(f.clone(), s, e), (f.clone(), s2, e2)], &v2);
        let null = p.nbest["q"].iter().find(|n| n.is_null).unwrap();
        assert_eq!((null.start_logit, null.end_logit), (1.5, 0.5));
    }

    /// v1.1 lists no null, whatever [CLS] scores.
    #[test]
    fn v1_lists_no_null() {
        let (ds, f) = example();
        let (mut s, mut e) = (vec![-9.0f32; 6], vec![-9.0f32; 6]);
        s[0] = 9.0;
        e[0] = 9.0;
        s[2] = 1.0;
        e[4] = 1.0;
        let p = finish(&ds, &[(f, s, e)], &PostCfg::default());
        assert!(p.nbest["q"].iter().all(|n| !n.is_null));
        assert_eq!(p.answers["q"], "abc def ghi");
        assert!(p.null_odds.is_empty());
    }
}
