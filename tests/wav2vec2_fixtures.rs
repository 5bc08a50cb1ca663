//! The teacher forward pass against hidden states written by Hugging Face transformers itself
//! (`tests/fixtures/make_fixtures.py`): both architectures, both weight-norm namings, a `wav2vec2.`-prefixed
//! f16 sharded checkpoint. Every tensor must satisfy max |error| / max |reference| <= 1e-4.

mod common;

use common::{assert_rel_close, fixture, gpu, read_safetensors};
use wgpu_mlkd::data::wav;
use wgpu_mlkd::model::{teacher_normalizes, Wav2Vec2};

/// The bound for a model forward against transformers.
const MODEL_TOL: f64 = 1e-4;
/// The input pipeline (WAV decoding + normalisation) against the feature extractor: f32 rounding only.
const INPUT_TOL: f64 = 1e-6;

fn check_fixture(name: &str) {
    let dir = fixture(name);
    let expected = read_safetensors(&dir.join("expected.safetensors"));
    let (_, input_values) = &expected["input_values"];

    // 1. Our WAV reading and normalisation reproduce transformers' input_values.
    let mut samples = wav::load_16k(&dir.join("input.wav")).unwrap();
    if teacher_normalizes(&dir).unwrap() {
        wav::normalize(&mut samples);
    }
    assert_rel_close(&format!("{name}/input_values"), &samples, input_values, INPUT_TOL);

    // 2. The forward pass on exactly transformers' input reproduces every hidden state.
    let model = Wav2Vec2::load(gpu(), &dir).unwrap();
    let out = model.forward(input_values).unwrap();
    let n = model.config.num_hidden_layers;
    assert_eq!(out.hidden_states.len(), n + 1);
    let check = |key: &str, t: &wgpu_mlkd::gpu::Tensor| {
        let (shape, want) = &expected[key];
        assert_eq!(&t.shape()[1..], &shape[..], "{name}/{key} shape");
        assert_rel_close(&format!("{name}/{key}"), &t.to_vec().unwrap(), want, MODEL_TOL);
    };
    check("extract_features", &out.extract_features);
    for (i, h) in out.hidden_states.iter().enumerate() {
        check(&format!("hidden_states.{i}"), h);
    }
    check("last_hidden_state", &out.last_hidden_state);
}

#[test]
fn base_group_norm_post_ln_with_weight_g_v_naming() {
    check_fixture("base_group");
}

#[test]
fn stable_layer_norm_pre_ln_with_parametrizations_naming() {
    check_fixture("stable_layer");
}

#[test]
fn ctc_prefixed_f16_sharded_checkpoint() {
    check_fixture("ctc_f16_sharded");
}

/// Long audio is processed in time chunks (group-norm statistics gathered over the whole input first); the
/// chunked features equal the one-piece features, for both normalisations, including a ragged last chunk.
#[test]
fn chunked_feature_encoder_equals_one_piece() {
    for name in ["base_group", "stable_layer"] {
        let dir = fixture(name);
        let expected = read_safetensors(&dir.join("expected.safetensors"));
        let (_, input) = &expected["input_values"];
        let model = Wav2Vec2::load(gpu(), &dir).unwrap();
        let wave = wgpu_mlkd::gpu::Tensor::from_slice(gpu(), input, &[1, input.len(), 1]).unwrap();
        let frames = model.config.frames(input.len());
        let whole = model.feature_encoder_chunked(&wave, frames).unwrap().to_vec().unwrap();
        for chunk in [1, 17, frames - 1] {
            let chunked = model.feature_encoder_chunked(&wave, chunk).unwrap().to_vec().unwrap();
            // Only the f32 rounding of the combined group-norm statistics may differ.
            assert_rel_close(&format!("{name}/chunks of {chunk}"), &chunked, &whole, 1e-5);
        }
    }
}

#[test]
fn audio_shorter_than_the_receptive_field_is_a_clear_error() {
    let model = Wav2Vec2::load(gpu(), &fixture("base_group")).unwrap();
    let rf = model.config.receptive_field();
    let err = model.forward(&vec![0.1; rf - 1]).err().expect("too short").to_string();
    assert!(err.contains("receptive field"), "{err}");
    assert_eq!(
        model.forward(&vec![0.1; rf]).unwrap().hidden_states[0].shape(),
        &[1, 1, 32]
    );
}

/// Without gradients the feed-forward runs long inputs in row chunks (its [rows, F] activation is a layer's
/// largest tensor); chunked and whole give the same numbers (row-wise ops, same kernels).
#[test]
fn feed_forward_in_row_chunks_equals_whole() {
    let dir = fixture("base_group");
    let expected = read_safetensors(&dir.join("expected.safetensors"));
    let (shape, h) = &expected["hidden_states.1"];
    let model = Wav2Vec2::load(gpu(), &dir).unwrap();
    let x = wgpu_mlkd::gpu::Tensor::from_slice(gpu(), h, &[1, shape[0], shape[1]]).unwrap();
    let layer = &model.layers[1];
    let whole = layer.feed_forward_rows(&x, usize::MAX).unwrap().to_vec().unwrap();
    for rows in [1, 7, shape[0] - 1] {
        let chunked = layer.feed_forward_rows(&x, rows).unwrap().to_vec().unwrap();
        assert_rel_close(&format!("feed-forward in chunks of {rows} rows"), &chunked, &whole, 0.0);
    }
}

