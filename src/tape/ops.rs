//! The differentiable ops: each forward calls its kernel, and its recorded closure keeps only what the
//! backward kernel reads. When no gradient is needed (no-grad tape, or only constant inputs) the fused
//! inference kernels run and nothing is saved.

use anyhow::{bail, Result};

use super::{Tape, Var};
use crate::gpu::Tensor;
use crate::ops::conv1d::{self, Conv1dWeight};
use crate::ops::dropout::DropoutMask;
use crate::ops::{attention, dropout, elementwise, layer_mix, loss, matmul, norm, reduce, slice, weight_norm};

impl Tape {
    /// Whether an op on these inputs is recorded.
    fn wants(&self, inputs: &[&Var]) -> bool {
        self.is_recording() && inputs.iter().any(|v| v.needs_grad())
    }

    /// a + b (residual connections).
    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        let y = elementwise::add(a.value(), b.value())?;
        Ok(self.push(y, &[a, b], |dy| Ok(vec![Some(dy.clone()), Some(dy.clone())])))
    }

    /// Exact erf GELU.
    pub fn gelu(&self, x: &Var) -> Result<Var> {
        let y = elementwise::gelu(x.value())?;
        let saved = x.value().clone();
        Ok(self.push(y, &[x], move |dy| {
            Ok(vec![Some(elementwise::gelu_backward(&saved, dy)?)])
        }))
    }

    /// y = alpha * x.
    pub fn scale(&self, x: &Var, alpha: f32) -> Result<Var> {
        let y = elementwise::scale(x.value(), alpha)?;
        Ok(self.push(y, &[x], move |dy| Ok(vec![Some(elementwise::scale(dy, alpha)?)])))
    }

    /// Identity forward, gradient multiplied by `factor` (DistilHuBERT's `feature_grad_mult` on the CNN).
    pub fn scale_grad(&self, x: &Var, factor: f32) -> Var {
        self.push(x.value().clone(), &[x], move |dy| {
            Ok(vec![Some(elementwise::scale(dy, factor)?)])
        })
    }

    /// x W^T + b, W [out, in] (torch layout).
    pub fn linear(&self, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
        let y = matmul::linear(x.value(), w.value(), b.map(|b| b.value()))?;
        Ok(self.push_linear(y, x, w, b))
    }

    fn push_linear(&self, y: Tensor, x: &Var, w: &Var, b: Option<&Var>) -> Var {
        let (xs, ws, need_dx, has_b) = (x.value().clone(), w.value().clone(), x.needs_grad(), b.is_some());
        let mut inputs = vec![x, w];
        inputs.extend(b);
        self.push(y, &inputs, move |dy| {
            let g = matmul::linear_backward(dy, &xs, &ws, need_dx)?;
            let mut out = vec![g.dx, Some(g.dw)];
            if has_b {
                out.push(Some(g.db));
            }
            Ok(out)
        })
    }

    /// GELU(x W^T + b): one fused kernel without gradients, linear then GELU with them.
    pub fn linear_gelu(&self, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
        let mut inputs = vec![x, w];
        inputs.extend(b);
        if !self.wants(&inputs) {
            return Ok(self.constant(matmul::linear_gelu(x.value(), w.value(), b.map(|b| b.value()))?));
        }
        self.gelu(&self.linear(x, w, b)?)
    }

    /// LayerNorm over the last dim.
    pub fn layer_norm(&self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        if !self.wants(&[x, gamma, beta]) {
            return Ok(self.constant(norm::layer_norm(x.value(), gamma.value(), beta.value(), eps)?));
        }
        let (y, stats) = norm::layer_norm_train(x.value(), gamma.value(), beta.value(), eps)?;
        let (xs, gs) = (x.value().clone(), gamma.value().clone());
        Ok(self.push(y, &[x, gamma, beta], move |dy| {
            let (dx, dg, db) = norm::layer_norm_backward(dy, &xs, &stats, &gs)?;
            Ok(vec![Some(dx), Some(dg), Some(db)])
        }))
    }

    /// LayerNorm(x + residual): one kernel when no gradient is wanted (same bits as the two ops it replaces).
    pub fn add_layer_norm(&self, x: &Var, residual: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        if !self.wants(&[x, residual, gamma, beta]) {
            return Ok(self.constant(norm::add_layer_norm(
                x.value(),
                residual.value(),
                gamma.value(),
                beta.value(),
                eps,
            )?));
        }
        self.layer_norm(&self.add(x, residual)?, gamma, beta, eps)
    }

    /// GELU(LayerNorm(x)) (wav2vec 2.0's "layer" feature-encoder blocks).
    pub fn layer_norm_gelu(&self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        if !self.wants(&[x, gamma, beta]) {
            return Ok(self.constant(norm::layer_norm_gelu(x.value(), gamma.value(), beta.value(), eps)?));
        }
        self.gelu(&self.layer_norm(x, gamma, beta, eps)?)
    }

    /// GELU(GroupNorm(C, C)(x)) on [B, T, C]: each channel normalised over time.
    pub fn group_norm_time_gelu(&self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        if !self.wants(&[x, gamma, beta]) {
            return Ok(self.constant(norm::group_norm_time_gelu(x.value(), gamma.value(), beta.value(), eps)?));
        }
        let (y, stats) = norm::group_norm_time_train(x.value(), gamma.value(), beta.value(), eps)?;
        let (xs, gs) = (x.value().clone(), gamma.value().clone());
        let y = self.push(y, &[x, gamma, beta], move |dy| {
            let (dx, dg, db) = norm::group_norm_time_backward(dy, &xs, &stats, &gs)?;
            Ok(vec![Some(dx), Some(dg), Some(db)])
        });
        self.gelu(&y)
    }

    /// Channels-last conv1d: x [B, T, C_in], w [C_out, C_in / groups, K] (torch layout), optional bias and
    /// fused GELU. The weight is packed into the kernel's layout on every call (a cheap copy), so a trained
    /// weight is always current.
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d(
        &self,
        x: &Var,
        w: &Var,
        b: Option<&Var>,
        stride: usize,
        padding: usize,
        groups: usize,
        gelu: bool,
    ) -> Result<Var> {
        let packed = Conv1dWeight::pack(w.value(), groups)?;
        let mut inputs = vec![x, w];
        inputs.extend(b);
        if !self.wants(&inputs) {
            let y = conv1d::conv1d_packed(x.value(), &packed, b.map(|b| b.value()), stride, padding, gelu)?;
            return Ok(self.constant(y));
        }
        let y = conv1d::conv1d_packed(x.value(), &packed, b.map(|b| b.value()), stride, padding, false)?;
        let (xs, ws, need_dx, has_b) = (x.value().clone(), w.value().clone(), x.needs_grad(), b.is_some());
        let y = self.push(y, &inputs, move |dy| {
            let g = conv1d::conv1d_backward(dy, &xs, &ws, stride, padding, groups, need_dx)?;
            let mut out = vec![g.dx, Some(g.dw)];
            if has_b {
                out.push(Some(g.db));
            }
            Ok(out)
        });
        if gelu {
            self.gelu(&y)
        } else {
            Ok(y)
        }
    }

    /// w = g * v / ||v|| per kernel position (torch weight_norm, dim 2).
    pub fn weight_norm(&self, g: &Var, v: &Var) -> Result<Var> {
        let (w, norms) = weight_norm::weight_norm(g.value(), v.value())?;
        let (gs, vs) = (g.value().clone(), v.value().clone());
        Ok(self.push(w, &[g, v], move |dw| {
            let (dg, dv) = weight_norm::weight_norm_backward(dw, &gs, &vs, &norms)?;
            Ok(vec![Some(dg), Some(dv)])
        }))
    }

    /// Multi-head self-attention of q, k, v [B, T, D]; `key_mask` [B, T] u32 (1 = valid key);
    /// `dropout` on the attention probabilities (transformers' attention_dropout) when recording.
    pub fn self_attention(
        &self,
        q: &Var,
        k: &Var,
        v: &Var,
        heads: usize,
        key_mask: Option<&Tensor>,
        dropout: f32,
    ) -> Result<Var> {
        if !self.wants(&[q, k, v]) {
            return Ok(self.constant(attention::self_attention_inference(
                q.value(),
                k.value(),
                v.value(),
                heads,
                key_mask,
            )?));
        }
        let mask = if dropout > 0.0 {
            Some(DropoutMask::new(dropout, self.seed, self.next_stream())?)
        } else {
            None
        };
        let (y, saved) = attention::self_attention_train(q.value(), k.value(), v.value(), heads, key_mask, mask)?;
        let (qs, ks, vs) = (q.value().clone(), k.value().clone(), v.value().clone());
        let key_mask = key_mask.cloned();
        Ok(self.push(y, &[q, k, v], move |dy| {
            let (dq, dk, dv) = attention::self_attention_backward(dy, &qs, &ks, &vs, &saved, heads, key_mask.as_ref())?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        }))
    }

    /// A fresh random stream for one dropout site of this tape: masks differ between sites and steps
    /// (the step's seed) but are reproducible.
    fn next_stream(&self) -> u64 {
        let call = self.dropout_calls.get();
        self.dropout_calls.set(call + 1);
        call
    }

    /// Dropout with probability `p` (inverted scaling, as torch). Identity on a no-grad tape or when p = 0.
    pub fn dropout(&self, x: &Var, p: f32) -> Result<Var> {
        if p == 0.0 || !self.wants(&[x]) {
            return Ok(x.clone());
        }
        let (y, mask) = dropout::dropout(x.value(), p, self.seed, self.next_stream())?;
        Ok(self.push(y, &[x], move |dy| Ok(vec![Some(dropout::dropout_backward(dy, &mask)?)])))
    }

    /// Columns offset..offset + n of the last dim.
    pub fn narrow_cols(&self, x: &Var, offset: usize, n: usize) -> Result<Var> {
        let y = slice::narrow_cols(x.value(), offset, n)?;
        let width = *x.shape().last().expect("narrow_cols checked the rank");
        Ok(self.push(y, &[x], move |dy| {
            Ok(vec![Some(slice::narrow_cols_backward(dy, offset, width)?)])
        }))
    }

    /// Mean of every element, as a one-element tensor.
    pub fn mean(&self, x: &Var) -> Result<Var> {
        let y = reduce::mean_all(x.value())?;
        let shape = x.shape().to_vec();
        Ok(self.push(y, &[x], move |dy| {
            Ok(vec![Some(reduce::mean_all_backward(dy, &shape)?)])
        }))
    }

    /// mean |p - t| over every element (t is a constant target).
    pub fn l1_loss(&self, p: &Var, t: &Tensor) -> Result<Var> {
        let y = loss::l1_loss(p.value(), t)?;
        let (ps, ts) = (p.value().clone(), t.clone());
        Ok(self.push(y, &[p], move |dy| Ok(vec![Some(loss::l1_loss_backward(&ps, &ts, dy)?)])))
    }

    /// cos(p_f, t_f) for every row f of [.., D] (torch cosine_similarity, dim -1, eps 1e-8).
    pub fn cosine_rows(&self, p: &Var, t: &Tensor) -> Result<Var> {
        if !self.wants(&[p]) {
            return Ok(self.constant(loss::cosine_rows(p.value(), t)?));
        }
        let (y, norms) = loss::cosine_rows_train(p.value(), t)?;
        let (ps, ts, cos) = (p.value().clone(), t.clone(), y.clone());
        Ok(self.push(y, &[p], move |dy| {
            Ok(vec![Some(loss::cosine_rows_backward(&ps, &ts, &cos, &norms, dy)?)])
        }))
    }

    /// log(sigmoid(x)), numerically stable.
    pub fn log_sigmoid(&self, x: &Var) -> Result<Var> {
        let y = loss::log_sigmoid(x.value())?;
        let xs = x.value().clone();
        Ok(self.push(y, &[x], move |dy| Ok(vec![Some(loss::log_sigmoid_backward(&xs, dy)?)])))
    }
}

