//! `wgpu-mlkd train`: multi-level distillation of the clean teacher into a small student that hears noise.
//!
//! The run folder `--out RUN` holds:
//! - `run.json`: the run's settings (what a resume must match);
//! - `log.jsonl`: one JSON object per logged step (`step`, `loss`, `lr`, `grad_norm`, per head `l1.{layer}` and
//!   `cos.{layer}` (the mean of -log sigmoid(cos)), the epoch, the clean items, the step's wall time);
//! - `val.jsonl`: one validation report per evaluation (student and teacher cosine to the clean targets, per
//!   condition and layer, and the validation loss);
//! - `checkpoint/`: the latest checkpoint (weights, AdamW state, step, data position), replaced atomically;
//! - at the end, `student/` (the trained student, Hugging Face-like, readable by `extract --teacher`) and
//!   `loss.png` (the per-head terms against steps).
//!
//! `--resume` loads `checkpoint/`, drops log lines after its step, and continues: the losses it logs are
//! bit-identical to an uninterrupted run's (every random draw is a function of the seed and the position).
//! Ctrl-C (or SIGTERM) finishes the step in flight, writes a checkpoint and stops.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Cli;
use crate::data::cache::{TeacherCache, TeacherInfo};
use crate::data::dataset::Dataset;
use crate::data::noise::NoiseBank;
use crate::model::checkpoint::{load_checkpoint, recover_interrupted_save, save_checkpoint};
use crate::model::student::Student;
use crate::model::Wav2Vec2;
use crate::ops::adamw::{AdamW, AdamWConfig};
use crate::plot::{self, Panel, Series};
use crate::train::{
    split_validation, BatchSampler, NonFinite, OptimConfig, SnrChoice, StepRecord, TrainDataConfig, Trainer,
    TrainerState, ValidationReport, ValidationSet,
};

