//! The `bertqa` binary end to end, on tiny models and files that each test writes into its own temporary
//! directory: exit codes (0 on success, 1 with `error: …` on a bad input — never a panic, 101, or an abort),
//! error messages that name the file / JSON path / tensor / field / flag, and the output contracts (the last
//! stdout line of `eval` and `score` is the metrics JSON; `predict` prints one JSON object).
//!
//! The helpers at the top (`bin`, `run`, `TempDir`, `tiny_model`, `tiny_squad`, `ok`, `fails`) are meant for
//! every command's cases, train's included.

use serde_json::{json, Value};
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

// ---------------------------------------------------------------------------------------------------------
// helpers

/// The built `bertqa` binary.
fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bertqa"))
}

/// Run `bertqa ARGS…` and collect its output (stdin closed).
fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_with(args, &[])
}

/// [`run`] with environment variables set.
fn run_with<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running the bertqa binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert success; return stdout.
#[track_caller]
fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "expected success, got {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    stdout(o)
}

/// Assert a clean failure — exit code 1 (not a panic's 101, not a signal), an `error:` line, no panic —
/// whose stderr contains every one of `needles`; return stderr.
#[track_caller]
fn fails(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit code 1, got {:?}\nstdout:\n{}\nstderr:\n{err}",
        o.status,
        stdout(o)
    );
    assert!(!err.contains("panicked"), "panic:\n{err}");
    assert!(err.contains("error:"), "no error line:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}:\n{err}");
    }
    err
}

/// The last non-empty stdout line, parsed as JSON (the metrics contract of eval, score and train).
#[track_caller]
fn last_json(out: &str) -> Value {
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output:\n{out}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line {line:?} is not JSON: {e}"))
}

/// A directory removed when dropped (kept with BERTQA_KEEP_TEST_DIRS=1, for debugging).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "bertqa-cli-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BERTQA_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Words of the tiny vocabulary (whole words, so that contexts made of them tokenize one token per word).
const WORDS: &[&str] = &[
    "the", "a", "an", "of", "in", "on", "at", "to", "is", "was", "were", "be", "and", "or", "but",
    "not", "what", "who", "when", "where", "which", "how", "why", "year", "city", "river", "king",
    "queen", "war", "team", "game", "first", "second", "new", "old", "large", "small", "north",
    "south", "east", "west", "people", "state", "world", "built", "named", "after", "before",
    "during", "church", "castle", "bridge", "school", "music", "film", "book", "ship", "island",
    "mountain", "lake", "road", "army", "battle", "house", "court", "law", "gold", "silver", "red",
    "blue", "green", "white", "black", "stone", "water",
];

/// A WordPiece tokenizer directory (vocab.txt only: the BERT pipeline, lower-cased): special tokens,
/// `WORDS`, single characters and their `##` continuations.
fn tiny_tokenizer(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(WORDS.iter().map(|s| s.to_string()));
    let chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:?!'\"-()";
    v.extend(chars.chars().map(|c| c.to_string()));
    v.extend(
        "abcdefghijklmnopqrstuvwxyz0123456789"
            .chars()
            .map(|c| format!("##{c}")),
    );
    std::fs::write(dir.join("vocab.txt"), v.join("\n") + "\n").unwrap();
}

/// A random tiny BertForQuestionAnswering (hidden 32, 1 layer, 2 heads) with the tiny tokenizer, made by
/// `bertqa init-random` in `root/model`; `extra` adds init-random flags (`tiny_model`: 512 positions).
fn tiny_model_with(root: &Path, extra: &[&str]) -> PathBuf {
    let tok = root.join("tok");
    tiny_tokenizer(&tok);
    let model = root.join("model");
    let mut args: Vec<String> = [
        "init-random",
        "--tokenizer-from",
        tok.to_str().unwrap(),
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--intermediate-size",
        "64",
        "--output",
        model.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    ok(&run(&args));
    model
}

fn tiny_model(root: &Path) -> PathBuf {
    tiny_model_with(root, &["--max-position-embeddings", "512"])
}

/// One question: id, question text, gold answers as (text, answer_start); `is_impossible` when Some.
fn qa(id: &str, answers: &[(&str, usize)], impossible: Option<bool>) -> Value {
    let mut q = json!({
        "id": id,
        "question": "what was the old city named after?",
        "answers": answers.iter().map(|(t, s)| json!({"text": t, "answer_start": s})).collect::<Vec<_>>(),
    });
    if let Some(b) = impossible {
        q["is_impossible"] = json!(b);
    }
    q
}

/// A SQuAD file with the given paragraphs (context, questions) in one article.
fn squad_file(path: &Path, version: &str, paragraphs: Vec<(String, Vec<Value>)>) {
    let paras: Vec<Value> = paragraphs
        .into_iter()
        .map(|(c, q)| json!({"context": c, "qas": q}))
        .collect();
    let v = json!({"version": version, "data": [{"title": "tiny", "paragraphs": paras}]});
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// A context of `n` words of `WORDS` (deterministic) and, for each of `k` questions, a gold answer: the
/// two words starting at word 3·i, with the right `answer_start`.
fn context_and_answers(n: usize, k: usize, salt: usize) -> (String, Vec<(String, usize)>) {
    let words: Vec<&str> = (0..n)
        .map(|i| WORDS[(i * 7 + salt * 13 + i / 5) % WORDS.len()])
        .collect();
    let ctx = words.join(" ");
    let answers = (0..k)
        .map(|i| {
            let w = 3 * i % n.saturating_sub(1).max(1);
            let start: usize = words[..w].iter().map(|s| s.len() + 1).sum();
            (format!("{} {}", words[w], words[w + 1]), start)
        })
        .collect();
    (ctx, answers)
}

/// A valid SQuAD v1.1 file of `paragraphs` paragraphs with `per_paragraph` answerable questions each; ids
/// `p{paragraph}q{question}`.
fn tiny_squad(path: &Path, paragraphs: usize, per_paragraph: usize) {
    let paras = (0..paragraphs)
        .map(|p| {
            let (ctx, ans) = context_and_answers(40 + 10 * p, per_paragraph, p);
            let qs = ans
                .iter()
                .enumerate()
                .map(|(q, (t, s))| qa(&format!("p{p}q{q}"), &[(t, *s)], None))
                .collect();
            (ctx, qs)
        })
        .collect();
    squad_file(path, "1.1", paras);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `bertqa eval` of `model` on `data` into `root/eval-out`, with extra flags.
fn eval(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    eval_env(model, data, out, extra, &[])
}

/// [`eval`] with environment variables set.
fn eval_env(model: &Path, data: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "eval",
        "--model",
        s(model),
        "--dev-file",
        s(data),
        "--output-dir",
        s(out),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    run_with(&args, env)
}

fn predict(model: &Path, context: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "predict",
        "--model",
        s(model),
        "--question",
        "what was the old city named after?",
        "--context",
        context,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// Rewrite `model/config.json` through `f`.
fn edit_config(model: &Path, f: impl FnOnce(&mut Value)) {
    let p = model.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Overwrite element `index` of tensor `name` (F32) in `model/model.safetensors` with `value`.
fn poke_weight(model: &Path, name: &str, index: usize, value: f32) {
    let p = model.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    assert_eq!(header[name]["dtype"], "F32");
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n + 4 * index;
    b[start..start + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&p, b).unwrap();
}

// ---------------------------------------------------------------------------------------------------------
// output contracts

#[test]
fn eval_prints_the_metrics_json_last_and_writes_every_prediction() {
    let t = TempDir::new("eval-ok");
    let model = tiny_model(t.path());
    let data = t.join("dev.json");
    tiny_squad(&data, 3, 4);
    let out = t.join("out");
    let o = eval(
        &model,
        &data,
        &out,
        &[
            "--max-seq-length",
            "64",
            "--max-query-length",
            "16",
            "--doc-stride",
            "16",
        ],
    );
    let m = last_json(&ok(&o));
    for k in ["exact_match", "f1"] {
        let v = m[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {m}"));
        assert!((0.0..=100.0).contains(&v), "{m}");
    }
    let preds: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("predictions.json")).unwrap())
            .unwrap();
    assert_eq!(preds.as_object().unwrap().len(), 12);
    assert!(preds["p2q3"].is_string());
    assert!(out.join("nbest_predictions.json").exists());
    assert!(!out.join("null_odds.json").exists());
    // the windows were counted, and the scores agree with `bertqa score` on the written predictions
    assert!(stderr(&o).contains("12 questions"), "{}", stderr(&o));
    let sc = last_json(&ok(&run(&[
        "score",
        s(&data),
        s(&out.join("predictions.json")),
    ])));
    assert_eq!(sc["exact_match"], m["exact_match"]);
    assert_eq!(sc["f1"], m["f1"]);
}

/// The README: `--padding` changes the speed only. The n-best lists rank each window's real tokens, so a
/// batch padded to its longest window or to --max-seq-length answers exactly as a packed one — with an
/// untrained model, whose logits at padding positions are as large as anywhere, and a short n-best list, so
/// that padding would take its slots if it were ranked.
#[test]
fn eval_answers_do_not_depend_on_the_padding() {
    let t = TempDir::new("eval-padding");
    let model = tiny_model(t.path());
    let data = t.join("dev.json");
    tiny_squad(&data, 3, 4);
    let read = |out: &Path, f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(f)).unwrap()).unwrap()
    };
    let mut runs = vec![];
    for padding in ["packed", "longest", "max"] {
        let out = t.join(&format!("out-{padding}"));
        let flags = [
            "--max-seq-length",
            "64",
            "--max-query-length",
            "16",
            "--doc-stride",
            "16",
            "--n-best-size",
            "2",
            "--padding",
            padding,
        ];
        let m = last_json(&ok(&eval(&model, &data, &out, &flags)));
        runs.push((
            padding,
            m,
            read(&out, "predictions.json"),
            read(&out, "nbest_predictions.json"),
        ));
    }
    let (_, m0, p0, n0) = &runs[0];
    for (padding, m, p, n) in &runs[1..] {
        assert_eq!(p, p0, "--padding {padding}: other answers than packed");
        assert_eq!(m["f1"], m0["f1"], "--padding {padding}");
        for (id, list) in n0.as_object().unwrap() {
            let texts = |l: &Value| -> Vec<String> {
                l.as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["text"].as_str().unwrap().to_string())
                    .collect()
            };
            assert_eq!(
                texts(&n[id]),
                texts(list),
                "--padding {padding}: n-best of {id}"
            );
        }
    }
}

