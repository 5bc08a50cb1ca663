//! Element-wise kernels (`shaders/elementwise.wgsl`): fill, residual add, exact GELU and its backward,
//! scaling and in-place gradient accumulation.
//!
//! Backward rules that need no kernel of their own:
//! - residual add `y = a + b`: `da = db = dy` (identity; the tape hands `dy` to both inputs);
//! - `scale(x, alpha)`: `dx = scale(dy, alpha)` (the same op), e.g. the CNN's gradient multiplier 0.1.

use anyhow::{ensure, Result};

use crate::gpu::{DType, Shader, Tensor};

static SHADER: Shader = crate::shader!("elementwise");
const WG: usize = 256;

fn groups(n: usize) -> u32 {
    n.div_ceil(WG) as u32
}

pub fn fill(y: &Tensor, value: f32) -> Result<()> {
    let n = y.numel();
    y.gpu()
        .dispatch(&SHADER, "fill", &[y.buffer()], &[n as u32, value.to_bits()], groups(n))
}

/// y = a + b (same shapes).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same("add", ("a", a), ("b", b))?;
    let y = Tensor::empty(a.gpu(), a.shape(), DType::F32)?;
    dispatch_vec4_and_tail(("add_forward4", "add_forward"), &[a, b, &y])?;
    Ok(y)
}

/// Exact erf GELU (torch.nn.GELU's default).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    check_f32("gelu", "x", x)?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    dispatch_vec4_and_tail(("gelu_forward4", "gelu_forward"), &[x, &y])?;
    Ok(y)
}

/// Runs the vec4 entry over the first `n / 4` vec4 and the scalar entry over the last `n % 4` elements (if
/// any), both with parameters `[n, start]`, `n` the first tensor's elements.
fn dispatch_vec4_and_tail((vec4_entry, scalar_entry): (&'static str, &'static str), tensors: &[&Tensor]) -> Result<()> {
    let gpu = tensors[0].gpu();
    let n = tensors[0].numel();
    let whole = n / 4 * 4;
    let buffers: Vec<_> = tensors.iter().map(|t| t.buffer()).collect();
    gpu.dispatch(&SHADER, vec4_entry, &buffers, &[n as u32, 0], groups(n / 4))?;
    if whole < n {
        gpu.dispatch(
            &SHADER,
            scalar_entry,
            &buffers,
            &[n as u32, whole as u32],
            groups(n - whole),
        )?;
    }
    Ok(())
}

fn check_f32(op: &str, what: &str, t: &Tensor) -> Result<()> {
    ensure!(t.dtype() == DType::F32, "{op}: {what} must be f32, got {:?}", t.dtype());
    ensure!(
        t.numel() < u32::MAX as usize,
        "{op}: {what} {:?} is beyond 2^32 elements (32-bit indexing); split it",
        t.shape()
    );
    Ok(())
}

fn check_same(op: &str, (an, a): (&str, &Tensor), (bn, b): (&str, &Tensor)) -> Result<()> {
    check_f32(op, an, a)?;
    check_f32(op, bn, b)?;
    ensure!(
        a.shape() == b.shape(),
        "{op}: {an} {:?} and {bn} {:?} must have the same shape",
        a.shape(),
        b.shape()
    );
    Ok(())
}

/// Backward of [`gelu`]: `dx = dy * (Phi(x) + x phi(x))`, the exact derivative of the erf GELU, from the
/// forward's input `x` (GELU saves nothing else).
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_same("gelu_backward", ("x", x), ("dy", dy))?;
    let dx = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    dispatch_vec4_and_tail(("gelu_backward4", "gelu_backward"), &[x, dy, &dx])?;
    Ok(dx)
}

/// y = alpha * x. Also its own backward: `dx = scale(dy, alpha)`.
pub fn scale(x: &Tensor, alpha: f32) -> Result<Tensor> {
    check_f32("scale", "x", x)?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n = x.numel();
    x.gpu().dispatch(
        &SHADER,
        "scale_forward",
        &[x.buffer(), y.buffer()],
        &[n as u32, alpha.to_bits()],
        groups(n),
    )?;
    Ok(y)
}

/// acc += alpha * x, in place (gradient accumulation). Shapes must match exactly.
pub fn axpy(acc: &Tensor, alpha: f32, x: &Tensor) -> Result<()> {
    check_same("axpy", ("acc", acc), ("x", x))?;
    let n = acc.numel();
    acc.gpu().dispatch(
        &SHADER,
        "axpy_inplace",
        &[x.buffer(), acc.buffer()],
        &[n as u32, alpha.to_bits()],
        groups(n),
    )
}

