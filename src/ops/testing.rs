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

/// Checks an analytic gradient of the scalar `loss` at `x` against central finite differences in f64
/// (step 1e-6 relative to |x_i|, at least 1e-6): max |analytic - fd| / max |fd| must be <= 1e-6 (the
/// differences are good to ~1e-9 here; a wrong formula is off by O(1)). Printed even when it passes.
#[track_caller]
pub fn check_grad_fd(name: &str, analytic: &[f64], x: &[f64], loss: impl Fn(&[f64]) -> f64) {
    assert_eq!(analytic.len(), x.len(), "{name}: gradient length");
    let mut xp = x.to_vec();
    let mut fd = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let h = 1e-6 * x[i].abs().max(1.0);
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        fd.push((up - down) / (2.0 * h));
    }
    let max_ref = fd.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let max_err = analytic.iter().zip(&fd).fold(0f64, |m, (a, f)| m.max((a - f).abs()));
    let err = max_err / max_ref;
    eprintln!("{name}: reference backward vs finite differences: max |err| / max |fd| = {err:.3e}");
    assert!(err <= 1e-6, "{name}: max |err| / max |fd| = {err:.3e} > 1e-6");
}

impl Tol {
    /// An f64 reference backward against central differences of the f64 reference forward with h ~ 1e-6:
    /// truncation error O(h^2 f''') and rounding O(1e-16 |f| / h) are both far below this.
    pub const FINITE_DIFF: Tol = Tol { rel: 1e-6 };
}

/// Central differences `(f(p + h e_i) - f(p - h e_i)) / 2h` of a scalar function, for every coordinate i.
pub fn central_differences(p: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut q = p.to_vec();
    (0..p.len())
        .map(|i| {
            q[i] = p[i] + h;
            let up = f(&q);
            q[i] = p[i] - h;
            let down = f(&q);
            q[i] = p[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// [`assert_close`] for an f64 result (a reference gradient against finite differences).
#[track_caller]
pub fn assert_close_f64(name: &str, got: &[f64], want: &[f64], tol: Tol) {
    assert_eq!(got.len(), want.len(), "{name}: length mismatch");
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let max_err = got.iter().zip(want).fold(0f64, |m, (g, w)| m.max((g - w).abs()));
    let err = if got.iter().all(|g| g.is_finite()) {
        max_err / max_ref
    } else {
        f64::INFINITY
    };
    eprintln!("{name}: max |err| / max |ref| = {err:.3e} (tolerance {:.0e})", tol.rel);
    assert!(
        err <= tol.rel,
        "{name}: max |err| / max |ref| = {err:.3e} > {:.0e}",
        tol.rel
    );
}

/// f32 test data widened to f64 (exactly).
pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// sum(a * b) in f64: the scalar loss `sum(dy * y)` whose gradient the backward kernels compute.
pub fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot of different lengths");
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// How many times a bench records a call of `flop` floating-point operations between two waits for the GPU, so
/// that one submission's latency does not count as kernel time (calls inside a model forward share it): enough
/// for `BENCH_MIN_GFLOP` (default 0.2; a fast GPU needs a few to ~20) per timing, at least one.
pub fn calls_per_timing(flop: f64) -> usize {
    let min_gflop =
        std::env::var("BENCH_MIN_GFLOP").map_or(0.2, |r| r.parse::<f64>().expect("BENCH_MIN_GFLOP: a number"));
    (min_gflop * 1e9 / flop).ceil().max(1.0) as usize
}