#[derive(clap::Args)]
pub struct Args {
    /// The teacher (Hugging Face wav2vec 2.0 folder) the cache was made with; the student starts from it
    #[arg(long, value_name = "DIR")]
    teacher: PathBuf,
    /// The teacher cache made by `cache-teacher` on --data
    #[arg(long, value_name = "CACHE")]
    cache: PathBuf,
    /// The clean speech: a data set folder (EmoDB, IEMOCAP) or a CSV manifest
    #[arg(long, value_name = "DIR|CSV")]
    data: PathBuf,
    /// Noise: a folder of WAV files (searched recursively) or one file, or gen:NAME for a generator;
    /// repeat for several. Not needed with --snr clean
    #[arg(long, value_name = "DIR|FILE|gen:NAME")]
    noise: Vec<PathBuf>,
    /// Built-in noise generators to add (comma-separated), e.g. white,pink,brown
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    noise_gen: Vec<String>,
    /// Name noise types after their folders instead of their file names
    #[arg(long)]
    noise_type_from_dir: bool,
    /// The run folder (created; an existing run needs --resume or --force)
    #[arg(long, value_name = "RUN")]
    out: PathBuf,
    /// Continue the run in --out from its checkpoint
    #[arg(long)]
    resume: bool,
    /// Start afresh in --out, deleting the run there
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Optimiser updates
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Utterances per batch
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Longest crop in seconds (shorter utterances are taken whole and shorten their batch)
    #[arg(long, default_value_t = 4.0, value_name = "SECONDS")]
    crop_seconds: f64,
    /// SNRs in dB drawn uniformly for noisy items, e.g. 0,5,10,15,20 or a range 0:20:5; "clean" alone
    /// trains on clean input only (DistilHuBERT)
    #[arg(long, default_value = "0,5,10,15,20", value_name = "LIST")]
    snr: String,
    /// Fraction of items left clean
    #[arg(long, default_value_t = 0.1, value_name = "P")]
    clean_fraction: f64,
    /// Transformer layers of the student, copied from the teacher's first ones
    #[arg(long, default_value_t = 2, value_name = "K")]
    student_layers: usize,
    /// Teacher layers the heads predict, e.g. 4,8,12, or 12 alone for single-level distillation
    /// [default: every layer in the cache]
    #[arg(long, value_name = "LIST")]
    targets: Option<String>,
    /// Peak learning rate (AdamW, betas 0.9/0.98, eps 1e-6, weight decay 1e-6, clipping at norm 5)
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Fraction of the steps spent warming up
    #[arg(long, default_value_t = 0.07, value_name = "FRACTION")]
    warmup: f64,
    /// Learning-rate decay after warm-up: linear or cosine
    #[arg(long, default_value = "linear")]
    decay: String,
    /// Weight of the cosine term in each head's loss
    #[arg(long, default_value_t = 1.0)]
    lambda: f32,
    /// Dropout in the student's transformer layers
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// Gradient multiplier on the student's CNN
    #[arg(long, default_value_t = 0.1)]
    feature_grad_mult: f32,
    /// Seeds the heads, the data order, crops, noise and dropout
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not normalise inputs (default: as the cache's teacher input)
    #[arg(long, hide = true)]
    no_normalize: bool,
    /// Speakers held out for validation, e.g. 03,08 [default: about --val-fraction of the speakers]
    #[arg(long, value_name = "LIST")]
    val_speakers: Option<String>,
    /// Fraction of the speakers (or utterances, with fewer than 3 speakers) held out for validation
    #[arg(long, default_value_t = 0.1, value_name = "P")]
    val_fraction: f64,
    /// Most validation utterances used (the first in id order)
    #[arg(long, default_value_t = 32, value_name = "N")]
    val_max: usize,
    /// Validation inputs: each held-out utterance is mixed at each of these SNRs (and clean)
    #[arg(long, default_value = "clean,0,5,10", value_name = "LIST")]
    val_snr: String,
    /// Noise for validation, as --noise [default: the training noise]; use unseen noise types here
    #[arg(long, value_name = "DIR|FILE|gen:NAME")]
    val_noise: Vec<PathBuf>,
    /// Validate every N steps and at the end (0: only at the end)
    #[arg(long, value_name = "N")]
    eval_every: Option<usize>,
    /// Write a checkpoint every N steps (and at the end, and on Ctrl-C)
    #[arg(long, default_value_t = 100, value_name = "N")]
    save_every: usize,
    /// Log every N-th step to log.jsonl
    #[arg(long, default_value_t = 1, value_name = "N")]
    log_every: usize,
    /// Test hook: exit abruptly (no checkpoint) after N steps of this process, as a crash would
    #[arg(long, hide = true, value_name = "N")]
    stop_after: Option<usize>,
    /// Test hook: make the input of step N (1-based) NaN
    #[arg(long, hide = true, value_name = "N")]
    poison_step: Option<usize>,
}

/// What a resumed run must share with the run it continues.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RunSettings {
    teacher_config_sha256: String,
    teacher_weights_sha256: String,
    cache: String,
    data: String,
    noise: Vec<String>,
    student_layers: usize,
    targets: Vec<usize>,
    data_config: DataSettings,
    optim: OptimConfig,
    train_utterances: usize,
    val_utterances: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct DataSettings {
    batch: usize,
    crop_seconds: f64,
    snr: Vec<SnrChoice>,
    clean_fraction: f64,
    normalize: bool,
}

const RUN_JSON: &str = "run.json";
const LOG: &str = "log.jsonl";
const VAL_LOG: &str = "val.jsonl";
const CHECKPOINT: &str = "checkpoint";
const STUDENT: &str = "student";
const PLOT: &str = "loss.png";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_interrupt(_: libc::c_int) {
    // A second Ctrl-C leaves at once; the last checkpoint stays intact (it is replaced atomically).
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        unsafe { libc::_exit(130) };
    }
}

