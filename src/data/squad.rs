//! SQuAD v1.1 / v2.0 JSON: articles → paragraphs → questions with answers (and `is_impossible` in v2.0).
//!
//! Character positions are Python string indices (Unicode code points), as in the official files; contexts
//! keep a code-point → byte table so that spans map back to `&str` slices.

use anyhow::{anyhow, Context as _, Result};
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
}

impl Dataset {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading SQuAD file {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            anyhow!("{origin}: {path}: {}", e.into_inner())
        })?;
        let mut examples = Vec::new();
        let mut misaligned = Vec::new();
        let mut np = 0;
        for art in raw.data {
            for para in art.paragraphs {
                let ctx = Arc::new(Context::new(para.context, art.title.clone()));
                for qa in para.qas {
                    let mut answers = Vec::with_capacity(qa.answers.len());
                    for a in &qa.answers {
                        answers.push(Answer {
                            text: a.text.clone(),
                            start: a.answer_start.max(0) as usize,
                        });
                    }
                    let aligned = match answers.first() {
                        Some(a) => {
                            let n = a.text.chars().count();
                            ctx.slice(a.start, a.start + n) == a.text
                        }
                        None => true,
                    };
                    if !aligned {
                        misaligned.push(qa.id.clone());
                    }
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
        Ok(Dataset {
            version: raw.version,
            examples,
            num_paragraphs: np,
            misaligned,
        })
    }

    /// A one-line account of misaligned answers (count and the first few ids), if any.
    pub fn misaligned_report(&self) -> Option<String> {
        if self.misaligned.is_empty() {
            return None;
        }
        let first: Vec<&str> = self.misaligned.iter().take(5).map(|s| s.as_str()).collect();
        Some(format!(
            "{} answers whose answer_start does not point at their text (skipped for training, kept for evaluation), e.g. {}",
            self.misaligned.len(),
            first.join(", ")
        ))
    }

    /// Keep the first `n` examples.
    pub fn truncate(&mut self, n: usize) {
        self.examples.truncate(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
