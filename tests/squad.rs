//! The SQuAD pipeline: official metrics on the real dev set, offsets and labels on the whole train set,
//! tricky Unicode, and a v2.0 file with impossible questions. Tests that need ../shared/assets skip with a
//! printed reason when it is absent.

use bertqa::data::features::{featurize, FeatureCfg};
use bertqa::data::squad::Dataset;
use bertqa::data::tokenizer::{self, WordPieceTokenizer};
use bertqa::eval::metrics::{evaluate_v1, evaluate_v2, gold_of, normalize_answer};
use bertqa::eval::postprocess::{postprocess, PostCfg};
use std::collections::HashMap;
use std::path::PathBuf;

fn assets() -> Option<PathBuf> {
    bertqa::util::assets_or_skip()
}

fn minilm_tokenizer() -> Option<WordPieceTokenizer> {
    Some(tokenizer::load(&assets()?.join("all-MiniLM-L6-v2")).unwrap())
}

#[test]
fn reference_predictions_reproduce_official_scores() {
    let Some(a) = assets() else { return };
    let ds = Dataset::load(&a.join("squad-v1.1/dev-v1.1.json")).unwrap();
    assert_eq!(ds.examples.len(), 10570);
    let gold = gold_of(&ds);
    // official scores from the README of squad-reference-predictions (evaluate-v1.1.py)
    for (file, em, f1) in [
        (
            "v1.1-dev-BERT-ensemble-GoogleAI.json",
            86.20624408703878,
            92.19557978351145,
        ),
        (
            "v1.1-dev-LogisticRegression-baseline.json",
            40.14191106906339,
            50.98153647324461,
        ),
    ] {
        let p: HashMap<String, String> = serde_json::from_str(
            &std::fs::read_to_string(a.join("squad-reference-predictions").join(file)).unwrap(),
        )
        .unwrap();
        let s = evaluate_v1(&gold, &p);
        println!("{file}: EM {} F1 {}", s.exact_match, s.f1);
        assert!(
            (s.exact_match - em).abs() < 1e-9,
            "{file}: EM {} vs official {em}",
            s.exact_match
        );
        assert!(
            (s.f1 - f1).abs() < 1e-9,
            "{file}: F1 {} vs official {f1}",
            s.f1
        );
    }
    // gold answers as predictions: 100 / 100
    let p: HashMap<String, String> = ds
        .examples
        .iter()
        .map(|e| (e.id.clone(), e.answers[0].text.clone()))
        .collect();
    let s = evaluate_v1(&gold, &p);
    assert_eq!((s.exact_match, s.f1), (100.0, 100.0));
}

