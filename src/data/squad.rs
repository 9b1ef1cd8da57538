//! SQuAD v1.1 / v2.0 JSON: articles → paragraphs → questions with answers (and `is_impossible` in v2.0).
//!
//! Character positions are Python string indices (Unicode code points), as in the official files; contexts
//! keep a code-point → byte table so that spans map back to `&str` slices.

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    version: Option<String>,
    data: Vec<RawArticle>,
}
#[derive(Deserialize)]
struct RawArticle {
    #[serde(default)]
    title: String,
    paragraphs: Vec<RawParagraph>,
}
#[derive(Deserialize)]
struct RawParagraph {
    context: String,
    qas: Vec<RawQa>,
}
#[derive(Deserialize)]
struct RawQa {
    id: String,
    question: String,
    #[serde(default)]
    answers: Vec<RawAnswer>,
    #[serde(default)]
    is_impossible: bool,
}
#[derive(Deserialize, Clone)]
struct RawAnswer {
    text: String,
    answer_start: i64,
}

fn path_of((a, p, q): (usize, usize, usize)) -> String {
    format!("data[{a}].paragraphs[{p}].qas[{q}]")
}

/// A paragraph's text with a code-point index.
#[derive(Debug)]
pub struct Context {
    pub text: String,
    /// byte offset of every `CHAR_STRIDE`-th code point (a sparse index: 8 bytes per 64 characters instead
    /// of per character, which mattered for very long contexts)
    marks: Vec<usize>,
    num_chars: usize,
    pub title: String,
}

const CHAR_STRIDE: usize = 64;

impl Context {
    pub fn new(text: String, title: String) -> Self {
        let mut marks = Vec::with_capacity(text.len() / CHAR_STRIDE + 1);
        let mut n = 0;
        for (k, (b, _)) in text.char_indices().enumerate() {
            if k % CHAR_STRIDE == 0 {
                marks.push(b);
            }
            n += 1;
        }
        Context {
            text,
            marks,
            num_chars: n,
            title,
        }
    }
    pub fn num_chars(&self) -> usize {
        self.num_chars
    }
    /// Byte offset of code point `c` (≤ num_chars).
    fn byte_of(&self, c: usize) -> usize {
        if c >= self.num_chars {
            return self.text.len();
        }
        let base = self.marks[c / CHAR_STRIDE];
        match self.text[base..].char_indices().nth(c % CHAR_STRIDE) {
            Some((b, _)) => base + b,
            None => self.text.len(),
        }
    }
    /// The substring of code points [start, end), clamped.
    pub fn slice(&self, start: usize, end: usize) -> &str {
        let n = self.num_chars();
        let (s, e) = (start.min(n), end.min(n).max(start.min(n)));
        &self.text[self.byte_of(s)..self.byte_of(e)]
    }
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    /// code-point index into the context
    pub start: usize,
}

/// One question.
#[derive(Debug, Clone)]
pub struct Example {
    pub id: String,
    pub question: String,
    pub context: Arc<Context>,
    /// index of the paragraph (examples of one paragraph share its tokenization)
    pub paragraph: usize,
    pub answers: Vec<Answer>,
    pub is_impossible: bool,
    /// false when the first answer's `answer_start` does not point at its text (kept for evaluation, skipped
    /// for training)
    pub answer_aligned: bool,
}

#[derive(Debug)]
pub struct Dataset {
    pub version: Option<String>,
    pub examples: Vec<Example>,
    pub num_paragraphs: usize,
    /// ids of examples whose answer_start does not point at the answer text
    pub misaligned: Vec<String>,
    /// (article, paragraph, question) indices of each example in the file, for messages (see `json_path`)
    pub locations: Vec<(usize, usize, usize)>,
}

