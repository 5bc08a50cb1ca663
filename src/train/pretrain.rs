//! Self-supervised pretraining of the small demo teacher (`wgpu-mlkd make-teacher`), and the linear probe
//! that checks its features.
//!
//! # Objective: masked log-mel reconstruction
//! Each batch item is a crop of a (normalised) clean utterance. Random spans of frames are masked by
//! zeroing the input samples those frames' CNN windows cover (span starts drawn per frame with probability
//! `mask_prob`, `mask_span` frames long: wav2vec 2.0's masking scheme, applied to the waveform because this
//! model has no mask embedding). From the top hidden state a linear head (dropped after training) predicts,
//! for *every* frame, the clean log-mel spectrum of that frame's window (`[t * S, t * S + R)`, S the total
//! stride, R the receptive field, so mel frames line up with `config.frames(L)` exactly), standardised per
//! band; the loss is L1. Why this objective: it needs no labels and no negatives/quantiser (so it is a few
//! lines on the existing tape ops), the unmasked frames teach the CNN a spectral front end, and the masked
//! ones force the transformer to model the context (prosody, spectral envelope, the speaker's voice), which
//! is what an utterance-level emotion probe needs. (Masked prediction of acoustic features is the
//! Mockingjay / TERA / DeCoAR family of speech SSL objectives.)

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::mel::LogMel;
use crate::gpu::{Gpu, Tensor};
use crate::model::config::FeatExtractNorm;
use crate::model::student::serialize_f32;
use crate::model::wav2vec2::{Linear, TrainOptions};
use crate::model::{synthetic, Wav2Vec2, Wav2Vec2Config};
use crate::ops::adamw::{lr_at, AdamW, AdamWConfig, LrDecay};
use crate::tape::{Param, Tape};

/// Model-size presets of `make-teacher`.
pub const PRESETS: [&str; 1] = ["tiny"];

/// The `tiny` preset: the wav2vec 2.0 base layout shrunk: 7 conv layers of 64 channels with base's kernels
/// and strides (total stride 320, receptive field 400), group norm, post-LN, 4 layers of width 128, 4 heads,
/// FFN 512, a 32-tap positional convolution in 16 groups. About 0.9 M parameters (3.5 MB as f32).
pub fn preset(name: &str) -> Result<Wav2Vec2Config> {
    match name {
        "tiny" => Ok(Wav2Vec2Config {
            conv_dim: vec![64; 7],
            conv_kernel: vec![10, 3, 3, 3, 3, 2, 2],
            conv_stride: vec![5, 2, 2, 2, 2, 2, 2],
            conv_bias: false,
            feat_extract_norm: FeatExtractNorm::Group,
            hidden_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            intermediate_size: 512,
            num_conv_pos_embeddings: 32,
            num_conv_pos_embedding_groups: 16,
            ..Wav2Vec2Config::default()
        }),
        _ => bail!("unknown preset {name:?} (known: {})", PRESETS.join(", ")),
    }
}

/// Hyper-parameters of [`Pretrainer`].
#[derive(Clone, Debug, PartialEq)]
pub struct PretrainConfig {
    pub steps: usize,
    pub batch: usize,
    /// Crop length in frames (samples: `(frames - 1) * stride + receptive field`).
    pub crop_frames: usize,
    pub peak_lr: f64,
    pub warmup_frac: f64,
    pub weight_decay: f64,
    /// Probability that a frame starts a masked span.
    pub mask_prob: f64,
    pub mask_span: usize,
    pub n_mels: usize,
    pub seed: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            steps: 400,
            batch: 8,
            crop_frames: 75,
            peak_lr: 1e-3,
            warmup_frac: 0.1,
            weight_decay: 0.01,
            mask_prob: 0.08,
            mask_span: 5,
            n_mels: 40,
            seed: 0,
        }
    }
}

/// The model, its reconstruction head and optimiser, and the training clips.
pub struct Pretrainer {
    pub model: Wav2Vec2,
    pub head: Linear,
    opt: AdamW,
    mel: LogMel,
    /// Per-band mean and standard deviation of the log-mel targets.
    band_stats: Vec<(f32, f32)>,
    clips: Vec<Vec<f32>>,
    pub cfg: PretrainConfig,
    crop: usize,
}

