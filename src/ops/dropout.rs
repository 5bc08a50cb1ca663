//! Dropout (`shaders/dropout.wgsl`) with torch's semantics: each element is zeroed with probability `p` and
//! kept ones are scaled by `1 / (1 - p)`; `p = 0` is the identity and `p = 1` gives zeros.
//!
//! The mask is never stored: it is a pure function of `(seed, stream, element index)` through the
//! counter-based Philox4x32-10 generator (the one torch's CUDA generator and JAX use; Random123's
//! definition), so [`dropout_backward`] regenerates it from the [`DropoutMask`] the forward returned (three
//! numbers). `seed` is the run's seed; `stream` tells the dropout sites and steps apart (e.g.
//! `step * sites + site`): each `(seed, stream)` pair gives an independent mask. The masks are not torch's
//! (its per-thread counter layout is an implementation detail), only distributed as torch's.
//!
//! The element index is the logical position in the whole tensor (64-bit); [`dropout_inplace_at`] takes the
//! index of its first element, so a tensor processed in chunks (attention's probabilities) gets the same
//! mask however it is split.

use anyhow::{bail, Result};

use crate::gpu::{DType, Shader, Tensor};

static SHADER: Shader = crate::shader!("dropout");
const WG: usize = 256;

/// Everything that regenerates one dropout mask: probability, seed, stream. No buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    pub p: f32,
    pub seed: u64,
    pub stream: u64,
}

impl DropoutMask {
    /// Checks `p` (in [0, 1]).
    pub fn new(p: f32, seed: u64, stream: u64) -> Result<DropoutMask> {
        if !(0.0..=1.0).contains(&p) {
            bail!("dropout: p must be in [0, 1], got {p}");
        }
        Ok(DropoutMask { p, seed, stream })
    }

    /// An element is dropped when its random word is below this: round(p * 2^32) (saturated for p = 1,
    /// where the scale of 0 zeroes everything anyway).
    pub fn threshold(&self) -> u32 {
        (self.p as f64 * 4294967296.0).round().min(u32::MAX as f64) as u32
    }

    /// The factor of kept elements, `1 / (1 - p)` in f32 as torch computes it; 0 for p = 1.
    pub fn scale(&self) -> f32 {
        if self.p >= 1.0 {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }

    /// True when the mask keeps everything unscaled (p = 0): callers may skip the kernel.
    pub fn is_identity(&self) -> bool {
        self.p == 0.0
    }

    fn params(&self, n: usize, x_off: usize, y_off: usize, index_base: u64) -> [u32; 11] {
        [
            n as u32,
            x_off as u32,
            y_off as u32,
            index_base as u32,
            (index_base >> 32) as u32,
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.stream as u32,
            (self.stream >> 32) as u32,
            self.threshold(),
            self.scale().to_bits(),
        ]
    }
}

fn check_f32(what: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        bail!("dropout: {what} must be f32, got {:?}", t.dtype());
    }
    if t.numel() > u32::MAX as usize {
        bail!("dropout: {what} {:?} is beyond 32-bit indexing", t.shape());
    }
    Ok(())
}

fn apply(entry: &'static str, x: &Tensor, mask: &DropoutMask) -> Result<Tensor> {
    check_f32("the input", x)?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n = x.numel();
    if mask.is_identity() {
        y.copy_from(0, x, 0, n)?;
        return Ok(y);
    }
    x.gpu().dispatch(
        &SHADER,
        entry,
        &[x.buffer(), y.buffer()],
        &mask.params(n, 0, 0, 0),
        n.div_ceil(WG) as u32,
    )?;
    Ok(y)
}

/// Training-mode dropout of `x`: returns `y` and the [`DropoutMask`] that [`dropout_backward`] needs.
/// Element `i` of `x` (row-major) uses index `i`.
pub fn dropout(x: &Tensor, p: f32, seed: u64, stream: u64) -> Result<(Tensor, DropoutMask)> {
    let mask = DropoutMask::new(p, seed, stream)?;
    Ok((apply("dropout_forward", x, &mask)?, mask))
}

/// Backward of [`dropout`]: `dx = dy * mask * scale`, with the mask regenerated from `mask`.
pub fn dropout_backward(dy: &Tensor, mask: &DropoutMask) -> Result<Tensor> {
    DropoutMask::new(mask.p, mask.seed, mask.stream)?;
    apply("dropout_backward", dy, mask)
}

/// In place over `n` elements of `t` from element `start`, whose logical indices start at `index_base`:
/// `t = t * mask * scale`. Forward and backward are the same map.
pub(crate) fn dropout_inplace_at(
    t: &Tensor,
    start: usize,
    n: usize,
    index_base: u64,
    mask: &DropoutMask,
) -> Result<()> {
    check_f32("the tensor", t)?;
    if start as u128 + n as u128 > t.numel() as u128 {
        bail!("dropout: {n} elements from {start} do not fit in {:?}", t.shape());
    }
    if mask.is_identity() || n == 0 {
        return Ok(());
    }
    t.gpu().dispatch(
        &SHADER,
        "dropout_inplace",
        &[t.buffer()],
        &mask.params(n, start, 0, index_base),
        n.div_ceil(WG) as u32,
    )
}

