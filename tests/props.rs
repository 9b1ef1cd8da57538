//! Property tests (proptest) on random inputs: context windows and offsets, long-text tokenization in
//! pieces, batch packing, the streaming n-best, the official SQuAD normaliser and F1, and the safetensors
//! loader on mutated files. Each property runs a modest number of cases so the file takes a few seconds.

use bertqa::cpu::Cpu;
use bertqa::data::features::{featurize, windows, Feature, FeatureCfg};
use bertqa::data::squad::Dataset;
use bertqa::data::tokenizer::{self, WordPieceTokenizer};
use bertqa::eval::metrics::{evaluate_v1, exact, f1_v1, f1_v2, normalize_answer, Gold};
use bertqa::eval::postprocess::{PostCfg, SpanAccumulator};
use bertqa::model::batch::{pack, Padding};
use bertqa::model::{checkpoint, BertConfig};
use bertqa::tensor::DType;
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn cases(n: u32) -> Config {
    Config {
        cases: n,
        // a failing case is shrunk; keep that bounded too
        max_shrink_iters: 200,
        ..Config::default()
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bertqa-props-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Words of the test vocabulary, with accents and CJK (BERT splits CJK characters into single tokens).
const WORDS: &[&str] = &[
    "the", "king", "river", "city", "old", "north", "war", "game", "team", "castle", "bridge",
    "gold", "café", "naïve", "über", "北京", "東京", "straße", "x", "ab", "queen", "island",
    "stone", "water",
];

/// A BERT tokenizer (vocab.txt, lower-cased, accents stripped) knowing WORDS, letters and `##` letters.
fn tok() -> &'static WordPieceTokenizer {
    static TOK: OnceLock<WordPieceTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let d = tmpdir("tok");
        let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(
            [
                "the", "king", "river", "city", "old", "north", "war", "game", "team", "castle",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        v.extend(
            [
                "cafe", "naive", "uber", "北", "京", "東", "strasse", "queen", "stone",
            ]
            .map(String::from),
        );
        v.extend(
            "abcdefghijklmnopqrstuvwxyzß.,;:?!'\"-()"
                .chars()
                .map(|c| c.to_string()),
        );
        v.extend(
            "abcdefghijklmnopqrstuvwxyzß"
                .chars()
                .map(|c| format!("##{c}")),
        );
        std::fs::write(d.join("vocab.txt"), v.join("\n") + "\n").unwrap();
        let t = tokenizer::load(&d).unwrap();
        std::fs::remove_dir_all(&d).ok();
        t
    })
}

/// A separator between words: spaces, tabs, newlines, or punctuation with a space.
fn sep() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        " ", " ", " ", "  ", "\t", "\n", ", ", ". ", " (", ") ", " - ", "; ",
    ])
}

/// Words and the separators after them.
fn text_parts(max_words: usize) -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    prop::collection::vec((prop::sample::select(WORDS.to_vec()), sep()), 1..max_words)
}

fn join(parts: &[(&str, &str)]) -> String {
    parts.iter().map(|(w, s)| format!("{w}{s}")).collect()
}

// ---------------------------------------------------------------------------------------------------------
// windows, offsets, labels

proptest! {
    #![proptest_config(cases(256))]

    /// Windows start at 0, end at n, hold at most max_ctx tokens each, advance by max_ctx − stride (so
    /// consecutive windows overlap by doc_stride tokens), and the last one is the first to reach n.
    #[test]
    fn windows_cover_the_context(n in 0usize..3000, max_ctx in 1usize..400, stride_frac in 0.0f64..1.0) {
        let stride = ((max_ctx as f64) * stride_frac) as usize; // < max_ctx
        let w = windows(n, max_ctx, stride);
        prop_assert!(!w.is_empty());
        prop_assert_eq!(w[0].0, 0);
        prop_assert_eq!(w.last().unwrap().1, n);
        for (i, &(s, e)) in w.iter().enumerate() {
            prop_assert!(s <= e && e - s <= max_ctx && e <= n);
            if i + 1 < w.len() {
                prop_assert_eq!(e - s, max_ctx, "only the last window may be short");
                prop_assert_eq!(w[i + 1].0, s + max_ctx - stride);
                prop_assert!(e < n, "a window after one that reached the end");
            }
        }
        // every token is in some window
        let mut covered = 0;
        for &(s, e) in &w {
            prop_assert!(s <= covered);
            covered = covered.max(e);
        }
        prop_assert_eq!(covered, n);
    }
}

