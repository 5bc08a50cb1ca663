//! `wgpu-mlkd bench teacher|train`: the two workloads the performance comparison uses, timed on whatever
//! adapter is selected. Each prints the adapter, the model FLOPs, the effective GFLOP/s, the peak GPU bytes and
//! the host's time per run (dispatches recorded, bind groups made, time spent recording, encoding and
//! submitting them), and as its last line `teacher_forward_seconds_per_audio_second=X` or `student_train_step_seconds=X`: the
//! median of `--repeat` timed runs after one warm-up, weights already on the GPU, results read back.
//! `benches/compare.sh` runs them beside the PyTorch scripts in `benches/`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

use super::Cli;
use crate::fsutil::human_bytes;
use crate::gpu::{Gpu, HostStats, Tensor, PROFILE_ENV};
use crate::model::student::{default_target_layers, Student};
use crate::model::{Wav2Vec2, Wav2Vec2Config};
use crate::ops::adamw::{AdamW, AdamWConfig};
use crate::train::trainer::{distill_step, StepSettings};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Workload,
}

#[derive(clap::Subcommand)]
enum Workload {
    /// The teacher's forward pass (inference) on S seconds of audio
    Teacher {
        /// Hugging Face wav2vec 2.0 folder
        #[arg(long, value_name = "DIR")]
        teacher: PathBuf,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Timed runs (after one warm-up); the median is reported
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// The linear layers' weights in f16 (`extract --f16`): products still summed in f32
        #[arg(long)]
        f16: bool,
    },
    /// One MLKD training step of a student initialised from the teacher (forward, loss, backward, AdamW)
    Train {
        /// Hugging Face wav2vec 2.0 folder the student starts from
        #[arg(long, value_name = "DIR")]
        teacher: PathBuf,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
        crop_seconds: f64,
        /// Transformer layers of the student
        #[arg(long, default_value_t = 2, value_name = "K")]
        student_layers: usize,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

/// A deterministic speech-like waveform (no file needed).
fn waveform(n: usize, phase: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = (i + phase) as f32 / 16000.0;
            0.4 * (2.0 * std::f32::consts::PI * 140.0 * t).sin() + 0.2 * (2.0 * std::f32::consts::PI * 910.0 * t).sin()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn print_header(gpu: &Gpu) {
    let a = gpu.adapter();
    println!("adapter: {} ({}, {})", a.name, a.backend, a.device_type);
    if gpu.profiling() {
        println!(
            "{PROFILE_ENV} is set: every kernel runs and is waited for alone, so the times above the profile are \
             not the engine's speed"
        );
    }
}

/// The host's share of the timed runs: dispatches recorded and the time spent recording and encoding them.
fn print_host(host: HostStats, repeat: usize) {
    println!(
        "host per timed run: {} dispatches ({} new bind groups), {:.3} ms recording, encoding and submitting \
         ({:.1} us per dispatch)",
        host.dispatches / repeat as u64,
        host.bind_groups / repeat as u64,
        1e3 * host.seconds / repeat as f64,
        1e6 * host.seconds / host.dispatches.max(1) as f64
    );
}

/// The per-kernel profile of the timed runs, when profiling, and the GPU's busy time per run where the adapter
/// has timestamp queries.
fn print_profile(gpu: &Gpu, repeat: usize) {
    if let Some(report) = gpu.profile_report() {
        println!("kernel profile, summed over the {repeat} timed run(s):\n{report}");
    }
    if let Some(seconds) = gpu.profile_gpu_seconds() {
        println!(
            "GPU busy per timed run (sum of kernel times): {:.3} ms",
            1e3 * seconds / repeat as f64
        );
    }
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    match &args.what {
        Workload::Teacher {
            teacher,
            seconds,
            repeat,
            f16,
        } => bench_teacher(cli, teacher, *seconds, *repeat, *f16),
        Workload::Train {
            teacher,
            batch,
            crop_seconds,
            student_layers,
            repeat,
        } => bench_train(cli, teacher, *batch, *crop_seconds, *student_layers, *repeat),
    }
}

fn check_repeat(repeat: usize, seconds: f64) -> Result<usize> {
    if repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("the audio length must be a positive number of seconds, got {seconds}");
    }
    Ok((seconds * 16000.0).round() as usize)
}

fn bench_teacher(cli: &Cli, dir: &std::path::Path, seconds: f64, repeat: usize, f16: bool) -> Result<()> {
    let samples = check_repeat(repeat, seconds)?;
    let gpu = cli.open_gpu()?;
    print_header(&gpu);
    // Frozen, as cache-teacher and the SER upstreams run it (convolution weights packed once).
    let mut model = Wav2Vec2::load(&gpu, dir)?;
    model.freeze_with(f16)?;
    let cfg: &Wav2Vec2Config = &model.config;
    if cfg.frames(samples) == 0 {
        bail!("{seconds} s is shorter than one frame of this teacher");
    }
    let x = waveform(samples, 0);
    let run = || -> Result<f64> {
        let t0 = Instant::now();
        let out = model.forward(&x)?;
        out.last_hidden_state.to_vec()?;
        Ok(t0.elapsed().as_secs_f64())
    };
    run()?;
    gpu.reset_peak();
    gpu.profile_reset();
    let host_before = gpu.host_stats();
    let times = (0..repeat).map(|_| run()).collect::<Result<Vec<_>>>()?;
    let host = gpu.host_stats() - host_before;
    let (_, peak) = gpu.memory();
    let t = median(times);
    let flops = cfg.forward_flops(samples);
    println!(
        "teacher: {} layers, width {}, {seconds} s of audio ({} frames), {} linear weights",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.frames(samples),
        if f16 { "f16" } else { "f32" }
    );
    println!("model GFLOPs per forward: {:.2}", flops / 1e9);
    println!(
        "median of {repeat}: {t:.4} s -> {:.2} GFLOP/s effective",
        flops / t / 1e9
    );
    println!("peak GPU bytes: {peak} ({})", human_bytes(peak));
    print_host(host, repeat);
    print_profile(&gpu, repeat);
    println!("teacher_forward_seconds_per_audio_second={:.6}", t / seconds);
    Ok(())
}

fn bench_train(
    cli: &Cli,
    dir: &std::path::Path,
    batch: usize,
    seconds: f64,
    student_layers: usize,
    repeat: usize,
) -> Result<()> {
    let samples = check_repeat(repeat, seconds)?;
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let gpu = cli.open_gpu()?;
    print_header(&gpu);
    let teacher_cfg = Wav2Vec2Config::from_file(&dir.join("config.json"))?;
    let targets = default_target_layers(teacher_cfg.num_hidden_layers);
    let student = Student::from_teacher(&gpu, dir, student_layers, targets.clone(), 0)?;
    let cfg = student.encoder.config.clone();
    let (t, d) = (cfg.frames(samples), cfg.hidden_size);
    if t == 0 {
        bail!("{seconds} s is shorter than one frame of this model");
    }
    let wave: Vec<f32> = (0..batch).flat_map(|b| waveform(samples, 977 * b)).collect();
    let wave = Tensor::from_slice(&gpu, &wave, &[batch, samples, 1])?;
    let target_tensors = (0..targets.len())
        .map(|n| {
            let v: Vec<f32> = (0..batch * t * d)
                .map(|i| ((i * (n + 1)) as f32 * 1e-3).cos())
                .collect();
            Tensor::from_slice(&gpu, &v, &[batch, t, d])
        })
        .collect::<Result<Vec<_>>>()?;
    let params = student.parameters();
    let n_params: usize = params.iter().map(|p| p.value().numel()).sum();
    let values: Vec<&Tensor> = params.iter().map(|p| p.value()).collect();
    let mut opt = AdamW::new(&values, AdamWConfig::default())?;
    let mut seed = 0u64;
    let mut step = || -> Result<f64> {
        seed += 1;
        let t0 = Instant::now();
        let settings = StepSettings {
            seed,
            dropout: 0.1,
            feature_grad_mult: 0.1,
            lambda: 1.0,
            lr: 2e-4,
        };
        let done = distill_step(&student, &mut opt, &wave, &target_tensors, &settings)?;
        done.loss.total.value().to_vec()?;
        Ok(t0.elapsed().as_secs_f64())
    };
    step()?;
    gpu.reset_peak();
    gpu.profile_reset();
    let host_before = gpu.host_stats();
    let times = (0..repeat).map(|_| step()).collect::<Result<Vec<_>>>()?;
    let host = gpu.host_stats() - host_before;
    let (_, peak) = gpu.memory();
    let time = median(times);
    // Training FLOPs by the usual convention: 3x the forward (the backward costs about twice the forward).
    let heads = targets.len() as f64;
    let head_flops = 2.0 * (t as f64) * (d as f64) * (d as f64) * heads * 2.0;
    let flops = 3.0 * batch as f64 * (cfg.forward_flops(samples) + head_flops);
    println!(
        "student: {student_layers} layers, width {d}, {} heads, {:.1} M parameters; batch {batch} x {seconds} s \
         ({t} frames)",
        targets.len(),
        n_params as f64 / 1e6
    );
    println!("model GFLOPs per step (3x forward): {:.2}", flops / 1e9);
    println!(
        "median of {repeat}: {time:.4} s -> {:.2} GFLOP/s effective",
        flops / time / 1e9
    );
    println!("peak GPU bytes: {peak} ({})", human_bytes(peak));
    print_host(host, repeat);
    print_profile(&gpu, repeat);
    println!("student_train_step_seconds={time:.6}");
    Ok(())
}
