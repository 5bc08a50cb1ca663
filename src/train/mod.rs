//! Training of the distilled student: the data pipeline ([`data`]: crops, noise, aligned teacher targets,
//! resumable sampling, the validation split).

pub mod data;
pub mod pretrain;

pub use data::{split_validation, Batch, BatchSampler, SamplerState, SnrChoice, TrainDataConfig};