/// A frozen model (convolution weights packed once, the positional conv's weight norm applied once) gives
/// bit-identical hidden states, in one piece and in chunks, and its forward then runs no packing or weight-norm
/// kernel at all (seen in the per-kernel profile).
#[test]
fn a_frozen_model_is_bit_identical_and_packs_nothing_per_forward() {
    let g = wgpu_mlkd::gpu::Gpu::new(&wgpu_mlkd::gpu::GpuOptions {
        profile: true,
        ..wgpu_mlkd::gpu::GpuOptions::from_env()
    })
    .unwrap();
    for name in ["base_group", "stable_layer"] {
        let dir = fixture(name);
        let expected = read_safetensors(&dir.join("expected.safetensors"));
        let (_, input) = &expected["input_values"];
        let model = Wav2Vec2::load(&g, &dir).unwrap();
        let mut frozen = Wav2Vec2::load(&g, &dir).unwrap();
        frozen.freeze().unwrap();
        let wave = wgpu_mlkd::gpu::Tensor::from_slice(&g, input, &[1, input.len(), 1]).unwrap();
        for chunk in [model.config.frames(input.len()), 17] {
            let a = model.feature_encoder_chunked(&wave, chunk).unwrap().to_vec().unwrap();
            let b = frozen.feature_encoder_chunked(&wave, chunk).unwrap().to_vec().unwrap();
            assert!(a == b, "{name}: frozen CNN features differ (chunks of {chunk})");
        }
        let want = model.forward(input).unwrap();
        g.profile_reset();
        let got = frozen.forward(input).unwrap();
        let report = g.profile_report().unwrap();
        assert!(
            !report.contains("pack_weight") && !report.contains("weight_norm"),
            "{name}: the frozen forward still packs:\n{report}"
        );
        for (i, (a, b)) in want.hidden_states.iter().zip(&got.hidden_states).enumerate() {
            assert!(
                a.to_vec().unwrap() == b.to_vec().unwrap(),
                "{name}: hidden_states.{i} differ"
            );
        }
    }
}

/// q, k and v packed into one projection (what `freeze` does where the attention runs unfused: GPUs without
/// subgroups of 8), forced here on any adapter: the hidden states match transformers' as the plain model's do,
/// the attention then runs unfused on the packed output, and training through a packed layer is refused.
#[test]
fn packed_qkv_matches_transformers() {
    for name in ["base_group", "stable_layer"] {
        let dir = fixture(name);
        let expected = read_safetensors(&dir.join("expected.safetensors"));
        let (_, input) = &expected["input_values"];
        let mut model = Wav2Vec2::load(gpu(), &dir).unwrap();
        model.pack_qkv().unwrap();
        model.pack_qkv().unwrap(); // a second call changes nothing
        let out = model.forward(input).unwrap();
        for (i, h) in out.hidden_states.iter().enumerate() {
            let key = format!("hidden_states.{i}");
            let (_, want) = &expected[&key];
            assert_rel_close(
                &format!("{name}/{key} (packed q, k, v)"),
                &h.to_vec().unwrap(),
                want,
                MODEL_TOL,
            );
        }
        let tape = wgpu_mlkd::tape::Tape::new();
        let wave = tape.constant(wgpu_mlkd::gpu::Tensor::from_slice(gpu(), input, &[1, input.len(), 1]).unwrap());
        let opts = wgpu_mlkd::model::wav2vec2::TrainOptions::default();
        let Err(e) = model.forward_tape(&tape, &wave, opts) else {
            panic!("{name}: a packed model ran on a recording tape");
        };
        assert!(format!("{e:#}").contains("packed for inference"), "{e:#}");
    }
}

/// f16 linear weights (`freeze_with(true)`, `--f16`) against transformers' f32 hidden states. The weights' rounding
/// (at most 2^-11 of each) is the only new error; in these random 2-4 layer models it reaches 1.8e-4 to 2.7e-4
/// of the largest activation (every layer), so the bound is 1e-3 (ten times the f32 bound). The frozen model
/// also holds less GPU memory with f16 linears than without.
#[test]
fn f16_weights_stay_within_their_bound_of_transformers() {
    const F16_MODEL_TOL: f64 = 1e-3;
    // A GPU of its own, so that the live bytes are this model's alone.
    let g = wgpu_mlkd::gpu::Gpu::new(&wgpu_mlkd::gpu::GpuOptions::from_env()).unwrap();
    if !g.unpacks_f16() {
        eprintln!("skipped: this adapter cannot unpack f16 in shaders");
        return;
    }
    for name in ["base_group", "stable_layer"] {
        let dir = fixture(name);
        let expected = read_safetensors(&dir.join("expected.safetensors"));
        let (_, input) = &expected["input_values"];
        let mut model = Wav2Vec2::load(&g, &dir).unwrap();
        model.freeze().unwrap();
        let f32_bytes = g.memory().0;
        drop(model);
        let mut model = Wav2Vec2::load(&g, &dir).unwrap();
        model.freeze_with(true).unwrap();
        let half_bytes = g.memory().0;
        eprintln!("{name}: frozen model {f32_bytes} bytes on the GPU, {half_bytes} with f16 linears");
        assert!(half_bytes < f32_bytes, "{name}: the f16 model holds no less memory");
        let out = model.forward(input).unwrap();
        for (i, h) in out.hidden_states.iter().enumerate() {
            let key = format!("hidden_states.{i}");
            let (_, want) = &expected[&key];
            assert_rel_close(
                &format!("{name}/{key} (f16 weights)"),
                &h.to_vec().unwrap(),
                want,
                F16_MODEL_TOL,
            );
        }
        // Training through an f16 layer is refused, not silently wrong.
        let tape = wgpu_mlkd::tape::Tape::new();
        let x = tape.constant(wgpu_mlkd::gpu::Tensor::zeros(&g, &[1, 2, model.config.hidden_size]).unwrap());
        let Err(e) = model.layers[0].out_proj.forward(&tape, &x) else {
            panic!("{name}: an f16 layer ran on a recording tape");
        };
        assert!(format!("{e:#}").contains("without gradients"), "{e:#}");
    }
}
