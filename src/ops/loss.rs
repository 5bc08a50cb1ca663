//! The MLKD distillation loss (`shaders/loss.wgsl`), forward and backward, for a prediction `p` and a target
//! `t` of the same shape `[.., D]` (rows = frames, e.g. `[B, T, D]` with B * T rows):
//!
//! `L = mean |p - t| + lambda * mean over rows of -log sigmoid(cos(p_r, t_r))`
//!
//! Pieces: [`l1_loss`], [`cosine_rows`] (torch's `cosine_similarity(dim=-1, eps=1e-8)`), [`log_sigmoid`], and
//! [`distill_loss`] composing them (with [`reduce::mean_all`] and [`elementwise::scale`]). Targets are
//! constants (cached teacher features), so every backward returns the gradient for `p` only.
//! Every row counts: a caller with padded frames passes only the valid ones.
//!
//! Cosine semantics, checked against torch 2.15 by experiment (`/root/venv-fixtures`, f64):
//! `cos = sum (p / max(|p|, eps)) * (t / max(|t|, eps))`: each norm clamped separately (older torch clamped
//! `|p|^2 |t|^2` at eps^2; for p = t = [1e-5, 0] that would give 0.01, torch 2.15 gives 1). The clamp runs
//! under no_grad on a clone of the norm, so autograd still differentiates the norm itself:
//! `dp = g * (t / (cp * ct) - cos / cp * p / |p|)` with `cp = max(|p|, eps)`, `ct = max(|t|, eps)` and
//! `p / |p|` taken as 0 when p = 0; e.g. p = [1e-9, 0], t = [3, 4] gives cos 0.06 and dp = [5.4e7, 8e7], and
//! p = 0 gives cos 0 and dp = [6e7, 8e7] (measured; see the fixed case in the tests). For |p| >= eps this is
//! the exact derivative.

use anyhow::{ensure, Result};

use crate::gpu::{DType, Shader, Tensor};
use crate::ops::elementwise::{add, add_assign, scale};
use crate::ops::reduce::{self, check_f32, mean_all, mean_all_backward, Plan};

static SHADER: Shader = crate::shader!("loss");
const WG: usize = 256;

/// torch.nn.functional.cosine_similarity's default eps.
pub const COSINE_EPS: f32 = 1e-8;

fn groups(n: usize) -> u32 {
    n.div_ceil(WG) as u32
}

fn check_pair(op: &str, p: &Tensor, t: &Tensor) -> Result<()> {
    check_f32(op, "prediction", p)?;
    check_f32(op, "target", t)?;
    ensure!(
        p.shape() == t.shape(),
        "{op}: prediction {:?} and target {:?} must have the same shape",
        p.shape(),
        t.shape()
    );
    Ok(())
}

/// Rows and row length of `[.., D]`.
fn rows_d(op: &str, p: &Tensor) -> Result<(usize, usize)> {
    let d = p.shape().last().copied().unwrap_or(0);
    ensure!(d > 0, "{op}: expected [.., D] with D > 0, got {:?}", p.shape());
    Ok((p.numel() / d, d))
}

fn check_scalar(op: &str, what: &str, t: &Tensor) -> Result<()> {
    check_f32(op, what, t)?;
    ensure!(t.numel() == 1, "{op}: {what} must hold one value, got {:?}", t.shape());
    Ok(())
}

/// `mean |p - t|` over every element, as a `[1]` tensor (torch's `l1_loss`, reduction "mean"). Deterministic
/// two-stage sum, as [`reduce::sum_all`].
pub fn l1_loss(p: &Tensor, t: &Tensor) -> Result<Tensor> {
    check_pair("l1_loss", p, t)?;
    let n = p.numel();
    ensure!(n > 0, "l1_loss: empty inputs {:?}", p.shape());
    let gpu = p.gpu();
    let plan = Plan::new(n);
    let part = Tensor::empty(gpu, &[plan.groups], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "l1_partial_forward",
        &[p.buffer(), t.buffer(), part.buffer()],
        &plan.params(0),
        plan.groups as u32,
    )?;
    reduce::finish(gpu, &part, plan.groups, n as f32, false)
}

/// Backward of [`l1_loss`]: `dp = sign(p - t) * dloss / N` (sign(0) = 0, as torch).
pub fn l1_loss_backward(p: &Tensor, t: &Tensor, dloss: &Tensor) -> Result<Tensor> {
    check_pair("l1_loss_backward", p, t)?;
    check_scalar("l1_loss_backward", "dloss", dloss)?;
    let n = p.numel();
    let dp = Tensor::empty(p.gpu(), p.shape(), DType::F32)?;
    p.gpu().dispatch(
        &SHADER,
        "l1_backward",
        &[p.buffer(), t.buffer(), dloss.buffer(), dp.buffer()],
        &[n as u32],
        groups(n),
    )?;
    Ok(dp)
}

