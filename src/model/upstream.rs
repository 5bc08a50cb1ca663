//! The frozen upstream of the emotion classifier, teacher or distilled student, and its pooled features:
//! the mean over frames of every hidden state it offers, a `[L, D]` matrix per utterance (see
//! [`super::classifier`] for why the mean may be taken first).
//!
//! - `teacher:DIR`: a wav2vec 2.0 folder; its N + 1 hidden states (`hidden_states.0` = input of layer 1).
//! - `student:RUN`: a distilled student (a training run's folder holding `student/`, or that folder itself);
//!   its K + 1 layer outputs, then its heads' predictions, one per target layer (as `extract` writes them).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use sha2::{Digest, Sha256};

use super::classifier::UpstreamInfo;
use super::student::Student;
use super::{teacher_normalizes, Wav2Vec2, Wav2Vec2Config};
use crate::data::cache::TeacherInfo;
use crate::data::dataset::{check_file, Utterance};
use crate::data::resample::output_len;
use crate::data::wav;
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::reduce;
use crate::tape::Tape;

/// `teacher:DIR` or `student:RUN`, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub kind: UpstreamKind,
    pub path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamKind {
    Teacher,
    Student,
}

impl UpstreamKind {
    pub fn name(self) -> &'static str {
        match self {
            UpstreamKind::Teacher => "teacher",
            UpstreamKind::Student => "student",
        }
    }
}

impl std::str::FromStr for UpstreamSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (kind, path) = match s.split_once(':') {
            Some(("teacher", p)) => (UpstreamKind::Teacher, p),
            Some(("student", p)) => (UpstreamKind::Student, p),
            _ => bail!("--upstream {s:?}: expected teacher:DIR or student:RUN"),
        };
        if path.is_empty() {
            bail!("--upstream {s:?}: the folder is missing");
        }
        Ok(UpstreamSpec {
            kind,
            path: PathBuf::from(path),
        })
    }
}

impl std::fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.path.display())
    }
}

impl UpstreamSpec {
    /// The model folder: DIR for a teacher; RUN/student, or RUN itself when it is a student folder.
    pub fn model_dir(&self) -> Result<PathBuf> {
        let p = &self.path;
        if !p.is_dir() {
            bail!("{}: upstream folder not found", p.display());
        }
        let dir = match self.kind {
            UpstreamKind::Teacher => p.clone(),
            UpstreamKind::Student if p.join("student").join("config.json").is_file() => p.join("student"),
            UpstreamKind::Student => p.clone(),
        };
        if !dir.join("config.json").is_file() {
            bail!("{}: no config.json (not a {} folder)", dir.display(), self.kind.name());
        }
        Ok(dir)
    }
}

/// The most problem files one error lists.
const MAX_LISTED: usize = 20;