fn install_interrupt_handler() {
    #[cfg(unix)]
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// `0,5,10`, `clean`, `clean,0,10` or a range `FROM:TO:STEP` (inclusive), e.g. `0:20:5`.
pub fn parse_snr_list(s: &str) -> Result<Vec<SnrChoice>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let fields: Vec<&str> = part.split(':').collect();
        match fields.len() {
            1 => out.push(part.parse()?),
            3 => {
                let num = |f: &str| -> Result<f64> {
                    match f.trim().parse::<f64>() {
                        Ok(v) if v.is_finite() => Ok(v),
                        _ => bail!("SNR range {part:?}: {f:?} is not a number"),
                    }
                };
                let (from, to, step) = (num(fields[0])?, num(fields[1])?, num(fields[2])?);
                if step <= 0.0 || to < from {
                    bail!("SNR range {part:?}: expected FROM:TO:STEP with FROM <= TO and STEP > 0");
                }
                let n = ((to - from) / step + 1e-9).floor() as usize;
                if n > 1000 {
                    bail!("SNR range {part:?} has more than 1000 values");
                }
                out.extend((0..=n).map(|i| SnrChoice::Db(from + i as f64 * step)));
            }
            _ => bail!("SNR {part:?}: expected dB, \"clean\" or FROM:TO:STEP"),
        }
    }
    if out.is_empty() {
        bail!("empty SNR list {s:?}");
    }
    Ok(out)
}

fn parse_layer_list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<usize>()
                .with_context(|| format!("layer list {s:?}: {p:?} is not a layer number"))
        })
        .collect()
}

/// Reads `path`'s JSON lines, keeping those whose `step` is at most `max_step`; rewrites the file when any
/// were dropped (atomically). A missing file is empty.
fn truncate_log(path: &Path, max_step: usize) -> Result<Vec<serde_json::Value>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut kept = Vec::new();
    let mut text = String::new();
    let mut dropped = false;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        // A line cut short by a crash is dropped, like the steps after the checkpoint.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            dropped = true;
            continue;
        };
        match v.get("step").and_then(|s| s.as_u64()) {
            Some(s) if s as usize <= max_step => {
                text.push_str(&line);
                text.push('\n');
                kept.push(v);
            }
            Some(_) => dropped = true,
            None => bail!("{} line {}: no step number", path.display(), i + 1),
        }
    }
    if dropped {
        crate::fsutil::atomic_write(path, text.as_bytes())?;
    }
    Ok(kept)
}

fn append_line(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{value}").with_context(|| format!("cannot write {}", path.display()))
}

fn step_json(r: &StepRecord, layers: &[usize], seconds: f64) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), r.step.into());
    m.insert("loss".into(), json!(r.loss));
    m.insert("lr".into(), json!(r.lr));
    if let Some(g) = r.grad_norm {
        m.insert("grad_norm".into(), json!(g));
    }
    for (j, l) in layers.iter().enumerate() {
        m.insert(format!("l1.{l}"), json!(r.l1[j]));
        m.insert(format!("cos.{l}"), json!(r.cos[j]));
    }
    m.insert("epoch".into(), r.epoch.into());
    m.insert("clean_items".into(), r.clean_items.into());
    m.insert("crop_samples".into(), r.samples.into());
    m.insert("seconds".into(), json!((seconds * 1e4).round() / 1e4));
    serde_json::Value::Object(m)
}

