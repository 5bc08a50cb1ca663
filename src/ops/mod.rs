//! One file per op family: the launcher, its CPU reference (f64) and its tests.
//! Layout convention: activations are channels-last, `[B, T, C]` (time-major rows), so that every conv,
//! norm and linear sees contiguous channel rows.

pub mod adamw;
pub mod attention;
pub mod conv1d;
pub mod dropout;
pub mod elementwise;
pub mod layer_mix;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod slice;
pub mod softmax;
#[cfg(test)]
pub mod testing;
pub mod weight_norm;
