//! `config.json` of a Hugging Face wav2vec 2.0 checkpoint: the fields the forward pass depends on, with
//! transformers' defaults, and validation that turns every unsupported value into a clear error.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// Feature-encoder normalisation (`feat_extract_norm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatExtractNorm {
    /// GroupNorm(C, C) after the first conv only (wav2vec2-base, the original large).
    Group,
    /// LayerNorm(C) after every conv (lv60, XLS-R).
    Layer,
}

/// The wav2vec 2.0 hyper-parameters. Field names are transformers' `Wav2Vec2Config` names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wav2Vec2Config {
    #[serde(default = "defaults::conv_dim")]
    pub conv_dim: Vec<usize>,
    #[serde(default = "defaults::conv_kernel")]
    pub conv_kernel: Vec<usize>,
    #[serde(default = "defaults::conv_stride")]
    pub conv_stride: Vec<usize>,
    #[serde(default)]
    pub conv_bias: bool,
    #[serde(default = "defaults::feat_extract_norm")]
    pub feat_extract_norm: FeatExtractNorm,
    #[serde(default = "defaults::gelu")]
    pub feat_extract_activation: String,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::gelu")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::num_conv_pos_embeddings")]
    pub num_conv_pos_embeddings: usize,
    #[serde(default = "defaults::num_conv_pos_embedding_groups")]
    pub num_conv_pos_embedding_groups: usize,
    #[serde(default)]
    pub do_stable_layer_norm: bool,
}

mod defaults {
    use super::FeatExtractNorm;
    pub fn conv_dim() -> Vec<usize> {
        vec![512; 7]
    }
    pub fn conv_kernel() -> Vec<usize> {
        vec![10, 3, 3, 3, 3, 2, 2]
    }
    pub fn conv_stride() -> Vec<usize> {
        vec![5, 2, 2, 2, 2, 2, 2]
    }
    pub fn feat_extract_norm() -> FeatExtractNorm {
        FeatExtractNorm::Group
    }
    pub fn gelu() -> String {
        "gelu".into()
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn num_conv_pos_embeddings() -> usize {
        128
    }
    pub fn num_conv_pos_embedding_groups() -> usize {
        16
    }
}

/// Activation names that mean the exact erf GELU in transformers' ACT2FN.
const EXACT_GELU: &[&str] = &["gelu", "gelu_python"];

impl Default for Wav2Vec2Config {
    /// wav2vec2-base.
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl Wav2Vec2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
        let Some(obj) = raw.as_object() else {
            bail!("expected a JSON object")
        };
        if let Some(mt) = obj.get("model_type").and_then(|v| v.as_str()) {
            if mt != "wav2vec2" {
                bail!("model_type is {mt:?}; only \"wav2vec2\" checkpoints are supported");
            }
        }
        // Features of the wav2vec2 family that change the forward pass and are not implemented: refuse them
        // instead of computing a wrong answer.
        for (key, off) in [
            ("add_adapter", serde_json::json!(false)),
            ("adapter_attn_dim", serde_json::Value::Null),
        ] {
            if let Some(v) = obj.get(key) {
                if *v != off {
                    bail!("{key} = {v} is not supported (adapters change the forward pass)");
                }
            }
        }
        let cfg: Wav2Vec2Config = match serde_json::from_value(raw.clone()) {
            Ok(c) => c,
            Err(e) => {
                // serde does not name the offending field: find it by parsing each field on its own.
                let bad = obj.iter().find(|(k, v)| {
                    serde_json::from_value::<Wav2Vec2Config>(serde_json::json!({ k.as_str(): v })).is_err()
                });
                match bad {
                    Some((k, v)) => bail!("invalid field {k} = {v}: {e}"),
                    None => bail!("invalid field: {e}"),
                }
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.conv_dim.len();
        if n == 0 {
            bail!("conv_dim is empty");
        }
        if self.conv_kernel.len() != n || self.conv_stride.len() != n {
            bail!(
                "conv_dim, conv_kernel and conv_stride must have equal lengths (found {}, {}, {})",
                n,
                self.conv_kernel.len(),
                self.conv_stride.len()
            );
        }
        for (name, v) in [
            ("conv_dim", &self.conv_dim),
            ("conv_kernel", &self.conv_kernel),
            ("conv_stride", &self.conv_stride),
        ] {
            if v.contains(&0) {
                bail!("{name} contains 0: {v:?}");
            }
        }
        for (name, act) in [
            ("feat_extract_activation", &self.feat_extract_activation),
            ("hidden_act", &self.hidden_act),
        ] {
            if !EXACT_GELU.contains(&act.as_str()) {
                bail!(
                    "{name} = {act:?} is not supported (supported: {})",
                    EXACT_GELU.join(", ")
                );
            }
        }
        let (d, h) = (self.hidden_size, self.num_attention_heads);
        if d == 0 || h == 0 || self.intermediate_size == 0 {
            bail!("hidden_size, num_attention_heads and intermediate_size must be positive");
        }
        if d % h != 0 {
            bail!("num_attention_heads = {h} does not divide hidden_size = {d}");
        }
        let (k, g) = (self.num_conv_pos_embeddings, self.num_conv_pos_embedding_groups);
        if k == 0 || g == 0 || d % g != 0 {
            bail!("num_conv_pos_embedding_groups = {g} must divide hidden_size = {d} (and num_conv_pos_embeddings = {k} be positive)");
        }
        // Sizes far beyond any wav2vec 2.0 (XLS-R 2B: hidden 1920, 48 layers) are a corrupt file: refuse them
        // before they overflow size computations or ask for absurd allocations.
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            ("num_conv_pos_embeddings", self.num_conv_pos_embeddings, 1 << 12),
            ("number of conv layers", n, 64),
        ] {
            if v > max {
                bail!("{name} = {v} is beyond what this program supports (at most {max})");
            }
        }
        for (name, list, max) in [
            ("conv_dim", &self.conv_dim, 1usize << 16),
            ("conv_kernel", &self.conv_kernel, 1 << 12),
            ("conv_stride", &self.conv_stride, 1 << 12),
        ] {
            if let Some(v) = list.iter().find(|&&v| v > max) {
                bail!("{name} contains {v}, beyond what this program supports (at most {max})");
            }
        }
        let mut rf = 1usize;
        for (k, s) in self.conv_kernel.iter().zip(&self.conv_stride).rev() {
            rf = match (rf - 1).checked_mul(*s).and_then(|x| x.checked_add(*k)) {
                Some(x) if x <= 1 << 24 => x,
                _ => bail!("the conv layers' receptive field is beyond 2^24 samples (conv_kernel / conv_stride)"),
            };
        }
        let stride = self.conv_stride.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
        if stride.is_none_or(|s| s > 1 << 24) {
            bail!("the conv layers' total stride (product of conv_stride) is beyond 2^24 samples");
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            bail!("layer_norm_eps = {} must be a positive number", self.layer_norm_eps);
        }
        Ok(())
    }