/// The curves of `loss.png`: per head, its L1 and cosine terms against steps, and the total loss.
fn write_plot(path: &Path, log: &[serde_json::Value], layers: &[usize], val: &[serde_json::Value]) -> Result<()> {
    let series = |key: &str, name: String| Series {
        name,
        points: log
            .iter()
            .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
            .collect(),
    };
    let mut panels = vec![
        Panel {
            title: "training loss (mean over heads of L1 + lambda * cosine term)".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![series("loss", "total".into())],
            markers: false,
        },
        Panel {
            title: "L1 term per head".into(),
            x_label: "step".into(),
            y_label: "mean |p - t|".into(),
            series: layers
                .iter()
                .map(|l| series(&format!("l1.{l}"), format!("layer {l}")))
                .collect(),
            markers: false,
        },
        Panel {
            title: "cosine term per head".into(),
            x_label: "step".into(),
            y_label: "mean -log sigmoid(cos)".into(),
            series: layers
                .iter()
                .map(|l| series(&format!("cos.{l}"), format!("layer {l}")))
                .collect(),
            markers: false,
        },
    ];
    if !val.is_empty() {
        // Validation: the mean over conditions and layers of the student's cosine, and the teacher's.
        let mean_of = |v: &serde_json::Value, key: &str| -> Option<f64> {
            let conds = v.get("conditions")?.as_array()?;
            let all: Vec<f64> = conds
                .iter()
                .filter(|c| c.get("condition").and_then(|s| s.as_str()) != Some("clean"))
                .filter_map(|c| c.get(key)?.as_array().cloned())
                .flatten()
                .filter_map(|x| x.as_f64())
                .collect();
            (!all.is_empty()).then(|| all.iter().sum::<f64>() / all.len() as f64)
        };
        let points = |key: &str| -> Vec<(f64, f64)> {
            val.iter()
                .filter_map(|v| Some((v.get("step")?.as_f64()?, mean_of(v, key)?)))
                .collect()
        };
        panels.push(Panel {
            title: "validation: cosine to the clean targets from noisy input (mean over SNRs and layers)".into(),
            x_label: "step".into(),
            y_label: "cosine".into(),
            series: vec![
                Series {
                    name: "student".into(),
                    points: points("student_cos"),
                },
                Series {
                    name: "teacher".into(),
                    points: points("teacher_cos"),
                },
            ],
            markers: true,
        });
    }
    plot::write_png(path, &panels)
}

/// Locks --out (creating it), refuses it when it is not a run folder we may use, and clears it for --force.
/// On refusal a folder this call created is removed again.
fn prepare_run_dir(args: &Args) -> Result<crate::fsutil::OutputLock> {
    let out = &args.out;
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    let created = !out.exists();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let lock = crate::fsutil::OutputLock::acquire(out, "wgpu-mlkd train")?;
    match check_run_dir(args) {
        Ok(()) => Ok(lock),
        Err(e) => {
            drop(lock);
            if created {
                let _ = std::fs::remove_dir_all(out);
            }
            Err(e)
        }
    }
}