/// Per-row cosine similarity `[.., D] -> [rows]`, as torch's `cosine_similarity(p, t, dim=-1, eps=1e-8)`.
pub fn cosine_rows(p: &Tensor, t: &Tensor) -> Result<Tensor> {
    Ok(cosine_rows_train(p, t)?.0)
}

/// [`cosine_rows`] that also returns what the backward reads: `[rows, 2]` = (|p_r|, |t_r|), unclamped.
pub fn cosine_rows_train(p: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor)> {
    check_pair("cosine_rows", p, t)?;
    let (rows, d) = rows_d("cosine_rows", p)?;
    let gpu = p.gpu();
    let cos = Tensor::empty(gpu, &[rows], DType::F32)?;
    let norms = Tensor::empty(gpu, &[rows, 2], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "cosine_rows_forward",
        &[p.buffer(), t.buffer(), cos.buffer(), norms.buffer()],
        &[rows as u32, d as u32, COSINE_EPS.to_bits()],
        rows as u32,
    )?;
    Ok((cos, norms))
}

/// Backward of [`cosine_rows`] for `p`, from the forward's `cos` `[rows]` and `norms` `[rows, 2]` and the
/// incoming `dcos` `[rows]` (torch's autograd semantics; see the module docs).
pub fn cosine_rows_backward(p: &Tensor, t: &Tensor, cos: &Tensor, norms: &Tensor, dcos: &Tensor) -> Result<Tensor> {
    let op = "cosine_rows_backward";
    check_pair(op, p, t)?;
    let (rows, d) = rows_d(op, p)?;
    for (what, x, shape) in [
        ("cos", cos, vec![rows]),
        ("norms", norms, vec![rows, 2]),
        ("dcos", dcos, vec![rows]),
    ] {
        check_f32(op, what, x)?;
        ensure!(
            x.shape() == shape.as_slice(),
            "{op}: {what} must be {shape:?} for a prediction of {:?}, got {:?}",
            p.shape(),
            x.shape()
        );
    }
    let n = rows * d;
    let dp = Tensor::empty(p.gpu(), p.shape(), DType::F32)?;
    p.gpu().dispatch(
        &SHADER,
        "cosine_rows_backward",
        &[
            p.buffer(),
            t.buffer(),
            cos.buffer(),
            norms.buffer(),
            dcos.buffer(),
            dp.buffer(),
        ],
        &[n as u32, d as u32, COSINE_EPS.to_bits()],
        groups(n),
    )?;
    Ok(dp)
}

/// `log sigmoid(x) = min(x, 0) - log1p(exp(-|x|))`, element-wise, stable for every x.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    check_f32("log_sigmoid", "x", x)?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n = x.numel();
    x.gpu().dispatch(
        &SHADER,
        "log_sigmoid_forward",
        &[x.buffer(), y.buffer()],
        &[n as u32],
        groups(n),
    )?;
    Ok(y)
}

/// Backward of [`log_sigmoid`]: `dx = dy * sigmoid(-x)`, from the forward's input.
pub fn log_sigmoid_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_f32("log_sigmoid_backward", "x", x)?;
    check_f32("log_sigmoid_backward", "dy", dy)?;
    ensure!(
        x.shape() == dy.shape(),
        "log_sigmoid_backward: x {:?} and dy {:?} must have the same shape",
        x.shape(),
        dy.shape()
    );
    let dx = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n = x.numel();
    x.gpu().dispatch(
        &SHADER,
        "log_sigmoid_backward",
        &[x.buffer(), dy.buffer(), dx.buffer()],
        &[n as u32],
        groups(n),
    )?;
    Ok(dx)
}

/// The loss of one prediction head, its two terms, and what [`distill_loss_backward`] reads.
#[derive(Debug)]
pub struct DistillLoss {
    /// `[1]`: `l1 + lambda * cos_term`.
    pub total: Tensor,
    /// `[1]`: mean |p - t|.
    pub l1: Tensor,
    /// `[1]`: mean over rows of -log sigmoid(cos).
    pub cos_term: Tensor,
    /// `[rows]`: the per-row cosines (also a training metric).
    pub cos: Tensor,
    /// `[rows, 2]`: saved norms for the backward.
    pub norms: Tensor,
}