#[test]
fn score_prints_official_metrics_last() {
    let t = TempDir::new("score");
    let data = t.join("dev.json");
    tiny_squad(&data, 2, 2);
    let gold: Value = serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    // every gold answer predicted: 100; one wrong: 75 EM
    let mut preds = serde_json::Map::new();
    for p in gold["data"][0]["paragraphs"].as_array().unwrap() {
        for q in p["qas"].as_array().unwrap() {
            preds.insert(
                q["id"].as_str().unwrap().into(),
                q["answers"][0]["text"].clone(),
            );
        }
    }
    let pf = t.join("preds.json");
    std::fs::write(&pf, Value::Object(preds.clone()).to_string()).unwrap();
    let out = ok(&run(&["score", s(&data), s(&pf)]));
    // byte for byte what the official v1.1 script prints (python3 evaluate-v1.1.py dev.json preds.json)
    assert_eq!(
        out.lines().last(),
        Some(r#"{"exact_match": 100.0, "f1": 100.0}"#),
        "{out}"
    );
    let m = last_json(&out);
    assert_eq!(m["exact_match"].as_f64(), Some(100.0));
    assert_eq!(m["f1"].as_f64(), Some(100.0));
    preds.insert("p0q0".into(), json!("nothing alike"));
    std::fs::write(&pf, Value::Object(preds).to_string()).unwrap();
    let m = last_json(&ok(&run(&["score", s(&data), s(&pf)])));
    assert_eq!(m["exact_match"].as_f64(), Some(75.0));
    // predictions that are not an object of id → text
    std::fs::write(&pf, "[1, 2]").unwrap();
    fails(&run(&["score", s(&data), s(&pf)]), &["preds.json"]);
}

#[test]
fn predict_prints_one_answer_with_a_finite_score() {
    let t = TempDir::new("predict");
    let model = tiny_model(t.path());
    let (ctx, _) = context_and_answers(30, 0, 1);
    let out = ok(&predict(&model, &ctx, &[]));
    let v = last_json(&out);
    let ans = v["answer"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(ctx.contains(ans), "{v}");
    let (cs, ce) = (
        v["char_start"].as_u64().unwrap(),
        v["char_end"].as_u64().unwrap(),
    );
    assert_eq!(&ctx[cs as usize..ce as usize], ans);
    assert!(v["score"].as_f64().unwrap().is_finite(), "{v}");
    let p = v["probability"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0, "{v}");
    assert_eq!(v["no_answer"], json!(false));
}

/// `score` on SQuAD v2.0 as the official evaluate-v2.0.py (tests/fixtures/score_v2): the no-answer
/// threshold of --na-prob-file applied (default 1.0, --na-prob-thresh), HasAns as "has any gold answer",
/// the best-threshold sweep breaking ties in the file's order. (Before: the threshold was never applied,
/// an answer normalising to "" made a question NoAns, ties went in dataset order.)
#[test]
fn score_v2_equals_the_official_script() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/score_v2");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let cases = expected.as_object().unwrap();
    assert_eq!(cases.len(), 6);
    for (name, case) in cases {
        let mut args = vec![
            "score".to_string(),
            s(&dir.join("data.json")).into(),
            s(&dir.join("preds.json")).into(),
        ];
        for a in case["args"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            args.push(if a.ends_with(".json") {
                s(&dir.join(a)).into()
            } else {
                a.into()
            });
        }
        let got = last_json(&ok(&run(&args)));
        let want = case["official"].as_object().unwrap();
        let got_keys: Vec<&String> = got.as_object().unwrap().keys().collect();
        assert_eq!(got_keys, want.keys().collect::<Vec<_>>(), "{name}");
        for (k, w) in want {
            assert_eq!(got[k].as_f64(), w.as_f64(), "{name}: {k}: {got}");
        }
    }
}

/// v2.0 "no answer" from predict says why, with the null odds and the span it rejected; a negative
/// threshold is accepted as run_qa's argparse accepts it (before: "unexpected argument '-1000'").
#[test]
fn predict_v2_no_answer_says_why() {
    let t = TempDir::new("predict-v2");
    let model = tiny_model(t.path());
    let (ctx, _) = context_and_answers(30, 0, 1);
    let v = last_json(&ok(&predict(
        &model,
        &ctx,
        &[
            "--version-2-with-negative",
            "--null-score-diff-threshold",
            "-1000",
        ],
    )));
    assert_eq!(
        (v["answer"].clone(), v["no_answer"].clone()),
        (json!(null), json!(true)),
        "{v}"
    );
    assert!(v["reason"].as_str().unwrap().contains("-1000"), "{v}");
    assert!(v["null_score_diff"].as_f64().unwrap().is_finite(), "{v}");
    let r = &v["rejected_span"];
    let (cs, ce) = (
        r["char_start"].as_u64().unwrap(),
        r["char_end"].as_u64().unwrap(),
    );
    assert_eq!(
        &ctx[cs as usize..ce as usize],
        r["text"].as_str().unwrap(),
        "{v}"
    );
    // and a threshold that keeps the span answers with it
    let v = last_json(&ok(&predict(
        &model,
        &ctx,
        &[
            "--version-2-with-negative",
            "--null-score-diff-threshold",
            "1000",
        ],
    )));
    assert_eq!(v["no_answer"], json!(false), "{v}");
    assert!(ctx.contains(v["answer"].as_str().unwrap()), "{v}");
}

/// The passage from a file or standard input (--context-file): the same answer as --context, for
/// passages longer than a command line can carry (over 128 KiB); one of the two is required, not both;
/// a file that is not UTF-8 is named with the offset.
#[test]
fn predict_reads_the_passage_from_a_file_or_standard_input() {
    let t = TempDir::new("predict-file");
    let model = tiny_model(t.path());
    let (ctx, _) = context_and_answers(30, 0, 1);
    let by_arg = last_json(&ok(&predict(&model, &ctx, &[])));
    let f = t.join("ctx.txt");
    std::fs::write(&f, &ctx).unwrap();
    let args = |file: &str| {
        vec![
            "predict".to_string(),
            "--model".into(),
            s(&model).into(),
            "--question".into(),
            "what was the old city named after?".into(),
            "--context-file".into(),
            file.into(),
            "--device".into(),
            "cpu".into(),
        ]
    };
    assert_eq!(last_json(&ok(&run(&args(s(&f))))), by_arg);
    // a byte-order mark is not part of the passage (the character offsets stay the passage's)
    let bom = t.join("bom.txt");
    std::fs::write(&bom, format!("\u{feff}{ctx}")).unwrap();
    assert_eq!(last_json(&ok(&run(&args(s(&bom))))), by_arg);
    let mut child = Command::new(bin())
        .args(args("-"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ctx.as_bytes())
        .unwrap();
    assert_eq!(last_json(&ok(&child.wait_with_output().unwrap())), by_arg);
    // longer than one argument may be (MAX_ARG_STRLEN, 128 KiB): the passage ends with the answer's text
    let mut long = "stone water king ".repeat(9000);
    long.push_str(&ctx);
    assert!(long.len() > 150_000);
    let big = t.join("long.txt");
    std::fs::write(&big, &long).unwrap();
    let v = last_json(&ok(&run(&args(s(&big)))));
    let (cs, ce) = (
        v["char_start"].as_u64().unwrap(),
        v["char_end"].as_u64().unwrap(),
    );
    assert_eq!(
        &long[cs as usize..ce as usize],
        v["answer"].as_str().unwrap(),
        "{v}"
    );
    // both, neither, not UTF-8
    let mut both = args(s(&f));
    both.extend(["--context".into(), "x".into()]);
    let o = run(&both);
    assert!(
        !o.status.success() && stderr(&o).contains("--context"),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "predict",
        "--model",
        s(&model),
        "--question",
        "q",
        "--device",
        "cpu",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("--context"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&f, b"the old \xff city").unwrap();
    fails(&run(&args(s(&f))), &["ctx.txt", "not UTF-8", "offset 8"]);
}

// ---------------------------------------------------------------------------------------------------------
// item 5: models that cannot run

#[test]
fn non_finite_weights_are_refused_naming_the_tensor_and_index() {
    let t = TempDir::new("nan");
    let model = tiny_model(t.path());
    let data = t.join("dev.json");
    tiny_squad(&data, 1, 1);
    let name = "bert.encoder.layer.0.output.dense.weight"; // [32, 64]
    poke_weight(&model, name, 70, f32::NAN);
    let needles = ["model.safetensors", name, "NaN", "index 70 [1, 6]"];
    fails(&eval(&model, &data, &t.join("o"), &[]), &needles);
    let e = fails(&predict(&model, "the old city", &[]), &needles);
    assert!(!e.contains("\"score\": null") && !e.contains("\"score\":null"));
    poke_weight(&model, name, 70, 0.5);
    poke_weight(&model, "qa_outputs.weight", 3, f32::INFINITY);
    fails(
        &predict(&model, "the old city", &[]),
        &["qa_outputs.weight", "inf", "index 3"],
    );
}

#[test]
fn impossible_configs_are_refused_naming_the_field() {
    let t = TempDir::new("config");
    let model = tiny_model(t.path());
    let original = std::fs::read_to_string(model.join("config.json")).unwrap();
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("layer_norm_eps", json!(0.0), &["layer_norm_eps"]),
        ("layer_norm_eps", json!(-1e-12), &["layer_norm_eps"]),
        ("intermediate_size", json!(0), &["intermediate_size"]),
        ("hidden_size", json!(0), &["hidden_size"]),
        ("num_hidden_layers", json!(0), &["num_hidden_layers"]),
        ("type_vocab_size", json!(1), &["type_vocab_size"]),
        // the tokenizer has more ids than the embedding table has rows
        ("vocab_size", json!(50), &["vocab_size is 50", "tokenizer"]),
        (
            "hidden_size",
            json!("wide"),
            &["hidden_size", "invalid type"],
        ),
    ];
    for (field, value, needles) in cases {
        std::fs::write(model.join("config.json"), &original).unwrap();
        edit_config(&model, |c| c[field] = value.clone());
        let mut n = needles.to_vec();
        n.push("config.json");
        if field == "vocab_size" {
            n.pop(); // named by the model directory and the tokenizer instead
        }
        fails(&predict(&model, "the old city", &[]), &n);
    }
    for (text, kind) in [
        ("[32, 2]", "a list"),
        ("7", "a number"),
        ("\"bert\"", "a string"),
    ] {
        std::fs::write(model.join("config.json"), text).unwrap();
        let e = fails(
            &predict(&model, "the old city", &[]),
            &["config.json must be a JSON object", kind],
        );
        assert!(!e.contains("hidden_size"), "{e}");
    }
}

#[test]
fn init_random_refuses_impossible_shapes() {
    for (flag, needle) in [
        ("--intermediate-size", "intermediate_size"),
        ("--hidden-size", "hidden_size"),
        ("--layers", "num_hidden_layers"),
        ("--heads", "num_attention_heads"),
    ] {
        let t = TempDir::new("init-bad");
        let tok = t.join("tok");
        tiny_tokenizer(&tok);
        let mut args: Vec<String> = [
            "init-random",
            "--tokenizer-from",
            s(&tok),
            "--output",
            s(&t.join("m")),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        for (f, v) in [
            ("--hidden-size", "32"),
            ("--heads", "2"),
            ("--intermediate-size", "64"),
            ("--layers", "1"),
        ] {
            args.push(f.into());
            args.push(if f == flag { "0" } else { v }.into());
        }
        let o = run(&args);
        fails(&o, &[needle]);
        assert!(!t.join("m").exists(), "{flag} 0 left an output directory");
    }
}

#[test]
fn init_random_sizes_the_vocabulary_from_the_tokenizer() {
    let t = TempDir::new("init-vocab");
    let model = tiny_model(t.path());
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let vocab_lines = std::fs::read_to_string(t.join("tok/vocab.txt"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(c["vocab_size"].as_u64(), Some(vocab_lines as u64));
    // the settings as written, not their f32 roundings (0.10000000149011612, 9.999999960041972e-13)
    let text = std::fs::read_to_string(model.join("config.json")).unwrap();
    for want in [
        "\"layer_norm_eps\": 1e-12",
        "\"hidden_dropout_prob\": 0.1,",
        "\"initializer_range\": 0.02,",
    ] {
        assert!(text.contains(want), "{want} not in {text}");
    }
}

#[test]
fn windows_longer_than_the_position_table_are_refused() {
    let t = TempDir::new("positions");
    let model = tiny_model_with(t.path(), &["--max-position-embeddings", "128"]);
    let data = t.join("dev.json");
    tiny_squad(&data, 1, 1);
    fails(
        &eval(&model, &data, &t.join("o"), &["--max-seq-length", "256"]),
        &["--max-seq-length 256", "max_position_embeddings 128"],
    );
}

#[test]
fn corrupt_weight_files_name_the_file() {
    let t = TempDir::new("corrupt");
    let model = tiny_model(t.path());
    let p = model.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    fails(
        &predict(&model, "the old city", &[]),
        &["model.safetensors", "truncated or corrupt"],
    );
    std::fs::write(&p, b"not a safetensors file at all").unwrap();
    fails(
        &predict(&model, "the old city", &[]),
        &["model.safetensors"],
    );
}

// ---------------------------------------------------------------------------------------------------------
// item 6: SQuAD files

#[test]
fn duplicate_question_ids_name_both_places() {
    let t = TempDir::new("dup");
    let model = tiny_model(t.path());
    let (ctx, ans) = context_and_answers(30, 3, 0);
    let q = |id: &str, i: usize| qa(id, &[(&ans[i].0, ans[i].1)], None);
    let data = t.join("dup.json");
    squad_file(
        &data,
        "1.1",
        vec![
            (ctx.clone(), vec![q("x", 0), q("y", 1)]),
            (ctx, vec![q("z", 2), q("x", 0)]),
        ],
    );
    let needles = [
        "dup.json",
        "duplicate question id \"x\"",
        "data[0].paragraphs[1].qas[1]",
        "data[0].paragraphs[0].qas[0]",
    ];
    fails(&eval(&model, &data, &t.join("o"), &[]), &needles);
    let pf = t.join("p.json");
    std::fs::write(&pf, r#"{"x": "the"}"#).unwrap();
    fails(&run(&["score", s(&data), s(&pf)]), &needles);
}

#[test]
fn a_v2_file_is_detected_and_scored_as_v2() {
    let t = TempDir::new("v2");
    let model = tiny_model(t.path());
    let (ctx, ans) = context_and_answers(30, 1, 0);
    let data = t.join("v2.json");
    // no "version" at all: the is_impossible questions decide
    let qas = vec![
        qa("has", &[(&ans[0].0, ans[0].1)], Some(false)),
        qa("none", &[], Some(true)),
    ];
    let v = json!({"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": qas}]}]});
    std::fs::write(&data, v.to_string()).unwrap();
    let out = t.join("o");
    let o = eval(&model, &data, &out, &[]);
    let m = last_json(&ok(&o));
    assert!(stderr(&o).contains("scoring as v2.0"), "{}", stderr(&o));
    assert_eq!(m["HasAns_total"], json!(1), "{m}");
    assert_eq!(m["NoAns_total"], json!(1), "{m}");
    assert!(out.join("null_odds.json").exists());
    // score detects it the same way
    let o = run(&["score", s(&data), s(&out.join("predictions.json"))]);
    let m2 = last_json(&ok(&o));
    assert!(stderr(&o).contains("scoring as v2.0"));
    assert_eq!(m2["exact"], m["exact"]);
    // the official script's keys: the best-threshold figures only with null odds (eval has them; score
    // with --na-prob-file), HasAns_*/NoAns_* only where there are such questions
    assert!(m["best_f1"].is_number(), "{m}");
    assert!(
        m2.get("best_f1").is_none(),
        "best_* without null odds: {m2}"
    );
    let m3 = last_json(&ok(&run(&[
        "score",
        s(&data),
        s(&out.join("predictions.json")),
        "--na-prob-file",
        s(&out.join("null_odds.json")),
    ])));
    assert_eq!(m3["best_f1"], m["best_f1"], "{m3}");
    // a v1.1 file scored with --na-prob-file is scored as v2.0; with no unanswerable question, no NoAns_*
    let v1 = t.join("v1.json");
    let v = json!({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx,
        "qas": [qa("has", &[(&ans[0].0, ans[0].1)], None)]}]}]});
    std::fs::write(&v1, v.to_string()).unwrap();
    let m4 = last_json(&ok(&run(&[
        "score",
        s(&v1),
        s(&out.join("predictions.json")),
        "--na-prob-file",
        s(&out.join("null_odds.json")),
    ])));
    assert_eq!(m4["HasAns_total"], json!(1), "{m4}");
    assert!(
        m4.get("NoAns_total").is_none() && m4["best_f1"].is_number(),
        "{m4}"
    );
}

