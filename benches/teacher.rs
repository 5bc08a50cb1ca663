//! Teacher forward pass at wav2vec2-base dimensions (random weights: the speed does not depend on them), in
//! audio seconds per second of wall time. Weights are on the GPU before timing; results are read back.
//! Baseline: `benches/pytorch_teacher.py` (transformers on the CPU, 2 threads) on the same machine.
//! Figures: `benches/RESULTS.md`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wgpu_mlkd::gpu::{Gpu, GpuOptions};
use wgpu_mlkd::model::{synthetic, Wav2Vec2, Wav2Vec2Config};

fn teacher_forward(c: &mut Criterion) {
    let gpu = Gpu::new(&GpuOptions::from_env()).expect("a GPU adapter");
    let dir = std::env::temp_dir().join("wgpu-mlkd-bench-base");
    let config = Wav2Vec2Config::default();
    if !dir.join("model.safetensors").exists() {
        synthetic::write_random_checkpoint(&dir, &config, 0).expect("write checkpoint");
    }
    let model = Wav2Vec2::load(&gpu, &dir).expect("load");
    eprintln!("adapter: {} ({})", gpu.adapter().name, gpu.adapter().backend);
    let seconds: usize = std::env::var("TEACHER_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let samples: Vec<f32> = (0..seconds * 16000).map(|i| ((i as f32) * 0.01).sin() * 0.5).collect();
    eprintln!(
        "model GFLOPs for {seconds} s: {:.2}",
        config.forward_flops(samples.len()) / 1e9
    );

    let mut group = c.benchmark_group("teacher_forward_base");
    group.sample_size(10);
    group.throughput(Throughput::Elements(seconds as u64)); // elements = audio seconds
    group.bench_function(format!("{seconds}s"), |b| {
        b.iter(|| {
            let out = model.forward(&samples).unwrap();
            out.last_hidden_state.to_vec().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, teacher_forward);
criterion_main!(benches);
