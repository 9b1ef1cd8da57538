//! The model's own WordPiece tokenizer through the `tokenizers` crate: tokenizer.json when present, else the
//! BERT pipeline built from vocab.txt. Either way the normaliser's settings — lower-casing, accent
//! stripping, Chinese characters split — are tokenizer_config.json's (transformers' defaults where it is
//! silent or absent), as transformers' BertTokenizer takes them, even over a tokenizer.json that says
//! otherwise (a warning then says so). Any truncation or padding stored in tokenizer.json is removed:
//! windows are built by `features`.
//!
//! Long texts (over [`CHUNK_BYTES`]) are tokenized in pieces, with the offsets shifted back, cut only where
//! BERT's normaliser and pre-tokenizer never join a token across: after a whitespace character (any the
//! pre-tokenizer splits on: no-break and ideographic spaces too) or before a punctuation character (ASCII or
//! Unicode P*, isolated as its own token) — not after a zero-width space or a form feed, which the
//! normaliser deletes, joining their neighbours. So the result is the same as in one piece, while the `tokenizers` crate's per-byte
//! alignment tables (~150 bytes per input byte) exist for one group of pieces at a time instead of for the
//! whole text (a 50 MB context needed > 7 GB). A piece with no such place in its second half runs on to the
//! next one; only a run of more than [`MAX_RUN_CHUNKS`] pieces' bytes without one (a single "word" of over
//! a megabyte, which BERT maps to one \[UNK\]) is cut where it is, and then gives an \[UNK\] per piece.

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use std::path::Path;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::NormalizerWrapper;
use tokenizers::Tokenizer;

pub struct WordPieceTokenizer {
    pub tok: Tokenizer,
    pub cls: i32,
    pub sep: i32,
    pub pad: i32,
    /// BERT's normaliser and pre-tokenizer: long texts may be cut into pieces where the tokens cannot
    /// change (see the module doc); with another pipeline (tokenizer_class PreTrainedTokenizerFast, kept
    /// as tokenizer.json says) they are tokenized whole
    exact_cuts: bool,
    /// the added tokens' texts (\[CLS\], \[SEP\], …: matched in the raw text), which no cut may split
    added: Vec<String>,
}

/// Token ids and, per token, the code-point span [start, end) in the input text.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub ids: Vec<i32>,
    pub offsets: Vec<(usize, usize)>,
}

/// The normaliser settings of a model directory's tokenizer_config.json, with transformers' defaults
/// (BertTokenizer: `do_lower_case` true, `strip_accents` null = as `do_lower_case`,
/// `tokenize_chinese_chars` true) for what it does not say, or when there is no such file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormSettings {
    pub do_lower_case: bool,
    pub strip_accents: Option<bool>,
    pub tokenize_chinese_chars: bool,
    /// `tokenizer_class`: PreTrainedTokenizerFast (or TokenizersBackend) keeps tokenizer.json as it is;
    /// anything else (BertTokenizer, or none: config.json's model type) is BERT's pipeline, built from
    /// these settings — as transformers 5 builds it
    pub tokenizer_class: Option<String>,
}

impl NormSettings {
    pub fn read(dir: &Path) -> Result<NormSettings> {
        let mut n = NormSettings {
            do_lower_case: true,
            strip_accents: None,
            tokenize_chinese_chars: true,
            tokenizer_class: None,
        };
        let p = dir.join("tokenizer_config.json");
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(n),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        let flag = |k: &str| -> Result<Option<bool>> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => bail!(
                    "{}: {k} is {other}, expected true, false or null",
                    p.display()
                ),
            }
        };
        if let Some(b) = flag("do_lower_case")? {
            n.do_lower_case = b;
        }
        n.strip_accents = flag("strip_accents")?;
        if let Some(b) = flag("tokenize_chinese_chars")? {
            n.tokenize_chinese_chars = b;
        }
        n.tokenizer_class = v
            .get("tokenizer_class")
            .and_then(|c| c.as_str())
            .map(String::from);
        Ok(n)
    }

    /// Whether tokenizer.json is used as it is (see `tokenizer_class`).
    fn keeps_tokenizer_json(&self) -> bool {
        matches!(
            self.tokenizer_class.as_deref(),
            Some("PreTrainedTokenizerFast" | "TokenizersBackend")
        )
    }

    /// BERT's normaliser with these settings (`clean_text` as given).
    fn normalizer(&self, clean_text: bool) -> BertNormalizer {
        BertNormalizer::new(
            clean_text,
            self.tokenize_chinese_chars,
            self.strip_accents,
            self.do_lower_case,
        )
    }
}

