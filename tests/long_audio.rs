//! Long recordings: `infer` reads a file segment by segment, classifies files over 60 s in 30 s segments by
//! itself, and gives the duration-weighted mean of the segments as the file's answer; each segment is
//! classified exactly as the same audio on its own would be (normalised on its own). Commands that take a
//! file whole refuse one longer than the model can take, naming the file, its duration and the limit.
//! The ignored tests run `infer --segment 30` on 2-hour files and bound the process's peak memory
//! (`cargo test --release --test long_audio -- --ignored --nocapture`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use wgpu_mlkd::model::synthetic::write_random_checkpoint;
use wgpu_mlkd::model::Wav2Vec2Config;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wgpu-mlkd"))
        .args(args)
        .output()
        .expect("run wgpu-mlkd")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A tiny upstream with wav2vec 2.0's total stride of 320 samples (50 frames per second), so that 30 s
/// segments are cheap even on a software GPU.
fn fast_config() -> Wav2Vec2Config {
    Wav2Vec2Config {
        conv_dim: vec![8, 8, 8],
        conv_kernel: vec![10, 8, 4],
        conv_stride: vec![10, 8, 4],
        hidden_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 3,
        intermediate_size: 16,
        num_conv_pos_embeddings: 4,
        num_conv_pos_embedding_groups: 2,
        ..Wav2Vec2Config::default()
    }
}

/// Seeded test audio: a tone whose pitch drifts, plus noise (`n` mono samples at `rate`).
struct Voice {
    seed: u32,
    phase: f64,
    k: u64,
    rate: f64,
}

impl Voice {
    fn new(rate: u32) -> Voice {
        Voice {
            seed: 1,
            phase: 0.0,
            k: 0,
            rate: rate as f64,
        }
    }

    fn next(&mut self) -> f32 {
        self.seed = self.seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let noise = (self.seed >> 8) as f64 / (1u64 << 24) as f64 - 0.5;
        let t = self.k as f64 / self.rate;
        self.k += 1;
        // 150-450 Hz over a 40 s cycle, louder and quieter over 7 s.
        let f = 300.0 + 150.0 * (t * std::f64::consts::TAU / 40.0).sin();
        self.phase = (self.phase + std::f64::consts::TAU * f / self.rate) % std::f64::consts::TAU;
        let gain = 0.2 + 0.15 * (t * std::f64::consts::TAU / 7.0).sin();
        (gain * self.phase.sin() + 0.05 * noise) as f32
    }
}

/// Writes `seconds` of 16-bit audio sample by sample (never held in memory); every channel gets the voice
/// plus a channel-dependent offset.
fn write_long_wav(path: &Path, seconds: f64, rate: u32, channels: u16) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let mut voice = Voice::new(rate);
    let frames = (seconds * rate as f64).round() as u64;
    for _ in 0..frames {
        let v = voice.next();
        for c in 0..channels {
            let x = v * (1.0 - 0.1 * c as f32);
            w.write_sample((x * 32767.0).round() as i16).unwrap();
        }
    }
    w.finalize().unwrap();
}

/// A fresh folder holding `teacher/` (the fast tiny upstream, normalising its input) and `ser/`, a SER model
/// trained on it for one epoch (the numbers do not matter, only that they are a real model's).
fn fixture(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wgpu-mlkd-long-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let teacher = dir.join("teacher");
    write_random_checkpoint(&teacher, &fast_config(), 3).unwrap();
    std::fs::write(teacher.join("preprocessor_config.json"), r#"{"do_normalize": true}"#).unwrap();
    let mut voice = Voice::new(16000);
    for spk in ["03", "08", "09"] {
        for letter in ['W', 'T'] {
            for text in ["a01", "a02"] {
                let samples: Vec<f32> = (0..3200).map(|_| voice.next()).collect();
                let path = dir.join("data").join(format!("{spk}{text}{letter}a.wav"));
                wgpu_mlkd::data::wav::write_wav_i16(&path, &samples, 16000).unwrap();
            }
        }
    }
    let t = std::time::Instant::now();
    let o = run(&[
        "ser-train",
        "--upstream",
        &format!("teacher:{}", p(&teacher)),
        "--data",
        p(&dir.join("data")),
        "--out",
        p(&dir.join("ser")),
        "--epochs",
        "2",
        "--no-feature-cache",
    ]);
    eprintln!("ser-train: {:.2} s", t.elapsed().as_secs_f64());
    assert!(o.status.success(), "{}", stderr(&o));
    dir
}

fn infer_json(ser: &Path, wav: &Path, extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = vec!["infer", "--ser", p(ser), "--input", p(wav), "--json"];
    args.extend_from_slice(extra);
    let t = std::time::Instant::now();
    let o = run(&args);
    eprintln!("infer {} {extra:?}: {:.2} s", p(wav), t.elapsed().as_secs_f64());
    assert!(o.status.success(), "{}", stderr(&o));
    (serde_json::from_slice(&o.stdout).unwrap(), stderr(&o))
}

fn probs(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[1].as_f64().unwrap())
        .collect()
}

