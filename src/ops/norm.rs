//! Normalisations (`shaders/norm.wgsl`): LayerNorm over the channel dim, and wav2vec 2.0's
//! `GroupNorm(num_groups = C, num_channels = C)` over time, both with torch semantics (biased variance,
//! `y = (x - mean) / sqrt(var + eps) * gamma + beta`) and an optional fused exact GELU.
//!
//! Accuracy: means are taken of values shifted by one sample of the same row or channel, and variances are
//! centred second passes (never `E[x^2] - E[x]^2`), so a large common offset costs no precision.
//!
//! Group norm over audio longer than one GPU buffer: split `x` in time chunks and
//! 1. `channel_moments(chunk)` per chunk: `[B, 2, C]` = (mean, M2 = sum of squared deviations from the
//!    chunk's mean) over the chunk's `T_i` frames;
//! 2. combine them on the CPU in f64 with [`ChannelStats`] (Chan's parallel formula), then
//!    [`ChannelStats::mean_rstd`] uploads `[B, 2, C]` = (mean, 1 / sqrt(var + eps));
//! 3. `normalize_channels(chunk, &mean_rstd, gamma, beta, gelu)` per chunk.
//!
//! [`group_norm_time`] is the same pipeline on one tensor, on the GPU only:
//! `channel_moments` -> [`moments_to_mean_rstd`] -> [`normalize_channels`].
//!
//! Training: [`layer_norm_train`] / [`group_norm_time_train`] also return the (mean, rstd) they normalised
//! with; [`layer_norm_backward`] / [`group_norm_time_backward`] read them (never recompute) and return fresh
//! `(dx, dgamma, dbeta)`. Every reduction (over a row, over time, over rows for dgamma / dbeta) runs in fixed
//! chunks whose partials are added in order: no atomics, reproducible for a given shape.

use anyhow::{bail, ensure, Result};

use crate::gpu::{DType, Gpu, Shader, Tensor};

static SHADER: Shader = crate::shader!("norm");

/// Invocations per workgroup of the per-row / per-channel kernels (`LN_WG`, the moments kernels).
const WG: usize = 64;
/// Invocations per workgroup of `normalize_channels_forward`.
const WG_ELEM: usize = 256;
/// Frames per partial in `moments_partial`: long enough to amortise the combine, short enough that
/// T = 32000 frames still gives hundreds of partials per channel to spread over the GPU.
const CHUNK: usize = 128;

fn check_f32(op: &str, what: &str, t: &Tensor) -> Result<()> {
    ensure!(t.dtype() == DType::F32, "{op}: {what} must be f32, got {:?}", t.dtype());
    ensure!(
        t.numel() < u32::MAX as usize,
        "{op}: {what} {:?} is beyond 2^32 elements (32-bit indexing); split it",
        t.shape()
    );
    Ok(())
}

fn check_affine(op: &str, c: usize, gamma: &Tensor, beta: &Tensor) -> Result<()> {
    for (what, t) in [("gamma", gamma), ("beta", beta)] {
        check_f32(op, what, t)?;
        ensure!(
            t.shape() == [c],
            "{op}: {what} must be [{c}] (the channel count), got {:?}",
            t.shape()
        );
    }
    Ok(())
}

fn btc(op: &str, x: &Tensor) -> Result<[usize; 3]> {
    let &[b, t, c] = x.shape() else {
        bail!("{op}: input must be [B, T, C], got {:?}", x.shape());
    };
    check_f32(op, "input", x)?;
    ensure!(
        t > 0 && c > 0,
        "{op}: input {:?} needs at least one frame and one channel",
        x.shape()
    );
    Ok([b, t, c])
}

/// LayerNorm over the last dim of `x` `[.., C]` with `gamma`, `beta` `[C]`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    layer_norm_impl(x, None, gamma, beta, eps, false)
}

/// LayerNorm(x + residual) in one kernel (a post-LN transformer's `LayerNorm(h + sublayer(h))`), bit-identical
/// to [`crate::ops::elementwise::add`] then [`layer_norm`] without writing the sum. Shapes must match exactly.
pub fn add_layer_norm(x: &Tensor, residual: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    ensure!(
        x.shape() == residual.shape(),
        "add_layer_norm: the residual {:?} must have the input's shape {:?}",
        residual.shape(),
        x.shape()
    );
    check_f32("add_layer_norm", "residual", residual)?;
    layer_norm_impl(x, Some(residual), gamma, beta, eps, false)
}

/// gelu(LayerNorm(x)) in one kernel (wav2vec 2.0's "layer" feat_extract_norm: conv -> LayerNorm -> GELU).
pub fn layer_norm_gelu(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    layer_norm_impl(x, None, gamma, beta, eps, true)
}

fn layer_norm_impl(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    gelu: bool,
) -> Result<Tensor> {
    let Some(&c) = x.shape().last() else {
        bail!("layer_norm: input must have at least one dim, got a scalar");
    };
    ensure!(
        c > 0,
        "layer_norm: cannot normalise over an empty last dim ({:?})",
        x.shape()
    );
    check_f32("layer_norm", "input", x)?;
    check_affine("layer_norm", c, gamma, beta)?;
    let rows = x.numel() / c;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    // Without a residual the binding still needs a buffer; the kernel never reads it.
    let r = residual.unwrap_or(x);
    x.gpu().dispatch(
        &SHADER,
        "layer_norm_forward",
        &[x.buffer(), gamma.buffer(), beta.buffer(), y.buffer(), r.buffer()],
        &[
            rows as u32,
            c as u32,
            eps.to_bits(),
            gelu as u32,
            residual.is_some() as u32,
        ],
        rows as u32,
    )?;
    Ok(y)
}

/// Per-(batch, channel) moments of `x` `[B, T, C]` over its T frames: `[B, 2, C]` = (mean, M2), where M2 is
/// the sum of squared deviations from the mean (variance = M2 / T). Combine moments of several time chunks
/// with [`ChannelStats`].
pub fn channel_moments(x: &Tensor) -> Result<Tensor> {
    let [b, t, c] = btc("channel_moments", x)?;
    let gpu = x.gpu();
    let out = Tensor::empty(gpu, &[b, 2, c], DType::F32)?;
    if b == 0 {
        return Ok(out);
    }
    let n_chunks = t.div_ceil(CHUNK);
    let n_wg_c = c.div_ceil(WG);
    let part = Tensor::empty(gpu, &[b, n_chunks, 2, c], DType::F32)?;
    let params = [b, t, c, CHUNK, n_chunks, n_wg_c].map(|v| v as u32);
    gpu.dispatch(
        &SHADER,
        "moments_partial",
        &[x.buffer(), part.buffer()],
        &params,
        (b * n_chunks * n_wg_c) as u32,
    )?;
    gpu.dispatch(
        &SHADER,
        "moments_combine",
        &[x.buffer(), part.buffer(), out.buffer()],
        &params,
        (b * c).div_ceil(WG) as u32,
    )?;
    Ok(out)
}