/// A UTF-8 byte-order mark before the JSON is read past; bytes that are not UTF-8 are an error naming the
/// file and the offset of the first.
#[test]
fn a_byte_order_mark_is_read_past_and_invalid_utf8_named_by_offset() {
    let t = TempDir::new("utf8");
    let data = t.join("dev.json");
    tiny_squad(&data, 1, 2);
    let text = std::fs::read(&data).unwrap();
    let bom = t.join("bom.json");
    std::fs::write(&bom, [&[0xef, 0xbb, 0xbf][..], &text[..]].concat()).unwrap();
    let pf = t.join("p.json");
    std::fs::write(&pf, "{}").unwrap();
    ok(&run(&["score", s(&bom), s(&pf)]));
    let bad = t.join("latin1.json");
    let mut b = text.clone();
    b.insert(40, 0xe9); // 'é' in Latin-1
    std::fs::write(&bad, b).unwrap();
    fails(
        &run(&["score", s(&bad), s(&pf)]),
        &["latin1.json", "not UTF-8", "offset 40"],
    );
}

#[test]
fn files_without_questions_or_answers_are_errors() {
    let t = TempDir::new("empty");
    let model = tiny_model(t.path());
    let empty = t.join("empty.json");
    std::fs::write(&empty, r#"{"version": "1.1", "data": []}"#).unwrap();
    fails(
        &eval(&model, &empty, &t.join("o"), &[]),
        &["empty.json", "no questions"],
    );
    let pf = t.join("p.json");
    std::fs::write(&pf, "{}").unwrap();
    fails(
        &run(&["score", s(&empty), s(&pf)]),
        &["empty.json", "no questions"],
    );

    let (ctx, ans) = context_and_answers(30, 1, 0);
    let noans = t.join("noans.json");
    let mut missing = qa("gone", &[], None);
    missing.as_object_mut().unwrap().remove("answers");
    squad_file(
        &noans,
        "1.1",
        vec![(
            ctx.clone(),
            vec![qa("fine", &[(&ans[0].0, ans[0].1)], None), missing],
        )],
    );
    let needles = [
        "noans.json",
        "data[0].paragraphs[0].qas[1]",
        "\"gone\"",
        "no gold answers",
    ];
    fails(&eval(&model, &noans, &t.join("o"), &[]), &needles);
    fails(&run(&["score", s(&noans), s(&pf)]), &needles);
    // an empty list is the same
    squad_file(&noans, "1.1", vec![(ctx, vec![qa("empty", &[], None)])]);
    fails(
        &eval(&model, &noans, &t.join("o"), &[]),
        &["data[0].paragraphs[0].qas[0]"],
    );
}

// ---------------------------------------------------------------------------------------------------------
// item 7: long contexts

/// VmHWM (peak resident memory, KiB) of a running process, from /proc (Linux).
fn peak_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_long_context_is_windowed_in_bounded_memory() {
    let t = TempDir::new("long");
    let model = tiny_model(t.path());
    // ~4 MB in one context (the answer near the end), words separated by spaces and some newlines
    let n = 640_000;
    let words: Vec<&str> = (0..n)
        .map(|i| WORDS[(i * 31 + i / 7) % WORDS.len()])
        .collect();
    let mut ctx = String::with_capacity(n * 6);
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            ctx.push(if i % 97 == 0 { '\n' } else { ' ' });
        }
        ctx.push_str(w);
    }
    let start = ctx.rfind(" gold").map(|p| p + 1).unwrap_or(0);
    let data = t.join("long.json");
    squad_file(
        &data,
        "1.1",
        vec![(
            ctx.clone(),
            vec![qa("long", &[(&ctx[start..start + 4], start)], None)],
        )],
    );
    let out = t.join("o");
    let mut child = Command::new(bin())
        .args([
            "eval",
            "--model",
            s(&model),
            "--dev-file",
            s(&data),
            "--output-dir",
            s(&out),
            "--device",
            "cpu",
            "--max-seq-length",
            "128",
            "--doc-stride",
            "32",
            "--batch-size",
            "256",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if let Some(k) = peak_kib(pid) {
            peak = peak.max(k);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    let m = last_json(&ok(&o));
    assert!(m["f1"].is_number());
    let windows: usize = err
        .split(" windows")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no window count in {err}"));
    // 640k context tokens, 128 − 3 − question ≈ 115 per window, 32 overlap → ~7,700 windows
    assert!(windows > 6000, "{err}");
    println!(
        "4 MB context: {windows} windows, peak RSS {} MiB, {:.1}s",
        peak / 1024,
        t0.elapsed().as_secs_f64()
    );
    // before the fix this context needed ~700 MiB (whole-text tokenizer tables, every window held at once)
    if cfg!(target_os = "linux") {
        assert!(peak > 0, "could not read /proc/{pid}/status");
        assert!(peak < 350 * 1024, "peak RSS {} MiB", peak / 1024);
    }
}

// ---------------------------------------------------------------------------------------------------------
// item 8: option checks of eval and predict

#[test]
fn eval_and_predict_check_their_options() {
    let t = TempDir::new("flags");
    let model = tiny_model(t.path());
    let data = t.join("dev.json");
    tiny_squad(&data, 1, 1);
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--doc-stride", "61", "--max-seq-length", "128"],
            &["--doc-stride (61)", "budget of 61"],
        ),
        (&["--doc-stride", "500"], &["--doc-stride (500)"]),
        (&["--n-best-size", "0"], &["--n-best-size"]),
        (&["--max-answer-length", "0"], &["--max-answer-length"]),
        (&["--max-query-length", "0"], &["--max-query-length"]),
        (&["--max-seq-length", "0"], &["--max-seq-length"]),
        (
            &["--max-query-length", "126", "--max-seq-length", "128"],
            &["--max-query-length (126)"],
        ),
    ];
    for (flags, needles) in cases {
        fails(&eval(&model, &data, &t.join("o"), flags), needles);
        fails(&predict(&model, "the old city", flags), needles);
    }
    fails(
        &eval(&model, &data, &t.join("o"), &["--batch-size", "0"]),
        &["--batch-size"],
    );
    fails(
        &eval(&model, &data, &t.join("o"), &["--max-examples", "0"]),
        &["--max-examples"],
    );
    // the largest valid stride is fine
    ok(&eval(
        &model,
        &data,
        &t.join("o"),
        &["--doc-stride", "60", "--max-seq-length", "128"],
    ));
    // a passage of characters the tokenizer drops (zero-width spaces, a lone combining mark) has no tokens
    for passage in ["\u{200b}\u{200b}", "\u{301}", " \t"] {
        fails(
            &predict(&model, passage, &[]),
            &["--context has no tokens", "characters the tokenizer drops"],
        );
    }
}

