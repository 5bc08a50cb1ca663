//! Training checkpoints: the student (every parameter, as a student folder that `Student::load` and
//! `extract` read), the AdamW state (exp_avg and exp_avg_sq per parameter by name, the step count and the
//! hyper-parameters) and an opaque JSON value from the trainer (its step, sampler and RNG state, config).
//!
//! Layout of a checkpoint folder `DIR`:
//! - `DIR/student/`: [`Student::save`]'s folder;
//! - `DIR/optimizer.safetensors`: `exp_avg.{name}`, `exp_avg_sq.{name}` (f32), metadata `steps` and the
//!   hyper-parameters as f64 bit patterns (so they round-trip exactly);
//! - `DIR/trainer.json`: the trainer's value.
//!
//! Written atomically: everything goes to a temporary sibling folder, which is then renamed to `DIR` (an
//! existing `DIR` is first renamed aside and removed after). A crash leaves either the old checkpoint, the new
//! one, or (between the two renames) the old one under `.DIR.old.*` and the new one under `.DIR.tmp.*`, never a
//! half-written `DIR`. Values round-trip bit-exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context as _, Result};
use safetensors::SafeTensors;

use super::student::{serialize_f32, Student};
use super::weights::to_f32;
use crate::gpu::{Gpu, Tensor};
use crate::ops::adamw::{AdamW, AdamWConfig};

const STUDENT: &str = "student";
const OPTIMIZER: &str = "optimizer.safetensors";
const TRAINER: &str = "trainer.json";

