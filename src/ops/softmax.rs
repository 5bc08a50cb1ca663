//! Row softmax (`shaders/softmax.wgsl`): numerically stable (max-subtracted), one workgroup per row, with an
//! optional key mask.
//!
//! The kernel works in place ([`softmax_rows_inplace`], what attention uses on its score buffer);
//! [`softmax_rows`] is the out-of-place convenience (a copy, then the in-place kernel).
//!
//! Backward: [`softmax_rows_backward`] gives `dx = y * (dy - sum(dy * y))` per row from the forward's output
//! `y` (no mask needed: masked keys have `y = 0`, so they get 0).
//!
//! Mask: `(mask, rows_per_batch)` with `mask` a `[B, n]` u32 tensor (1 = valid key, 0 = padded); row `r`
//! belongs to batch item `r / rows_per_batch`. Masked keys get probability exactly 0, as torch's additive
//! -inf mask gives. A row whose keys are all masked becomes all zeros (torch would give NaN; the models here
//! never produce such rows).

use anyhow::{bail, Result};

use crate::gpu::{DType, Shader, Tensor};

static SHADER: Shader = crate::shader!("softmax");

/// A key mask for a block of rows: row `r` reads `mask[offset + (r / rows_per_batch) * n ..][..n]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskRef<'a> {
    pub mask: &'a Tensor,
    pub offset: usize,
    pub rows_per_batch: usize,
}

/// Softmax over the last dimension of `x` (any shape `[.., n]`), written into a new tensor.
pub fn softmax_rows(x: &Tensor, mask: Option<(&Tensor, usize)>) -> Result<Tensor> {
    let y = Tensor::empty(x.gpu(), x.shape(), x.dtype())?;
    y.copy_from(0, x, 0, x.numel())?;
    softmax_rows_inplace(&y, mask)?;
    Ok(y)
}

/// Softmax over the last dimension of `x` (any shape `[.., n]`), overwriting `x`.
pub fn softmax_rows_inplace(x: &Tensor, mask: Option<(&Tensor, usize)>) -> Result<()> {
    let Some(&n) = x.shape().last() else {
        bail!("softmax: x must have at least one dimension");
    };
    let rows = x.numel().checked_div(n).unwrap_or(0);
    let mask = match mask {
        None => None,
        Some((m, rows_per_batch)) => {
            if rows_per_batch == 0 {
                bail!("softmax: rows_per_batch must be positive");
            }
            let batches = rows.div_ceil(rows_per_batch);
            if m.shape() != [batches, n] || rows % rows_per_batch != 0 {
                bail!(
                    "softmax: mask {:?} must be [B, n] = [{batches}, {n}] for {rows} rows of {n} with \
                     {rows_per_batch} rows per batch item",
                    m.shape()
                );
            }
            Some(MaskRef {
                mask: m,
                offset: 0,
                rows_per_batch,
            })
        }
    };
    softmax_rows_at(x, 0, rows, n, mask)
}

