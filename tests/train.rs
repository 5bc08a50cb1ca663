//! `wgpu-mlkd train` end to end on the tiny fixture teacher (tests/fixtures/base_group: 3 layers of width 32,
//! total stride 40) and generated speech-like WAVs of four speakers: the loss decreases; the run exports a
//! student that `extract` reads; validation compares the student with the teacher on the same noisy input
//! (and the teacher's clean input reproduces its cached targets); a run stopped abruptly and resumed logs
//! bit-identical losses and ends with byte-identical weights; a non-finite loss stops training and keeps the
//! last good checkpoint; the ablations (single target layer, clean input) run; bad options are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::{bin, fails_with, fixture, fresh_temp, ok, p, read_safetensors, stderr};
use wgpu_mlkd::data::wav;

/// A harmonic "voice" with a speaker- and item-dependent pitch and a syllable-rate envelope, plus a little
/// seeded noise, at 16 kHz.
fn voice(speaker: u64, item: u64, n: usize) -> Vec<f32> {
    let mut s = (speaker * 131 + item).wrapping_mul(6364136223846793005).wrapping_add(1);
    let f0 = 110.0 + 30.0 * speaker as f32 + 7.0 * item as f32;
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let noise = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            let t = i as f32 / 16000.0;
            let env = 0.6 + 0.4 * (2.0 * std::f32::consts::PI * 4.0 * t).sin();
            let w = 2.0 * std::f32::consts::PI * f0 * t;
            env * (0.3 * w.sin() + 0.15 * (2.0 * w).sin() + 0.08 * (3.0 * w).sin()) + 0.02 * noise
        })
        .collect()
}

/// 4 speakers x 4 utterances, 0.25 to 0.4 s, EmoDB names; and the teacher cache of them. Built once.
fn data_and_cache() -> &'static (PathBuf, PathBuf) {
    static ONCE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    ONCE.get_or_init(|| {
        let data = temp("data");
        std::fs::create_dir_all(&data).unwrap();
        for (si, speaker) in ["03", "08", "09", "10"].iter().enumerate() {
            for (k, emo) in ["W", "N", "F", "T"].iter().enumerate() {
                let n = 4000 + 800 * ((si + k) % 3);
                let x = voice(si as u64, k as u64, n);
                wav::write_wav_i16(&data.join(format!("{speaker}a0{k}{emo}a.wav")), &x, 16000).unwrap();
            }
        }
        let cache = temp("cache");
        ok(bin()
            .args([
                "cache-teacher",
                "--teacher",
                p(&fixture("base_group")),
                "--data",
                p(&data),
            ])
            .args(["--out", p(&cache), "--dtype", "f32"])
            .output()
            .unwrap());
        (data, cache)
    })
}

/// `train` on the shared data with `extra` options.
fn train(out: &Path, extra: &[&str]) -> Output {
    let (data, cache) = data_and_cache();
    bin()
        .args([
            "train",
            "--teacher",
            p(&fixture("base_group")),
            "--cache",
            p(cache),
            "--data",
            p(data),
        ])
        .args(["--out", p(out), "--batch", "2", "--crop-seconds", "0.2"])
        .args(extra)
        .output()
        .unwrap()
}

fn log_lines(run: &Path, file: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join(file))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The exact text of each logged loss, in step order (compared as text: bit-identical floats print alike).
fn losses(run: &Path) -> Vec<String> {
    log_lines(run, "log.jsonl")
        .iter()
        .map(|v| v["loss"].to_string())
        .collect()
}

