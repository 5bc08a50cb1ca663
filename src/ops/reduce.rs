//! Deterministic reductions (`shaders/reduce.wgsl`): full sums, means, sums of squares and L2 norms to a
//! `[1]` tensor, and column sums (`sum_rows`, what bias gradients need), each with its backward.
//!
//! Determinism: the summation order depends only on the sizes, never on scheduling (no atomics), so a
//! result is bit-identical from run to run.
//!
//! Accuracy of a full sum over N elements: stage 1 splits x into P <= 1024 contiguous chunks, one per
//! workgroup; each of its 256 invocations adds a strided run of `chunk / 256` elements (at least 4, about
//! 40 for N = 10M) and a 256-leaf binary tree combines them; stage 2 does the same over the P partials in one
//! workgroup. Every element therefore goes through at most `chunk / 256 + ceil(P / 256) + 16` roundings, and
//! the standard bound for recursive summation gives
//! `|sum_f32 - sum| <= (chunk / 256 + ceil(P / 256) + 17) * 2^-24 * sum |x_i|` (+1 for the final division),
//! ~3.5e-6 * sum |x_i| at N = 10M (tests check it, and print the error actually reached, far below).

use anyhow::{ensure, Result};

use crate::gpu::{DType, Gpu, Shader, Tensor};

static SHADER: Shader = crate::shader!("reduce");
const WG: usize = 256;
/// Most partials of stage 1 (the single workgroup of stage 2 then adds at most 4 each).
const MAX_PARTIALS: usize = 1024;
/// Most partials per tensor of [`norm_l2`]: fewer, longer runs per invocation. The gradient norm reads every
/// parameter at every step, and with 1024 workgroups of ~9 elements per invocation the workgroup trees'
/// barriers cost more than the loads (on lavapipe it ran at a tenth of AdamW's bytes per second).
const NORM_MAX_PARTIALS: usize = 64;
/// Least elements per invocation in stage 1: keeps partial counts (and stage 2) small for mid-size inputs.
const MIN_PER_THREAD: usize = 4;

/// How stage 1 splits `n` elements: `groups` workgroups of `chunk` contiguous elements (the last shorter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub n: usize,
    pub chunk: usize,
    pub groups: usize,
}

impl Plan {
    pub(crate) fn new(n: usize) -> Plan {
        Plan::with_max_partials(n, MAX_PARTIALS)
    }

    /// As [`Plan::new`], with at most `max_partials` workgroups.
    pub(crate) fn with_max_partials(n: usize, max_partials: usize) -> Plan {
        let per_thread = n.div_ceil(WG * max_partials).max(MIN_PER_THREAD);
        let chunk = per_thread * WG;
        Plan {
            n,
            chunk,
            groups: n.div_ceil(chunk),
        }
    }

    /// The uniform block of a stage-1 kernel (`PartialParams` in the shaders) writing at `offset`.
    pub(crate) fn params(&self, offset: usize) -> [u32; 4] {
        [self.n, self.chunk, offset, self.groups].map(|v| v as u32)
    }

    /// Roundings one element goes through on its way to the total (see the module docs).
    #[cfg(test)]
    pub(crate) fn depth(&self) -> usize {
        self.chunk / WG + self.groups.div_ceil(WG) + 2 * WG.ilog2() as usize + 1
    }
}

pub(crate) fn check_f32(op: &str, what: &str, t: &Tensor) -> Result<()> {
    ensure!(t.dtype() == DType::F32, "{op}: {what} must be f32, got {:?}", t.dtype());
    // Half the u32 range, so that chunk ends (start + chunk) never wrap in the kernels.
    ensure!(
        t.numel() <= (u32::MAX / 2) as usize,
        "{op}: {what} {:?} is beyond 2^31 elements (32-bit indexing); split it",
        t.shape()
    );
    Ok(())
}

/// Stage 2: sums `count` partials of `part` into a new `[1]` tensor, divides by `divisor`, and takes the square
/// root when `root`.
pub(crate) fn finish(gpu: &Gpu, part: &Tensor, count: usize, divisor: f32, root: bool) -> Result<Tensor> {
    let out = Tensor::empty(gpu, &[1], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "sum_final_forward",
        &[part.buffer(), out.buffer()],
        &[count as u32, divisor.to_bits(), root as u32],
        1,
    )?;
    Ok(out)
}