/// Out of place: `y[y_off + e] = x[x_off + e] * mask * scale` for `e < n`, with logical indices from
/// `index_base` (attention keeps the probabilities and drops out a copy of them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dropout_into_at(
    x: &Tensor,
    x_off: usize,
    y: &Tensor,
    y_off: usize,
    n: usize,
    index_base: u64,
    mask: &DropoutMask,
) -> Result<()> {
    check_f32("the input", x)?;
    check_f32("the output", y)?;
    for (what, t, off) in [("input", x, x_off), ("output", y, y_off)] {
        if off as u128 + n as u128 > t.numel() as u128 {
            bail!(
                "dropout: {n} elements from {off} do not fit in the {what} {:?}",
                t.shape()
            );
        }
    }
    if x.buffer() == y.buffer() {
        bail!("dropout: input and output must not share a buffer (use the in-place form)");
    }
    if n == 0 {
        return Ok(());
    }
    x.gpu().dispatch(
        &SHADER,
        "dropout_forward",
        &[x.buffer(), y.buffer()],
        &mask.params(n, x_off, y_off, index_base),
        n.div_ceil(WG) as u32,
    )
}

/// CPU references: the same generator bit for bit, and dropout in f64.
pub mod reference {
    use super::DropoutMask;

    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;

    /// Philox4x32 with 10 rounds (Random123's `philox4x32_R(10, ctr, key)`).
    pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
        let (mut c, mut k) = (ctr, key);
        for round in 0..10 {
            if round > 0 {
                k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
            }
            let p0 = M0 * c[0] as u64;
            let p1 = M1 * c[2] as u64;
            c = [
                (p1 >> 32) as u32 ^ c[1] ^ k[0],
                p1 as u32,
                (p0 >> 32) as u32 ^ c[3] ^ k[1],
                p0 as u32,
            ];
        }
        c
    }

    /// Whether the element with logical index `index` is kept.
    pub fn keep(mask: &DropoutMask, index: u64) -> bool {
        let ctr = [
            index as u32,
            (index >> 32) as u32,
            mask.stream as u32,
            (mask.stream >> 32) as u32,
        ];
        let key = [mask.seed as u32, (mask.seed >> 32) as u32];
        philox4x32_10(ctr, key)[0] >= mask.threshold()
    }

    /// `x * mask * scale` for elements with indices `index_base..`, in f64 (the backward is the same map).
    pub fn dropout<T: Copy + Into<f64>>(x: &[T], mask: &DropoutMask, index_base: u64) -> Vec<f64> {
        let scale = mask.scale() as f64;
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                if keep(mask, index_base + i as u64) {
                    v.into() * scale
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Backward of [`dropout`]: `dy * mask * scale`.
    pub fn dropout_backward<T: Copy + Into<f64>>(dy: &[T], mask: &DropoutMask, index_base: u64) -> Vec<f64> {
        dropout(dy, mask, index_base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{check_grad_fd, random_vec};

    fn upload(x: &[f32]) -> Tensor {
        Tensor::from_slice(test_gpu(), x, &[x.len()]).unwrap()
    }

    #[test]
    fn philox_matches_random123_known_answers() {
        // Random123's kat_vectors, the three `philox4x32 10` lines.
        let cases = [
            ([0u32; 4], [0u32; 2], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in cases {
            assert_eq!(reference::philox4x32_10(ctr, key), want, "ctr {ctr:x?} key {key:x?}");
        }
    }

    #[test]
    fn mask_matches_cpu_generator_bit_for_bit() {
        let n = 100_003;
        // Values away from 0, so a kept element is never mistaken for a dropped one.
        let x: Vec<f32> = random_vec(1, n, 1.0).iter().map(|v| v + v.signum() * 0.5).collect();
        for (p, seed, stream) in [
            (0.1f32, 7u64, 0u64),
            (0.5, u64::MAX, 3 << 40),
            (0.9, 0x1234_5678_9abc, 11),
        ] {
            let (y, mask) = dropout(&upload(&x), p, seed, stream).unwrap();
            let y = y.to_vec().unwrap();
            let scale = mask.scale();
            for (i, (&yi, &xi)) in y.iter().zip(&x).enumerate() {
                // x * 0 for a dropped element, as torch (a negative x gives -0).
                let want = xi * if reference::keep(&mask, i as u64) { scale } else { 0.0 };
                assert_eq!(
                    yi.to_bits(),
                    want.to_bits(),
                    "p {p} seed {seed} element {i}: {yi} vs {want}"
                );
            }
        }
    }

    #[test]
    fn kept_fraction_is_one_minus_p() {
        let n = 100_000;
        let x = upload(&vec![1.0; n]);
        for p in [0.1f32, 0.5, 0.9] {
            let (y, mask) = dropout(&x, p, 42, 1).unwrap();
            let y = y.to_vec().unwrap();
            let kept = y.iter().filter(|&&v| v != 0.0).count() as f64;
            assert!(y.iter().all(|&v| v == 0.0 || v == mask.scale()));
            // Binomial(n, 1 - p): within 5 standard deviations (fails by chance with probability ~6e-7).
            let (mean, sd) = (
                n as f64 * (1.0 - p as f64),
                (n as f64 * p as f64 * (1.0 - p as f64)).sqrt(),
            );
            eprintln!("dropout p = {p}: kept {kept} of {n}, expected {mean} +- {sd:.1}");
            assert!(
                (kept - mean).abs() < 5.0 * sd,
                "p {p}: kept {kept}, expected {mean} +- {sd}"
            );
        }
    }

    #[test]
    fn same_seed_same_mask_and_different_seeds_differ() {
        let n = 10_007;
        let x = upload(&vec![1.0; n]);
        let run = |seed, stream| dropout(&x, 0.3, seed, stream).unwrap().0.to_vec().unwrap();
        let a = run(5, 9);
        assert_eq!(a, run(5, 9), "same seed and stream must give the same mask");
        for (seed, stream) in [(6, 9), (5, 10), (5 + (1 << 32), 9), (5, 9 + (1 << 32))] {
            let b = run(seed, stream);
            let differ = a.iter().zip(&b).filter(|(u, v)| u != v).count();
            // Independent masks differ in 2 p (1 - p) = 42% of places.
            assert!(
                differ > n / 3,
                "seed {seed} stream {stream}: only {differ} of {n} differ"
            );
        }
    }

    #[test]
    fn p_zero_is_identity_and_p_one_zeroes() {
        let x = random_vec(3, 1001, 2.0);
        let t = upload(&x);
        assert_eq!(dropout(&t, 0.0, 1, 2).unwrap().0.to_vec().unwrap(), x);
        let (y, mask) = dropout(&t, 1.0, 1, 2).unwrap();
        assert!(y.to_vec().unwrap().iter().all(|&v| v == 0.0));
        assert!(dropout_backward(&t, &mask)
            .unwrap()
            .to_vec()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
        for p in [-0.1, 1.5, f32::NAN] {
            let err = dropout(&t, p, 1, 2).unwrap_err().to_string();
            assert!(err.contains("[0, 1]"), "{err}");
        }
        let u = Tensor::from_u32(test_gpu(), &[1, 2], &[2]).unwrap();
        assert!(dropout(&u, 0.5, 1, 2).unwrap_err().to_string().contains("f32"));
    }

    #[test]
    fn inplace_chunks_use_logical_indices_across_the_32_bit_carry() {
        let gpu = test_gpu();
        let mask = DropoutMask::new(0.4, 99, 5).unwrap();
        // Logical indices 2^32 - 300 .. 2^32 + 700, in two launches at different buffer offsets.
        let base = (1u64 << 32) - 300;
        let x = random_vec(4, 1000, 1.0);
        let t = Tensor::from_slice(gpu, &[vec![7.0; 3], x.clone()].concat(), &[1003]).unwrap();
        dropout_inplace_at(&t, 3, 400, base, &mask).unwrap();
        dropout_inplace_at(&t, 403, 600, base + 400, &mask).unwrap();
        let got = t.to_vec().unwrap();
        assert_eq!(&got[..3], &[7.0; 3], "elements before the range are untouched");
        let want = reference::dropout(&x, &mask, base);
        for (i, (&g, w)) in got[3..].iter().zip(&want).enumerate() {
            assert_eq!(g, *w as f32, "element {i}");
        }
    }

    #[test]
    fn grad_dropout_reference_matches_finite_differences() {
        let mask = DropoutMask::new(0.3, 17, 2).unwrap();
        let n = 40;
        let x: Vec<f64> = random_vec(5, n, 1.0).iter().map(|&v| v as f64).collect();
        let g: Vec<f64> = random_vec(6, n, 1.0).iter().map(|&v| v as f64).collect();
        let analytic = reference::dropout_backward(&g, &mask, 0);
        let loss = |x: &[f64]| -> f64 { reference::dropout(x, &mask, 0).iter().zip(&g).map(|(a, b)| a * b).sum() };
        check_grad_fd("dropout dx", &analytic, &x, loss);
    }

    #[test]
    fn grad_dropout_backward_is_mask_times_scale_times_dy() {
        let n = 70_001;
        let x = upload(&random_vec(7, n, 1.0));
        let dy_host = random_vec(8, n, 1.0);
        let (y, mask) = dropout(&x, 0.25, 123, 4).unwrap();
        let dx = dropout_backward(&upload(&dy_host), &mask).unwrap().to_vec().unwrap();
        let y = y.to_vec().unwrap();
        let scale = mask.scale();
        let want = reference::dropout_backward(&dy_host, &mask, 0);
        for i in 0..n {
            // Exact: one f32 multiply by the same factor, and the forward's zeros are the backward's.
            assert_eq!(dx[i], dy_host[i] * if y[i] != 0.0 { scale } else { 0.0 }, "element {i}");
            assert_eq!(dx[i], want[i] as f32, "element {i}");
        }
    }
}