    /// Samples per output frame (product of the conv strides; 320 for base).
    pub fn total_stride(&self) -> usize {
        self.conv_stride.iter().product()
    }

    /// Samples one output frame sees (400 for base).
    pub fn receptive_field(&self) -> usize {
        let mut rf = 1;
        for (k, s) in self.conv_kernel.iter().zip(&self.conv_stride).rev() {
            rf = (rf - 1) * s + k;
        }
        rf
    }

    /// Output frames for `samples` input samples (0 when shorter than the receptive field).
    pub fn frames(&self, samples: usize) -> usize {
        let mut t = samples;
        for (k, s) in self.conv_kernel.iter().zip(&self.conv_stride) {
            if t < *k {
                return 0;
            }
            t = (t - k) / s + 1;
        }
        t
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The longest input the forward pass takes in one piece on a GPU whose storage bindings hold at most
    /// `max_binding_bytes`, in 16 kHz samples: the waveform and every `[frames, width]` activation (width: the
    /// hidden size or the last conv's channels) must each fit one binding (the CNN, the feed-forward and
    /// attention are split in chunks; these are not).
    pub fn max_samples(&self, max_binding_bytes: u64) -> usize {
        let max = usize::try_from(max_binding_bytes).unwrap_or(usize::MAX);
        let width = self.hidden_size.max(*self.conv_dim.last().unwrap_or(&1));
        let max_frames = max / (4 * width);
        // Samples giving at most max_frames frames: (max_frames - 1) strides plus one receptive field.
        let by_frames = (max_frames.saturating_sub(1))
            .saturating_mul(self.total_stride())
            .saturating_add(self.receptive_field() + self.total_stride() - 1);
        by_frames.min(max / 4)
    }

    pub fn conv_out(&self) -> usize {
        *self.conv_dim.last().expect("validated non-empty")
    }

    /// Every checkpoint tensor of a base model with these hyper-parameters, by its transformers name (no
    /// prefix, new weight-norm naming), with its shape. The loader takes exactly these.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let mut c_in = 1;
        for (i, (&c, &k)) in self.conv_dim.iter().zip(&self.conv_kernel).enumerate() {
            let name = format!("feature_extractor.conv_layers.{i}");
            out.push((format!("{name}.conv.weight"), vec![c, c_in, k]));
            if self.conv_bias {
                out.push((format!("{name}.conv.bias"), vec![c]));
            }
            if self.feat_extract_norm == FeatExtractNorm::Layer || i == 0 {
                out.push((format!("{name}.layer_norm.weight"), vec![c]));
                out.push((format!("{name}.layer_norm.bias"), vec![c]));
            }
            c_in = c;
        }
        out.push(("feature_projection.layer_norm.weight".into(), vec![c_in]));
        out.push(("feature_projection.layer_norm.bias".into(), vec![c_in]));
        out.push(("feature_projection.projection.weight".into(), vec![d, c_in]));
        out.push(("feature_projection.projection.bias".into(), vec![d]));
        let (k, g) = (self.num_conv_pos_embeddings, self.num_conv_pos_embedding_groups);
        let pos = "encoder.pos_conv_embed.conv";
        out.push((format!("{pos}.parametrizations.weight.original0"), vec![1, 1, k]));
        out.push((format!("{pos}.parametrizations.weight.original1"), vec![d, d / g, k]));
        out.push((format!("{pos}.bias"), vec![d]));
        out.push(("encoder.layer_norm.weight".into(), vec![d]));
        out.push(("encoder.layer_norm.bias".into(), vec![d]));
        for n in 0..self.num_hidden_layers {
            let l = format!("encoder.layers.{n}");
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push((format!("{l}.attention.{p}.weight"), vec![d, d]));
                out.push((format!("{l}.attention.{p}.bias"), vec![d]));
            }
            for ln in ["layer_norm", "final_layer_norm"] {
                out.push((format!("{l}.{ln}.weight"), vec![d]));
                out.push((format!("{l}.{ln}.bias"), vec![d]));
            }
            out.push((format!("{l}.feed_forward.intermediate_dense.weight"), vec![f, d]));
            out.push((format!("{l}.feed_forward.intermediate_dense.bias"), vec![f]));
            out.push((format!("{l}.feed_forward.output_dense.weight"), vec![d, f]));
            out.push((format!("{l}.feed_forward.output_dense.bias"), vec![d]));
        }
        out
    }