#[test]
fn labelled_spans_decode_to_the_gold_answer_on_the_whole_train_set() {
    let Some(a) = assets() else { return };
    let tok = minilm_tokenizer().unwrap();
    let ds = Dataset::load(&a.join("squad-v1.1/train-v1.1.json")).unwrap();
    assert_eq!(ds.examples.len(), 87599);
    let t0 = std::time::Instant::now();
    let f = featurize(&ds, &tok, &FeatureCfg::default(), true).unwrap();
    println!(
        "featurized {} examples into {} windows in {:.1}s",
        ds.examples.len(),
        f.features.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut in_window = vec![false; ds.examples.len()];
    let mut ok = vec![false; ds.examples.len()];
    let mut bad = vec![];
    for feat in &f.features {
        if !feat.has_answer {
            continue;
        }
        let ex = &ds.examples[feat.example];
        in_window[feat.example] = true;
        let (s, e) = (
            feat.offsets[feat.start_position as usize].unwrap(),
            feat.offsets[feat.end_position as usize].unwrap(),
        );
        let text = ex.context.slice(s.0, e.1);
        if normalize_answer(text) == normalize_answer(&ex.answers[0].text) {
            ok[feat.example] = true;
        } else if bad.len() < 8 {
            bad.push(format!(
                "{}: {:?} vs gold {:?}",
                ex.id, text, ex.answers[0].text
            ));
        }
    }
    let n_in = in_window.iter().filter(|&&x| x).count();
    let n_ok = ok.iter().filter(|&&x| x).count();
    println!("answers inside a window: {n_in}; decoded == gold after normalisation: {n_ok} ({:.3}%); misaligned in the file: {}", 100.0 * n_ok as f64 / n_in as f64, ds.misaligned.len());
    for b in &bad {
        println!("  mismatch {b}");
    }
    // featurization is deterministic: the counts are known. Every question of the train set has its answer
    // wholly inside some window (none is misaligned in the file), and 226 gold answers are sub-words of a
    // token ("six" inside "sixth"), which no token span can decode to exactly; a change that loses a window
    // or mislabels one span more fails here
    assert_eq!(
        n_in + ds.misaligned.len(),
        ds.examples.len(),
        "questions whose answer lies in no window"
    );
    assert!(
        f.answer_without_tokens.is_empty(),
        "answers of the train set that cover no token: {:?}",
        f.answer_without_tokens
    );
    assert!(
        n_in - n_ok <= 226,
        "{} of {n_in} spans do not round-trip (226 are sub-word answers)",
        n_in - n_ok
    );
}

fn one_example_file(
    context: &str,
    question: &str,
    answer: &str,
    impossible: bool,
    version: &str,
) -> String {
    let start = context
        .find(answer)
        .map(|b| context[..b].chars().count())
        .unwrap_or(0);
    let answers = if impossible {
        serde_json::json!([])
    } else {
        serde_json::json!([{"text": answer, "answer_start": start}])
    };
    serde_json::json!({"version": version, "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": question, "answers": answers, "is_impossible": impossible}
    ]}]}]})
    .to_string()
}

#[test]
fn offsets_survive_accents_cjk_emoji_whitespace_and_control_characters() {
    let Some(tok) = minilm_tokenizer() else {
        return;
    };
    let cases = [
        ("Le café de Zoë ouvrit à Montréal en 1998.", "Montréal"),
        ("北京是中国的首都，人口众多。", "中国"),
        (
            "The 🚀 rocket launched from Cape Canaveral 🌍 yesterday.",
            "Cape Canaveral",
        ),
        (
            "Tabs\tand\u{a0}non-breaking\u{2003}spaces   around   the answer here.",
            "the answer",
        ),
        (
            "Control\u{0001}chars\u{200b}and zero width joiners in Ünïcödé text.",
            "Ünïcödé",
        ),
        (
            "Ligatures ﬁnally: the ﬁrst ﬂoor of the Œuvre museum.",
            "Œuvre museum",
        ),
    ];
    for (ctx, ans) in cases {
        let ds = Dataset::parse(
            &one_example_file(ctx, "Where?", ans, false, "1.1"),
            "inline",
        )
        .unwrap();
        assert!(ds.examples[0].answer_aligned, "{ctx}");
        let f = featurize(
            &ds,
            &tok,
            &FeatureCfg {
                max_seq_length: 64,
                doc_stride: 16,
                max_query_length: 16,
            },
            true,
        )
        .unwrap();
        let feat = f
            .features
            .iter()
            .find(|x| x.has_answer)
            .unwrap_or_else(|| panic!("no window holds {ans:?} in {ctx:?}"));
        let (s, e) = (
            feat.offsets[feat.start_position as usize].unwrap(),
            feat.offsets[feat.end_position as usize].unwrap(),
        );
        let got = ds.examples[0].context.slice(s.0, e.1);
        // the exact text (not after the metric's normalisation, which would forgive a label one token off
        // the start of "the answer", or a span that swallows trailing punctuation)
        assert_eq!(got, ans, "context {ctx:?}");
        // every context token's offsets lie inside the context and on char boundaries
        for o in feat.offsets.iter().flatten() {
            assert!(o.0 <= o.1 && o.1 <= ctx.chars().count());
        }
    }
}

