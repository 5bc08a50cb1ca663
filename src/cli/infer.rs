//! `wgpu-mlkd infer`: the emotion of one recording (or of each segment of a long one) with a SER model, its
//! class probabilities, the adapter used and the real-time factor. Backend-independent: the same code runs on
//! Vulkan, Metal and DX12.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::Cli;
use crate::model::classifier::SerModel;
use crate::model::upstream::Upstream;

#[derive(clap::Args)]
pub struct Args {
    /// SER model folder (from ser-train)
    #[arg(long, value_name = "SER")]
    ser: PathBuf,
    /// Input WAV (any rate, bit depth and channel count; resampled to 16 kHz mono)
    #[arg(long, value_name = "WAV")]
    input: PathBuf,
    /// Classify each segment of this many seconds separately (a last piece too short for one frame joins the
    /// segment before it); default: the whole file at once
    #[arg(long, value_name = "SECONDS")]
    segment: Option<f64>,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Segment {
    start: f64,
    end: f64,
    label: String,
    probabilities: Vec<(String, f32)>,
}

/// Sample ranges of `len` samples cut every `seg` samples; a tail shorter than `min` joins the range before.
pub fn segments(len: usize, seg: Option<usize>, min: usize) -> Vec<(usize, usize)> {
    let Some(seg) = seg.filter(|&s| s > 0 && s < len) else {
        return vec![(0, len)];
    };
    let mut out: Vec<(usize, usize)> = (0..len).step_by(seg).map(|s| (s, (s + seg).min(len))).collect();
    if out.len() > 1 && out.last().is_some_and(|&(s, e)| e - s < min) {
        let (_, e) = out.pop().expect("non-empty");
        out.last_mut().expect("more than one").1 = e;
    }
    out
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let meta = SerModel::read_meta(&args.ser)?;
    let up_dir = meta.upstream_dir()?;
    if let Some(s) = args.segment {
        if !(s.is_finite() && s > 0.0) {
            bail!("--segment must be a positive number of seconds, got {s}");
        }
    }
    let audio = crate::data::wav::load_16k(&args.input)?;
    let rate = crate::data::wav::TARGET_RATE as f64;
    let gpu = cli.open_gpu()?;
    let upstream = Upstream::load_for(&gpu, &meta.upstream, &up_dir)?;
    let (model, _) = SerModel::load(&gpu, &args.ser)?;
    let min = upstream.min_samples();
    if audio.len() < min {
        bail!(
            "{}: {:.3} s of audio is shorter than the upstream's receptive field ({:.3} s)",
            args.input.display(),
            audio.len() as f64 / rate,
            min as f64 / rate
        );
    }
    let ranges = segments(audio.len(), args.segment.map(|s| (s * rate).round() as usize), min);
    // Timed from the first forward to the last readback: model loading is not part of the real-time factor.
    let started = Instant::now();
    let mut segs = Vec::with_capacity(ranges.len());
    let mut overall = vec![0f64; model.classes];
    for &(s, e) in &ranges {
        let feats = upstream
            .pooled(&audio[s..e])
            .with_context(|| format!("{}: upstream features", args.input.display()))?;
        let probs = model.probabilities(&gpu, &feats, 1)?.remove(0);
        for (o, p) in overall.iter_mut().zip(&probs) {
            *o += *p as f64 * (e - s) as f64 / audio.len() as f64;
        }
        let best = crate::train::ser::argmax_rows(std::slice::from_ref(&probs))[0] as usize;
        segs.push(Segment {
            start: s as f64 / rate,
            end: e as f64 / rate,
            label: meta.labels[best].clone(),
            probabilities: meta.labels.iter().cloned().zip(probs).collect(),
        });
    }
    let wall = started.elapsed().as_secs_f64();
    let seconds = audio.len() as f64 / rate;
    let rtf = wall / seconds;
    let best = overall
        .iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
        )
        .0;
    let adapter = gpu.adapter();
    if args.json {
        let json = serde_json::json!({
            "input": args.input.display().to_string(),
            "ser": args.ser.display().to_string(),
            "upstream": {"kind": meta.upstream.kind, "path": up_dir.display().to_string()},
            "adapter": adapter.name,
            "backend": adapter.backend,
            "audio_seconds": seconds,
            "wall_seconds": wall,
            "real_time_factor": rtf,
            "label": meta.labels[best],
            "probabilities": meta.labels.iter().cloned().zip(overall.iter().map(|&p| p as f32)).collect::<Vec<_>>(),
            "segments": segs,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let show = |probs: &mut Vec<(String, f32)>| -> String {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        probs
            .iter()
            .map(|(l, p)| format!("{l} {p:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if segs.len() > 1 {
        for s in &mut segs {
            println!(
                "{:>8.2}-{:<8.2} {:<12} ({})",
                s.start,
                s.end,
                s.label,
                show(&mut s.probabilities)
            );
        }
    }
    let mut all: Vec<(String, f32)> = meta
        .labels
        .iter()
        .cloned()
        .zip(overall.iter().map(|&p| p as f32))
        .collect();
    println!("{}: {} ({})", args.input.display(), meta.labels[best], show(&mut all));
    println!(
        "adapter: {} ({}); {:.2} s of audio in {:.3} s: real-time factor {:.4} (processing seconds per audio second)",
        adapter.name, adapter.backend, seconds, wall, rtf
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::segments;

    #[test]
    fn segments_cover_the_file() {
        assert_eq!(segments(100, None, 10), vec![(0, 100)]);
        assert_eq!(segments(100, Some(40), 10), vec![(0, 40), (40, 80), (80, 100)]);
        assert_eq!(segments(100, Some(45), 20), vec![(0, 45), (45, 100)]);
        assert_eq!(segments(100, Some(200), 10), vec![(0, 100)]);
    }
}
