//! AdamW with global gradient-norm clipping (`shaders/adamw.wgsl`), and the learning-rate schedules.
//!
//! Semantics are torch's exactly (torch 2.15, checked against its source and by the fixture test):
//! - `torch.nn.utils.clip_grad_norm_(params, max_norm)`: `total = sqrt(sum of every grad element squared)`,
//!   then every grad is multiplied by `min(max_norm / (total + 1e-6), 1)`. Here the norm stays on the GPU
//!   ([`grad_norm`], deterministic) and the AdamW kernel reads it and scales its gradient on the fly, so
//!   clipping costs no readback and the gradient tensors are left untouched.
//! - `torch.optim.AdamW` (`_single_tensor_adam`, decoupled weight decay), with step t counted from 1:
//!   `p *= 1 - lr wd; m = lerp(m, g, 1 - b1); v = v b2 + (1 - b2) g^2;`
//!   `p += -(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)` — eps is added AFTER dividing by the
//!   bias correction's square root, and the scalars are computed in f64 and rounded to f32 once, as torch does
//!   with its Python-float scalars.
//!
//! Layout: parameters are separate [`Tensor`]s (each owns its buffer), so one flat buffer as in llm.c would need
//! every model tensor to be a view into it. Instead the same kernel runs once per parameter tensor (four
//! elements per invocation, as vec4; one more dispatch for the last N % 4 where N is not a multiple of 4), all
//! dispatches recorded into the step's single command list: ~200 small dispatches for the student, no copies.

use anyhow::{ensure, Result};

use crate::gpu::{Shader, Tensor};
use crate::ops::reduce::{self, check_f32};

static SHADER: Shader = crate::shader!("adamw");
const WG: usize = 256;

/// The eps that `clip_grad_norm_` adds to the norm before dividing.
pub const CLIP_EPS: f32 = 1e-6;

/// Optimiser hyper-parameters (the learning rate is given per step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    /// DistilHuBERT's (the method spec's): betas (0.9, 0.98), eps 1e-6, weight decay 1e-6, clip at 5.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 1e-6,
            max_grad_norm: Some(5.0),
        }
    }
}

/// The f32 scalars of one update (the kernel's uniform block), from f64 hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub decay: f32,
    pub w1: f32,
    pub beta2: f32,
    pub w2: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub neg_step: f32,
}

