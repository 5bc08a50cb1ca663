//! Multi-head self-attention on `[B, T, D]` Q, K, V (no kernel of its own: strided matmuls and the row
//! softmax).
//!
//! Per batch item and head h (head dim dh = D / heads, columns h*dh..(h+1)*dh), as transformers' eager path:
//! `scores = (Q_h K_h^T) * dh^-0.5`, masked keys set to -inf, softmax in f32, then `scores V_h`, written into
//! the head's columns of the output. Heads are read and written in place through matmul views (no permute
//! copies). The score matrix of all heads can exceed one binding (T = 3000, 12 heads: 432 MB), so heads, and
//! if needed query rows, are processed in groups whose scores fit `gpu.max_binding_bytes()`; one score
//! buffer is reused by every group.

use anyhow::{bail, Result};

use super::matmul::{matmul_into, MatDims, View};
use super::softmax::{softmax_rows_at, MaskRef};
use crate::gpu::{DType, Tensor};

/// Self-attention of `q, k, v` (each `[B, T, D]`) with `heads` heads; `key_mask` `[B, T]` u32 (1 = valid,
/// 0 = padded key). Returns `[B, T, D]`. A query whose keys are all masked gets a zero output.
pub fn self_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, key_mask: Option<&Tensor>) -> Result<Tensor> {
    let budget = q.gpu().max_binding_bytes();
    self_attention_chunked(q, k, v, heads, key_mask, budget)
}

/// How many heads and query rows one score buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunks {
    heads: usize,
    rows: usize,
}

fn plan_chunks(heads: usize, t: usize, max_score_bytes: u64) -> Result<Chunks> {
    let row_bytes = t as u64 * 4;
    let max_rows = max_score_bytes / row_bytes;
    if max_rows == 0 {
        bail!(
            "attention: one score row of T = {t} keys ({row_bytes} bytes) exceeds the score budget of \
             {max_score_bytes} bytes"
        );
    }
    let per_head = t as u64;
    Ok(if max_rows >= heads as u64 * per_head {
        Chunks { heads, rows: t }
    } else if max_rows >= per_head {
        Chunks {
            heads: (max_rows / per_head) as usize,
            rows: t,
        }
    } else {
        Chunks {
            heads: 1,
            rows: max_rows as usize,
        }
    })
}

/// [`self_attention`] with the score buffer limited to `max_score_bytes` (also capped by the device's
/// binding limit). Results do not depend on the chunking: every score row is computed the same way.
pub fn self_attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
    max_score_bytes: u64,
) -> Result<Tensor> {
    let [b, t, d] = *q.shape() else {
        bail!("attention: q must be [B, T, D], got {:?}", q.shape());
    };
    if k.shape() != q.shape() || v.shape() != q.shape() {
        bail!(
            "attention: q, k, v must have the same shape [B, T, D], got {:?}, {:?}, {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if x.dtype() != DType::F32 {
            bail!("attention: {name} must be f32, got {:?}", x.dtype());
        }
    }
    if heads == 0 || d % heads != 0 {
        bail!("attention: {heads} heads do not divide the model dimension D = {d}");
    }
    if let Some(m) = key_mask {
        if m.dtype() != DType::U32 || m.shape() != [b, t] {
            bail!(
                "attention: key_mask must be u32 [B, T] = [{b}, {t}], got {:?} {:?}",
                m.dtype(),
                m.shape()
            );
        }
    }
    let gpu = q.gpu();
    let out = Tensor::empty(gpu, &[b, t, d], DType::F32)?;
    if b == 0 || t == 0 || d == 0 {
        return Ok(out);
    }
    let dh = d / heads;
    let chunks = plan_chunks(heads, t, max_score_bytes.min(gpu.max_binding_bytes()))?;
    let scores = Tensor::empty(gpu, &[chunks.heads * chunks.rows, t], DType::F32)?;
    // transformers: head_dim ** -0.5 in Python (f64), applied to the f32 scores as an f32 scalar.
    let scaling = (dh as f64).powf(-0.5) as f32;
    for bi in 0..b {
        let item = bi * t * d; // first element of this batch item in q, k, v and out
        for h0 in (0..heads).step_by(chunks.heads) {
            let hn = chunks.heads.min(heads - h0);
            for t0 in (0..t).step_by(chunks.rows) {
                let tn = chunks.rows.min(t - t0);
                // Score rows of this group, [hn, tn, T], dense.
                let s_view = View {
                    offset: 0,
                    batch_stride: tn * t,
                    row_stride: t,
                    col_stride: 1,
                };
                // scores[h, i, j] = scaling * sum_p Q[t0 + i, h*dh + p] K[j, h*dh + p]
                matmul_into(
                    &scores,
                    s_view,
                    q,
                    View {
                        offset: item + t0 * d + h0 * dh,
                        batch_stride: dh,
                        row_stride: d,
                        col_stride: 1,
                    },
                    k,
                    View {
                        offset: item + h0 * dh,
                        batch_stride: dh,
                        row_stride: 1,
                        col_stride: d,
                    },
                    MatDims {
                        batch: hn,
                        m: tn,
                        n: t,
                        k: dh,
                    },
                    None,
                    scaling,
                )?;
                // Every row of this group belongs to batch item bi.
                let mask = key_mask.map(|m| MaskRef {
                    mask: m,
                    offset: bi * t,
                    rows_per_batch: hn * tn,
                });
                softmax_rows_at(&scores, hn * tn, t, mask)?;
                // out[t0 + i, h*dh + j] = sum_p P[h, i, p] V[p, h*dh + j]
                matmul_into(
                    &out,
                    View {
                        offset: item + t0 * d + h0 * dh,
                        batch_stride: dh,
                        row_stride: d,
                        col_stride: 1,
                    },
                    &scores,
                    s_view,
                    v,
                    View {
                        offset: item + h0 * dh,
                        batch_stride: dh,
                        row_stride: d,
                        col_stride: 1,
                    },
                    MatDims {
                        batch: hn,
                        m: tn,
                        n: dh,
                        k: t,
                    },
                    None,
                    1.0,
                )?;
            }
        }
    }
    Ok(out)
}

