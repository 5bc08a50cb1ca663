//! The MLKD student (`../shared/docs/mlkd-method.md`): the teacher's wav2vec 2.0 architecture truncated to K
//! transformer layers, plus one prediction head per target teacher layer on the last student layer:
//! `Linear(D, D*N)` -> GELU -> for head n, columns n*D..(n+1)*D -> `Linear(D, D)`.
//! The distillation loss per head is L1 + lambda * (-log sigmoid(cos)), averaged over heads.
//!
//! Checkpoint layout: a wav2vec 2.0 folder whose config.json also records `mlkd_target_layers`, with the heads
//! stored as `mlkd_heads.proj.{weight,bias}` and `mlkd_heads.out.{n}.{weight,bias}` in model.safetensors or
//! a separate heads.safetensors. [`Student::from_teacher`] builds a fresh student, [`Student::save`] writes
//! this layout (heads in model.safetensors).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use rand::{Rng, SeedableRng};

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

    /// Fresh heads as torch's `nn.Linear` default initialisation: weights (kaiming-uniform with a = sqrt(5))
    /// and biases both U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = D for every head layer; seeded.
    pub fn init(gpu: &Gpu, hidden: usize, target_layers: Vec<usize>, seed: u64) -> Result<PredictionHeads> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = target_layers.len();
        let mut linear = |name: &str, out: usize| -> Result<Linear> {
            let bound = 1.0 / (hidden as f32).sqrt();
            let w: Vec<f32> = (0..out * hidden).map(|_| rng.gen_range(-bound..bound)).collect();
            let b: Vec<f32> = (0..out).map(|_| rng.gen_range(-bound..bound)).collect();
            Ok(Linear {
                weight: Param::new(format!("{name}.weight"), Tensor::from_slice(gpu, &w, &[out, hidden])?),
                bias: Some(Param::new(format!("{name}.bias"), Tensor::from_slice(gpu, &b, &[out])?)),
                half: None,
            })
        };
        let proj = linear("mlkd_heads.proj", hidden * n)?;
        let out = (0..n)
            .map(|i| linear(&format!("mlkd_heads.out.{i}"), hidden))
            .collect::<Result<_>>()?;
        Ok(PredictionHeads {
            proj,
            out,
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
    /// The whole config.json the student is saved with: the teacher's fields, `num_hidden_layers` = K,
    /// `mlkd_target_layers`.
    pub config_json: serde_json::Value,
    /// The teacher's `preprocessor_config.json`, copied into saved folders so that tools reading a student
    /// folder (extract) normalise its input as the teacher's.
    pub preprocessor_config: Option<Vec<u8>>,
}

/// The files of a student folder.
const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const PREPROCESSOR: &str = "preprocessor_config.json";

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
        let preprocessor_config = read_optional(&dir.join(PREPROCESSOR))?;
        Ok(Student {
            encoder,
            heads,
            config_json: json,
            preprocessor_config,
        })
    }

    /// A student of `student_layers` (K) transformer layers initialised from the teacher in `teacher_dir`
    /// (method spec): the CNN, the feature projection with its norm, the positional convolution, the encoder
    /// layer norm and the first K layers are copied; the prediction heads for `target_layers` (teacher layers,
    /// 1..=N) are initialised as torch's `nn.Linear` (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))),
    /// from `seed`. The teacher's layers beyond K are read but unused.
    pub fn from_teacher(
        gpu: &Gpu,
        teacher_dir: &Path,
        student_layers: usize,
        target_layers: Vec<usize>,
        seed: u64,
    ) -> Result<Student> {
        let config_path = teacher_dir.join(CONFIG);
        let teacher_config = Wav2Vec2Config::from_file(&config_path)?;
        let n = teacher_config.num_hidden_layers;
        if student_layers == 0 {
            bail!("the student needs at least one transformer layer (got 0)");
        }
        if student_layers > n {
            bail!(
                "a student of {student_layers} layers cannot be initialised from a teacher of {n} layers ({})",
                teacher_dir.display()
            );
        }
        check_target_layers(&target_layers, n)?;
        let text =
            std::fs::read_to_string(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?;
        let mut json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", config_path.display()))?;
        let Some(obj) = json.as_object_mut() else {
            bail!("{}: expected a JSON object", config_path.display())
        };
        obj.insert("num_hidden_layers".into(), student_layers.into());
        obj.insert("model_type".into(), "wav2vec2".into());
        // The student is a base model plus its own heads, whatever task model the teacher was saved as.
        obj.insert("architectures".into(), serde_json::json!(["Wav2Vec2Model"]));
        obj.insert("mlkd_target_layers".into(), serde_json::to_value(&target_layers)?);

        let config = Wav2Vec2Config {
            num_hidden_layers: student_layers,
            ..teacher_config
        };
        let hidden = config.hidden_size;
        let mut ck = Checkpoint::open(teacher_dir)?;
        let encoder = Wav2Vec2::from_checkpoint(gpu, config, &mut ck)
            .with_context(|| format!("initialising the student from {}", teacher_dir.display()))?;
        ck.finish_allowing(|name| teacher_layer_of(name).is_some_and(|l| l >= student_layers))?;
        let heads = PredictionHeads::init(gpu, hidden, target_layers, seed)?;
        let preprocessor_config = read_optional(&teacher_dir.join(PREPROCESSOR))?;
        Ok(Student {
            encoder,
            heads,
            config_json: json,
            preprocessor_config,
        })
    }

    /// Writes the student as a Hugging Face-like folder that [`Student::load`] reads (and
    /// [`Wav2Vec2::load`], which ignores the heads): `model.safetensors` with every parameter by its name
    /// (heads as `mlkd_heads.*`, f32), then `config.json`, then the teacher's `preprocessor_config.json`.
    /// Each file is written atomically; config.json is removed first and written last, so a folder whose
    /// writing was interrupted has no config.json and never loads as a complete (or a mismatched) student.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for stale in [CONFIG, "heads.safetensors", "model.safetensors.index.json"] {
            let p = dir.join(stale);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        let params = self.parameters();
        let mut data = Vec::with_capacity(params.len());
        for p in &params {
            data.push((p.name.clone(), p.value().shape().to_vec(), p.value().to_vec()?));
        }
        crate::fsutil::atomic_write(
            &dir.join(WEIGHTS),
            &serialize_f32(&data, HashMap::from([("format".to_string(), "pt".to_string())]))?,
        )?;
        crate::fsutil::atomic_write(
            &dir.join(CONFIG),
            serde_json::to_string_pretty(&self.config_json)?.as_bytes(),
        )?;
        if let Some(pre) = &self.preprocessor_config {
            crate::fsutil::atomic_write(&dir.join(PREPROCESSOR), pre)?;
        }
        Ok(())
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

/// Target layers must be teacher layers 1..=n, at least one, without repeats.
pub fn check_target_layers(targets: &[usize], n: usize) -> Result<()> {
    if targets.is_empty() {
        bail!("no target layers given (the student needs at least one prediction head)");
    }
    for (i, &t) in targets.iter().enumerate() {
        if t == 0 || t > n {
            bail!("target layer {t} is not a teacher layer (valid: 1..={n})");
        }
        if targets[..i].contains(&t) {
            bail!("target layer {t} is given twice");
        }
    }
    Ok(())
}

/// `Some(n)` for a tensor of transformer layer n (`encoder.layers.{n}.*`).
fn teacher_layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("encoder.layers.")?.split('.').next()?.parse().ok()
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
    ))
}

/// Named f32 tensors (name, shape, data) as safetensors bytes with `metadata`.
pub fn serialize_f32(tensors: &[(String, Vec<usize>, Vec<f32>)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, Some(metadata))?)
}

#[cfg(test)]
mod tests {
    use super::{check_target_layers, default_target_layers, teacher_layer_of};

    #[test]
    fn target_layers_and_layer_names() {
        assert!(check_target_layers(&[1, 2, 3], 3).is_ok());
        assert!(check_target_layers(&[], 3).is_err());
        assert!(check_target_layers(&[0], 3).is_err());
        assert!(check_target_layers(&[4], 3).is_err());
        assert!(check_target_layers(&[2, 2], 3).is_err());
        assert_eq!(teacher_layer_of("encoder.layers.11.attention.q_proj.weight"), Some(11));
        assert_eq!(teacher_layer_of("encoder.layer_norm.weight"), None);
        assert_eq!(teacher_layer_of("feature_projection.projection.bias"), None);
    }

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