/// The CUDA kernel switches are checked even on the CPU (one typed configuration, parsed once): an unknown
/// value of a flag or of its environment variable names it; CUDA graphs, a CUDA-only switch, leave a CPU run
/// as it is.
#[test]
fn kernel_switches_are_checked_and_cuda_graphs_leave_the_cpu_alone() {
    let t = TempDir::new("kernel-flags");
    let model = tiny_model(t.path());
    let data = t.join("dev.json");
    tiny_squad(&data, 1, 2);
    // a usage error (clap's exit code 2) naming the flag and the values it takes
    let o = eval(&model, &data, &t.join("o1"), &["--cuda-graphs", "maybe"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--cuda-graphs") && stderr(&o).contains("on, off"),
        "{}",
        stderr(&o)
    );
    let o = eval_env(
        &model,
        &data,
        &t.join("o2"),
        &[],
        &[("BERTQA_GRAPHS", "maybe")],
    );
    fails(&o, &["BERTQA_GRAPHS"]);
    let plain = last_json(&ok(&eval(&model, &data, &t.join("o3"), &[])));
    let graphs = last_json(&ok(&eval(
        &model,
        &data,
        &t.join("o4"),
        &["--cuda-graphs", "on"],
    )));
    assert_eq!(plain, graphs);
}

#[test]
fn predict_without_a_valid_span_says_there_is_no_answer() {
    let t = TempDir::new("nospan");
    let model = tiny_model(t.path());
    // with one start and one end candidate and answers of one token, the random model's best start and
    // end rarely coincide: those contexts must say "no answer", the others give a real one
    let mut no_answer = 0;
    for salt in 0..6 {
        let (ctx, _) = context_and_answers(12, 0, salt);
        let out = ok(&predict(
            &model,
            &ctx,
            &["--n-best-size", "1", "--max-answer-length", "1"],
        ));
        assert!(
            !out.contains("null,\"probability\"") && !out.contains("\"score\":null"),
            "{out}"
        );
        let v = last_json(&out);
        if v["no_answer"] == json!(true) {
            no_answer += 1;
            assert!(v["answer"].is_null(), "{v}");
            assert!(
                v.get("probability").is_none() && v.get("score").is_none(),
                "{v}"
            );
            assert!(
                v["reason"].as_str().unwrap().contains("no valid span"),
                "{v}"
            );
        } else {
            assert!(v["score"].as_f64().unwrap().is_finite(), "{v}");
        }
    }
    assert!(
        no_answer > 0,
        "no context without a valid span: make the case harder"
    );
    // an empty context has nothing to answer from
    fails(&predict(&model, "  ", &[]), &["--context"]);
    // eval says how many questions had no valid span (they are answered with the empty string)
    let data = t.join("dev.json");
    tiny_squad(&data, 2, 3);
    let o = eval(
        &model,
        &data,
        &t.join("o"),
        &["--n-best-size", "1", "--max-answer-length", "1"],
    );
    last_json(&ok(&o));
    assert!(stderr(&o).contains("had no valid span"), "{}", stderr(&o));
}

// ---------------------------------------------------------------------------------------------------------
// item 9: overwrites

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn init_random_refuses_a_non_empty_output_unless_forced() {
    let t = TempDir::new("init-force");
    let model = tiny_model(t.path());
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    std::fs::write(model.join("trained.txt"), "keep me").unwrap();
    let args = |out: &Path, extra: &[&str]| {
        let mut a: Vec<String> = [
            "init-random",
            "--tokenizer-from",
            s(&t.join("tok")),
            "--output",
            s(out),
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--intermediate-size",
            "64",
            "--seed",
            "5",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    fails(
        &run(&args(&model, &[])),
        &["--output", "not empty", "--force"],
    );
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
    assert!(model.join("trained.txt").exists());
    ok(&run(&args(&model, &["--force"])));
    assert_ne!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
    assert!(
        !model.join("trained.txt").exists(),
        "--force replaces the directory"
    );
    // nothing left beside it
    assert_eq!(listing(t.path()), vec!["model", "tok"]);
    // what a killed write left beside it is named (it may belong to a live process elsewhere), not removed
    let leftovers = [
        ".model.tmp-99999999",
        ".model.tmp-1-1764554400000000000",
        ".model.old-7",
        ".model.tmp-x",
        ".modelx.tmp-7",
    ];
    for d in leftovers {
        std::fs::create_dir(t.join(d)).unwrap();
    }
    let o = run(&args(&model, &["--force"]));
    ok(&o);
    assert!(
        stderr(&o).contains(
            ".model.old-7, .model.tmp-1-1764554400000000000, .model.tmp-99999999, left by a write of it \
             that was interrupted"
        ),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains(".model.tmp-x") && !stderr(&o).contains(".modelx"));
    for d in leftovers {
        assert!(t.join(d).is_dir(), "{d} kept");
        std::fs::remove_dir(t.join(d)).unwrap();
    }
    // an empty directory is fine without --force
    let empty = t.join("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(&run(&args(&empty, &[])));
}

#[test]
fn convert_refuses_in_place_and_non_empty_outputs_unless_forced() {
    let t = TempDir::new("convert");
    let model = tiny_model(t.path());
    let data = t.join("dev.json");
    tiny_squad(&data, 1, 2);
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let conv = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "convert",
            "--model",
            s(&model),
            "--output",
            s(out),
            "--dtype",
            "f16",
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    fails(
        &conv(&model, &[]),
        &["--output", "--model", "in place", "--force"],
    );
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
    // a non-empty other directory
    let other = t.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("x"), "x").unwrap();
    fails(&conv(&other, &[]), &["not empty", "--force"]);
    // a fresh one works, and --force converts in place via a temporary directory
    ok(&conv(&t.join("fresh"), &[]));
    ok(&conv(&model, &["--force"]));
    let after = std::fs::read(model.join("model.safetensors")).unwrap();
    assert!(after.len() < before.len() * 2 / 3, "f16 weights expected");
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        std::fs::read(t.join("fresh/model.safetensors")).unwrap()
    );
    assert!(model.join("vocab.txt").exists() && model.join("config.json").exists());
    assert_eq!(
        listing(t.path()),
        vec!["dev.json", "fresh", "model", "other", "tok"]
    );
    ok(&eval(&model, &data, &t.join("o"), &[]));
    // config.json says the dtype written, in both fields transformers reads (transformers 5 loads in
    // `dtype`: a copied "float16" made it load an f32 file as f16), whatever the source's config said
    let dtypes = |d: &Path| {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        (c["dtype"].clone(), c["torch_dtype"].clone())
    };
    assert_eq!(dtypes(&model), ("float16".into(), "float16".into()));
    for (dt, name) in [("f32", "float32"), ("bf16", "bfloat16")] {
        let out = t.join(&format!("back-{dt}"));
        ok(&run(&[
            "convert",
            "--model",
            s(&model),
            "--output",
            s(&out),
            "--dtype",
            dt,
        ]));
        assert_eq!(dtypes(&out), (name.into(), name.into()), "{dt}");
    }
}

#[test]
fn convert_refuses_weights_beyond_the_target_range() {
    let t = TempDir::new("convert-range");
    let model = tiny_model(t.path());
    let name = "bert.encoder.layer.0.output.dense.weight";
    let conv = |out: &Path, dt: &str| {
        run(&[
            "convert",
            "--model",
            s(&model),
            "--output",
            s(out),
            "--dtype",
            dt,
        ])
    };
    // IEEE half: 65519 rounds down to the largest finite value (65504), 65520 up to +inf
    poke_weight(&model, name, 70, 65519.0);
    ok(&conv(&t.join("f16-ok"), "f16"));
    poke_weight(&model, name, 70, -65520.0);
    fails(
        &conv(&t.join("f16"), "f16"),
        &[name, "-65520", "index 70", "f16", "-inf", "bf16 or f32"],
    );
    assert!(!t.join("f16").exists(), "nothing written");
    ok(&conv(&t.join("bf16"), "bf16"));
    ok(&conv(&t.join("f32"), "f32"));
}

// ---------------------------------------------------------------------------------------------------------
// train: runs that cannot be lost or mixed (items 1-4), the last-line contract

/// `bertqa train` flags for a tiny run of `model` on `data` into `out` (4 questions per step, 64 tokens,
/// 2 epochs, evaluation on the training file), then `extra`.
fn train_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--model",
        s(model),
        "--train-file",
        s(data),
        "--dev-file",
        s(data),
        "--output-dir",
        s(out),
        "--device",
        "cpu",
        "--max-seq-length",
        "64",
        "--max-query-length",
        "16",
        "--doc-stride",
        "16",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--learning-rate",
        "1e-3",
        "--seed",
        "7",
        "--no-progress",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// A tiny model and training file in `t`: (model, data).
/// [`train_args`] without its `--dev-file DATA`.
fn without_dev_file(mut args: Vec<String>) -> Vec<String> {
    let i = args.iter().position(|a| a == "--dev-file").unwrap();
    args.drain(i..i + 2);
    args
}

fn train_setup(t: &TempDir) -> (PathBuf, PathBuf) {
    let model = tiny_model(t.path());
    let data = t.join("train.json");
    tiny_squad(&data, 4, 4); // 16 questions, 24 windows → 6 steps per epoch
    (model, data)
}

/// `bertqa train ARGS` with `env` set, stdout and stderr piped.
fn spawn_train(args: &[String], env: &[(&str, &str)]) -> std::process::Child {
    let mut c = Command::new(bin());
    c.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("spawning bertqa train")
}

fn run_env(args: &[String], env: &[(&str, &str)]) -> Output {
    spawn_train(args, env).wait_with_output().unwrap()
}

/// Wait (up to 60 s) until `cond` holds.
#[track_caller]
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed().as_secs() < 60, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether `out/metrics.jsonl` has a line for a step.
fn has_a_step(out: &Path) -> bool {
    std::fs::read_to_string(out.join("metrics.jsonl")).is_ok_and(|s| s.contains("\"loss\""))
}

/// Whether process `pid` has a handler for `sig` (/proc/PID/status, SigCgt).
fn catches(pid: u32, sig: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let m = s
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&m, 16).ok()
        })
        .is_some_and(|m| m & (1u64 << (sig - 1)) != 0)
}

/// The exit code and output of `child`, which must end within `secs` seconds of `what` (else it is killed
/// and the test fails).
fn exit_within(mut child: std::process::Child, secs: u64, what: &str) -> (Option<i32>, Output) {
    let t0 = std::time::Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if t0.elapsed().as_secs() > secs {
            let _ = child.kill();
            panic!("still running {secs} s after {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    (code, child.wait_with_output().unwrap())
}

fn send(child: &std::process::Child, sig: i32) {
    // SAFETY: sending a signal to our own child process
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

/// (step, loss bits, grad-norm bits) of every step line of `out/metrics.jsonl`.
fn step_lines(out: &Path) -> Vec<(u64, u64, u64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let loss = v.get("loss")?.as_f64()?;
            Some((
                v["step"].as_u64().unwrap(),
                loss.to_bits(),
                v["grad_norm"].as_f64().unwrap().to_bits(),
            ))
        })
        .collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// Entries of `dir` that are debris of a save or a lock: hidden temporaries, `.old`, `.del`, the lock.
fn debris(dir: &Path) -> Vec<String> {
    listing(dir)
        .into_iter()
        .filter(|n| n.starts_with('.') || n.ends_with(".old") || n == "bertqa.lock")
        .collect()
}

/// Every checkpoint-N in `out` is complete and loads (`bertqa eval` on it).
#[track_caller]
fn checkpoints_load(out: &Path, data: &Path) -> Vec<String> {
    let ck: Vec<String> = listing(out)
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    for c in &ck {
        let d = out.join(c);
        for f in [
            "config.json",
            "model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(d.join(f).is_file(), "{c} lacks {f}: {:?}", listing(&d));
        }
        let o = eval(
            &d,
            data,
            &out.join("../eval-ck"),
            &[
                "--max-seq-length",
                "64",
                "--max-query-length",
                "16",
                "--doc-stride",
                "16",
                "--max-examples",
                "2",
            ],
        );
        last_json(&ok(&o));
    }
    ck
}

#[test]
fn train_prints_the_metrics_json_last_and_refuses_to_mix_runs() {
    let t = TempDir::new("reuse");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let o = run(&train_args(&model, &data, &out, &[]));
    let m = last_json(&ok(&o));
    assert!(m["f1"].is_number() && m["exact_match"].is_number(), "{m}");
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["interrupted"], json!(false));
    assert!(
        !out.join("bertqa.lock").exists(),
        "the lock outlived the run"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    // a second run into the same directory is refused, and changes nothing
    let e = fails(
        &run(&train_args(&model, &data, &out, &[])),
        &["already holds a run", "--resume", "--overwrite-output-dir"],
    );
    assert!(e.contains("metrics.jsonl"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        metrics
    );
    // any one of a run's files is enough to refuse
    for marker in [
        "metrics.jsonl",
        "summary.json",
        "predictions.json",
        "best/",
        "checkpoint-3/",
    ] {
        let d = t.join("marked");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        match marker.strip_suffix('/') {
            Some(dir) => {
                std::fs::create_dir(d.join(dir)).unwrap();
                // (a checkpoint-N without its files is the debris of a crash, removed at start)
                for f in [
                    "config.json",
                    "model.safetensors",
                    "optimizer.safetensors",
                    "trainer_state.json",
                ] {
                    std::fs::write(d.join(dir).join(f), "{}").unwrap();
                }
            }
            None => std::fs::write(d.join(marker), "{}").unwrap(),
        }
        fails(
            &run(&train_args(&model, &data, &d, &[])),
            &[marker.trim_end_matches('/'), "--overwrite-output-dir"],
        );
    }
    // --overwrite-output-dir removes bertqa's files and debris, and nothing of the user's
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    std::fs::create_dir(out.join("checkpoint-notes")).unwrap();
    std::fs::create_dir(out.join(".checkpoint-9.tmp12345")).unwrap();
    std::fs::create_dir(out.join("best.old")).unwrap();
    fails(
        &run(&train_args(
            &model,
            &data,
            &out,
            &["--overwrite-output-dir", "--resume"],
        )),
        &["--resume", "--overwrite-output-dir"],
    );
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &["--overwrite-output-dir", "--epochs", "1"],
    ));
    last_json(&ok(&o));
    assert!(
        stderr(&o).contains("--overwrite-output-dir: removed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(out.join("checkpoint-notes").is_dir());
    assert_eq!(debris(&out), Vec::<String>::new());
    // one run's steps, once each: 1 epoch of 6 steps (the first run had 12)
    let steps: Vec<u64> = step_lines(&out).iter().map(|l| l.0).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(
        listing(&out)
            .into_iter()
            .filter(|n| n.starts_with("checkpoint-"))
            .collect::<Vec<_>>(),
        vec!["checkpoint-6", "checkpoint-notes"]
    );
}

#[test]
fn a_live_run_locks_its_directory_and_a_stale_lock_is_taken_over() {
    let t = TempDir::new("lock");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let args = train_args(
        &model,
        &data,
        &out,
        &["--save-every", "1", "--epochs", "50"],
    );
    let mut child = spawn_train(&args, &[("BERTQA_TEST_STEP_DELAY_MS", "50")]);
    wait_until("the first checkpoint", || {
        out.join("checkpoint-1/trainer_state.json").exists()
    });
    let pid = child.id().to_string();
    for extra in [&["--resume"][..], &[][..], &["--overwrite-output-dir"][..]] {
        let mut a = train_args(&model, &data, &out, extra);
        a.extend([
            "--save-every".into(),
            "1".into(),
            "--epochs".into(),
            "50".into(),
        ]);
        fails(
            &run(&a),
            &["in use by another bertqa run", &pid, "bertqa.lock"],
        );
    }
    // kill -9: the lock stays behind, naming a dead process; the next --resume takes it over
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(out.join("bertqa.lock").exists());
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &["--resume", "--max-steps", "3"],
    ));
    ok(&o);
    assert!(
        stderr(&o).contains("taking over a stale lock"),
        "{}",
        stderr(&o)
    );
    assert!(!out.join("bertqa.lock").exists());
    // a lock naming a live process on this host (without its flock: another kind of file system) is
    // refused too
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if !host.is_empty() {
        let me = std::process::id();
        std::fs::write(
            out.join("bertqa.lock"),
            json!({"pid": me, "host": host, "started": 0}).to_string(),
        )
        .unwrap();
        fails(
            &run(&train_args(&model, &data, &out, &["--resume"])),
            &["in use by another bertqa run", &format!("pid {me}")],
        );
        std::fs::remove_file(out.join("bertqa.lock")).unwrap();
    }
}

#[test]
fn crashes_during_saves_leave_only_loadable_checkpoints_and_resume_exactly() {
    let t = TempDir::new("kill9");
    let (model, data) = train_setup(&t);
    let flags = [
        "--save-every",
        "1",
        "--eval-every",
        "2",
        "--save-total-limit",
        "2",
    ];
    // the uninterrupted run
    let reference = t.join("reference");
    let want = last_json(&ok(&run(&train_args(&model, &data, &reference, &flags))));
    let want_steps = step_lines(&reference);
    assert!(want_steps.len() >= 8, "{want_steps:?}");
    // the same run, aborted (as by kill -9) at each stage of a save in turn, each time resumed
    let out = t.join("run");
    let stages = [
        "best:before-rename",
        "save:after-model",
        "save:after-optimizer",
        "save:before-rename",
        "best:after-move-aside",
        "save:during-prune",
    ];
    for (i, stage) in stages.iter().enumerate() {
        let mut extra = flags.to_vec();
        if i > 0 {
            extra.push("--resume");
        }
        let o = run_env(
            &train_args(&model, &data, &out, &extra),
            &[("BERTQA_TEST_FAULT", stage)],
        );
        assert_eq!(o.status.code(), None, "{stage}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("aborting at {stage}")),
            "{}",
            stderr(&o)
        );
        let ck = checkpoints_load(&out, &data);
        assert!(!ck.is_empty(), "{stage}: no checkpoint");
        assert!(
            !debris(&out).is_empty(),
            "{stage} left no debris: not a crash mid-save?"
        );
    }
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &[&flags[..], &["--resume"]].concat(),
    ));
    let got = last_json(&ok(&o));
    let err = stderr(&o);
    // the last crash: a pruned checkpoint half-deleted under its hidden name
    assert!(err.contains("removed .checkpoint-1.del"), "{err}");
    assert_eq!(debris(&out), Vec::<String>::new());
    checkpoints_load(&out, &data);
    assert_eq!(got, want);
    assert_eq!(step_lines(&out), want_steps);
}

