//! GPU limits become errors that name the limit, never a panic or a wrapped-around allocation: a tensor
//! beyond the largest storage binding (checked before anything is allocated, so the test costs nothing) and
//! a shape whose size overflows; out of memory; and the device's on-disk pipeline cache.

mod common;

use common::gpu;
use wgpu_mlkd::gpu::{DType, Tensor};

#[test]
fn a_tensor_beyond_the_binding_limit_is_refused_naming_the_limit() {
    let g = gpu();
    let max = g.max_binding_bytes();
    let max_mib = format!("{:.1} MiB", max as f64 / 1048576.0);
    // One f32 more than fits.
    let n = (max / 4) as usize + 1;
    for shape in [vec![n], vec![1, n], vec![n / 2 + 1, 2]] {
        let err = format!("{:#}", Tensor::empty(g, &shape, DType::F32).unwrap_err());
        eprintln!("{shape:?}: {err}");
        assert!(
            err.contains("largest storage binding") && err.contains(&max.to_string()) && err.contains(&max_mib),
            "{err}"
        );
        assert!(err.contains(&format!("{shape:?}")), "{err}");
    }
    // Uploads check the same way (the data is not even looked at when the shape is refused).
    let err = format!("{:#}", Tensor::zeros(g, &[n]).unwrap_err());
    assert!(err.contains("largest storage binding"), "{err}");
    // The largest allowed 1-D shape in u32 words is accepted lazily by the size check (not allocated here).
    assert!((max / 4) as usize * 4 <= max as usize);
}

#[test]
fn a_shape_whose_size_overflows_is_refused() {
    let g = gpu();
    for shape in [vec![usize::MAX, 2], vec![1 << 40, 1 << 40], vec![usize::MAX / 4 + 1]] {
        let err = format!("{:#}", Tensor::empty(g, &shape, DType::F32).unwrap_err());
        eprintln!("{shape:?}: {err}");
        assert!(
            err.contains("overflows") || err.contains("largest storage binding"),
            "{err}"
        );
    }
}

/// Audio longer than the GPU can take in one piece (a 2-hour file on lavapipe's 128 MiB bindings) is refused
/// up front with the limit and the longest duration that fits, before anything is uploaded.
#[test]
fn audio_beyond_the_binding_limit_is_refused_with_the_maximum_length() {
    let model = wgpu_mlkd::model::Wav2Vec2::load(gpu(), &common::fixture("base_group")).unwrap();
    let max = model.max_samples();
    assert!(max <= (gpu().max_binding_bytes() / 4) as usize);
    eprintln!(
        "longest input: {max} samples = {:.1} min at 16 kHz",
        max as f64 / 16000.0 / 60.0
    );
    let too_long = vec![0.0f32; max + 1]; // zeroed pages: cheap until touched
    let err = format!("{:#}", model.forward(&too_long).err().unwrap());
    eprintln!("{err}");
    assert!(
        err.contains("longer than this GPU can take")
            && err.contains(&format!("at most {max} samples"))
            && err.contains("largest storage binding"),
        "{err}"
    );
}

/// A device lost in the middle of work (here destroyed under the engine, as a driver reset would) turns the
/// next flush or readback into an error naming the loss, within seconds: no hang, no panic. The work runs on a
/// thread so that a hang fails the test instead of blocking it.
#[test]
fn a_lost_device_becomes_an_error_not_a_hang_or_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = (|| -> anyhow::Result<Vec<f32>> {
            // A device of its own: the shared test device must survive.
            let g = wgpu_mlkd::gpu::Gpu::new(&wgpu_mlkd::gpu::GpuOptions::from_env())?;
            let x = Tensor::from_slice(&g, &[1.0, 2.0, 3.0], &[3])?;
            let y = wgpu_mlkd::ops::elementwise::add(&x, &x)?;
            assert_eq!(y.to_vec()?, vec![2.0, 4.0, 6.0]);
            g.destroy_device();
            let z = wgpu_mlkd::ops::elementwise::add(&y, &x)?;
            z.to_vec()
        })();
        let _ = tx.send(result.map_err(|e| format!("{e:#}")));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("work on a lost device hung (no answer in 60 s) or panicked");
    let err = got.expect_err("a readback on a destroyed device returned data");
    eprintln!("{err}");
    assert!(err.contains("GPU device lost"), "{err}");
}