/// Checks every utterance's file from its header alone, before any GPU work: a whole, readable WAV file whose
/// 16 kHz length gives the model described by `config` at least one frame and fits this GPU in one piece
/// ([`Wav2Vec2Config::max_samples`]). So a corpus's unusable files are all named at the start of a run, not one
/// by one hours into it. `model` names the upstream in the message.
pub fn check_utterance_audio(gpu: &Gpu, config: &Wav2Vec2Config, model: &str, utts: &[&Utterance]) -> Result<()> {
    let min = config.receptive_field();
    let max = config.max_samples(gpu.max_binding_bytes());
    let mut problems = Vec::new();
    for u in utts {
        let problem = match check_file(&u.path) {
            Err(e) => Some(e),
            Ok(info) => {
                let n = output_len(info.frames as usize, info.sample_rate, wav::TARGET_RATE);
                if n < min {
                    Some(format!(
                        "{:.1} ms is shorter than the upstream's receptive field ({min} samples = {:.1} ms at 16 kHz)",
                        info.seconds * 1000.0,
                        min as f64 / 16.0
                    ))
                } else if n > max {
                    Some(format!(
                        "{:.1} s ({n} samples at 16 kHz) is longer than the upstream takes in one piece on this GPU \
                         ({max} samples = {:.1} s, set by its largest storage binding); split it into shorter \
                         utterances",
                        info.seconds,
                        max as f64 / 16000.0
                    ))
                } else {
                    None
                }
            }
        };
        if let Some(p) = problem {
            problems.push(format!("{}: {p}", u.path.display()));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    let more = n.saturating_sub(MAX_LISTED);
    problems.truncate(MAX_LISTED);
    if more > 0 {
        problems.push(format!("... and {more} more"));
    }
    bail!(
        "{n} of {} audio files cannot be used with {model}; nothing was computed:\n  {}",
        utts.len(),
        problems.join("\n  ")
    )
}

#[allow(clippy::large_enum_variant)] // One per process; boxing buys nothing.
enum Model {
    Teacher(Wav2Vec2),
    Student(Student),
}

/// A loaded frozen upstream.
pub struct Upstream {
    model: Model,
    pub info: UpstreamInfo,
    /// The folder the weights came from.
    pub dir: PathBuf,
}

impl Upstream {
    /// Loads `spec`'s model and describes it (for `ser.json`).
    pub fn load(gpu: &Gpu, spec: &UpstreamSpec) -> Result<Upstream> {
        let dir = spec.model_dir()?;
        let normalize = teacher_normalizes(&dir)?;
        // Frozen: an upstream's weights never change here, so its convolutions are packed once.
        let model = match spec.kind {
            UpstreamKind::Teacher => {
                let mut teacher = Wav2Vec2::load(gpu, &dir)?;
                teacher.freeze()?;
                Model::Teacher(teacher)
            }
            UpstreamKind::Student => {
                let mut student = Student::load(gpu, &dir)?;
                student.encoder.freeze()?;
                Model::Student(student)
            }
        };
        let config_bytes = std::fs::read(dir.join("config.json"))
            .with_context(|| format!("cannot read {}", dir.join("config.json").display()))?;
        let abs = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        let mut up = Upstream {
            model,
            info: UpstreamInfo {
                kind: spec.kind.name().to_string(),
                path: spec.path.display().to_string(),
                abs_path: abs.display().to_string(),
                hidden_size: 0,
                feature_layers: 0,
                config_sha256: crate::data::cache::hex(&Sha256::digest(&config_bytes)),
                normalize,
            },
            dir,
        };
        up.info.hidden_size = up.config().hidden_size;
        up.info.feature_layers = up.feature_layers();
        Ok(up)
    }

    /// Loads the upstream a SER model was trained on, checking that it still matches.
    pub fn load_for(gpu: &Gpu, recorded: &UpstreamInfo, dir: &Path) -> Result<Upstream> {
        let kind = match recorded.kind.as_str() {
            "teacher" => UpstreamKind::Teacher,
            "student" => UpstreamKind::Student,
            other => bail!("unknown upstream kind {other:?} in the SER model"),
        };
        let up = Upstream::load(
            gpu,
            &UpstreamSpec {
                kind,
                path: dir.to_path_buf(),
            },
        )?;
        if (up.info.feature_layers, up.info.hidden_size) != (recorded.feature_layers, recorded.hidden_size) {
            bail!(
                "the upstream at {} has changed: it now gives {} feature layers of width {}, the SER model was \
                 trained on {} of width {}; retrain the classifier",
                dir.display(),
                up.info.feature_layers,
                up.info.hidden_size,
                recorded.feature_layers,
                recorded.hidden_size
            );
        }
        if up.info.config_sha256 != recorded.config_sha256 {
            eprintln!(
                "warning: {}'s config.json differs from the one the SER model was trained with (same shapes)",
                dir.display()
            );
        }
        Ok(up)
    }

    /// Hashes of the upstream's config and weights (identifies cached features).
    pub fn fingerprint(&self) -> Result<TeacherInfo> {
        Ok(TeacherInfo::from_dir(&self.dir, self.info.normalize)?.0)
    }

    pub fn encoder(&self) -> &Wav2Vec2 {
        match &self.model {
            Model::Teacher(t) => t,
            Model::Student(s) => &s.encoder,
        }
    }

    pub fn config(&self) -> &Wav2Vec2Config {
        &self.encoder().config
    }

    /// L: the hidden states the classifier mixes.
    pub fn feature_layers(&self) -> usize {
        let n = self.config().num_hidden_layers + 1;
        match &self.model {
            Model::Teacher(_) => n,
            Model::Student(s) => n + s.heads.target_layers.len(),
        }
    }

    /// The fewest samples that give one frame.
    pub fn min_samples(&self) -> usize {
        self.config().receptive_field()
    }

    /// Pooled features `[L * D]` (row-major `[L, D]`) of 16 kHz audio, as it is (normalised here when the
    /// upstream expects it).
    pub fn pooled(&self, samples: &[f32]) -> Result<Vec<f32>> {
        let mut x = samples.to_vec();
        if self.info.normalize {
            wav::normalize(&mut x);
        }
        let enc = self.encoder();
        let out = enc.forward(&x)?;
        let mut states: Vec<Tensor> = out.hidden_states;
        if let Model::Student(s) = &self.model {
            // The heads read the last layer's output, as in `extract` and training.
            let tape = Tape::no_grad();
            let last = states.last().expect("at least hidden_states[0]").clone();
            for p in s.heads.forward(&tape, &tape.constant(last))? {
                states.push(p.value().clone());
            }
        }
        let d = self.info.hidden_size;
        let frames = states[0].shape()[1];
        let gpu = &enc.gpu;
        let sums = Tensor::empty(gpu, &[states.len(), d], DType::F32)?;
        for (l, h) in states.iter().enumerate() {
            sums.copy_from(l * d, &reduce::sum_rows(h)?, 0, d)?;
        }
        let inv = 1.0 / frames as f64;
        let pooled: Vec<f32> = sums.to_vec()?.iter().map(|&v| (v as f64 * inv) as f32).collect();
        if let Some(i) = pooled.iter().position(|v| !v.is_finite()) {
            bail!(
                "the upstream gave a non-finite feature (layer {}, channel {})",
                i / d,
                i % d
            );
        }
        Ok(pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_specs_parse() {
        let s: UpstreamSpec = "teacher:/a/b".parse().unwrap();
        assert_eq!((s.kind, s.path), (UpstreamKind::Teacher, PathBuf::from("/a/b")));
        let s: UpstreamSpec = "student:runs/x".parse().unwrap();
        assert_eq!(s.kind, UpstreamKind::Student);
        assert_eq!(s.to_string(), "student:runs/x");
        assert!("teacher:".parse::<UpstreamSpec>().is_err());
        assert!("other:/x".parse::<UpstreamSpec>().is_err());
        assert!("/x".parse::<UpstreamSpec>().is_err());
    }
}