/// `L = mean |p - t| + lambda * mean_rows(-log sigmoid(cos(p_r, t_r)))` for one head (MLKD's L_n).
pub fn distill_loss(p: &Tensor, t: &Tensor, lambda: f32) -> Result<DistillLoss> {
    let l1 = l1_loss(p, t)?;
    let (cos, norms) = cosine_rows_train(p, t)?;
    let cos_term = scale(&mean_all(&log_sigmoid(&cos)?)?, -1.0)?;
    let total = add(&l1, &scale(&cos_term, lambda)?)?;
    Ok(DistillLoss {
        total,
        l1,
        cos_term,
        cos,
        norms,
    })
}

/// Backward of [`distill_loss`] for `p`, given `dtotal` (`[1]`, e.g. 1 / heads for the mean over heads).
pub fn distill_loss_backward(
    p: &Tensor,
    t: &Tensor,
    saved: &DistillLoss,
    lambda: f32,
    dtotal: &Tensor,
) -> Result<Tensor> {
    check_scalar("distill_loss_backward", "dtotal", dtotal)?;
    let dp = l1_loss_backward(p, t, dtotal)?;
    // cos_term = -mean(log sigmoid(cos)), weighted by lambda.
    let dmean = scale(dtotal, -lambda)?;
    let dlog = mean_all_backward(&dmean, saved.cos.shape())?;
    let dcos = log_sigmoid_backward(&saved.cos, &dlog)?;
    add_assign(&dp, &cosine_rows_backward(p, t, &saved.cos, &saved.norms, &dcos)?)?;
    Ok(dp)
}

/// What [`cross_entropy_train`] returns: the loss and what its backward reads.
#[derive(Debug)]
pub struct CrossEntropy {
    /// `[1]`: `sum_b w[y_b] * -log softmax(x_b)[y_b] / sum_b w[y_b]` (0 when every row's weight is 0).
    pub loss: Tensor,
    /// `[B, C]`: the softmax of the logits (the classifier's probabilities).
    pub probs: Tensor,
    /// `[1]`: `sum_b w[y_b]`.
    pub weight_sum: Tensor,
}