/// `[B, 2, C]` (mean, M2) over `count` frames -> `[B, 2, C]` (mean, 1 / sqrt(M2 / count + eps)).
pub fn moments_to_mean_rstd(moments: &Tensor, count: usize, eps: f32) -> Result<Tensor> {
    let &[b, 2, c] = moments.shape() else {
        bail!(
            "moments_to_mean_rstd: moments must be [B, 2, C], got {:?}",
            moments.shape()
        );
    };
    check_f32("moments_to_mean_rstd", "moments", moments)?;
    ensure!(
        count > 0,
        "moments_to_mean_rstd: moments of zero frames have no variance"
    );
    let out = Tensor::empty(moments.gpu(), &[b, 2, c], DType::F32)?;
    moments.gpu().dispatch(
        &SHADER,
        "moments_finalize",
        &[moments.buffer(), out.buffer()],
        &[(b * c) as u32, c as u32, (count as f32).to_bits(), eps.to_bits()],
        (b * c).div_ceil(WG) as u32,
    )?;
    Ok(out)
}

/// y = (x - mean[b, c]) * rstd[b, c] * gamma[c] + beta[c] (then exact GELU if `gelu`), for `x` `[B, T, C]`
/// and `mean_rstd` `[B, 2, C]` from [`moments_to_mean_rstd`] or [`ChannelStats::mean_rstd`].
pub fn normalize_channels(x: &Tensor, mean_rstd: &Tensor, gamma: &Tensor, beta: &Tensor, gelu: bool) -> Result<Tensor> {
    let [b, t, c] = btc("normalize_channels", x)?;
    check_affine("normalize_channels", c, gamma, beta)?;
    check_f32("normalize_channels", "mean_rstd", mean_rstd)?;
    ensure!(
        mean_rstd.shape() == [b, 2, c],
        "normalize_channels: mean_rstd must be [{b}, 2, {c}] for input {:?}, got {:?}",
        x.shape(),
        mean_rstd.shape()
    );
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n = x.numel();
    let (entry, per_invocation) =
        super::vec4_or_scalar(c, ("normalize_channels_forward4", "normalize_channels_forward"));
    x.gpu().dispatch(
        &SHADER,
        entry,
        &[
            x.buffer(),
            mean_rstd.buffer(),
            gamma.buffer(),
            beta.buffer(),
            y.buffer(),
        ],
        &[n as u32, t as u32, c as u32, gelu as u32],
        (n / per_invocation).div_ceil(WG_ELEM) as u32,
    )?;
    Ok(y)
}

/// torch `GroupNorm(C, C)` on the `[B, C, T]` view of `x` `[B, T, C]`: each (b, c) normalised over all T.
pub fn group_norm_time(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    group_norm_time_impl(x, gamma, beta, eps, false)
}

/// gelu(group_norm_time(x)), the GELU fused into the normalising kernel (wav2vec 2.0 layer 0).
pub fn group_norm_time_gelu(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    group_norm_time_impl(x, gamma, beta, eps, true)
}

fn group_norm_time_impl(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32, gelu: bool) -> Result<Tensor> {
    let [_, t, c] = btc("group_norm_time", x)?;
    check_affine("group_norm_time", c, gamma, beta)?;
    let mean_rstd = moments_to_mean_rstd(&channel_moments(x)?, t, eps)?;
    normalize_channels(x, &mean_rstd, gamma, beta, gelu)
}

/// Rows per chunk of the LayerNorm dgamma / dbeta reduction.
const LN_PARAM_ROWS: usize = 64;

/// The training forward of [`layer_norm`]: also returns `[rows, 2]` = (mean, rstd) per row for
/// [`layer_norm_backward`] (`rows` = all dims of `x` but the last).
pub fn layer_norm_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let Some(&c) = x.shape().last() else {
        bail!("layer_norm_train: input must have at least one dim, got a scalar");
    };
    ensure!(
        c > 0,
        "layer_norm_train: cannot normalise over an empty last dim ({:?})",
        x.shape()
    );
    check_f32("layer_norm_train", "input", x)?;
    check_affine("layer_norm_train", c, gamma, beta)?;
    let rows = x.numel() / c;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let stats = Tensor::empty(x.gpu(), &[rows, 2], DType::F32)?;
    x.gpu().dispatch(
        &SHADER,
        "layer_norm_train_forward",
        // x again in the residual's place: unread (residual 0).
        &[
            x.buffer(),
            gamma.buffer(),
            beta.buffer(),
            y.buffer(),
            x.buffer(),
            stats.buffer(),
        ],
        &[rows as u32, c as u32, eps.to_bits(), 0, 0],
        rows as u32,
    )?;
    Ok((y, stats))
}

/// out[b, i] = sum over chunks k (in order) of part[b, k, i], for part `[B, n_chunks, W]` and out `[B, W]`.
fn sum_chunks(part: &Tensor, out: &Tensor, batch: usize, n_chunks: usize, w: usize) -> Result<()> {
    part.gpu().dispatch(
        &SHADER,
        "norm_backward_sum_chunks",
        &[part.buffer(), out.buffer()],
        &[batch as u32, n_chunks as u32, w as u32],
        (batch * w).div_ceil(WG) as u32,
    )
}

/// Splits `[2, C]` (dgamma, dbeta) into two `[C]` tensors (recorded copies).
fn split_gamma_beta(gb: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
    let dgamma = Tensor::empty(gb.gpu(), &[c], DType::F32)?;
    let dbeta = Tensor::empty(gb.gpu(), &[c], DType::F32)?;
    dgamma.copy_from(0, gb, 0, c)?;
    dbeta.copy_from(0, gb, c, c)?;
    Ok((dgamma, dbeta))
}

/// Backward of [`layer_norm_train`]: given `dy` and `x` (same shape `[.., C]`), the saved `mean_rstd`
/// `[rows, 2]` and `gamma` `[C]`, returns fresh `(dx, dgamma, dbeta)`. dgamma / dbeta are summed over all rows
/// in a fixed order (deterministic).
pub fn layer_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    mean_rstd: &Tensor,
    gamma: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "layer_norm_backward";
    let Some(&c) = x.shape().last() else {
        bail!("{op}: input must have at least one dim, got a scalar");
    };
    ensure!(c > 0, "{op}: cannot normalise over an empty last dim ({:?})", x.shape());
    check_f32(op, "input", x)?;
    check_f32(op, "dy", dy)?;
    check_f32(op, "mean_rstd", mean_rstd)?;
    check_f32(op, "gamma", gamma)?;
    ensure!(
        dy.shape() == x.shape(),
        "{op}: dy {:?} must have the input's shape {:?}",
        dy.shape(),
        x.shape()
    );
    let rows = x.numel() / c;
    ensure!(
        mean_rstd.shape() == [rows, 2],
        "{op}: mean_rstd must be [{rows}, 2] for input {:?}, got {:?}",
        x.shape(),
        mean_rstd.shape()
    );
    ensure!(
        gamma.shape() == [c],
        "{op}: gamma must be [{c}] (the channel count), got {:?}",
        gamma.shape()
    );
    let gpu = x.gpu();
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    if rows == 0 {
        return Ok((dx, Tensor::zeros(gpu, &[c])?, Tensor::zeros(gpu, &[c])?));
    }
    gpu.dispatch(
        &SHADER,
        "layer_norm_backward",
        &[dy.buffer(), x.buffer(), mean_rstd.buffer(), gamma.buffer(), dx.buffer()],
        &[rows as u32, c as u32],
        rows as u32,
    )?;
    let n_chunks = rows.div_ceil(LN_PARAM_ROWS);
    let n_wg_c = c.div_ceil(WG);
    let part = Tensor::empty(gpu, &[n_chunks, 2, c], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "layer_norm_backward_params",
        &[dy.buffer(), x.buffer(), mean_rstd.buffer(), part.buffer()],
        &[rows, c, LN_PARAM_ROWS, n_chunks, n_wg_c].map(|v| v as u32),
        (n_chunks * n_wg_c) as u32,
    )?;
    let gb = Tensor::empty(gpu, &[2, c], DType::F32)?;
    sum_chunks(&part, &gb, 1, n_chunks, 2 * c)?;
    let (dgamma, dbeta) = split_gamma_beta(&gb, c)?;
    Ok((dx, dgamma, dbeta))
}

