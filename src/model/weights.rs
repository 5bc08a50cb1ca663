//! Reading a Hugging Face checkpoint folder: `model.safetensors` or a sharded
//! `model.safetensors.index.json`, F32/F16/BF16 converted to f32, with or without the `wav2vec2.` prefix.
//!
//! Tensors are taken by their checkpoint names (as candle's VarBuilder does). Every problem is collected
//! (missing, mis-shaped, non-finite, unexpected) and reported in one error that lists each tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use safetensors::{Dtype, SafeTensors};

/// Prefixes of task and pre-training heads that a base-model forward ignores.
pub const IGNORED_PREFIXES: &[&str] = &[
    "lm_head.",
    "quantizer.",
    "project_q.",
    "project_hid.",
    "classifier.",
    "projector.",
    "masked_spec_embed",
    "mlkd_heads.",
];

/// Most problems [`Checkpoint::finish`] lists one per line.
const MAX_LISTED_PROBLEMS: usize = 10;

struct Entry {
    shape: Vec<usize>,
    data: Vec<f32>,
    file: PathBuf,
    /// Its dtype could not be read (already recorded as a problem): taking it reports nothing more.
    unreadable: bool,
}

/// All tensors of a checkpoint in f32, keyed by name without the `wav2vec2.` prefix.
pub struct Checkpoint {
    dir: PathBuf,
    tensors: BTreeMap<String, Entry>,
    taken: BTreeSet<String>,
    problems: Vec<String>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors` or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(&index)?
        } else if dir.join("pytorch_model.bin").is_file() {
            bail!(
                "{} holds only pytorch_model.bin; convert it to safetensors once with:\n  python -c \"from \
                 transformers import Wav2Vec2Model as M; M.from_pretrained('{d}').save_pretrained('{d}', \
                 safe_serialization=True)\"",
                dir.display(),
                d = dir.display()
            );
        } else if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        } else {
            bail!(
                "{} has no model.safetensors (nor model.safetensors.index.json)",
                dir.display()
            );
        };
        let mut tensors = BTreeMap::new();
        let mut problems = Vec::new();
        for file in files {
            read_file(&file, &mut tensors, &mut problems)?;
        }
        // Task models (ForCTC, ForPreTraining, ...) nest the base model under `wav2vec2.`.
        let prefixed = tensors.keys().any(|k| k.starts_with("wav2vec2."));
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| match k.strip_prefix("wav2vec2.") {
                Some(stripped) if prefixed => (stripped.to_string(), v),
                _ => (k, v),
            })
            .collect();
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            tensors,
            taken: BTreeSet::new(),
            problems,
        })
    }

    /// Opens one safetensors file (a SER classifier's weights), names as stored.
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        if !path.is_file() {
            bail!("{}: no such weights file", path.display());
        }
        let mut tensors = BTreeMap::new();
        let mut problems = Vec::new();
        read_file(path, &mut tensors, &mut problems)?;
        Ok(Checkpoint {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            tensors,
            taken: BTreeSet::new(),
            problems,
        })
    }

    /// Adds the tensors of one more safetensors file (e.g. a student's separate `heads.safetensors`).
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        read_file(path, &mut self.tensors, &mut self.problems)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes tensor `name`, which must have `shape`. On a problem it is recorded (see [`Checkpoint::finish`])
    /// and zeros of the expected shape are returned, so that loading goes on and reports every problem at once.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Vec<f32> {
        let Some(numel) = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 32)
        else {
            self.problems
                .push(format!("{name}: expected shape {shape:?} is too large to load"));
            return Vec::new();
        };
        let Some(e) = self.tensors.get(name) else {
            self.problems
                .push(format!("missing tensor {name} (expected shape {shape:?})"));
            return vec![0.0; numel];
        };
        self.taken.insert(name.to_string());
        if e.unreadable {
            return vec![0.0; numel];
        }
        if e.shape != shape {
            self.problems.push(format!(
                "{name}: shape {:?}, expected {shape:?} (in {})",
                e.shape,
                e.file.display()
            ));
            return vec![0.0; numel];
        }
        if let Some(i) = e.data.iter().position(|v| !v.is_finite()) {
            self.problems.push(format!(
                "{name}: non-finite value {} at element {i} (in {})",
                e.data[i],
                e.file.display()
            ));
        }
        e.data.clone()
    }

    /// Like [`Checkpoint::take`] for the first name present of several alternatives.
    pub fn take_any(&mut self, names: &[&str], shape: &[usize]) -> Vec<f32> {
        let name = names.iter().find(|n| self.contains(n)).unwrap_or(&names[0]);
        self.take(name, shape)
    }

    /// Fails listing every problem met so far, and every tensor that is neither used nor a known head.
    pub fn finish(self) -> Result<()> {
        self.finish_allowing(|_| false)
    }

    /// Like [`Checkpoint::finish`], but unused tensors for which `unused_ok` is true are not an error either
    /// (a student initialised from a teacher leaves the teacher's upper layers unused).
    pub fn finish_allowing(self, unused_ok: impl Fn(&str) -> bool) -> Result<()> {
        let mut problems = self.problems;
        for name in self.tensors.keys() {
            if !self.taken.contains(name) && !IGNORED_PREFIXES.iter().any(|p| name.starts_with(p)) && !unused_ok(name) {
                problems.push(format!("unexpected tensor {name}"));
            }
        }
        if !problems.is_empty() {
            // A config.json of another model size mismatches every tensor: show the first few only.
            let total = problems.len();
            if total > MAX_LISTED_PROBLEMS {
                problems.truncate(MAX_LISTED_PROBLEMS - 1);
                problems.push(format!(
                    "... and {} more (does config.json describe this checkpoint?)",
                    total - (MAX_LISTED_PROBLEMS - 1)
                ));
            }
            bail!(
                "checkpoint {} does not match its config.json ({} problem{}):\n  {}",
                self.dir.display(),
                total,
                if total == 1 { "" } else { "s" },
                problems.join("\n  ")
            );
        }
        Ok(())
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no \"weight_map\" object", index.display());
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let Some(f) = file.as_str() else {
            bail!("{}: weight_map[{name:?}] is not a file name", index.display())
        };
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            bail!("{}: shard name {f:?} must be a plain file name", index.display());
        }
        files.insert(dir.join(f));
    }
    Ok(files.into_iter().collect())
}

fn read_file(path: &Path, out: &mut BTreeMap<String, Entry>, problems: &mut Vec<String>) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| {
        format!(
            "{} is not a valid safetensors file (truncated or corrupt?)",
            path.display()
        )
    })?;
    for (name, view) in st.tensors() {
        let (data, unreadable) = match to_f32(view.dtype(), view.data()) {
            Ok(d) => (d, false),
            Err(e) => {
                problems.push(format!("{name}: {e} (in {})", path.display()));
                (Vec::new(), true)
            }
        };
        if out
            .insert(
                name.clone(),
                Entry {
                    shape: view.shape().to_vec(),
                    data,
                    file: path.to_path_buf(),
                    unreadable,
                },
            )
            .is_some()
        {
            problems.push(format!(
                "{name} appears in more than one file (again in {})",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Converts a stored tensor to f32. Half-precision formats are widened exactly.
pub fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => bail!("dtype {other:?} is not a floating-point weight type (expected F32, F16 or BF16)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_formats_widen_exactly() {
        let f16 = half::f16::from_f32(1.5).to_le_bytes();
        let bf16 = half::bf16::from_f32(-2.25).to_le_bytes();
        assert_eq!(to_f32(Dtype::F16, &f16).unwrap(), vec![1.5]);
        assert_eq!(to_f32(Dtype::BF16, &bf16).unwrap(), vec![-2.25]);
        assert!(to_f32(Dtype::I64, &[0; 8]).is_err());
    }
}
