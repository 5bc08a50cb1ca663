//! Batched strided matmul (`shaders/matmul.wgsl`) with a fused epilogue (scale, bias, exact GELU), and the
//! linear layers built on it.
//!
//! The general launcher [`matmul_into`] reads A, B and writes C through [`View`]s (offset and three strides
//! in elements), so attention reads per-head slices of `[T, D]` Q/K/V buffers and writes the per-head output
//! straight into its columns, with no permute copies (K^T is just a stride choice).
//! The kernel is picked by layout: A and B contiguous along k (linear layers, Q K^T) take a vec4 path, B
//! contiguous along n (P V) another, everything else a scalar strided path. All compute the same sums.

use anyhow::{bail, Result};

use crate::gpu::{DType, Shader, Tensor};

static SHADER: Shader = crate::shader!("matmul");
/// Rows (and columns) of C per workgroup, as `TILE` in the shader.
const TILE: usize = 32;
const FLAG_BIAS: u32 = 1;
const FLAG_GELU: u32 = 2;

/// Where a batch of matrices lies in a flat buffer, in elements:
/// `X[b, i, j] = buf[offset + b * batch_stride + i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub offset: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// Contiguous row-major `[batch, rows, cols]`.
    pub fn row_major(rows: usize, cols: usize) -> View {
        View {
            offset: 0,
            batch_stride: rows * cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a contiguous row-major `[batch, cols, rows]`, seen as `[batch, rows, cols]`.
    pub fn transposed(rows: usize, cols: usize) -> View {
        View {
            offset: 0,
            batch_stride: rows * cols,
            row_stride: 1,
            col_stride: rows,
        }
    }

    pub fn at(self, offset: usize) -> View {
        View { offset, ..self }
    }

    /// The largest element index the view touches over `[batch, rows, cols]` (all non-zero).
    fn last_index(&self, batch: usize, rows: usize, cols: usize) -> u128 {
        self.offset as u128
            + (batch as u128 - 1) * self.batch_stride as u128
            + (rows as u128 - 1) * self.row_stride as u128
            + (cols as u128 - 1) * self.col_stride as u128
    }

    /// Strides of size-1 dimensions never matter; zeroing them keeps every shader parameter in u32 range
    /// and lets the alignment checks ignore them.
    fn normalized(self, batch: usize, rows: usize, cols: usize) -> View {
        View {
            offset: self.offset,
            batch_stride: if batch > 1 { self.batch_stride } else { 0 },
            row_stride: if rows > 1 { self.row_stride } else { 0 },
            col_stride: if cols > 1 { self.col_stride } else { 0 },
        }
    }
}

/// C[batch, m, n] = A[batch, m, k] · B[batch, k, n].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// What the epilogue applies after `alpha * A·B + bias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None,
    /// Exact erf GELU (torch.nn.GELU's default).
    Gelu,
}

/// Which kernel runs a matmul (chosen by layout; see [`choose_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Any strides, scalar loads.
    General,
    /// A and B contiguous along k, vec4 loads along k.
    Nt4,
    /// B contiguous along n, vec4 loads of B rows.
    Nn4,
}

impl Kernel {
    fn entry(self) -> &'static str {
        match self {
            Kernel::General => "matmul_forward",
            Kernel::Nt4 => "matmul_nt4_forward",
            Kernel::Nn4 => "matmul_nn4_forward",
        }
    }
}

fn aligned(v: &View) -> bool {
    v.offset % 4 == 0 && v.batch_stride % 4 == 0
}

/// The fastest kernel whose alignment needs the (normalized) views meet.
pub fn choose_kernel(a: View, b: View, dims: MatDims) -> Kernel {
    if dims.k == 0 {
        return Kernel::General; // C = bias only; nothing to load
    }
    let a = a.normalized(dims.batch, dims.m, dims.k);
    let b = b.normalized(dims.batch, dims.k, dims.n);
    // After normalization a unit stride means the dimension is longer than 1, so "contiguous" is exact.
    let a_k_contig = a.col_stride == 1 || dims.k == 1;
    if dims.k % 4 == 0
        && a_k_contig
        && aligned(&a)
        && a.row_stride % 4 == 0
        && b.row_stride == 1
        && aligned(&b)
        && b.col_stride % 4 == 0
    {
        return Kernel::Nt4;
    }
    if dims.n % 4 == 0 && b.col_stride == 1 && aligned(&b) && b.row_stride % 4 == 0 {
        return Kernel::Nn4;
    }
    Kernel::General
}