impl AdamWStep {
    /// `step` counts from 1 (torch increments its step before the update).
    pub fn new(config: &AdamWConfig, lr: f64, step: u64) -> Result<AdamWStep> {
        ensure!(step >= 1, "AdamW: steps count from 1, got {step}");
        ensure!(
            (0.0..1.0).contains(&config.beta1) && (0.0..1.0).contains(&config.beta2),
            "AdamW: betas must be in [0, 1), got ({}, {})",
            config.beta1,
            config.beta2
        );
        ensure!(
            lr >= 0.0 && config.eps >= 0.0,
            "AdamW: lr {lr} and eps {} must be >= 0",
            config.eps
        );
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - config.beta1.powi(t);
        let bc2 = 1.0 - config.beta2.powi(t);
        Ok(AdamWStep {
            decay: (1.0 - lr * config.weight_decay) as f32,
            w1: (1.0 - config.beta1) as f32,
            beta2: config.beta2 as f32,
            w2: (1.0 - config.beta2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: config.eps as f32,
            neg_step: (-(lr / bc1)) as f32,
        })
    }
}

/// The global gradient norm `sqrt(sum over all grads of g^2)` as a `[1]` tensor on the GPU (deterministic).
pub fn grad_norm(grads: &[&Tensor]) -> Result<Tensor> {
    reduce::norm_l2(grads)
}

/// One AdamW update of one parameter tensor, in place (`param`, `m`, `v`), torch's formula. With
/// `clip = Some((norm, max_norm))` the gradient is first scaled by `min(max_norm / (norm[0] + 1e-6), 1)`.
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: &AdamWStep,
    clip: Option<(&Tensor, f32)>,
) -> Result<()> {
    let op = "adamw_update";
    check_f32(op, "param", param)?;
    for (what, t) in [("grad", grad), ("exp_avg", m), ("exp_avg_sq", v)] {
        check_f32(op, what, t)?;
        ensure!(
            t.shape() == param.shape(),
            "{op}: {what} {:?} must have the parameter's shape {:?}",
            t.shape(),
            param.shape()
        );
    }
    let (norm, max_norm, on) = match clip {
        Some((norm, max_norm)) => {
            check_f32(op, "norm", norm)?;
            ensure!(
                norm.numel() == 1,
                "{op}: the norm must hold one value, got {:?}",
                norm.shape()
            );
            ensure!(max_norm > 0.0, "{op}: max_norm must be positive, got {max_norm}");
            (norm, max_norm, 1)
        }
        // The kernel declares the norm binding either way but does not read it without clipping: bind the
        // gradient there (two read-only bindings of one buffer are allowed), so nothing is allocated.
        None => (grad, 0.0, 0),
    };
    let n = param.numel();
    let s = step;
    // `start`: the first element the scalar entry updates (the vec4 entry ignores it).
    let params = |start: usize| {
        [
            n as u32,
            on,
            s.decay.to_bits(),
            s.w1.to_bits(),
            s.beta2.to_bits(),
            s.w2.to_bits(),
            s.bc2_sqrt.to_bits(),
            s.eps.to_bits(),
            s.neg_step.to_bits(),
            max_norm.to_bits(),
            start as u32,
        ]
    };
    let buffers = [param.buffer(), grad.buffer(), m.buffer(), v.buffer(), norm.buffer()];
    // Whole vec4 first (lavapipe: 2.1x the scalar kernel), then the last n % 4 elements one by one.
    let whole = n / 4 * 4;
    let gpu = param.gpu();
    gpu.dispatch(
        &SHADER,
        "adamw_update4",
        &buffers,
        &params(0),
        (n / 4).div_ceil(WG) as u32,
    )?;
    let tail_groups = (n - whole).div_ceil(WG) as u32;
    gpu.dispatch(&SHADER, "adamw_update", &buffers, &params(whole), tail_groups)
}

/// The optimiser state: one `exp_avg` and one `exp_avg_sq` per parameter (zeros at first), and the step count.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    steps: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// State for `params`, in this order (every later `step` must pass them in the same order).
    pub fn new(params: &[&Tensor], config: AdamWConfig) -> Result<AdamW> {
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for p in params {
            check_f32("AdamW::new", "param", p)?;
            m.push(Tensor::zeros(p.gpu(), p.shape())?);
            v.push(Tensor::zeros(p.gpu(), p.shape())?);
        }
        Ok(AdamW { config, steps: 0, m, v })
    }

    /// Restores a saved state (e.g. from a training checkpoint): `m` and `v` per parameter, in the order of the
    /// parameters later passed to `step`, after `steps` updates.
    pub fn from_state(config: AdamWConfig, steps: u64, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<AdamW> {
        ensure!(
            m.len() == v.len(),
            "AdamW::from_state: {} exp_avg tensors but {} exp_avg_sq tensors",
            m.len(),
            v.len()
        );
        for (i, (a, b)) in m.iter().zip(&v).enumerate() {
            check_f32("AdamW::from_state", "exp_avg", a)?;
            check_f32("AdamW::from_state", "exp_avg_sq", b)?;
            ensure!(
                a.shape() == b.shape(),
                "AdamW::from_state: parameter {i}: exp_avg {:?} vs exp_avg_sq {:?}",
                a.shape(),
                b.shape()
            );
        }
        Ok(AdamW { config, steps, m, v })
    }

    /// Updates taken so far (torch's `state["step"]`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// (exp_avg, exp_avg_sq) per parameter, e.g. for checkpoints.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// One optimiser step at learning rate `lr`: clip (if configured) then update every parameter. Records
    /// its dispatches only (no readback). Returns the pre-clipping global gradient norm (`[1]`) when clipping,
    /// for logging.
    pub fn step(&mut self, params: &[&Tensor], grads: &[&Tensor], lr: f64) -> Result<Option<Tensor>> {
        ensure!(
            params.len() == self.m.len() && grads.len() == params.len(),
            "AdamW::step: {} parameters and {} gradients for an optimiser of {} parameters",
            params.len(),
            grads.len(),
            self.m.len()
        );
        for (i, p) in params.iter().enumerate() {
            ensure!(
                p.shape() == self.m[i].shape(),
                "AdamW::step: parameter {i} has shape {:?}, the optimiser state {:?}",
                p.shape(),
                self.m[i].shape()
            );
        }
        let hyper = AdamWStep::new(&self.config, lr, self.steps + 1)?;
        let norm = match self.config.max_grad_norm {
            Some(_) if grads.is_empty() => None,
            Some(_) => Some(grad_norm(grads)?),
            None => None,
        };
        let clip = norm
            .as_ref()
            .zip(self.config.max_grad_norm)
            .map(|(n, max)| (n, max as f32));
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            adamw_update(p, g, &self.m[i], &self.v[i], &hyper, clip)?;
        }
        self.steps += 1;
        Ok(norm)
    }
}

