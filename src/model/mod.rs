//! Models: the wav2vec 2.0 teacher (and, later, the student and the emotion classifier).

pub mod checkpoint;
pub mod classifier;
pub mod config;
pub mod student;
pub mod synthetic;
pub mod upstream;
pub mod wav2vec2;
pub mod weights;

pub use config::Wav2Vec2Config;
pub use wav2vec2::{Wav2Vec2, Wav2Vec2Output};

use std::path::Path;

use anyhow::{Context as _, Result};

/// Whether a teacher folder expects normalised input: `preprocessor_config.json`'s `do_normalize` when the file
/// is there (transformers' Wav2Vec2FeatureExtractor defaults it to true), off when it is not.
pub fn teacher_normalizes(dir: &Path) -> Result<bool> {
    let path = dir.join("preprocessor_config.json");
    if !path.exists() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    match json.get("do_normalize") {
        None => Ok(true),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(v) => anyhow::bail!("{}: do_normalize is {v}, expected true or false", path.display()),
    }
}