impl Tape {
    /// `x [B, L, D]`, logits `w [L]` -> `[B, D]`: the softmax(w)-weighted sum of the L layers of every item
    /// (the emotion classifier's layer mix).
    pub fn layer_mix(&self, x: &Var, w: &Var) -> Result<Var> {
        let y = layer_mix::layer_mix(x.value(), w.value())?;
        let (xs, ws, need_dx) = (x.value().clone(), w.value().clone(), x.needs_grad());
        Ok(self.push(y, &[x, w], move |dy| {
            let (dw, dx) = layer_mix::layer_mix_backward(dy, &xs, &ws, need_dx)?;
            Ok(vec![dx, Some(dw)])
        }))
    }

    /// Class-weighted cross-entropy of `logits [B, C]` against `labels` (checked to be below C), torch's
    /// weighted mean; returns the loss `[1]` and the softmax probabilities `[B, C]`.
    pub fn cross_entropy(&self, logits: &Var, labels: &[u32], weights: &Tensor) -> Result<(Var, Tensor)> {
        let &[b, c] = logits.shape() else {
            bail!("cross_entropy: logits must be [B, C], got {:?}", logits.shape())
        };
        if labels.len() != b {
            bail!("cross_entropy: {} labels for {b} rows of logits", labels.len());
        }
        if let Some(y) = labels.iter().find(|&&y| y as usize >= c) {
            bail!("cross_entropy: label {y} is not below the {c} classes");
        }
        let labels = Tensor::from_u32(logits.value().gpu(), labels, &[b])?;
        let saved = loss::cross_entropy_train(logits.value(), &labels, weights)?;
        let (loss_t, probs) = (saved.loss.clone(), saved.probs.clone());
        let weights = weights.clone();
        let y = self.push(loss_t, &[logits], move |dy| {
            Ok(vec![Some(loss::cross_entropy_backward(&saved, &labels, &weights, dy)?)])
        });
        Ok((y, probs))
    }
}

impl Tape {
    /// [B, T + 1, C] -> [B, T, C]: drops the last frame of every item (SamePad for even conv kernels).
    pub fn drop_last_frame(&self, x: &Var) -> Result<Var> {
        let &[b, t1, c] = x.shape() else {
            bail!("drop_last_frame needs [B, T, C], got {:?}", x.shape())
        };
        let t = t1
            .checked_sub(1)
            .ok_or_else(|| anyhow::anyhow!("drop_last_frame: no frame to drop"))?;
        let y = Tensor::empty(x.value().gpu(), &[b, t, c], crate::gpu::DType::F32)?;
        for i in 0..b {
            y.copy_from(i * t * c, x.value(), i * t1 * c, t * c)?;
        }
        Ok(self.push(y, &[x], move |dy| {
            // The dropped frame gets a zero gradient.
            let dx = Tensor::zeros(dy.gpu(), &[b, t1, c])?;
            for i in 0..b {
                dx.copy_from(i * t1 * c, dy, i * t * c, t * c)?;
            }
            Ok(vec![Some(dx)])
        }))
    }
}