fn squad_json(ctx: &str, answer: &str, start: usize) -> String {
    serde_json::json!({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "q", "question": "where is the old king?", "answers": [{"text": answer, "answer_start": start}]}
    ]}]}]})
    .to_string()
}

proptest! {
    #![proptest_config(cases(96))]

    /// Every window is [CLS] question [SEP] context-slice [SEP] padding: the context tokens of a window are
    /// a contiguous run of the whole context's tokens (with their offsets), no more than the budget; the
    /// windows together hold every context token; labels decode to the gold answer text in every window
    /// that holds it, and are (0, 0) elsewhere; an answer no longer than doc_stride + 1 tokens is held by
    /// some window.
    #[test]
    fn features_hold_their_window_and_labels_decode_to_the_answer(
        parts in text_parts(120),
        ans_pos in 0.0f64..1.0,
        ans_len in 1usize..4,
        t in 24usize..96,
        stride_frac in 0.0f64..1.0,
    ) {
        let tok = tok();
        let ctx = join(&parts);
        // the answer: words [a, a + len) of the context (whole words, so token-aligned)
        let a = ((parts.len() as f64) * ans_pos) as usize % parts.len();
        let b = (a + ans_len).min(parts.len());
        let start_b: usize = parts[..a].iter().map(|(w, s)| w.len() + s.len()).sum();
        let end_b = start_b + join(&parts[a..b]).len() - parts[b - 1].1.len();
        let answer = &ctx[start_b..end_b];
        let start = ctx[..start_b].chars().count();
        let ds = Dataset::parse(&squad_json(&ctx, answer, start), "prop").unwrap();
        prop_assert!(ds.examples[0].answer_aligned);
        let qmax = 8;
        let budget = t - qmax - 3;
        let stride = ((budget as f64) * stride_frac) as usize;
        let cfg = FeatureCfg { max_seq_length: t, doc_stride: stride, max_query_length: qmax };
        let f = featurize(&ds, tok, &cfg, true).unwrap();
        let qlen = tok.encode(&ds.examples[0].question).unwrap().ids.len().min(qmax);
        let max_ctx = t - qlen - 3;
        let whole = tok.encode(&ctx).unwrap();
        let n_chars = ctx.chars().count();
        let mut next = 0; // first context token not yet seen in a window
        let mut any = false;
        for feat in &f.features {
            // the real tokens only: [CLS] question [SEP] context [SEP]
            prop_assert!(feat.len() <= t);
            prop_assert_eq!(feat.max_len, t);
            prop_assert_eq!(feat.token_type_ids.len(), feat.len());
            prop_assert_eq!(feat.offsets.len(), feat.len());
            prop_assert_eq!(feat.input_ids[0], tok.cls);
            let ctx_pos: Vec<usize> = (0..feat.len()).filter(|&i| feat.offsets[i].is_some()).collect();
            prop_assert!(!ctx_pos.is_empty() || whole.ids.is_empty());
            let (c0, c1) = (ctx_pos[0], *ctx_pos.last().unwrap() + 1);
            prop_assert_eq!(ctx_pos.len(), c1 - c0, "context tokens are contiguous");
            prop_assert!(c1 - c0 <= max_ctx, "{} context tokens, budget {}", c1 - c0, max_ctx);
            prop_assert_eq!(feat.input_ids[c0 - 1], tok.sep);
            prop_assert_eq!(feat.input_ids[c1], tok.sep);
            prop_assert!(feat.token_type_ids[..c0].iter().all(|&x| x == 0));
            prop_assert!(feat.token_type_ids[c0..=c1].iter().all(|&x| x == 1));
            prop_assert_eq!(feat.len(), c1 + 1, "the window ends at its last [SEP]");
            // the window is the whole context's tokens [ws, ws + len)
            let first = feat.offsets[c0].unwrap();
            let ws = whole.offsets.iter().position(|&o| o == first).unwrap();
            prop_assert!(ws <= next, "a gap between windows");
            for (k, i) in (c0..c1).enumerate() {
                prop_assert_eq!(feat.input_ids[i], whole.ids[ws + k]);
                let o = feat.offsets[i].unwrap();
                prop_assert_eq!(o, whole.offsets[ws + k]);
                prop_assert!(o.0 <= o.1 && o.1 <= n_chars);
            }
            next = next.max(ws + (c1 - c0));
            if feat.has_answer {
                any = true;
                let (s, e) = (feat.start_position as usize, feat.end_position as usize);
                prop_assert!(c0 <= s && s <= e && e < c1);
                let got = ds.examples[0].context.slice(feat.offsets[s].unwrap().0, feat.offsets[e].unwrap().1);
                prop_assert_eq!(got, answer);
            } else {
                prop_assert_eq!((feat.start_position, feat.end_position), (0, 0));
            }
        }
        prop_assert_eq!(next, whole.ids.len(), "windows cover the context");
        let ans_tokens = tok.encode(answer).unwrap().ids.len();
        if ans_tokens <= stride + 1 {
            prop_assert!(any, "no window holds a {}-token answer (stride {})", ans_tokens, stride);
        }
    }

    /// Long texts tokenized in pieces give the same tokens and offsets as in one piece.
    #[test]
    fn tokenizing_in_pieces_matches_tokenizing_whole(parts in text_parts(300), chunk in 32usize..200) {
        let tok = tok();
        let text = join(&parts);
        let whole = tok.encode_chunked(&text, usize::MAX).unwrap();
        let pieces = tok.encode_chunked(&text, chunk).unwrap();
        prop_assert_eq!(&pieces.ids, &whole.ids);
        prop_assert_eq!(&pieces.offsets, &whole.offsets);
        let cut = tok.pieces(&text, chunk);
        prop_assert_eq!(cut.concat(), text.clone());
        prop_assert!(cut.iter().all(|p| p.len() <= chunk.max(8) * tokenizer::MAX_RUN_CHUNKS));
    }

    /// The same with the separators where a cut can go wrong (a helper's probe found contexts over 64 KiB
    /// tokenized differently from transformers): no-break, ideographic and narrow spaces, Unicode dashes,
    /// quotes and ellipses, a zero-width space and a form feed (both deleted by the normaliser: the words
    /// beside them join), U+0085 (whitespace, but a control character: deleted too), and no separator at
    /// all (runs longer than half a piece).
    #[test]
    fn tokenizing_in_pieces_matches_tokenizing_whole_with_unicode_separators(
        parts in prop::collection::vec((word_or_special(), unicode_sep()), 1..40),
        chunk in 32usize..120,
    ) {
        let tok = tok();
        let text = join(&parts);
        let whole = tok.encode_chunked(&text, usize::MAX).unwrap();
        let pieces = tok.encode_chunked(&text, chunk).unwrap();
        prop_assert_eq!(&pieces.ids, &whole.ids, "{:?}", tok.pieces(&text, chunk));
        prop_assert_eq!(&pieces.offsets, &whole.offsets);
    }
}