#[test]
fn training_lowers_the_loss_and_exports_a_student_extract_reads() {
    let run = temp("run");
    let o = ok(train(
        &run,
        &[
            "--noise",
            "gen:white",
            "--noise",
            "gen:pink",
            "--steps",
            "40",
            "--lr",
            "2e-3",
            "--eval-every",
            "20",
            "--val-speakers",
            "10",
            "--val-snr",
            "clean,0,5",
        ],
    ));
    let lines = log_lines(&run, "log.jsonl");
    assert_eq!(lines.len(), 40);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["step"].as_u64(), Some(i as u64 + 1));
        for key in [
            "loss",
            "lr",
            "grad_norm",
            "l1.1",
            "cos.1",
            "l1.2",
            "cos.2",
            "l1.3",
            "cos.3",
        ] {
            assert!(
                v[key].as_f64().is_some_and(f64::is_finite),
                "step {}: {key} in {v}",
                i + 1
            );
        }
    }
    let mean = |s: &[serde_json::Value]| s.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&lines[..5]), mean(&lines[35..]));
    eprintln!("loss: first 5 steps {first:.4}, last 5 {last:.4}");
    assert!(last < 0.8 * first, "the loss did not decrease: {first} -> {last}");

    // Validation at steps 20 and 40; the teacher's clean input is what the cache holds, so its cosine is 1.
    let val = log_lines(&run, "val.jsonl");
    assert_eq!(
        val.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(),
        [20, 40]
    );
    let conds = val[1]["conditions"].as_array().unwrap();
    assert_eq!(conds.len(), 3);
    assert_eq!(conds[0]["condition"], "clean");
    for c in conds {
        for (s, t) in c["student_cos"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["teacher_cos"].as_array().unwrap())
        {
            let (s, t) = (s.as_f64().unwrap(), t.as_f64().unwrap());
            assert!(
                (-1.0..=1.0 + 1e-6).contains(&s) && (-1.0..=1.0 + 1e-6).contains(&t),
                "{c}"
            );
        }
    }
    for t in conds[0]["teacher_cos"].as_array().unwrap() {
        assert!((t.as_f64().unwrap() - 1.0).abs() < 1e-5, "teacher on clean input: {t}");
    }
    // At 0 dB the teacher no longer reproduces its clean targets.
    assert!(conds[1]["teacher_cos"][2].as_f64().unwrap() < 0.999, "{}", conds[1]);
    assert!(stderr(&o).contains("validation at step 40"), "{}", stderr(&o));

    // The exported student: extract reads it and writes the head predictions.
    let student = run.join("student");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["mlkd_target_layers"], serde_json::json!([1, 2, 3]));
    assert_eq!(cfg["num_hidden_layers"], 2);
    let out = run.join("features.safetensors");
    let (data, _) = data_and_cache();
    ok(bin()
        .args([
            "extract",
            "--teacher",
            p(&student),
            "--input",
            p(&data.join("03a00Wa.wav")),
        ])
        .args(["--out", p(&out)])
        .output()
        .unwrap());
    let t = read_safetensors(&out);
    for l in [1, 2, 3] {
        assert!(t.contains_key(&format!("pred.{l}")), "pred.{l} missing: {:?}", t.keys());
    }
    let png = std::fs::read(run.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // An existing run is not overwritten without --resume or --force.
    fails_with(
        train(&run, &["--noise", "gen:white", "--steps", "40"]),
        &["already holds a training run"],
    );
}