/// The training forward of [`group_norm_time`]: also returns the `[B, 2, C]` (mean, rstd) it normalised
/// with, for [`group_norm_time_backward`].
pub fn group_norm_time_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let [_, t, c] = btc("group_norm_time_train", x)?;
    check_affine("group_norm_time_train", c, gamma, beta)?;
    let mean_rstd = moments_to_mean_rstd(&channel_moments(x)?, t, eps)?;
    let y = normalize_channels(x, &mean_rstd, gamma, beta, false)?;
    Ok((y, mean_rstd))
}

/// Backward of [`group_norm_time_train`]: given `dy` and `x` `[B, T, C]`, the saved `mean_rstd` `[B, 2, C]` and
/// `gamma` `[C]`, returns fresh `(dx, dgamma, dbeta)`. The sums over time run in chunks of `CHUNK` frames
/// whose partials are added in order (deterministic); dgamma / dbeta then add the batch rows in order.
pub fn group_norm_time_backward(
    dy: &Tensor,
    x: &Tensor,
    mean_rstd: &Tensor,
    gamma: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "group_norm_time_backward";
    let [b, t, c] = btc(op, x)?;
    check_f32(op, "dy", dy)?;
    check_f32(op, "mean_rstd", mean_rstd)?;
    check_f32(op, "gamma", gamma)?;
    ensure!(
        dy.shape() == x.shape(),
        "{op}: dy {:?} must have the input's shape {:?}",
        dy.shape(),
        x.shape()
    );
    ensure!(
        mean_rstd.shape() == [b, 2, c],
        "{op}: mean_rstd must be [{b}, 2, {c}] for input {:?}, got {:?}",
        x.shape(),
        mean_rstd.shape()
    );
    ensure!(
        gamma.shape() == [c],
        "{op}: gamma must be [{c}] (the channel count), got {:?}",
        gamma.shape()
    );
    let gpu = x.gpu();
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    if b == 0 {
        return Ok((dx, Tensor::zeros(gpu, &[c])?, Tensor::zeros(gpu, &[c])?));
    }
    // Per (b, c): (sum dy * xhat, sum dy) over the T frames, via chunk partials.
    let n_chunks = t.div_ceil(CHUNK);
    let n_wg_c = c.div_ceil(WG);
    let part = Tensor::empty(gpu, &[b, n_chunks, 2, c], DType::F32)?;
    gpu.dispatch(
        &SHADER,
        "group_norm_time_backward_partial",
        &[dy.buffer(), x.buffer(), mean_rstd.buffer(), part.buffer()],
        &[b, t, c, CHUNK, n_chunks, n_wg_c].map(|v| v as u32),
        (b * n_chunks * n_wg_c) as u32,
    )?;
    let sums = Tensor::empty(gpu, &[b, 2, c], DType::F32)?;
    sum_chunks(&part, &sums, b, n_chunks, 2 * c)?;
    let n = x.numel();
    let entries = ("group_norm_time_backward_input4", "group_norm_time_backward_input");
    let (entry, per_invocation) = super::vec4_or_scalar(c, entries);
    gpu.dispatch(
        &SHADER,
        entry,
        &[
            dy.buffer(),
            x.buffer(),
            mean_rstd.buffer(),
            gamma.buffer(),
            sums.buffer(),
            dx.buffer(),
        ],
        &[n as u32, t as u32, c as u32],
        (n / per_invocation).div_ceil(WG_ELEM) as u32,
    )?;
    let gb = if b == 1 {
        sums.reshape(&[2, c])?
    } else {
        let gb = Tensor::empty(gpu, &[2, c], DType::F32)?;
        sum_chunks(&sums, &gb, 1, b, 2 * c)?;
        gb
    };
    let (dgamma, dbeta) = split_gamma_beta(&gb, c)?;
    Ok((dx, dgamma, dbeta))
}

/// Per-(batch, channel) mean and M2 in f64 on the host, for group norm over input processed in time chunks.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    pub batch: usize,
    pub channels: usize,
    /// Frames seen so far.
    pub count: u64,
    /// `[B * C]`, b-major.
    pub mean: Vec<f64>,
    /// `[B * C]`: sum of squared deviations from `mean`.
    pub m2: Vec<f64>,
}

impl ChannelStats {
    /// Reads back `channel_moments` of a chunk of `count` frames (this flushes the pending GPU work).
    pub fn from_moments(moments: &Tensor, count: usize) -> Result<ChannelStats> {
        let &[b, 2, c] = moments.shape() else {
            bail!("ChannelStats: moments must be [B, 2, C], got {:?}", moments.shape());
        };
        ensure!(count > 0, "ChannelStats: a chunk needs at least one frame");
        let v = moments.to_vec()?;
        let (mut mean, mut m2) = (Vec::with_capacity(b * c), Vec::with_capacity(b * c));
        for row in v.chunks_exact(2 * c) {
            mean.extend(row[..c].iter().map(|&m| m as f64));
            m2.extend(row[c..].iter().map(|&m| m as f64));
        }
        Ok(ChannelStats {
            batch: b,
            channels: c,
            count: count as u64,
            mean,
            m2,
        })
    }

    /// Adds another chunk's statistics (Chan et al.'s parallel formula, f64).
    pub fn combine(&mut self, other: &ChannelStats) -> Result<()> {
        ensure!(
            (self.batch, self.channels) == (other.batch, other.channels),
            "ChannelStats::combine: [{}, {}] vs [{}, {}] (batch, channels)",
            self.batch,
            self.channels,
            other.batch,
            other.channels
        );
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        if n == 0.0 {
            return Ok(());
        }
        for i in 0..self.mean.len() {
            let delta = other.mean[i] - self.mean[i];
            self.mean[i] += delta * nb / n;
            self.m2[i] += other.m2[i] + delta * delta * na * nb / n;
        }
        self.count += other.count;
        Ok(())
    }

