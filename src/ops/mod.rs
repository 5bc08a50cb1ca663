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

/// Picks between an element-wise kernel's two entry points: the vec4 one (four consecutive elements per
/// invocation, one load per operand instead of four: lavapipe pays per load instruction) where `n`, the
/// length the four must divide (channels, taps, values), is a multiple of 4, else the scalar one. Returns the
/// entry and the elements per invocation, for sizing the grid.
pub(crate) fn vec4_or_scalar(
    n: usize,
    (vec4_entry, scalar_entry): (&'static str, &'static str),
) -> (&'static str, usize) {
    if n % 4 == 0 {
        (vec4_entry, 4)
    } else {
        (scalar_entry, 1)
    }
}
