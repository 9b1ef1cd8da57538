//! SQuAD data: JSON parsing (`squad`), the WordPiece tokenizer (`tokenizer`), windows and labels
//! (`features`). No backend here: token ids, offsets and labels live on the host.

pub mod features;
pub mod squad;
pub mod tokenizer;