fn check_ce(op: &str, logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<(usize, usize)> {
    check_f32(op, "logits", logits)?;
    check_f32(op, "weights", weights)?;
    let &[b, c] = logits.shape() else {
        anyhow::bail!("{op}: logits must be [B, C], got {:?}", logits.shape())
    };
    ensure!(b > 0 && c > 0, "{op}: logits {:?} are empty", logits.shape());
    ensure!(
        labels.dtype() == DType::U32 && labels.shape() == [b],
        "{op}: labels must be u32 [{b}], got {:?} {:?}",
        labels.dtype(),
        labels.shape()
    );
    ensure!(
        weights.shape() == [c],
        "{op}: class weights must be [{c}], got {:?}",
        weights.shape()
    );
    Ok((b, c))
}

/// Class-weighted cross-entropy of `logits` `[B, C]` against `labels` (u32 `[B]`) with class `weights` `[C]`,
/// as torch's `cross_entropy(logits, labels, weight=weights)` (reduction "mean": the weighted mean). A label
/// not below C makes its row count for nothing (check labels on the host: [`crate::tape::Tape`]'s op does).
pub fn cross_entropy_train(logits: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<CrossEntropy> {
    let (b, c) = check_ce("cross_entropy", logits, labels, weights)?;
    let gpu = logits.gpu();
    let probs = Tensor::empty(gpu, &[b, c], DType::F32)?;
    let terms = Tensor::empty(gpu, &[b, 2], DType::F32)?;
    let params = [b as u32, c as u32];
    gpu.dispatch(
        &SHADER,
        "cross_entropy_rows_forward",
        &[
            logits.buffer(),
            labels.buffer(),
            weights.buffer(),
            probs.buffer(),
            terms.buffer(),
        ],
        &params,
        groups(b),
    )?;
    let loss = Tensor::empty(gpu, &[1], DType::F32)?;
    let weight_sum = Tensor::empty(gpu, &[1], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "cross_entropy_total_forward",
        &[terms.buffer(), loss.buffer(), weight_sum.buffer()],
        &params,
        1,
    )?;
    Ok(CrossEntropy {
        loss,
        probs,
        weight_sum,
    })
}

/// Backward of [`cross_entropy_train`]: `dlogits[b, c] = dloss * w[y_b] / sum w * (p[b, c] - [c == y_b])`.
pub fn cross_entropy_backward(
    saved: &CrossEntropy,
    labels: &Tensor,
    weights: &Tensor,
    dloss: &Tensor,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let (b, c) = check_ce(op, &saved.probs, labels, weights)?;
    check_scalar(op, "dloss", dloss)?;
    let dx = Tensor::empty(dloss.gpu(), &[b, c], DType::F32)?;
    dloss.gpu().dispatch(
        &SHADER,
        "cross_entropy_backward",
        &[
            saved.probs.buffer(),
            labels.buffer(),
            weights.buffer(),
            saved.weight_sum.buffer(),
            dloss.buffer(),
            dx.buffer(),
        ],
        &[b as u32, c as u32],
        groups(b * c),
    )?;
    Ok(dx)
}

/// CPU references in f64 (inputs in f64 too, so that finite differences can perturb them).
pub mod reference {
    pub const EPS: f64 = super::COSINE_EPS as f64;

    pub fn l1_loss(p: &[f64], t: &[f64]) -> f64 {
        p.iter().zip(t).map(|(a, b)| (a - b).abs()).sum::<f64>() / p.len() as f64
    }

    fn sign(v: f64) -> f64 {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    }

    pub fn l1_loss_backward(p: &[f64], t: &[f64], dloss: f64) -> Vec<f64> {
        let n = p.len() as f64;
        p.iter().zip(t).map(|(a, b)| sign(a - b) * dloss / n).collect()
    }

    fn norm(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    /// torch 2.15's cosine_similarity over rows of `d`.
    pub fn cosine_rows(p: &[f64], t: &[f64], d: usize) -> Vec<f64> {
        p.chunks(d)
            .zip(t.chunks(d))
            .map(|(x, y)| {
                let (cx, cy) = (norm(x).max(EPS), norm(y).max(EPS));
                x.iter().zip(y).map(|(a, b)| (a / cx) * (b / cy)).sum()
            })
            .collect()
    }

    /// torch's autograd of the above for `p` (see the module docs for the clamped case).
    pub fn cosine_rows_backward(p: &[f64], t: &[f64], d: usize, dcos: &[f64]) -> Vec<f64> {
        let cos = cosine_rows(p, t, d);
        let mut dp = Vec::with_capacity(p.len());
        for (r, (x, y)) in p.chunks(d).zip(t.chunks(d)).enumerate() {
            let nx = norm(x);
            let (cx, cy) = (nx.max(EPS), norm(y).max(EPS));
            for (a, b) in x.iter().zip(y) {
                let unit = if nx > 0.0 { a / nx } else { 0.0 };
                dp.push(dcos[r] * (b / (cx * cy) - cos[r] / cx * unit));
            }
        }
        dp
    }

    pub fn log_sigmoid(x: f64) -> f64 {
        x.min(0.0) - (-x.abs()).exp().ln_1p()
    }

    /// d log sigmoid(x) / dx = sigmoid(-x).
    pub fn log_sigmoid_grad(x: f64) -> f64 {
        let e = (-x.abs()).exp();
        if x >= 0.0 {
            e / (1.0 + e)
        } else {
            1.0 / (1.0 + e)
        }
    }

    /// (total, l1, cos_term).
    pub fn distill_loss(p: &[f64], t: &[f64], d: usize, lambda: f64) -> (f64, f64, f64) {
        let l1 = l1_loss(p, t);
        let cos = cosine_rows(p, t, d);
        let cos_term = -cos.iter().map(|&c| log_sigmoid(c)).sum::<f64>() / cos.len() as f64;
        (l1 + lambda * cos_term, l1, cos_term)
    }

    pub fn distill_loss_backward(p: &[f64], t: &[f64], d: usize, lambda: f64, dtotal: f64) -> Vec<f64> {
        let cos = cosine_rows(p, t, d);
        let rows = cos.len() as f64;
        let dcos: Vec<f64> = cos
            .iter()
            .map(|&c| -lambda * dtotal / rows * log_sigmoid_grad(c))
            .collect();
        let dp_cos = cosine_rows_backward(p, t, d, &dcos);
        l1_loss_backward(p, t, dtotal)
            .iter()
            .zip(dp_cos)
            .map(|(a, b)| a + b)
            .collect()
    }

    /// torch's weighted-mean cross-entropy over rows of `c` logits.
    pub fn cross_entropy(x: &[f64], labels: &[u32], w: &[f64], c: usize) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for (row, &y) in x.chunks(c).zip(labels) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            num += w[y as usize] * (lse - row[y as usize]);
            den += w[y as usize];
        }
        num / den
    }

    /// d cross_entropy / dx, times `dloss`.
    pub fn cross_entropy_backward(x: &[f64], labels: &[u32], w: &[f64], c: usize, dloss: f64) -> Vec<f64> {
        let den: f64 = labels.iter().map(|&y| w[y as usize]).sum();
        let mut dx = Vec::with_capacity(x.len());
        for (row, &y) in x.chunks(c).zip(labels) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            for (j, v) in row.iter().enumerate() {
                let p = (v - m).exp() / z;
                let onehot = if j == y as usize { 1.0 } else { 0.0 };
                dx.push(dloss * w[y as usize] / den * (p - onehot));
            }
        }
        dx
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

    fn upload(x: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(test_gpu(), x, shape).unwrap()
    }

    /// Targets correlated with the predictions (cosines spread over (-1, 1), as in training).
    fn pair(seed: u64, n: usize) -> (Vec<f32>, Vec<f32>) {
        let p = random_vec(seed, n, 1.5);
        let noise = random_vec(seed + 1, n, 1.0);
        let mix = random_vec(seed + 2, 1, 1.0)[0];
        let t = p.iter().zip(&noise).map(|(a, b)| mix * a + b).collect();
        (p, t)
    }

    /// Central differences of `f` at `x` in f64, against `grad`: |fd - grad| <= tol * max |grad|.
    fn check_fd(name: &str, x: &[f64], grad: &[f64], tol: f64, f: impl Fn(&[f64]) -> f64) {
        let h = 1e-6;
        let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
        let mut worst = 0f64;
        let mut xs = x.to_vec();
        for i in 0..x.len() {
            xs[i] = x[i] + h;
            let up = f(&xs);
            xs[i] = x[i] - h;
            let down = f(&xs);
            xs[i] = x[i];
            worst = worst.max(((up - down) / (2.0 * h) - grad[i]).abs() / scale);
        }
        eprintln!("{name}: finite differences vs analytic, max |diff| / max |grad| = {worst:.3e}");
        assert!(worst <= tol, "{name}: {worst:.3e} > {tol:.0e}");
    }

    #[test]
    fn loss_reference_grads_match_finite_differences() {
        let (d, rows) = (7, 5);
        let (p, t) = pair(1, rows * d);
        let (p, t) = (f64s(&p), f64s(&t));
        check_fd(
            "l1 reference",
            &p,
            &reference::l1_loss_backward(&p, &t, 1.0),
            1e-6,
            |x| reference::l1_loss(x, &t),
        );
        let w: Vec<f64> = f64s(&random_vec(4, rows, 1.0));
        check_fd(
            "cosine reference",
            &p,
            &reference::cosine_rows_backward(&p, &t, d, &w),
            1e-6,
            |x| {
                reference::cosine_rows(x, &t, d)
                    .iter()
                    .zip(&w)
                    .map(|(c, w)| c * w)
                    .sum()
            },
        );
        let xs: Vec<f64> = f64s(&random_vec(5, 40, 12.0));
        let g: Vec<f64> = xs.iter().map(|&x| reference::log_sigmoid_grad(x)).collect();
        check_fd("log_sigmoid reference", &xs, &g, 1e-6, |x| {
            x.iter().map(|&v| reference::log_sigmoid(v)).sum()
        });
        check_fd(
            "distill_loss reference",
            &p,
            &reference::distill_loss_backward(&p, &t, d, 0.7, 1.3),
            1e-6,
            |x| 1.3 * reference::distill_loss(x, &t, d, 0.7).0,
        );
    }

    #[test]
    fn l1_loss_and_grad_match_reference() {
        let (rows, d) = (37, 301);
        let (p, mut t) = pair(10, rows * d);
        t[5] = p[5]; // sign(0) = 0
        let (tp, tt) = (upload(&p, &[1, rows, d]), upload(&t, &[1, rows, d]));
        let loss = l1_loss(&tp, &tt).unwrap().to_vec().unwrap();
        let want = reference::l1_loss(&f64s(&p), &f64s(&t));
        assert_close("l1_loss", &loss, &[want], Tol::KERNEL);
        let dp = l1_loss_backward(&tp, &tt, &upload(&[0.8], &[1]))
            .unwrap()
            .to_vec()
            .unwrap();
        let want = reference::l1_loss_backward(&f64s(&p), &f64s(&t), 0.8f32 as f64);
        assert_close("l1_loss_backward grad", &dp, &want, Tol::KERNEL);
        assert_eq!(dp[5], 0.0);
        assert!(l1_loss(&tp, &upload(&t[..d], &[1, d])).is_err());
    }

    #[test]
    fn cosine_rows_and_grad_match_reference() {
        // D = 768 (3 elements per invocation) and D = 37, odd row counts.
        for (seed, rows, d) in [(20, 13, 768), (21, 101, 37)] {
            let (p, t) = pair(seed, rows * d);
            let (tp, tt) = (upload(&p, &[rows, d]), upload(&t, &[rows, d]));
            let (cos, norms) = cosine_rows_train(&tp, &tt).unwrap();
            assert_eq!(cos.shape(), [rows]);
            let want = reference::cosine_rows(&f64s(&p), &f64s(&t), d);
            assert_close(
                &format!("cosine_rows D={d}"),
                &cos.to_vec().unwrap(),
                &want,
                Tol::KERNEL,
            );
            let dcos = random_vec(seed + 5, rows, 1.0);
            let dp = cosine_rows_backward(&tp, &tt, &cos, &norms, &upload(&dcos, &[rows]))
                .unwrap()
                .to_vec()
                .unwrap();
            let want = reference::cosine_rows_backward(&f64s(&p), &f64s(&t), d, &f64s(&dcos));
            assert_close(&format!("cosine_rows_backward grad D={d}"), &dp, &want, Tol::KERNEL);
        }
    }

    /// |a t_i| + |b p_i| per element of the cosine gradient a t - b p (dcos = 1), with the kernel's clamped
    /// norms: the size of what the kernel subtracts, which bounds its rounding error.
    fn cosine_grad_terms(p: &[f64], t: &[f64], d: usize) -> Vec<f64> {
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cos = reference::cosine_rows(p, t, d);
        let mut out = Vec::with_capacity(p.len());
        for (r, (x, y)) in p.chunks(d).zip(t.chunks(d)).enumerate() {
            let nx = norm(x);
            let (cx, cy) = (nx.max(COSINE_EPS as f64), norm(y).max(COSINE_EPS as f64));
            let b = if nx > 0.0 { cos[r].abs() / (cx * nx) } else { 0.0 };
            out.extend(x.iter().zip(y).map(|(a, t)| (t / (cx * cy)).abs() + b * a.abs()));
        }
        out
    }

    #[test]
    fn cosine_grad_matches_torch_on_degenerate_rows() {
        // Measured with torch 2.15 (f64), F.cosine_similarity(x, y, dim=-1, eps=1e-8).sum().backward():
        //   x = [1e-9, 0], y = [3, 4] -> cos 0.06, dx = [5.4e7, 8e7]
        //   x = [0, 0],    y = [3, 4] -> cos 0,    dx = [6e7, 8e7]
        //   x = [1e-5, 0], y = [1e-5, 0] -> cos 1, dx = [0, 0]
        //   x = [1, 2],    y = [3, 4] -> cos 0.9838699100999074, dx = [0.07155417527999322, -0.03577708763999665]
        let p = [1e-9, 0.0, 0.0, 0.0, 1e-5, 0.0, 1.0, 2.0];
        let t = [3.0, 4.0, 3.0, 4.0, 1e-5, 0.0, 3.0, 4.0];
        let (tp, tt) = (upload(&p, &[4, 2]), upload(&t, &[4, 2]));
        let (cos, norms) = cosine_rows_train(&tp, &tt).unwrap();
        let dp = cosine_rows_backward(&tp, &tt, &cos, &norms, &upload(&[1.0; 4], &[4]))
            .unwrap()
            .to_vec()
            .unwrap();
        let cos = cos.to_vec().unwrap();
        let want_cos = [0.06, 0.0, 1.0, 0.9838699100999074];
        let want_dp = [
            5.4e7,
            8e7,
            6e7,
            8e7,
            0.0,
            0.0,
            0.07155417527999322,
            -0.03577708763999665,
        ];
        for (i, (&g, &w)) in cos.iter().zip(&want_cos).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "cos[{i}] = {g}, torch {w}"
            );
        }
        // dp = a t - b p is a difference of two terms, each up to 1e5 in the row x = y = [1e-5, 0]; the exact
        // answer there is 0, so what f32 can promise is a few ULP of the terms (the kernel's divisions are
        // 2.5-ULP WGSL ones: NVIDIA gives -9.9e-5 where lavapipe gives 0).
        let terms = cosine_grad_terms(&f64s(&p), &f64s(&t), 2);
        for (i, ((&g, &w), &s)) in dp.iter().zip(&want_dp).zip(&terms).enumerate() {
            let w: f64 = w;
            let tol = (1e-5 * w.abs().max(1e-3)).max(4.0 * f32::EPSILON as f64 * s);
            assert!(
                (g as f64 - w).abs() <= tol,
                "dp[{i}] = {g}, torch {w} (tolerance {tol:.2e})"
            );
        }
        let want = reference::cosine_rows_backward(&f64s(&p), &f64s(&t), 2, &[1.0; 4]);
        for (i, (&r, &w)) in want.iter().zip(&want_dp).enumerate() {
            assert!(
                (r - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "reference dp[{i}] = {r}, torch {w}"
            );
        }
    }

    #[test]
    fn log_sigmoid_and_grad_match_reference() {
        let mut x = random_vec(30, 3_001, 10.0);
        x.extend([-100.0, -30.0, -1e-6, 0.0, 1e-6, 1e-3, 0.5, 30.0, 100.0]);
        let n = x.len();
        let tx = upload(&x, &[n]);
        let y = log_sigmoid(&tx).unwrap().to_vec().unwrap();
        let want: Vec<f64> = x.iter().map(|&v| reference::log_sigmoid(v as f64)).collect();
        assert_close("log_sigmoid", &y, &want, Tol::KERNEL);
        // Relative accuracy per element too (the log1p series keeps it where exp(-|x|) is small).
        let worst = y
            .iter()
            .zip(&want)
            .filter(|(_, w)| w.abs() > 1e-30)
            .map(|(&g, &w)| ((g as f64 - w) / w).abs())
            .fold(0f64, f64::max);
        eprintln!("log_sigmoid: max relative error per element = {worst:.3e}");
        assert!(worst < 2e-5, "log_sigmoid relative error {worst:.3e}");
        let dy = random_vec(31, n, 1.0);
        let dx = log_sigmoid_backward(&tx, &upload(&dy, &[n])).unwrap().to_vec().unwrap();
        let want: Vec<f64> = x
            .iter()
            .zip(&dy)
            .map(|(&v, &g)| g as f64 * reference::log_sigmoid_grad(v as f64))
            .collect();
        assert_close("log_sigmoid_backward grad", &dx, &want, Tol::KERNEL);
    }

    #[test]
    fn distill_loss_and_grad_match_reference() {
        let (rows, d, lambda) = (45, 129, 1.0);
        let (p, t) = pair(40, rows * d);
        let (tp, tt) = (upload(&p, &[3, 15, d]), upload(&t, &[3, 15, d]));
        let out = distill_loss(&tp, &tt, lambda).unwrap();
        let (total, l1, cos_term) = reference::distill_loss(&f64s(&p), &f64s(&t), d, lambda as f64);
        assert_close("distill total", &out.total.to_vec().unwrap(), &[total], Tol::KERNEL);
        assert_close("distill l1", &out.l1.to_vec().unwrap(), &[l1], Tol::KERNEL);
        assert_close(
            "distill cos_term",
            &out.cos_term.to_vec().unwrap(),
            &[cos_term],
            Tol::KERNEL,
        );
        let dp = distill_loss_backward(&tp, &tt, &out, lambda, &upload(&[0.5], &[1]))
            .unwrap()
            .to_vec()
            .unwrap();
        let want = reference::distill_loss_backward(&f64s(&p), &f64s(&t), d, lambda as f64, 0.5);
        assert_close("distill_loss_backward grad", &dp, &want, Tol::KERNEL);
    }

    #[test]
    fn distill_loss_grad_matches_torch_constants() {
        // Produced by torch 2.15 in f64 from the same f32-rounded inputs:
        // /root/venv-fixtures/bin/python -c "import torch,torch.nn.functional as F; i=torch.arange(12.,dtype=torch.float64)
        // p=torch.sin(i).float().double().reshape(3,4).requires_grad_(); t=torch.cos(1.3*i).float().double().reshape(3,4)
        // l1=F.l1_loss(p,t); c=-F.logsigmoid(F.cosine_similarity(p,t,dim=-1)).mean(); L=l1+0.5*c; L.backward()
        // print(repr(L.item()), repr(l1.item()), repr(c.item())); print(p.grad.flatten().tolist())"
        const TORCH_TOTAL: f64 = 1.6180514062682425;
        const TORCH_L1: f64 = 1.115107076863448;
        const TORCH_COS: f64 = 1.005888658809589;
        const TORCH_DP: [f64; 12] = [
            -0.13455789845837163,
            0.051430184971559816,
            0.10755939486324192,
            0.1174665376757647,
            -0.06797868858330942,
            -0.08644058250714914,
            -0.07065154150136721,
            0.10187907835750432,
            0.0985218020749681,
            -0.12015803329404798,
            -0.12101385227490219,
            -0.06298343904101972,
        ];
        let p: Vec<f32> = (0..12).map(|i| (i as f64).sin() as f32).collect();
        let t: Vec<f32> = (0..12).map(|i| (1.3 * i as f64).cos() as f32).collect();
        let torch_losses = [TORCH_TOTAL, TORCH_L1, TORCH_COS];
        let out = distill_loss(&upload(&p, &[3, 4]), &upload(&t, &[3, 4]), 0.5).unwrap();
        let got = [&out.total, &out.l1, &out.cos_term].map(|x| x.to_vec().unwrap()[0] as f64);
        for (g, w) in got.iter().zip(torch_losses) {
            assert!((g - w).abs() <= 1e-6 * w.abs(), "loss {g}, torch {w}");
        }
        let dp = distill_loss_backward(
            &upload(&p, &[3, 4]),
            &upload(&t, &[3, 4]),
            &out,
            0.5,
            &upload(&[1.0], &[1]),
        )
        .unwrap()
        .to_vec()
        .unwrap();
        assert_close("distill grad vs torch", &dp, &TORCH_DP, Tol::KERNEL);
    }

    /// Labels and class weights for the cross-entropy tests: every class weighted differently.
    fn ce_case(seed: u64, b: usize, c: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
        let x = random_vec(seed, b * c, 4.0);
        let labels = (0..b).map(|i| ((i * 7 + seed as usize) % c) as u32).collect();
        let w = random_vec(seed + 1, c, 1.0).iter().map(|v| 1.25 + v).collect();
        (x, labels, w)
    }

    #[test]
    fn cross_entropy_fixed_case() {
        // Two rows, equal logits: -log(1/3) each, whatever the weights.
        let gpu = test_gpu();
        let ce = cross_entropy_train(
            &upload(&[0.0; 6], &[2, 3]),
            &Tensor::from_u32(gpu, &[0, 2], &[2]).unwrap(),
            &upload(&[1.0, 5.0, 3.0], &[3]),
        )
        .unwrap();
        let loss = ce.loss.to_vec().unwrap()[0] as f64;
        assert!((loss - 3f64.ln()).abs() < 1e-6, "{loss}");
        assert_eq!(ce.weight_sum.to_vec().unwrap(), vec![4.0]);
    }

    #[test]
    fn cross_entropy_matches_reference() {
        let gpu = test_gpu();
        for (seed, b, c) in [(21, 1, 4), (22, 37, 7), (23, 300, 5)] {
            let (x, labels, w) = ce_case(seed, b, c);
            let ce = cross_entropy_train(
                &upload(&x, &[b, c]),
                &Tensor::from_u32(gpu, &labels, &[b]).unwrap(),
                &upload(&w, &[c]),
            )
            .unwrap();
            let want = reference::cross_entropy(&f64s(&x), &labels, &f64s(&w), c);
            assert_close(
                &format!("cross_entropy {b}x{c}"),
                &ce.loss.to_vec().unwrap(),
                &[want],
                Tol::KERNEL,
            );
        }
    }

    #[test]
    fn cross_entropy_reference_grad_matches_finite_differences() {
        let (b, c) = (6, 4);
        let (x, labels, w) = ce_case(31, b, c);
        let (x, w) = (f64s(&x), f64s(&w));
        check_fd(
            "cross_entropy reference",
            &x,
            &reference::cross_entropy_backward(&x, &labels, &w, c, 1.0),
            1e-6,
            |x| reference::cross_entropy(x, &labels, &w, c),
        );
    }

    #[test]
    fn cross_entropy_backward_grad_matches_reference() {
        let gpu = test_gpu();
        for (seed, b, c) in [(41, 1, 4), (42, 37, 7), (43, 300, 5)] {
            let (x, labels, w) = ce_case(seed, b, c);
            let lt = Tensor::from_u32(gpu, &labels, &[b]).unwrap();
            let wt = upload(&w, &[c]);
            let ce = cross_entropy_train(&upload(&x, &[b, c]), &lt, &wt).unwrap();
            let dx = cross_entropy_backward(&ce, &lt, &wt, &upload(&[0.7], &[1])).unwrap();
            assert_close(
                &format!("cross_entropy backward {b}x{c}"),
                &dx.to_vec().unwrap(),
                &reference::cross_entropy_backward(&f64s(&x), &labels, &f64s(&w), c, 0.7),
                Tol::KERNEL,
            );
        }
    }
}
