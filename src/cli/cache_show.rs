//! `wgpu-mlkd cache-show`: what a teacher cache holds; `--verify` checks it; `--id --out` exports one
//! utterance's targets in `extract`'s keys and layout.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::Cli;
use crate::data::cache::TeacherCache;

#[derive(clap::Args)]
pub struct Args {
    /// Cache directory (made by cache-teacher or cache-merge)
    #[arg(value_name = "CACHE")]
    cache: PathBuf,
    /// Check every shard's SHA-256, every value, and the manifest against the shards
    #[arg(long)]
    verify: bool,
    /// Utterance to export (with --out)
    #[arg(long, value_name = "ID", requires = "out")]
    id: Option<String>,
    /// Export file: `hidden_states.{l}` as f32 [frames, hidden], as `extract` writes them
    #[arg(long, value_name = "FILE.safetensors", requires = "id")]
    out: Option<PathBuf>,
}

pub fn run(_cli: &Cli, args: &Args) -> Result<()> {
    let cache = TeacherCache::open(&args.cache)?;
    let m = cache.manifest();
    let frames: u64 = m.utterances.iter().map(|u| u.frames as u64).sum();
    let samples: u64 = m.utterances.iter().map(|u| u.samples).sum();
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    let t = &m.teacher;
    println!(
        "cache:        {} (format {} v{})",
        args.cache.display(),
        m.format,
        m.version
    );
    println!(
        "teacher:      {} layers, hidden size {}, input {}normalised, {} linear weights",
        t.num_hidden_layers,
        t.hidden_size,
        if t.normalize { "" } else { "not " },
        if t.f16_weights { "f16" } else { "f32" }
    );
    println!("  config:     sha256 {}", t.config_sha256);
    println!("  weights:    sha256 {}", t.weights_sha256);
    println!("layers:       {:?}", m.layers);
    println!("dtype:        {}", m.dtype);
    println!("sample rate:  {} Hz", m.sample_rate);
    if let Some(s) = m.subset {
        println!(
            "subset:       --shard {s} (every {}-th utterance from {})",
            s.count, s.index
        );
    }
    println!(
        "utterances:   {} ({:.1} s of audio, {frames} frames)",
        m.utterances.len(),
        samples as f64 / m.sample_rate as f64
    );
    if !m.skipped.is_empty() {
        println!("left out:     {} bad files", m.skipped.len());
        for s in &m.skipped {
            println!("  {}: {}", s.id, s.error);
        }
    }
    println!(
        "shards:       {} ({:.1} MiB)",
        m.shards.len(),
        bytes as f64 / (1u64 << 20) as f64
    );

    if args.verify {
        let r = cache.verify()?;
        println!(
            "verified:     {} shards, {} utterances, {} bytes: checksums and manifest match",
            r.shards, r.utterances, r.bytes
        );
        if !r.unlisted_files.is_empty() {
            println!(
                "note:         unlisted leftovers of an interrupted run (removed when cache-teacher resumes): {}",
                r.unlisted_files.join(", ")
            );
        }
    }

    if let (Some(id), Some(out)) = (&args.id, &args.out) {
        crate::fsutil::check_output_file(out)?;
        let Some(frames) = cache.frames(id) else {
            bail!("utterance {id:?} is not in the cache {}", args.cache.display());
        };
        let d = cache.hidden_size();
        let mut tensors = Vec::new();
        for &l in cache.layers() {
            tensors.push((format!("hidden_states.{l}"), cache.targets(id, l)?));
        }
        let entry = m.utterances.iter().find(|u| &u.id == id).expect("frames found it");
        let metadata = HashMap::from([
            ("format".to_string(), "wgpu-mlkd-cache-export".to_string()),
            ("teacher_config_sha256".to_string(), t.config_sha256.clone()),
            ("teacher_weights_sha256".to_string(), t.weights_sha256.clone()),
            ("frames".to_string(), frames.to_string()),
            ("sample_rate".to_string(), m.sample_rate.to_string()),
            ("normalized".to_string(), t.normalize.to_string()),
            (
                "teacher_linear_weights".to_string(),
                if t.f16_weights { "f16" } else { "f32" }.to_string(),
            ),
            ("cached_dtype".to_string(), m.dtype.to_string()),
            ("id".to_string(), id.clone()),
            ("audio_sha256".to_string(), entry.audio_sha256.clone()),
        ]);
        let views = tensors
            .iter()
            .map(|(name, data)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![frames, d],
                    bytemuck::cast_slice(data),
                )?;
                Ok((name.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, Some(metadata))?;
        crate::fsutil::atomic_write(out, &bytes)?;
        eprintln!(
            "{id}: {frames} frames, layers {:?} -> {} (f32; cached as {})",
            cache.layers(),
            out.display(),
            m.dtype
        );
    }
    Ok(())
}
