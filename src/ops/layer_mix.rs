//! The emotion classifier's learnable layer mix (`shaders/layer_mix.wgsl`): `x [B, L, D]` (L hidden states
//! of each item) and logits `w [L]` give `y[b, d] = sum_l softmax(w)_l x[b, l, d]` (`[B, D]`), as SUPERB's
//! weighted sum of hidden states. Backward: `dw_l = a_l (g_l - sum_k a_k g_k)` with `a = softmax(w)` and
//! `g_l = sum_{b,d} dy[b, d] x[b, l, d]` (two dispatches, deterministic sums), and `dx[b, l, d] = a_l dy[b, d]`
//! when asked (a frozen upstream needs no dx).

use anyhow::{ensure, Result};

use crate::gpu::{DType, Shader, Tensor};
use crate::ops::reduce::check_f32;

static SHADER: Shader = crate::shader!("layer_mix");
const WG: usize = 256;

fn dims(op: &str, x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize)> {
    check_f32(op, "x", x)?;
    check_f32(op, "w", w)?;
    let &[b, l, d] = x.shape() else {
        anyhow::bail!("{op}: x must be [B, L, D], got {:?}", x.shape())
    };
    ensure!(
        b > 0 && l > 0 && d > 0,
        "{op}: x {:?} has an empty dimension",
        x.shape()
    );
    ensure!(
        w.shape() == [l],
        "{op}: the logits must be [{l}] for x {:?}, got {:?}",
        x.shape(),
        w.shape()
    );
    Ok((b, l, d))
}

/// `y[b, d] = sum_l softmax(w)_l x[b, l, d]`.
pub fn layer_mix(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, l, d) = dims("layer_mix", x, w)?;
    let y = Tensor::empty(x.gpu(), &[b, d], DType::F32)?;
    x.gpu().dispatch(
        &SHADER,
        "layer_mix_forward",
        &[x.buffer(), w.buffer(), y.buffer()],
        &[b as u32, l as u32, d as u32],
        (b * d).div_ceil(WG) as u32,
    )?;
    Ok(y)
}

/// Backward of [`layer_mix`]: `(dw [L], dx [B, L, D] when need_dx)`.
pub fn layer_mix_backward(dy: &Tensor, x: &Tensor, w: &Tensor, need_dx: bool) -> Result<(Tensor, Option<Tensor>)> {
    let op = "layer_mix_backward";
    let (b, l, d) = dims(op, x, w)?;
    check_f32(op, "dy", dy)?;
    ensure!(
        dy.shape() == [b, d],
        "{op}: dy must be [{b}, {d}] for x {:?}, got {:?}",
        x.shape(),
        dy.shape()
    );
    let gpu = x.gpu();
    let params = [b as u32, l as u32, d as u32];
    let g = Tensor::empty(gpu, &[l], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "layer_mix_backward_dots",
        &[x.buffer(), dy.buffer(), g.buffer()],
        &params,
        l as u32,
    )?;
    let dw = Tensor::empty(gpu, &[l], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "layer_mix_backward_weights",
        &[w.buffer(), g.buffer(), dw.buffer()],
        &params,
        l.div_ceil(WG) as u32,
    )?;
    let dx = if need_dx {
        let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
        gpu.dispatch(
            &SHADER,
            "layer_mix_backward_input",
            &[w.buffer(), dy.buffer(), dx.buffer()],
            &params,
            (b * l * d).div_ceil(WG) as u32,
        )?;
        Some(dx)
    } else {
        None
    };
    Ok((dw, dx))
}

/// CPU references in f64.
pub mod reference {
    /// softmax(w) in f64.
    pub fn softmax<T: Copy + Into<f64>>(w: &[T]) -> Vec<f64> {
        let w: Vec<f64> = w.iter().map(|&v| v.into()).collect();
        let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = w.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    }

    /// `[B, L, D]`, `[L]` -> `[B, D]`.
    pub fn layer_mix<T: Copy + Into<f64>>(x: &[T], w: &[T], b: usize, l: usize, d: usize) -> Vec<f64> {
        let a = softmax(w);
        let mut y = vec![0f64; b * d];
        for bi in 0..b {
            for (li, &al) in a.iter().enumerate().take(l) {
                for di in 0..d {
                    y[bi * d + di] += al * x[(bi * l + li) * d + di].into();
                }
            }
        }
        y
    }