/// A word, or a special token (matched in the raw text: no cut may fall inside "[SEP]").
fn word_or_special() -> impl Strategy<Value = &'static str> {
    let mut w = WORDS.to_vec();
    w.extend(["[SEP]", "[CLS]", "[SEP]", "x[MASK]"]);
    prop::sample::select(w)
}

/// Separators whose handling differs between BERT's normaliser, its pre-tokenizer and a naive cut.
fn unicode_sep() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        " ", "\u{a0}", "\u{3000}", "\u{202f}", "\u{2028}", "—", "–", "“", "” ", "…", "·",
        "\u{200b}", "\u{c}", "\u{85}", "", "", "",
    ])
}

// ---------------------------------------------------------------------------------------------------------
// batch packing and the streaming n-best

fn feature(len: usize, t: usize, ex: usize) -> Feature {
    Feature {
        example: ex,
        input_ids: (0..len as i32).collect(),
        token_type_ids: vec![0; len],
        offsets: (0..len)
            .map(|i| (i >= 2 && i + 1 < len).then_some((i * 3, i * 3 + 2)))
            .collect(),
        max_len: t,
        start_position: 0,
        end_position: 0,
        has_answer: false,
    }
}

proptest! {
    #![proptest_config(cases(128))]

    /// The three batch layouts of the same windows: every real token kept in order, each window's rows a
    /// prefix of it (packed: exactly its real tokens; longest: the longest, rounded up to 64 or the full
    /// length; max: the full length), positions 0.. per window, window indices from the given first one.
    #[test]
    fn packing_keeps_every_real_token(lens in prop::collection::vec(1usize..200, 1..8), t in 200usize..257, first in 0usize..5) {
        let feats: Vec<Feature> = lens.iter().map(|&l| feature(l, t, 0)).collect();
        let refs: Vec<&Feature> = feats.iter().collect();
        let longest = *lens.iter().max().unwrap();
        for padding in [Padding::Packed, Padding::Longest, Padding::Max] {
            let p = pack(&refs, first, padding).unwrap();
            let l = &p.layout;
            prop_assert_eq!(l.b(), feats.len());
            prop_assert_eq!(l.lens.iter().map(|&x| x as usize).collect::<Vec<_>>(), lens.clone());
            prop_assert_eq!(l.wid[0] as usize, first);
            for (b, f) in feats.iter().enumerate() {
                let rows = l.rows(b);
                let expect = match padding {
                    Padding::Packed => lens[b],
                    Padding::Longest => longest.div_ceil(64).saturating_mul(64).min(t),
                    Padding::Max => t,
                };
                prop_assert_eq!(rows, expect);
                let s0 = l.cu[b] as usize;
                // the window's tokens, then padding (id 0)
                let mut padded = f.input_ids.clone();
                padded.resize(rows, 0);
                prop_assert_eq!(&p.ids[s0..s0 + rows], &padded[..]);
                prop_assert_eq!(&l.pos()[s0..s0 + rows], &(0..rows as i32).collect::<Vec<_>>()[..]);
            }
        }
    }

    /// The running n-best over windows equals sorting every window's candidates at the end (the procedure
    /// before streaming, and transformers'), for any logits, n-best size and span limit; in v2.0 with the
    /// null as transformers lists it (the lowest [CLS] score over the windows, the first of equal ones;
    /// appended to the candidates before the stable sort, so after spans of equal score; added back when
    /// the cut dropped it) and the null odds = null − best span (− 0 without one).
    #[test]
    fn streaming_nbest_equals_sorting_everything(
        n_windows in 1usize..5,
        // few values: ties (between spans, between the null and a span, between windows' nulls) are common
        logits in prop::collection::vec(-2i32..2, 2 * 5 * 24),
        n_best in 1usize..6,
        max_len in 1usize..6,
        version_2 in any::<bool>(),
    ) {
        let t = 24;
        let cfg = PostCfg { n_best_size: n_best, max_answer_length: max_len, version_2, null_score_diff_threshold: 0.0 };
        let feats: Vec<Feature> = (0..n_windows).map(|w| feature(16 + w, t, 0)).collect();
        let lg = |w: usize, k: usize| -> Vec<f32> {
            (0..t).map(|i| logits[(w * 2 + k) * t + i] as f32 * 0.5).collect()
        };
        let mut acc = SpanAccumulator::new();
        // (score, start logit, char start, char end, is the null)
        let mut all: Vec<(f64, f64, usize, usize, bool)> = vec![];
        let mut null: Option<(f64, f64)> = None;
        for (w, f) in feats.iter().enumerate() {
            let (s, e) = (lg(w, 0), lg(w, 1));
            acc.add_window(f, &s, &e, &cfg);
            let cls = s[0] as f64 + e[0] as f64;
            if null.is_none_or(|n| cls < n.0) {
                null = Some((cls, s[0] as f64));
            }
            // reference: the top-n starts and ends among the window's real tokens (stable order; padding is
            // not ranked), every valid pair, in window order
            let real = f.len();
            let top = |v: &[f32]| {
                let mut idx: Vec<usize> = (0..real).collect();
                idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap());
                idx.truncate(n_best);
                idx
            };
            for &si in &top(&s) {
                for &ei in &top(&e) {
                    let (Some(os), Some(oe)) = (f.offsets[si], f.offsets[ei]) else { continue };
                    if ei < si || ei - si + 1 > max_len { continue; }
                    all.push((s[si] as f64 + e[ei] as f64, s[si] as f64, os.0, oe.1, false));
                }
            }
        }
        let spans = all.len();
        let best_span = all.iter().map(|c| c.0).fold(f64::NEG_INFINITY, f64::max);
        let (null, null_start) = null.unwrap();
        if version_2 {
            all.push((null, null_start, 0, 0, true));
        }
        all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        all.truncate(n_best);
        if version_2 && !all.iter().any(|c| c.4) {
            all.push((null, null_start, 0, 0, true));
        }
        let ds = Dataset::parse(&squad_json(&"x".repeat(200), "x", 0), "p").unwrap();
        let mut out = bertqa::eval::postprocess::Predictions::new();
        acc.finish(&ds.examples[0], &cfg, &mut out);
        let nb = &out.nbest["q"];
        prop_assert_eq!(out.no_valid_span.len(), usize::from(spans == 0));
        if version_2 {
            let odds = null - if spans == 0 { 0.0 } else { best_span };
            prop_assert_eq!(out.null_odds["q"], odds);
        }
        if spans > 0 || version_2 {
            let got: Vec<(f64, f64, usize, usize, bool)> = nb.iter().map(|n| (n.start_logit + n.end_logit, n.start_logit, n.char_start, n.char_end, n.is_null)).collect();
            prop_assert_eq!(got, all);
            let p: f64 = nb.iter().map(|n| n.probability).sum();
            prop_assert!((p - 1.0).abs() < 1e-9);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// the official normaliser and F1

/// Strings from letters, articles, punctuation, Python whitespace and a few non-ASCII characters.
fn answer_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "a", "an", "the", "The", "A", "theater", "Denver", "Broncos", "É", "ö", "x", "1,000",
            "don’t", " ", "  ", "\t", "\n", "\u{a0}", "\u{1c}", ",", ".", "-", "'", "\"", "(", ")",
            "!", "_", "ß",
        ]),
        0..12,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn normaliser_output_is_clean_and_stable(s in answer_text()) {
        let n = normalize_answer(&s);
        prop_assert_eq!(normalize_answer(&n), n.clone(), "idempotent");
        prop_assert!(!n.starts_with(' ') && !n.ends_with(' ') && !n.contains("  "));
        prop_assert!(!n.chars().any(|c| c.is_ascii_punctuation()));
        prop_assert!(!n.split(' ').any(|w| w == "a" || w == "an" || w == "the"));
    }

    #[test]
    fn f1_and_exact_match_agree(p in answer_text(), g in answer_text()) {
        let (f, fr) = (f1_v1(&p, &g), f1_v1(&g, &p));
        prop_assert!((0.0..=1.0).contains(&f));
        prop_assert!((f - fr).abs() < 1e-12, "symmetric");
        let (f2, f2r) = (f1_v2(&p, &g), f1_v2(&g, &p));
        prop_assert!((0.0..=1.0).contains(&f2) && (f2 - f2r).abs() < 1e-12);
        let em = exact(&p, &g);
        prop_assert!(em == 0.0 || em == 1.0);
        if em == 1.0 {
            prop_assert_eq!(f2, 1.0, "v2.0: EM implies F1");
            if !normalize_answer(&p).is_empty() {
                prop_assert_eq!(f, 1.0, "v1.1: EM implies F1 for non-empty answers");
            }
        }
        // with itself: 100 when it normalises to non-empty
        if !normalize_answer(&p).is_empty() {
            prop_assert_eq!(f1_v1(&p, &p), 1.0);
        }
        // the dataset-level score is in [0, 100]
        let gold = vec![Gold { id: "q".into(), answers: vec![g.clone()], is_impossible: false }];
        let preds: HashMap<String, String> = [("q".to_string(), p.clone())].into();
        let s = evaluate_v1(&gold, &preds);
        prop_assert!((0.0..=100.0).contains(&s.f1) && (0.0..=100.0).contains(&s.exact_match));
        prop_assert!(s.f1 >= s.exact_match || normalize_answer(&p).is_empty());
    }
}

