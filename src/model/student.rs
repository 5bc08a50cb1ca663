//! The MLKD student (`../shared/docs/mlkd-method.md`): the teacher's wav2vec 2.0 architecture truncated to K
//! transformer layers, plus one prediction head per target teacher layer on the last student layer:
//! `Linear(D, D*N)` -> GELU -> for head n, columns n*D..(n+1)*D -> `Linear(D, D)`.
//! The distillation loss per head is L1 + lambda * (-log sigmoid(cos)), averaged over heads.
//!
//! Checkpoint layout: a wav2vec 2.0 folder whose config.json also records `mlkd_target_layers`, with the heads
//! stored as `mlkd_heads.proj.{weight,bias}` and `mlkd_heads.out.{n}.{weight,bias}` in model.safetensors or
//! a separate heads.safetensors.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};

use super::config::Wav2Vec2Config;
use super::wav2vec2::{Linear, TrainOptions, Wav2Vec2};
use super::weights::Checkpoint;
use crate::gpu::{Gpu, Tensor};
use crate::tape::{Param, Tape, Var};

/// The default targets for a teacher with `n` layers: {ceil(n/3), ceil(2n/3), n} without repeats.
pub fn default_target_layers(n: usize) -> Vec<usize> {
    let mut l = vec![n.div_ceil(3), (2 * n).div_ceil(3), n];
    l.dedup();
    l.retain(|&x| x > 0);
    l
}

/// One prediction head per target layer, sharing the first projection.
pub struct PredictionHeads {
    pub proj: Linear,
    pub out: Vec<Linear>,
    pub target_layers: Vec<usize>,
    pub hidden: usize,
}

impl PredictionHeads {
    pub fn load(gpu: &Gpu, ck: &mut Checkpoint, hidden: usize, target_layers: Vec<usize>) -> Result<PredictionHeads> {
        let n = target_layers.len();
        Ok(PredictionHeads {
            proj: Linear::load(gpu, ck, "mlkd_heads.proj", hidden * n, hidden, true)?,
            out: (0..n)
                .map(|i| Linear::load(gpu, ck, &format!("mlkd_heads.out.{i}"), hidden, hidden, true))
                .collect::<Result<_>>()?,
            target_layers,
            hidden,
        })
    }

    /// h [B, T, D] -> one prediction [B, T, D] per target layer.
    pub fn forward(&self, tape: &Tape, h: &Var) -> Result<Vec<Var>> {
        let z = self.proj.forward_gelu(tape, h)?;
        self.out
            .iter()
            .enumerate()
            .map(|(n, head)| head.forward(tape, &tape.narrow_cols(&z, n * self.hidden, self.hidden)?))
            .collect()
    }

    pub fn parameters(&self) -> Vec<Arc<Param>> {
        self.proj
            .parameters()
            .into_iter()
            .chain(self.out.iter().flat_map(|l| l.parameters()))
            .collect()
    }
}

/// The loss of one step: the total and, per head, its L1 and cosine terms (all one-element tensors).
pub struct DistillLoss {
    pub total: Var,
    pub l1: Vec<Var>,
    pub cos: Vec<Var>,
}

/// MLKD loss: for head n, mean|p_n - t_n| + lambda * mean over frames of -log sigmoid(cos(p_n, t_n)); the
/// total is the mean over heads. Targets are constants [B, T, D].
pub fn distill_loss(tape: &Tape, preds: &[Var], targets: &[Tensor], lambda: f32) -> Result<DistillLoss> {
    if preds.len() != targets.len() || preds.is_empty() {
        bail!(
            "distill_loss: {} predictions for {} targets",
            preds.len(),
            targets.len()
        );
    }
    let (mut l1s, mut coss) = (Vec::new(), Vec::new());
    let mut total: Option<Var> = None;
    for (p, t) in preds.iter().zip(targets) {
        if p.shape() != t.shape() {
            bail!("distill_loss: prediction {:?} vs target {:?}", p.shape(), t.shape());
        }
        let l1 = tape.l1_loss(p, t)?;
        let cos_term = tape.scale(&tape.mean(&tape.log_sigmoid(&tape.cosine_rows(p, t)?)?)?, -1.0)?;
        let head = tape.add(&l1, &tape.scale(&cos_term, lambda)?)?;
        total = Some(match total {
            None => head,
            Some(acc) => tape.add(&acc, &head)?,
        });
        l1s.push(l1);
        coss.push(cos_term);
    }
    let total = tape.scale(&total.expect("at least one head"), 1.0 / preds.len() as f32)?;
    Ok(DistillLoss {
        total,
        l1: l1s,
        cos: coss,
    })
}

pub struct Student {
    pub encoder: Wav2Vec2,
    pub heads: PredictionHeads,
}

impl Student {
    /// Loads a student folder (config.json with `mlkd_target_layers`, weights with the heads).
    pub fn load(gpu: &Gpu, dir: &Path) -> Result<Student> {
        let config_path = dir.join("config.json");
        let config = Wav2Vec2Config::from_file(&config_path)?;
        let text = std::fs::read_to_string(&config_path)?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let targets: Vec<usize> = match json.get("mlkd_target_layers") {
            Some(v) => serde_json::from_value(v.clone()).with_context(|| {
                format!(
                    "{}: mlkd_target_layers must be a list of layer numbers",
                    config_path.display()
                )
            })?,
            None => bail!(
                "{} has no mlkd_target_layers: not an MLKD student",
                config_path.display()
            ),
        };
        if targets.is_empty() {
            bail!("{}: mlkd_target_layers is empty", config_path.display());
        }
        let mut ck = Checkpoint::open(dir)?;
        let heads_file = dir.join("heads.safetensors");
        if heads_file.is_file() {
            ck.add_file(&heads_file)?;
        }
        let hidden = config.hidden_size;
        let encoder = Wav2Vec2::from_checkpoint(gpu, config, &mut ck)?;
        let heads = PredictionHeads::load(gpu, &mut ck, hidden, targets)?;
        ck.finish()?;
        Ok(Student { encoder, heads })
    }

    /// Waveforms [B, L, 1] -> (the encoder's outputs, one prediction per target layer).
    pub fn forward(
        &self,
        tape: &Tape,
        wave: &Var,
        opts: TrainOptions,
    ) -> Result<(super::wav2vec2::Wav2Vec2Vars, Vec<Var>)> {
        let out = self.encoder.forward_tape(tape, wave, opts)?;
        let preds = self
            .heads
            .forward(tape, out.hidden_states.last().expect("at least hidden_states[0]"))?;
        Ok((out, preds))
    }

    pub fn parameters(&self) -> Vec<Arc<Param>> {
        self.encoder
            .parameters()
            .into_iter()
            .chain(self.heads.parameters())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::default_target_layers;

    #[test]
    fn default_targets_follow_the_spec() {
        assert_eq!(default_target_layers(12), vec![4, 8, 12]);
        assert_eq!(default_target_layers(4), vec![2, 3, 4]);
        assert_eq!(default_target_layers(24), vec![8, 16, 24]);
        assert_eq!(default_target_layers(1), vec![1]);
        assert_eq!(default_target_layers(3), vec![1, 2, 3]);
        assert_eq!(default_target_layers(2), vec![1, 2]);
    }
}