    /// `(dw [L], dx [B, L, D])`.
    pub fn layer_mix_backward<T: Copy + Into<f64>, U: Copy + Into<f64>>(
        dy: &[U],
        x: &[T],
        w: &[T],
        b: usize,
        l: usize,
        d: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let a = softmax(w);
        let mut g = vec![0f64; l];
        let mut dx = vec![0f64; b * l * d];
        for bi in 0..b {
            for li in 0..l {
                for di in 0..d {
                    let dyv: f64 = dy[bi * d + di].into();
                    g[li] += dyv * x[(bi * l + li) * d + di].into();
                    dx[(bi * l + li) * d + di] = a[li] * dyv;
                }
            }
        }
        let ag: f64 = a.iter().zip(&g).map(|(a, g)| a * g).sum();
        let dw = a.iter().zip(&g).map(|(a, g)| a * (g - ag)).collect();
        (dw, dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, assert_close_f64, central_differences, dot_f64, random_vec, to_f64, Tol};

    #[test]
    fn layer_mix_fixed_case() {
        // Equal logits: the plain mean of the layers.
        let gpu = test_gpu();
        let x = Tensor::from_slice(gpu, &[1.0, 2.0, 3.0, 6.0], &[1, 2, 2]).unwrap();
        let w = Tensor::from_slice(gpu, &[0.5, 0.5], &[2]).unwrap();
        assert_eq!(layer_mix(&x, &w).unwrap().to_vec().unwrap(), vec![2.0, 4.0]);
    }

    #[test]
    fn layer_mix_matches_reference() {
        let gpu = test_gpu();
        for (seed, b, l, d) in [(1, 3, 13, 37), (2, 1, 1, 5), (3, 17, 7, 300)] {
            let x = random_vec(seed, b * l * d, 2.0);
            let w = random_vec(seed + 100, l, 3.0);
            let got = layer_mix(
                &Tensor::from_slice(gpu, &x, &[b, l, d]).unwrap(),
                &Tensor::from_slice(gpu, &w, &[l]).unwrap(),
            )
            .unwrap();
            assert_close(
                &format!("layer_mix {b}x{l}x{d}"),
                &got.to_vec().unwrap(),
                &reference::layer_mix(&x, &w, b, l, d),
                Tol::KERNEL,
            );
        }
    }

    #[test]
    fn layer_mix_reference_grad_matches_finite_differences() {
        let (b, l, d) = (3, 5, 4);
        let x = to_f64(&random_vec(7, b * l * d, 1.0));
        let w = to_f64(&random_vec(8, l, 2.0));
        let dy = to_f64(&random_vec(9, b * d, 1.0));
        let (dw, dx) = reference::layer_mix_backward(&dy, &x, &w, b, l, d);
        let h = 1e-6;
        let fd_w = central_differences(&w, h, |w| dot_f64(&dy, &reference::layer_mix(&x, w, b, l, d)));
        assert_close_f64("layer_mix dw vs finite differences", &dw, &fd_w, Tol::FINITE_DIFF);
        let fd_x = central_differences(&x, h, |x| dot_f64(&dy, &reference::layer_mix(x, &w, b, l, d)));
        assert_close_f64("layer_mix dx vs finite differences", &dx, &fd_x, Tol::FINITE_DIFF);
    }

    #[test]
    fn layer_mix_backward_grad_matches_reference() {
        let gpu = test_gpu();
        for (seed, b, l, d) in [(11, 3, 13, 37), (12, 1, 1, 5), (13, 19, 7, 300)] {
            let x = random_vec(seed, b * l * d, 2.0);
            let w = random_vec(seed + 1, l, 3.0);
            let dy = random_vec(seed + 2, b * d, 1.0);
            let (dw, dx) = layer_mix_backward(
                &Tensor::from_slice(gpu, &dy, &[b, d]).unwrap(),
                &Tensor::from_slice(gpu, &x, &[b, l, d]).unwrap(),
                &Tensor::from_slice(gpu, &w, &[l]).unwrap(),
                true,
            )
            .unwrap();
            let (want_dw, want_dx) = reference::layer_mix_backward(&dy, &x, &w, b, l, d);
            // dw sums B * D products per layer (up to 5700 here): a long reduction.
            assert_close(
                &format!("layer_mix dw {b}x{l}x{d}"),
                &dw.to_vec().unwrap(),
                &want_dw,
                Tol::REDUCTION,
            );
            assert_close(
                &format!("layer_mix dx {b}x{l}x{d}"),
                &dx.unwrap().to_vec().unwrap(),
                &want_dx,
                Tol::KERNEL,
            );
        }
    }
}
