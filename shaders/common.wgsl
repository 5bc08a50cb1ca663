
// ---------------------------------------------------------------------------------------------------------
// shaders/common.wgsl: functions shared by several kernels. WGSL has no includes, so the `shader!` macro
// appends this file to every shader at compile time (at the end, so the shader's own line numbers hold).

// erfc(z), relative error < 1.2e-7 for every z (Numerical Recipes' Chebyshev fit `erfcc`).
fn erfc_approx(z: f32) -> f32 {
    let a = abs(z);
    let t = 1.0 / (1.0 + 0.5 * a);
    let r = t * exp(-a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    return select(2.0 - r, r, z >= 0.0);
}

// Exact (erf) GELU, as torch.nn.GELU() by default: x * Phi(x) = 0.5 * x * erfc(-x / sqrt(2)).
// Written with erfc so that the result keeps full relative precision for negative x.
fn gelu_exact(x: f32) -> f32 {
    return 0.5 * x * erfc_approx(-x * 0.70710678118654752);
}