/// The decay after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrDecay {
    Linear,
    Cosine,
}

/// The learning rate of optimiser step `step` (0-based: the first update uses `lr_at(0, ..)`) out of `total`,
/// exactly as transformers' `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup` (which
/// DistilHuBERT's s3prl recipe uses) under a scheduler stepped after each update: with
/// `warmup = floor(total * warmup_frac)`, `peak * step / warmup` while `step < warmup` (so step 0 has lr 0),
/// then linear `peak * (total - step) / (total - warmup)` or cosine
/// `peak * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))`, and 0 from `total` on (where
/// transformers' cosine would rise again). `warmup_frac` is clamped to [0, 1].
pub fn lr_at(step: usize, total: usize, warmup_frac: f64, peak: f64, kind: LrDecay) -> f64 {
    let frac = if warmup_frac.is_nan() {
        0.0
    } else {
        warmup_frac.clamp(0.0, 1.0)
    };
    let warmup = (total as f64 * frac) as usize;
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    if step >= total {
        return 0.0;
    }
    let span = (total - warmup).max(1) as f64;
    match kind {
        LrDecay::Linear => peak * ((total - step) as f64 / span),
        LrDecay::Cosine => {
            let progress = (step - warmup) as f64 / span;
            peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// CPU references in f64.
pub mod reference {
    use super::{AdamWConfig, CLIP_EPS};

    /// `min(max_norm / (norm + 1e-6), 1)`.
    pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
        (max_norm / (norm + CLIP_EPS as f64)).min(1.0)
    }

    /// One torch AdamW update of one tensor at step `step` (from 1), gradient scaled by `coef`.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_update(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        config: &AdamWConfig,
        lr: f64,
        step: u64,
        coef: f64,
    ) {
        let t = step as i32;
        let bc1 = 1.0 - config.beta1.powi(t);
        let bc2 = 1.0 - config.beta2.powi(t);
        for i in 0..p.len() {
            let g = g[i] * coef;
            p[i] *= 1.0 - lr * config.weight_decay;
            m[i] += (1.0 - config.beta1) * (g - m[i]);
            v[i] = v[i] * config.beta2 + (1.0 - config.beta2) * g * g;
            p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + config.eps);
        }
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
    fn adamw_update_matches_reference() {
        // Large lr and weight decay so that the update is visible next to the parameter's rounding.
        let gpu = test_gpu();
        let config = AdamWConfig {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-3,
            weight_decay: 0.3,
            max_grad_norm: Some(2.0),
        };
        let lr = 0.1;
        // Whole vec4 and a tail (1001 = 4 x 250 + 1), a tail alone, whole vec4 alone.
        for shape in [[7, 143], [1, 3], [4, 256]] {
            let n = shape[0] * shape[1];
            let p0 = random_vec(1, n, 1.0);
            let grads: Vec<Vec<f32>> = (0..3).map(|s| random_vec(10 + s, n, 0.2)).collect();
            let tp = Tensor::from_slice(gpu, &p0, &shape).unwrap();
            let mut opt = AdamW::new(&[&tp], config).unwrap();
            let (mut p, mut m, mut v) = (f64s(&p0), vec![0.0; n], vec![0.0; n]);
            for (s, g) in grads.iter().enumerate() {
                let tg = Tensor::from_slice(gpu, g, &shape).unwrap();
                let norm = opt.step(&[&tp], &[&tg], lr).unwrap().unwrap();
                let got_norm = norm.to_vec().unwrap()[0] as f64;
                let want_norm = crate::ops::reduce::reference::sum_squares(g).sqrt();
                assert!(((got_norm - want_norm) / want_norm).abs() < 1e-6);
                let coef = reference::clip_coef(want_norm, 2.0);
                let before = p.clone();
                reference::adamw_update(&mut p, &f64s(g), &mut m, &mut v, &config, lr, s as u64 + 1, coef);
                let got = tp.to_vec().unwrap();
                // The update itself, relative to its own size.
                let got_delta: Vec<f32> = got.iter().zip(&before).map(|(&a, &b)| (a as f64 - b) as f32).collect();
                let want_delta: Vec<f64> = p.iter().zip(&before).map(|(a, b)| a - b).collect();
                assert_close(
                    &format!("adamw step {} update", s + 1),
                    &got_delta,
                    &want_delta,
                    Tol::KERNEL,
                );
                assert_close(&format!("adamw step {} param", s + 1), &got, &p, Tol::KERNEL);
                let (gm, gv) = opt.moments();
                assert_close("adamw exp_avg", &gm[0].to_vec().unwrap(), &m, Tol::KERNEL);
                assert_close("adamw exp_avg_sq", &gv[0].to_vec().unwrap(), &v, Tol::KERNEL);
                p = f64s(&got); // continue from the GPU's state so errors do not compound
            }
            assert_eq!(opt.steps(), 3);
            let wrong = Tensor::zeros(gpu, &[5]).unwrap();
            assert!(opt.step(&[&tp], &[&wrong], lr).is_err());
            assert!(opt.step(&[&tp], &[], lr).is_err());
        }
    }

    /// `tests/fixtures/adamw/adamw.json`, written by `tests/fixtures/make_adamw_fixture.py`.
    #[derive(serde::Deserialize)]
    struct Fixture {
        shapes: Vec<Vec<usize>>,
        init: Vec<Vec<f32>>,
        /// [step][param] gradients before clipping.
        grads: Vec<Vec<Vec<f32>>>,
        configs: Vec<FixtureConfig>,
    }

    #[derive(serde::Deserialize)]
    struct FixtureConfig {
        name: String,
        lr: Vec<f64>,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
        max_norm: Option<f64>,
        /// [step] clip_grad_norm_'s returned total norm.
        total_norm: Vec<f64>,
        /// [step][param] parameters after the step.
        params: Vec<Vec<Vec<f32>>>,
        exp_avg: Vec<Vec<f32>>,
        exp_avg_sq: Vec<Vec<f32>>,
    }

    #[test]
    fn adamw_matches_torch_fixture() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adamw/adamw.json");
        let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let gpu = test_gpu();
        for c in &fixture.configs {
            let config = AdamWConfig {
                beta1: c.betas.0,
                beta2: c.betas.1,
                eps: c.eps,
                weight_decay: c.weight_decay,
                max_grad_norm: c.max_norm,
            };
            let params: Vec<Tensor> = fixture
                .init
                .iter()
                .zip(&fixture.shapes)
                .map(|(v, s)| Tensor::from_slice(gpu, v, s).unwrap())
                .collect();
            let prefs: Vec<&Tensor> = params.iter().collect();
            let mut opt = AdamW::new(&prefs, config).unwrap();
            let mut clipped = 0;
            for (s, lr) in c.lr.iter().enumerate() {
                let grads: Vec<Tensor> = fixture.grads[s]
                    .iter()
                    .zip(&fixture.shapes)
                    .map(|(v, sh)| Tensor::from_slice(gpu, v, sh).unwrap())
                    .collect();
                let grefs: Vec<&Tensor> = grads.iter().collect();
                let norm = opt.step(&prefs, &grefs, *lr).unwrap();
                if let Some(norm) = norm {
                    let got = norm.to_vec().unwrap()[0] as f64;
                    let want = c.total_norm[s];
                    let rel = ((got - want) / want).abs();
                    eprintln!(
                        "{} step {}: grad norm {got} (torch {want}, rel err {rel:.1e})",
                        c.name,
                        s + 1
                    );
                    assert!(rel < 1e-6);
                    clipped += (want > c.max_norm.unwrap()) as usize;
                }
                for (i, p) in params.iter().enumerate() {
                    let got = p.to_vec().unwrap();
                    let want = &c.params[s][i];
                    let init = &fixture.init[i];
                    let name = format!("{} step {} param {i}", c.name, s + 1);
                    assert_close(&name, &got, &f64s(want), Tol::KERNEL);
                    // The accumulated update p - p0 as well, which a relative-to-|p| check cannot see.
                    let d_got: Vec<f32> = got.iter().zip(init).map(|(a, b)| a - b).collect();
                    let d_want: Vec<f64> = want.iter().zip(init).map(|(&a, &b)| a as f64 - b as f64).collect();
                    assert_close(&format!("{name} update"), &d_got, &d_want, Tol::REDUCTION);
                }
            }
            let (m, v) = opt.moments();
            for i in 0..params.len() {
                assert_close(
                    &format!("{} exp_avg {i}", c.name),
                    &m[i].to_vec().unwrap(),
                    &f64s(&c.exp_avg[i]),
                    Tol::KERNEL,
                );
                assert_close(
                    &format!("{} exp_avg_sq {i}", c.name),
                    &v[i].to_vec().unwrap(),
                    &f64s(&c.exp_avg_sq[i]),
                    Tol::KERNEL,
                );
            }
            if c.max_norm.is_some() {
                assert!(
                    clipped > 0 && clipped < c.lr.len(),
                    "{}: the fixture must clip some steps only",
                    c.name
                );
            }
        }
    }

    #[test]
    fn lr_schedules_warm_up_then_decay_to_zero() {
        let (total, peak) = (100, 2e-4);
        for kind in [LrDecay::Linear, LrDecay::Cosine] {
            // warmup = floor(100 * 0.07) = 7 steps.
            assert_eq!(lr_at(0, total, 0.07, peak, kind), 0.0);
            assert!((lr_at(3, total, 0.07, peak, kind) - peak * 3.0 / 7.0).abs() < 1e-18);
            assert_eq!(lr_at(7, total, 0.07, peak, kind), peak);
            assert_eq!(lr_at(100, total, 0.07, peak, kind), 0.0);
            assert_eq!(lr_at(150, total, 0.07, peak, kind), 0.0);
            let lrs: Vec<f64> = (0..=total).map(|s| lr_at(s, total, 0.07, peak, kind)).collect();
            assert!(lrs[..=7].windows(2).all(|w| w[0] < w[1]));
            assert!(lrs[7..].windows(2).all(|w| w[0] > w[1] || w[1] == 0.0));
            // No warm-up: the first step runs at the peak.
            assert_eq!(lr_at(0, total, 0.0, peak, kind), peak);
        }
        // Linear: (100 - 50) / 93 of the peak; cosine: exactly half at mid-decay (step 7 + 93 / 2).
        assert!((lr_at(50, total, 0.07, peak, LrDecay::Linear) - peak * 50.0 / 93.0).abs() < 1e-18);
        let mid = lr_at(53, 99, 0.07, 1.0, LrDecay::Cosine); // warmup 6, decay over 93, 47/93 of the way
        assert!((mid - 0.5 * (1.0 + (std::f64::consts::PI * 47.0 / 93.0).cos())).abs() < 1e-15);
        assert!((lr_at(57, 107, 0.07, 1.0, LrDecay::Cosine) - 0.5).abs() < 1e-15); // warmup 7, 50 of 100
                                                                                   // Degenerate inputs do not panic.
        assert_eq!(lr_at(0, 0, 0.5, 1.0, LrDecay::Linear), 0.0);
        assert_eq!(lr_at(3, 10, f64::NAN, 1.0, LrDecay::Linear), 7.0 / 10.0);
        assert_eq!(lr_at(3, 10, 5.0, 1.0, LrDecay::Linear), 0.3);
    }
}