#[test]
fn the_debris_of_earlier_crashes_is_cleaned_and_an_old_copy_restored() {
    let t = TempDir::new("debris");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    ok(&run(&train_args(
        &model,
        &data,
        &out,
        &["--max-steps", "2", "--save-every", "1"],
    )));
    // what older versions left: temporaries, a half-pruned checkpoint-N, a half-deleted X.old beside X,
    // and an X.old without X (a crash between the two renames of a save: the complete previous version)
    std::fs::create_dir(out.join(".checkpoint-7.tmp999")).unwrap();
    std::fs::create_dir(out.join(".best.tmp999")).unwrap();
    std::fs::write(out.join(".metrics.jsonl.tmp999"), "x").unwrap();
    std::fs::create_dir(out.join("checkpoint-0")).unwrap();
    std::fs::write(out.join("checkpoint-0/trainer_state.json"), "{}").unwrap();
    std::fs::create_dir(out.join("checkpoint-1.old")).unwrap();
    std::fs::rename(out.join("best"), out.join("best.old")).unwrap();
    std::fs::write(out.join(".user-file.tmp1"), "not ours").unwrap();
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &["--resume", "--max-steps", "3", "--save-every", "1"],
    ));
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("restored best from best.old"), "{err}");
    for n in [
        ".checkpoint-7.tmp999",
        ".best.tmp999",
        "checkpoint-0",
        "checkpoint-1.old",
    ] {
        assert!(err.contains(&format!("removed {n}")), "{n}: {err}");
    }
    assert_eq!(debris(&out), vec![".user-file.tmp1"]);
    assert!(out.join("best/model.safetensors").exists());
}

/// A run that died before its first checkpoint (here: killed in its first save) left files but nothing to
/// continue from. With only its logs there (metrics.jsonl), the same command is refused, pointing to
/// `--resume`, which starts it again from step 0 in their place (named on stderr) and ends exactly as an
/// uninterrupted run. With best/ there (an evaluation came before the first save), nothing is removed: both
/// are refused, naming the way out.
#[test]
fn a_run_that_died_before_its_first_checkpoint_is_started_again() {
    let t = TempDir::new("nockpt");
    let (model, data) = train_setup(&t);
    let flags = ["--save-every", "3"];
    let reference = t.join("reference");
    let want = last_json(&ok(&run(&train_args(&model, &data, &reference, &flags))));
    let crash = |out: &Path, flags: &[&str]| {
        let o = run_env(
            &train_args(&model, &data, out, flags),
            &[("BERTQA_TEST_FAULT", "save:after-model")],
        );
        assert_eq!(o.status.code(), None, "{}", stderr(&o));
        assert!(!listing(out).iter().any(|n| n.starts_with("checkpoint-")));
    };
    {
        let out = t.join("run");
        crash(&out, &flags);
        assert!(out.join("metrics.jsonl").is_file() && !out.join("best").exists());
        fails(
            &run(&train_args(&model, &data, &out, &flags)),
            &[
                "already holds a run",
                "pass --resume to start it again from step 0",
            ],
        );
        let o = run(&train_args(
            &model,
            &data,
            &out,
            &[&flags[..], &["--resume"]].concat(),
        ));
        let got = last_json(&ok(&o));
        let err = stderr(&o);
        assert!(
            err.contains("saved nothing): starting from step 0")
                && err.contains("in place of its metrics.jsonl"),
            "{err}"
        );
        assert_eq!(got, want);
        assert_eq!(step_lines(&out), step_lines(&reference));
        assert_eq!(debris(&out), Vec::<String>::new());
    }
    // an evaluation at step 2 wrote best/ before the save at step 3 crashed: a model, never removed unasked
    let out = t.join("with-best");
    let flags = ["--save-every", "3", "--eval-every", "2"];
    crash(&out, &flags);
    assert!(out.join("best/model.safetensors").is_file());
    fails(
        &run(&train_args(&model, &data, &out, &flags)),
        &["already holds a run", "best"],
    );
    fails(
        &run(&train_args(
            &model,
            &data,
            &out,
            &[&flags[..], &["--resume"]].concat(),
        )),
        &["nothing to continue from", "best", "--overwrite-output-dir"],
    );
    assert!(out.join("best/model.safetensors").is_file());
    // an empty directory holds no run to resume: still an error
    let empty = t.join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &run(&train_args(&model, &data, &empty, &["--resume"])),
        &["--resume: no checkpoint-*"],
    );
}

/// A dev set that shares questions with the training set (the same file, or a copy) gets a warning that
/// its scores measure fit, not generalisation; a disjoint one does not.
#[test]
fn a_dev_set_that_overlaps_the_training_set_is_warned_about() {
    let t = TempDir::new("overlap");
    let (model, data) = train_setup(&t);
    let needle = "are also in the training file";
    let out = t.join("same");
    let o = run(&train_args(&model, &data, &out, &["--max-steps", "1"]));
    ok(&o);
    assert!(
        stderr(&o).contains(&format!(
            "warning: {}: 16 of 16 questions {needle} {}",
            data.display(),
            data.display()
        )),
        "{}",
        stderr(&o)
    );
    // other passages (another salt of the generator): no warning
    let dev = t.join("dev.json");
    let (ctx, ans) = context_and_answers(45, 2, 9);
    let qs = ans
        .iter()
        .enumerate()
        .map(|(q, (a, st))| qa(&format!("d{q}"), &[(a, *st)], None))
        .collect();
    squad_file(&dev, "1.1", vec![(ctx, qs)]);
    let mut args = train_args(&model, &data, &t.join("other"), &["--max-steps", "1"]);
    let i = args.iter().position(|a| a == "--dev-file").unwrap();
    args[i + 1] = s(&dev).to_string();
    let o = run(&args);
    ok(&o);
    assert!(!stderr(&o).contains(needle), "{}", stderr(&o));
}

/// An answer made of characters the tokenizer drops is not trained on, and a warning names it.
#[test]
fn answers_without_tokens_are_named_and_not_trained_on() {
    let t = TempDir::new("notokens");
    let (model, data) = train_setup(&t);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    let para = &mut v["data"][0]["paragraphs"][0];
    let ctx = format!("{} \u{1c} end", para["context"].as_str().unwrap());
    let at = ctx.chars().count() - 5;
    para["context"] = json!(ctx);
    para["qas"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "ctrl", "question": "which?",
        "answers": [{"text": "\u{1c}", "answer_start": at}]}));
    std::fs::write(&data, v.to_string()).unwrap();
    let out = t.join("run");
    let o = run(&train_args(&model, &data, &out, &["--max-steps", "1"]));
    ok(&o);
    assert!(
        stderr(&o).contains("warning: --train-file: 1 answer covers no token of its passage")
            && stderr(&o).contains(r#"kept for evaluation: "ctrl" ("\u{1c}")"#),
        "{}",
        stderr(&o)
    );
}

/// A standard output that cannot be written (a full disk: /dev/full) is an error, not a panic: `score`
/// exits 1 naming it; `train` completes its run and its files, then exits 1 saying so. A standard error
/// that cannot be written (its log's disk full, the pipe's reader gone) never stops a run.
#[test]
fn unwritable_stdout_is_an_error_and_unwritable_stderr_is_ignored() {
    let t = TempDir::new("devfull");
    let (model, data) = train_setup(&t);
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full")
    };
    let with = |args: &[String], out: std::fs::File, err: std::fs::File| {
        Command::new(bin())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .output()
            .unwrap()
    };
    let preds = t.join("preds.json");
    std::fs::write(&preds, "{}").unwrap();
    let score: Vec<String> = ["score", s(&data), s(&preds)].map(String::from).to_vec();
    let log = t.join("log");
    let o = with(&score, full(), std::fs::File::create(&log).unwrap());
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("error: writing to standard output"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // --help and --version alike (clap printed them and exited 0 whatever the write gave); a reader that
    // stops early is no error
    for args in [vec!["--help"], vec!["train", "--help"], vec!["--version"]] {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let o = with(&args, full(), std::fs::File::create(&log).unwrap());
        let err = std::fs::read_to_string(&log).unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("error: writing to standard output"), "{err}");
    }
    let mut c = Command::new(bin())
        .args(["train", "--help"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take()); // the reader is gone before anything is written
    let o = c.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    // train: the run completes (summary.json), then the lines it could not print make it exit 1
    let out = t.join("run");
    let args = train_args(&model, &data, &out, &["--max-steps", "2"]);
    let o = with(&args, full(), std::fs::File::create(&log).unwrap());
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("its files in") && err.contains("are complete"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(read_json(&out.join("summary.json"))["steps"], json!(2));
    // interrupted with stdout on a full disk: still 130 (a wrapper resumes on it), with a warning
    let out3 = t.join("run3");
    let mut c = Command::new(bin());
    c.args(train_args(&model, &data, &out3, &[]))
        .env("BERTQA_TEST_STEP_DELAY_MS", "60")
        .stdin(std::process::Stdio::null())
        .stdout(full())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    wait_until("the first step", || has_a_step(&out3));
    send(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("continue it with --resume"),
        "{}",
        stderr(&o)
    );
    // stderr on a full disk: the run goes on and finishes (its warnings and progress are lost, nothing else)
    let out2 = t.join("run2");
    let args = train_args(&model, &data, &out2, &["--max-steps", "2"]);
    let o = with(&args, std::fs::File::create(&log).unwrap(), full());
    assert!(o.status.success(), "{:?}", o.status);
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(last_json(&printed).get("f1").is_some(), "{printed}");
    assert_eq!(read_json(&out2.join("summary.json"))["steps"], json!(2));
}

/// Entries with bertqa's names that bertqa did not write stay: a checkpoint-N that still holds its weights
/// but lacks the optimizer state (stripped to save space) is not debris, and a plain file named like a
/// checkpoint folder is neither removed by --overwrite-output-dir nor taken over by --resume.
#[test]
fn entries_with_our_names_that_we_did_not_write_stay() {
    let t = TempDir::new("ournames");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let flags = ["--max-steps", "2", "--save-every", "1"];
    ok(&run(&train_args(&model, &data, &out, &flags)));
    std::fs::remove_file(out.join("checkpoint-1/optimizer.safetensors")).unwrap();
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &["--max-steps", "3", "--resume"],
    ));
    ok(&o);
    assert!(
        !stderr(&o).contains("removed checkpoint-1"),
        "{}",
        stderr(&o)
    );
    assert!(out.join("checkpoint-1/model.safetensors").is_file());
    // a file where a checkpoint folder would go
    let out2 = t.join("run2");
    std::fs::create_dir_all(&out2).unwrap();
    std::fs::write(out2.join("checkpoint-1"), "mine").unwrap();
    fails(
        &run(&train_args(
            &model,
            &data,
            &out2,
            &[&flags[..], &["--overwrite-output-dir"]].concat(),
        )),
        &["checkpoint-1", "not removing anything"],
    );
    fails(
        &run(&train_args(
            &model,
            &data,
            &out2,
            &[&flags[..], &["--resume"]].concat(),
        )),
        &["checkpoint-1", "files where bertqa writes folders"],
    );
    assert_eq!(
        std::fs::read_to_string(out2.join("checkpoint-1")).unwrap(),
        "mine"
    );
}