/// True when no two (batch, row, col) positions of the view share an element: sorted by stride, every
/// stride must step past everything the smaller ones span. (Sufficient, and holds for every real layout.)
fn non_overlapping(v: &View, batch: usize, rows: usize, cols: usize) -> bool {
    let mut dims: Vec<(u128, u128)> = [(batch, v.batch_stride), (rows, v.row_stride), (cols, v.col_stride)]
        .into_iter()
        .filter(|(size, _)| *size > 1)
        .map(|(size, stride)| (size as u128, stride as u128))
        .collect();
    dims.sort_by_key(|d| d.1);
    let mut span = 0u128; // largest offset the smaller dimensions reach
    for (size, stride) in dims {
        if stride <= span {
            return false;
        }
        span += (size - 1) * stride;
    }
    true
}

fn check_view(what: &str, t: &Tensor, v: &View, batch: usize, rows: usize, cols: usize) -> Result<()> {
    if t.dtype() != DType::F32 {
        bail!("matmul: {what} must be f32, got {:?}", t.dtype());
    }
    let last = v.last_index(batch, rows, cols);
    if last >= t.numel() as u128 {
        bail!(
            "matmul: {what} view {v:?} over [batch, rows, cols] = [{batch}, {rows}, {cols}] reaches element \
             {last}, but the {what} tensor {:?} has {} elements",
            t.shape(),
            t.numel()
        );
    }
    if last > u32::MAX as u128 {
        bail!("matmul: {what} view reaches element {last}, beyond 32-bit indexing");
    }
    Ok(())
}

/// `C = alpha * A·B + bias[j]` over views of `out`, `a` and `b` (see [`View`]); `bias` has `n` elements.
/// `out` must not share a buffer with the inputs, and its view must not overlap itself.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into(
    out: &Tensor,
    out_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    bias: Option<&Tensor>,
    alpha: f32,
) -> Result<()> {
    matmul_into_with(out, out_view, a, a_view, b, b_view, dims, bias, alpha, Activation::None)
}

/// [`matmul_into`] with an activation fused on the output: `C = act(alpha * A·B + bias[j])`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into_with(
    out: &Tensor,
    out_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    bias: Option<&Tensor>,
    alpha: f32,
    act: Activation,
) -> Result<()> {
    let kernel = choose_kernel(a_view, b_view, dims);
    matmul_with_kernel(kernel, out, out_view, a, a_view, b, b_view, dims, bias, alpha, act)
}

/// The launcher behind [`matmul_into_with`], with the kernel given (tests force the general path with it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_with_kernel(
    kernel: Kernel,
    out: &Tensor,
    out_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    bias: Option<&Tensor>,
    alpha: f32,
    act: Activation,
) -> Result<()> {
    let MatDims { batch, m, n, k } = dims;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    check_view("output", out, &out_view, batch, m, n)?;
    if !non_overlapping(&out_view, batch, m, n) {
        bail!("matmul: output view {out_view:?} over [{batch}, {m}, {n}] writes some elements twice");
    }
    if k > 0 {
        check_view("A", a, &a_view, batch, m, k)?;
        check_view("B", b, &b_view, batch, k, n)?;
    }
    if out.buffer() == a.buffer() || out.buffer() == b.buffer() {
        bail!("matmul: the output must not share a buffer with A or B");
    }
    if let Some(bias) = bias {
        if bias.dtype() != DType::F32 || bias.numel() != n {
            bail!(
                "matmul: bias must be f32 with n = {n} elements, got {:?} {:?}",
                bias.dtype(),
                bias.shape()
            );
        }
        if bias.buffer() == out.buffer() {
            bail!("matmul: the output must not share a buffer with the bias");
        }
    }
    if k == 0 && kernel != Kernel::General {
        bail!("matmul: the {kernel:?} kernel needs k > 0");
    }
    let (av, bv, cv) = (
        a_view.normalized(batch, m, k.max(1)),
        b_view.normalized(batch, k.max(1), n),
        out_view.normalized(batch, m, n),
    );
    let tiles_m = m.div_ceil(TILE);
    let tiles_n = n.div_ceil(TILE);
    let groups = batch as u128 * tiles_m as u128 * tiles_n as u128;
    if groups > u32::MAX as u128 {
        bail!("matmul: {groups} workgroups for {dims:?} is too many for one dispatch");
    }
    let flags = if bias.is_some() { FLAG_BIAS } else { 0 } | if act == Activation::Gelu { FLAG_GELU } else { 0 };
    let u = |x: usize| x as u32; // every value was checked to fit above
    let params = [
        u(batch),
        u(m),
        u(n),
        u(k),
        u(av.offset),
        u(av.batch_stride),
        u(av.row_stride),
        u(av.col_stride),
        u(bv.offset),
        u(bv.batch_stride),
        u(bv.row_stride),
        u(bv.col_stride),
        u(cv.offset),
        u(cv.batch_stride),
        u(cv.row_stride),
        u(cv.col_stride),
        u(tiles_m),
        u(tiles_n),
        alpha.to_bits(),
        flags,
    ];
    // Without a bias the shader never reads binding 3; A's buffer stands in (read-only twice is allowed).
    let bias_buf = bias.map_or(a.buffer(), |t| t.buffer());
    out.gpu().dispatch(
        &SHADER,
        kernel.entry(),
        &[a.buffer(), b.buffer(), bias_buf, out.buffer()],
        &params,
        groups as u32,
    )
}

