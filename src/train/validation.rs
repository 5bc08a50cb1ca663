//! The validation pass of `train`: does the student, from noisy input, predict the clean teacher better than
//! the teacher itself does from the same noisy input?
//!
//! The validation set is every held-out utterance (whole, not cropped, so frames match the cache exactly)
//! under every validation condition (clean, or noise at an SNR), the noise source and its segment drawn from
//! `(seed, utterance, condition)` alone, so every evaluation of a run, and a resumed run, sees the same audio.
//! For each condition and target layer `l` it reports the mean over frames of
//! - `student`: cos(head prediction for `l` from the noisy input, clean target `l`), and
//! - `teacher`: cos(teacher's own `hidden_states[l]` from the noisy input, clean target `l`),
//!
//! plus the student's validation loss (the training loss, without dropout). The teacher's side does not change
//! during training: it is computed once, when the set is built.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::data::SnrChoice;
use crate::data::cache::TeacherCache;
use crate::data::dataset::Utterance;
use crate::data::noise::{mix_at_snr_detail, NoiseBank};
use crate::data::wav;
use crate::gpu::Tensor;
use crate::model::student::Student;
use crate::model::Wav2Vec2;
use crate::ops::loss::reference::log_sigmoid;
use crate::ops::loss::{cosine_rows, l1_loss};
use crate::tape::Tape;

/// One validation input.
struct Item {
    id: String,
    condition: usize,
    /// Normalised (as the teacher's input) noisy waveform, 16 kHz.
    wave: Vec<f32>,
    frames: usize,
}

/// Sums over frames, per layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Sums {
    cos: Vec<f64>,
    frames: u64,
}

/// Results for one condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConditionReport {
    /// "clean" or the SNR in dB.
    pub condition: String,
    /// Mean cosine to the clean target per target layer: the student's head predictions, the teacher's own
    /// layer, both from the noisy input.
    pub student_cos: Vec<f64>,
    pub teacher_cos: Vec<f64>,
    pub frames: u64,
}

/// One validation pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationReport {
    pub step: usize,
    pub layers: Vec<usize>,
    /// The student's loss (L1 + lambda * cosine term, mean over heads), frame-weighted over every item.
    pub loss: f64,
    pub conditions: Vec<ConditionReport>,
    pub utterances: usize,
}

pub struct ValidationSet {
    items: Vec<Item>,
    conditions: Vec<SnrChoice>,
    /// Target layers, in the student's head order.
    layers: Vec<usize>,
    teacher: Vec<Sums>,
    utterances: usize,
}