impl Pretrainer {
    /// A randomly initialised model of `config` (seeded by `cfg.seed`) over `clips` (16 kHz, already
    /// normalised as the teacher's input will be).
    pub fn new(gpu: &Gpu, config: &Wav2Vec2Config, clips: Vec<Vec<f32>>, cfg: PretrainConfig) -> Result<Pretrainer> {
        if clips.is_empty() {
            bail!("no training clips");
        }
        if cfg.batch == 0 || cfg.crop_frames == 0 || cfg.n_mels == 0 || cfg.mask_span == 0 {
            bail!("batch, crop frames, mel bands and mask span must be positive");
        }
        let model = random_model(gpu, config, cfg.seed)?;
        let (stride, rf) = (config.total_stride(), config.receptive_field());
        let crop = (cfg.crop_frames - 1) * stride + rf;
        let mel = LogMel::new(rf, stride, cfg.n_mels, 16000.0);
        // Target statistics from up to 200 clips.
        let mut acc = vec![(0f64, 0f64, 0usize); cfg.n_mels];
        for clip in clips.iter().take(200) {
            let frames = config.frames(clip.len());
            for row in mel.compute(clip, frames).chunks_exact(cfg.n_mels) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    a.0 += v as f64;
                    a.1 += v as f64 * v as f64;
                    a.2 += 1;
                }
            }
        }
        let band_stats = acc
            .iter()
            .map(|&(s, ss, n)| {
                let m = s / n.max(1) as f64;
                ((m) as f32, ((ss / n.max(1) as f64 - m * m).max(1e-6)).sqrt() as f32)
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x4ead);
        let d = config.hidden_size;
        let bound = 1.0 / (d as f32).sqrt();
        let w: Vec<f32> = (0..cfg.n_mels * d).map(|_| rng.gen_range(-bound..bound)).collect();
        let head = Linear {
            weight: Param::new("head.weight", Tensor::from_slice(gpu, &w, &[cfg.n_mels, d])?),
            bias: Some(Param::new("head.bias", Tensor::zeros(gpu, &[cfg.n_mels])?)),
            half: None,
        };
        let values: Vec<Tensor> = model
            .parameters()
            .iter()
            .chain(head.parameters().iter())
            .map(|p| p.value().clone())
            .collect();
        let opt = AdamW::new(
            &values.iter().collect::<Vec<_>>(),
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        Ok(Pretrainer {
            model,
            head,
            opt,
            mel,
            band_stats,
            clips,
            cfg,
            crop,
        })
    }

    /// Input samples per crop.
    pub fn crop_samples(&self) -> usize {
        self.crop
    }

    /// One optimiser step (0-based `step` picks the learning rate and the batch); returns the loss.
    pub fn step(&mut self, step: usize) -> Result<f32> {
        let cfg = &self.cfg;
        let (b, l, t, m) = (cfg.batch, self.crop, cfg.crop_frames, cfg.n_mels);
        let stride = self.model.config.total_stride();
        let rf = self.model.config.receptive_field();
        let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(0x9e37_79b9).wrapping_add(step as u64 + 1));
        let mut input = Vec::with_capacity(b * l);
        let mut target = Vec::with_capacity(b * t * m);
        for _ in 0..b {
            let clip = &self.clips[rng.gen_range(0..self.clips.len())];
            let mut crop = vec![0f32; l];
            if clip.len() > l {
                let s = rng.gen_range(0..=clip.len() - l);
                crop.copy_from_slice(&clip[s..s + l]);
            } else {
                crop[..clip.len()].copy_from_slice(clip);
            }
            for row in self.mel.compute(&crop, t).chunks_exact(m) {
                target.extend(row.iter().zip(&self.band_stats).map(|(&v, &(mu, sd))| (v - mu) / sd));
            }
            let mut f = 0;
            while f < t {
                if rng.gen_bool(cfg.mask_prob) {
                    let end = (f + cfg.mask_span).min(t);
                    crop[f * stride..((end - 1) * stride + rf).min(l)].fill(0.0);
                    f = end;
                } else {
                    f += 1;
                }
            }
            input.extend_from_slice(&crop);
        }
        let gpu = &self.model.gpu;
        let tape = Tape::with_seed(cfg.seed ^ step as u64);
        let wave = tape.constant(Tensor::from_slice(gpu, &input, &[b, l, 1])?);
        let out = self.model.forward_tape(&tape, &wave, TrainOptions::default())?;
        if out.last_hidden_state.shape()[1] != t {
            bail!(
                "model gives {} frames for a crop of {t}",
                out.last_hidden_state.shape()[1]
            );
        }
        let pred = self.head.forward(&tape, &out.last_hidden_state)?;
        let loss = tape.l1_loss(&pred, &Tensor::from_slice(gpu, &target, &[b, t, m])?)?;
        tape.backward(&loss)?;
        let params: Vec<_> = self
            .model
            .parameters()
            .into_iter()
            .chain(self.head.parameters())
            .collect();
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad().context("a parameter got no gradient"))
            .collect::<Result<_>>()?;
        let values: Vec<&Tensor> = params.iter().map(|p| p.value()).collect();
        let lr = lr_at(step, cfg.steps, cfg.warmup_frac, cfg.peak_lr, LrDecay::Linear);
        self.opt.step(&values, &grads.iter().collect::<Vec<_>>(), lr)?;
        params.iter().for_each(|p| p.zero_grad());
        Ok(loss.value().to_vec()?[0])
    }
}

