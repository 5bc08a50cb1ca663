//! Element-wise kernels (`shaders/elementwise.wgsl`): fill, residual add, exact GELU.

use anyhow::{bail, Result};

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
    if a.shape() != b.shape() {
        bail!("add: shapes {:?} and {:?} differ", a.shape(), b.shape());
    }
    let y = Tensor::empty(a.gpu(), a.shape(), DType::F32)?;
    let n = a.numel();
    a.gpu().dispatch(
        &SHADER,
        "add_forward",
        &[a.buffer(), b.buffer(), y.buffer()],
        &[n as u32],
        groups(n),
    )?;
    Ok(y)
}

/// Exact erf GELU (torch.nn.GELU's default).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n = x.numel();
    x.gpu().dispatch(
        &SHADER,
        "gelu_forward",
        &[x.buffer(), y.buffer()],
        &[n as u32],
        groups(n),
    )?;
    Ok(y)
}

/// CPU references, f64 throughout.
pub mod reference {
    pub fn gelu(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| gelu_f64(v as f64)).collect()
    }

    pub fn gelu_f64(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
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
        let (a, b) = (random_vec(1, 70_001, 1.0), random_vec(2, 70_001, 1.0));
        let y = add(
            &Tensor::from_slice(gpu, &a, &[70_001]).unwrap(),
            &Tensor::from_slice(gpu, &b, &[70_001]).unwrap(),
        )
        .unwrap();
        let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| *x as f64 + *y as f64).collect();
        assert_close("add", &y.to_vec().unwrap(), &want, Tol::KERNEL);
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