/// Stage 1 over every tensor of `xs` (squared when `square`, each in at most `max_partials` workgroups), all
/// partials in one buffer, then stage 2.
fn reduce_many(
    op: &str,
    xs: &[&Tensor],
    square: bool,
    max_partials: usize,
    divisor: f32,
    root: bool,
) -> Result<Tensor> {
    ensure!(!xs.is_empty(), "{op}: no tensors given");
    let gpu = xs[0].gpu();
    let plans: Vec<Plan> = xs
        .iter()
        .map(|x| Plan::with_max_partials(x.numel(), max_partials))
        .collect();
    for x in xs {
        check_f32(op, "input", x)?;
    }
    let total: usize = plans.iter().map(|p| p.groups).sum();
    ensure!(total < u32::MAX as usize, "{op}: too many partials ({total})");
    let part = Tensor::empty(gpu, &[total.max(1)], DType::F32)?;
    let constants = [("SQUARE", if square { 1.0 } else { 0.0 })];
    let mut offset = 0;
    for (x, plan) in xs.iter().zip(&plans) {
        gpu.dispatch_with(
            &SHADER,
            "sum_partial_forward",
            &constants,
            &[x.buffer(), part.buffer()],
            &plan.params(offset),
            plan.groups as u32,
        )?;
        offset += plan.groups;
    }
    finish(gpu, &part, total, divisor, root)
}

/// The sum of every element, as a `[1]` tensor.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    reduce_many("sum_all", &[x], false, MAX_PARTIALS, 1.0, false)
}

/// The mean of every element, as a `[1]` tensor (the sum divided by N in f32).
pub fn mean_all(x: &Tensor) -> Result<Tensor> {
    ensure!(x.numel() > 0, "mean_all: x {:?} is empty", x.shape());
    reduce_many("mean_all", &[x], false, MAX_PARTIALS, x.numel() as f32, false)
}

/// The sum of squares of every element, as a `[1]` tensor.
pub fn sum_squares_all(x: &Tensor) -> Result<Tensor> {
    reduce_many("sum_squares_all", &[x], true, MAX_PARTIALS, 1.0, false)
}

/// The L2 norm of all the tensors together, `sqrt(sum over every element of every tensor of x^2)`, as a `[1]`
/// tensor: the global gradient norm of gradient clipping. One stage-1 dispatch per tensor (at most
/// `NORM_MAX_PARTIALS` workgroups each, so the accuracy bound of the module docs grows with `chunk / 256`: about
/// 1e-5 of the sum of squares for a 2.4 M-element tensor), one stage 2.
pub fn norm_l2(xs: &[&Tensor]) -> Result<Tensor> {
    reduce_many("norm_l2", xs, true, NORM_MAX_PARTIALS, 1.0, true)
}

fn broadcast(op: &str, dy: &Tensor, shape: &[usize], divisor: f32) -> Result<Tensor> {
    check_f32(op, "dy", dy)?;
    ensure!(dy.numel() == 1, "{op}: dy must hold one value, got {:?}", dy.shape());
    let dx = Tensor::empty(dy.gpu(), shape, DType::F32)?;
    check_f32(op, "dx", &dx)?;
    let n = dx.numel();
    dy.gpu().dispatch(
        &SHADER,
        "sum_all_backward",
        &[dy.buffer(), dx.buffer()],
        &[n as u32, divisor.to_bits()],
        n.div_ceil(WG) as u32,
    )?;
    Ok(dx)
}

/// Backward of [`sum_all`]: `dx` of `shape`, every element `dy[0]`.
pub fn sum_all_backward(dy: &Tensor, shape: &[usize]) -> Result<Tensor> {
    broadcast("sum_all_backward", dy, shape, 1.0)
}

/// Backward of [`mean_all`]: `dx` of `shape`, every element `dy[0] / N`.
pub fn mean_all_backward(dy: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    ensure!(n > 0, "mean_all_backward: shape {shape:?} is empty");
    broadcast("mean_all_backward", dy, shape, n as f32)
}

fn rows_cols(op: &str, shape: &[usize]) -> Result<(usize, usize)> {
    let Some(&c) = shape.last() else {
        anyhow::bail!("{op}: x must have at least one dimension");
    };
    ensure!(c > 0, "{op}: the last dimension of {shape:?} is empty");
    Ok((shape.iter().product::<usize>() / c, c))
}

/// `[R, C]` column sums: rows per chunk ~ sqrt(R), so each output goes through ~2 sqrt(R) roundings.
fn rows_params(r: usize, c: usize) -> [u32; 5] {
    let chunk = ((r as f64).sqrt().ceil() as usize).max(16);
    [r, c, chunk, r.div_ceil(chunk), c.div_ceil(WG)].map(|v| v as u32)
}