/// A randomly initialised model (through the real loader: a temporary checkpoint folder).
pub fn random_model(gpu: &Gpu, config: &Wav2Vec2Config, seed: u64) -> Result<Wav2Vec2> {
    let dir = std::env::temp_dir().join(format!(
        "wgpu-mlkd-init-{}-{seed}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    synthetic::write_random_checkpoint(&dir, config, seed)?;
    let model = Wav2Vec2::load(gpu, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    model
}

/// Writes `model` as a Hugging Face folder: model.safetensors (f32), then config.json with `extra` keys
/// merged in, and a preprocessor_config.json that asks for normalised input. config.json is removed first
/// and written last, each file atomically, so an interrupted save never leaves a loadable mismatch.
pub fn save_teacher(model: &Wav2Vec2, dir: &Path, extra: serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config_path = dir.join("config.json");
    if config_path.exists() {
        std::fs::remove_file(&config_path).with_context(|| format!("cannot remove {}", config_path.display()))?;
    }
    let mut data = Vec::new();
    for p in model.parameters() {
        data.push((p.name.clone(), p.value().shape().to_vec(), p.value().to_vec()?));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::fsutil::atomic_write(&dir.join("model.safetensors"), &serialize_f32(&data, meta)?)?;
    let pre = serde_json::json!({
        "do_normalize": true,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": false,
        "sampling_rate": 16000
    });
    crate::fsutil::atomic_write(
        &dir.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&pre)?.as_bytes(),
    )?;
    let mut json = serde_json::to_value(&model.config)?;
    json["model_type"] = "wav2vec2".into();
    json["architectures"] = serde_json::json!(["Wav2Vec2Model"]);
    if let (Some(obj), Some(more)) = (json.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            obj.insert(k.clone(), v.clone());
        }
    }
    crate::fsutil::atomic_write(&config_path, serde_json::to_string_pretty(&json)?.as_bytes())
}

/// Mean-pooled hidden states `layers` (transformers' numbering) of equal-length clips, concatenated per
/// clip: `[clips][layers.len() * D]`. Runs in batches of `batch` without gradients.
pub fn pooled_features(model: &Wav2Vec2, clips: &[Vec<f32>], layers: &[usize], batch: usize) -> Result<Vec<Vec<f32>>> {
    let Some(l) = clips.first().map(|c| c.len()) else {
        return Ok(Vec::new());
    };
    if clips.iter().any(|c| c.len() != l) {
        bail!("pooled_features: clips must have equal lengths");
    }
    let d = model.config.hidden_size;
    let mut out = Vec::with_capacity(clips.len());
    for chunk in clips.chunks(batch.max(1)) {
        let b = chunk.len();
        let flat: Vec<f32> = chunk.iter().flatten().copied().collect();
        let tape = Tape::no_grad();
        let wave = tape.constant(Tensor::from_slice(&model.gpu, &flat, &[b, l, 1])?);
        let vars = model.forward_tape(&tape, &wave, TrainOptions::default())?;
        let mut feats = vec![Vec::with_capacity(layers.len() * d); b];
        for &layer in layers {
            let h = vars
                .hidden_states
                .get(layer)
                .with_context(|| format!("no hidden state {layer}"))?
                .value()
                .to_vec()?;
            let t = h.len() / (b * d);
            for (i, f) in feats.iter_mut().enumerate() {
                let mut mean = vec![0f64; d];
                for row in h[i * t * d..(i + 1) * t * d].chunks_exact(d) {
                    mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
                }
                f.extend(mean.iter().map(|m| (m / t as f64) as f32));
            }
        }
        out.extend(feats);
    }
    Ok(out)
}

/// Accuracy on `test` of a multinomial logistic-regression probe trained on `train` (features standardised
/// by the training set's mean and deviation; full-batch gradient descent, `steps` steps of rate 0.5,
/// L2 1e-3). Plain CPU, deterministic.
pub fn probe_accuracy(train: &[(Vec<f32>, usize)], test: &[(Vec<f32>, usize)], classes: usize, steps: usize) -> f64 {
    let Some(dim) = train.first().map(|(f, _)| f.len()) else {
        return 0.0;
    };
    let n = train.len() as f64;
    let mut mean = vec![0f64; dim];
    let mut sd = vec![0f64; dim];
    for (f, _) in train {
        mean.iter_mut().zip(f).for_each(|(m, &v)| *m += v as f64 / n);
    }
    for (f, _) in train {
        sd.iter_mut()
            .zip(f)
            .zip(&mean)
            .for_each(|((s, &v), m)| *s += (v as f64 - m).powi(2) / n);
    }
    sd.iter_mut().for_each(|s| *s = s.sqrt().max(1e-8));
    let z = |f: &[f32]| -> Vec<f64> {
        f.iter()
            .zip(&mean)
            .zip(&sd)
            .map(|((&v, m), s)| (v as f64 - m) / s)
            .collect()
    };
    let xs: Vec<(Vec<f64>, usize)> = train.iter().map(|(f, y)| (z(f), *y)).collect();
    let mut w = vec![vec![0f64; dim + 1]; classes];
    let logits = |w: &[Vec<f64>], x: &[f64]| -> Vec<f64> {
        w.iter()
            .map(|wc| wc[dim] + wc[..dim].iter().zip(x).map(|(a, b)| a * b).sum::<f64>())
            .collect()
    };
    for _ in 0..steps {
        let mut g = vec![vec![0f64; dim + 1]; classes];
        for (x, y) in &xs {
            let l = logits(&w, x);
            let mx = l.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = l.iter().map(|v| (v - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            for c in 0..classes {
                let d = e[c] / s - if c == *y { 1.0 } else { 0.0 };
                g[c].iter_mut().zip(x).for_each(|(gi, xi)| *gi += d * xi / n);
                g[c][dim] += d / n;
            }
        }
        for (wc, gc) in w.iter_mut().zip(&g) {
            for (i, (wi, gi)) in wc.iter_mut().zip(gc).enumerate() {
                let l2 = if i < dim { 1e-3 * *wi } else { 0.0 };
                *wi -= 0.5 * (gi + l2);
            }
        }
    }
    let correct = test
        .iter()
        .filter(|(f, y)| {
            let l = logits(&w, &z(f));
            (0..classes).max_by(|&a, &b| l[a].total_cmp(&l[b])) == Some(*y)
        })
        .count();
    correct as f64 / test.len().max(1) as f64
}

/// The probe protocol used by `make-teacher` and the tests: synthetic speakers `first..first + speakers`
/// of population `seed` (not those the teacher was trained on), `per_class` texts each, crops of `seconds`
/// (centred, zero-padded), normalised; a probe is trained on the first half of the speakers and tested on
/// the rest. Returns the accuracy for each of `layers` (mean-pooled hidden state; chance is 1/4).
pub fn synthetic_probe(
    model: &Wav2Vec2,
    first: usize,
    speakers: usize,
    per_class: usize,
    seconds: f64,
    seed: u64,
    layers: &[usize],
) -> Result<Vec<f64>> {
    use crate::data::synth::{utterance, Emotion, Speaker};
    let len = (seconds * 16000.0) as usize;
    let mut clips = Vec::new();
    let mut labels = Vec::new();
    let mut spk = Vec::new();
    for s in first..first + speakers {
        let speaker = Speaker::new(s, seed);
        for (c, e) in Emotion::ALL.iter().enumerate() {
            for text in 0..per_class {
                let x = utterance(&speaker, *e, 1000 + text, seconds, seed);
                let mut crop = vec![0f32; len];
                if x.len() >= len {
                    let off = (x.len() - len) / 2;
                    crop.copy_from_slice(&x[off..off + len]);
                } else {
                    let off = (len - x.len()) / 2;
                    crop[off..off + x.len()].copy_from_slice(&x);
                }
                crate::data::wav::normalize(&mut crop);
                clips.push(crop);
                labels.push(c);
                spk.push(s);
            }
        }
    }
    let feats = pooled_features(model, &clips, layers, 16)?;
    let d = model.config.hidden_size;
    let split = first + speakers / 2;
    Ok((0..layers.len())
        .map(|li| {
            let (mut train, mut test) = (Vec::new(), Vec::new());
            for ((f, &y), &s) in feats.iter().zip(&labels).zip(&spk) {
                let item = (f[li * d..(li + 1) * d].to_vec(), y);
                if s < split {
                    train.push(item);
                } else {
                    test.push(item);
                }
            }
            probe_accuracy(&train, &test, Emotion::ALL.len(), 300)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_separates_separable_classes() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut make = |n: usize| -> Vec<(Vec<f32>, usize)> {
            (0..n)
                .map(|i| {
                    let y = i % 3;
                    let f = (0..5)
                        .map(|j| if j == y { 2.0 } else { 0.0 } + rng.gen_range(-1.0f32..1.0))
                        .collect();
                    (f, y)
                })
                .collect()
        };
        let (train, test) = (make(90), make(60));
        let acc = probe_accuracy(&train, &test, 3, 200);
        assert!(acc > 0.9, "{acc}");
    }

    #[test]
    fn tiny_preset_is_valid_and_small() {
        let c = preset("tiny").unwrap();
        c.validate().unwrap();
        assert_eq!((c.total_stride(), c.receptive_field()), (320, 400));
        let n: usize = c
            .parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert!((500_000..2_000_000).contains(&n), "{n}");
        assert!(preset("huge").is_err());
    }

    /// A few steps on tiny shapes lower the loss, and the saved folder loads as a teacher.
    #[test]
    fn pretraining_steps_lower_the_loss_and_save_loads() {
        let gpu = crate::gpu::test_gpu();
        let config = Wav2Vec2Config {
            conv_dim: vec![16, 16, 16],
            conv_kernel: vec![10, 3, 3],
            conv_stride: vec![5, 4, 4],
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            num_conv_pos_embeddings: 4,
            num_conv_pos_embedding_groups: 2,
            ..Wav2Vec2Config::default()
        };
        let sp = crate::data::synth::Speaker::new(0, 0);
        let clips: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                let mut x = crate::data::synth::utterance(&sp, crate::data::synth::Emotion::ALL[i], i, 0.6, 0);
                crate::data::wav::normalize(&mut x);
                x
            })
            .collect();
        let cfg = PretrainConfig {
            steps: 12,
            batch: 2,
            crop_frames: 20,
            peak_lr: 3e-3,
            warmup_frac: 0.0,
            n_mels: 8,
            ..PretrainConfig::default()
        };
        let mut p = Pretrainer::new(gpu, &config, clips, cfg).unwrap();
        let losses: Vec<f32> = (0..12).map(|s| p.step(s).unwrap()).collect();
        eprintln!("losses {losses:?}");
        let first = losses[..3].iter().sum::<f32>();
        let last = losses[9..].iter().sum::<f32>();
        assert!(last < first, "{losses:?}");
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-pretrain-{}", std::process::id()));
        save_teacher(&p.model, &dir, serde_json::json!({"wgpu_mlkd": {"steps": 12}})).unwrap();
        let back = Wav2Vec2::load(gpu, &dir).unwrap();
        assert_eq!(back.config, config);
        assert!(crate::model::teacher_normalizes(&dir).unwrap());
        let a = p
            .model
            .forward(&vec![0.1; 2000])
            .unwrap()
            .last_hidden_state
            .to_vec()
            .unwrap();
        let b = back
            .forward(&vec![0.1; 2000])
            .unwrap()
            .last_hidden_state
            .to_vec()
            .unwrap();
        assert_eq!(a, b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