/// A run whose update overflows the weights (here a weight decay of 1e39) stops with an error naming the
/// first non-finite weight: no F1 scored from NaN logits, no best/ or checkpoint that `eval` would refuse.
#[test]
fn a_diverged_run_saves_and_scores_nothing() {
    let t = TempDir::new("diverged");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let flags = [
        "--weight-decay",
        "1e39",
        "--learning-rate",
        "0.5",
        "--warmup-ratio",
        "0",
        "--epochs",
        "1",
    ];
    let o = run(&train_args(&model, &data, &out, &flags));
    fails(
        &o,
        &["the weights are non-finite", "smaller --learning-rate"],
    );
    assert!(!stdout(&o).contains("exact_match"), "{}", stdout(&o));
    assert_eq!(listing(&out), vec!["metrics.jsonl"]);
    // with a save before the first evaluation: the save refuses
    let out2 = t.join("run2");
    let o = run(&train_args(
        &model,
        &data,
        &out2,
        &[&flags[..], &["--save-every", "2"]].concat(),
    ));
    fails(&o, &["non-finite value", "refusing to save"]);
    assert!(!listing(&out2).iter().any(|n| n.starts_with("checkpoint-")));
    // an evaluation right after the step that overflowed them (an applied step): not scored either
    let out3 = t.join("run3");
    let o = run(&train_args(
        &model,
        &data,
        &out3,
        &[&flags[..], &["--eval-every", "1"]].concat(),
    ));
    fails(&o, &["step 1: the weights are non-finite"]);
    assert_eq!(listing(&out3), vec!["metrics.jsonl"]);
}

