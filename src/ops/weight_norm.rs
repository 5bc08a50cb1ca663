//! Weight normalisation over the kernel dimension (`shaders/weight_norm.wgsl`), as torch's
//! `weight_norm(conv, name="weight", dim=2)` on wav2vec 2.0's positional conv:
//! w[o, i, k] = g[k] * v[o, i, k] / ||v[:, :, k]||. The student trains g and v through it (as DistilHuBERT
//! does). The teacher runs the same op each forward (two small dispatches), so one code path serves both.

use anyhow::{bail, Result};

use crate::gpu::{DType, Shader, Tensor};

static SHADER: Shader = crate::shader!("weight_norm");
const WG: usize = 256;

fn dims(g: &Tensor, v: &Tensor) -> Result<(usize, usize)> {
    let k = *v.shape().last().unwrap_or(&0);
    if v.shape().len() != 3 || g.numel() != k || k == 0 {
        bail!(
            "weight_norm: v must be [O, I, K] and g hold K values; got v {:?}, g {:?}",
            v.shape(),
            g.shape()
        );
    }
    Ok((v.numel() / k, k))
}

/// Returns (w [O, I, K], norms [K]); the norms are what the backward needs.
pub fn weight_norm(g: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let (m, k) = dims(g, v)?;
    let gpu = v.gpu();
    let norms = Tensor::empty(gpu, &[k], DType::F32)?;
    let params = [m as u32, k as u32];
    gpu.dispatch(
        &SHADER,
        "weight_norm_norms_forward",
        &[v.buffer(), norms.buffer()],
        &params,
        k as u32,
    )?;
    let w = Tensor::empty(gpu, v.shape(), DType::F32)?;
    let (entry, per_invocation) = super::vec4_or_scalar(k, ("weight_norm_apply_forward4", "weight_norm_apply_forward"));
    let groups = (m * k / per_invocation).div_ceil(WG) as u32;
    let bufs = [g.buffer(), v.buffer(), norms.buffer(), w.buffer()];
    gpu.dispatch(&SHADER, entry, &bufs, &params, groups)?;
    Ok((w, norms))
}

/// (dg [K] shaped like g, dv [O, I, K]) from dw.
pub fn weight_norm_backward(dw: &Tensor, g: &Tensor, v: &Tensor, norms: &Tensor) -> Result<(Tensor, Tensor)> {
    let (m, k) = dims(g, v)?;
    if dw.shape() != v.shape() {
        bail!("weight_norm_backward: dw {:?} must match v {:?}", dw.shape(), v.shape());
    }
    let gpu = v.gpu();
    let params = [m as u32, k as u32];
    let dg = Tensor::empty(gpu, g.shape(), DType::F32)?;
    let bufs = [dw.buffer(), v.buffer(), norms.buffer(), dg.buffer()];
    gpu.dispatch(&SHADER, "weight_norm_dg_backward", &bufs, &params, k as u32)?;
    let dv = Tensor::empty(gpu, v.shape(), DType::F32)?;
    let bufs = [
        dw.buffer(),
        v.buffer(),
        g.buffer(),
        norms.buffer(),
        dg.buffer(),
        dv.buffer(),
    ];
    let (entry, per_invocation) = super::vec4_or_scalar(k, ("weight_norm_dv_backward4", "weight_norm_dv_backward"));
    let groups = (m * k / per_invocation).div_ceil(WG) as u32;
    gpu.dispatch(&SHADER, entry, &bufs, &params, groups)?;
    Ok((dg, dv))
}

/// CPU references in f64. v is [M, K] with k fastest.
pub mod reference {
    pub fn norms(v: &[f64], k: usize) -> Vec<f64> {
        let mut n = vec![0.0; k];
        for (i, x) in v.iter().enumerate() {
            n[i % k] += x * x;
        }
        n.iter().map(|s| s.sqrt()).collect()
    }

    pub fn weight_norm(g: &[f64], v: &[f64]) -> Vec<f64> {
        let k = g.len();
        let n = norms(v, k);
        v.iter().enumerate().map(|(i, x)| g[i % k] * x / n[i % k]).collect()
    }

