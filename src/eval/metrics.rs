//! Exact Match and F1 exactly as the official SQuAD evaluation scripts define them
//! (evaluate-v1.1.py and evaluate-v2.0.py):
//! normalize = lower-case → drop ASCII punctuation (`string.punctuation`) → replace `\b(a|an|the)\b` with a
//! space → collapse whitespace (`' '.join(s.split())`, Python's definition of whitespace); EM is equality of
//! normalized strings; F1 is over the bags of normalized tokens; both maxed over the gold answers, ×100,
//! a missing prediction scores 0. v1.1 gives F1 = 0 when there is no common token; v2.0 scores an empty
//! prediction against an empty gold (unanswerable) as 1.

use std::collections::HashMap;

/// Python's `str.isspace()`.
pub fn py_isspace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\x0b' | '\x0c' | '\r' | '\x1c'..='\x1f' | ' ' | '\u{85}' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// A word character for Python's `re` `\b` on str patterns: `str.isalnum()` or underscore, i.e. a letter
/// or a number by general category (L*, N*). Not Rust's `is_alphanumeric`, whose Alphabetic property also
/// takes combining vowel signs (U+093E) and circled letters (U+24B6): beside those the official script
/// still removes "a", "an", "the". (Unicode tables: the regex crate's, current; Python's are its own
/// version's.)
fn is_word(c: char) -> bool {
    static WORD: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    c.is_ascii_alphanumeric()
        || c == '_'
        || (!c.is_ascii()
            && WORD
                .get_or_init(|| regex::Regex::new(r"^[\p{L}\p{N}]$").expect("a valid regex"))
                .is_match(c.encode_utf8(&mut [0u8; 4])))
}

const PUNCT: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