/// An answer made only of characters the tokenizer drops (found by a probe against transformers: run_qa
/// labels the tokens around it, "foo … bar" for "\u{1c}") covers no token: its windows get no label and
/// training leaves it out, while an answer with real tokens around a dropped one is labelled as usual.
#[test]
fn answers_that_cover_no_token_are_not_labelled() {
    let Some(tok) = minilm_tokenizer() else {
        return;
    };
    let ctx = "foo \u{1c} bar \u{200b} baz \u{ad}qux\u{301} end";
    let chars: Vec<char> = ctx.chars().collect();
    let at = |c: char| chars.iter().position(|&x| x == c).unwrap();
    let qas: Vec<serde_json::Value> = [
        ("ctrl", "\u{1c}".to_string(), at('\u{1c}')),
        ("zwsp", "\u{200b}".to_string(), at('\u{200b}')),
        ("shy", "\u{ad}".to_string(), at('\u{ad}')),
        ("mark", "\u{301}".to_string(), at('\u{301}')),
        ("word", "baz".to_string(), at('z') - 2),
        ("mixed", "bar \u{200b} baz".to_string(), at('r') - 2),
    ]
    .into_iter()
    .map(|(id, text, start)| {
        serde_json::json!({"id": id, "question": "which?", "answers": [{"text": text, "answer_start": start}]})
    })
    .collect();
    let file = serde_json::json!({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": ctx, "qas": qas}]}]});
    let ds = Dataset::parse(&file.to_string(), "inline").unwrap();
    assert!(ds.misaligned.is_empty(), "{:?}", ds.misaligned);
    let cfg = FeatureCfg {
        max_seq_length: 32,
        doc_stride: 8,
        max_query_length: 8,
    };
    let f = featurize(&ds, &tok, &cfg, true).unwrap();
    assert_eq!(f.answer_without_tokens, vec![0, 1, 2, 3]);
    for feat in &f.features {
        let labelled = feat.has_answer;
        assert_eq!(labelled, feat.example >= 4, "example {}", feat.example);
        if labelled {
            let (s, e) = (
                feat.offsets[feat.start_position as usize].unwrap(),
                feat.offsets[feat.end_position as usize].unwrap(),
            );
            let want = ["baz", "bar \u{200b} baz"][feat.example - 4];
            assert_eq!(ds.examples[feat.example].context.slice(s.0, e.1), want);
        }
    }
    let train = bertqa::train::training_features(&ds, &tok, &cfg).unwrap();
    let mut kept: Vec<usize> = train.iter().map(|x| x.example).collect();
    kept.dedup();
    assert_eq!(kept, vec![4, 5]);
}

#[test]
fn long_contexts_split_into_overlapping_windows() {
    let Some(tok) = minilm_tokenizer() else {
        return;
    };
    let ctx: String =
        (0..300).map(|i| format!("word{i} ")).collect::<String>() + "the treasure is here.";
    let ds = Dataset::parse(
        &one_example_file(&ctx, "Where is the treasure?", "here", false, "1.1"),
        "inline",
    )
    .unwrap();
    let cfg = FeatureCfg {
        max_seq_length: 128,
        doc_stride: 32,
        max_query_length: 64,
    };
    let f = featurize(&ds, &tok, &cfg, true).unwrap();
    assert!(f.features.len() > 3);
    for w in &f.features {
        assert_eq!(w.max_len, 128);
        assert!(w.len() <= 128);
        assert_eq!(w.input_ids[0], tok.cls);
        assert_eq!(w.input_ids[w.len() - 1], tok.sep);
    }
    let with: Vec<_> = f.features.iter().filter(|x| x.has_answer).collect();
    assert!(!with.is_empty());
    assert!(f
        .features
        .iter()
        .filter(|x| !x.has_answer)
        .all(|x| x.start_position == 0 && x.end_position == 0));
    // consecutive windows overlap by doc_stride context tokens
    let ctx_offsets = |i: usize| {
        f.features[i]
            .offsets
            .iter()
            .flatten()
            .copied()
            .collect::<Vec<_>>()
    };
    let (a, b) = (ctx_offsets(0), ctx_offsets(1));
    assert_eq!(a[a.len() - 32..], b[..32]);
}

#[test]
fn squad_v2_impossible_questions_flow_through_features_postprocess_and_metrics() {
    let Some(tok) = minilm_tokenizer() else {
        return;
    };
    let js = serde_json::json!({"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris is the capital of France. Berlin is in Germany.", "qas": [
        {"id": "has", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": false},
        {"id": "none", "question": "What is the capital of Mars?", "answers": [], "plausible_answers": [{"text": "Berlin", "answer_start": 32}], "is_impossible": true}
    ]}]}]})
    .to_string();
    let ds = Dataset::parse(&js, "v2").unwrap();
    let f = featurize(
        &ds,
        &tok,
        &FeatureCfg {
            max_seq_length: 64,
            doc_stride: 16,
            max_query_length: 16,
        },
        true,
    )
    .unwrap();
    let none = f.features.iter().find(|x| x.example == 1).unwrap();
    assert_eq!(
        (none.start_position, none.end_position),
        (0, 0),
        "impossible → [CLS]"
    );
    let has = f.features.iter().find(|x| x.example == 0).unwrap();
    assert!(has.has_answer && has.start_position > 0);
    // logits: example 0 points at its answer; example 1 prefers [CLS]
    let t = 64;
    let mut s = vec![vec![-5.0f32; t]; f.features.len()];
    let mut e = vec![vec![-5.0f32; t]; f.features.len()];
    for (i, feat) in f.features.iter().enumerate() {
        if feat.example == 0 {
            s[i][feat.start_position as usize] = 5.0;
            e[i][feat.end_position as usize] = 5.0;
        } else {
            s[i][0] = 6.0;
            e[i][0] = 6.0;
        }
    }
    let post = PostCfg {
        version_2: true,
        ..PostCfg::default()
    };
    let p = postprocess(&ds, &f.features, &s, &e, &post);
    assert_eq!(p.answers["has"], "Paris");
    assert_eq!(p.answers["none"], "");
    assert!(p.null_odds["none"] > 0.0 && p.null_odds["has"] < 0.0);
    let sc = evaluate_v2(&gold_of(&ds), &p.answers, Some(&p.na_probs()));
    assert_eq!(
        (sc.exact, sc.f1, sc.has_ans_exact, sc.no_ans_exact),
        (100.0, 100.0, 100.0, 100.0)
    );
    assert_eq!((sc.has_ans_total, sc.no_ans_total), (1, 1));
    // a wrong "no answer" on the answerable question
    let mut wrong = p.answers.clone();
    wrong.insert("has".into(), String::new());
    let sc = evaluate_v2(&gold_of(&ds), &wrong, None);
    assert_eq!(sc.exact, 50.0);
}

