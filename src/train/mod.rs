//! Training of the distilled student: the data pipeline ([`data`]: crops, noise, aligned teacher targets,
//! resumable sampling, the validation split), one training step and its resumable state ([`trainer`]), and the
//! validation pass against the teacher on the same noisy input ([`validation`]).

pub mod data;
pub mod pretrain;
pub mod trainer;
pub mod validation;

pub use data::{split_validation, Batch, BatchSampler, SamplerState, SnrChoice, TrainDataConfig};
pub use trainer::{distill_step, DistillStep, NonFinite, OptimConfig, StepRecord, StepSettings, Trainer, TrainerState};
pub use validation::{ValidationReport, ValidationSet};
pub mod ser;