/// Mixes `clean` (16 kHz, unnormalised) for `condition`, drawing from `(seed, id, condition index)`.
fn noisy_input(
    clean: &[f32],
    id: &str,
    c: usize,
    condition: SnrChoice,
    noise: &NoiseBank,
    seed: u64,
) -> Result<Vec<f32>> {
    let SnrChoice::Db(db) = condition else {
        return Ok(clean.to_vec());
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
        h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = StdRng::seed_from_u64(h ^ seed.rotate_left(17) ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let source = &noise.sources[rng.gen_range(0..noise.sources.len())];
    Ok(mix_at_snr_detail(clean, source, db, &mut rng)?.samples)
}

/// For `[1, T, D]` pairs (prediction, target): per pair its mean |p - t| and the cosine of every frame, read
/// back together (one readback for all pairs).
fn compare(pairs: &[(&Tensor, &Tensor)]) -> Result<Vec<(f64, Vec<f32>)>> {
    let Some((_, first)) = pairs.first() else {
        return Ok(Vec::new());
    };
    let (t, d) = (first.shape()[1], first.shape()[2]);
    let gathered = Tensor::empty(first.gpu(), &[pairs.len() * (t + 1)], crate::gpu::DType::F32)?;
    for (k, (pred, target)) in pairs.iter().enumerate() {
        anyhow::ensure!(target.shape() == [1, t, d], "compare: target {:?}", target.shape());
        let cos = cosine_rows(&pred.reshape(&[t, d])?, &target.reshape(&[t, d])?)?;
        gathered.copy_from(k * (t + 1), &l1_loss(pred, target)?, 0, 1)?;
        gathered.copy_from(k * (t + 1) + 1, &cos, 0, t)?;
    }
    Ok(gathered
        .to_vec()?
        .chunks(t + 1)
        .map(|c| (c[0] as f64, c[1..].to_vec()))
        .collect())
}

impl ValidationSet {
    /// Builds the set from the validation utterances `ids` and runs the teacher on every noisy input.
    /// `normalize`: whether inputs are normalised as the teacher's (the cache's setting).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        ids: &[String],
        utterances: &[Utterance],
        cache: &TeacherCache,
        noise: &NoiseBank,
        conditions: &[SnrChoice],
        layers: &[usize],
        normalize: bool,
        seed: u64,
        teacher: &Wav2Vec2,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<ValidationSet> {
        let by_id: BTreeMap<&str, &Utterance> = utterances.iter().map(|u| (u.id.as_str(), u)).collect();
        let mut items = Vec::new();
        let total = ids.len() * conditions.len();
        let mut teacher_sums = vec![
            Sums {
                cos: vec![0.0; layers.len()],
                frames: 0
            };
            conditions.len()
        ];
        for id in ids {
            let u = by_id
                .get(id.as_str())
                .with_context(|| format!("validation utterance {id:?} is not in the dataset"))?;
            let frames = cache
                .frames(id)
                .with_context(|| format!("validation utterance {id:?} is not in the teacher cache"))?;
            let clean = wav::load_16k(&u.path).with_context(|| format!("validation utterance {id:?}"))?;
            let targets = layers
                .iter()
                .map(|&l| Tensor::from_slice(&teacher.gpu, &cache.targets(id, l)?, &[1, frames, cache.hidden_size()]))
                .collect::<Result<Vec<_>>>()?;
            for (c, &condition) in conditions.iter().enumerate() {
                let mut wave = noisy_input(&clean, id, c, condition, noise, seed)?;
                if normalize {
                    wav::normalize(&mut wave);
                }
                let out = teacher.forward(&wave)?;
                anyhow::ensure!(
                    out.hidden_states[0].shape()[1] == frames,
                    "validation utterance {id:?}: the teacher gives {} frames, the cache has {frames}",
                    out.hidden_states[0].shape()[1]
                );
                let pairs: Vec<_> = layers
                    .iter()
                    .zip(&targets)
                    .map(|(&l, t)| (&out.hidden_states[l], t))
                    .collect();
                for (j, (_, cos)) in compare(&pairs)?.into_iter().enumerate() {
                    teacher_sums[c].cos[j] += cos.iter().map(|&v| v as f64).sum::<f64>();
                }
                teacher_sums[c].frames += frames as u64;
                items.push(Item {
                    id: id.clone(),
                    condition: c,
                    wave,
                    frames,
                });
                progress(items.len(), total);
            }
        }
        Ok(ValidationSet {
            items,
            conditions: conditions.to_vec(),
            layers: layers.to_vec(),
            teacher: teacher_sums,
            utterances: ids.len(),
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Evaluates the student (no dropout) on every item.
    pub fn evaluate(
        &self,
        student: &Student,
        cache: &TeacherCache,
        lambda: f32,
        step: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<ValidationReport> {
        let gpu = &student.encoder.gpu;
        let d = cache.hidden_size();
        let mut sums = vec![
            Sums {
                cos: vec![0.0; self.layers.len()],
                frames: 0
            };
            self.conditions.len()
        ];
        let (mut loss_sum, mut loss_frames) = (0.0f64, 0u64);
        for (k, item) in self.items.iter().enumerate() {
            let out = student.encoder.forward(&item.wave)?;
            let tape = Tape::no_grad();
            let last = out.hidden_states.last().expect("at least hidden_states[0]").clone();
            drop(out);
            let preds = student.heads.forward(&tape, &tape.constant(last))?;
            let targets = self
                .layers
                .iter()
                .map(|&l| Tensor::from_slice(gpu, &cache.targets(&item.id, l)?, &[1, item.frames, d]))
                .collect::<Result<Vec<_>>>()?;
            let pairs: Vec<_> = preds.iter().map(|p| p.value()).zip(&targets).collect();
            let mut item_loss = 0.0;
            for (j, (l1, cos)) in compare(&pairs)?.into_iter().enumerate() {
                let cos_term: f64 = cos.iter().map(|&c| -log_sigmoid(c as f64)).sum::<f64>() / cos.len() as f64;
                item_loss += l1 + lambda as f64 * cos_term;
                sums[item.condition].cos[j] += cos.iter().map(|&v| v as f64).sum::<f64>();
            }
            sums[item.condition].frames += item.frames as u64;
            loss_sum += item_loss / self.layers.len() as f64 * item.frames as f64;
            loss_frames += item.frames as u64;
            progress(k + 1, self.items.len());
        }
        let conditions = self
            .conditions
            .iter()
            .enumerate()
            .map(|(c, cond)| {
                let mean = |s: &Sums| s.cos.iter().map(|v| v / s.frames.max(1) as f64).collect();
                ConditionReport {
                    condition: cond.to_string(),
                    student_cos: mean(&sums[c]),
                    teacher_cos: mean(&self.teacher[c]),
                    frames: sums[c].frames,
                }
            })
            .collect();
        Ok(ValidationReport {
            step,
            layers: self.layers.clone(),
            loss: loss_sum / loss_frames.max(1) as f64,
            conditions,
            utterances: self.utterances,
        })
    }
}

impl ValidationReport {
    /// A table: one row per condition, per layer the student's and the teacher's mean cosine.
    pub fn table(&self) -> String {
        let mut s = format!(
            "validation at step {} ({} utterances), loss {:.4}\n",
            self.step, self.utterances, self.loss
        );
        s.push_str(&format!("{:>9}", "input"));
        for l in &self.layers {
            s.push_str(&format!(" | {:>16}", format!("layer {l} stu/tea")));
        }
        s.push('\n');
        for c in &self.conditions {
            let cond = if c.condition == "clean" {
                "clean".to_string()
            } else {
                format!("{} dB", c.condition)
            };
            s.push_str(&format!("{cond:>9}"));
            for (a, b) in c.student_cos.iter().zip(&c.teacher_cos) {
                s.push_str(&format!(" | {:>7.4} / {:>6.4}", a, b));
            }
            s.push('\n');
        }
        s
    }
}
