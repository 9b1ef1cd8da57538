//! The model's own WordPiece tokenizer through the `tokenizers` crate: tokenizer.json when present, else the
//! BERT pipeline built from vocab.txt (lower-casing per tokenizer_config.json). Any truncation or padding
//! stored in tokenizer.json is removed: windows are built by `features`.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::Tokenizer;

pub struct WordPieceTokenizer {
    pub tok: Tokenizer,
    pub cls: i32,
    pub sep: i32,
    pub pad: i32,
}

/// Token ids and, per token, the code-point span [start, end) in the input text.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub ids: Vec<i32>,
    pub offsets: Vec<(usize, usize)>,
}

impl WordPieceTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let mut tok = if tj.exists() {
            Tokenizer::from_file(&tj).map_err(|e| anyhow!("{}: {e}", tj.display()))?
        } else {
            let vocab = dir.join("vocab.txt");
            if !vocab.exists() {
                bail!(
                    "{}: neither tokenizer.json nor vocab.txt found",
                    dir.display()
                );
            }
            let lower = std::fs::read_to_string(dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
                .unwrap_or(true);
            let wp = WordPiece::from_file(&vocab.to_string_lossy())
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| anyhow!("{}: {e}", vocab.display()))?;
            let mut t = Tokenizer::new(wp);
            t.with_normalizer(Some(BertNormalizer::new(true, true, None, lower)));
            t.with_pre_tokenizer(Some(BertPreTokenizer));
            t
        };
        tok.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        tok.with_padding(None);
        let id = |s: &str| {
            tok.token_to_id(s)
                .map(|v| v as i32)
                .ok_or_else(|| anyhow!("{}: vocabulary has no {s} token", dir.display()))
        };
        let (cls, sep, pad) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]")?);
        Ok(WordPieceTokenizer { tok, cls, sep, pad })
    }

    /// Encode without special tokens, with code-point offsets into `text`.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let e = self.tok.encode_char_offsets(text, false).map_err(|e| {
            anyhow!(
                "tokenizing {:?}…: {e}",
                text.chars().take(40).collect::<String>()
            )
        })?;
        Ok(Encoded {
            ids: e.get_ids().iter().map(|&i| i as i32).collect(),
            offsets: e.get_offsets().to_vec(),
        })
    }

    /// Encode many texts in parallel.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Encoded>> {
        let inputs: Vec<tokenizers::EncodeInput> = texts.iter().map(|t| (*t).into()).collect();
        let encs = self
            .tok
            .encode_batch_char_offsets(inputs, false)
            .map_err(|e| anyhow!("tokenizing a batch: {e}"))?;
        Ok(encs
            .into_iter()
            .map(|e| Encoded {
                ids: e.get_ids().iter().map(|&i| i as i32).collect(),
                offsets: e.get_offsets().to_vec(),
            })
            .collect())
    }
}

/// Load a tokenizer for a model directory, naming the directory on failure.
pub fn load(dir: &Path) -> Result<WordPieceTokenizer> {
    WordPieceTokenizer::from_dir(dir)
        .with_context(|| format!("loading the tokenizer of {}", dir.display()))
}