// ---------------------------------------------------------------------------------------------------------
// the safetensors loader on mutated files

/// A tiny model directory's config.json text and model.safetensors bytes.
fn tiny_model_bytes() -> &'static (String, Vec<u8>) {
    static M: OnceLock<(String, Vec<u8>)> = OnceLock::new();
    M.get_or_init(|| {
        let cfg = BertConfig::tiny(24, 8, 1, 2, 16, 16);
        let host = checkpoint::random_init_host(&cfg, 3);
        (
            serde_json::to_string(&cfg).unwrap(),
            checkpoint::safetensors_bytes(&host, None).unwrap(),
        )
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    /// set the byte at (position fraction, in the header or anywhere) to a value
    Flip {
        frac: f64,
        in_header: bool,
        value: u8,
    },
    Truncate {
        frac: f64,
    },
    /// overwrite the 8-byte header length
    HeaderLen(u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0.0f64..1.0, any::<bool>(), any::<u8>()).prop_map(|(frac, in_header, value)| Mutation::Flip { frac, in_header, value }),
        1 => (0.0f64..1.0).prop_map(|frac| Mutation::Truncate { frac }),
        1 => prop_oneof![Just(0u64), Just(u64::MAX), 0u64..5000].prop_map(Mutation::HeaderLen),
    ]
}