    pub fn weight_norm_backward(dw: &[f64], g: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let k = g.len();
        let n = norms(v, k);
        let mut dg = vec![0.0; k];
        for (i, (d, x)) in dw.iter().zip(v).enumerate() {
            dg[i % k] += d * x / n[i % k];
        }
        let dv = v
            .iter()
            .zip(dw)
            .enumerate()
            .map(|(i, (x, d))| (g[i % k] / n[i % k]) * (d - dg[i % k] * x / n[i % k]));
        (dg.clone(), dv.collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, random_vec, Tol};

    fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    #[test]
    fn weight_norm_matches_reference() {
        let gpu = test_gpu();
        // K = 7: the scalar kernel; K = 12: the vec4 one.
        for (o, i, k) in [(12, 5, 7), (13, 5, 12)] {
            let g = random_vec(1, k, 2.0);
            let v = random_vec(2, o * i * k, 1.0);
            let (w, _) = weight_norm(
                &Tensor::from_slice(gpu, &g, &[1, 1, k]).unwrap(),
                &Tensor::from_slice(gpu, &v, &[o, i, k]).unwrap(),
            )
            .unwrap();
            assert_close(
                &format!("weight_norm K = {k}"),
                &w.to_vec().unwrap(),
                &reference::weight_norm(&f64s(&g), &f64s(&v)),
                Tol::KERNEL,
            );
        }
    }

    #[test]
    fn weight_norm_fixed_case() {
        // v[o, i, k] for O = 2, I = 1, K = 2: column k=0 is (3, 4), norm 5; k=1 is (0, 2), norm 2.
        let gpu = test_gpu();
        let g = Tensor::from_slice(gpu, &[10.0, -1.0], &[1, 1, 2]).unwrap();
        let v = Tensor::from_slice(gpu, &[3.0, 0.0, 4.0, 2.0], &[2, 1, 2]).unwrap();
        assert_eq!(
            weight_norm(&g, &v).unwrap().0.to_vec().unwrap(),
            vec![6.0, 0.0, 8.0, -1.0]
        );
    }

    #[test]
    fn weight_norm_grad_reference_matches_finite_differences() {
        let (m, k) = (9, 4);
        let g = f64s(&random_vec(3, k, 2.0));
        let v = f64s(&random_vec(4, m * k, 1.0));
        let dw = f64s(&random_vec(5, m * k, 1.0));
        let loss =
            |g: &[f64], v: &[f64]| -> f64 { reference::weight_norm(g, v).iter().zip(&dw).map(|(a, b)| a * b).sum() };
        let (dg, dv) = reference::weight_norm_backward(&dw, &g, &v);
        let h = 1e-6;
        for j in 0..k {
            let (mut gp, mut gm) = (g.clone(), g.clone());
            gp[j] += h;
            gm[j] -= h;
            let fd = (loss(&gp, &v) - loss(&gm, &v)) / (2.0 * h);
            assert!(
                (fd - dg[j]).abs() < 1e-6 * fd.abs().max(1.0),
                "dg[{j}]: {} vs fd {fd}",
                dg[j]
            );
        }
        for j in 0..m * k {
            let (mut vp, mut vm) = (v.clone(), v.clone());
            vp[j] += h;
            vm[j] -= h;
            let fd = (loss(&g, &vp) - loss(&g, &vm)) / (2.0 * h);
            assert!(
                (fd - dv[j]).abs() < 1e-6 * fd.abs().max(1.0),
                "dv[{j}]: {} vs fd {fd}",
                dv[j]
            );
        }
    }

    #[test]
    fn weight_norm_grad_matches_reference() {
        // K = 9: the scalar dv kernel; K = 8: the vec4 one.
        for (o, i, k) in [(24, 11, 9), (23, 7, 8)] {
            check_weight_norm_grad(o, i, k);
        }
    }

    fn check_weight_norm_grad(o: usize, i: usize, k: usize) {
        let gpu = test_gpu();
        let g = random_vec(6, k, 2.0);
        let v = random_vec(7, o * i * k, 1.0);
        let dw = random_vec(8, o * i * k, 1.0);
        let (gt, vt) = (
            Tensor::from_slice(gpu, &g, &[1, 1, k]).unwrap(),
            Tensor::from_slice(gpu, &v, &[o, i, k]).unwrap(),
        );
        let (_, norms) = weight_norm(&gt, &vt).unwrap();
        let (dg, dv) =
            weight_norm_backward(&Tensor::from_slice(gpu, &dw, &[o, i, k]).unwrap(), &gt, &vt, &norms).unwrap();
        let (rdg, rdv) = reference::weight_norm_backward(&f64s(&dw), &f64s(&g), &f64s(&v));
        assert_close(
            &format!("weight_norm dg K = {k}"),
            &dg.to_vec().unwrap(),
            &rdg,
            Tol::KERNEL,
        );
        assert_close(
            &format!("weight_norm dv K = {k}"),
            &dv.to_vec().unwrap(),
            &rdv,
            Tol::KERNEL,
        );
    }
}
