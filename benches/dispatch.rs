//! The host's cost of one kernel: recording a dispatch, then encoding and submitting it (not the GPU's time,
//! which the bench leaves out by waiting for the GPU between samples). A forward records ~150-500 dispatches
//! and a real GPU runs many of them in a few microseconds, so this cost can be a large share of a model's
//! time. Baseline in the same process: a second device that makes a fresh bind group for every dispatch
//! (`GpuOptions::fresh_bind_groups`, how every dispatch worked before bind groups were reused).
//! Figures: `benches/RESULTS.md`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wgpu_mlkd::gpu::{Gpu, GpuOptions, Tensor};
use wgpu_mlkd::ops::elementwise::{add, add_assign, scale};

/// Dispatches per timed sample: a chain of small element-wise kernels over a few buffers, as a model's
/// non-matmul ops are (their GPU time is tiny, so the host's share shows).
const DISPATCHES: usize = 300;

fn record_and_submit(gpu: &Gpu, x: &Tensor, acc: &Tensor) {
    for i in 0..DISPATCHES / 3 {
        let y = scale(x, 1.0 + i as f32 * 1e-3).unwrap();
        let z = add(&y, x).unwrap();
        add_assign(acc, &z).unwrap();
    }
    gpu.flush().unwrap();
}

fn host_per_dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_per_dispatch");
    group.throughput(Throughput::Elements(DISPATCHES as u64));
    for (name, fresh_bind_groups) in [("reused_bind_groups", false), ("fresh_bind_groups", true)] {
        let gpu = Gpu::new(&GpuOptions {
            fresh_bind_groups,
            ..GpuOptions::from_env()
        })
        .expect("a GPU adapter");
        let x = Tensor::from_slice(&gpu, &vec![0.5; 1000], &[1000]).unwrap();
        let acc = Tensor::zeros(&gpu, &[1000]).unwrap();
        // Compile the pipelines and fill the pool before timing.
        record_and_submit(&gpu, &x, &acc);
        gpu.sync().unwrap();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut host = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    record_and_submit(&gpu, &x, &acc);
                    host += t0.elapsed();
                    gpu.sync().unwrap();
                }
                host
            })
        });
        eprintln!(
            "{name}: {} bind groups created in all ({} on {})",
            gpu.host_stats().bind_groups,
            gpu.adapter().name,
            gpu.adapter().backend
        );
    }
    group.finish();
}

criterion_group!(benches, host_per_dispatch);
criterion_main!(benches);
