//! The model: config, parameters (flat buffers), batches (variable-length layouts), the activation plan,
//! BERT forward/backward with the span head, HF checkpoints.

pub mod acts;
pub mod batch;
pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod params;

pub use acts::{ActPlan, Acts};
pub use batch::{Batch, HostBatch, Padding};
pub use bert::{BertQa, DropoutCfg, LossScale, LossSums};
pub use config::BertConfig;
pub use params::BertParams;
