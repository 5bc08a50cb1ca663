//! Test helpers shared by every op's tests: seeded inputs and named tolerances.

use rand::{Rng, SeedableRng};

/// Named tolerances, compared as max |got - want| / max(max |want|, floor).
/// KERNEL: one f32 kernel against its f64 reference.
/// MODEL: a whole forward pass against transformers (the 1e-4 bound).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rel: f64,
}

impl Tol {
    pub const KERNEL: Tol = Tol { rel: 1e-5 };
    /// Long reductions (K in the thousands) accumulate f32 rounding proportional to sqrt(K).
    pub const REDUCTION: Tol = Tol { rel: 5e-5 };
    pub const MODEL: Tol = Tol { rel: 1e-4 };
}

/// Seeded uniform values in [-scale, scale).
pub fn random_vec(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// The worst error relative to the reference's largest magnitude. Printed even when it passes.
pub fn max_rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let max_err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
    if got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    max_err / max_ref
}

#[track_caller]
pub fn assert_close(name: &str, got: &[f32], want: &[f64], tol: Tol) {
    let err = max_rel_error(got, want);
    eprintln!("{name}: max |err| / max |ref| = {err:.3e} (tolerance {:.0e})", tol.rel);
    assert!(
        err <= tol.rel,
        "{name}: max |err| / max |ref| = {err:.3e} > {:.0e}",
        tol.rel
    );
}
