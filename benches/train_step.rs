//! One MLKD training step of the student (wav2vec2-base dimensions, 2 transformer layers, 3 prediction heads;
//! random weights: speed does not depend on them): forward, loss, backward through the tape, AdamW on every
//! parameter, loss read back. Batch 2 x 2 s by default (TRAIN_BENCH_BATCH, TRAIN_BENCH_SECONDS).
//! Prints the peak GPU bytes of a step at batch 1, 2 and 4 (it must grow linearly with the batch).
//! Baseline: `benches/pytorch_train_step.py` on the same machine. Figures: `benches/RESULTS.md`.

use criterion::{criterion_group, criterion_main, Criterion};
use wgpu_mlkd::gpu::{Gpu, GpuOptions, Tensor};
use wgpu_mlkd::model::student::Student;
use wgpu_mlkd::model::{synthetic, Wav2Vec2Config};
use wgpu_mlkd::ops::adamw::{AdamW, AdamWConfig};
use wgpu_mlkd::train::trainer::{distill_step, StepSettings};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

struct Step {
    student: Student,
    opt: AdamW,
    wave: Tensor,
    targets: Vec<Tensor>,
    seed: u64,
}

impl Step {
    fn new(gpu: &Gpu, student: Student, batch: usize, samples: usize) -> Step {
        let wave: Vec<f32> = (0..batch * samples).map(|i| ((i as f32) * 0.013).sin() * 0.5).collect();
        let wave = Tensor::from_slice(gpu, &wave, &[batch, samples, 1]).unwrap();
        let frames = student.encoder.config.frames(samples);
        let d = student.encoder.config.hidden_size;
        let targets = (0..student.heads.out.len())
            .map(|n| {
                let t: Vec<f32> = (0..batch * frames * d)
                    .map(|i| ((i * (n + 1)) as f32 * 0.001).cos())
                    .collect();
                Tensor::from_slice(gpu, &t, &[batch, frames, d]).unwrap()
            })
            .collect();
        let params = student.parameters();
        let values: Vec<&Tensor> = params.iter().map(|p| p.value()).collect();
        let opt = AdamW::new(&values, AdamWConfig::default()).unwrap();
        Step {
            student,
            opt,
            wave,
            targets,
            seed: 0,
        }
    }

    fn run(&mut self) -> f32 {
        self.seed += 1;
        let settings = StepSettings {
            seed: self.seed,
            dropout: 0.1,
            feature_grad_mult: 0.1,
            lambda: 1.0,
            lr: 2e-4,
        };
        let done = distill_step(&self.student, &mut self.opt, &self.wave, &self.targets, &settings).unwrap();
        done.loss.total.value().to_vec().unwrap()[0]
    }
}

fn train_step(c: &mut Criterion) {
    let gpu = Gpu::new(&GpuOptions::from_env()).expect("a GPU adapter");
    let dir = std::env::temp_dir().join("wgpu-mlkd-bench-student");
    let config = Wav2Vec2Config {
        num_hidden_layers: 2,
        ..Wav2Vec2Config::default()
    };
    if !dir.join("model.safetensors").exists() {
        synthetic::write_random_student(&dir, &config, &[4, 8, 12], 0).expect("write student");
    }
    let (batch, seconds) = (env("TRAIN_BENCH_BATCH", 2), env("TRAIN_BENCH_SECONDS", 2));
    let samples = seconds * 16000;
    eprintln!("adapter: {} ({})", gpu.adapter().name, gpu.adapter().backend);
    let n_params: usize = Student::load(&gpu, &dir)
        .unwrap()
        .parameters()
        .iter()
        .map(|p| p.value().numel())
        .sum();
    eprintln!("student parameters: {:.1} M", n_params as f64 / 1e6);

    for b in [1, 2, 4] {
        let mut step = Step::new(&gpu, Student::load(&gpu, &dir).unwrap(), b, samples);
        step.run();
        gpu.reset_peak();
        step.run();
        let (_, peak) = gpu.memory();
        eprintln!(
            "peak GPU bytes of one step at batch {b} x {seconds} s: {:.1} MiB",
            peak as f64 / 1048576.0
        );
    }

    let mut step = Step::new(&gpu, Student::load(&gpu, &dir).unwrap(), batch, samples);
    let mut group = c.benchmark_group("student_train_step");
    group.sample_size(10);
    group.bench_function(format!("batch{batch}x{seconds}s"), |b| b.iter(|| step.run()));
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
