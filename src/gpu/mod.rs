//! The only code that talks to wgpu: device selection, buffer pool, pipeline cache, command recording and
//! the GPU tensor type. Everything above this module (ops, models) records kernels through [`Gpu::dispatch`]
//! and never sees a wgpu object.
//!
//! Execution model: every op *records* its dispatches into one pending command list, submitted at a readback
//! (`Tensor::to_vec`), an explicit [`Gpu::flush`], and every [`GpuOptions::submit_every`] commands (so the GPU
//! starts on a forward's first kernels while the host records the rest). The host never waits inside a model
//! forward or a training step: it waits only where it reads a result back. Host-to-GPU uploads are recorded
//! too (as copies from a staging buffer), so a pooled buffer that is freed and reused while commands are pending is always written in
//! program order. Each dispatch's parameters take a slot of one uniform buffer, bound at a dynamic offset, so
//! its bind group depends only on its buffers and is made once (`bind.rs`): the second run of a model records
//! no new bind group at all.

mod bind;
mod context;
mod pipeline;
mod pool;
mod tensor;

pub use bind::NO_BIND_GROUP_CACHE_ENV;
pub use context::{
    AdapterSummary, BackendChoice, Gpu, GpuOptions, HostStats, KernelProfile, DEFAULT_SUBMIT_EVERY, PROFILE_ENV,
    SUBMIT_EVERY_ENV,
};
pub use pipeline::{compose_shader_file, Shader, SHADER_PARTS};
pub use pool::{parse_size, MEMORY_LIMIT_ENV};
pub use tensor::{DType, Tensor};

/// Largest workgroup count per grid dimension that every WebGPU implementation accepts.
pub const MAX_GROUPS_PER_DIM: u32 = 65535;

/// Folds a 1-D grid of `groups` workgroups into at most two dimensions of <= 65535 each.
/// Kernels recover the linear id as `wg.x + wg.y * num_wg.x` and bounds-check it.
pub fn fold_grid(groups: u32) -> [u32; 3] {
    if groups <= MAX_GROUPS_PER_DIM {
        return [groups.max(1), 1, 1];
    }
    let y = groups.div_ceil(MAX_GROUPS_PER_DIM);
    let x = groups.div_ceil(y);
    [x, y, 1]
}