#[test]
fn resume_after_a_crash_continues_bit_identically() {
    let common = [
        "--noise",
        "gen:white",
        "--steps",
        "7",
        "--save-every",
        "3",
        "--eval-every",
        "0",
        "--val-snr",
        "0",
        "--seed",
        "5",
    ];
    let straight = temp("straight");
    ok(train(&straight, &common));

    let crashed = temp("crashed");
    let o = train(&crashed, &[&common[..], &["--stop-after", "5"]].concat());
    assert_eq!(o.status.code(), Some(86), "{}", stderr(&o));
    assert_eq!(losses(&crashed).len(), 5, "five steps logged before the crash");
    // Another command line than the run's is refused.
    fails_with(
        train(&crashed, &[&common[..], &["--resume", "--lr", "1e-3"]].concat()),
        &["differs from the run", "optim"],
    );
    let o = ok(train(&crashed, &[&common[..], &["--resume"]].concat()));
    assert!(stderr(&o).contains("resuming at step 3"), "{}", stderr(&o));

    assert_eq!(losses(&crashed), losses(&straight));
    let weights = |run: &Path| std::fs::read(run.join("student/model.safetensors")).unwrap();
    assert!(
        weights(&crashed) == weights(&straight),
        "the resumed run ends with other weights"
    );
    // (Compared tensor by tensor: the files' metadata order may differ.)
    let moments = |run: &Path| {
        let mut t: Vec<_> = read_safetensors(&run.join("checkpoint/optimizer.safetensors"))
            .into_iter()
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let (a, b) = (moments(&crashed), moments(&straight));
    assert_eq!(a.len(), b.len());
    for ((na, (_, va)), (nb, (_, vb))) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{na} differs after resuming"
        );
    }
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint() {
    let run = temp("nan");
    let err = fails_with(
        train(
            &run,
            &[
                "--noise",
                "gen:white",
                "--steps",
                "6",
                "--save-every",
                "2",
                "--poison-step",
                "4",
            ],
        ),
        &["step 4", "not finite", "step 2"],
    );
    eprintln!("{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/trainer.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 2);
    assert!(
        !run.join("student").exists(),
        "a student was exported from a diverged run"
    );
    assert_eq!(losses(&run).len(), 3, "steps 1-3 logged, not the failed one");
}

#[test]
fn ablations_single_level_and_clean_input_run() {
    let single = temp("single");
    ok(train(
        &single,
        &[
            "--noise",
            "gen:white",
            "--steps",
            "2",
            "--targets",
            "3",
            "--val-snr",
            "5",
        ],
    ));
    let v = &log_lines(&single, "log.jsonl")[1];
    assert!(v.get("l1.3").is_some() && v.get("l1.1").is_none(), "{v}");
    let cfg = std::fs::read_to_string(single.join("student/config.json")).unwrap();
    assert!(cfg.contains("\"mlkd_target_layers\": [\n    3\n  ]"), "{cfg}");

    let clean = temp("clean");
    ok(train(&clean, &["--snr", "clean", "--steps", "2", "--val-snr", "clean"]));
    assert!(log_lines(&clean, "log.jsonl").iter().all(|v| v["clean_items"] == 2));
}

#[test]
fn bad_options_are_refused() {
    let run = temp("bad");
    fails_with(train(&run, &["--steps", "2"]), &["--noise"]);
    fails_with(train(&run, &["--noise", "gen:white", "--targets", "1,4"]), &["layer 4"]);
    fails_with(train(&run, &["--noise", "gen:white", "--snr", "0:x:5"]), &["SNR"]);
    fails_with(
        train(&run, &["--noise", "gen:white", "--resume"]),
        &["holds no training run"],
    );
    fails_with(
        train(&run, &["--noise", "gen:white", "--val-speakers", "99"]),
        &["speaker \"99\""],
    );
    let other = temp("other-teacher");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(fixture("base_group").join(f), other.join(f)).unwrap();
    }
    wgpu_mlkd::model::synthetic::write_random_checkpoint(
        &other,
        &wgpu_mlkd::model::Wav2Vec2Config::from_file(&other.join("config.json")).unwrap(),
        9,
    )
    .unwrap();
    let (data, cache) = data_and_cache();
    fails_with(
        bin()
            .args(["train", "--teacher", p(&other), "--cache", p(cache), "--data", p(data)])
            .args(["--out", p(&run), "--noise", "gen:white"])
            .output()
            .unwrap(),
        &["another teacher"],
    );
}