impl Dataset {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading SQuAD file {}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            anyhow!(
                "{}: not UTF-8 (JSON must be): the first invalid byte is at offset {at}",
                path.display()
            )
        })?;
        // a byte-order mark (some editors write one) is not JSON: read past it
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        Self::parse(text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut de = serde_json::Deserializer::from_str(text);
        let raw: RawFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            anyhow!("{origin}: {path}: {}", e.into_inner())
        })?;
        // anything after the document (a second one concatenated, say) is an error, as in Python's json.load
        de.end()
            .map_err(|e| anyhow!("{origin}: after the JSON document: {e}"))?;
        let mut examples = Vec::new();
        let mut misaligned = Vec::new();
        let mut locations = Vec::new();
        let mut seen: std::collections::HashMap<String, (usize, usize, usize)> =
            std::collections::HashMap::new();
        let mut np = 0;
        for (ai, art) in raw.data.into_iter().enumerate() {
            for (pi, para) in art.paragraphs.into_iter().enumerate() {
                let ctx = Arc::new(Context::new(para.context, art.title.clone()));
                for (qi, qa) in para.qas.into_iter().enumerate() {
                    if let Some(&first) = seen.get(&qa.id) {
                        bail!(
                            "{origin}: {}: duplicate question id {:?} (first at {}): ids must be unique, \
                             predictions are keyed by them",
                            path_of((ai, pi, qi)),
                            qa.id,
                            path_of(first)
                        );
                    }
                    seen.insert(qa.id.clone(), (ai, pi, qi));
                    let mut answers = Vec::with_capacity(qa.answers.len());
                    for a in &qa.answers {
                        answers.push(Answer {
                            text: a.text.clone(),
                            start: a.answer_start.max(0) as usize,
                        });
                    }
                    // the first answer's text is at answer_start — and has something to point at: an empty or
                    // all-whitespace answer has no tokens, so no span could be its label
                    let aligned = qa.is_impossible
                        || match answers.first() {
                            Some(a) => {
                                let n = a.text.chars().count();
                                !a.text.trim().is_empty()
                                    && ctx.slice(a.start, a.start + n) == a.text
                            }
                            None => true,
                        };
                    if !aligned {
                        misaligned.push(qa.id.clone());
                    }
                    locations.push((ai, pi, qi));
                    examples.push(Example {
                        id: qa.id,
                        question: qa.question,
                        context: ctx.clone(),
                        paragraph: np,
                        answers,
                        is_impossible: qa.is_impossible,
                        answer_aligned: aligned,
                    });
                }
                np += 1;
            }
        }
        if examples.is_empty() {
            bail!(
                "{origin}: no questions (\"data\" has {np} paragraphs and no \"qas\" entries{}): not a usable SQuAD file",
                if np == 0 { ", it is empty" } else { "" }
            );
        }
        Ok(Dataset {
            version: raw.version,
            examples,
            num_paragraphs: np,
            misaligned,
            locations,
        })
    }

    /// The JSON path of example `i` in its file, e.g. `data[0].paragraphs[1].qas[2]`.
    pub fn json_path(&self, i: usize) -> String {
        self.locations
            .get(i)
            .map(|&l| path_of(l))
            .unwrap_or_else(|| format!("question {i}"))
    }

    /// Whether the file is SQuAD v2.0: its "version" says 2.x, or some question is marked `is_impossible`.
    /// (`bertqa score`, `eval` and `train` then score as v2.0 even without --version-2-with-negative.)
    pub fn is_v2(&self) -> bool {
        let v = self.version.as_deref().unwrap_or("");
        v.starts_with('2') || v.starts_with("v2") || self.examples.iter().any(|e| e.is_impossible)
    }

    /// Questions without an answer: `is_impossible`, or no (or an empty) "answers" list.
    pub fn unanswerable_count(&self) -> usize {
        self.examples
            .iter()
            .filter(|e| e.is_impossible || e.answers.is_empty())
            .count()
    }

    /// For a training file read as SQuAD v1.1: a warning when some questions have no answer (they are
    /// trained to point at \[CLS\], as v2.0 "no answer"), with the count and the first ids.
    pub fn unanswerable_report(&self) -> Option<String> {
        let n = self.unanswerable_count();
        if n == 0 {
            return None;
        }
        let first: Vec<&str> = self
            .examples
            .iter()
            .filter(|e| e.is_impossible || e.answers.is_empty())
            .take(5)
            .map(|e| e.id.as_str())
            .collect();
        Some(format!(
            "{n} of {} questions have no answer (is_impossible, or empty \"answers\"), e.g. {}: they are \
             trained to point at [CLS] (SQuAD v2.0's \"no answer\") although the file is read as v1.1",
            self.examples.len(),
            first.join(", ")
        ))
    }

    /// Error unless every question can be scored: at least one gold answer, except questions marked
    /// `is_impossible` in SQuAD v2.0. Names the file, JSON path and id of the first that cannot.
    pub fn check_evaluable(&self, version_2: bool, origin: &str) -> Result<()> {
        if let Some(i) = self
            .examples
            .iter()
            .position(|e| e.answers.is_empty() && !(version_2 && e.is_impossible))
        {
            let e = &self.examples[i];
            bail!(
                "{origin}: {} (id {:?}): no gold answers (\"answers\" is missing or empty){}; an evaluation \
                 file needs at least one answer per question, or \"is_impossible\": true in SQuAD v2.0",
                self.json_path(i),
                e.id,
                if e.is_impossible {
                    " and it is marked is_impossible, but the file is evaluated as v1.1"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// A one-line account of misaligned answers (count and the first few ids), if any.
    pub fn misaligned_report(&self) -> Option<String> {
        if self.misaligned.is_empty() {
            return None;
        }
        let first: Vec<&str> = self.misaligned.iter().take(5).map(|s| s.as_str()).collect();
        Some(format!(
            "{} answers whose answer_start does not point at their text, or that are empty or only whitespace (skipped for training, kept for evaluation), e.g. {}",
            self.misaligned.len(),
            first.join(", ")
        ))
    }

    /// Keep the first `n` examples.
    pub fn truncate(&mut self, n: usize) {
        self.examples.truncate(n);
        self.locations.truncate(n);
    }

    /// The questions of this set that `other` also holds (the same question text about the same passage
    /// text; ids are not compared), by index: a dev set that overlaps the training set scores the fit to
    /// the training data, not generalisation.
    pub fn shared_with(&self, other: &Dataset) -> Vec<usize> {
        let seen: std::collections::HashSet<(&str, &str)> = other
            .examples
            .iter()
            .map(|e| (e.question.as_str(), e.context.text.as_str()))
            .collect();
        (0..self.examples.len())
            .filter(|&i| {
                let e = &self.examples[i];
                seen.contains(&(e.question.as_str(), e.context.text.as_str()))
            })
            .collect()
    }

    /// A warning when some of this (dev) set's questions are also in `train`, naming the first one.
    pub fn shared_report(&self, train: &Dataset, train_name: &str) -> Option<String> {
        let shared = self.shared_with(train);
        let &first = shared.first()?;
        Some(format!(
            "{} of {} questions are also in the training file {train_name} (the same question about the same \
             passage; the first: id {:?}, {}): its scores measure how well the run fits its training data, \
             not how it answers new questions",
            shared.len(),
            self.examples.len(),
            self.examples[first].id,
            self.json_path(first)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty or all-whitespace answer has no tokens to label: it counts as misaligned (skipped for
    /// training, kept for scoring), like one whose answer_start misses its text.
    #[test]
    fn empty_answers_are_not_aligned() {
        let file = |answer: &str| {
            format!(
                r#"{{"data":[{{"title":"t","paragraphs":[{{"context":"The quick fox","qas":[{{"id":"1","question":"q","answers":[{{"text":"{answer}","answer_start":3}}]}}]}}]}}]}}"#
            )
        };
        for (answer, aligned) in [
            ("", false),
            (" ", false),
            (" quick", true),
            ("quick", false),
        ] {
            let ds = Dataset::parse(&file(answer), "t.json").unwrap();
            assert_eq!(ds.examples[0].answer_aligned, aligned, "{answer:?}");
            assert_eq!(ds.misaligned.is_empty(), aligned, "{answer:?}");
        }
        // SQuAD 2.0 files may write an unanswerable question's answer as "": it stays trainable (toward [CLS])
        let v2 = file("").replace(
            r#""question":"q","#,
            r#""question":"q","is_impossible":true,"#,
        );
        let ds = Dataset::parse(&v2, "t.json").unwrap();
        assert!(ds.examples[0].is_impossible && ds.examples[0].answer_aligned);
    }

    /// A dev question counts as seen in training when the same question is asked about the same passage,
    /// whatever its id; the same question about another passage, or another question about the same
    /// passage, is new.
    #[test]
    fn questions_shared_with_the_training_set_are_found_by_text() {
        let para = |ctx: &str, qas: &[(&str, &str)]| {
            let qas: Vec<String> = qas
                .iter()
                .map(|(id, q)| format!(r#"{{"id":"{id}","question":"{q}","answers":[{{"text":"old","answer_start":4}}]}}"#))
                .collect();
            format!(r#"{{"context":"{ctx}","qas":[{}]}}"#, qas.join(","))
        };
        let file = |paras: &[String]| {
            format!(
                r#"{{"data":[{{"title":"t","paragraphs":[{}]}}]}}"#,
                paras.join(",")
            )
        };
        let train = Dataset::parse(
            &file(&[
                para("the old king", &[("t1", "who?"), ("t2", "which?")]),
                para("the old queen", &[("t3", "who?")]),
            ]),
            "train",
        )
        .unwrap();
        let dev = Dataset::parse(
            &file(&[
                para("the old king", &[("d1", "when?"), ("d2", "which?")]),
                para("the old prince", &[("d3", "who?")]),
                para("the old queen", &[("d4", "who?")]),
            ]),
            "dev",
        )
        .unwrap();
        assert_eq!(dev.shared_with(&train), vec![1, 3]);
        let r = dev.shared_report(&train, "train.json").unwrap();
        assert!(
            r.starts_with("2 of 4 questions are also in the training file train.json"),
            "{r}"
        );
        assert!(
            r.contains(r#"id "d2", data[0].paragraphs[0].qas[1]"#),
            "{r}"
        );
        assert!(train
            .shared_report(&train, "x")
            .unwrap()
            .starts_with("3 of 3"));
        let unseen =
            Dataset::parse(&file(&[para("the old prince", &[("d3", "who?")])]), "d").unwrap();
        assert_eq!(unseen.shared_report(&train, "train.json"), None);
    }

    #[test]
    fn errors_name_the_json_path() {
        let bad = r#"{"data":[{"title":"t","paragraphs":[{"context":"abc","qas":[{"id":"1","question":"q","answers":[]},{"id":"2","answers":[]}]}]}]}"#;
        let e = Dataset::parse(bad, "x.json").unwrap_err().to_string();
        assert!(e.contains("data[0].paragraphs[0].qas[1]"), "{e}");
        assert!(e.contains("question"), "{e}");
        assert!(e.contains("x.json"), "{e}");
    }

    #[test]
    fn misaligned_answers_are_counted() {
        let js = r#"{"version":"1.1","data":[{"title":"t","paragraphs":[{"context":"héllo wörld","qas":[
            {"id":"a","question":"q","answers":[{"text":"wörld","answer_start":6}]},
            {"id":"b","question":"q","answers":[{"text":"wörld","answer_start":5}]}]}]}]}"#;
        let d = Dataset::parse(js, "t").unwrap();
        assert_eq!(d.examples.len(), 2);
        assert!(d.examples[0].answer_aligned);
        assert!(!d.examples[1].answer_aligned);
        assert_eq!(d.misaligned, vec!["b".to_string()]);
        assert_eq!(d.examples[0].context.slice(6, 11), "wörld");
    }
    fn file(qas: &str, version: &str) -> String {
        format!(
            r#"{{"version":"{version}","data":[{{"title":"t","paragraphs":[{{"context":"the old king","qas":[{qas}]}}]}}]}}"#
        )
    }
    const HAS: &str = r#"{"id":"has","question":"q","answers":[{"text":"king","answer_start":8}]}"#;

    #[test]
    fn unanswerable_questions_are_counted_and_reported() {
        let d = Dataset::parse(&file(HAS, "1.1"), "t").unwrap();
        assert_eq!(d.unanswerable_count(), 0);
        assert!(d.unanswerable_report().is_none());
        assert!(!d.is_v2());
        let qas = format!(
            r#"{HAS},{{"id":"e","question":"q","answers":[]}},{{"id":"m","question":"q"}},{{"id":"i","question":"q","answers":[],"is_impossible":true}}"#
        );
        let d = Dataset::parse(&file(&qas, "1.1"), "t").unwrap();
        assert_eq!(d.unanswerable_count(), 3);
        let r = d.unanswerable_report().unwrap();
        assert!(
            r.starts_with("3 of 4 questions") && r.contains("e, m, i"),
            "{r}"
        );
        // is_impossible makes it v2.0 whatever the version says; so does the version
        assert!(d.is_v2());
        assert!(Dataset::parse(&file(HAS, "v2.0"), "t").unwrap().is_v2());
    }

    #[test]
    fn evaluation_needs_gold_answers() {
        let qas = format!(r#"{HAS},{{"id":"i","question":"q","answers":[],"is_impossible":true}}"#);
        let d = Dataset::parse(&file(&qas, "v2.0"), "f.json").unwrap();
        d.check_evaluable(true, "f.json").unwrap();
        let e = d.check_evaluable(false, "f.json").unwrap_err().to_string();
        assert!(
            e.contains("f.json: data[0].paragraphs[0].qas[1] (id \"i\")"),
            "{e}"
        );
        let d = Dataset::parse(
            &file(&format!(r#"{HAS},{{"id":"m","question":"q"}}"#), "v2.0"),
            "f",
        )
        .unwrap();
        assert!(
            d.check_evaluable(true, "f").is_err(),
            "answerable without answers"
        );
    }

    #[test]
    fn duplicate_ids_and_empty_files_are_errors() {
        let e = Dataset::parse(&file(&format!("{HAS},{HAS}"), "1.1"), "d.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.json: data[0].paragraphs[0].qas[1]: duplicate question id \"has\"")
                && e.contains("first at data[0].paragraphs[0].qas[0]"),
            "{e}"
        );
        let e = Dataset::parse(r#"{"data":[]}"#, "z.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("z.json: no questions"), "{e}");
    }

    #[test]
    fn slices_use_code_points_across_index_marks() {
        let text: String = (0..300)
            .map(|i| if i % 7 == 0 { 'é' } else { 'a' })
            .collect();
        let c = Context::new(text.clone(), String::new());
        let chars: Vec<char> = text.chars().collect();
        assert_eq!(c.num_chars(), 300);
        for (s, e) in [
            (0, 0),
            (0, 300),
            (63, 65),
            (64, 128),
            (127, 250),
            (299, 400),
            (350, 360),
        ] {
            let want: String = chars[s.min(300)..e.min(300).max(s.min(300))]
                .iter()
                .collect();
            assert_eq!(c.slice(s, e), want, "{s}..{e}");
        }
    }
}
