//! The MLKD student built from a teacher (`tests/fixtures/base_group`, 3 layers, as teacher): K = 2 layers
//! copied exactly, fresh heads, save/load round trips (student folders and training checkpoints), extract on
//! a saved student, and clear errors for bad arguments.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture, gpu, read_safetensors};
use wgpu_mlkd::gpu::Tensor;
use wgpu_mlkd::model::checkpoint::{load_checkpoint, save_checkpoint};
use wgpu_mlkd::model::student::Student;
use wgpu_mlkd::model::wav2vec2::TrainOptions;
use wgpu_mlkd::model::Wav2Vec2;
use wgpu_mlkd::ops::adamw::{AdamW, AdamWConfig};
use wgpu_mlkd::tape::Tape;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wgpu-mlkd-student-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn teacher_input() -> Vec<f32> {
    read_safetensors(&fixture("base_group").join("expected.safetensors"))["input_values"]
        .1
        .clone()
}

fn student() -> Student {
    Student::from_teacher(gpu(), &fixture("base_group"), 2, vec![1, 2, 3], 7).unwrap()
}

fn err(r: anyhow::Result<Student>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Every parameter by name, read back.
fn values(s: &Student) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    s.parameters()
        .iter()
        .map(|p| (p.name.clone(), p.value().shape().to_vec(), p.value().to_vec().unwrap()))
        .collect()
}

#[test]
fn student_layers_equal_the_teachers_before_training() {
    let teacher = Wav2Vec2::load(gpu(), &fixture("base_group")).unwrap();
    let s = student();
    assert_eq!(s.encoder.layers.len(), 2);
    assert_eq!(s.heads.target_layers, vec![1, 2, 3]);
    assert_eq!(s.config_json["num_hidden_layers"], 2);
    assert_eq!(s.config_json["mlkd_target_layers"], serde_json::json!([1, 2, 3]));
    let input = teacher_input();
    let want = teacher.forward(&input).unwrap();
    let got = s.encoder.forward(&input).unwrap();
    assert_eq!(got.hidden_states.len(), 3);
    for i in 0..=2 {
        let (g, w) = (
            got.hidden_states[i].to_vec().unwrap(),
            want.hidden_states[i].to_vec().unwrap(),
        );
        assert_eq!(g, w, "hidden_states.{i} differs from the teacher's");
    }
    // The training forward (on a no-grad tape) gives the same hidden states and one prediction per target.
    let tape = Tape::no_grad();
    let wave = tape.constant(Tensor::from_slice(gpu(), &input, &[1, input.len(), 1]).unwrap());
    let (out, preds) = s.forward(&tape, &wave, TrainOptions::default()).unwrap();
    for i in 0..=2 {
        let g = out.hidden_states[i].value().to_vec().unwrap();
        let w = want.hidden_states[i].to_vec().unwrap();
        let worst = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("tape hidden_states.{i}: max |err| = {worst:.2e}");
        assert!(worst <= 1e-6, "hidden_states.{i}: {worst}");
    }
    assert_eq!(preds.len(), 3);
    for p in &preds {
        assert_eq!(p.shape(), want.hidden_states[0].shape());
    }
}

#[test]
fn heads_follow_torch_linear_init_and_the_seed() {
    let a = student();
    let b = student();
    let c = Student::from_teacher(gpu(), &fixture("base_group"), 2, vec![1, 2, 3], 8).unwrap();
    let bound = 1.0 / (32f32).sqrt();
    let heads = |s: &Student| -> Vec<Vec<f32>> {
        s.heads
            .parameters()
            .iter()
            .map(|p| p.value().to_vec().unwrap())
            .collect()
    };
    let (ha, hb, hc) = (heads(&a), heads(&b), heads(&c));
    assert_eq!(ha, hb, "same seed, same heads");
    assert_ne!(ha, hc, "another seed, other heads");
    for (p, v) in a.heads.parameters().iter().zip(&ha) {
        assert!(p.name.starts_with("mlkd_heads."), "{}", p.name);
        assert!(
            v.iter().all(|x| x.abs() <= bound),
            "{} outside U(-1/sqrt(D), 1/sqrt(D))",
            p.name
        );
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < bound as f64 / 2.0, "{}: mean {mean}", p.name);
    }
    assert_eq!(a.heads.proj.weight.value().shape(), &[96, 32]);
    assert_eq!(a.heads.out.len(), 3);
}

