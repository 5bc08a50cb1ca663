//! wgpu-mlkd: a wgpu/WGSL compute engine for noise-robust speech emotion recognition by multi-level
//! knowledge distillation. See README.md for the tour.

pub mod cli;
pub mod data;
pub mod fsutil;
pub mod gpu;
pub mod model;
pub mod ops;
pub mod plot;
pub mod seed;
pub mod tape;
pub mod train;