/// The launcher: softmax of `rows` rows of `n` in `x` from element `start` (x may be larger), in place.
pub(crate) fn softmax_rows_at(x: &Tensor, start: usize, rows: usize, n: usize, mask: Option<MaskRef>) -> Result<()> {
    if x.dtype() != DType::F32 {
        bail!("softmax: x must be f32, got {:?}", x.dtype());
    }
    if rows == 0 || n == 0 {
        return Ok(());
    }
    if start as u128 + rows as u128 * n as u128 > x.numel() as u128 {
        bail!(
            "softmax: {rows} rows of {n} from element {start} do not fit in x {:?}",
            x.shape()
        );
    }
    if x.numel() > u32::MAX as usize || rows > u32::MAX as usize {
        bail!("softmax: x {:?} is beyond 32-bit indexing", x.shape());
    }
    let x_off = start as u32; // in range: start < numel <= u32::MAX
    let dummy;
    let (mask_buf, params) = match mask {
        Some(MaskRef {
            mask,
            offset,
            rows_per_batch,
        }) => {
            if mask.dtype() != DType::U32 {
                bail!("softmax: the key mask must be u32, got {:?}", mask.dtype());
            }
            if rows_per_batch == 0 {
                bail!("softmax: rows_per_batch must be positive");
            }
            let batches = rows.div_ceil(rows_per_batch);
            if offset as u128 + batches as u128 * n as u128 > mask.numel() as u128 {
                bail!(
                    "softmax: the key mask {:?} has no {batches} rows of {n} from element {offset}",
                    mask.shape()
                );
            }
            (
                mask.buffer(),
                [rows as u32, n as u32, 1, offset as u32, rows_per_batch as u32, x_off],
            )
        }
        None => {
            // Never read (masked = 0), but the binding must exist and must not alias x.
            dummy = Tensor::empty(x.gpu(), &[1], DType::U32)?;
            (dummy.buffer(), [rows as u32, n as u32, 0, 0, 1, x_off])
        }
    };
    x.gpu().dispatch(
        &SHADER,
        "softmax_forward",
        &[x.buffer(), mask_buf],
        &params,
        rows as u32,
    )
}

/// Backward of [`softmax_rows`]: `dx = y * (dy - sum(dy * y))` over each row of the last dimension, from the
/// forward's output `y` and the gradient `dy` (same shape). Returns a new tensor.
pub fn softmax_rows_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if y.shape() != dy.shape() {
        bail!(
            "softmax_backward: y {:?} and dy {:?} must have the same shape",
            y.shape(),
            dy.shape()
        );
    }
    let Some(&n) = y.shape().last() else {
        bail!("softmax_backward: y must have at least one dimension");
    };
    if dy.dtype() != DType::F32 {
        bail!("softmax_backward: dy must be f32, got {:?}", dy.dtype());
    }
    let dx = Tensor::empty(y.gpu(), y.shape(), DType::F32)?;
    dx.copy_from(0, dy, 0, dy.numel())?;
    let rows = y.numel().checked_div(n).unwrap_or(0);
    softmax_backward_at(y, 0, &dx, 0, rows, n)?;
    Ok(dx)
}

/// The backward launcher: for `rows` rows of `n`, `g <- y * (g - sum(g * y))` in place over `g` from
/// element `g_off`, with the softmax output read from `y` at `y_off`. `y` and `g` must be different buffers.
pub(crate) fn softmax_backward_at(
    y: &Tensor,
    y_off: usize,
    g: &Tensor,
    g_off: usize,
    rows: usize,
    n: usize,
) -> Result<()> {
    if y.dtype() != DType::F32 || g.dtype() != DType::F32 {
        bail!(
            "softmax_backward: y and the gradient must be f32, got {:?} and {:?}",
            y.dtype(),
            g.dtype()
        );
    }
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let len = rows as u128 * n as u128;
    for (what, t, off) in [("y", y, y_off), ("the gradient", g, g_off)] {
        if off as u128 + len > t.numel() as u128 {
            bail!(
                "softmax_backward: {rows} rows of {n} from element {off} do not fit in {what} {:?}",
                t.shape()
            );
        }
        if t.numel() > u32::MAX as usize {
            bail!("softmax_backward: {what} {:?} is beyond 32-bit indexing", t.shape());
        }
    }
    if y.buffer() == g.buffer() {
        bail!("softmax_backward: y and the gradient must not share a buffer");
    }
    y.gpu().dispatch(
        &SHADER,
        "softmax_backward",
        &[y.buffer(), g.buffer()],
        &[rows as u32, n as u32, y_off as u32, g_off as u32],
        rows as u32,
    )
}