/// Saves `student`, `opt` (whose state follows `student.parameters()` order) and `extra` to `dir`.
pub fn save_checkpoint(dir: &Path, student: &Student, opt: &AdamW, extra: &serde_json::Value) -> Result<()> {
    let params = student.parameters();
    let (m, v) = opt.moments();
    ensure!(
        m.len() == params.len(),
        "save_checkpoint: the optimiser holds state for {} parameters, the student has {}",
        m.len(),
        params.len()
    );
    let mut tensors = Vec::with_capacity(2 * params.len());
    for (i, p) in params.iter().enumerate() {
        ensure!(
            m[i].shape() == p.value().shape(),
            "save_checkpoint: optimiser state {i} has shape {:?}, parameter {} {:?}",
            m[i].shape(),
            p.name,
            p.value().shape()
        );
        tensors.push((format!("exp_avg.{}", p.name), m[i].shape().to_vec(), m[i].to_vec()?));
        tensors.push((format!("exp_avg_sq.{}", p.name), v[i].shape().to_vec(), v[i].to_vec()?));
    }
    let c = &opt.config;
    let mut meta = HashMap::from([
        ("format".to_string(), "wgpu-mlkd-adamw".to_string()),
        ("steps".to_string(), opt.steps().to_string()),
        ("beta1".to_string(), c.beta1.to_bits().to_string()),
        ("beta2".to_string(), c.beta2.to_bits().to_string()),
        ("eps".to_string(), c.eps.to_bits().to_string()),
        ("weight_decay".to_string(), c.weight_decay.to_bits().to_string()),
    ]);
    if let Some(g) = c.max_grad_norm {
        meta.insert("max_grad_norm".into(), g.to_bits().to_string());
    }
    let optimizer_bytes = serialize_f32(&tensors, meta)?;

    let name = dir
        .file_name()
        .with_context(|| format!("checkpoint path {} has no folder name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    ensure!(
        parent.is_dir(),
        "cannot write checkpoint {}: {} is not a directory",
        dir.display(),
        parent.display()
    );
    let tmp = parent.join(format!(".{name}.tmp.{}", std::process::id()));
    let old = parent.join(format!(".{name}.old.{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    let written = (|| -> Result<()> {
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        student.save(&tmp.join(STUDENT))?;
        crate::fsutil::atomic_write(&tmp.join(OPTIMIZER), &optimizer_bytes)?;
        crate::fsutil::atomic_write(&tmp.join(TRAINER), serde_json::to_string_pretty(extra)?.as_bytes())?;
        sync_dir(&tmp)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot write checkpoint {}", dir.display())));
    }
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
        std::fs::rename(dir, &old)
            .with_context(|| format!("cannot move the old checkpoint {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    sync_dir(&parent)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

/// Loads a checkpoint written by [`save_checkpoint`]: the student, the optimiser (state in
/// `student.parameters()` order) and the trainer's value.
pub fn load_checkpoint(dir: &Path, gpu: &Gpu) -> Result<(Student, AdamW, serde_json::Value)> {
    if !dir.is_dir() {
        bail!("checkpoint {} is not a directory", dir.display());
    }
    let student =
        Student::load(gpu, &dir.join(STUDENT)).with_context(|| format!("checkpoint {}: the student", dir.display()))?;
    let opt_path = dir.join(OPTIMIZER);
    let bytes = std::fs::read(&opt_path).with_context(|| format!("cannot read {}", opt_path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", opt_path.display()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", opt_path.display()))?;
    let get = |key: &str| -> Result<&String> {
        meta.get(key)
            .with_context(|| format!("{}: metadata lacks {key:?}", opt_path.display()))
    };
    let f64_of = |key: &str| -> Result<f64> {
        let s = get(key)?;
        Ok(f64::from_bits(s.parse().with_context(|| {
            format!(
                "{}: metadata {key} = {s:?} is not an f64 bit pattern",
                opt_path.display()
            )
        })?))
    };
    let steps: u64 = get("steps")?
        .parse()
        .with_context(|| format!("{}: metadata steps is not a count", opt_path.display()))?;
    let config = AdamWConfig {
        beta1: f64_of("beta1")?,
        beta2: f64_of("beta2")?,
        eps: f64_of("eps")?,
        weight_decay: f64_of("weight_decay")?,
        max_grad_norm: if meta.contains_key("max_grad_norm") {
            Some(f64_of("max_grad_norm")?)
        } else {
            None
        },
    };
    let params = student.parameters();
    let (mut m, mut v) = (Vec::with_capacity(params.len()), Vec::with_capacity(params.len()));
    for p in &params {
        for (prefix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
            let name = format!("{prefix}.{}", p.name);
            let view = st
                .tensor(&name)
                .with_context(|| format!("{}: missing {name}", opt_path.display()))?;
            ensure!(
                view.shape() == p.value().shape(),
                "{}: {name} has shape {:?}, the parameter {:?}",
                opt_path.display(),
                view.shape(),
                p.value().shape()
            );
            let data = to_f32(view.dtype(), view.data()).with_context(|| format!("{}: {name}", opt_path.display()))?;
            out.push(Tensor::from_slice(gpu, &data, view.shape())?);
        }
    }
    ensure!(
        st.len() == 2 * params.len(),
        "{}: {} tensors for a student of {} parameters (expected exp_avg and exp_avg_sq for each)",
        opt_path.display(),
        st.len(),
        params.len()
    );
    let opt = AdamW::from_state(config, steps, m, v)?;
    let trainer_path = dir.join(TRAINER);
    let text =
        std::fs::read_to_string(&trainer_path).with_context(|| format!("cannot read {}", trainer_path.display()))?;
    let extra = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", trainer_path.display()))?;
    Ok((student, opt, extra))
}

/// Repairs what a crash inside [`save_checkpoint`] can leave beside `dir`, before the checkpoint is read:
/// when `dir` is missing (the crash fell between moving the old checkpoint aside and renaming the new one into
/// place) the complete new one (`.DIR.tmp.*`), else the old one (`.DIR.old.*`), is renamed to `dir`; every
/// other leftover is removed. A leftover is complete when its `trainer.json`, written last, is there. Returns
/// what was recovered, for a message.
pub fn recover_interrupted_save(dir: &Path) -> Result<Option<PathBuf>> {
    let name = dir
        .file_name()
        .with_context(|| format!("checkpoint path {} has no folder name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Ok(None);
    }
    let (tmp_prefix, old_prefix) = (format!(".{name}.tmp."), format!(".{name}.old."));
    let (mut tmps, mut olds) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(&parent).with_context(|| format!("cannot list {}", parent.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", parent.display()))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(&tmp_prefix) {
            tmps.push(entry.path());
        } else if file.starts_with(&old_prefix) {
            olds.push(entry.path());
        }
    }
    tmps.sort();
    olds.sort();
    let mut recovered = None;
    if !dir.exists() {
        let complete = |p: &PathBuf| p.join(TRAINER).is_file() && p.join(STUDENT).join("config.json").is_file();
        if let Some(pick) = tmps
            .iter()
            .find(|p| complete(p))
            .or_else(|| olds.iter().find(|p| complete(p)))
        {
            std::fs::rename(pick, dir)
                .with_context(|| format!("cannot rename {} to {}", pick.display(), dir.display()))?;
            recovered = Some(pick.clone());
        }
    }
    for p in tmps.iter().chain(&olds) {
        if Some(p) != recovered.as_ref() && p.exists() {
            std::fs::remove_dir_all(p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    Ok(recovered)
}

/// Makes renames inside `dir` durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> Result<()> {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}