/// Out of GPU memory is an error naming the allocation and what is in use, not a panic or a hang, and the
/// device works again once tensors are freed. The pool's memory limit (`WGPU_MLKD_GPU_MEMORY_LIMIT`) takes the
/// same path as the device's own out-of-memory error (free the cache, retry once, then fail), so it provokes
/// that path on any adapter; a real exhaustion cannot be provoked safely (lavapipe under an address-space cap
/// reported its allocations as made and the process crashed when it used them).
#[test]
fn out_of_gpu_memory_becomes_an_error_and_the_device_recovers() {
    let options = wgpu_mlkd::gpu::GpuOptions {
        memory_limit: Some("10MiB".into()),
        ..wgpu_mlkd::gpu::GpuOptions::from_env()
    };
    let g = wgpu_mlkd::gpu::Gpu::new(&options).unwrap();
    let x = Tensor::from_slice(&g, &[1.0, 2.0, 3.0], &[3]).unwrap();
    // 1 MiB tensors, each written by a kernel, until the 10 MiB limit refuses one.
    let mut held = Vec::new();
    let error = loop {
        let a = match Tensor::zeros(&g, &[1 << 18]) {
            Ok(a) => a,
            Err(e) => break format!("{e:#}"),
        };
        match wgpu_mlkd::ops::elementwise::add(&a, &a) {
            Ok(b) => held.extend([a, b]),
            Err(e) => break format!("{e:#}"),
        }
        assert!(held.len() <= 20, "10 MiB held 20 tensors of 1 MiB");
    };
    eprintln!("{error} (after {} tensors)", held.len());
    assert!(held.len() >= 6, "refused too early: {error}");
    assert!(
        error.contains("GPU out of memory allocating 1048576 bytes (1.0 MiB)")
            && error.contains("in use by live tensors")
            && error.contains("WGPU_MLKD_GPU_MEMORY_LIMIT"),
        "{error}"
    );
    // Everything computed before the failure is intact, and freeing makes room again.
    assert!(held[1].to_vec().unwrap().iter().all(|&v| v == 0.0));
    drop(held);
    let y = wgpu_mlkd::ops::elementwise::add(&x, &x).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![2.0, 4.0, 6.0]);
    let big = Tensor::zeros(&g, &[1 << 21]).unwrap(); // 8 MiB: fits once the 1 MiB buffers are gone
    assert_eq!(big.shape(), &[1 << 21]);
}

/// A malformed memory limit is refused when the device opens, naming the variable.
#[test]
fn a_malformed_memory_limit_is_refused() {
    for bad in ["lots", "12XB", "-1GiB", "0"] {
        let options = wgpu_mlkd::gpu::GpuOptions {
            memory_limit: Some(bad.into()),
            ..wgpu_mlkd::gpu::GpuOptions::from_env()
        };
        let err = format!("{:#}", wgpu_mlkd::gpu::Gpu::new(&options).err().expect("accepted"));
        assert!(err.contains("WGPU_MLKD_GPU_MEMORY_LIMIT") && err.contains(bad), "{err}");
    }
    assert_eq!(wgpu_mlkd::gpu::parse_size("1.5GiB").unwrap(), 3 << 29);
    assert_eq!(wgpu_mlkd::gpu::parse_size("512M").unwrap(), 512 << 20);
    assert_eq!(wgpu_mlkd::gpu::parse_size(" 4096 ").unwrap(), 4096);
}

/// The compiled pipelines are kept on disk between runs (where the backend has a pipeline cache): written when
/// the device closes, read by the next one; a damaged file is dropped and rewritten, never handed to the driver,
/// and never an error.
#[test]
fn the_pipeline_cache_is_written_read_back_and_survives_damage() {
    let dir = common::fresh_temp("gpu_limits", "pipeline_cache");
    let options = wgpu_mlkd::gpu::GpuOptions {
        pipeline_cache: Some(dir.clone()),
        ..wgpu_mlkd::gpu::GpuOptions::from_env()
    };
    let run = || {
        let g = wgpu_mlkd::gpu::Gpu::new(&options).unwrap();
        let x = Tensor::from_slice(&g, &[1.0, 2.0, 3.0], &[3]).unwrap();
        let y = wgpu_mlkd::ops::elementwise::add(&x, &x).unwrap();
        assert_eq!(y.to_vec().unwrap(), vec![2.0, 4.0, 6.0]);
        g.pipeline_cache_file().map(|p| p.to_path_buf())
    };
    let Some(file) = run() else {
        eprintln!("skipped: this adapter has no pipeline cache (not Vulkan, or no PIPELINE_CACHE feature)");
        return;
    };
    let first = std::fs::read(&file).expect("the pipeline cache is written when the device closes");
    assert!(
        first.starts_with(b"WMLKDPC1") && first.len() > 24,
        "{} bytes",
        first.len()
    );
    // A second run reads it; its pipelines are all in the cache already, so the file is not rewritten.
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(run().as_deref(), Some(file.as_path()));
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        modified,
        "an unchanged cache was rewritten"
    );
    assert_eq!(std::fs::read(&file).unwrap(), first);
    // Damage it both ways: truncated, and one byte changed.
    for damaged in [first[..first.len() - 1].to_vec(), {
        let mut b = first.clone();
        *b.last_mut().unwrap() ^= 0xff;
        b
    }] {
        std::fs::write(&file, &damaged).unwrap();
        run();
        let rewritten = std::fs::read(&file).unwrap();
        assert!(
            rewritten.starts_with(b"WMLKDPC1") && rewritten != damaged,
            "the damaged cache was not rewritten"
        );
    }
    // An unwritable place is reported when saving (and only noted when the device closes), never fatal.
    let blocked = wgpu_mlkd::gpu::Gpu::new(&wgpu_mlkd::gpu::GpuOptions {
        pipeline_cache: Some(file.join("not-a-dir")),
        ..wgpu_mlkd::gpu::GpuOptions::from_env()
    })
    .unwrap();
    let x = Tensor::from_slice(&blocked, &[1.0], &[1]).unwrap();
    assert_eq!(
        wgpu_mlkd::ops::elementwise::add(&x, &x).unwrap().to_vec().unwrap(),
        vec![2.0]
    );
    let err = format!("{:#}", blocked.save_pipeline_cache().unwrap_err());
    assert!(err.contains("not-a-dir"), "{err}");
    // Off: no file.
    let off = wgpu_mlkd::gpu::Gpu::new(&wgpu_mlkd::gpu::GpuOptions {
        pipeline_cache: None,
        ..wgpu_mlkd::gpu::GpuOptions::from_env()
    })
    .unwrap();
    assert!(off.pipeline_cache_file().is_none());
}
