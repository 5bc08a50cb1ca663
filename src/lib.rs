//! wgpu-mlkd: a wgpu/WGSL compute engine for noise-robust speech emotion recognition by multi-level
//! knowledge distillation. See README.md for the tour.

pub mod data;
pub mod gpu;
pub mod ops;