    /// Uploads `[B, 2, C]` = (mean, 1 / sqrt(M2 / count + eps)) for [`normalize_channels`].
    pub fn mean_rstd(&self, gpu: &Gpu, eps: f32) -> Result<Tensor> {
        ensure!(self.count > 0, "ChannelStats: no frames seen");
        let (b, c) = (self.batch, self.channels);
        let mut v = Vec::with_capacity(2 * b * c);
        for bi in 0..b {
            let r = bi * c..(bi + 1) * c;
            v.extend(self.mean[r.clone()].iter().map(|&m| m as f32));
            v.extend(
                self.m2[r]
                    .iter()
                    .map(|&m2| (1.0 / (m2 / self.count as f64 + eps as f64).sqrt()) as f32),
            );
        }
        Tensor::from_slice(gpu, &v, &[b, 2, c])
    }
}

/// CPU references, f64 throughout.
pub mod reference {
    use crate::ops::elementwise::reference::gelu_f64;

    /// LayerNorm over rows of `c` values.
    pub fn layer_norm(x: &[f32], c: usize, gamma: &[f32], beta: &[f32], eps: f32, gelu: bool) -> Vec<f64> {
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let y = layer_norm_f64(&f(x), c, &f(gamma), &f(beta), eps as f64);
        if gelu {
            y.into_iter().map(gelu_f64).collect()
        } else {
            y
        }
    }

    /// `[rows, 2]` = (mean, 1 / sqrt(var + eps)) of each row of `c` values.
    pub fn layer_norm_stats(x: &[f64], c: usize, eps: f64) -> Vec<f64> {
        let mut out = Vec::with_capacity(2 * (x.len() / c));
        for row in x.chunks_exact(c) {
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|&v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            out.extend([mean, 1.0 / (var + eps).sqrt()]);
        }
        out
    }

    /// LayerNorm on f64 inputs (the oracle of the finite-difference gradient tests).
    pub fn layer_norm_f64(x: &[f64], c: usize, gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
        let stats = layer_norm_stats(x, c, eps);
        let mut y = Vec::with_capacity(x.len());
        for (r, row) in x.chunks_exact(c).enumerate() {
            let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
            y.extend(
                row.iter()
                    .enumerate()
                    .map(|(i, &v)| (v - mean) * rstd * gamma[i] + beta[i]),
            );
        }
        y
    }

    /// (dx, dgamma, dbeta) of `sum(dy * layer_norm(x))`, statistics recomputed in f64.
    pub fn layer_norm_backward(
        dy: &[f64],
        x: &[f64],
        c: usize,
        gamma: &[f64],
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let stats = layer_norm_stats(x, c, eps);
        let (mut dx, mut dgamma, mut dbeta) = (vec![0f64; x.len()], vec![0f64; c], vec![0f64; c]);
        for r in 0..x.len() / c {
            let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
            let row = r * c..(r + 1) * c;
            let xhat: Vec<f64> = x[row.clone()].iter().map(|&v| (v - mean) * rstd).collect();
            let dn: Vec<f64> = dy[row.clone()].iter().zip(gamma).map(|(d, g)| d * g).collect();
            let m1 = dn.iter().sum::<f64>() / c as f64;
            let m2 = dn.iter().zip(&xhat).map(|(d, h)| d * h).sum::<f64>() / c as f64;
            for i in 0..c {
                dx[r * c + i] = rstd * (dn[i] - m1 - xhat[i] * m2);
                dgamma[i] += dy[r * c + i] * xhat[i];
                dbeta[i] += dy[r * c + i];
            }
        }
        (dx, dgamma, dbeta)
    }

    /// `[b, 2, c]` = (mean, M2) of `x` `[b, t, c]` over t.
    pub fn channel_moments(x: &[f32], [b, t, c]: [usize; 3]) -> Vec<f64> {
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        channel_moments_f64(&x, [b, t, c])
    }

    fn channel_moments_f64(x: &[f64], [b, t, c]: [usize; 3]) -> Vec<f64> {
        let mut out = vec![0f64; b * 2 * c];
        for bi in 0..b {
            for ci in 0..c {
                let at = |ti: usize| x[(bi * t + ti) * c + ci];
                let mean = (0..t).map(at).sum::<f64>() / t as f64;
                let m2 = (0..t).map(|ti| (at(ti) - mean).powi(2)).sum::<f64>();
                out[bi * 2 * c + ci] = mean;
                out[bi * 2 * c + c + ci] = m2;
            }
        }
        out
    }

    /// `[b, 2, c]` = (mean, 1 / sqrt(var + eps)) over time of `x` `[b, t, c]`.
    pub fn group_norm_time_stats(x: &[f64], [b, t, c]: [usize; 3], eps: f64) -> Vec<f64> {
        let mut m = channel_moments_f64(x, [b, t, c]);
        for bi in 0..b {
            for v in &mut m[bi * 2 * c + c..(bi + 1) * 2 * c] {
                *v = 1.0 / (*v / t as f64 + eps).sqrt();
            }
        }
        m
    }

    /// torch GroupNorm(c, c) over time for `x` `[b, t, c]`.
    pub fn group_norm_time(
        x: &[f32],
        [b, t, c]: [usize; 3],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        gelu: bool,
    ) -> Vec<f64> {
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let y = group_norm_time_f64(&f(x), [b, t, c], &f(gamma), &f(beta), eps as f64);
        if gelu {
            y.into_iter().map(gelu_f64).collect()
        } else {
            y
        }
    }

    /// Group norm over time on f64 inputs (the oracle of the finite-difference gradient tests).
    pub fn group_norm_time_f64(x: &[f64], [b, t, c]: [usize; 3], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
        let m = group_norm_time_stats(x, [b, t, c], eps);
        let mut y = vec![0f64; x.len()];
        for bi in 0..b {
            for ti in 0..t {
                for ci in 0..c {
                    let (mean, rstd) = (m[bi * 2 * c + ci], m[bi * 2 * c + c + ci]);
                    let i = (bi * t + ti) * c + ci;
                    y[i] = (x[i] - mean) * rstd * gamma[ci] + beta[ci];
                }
            }
        }
        y
    }