/// acc += x, in place (exactly the f32 sum: `axpy` with alpha = 1).
pub fn add_assign(acc: &Tensor, x: &Tensor) -> Result<()> {
    axpy(acc, 1.0, x)
}

/// CPU references, f64 throughout.
pub mod reference {
    pub fn gelu(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| gelu_f64(v as f64)).collect()
    }

    pub fn gelu_f64(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }

    /// d gelu / dx = Phi(x) + x phi(x), with Phi from erfc (accurate in the negative tail).
    pub fn gelu_grad_f64(x: f64) -> f64 {
        let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        cdf + x * pdf
    }

    pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Vec<f64> {
        x.iter()
            .zip(dy)
            .map(|(&x, &g)| g as f64 * gelu_grad_f64(x as f64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, random_vec, Tol};

    #[test]
    fn fill_sets_every_element() {
        let gpu = test_gpu();
        let t = Tensor::empty(gpu, &[3, 331], DType::F32).unwrap();
        t.fill(2.5).unwrap();
        assert!(t.to_vec().unwrap().iter().all(|&v| v == 2.5));
    }

    #[test]
    fn add_matches_reference() {
        let gpu = test_gpu();
        // vec4 and a tail of 1, a tail alone, whole vec4 alone. WGSL rounds f32 addition correctly, so the
        // sums must equal the CPU's f32 sums bit for bit.
        for n in [70_001, 3, 8] {
            let (a, b) = (random_vec(1, n, 1.0), random_vec(2, n, 1.0));
            let y = add(
                &Tensor::from_slice(gpu, &a, &[n]).unwrap(),
                &Tensor::from_slice(gpu, &b, &[n]).unwrap(),
            )
            .unwrap()
            .to_vec()
            .unwrap();
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert!(y == want, "add of {n} elements differs from the f32 sums");
        }
        // Operands that are not two f32 tensors of one shape are refused, naming the one at fault.
        let a = Tensor::zeros(gpu, &[2, 3]).unwrap();
        let ints = Tensor::from_u32(gpu, &[0; 6], &[2, 3]).unwrap();
        let e = add(&a, &ints).unwrap_err();
        assert!(format!("{e:#}").contains("add: b must be f32"), "{e:#}");
        let e = add(&a, &Tensor::zeros(gpu, &[3, 2]).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("same shape"), "{e:#}");
    }

    #[test]
    fn gelu_matches_erf_reference() {
        let gpu = test_gpu();
        // Wide range, including the tails where erf-based formulas lose precision.
        let mut x = random_vec(3, 10_007, 6.0);
        x.extend([-12.0, -8.0, -5.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 5.0, 12.0]);
        let y = gelu(&Tensor::from_slice(gpu, &x, &[x.len()]).unwrap())
            .unwrap()
            .to_vec()
            .unwrap();
        assert_close("gelu", &y, &reference::gelu(&x), Tol::KERNEL);
        // Elementwise relative accuracy too, where the value is not tiny.
        for (i, (&g, r)) in y.iter().zip(reference::gelu(&x)).enumerate() {
            if r.abs() > 1e-3 {
                assert!(((g as f64 - r) / r).abs() < 2e-6, "gelu({}) = {g}, want {r}", x[i]);
            }
        }
    }

    /// The vec4 entries cover the first n / 4 * 4 elements and the scalar ones the rest: an element gives the
    /// same bits through either (lengths that move elements 10012-10013 between them, a tail alone, whole
    /// vec4 alone), forward and backward.
    #[test]
    fn gelu_vec4_and_tail_entries_agree_bitwise() {
        let gpu = test_gpu();
        let x = random_vec(6, 10_015, 6.0);
        let dy = random_vec(7, x.len(), 2.0);
        let up = |v: &[f32]| Tensor::from_slice(gpu, v, &[v.len()]).unwrap();
        let run = |n: usize| {
            let (xt, dyt) = (up(&x[..n]), up(&dy[..n]));
            let y = gelu(&xt).unwrap().to_vec().unwrap();
            let dx = gelu_backward(&xt, &dyt).unwrap().to_vec().unwrap();
            (y, dx)
        };
        let (y_all, dx_all) = run(x.len()); // 3 in the tail
        for n in [10_014, 10_012, 3, 8] {
            let (y, dx) = run(n);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&y_all[..n]), "gelu, n = {n}");
            assert_eq!(bits(&dx), bits(&dx_all[..n]), "gelu_backward, n = {n}");
        }
    }

    #[test]
    fn gelu_reference_grad_matches_finite_differences() {
        // Central differences in f64 with h = 1e-6: truncation ~h^2 (third derivative), rounding ~1e-16 / h.
        let h = 1e-6;
        for x in [-9.0, -5.0, -2.5, -0.7518, -0.3, 0.0, 1e-4, 0.4, 1.7, 3.0, 6.0] {
            let fd = (reference::gelu_f64(x + h) - reference::gelu_f64(x - h)) / (2.0 * h);
            let an = reference::gelu_grad_f64(x);
            assert!(
                (fd - an).abs() <= 1e-6 * an.abs().max(1e-3),
                "x = {x}: fd {fd}, analytic {an}"
            );
        }
    }

    #[test]
    fn gelu_backward_grad_matches_reference() {
        let gpu = test_gpu();
        let mut x = random_vec(4, 10_007, 6.0);
        x.extend([-12.0, -8.0, -5.0, -3.0, -0.7518, -1e-3, 0.0, 1e-3, 3.0, 5.0, 12.0]);
        let dy = random_vec(5, x.len(), 2.0);
        let n = x.len();
        let dx = gelu_backward(
            &Tensor::from_slice(gpu, &x, &[n]).unwrap(),
            &Tensor::from_slice(gpu, &dy, &[n]).unwrap(),
        )
        .unwrap()
        .to_vec()
        .unwrap();
        let want = reference::gelu_backward(&x, &dy);
        assert_close("gelu_backward", &dx, &want, Tol::KERNEL);
        // Per element, relative to |dy| (the derivative itself is O(1) and crosses zero at x = -0.75).
        let worst = (0..n)
            .map(|i| (dx[i] as f64 - want[i]).abs() / (dy[i].abs() as f64).max(1e-30))
            .fold(0f64, f64::max);
        eprintln!("gelu_backward: max |err| / |dy| per element = {worst:.3e}");
        assert!(worst < 1e-6, "gelu_backward: {worst:.3e}");
        assert!(gelu_backward(
            &Tensor::from_slice(gpu, &x[..3], &[3]).unwrap(),
            &Tensor::from_slice(gpu, &dy[..4], &[4]).unwrap()
        )
        .is_err());
    }

    #[test]
    fn scale_and_axpy_match_reference() {
        let gpu = test_gpu();
        let n = 5_003;
        let (a, b) = (random_vec(6, n, 3.0), random_vec(7, n, 3.0));
        let ta = Tensor::from_slice(gpu, &a, &[n]).unwrap();
        let tb = Tensor::from_slice(gpu, &b, &[n]).unwrap();
        let y = scale(&ta, 0.1).unwrap().to_vec().unwrap();
        let want: Vec<f64> = a.iter().map(|&v| 0.1f32 as f64 * v as f64).collect();
        assert_close("scale", &y, &want, Tol::KERNEL);

        let acc = Tensor::from_slice(gpu, &a, &[n]).unwrap();
        axpy(&acc, -2.5, &tb).unwrap();
        let want: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 - 2.5 * y as f64).collect();
        assert_close("axpy", &acc.to_vec().unwrap(), &want, Tol::KERNEL);

        // add_assign is the exact f32 sum, bit for bit.
        let acc = Tensor::from_slice(gpu, &a, &[n]).unwrap();
        add_assign(&acc, &tb).unwrap();
        let got = acc.to_vec().unwrap();
        assert!((0..n).all(|i| got[i] == a[i] + b[i]), "add_assign is not the f32 sum");

        let other = Tensor::zeros(gpu, &[n + 1]).unwrap();
        assert!(add_assign(&acc, &other).is_err());
        let u = Tensor::from_u32(gpu, &[1, 2], &[2]).unwrap();
        assert!(scale(&u, 2.0).is_err());
    }

    #[test]
    fn large_grids_are_folded_into_2d() {
        // 65536 * 256 + 3 elements need more than 65535 workgroups in one dimension.
        let gpu = test_gpu();
        let n = 65536 * 256 + 3;
        let t = Tensor::empty(gpu, &[n], DType::F32).unwrap();
        t.fill(1.0).unwrap();
        let y = add(&t, &t).unwrap().to_vec().unwrap();
        assert!(y.iter().all(|&v| v == 2.0));
    }
}
