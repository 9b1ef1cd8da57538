//! Evaluation: n-best post-processing (`postprocess`), the official EM/F1 (`metrics`) and the model-driven
//! evaluation loop (`run`).

pub mod metrics;
pub mod postprocess;
pub mod run;