#[test]
fn a_three_minute_file_is_classified_in_segments_and_averaged() {
    let dir = fixture("infer");
    let ser = dir.join("ser");
    // 185 s at 16 kHz: 30 s segments 0-30, ..., 150-180 and a 5 s one.
    let wav = dir.join("long.wav");
    write_long_wav(&wav, 185.0, 16000, 1);

    let (v, err) = infer_json(&ser, &wav, &[]);
    assert!(
        err.contains("note:") && err.contains("185.0 s long") && err.contains("7 segments of 30.0 s"),
        "{err}"
    );
    assert_eq!(v["segmentation"], "automatic");
    assert_eq!(v["segment_seconds"], 30.0);
    assert_eq!(v["audio_seconds"], 185.0);
    let segs = v["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 7, "{v}");
    for (k, s) in segs.iter().enumerate() {
        assert_eq!(s["start"], 30.0 * k as f64);
        assert_eq!(s["end"], (30.0 * (k + 1) as f64).min(185.0));
    }
    // The file's probabilities: the duration-weighted mean of the segments'; its label their argmax.
    let overall = probs(&v["probabilities"]);
    let mut mean = vec![0f64; overall.len()];
    for s in segs {
        let w = (s["end"].as_f64().unwrap() - s["start"].as_f64().unwrap()) / 185.0;
        for (m, p) in mean.iter_mut().zip(probs(&s["probabilities"])) {
            *m += w * p;
        }
    }
    for (a, b) in overall.iter().zip(&mean) {
        assert!((a - b).abs() < 1e-6, "overall {overall:?} vs weighted mean {mean:?}");
    }
    let best = (0..overall.len())
        .max_by(|&a, &b| overall[a].total_cmp(&overall[b]))
        .unwrap();
    assert_eq!(v["label"], v["probabilities"][best][0]);
    // Seconds per top label add up to the file.
    let total: f64 = v["label_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x[1].as_f64().unwrap())
        .sum();
    assert!((total - 185.0).abs() < 1e-9, "{}", v["label_seconds"]);

    // Each segment is classified exactly as that stretch of audio on its own (normalised on its own).
    let all = wgpu_mlkd::data::wav::load_16k(&wav).unwrap();
    for k in [1usize, 6] {
        let part = dir.join(format!("part{k}.wav"));
        let end = (480_000 * (k + 1)).min(all.len());
        wgpu_mlkd::data::wav::write_wav_f32(&part, &all[480_000 * k..end], 16000).unwrap();
        let (alone, err) = infer_json(&ser, &part, &[]);
        assert!(!err.contains("note:"), "{err}");
        assert_eq!(alone["segmentation"], "none");
        assert_eq!(alone["segments"].as_array().unwrap().len(), 1);
        assert_eq!(alone["probabilities"], segs[k]["probabilities"], "segment {k}");
    }

    // Text, asking for 30 s segments: no note, a line per segment (the same as the automatic ones), the time
    // per label, then the file's answer.
    let o = run(&["infer", "--ser", p(&ser), "--input", p(&wav), "--segment", "30"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("note:"), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7 + 3, "{out}");
    for (line, s) in lines.iter().zip(segs) {
        let (start, end) = (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap());
        assert!(line.trim_start().starts_with(&format!("{start:.2}-{end:.2}")), "{out}");
        assert!(line.contains(&format!(" {} ", s["label"].as_str().unwrap())), "{out}");
    }
    assert!(lines[7].starts_with("top label per segment:"), "{out}");
    let file_line = format!("{}: {} (", p(&wav), v["label"].as_str().unwrap());
    assert!(lines[8].starts_with(&file_line), "{out}");

    // Another rate and channel count: 65 s of 48 kHz stereo gives 30 + 30 + 5 s.
    let wav48 = dir.join("long48.wav");
    write_long_wav(&wav48, 65.0, 48000, 2);
    let (v, err) = infer_json(&ser, &wav48, &[]);
    assert!(err.contains("3 segments of 30.0 s"), "{err}");
    let ends: Vec<f64> = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["end"].as_f64().unwrap())
        .collect();
    assert_eq!(ends, [30.0, 60.0, 65.0]);

    // Up to 60 s: one piece, as before.
    let short = dir.join("short.wav");
    write_long_wav(&short, 20.0, 22050, 1);
    let (v, err) = infer_json(&ser, &short, &[]);
    assert!(!err.contains("note:"), "{err}");
    assert_eq!(v["segmentation"], "none");
    assert!(v["segment_seconds"].is_null());
    assert_eq!(v["segments"].as_array().unwrap().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `extract` and `cache-teacher` take a file whole: one longer than the model can take is refused before the
/// model runs, naming the file, its duration and the limit, and suggesting to split it.
#[test]
fn commands_taking_files_whole_refuse_one_longer_than_the_model_takes() {
    let dir = std::env::temp_dir().join(format!("wgpu-mlkd-long-extract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let teacher = dir.join("teacher");
    write_random_checkpoint(&teacher, &fast_config(), 3).unwrap();
    let gpu = wgpu_mlkd::gpu::Gpu::new(&wgpu_mlkd::gpu::GpuOptions::from_env()).unwrap();
    let max = wgpu_mlkd::model::Wav2Vec2::load(&gpu, &teacher).unwrap().max_samples();
    if max > 40_000_000 {
        eprintln!("skipped: this GPU takes {max} samples at once; the file would be too large for a test");
        return;
    }
    // 8-bit mono at 16 kHz, zeros (byte 128): one byte per sample, written in blocks.
    let wav = dir.join("too-long.wav");
    let n = max + 16000;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + n as u32).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&16000u32.to_le_bytes());
    b.extend_from_slice(&16000u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&8u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(n as u32).to_le_bytes());
    b.resize(44 + n, 128);
    std::fs::write(&wav, &b).unwrap();
    drop(b);
    let out = dir.join("out.safetensors");
    let o = run(&[
        "extract",
        "--teacher",
        p(&teacher),
        "--input",
        p(&wav),
        "--out",
        p(&out),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    eprintln!("{err}");
    let seconds = format!("{:.1} s", n as f64 / 16000.0);
    assert!(
        err.contains(p(&wav))
            && err.contains(&seconds)
            && err.contains(&format!("at most {max} samples"))
            && err.contains("split"),
        "{err}"
    );
    assert!(!err.contains("panicked") && !out.exists(), "{err}");

    // cache-teacher refuses it before computing anything, and leaves no cache behind.
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::rename(&wav, data.join("03a01Wa.wav")).unwrap();
    let cache = dir.join("cache");
    let o = run(&[
        "cache-teacher",
        "--teacher",
        p(&teacher),
        "--data",
        p(&data),
        "--out",
        p(&cache),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    eprintln!("{err}");
    assert!(
        err.contains("03a01Wa.wav") && err.contains(&seconds) && err.contains("nothing was computed"),
        "{err}"
    );
    assert!(
        err.contains(&format!("({max} samples")) && err.contains("split"),
        "{err}"
    );
    assert!(!err.contains("panicked") && !cache.exists(), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `args` and returns (its output, its peak resident memory in bytes, wall seconds), the peak from the
/// kernel's own account of the child (`wait4`'s `ru_maxrss`).
#[cfg(target_os = "linux")]
#[allow(clippy::zombie_processes)] // wait4 reaps the child (std's wait would lose its rusage).
fn run_measured(args: &[&str], stdout: &Path) -> (std::process::ExitStatus, u64, f64) {
    use std::os::unix::process::ExitStatusExt;
    let started = std::time::Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_wgpu-mlkd"))
        .args(args)
        .stdout(std::fs::File::create(stdout).unwrap())
        .spawn()
        .expect("run wgpu-mlkd");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; wait4 reaps only this child, which `child` then never waits for.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let wall = started.elapsed().as_secs_f64();
    (
        std::process::ExitStatus::from_raw(status),
        usage.ru_maxrss as u64 * 1024,
        wall,
    )
}

/// A 2-hour file through `infer --segment 30`: peak memory stays far below the decoded file's size.
#[cfg(target_os = "linux")]
fn two_hours(name: &str, rate: u32, channels: u16) {
    const BOUND: u64 = 300 << 20;
    let dir = fixture(name);
    let wav = dir.join("two-hours.wav");
    let t = std::time::Instant::now();
    write_long_wav(&wav, 7200.0, rate, channels);
    let file_bytes = std::fs::metadata(&wav).unwrap().len();
    let decoded = 7200 * 16000 * 4u64;
    eprintln!(
        "wrote {:.0} MiB ({rate} Hz x {channels}) in {:.1} s; decoded at 16 kHz it is {:.0} MiB",
        file_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64(),
        decoded as f64 / 1048576.0
    );
    let out = dir.join("out.json");
    let ser = dir.join("ser");
    let (status, peak, wall) = run_measured(
        &[
            "infer",
            "--ser",
            p(&ser),
            "--input",
            p(&wav),
            "--segment",
            "30",
            "--json",
        ],
        &out,
    );
    eprintln!(
        "infer --segment 30 on 2 h: {wall:.1} s, peak RSS {:.1} MiB (bound {} MiB)",
        peak as f64 / 1048576.0,
        BOUND >> 20
    );
    assert!(status.success(), "{status:?}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(v["segments"].as_array().unwrap().len(), 240);
    assert_eq!(v["audio_seconds"], 7200.0);
    eprintln!("label {}, real-time factor {}", v["label"], v["real_time_factor"]);
    assert!(peak < BOUND && peak < decoded / 2, "peak RSS {peak} bytes");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(target_os = "linux")]
#[test]
#[ignore = "slow: writes and classifies a 2-hour 16 kHz file"]
fn two_hours_at_16k_in_bounded_memory() {
    two_hours("2h-16k", 16000, 1);
}

#[cfg(target_os = "linux")]
#[test]
#[ignore = "slow: writes (1.4 GB) and classifies a 2-hour 48 kHz stereo file"]
fn two_hours_at_48k_stereo_in_bounded_memory() {
    two_hours("2h-48k", 48000, 2);
}
