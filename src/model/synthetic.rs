//! Randomly initialised checkpoints in Hugging Face layout, for benches and tests at real model dimensions
//! where no trained weights are available (no downloads here). Written through the same files the loader
//! reads, so they exercise the real loading path.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, Result};
use rand::{Rng, SeedableRng};

use super::config::Wav2Vec2Config;

/// Writes `dir/config.json` and `dir/model.safetensors` for `config`, with torch-like initial values
/// (uniform in ±1/sqrt(fan_in), norm scales near 1), seeded.
pub fn write_random_checkpoint(dir: &Path, config: &Wav2Vec2Config, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut json = serde_json::to_value(config)?;
    json["model_type"] = "wav2vec2".into();
    crate::fsutil::atomic_write(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, shape) in config.parameter_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") || name.ends_with("original0") {
            (0..n).map(|_| 1.0 + rng.gen_range(-0.1..0.1)).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| rng.gen_range(-0.02..0.02)).collect()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let a = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.gen_range(-a..a)).collect()
        };
        tensors.push((name, shape, data));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let v = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )?;
            Ok((name.clone(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::fsutil::atomic_write(
        &dir.join("model.safetensors"),
        &safetensors::serialize(views, Some(meta))?,
    )
}
