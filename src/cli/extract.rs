//! `wgpu-mlkd extract`: the teacher's hidden states for one WAV file, as safetensors. On an MLKD student
//! folder (config.json with `mlkd_target_layers`) also its heads' predictions, `pred.{l}` for target layer l.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use sha2::{Digest, Sha256};

use super::Cli;
use crate::data::wav;
use crate::model::student::Student;
use crate::model::{teacher_normalizes, Wav2Vec2};
use crate::tape::Tape;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face wav2vec 2.0 folder: config.json + model.safetensors (or a sharded index); an MLKD
    /// student folder also writes its predictions pred.{l}
    #[arg(long, value_name = "DIR")]
    teacher: PathBuf,
    /// Input WAV (any rate, bit depth and channel count; resampled to 16 kHz mono)
    #[arg(long, value_name = "WAV")]
    input: PathBuf,
    /// Output safetensors file
    #[arg(long, value_name = "OUT.safetensors")]
    out: PathBuf,
    /// Hidden states to write: `all` or a comma-separated list such as 0,4,8,12 (0 = input of layer 1)
    #[arg(long, default_value = "all")]
    layers: String,
    /// Normalise the waveform to zero mean, unit variance (default: the teacher's preprocessor_config.json)
    #[arg(long, overrides_with = "no_normalize")]
    normalize: bool,
    /// Do not normalise the waveform
    #[arg(long, overrides_with = "normalize")]
    no_normalize: bool,
    /// Store the transformer's linear weights in f16 (the weights take about 55% of their f32 memory;
    /// products still summed in f32; hidden states within about 1e-3 of f32, relative to the largest value)
    #[arg(long)]
    f16: bool,
}

/// Parses `all` or `0,4,8,12` against a model with `n` layers (valid indices 0..=n).
pub fn parse_layers(spec: &str, n: usize) -> Result<Vec<usize>> {
    if spec.trim() == "all" {
        return Ok((0..=n).collect());
    }
    let mut out = Vec::new();
    for part in spec.split(',') {
        let i: usize = part
            .trim()
            .parse()
            .with_context(|| format!("--layers: {part:?} is not a layer number"))?;
        if i > n {
            bail!("--layers: {i} is beyond the model's {n} layers (valid: 0..={n})");
        }
        if !out.contains(&i) {
            out.push(i);
        }
    }
    Ok(out)
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    crate::fsutil::check_output_file(&args.out)?;
    let config_bytes = std::fs::read(args.teacher.join("config.json"))
        .with_context(|| format!("cannot read {}", args.teacher.join("config.json").display()))?;
    let audio = wav::read_wav(&args.input)?;
    let source_rate = audio.sample_rate;
    let mut samples = crate::data::resample::resample(&audio.samples, audio.sample_rate, 16000);
    let normalize = match (args.normalize, args.no_normalize) {
        (true, _) => true,
        (_, true) => false,
        _ => teacher_normalizes(&args.teacher)?,
    };
    if normalize {
        wav::normalize(&mut samples);
    }

    let gpu = cli.open_gpu()?;
    // A student folder (config.json with mlkd_target_layers) also yields its heads' predictions. A config.json
    // that is not valid JSON is left to the teacher loader, which reports it.
    let is_student =
        serde_json::from_slice::<serde_json::Value>(&config_bytes).is_ok_and(|j| j.get("mlkd_target_layers").is_some());
    let mut student = if is_student {
        Some(Student::load(&gpu, &args.teacher)?)
    } else {
        None
    };
    let mut teacher = None;
    let model: &mut Wav2Vec2 = match &mut student {
        Some(s) => &mut s.encoder,
        None => teacher.insert(Wav2Vec2::load(&gpu, &args.teacher)?),
    };
    // Frozen (convolutions packed once; bit-identical), with f16 linear weights if asked.
    model.freeze_with(args.f16)?;
    let model = &*model;
    let layers = parse_layers(&args.layers, model.config.num_hidden_layers)?;
    let out = model
        .forward(&samples)
        .with_context(|| format!("running the teacher on {}", args.input.display()))?;
    // The heads read the last student layer: the same as Student::forward with TrainOptions::default(), on
    // the encoder's (chunked, long-audio-safe) inference path.
    let preds = match &student {
        Some(s) => {
            let tape = Tape::no_grad();
            let last = out.hidden_states.last().expect("at least hidden_states[0]").clone();
            let preds = s.heads.forward(&tape, &tape.constant(last))?;
            s.heads
                .target_layers
                .iter()
                .zip(preds)
                .map(|(&l, p)| (l, p.value().clone()))
                .collect()
        }
        None => Vec::new(),
    };

    let frames = out.extract_features.shape()[1];
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    let mut push = |name: String, t: &crate::gpu::Tensor| -> Result<()> {
        let shape = t.shape()[1..].to_vec();
        tensors.push((name, t.to_vec()?, shape));
        Ok(())
    };
    push("extract_features".into(), &out.extract_features)?;
    push("last_hidden_state".into(), &out.last_hidden_state)?;
    for &i in &layers {
        push(format!("hidden_states.{i}"), &out.hidden_states[i])?;
    }
    for (l, p) in &preds {
        push(format!("pred.{l}"), p)?;
    }
    for (name, data, _) in &tensors {
        if let Some(j) = data.iter().position(|v| !v.is_finite()) {
            bail!("{name} has a non-finite value at element {j}: the teacher or its input is broken");
        }
    }
    let metadata = HashMap::from([
        ("format".to_string(), "wgpu-mlkd-extract".to_string()),
        (
            "teacher_config_sha256".to_string(),
            format!("{:x}", Sha256::digest(&config_bytes)),
        ),
        ("frames".to_string(), frames.to_string()),
        ("sample_rate".to_string(), "16000".to_string()),
        ("source_sample_rate".to_string(), source_rate.to_string()),
        ("normalized".to_string(), normalize.to_string()),
        (
            "linear_weights".to_string(),
            if args.f16 { "f16" } else { "f32" }.to_string(),
        ),
        ("input".to_string(), args.input.display().to_string()),
    ]);
    let views = tensors
        .iter()
        .map(|(name, data, shape)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))?;
    crate::fsutil::atomic_write(&args.out, &bytes)?;
    eprintln!(
        "{}: {} frames, {} tensors -> {} (adapter: {})",
        args.input.display(),
        frames,
        tensors.len(),
        args.out.display(),
        gpu.adapter().name
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_layers;

    #[test]
    fn layer_lists() {
        assert_eq!(parse_layers("all", 3).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_layers("0, 3,3", 3).unwrap(), vec![0, 3]);
        assert!(parse_layers("4", 3).is_err());
        assert!(parse_layers("x", 3).is_err());
    }
}