fn check_run_dir(args: &Args) -> Result<()> {
    let out = &args.out;
    // Temporary files of a writer that died (we hold the lock: nobody else writes here).
    for entry in std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let p = entry?.path();
        let n = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if p.is_file() && n.starts_with('.') && (n.ends_with(".tmp") || n.contains(".tmp.")) {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    if args.resume {
        if let Some(from) = recover_interrupted_save(&out.join(CHECKPOINT))? {
            eprintln!(
                "train: the last checkpoint save was interrupted; recovered the checkpoint from {}",
                from.display()
            );
        }
    }
    let has_run = out.join(RUN_JSON).exists() || out.join(CHECKPOINT).exists();
    if args.resume {
        if !out.join(CHECKPOINT).is_dir() {
            if out.join(RUN_JSON).exists() {
                // Stopped before its first checkpoint: nothing to resume, start the same run again.
                eprintln!("train: {} has no checkpoint yet; starting from step 0", out.display());
            } else {
                bail!("--resume: {} holds no training run", out.display());
            }
        }
    } else if has_run {
        if !args.force {
            bail!(
                "{} already holds a training run; pass --resume to continue it, --force to start afresh, or \
                 choose another --out",
                out.display()
            );
        }
        for name in [RUN_JSON, LOG, VAL_LOG, PLOT] {
            let p = out.join(name);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        for name in [CHECKPOINT, STUDENT] {
            let p = out.join(name);
            if p.exists() {
                std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        for entry in std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
            let p = entry?.path();
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if p.is_dir() && (n.starts_with(".checkpoint.") || n.starts_with(".student.tmp.")) {
                std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
    } else {
        let mut entries = std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))?;
        if entries.any(|e| e.is_ok_and(|e| !crate::fsutil::is_lock_file(&e.file_name().to_string_lossy()))) {
            bail!(
                "--out {} is a non-empty folder that holds no training run; choose a new or empty folder",
                out.display()
            );
        }
    }
    Ok(())
}

/// Writes the student folder atomically: into a temporary sibling, then renamed over `dir`.
fn export_student(student: &Student, dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".student.tmp.{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    if let Err(e) = student.save(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove the old {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let started = Instant::now();
    let snrs = parse_snr_list(&args.snr)?;
    let val_snrs = parse_snr_list(&args.val_snr)?;
    let optim = OptimConfig {
        steps: args.steps,
        lr: args.lr,
        warmup: args.warmup,
        decay: args.decay.clone(),
        lambda: args.lambda,
        dropout: args.dropout,
        feature_grad_mult: args.feature_grad_mult,
        seed: args.seed,
    };
    optim.validate()?;
    if args.save_every == 0 || args.log_every == 0 {
        bail!("--save-every and --log-every must be at least 1");
    }
    let cache = TeacherCache::open(&args.cache)?;
    let manifest = cache.manifest();
    let normalize = manifest.teacher.normalize && !args.no_normalize;
    let (teacher_info, teacher_config) = TeacherInfo::from_dir(&args.teacher, manifest.teacher.normalize)?;
    if teacher_info.config_sha256 != manifest.teacher.config_sha256
        || teacher_info.weights_sha256 != manifest.teacher.weights_sha256
    {
        bail!(
            "the cache {} was made with another teacher than {} (their config or weights differ); run \
             cache-teacher with this teacher",
            args.cache.display(),
            args.teacher.display()
        );
    }
    let targets = match &args.targets {
        Some(s) => parse_layer_list(s)?,
        None => cache.layers().to_vec(),
    };
    crate::model::student::check_target_layers(&targets, teacher_config.num_hidden_layers)?;
    if let Some(l) = targets.iter().find(|l| !cache.layers().contains(l)) {
        bail!(
            "--targets: layer {l} is not in the cache {} (it holds {:?}); cache it with cache-teacher --layers",
            args.cache.display(),
            cache.layers()
        );
    }

    // The data: utterances of --data that the cache holds, split by speaker.
    let dataset = Dataset::open(&args.data)?;
    let in_cache: Vec<&crate::data::dataset::Utterance> =
        dataset.utterances.iter().filter(|u| cache.contains(&u.id)).collect();
    if in_cache.is_empty() {
        bail!(
            "none of the {} utterances of {} is in the cache {}: was it made from this data?",
            dataset.utterances.len(),
            args.data.display(),
            args.cache.display()
        );
    }
    if in_cache.len() < dataset.utterances.len() {
        eprintln!(
            "train: {} of {} utterances of {} are not in the cache and are left out",
            dataset.utterances.len() - in_cache.len(),
            dataset.utterances.len(),
            args.data.display()
        );
    }
    let ids: Vec<String> = in_cache.iter().map(|u| u.id.clone()).collect();
    let (train_ids, mut val_ids) = match &args.val_speakers {
        Some(list) => {
            let held: BTreeSet<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            let known: BTreeSet<&str> = in_cache.iter().map(|u| u.speaker.as_str()).collect();
            if let Some(s) = held.iter().find(|s| !known.contains(*s)) {
                bail!(
                    "--val-speakers: speaker {s:?} is not in the data (speakers: {})",
                    known.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            let (mut t, mut v) = (Vec::new(), Vec::new());
            for u in &in_cache {
                if held.contains(u.speaker.as_str()) {
                    &mut v
                } else {
                    &mut t
                }
                .push(u.id.clone());
            }
            (t, v)
        }
        None => {
            let speakers: Vec<String> = in_cache.iter().map(|u| u.speaker.clone()).collect();
            split_validation(&ids, &speakers, args.val_fraction, args.seed)?
        }
    };
    val_ids.truncate(args.val_max);

    let clean_only = snrs.iter().all(|s| *s == SnrChoice::Clean);
    let noise = match super::noise_bank(&args.noise, &args.noise_gen, args.noise_type_from_dir, args.seed)? {
        Some(bank) => bank,
        None if clean_only => NoiseBank::default(),
        None => bail!("give --noise (folders, files or gen:NAME), or --snr clean to distil on clean input"),
    };
    let val_noise = match super::noise_bank(&args.val_noise, &[], args.noise_type_from_dir, args.seed ^ 0x76616c)? {
        Some(bank) => bank,
        None => noise.clone(),
    };
    if val_noise.sources.is_empty() && val_snrs.iter().any(|s| matches!(s, SnrChoice::Db(_))) && !val_ids.is_empty() {
        bail!("validation at an SNR needs noise: give --noise or --val-noise, or --val-snr clean");
    }

    let data_cfg = TrainDataConfig {
        crop_seconds: args.crop_seconds,
        batch: args.batch,
        snrs: snrs.clone(),
        clean_fraction: if clean_only { 1.0 } else { args.clean_fraction },
        seed: args.seed,
        normalize,
        cache_audio: true,
    };
    let settings = RunSettings {
        teacher_config_sha256: teacher_info.config_sha256.clone(),
        teacher_weights_sha256: teacher_info.weights_sha256.clone(),
        cache: manifest_id(&cache),
        data: args.data.display().to_string(),
        noise: args
            .noise
            .iter()
            .map(|n| n.display().to_string())
            .chain(args.noise_gen.iter().map(|g| format!("gen:{g}")))
            .collect(),
        student_layers: args.student_layers,
        targets: targets.clone(),
        data_config: DataSettings {
            batch: data_cfg.batch,
            crop_seconds: data_cfg.crop_seconds,
            snr: data_cfg.snrs.clone(),
            clean_fraction: data_cfg.clean_fraction,
            normalize,
        },
        optim: optim.clone(),
        train_utterances: train_ids.len(),
        val_utterances: val_ids.clone(),
    };

    let _lock = prepare_run_dir(args)?;
    let run_json = args.out.join(RUN_JSON);
    if args.resume && run_json.exists() {
        let text = std::fs::read_to_string(&run_json).with_context(|| format!("cannot read {}", run_json.display()))?;
        let saved: RunSettings = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged or from another version", run_json.display()))?;
        let diffs = settings_diff(&saved, &settings)?;
        if !diffs.is_empty() {
            bail!(
                "--resume: this command differs from the run in {} ({}); give the same options, or start a new \
                 run",
                args.out.display(),
                diffs.join("; ")
            );
        }
    } else {
        crate::fsutil::atomic_write(&run_json, serde_json::to_string_pretty(&settings)?.as_bytes())?;
    }

    let gpu = cli.open_gpu()?;
    let checkpoint_dir = args.out.join(CHECKPOINT);
    let (student, opt, state) = if args.resume && checkpoint_dir.is_dir() {
        let (student, opt, extra) = load_checkpoint(&checkpoint_dir, &gpu)?;
        let state: TrainerState = serde_json::from_value(extra).with_context(|| {
            format!(
                "{}: the trainer state is damaged",
                checkpoint_dir.join("trainer.json").display()
            )
        })?;
        if student.heads.target_layers != targets || student.encoder.config.num_hidden_layers != args.student_layers {
            bail!(
                "{}: the checkpoint's student does not match the run's settings",
                checkpoint_dir.display()
            );
        }
        (student, opt, Some(state))
    } else {
        let student = Student::from_teacher(&gpu, &args.teacher, args.student_layers, targets.clone(), args.seed)?;
        let params = student.parameters();
        let values: Vec<&crate::gpu::Tensor> = params.iter().map(|p| p.value()).collect();
        let opt = AdamW::new(&values, AdamWConfig::default())?;
        (student, opt, None)
    };
    let model_config = student.encoder.config.clone();
    let utterances: Vec<crate::data::dataset::Utterance> = in_cache.iter().map(|u| (*u).clone()).collect();
    let mut sampler = BatchSampler::new(&utterances, &cache, &noise, &model_config, data_cfg, &train_ids)?;
    let step0 = match &state {
        Some(s) => {
            sampler.restore(s.sampler)?;
            s.step
        }
        None => 0,
    };
    let mut trainer = Trainer::new(student, opt, sampler, optim.clone(), step0)?;
    trainer.poison_step = args.poison_step;
    let layers = targets.clone();

    let log_path = args.out.join(LOG);
    let val_path = args.out.join(VAL_LOG);
    let mut log = truncate_log(&log_path, step0)?;
    let mut val_log = truncate_log(&val_path, step0)?;
    eprintln!(
        "train: {} training and {} validation utterances, student of {} layers predicting teacher layers {:?}, \
         {} steps of batch {} (adapter: {}){}",
        train_ids.len(),
        val_ids.len(),
        args.student_layers,
        layers,
        args.steps,
        args.batch,
        gpu.adapter().name,
        if step0 > 0 {
            format!(", resuming at step {step0}")
        } else {
            String::new()
        }
    );

    let eval_every = args.eval_every.unwrap_or_else(|| args.steps.div_ceil(10).max(1));
    let validation = if val_ids.is_empty() {
        eprintln!("train: no validation utterances; the validation pass is skipped");
        None
    } else {
        let mut teacher = Wav2Vec2::load(&gpu, &args.teacher)?;
        // The validation teacher runs as the cache's did (f16 linear weights if it was made with them).
        teacher.freeze_with(manifest.teacher.f16_weights)?;
        let bar = bar(
            (val_ids.len() * val_snrs.len()) as u64,
            "{spinner} teacher on the validation inputs {pos}/{len} [{elapsed_precise}] ETA {eta}",
        );
        let set = ValidationSet::build(
            &val_ids,
            &utterances,
            &cache,
            &val_noise,
            &val_snrs,
            &layers,
            normalize,
            args.seed,
            &teacher,
            |done, _| bar.set_position(done as u64),
        )?;
        bar.finish_and_clear();
        Some(set)
    };

    install_interrupt_handler();
    let progress = bar(
        args.steps as u64,
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} steps, {per_sec}, ETA {eta_precise} | {msg}",
    );
    progress.set_position(step0 as u64);
    progress.reset_eta();
    let mut steps_this_process = 0usize;
    let mut last_saved = step0;
    let save = |trainer: &Trainer, progress: &indicatif::ProgressBar| -> Result<()> {
        progress.set_message(format!("saving checkpoint at step {}", trainer.step));
        // A run killed later still leaves the next one its compiled pipelines.
        if let Err(e) = gpu.save_pipeline_cache() {
            progress.suspend(|| eprintln!("note: the pipeline cache was not saved: {e:#}"));
        }
        save_checkpoint(
            &checkpoint_dir,
            &trainer.student,
            &trainer.opt,
            &serde_json::to_value(trainer.state())?,
        )
    };
    let run_validation = |trainer: &Trainer, val_log: &mut Vec<serde_json::Value>| -> Result<()> {
        let Some(set) = &validation else { return Ok(()) };
        let report = progress.suspend(|| -> Result<ValidationReport> {
            let bar = bar(
                set.len() as u64,
                "{spinner} validation {pos}/{len} [{elapsed_precise}] ETA {eta}",
            );
            let r = set.evaluate(&trainer.student, &cache, args.lambda, trainer.step, |d, _| {
                bar.set_position(d as u64)
            });
            bar.finish_and_clear();
            r
        })?;
        progress.suspend(|| eprint!("{}", report.table()));
        let value = serde_json::to_value(&report)?;
        append_line(&val_path, &value)?;
        val_log.push(value);
        Ok(())
    };

    while !trainer.done() {
        let t0 = Instant::now();
        let record = match trainer.step() {
            Ok(r) => r,
            Err(e) => {
                progress.abandon();
                if let Some(nf) = e.downcast_ref::<NonFinite>() {
                    bail!(
                        "training stopped: {nf}. The last good checkpoint ({} at step {last_saved}) is kept; \
                         lower --lr or check the data, then --resume or start afresh",
                        if last_saved > 0 {
                            checkpoint_dir.display().to_string()
                        } else {
                            "none: no checkpoint was written yet,".to_string()
                        }
                    );
                }
                return Err(e);
            }
        };
        let seconds = t0.elapsed().as_secs_f64();
        steps_this_process += 1;
        if record.step % args.log_every == 0 || record.step == args.steps {
            let line = step_json(&record, &layers, seconds);
            append_line(&log_path, &line)?;
            log.push(line);
        }
        progress.set_position(record.step as u64);
        progress.set_message(format!(
            "loss {:.4} lr {:.2e} ({:.2} s/step)",
            record.loss, record.lr, seconds
        ));
        if args.stop_after == Some(steps_this_process) {
            progress.abandon();
            eprintln!("train: stopping abruptly after {steps_this_process} steps (--stop-after)");
            std::process::exit(86);
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if record.step % args.save_every == 0 || trainer.done() || interrupted {
            save(&trainer, &progress)?;
            last_saved = record.step;
        }
        if eval_every > 0 && record.step % eval_every == 0 && !trainer.done() {
            run_validation(&trainer, &mut val_log)?;
        }
        if interrupted && !trainer.done() {
            progress.abandon();
            bail!(
                "interrupted: checkpoint at step {} saved in {}; continue with the same command and --resume",
                record.step,
                checkpoint_dir.display()
            );
        }
    }
    progress.finish_and_clear();
    if val_log.last().and_then(|v| v.get("step")?.as_u64()) != Some(trainer.step as u64) {
        run_validation(&trainer, &mut val_log)?;
    }
    export_student(&trainer.student, &args.out.join(STUDENT))?;
    write_plot(&args.out.join(PLOT), &log, &layers, &val_log)?;
    let last = log.last().and_then(|v| v.get("loss")?.as_f64());
    eprintln!(
        "train: {} steps done in {:.1} s this run{}; student saved in {}, curves in {}",
        trainer.step,
        started.elapsed().as_secs_f64(),
        last.map(|l| format!(", final loss {l:.4}")).unwrap_or_default(),
        args.out.join(STUDENT).display(),
        args.out.join(PLOT).display()
    );
    Ok(())
}

fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid progress template"));
    bar
}

/// What identifies the cache's contents: its teacher, layers and utterances.
fn manifest_id(cache: &TeacherCache) -> String {
    let m = cache.manifest();
    format!(
        "{} layers {:?}, {} utterances, {:?}",
        m.teacher.weights_sha256,
        m.layers,
        m.utterances.len(),
        cache.dtype()
    )
}

/// The top-level fields in which two settings differ.
fn settings_diff(a: &RunSettings, b: &RunSettings) -> Result<Vec<String>> {
    let (a, b) = (serde_json::to_value(a)?, serde_json::to_value(b)?);
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Ok(vec!["settings".into()]);
    };
    let keys: BTreeMap<&String, ()> = a.keys().chain(b.keys()).map(|k| (k, ())).collect();
    Ok(keys
        .into_keys()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: run {} vs now {}",
                a.get(k).map(|v| v.to_string()).unwrap_or_default(),
                b.get(k).map(|v| v.to_string()).unwrap_or_default()
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snr_lists() {
        assert_eq!(
            parse_snr_list("0, 5,clean").unwrap(),
            vec![SnrChoice::Db(0.0), SnrChoice::Db(5.0), SnrChoice::Clean]
        );
        assert_eq!(
            parse_snr_list("0:20:5").unwrap(),
            [0.0, 5.0, 10.0, 15.0, 20.0].map(SnrChoice::Db).to_vec()
        );
        assert_eq!(parse_snr_list("-5:-5:1").unwrap(), vec![SnrChoice::Db(-5.0)]);
        for bad in ["", "x", "0:10", "10:0:5", "0:10:0", "0:1e9:1e-3", "nan"] {
            assert!(parse_snr_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn log_truncation_keeps_lines_up_to_the_checkpoint() {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-trainlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log.jsonl");
        std::fs::write(
            &p,
            "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5}\n{\"step\":3,\"loss\":1.2}\n{\"st",
        )
        .unwrap();
        let kept = truncate_log(&p, 2).unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5}\n"
        );
        assert!(truncate_log(&dir.join("missing.jsonl"), 5).unwrap().is_empty());
        std::fs::write(&p, "{\"loss\":1.0}\n").unwrap();
        assert!(truncate_log(&p, 2).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