/// Sums over every leading dimension: `[.., C] -> [C]` (the bias gradient of a layer applied to every row).
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    check_f32("sum_rows", "x", x)?;
    let (r, c) = rows_cols("sum_rows", x.shape())?;
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, &[c], DType::F32)?;
    if r == 0 {
        y.fill(0.0)?;
        return Ok(y);
    }
    let params = rows_params(r, c);
    let (k, n_wg_c) = (params[3] as usize, params[4] as usize);
    let part = Tensor::empty(gpu, &[k, c], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "sum_rows_partial_forward",
        &[x.buffer(), part.buffer()],
        &params,
        (k * n_wg_c) as u32,
    )?;
    gpu.dispatch(
        &SHADER,
        "sum_rows_combine_forward",
        &[part.buffer(), y.buffer()],
        &params,
        n_wg_c as u32,
    )?;
    Ok(y)
}

/// Backward of [`sum_rows`]: `dx` of `shape` (`[.., C]`), every row `dy` (`[C]`).
pub fn sum_rows_backward(dy: &Tensor, shape: &[usize]) -> Result<Tensor> {
    check_f32("sum_rows_backward", "dy", dy)?;
    let (r, c) = rows_cols("sum_rows_backward", shape)?;
    ensure!(
        dy.shape() == [c],
        "sum_rows_backward: dy must be [{c}] for an input of {shape:?}, got {:?}",
        dy.shape()
    );
    let dx = Tensor::empty(dy.gpu(), shape, DType::F32)?;
    check_f32("sum_rows_backward", "dx", &dx)?;
    dy.gpu().dispatch(
        &SHADER,
        "sum_rows_backward",
        &[dy.buffer(), dx.buffer()],
        &rows_params(r, c),
        (r * c).div_ceil(WG) as u32,
    )?;
    Ok(dx)
}

/// CPU references, f64 accumulation.
pub mod reference {
    pub fn sum(x: &[f32]) -> f64 {
        x.iter().map(|&v| v as f64).sum()
    }

    pub fn sum_abs(x: &[f32]) -> f64 {
        x.iter().map(|&v| (v as f64).abs()).sum()
    }

    pub fn sum_squares(x: &[f32]) -> f64 {
        x.iter().map(|&v| v as f64 * v as f64).sum()
    }

    pub fn mean(x: &[f32]) -> f64 {
        sum(x) / x.len() as f64
    }

    /// `[R, C] -> [C]`.
    pub fn sum_rows(x: &[f32], c: usize) -> Vec<f64> {
        let mut y = vec![0f64; c];
        for row in x.chunks(c) {
            for (acc, &v) in y.iter_mut().zip(row) {
                *acc += v as f64;
            }
        }
        y
    }

    /// d mean / dx_i = dy / N.
    pub fn mean_backward(dy: f64, n: usize) -> Vec<f64> {
        vec![dy / n as f64; n]
    }

