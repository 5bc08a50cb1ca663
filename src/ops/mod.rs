//! One file per op family: the launcher, its CPU reference (f64) and its tests.
//! Layout convention: activations are channels-last, `[B, T, C]` (time-major rows), so that every conv,
//! norm and linear sees contiguous channel rows.

pub mod attention;
pub mod conv1d;
pub mod dropout;
pub mod elementwise;
pub mod matmul;
pub mod norm;
pub mod softmax;
#[cfg(test)]
pub mod testing;
