//! Shared by the integration tests: one GPU per test process, fixture paths, safetensors reading and the
//! relative-error check.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use wgpu_mlkd::gpu::{Gpu, GpuOptions};

pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(&GpuOptions::from_env()).expect("tests need a GPU adapter (see README)"))
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Every tensor of a safetensors file, as f32 with its shape.
pub fn read_safetensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = wgpu_mlkd::model::weights::to_f32(v.dtype(), v.data()).unwrap();
            (name, (v.shape().to_vec(), data))
        })
        .collect()
}

/// max |got - want| / max |want|, printed for every tensor even when it passes.
#[track_caller]
pub fn assert_rel_close(name: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: length {} vs {}", got.len(), want.len());
    let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
    let max_err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((*g as f64 - *w as f64).abs()));
    let rel = if got.iter().all(|g| g.is_finite()) {
        max_err / max_ref
    } else {
        f64::INFINITY
    };
    eprintln!("{name:>24}: max |err| / max |ref| = {rel:.2e} (max |ref| {max_ref:.3})");
    assert!(rel <= tol, "{name}: max |err| / max |ref| = {rel:.3e} > {tol:.0e}");
    rel
}

// ---- Running the binary ----

/// The `wgpu-mlkd` binary this test build made.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_wgpu-mlkd"))
}

/// Runs `wgpu-mlkd ARGS` to completion.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    bin().args(args).output().expect("run wgpu-mlkd")
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success without a panic, and hands the output back.
#[track_caller]
pub fn ok(o: std::process::Output) -> std::process::Output {
    assert!(o.status.success(), "failed: {}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    o
}

/// Asserts a clean failure (no panic) whose stderr holds every needle; returns stderr.
#[track_caller]
pub fn fails_with(o: std::process::Output, needles: &[&str]) -> String {
    let err = stderr(&o);
    assert!(!o.status.success(), "expected a failure, got success: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    err
}

/// `TMP/wgpu-mlkd-{suite}-{pid}/{name}`, removed if a previous run left it; its parent exists.
pub fn fresh_temp(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("wgpu-mlkd-{suite}-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    dir
}

/// A path as a command-line argument (test paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