impl WordPieceTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let norm = NormSettings::read(dir)?;
        let tj = dir.join("tokenizer.json");
        let mut tok = if tj.exists() {
            let mut t = Tokenizer::from_file(&tj).map_err(|e| anyhow!("{}: {e}", tj.display()))?;
            // transformers' BertTokenizer builds BERT's normaliser (clean_text on) and pre-tokenizer from
            // tokenizer_config.json, whatever tokenizer.json holds
            if !norm.keeps_tokenizer_json() {
                let want = norm.normalizer(true);
                let says = |n: &BertNormalizer| {
                    format!(
                        "clean_text {}, lowercase {}, strip_accents {}, handle_chinese_chars {}",
                        n.clean_text,
                        n.lowercase,
                        n.strip_accents
                            .map_or("null".to_string(), |b| b.to_string()),
                        n.handle_chinese_chars
                    )
                };
                let had = match t.get_normalizer() {
                    Some(NormalizerWrapper::BertNormalizer(n)) => {
                        let key = |n: &BertNormalizer| {
                            (
                                n.clean_text,
                                n.lowercase,
                                n.strip_accents,
                                n.handle_chinese_chars,
                            )
                        };
                        (key(n) != key(&want)).then(|| says(n))
                    }
                    Some(_) => Some("another kind of normaliser".into()),
                    None => Some("no normaliser".into()),
                };
                if let Some(had) = had {
                    crate::say!(
                        "warning: {}'s normaliser ({had}) is replaced by BERT's with tokenizer_config.json's \
                         settings ({}; transformers' defaults where it is silent or absent), as transformers \
                         does (tokenizer_class PreTrainedTokenizerFast keeps tokenizer.json as it is)",
                        tj.display(),
                        says(&want)
                    );
                }
                t.with_normalizer(Some(want));
                if !matches!(
                    t.get_pre_tokenizer(),
                    Some(PreTokenizerWrapper::BertPreTokenizer(_))
                ) {
                    crate::say!(
                        "warning: {}'s pre-tokenizer is replaced by BERT's, as transformers does",
                        tj.display()
                    );
                    t.with_pre_tokenizer(Some(BertPreTokenizer));
                }
            }
            t
        } else {
            let vocab = dir.join("vocab.txt");
            if !vocab.exists() {
                bail!(
                    "{}: neither tokenizer.json nor vocab.txt found",
                    dir.display()
                );
            }
            let wp = WordPiece::from_file(&vocab.to_string_lossy())
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| anyhow!("{}: {e}", vocab.display()))?;
            let mut t = Tokenizer::new(wp);
            t.with_normalizer(Some(norm.normalizer(true)));
            t.with_pre_tokenizer(Some(BertPreTokenizer));
            // BERT's special tokens, matched in the raw text as transformers' BertTokenizer registers them
            // ("a [SEP] b" holds the [SEP] token, not "[", "sep", "]")
            let specials: Vec<tokenizers::AddedToken> =
                ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                    .into_iter()
                    .filter(|s| t.token_to_id(s).is_some())
                    .map(|s| tokenizers::AddedToken::from(s, true))
                    .collect();
            t.add_special_tokens(&specials);
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
        let added_tokens = tok.get_added_tokens_decoder();
        // cuts are exact with BERT's pipeline and added tokens matched as they are written (special tokens
        // such as [SEP]); one matched after normalisation, as a single word, or taking the spaces beside it
        // would make where a cut may go depend on its neighbours: such a tokenizer reads texts whole
        let plain_added = added_tokens
            .values()
            .all(|t| !t.normalized && !t.single_word && !t.lstrip && !t.rstrip);
        let exact_cuts = plain_added
            && matches!(
                tok.get_normalizer(),
                Some(NormalizerWrapper::BertNormalizer(_))
            )
            && matches!(
                tok.get_pre_tokenizer(),
                Some(PreTokenizerWrapper::BertPreTokenizer(_))
            );
        let added = added_tokens
            .values()
            .map(|t| t.content.clone())
            .filter(|c| c.len() > 1)
            .collect();
        Ok(WordPieceTokenizer {
            tok,
            cls,
            sep,
            pad,
            exact_cuts,
            added,
        })
    }

    /// Encode without special tokens, with code-point offsets into `text` (in pieces when it is long).
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        self.encode_chunked(text, CHUNK_BYTES)
    }

    /// `encode` with pieces of at most about `chunk_bytes` bytes (public for the tests).
    pub fn encode_chunked(&self, text: &str, chunk_bytes: usize) -> Result<Encoded> {
        if !self.in_pieces(text, chunk_bytes) {
            return self.encode_whole(text);
        }
        let pieces = self.pieces(text, chunk_bytes);
        let mut out = Encoded::default();
        let mut char_base = 0;
        // a group of pieces at a time, in parallel: memory bounded by the group, not the text
        for group in pieces.chunks(PIECES_PER_GROUP) {
            let encs = group
                .par_iter()
                .map(|t| {
                    self.tok
                        .encode_char_offsets(*t, false)
                        .map_err(|e| anyhow!("tokenizing {}: {e}", preview(t)))
                })
                .collect::<Result<Vec<_>>>()?;
            for (piece, e) in group.iter().zip(encs) {
                out.ids.extend(e.get_ids().iter().map(|&i| i as i32));
                out.offsets.extend(
                    e.get_offsets()
                        .iter()
                        .map(|&(s, t)| (s + char_base, t + char_base)),
                );
                char_base += piece.chars().count();
            }
        }
        Ok(out)
    }

    /// Whether `text` is tokenized in pieces of about `chunk_bytes` bytes: when it is longer and this
    /// tokenizer's cuts are exact.
    fn in_pieces(&self, text: &str, chunk_bytes: usize) -> bool {
        text.len() > chunk_bytes && self.exact_cuts
    }

    /// `text` cut into pieces of about `chunk` bytes where its tokens cannot change ([`split_pieces`], no
    /// cut inside an added token such as "\[SEP\]").
    pub fn pieces<'t>(&self, text: &'t str, chunk: usize) -> Vec<&'t str> {
        let added: Vec<&str> = self.added.iter().map(String::as_str).collect();
        split_pieces(text, chunk, &added)
    }

    fn encode_whole(&self, text: &str) -> Result<Encoded> {
        let e = self
            .tok
            .encode_char_offsets(text, false)
            .map_err(|e| anyhow!("tokenizing {}: {e}", preview(text)))?;
        Ok(Encoded {
            ids: e.get_ids().iter().map(|&i| i as i32).collect(),
            offsets: e.get_offsets().to_vec(),
        })
    }

    /// Encode many texts in parallel (long ones in pieces, see [`CHUNK_BYTES`]), on rayon's pool: all
    /// cores, or `RAYON_NUM_THREADS`. Not through the tokenizers crate's batch calls, which run serially
    /// when `TOKENIZERS_PARALLELISM` is false — a setting many users of transformers keep in their
    /// environment (it silences a warning about forked processes), which made featurization single-threaded.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Encoded>> {
        // the texts read whole in parallel; then each one cut in pieces, one text at a time (its pieces in
        // parallel), so that memory stays bounded by one group of pieces, as for a single long text
        let mut out: Vec<Option<Encoded>> = texts
            .par_iter()
            .map(|t| match self.in_pieces(t, CHUNK_BYTES) {
                true => Ok(None),
                false => self.encode_whole(t).map(Some),
            })
            .collect::<Result<_>>()?;
        for (o, t) in out.iter_mut().zip(texts) {
            if o.is_none() {
                *o = Some(self.encode(t)?);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// One past the largest token id of the vocabulary (added tokens included): the embedding table must
    /// have at least this many rows.
    pub fn id_extent(&self) -> usize {
        self.tok
            .get_vocab(true)
            .values()
            .map(|&i| i as usize + 1)
            .max()
            .unwrap_or(0)
    }

    /// Error unless every token id fits an embedding table of `vocab_size` rows (`origin` names the model).
    pub fn check_fits(&self, vocab_size: usize, origin: &str) -> Result<()> {
        let n = self.id_extent();
        if n > vocab_size {
            bail!(
                "{origin}: the tokenizer has {n} token ids but config.json vocab_size is {vocab_size}: \
                 ids ≥ {vocab_size} have no row in the embedding table (wrong tokenizer for this model?)"
            );
        }
        Ok(())
    }
}

/// Texts longer than this many bytes are tokenized in pieces of about this size.
pub const CHUNK_BYTES: usize = 1 << 16;
/// Pieces tokenized together (in parallel): bounds the tokenizer's working memory to ~4 MB of text.
const PIECES_PER_GROUP: usize = 64;

fn preview(text: &str) -> String {
    format!("{:?}…", text.chars().take(40).collect::<String>())
}

/// How far (in pieces of `chunk` bytes) a piece may run on to reach a place where it can be cut exactly.
pub const MAX_RUN_CHUNKS: usize = 16;

/// BERT's punctuation (the pre-tokenizer's `is_bert_punc`): ASCII punctuation or Unicode category P*.
fn is_bert_punct(c: char) -> bool {
    use unicode_categories::UnicodeCategories;
    c.is_ascii_punctuation() || c.is_punctuation()
}

/// Whitespace the pre-tokenizer splits on after the normaliser: not the whitespace that is also a control
/// character (form feed, U+0085, …), which the normaliser's cleaning deletes, joining its neighbours.
fn is_bert_space(c: char) -> bool {
    use unicode_categories::UnicodeCategories;
    c.is_whitespace() && (matches!(c, '\t' | '\n' | '\r') || !c.is_other())
}

/// Whether `text` may be cut before byte `i` (a char boundary) without changing its tokens: right after a
/// whitespace character or right before a punctuation character (see the module doc), and not inside an
/// occurrence of one of the `added` tokens (matched in the raw text; compared ignoring ASCII case).
fn exact_cut(text: &str, i: usize, added: &[&str]) -> bool {
    (text[..i].chars().next_back().is_some_and(is_bert_space)
        || text[i..].chars().next().is_some_and(is_bert_punct))
        && !splits_added(text, i, added)
}

/// Whether a cut before byte `i` falls strictly inside an occurrence of an added token.
fn splits_added(text: &str, i: usize, added: &[&str]) -> bool {
    let b = text.as_bytes();
    added.iter().any(|t| {
        let t = t.as_bytes();
        (1..t.len()).any(|k| {
            i >= k
                && i - k + t.len() <= b.len()
                && b[i - k..i - k + t.len()].eq_ignore_ascii_case(t)
        })
    })
}

/// Cut `text` into pieces of about `chunk` bytes (see the module doc): at the last place in the second half
/// of each window where the cut is exact, preferring one after whitespace; else at the first such place
/// after the window (up to [`MAX_RUN_CHUNKS`] windows on); else at the window's end (a char boundary).
pub fn split_pieces<'t>(text: &'t str, chunk: usize, added: &[&str]) -> Vec<&'t str> {
    let chunk = chunk.max(8);
    let mut out = vec![];
    let mut p = 0;
    while p < text.len() {
        if text.len() - p <= chunk {
            out.push(&text[p..]);
            break;
        }
        let mut end = p + chunk;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut lo = p + chunk / 2;
        while !text.is_char_boundary(lo) {
            lo += 1;
        }
        let window = &text[lo..end];
        let after_space = window
            .char_indices()
            .rev()
            .map(|(i, c)| (lo + i + c.len_utf8(), c))
            .find(|&(cut, c)| is_bert_space(c) && !splits_added(text, cut, added))
            .map(|(cut, _)| cut);
        let before_punct = || {
            window
                .char_indices()
                .rev()
                .find(|&(i, c)| i > 0 && is_bert_punct(c) && !splits_added(text, lo + i, added))
                .map(|(i, _)| lo + i)
        };
        let run_on = || {
            let mut limit = (p + chunk * MAX_RUN_CHUNKS).min(text.len());
            while !text.is_char_boundary(limit) {
                limit -= 1;
            }
            text[end..limit]
                .char_indices()
                .map(|(i, _)| end + i)
                .find(|&i| exact_cut(text, i, added))
                // the text's end is in reach: the piece runs to it
                .or((limit == text.len()).then_some(limit))
        };
        let cut = after_space
            .or_else(before_punct)
            .or_else(run_on)
            .unwrap_or(end);
        out.push(&text[p..cut]);
        p = cut;
    }
    out
}

/// Load a tokenizer for a model directory, naming the directory on failure.
pub fn load(dir: &Path) -> Result<WordPieceTokenizer> {
    WordPieceTokenizer::from_dir(dir)
        .with_context(|| format!("loading the tokenizer of {}", dir.display()))
}
