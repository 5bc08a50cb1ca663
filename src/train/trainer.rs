//! One MLKD training step, and the state that makes training resumable.
//!
//! A step draws a batch ([`BatchSampler`]), runs the student forward on the noisy crops with dropout, the
//! multi-level loss against the clean cached targets, the backward through the tape and one AdamW update,
//! all recorded without a wait for the GPU; the only readback is the step's logged scalars (the loss, its
//! per-head terms and the gradient norm), which also flushes what is still pending.
//!
//! Everything random is a function of `(seed, step)` (dropout: the tape's Philox seed) or of the sampler's
//! `(seed, epoch, position)`, so a run resumed from a checkpoint continues with exactly the numbers an
//! uninterrupted run computes.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use super::data::{BatchSampler, SamplerState};
use crate::gpu::Tensor;
use crate::model::student::{distill_loss, DistillLoss, Student};
use crate::model::wav2vec2::TrainOptions;
use crate::ops::adamw::{lr_at, AdamW, LrDecay};
use crate::tape::Tape;

/// The optimisation settings of a run (the method spec's defaults in [`Default`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Optimiser updates in the whole run (the schedule's length).
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of `steps` spent warming up linearly from 0.
    pub warmup: f64,
    /// `linear` or `cosine` decay after warm-up.
    pub decay: String,
    /// Weight of the cosine term against the L1 term.
    pub lambda: f32,
    /// Dropout in the student's transformer layers and attention.
    pub dropout: f32,
    /// Gradient multiplier on the CNN's output (DistilHuBERT's feature_grad_mult).
    pub feature_grad_mult: f32,
    /// Seeds dropout (per step) and the heads' initialisation.
    pub seed: u64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            steps: 1000,
            lr: 2e-4,
            warmup: 0.07,
            decay: "linear".into(),
            lambda: 1.0,
            dropout: 0.1,
            feature_grad_mult: 0.1,
            seed: 0,
        }
    }
}

impl OptimConfig {
    pub fn lr_decay(&self) -> Result<LrDecay> {
        match self.decay.as_str() {
            "linear" => Ok(LrDecay::Linear),
            "cosine" => Ok(LrDecay::Cosine),
            other => bail!("learning-rate decay {other:?}: expected linear or cosine"),
        }
    }

    /// The learning rate of update `step` (0-based).
    pub fn lr_at(&self, step: usize) -> Result<f64> {
        Ok(lr_at(step, self.steps, self.warmup, self.lr, self.lr_decay()?))
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps > 0, "the run needs at least one step (--steps)");
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "the learning rate must be a positive number, got {}",
            self.lr
        );
        ensure!(
            (0.0..1.0).contains(&self.warmup),
            "the warm-up fraction must be in [0, 1), got {}",
            self.warmup
        );
        ensure!(
            self.lambda.is_finite() && self.lambda >= 0.0,
            "lambda must be a non-negative number, got {}",
            self.lambda
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "dropout must be in [0, 1), got {}",
            self.dropout
        );
        ensure!(
            self.feature_grad_mult.is_finite() && self.feature_grad_mult >= 0.0,
            "the CNN gradient multiplier must be a non-negative number, got {}",
            self.feature_grad_mult
        );
        self.lr_decay()?;
        Ok(())
    }
}

/// What one step logs. `cos[n]` is head n's cosine term, mean over frames of -log sigmoid(cos).
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// Updates done after this step (1 for the first).
    pub step: usize,
    pub epoch: u64,
    pub lr: f64,
    pub loss: f32,
    pub l1: Vec<f32>,
    pub cos: Vec<f32>,
    /// Global gradient norm before clipping (when clipping is on).
    pub grad_norm: Option<f32>,
    /// Items of the batch left clean.
    pub clean_items: usize,
    /// Crop length in samples.
    pub samples: usize,
}

/// A non-finite loss or gradient norm: training must stop (the parameters are no longer trustworthy).
#[derive(Debug)]
pub struct NonFinite {
    pub step: usize,
    pub what: String,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {}: {} is not finite", self.step, self.what)
    }
}

impl std::error::Error for NonFinite {}

/// The student, its optimiser, the data sampler and the step count.
pub struct Trainer<'a> {
    pub student: Student,
    pub opt: AdamW,
    pub sampler: BatchSampler<'a>,
    pub config: OptimConfig,
    /// Updates done.
    pub step: usize,
    /// For each prediction head, the index of its layer in the batch's targets (the cache's layer order).
    head_targets: Vec<usize>,
    /// Test hook: the input of this step (1-based) is made NaN.
    pub poison_step: Option<usize>,
}

/// The state a checkpoint stores beside the weights and the optimiser.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub sampler: SamplerState,
    pub config: OptimConfig,
}

