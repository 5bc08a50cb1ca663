//! A checkpoint that does not match its config is refused with a message that lists every problem and names
//! the folder; a folder holding only pytorch_model.bin gets conversion instructions.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{fixture, gpu, read_safetensors};
use wgpu_mlkd::model::Wav2Vec2;

/// A copy of fixture `base_group` whose weights went through `edit`.
fn edited_copy(tag: &str, edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<f32>)>)) -> PathBuf {
    let src = fixture("base_group");
    let dir = std::env::temp_dir().join(format!("wgpu-mlkd-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = read_safetensors(&src.join("model.safetensors"));
    edit(&mut tensors);
    write(&dir.join("model.safetensors"), &tensors);
    dir
}

fn write(path: &Path, tensors: &HashMap<String, (Vec<usize>, Vec<f32>)>) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            let v = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .unwrap();
            (k.clone(), v)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Wav2Vec2::load(gpu(), dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn every_missing_misshaped_extra_or_nonfinite_tensor_is_listed() {
    let dir = edited_copy("bad", |t| {
        t.remove("encoder.layers.1.attention.k_proj.bias").unwrap();
        t.remove("feature_projection.layer_norm.weight").unwrap();
        let (shape, data) = t.get_mut("encoder.layers.0.feed_forward.output_dense.weight").unwrap();
        shape.swap(0, 1);
        let _ = data;
        t.get_mut("encoder.layer_norm.bias").unwrap().1[3] = f32::NAN;
        t.insert(
            "encoder.layers.9.attention.q_proj.weight".into(),
            (vec![2], vec![0.0, 1.0]),
        );
        t.insert("lm_head.weight".into(), (vec![2], vec![0.0, 1.0])); // a known head: ignored
    });
    let err = load_err(&dir);
    for needle in [
        "missing tensor encoder.layers.1.attention.k_proj.bias",
        "missing tensor feature_projection.layer_norm.weight",
        "encoder.layers.0.feed_forward.output_dense.weight: shape [64, 32], expected [32, 64]",
        "encoder.layer_norm.bias: non-finite value NaN at element 3",
        "unexpected tensor encoder.layers.9.attention.q_proj.weight",
        "5 problems",
        &dir.display().to_string(),
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(!err.contains("lm_head"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_config_that_does_not_match_the_weights_is_refused() {
    let dir = edited_copy("cfg", |_| {});
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = cfg.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("missing tensor encoder.layers.3.attention.q_proj.weight"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn pytorch_bin_only_folder_says_how_to_convert() {
    let dir = std::env::temp_dir().join(format!("wgpu-mlkd-ckpt-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("base_group").join("config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not really").unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("pytorch_model.bin") && err.contains("save_pretrained"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = edited_copy("trunc", |_| {});
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
