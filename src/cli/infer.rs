//! `wgpu-mlkd infer`: the emotion of one recording (or of each segment of a long one) with a SER model, its
//! class probabilities, the adapter used and the real-time factor. Backend-independent: the same code runs on
//! Vulkan, Metal and DX12.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::Cli;
use crate::model::classifier::SerModel;
use crate::model::upstream::Upstream;

/// Without `--segment`, files longer than this are classified in segments (see [`AUTO_SEGMENT_SECONDS`]).
pub const AUTO_SEGMENT_ABOVE_SECONDS: f64 = 60.0;
/// The segment length used then: emotion is a property of an utterance, and a classifier trained on
/// utterances of a few seconds says little about an hour averaged in one piece.
pub const AUTO_SEGMENT_SECONDS: f64 = 30.0;

#[derive(clap::Args)]
#[command(
    after_help = "Long recordings: the file is read segment by segment, so memory holds about one segment of \
audio whatever the file's length. Without --segment, a file longer than 60 s (or than the model can take in one \
piece on this GPU) is classified in 30 s segments, with a note on stderr. With segments, the file's label and \
probabilities are the duration-weighted mean of the segments' probabilities; --json then lists every segment and \
the seconds per top label. Each segment is normalised on its own, as the upstream expects of an utterance."
)]
pub struct Args {
    /// SER model folder (from ser-train)
    #[arg(long, value_name = "SER")]
    ser: PathBuf,
    /// Input WAV (any rate, bit depth and channel count; resampled to 16 kHz mono)
    #[arg(long, value_name = "WAV")]
    input: PathBuf,
    /// Classify each segment of this many seconds separately (a last piece too short for one frame joins the
    /// segment before it); the file's answer is the duration-weighted mean of the segments' probabilities.
    /// Default: the whole file at once, or 30 s segments for files over 60 s
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

/// How the file is cut: `None` for one piece, else the segment length in samples and whether it was chosen
/// automatically. `max`: the longest piece the model takes; `min`: its receptive field.
pub fn plan_segments(len: usize, requested: Option<usize>, min: usize, max: usize) -> (Option<usize>, bool) {
    if requested.is_some() {
        return (requested, false);
    }
    let rate = crate::data::wav::TARGET_RATE as f64;
    if len as f64 > AUTO_SEGMENT_ABOVE_SECONDS * rate || len > max {
        // A merged tail adds under `min` samples to the last segment: keep that within `max` too.
        let seg = ((AUTO_SEGMENT_SECONDS * rate) as usize)
            .min(max.saturating_sub(min))
            .max(min);
        return (Some(seg), true);
    }
    (None, false)
}

fn sorted(probs: &[(String, f32)]) -> String {
    let mut probs = probs.to_vec();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    probs
        .iter()
        .map(|(l, p)| format!("{l} {p:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let meta = SerModel::read_meta(&args.ser)?;
    let up_dir = meta.upstream_dir()?;
    if let Some(s) = args.segment {
        if !(s.is_finite() && s > 0.0) {
            bail!("--segment must be a positive number of seconds, got {s}");
        }
    }
    let shown = args.input.display();
    // Only the header is read here; the audio comes segment by segment.
    let mut stream = crate::data::wav::open_16k(&args.input)?;
    let len = stream.len();
    let rate = crate::data::wav::TARGET_RATE as f64;
    let seconds = len as f64 / rate;
    let gpu = cli.open_gpu()?;
    let upstream = Upstream::load_for(&gpu, &meta.upstream, &up_dir)?;
    let (model, _) = SerModel::load(&gpu, &args.ser)?;
    let min = upstream.min_samples();
    let max = upstream.encoder().max_samples();
    if len < min {
        bail!(
            "{shown}: {seconds:.3} s of audio is shorter than the upstream's receptive field ({:.3} s)",
            min as f64 / rate
        );
    }
    let requested = args.segment.map(|s| (s * rate).round() as usize);
    if let (Some(s), Some(n)) = (args.segment, requested) {
        if n < min && n < len {
            bail!(
                "--segment {s}: segments shorter than the upstream's receptive field ({:.3} s) give no frame",
                min as f64 / rate
            );
        }
    }
    let (seg, automatic) = plan_segments(len, requested, min, max);
    let ranges = segments(len, seg, min);
    let longest = ranges.iter().map(|&(s, e)| e - s).max().unwrap_or(0);
    if longest > max {
        let what = match args.segment {
            Some(s) => format!("--segment {s} gives pieces of up to {:.1} s", longest as f64 / rate),
            None => format!("{seconds:.1} s of audio in one piece"),
        };
        bail!(
            "{shown}: {what}, longer than this GPU lets the upstream take at once ({:.1} s, set by its largest \
             storage binding); choose a shorter --segment",
            max as f64 / rate
        );
    }
    if automatic {
        let why = if seconds > AUTO_SEGMENT_ABOVE_SECONDS {
            format!("longer than {AUTO_SEGMENT_ABOVE_SECONDS} s")
        } else {
            format!(
                "longer than the upstream takes at once on this GPU ({:.1} s)",
                max as f64 / rate
            )
        };
        eprintln!(
            "note: {shown} is {seconds:.1} s long ({why}): classifying it in {} segments of {:.1} s; the file's \
             answer is their duration-weighted mean (--segment S chooses the length)",
            ranges.len(),
            seg.unwrap_or(len) as f64 / rate
        );
    }
    let text_segments = !args.json && ranges.len() > 1;
    // Only the model's time counts towards the real-time factor, as for one piece (reading the audio and
    // loading the model excluded).
    let mut wall = 0f64;
    let mut segs = Vec::with_capacity(ranges.len());
    let mut overall = vec![0f64; model.classes];
    let mut label_seconds = vec![0f64; model.classes];
    let mut audio = Vec::with_capacity(longest);
    for &(s, e) in &ranges {
        audio.clear();
        let got = stream.read(&mut audio, e - s)?;
        if got != e - s {
            bail!(
                "{shown}: the audio ended at {:.3} s, before the {seconds:.3} s its header promises",
                (s + got) as f64 / rate
            );
        }
        let started = Instant::now();
        let feats = upstream.pooled(&audio).with_context(|| {
            format!(
                "{shown}: upstream features ({:.2}-{:.2} s)",
                s as f64 / rate,
                e as f64 / rate
            )
        })?;
        let probs = model.probabilities(&gpu, &feats, 1)?.remove(0);
        wall += started.elapsed().as_secs_f64();
        for (o, p) in overall.iter_mut().zip(&probs) {
            *o += *p as f64 * (e - s) as f64 / len as f64;
        }
        let best = crate::train::ser::argmax_rows(std::slice::from_ref(&probs))[0] as usize;
        label_seconds[best] += (e - s) as f64 / rate;
        let seg = Segment {
            start: s as f64 / rate,
            end: e as f64 / rate,
            label: meta.labels[best].clone(),
            probabilities: meta.labels.iter().cloned().zip(probs).collect(),
        };
        if text_segments {
            // As they come: a long file shows progress.
            println!(
                "{:>8.2}-{:<8.2} {:<12} ({})",
                seg.start,
                seg.end,
                seg.label,
                sorted(&seg.probabilities)
            );
            std::io::stdout().flush()?;
        }
        segs.push(seg);
    }
    let rtf = wall / seconds;
    let best = overall
        .iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
        )
        .0;
    let overall: Vec<(String, f32)> = meta
        .labels
        .iter()
        .cloned()
        .zip(overall.iter().map(|&p| p as f32))
        .collect();
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
            "probabilities": overall,
            "segmentation": match (seg, automatic) {
                (None, _) => "none",
                (Some(_), false) => "requested",
                (Some(_), true) => "automatic",
            },
            "segment_seconds": seg.map(|n| n as f64 / rate),
            "label_seconds": meta.labels.iter().cloned().zip(label_seconds).collect::<Vec<_>>(),
            "segments": segs,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    if segs.len() > 1 {
        let mut time: Vec<(&String, f64)> = meta
            .labels
            .iter()
            .zip(label_seconds)
            .filter(|(_, t)| *t > 0.0)
            .collect();
        time.sort_by(|a, b| b.1.total_cmp(&a.1));
        let time: Vec<String> = time
            .iter()
            .map(|(l, t)| format!("{l} {t:.1} s ({:.0}%)", 100.0 * t / seconds))
            .collect();
        println!("top label per segment: {}", time.join(", "));
    }
    println!("{shown}: {} ({})", meta.labels[best], sorted(&overall));
    println!(
        "adapter: {} ({}); {:.2} s of audio in {:.3} s: real-time factor {:.4} (processing seconds per audio second)",
        adapter.name, adapter.backend, seconds, wall, rtf
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{plan_segments, segments};

    #[test]
    fn long_files_are_segmented_automatically() {
        let s = 16000;
        // Up to 60 s: one piece; beyond, 30 s segments; a GPU limit below 60 s also triggers them.
        assert_eq!(plan_segments(60 * s, None, 400, 800 * s), (None, false));
        assert_eq!(plan_segments(60 * s + 1, None, 400, 800 * s), (Some(30 * s), true));
        assert_eq!(plan_segments(50 * s, None, 400, 40 * s), (Some(30 * s), true));
        assert_eq!(plan_segments(50 * s, None, 400, 20 * s), (Some(20 * s - 400), true));
        // A requested length is kept, whatever the file.
        assert_eq!(plan_segments(7200 * s, Some(5 * s), 400, 800 * s), (Some(5 * s), false));
        assert_eq!(plan_segments(10 * s, Some(5 * s), 400, 800 * s), (Some(5 * s), false));
    }

    #[test]
    fn segments_cover_the_file() {
        assert_eq!(segments(100, None, 10), vec![(0, 100)]);
        assert_eq!(segments(100, Some(40), 10), vec![(0, 40), (40, 80), (80, 100)]);
        assert_eq!(segments(100, Some(45), 20), vec![(0, 45), (45, 100)]);
        assert_eq!(segments(100, Some(200), 10), vec![(0, 100)]);
    }
}