/// Edge values and malformed inputs get errors that name the flag or the place, not a wrapped number, a
/// panic or a silently ignored flag.
#[test]
fn edge_inputs_get_named_errors() {
    let t = TempDir::new("edges");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    // a number of epochs whose steps cannot be counted (it wrapped to 0 steps, exit 0)
    fails(
        &run(&train_args(
            &model,
            &data,
            &out,
            &["--epochs", "4611686018427387904"],
        )),
        &[
            "--epochs 4611686018427387904",
            "more steps than can be counted",
        ],
    );
    // flags that act through the dev set, without one (they were ignored)
    for (flag, v) in [
        ("--eval-every", "1"),
        ("--early-stopping-patience", "1"),
        ("--max-eval-examples", "1"),
    ] {
        let args = without_dev_file(train_args(&model, &data, &out, &[flag, v]));
        fails(&run(&args), &[flag, "needs --dev-file"]);
    }
    // … nor on --resume of a run that evaluates (its checkpoint's --eval-every)
    let ev = t.join("evals");
    ok(&run(&train_args(
        &model,
        &data,
        &ev,
        &["--eval-every", "2", "--max-steps", "2"],
    )));
    let args = without_dev_file(train_args(
        &model,
        &data,
        &ev,
        &["--resume", "--max-steps", "4"],
    ));
    fails(
        &run(&args),
        &["--eval-every (from its checkpoint) needs --dev-file"],
    );
    // negative values reach the flag's own check (clap took them for unknown flags)
    fails(
        &run(&train_args(&model, &data, &out, &["--max-grad-norm", "-1"])),
        &["--max-grad-norm", "got -1"],
    );
    let o = run(&train_args(&model, &data, &out, &["--epochs", "-1"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("'--epochs <EPOCHS>'"), "{}", stderr(&o));
    // a batch whose rows cannot be counted (the product wrapped)
    fails(
        &eval(
            &model,
            &data,
            &t.join("ev"),
            &["--batch-size", "18446744073709551615"],
        ),
        &[
            "--batch-size 18446744073709551615",
            "more rows than can be counted",
        ],
    );
    // an --output-dir that is a file: refused before the model runs
    std::fs::write(t.join("afile"), "").unwrap();
    fails(
        &eval(&model, &data, &t.join("afile"), &[]),
        &["--output-dir", "is not a folder"],
    );
    // a SQuAD file with a second document after the first (Python's json.load: "Extra data")
    let text = std::fs::read_to_string(&data).unwrap();
    let twice = t.join("twice.json");
    std::fs::write(&twice, format!("{text}\n{text}")).unwrap();
    let preds = t.join("preds.json");
    std::fs::write(&preds, r#"{"p0q0": "x"}"#).unwrap();
    fails(
        &run(&["score", s(&twice), s(&preds)]),
        &["twice.json", "after the JSON document"],
    );
    // a prediction that is not a string: the id is named
    std::fs::write(&preds, r#"{"p0q0": 5}"#).unwrap();
    fails(
        &run(&["score", s(&data), s(&preds)]),
        &["\"p0q0\"", "not a string"],
    );
    // init-random with shapes no machine holds: an error, no panic, nothing left behind
    let tok = t.join("tok");
    tiny_tokenizer(&tok);
    let big = t.join("big");
    for (flag, v) in [
        ("--hidden-size", "18446744073709551615"),
        ("--layers", "1000000000000"),
    ] {
        let o = run(&[
            "init-random",
            "--tokenizer-from",
            s(&tok),
            "--output",
            s(&big),
            "--heads",
            "1",
            flag,
            v,
        ]);
        fails(&o, &[]);
        let err = stderr(&o);
        assert!(
            err.contains("more bytes than can be counted")
                || err.contains("more than this machine can hold"),
            "{flag}: {err}"
        );
        assert!(
            !listing(t.path()).iter().any(|n| n.starts_with(".big")),
            "{:?}",
            listing(t.path())
        );
    }
}

/// A loss/F1 chart that cannot be drawn is a warning naming it, not a silent leftover of an earlier step,
/// and not a failed run.
#[test]
fn a_chart_that_cannot_be_written_is_a_warning() {
    let t = TempDir::new("curves");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    ok(&run(&train_args(
        &model,
        &data,
        &out,
        &["--max-steps", "2", "--save-every", "1"],
    )));
    // in the chart's place, an empty folder: the rename onto it fails
    std::fs::remove_file(out.join("curves.svg")).unwrap();
    std::fs::create_dir(out.join("curves.svg")).unwrap();
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &["--max-steps", "3", "--resume"],
    ));
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("warning:") && err.contains("curves.svg not drawn"),
        "{err}"
    );
    assert_eq!(read_json(&out.join("summary.json"))["steps"], json!(3));
    assert_eq!(debris(&out), Vec::<String>::new());
}

/// A file over the size limit (`ulimit -f`) is an error naming it ("File too large"), not a silent death by
/// SIGXFSZ, and the output directory is not left half-written.
#[test]
fn a_file_size_limit_is_a_named_error() {
    let t = TempDir::new("ulimit");
    let tok = t.join("tok");
    tiny_tokenizer(&tok);
    let model = t.join("model");
    let o = Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 8 && exec \"$0\" \"$@\"")
        .arg(bin())
        .args([
            "init-random",
            "--tokenizer-from",
            s(&tok),
            "--hidden-size",
            "64",
            "--layers",
            "1",
            "--heads",
            "2",
            "--intermediate-size",
            "128",
            "--output",
            s(&model),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    fails(&o, &["File too large", "model.safetensors"]);
    assert!(!model.exists());
    assert_eq!(listing(t.path()), vec!["tok"]);
}

/// `--resume` never mixes two runs' files: not from an earlier checkpoint of a directory that holds later
/// ones (the abandoned future would sit beside the new one, and a later `--resume` would pick it), not from
/// another directory into one that holds a run; and a finished run resumed again trains nothing and leaves
/// its files as they were (a scheduler relaunching `--resume` after the end).
#[test]
fn resume_never_mixes_two_runs_and_a_finished_run_is_left_alone() {
    let t = TempDir::new("resumemix");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let keep_all = [
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--save-total-limit",
        "0",
    ];
    ok(&run(&train_args(&model, &data, &out, &keep_all)));
    let ck2 = out.join("checkpoint-2");
    let before = listing(&out);
    let summary = std::fs::read(out.join("summary.json")).unwrap();
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    // an earlier checkpoint of this directory, while later ones exist
    fails(
        &run(&train_args(&model, &data, &out, &["--resume", s(&ck2)])),
        &[
            "later checkpoints",
            "checkpoint-4",
            "checkpoint-6",
            "another --output-dir",
        ],
    );
    assert_eq!(listing(&out), before);
    // into another directory: one that holds a run is refused, an empty one continues from step 2
    let other = t.join("other");
    ok(&run(&train_args(
        &model,
        &data,
        &other,
        &["--max-steps", "1"],
    )));
    fails(
        &run(&train_args(&model, &data, &other, &["--resume", s(&ck2)])),
        &["another directory", "already holds a run"],
    );
    let branch = t.join("branch");
    let o = ok(&run(&train_args(
        &model,
        &data,
        &branch,
        &["--resume", s(&ck2)],
    )));
    assert!(last_json(&o)["exact_match"].is_number(), "{o}");
    assert_eq!(read_json(&branch.join("summary.json"))["steps"], 6);
    // the finished run, resumed again: nothing trained, nothing rewritten, exit 0
    let o = run(&train_args(&model, &data, &out, &["--resume"]));
    let last = last_json(&ok(&o));
    assert_eq!(last["already_finished"], true, "{last}");
    assert_eq!(last["step"], 6, "{last}");
    assert!(stderr(&o).contains("nothing to resume"), "{}", stderr(&o));
    assert_eq!(listing(&out), before);
    assert_eq!(std::fs::read(out.join("summary.json")).unwrap(), summary);
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics);
}

/// A `checkpoint-N/` (or `best/`) holding anything bertqa does not write is another tool's or the user's:
/// never removed — not as debris at start-up, not by --overwrite-output-dir; the directory then holds a run.
#[test]
fn a_checkpoint_folder_bertqa_did_not_write_is_never_removed() {
    let t = TempDir::new("foreignckpt");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    std::fs::create_dir_all(out.join("checkpoint-500")).unwrap();
    std::fs::write(out.join("checkpoint-500/optimizer.pt"), "another trainer's").unwrap();
    std::fs::write(out.join("checkpoint-500/config.json"), "{}").unwrap();
    std::fs::create_dir_all(out.join("checkpoint-007")).unwrap();
    std::fs::write(out.join("checkpoint-007/important.txt"), "the user's").unwrap();
    let before = listing(&out);
    fails(
        &run(&train_args(&model, &data, &out, &["--max-steps", "1"])),
        &["already holds a run", "checkpoint-007", "checkpoint-500"],
    );
    assert_eq!(listing(&out), before);
    fails(
        &run(&train_args(
            &model,
            &data,
            &out,
            &["--max-steps", "1", "--overwrite-output-dir"],
        )),
        &[
            "files bertqa does not write",
            "checkpoint-007",
            "checkpoint-500",
        ],
    );
    assert_eq!(listing(&out), before);
    assert!(
        out.join("checkpoint-500/optimizer.pt").is_file()
            && out.join("checkpoint-007/important.txt").is_file()
    );
    // moved away, the directory trains
    std::fs::remove_dir_all(out.join("checkpoint-500")).unwrap();
    std::fs::remove_dir_all(out.join("checkpoint-007")).unwrap();
    ok(&run(&train_args(
        &model,
        &data,
        &out,
        &["--max-steps", "1"],
    )));
}

#[test]
fn a_failed_save_removes_its_temporary_directory() {
    let t = TempDir::new("savefail");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let o = run_env(
        &train_args(&model, &data, &out, &["--save-every", "2"]),
        &[("BERTQA_TEST_FAULT", "save:after-optimizer:error")],
    );
    fails(&o, &["injected failure at save:after-optimizer"]);
    assert_eq!(debris(&out), Vec::<String>::new());
    let o = run_env(
        &train_args(
            &model,
            &data,
            &out,
            &["--save-every", "2", "--overwrite-output-dir"],
        ),
        &[("BERTQA_TEST_FAULT", "best:after-model:error")],
    );
    fails(&o, &["injected failure at best:after-model"]);
    assert_eq!(debris(&out), Vec::<String>::new());
}

#[test]
fn sigint_and_sigterm_save_exit_130_143_and_resume_exactly() {
    let t = TempDir::new("signals");
    let (model, data) = train_setup(&t);
    let reference = t.join("reference");
    let want = last_json(&ok(&run(&train_args(&model, &data, &reference, &[]))));
    let want_steps = step_lines(&reference);
    for (sig, name, code) in [
        (libc::SIGINT, "SIGINT", 130),
        (libc::SIGTERM, "SIGTERM", 143),
    ] {
        let out = t.join(name);
        let child = spawn_train(
            &train_args(&model, &data, &out, &[]),
            &[("BERTQA_TEST_STEP_DELAY_MS", "60")],
        );
        wait_until("the first step", || has_a_step(&out));
        send(&child, sig);
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
        let last = last_json(&stdout(&o));
        assert_eq!(last["interrupted"], json!(true), "{last}");
        assert_eq!(last["signal"], json!(name), "{last}");
        let step = last["step"].as_u64().unwrap();
        assert!(
            (step as usize) < want_steps.len(),
            "the run was not interrupted: {last}"
        );
        let summary = read_json(&out.join("summary.json"));
        assert_eq!(summary["interrupted"], json!(true));
        assert_eq!(summary["signal"], json!(name));
        assert!(out
            .join(format!("checkpoint-{step}/trainer_state.json"))
            .exists());
        assert_eq!(debris(&out), Vec::<String>::new());
        let got = last_json(&ok(&run(&train_args(&model, &data, &out, &["--resume"]))));
        assert_eq!(got, want, "{name}");
        assert_eq!(step_lines(&out), want_steps, "{name}");
        assert_eq!(
            read_json(&out.join("summary.json"))["interrupted"],
            json!(false)
        );
    }
}

#[test]
fn a_second_signal_during_a_save_lets_the_save_complete() {
    let t = TempDir::new("signal2");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let child = spawn_train(
        &train_args(&model, &data, &out, &["--save-every", "1"]),
        &[("BERTQA_TEST_FAULT", "save:before-rename:sleep=1500")],
    );
    wait_until("the first save", || {
        out.exists()
            && listing(&out)
                .iter()
                .any(|n| n.starts_with(".checkpoint-1.tmp"))
    });
    send(&child, libc::SIGINT);
    std::thread::sleep(std::time::Duration::from_millis(200));
    send(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a save is in progress"),
        "{}",
        stderr(&o)
    );
    let last = last_json(&stdout(&o));
    assert_eq!(last["interrupted"], json!(true), "{last}");
    assert_eq!(checkpoints_load(&out, &data), vec!["checkpoint-1"]);
    assert_eq!(debris(&out), Vec::<String>::new());
    ok(&run(&train_args(
        &model,
        &data,
        &out,
        &["--resume", "--save-every", "1"],
    )));
}

/// Rewrite `path` (JSON) through `f`.
fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v = read_json(path);
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn resume_validates_the_stored_settings() {
    let t = TempDir::new("stored");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    ok(&run(&train_args(
        &model,
        &data,
        &out,
        &["--max-steps", "2"],
    )));
    let st = out.join("checkpoint-2/trainer_state.json");
    let original = std::fs::read_to_string(&st).unwrap();
    let cases: Vec<(&str, &str, Value)> = vec![
        ("config", "batch_size", json!(0)),
        ("config", "learning_rate", json!(-0.001)),
        ("config", "grad_accum_steps", json!(0)),
        ("config", "epochs", json!(0)),
        ("config", "batch_size", json!("four")),
        ("state", "global_step", json!(-1)),
    ];
    for (part, field, value) in cases {
        std::fs::write(&st, &original).unwrap();
        edit_json(&st, |v| v[part][field] = value.clone());
        fails(
            &run(&train_args(&model, &data, &out, &["--resume"])),
            &["trainer_state.json", field],
        );
    }
    std::fs::write(&st, &original).unwrap();
    ok(&run(&train_args(
        &model,
        &data,
        &out,
        &["--resume", "--max-steps", "3"],
    )));
}

#[test]
fn resume_takes_the_flags_that_may_change_and_refuses_the_others() {
    let t = TempDir::new("flags-resume");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    ok(&run(&train_args(
        &model,
        &data,
        &out,
        &["--max-steps", "2"],
    )));
    // --max-steps is honoured and reported
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &["--resume", "--max-steps", "3", "--padding", "max"],
    ));
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("--max-steps 3 (the checkpoint had 2)"),
        "{err}"
    );
    assert!(err.contains("keeps its length of 2 steps"), "{err}");
    assert!(
        err.contains("--padding max (the checkpoint had packed"),
        "{err}"
    );
    assert_eq!(read_json(&out.join("summary.json"))["steps"], json!(3));
    let st = read_json(&out.join("checkpoint-3/trainer_state.json"));
    assert_eq!(st["config"]["max_steps"], json!(3));
    assert_eq!(st["state"]["total_steps"], json!(2));
    // --epochs recomputes the schedule
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &["--resume", "--max-steps", "5", "--epochs", "3"],
    ));
    ok(&o);
    assert!(stderr(&o).contains("recomputed"), "{}", stderr(&o));
    assert_eq!(
        read_json(&out.join("checkpoint-5/trainer_state.json"))["state"]["total_steps"],
        json!(5)
    );
    // a result-changing flag with another value: named, with both values
    fails(
        &run(&train_args(
            &model,
            &data,
            &out,
            &["--resume", "--learning-rate", "0.01", "--batch-size", "8"],
        )),
        &[
            "--learning-rate 0.01",
            "learning_rate is 0.001",
            "--batch-size 8",
            "batch_size is 4",
        ],
    );
    // the same values given explicitly are fine
    ok(&run(&train_args(
        &model,
        &data,
        &out,
        &["--resume", "--learning-rate", "1e-3", "--max-steps", "6"],
    )));
    // other training data
    let other = t.join("other.json");
    tiny_squad(&other, 5, 4);
    let mut a = train_args(&model, &other, &out, &["--resume", "--max-steps", "7"]);
    a[4] = s(&other).into();
    fails(
        &run(&a),
        &[
            "--train-file",
            "other.json",
            "not the data this run trained on",
        ],
    );
    fails(
        &run(&train_args(
            &model,
            &data,
            &out,
            &["--resume", "--max-steps", "7", "--max-train-examples", "8"],
        )),
        &["--max-train-examples 8"],
    );
    // a checkpoint from before the fingerprint existed still resumes, with a note
    let st = out.join("checkpoint-6/trainer_state.json");
    edit_json(&st, |v| {
        v["state"].as_object_mut().unwrap().remove("train_data");
    });
    let o = run(&train_args(
        &model,
        &data,
        &out,
        &["--resume", "--max-steps", "7"],
    ));
    ok(&o);
    assert!(
        stderr(&o).contains("no training-data fingerprint"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn train_checks_its_inputs_like_eval() {
    let t = TempDir::new("train-inputs");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    fails(
        &run(&train_args(&model, &data, &out, &["--doc-stride", "60"])),
        &["--doc-stride (60)", "budget"],
    );
    fails(
        &run(&train_args(&model, &data, &out, &["--n-best-size", "0"])),
        &["--n-best-size"],
    );
    let small = tiny_model_with(&t.join("small"), &["--max-position-embeddings", "32"]);
    fails(
        &run(&train_args(&small, &data, &out, &[])),
        &["--max-seq-length 64", "max_position_embeddings 32"],
    );
    // unanswerable questions in a v1.1 training file: a warning with the count
    let (ctx, ans) = context_and_answers(40, 2, 0);
    let v11 = t.join("v11.json");
    squad_file(
        &v11,
        "1.1",
        vec![(
            ctx,
            vec![
                qa("a", &[(&ans[0].0, ans[0].1)], None),
                qa("b", &[(&ans[1].0, ans[1].1)], None),
                qa("none", &[], None),
            ],
        )],
    );
    let mut a = train_args(&model, &v11, &t.join("v11run"), &["--max-steps", "1"]);
    a[6] = s(&data).into(); // evaluate on an answerable file
    let o = run(&a);
    ok(&o);
    assert!(
        stderr(&o).contains("1 of 3 questions have no answer"),
        "{}",
        stderr(&o)
    );
    // weights that become non-finite are called that, not a learning-rate problem
    let o = run(&train_args(
        &model,
        &data,
        &t.join("nan"),
        &[
            "--weight-decay",
            "1e39",
            "--learning-rate",
            "0.5",
            "--warmup-ratio",
            "0",
            "--max-bad-steps",
            "1",
        ],
    ));
    let e = fails(&o, &["weights themselves are non-finite"]);
    assert!(!e.contains("try a lower --learning-rate"), "{e}");
}

#[test]
fn each_step_is_saved_once() {
    let t = TempDir::new("save-once");
    let (model, data) = train_setup(&t);
    // 6 steps per epoch and --save-every 3: step 6 is an epoch end and a save step. Replacing an existing
    // checkpoint-N goes through "after-move-aside"; a run that writes each step once never gets there.
    let o = run_env(
        &train_args(
            &model,
            &data,
            &t.join("run"),
            &["--save-every", "3", "--save-total-limit", "0"],
        ),
        &[("BERTQA_TEST_FAULT", "save:after-move-aside")],
    );
    last_json(&ok(&o));
    assert_eq!(
        checkpoints_load(&t.join("run"), &data),
        vec![
            "checkpoint-12",
            "checkpoint-3",
            "checkpoint-6",
            "checkpoint-9"
        ]
    );
}

#[test]
fn train_detects_a_v2_dev_file_and_checks_the_tokenizer_on_resume() {
    let t = TempDir::new("train-v2");
    let (model, data) = train_setup(&t);
    let (ctx, ans) = context_and_answers(30, 1, 0);
    let dev = t.join("dev-v2.json");
    let qas = vec![
        qa("has", &[(&ans[0].0, ans[0].1)], Some(false)),
        qa("none", &[], Some(true)),
    ];
    let v = json!({"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": qas}]}]});
    std::fs::write(&dev, v.to_string()).unwrap();
    let out = t.join("run");
    let mut a = train_args(&model, &data, &out, &["--max-steps", "2"]);
    a[6] = s(&dev).into();
    let o = run(&a);
    let m = last_json(&ok(&o));
    assert!(stderr(&o).contains("scoring as v2.0"), "{}", stderr(&o));
    assert_eq!(m["NoAns_total"], json!(1), "{m}");
    assert!(out.join("null_odds.json").exists());
    // on resume the tokenizer comes from --model: one with more ids than the checkpoint's embeddings fails
    let bigger = t.join("bigger");
    std::fs::create_dir(&bigger).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bigger.join(e.file_name())).unwrap();
    }
    let mut vocab = std::fs::read_to_string(bigger.join("vocab.txt")).unwrap();
    for i in 0..40 {
        vocab.push_str(&format!("extra{i}\n"));
    }
    std::fs::write(bigger.join("vocab.txt"), vocab).unwrap();
    let mut a = train_args(&bigger, &data, &out, &["--resume", "--max-steps", "3"]);
    a[6] = s(&dev).into();
    fails(&run(&a), &["--model", "bigger", "vocab_size"]);
}

