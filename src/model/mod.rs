//! The model: config, parameters, BERT forward/backward with the span head, HF checkpoints.

pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod params;

pub use bert::{Acts, Batch, BertQa, DropoutCfg};
pub use config::BertConfig;
pub use params::BertParams;