fn linear_impl(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    let (Some(&d_in), [d_out, w_in]) = (x.shape().last(), w.shape()) else {
        bail!(
            "linear: x must be [.., in] and w [out, in], got {:?} and {:?}",
            x.shape(),
            w.shape()
        );
    };
    let (d_out, w_in) = (*d_out, *w_in);
    if w_in != d_in {
        bail!(
            "linear: x {:?} has {d_in} features but w {:?} expects {w_in}",
            x.shape(),
            w.shape()
        );
    }
    if let Some(b) = bias {
        if b.shape() != [d_out] {
            bail!("linear: bias must be [{d_out}], got {:?}", b.shape());
        }
    }
    let rows: usize = x.shape()[..x.shape().len() - 1].iter().product();
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("x has a last dimension") = d_out;
    let y = Tensor::empty(x.gpu(), &shape, DType::F32)?;
    // y = x W^T: B[p, j] = w[j, p], contiguous along k.
    matmul_into_with(
        &y,
        View::row_major(rows, d_out),
        x,
        View::row_major(rows, d_in),
        w,
        View::transposed(d_in, d_out),
        MatDims {
            batch: 1,
            m: rows,
            n: d_out,
            k: d_in,
        },
        bias,
        1.0,
        act,
    )?;
    Ok(y)
}

/// A torch `nn.Linear`: `y = x W^T + b` with `x` `[.., in]`, `w` `[out, in]`, `b` `[out]`; y is `[.., out]`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, bias, Activation::None)
}

/// `gelu(x W^T + b)` with exact erf GELU fused on the output (the FFN's intermediate layer).
pub fn linear_gelu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, bias, Activation::Gelu)
}

/// `a [B, M, K] · b [B, K, N] -> [B, M, N]`; 2-D inputs are one batch (`[M, K] · [K, N] -> [M, N]`).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (batch, m, k, kb, n, two_d) = match (a.shape(), b.shape()) {
        ([ba, m, k], [bb, kb, n]) if ba == bb => (*ba, *m, *k, *kb, *n, false),
        ([m, k], [kb, n]) => (1, *m, *k, *kb, *n, true),
        _ => bail!(
            "matmul: want [B, M, K] and [B, K, N] (or [M, K] and [K, N]), got {:?} and {:?}",
            a.shape(),
            b.shape()
        ),
    };
    if k != kb {
        bail!("matmul: inner dimensions differ: {:?} · {:?}", a.shape(), b.shape());
    }
    let shape: Vec<usize> = if two_d { vec![m, n] } else { vec![batch, m, n] };
    let c = Tensor::empty(a.gpu(), &shape, DType::F32)?;
    matmul_into(
        &c,
        View::row_major(m, n),
        a,
        View::row_major(m, k),
        b,
        View::row_major(k, n),
        MatDims { batch, m, n, k },
        None,
        1.0,
    )?;
    Ok(c)
}

/// CPU references, f64 accumulation.
pub mod reference {
    use super::{Activation, MatDims, View};

    fn at(buf: &[f32], v: &View, b: usize, i: usize, j: usize) -> f64 {
        buf[v.offset + b * v.batch_stride + i * v.row_stride + j * v.col_stride] as f64
    }

