//! Whole-model gradients of the MLKD distillation loss against PyTorch (`tests/fixtures/make_grad_fixture.py`):
//! a one-layer student (CNN with group or layer norm, feature projection, weight-normed positional conv, a
//! transformer layer, prediction heads), the CNN gradient scaled by 0.1. Every parameter's gradient must
//! satisfy max |error| / max |reference| <= 1e-3.

mod common;

use std::collections::HashMap;

use common::{assert_rel_close, fixture, gpu, read_safetensors};
use wgpu_mlkd::gpu::Tensor;
use wgpu_mlkd::model::student::{distill_loss, Student};
use wgpu_mlkd::model::wav2vec2::TrainOptions;
use wgpu_mlkd::tape::Tape;

/// The bound for whole-model gradients.
const GRAD_TOL: f64 = 1e-3;

/// The fixture's batch on the GPU: waveforms [B, L, 1] and one target tensor [B, T, D] per head.
fn fixture_batch(data: &HashMap<String, (Vec<usize>, Vec<f32>)>) -> (Tensor, Vec<Tensor>) {
    let (shape, input) = &data["input"];
    let wave = Tensor::from_slice(gpu(), input, &[shape[0], shape[1], 1]).unwrap();
    let (tshape, targets) = &data["targets"];
    let per_head = tshape[1..].iter().product::<usize>();
    let targets = (0..tshape[0])
        .map(|n| Tensor::from_slice(gpu(), &targets[n * per_head..(n + 1) * per_head], &tshape[1..]).unwrap())
        .collect();
    (wave, targets)
}

/// Checks the loss terms and every parameter's gradient on the fixture's batch.
fn check_grads(name: &str, grad_file: &str) {
    let dir = fixture(name);
    let want = read_safetensors(&dir.join(grad_file));
    let student = Student::load(gpu(), &dir).unwrap();
    let (wave, targets) = fixture_batch(&want);

    let tape = Tape::new();
    let wave = tape.constant(wave);
    let opts = TrainOptions {
        dropout: 0.0,
        feature_grad_mult: Some(0.1),
    };
    let (_, preds) = student.forward(&tape, &wave, opts).unwrap();
    let loss = distill_loss(&tape, &preds, &targets, 1.0).unwrap();
    assert_rel_close(
        &format!("{name}/loss"),
        &loss.total.value().to_vec().unwrap(),
        &want["loss"].1,
        1e-5,
    );
    for n in 0..targets.len() {
        assert_rel_close(
            &format!("{name}/loss_l1.{n}"),
            &loss.l1[n].value().to_vec().unwrap(),
            &want[&format!("loss_l1.{n}")].1,
            1e-5,
        );
        assert_rel_close(
            &format!("{name}/loss_cos.{n}"),
            &loss.cos[n].value().to_vec().unwrap(),
            &want[&format!("loss_cos.{n}")].1,
            1e-5,
        );
    }
    tape.backward(&loss.total).unwrap();

    let largest_grad = want
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .flat_map(|(_, (_, d))| d.iter())
        .fold(0f64, |m, v| m.max(v.abs() as f64));
    let params = student.parameters();
    let mut checked = 0;
    for p in &params {
        let (_, reference) = want
            .get(&format!("grad.{}", p.name))
            .unwrap_or_else(|| panic!("fixture lacks grad.{}", p.name));
        let got = p
            .grad()
            .map(|g| g.to_vec().unwrap())
            .unwrap_or_else(|| vec![0.0; reference.len()]);
        let max_ref = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max_ref < 1e-12 {
            // Gradients that are exactly zero in theory (the key bias, which softmax ignores; a final norm no
            // loss reads) are float noise in the reference: bound them absolutely against the layer's scale.
            let worst = got.iter().fold(0f32, |m, v| m.max(v.abs()));
            eprintln!("{:>60}: max |grad| = {worst:.2e} (zero in theory)", p.name);
            assert!(
                worst as f64 <= GRAD_TOL * largest_grad,
                "{}: {worst} vs largest gradient {largest_grad}",
                p.name
            );
        } else {
            assert_rel_close(&format!("{name}/grad.{}", p.name), &got, reference, GRAD_TOL);
        }
        checked += 1;
    }
    let n_fixture = want
        .keys()
        .filter(|k| k.starts_with("grad.") && !k.ends_with("pos_conv_embed.conv.weight"))
        .count();
    assert_eq!(checked, n_fixture, "every fixture gradient has a parameter");
}

#[test]
fn student_grad_matches_pytorch() {
    check_grads("grad_student", "grad.safetensors");
}

#[test]
fn stable_student_grad_matches_pytorch() {
    check_grads("grad_student_stable", "grad.safetensors");
}

/// Five AdamW steps (lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 1e-6, clipping at 5) of the whole
/// student on the fixture's batch: the loss before each step and every parameter's total change after step 5
/// (compared as a change: every tensor moves by ~5e-3, so comparing raw values would hide a wrong update).
#[test]
fn student_adamw_steps_grad_match_pytorch() {
    use wgpu_mlkd::ops::adamw::{AdamW, AdamWConfig};
    let dir = fixture("grad_student");
    let data = read_safetensors(&dir.join("grad.safetensors"));
    let want = read_safetensors(&dir.join("steps.safetensors"));
    let student = Student::load(gpu(), &dir).unwrap();
    let params = student.parameters();
    let before: Vec<Vec<f32>> = params.iter().map(|p| p.value().to_vec().unwrap()).collect();
    let (wave_data, targets) = fixture_batch(&data);
    let values: Vec<&Tensor> = params.iter().map(|p| p.value()).collect();
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 1e-6,
        max_grad_norm: Some(5.0),
    };
    let mut opt = AdamW::new(&values, config).unwrap();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let tape = Tape::new();
        let wave = tape.constant(wave_data.clone());
        let opts = TrainOptions {
            dropout: 0.0,
            feature_grad_mult: Some(0.1),
        };
        let (_, preds) = student.forward(&tape, &wave, opts).unwrap();
        let loss = distill_loss(&tape, &preds, &targets, 1.0).unwrap();
        losses.push(loss.total.value().to_vec().unwrap()[0]);
        tape.backward(&loss.total).unwrap();
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad().expect("every parameter gets a gradient"))
            .collect();
        let grad_refs: Vec<&Tensor> = grads.iter().collect();
        opt.step(&values, &grad_refs, 1e-3).unwrap();
        params.iter().for_each(|p| p.zero_grad());
    }
    assert_rel_close("adamw/losses", &losses, &want["loss"].1, 1e-5);
    for (p, old) in params.iter().zip(&before) {
        let (_, after) = &want[&format!("param.{}", p.name)];
        let want_delta: Vec<f32> = after.iter().zip(old).map(|(a, o)| a - o).collect();
        let got_delta: Vec<f32> = p
            .value()
            .to_vec()
            .unwrap()
            .iter()
            .zip(old)
            .map(|(a, o)| a - o)
            .collect();
        if want_delta.iter().all(|d| *d == 0.0) {
            // The key bias never moves (its gradient is zero in theory).
            assert!(got_delta.iter().all(|d| d.abs() < 1e-6), "{} moved", p.name);
            continue;
        }
        assert_rel_close(&format!("adamw/delta.{}", p.name), &got_delta, &want_delta, GRAD_TOL);
    }
}