/// The normaliser's settings come from tokenizer_config.json as transformers takes them — its defaults
/// where the file is silent or absent, and over what tokenizer.json says (BERT's whole pipeline, unless
/// tokenizer_class is PreTrainedTokenizerFast), special tokens matched in the text — for vocab.txt and
/// tokenizer.json alike: the ids transformers gave (tests/fixtures/tokenizer_settings.json, scripts/make_reference.py) for
/// directories made the same way from all-MiniLM-L6-v2's files. (Before: vocab.txt ignored strip_accents and
/// tokenize_chinese_chars, and tokenizer.json's normaliser won over tokenizer_config.json.)
#[test]
fn tokenizer_settings_as_transformers_takes_them() {
    let Some(a) = assets() else { return };
    let src = a.join("all-MiniLM-L6-v2");
    let fix: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tokenizer_settings.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = fix["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let variants = fix["variants"].as_object().unwrap();
    assert_eq!(variants.len(), 11);
    for (name, v) in variants {
        let dir = std::env::temp_dir().join(format!("bertqa-tok-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("vocab.txt"), dir.join("vocab.txt")).unwrap();
        if v["tokenizer_json"].as_bool().unwrap() {
            let mut j: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
                    .unwrap();
            if let Some(l) = v["tokenizer_json_lowercase"].as_bool() {
                j["normalizer"]["lowercase"] = l.into();
            }
            // scripts/make_reference.py's odd_pipeline: clean_text off, another pre-tokenizer
            if v["odd_pipeline"].as_bool().unwrap() {
                j["normalizer"]["clean_text"] = false.into();
                j["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
            }
            std::fs::write(dir.join("tokenizer.json"), j.to_string()).unwrap();
        }
        if let Some(cfg) = v["tokenizer_config"].as_object() {
            std::fs::write(
                dir.join("tokenizer_config.json"),
                serde_json::Value::Object(cfg.clone()).to_string(),
            )
            .unwrap();
        }
        let tok = tokenizer::load(&dir).unwrap();
        for (text, want) in texts.iter().zip(v["ids"].as_array().unwrap()) {
            let want: Vec<i32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_i64().unwrap() as i32)
                .collect();
            assert_eq!(tok.encode(text).unwrap().ids, want, "{name}: {text}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A tokenizer.json whose added tokens are matched after normalisation, as single words or with the
/// spaces beside them makes where a long text may be cut depend on its neighbours: such a tokenizer reads
/// texts whole, so pieces never change its tokens (a review found "HÉLLO-WORLD" cut before "-").
#[test]
fn texts_are_read_whole_when_added_tokens_make_cuts_unsafe() {
    let Some(a) = assets() else { return };
    let src = a.join("all-MiniLM-L6-v2");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let tokens = [
        ("hello-world", true, false, false),
        ("[M2]", false, true, false),
        ("<lx>", false, false, true),
    ];
    for (i, (content, normalized, single_word, lstrip)) in tokens.iter().enumerate() {
        j["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": 30522 + i, "content": content, "single_word": single_word, "lstrip": lstrip,
                "rstrip": false, "normalized": normalized, "special": false
            }));
    }
    let dir = std::env::temp_dir().join(format!("bertqa-tok-added-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), j.to_string()).unwrap();
    let tok = tokenizer::load(&dir).unwrap();
    for text in [
        format!("{}HÉLLO-WORLD more", "word ".repeat(30)),
        format!("{}xxxxxxxxxxx[M2] y", "word ".repeat(30)),
        format!("{}abc <lx> d", "word ".repeat(30)),
    ] {
        for chunk in [16, 24, 40, 64] {
            let (whole, pieces) = (
                tok.encode_chunked(&text, usize::MAX).unwrap(),
                tok.encode_chunked(&text, chunk).unwrap(),
            );
            assert_eq!(
                (&pieces.ids, &pieces.offsets),
                (&whole.ids, &whole.offsets),
                "{text} / {chunk}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tokenizer_config.json that is not JSON, or holds a setting of the wrong type, is an error naming it
/// (before: silently read as "lower-case").
#[test]
fn a_bad_tokenizer_config_is_named() {
    let Some(a) = assets() else { return };
    let dir = std::env::temp_dir().join(format!("bertqa-tok-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(a.join("all-MiniLM-L6-v2/vocab.txt"), dir.join("vocab.txt")).unwrap();
    for (body, says) in [
        (
            "{\"do_lower_case\": \"no\"}",
            "do_lower_case is \"no\", expected true, false or null",
        ),
        ("{\"strip_accents\": 0}", "strip_accents is 0"),
        ("{do_lower_case: false", "parsing"),
    ] {
        std::fs::write(dir.join("tokenizer_config.json"), body).unwrap();
        let e = format!("{:#}", tokenizer::load(&dir).err().unwrap());
        assert!(
            e.contains("tokenizer_config.json") && e.contains(says),
            "{body}: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// v2.0 n-best lists as transformers' postprocess_qa_predictions writes them: the null ([CLS]) is an entry
/// of its own, ranked by its score among the spans, added back last when the cut dropped it, and the
/// probabilities are over the whole list; with no valid span the null odds are the null score minus 0
/// (transformers' placeholder), never a non-number (before: the null was not listed, and such a question's
/// null_odds.json value was `null`, which no scorer reads).
#[test]
fn squad_v2_nbest_lists_the_null_and_null_odds_stay_finite() {
    let Some(tok) = minilm_tokenizer() else {
        return;
    };
    let js = serde_json::json!({"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris is the capital of France. Berlin is in Germany.", "qas": [
        {"id": "has", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": false}
    ]}]}]})
    .to_string();
    let ds = Dataset::parse(&js, "v2").unwrap();
    let cfg = FeatureCfg {
        max_seq_length: 64,
        doc_stride: 16,
        max_query_length: 16,
    };
    let f = featurize(&ds, &tok, &cfg, true).unwrap();
    assert_eq!(f.features.len(), 1);
    let feat = &f.features[0];
    let (a, last) = (
        feat.start_position as usize,
        feat.offsets.iter().rposition(|o| o.is_some()).unwrap(),
    );
    let t = 64;
    assert!(feat.offsets[a + 1].is_some());
    let logits = |cls: f32, start_at: usize, end_at: usize| {
        let (mut s, mut e) = (vec![-5.0f32; t], vec![-5.0f32; t]);
        s[0] = cls;
        e[0] = cls;
        s[start_at] = 2.5;
        e[end_at] = 2.5;
        // a second span, one token longer (when it ends after its start)
        e[end_at + 1] = 1.0;
        (vec![s], vec![e])
    };
    let run = |cls: f32, start_at: usize, end_at: usize, n_best: usize| {
        let (s, e) = logits(cls, start_at, end_at);
        let post = PostCfg {
            version_2: true,
            n_best_size: n_best,
            ..PostCfg::default()
        };
        postprocess(&ds, &f.features, &s, &e, &post)
    };
    let listed = |p: &bertqa::eval::postprocess::Predictions| -> Vec<(String, f64, f64)> {
        p.nbest["has"]
            .iter()
            .map(|n| (n.text.clone(), n.start_logit + n.end_logit, n.probability))
            .collect()
    };
    // the null (score 3) second of the two best: [Paris 5, null 3]; softmax over the list
    let p = run(1.5, a, a, 2);
    let l = listed(&p);
    assert_eq!(
        (l[0].0.as_str(), l[0].1, l[1].0.as_str(), l[1].1),
        ("Paris", 5.0, "", 3.0)
    );
    let p0 = 1.0 / (1.0 + (-2.0f64).exp());
    assert!(
        (l[0].2 - p0).abs() < 1e-12 && (l[1].2 - (1.0 - p0)).abs() < 1e-12,
        "{l:?}"
    );
    assert_eq!(
        (p.answers["has"].as_str(), p.null_odds["has"]),
        ("Paris", -2.0)
    );
    // the null (score −8) below the cut: the two best spans, then the null added back
    let p = run(-4.0, a, a, 2);
    let l = listed(&p);
    assert_eq!(l.len(), 3, "{l:?}");
    assert_eq!(
        (l[0].1, l[1].1, l[2].0.as_str(), l[2].1),
        (5.0, 3.5, "", -8.0)
    );
    // no valid span (the best start after the best end): the null alone, finite odds, answer ""
    let p = run(1.0, last, a, 1);
    assert_eq!(p.no_valid_span, vec!["has".to_string()]);
    assert_eq!(listed(&p), vec![(String::new(), 2.0, 1.0)]);
    assert_eq!((p.answers["has"].as_str(), p.null_odds["has"]), ("", 2.0));
}

#[test]
fn vocab_txt_fallback_tokenizes_like_tokenizer_json() {
    let Some(a) = assets() else { return };
    let src = a.join("all-MiniLM-L6-v2");
    let dir = std::env::temp_dir().join(format!("bertqa-vocab-only-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::write(dir.join(f), std::fs::read(src.join(f)).unwrap()).unwrap();
    }
    let from_json = tokenizer::load(&src).unwrap();
    let from_vocab = tokenizer::load(&dir).unwrap();
    assert_eq!(
        (from_json.cls, from_json.sep, from_json.pad),
        (from_vocab.cls, from_vocab.sep, from_vocab.pad)
    );
    for text in [
        "The Denver Broncos defeated the Carolina Panthers 24–10.",
        "Café Zoë, 北京, naïve résumé!",
        "tabs\tand  spaces\u{a0}here",
    ] {
        let (x, y) = (
            from_json.encode(text).unwrap(),
            from_vocab.encode(text).unwrap(),
        );
        assert_eq!(x.ids, y.ids, "{text}");
        assert_eq!(x.offsets, y.offsets, "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