    /// (dx, dgamma, dbeta) of `sum(dy * group_norm_time(x))`, statistics recomputed in f64.
    pub fn group_norm_time_backward(
        dy: &[f64],
        x: &[f64],
        [b, t, c]: [usize; 3],
        gamma: &[f64],
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let m = group_norm_time_stats(x, [b, t, c], eps);
        let (mut dx, mut dgamma, mut dbeta) = (vec![0f64; x.len()], vec![0f64; c], vec![0f64; c]);
        for bi in 0..b {
            for ci in 0..c {
                let (mean, rstd) = (m[bi * 2 * c + ci], m[bi * 2 * c + c + ci]);
                let idx = |ti: usize| (bi * t + ti) * c + ci;
                let xhat = |ti: usize| (x[idx(ti)] - mean) * rstd;
                let m1 = (0..t).map(|ti| dy[idx(ti)] * gamma[ci]).sum::<f64>() / t as f64;
                let m2 = (0..t).map(|ti| dy[idx(ti)] * gamma[ci] * xhat(ti)).sum::<f64>() / t as f64;
                for ti in 0..t {
                    dx[idx(ti)] = rstd * (dy[idx(ti)] * gamma[ci] - m1 - xhat(ti) * m2);
                    dgamma[ci] += dy[idx(ti)] * xhat(ti);
                    dbeta[ci] += dy[idx(ti)];
                }
            }
        }
        (dx, dgamma, dbeta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, assert_close_f64, central_differences, dot_f64, random_vec, to_f64, Tol};

    /// Uniform values with mean `offset` and standard deviation 1.
    fn offset_data(seed: u64, n: usize, offset: f32) -> Vec<f32> {
        random_vec(seed, n, 3f32.sqrt())
            .into_iter()
            .map(|v| v + offset)
            .collect()
    }

    fn affine(seed: u64, c: usize) -> (Vec<f32>, Vec<f32>) {
        let gamma = random_vec(seed, c, 1.0).into_iter().map(|v| 1.0 + 0.5 * v).collect();
        (gamma, random_vec(seed + 1, c, 0.5))
    }

    #[test]
    fn layer_norm_hand_checked() {
        // x = [1 2 3 4]: mean 2.5, var 1.25; y = (x - 2.5) / sqrt(1.25) * 2 + 1.
        let gpu = test_gpu();
        let x = Tensor::from_slice(gpu, &[1., 2., 3., 4.], &[1, 4]).unwrap();
        let g = Tensor::from_slice(gpu, &[2.; 4], &[4]).unwrap();
        let b = Tensor::from_slice(gpu, &[1.; 4], &[4]).unwrap();
        let y = layer_norm(&x, &g, &b, 0.0).unwrap().to_vec().unwrap();
        let s = 1.25f64.sqrt();
        let want: Vec<f64> = [-1.5, -0.5, 0.5, 1.5].iter().map(|v| v / s * 2.0 + 1.0).collect();
        assert_close("layer_norm hand", &y, &want, Tol::KERNEL);
    }

    #[test]
    fn layer_norm_matches_reference() {
        let gpu = test_gpu();
        for (i, (shape, offset, gelu)) in [
            (vec![3usize, 5, 37], 0.0f32, false),
            (vec![7, 37], 100.0, true),
            (vec![11, 512], 100.0, false),
            (vec![2, 3, 768], -30.0, true),
            (vec![5, 1024], 100.0, false),
            (vec![3, 1], 5.0, false),
        ]
        .into_iter()
        .enumerate()
        {
            let c = *shape.last().unwrap();
            let n: usize = shape.iter().product();
            let xv = offset_data(10 + i as u64, n, offset);
            let (gv, bv) = affine(20 + i as u64, c);
            let x = Tensor::from_slice(gpu, &xv, &shape).unwrap();
            let g = Tensor::from_slice(gpu, &gv, &[c]).unwrap();
            let b = Tensor::from_slice(gpu, &bv, &[c]).unwrap();
            let y = if gelu {
                layer_norm_gelu(&x, &g, &b, 1e-5)
            } else {
                layer_norm(&x, &g, &b, 1e-5)
            }
            .unwrap();
            assert_eq!(y.shape(), &shape[..]);
            let want = reference::layer_norm(&xv, c, &gv, &bv, 1e-5, gelu);
            assert_close(
                &format!("layer_norm {shape:?} mean {offset} gelu {gelu}"),
                &y.to_vec().unwrap(),
                &want,
                Tol::KERNEL,
            );
        }
    }

    /// LayerNorm(x + r) in one kernel: the same bits as add then LayerNorm (the sum is rounded once, in f32,
    /// either way), and within the kernel tolerance of the f64 reference on that f32 sum; odd channel counts,
    /// rows beyond one workgroup, large common offsets.
    #[test]
    fn add_layer_norm_matches_add_then_layer_norm() {
        let gpu = test_gpu();
        for (i, (shape, offset)) in [
            (vec![3usize, 5, 37], 0.0f32),
            (vec![7, 1], 5.0),
            (vec![2, 9, 768], -30.0),
            (vec![5, 1031], 100.0),
        ]
        .into_iter()
        .enumerate()
        {
            let c = *shape.last().unwrap();
            let n: usize = shape.iter().product();
            let xv = offset_data(30 + i as u64, n, offset);
            let rv = offset_data(40 + i as u64, n, -0.5 * offset);
            let (gv, bv) = affine(50 + i as u64, c);
            let x = Tensor::from_slice(gpu, &xv, &shape).unwrap();
            let r = Tensor::from_slice(gpu, &rv, &shape).unwrap();
            let g = Tensor::from_slice(gpu, &gv, &[c]).unwrap();
            let b = Tensor::from_slice(gpu, &bv, &[c]).unwrap();
            let fused = add_layer_norm(&x, &r, &g, &b, 1e-5).unwrap().to_vec().unwrap();
            let sum = crate::ops::elementwise::add(&x, &r).unwrap();
            let two_ops = layer_norm(&sum, &g, &b, 1e-5).unwrap().to_vec().unwrap();
            let name = format!("add_layer_norm {shape:?} mean {offset}");
            assert_eq!(
                fused.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                two_ops.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name}: not bit-identical to add then layer_norm"
            );
            let sum_f32: Vec<f32> = xv.iter().zip(&rv).map(|(a, b)| a + b).collect();
            let want = reference::layer_norm(&sum_f32, c, &gv, &bv, 1e-5, false);
            assert_close(&name, &fused, &want, Tol::KERNEL);
        }
    }

    #[test]
    fn channel_moments_match_reference() {
        let gpu = test_gpu();
        let (b, t, c) = (2, 1000, 37);
        let xv = offset_data(3, b * t * c, 100.0);
        let x = Tensor::from_slice(gpu, &xv, &[b, t, c]).unwrap();
        let got = channel_moments(&x).unwrap().to_vec().unwrap();
        let want = reference::channel_moments(&xv, [b, t, c]);
        // The mean is judged against the data's spread (std 1), not its offset: the error must be at the
        // f32 rounding of the mean itself (half an ulp of 100 = 3.8e-6).
        let (mut mean_err, mut gq, mut wq) = (0f64, vec![], vec![]);
        for bi in 0..b {
            for ci in 0..c {
                let m = bi * 2 * c + ci;
                mean_err = mean_err.max((got[m] as f64 - want[m]).abs());
                gq.push(got[m + c]);
                wq.push(want[m + c]);
            }
        }
        eprintln!("channel_moments: max |mean err| = {mean_err:.3e} (std 1)");
        assert!(mean_err < 1e-5, "mean error {mean_err}");
        assert_close("channel_moments M2", &gq, &wq, Tol::KERNEL);
    }