#[test]
fn save_and_load_round_trip_bit_exactly() {
    let s = student();
    let dir = temp("saved");
    s.save(&dir).unwrap();
    // Saving again over an existing folder works too.
    s.save(&dir).unwrap();
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.iter().all(|f| !f.ends_with(".tmp")), "{files:?}");
    assert!(dir.join("preprocessor_config.json").is_file());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["num_hidden_layers"], 2);
    assert_eq!(json["model_type"], "wav2vec2");
    assert_eq!(json["mlkd_target_layers"], serde_json::json!([1, 2, 3]));
    assert_eq!(json["hidden_size"], 32);
    let stored = read_safetensors(&dir.join("model.safetensors"));
    assert!(stored.contains_key("encoder.pos_conv_embed.conv.parametrizations.weight.original0"));
    assert!(stored.contains_key("mlkd_heads.out.2.bias"));
    assert!(!stored.keys().any(|k| k.starts_with("encoder.layers.2.")));

    let back = Student::load(gpu(), &dir).unwrap();
    let (a, b) = (values(&s), values(&back));
    assert_eq!(a.len(), b.len());
    for ((na, sa, da), (nb, sb, db)) in a.iter().zip(&b) {
        assert_eq!((na, sa), (nb, sb));
        assert!(
            da.iter().zip(db).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{na} changed in the round trip"
        );
    }
    assert_eq!(back.heads.target_layers, vec![1, 2, 3]);
    assert_eq!(back.config_json, s.config_json);

    // The encoder alone loads through the teacher loader (the heads are ignored).
    let enc = Wav2Vec2::load(gpu(), &dir).unwrap();
    let input = teacher_input();
    assert_eq!(
        enc.forward(&input).unwrap().hidden_states[2].to_vec().unwrap(),
        s.encoder.forward(&input).unwrap().hidden_states[2].to_vec().unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn extract_on_a_saved_student_writes_predictions() {
    let s = student();
    let dir = temp("extract-student");
    s.save(&dir).unwrap();
    let out = dir.with_extension("safetensors");
    let wav = fixture("base_group").join("input.wav");
    let o = Command::new(env!("CARGO_BIN_EXE_wgpu-mlkd"))
        .args(["extract", "--teacher"])
        .arg(&dir)
        .arg("--input")
        .arg(&wav)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_safetensors(&out);
    for key in [
        "hidden_states.0",
        "hidden_states.1",
        "hidden_states.2",
        "pred.1",
        "pred.2",
        "pred.3",
    ] {
        assert!(
            got.contains_key(key),
            "{key} missing: {:?}",
            got.keys().collect::<Vec<_>>()
        );
    }
    assert!(!got.contains_key("hidden_states.3"));
    // The predictions are the heads on the student's last layer, on the same (normalised) input.
    let mut samples = wgpu_mlkd::data::wav::load_16k(&wav).unwrap();
    wgpu_mlkd::data::wav::normalize(&mut samples);
    let tape = Tape::no_grad();
    let wave = tape.constant(Tensor::from_slice(gpu(), &samples, &[1, samples.len(), 1]).unwrap());
    let (_, preds) = s.forward(&tape, &wave, TrainOptions::default()).unwrap();
    for (n, l) in [1, 2, 3].iter().enumerate() {
        let (shape, data) = &got[&format!("pred.{l}")];
        assert_eq!(shape, &preds[n].shape()[1..].to_vec());
        common::assert_rel_close(&format!("pred.{l}"), data, &preds[n].value().to_vec().unwrap(), 1e-6);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn bad_student_arguments_are_clear_errors() {
    let t = fixture("base_group");
    assert!(err(Student::from_teacher(gpu(), &t, 0, vec![1], 0)).contains("at least one"));
    assert!(err(Student::from_teacher(gpu(), &t, 4, vec![1], 0)).contains("teacher of 3 layers"));
    assert!(err(Student::from_teacher(gpu(), &t, 2, vec![], 0)).contains("no target layers"));
    assert!(err(Student::from_teacher(gpu(), &t, 2, vec![4], 0)).contains("valid: 1..=3"));
    assert!(err(Student::from_teacher(gpu(), &t, 2, vec![0, 1], 0)).contains("valid: 1..=3"));
    assert!(err(Student::from_teacher(gpu(), &t, 2, vec![1, 1], 0)).contains("twice"));
    assert!(err(Student::from_teacher(
        gpu(),
        Path::new("/nonexistent/teacher"),
        2,
        vec![1],
        0
    ))
    .contains("config.json"));
}

/// A teacher copy without some tensors (the teacher's unused upper layers may be absent; a copied one not).
fn teacher_without(name: &str, drop: impl Fn(&str) -> bool) -> PathBuf {
    let dir = temp(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("base_group");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let kept: Vec<(String, Vec<usize>, Vec<f32>)> = read_safetensors(&src.join("model.safetensors"))
        .into_iter()
        .filter(|(k, _)| !drop(k))
        .map(|(k, (s, d))| (k, s, d))
        .collect();
    let bytes = wgpu_mlkd::model::student::serialize_f32(&kept, Default::default()).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir
}

#[test]
fn teacher_problems_only_matter_for_what_the_student_copies() {
    let no_top = teacher_without("no-top", |k| k.starts_with("encoder.layers.2."));
    Student::from_teacher(gpu(), &no_top, 2, vec![1, 2, 3], 0).unwrap();
    assert!(
        err(Student::from_teacher(gpu(), &no_top, 3, vec![1, 2, 3], 0)).contains("missing tensor encoder.layers.2.")
    );
    let no_l1 = teacher_without("no-l1", |k| k == "encoder.layers.1.attention.q_proj.weight");
    assert!(err(Student::from_teacher(gpu(), &no_l1, 2, vec![1], 0))
        .contains("missing tensor encoder.layers.1.attention.q_proj.weight"));
    let extra = teacher_without("extra", |_| false);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = read_safetensors(&extra.join("model.safetensors"))
        .into_iter()
        .map(|(k, (s, d))| (k, s, d))
        .collect();
    tensors.push(("stray.weight".into(), vec![2], vec![0.0, 1.0]));
    let bytes = wgpu_mlkd::model::student::serialize_f32(&tensors, Default::default()).unwrap();
    std::fs::write(extra.join("model.safetensors"), bytes).unwrap();
    assert!(err(Student::from_teacher(gpu(), &extra, 2, vec![1], 0)).contains("unexpected tensor stray.weight"));
    for d in [no_top, no_l1, extra] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Deterministic values in [-scale, scale) (an LCG; the crate's test helpers are not public).
fn pseudo_random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[test]
fn training_checkpoints_round_trip_and_resume_identically() {
    let s = student();
    let params = s.parameters();
    let values: Vec<&Tensor> = params.iter().map(|p| p.value()).collect();
    let mut opt = AdamW::new(&values, AdamWConfig::default()).unwrap();
    let grads: Vec<Tensor> = params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.value().numel();
            Tensor::from_slice(gpu(), &pseudo_random(100 + i as u64, n, 0.1), p.value().shape()).unwrap()
        })
        .collect();
    let g: Vec<&Tensor> = grads.iter().collect();
    opt.step(&values, &g, 1e-3).unwrap();
    opt.step(&values, &g, 2e-3).unwrap();
    let extra = serde_json::json!({"step": 2, "rng": [1, 2, 3], "lr": 0.1});
    let dir = temp("ckpt");
    save_checkpoint(&dir, &s, &opt, &extra).unwrap();
    save_checkpoint(&dir, &s, &opt, &extra).unwrap(); // over an existing one
    let parent_names: Vec<String> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !parent_names.iter().any(|n| n.starts_with(".ckpt.")),
        "{parent_names:?}"
    );

    let (s2, mut opt2, extra2) = load_checkpoint(&dir, gpu()).unwrap();
    assert_eq!(extra2, extra);
    assert_eq!(opt2.steps(), 2);
    assert_eq!(opt2.config, opt.config);
    let bits = |t: &Tensor| -> Vec<u32> { t.to_vec().unwrap().iter().map(|x| x.to_bits()).collect() };
    let params2 = s2.parameters();
    assert_eq!(params.len(), params2.len());
    for (i, (p, q)) in params.iter().zip(&params2).enumerate() {
        assert_eq!(p.name, q.name);
        assert_eq!(bits(p.value()), bits(q.value()), "{}", p.name);
        assert_eq!(
            bits(&opt.moments().0[i]),
            bits(&opt2.moments().0[i]),
            "exp_avg {}",
            p.name
        );
        assert_eq!(
            bits(&opt.moments().1[i]),
            bits(&opt2.moments().1[i]),
            "exp_avg_sq {}",
            p.name
        );
    }
    // One more step from the original and from the restored state: identical parameters.
    opt.step(&values, &g, 1e-3).unwrap();
    let values2: Vec<&Tensor> = params2.iter().map(|p| p.value()).collect();
    opt2.step(&values2, &g, 1e-3).unwrap();
    for (p, q) in params.iter().zip(&params2) {
        assert_eq!(bits(p.value()), bits(q.value()), "{} after resuming", p.name);
    }
    assert!(load_checkpoint(&dir.join("missing"), gpu()).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