/// The shared GPU of the test suite: created once per test process (lavapipe takes a while to start).
#[cfg(test)]
pub fn test_gpu() -> &'static Gpu {
    use std::sync::OnceLock;
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(&GpuOptions::from_env()).expect("tests need a GPU adapter (see README)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device of its own with the profile on, after two profiled adds: (device, [3, 6, 9]).
    fn profiled_adds() -> (Gpu, Tensor) {
        let options = GpuOptions {
            profile: true,
            ..GpuOptions::from_env()
        };
        let g = Gpu::new(&options).unwrap();
        let x = Tensor::from_slice(&g, &[1.0, 2.0, 3.0], &[3]).unwrap();
        let y = crate::ops::elementwise::add(&x, &x).unwrap();
        let z = crate::ops::elementwise::add(&y, &x).unwrap();
        (g, z)
    }

    /// A device of its own whose bind groups are counted from zero: the cache on, or off (`fresh`). Every
    /// command waits for a flush (`submit_every` 0), so a submission may hold more dispatches than the
    /// parameter buffer's first size.
    fn counting_gpu(fresh_bind_groups: bool) -> Gpu {
        Gpu::new(&GpuOptions {
            fresh_bind_groups,
            profile: false,
            submit_every: Some(0),
            ..GpuOptions::from_env()
        })
        .unwrap()
    }

    /// The same work on the same (pooled) buffers makes its bind groups once: from the third run on, none
    /// are made, and the results stay right. Without the cache every dispatch makes one.
    #[test]
    fn bind_groups_are_made_once_per_set_of_buffers() {
        use crate::ops::elementwise::add;
        for fresh in [false, true] {
            let g = counting_gpu(fresh);
            let x = Tensor::from_slice(&g, &[1.0, 2.0, 3.0], &[3]).unwrap();
            let run = || {
                let y = add(&x, &x).unwrap();
                let z = add(&y, &x).unwrap();
                assert_eq!(z.to_vec().unwrap(), vec![3.0, 6.0, 9.0]);
            };
            // Two runs: the pool may hand its buffers out in another order the second time.
            run();
            run();
            let made = g.host_stats().bind_groups;
            assert!(made >= 2, "{made}");
            for _ in 0..3 {
                run();
            }
            let more = g.host_stats().bind_groups - made;
            assert_eq!(more, if fresh { 6 } else { 0 }, "fresh bind groups: {fresh}");
        }
    }

    /// One bind group serves dispatches with different parameters (each its own slot of the parameter
    /// buffer, at a dynamic offset), within a submission and across submissions, and a submission of more
    /// dispatches than the parameter buffer held grows it: every dispatch still reads its own parameters.
    #[test]
    fn each_dispatch_reads_its_own_parameters() {
        use crate::ops::elementwise::axpy;
        let g = counting_gpu(false);
        let x = Tensor::from_slice(&g, &[1.0, -2.0, 0.5], &[3]).unwrap();
        let acc = Tensor::zeros(&g, &[3]).unwrap();
        let mut expected = [0.0f64; 3];
        // 70, then 9000 dispatches in one submission (the buffer starts at 64 KiB: 9000 slots exceed it).
        for n in [70usize, 9000] {
            for i in 0..n {
                let alpha = (i % 13) as f32 * 0.25 - 1.0;
                axpy(&acc, alpha, &x).unwrap();
                for (e, xv) in expected.iter_mut().zip([1.0f32, -2.0, 0.5]) {
                    *e += (alpha * xv) as f64;
                }
            }
            let got = acc.to_vec().unwrap();
            // Every term is a multiple of 1/8 below 2^12: the f32 sums are exact.
            assert_eq!(got, expected.map(|e| e as f32).to_vec(), "after {n} dispatches");
        }
        assert!(g.host_stats().bind_groups <= 3, "{}", g.host_stats().bind_groups);
        // The buffer grows again while the submission before is still in flight (flushed, not waited for):
        // that submission keeps reading the old buffer, the new one its own parameters.
        for n in [70usize, 20_000] {
            for i in 0..n {
                let alpha = (i % 7) as f32 * 0.5 - 1.5;
                axpy(&acc, alpha, &x).unwrap();
                for (e, xv) in expected.iter_mut().zip([1.0f32, -2.0, 0.5]) {
                    *e += (alpha * xv) as f64;
                }
            }
            g.flush().unwrap();
        }
        assert_eq!(
            acc.to_vec().unwrap(),
            expected.map(|e| e as f32).to_vec(),
            "after an in-flight growth"
        );
    }

    /// Recorded commands go to the GPU every `submit_every` without a wait, in order (the sums come out as
    /// one submission's would); 0 submits only at a flush; by default CPU drivers take 0 and GPUs 32.
    #[test]
    fn commands_are_submitted_every_submit_every() {
        use crate::ops::elementwise::axpy;
        for every in [0, 4] {
            let g = Gpu::new(&GpuOptions {
                submit_every: Some(every),
                profile: false,
                ..GpuOptions::from_env()
            })
            .unwrap();
            let x = Tensor::from_slice(&g, &[1.0, -2.0, 0.5], &[3]).unwrap();
            let acc = Tensor::zeros(&g, &[3]).unwrap();
            g.sync().unwrap(); // the uploads
            let (before, waits) = (g.submissions(), g.waits());
            for i in 0..10 {
                axpy(&acc, i as f32, &x).unwrap();
            }
            let automatic = g.submissions() - before;
            assert_eq!(
                automatic,
                if every == 0 { 0 } else { 10 / every as u64 },
                "every {every}"
            );
            assert_eq!(acc.to_vec().unwrap(), vec![45.0, -90.0, 22.5], "every {every}");
            assert_eq!(g.waits() - waits, 1, "every {every}: only the readback waits");
        }
        let default = Gpu::new(&GpuOptions {
            submit_every: None,
            ..GpuOptions::from_env()
        })
        .unwrap();
        let want = if default.is_hardware_gpu() {
            DEFAULT_SUBMIT_EVERY
        } else {
            0
        };
        assert_eq!(default.inner.submit_every, want);
    }

    /// The profile counts every kernel call and copy under its shader and entry point, and forgets them on reset;
    /// without profiling there is no report.
    #[test]
    fn the_profile_counts_each_kernel() {
        let (g, z) = profiled_adds();
        assert_eq!(z.to_vec().unwrap(), vec![3.0, 6.0, 9.0]);
        let report = g.profile_report().unwrap();
        eprintln!("{report}");
        let row = report
            .lines()
            .find(|l| l.contains("::add_forward"))
            .expect("add_forward in the profile");
        assert_eq!(row.split_whitespace().nth(1), Some("2"), "{report}");
        assert!(report.lines().last().unwrap().starts_with("total"), "{report}");
        g.profile_reset();
        assert!(!g.profile_report().unwrap().contains("add_forward"));
        assert!(test_gpu().profile_report().is_none() || std::env::var_os(PROFILE_ENV).is_some());
    }

    /// With profiling on, each dispatch gets its GPU time from timestamp queries where the adapter has them
    /// (lavapipe does): every kernel's time is positive, finite and within its wall-clock time, copies have
    /// none, and [`Gpu::profile_gpu_seconds`] is their sum. Without timestamps the report says so and there is
    /// no GPU time at all.
    #[test]
    fn the_profile_times_each_kernel_on_the_gpu() {
        let (g, z) = profiled_adds();
        let a = Tensor::from_slice(&g, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        let b = Tensor::from_slice(&g, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]).unwrap();
        let c = crate::ops::matmul::matmul(&a, &b).unwrap();
        assert_eq!(z.to_vec().unwrap(), vec![3.0, 6.0, 9.0]);
        assert_eq!(c.to_vec().unwrap(), vec![4.0, 5.0, 10.0, 11.0]);

        let report = g.profile_report().unwrap();
        eprintln!("{}\n{report}", g.adapter());
        let kernels = g.profile_kernels().unwrap();
        let calls = |name: &str| kernels.iter().find(|k| k.name == name).map(|k| k.calls);
        assert_eq!(calls("elementwise::add_forward"), Some(2), "{report}");
        let matmul_calls: u64 = kernels
            .iter()
            .filter(|k| k.name.starts_with("matmul"))
            .map(|k| k.calls)
            .sum();
        assert_eq!(matmul_calls, 1, "{report}");
        // Three uploads and two readbacks.
        assert_eq!(calls("buffer copy"), Some(5), "{report}");
        assert!(report.lines().last().unwrap().starts_with("total"), "{report}");
        for k in &kernels {
            assert!(
                report.lines().any(|l| l
                    .strip_prefix(k.name.as_str())
                    .and_then(|rest| rest.split_whitespace().next())
                    == Some(k.calls.to_string().as_str())),
                "{} with {} calls missing from\n{report}",
                k.name,
                k.calls
            );
        }

        let timestamps = g.adapter().features.iter().any(|f| f == "timestamp-query");
        match g.profile_gpu_seconds() {
            Some(total) => {
                assert!(timestamps);
                assert!(!report.contains("no timestamp queries"), "{report}");
                assert!(report.lines().next().unwrap().contains("GPU ms"), "{report}");
                let mut sum = 0.0;
                for k in &kernels {
                    if k.name == "buffer copy" {
                        assert_eq!((k.gpu_calls, k.gpu_seconds), (0, None), "{k:?}");
                        continue;
                    }
                    assert_eq!(k.gpu_calls, k.calls, "{k:?}");
                    let s = k.gpu_seconds.unwrap();
                    assert!(s.is_finite() && s > 0.0 && s <= k.wall_seconds, "{k:?}");
                    sum += s;
                }
                assert!((total - sum).abs() <= 1e-12 * sum, "{total} != {sum}");
                // The report's rows follow the GPU time, largest first (the copies, without, by wall-clock time).
                let mut by_gpu = kernels.clone();
                by_gpu.sort_by(|a, b| {
                    let gpu = |k: &KernelProfile| k.gpu_seconds.unwrap_or(0.0);
                    gpu(b)
                        .total_cmp(&gpu(a))
                        .then(b.wall_seconds.total_cmp(&a.wall_seconds))
                });
                for (k, line) in by_gpu.iter().zip(report.lines().skip(1)) {
                    assert!(line.starts_with(&k.name), "{} out of order in\n{report}", k.name);
                }
            }
            None => {
                assert!(!timestamps);
                assert!(report.starts_with("no timestamp queries on this adapter"), "{report}");
                assert!(kernels.iter().all(|k| k.gpu_seconds.is_none()), "{kernels:?}");
            }
        }
        g.profile_reset();
        assert!(g.profile_kernels().unwrap().is_empty());
        assert!(g.profile_gpu_seconds().is_none_or(|s| s == 0.0));
        // No profile, no GPU time: the shared device profiles only when the environment asks.
        assert!(test_gpu().profile_gpu_seconds().is_none() || std::env::var_os(PROFILE_ENV).is_some());
    }

    #[test]
    fn fold_grid_covers_every_group_within_limits() {
        for n in [0u32, 1, 65535, 65536, 131071, 1 << 22, 4_000_000_000] {
            let [x, y, z] = fold_grid(n);
            assert!(x <= MAX_GROUPS_PER_DIM && y <= MAX_GROUPS_PER_DIM && z == 1);
            assert!(x as u64 * y as u64 >= n as u64, "{n} -> {x}x{y}");
            // No needless extra row: the grid is at most one row larger than needed.
            assert!((x as u64) * (y as u64 - 1) < n.max(1) as u64);
        }
    }
}