    #[test]
    fn group_norm_time_matches_reference() {
        let gpu = test_gpu();
        for (i, (b, t, c, offset, gelu)) in [
            (2usize, 1000usize, 37usize, 100.0f32, false),
            // Long audio: 782 partials per channel.
            (1, 100_003, 3, 100.0, true),
            (1, 1000, 37, 100.0, true),
            (2, 129, 5, -20.0, true),
            (1, 77, 64, 0.0, false),
            (2, 129, 12, 5.0, true), // C % 4 == 0: the vec4 kernel, with GELU
            (2, 1, 3, 1.0, false),
        ]
        .into_iter()
        .enumerate()
        {
            let xv = offset_data(40 + i as u64, b * t * c, offset);
            let (gv, bv) = affine(50 + i as u64, c);
            let x = Tensor::from_slice(gpu, &xv, &[b, t, c]).unwrap();
            let g = Tensor::from_slice(gpu, &gv, &[c]).unwrap();
            let be = Tensor::from_slice(gpu, &bv, &[c]).unwrap();
            let y = if gelu {
                group_norm_time_gelu(&x, &g, &be, 1e-5)
            } else {
                group_norm_time(&x, &g, &be, 1e-5)
            }
            .unwrap();
            let want = reference::group_norm_time(&xv, [b, t, c], &gv, &bv, 1e-5, gelu);
            assert_close(
                &format!("group_norm_time [{b}, {t}, {c}] mean {offset} gelu {gelu}"),
                &y.to_vec().unwrap(),
                &want,
                Tol::KERNEL,
            );
        }
    }

    #[test]
    fn group_norm_in_time_chunks_matches_whole() {
        // Statistics from three uneven time chunks, combined on the host, then each chunk normalised.
        let gpu = test_gpu();
        let (b, t, c) = (2, 700, 11);
        let xv = offset_data(60, b * t * c, 100.0);
        let (gv, bv) = affine(61, c);
        let g = Tensor::from_slice(gpu, &gv, &[c]).unwrap();
        let be = Tensor::from_slice(gpu, &bv, &[c]).unwrap();
        let bounds = [(0usize, 250usize), (250, 251), (251, 700)];
        let chunk = |t0: usize, t1: usize| -> Vec<f32> {
            (0..b)
                .flat_map(|bi| xv[(bi * t + t0) * c..(bi * t + t1) * c].iter().copied())
                .collect()
        };
        let chunks: Vec<Tensor> = bounds
            .iter()
            .map(|&(t0, t1)| Tensor::from_slice(gpu, &chunk(t0, t1), &[b, t1 - t0, c]).unwrap())
            .collect();
        let mut stats: Option<ChannelStats> = None;
        for (x, &(t0, t1)) in chunks.iter().zip(&bounds) {
            let s = ChannelStats::from_moments(&channel_moments(x).unwrap(), t1 - t0).unwrap();
            match &mut stats {
                None => stats = Some(s),
                Some(acc) => acc.combine(&s).unwrap(),
            }
        }
        let stats = stats.unwrap();
        assert_eq!(stats.count, t as u64);
        let mr = stats.mean_rstd(gpu, 1e-5).unwrap();
        let mut got = vec![0f32; xv.len()];
        for (x, &(t0, t1)) in chunks.iter().zip(&bounds) {
            let y = normalize_channels(x, &mr, &g, &be, true).unwrap().to_vec().unwrap();
            for bi in 0..b {
                let n = (t1 - t0) * c;
                got[(bi * t + t0) * c..(bi * t + t1) * c].copy_from_slice(&y[bi * n..(bi + 1) * n]);
            }
        }
        let want = reference::group_norm_time(&xv, [b, t, c], &gv, &bv, 1e-5, true);
        assert_close("group_norm in 3 chunks", &got, &want, Tol::KERNEL);
    }

    #[test]
    fn layer_norm_reference_grad_matches_finite_differences() {
        for (i, (rows, c)) in [(3usize, 7usize), (2, 1), (1, 16)].into_iter().enumerate() {
            let seed = 900 + 10 * i as u64;
            let x = to_f64(&offset_data(seed, rows * c, 0.5));
            let (g32, b32) = affine(seed + 1, c);
            let (gamma, beta) = (to_f64(&g32), to_f64(&b32));
            let dy = to_f64(&random_vec(seed + 2, rows * c, 1.0));
            let eps = 1e-5;
            let loss = |x: &[f64], g: &[f64], b: &[f64]| dot_f64(&dy, &reference::layer_norm_f64(x, c, g, b, eps));
            let (dx, dg, db) = reference::layer_norm_backward(&dy, &x, c, &gamma, eps);
            let h = 1e-6;
            let name = format!("layer_norm [{rows}, {c}] ref");
            let fx = central_differences(&x, h, |v| loss(v, &gamma, &beta));
            let fg = central_differences(&gamma, h, |v| loss(&x, v, &beta));
            let fb = central_differences(&beta, h, |v| loss(&x, &gamma, v));
            // C = 1 normalises to exactly 0: dx is 0 and central differences give 0 too.
            assert_close_f64(&format!("{name} dx vs fd"), &dx, &fx, Tol::FINITE_DIFF);
            assert_close_f64(&format!("{name} dgamma vs fd"), &dg, &fg, Tol::FINITE_DIFF);
            assert_close_f64(&format!("{name} dbeta vs fd"), &db, &fb, Tol::FINITE_DIFF);
        }
    }

    #[test]
    fn group_norm_time_reference_grad_matches_finite_differences() {
        for (i, (b, t, c)) in [(2usize, 6usize, 3usize), (1, 9, 2), (2, 3, 1)].into_iter().enumerate() {
            let seed = 950 + 10 * i as u64;
            let shape = [b, t, c];
            let x = to_f64(&offset_data(seed, b * t * c, 0.5));
            let (g32, b32) = affine(seed + 1, c);
            let (gamma, beta) = (to_f64(&g32), to_f64(&b32));
            let dy = to_f64(&random_vec(seed + 2, b * t * c, 1.0));
            let eps = 1e-5;
            let loss =
                |x: &[f64], g: &[f64], be: &[f64]| dot_f64(&dy, &reference::group_norm_time_f64(x, shape, g, be, eps));
            let (dx, dg, db) = reference::group_norm_time_backward(&dy, &x, shape, &gamma, eps);
            let h = 1e-6;
            let name = format!("group_norm_time {shape:?} ref");
            let fx = central_differences(&x, h, |v| loss(v, &gamma, &beta));
            let fg = central_differences(&gamma, h, |v| loss(&x, v, &beta));
            let fb = central_differences(&beta, h, |v| loss(&x, &gamma, v));
            assert_close_f64(&format!("{name} dx vs fd"), &dx, &fx, Tol::FINITE_DIFF);
            assert_close_f64(&format!("{name} dgamma vs fd"), &dg, &fg, Tol::FINITE_DIFF);
            assert_close_f64(&format!("{name} dbeta vs fd"), &db, &fb, Tol::FINITE_DIFF);
        }
    }

