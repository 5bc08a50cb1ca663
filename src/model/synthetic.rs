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
    write_random(dir, config, &[], seed)
}

/// A random MLKD student folder: `config` (its layers are the student's) plus prediction heads for
/// `target_layers`, recorded in config.json as the student loader expects.
pub fn write_random_student(dir: &Path, config: &Wav2Vec2Config, target_layers: &[usize], seed: u64) -> Result<()> {
    write_random(dir, config, target_layers, seed)
}

fn write_random(dir: &Path, config: &Wav2Vec2Config, target_layers: &[usize], seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut json = serde_json::to_value(config)?;
    json["model_type"] = "wav2vec2".into();
    if !target_layers.is_empty() {
        json["mlkd_target_layers"] = serde_json::to_value(target_layers)?;
    }
    crate::fsutil::atomic_write(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;

    let d = config.hidden_size;
    let mut shapes = config.parameter_shapes();
    if !target_layers.is_empty() {
        let n = target_layers.len();
        shapes.push(("mlkd_heads.proj.weight".into(), vec![d * n, d]));
        shapes.push(("mlkd_heads.proj.bias".into(), vec![d * n]));
        for i in 0..n {
            shapes.push((format!("mlkd_heads.out.{i}.weight"), vec![d, d]));
            shapes.push((format!("mlkd_heads.out.{i}.bias"), vec![d]));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, shape) in shapes {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::model::student::Student;
    use crate::model::Wav2Vec2;

    #[test]
    fn random_checkpoints_load_through_the_real_loaders() {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-synth-{}", std::process::id()));
        let config = Wav2Vec2Config {
            conv_dim: vec![8, 8],
            conv_kernel: vec![10, 3],
            conv_stride: vec![5, 2],
            hidden_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 3,
            intermediate_size: 20,
            num_conv_pos_embeddings: 4,
            num_conv_pos_embedding_groups: 2,
            ..Wav2Vec2Config::default()
        };
        write_random_checkpoint(&dir.join("teacher"), &config, 1).unwrap();
        let teacher = Wav2Vec2::load(test_gpu(), &dir.join("teacher")).unwrap();
        assert_eq!(teacher.parameters().len(), config.parameter_shapes().len());
        write_random_student(&dir.join("student"), &config, &[1, 2], 1).unwrap();
        let student = Student::load(test_gpu(), &dir.join("student")).unwrap();
        assert_eq!(student.heads.target_layers, vec![1, 2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
