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

/// A mono 8-bit PCM WAV of `frames` silent frames at `rate` (written directly: the cheapest long file).
fn write_silent_u8_wav(path: &Path, rate: u32, frames: u32) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"RIFF");
    header.extend_from_slice(&(36 + frames).to_le_bytes());
    header.extend_from_slice(b"WAVEfmt ");
    header.extend_from_slice(&16u32.to_le_bytes());
    header.extend_from_slice(&1u16.to_le_bytes()); // PCM
    header.extend_from_slice(&1u16.to_le_bytes()); // mono
    header.extend_from_slice(&rate.to_le_bytes());
    header.extend_from_slice(&rate.to_le_bytes()); // bytes per second
    header.extend_from_slice(&1u16.to_le_bytes()); // block align
    header.extend_from_slice(&8u16.to_le_bytes());
    header.extend_from_slice(b"data");
    header.extend_from_slice(&frames.to_le_bytes());
    f.write_all(&header).unwrap();
    let block = vec![128u8; 1 << 20];
    let mut left = frames as usize;
    while left > 0 {
        let n = left.min(block.len());
        f.write_all(&block[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
}

/// `ser-train` and `eval` check every file of `--data` from its header before any GPU work, and name every
/// unusable one at once: too short for one frame, truncated, and (where this GPU's limit makes such a file
/// cheap to write) longer than the upstream takes in one piece. Nothing is written.
#[test]
fn unusable_audio_is_refused_up_front_naming_every_file() {
    let dir = fixture("unusable");
    let ser = dir.join("ser");
    let upstream = format!("teacher:{}", p(&dir.join("teacher")));
    let o = ser_train(&dir, &upstream, &ser, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let data = dir.join("data");
    let short = data.join("03c01Wa.wav");
    wgpu_mlkd::data::wav::write_wav_i16(&short, &[0.1; 12], 16000).unwrap();
    let truncated = data.join("08c01Ta.wav");
    wgpu_mlkd::data::wav::write_wav_i16(&truncated, &[0.1; 4000], 16000).unwrap();
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mut expect = vec![
        (short.clone(), "shorter than the upstream's receptive field"),
        (truncated.clone(), "truncated"),
    ];
    // The longest input at this GPU's binding limit, as a 4 kHz 8-bit file: 17 MB on lavapipe's 128 MiB.
    let max = tiny_config().max_samples(common::gpu().max_binding_bytes());
    let frames = max / 4 + 2;
    if frames <= 64 << 20 {
        let long = data.join("09c01Wa.wav");
        write_silent_u8_wav(&long, 4000, frames as u32);
        expect.push((long, "longer than the upstream takes in one piece on this GPU"));
    } else {
        eprintln!("too-long file skipped: this GPU takes {max} samples in one piece ({frames} frames to write)");
    }

    let out = dir.join("ser2");
    let o = ser_train(&dir, &upstream, &out, &[]);
    let e = stderr(&o);
    eprintln!("{e}");
    assert!(!o.status.success());
    let listed = format!("{} of {} audio files cannot be used", expect.len(), 24 + expect.len());
    assert!(e.contains(&listed), "{e}");
    let o2 = run(&["eval", "--ser", p(&ser), "--data", p(&data), "--snr", "clean"]);
    let e2 = stderr(&o2);
    eprintln!("{e2}");
    assert!(!o2.status.success());
    for e in [&e, &e2] {
        assert!(e.contains("nothing was computed"), "{e}");
        for (path, problem) in &expect {
            assert!(
                e.contains(&format!("{}: ", p(path))),
                "{} not named: {e}",
                path.display()
            );
            assert!(e.contains(problem), "{problem:?} missing: {e}");
        }
        assert!(!e.contains("panicked"), "{e}");
    }
    assert!(!out.exists(), "ser-train wrote {}", out.display());
    assert!(!e2.contains("features of"), "eval started work: {e2}");

    // Out of GPU memory (here the pool's limit, which takes the device's out-of-memory path) is a clear error
    // from a command too, with nothing written.
    let good = data.join("03a01Wa.wav");
    let json = dir.join("infer.json");
    let o = common::bin()
        .args(["infer", "--ser", p(&ser), "--input", p(&good), "--json"])
        .env("WGPU_MLKD_GPU_MEMORY_LIMIT", "4KiB")
        .stdout(std::fs::File::create(&json).unwrap())
        .output()
        .unwrap();
    let e3 = stderr(&o);
    eprintln!("{e3}");
    assert!(!o.status.success());
    assert!(
        e3.contains("GPU out of memory allocating") && e3.contains("WGPU_MLKD_GPU_MEMORY_LIMIT"),
        "{e3}"
    );
    assert!(!e3.contains("panicked"), "{e3}");
    let _ = std::fs::remove_dir_all(&dir);
}