    /// Parameter count of the model these hyper-parameters describe (without task heads).
    pub fn num_parameters(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Multiply-adds x 2 of one forward pass over `samples` samples (convs, linears and attention).
    pub fn forward_flops(&self, samples: usize) -> f64 {
        let mut flops = 0.0;
        let (mut t, mut c_in) = (samples, 1);
        for ((&c, &k), &s) in self.conv_dim.iter().zip(&self.conv_kernel).zip(&self.conv_stride) {
            if t < k {
                return flops;
            }
            t = (t - k) / s + 1;
            flops += 2.0 * (t * c * c_in * k) as f64;
            c_in = c;
        }
        let (t, d, f) = (t as f64, self.hidden_size as f64, self.intermediate_size as f64);
        let k = self.num_conv_pos_embeddings as f64;
        flops += 2.0 * t * c_in as f64 * d; // projection
        flops += 2.0 * t * d * (d / self.num_conv_pos_embedding_groups as f64) * k; // positional conv
        let per_layer = 2.0 * t * (4.0 * d * d + 2.0 * d * f) + 4.0 * t * t * d;
        flops + self.num_hidden_layers as f64 * per_layer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_wav2vec2_base() {
        let c = Wav2Vec2Config::default();
        c.validate().unwrap();
        assert_eq!(c.total_stride(), 320);
        assert_eq!(c.receptive_field(), 400);
        assert_eq!(c.frames(16000), 49);
        assert_eq!(c.frames(399), 0);
        assert_eq!(c.frames(400), 1);
        // The spec's figure for base: 94.4 M parameters (masked_spec_embed excluded).
        assert_eq!((c.num_parameters() as f64 / 1e5).round() / 10.0, 94.4);
    }

    #[test]
    fn unsupported_values_are_clear_errors() {
        let bad = [
            (r#"{"hidden_act": "relu"}"#, "hidden_act"),
            (r#"{"feat_extract_norm": "batch"}"#, "feat_extract_norm"),
            (r#"{"hidden_size": 770}"#, "does not divide"),
            (r#"{"conv_kernel": [10, 3]}"#, "equal lengths"),
            (r#"{"num_conv_pos_embedding_groups": 7}"#, "must divide"),
            (r#"{"model_type": "hubert"}"#, "model_type"),
            (r#"{"adapter_attn_dim": 16}"#, "adapter"),
            (r#"{"layer_norm_eps": -1}"#, "layer_norm_eps"),
            (r#"{"hidden_size": "wide"}"#, "invalid field"),
            ("[1, 2]", "JSON object"),
            ("{", "JSON"),
        ];
        for (json, needle) in bad {
            let err = format!("{:#}", Wav2Vec2Config::from_json(json).unwrap_err());
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