    /// `act(alpha * A·B + bias)` over views, returned dense as `[batch, m, n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_strided(
        a: &[f32],
        av: View,
        b: &[f32],
        bv: View,
        dims: MatDims,
        bias: Option<&[f32]>,
        alpha: f32,
        act: Activation,
    ) -> Vec<f64> {
        let MatDims { batch, m, n, k } = dims;
        let mut out = Vec::with_capacity(batch * m * n);
        for bt in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let s: f64 = (0..k).map(|p| at(a, &av, bt, i, p) * at(b, &bv, bt, p, j)).sum();
                    let v = alpha as f64 * s + bias.map_or(0.0, |bb| bb[j] as f64);
                    out.push(match act {
                        Activation::None => v,
                        Activation::Gelu => crate::ops::elementwise::reference::gelu_f64(v),
                    });
                }
            }
        }
        out
    }

    /// `x [rows, in] · w[out, in]^T + b`, dense `[rows, out]`.
    pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, d_in: usize, d_out: usize) -> Vec<f64> {
        let rows = x.len() / d_in;
        matmul_strided(
            x,
            View::row_major(rows, d_in),
            w,
            View::transposed(d_in, d_out),
            MatDims {
                batch: 1,
                m: rows,
                n: d_out,
                k: d_in,
            },
            bias,
            1.0,
            Activation::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, random_vec, Tol};

    fn upload(data: &[f32]) -> Tensor {
        Tensor::from_slice(test_gpu(), data, &[data.len()]).unwrap()
    }

    /// Runs one strided matmul with `kernel` (or the chosen one) against the reference and checks that
    /// output elements outside the view are untouched.
    #[allow(clippy::too_many_arguments)]
    fn check_strided(
        name: &str,
        seed: u64,
        dims: MatDims,
        av: View,
        bv: View,
        cv: View,
        with_bias: bool,
        alpha: f32,
        act: Activation,
        kernel: Option<Kernel>,
        tol: Tol,
    ) -> Vec<f32> {
        let MatDims { batch, m, n, k } = dims;
        let a_len = (av.last_index(batch, m, k) + 1) as usize + 3;
        let b_len = (bv.last_index(batch, k, n) + 1) as usize + 5;
        let c_len = (cv.last_index(batch, m, n) + 1) as usize + 2;
        let a = random_vec(seed, a_len, 1.0);
        let b = random_vec(seed + 1, b_len, 1.0);
        let bias = random_vec(seed + 2, n, 1.0);
        let (ta, tb, tbias) = (upload(&a), upload(&b), upload(&bias));
        let sentinel = -777.0f32;
        let tc = Tensor::empty(test_gpu(), &[c_len], DType::F32).unwrap();
        tc.fill(sentinel).unwrap();
        let kernel = kernel.unwrap_or_else(|| choose_kernel(av, bv, dims));
        matmul_with_kernel(
            kernel,
            &tc,
            cv,
            &ta,
            av,
            &tb,
            bv,
            dims,
            with_bias.then_some(&tbias),
            alpha,
            act,
        )
        .unwrap();
        let c = tc.to_vec().unwrap();
        let want = reference::matmul_strided(&a, av, &b, bv, dims, with_bias.then_some(&bias[..]), alpha, act);
        let mut got = Vec::with_capacity(want.len());
        let mut inside = vec![false; c_len];
        for bt in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let idx = cv.offset + bt * cv.batch_stride + i * cv.row_stride + j * cv.col_stride;
                    inside[idx] = true;
                    got.push(c[idx]);
                }
            }
        }
        assert_close(&format!("{name} [{kernel:?}] {dims:?}"), &got, &want, tol);
        for (idx, v) in c.iter().enumerate() {
            if !inside[idx] {
                assert_eq!(
                    *v, sentinel,
                    "{name}: element {idx} outside the output view was written"
                );
            }
        }
        got
    }

    #[test]
    fn hand_checked_2x3_times_3x2() {
        let gpu = test_gpu();
        let a = Tensor::from_slice(gpu, &[1., 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
        let b = Tensor::from_slice(gpu, &[7., 8., 9., 10., 11., 12.], &[3, 2]).unwrap();
        // [1 2 3; 4 5 6] · [7 8; 9 10; 11 12] = [58 64; 139 154]
        assert_eq!(matmul(&a, &b).unwrap().to_vec().unwrap(), vec![58., 64., 139., 154.]);
        // linear with w = b^T = [7 9 11; 8 10 12] and bias [1, -1].
        let w = Tensor::from_slice(gpu, &[7., 9., 11., 8., 10., 12.], &[2, 3]).unwrap();
        let bias = Tensor::from_slice(gpu, &[1., -1.], &[2]).unwrap();
        let y = linear(&a, &w, Some(&bias)).unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.to_vec().unwrap(), vec![59., 63., 140., 153.]);
        // k = 0: an empty sum, so C = bias.
        let empty = Tensor::zeros(gpu, &[1]).unwrap();
        let c = Tensor::zeros(gpu, &[2, 2]).unwrap();
        let dims = MatDims {
            batch: 1,
            m: 2,
            n: 2,
            k: 0,
        };
        let (av, bv) = (View::row_major(2, 0), View::row_major(0, 2));
        matmul_into(
            &c,
            View::row_major(2, 2),
            &empty,
            av,
            &empty,
            bv,
            dims,
            Some(&bias),
            1.0,
        )
        .unwrap();
        assert_eq!(c.to_vec().unwrap(), vec![1., -1., 1., -1.]);
    }

    #[test]
    fn general_path_edge_sizes_and_odd_strides() {
        // Sizes that are not multiples of the 4x4 block or the 32x32 tile, every layout transposed or padded.
        let sizes = [(1, 1, 1), (3, 49, 67), (67, 3, 130), (49, 130, 3), (130, 67, 49)];
        for (s, &(m, n, k)) in sizes.iter().enumerate() {
            let batch = 2;
            let dims = MatDims { batch, m, n, k };
            // A transposed ([k, m] storage) with a padded batch stride and an offset.
            let av = View {
                offset: 5,
                batch_stride: m * k + 7,
                row_stride: 1,
                col_stride: m,
            };
            // B row-major with padded rows.
            let bv = View {
                offset: 3,
                batch_stride: k * (n + 2) + 1,
                row_stride: n + 2,
                col_stride: 1,
            };
            // C written transposed into a wider buffer.
            let cv = View {
                offset: 2,
                batch_stride: 1,
                row_stride: batch,
                col_stride: batch * m + 1,
            };
            check_strided(
                "general",
                10 + s as u64,
                dims,
                av,
                bv,
                cv,
                s % 2 == 0,
                0.75,
                Activation::None,
                None,
                Tol::KERNEL,
            );
        }
    }

    #[test]
    fn fast_paths_match_reference_and_general_path() {
        for (s, &(m, n, k)) in [(1, 4, 4), (49, 130, 68), (67, 36, 132), (3, 4, 8)].iter().enumerate() {
            let batch = 3;
            let dims = MatDims { batch, m, n, k };
            // nt4: A row-major with padded rows, B = weight [n, k] (B transposed), offsets multiple of 4.
            let av = View::row_major(m, k + 4).at(8);
            let av = View {
                batch_stride: m * (k + 4) + 4,
                ..av
            };
            let bv = View {
                offset: 4,
                batch_stride: n * k,
                row_stride: 1,
                col_stride: k,
            };
            assert_eq!(choose_kernel(av, bv, dims), Kernel::Nt4);
            let cv = View::row_major(m, n);
            // Same k order and fused multiply-adds in every kernel: bit-identical results.
            let [fast, general] = [None, Some(Kernel::General)].map(|kernel| {
                check_strided(
                    "nt4",
                    30 + s as u64,
                    dims,
                    av,
                    bv,
                    cv,
                    true,
                    1.0,
                    Activation::None,
                    kernel,
                    Tol::KERNEL,
                )
            });
            assert!(fast == general, "nt4 and general paths differ");
            // nn4: B row-major [k, n] with n % 4 == 0, A transposed (scalar loads).
            let n = n.div_ceil(4) * 4;
            let dims = MatDims { batch, m, n, k };
            let cv = View::row_major(m, n);
            let av = View::transposed(m, k);
            let bv = View::row_major(k, n + 4).at(4);
            assert_eq!(choose_kernel(av, bv, dims), Kernel::Nn4);
            let [fast, general] = [None, Some(Kernel::General)].map(|kernel| {
                check_strided(
                    "nn4",
                    40 + s as u64,
                    dims,
                    av,
                    bv,
                    cv,
                    false,
                    0.5,
                    Activation::None,
                    kernel,
                    Tol::KERNEL,
                )
            });
            assert!(fast == general, "nn4 and general paths differ");
        }
    }

    #[test]
    fn misaligned_views_fall_back_to_general() {
        let dims = MatDims {
            batch: 1,
            m: 5,
            n: 8,
            k: 8,
        };
        let nt = View {
            offset: 0,
            batch_stride: 0,
            row_stride: 1,
            col_stride: 8,
        };
        assert_eq!(choose_kernel(View::row_major(5, 8), nt, dims), Kernel::Nt4);
        // A misaligned by one element; B not contiguous along n either.
        assert_eq!(choose_kernel(View::row_major(5, 8).at(1), nt, dims), Kernel::General);
        let k6 = MatDims { k: 6, ..dims };
        assert_eq!(
            choose_kernel(View::row_major(5, 6), View::row_major(6, 8).at(2), k6),
            Kernel::General
        );
        check_strided(
            "misaligned",
            50,
            k6,
            View::row_major(5, 6).at(1),
            View::row_major(6, 8).at(2),
            View::row_major(5, 8),
            true,
            1.0,
            Activation::None,
            None,
            Tol::KERNEL,
        );
    }

    #[test]
    fn linear_matches_reference_at_model_like_sizes() {
        let gpu = test_gpu();
        // [T x 768] -> 768 with T = 49, and a K that is not a multiple of 4 (general path).
        for (seed, t, d_in, d_out) in [(60u64, 49usize, 768usize, 768usize), (61, 13, 67, 130)] {
            let x = random_vec(seed, t * d_in, 1.0);
            let w = random_vec(seed + 1, d_out * d_in, 0.05);
            let b = random_vec(seed + 2, d_out, 0.1);
            let y = linear(
                &Tensor::from_slice(gpu, &x, &[1, t, d_in]).unwrap(),
                &Tensor::from_slice(gpu, &w, &[d_out, d_in]).unwrap(),
                Some(&Tensor::from_slice(gpu, &b, &[d_out]).unwrap()),
            )
            .unwrap();
            assert_eq!(y.shape(), &[1, t, d_out]);
            assert_close(
                &format!("linear [{t}x{d_in}] -> {d_out}"),
                &y.to_vec().unwrap(),
                &reference::linear(&x, &w, Some(&b), d_in, d_out),
                Tol::KERNEL,
            );
        }
    }

    #[test]
    fn linear_gelu_fuses_exact_gelu() {
        let gpu = test_gpu();
        let (t, d_in, d_out) = (37, 96, 130);
        let x = random_vec(70, t * d_in, 1.0);
        let w = random_vec(71, d_out * d_in, 0.3);
        let b = random_vec(72, d_out, 0.5);
        let y = linear_gelu(
            &Tensor::from_slice(gpu, &x, &[t, d_in]).unwrap(),
            &Tensor::from_slice(gpu, &w, &[d_out, d_in]).unwrap(),
            Some(&Tensor::from_slice(gpu, &b, &[d_out]).unwrap()),
        )
        .unwrap();
        let want: Vec<f64> = reference::linear(&x, &w, Some(&b), d_in, d_out)
            .into_iter()
            .map(crate::ops::elementwise::reference::gelu_f64)
            .collect();
        assert_close("linear_gelu", &y.to_vec().unwrap(), &want, Tol::KERNEL);
    }

    #[test]
    fn batched_matmul_convenience() {
        let gpu = test_gpu();
        let (bt, m, k, n) = (2, 7, 5, 3);
        let a = random_vec(80, bt * m * k, 1.0);
        let b = random_vec(81, bt * k * n, 1.0);
        let c = matmul(
            &Tensor::from_slice(gpu, &a, &[bt, m, k]).unwrap(),
            &Tensor::from_slice(gpu, &b, &[bt, k, n]).unwrap(),
        )
        .unwrap();
        assert_eq!(c.shape(), &[bt, m, n]);
        let want = reference::matmul_strided(
            &a,
            View::row_major(m, k),
            &b,
            View::row_major(k, n),
            MatDims { batch: bt, m, n, k },
            None,
            1.0,
            Activation::None,
        );
        assert_close("matmul [2,7,5]x[2,5,3]", &c.to_vec().unwrap(), &want, Tol::KERNEL);
    }

    #[test]
    fn bad_inputs_give_clear_errors() {
        let gpu = test_gpu();
        let a = Tensor::zeros(gpu, &[4, 3]).unwrap();
        let b = Tensor::zeros(gpu, &[5, 2]).unwrap();
        let err = matmul(&a, &b).unwrap_err().to_string();
        assert!(err.contains("inner dimensions"), "{err}");
        let err = linear(&a, &b, None).unwrap_err().to_string();
        assert!(err.contains("expects"), "{err}");
        let out = Tensor::zeros(gpu, &[8]).unwrap();
        let dims = MatDims {
            batch: 1,
            m: 4,
            n: 2,
            k: 3,
        };
        // A view runs past the end of its tensor.
        let err = matmul_into(
            &out,
            View::row_major(4, 2),
            &a,
            View::row_major(4, 3).at(1),
            &b,
            View::row_major(3, 2),
            dims,
            None,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("A view") && err.contains("reaches element 12"), "{err}");
        // Output view writing one element twice.
        let err = matmul_into(
            &out,
            View {
                offset: 0,
                batch_stride: 0,
                row_stride: 1,
                col_stride: 1,
            },
            &a,
            View::row_major(4, 3),
            &b,
            View::row_major(3, 2),
            dims,
            None,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("twice"), "{err}");
        // Output aliasing an input.
        let err = matmul_into(
            &a,
            View::row_major(4, 2),
            &a,
            View::row_major(4, 3),
            &b,
            View::row_major(3, 2),
            dims,
            None,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("share a buffer"), "{err}");
    }

    /// CPU time of every thread of this process (lavapipe's workers included), from /proc.
    fn cpu_secs() -> f64 {
        let mut ns = 0u64;
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for e in dir.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                    ns += s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
                }
            }
        }
        ns as f64 * 1e-9
    }

    /// Throughput of the FFN's first linear at T = 149, per kernel (prints, never asserts; run with
    /// --ignored). Best of several rounds; CPU time (all threads, lavapipe's included) is printed too since
    /// wall time on a shared machine says little.
    #[test]
    #[ignore]
    fn bench_linear_149x768x3072() {
        let gpu = test_gpu();
        let (t, d_in, d_out) = (149, 768, 3072);
        let x = Tensor::from_slice(gpu, &random_vec(90, t * d_in, 1.0), &[t, d_in]).unwrap();
        let w = Tensor::from_slice(gpu, &random_vec(91, d_out * d_in, 0.05), &[d_out, d_in]).unwrap();
        let b = Tensor::from_slice(gpu, &random_vec(92, d_out, 0.1), &[d_out]).unwrap();
        let flop = 2.0 * (t * d_in * d_out) as f64;
        // (name, kernel, act): the weight as stored ([out, in], nt4), the same product through the general
        // path, and with fused GELU. (nn4 would need the weight transposed to [in, out].)
        let cases = [
            ("linear nt4", Kernel::Nt4, Activation::None),
            ("linear general", Kernel::General, Activation::None),
            ("linear_gelu nt4", Kernel::Nt4, Activation::Gelu),
        ];
        let run = |kernel: Kernel, act: Activation| {
            let y = Tensor::empty(gpu, &[t, d_out], DType::F32).unwrap();
            matmul_with_kernel(
                kernel,
                &y,
                View::row_major(t, d_out),
                &x,
                View::row_major(t, d_in),
                &w,
                View::transposed(d_in, d_out),
                MatDims {
                    batch: 1,
                    m: t,
                    n: d_out,
                    k: d_in,
                },
                Some(&b),
                1.0,
                act,
            )
            .unwrap();
            y
        };
        for &(_, kernel, act) in &cases {
            run(kernel, act).to_vec().unwrap(); // compiles the pipeline
        }
        let mut best = vec![(f64::MAX, f64::MAX); cases.len()];
        for _round in 0..5 {
            for (ci, &(_, kernel, act)) in cases.iter().enumerate() {
                let c0 = cpu_secs();
                let start = std::time::Instant::now();
                let _y = run(kernel, act);
                gpu.sync().unwrap();
                best[ci].0 = best[ci].0.min(start.elapsed().as_secs_f64());
                best[ci].1 = best[ci].1.min(cpu_secs() - c0);
            }
        }
        for (ci, (name, _, _)) in cases.iter().enumerate() {
            let (wall, cpu) = best[ci];
            eprintln!(
                "{name} [{t}x{d_in}] x [{d_in}->{d_out}]: {:.1} ms = {:.2} GFLOP/s wall; \
                 {:.1} ms CPU = {:.2} GFLOP per CPU-second",
                wall * 1e3,
                flop / wall / 1e9,
                cpu * 1e3,
                flop / cpu / 1e9
            );
        }
    }
}