    /// d (sum over rows) / dx_rc = dy_c.
    pub fn sum_rows_backward(dy: &[f64], r: usize) -> Vec<f64> {
        (0..r).flat_map(|_| dy.iter().copied()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, random_vec, Tol};

    fn scalar(t: Result<Tensor>) -> f32 {
        let v = t.unwrap().to_vec().unwrap();
        assert_eq!(v.len(), 1);
        v[0]
    }

    /// Checks |got - want| against the rigorous bound `depth * 2^-24 * sum |x|` of the plan; prints the error.
    fn check_sum(name: &str, got: f32, want: f64, abs_sum: f64, n: usize) {
        let bound = Plan::new(n).depth() as f64 * f32::EPSILON as f64 / 2.0 * abs_sum;
        let err = (got as f64 - want).abs();
        eprintln!(
            "{name} (N = {n}): got {got}, want {want:.9e}, |err| = {err:.3e}, |err| / sum|x| = {:.3e}, \
             |err| / |want| = {:.3e} (bound {:.3e} * sum|x|)",
            err / abs_sum.max(1e-300),
            err / want.abs().max(1e-300),
            bound / abs_sum.max(1e-300)
        );
        assert!(err <= bound, "{name}: |err| {err:.3e} > bound {bound:.3e}");
    }

    #[test]
    fn plans_cover_every_element() {
        for n in [0, 1, 255, 1023, 1024, 1025, 262_143, 10_000_019, 1 << 30] {
            let p = Plan::new(n);
            assert!(p.groups * p.chunk >= n && p.groups <= MAX_PARTIALS, "{p:?}");
            assert!(p.groups == 0 || (p.groups - 1) * p.chunk < n, "{p:?}");
            assert_eq!(p.chunk % WG, 0);
        }
        assert_eq!(Plan::new(10_000_019).chunk / WG, 39);
    }

    #[test]
    fn small_sums_are_exact_on_a_fixed_case() {
        let gpu = test_gpu();
        let x: Vec<f32> = (1..=1000).map(|v| v as f32).collect();
        let t = Tensor::from_slice(gpu, &x, &[10, 100]).unwrap();
        assert_eq!(scalar(sum_all(&t)), 500_500.0);
        // The mean is the exact sum divided on the GPU, and WGSL only promises division to 2.5 ULP (NVIDIA
        // multiplies by a reciprocal: 500.50003 on an H100, exactly 500.5 on lavapipe).
        let mean = scalar(mean_all(&t));
        let ulp = 500.5f32.next_up() - 500.5;
        assert!(
            (mean - 500.5).abs() <= 2.5 * ulp,
            "mean {mean}, want 500.5 within 2.5 ULP"
        );
        // Every partial of these stays an integer below 2^24, so f32 is exact.
        let y: Vec<f32> = (1..=100).map(|v| v as f32).collect();
        assert_eq!(
            scalar(sum_squares_all(&Tensor::from_slice(gpu, &y, &[100]).unwrap())),
            338_350.0
        );
        let cols = sum_rows(&t).unwrap().to_vec().unwrap();
        assert_eq!(cols[0], (0..10).map(|r| (r * 100 + 1) as f32).sum::<f32>());
        let e = Tensor::zeros(gpu, &[0]).unwrap();
        assert_eq!(scalar(sum_all(&e)), 0.0);
        assert!(mean_all(&e).is_err());
    }

    #[test]
    fn sum_all_is_accurate_on_10m_elements() {
        let gpu = test_gpu();
        let n = 10_000_019;
        // Zero-mean data: heavy cancellation (|sum| << sum |x|), the hard case for the bound.
        let x = random_vec(11, n, 1.0);
        let t = Tensor::from_slice(gpu, &x, &[n]).unwrap();
        let s = scalar(sum_all(&t));
        check_sum("sum_all zero-mean", s, reference::sum(&x), reference::sum_abs(&x), n);
        // Squares: no cancellation, so the error is relative to the result itself.
        let sq = scalar(sum_squares_all(&t));
        let want = reference::sum_squares(&x);
        check_sum("sum_squares_all", sq, want, want, n);
        assert!(((sq as f64 - want) / want).abs() < 1e-6);
    }

    #[test]
    fn mean_all_is_accurate_and_deterministic() {
        let gpu = test_gpu();
        let n = 1_000_003;
        let x: Vec<f32> = random_vec(12, n, 1.0).iter().map(|v| v + 1.5).collect();
        let t = Tensor::from_slice(gpu, &x, &[n]).unwrap();
        let m = scalar(mean_all(&t));
        let want = reference::mean(&x);
        check_sum("mean_all positive", m, want, want, n);
        assert!(((m as f64 - want) / want).abs() < 1e-6);
        let again = scalar(mean_all(&t));
        assert_eq!(m.to_bits(), again.to_bits(), "mean_all is not deterministic");
        let s1 = sum_all(&t).unwrap();
        let s2 = sum_all(&t).unwrap();
        assert_eq!(
            s1.to_vec().unwrap(),
            s2.to_vec().unwrap(),
            "sum_all is not deterministic"
        );
    }

    #[test]
    fn norm_l2_spans_several_tensors() {
        let gpu = test_gpu();
        let sizes = [1usize, 300, 70_001, 2_049];
        let vecs: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| random_vec(20 + i as u64, n, 2.0))
            .collect();
        let ts: Vec<Tensor> = vecs
            .iter()
            .map(|v| Tensor::from_slice(gpu, v, &[v.len()]).unwrap())
            .collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let got = scalar(norm_l2(&refs));
        let want = vecs.iter().map(|v| reference::sum_squares(v)).sum::<f64>().sqrt();
        let rel = ((got as f64 - want) / want).abs();
        eprintln!("norm_l2: got {got}, want {want:.9e}, rel err {rel:.3e}");
        assert!(rel < 1e-6);
        assert!(norm_l2(&[]).is_err());
        // A parameter-sized tensor (768 x 3072 + 1) takes the long runs of the norm's plan: the error stays within
        // that plan's bound on the sum of squares (all terms positive, so relative to the sum itself).
        let v = random_vec(30, 768 * 3072 + 1, 2.0);
        let plan = Plan::with_max_partials(v.len(), NORM_MAX_PARTIALS);
        assert!(plan.groups <= NORM_MAX_PARTIALS && plan.chunk / WG > 100, "{plan:?}");
        let t = Tensor::from_slice(gpu, &v, &[v.len()]).unwrap();
        let got = scalar(norm_l2(&[&t])) as f64;
        let want = reference::sum_squares(&v);
        let bound = plan.depth() as f64 * f32::EPSILON as f64 / 2.0 * want;
        let err = (got * got - want).abs();
        eprintln!(
            "norm_l2 (N = {}): |err| / sum = {:.3e} (bound {:.3e})",
            v.len(),
            err / want,
            bound / want
        );
        // got^2 adds the square root's rounding (2 ulp relative) to the sum's error.
        assert!(
            err <= bound + 4.0 * f32::EPSILON as f64 * want,
            "{err:.3e} > {bound:.3e}"
        );
    }