fn remove_articles(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let boundary_before = i == 0 || !is_word(chars[i - 1]);
        let mut matched = 0;
        if boundary_before {
            // alternation order of the official regex: a | an | the (first alternative with a \b after it wins)
            for art in ["a", "an", "the"] {
                let n = art.len();
                if i + n <= chars.len()
                    && chars[i..i + n].iter().copied().eq(art.chars())
                    && (i + n == chars.len() || !is_word(chars[i + n]))
                {
                    matched = n;
                    break;
                }
            }
        }
        if matched > 0 {
            out.push(' ');
            i += matched;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower.chars().filter(|c| !PUNCT.contains(*c)).collect();
    let no_art = remove_articles(&no_punc);
    no_art
        .split(py_isspace)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn tokens(s: &str) -> Vec<String> {
    normalize_answer(s)
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

fn overlap_f1(p: &[String], g: &[String]) -> f64 {
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in g {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0i64;
    for t in p {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// v1.1 `f1_score`.
pub fn f1_v1(prediction: &str, truth: &str) -> f64 {
    overlap_f1(&tokens(prediction), &tokens(truth))
}

/// v1.1 / v2.0 exact match.
pub fn exact(prediction: &str, truth: &str) -> f64 {
    (normalize_answer(prediction) == normalize_answer(truth)) as i32 as f64
}

/// v2.0 `compute_f1`: empty against empty is 1.
pub fn f1_v2(prediction: &str, truth: &str) -> f64 {
    let (p, g) = (tokens(prediction), tokens(truth));
    if p.is_empty() || g.is_empty() {
        return (p == g) as i32 as f64;
    }
    overlap_f1(&p, &g)
}

/// One question's gold answers, in file order.
pub struct Gold {
    pub id: String,
    pub answers: Vec<String>,
    pub is_impossible: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Scores {
    pub exact_match: f64,
    pub f1: f64,
    pub total: usize,
    pub missing: usize,
}

/// The official v1.1 evaluation: EM/F1 ×100 over all questions, in file order.
pub fn evaluate_v1(gold: &[Gold], predictions: &HashMap<String, String>) -> Scores {
    let (mut em, mut f1, mut missing) = (0.0f64, 0.0f64, 0usize);
    for g in gold {
        let Some(p) = predictions.get(&g.id) else {
            missing += 1;
            continue;
        };
        em += g.answers.iter().map(|a| exact(p, a)).fold(0.0, f64::max);
        f1 += g.answers.iter().map(|a| f1_v1(p, a)).fold(0.0, f64::max);
    }
    let n = gold.len().max(1) as f64;
    Scores {
        exact_match: 100.0 * em / n,
        f1: 100.0 * f1 / n,
        total: gold.len(),
        missing,
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScoresV2 {
    pub exact: f64,
    pub f1: f64,
    pub total: usize,
    #[serde(rename = "HasAns_exact")]
    pub has_ans_exact: f64,
    #[serde(rename = "HasAns_f1")]
    pub has_ans_f1: f64,
    #[serde(rename = "HasAns_total")]
    pub has_ans_total: usize,
    #[serde(rename = "NoAns_exact")]
    pub no_ans_exact: f64,
    #[serde(rename = "NoAns_f1")]
    pub no_ans_f1: f64,
    #[serde(rename = "NoAns_total")]
    pub no_ans_total: usize,
    pub best_exact: f64,
    pub best_exact_thresh: f64,
    pub best_f1: f64,
    pub best_f1_thresh: f64,
}

/// What v2.0 scoring knows of "no answer" beyond the predictions (the official script's `--na-prob-file`
/// and `--na-prob-thresh`): each question's value — a no-answer probability, or bertqa's null odds — in
/// the file's order (the best-threshold sweep breaks ties in that order, as the official script's stable
/// sort of the file's keys does), and the threshold above which a question counts as predicted "no
/// answer" (None: not applied — the official script without a file, where every value is 0).
#[derive(Clone, Debug, Default)]
pub struct NaProbs {
    pub values: Vec<(String, f64)>,
    pub thresh: Option<f64>,
    /// whether the best-threshold figures are computed (the official script: only with a file)
    pub sweep: bool,
}

/// The official v2.0 evaluation (evaluate-v2.0.py): raw EM/F1 per predicted question, then, with `na`,
/// a question whose value is above the threshold scores as a "no answer" prediction (1 when it has no
/// gold answer, else 0); HasAns/NoAns split by whether the question has any gold answer
/// (`bool(qa['answers'])`); and the best-threshold figures from the raw scores swept in the order of the
/// values.
pub fn evaluate_v2(
    gold: &[Gold],
    predictions: &HashMap<String, String>,
    na: Option<&NaProbs>,
) -> ScoresV2 {
    let mut em = HashMap::new();
    let mut f1 = HashMap::new();
    for g in gold {
        let golds: Vec<&str> = g
            .answers
            .iter()
            .map(|s| s.as_str())
            .filter(|a| !normalize_answer(a).is_empty())
            .collect();
        let golds = if golds.is_empty() { vec![""] } else { golds };
        let Some(p) = predictions.get(&g.id) else {
            continue;
        };
        em.insert(
            g.id.clone(),
            golds.iter().map(|a| exact(p, a)).fold(0.0, f64::max),
        );
        f1.insert(
            g.id.clone(),
            golds.iter().map(|a| f1_v2(p, a)).fold(0.0, f64::max),
        );
    }
    let has_ans = |g: &Gold| !g.answers.is_empty();
    let value: HashMap<&str, f64> = na
        .map(|n| n.values.iter().map(|(k, v)| (k.as_str(), *v)).collect())
        .unwrap_or_default();
    // apply_no_ans_threshold
    let thresholded = |raw: &HashMap<String, f64>| -> HashMap<String, f64> {
        let Some(t) = na.and_then(|n| n.thresh) else {
            return raw.clone();
        };
        gold.iter()
            .filter_map(|g| {
                let s = *raw.get(&g.id)?;
                let pred_na = value.get(g.id.as_str()).copied().unwrap_or(0.0) > t;
                Some((
                    g.id.clone(),
                    if pred_na {
                        f64::from(u8::from(!has_ans(g)))
                    } else {
                        s
                    },
                ))
            })
            .collect()
    };
    let (em_t, f1_t) = (thresholded(&em), thresholded(&f1));
    let avg = |m: &HashMap<String, f64>, filt: &dyn Fn(&Gold) -> bool| -> (f64, usize) {
        let sel: Vec<&Gold> = gold.iter().filter(|g| filt(g)).collect();
        let s: f64 = sel
            .iter()
            .map(|g| m.get(&g.id).copied().unwrap_or(0.0))
            .sum();
        (
            if sel.is_empty() {
                0.0
            } else {
                100.0 * s / sel.len() as f64
            },
            sel.len(),
        )
    };
    let (exact_all, total) = avg(&em_t, &|_| true);
    let (f1_all, _) = avg(&f1_t, &|_| true);
    let (he, ht) = avg(&em_t, &|g| has_ans(g));
    let (hf, _) = avg(&f1_t, &|g| has_ans(g));
    let (ne, nt) = avg(&em_t, &|g| !has_ans(g));
    let (nf, _) = avg(&f1_t, &|g| !has_ans(g));
    // find_best_thresh of the official script: the raw scores, in the values' order (stable sort)
    let by_id: HashMap<&str, &Gold> = gold.iter().map(|g| (g.id.as_str(), g)).collect();
    let best = |scores: &HashMap<String, f64>| -> (f64, f64) {
        let Some(na) = na.filter(|n| n.sweep) else {
            return (0.0, 0.0);
        };
        let num_no_ans = gold.iter().filter(|g| !has_ans(g)).count() as f64;
        let mut cur = num_no_ans;
        let mut best = cur;
        let mut thresh = 0.0;
        let mut order: Vec<&(String, f64)> = na.values.iter().collect();
        order.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal));
        for (id, v) in order {
            let (Some(s), Some(g)) = (scores.get(id), by_id.get(id.as_str())) else {
                continue;
            };
            let diff = if has_ans(g) {
                *s
            } else if !predictions[id].is_empty() {
                -1.0
            } else {
                0.0
            };
            cur += diff;
            if cur > best {
                best = cur;
                thresh = *v;
            }
        }
        // over every question, as the other figures (the official script, which stops on a missing
        // prediction, divides by the predicted ones: the same number whenever it runs)
        (100.0 * best / gold.len().max(1) as f64, thresh)
    };
    let (be, bet) = best(&em);
    let (bf, bft) = best(&f1);
    ScoresV2 {
        exact: exact_all,
        f1: f1_all,
        total,
        has_ans_exact: he,
        has_ans_f1: hf,
        has_ans_total: ht,
        no_ans_exact: ne,
        no_ans_f1: nf,
        no_ans_total: nt,
        best_exact: be,
        best_exact_thresh: bet,
        best_f1: bf,
        best_f1_thresh: bft,
    }
}

/// Gold answers of a parsed dataset.
pub fn gold_of(ds: &crate::data::squad::Dataset) -> Vec<Gold> {
    ds.examples
        .iter()
        .map(|e| Gold {
            id: e.id.clone(),
            answers: e.answers.iter().map(|a| a.text.clone()).collect(),
            is_impossible: e.is_impossible,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_follows_the_official_script() {
        assert_eq!(normalize_answer("The Denver Broncos!"), "denver broncos");
        assert_eq!(normalize_answer("  an apple, a day  "), "apple day");
        assert_eq!(normalize_answer("theater"), "theater"); // no \b after "the"
                                                            // word characters as Python's re takes them (expected values from the official normalize_answer
                                                            // under Python 3.11): marks and symbols are not word characters, letters and numbers of any
                                                            // script are
        for (text, official) in [
            ("a\u{93e} b", "\u{93e} b"),
            ("a\u{24b6} b", "\u{24d0} b"),
            ("a\u{345} b", "\u{345} b"),
            ("the\u{e31} x", "\u{e31} x"),
            ("an\u{5b0} y", "\u{5b0} y"),
            ("a\u{1f130}", "\u{1f130}"),
            ("x a\u{b2} y", "x a\u{b2} y"),
            ("the\u{663} z", "the\u{663} z"),
            ("a\u{2160} b", "a\u{2170} b"),
            ("a_b the_c", "ab thec"),
            ("\u{e9}the a\u{301} b", "\u{e9}the \u{301} b"),
            ("th\u{e9} an\u{660}", "th\u{e9} an\u{660}"),
        ] {
            assert_eq!(normalize_answer(text), official, "{text:?}");
        }
        assert_eq!(normalize_answer("anthe a"), "anthe");
        assert_eq!(normalize_answer("the-end"), "theend"); // punctuation goes before articles
        assert_eq!(normalize_answer("A.B."), "ab");
        assert_eq!(normalize_answer("É the Ö"), "é ö");
        assert_eq!(normalize_answer("x\u{1c}y"), "x y"); // Python isspace includes \x1c
        assert_eq!(normalize_answer("1,000"), "1000");
        assert_eq!(normalize_answer("don’t"), "don’t"); // curly quote is not in string.punctuation
    }

    #[test]
    fn f1_and_em() {
        assert_eq!(exact("the Broncos", "Broncos"), 1.0);
        assert!((f1_v1("Denver Broncos team", "Broncos") - 0.5).abs() < 1e-12);
        assert_eq!(f1_v1("", "x"), 0.0);
        assert_eq!(f1_v1("a", "the"), 0.0); // both normalize to empty: v1.1 gives 0
        assert_eq!(f1_v2("a", "the"), 1.0); // v2.0 gives 1
                                            // bags: repeated tokens count min(count) times
        assert!((f1_v1("b b a x", "b b c") - 2.0 / 3.0).abs() < 1e-12); // "a" is dropped: [b b x] vs [b b c]
        let p = tokens("b b x");
        let g = tokens("b y z w");
        assert!(
            (overlap_f1(&p, &g) - 2.0 * (1.0 / 3.0) * (1.0 / 4.0) / (1.0 / 3.0 + 1.0 / 4.0)).abs()
                < 1e-12
        );
    }
}