fn apply(bytes: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for m in muts {
        if b.is_empty() {
            break;
        }
        match *m {
            Mutation::Flip {
                frac,
                in_header,
                value,
            } => {
                let hl = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
                let span = if in_header { hl.min(b.len()) } else { b.len() };
                let i = ((span as f64) * frac) as usize % span;
                b[i] = value;
            }
            Mutation::Truncate { frac } => b.truncate(((b.len() as f64) * frac) as usize),
            Mutation::HeaderLen(n) => {
                if b.len() >= 8 {
                    b[..8].copy_from_slice(&n.to_le_bytes());
                }
            }
        }
    }
    b
}

fn load_dir(dir: &Path) -> anyhow::Result<()> {
    checkpoint::load(&Cpu::new(), dir, DType::F32, 0).map(|_| ())
}

proptest! {
    #![proptest_config(cases(160))]

    /// Random byte changes and truncations of a valid model.safetensors: loading never panics, and an error
    /// names the file.
    #[test]
    fn mutated_safetensors_never_panic_and_errors_name_the_file(muts in prop::collection::vec(mutation(), 1..4)) {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        let dir = DIR.get_or_init(|| tmpdir("safetensors"));
        let (cfg, bytes) = tiny_model_bytes();
        std::fs::write(dir.join("config.json"), cfg).unwrap();
        let path = dir.join("model.safetensors");
        std::fs::write(&path, apply(bytes, &muts)).unwrap();
        let r1 = std::panic::catch_unwind(|| checkpoint::read_safetensors(&path));
        prop_assert!(r1.is_ok(), "read_safetensors panicked on {:?}", muts);
        let r2 = std::panic::catch_unwind(|| load_dir(dir));
        prop_assert!(r2.is_ok(), "checkpoint::load panicked on {:?}", muts);
        for e in [r1.unwrap().err(), r2.unwrap().err()].into_iter().flatten() {
            let msg = format!("{e:#}");
            prop_assert!(msg.contains(&path.display().to_string()), "error does not name the file: {}", msg);
        }
    }
}

#[test]
fn the_unmutated_tiny_model_loads() {
    let dir = tmpdir("safetensors-ok");
    let (cfg, bytes) = tiny_model_bytes();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    load_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