/// CPU references, f64 throughout. Generic over f32 and f64 inputs (f64 for finite-difference checks).
pub mod reference {
    /// Softmax of each row of `n`; `mask` is `[B, n]` (non-zero = valid) with `rows_per_batch` rows per
    /// batch item. Masked keys give 0; a row with no valid key gives zeros.
    pub fn softmax_rows<T: Copy + Into<f64>>(x: &[T], n: usize, mask: Option<(&[u32], usize)>) -> Vec<f64> {
        let mut out = Vec::with_capacity(x.len());
        for (r, row) in x.chunks(n).enumerate() {
            let valid = |j: usize| mask.is_none_or(|(m, rpb)| m[(r / rpb) * n + j] != 0);
            let max = (0..n)
                .filter(|&j| valid(j))
                .map(|j| row[j].into())
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = (0..n)
                .map(|j| if valid(j) { (row[j].into() - max).exp() } else { 0.0 })
                .collect();
            let s: f64 = e.iter().sum();
            out.extend(e.iter().map(|v| if s > 0.0 { v / s } else { 0.0 }));
        }
        out
    }

    /// Backward of [`softmax_rows`] from its output `y` and the gradient `dy`: `y * (dy - sum(dy * y))`.
    pub fn softmax_rows_backward<T: Copy + Into<f64>, U: Copy + Into<f64>>(y: &[T], dy: &[U], n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(y.len());
        for (yr, gr) in y.chunks(n).zip(dy.chunks(n)) {
            let dot: f64 = yr.iter().zip(gr).map(|(&a, &b)| a.into() * b.into()).sum();
            out.extend(yr.iter().zip(gr).map(|(&a, &b)| a.into() * (b.into() - dot)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, check_grad_fd, random_vec, Tol};

    #[test]
    fn hand_checked_row() {
        let gpu = test_gpu();
        // softmax([0, ln 3]) = [1/4, 3/4]; large equal logits must not overflow.
        let x = Tensor::from_slice(gpu, &[0.0, 3f32.ln(), 1000.0, 1000.0], &[2, 2]).unwrap();
        let y = softmax_rows(&x, None).unwrap().to_vec().unwrap();
        let want = [0.25, 0.75, 0.5, 0.5];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn matches_reference_for_row_lengths_around_the_workgroup() {
        let gpu = test_gpu();
        for (seed, rows, n) in [
            (1u64, 3usize, 1usize),
            (2, 5, 7),
            (3, 4, 127),
            (4, 3, 129),
            (5, 2, 3001),
        ] {
            let x = random_vec(seed, rows * n, 8.0);
            let t = Tensor::from_slice(gpu, &x, &[rows, n]).unwrap();
            let y = softmax_rows(&t, None).unwrap();
            assert_close(
                &format!("softmax [{rows}, {n}]"),
                &y.to_vec().unwrap(),
                &reference::softmax_rows(&x, n, None),
                Tol::KERNEL,
            );
            // The input is left alone by the out-of-place form.
            assert_eq!(t.to_vec().unwrap(), x);
        }
    }

    #[test]
    fn masked_keys_get_exactly_zero() {
        let gpu = test_gpu();
        let (batches, rows_per_batch, n) = (3, 5, 37);
        let x = random_vec(7, batches * rows_per_batch * n, 4.0);
        // Item 0: all valid; item 1: 20 valid keys then padding; item 2: nothing valid.
        let mut mask = vec![1u32; batches * n];
        mask[n + 20..2 * n].fill(0);
        mask[2 * n..].fill(0);
        let t = Tensor::from_slice(gpu, &x, &[batches * rows_per_batch, n]).unwrap();
        let m = Tensor::from_u32(gpu, &mask, &[batches, n]).unwrap();
        softmax_rows_inplace(&t, Some((&m, rows_per_batch))).unwrap();
        let y = t.to_vec().unwrap();
        let want = reference::softmax_rows(&x, n, Some((&mask, rows_per_batch)));
        assert_close("softmax masked", &y, &want, Tol::KERNEL);
        for r in 0..batches * rows_per_batch {
            let b = r / rows_per_batch;
            for j in 0..n {
                if mask[b * n + j] == 0 {
                    assert_eq!(y[r * n + j], 0.0, "row {r} key {j} is masked");
                }
            }
        }
    }

    #[test]
    fn bad_mask_shape_is_an_error() {
        let gpu = test_gpu();
        let x = Tensor::zeros(gpu, &[6, 4]).unwrap();
        let m = Tensor::from_u32(gpu, &[1; 8], &[2, 4]).unwrap();
        let err = softmax_rows(&x, Some((&m, 2))).unwrap_err().to_string();
        assert!(err.contains("[3, 4]"), "{err}");
        let mf = Tensor::zeros(gpu, &[2, 4]).unwrap();
        let err = softmax_rows(&x, Some((&mf, 3))).unwrap_err().to_string();
        assert!(err.contains("u32"), "{err}");
    }

    #[test]
    fn grad_softmax_reference_matches_finite_differences() {
        let (rows, n) = (4, 7);
        let x: Vec<f64> = random_vec(20, rows * n, 3.0).iter().map(|&v| v as f64).collect();
        let g: Vec<f64> = random_vec(21, rows * n, 1.0).iter().map(|&v| v as f64).collect();
        // Two rows per batch item; item 1 has its last 3 keys masked (their gradient is 0).
        let mut mask = vec![1u32; 2 * n];
        mask[n + 4..].fill(0);
        for m in [None, Some((&mask[..], 2))] {
            let y = reference::softmax_rows(&x, n, m);
            let analytic = reference::softmax_rows_backward(&y, &g, n);
            let loss = |x: &[f64]| -> f64 {
                reference::softmax_rows(x, n, m)
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a * b)
                    .sum()
            };
            check_grad_fd(&format!("softmax dx (mask {})", m.is_some()), &analytic, &x, loss);
        }
    }

    #[test]
    fn grad_softmax_backward_matches_reference() {
        let gpu = test_gpu();
        for (seed, rows, n, masked) in [
            (30u64, 3usize, 1usize, false),
            (31, 5, 7, true),
            (32, 4, 127, false),
            (33, 3, 129, true),
            (34, 2, 3001, true),
        ] {
            let x = random_vec(seed, rows * n, 8.0);
            let dy = random_vec(seed + 100, rows * n, 1.0);
            // One row per batch item; odd rows have their keys from n/2 on masked, the last row all masked.
            let mut mask = vec![1u32; rows * n];
            if masked {
                for r in (1..rows).step_by(2) {
                    mask[r * n + n / 2..(r + 1) * n].fill(0);
                }
                mask[(rows - 1) * n..].fill(0);
            }
            let tm = Tensor::from_u32(gpu, &mask, &[rows, n]).unwrap();
            let y = softmax_rows(
                &Tensor::from_slice(gpu, &x, &[rows, n]).unwrap(),
                masked.then_some((&tm, 1)),
            )
            .unwrap();
            let tdy = Tensor::from_slice(gpu, &dy, &[rows, n]).unwrap();
            let dx = softmax_rows_backward(&y, &tdy).unwrap().to_vec().unwrap();
            let y_host = y.to_vec().unwrap();
            // The reference from the GPU's own y, so only the backward's error is measured.
            let want = reference::softmax_rows_backward(&y_host, &dy, n);
            assert_close(&format!("softmax backward [{rows}, {n}]"), &dx, &want, Tol::KERNEL);
            for (i, &m) in mask.iter().enumerate() {
                if masked && m == 0 {
                    assert_eq!(dx[i], 0.0, "masked element {i} must get no gradient");
                }
            }
            assert_eq!(tdy.to_vec().unwrap(), dy, "dy is left alone");
        }
        let y = Tensor::zeros(gpu, &[2, 3]).unwrap();
        let err = softmax_rows_backward(&y, &Tensor::zeros(gpu, &[3, 2]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("same shape"), "{err}");
    }
}
