//! The shipped demo teacher (`weights/demo-teacher`, made by `make-teacher` on `synth-data` speech): it loads
//! through the real loader, is small, records how it was made, and a linear probe on its mean-pooled hidden
//! states recognises the four synthetic emotions of held-out speakers well above chance.
//! Also `synth-data` end to end through the CLI.

mod common;

use std::path::Path;
use std::process::Command;

use wgpu_mlkd::model::Wav2Vec2;
use wgpu_mlkd::train::pretrain::{preset, random_model, synthetic_probe};

fn teacher_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/demo-teacher")
}

#[test]
fn demo_teacher_loads_is_small_and_records_its_making() {
    let dir = teacher_dir();
    let model = Wav2Vec2::load(common::gpu(), &dir).unwrap();
    assert_eq!(model.config, preset("tiny").unwrap());
    let bytes = std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
    assert!(bytes < 8 << 20, "{bytes} bytes");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let rec = &json["wgpu_mlkd_pretraining"];
    assert!(rec["command"].as_str().unwrap().contains("make-teacher"), "{rec}");
    assert!(rec["steps"].as_u64().unwrap() > 0);
    assert!(wgpu_mlkd::model::teacher_normalizes(&dir).unwrap());
    assert!(dir.join("README.md").exists());
}

/// Smaller than make-teacher's probe (to keep the test short): speakers 90..97, 3 texts per emotion of 1 s.
/// The figures of both protocols are in weights/demo-teacher/README.md.
#[test]
fn linear_probe_on_the_demo_teacher_beats_chance_on_held_out_speakers() {
    let gpu = common::gpu();
    let t0 = std::time::Instant::now();
    let model = Wav2Vec2::load(gpu, &teacher_dir()).unwrap();
    let layers: Vec<usize> = (0..=model.config.num_hidden_layers).collect();
    let trained = synthetic_probe(&model, 90, 8, 3, 1.0, 0, &layers).unwrap();
    let random = random_model(gpu, &model.config, 0).unwrap();
    let base = synthetic_probe(&random, 90, 8, 3, 1.0, 0, &layers).unwrap();
    for l in &layers {
        eprintln!(
            "layer {l}: pretrained {:.1}%, random init {:.1}% (chance 25%)",
            100.0 * trained[*l],
            100.0 * base[*l]
        );
    }
    eprintln!("probe test: {:.1} s", t0.elapsed().as_secs_f64());
    let best = trained.iter().cloned().fold(0.0, f64::max);
    assert!(best >= PROBE_MIN, "best layer {best}");
}

/// The accuracy the pretrained teacher's best layer must reach (chance 0.25).
const PROBE_MIN: f64 = 0.5;

#[test]
fn synth_data_cli_writes_an_emodb_folder() {
    let out = std::env::temp_dir().join(format!("wgpu-mlkd-synth-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_wgpu-mlkd"))
        .args([
            "synth-data",
            "--out",
            out.to_str().unwrap(),
            "--speakers",
            "2",
            "--per-class",
            "1",
        ])
        .args(["--seconds", "0.6", "--seed", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ds = wgpu_mlkd::data::dataset::Dataset::open(&out).unwrap();
    assert_eq!(ds.utterances.len(), 8);
    assert_eq!(ds.speakers(), ["00", "01"]);
    let bad = Command::new(env!("CARGO_BIN_EXE_wgpu-mlkd"))
        .args(["synth-data", "--out", out.to_str().unwrap(), "--speakers", "101"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("2-digit"));
    std::fs::remove_dir_all(&out).unwrap();
}