    #[test]
    fn sum_rows_matches_reference() {
        let gpu = test_gpu();
        for (seed, r, c) in [(30, 1_001, 300), (31, 7, 1), (32, 3, 517)] {
            let x = random_vec(seed, r * c, 1.0);
            let y = sum_rows(&Tensor::from_slice(gpu, &x, &[1, r, c]).unwrap()).unwrap();
            assert_eq!(y.shape(), [c]);
            assert_close(
                &format!("sum_rows {r}x{c}"),
                &y.to_vec().unwrap(),
                &reference::sum_rows(&x, c),
                Tol::KERNEL,
            );
        }
        let u = Tensor::from_u32(gpu, &[1, 2], &[2]).unwrap();
        assert!(sum_rows(&u).is_err());
    }

    #[test]
    fn reduce_reference_grads_match_finite_differences() {
        // Both ops are linear, so central differences are exact up to rounding (~1e-16 / h).
        let h = 1e-6;
        let (r, c) = (5, 3);
        let x: Vec<f32> = random_vec(40, r * c, 1.0);
        let dy_rows: Vec<f64> = vec![0.3, -1.2, 2.0];
        let g_mean = reference::mean_backward(0.7, r * c);
        let g_rows = reference::sum_rows_backward(&dy_rows, r);
        for i in 0..r * c {
            let f = |d: f64| {
                let xs: Vec<f64> = (0..r * c).map(|j| x[j] as f64 + if i == j { d } else { 0.0 }).collect();
                let mean = xs.iter().sum::<f64>() / xs.len() as f64;
                let rows: f64 = (0..c)
                    .map(|cc| dy_rows[cc] * (0..r).map(|rr| xs[rr * c + cc]).sum::<f64>())
                    .sum();
                (0.7 * mean, rows)
            };
            let (p, m) = (f(h), f(-h));
            let fd = ((p.0 - m.0) / (2.0 * h), (p.1 - m.1) / (2.0 * h));
            assert!((fd.0 - g_mean[i]).abs() < 1e-6 * g_mean[i].abs().max(1.0));
            assert!((fd.1 - g_rows[i]).abs() < 1e-6 * g_rows[i].abs().max(1.0));
        }
    }

    #[test]
    fn reduce_backward_grads_match_reference() {
        let gpu = test_gpu();
        let dy = Tensor::from_slice(gpu, &[0.7], &[1]).unwrap();
        let shape = [3, 333];
        let dx = mean_all_backward(&dy, &shape).unwrap().to_vec().unwrap();
        assert_close(
            "mean_all_backward",
            &dx,
            &reference::mean_backward(0.7f32 as f64, 999),
            Tol::KERNEL,
        );
        let dx = sum_all_backward(&dy, &shape).unwrap().to_vec().unwrap();
        assert!(dx.iter().all(|&v| v == 0.7));

        let dyr = random_vec(41, 257, 1.0);
        let dx = sum_rows_backward(&Tensor::from_slice(gpu, &dyr, &[257]).unwrap(), &[2, 3, 257])
            .unwrap()
            .to_vec()
            .unwrap();
        let want = reference::sum_rows_backward(&dyr.iter().map(|&v| v as f64).collect::<Vec<_>>(), 6);
        assert_close("sum_rows_backward", &dx, &want, Tol::KERNEL);
        assert!(sum_rows_backward(&dy, &[2, 3]).is_err());
        assert!(mean_all_backward(&Tensor::zeros(gpu, &[2]).unwrap(), &shape).is_err());
    }
}