#[test]
fn a_second_signal_outside_a_save_quits_at_once() {
    // (500 ms apart: a second request, not the echo of the first — see the test below)
    let t = TempDir::new("signal-quit");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    // each step is followed by a 20 s pause (no save until the epoch end): both signals land in it, and
    // quitting "at once" is told from waiting for the pause by a wide margin even on a loaded machine
    let child = spawn_train(
        &train_args(&model, &data, &out, &[]),
        &[("BERTQA_TEST_STEP_DELAY_MS", "20000")],
    );
    wait_until("the first step", || has_a_step(&out));
    let t0 = std::time::Instant::now();
    send(&child, libc::SIGTERM);
    std::thread::sleep(std::time::Duration::from_millis(500));
    send(&child, libc::SIGTERM);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    assert!(t0.elapsed().as_secs() < 10, "did not quit at once");
    let last = last_json(&stdout(&o));
    assert_eq!(last["interrupted"], json!(true), "{last}");
    assert_eq!(last["forced"], json!(true), "{last}");
    // nothing saved, nothing left behind, the lock gone
    assert_eq!(debris(&out), Vec::<String>::new());
    assert!(!listing(&out).iter().any(|n| n.starts_with("checkpoint-")));
}

/// coreutils `timeout` signals bertqa and then its process group: one request, delivered twice within
/// microseconds. That echo (the same signal within 100 ms) is not a second signal: the run finishes its step,
/// saves and exits 143 — before, it quit at once without a checkpoint about one time in five.
#[test]
fn the_echo_of_a_signal_is_not_a_second_one() {
    let t = TempDir::new("signal-echo");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let child = spawn_train(
        &train_args(&model, &data, &out, &[]),
        &[("BERTQA_TEST_STEP_DELAY_MS", "500")],
    );
    wait_until("the first step", || has_a_step(&out));
    send(&child, libc::SIGTERM);
    send(&child, libc::SIGTERM);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    let last = last_json(&stdout(&o));
    assert_eq!(last["interrupted"], json!(true), "{last}");
    assert!(
        last.get("forced").is_none(),
        "the echo forced a quit: {last}"
    );
    assert!(
        last["checkpoint"].is_string(),
        "no checkpoint saved: {last}"
    );
}

/// A signal before the training starts (the model loading, the data read — here a FIFO nobody writes, as a
/// node waiting for the others at a rendezvous would block) exits at once with 128 + the signal: there is
/// nothing to save (before: the first signal only asked the training loop, not yet running, to stop).
#[test]
fn a_signal_before_the_training_starts_exits_at_once() {
    let t = TempDir::new("signal-early");
    let (model, _) = train_setup(&t);
    let fifo = t.join("fifo.json");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let out = t.join("run");
    let child = spawn_train(&train_args(&model, &fifo, &out, &[]), &[]);
    // the handlers are installed just after the lock is taken: wait until the kernel says SIGINT is caught
    wait_until("the SIGINT handler", || catches(child.id(), libc::SIGINT));
    send(&child, libc::SIGINT);
    let (code, o) = exit_within(child, 20, "SIGINT");
    assert_eq!(code, Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("before the training started"),
        "{}",
        stderr(&o)
    );
    assert!(
        !out.join("bertqa.lock").exists(),
        "the lock was left behind"
    );
}

/// A run stopped by a signal during its last step has not ended: `--resume` runs its final evaluation and
/// writes the summary of a finished run (it is not taken for a finished run resumed again). And with
/// `--resume`, a folder of the user's where a later save would go is refused up front, as is a bare
/// relative checkpoint name resolved against the current directory.
#[test]
fn a_run_interrupted_in_its_last_step_is_finished_by_resume() {
    let t = TempDir::new("lastpart");
    let (model, data) = train_setup(&t);
    let out = t.join("run");
    let child = spawn_train(
        &train_args(&model, &data, &out, &["--max-steps", "2"]),
        &[("BERTQA_TEST_STEP_DELAY_MS", "1500")],
    );
    wait_until("the last step", || {
        out.join("metrics.jsonl").exists() && step_lines(&out).iter().any(|l| l.0 == 2)
    });
    send(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert_eq!(
        read_json(&out.join("summary.json"))["interrupted"],
        json!(true)
    );
    assert!(!out.join("predictions.json").exists());
    // a folder of the user's where a later save would go: refused before anything runs
    std::fs::create_dir(out.join("checkpoint-9")).unwrap();
    std::fs::write(out.join("checkpoint-9/notes.txt"), "mine").unwrap();
    fails(
        &run(&train_args(&model, &data, &out, &["--resume"])),
        &["checkpoint-9", "files bertqa does not write"],
    );
    std::fs::remove_dir_all(out.join("checkpoint-9")).unwrap();
    // a bare checkpoint name, from inside the run's directory
    let a = train_args(&model, &data, Path::new("."), &["--resume", "checkpoint-2"]);
    let o = Command::new(bin())
        .args(&a)
        .current_dir(&out)
        .output()
        .unwrap();
    let last = last_json(&ok(&o));
    assert!(
        last["exact_match"].is_number(),
        "the final evaluation: {last}"
    );
    let s = read_json(&out.join("summary.json"));
    assert_eq!(
        (s["interrupted"].clone(), s["steps"].clone()),
        (json!(false), json!(2)),
        "{s}"
    );
    assert!(out.join("predictions.json").exists());
}

/// A node other than 0 waiting at the rendezvous for node 0 (here: none comes) ends on one signal, at once,
/// with 128 + the signal — before, its first signal was left to a node 0 that was not there, and it waited
/// out --rendezvous-timeout. (Runs without a GPU: a follower opens its GPUs only after the rendezvous.)
#[test]
fn a_follower_node_waiting_at_the_rendezvous_stops_on_one_signal() {
    let t = TempDir::new("follower-signal");
    let (model, data) = train_setup(&t);
    let rdzv = t.join("run.rdzv");
    let mut a = train_args(&model, &data, &t.join("run"), &[]);
    // the node flags replace the single-device ones
    if let Some(i) = a.iter().position(|x| x == "--device") {
        a.drain(i..i + 2);
    }
    let r = format!("file:{}", s(&rdzv));
    a.extend(
        [
            "--devices",
            "0",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rendezvous",
            &r,
            "--rendezvous-timeout",
            "60",
        ]
        .map(String::from),
    );
    let child = spawn_train(&a, &[]);
    wait_until("the SIGTERM handler", || catches(child.id(), libc::SIGTERM));
    send(&child, libc::SIGTERM);
    let (code, o) = exit_within(child, 20, "SIGTERM");
    assert_eq!(code, Some(143), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("before the training started"),
        "{}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------------------------------------
// kernels

/// `bertqa kernels`: bad input is refused by name; with NVRTC, the modules' PTX and machine code land in
/// --out (or the cache), named as a run looks them up, and a second call compiles nothing unless --force.
#[test]
fn kernels_compiles_ahead_of_time_and_refuses_bad_input() {
    for arch in ["sm90", "sm_90a", "compute_90", "sm_", "sm_1234"] {
        fails(
            &run(&["kernels", "--arch", arch]),
            &["--arch", arch, "sm_90"],
        );
    }
    fails(
        &run(&["kernels", "--arch", "sm_90", "--module", "nope"]),
        &["--module \"nope\"", "attention_tc", "dropout"],
    );
    if !bertqa::cuda::driver_present() {
        fails(&run(&["kernels"]), &["no CUDA driver", "--arch sm_90"]);
    }
    let t = TempDir::new("kernels");
    let out = t.join("prebuilt");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "kernels", "--arch", "sm_80", "--module", "dropout", "--module", "adamw",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let o = run(&args(&["--out", out.to_str().unwrap()]));
    let nvrtc =
        bertqa::cuda::nvrtc::nvrtc_present() && bertqa::cuda::nvrtc::cuda_include_dir().is_some();
    if !nvrtc {
        assert!(
            std::env::var("BERTQA_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "BERTQA_REQUIRE_NVRTC=1 but NVRTC or the CUDA headers are missing"
        );
        fails(&o, &[]);
        println!("SKIPPED the compiles: no NVRTC or no CUDA headers here");
        return;
    }
    let s = ok(&o);
    assert!(s.contains("dropout (sm_80): compiled in"), "{s}");
    assert!(s.contains("adamw (sm_80): compiled in"), "{s}");
    assert!(
        s.contains(&format!(
            "2 module(s) for sm_80: 2 compiled into {}",
            out.display()
        )),
        "{s}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // the names a run looks up (nvrtc::image_stem of the source compiled into this binary)
    let mut want = vec![];
    for m in ["adamw", "dropout"] {
        let stem = bertqa::cuda::nvrtc::image_stem(
            m,
            &bertqa::cuda::nvrtc::module_source(m).unwrap(),
            "sm_80",
        );
        want.push(format!("{stem}.cubin"));
        want.push(format!("{stem}.ptx"));
    }
    assert_eq!(names, want);
    let cubin = std::fs::read(out.join(&want[0])).unwrap();
    assert_eq!(
        (&cubin[..4], &cubin[18..20]),
        (&b"\x7fELF"[..], &[190u8, 0][..])
    );
    let ptx = std::fs::read_to_string(out.join(&want[1])).unwrap();
    assert!(
        ptx.contains(".entry adamw_step") && ptx.contains(".target sm_80"),
        "{ptx}"
    );
    // again: nothing to do; --force: compiled again
    let s = ok(&run(&args(&["--out", out.to_str().unwrap()])));
    assert!(
        s.contains("dropout (sm_80): already in") && s.contains("0 compiled"),
        "{s}"
    );
    let s = ok(&run(&args(&["--out", out.to_str().unwrap(), "--force"])));
    assert!(s.contains("2 compiled"), "{s}");
    // a run's prebuilt folder (BERTQA_KERNELS) counts as there: nothing compiled, nothing cached
    let unused = t.join("unused-cache");
    let s = ok(&run_with(
        &args(&[]),
        &[
            ("BERTQA_KERNELS", out.to_str().unwrap()),
            ("BERTQA_CACHE", unused.to_str().unwrap()),
        ],
    ));
    assert!(
        s.contains(&format!("dropout (sm_80): already in {}", out.display()))
            && s.contains("0 compiled"),
        "{s}"
    );
    assert!(!unused.exists());
    // --out naming a file
    fails(
        &run(&args(&["--out", out.join(&want[0]).to_str().unwrap()])),
        &["--out", "not a folder"],
    );
    // the arch-specific modules: sm_90a images from --arch sm_90, found where a run on an sm_90 GPU looks
    let hopper = t.join("hopper");
    let s = ok(&run(&[
        "kernels",
        "--arch",
        "sm_90",
        "--module",
        "wgmma_probe",
        "--out",
        hopper.to_str().unwrap(),
    ]));
    assert!(s.contains("wgmma_probe (sm_90a): compiled in"), "{s}");
    use bertqa::cuda::nvrtc;
    let arch = nvrtc::module_arch("wgmma_probe", "sm_90");
    let img = nvrtc::module_image_in("wgmma_probe", &arch, Some(&hopper), &unused).unwrap();
    assert_eq!(img.origin, nvrtc::Origin::Prebuilt(hopper.clone()));
    assert!(
        img.cubin.is_some_and(|c| nvrtc::is_cuda_elf(&c)) && img.ptx.contains("wgmma.mma_async")
    );
    assert!(!unused.exists());
    // without --out: the cache
    let cache = t.join("cache");
    let none = t.join("no-prebuilt-folder");
    let s = ok(&run_with(
        &args(&[]),
        &[
            ("BERTQA_CACHE", cache.to_str().unwrap()),
            ("BERTQA_KERNELS", none.to_str().unwrap()),
        ],
    ));
    assert!(
        s.contains(&format!("compiled into {}", cache.join("ptx").display())),
        "{s}"
    );
    assert!(cache.join("ptx").join(&want[0]).is_file());
}