impl<'a> Trainer<'a> {
    /// A trainer at `step` updates (0 for a fresh run). The student's target layers must all be in the
    /// sampler's (the cache's) layers.
    pub fn new(
        student: Student,
        opt: AdamW,
        sampler: BatchSampler<'a>,
        config: OptimConfig,
        step: usize,
    ) -> Result<Trainer<'a>> {
        config.validate()?;
        let cached = sampler.layers();
        let mut head_targets = Vec::new();
        for &l in &student.heads.target_layers {
            match cached.iter().position(|&c| c == l) {
                Some(j) => head_targets.push(j),
                None => bail!(
                    "target layer {l} is not in the teacher cache (it holds layers {cached:?}); cache it with \
                     cache-teacher --layers"
                ),
            }
        }
        ensure!(
            step <= config.steps,
            "the checkpoint is at step {step}, past the run's {} steps",
            config.steps
        );
        Ok(Trainer {
            student,
            opt,
            sampler,
            config,
            step,
            head_targets,
            poison_step: None,
        })
    }

    pub fn state(&self) -> TrainerState {
        TrainerState {
            step: self.step,
            sampler: self.sampler.state(),
            config: self.config.clone(),
        }
    }

    pub fn done(&self) -> bool {
        self.step >= self.config.steps
    }

    /// One training step: batch, forward, loss, backward, AdamW; reads back only the logged scalars.
    pub fn step(&mut self) -> Result<StepRecord> {
        let batch = self.sampler.next_batch()?;
        let gpu = self.student.encoder.gpu.clone();
        let (b, l, t) = (batch.ids.len(), batch.samples, batch.frames);
        let d = self.student.encoder.config.hidden_size;
        let mut waves = batch.waves;
        if self.poison_step == Some(self.step + 1) {
            waves.iter_mut().for_each(|v| *v = f32::NAN);
        }
        let wave = Tensor::from_slice(&gpu, &waves, &[b, l, 1])?;
        let targets = self
            .head_targets
            .iter()
            .map(|&j| Tensor::from_slice(&gpu, &batch.targets[j], &[b, t, d]))
            .collect::<Result<Vec<_>>>()?;

        let lr = self.config.lr_at(self.step)?;
        let settings = StepSettings {
            seed: step_seed(self.config.seed, self.step),
            dropout: self.config.dropout,
            feature_grad_mult: self.config.feature_grad_mult,
            lambda: self.config.lambda,
            lr,
        };
        let DistillStep { loss, grad_norm: norm } =
            distill_step(&self.student, &mut self.opt, &wave, &targets, &settings)?;

        // The logged scalars are gathered on the GPU and read back together: the host waits once per step.
        let heads = loss.l1.len();
        let mut scalars: Vec<&Tensor> = vec![loss.total.value()];
        scalars.extend(loss.l1.iter().map(|v| v.value()));
        scalars.extend(loss.cos.iter().map(|v| v.value()));
        scalars.extend(norm.as_ref());
        let gathered = Tensor::empty(&gpu, &[scalars.len()], crate::gpu::DType::F32)?;
        for (i, s) in scalars.iter().enumerate() {
            gathered.copy_from(i, s, 0, 1)?;
        }
        let values = gathered.to_vec()?;
        let total = values[0];
        let l1 = values[1..1 + heads].to_vec();
        let cos = values[1 + heads..1 + 2 * heads].to_vec();
        let grad_norm = norm.as_ref().map(|_| values[1 + 2 * heads]);
        let step = self.step + 1;
        if !total.is_finite() {
            return Err(NonFinite {
                step,
                what: format!("the loss ({total})"),
            }
            .into());
        }
        if let Some(g) = grad_norm.filter(|g| !g.is_finite()) {
            return Err(NonFinite {
                step,
                what: format!("the gradient norm ({g})"),
            }
            .into());
        }
        self.step = step;
        Ok(StepRecord {
            step,
            epoch: batch.epoch,
            lr,
            loss: total,
            l1,
            cos,
            grad_norm,
            clean_items: batch.snr.iter().filter(|s| s.is_none()).count(),
            samples: l,
        })
    }
}

/// What one [`distill_step`] needs besides the model, the optimiser and the batch.
#[derive(Clone, Copy, Debug)]
pub struct StepSettings {
    /// The tape's dropout seed for this step.
    pub seed: u64,
    pub dropout: f32,
    pub feature_grad_mult: f32,
    pub lambda: f32,
    pub lr: f64,
}

/// The recorded (not yet read back) results of one [`distill_step`].
pub struct DistillStep {
    /// The loss and its per-head terms (`[1]` each).
    pub loss: DistillLoss,
    /// The pre-clipping global gradient norm (`[1]`), when the optimiser clips.
    pub grad_norm: Option<Tensor>,
}

/// One MLKD step: the student forward on `wave` (`[B, L, 1]`) with dropout, the multi-level loss against
/// `targets` (one `[B, T, D]` per head), the backward through the tape and one AdamW update of every
/// parameter. Only records dispatches: nothing is read back, so the caller decides what to read (training
/// logs every scalar in one readback; the benches read the loss only). Shared by `train`, `bench train` and
/// `benches/train_step.rs`, so the benches time exactly what training runs.
pub fn distill_step(
    student: &Student,
    opt: &mut AdamW,
    wave: &Tensor,
    targets: &[Tensor],
    settings: &StepSettings,
) -> Result<DistillStep> {
    let tape = Tape::with_seed(settings.seed);
    let opts = TrainOptions {
        dropout: settings.dropout,
        feature_grad_mult: Some(settings.feature_grad_mult),
    };
    let (_, preds) = student.forward(&tape, &tape.constant(wave.clone()), opts)?;
    let loss = distill_loss(&tape, &preds, targets, settings.lambda)?;
    tape.backward(&loss.total)?;
    drop(preds);

    let params = student.parameters();
    let mut grads = Vec::with_capacity(params.len());
    for p in &params {
        match p.grad() {
            Some(g) => grads.push(g),
            // Every parameter feeds the loss; a missing gradient means a broken graph, not a zero.
            None => bail!("parameter {} received no gradient", p.name),
        }
    }
    let values: Vec<&Tensor> = params.iter().map(|p| p.value()).collect();
    let grad_norm = opt.step(&values, &grads.iter().collect::<Vec<_>>(), settings.lr)?;
    params.iter().for_each(|p| p.zero_grad());
    Ok(DistillStep { loss, grad_norm })
}

/// The tape's dropout seed of update `step` of a run seeded `seed`.
pub fn step_seed(seed: u64, step: usize) -> u64 {
    use crate::seed::{mix64, GOLDEN};
    mix64(seed ^ 0x7374_6570_5f73_6565u64.wrapping_add((step as u64).wrapping_mul(GOLDEN)))
}