    /// GPU layer_norm_train + layer_norm_backward against the references; returns the gradients read back.
    fn check_layer_norm_grad(seed: u64, shape: &[usize], offset: f32) -> [Vec<f32>; 3] {
        let gpu = test_gpu();
        let c = *shape.last().unwrap();
        let n: usize = shape.iter().product();
        let xv = offset_data(seed, n, offset);
        let (gv, bv) = affine(seed + 1, c);
        let dyv = random_vec(seed + 2, n, 1.0);
        let x = Tensor::from_slice(gpu, &xv, shape).unwrap();
        let g = Tensor::from_slice(gpu, &gv, &[c]).unwrap();
        let be = Tensor::from_slice(gpu, &bv, &[c]).unwrap();
        let dy = Tensor::from_slice(gpu, &dyv, shape).unwrap();
        let (y, stats) = layer_norm_train(&x, &g, &be, 1e-5).unwrap();
        let (dx, dg, db) = layer_norm_backward(&dy, &x, &stats, &g).unwrap();
        let name = format!("layer_norm {shape:?} mean {offset}");
        let want_y = reference::layer_norm(&xv, c, &gv, &bv, 1e-5, false);
        assert_close(&format!("{name} train y"), &y.to_vec().unwrap(), &want_y, Tol::KERNEL);
        // mean and rstd are judged separately: the mean against the data's spread (std 1), not its offset.
        let want_stats = reference::layer_norm_stats(&to_f64(&xv), c, 1e-5);
        let got_stats = stats.to_vec().unwrap();
        let mean_err = (0..n / c)
            .map(|r| (got_stats[2 * r] as f64 - want_stats[2 * r]).abs())
            .fold(0f64, f64::max);
        eprintln!("{name} train mean: max |err| = {mean_err:.3e} (std 1)");
        assert!(mean_err < 1e-5, "{name}: mean error {mean_err}");
        let rstd = |v: &[f32]| v.iter().skip(1).step_by(2).copied().collect::<Vec<f32>>();
        let want_rstd: Vec<f64> = want_stats.iter().skip(1).step_by(2).copied().collect();
        assert_close(
            &format!("{name} train rstd"),
            &rstd(&got_stats),
            &want_rstd,
            Tol::KERNEL,
        );
        let (wdx, wdg, wdb) = reference::layer_norm_backward(&to_f64(&dyv), &to_f64(&xv), c, &to_f64(&gv), 1e-5);
        let got = [dx.to_vec().unwrap(), dg.to_vec().unwrap(), db.to_vec().unwrap()];
        assert_eq!((dx.shape(), dg.shape(), db.shape()), (shape, &[c][..], &[c][..]));
        // dx = rstd (dn - mean(dn) - xhat mean(dn xhat)) with dn = dy gamma: judged against the size of dn rstd,
        // the terms it subtracts. Usually that is about max |dx|; where the terms cancel exactly (one channel:
        // dx = 0) a GPU that fuses dy * gamma into the subtraction leaves that product's rounding error (an H100
        // gave 6e-6 for C = 1), which is all f32 can promise there.
        let dn_scale = (0..n)
            .map(|i| (dyv[i] as f64 * gv[i % c] as f64).abs() * want_stats[2 * (i / c) + 1])
            .fold(0f64, f64::max);
        let max_ref = wdx.iter().fold(0f64, |m, v| m.max(v.abs()));
        let dx_err = got[0]
            .iter()
            .zip(&wdx)
            .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
        let dx_rel = dx_err / max_ref.max(dn_scale);
        eprintln!("{name} dx: max |err| / max(max |ref|, max |dy gamma| rstd) = {dx_rel:.3e} (tolerance 1e-5)");
        assert!(
            dx_rel <= Tol::KERNEL.rel && got[0].iter().all(|v| v.is_finite()),
            "{name} dx: {dx_rel:.3e}"
        );
        assert_close(&format!("{name} dgamma"), &got[1], &wdg, Tol::KERNEL);
        assert_close(&format!("{name} dbeta"), &got[2], &wdb, Tol::KERNEL);
        got
    }

    #[test]
    fn layer_norm_grad_matches_reference() {
        for (i, (shape, offset)) in [
            (vec![3usize, 5, 37], 0.0f32),
            (vec![7, 37], 100.0),
            (vec![11, 512], 3.0),
            (vec![2, 3, 768], -30.0),
            (vec![5, 1024], 0.0),
            (vec![3, 1], 5.0),
            (vec![130, 65], 1.0),
        ]
        .into_iter()
        .enumerate()
        {
            check_layer_norm_grad(1000 + 10 * i as u64, &shape, offset);
        }
    }

