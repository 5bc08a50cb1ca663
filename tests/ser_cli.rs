//! `ser-train`, `eval` and `infer` end to end on a tiny random teacher (and student) and generated EmoDB-named
//! WAVs: they run, save, load, give the documented JSON, the same numbers for the same model twice, and clear
//! errors for a missing SER folder or a vanished upstream.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{p, run, stderr};
use wgpu_mlkd::model::synthetic::{write_random_checkpoint, write_random_student};
use wgpu_mlkd::model::Wav2Vec2Config;

fn tiny_config() -> Wav2Vec2Config {
    Wav2Vec2Config {
        conv_dim: vec![8, 8],
        conv_kernel: vec![10, 3],
        conv_stride: vec![5, 2],
        hidden_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        intermediate_size: 20,
        num_conv_pos_embeddings: 4,
        num_conv_pos_embedding_groups: 2,
        ..Wav2Vec2Config::default()
    }
}

/// A fresh folder with `teacher/` (tiny random wav2vec 2.0) and `data/` (4 speakers x 2 emotions x 3 clips of
/// 0.1 s, a tone per emotion plus noise, EmoDB names).
fn fixture(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wgpu-mlkd-ser-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    write_random_checkpoint(&dir.join("teacher"), &tiny_config(), 1).unwrap();
    let mut seed = 1u32;
    for spk in ["03", "08", "09", "10"] {
        for (letter, freq) in [('W', 440.0f32), ('T', 150.0)] {
            for (k, text) in ["a01", "a02", "b01"].iter().enumerate() {
                let samples: Vec<f32> = (0..1600 + 37 * k)
                    .map(|i| {
                        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        let noise = (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                        0.3 * (i as f32 * freq * std::f32::consts::TAU / 16000.0).sin() + 0.05 * noise
                    })
                    .collect();
                let path = dir.join("data").join(format!("{spk}{text}{letter}a.wav"));
                wgpu_mlkd::data::wav::write_wav_i16(&path, &samples, 16000).unwrap();
            }
        }
    }
    dir
}

fn ser_train(dir: &Path, upstream: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "ser-train",
        "--upstream",
        upstream,
        "--data",
        p(&dir.join("data")).to_string().leak(),
        "--out",
        p(out).to_string().leak(),
        "--epochs",
        "4",
        "--lr",
        "1e-3",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn ser_train_eval_and_infer_on_a_tiny_teacher() {
    let dir = fixture("teacher");
    let ser = dir.join("ser");
    let upstream = format!("teacher:{}", p(&dir.join("teacher")));
    let o = ser_train(
        &dir,
        &upstream,
        &ser,
        &[
            "--noise-gen",
            "white",
            "--snr",
            "0,10",
            "--conditions",
            "2",
            "--test-speakers",
            "03",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(ser.join("ser.json")).unwrap()).unwrap();
    assert_eq!(meta["upstream"]["kind"], "teacher");
    assert_eq!(meta["upstream"]["feature_layers"], 3);
    assert_eq!(meta["upstream"]["hidden_size"], 12);
    assert_eq!(meta["labels"], serde_json::json!(["anger", "sadness"]));
    assert_eq!(meta["training"]["data_hash"].as_str().unwrap().len(), 64);
    assert_eq!(meta["training"]["split"]["test_speakers"], serde_json::json!(["03"]));
    assert_eq!(meta["training"]["conditions"], 2);
    assert!(meta["training"]["best_val_ua"].is_number());
    assert!(ser.join("features.safetensors").is_file());

    // The library loads it back.
    let gpu = wgpu_mlkd::gpu::Gpu::new(&wgpu_mlkd::gpu::GpuOptions::from_env()).unwrap();
    let (model, m) = wgpu_mlkd::model::classifier::SerModel::load(&gpu, &ser).unwrap();
    assert_eq!((model.layers, model.hidden, model.classes), (3, 12, 2));
    assert_eq!(m.labels, vec!["anger", "sadness"]);

    // A rerun resumes from the feature cache.
    let o = ser_train(
        &dir,
        &upstream,
        &ser,
        &[
            "--noise-gen",
            "white",
            "--snr",
            "0,10",
            "--conditions",
            "2",
            "--test-speakers",
            "03",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming: 54 pooled features"), "{}", stderr(&o));

    // eval: the same model under two names scores identically on identical mixtures.
    let ser2 = dir.join("ser-copy");
    std::fs::create_dir_all(&ser2).unwrap();
    for f in ["ser.json", "ser.safetensors"] {
        std::fs::copy(ser.join(f), ser2.join(f)).unwrap();
    }
    let json = dir.join("eval.json");
    let plot = dir.join("eval.png");
    let o = run(&[
        "eval",
        "--ser",
        p(&ser),
        "--ser",
        p(&ser2),
        "--data",
        p(&dir.join("data")),
        "--noise-gen",
        "pink,brown",
        "--snr",
        "clean,0,5",
        "--speakers",
        "03",
        "--json",
        p(&json),
        "--plot",
        p(&plot),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("pink @ 0 dB") && out.contains("mean of 2 @ 5 dB"), "{out}");
    assert!(
        stderr(&o).contains("features computed once for 2 SER models"),
        "{}",
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2 * 5, "{v}");
    for r in results {
        for key in ["model", "noise", "snr", "wa", "ua", "n", "confusion"] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
        assert_eq!(r["n"], 6);
        let wa = r["wa"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&wa));
    }
    assert_eq!(results[0]["noise"], "clean");
    assert!(results[0]["snr"].is_null());
    assert_eq!(results[0]["model"], p(&ser));
    for (a, b) in results[..5].iter().zip(&results[5..]) {
        assert_eq!(a["model"], p(&ser));
        assert_eq!(b["model"], p(&ser2));
        for key in ["noise", "snr", "wa", "ua", "confusion"] {
            assert_eq!(a[key], b[key], "{key}: {a} vs {b}");
        }
    }
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // infer: a label, with probabilities; per segment and as JSON.
    let wav = dir.join("data").join("03a01Wa.wav");
    let o = run(&["infer", "--ser", p(&ser), "--input", p(&wav)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        (out.contains(": anger (") || out.contains(": sadness (")) && out.contains("real-time factor"),
        "{out}"
    );
    let o = run(&[
        "infer",
        "--ser",
        p(&ser),
        "--input",
        p(&wav),
        "--segment",
        "0.04",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["segments"].as_array().unwrap().len(), 3, "{v}");
    assert!(["anger", "sadness"].contains(&v["label"].as_str().unwrap()));
    assert!(v["real_time_factor"].as_f64().unwrap() > 0.0);
    assert!(v["adapter"].is_string());

    // The upstream vanishes: a clear error.
    std::fs::rename(dir.join("teacher"), dir.join("teacher-moved")).unwrap();
    let o = run(&["infer", "--ser", p(&ser), "--input", p(&wav)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is gone"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ser_train_on_a_student_run_mixes_its_layers_and_heads() {
    let dir = fixture("student");
    write_random_student(&dir.join("run").join("student"), &tiny_config(), &[1, 2], 2).unwrap();
    let ser = dir.join("ser");
    let upstream = format!("student:{}", p(&dir.join("run")));
    let o = ser_train(&dir, &upstream, &ser, &["--no-feature-cache"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(ser.join("ser.json")).unwrap()).unwrap();
    // 2 layers + input = 3 hidden states, plus 2 head predictions.
    assert_eq!(meta["upstream"]["feature_layers"], 5);
    assert_eq!(meta["upstream"]["kind"], "student");
    assert_eq!(meta["training"]["split"], "all");
    assert!(!ser.join("features.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_give_clear_errors() {
    let missing = std::env::temp_dir().join("wgpu-mlkd-no-such-ser");
    let o = run(&["infer", "--ser", p(&missing), "--input", "x.wav"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no such SER model folder"), "{}", stderr(&o));
    let o = run(&["eval", "--ser", p(&missing), "--data", "."]);
    assert!(stderr(&o).contains("no such SER model folder"), "{}", stderr(&o));
    let o = run(&["ser-train", "--upstream", "bogus", "--data", ".", "--out", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("teacher:DIR or student:RUN"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}