/// CPU references, f64 throughout.
pub mod reference {
    /// Naive attention over `[B, T, D]` inputs; masked keys are excluded (a fully masked row gives zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn self_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        t: usize,
        d: usize,
        heads: usize,
        key_mask: Option<&[u32]>,
    ) -> Vec<f64> {
        let dh = d / heads;
        let scale = (dh as f64).powf(-0.5);
        let mut out = vec![0f64; b * t * d];
        let at = |x: &[f32], bi: usize, ti: usize, c: usize| x[(bi * t + ti) * d + c] as f64;
        for bi in 0..b {
            let valid = |j: usize| key_mask.is_none_or(|m| m[bi * t + j] != 0);
            for h in 0..heads {
                for i in 0..t {
                    let s: Vec<f64> = (0..t)
                        .map(|j| {
                            (0..dh)
                                .map(|p| at(q, bi, i, h * dh + p) * at(k, bi, j, h * dh + p))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = (0..t)
                        .filter(|&j| valid(j))
                        .map(|j| s[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = (0..t)
                        .map(|j| if valid(j) { (s[j] - max).exp() } else { 0.0 })
                        .collect();
                    let sum: f64 = e.iter().sum();
                    if sum == 0.0 {
                        continue;
                    }
                    for c in 0..dh {
                        out[(bi * t + i) * d + h * dh + c] =
                            (0..t).map(|j| e[j] * at(v, bi, j, h * dh + c)).sum::<f64>() / sum;
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, random_vec, Tol};

    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        tq: Tensor,
        tk: Tensor,
        tv: Tensor,
    }

    fn case(seed: u64, b: usize, t: usize, d: usize) -> Case {
        let gpu = test_gpu();
        let n = b * t * d;
        // Scale 2 so that softmax rows are far from uniform.
        let (q, k, v) = (
            random_vec(seed, n, 2.0),
            random_vec(seed + 1, n, 2.0),
            random_vec(seed + 2, n, 1.0),
        );
        let up = |x: &[f32]| Tensor::from_slice(gpu, x, &[b, t, d]).unwrap();
        Case {
            tq: up(&q),
            tk: up(&k),
            tv: up(&v),
            q,
            k,
            v,
        }
    }

    #[test]
    fn matches_naive_reference() {
        // dh = 4 and 8 take the vec4 matmul paths, dh = 5 the general one.
        for b in [1, 2] {
            for (d, heads) in [(12, 3), (40, 5), (15, 3)] {
                for t in [1, 7, 37, 130] {
                    let c = case(100 + (b * 1000 + d * 10 + t) as u64, b, t, d);
                    let y = self_attention(&c.tq, &c.tk, &c.tv, heads, None).unwrap();
                    assert_eq!(y.shape(), &[b, t, d]);
                    let want = reference::self_attention(&c.q, &c.k, &c.v, b, t, d, heads, None);
                    assert_close(
                        &format!("attention B={b} T={t} D={d} heads={heads}"),
                        &y.to_vec().unwrap(),
                        &want,
                        Tol::KERNEL,
                    );
                }
            }
        }
    }

    #[test]
    fn padded_keys_are_ignored() {
        let gpu = test_gpu();
        let (b, t, d, heads) = (3, 37, 40, 5);
        let c = case(200, b, t, d);
        // Item 0 unpadded, item 1 has 20 valid frames, item 2 only one.
        let mut mask = vec![1u32; b * t];
        mask[t + 20..2 * t].fill(0);
        mask[2 * t + 1..].fill(0);
        let m = Tensor::from_u32(gpu, &mask, &[b, t]).unwrap();
        let y = self_attention(&c.tq, &c.tk, &c.tv, heads, Some(&m))
            .unwrap()
            .to_vec()
            .unwrap();
        let want = reference::self_attention(&c.q, &c.k, &c.v, b, t, d, heads, Some(&mask));
        assert_close("attention with key mask", &y, &want, Tol::KERNEL);
        // Item 2 attends only to key 0, so every query's output is V[2, 0].
        for i in 0..t {
            for ch in 0..d {
                let got = y[(2 * t + i) * d + ch];
                let v0 = c.v[2 * t * d + ch];
                assert!(
                    (got - v0).abs() <= 1e-6 * v0.abs().max(1.0),
                    "query {i} ch {ch}: {got} vs {v0}"
                );
            }
        }
    }

    #[test]
    fn chunked_scores_give_identical_results() {
        let gpu = test_gpu();
        for (d, heads) in [(40, 5), (15, 3)] {
            let (b, t) = (2, 37);
            let c = case(300 + d as u64, b, t, d);
            let mut mask = vec![1u32; b * t];
            mask[t + 30..].fill(0);
            let m = Tensor::from_u32(gpu, &mask, &[b, t]).unwrap();
            let full = self_attention(&c.tq, &c.tk, &c.tv, heads, Some(&m))
                .unwrap()
                .to_vec()
                .unwrap();
            let row = (t * 4) as u64;
            // 2 heads per group (last group smaller); then 5 query rows of 1 head; then a single row.
            for budget in [2 * t as u64 * row + 7, 5 * row, row] {
                let got = self_attention_chunked(&c.tq, &c.tk, &c.tv, heads, Some(&m), budget)
                    .unwrap()
                    .to_vec()
                    .unwrap();
                assert!(got == full, "D={d}: budget {budget} bytes changed the result");
            }
        }
    }

    #[test]
    fn chunk_plan() {
        // T = 3000, 12 heads, 128 MiB: 3 heads of 36 MB each fit.
        let c = plan_chunks(12, 3000, 128 << 20).unwrap();
        assert_eq!(c, Chunks { heads: 3, rows: 3000 });
        assert_eq!(plan_chunks(12, 10, 1 << 20).unwrap(), Chunks { heads: 12, rows: 10 });
        assert_eq!(plan_chunks(12, 100, 400 * 7).unwrap(), Chunks { heads: 1, rows: 7 });
        assert!(plan_chunks(12, 100, 399).is_err());
    }

    #[test]
    fn bad_inputs_give_clear_errors() {
        let c = case(400, 1, 5, 12);
        let err = self_attention(&c.tq, &c.tk, &c.tv, 5, None).unwrap_err().to_string();
        assert!(err.contains("do not divide"), "{err}");
        let m = Tensor::from_u32(test_gpu(), &[1; 4], &[1, 4]).unwrap();
        let err = self_attention(&c.tq, &c.tk, &c.tv, 3, Some(&m))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key_mask"), "{err}");
        let k2 = Tensor::zeros(test_gpu(), &[1, 6, 12]).unwrap();
        let err = self_attention(&c.tq, &k2, &c.tv, 3, None).unwrap_err().to_string();
        assert!(err.contains("same shape"), "{err}");
    }

    /// Wall time of one wav2vec2-base attention (T = 149, D = 768, 12 heads); prints, never asserts.
    #[test]
    #[ignore]
    fn bench_attention_149x768() {
        let gpu = test_gpu();
        let (b, t, d, heads) = (1, 149, 768, 12);
        let c = case(500, b, t, d);
        self_attention(&c.tq, &c.tk, &c.tv, heads, None)
            .unwrap()
            .to_vec()
            .unwrap();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            let _y = self_attention(&c.tq, &c.tk, &c.tv, heads, None).unwrap();
            gpu.sync().unwrap();
            best = best.min(start.elapsed().as_secs_f64());
        }
        let flop = 4.0 * (b * heads * t * t * (d / heads)) as f64;
        eprintln!(
            "attention B={b} T={t} D={d} heads={heads}: {:.1} ms ({:.2} GFLOP/s in its matmuls)",
            best * 1e3,
            flop / best / 1e9
        );
    }
}