    #[test]
    fn layer_norm_grad_long_reduction_is_deterministic() {
        // dgamma / dbeta over 3001 rows (47 chunks); run twice, bit for bit.
        let a = check_layer_norm_grad(1100, &[3001, 200], 1.0);
        let b = check_layer_norm_grad(1100, &[3001, 200], 1.0);
        for (x, y) in a.iter().zip(&b) {
            assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "runs differ");
        }
    }

    fn check_group_norm_grad(seed: u64, [b, t, c]: [usize; 3], offset: f32) -> [Vec<f32>; 3] {
        let gpu = test_gpu();
        let n = b * t * c;
        let xv = offset_data(seed, n, offset);
        let (gv, bv) = affine(seed + 1, c);
        let dyv = random_vec(seed + 2, n, 1.0);
        let x = Tensor::from_slice(gpu, &xv, &[b, t, c]).unwrap();
        let g = Tensor::from_slice(gpu, &gv, &[c]).unwrap();
        let be = Tensor::from_slice(gpu, &bv, &[c]).unwrap();
        let dy = Tensor::from_slice(gpu, &dyv, &[b, t, c]).unwrap();
        let (y, mr) = group_norm_time_train(&x, &g, &be, 1e-5).unwrap();
        let (dx, dg, db) = group_norm_time_backward(&dy, &x, &mr, &g).unwrap();
        let name = format!("group_norm_time [{b}, {t}, {c}] mean {offset}");
        let want_y = reference::group_norm_time(&xv, [b, t, c], &gv, &bv, 1e-5, false);
        assert_close(&format!("{name} train y"), &y.to_vec().unwrap(), &want_y, Tol::KERNEL);
        assert_eq!(mr.shape(), [b, 2, c]);
        let (wdx, wdg, wdb) =
            reference::group_norm_time_backward(&to_f64(&dyv), &to_f64(&xv), [b, t, c], &to_f64(&gv), 1e-5);
        let got = [dx.to_vec().unwrap(), dg.to_vec().unwrap(), db.to_vec().unwrap()];
        assert_eq!(
            (dx.shape(), dg.shape(), db.shape()),
            (&[b, t, c][..], &[c][..], &[c][..])
        );
        assert_close(&format!("{name} dx"), &got[0], &wdx, Tol::KERNEL);
        assert_close(&format!("{name} dgamma"), &got[1], &wdg, Tol::KERNEL);
        assert_close(&format!("{name} dbeta"), &got[2], &wdb, Tol::KERNEL);
        got
    }

    #[test]
    fn group_norm_time_grad_matches_reference() {
        for (i, (shape, offset)) in [
            ([2usize, 1000usize, 37usize], 100.0f32),
            ([1, 77, 64], 0.0),
            ([2, 53, 8], 2.0), // C % 4 == 0: the vec4 dx kernel, over two items
            ([2, 129, 5], -20.0),
            ([2, 1, 3], 1.0),
            ([1, 300, 1], 3.0),
        ]
        .into_iter()
        .enumerate()
        {
            check_group_norm_grad(1200 + 10 * i as u64, shape, offset);
        }
    }

    #[test]
    fn group_norm_time_grad_long_reduction_is_deterministic() {
        // 20003 frames (157 chunks per channel) x 2 batch rows; run twice, bit for bit.
        let a = check_group_norm_grad(1300, [2, 20003, 9], 1.0);
        let b = check_group_norm_grad(1300, [2, 20003, 9], 1.0);
        for (x, y) in a.iter().zip(&b) {
            assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "runs differ");
        }
    }

    #[test]
    fn grad_bad_shapes_are_clear_errors() {
        let gpu = test_gpu();
        let x = Tensor::zeros(gpu, &[2, 3, 4]).unwrap();
        let g4 = Tensor::zeros(gpu, &[4]).unwrap();
        let g3 = Tensor::zeros(gpu, &[3]).unwrap();
        let err = |r: Result<(Tensor, Tensor, Tensor)>| r.unwrap_err().to_string();
        let (_, ln_stats) = layer_norm_train(&x, &g4, &g4, 1e-5).unwrap();
        assert_eq!(ln_stats.shape(), [6, 2]);
        let (_, gn_stats) = group_norm_time_train(&x, &g4, &g4, 1e-5).unwrap();
        assert_eq!(gn_stats.shape(), [2, 2, 4]);
        let dy_bad = Tensor::zeros(gpu, &[2, 4, 4]).unwrap();
        assert!(err(layer_norm_backward(&dy_bad, &x, &ln_stats, &g4)).contains("dy"));
        assert!(err(layer_norm_backward(&x, &x, &gn_stats, &g4)).contains("mean_rstd must be [6, 2]"));
        assert!(err(layer_norm_backward(&x, &x, &ln_stats, &g3)).contains("gamma must be [4]"));
        assert!(err(group_norm_time_backward(&dy_bad, &x, &gn_stats, &g4)).contains("dy"));
        assert!(err(group_norm_time_backward(&x, &x, &ln_stats, &g4)).contains("mean_rstd must be [2, 2, 4]"));
        assert!(err(group_norm_time_backward(&x, &x, &gn_stats, &g3)).contains("gamma must be [4]"));
        let flat = Tensor::zeros(gpu, &[24]).unwrap();
        assert!(err(group_norm_time_backward(&flat, &flat, &gn_stats, &g4)).contains("[B, T, C]"));
    }

    #[test]
    fn bad_shapes_are_clear_errors() {
        let gpu = test_gpu();
        let x = Tensor::zeros(gpu, &[2, 3, 4]).unwrap();
        let g4 = Tensor::zeros(gpu, &[4]).unwrap();
        let g3 = Tensor::zeros(gpu, &[3]).unwrap();
        let err = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(err(layer_norm(&x, &g3, &g4, 1e-5)).contains("gamma must be [4]"));
        let x2 = Tensor::zeros(gpu, &[3, 2, 4]).unwrap();
        assert!(err(add_layer_norm(&x, &x2, &g4, &g4, 1e-5)).contains("must have the input's shape"));
        assert!(err(add_layer_norm(&x, &x, &g4, &g3, 1e-5)).contains("beta must be [4]"));
        assert!(err(group_norm_time(&x, &g4, &g3, 1e-5)).contains("beta must be [4]"));
        let flat = Tensor::zeros(gpu, &[12]).unwrap();
        assert!(err(group_norm_time(&flat, &g4, &g4, 1e-5)).contains("[B, T, C]"));
        let empty = Tensor::zeros(gpu, &[2, 0, 4]).unwrap();
        assert!(err(channel_moments(&empty)).contains("at least one frame"));
        let mr = Tensor::zeros(gpu, &[2, 2, 3]).unwrap();
        assert!(err(normalize_channels(&x, &mr, &g4, &g4, false)).contains("mean_rstd"));
        assert!(err(moments_to_mean_rstd(&x, 3, 1e-5)).contains("[B, 2, C]"));
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::random_vec;

    /// wav2vec2-base shapes for 1 s and 10 s of audio. `cargo test --release --lib norm_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn norm_timing() {
        let gpu = test_gpu();
        for (name, t, c) in [
            ("group_norm layer0 1 s", 3199usize, 512usize),
            ("group_norm layer0 10 s", 31999, 512),
            ("layer_norm 1 s of layer0", 3199, 512),
            ("layer_norm encoder 10 s", 499, 768),
        ] {
            let x = Tensor::from_slice(gpu, &random_vec(1, t * c, 1.0), &[1, t, c]).unwrap();
            let g = Tensor::from_slice(gpu, &random_vec(2, c, 1.0), &[c]).unwrap();
            let run = || {
                if name.starts_with("group") {
                    group_norm_time_gelu(&x, &g, &g, 1e-5).unwrap();
                } else {
                    layer_norm(&x, &g, &g, 1e-5).unwrap();
                }
            };
            run();
            gpu.sync().unwrap();
            let n = 3;
            let start = std::time::Instant::now();
            for _ in 0..n {
                run();
            }
            gpu.sync().unwrap();
            let dt = start.elapsed().as_secs_f64() / n as f64;
            eprintln!("{name} [{t}, {c}]: {:.1} ms", dt * 1e3);
        }
    }

    /// Backward at training shapes. `cargo test --release --lib norm_grad_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn norm_grad_timing() {
        let gpu = test_gpu();
        for (name, b, t, c) in [
            ("group_norm backward (2 x 2 s of layer0)", 2usize, 32000usize, 512usize),
            ("layer_norm backward, C = 512", 1, 6000, 512),
            ("layer_norm backward, C = 768", 1, 6000, 768),
        ] {
            let x = Tensor::from_slice(gpu, &random_vec(1, b * t * c, 1.0), &[b, t, c]).unwrap();
            let dy = Tensor::from_slice(gpu, &random_vec(2, b * t * c, 1.0), &[b, t, c]).unwrap();
            let g = Tensor::from_slice(gpu, &random_vec(3, c, 1.0), &[c]).unwrap();
            let group = name.starts_with("group");
            let stats = if group {
                group_norm_time_train(&x, &g, &g, 1e-5).unwrap().1
            } else {
                layer_norm_train(&x, &g, &g, 1e-5).unwrap().1
            };
            let run = || {
                if group {
                    group_norm_time_backward(&dy, &x, &stats, &g).unwrap();
                } else {
                    layer_norm_backward(&dy, &x, &stats, &g).unwrap();
                }
            };
            run();
            gpu.sync().unwrap();
            let n = 2;
            let start = std::time::Instant::now();
            for _ in 0..n {
                run();
            }
            gpu.sync().unwrap();
            let dt = start.elapsed().as_secs_f64() / n as f64;
            eprintln!("{name} [{b}, {t}, {c}]: {:.1} ms", dt * 1e3);
        }
    }
}