#[test]
fn a_training_step_waits_for_the_gpu_once() {
    use wgpu_mlkd::data::{cache::TeacherCache, dataset::Dataset, noise::NoiseBank};
    use wgpu_mlkd::model::student::Student;
    use wgpu_mlkd::ops::adamw::{AdamW, AdamWConfig};
    use wgpu_mlkd::train::{BatchSampler, OptimConfig, TrainDataConfig, Trainer};

    let (data, cache_dir) = data_and_cache();
    let gpu = common::gpu();
    let cache = TeacherCache::open(cache_dir).unwrap();
    let dataset = Dataset::open(data).unwrap();
    let noise = NoiseBank::load(&[], &["white".to_string()], false, 0).unwrap();
    let student = Student::from_teacher(gpu, &fixture("base_group"), 2, vec![1, 2, 3], 0).unwrap();
    let params = student.parameters();
    let values: Vec<_> = params.iter().map(|p| p.value()).collect();
    let opt = AdamW::new(&values, AdamWConfig::default()).unwrap();
    let ids: Vec<String> = dataset.utterances.iter().map(|u| u.id.clone()).collect();
    let cfg = TrainDataConfig {
        crop_seconds: 0.2,
        batch: 2,
        ..Default::default()
    };
    let model = student.encoder.config.clone();
    let sampler = BatchSampler::new(&dataset.utterances, &cache, &noise, &model, cfg, &ids).unwrap();
    let optim = OptimConfig {
        steps: 4,
        ..Default::default()
    };
    let mut trainer = Trainer::new(student, opt, sampler, optim, 0).unwrap();
    trainer.step().unwrap();
    for _ in 0..2 {
        let (submissions, waits, dispatches) = (gpu.submissions(), gpu.waits(), gpu.host_stats().dispatches);
        let r = trainer.step().unwrap();
        let n = gpu.submissions() - submissions;
        let waited = gpu.waits() - waits;
        let recorded = gpu.host_stats().dispatches - dispatches;
        eprintln!(
            "step {}: loss {}, {recorded} dispatches, {n} GPU submission(s), {waited} wait(s)",
            r.step, r.loss
        );
        // The host waits once, for the loss: no readback inside a step. (Its commands go to the GPU in several
        // submissions, one per `GpuOptions::submit_every` recorded, without a wait.)
        assert_eq!(waited, 1, "a training step waited for the GPU {waited} times");
        let every = gpu.submit_every() as u64;
        match recorded.checked_div(every) {
            None => assert_eq!(n, 1, "a training step took {n} submissions"),
            // At least one per `every` dispatches (commands also count uploads and copies), and the last.
            Some(full) => assert!(
                n > full,
                "{recorded} dispatches went in {n} submissions of up to {every}"
            ),
        }
    }
}

/// Kills a training run with SIGKILL `kills` times at random moments (seeded), resuming each time, then lets it
/// finish: its logged losses and final weights must equal an uninterrupted run's.
fn kill_loop(name: &str, steps: usize, kills: usize, seed: u64) {
    use rand::{Rng, SeedableRng};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let steps_s = steps.to_string();
    let args = [
        "--noise",
        "gen:white",
        "--steps",
        &steps_s,
        "--save-every",
        "2",
        "--eval-every",
        "0",
        "--val-snr",
        "0",
    ];
    let straight = temp(&format!("{name}-straight"));
    let t = Instant::now();
    ok(train(&straight, &args));
    let full_secs = t.elapsed().as_secs_f64();
    let run = temp(&format!("{name}-killed"));
    let (data, cache) = data_and_cache();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let command = |resume: bool| {
        let mut c = bin();
        c.args([
            "train",
            "--teacher",
            p(&fixture("base_group")),
            "--cache",
            p(cache),
            "--data",
            p(data),
        ])
        .args(["--out", p(&run), "--batch", "2", "--crop-seconds", "0.2"])
        .args(args);
        if resume {
            c.arg("--resume");
        }
        c
    };
    for k in 0..kills {
        let resume = run.join("run.json").exists();
        let mut child = command(resume)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let at = Duration::from_secs_f64(rng.gen_range(0.0..full_secs * 1.1));
        std::thread::sleep(at);
        let _ = child.kill();
        let o = child.wait_with_output().unwrap();
        assert!(!stderr(&o).contains("panicked"), "kill {k}: {}", stderr(&o));
        eprintln!(
            "kill {k} at {:.2} s (resume: {resume}): exit {:?}",
            at.as_secs_f64(),
            o.status.code()
        );
    }
    let resume = run.join("run.json").exists();
    ok(command(resume).output().unwrap());
    assert_eq!(
        losses(&run),
        losses(&straight),
        "the logged losses differ after {kills} kills"
    );
    let weights = |r: &Path| std::fs::read(r.join("student/model.safetensors")).unwrap();
    assert!(
        weights(&run) == weights(&straight),
        "the final weights differ after {kills} kills"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .collect();
    assert!(leftovers.is_empty(), "leftovers: {leftovers:?}");
}

#[test]
fn repeated_sigkill_resumes_to_identical_losses_and_weights() {
    kill_loop("kill", 8, 4, 11);
}

#[test]
#[ignore = "slow: 25 kills of a longer run"]
fn repeated_sigkill_resumes_to_identical_losses_and_weights_long() {
    kill_loop("kill-long", 30, 25, 12);
}

fn temp(name: &str) -> PathBuf {
    fresh_temp("train", name)
}
