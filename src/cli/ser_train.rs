//! `wgpu-mlkd ser-train`: trains the emotion classifier on a frozen upstream (teacher or distilled student),
//! multi-condition when noise is given (method spec); see `train::ser` for the protocol.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use super::Cli;
use crate::data::dataset::{Dataset, Utterance};
use crate::data::noise::NoiseBank;
use crate::model::classifier::{SerMeta, SerModel, FORMAT, PROJ_DIM};
use crate::model::upstream::{check_utterance_audio, Upstream, UpstreamSpec};
use crate::train::ser::{self, Example, TrainConfig};
use crate::train::{split_validation, SnrChoice};

/// The feature cache inside the output folder.
pub const FEATURE_CACHE: &str = "features.safetensors";

#[derive(clap::Args)]
pub struct Args {
    /// Frozen upstream: teacher:DIR (a wav2vec 2.0 folder) or student:RUN (a training run or its student/ folder)
    #[arg(long, value_name = "teacher:DIR|student:RUN")]
    upstream: UpstreamSpec,
    /// Training data: EmoDB or IEMOCAP folder, or a CSV manifest
    #[arg(long, value_name = "DIR|CSV")]
    data: PathBuf,
    /// Output folder for the SER model (ser.json, ser.safetensors, and the feature cache)
    #[arg(long, value_name = "SER")]
    out: PathBuf,
    /// Noise folders or WAV files for multi-condition training (noise type = file stem)
    #[arg(long, value_name = "DIR", num_args = 1..)]
    noise: Vec<PathBuf>,
    /// Built-in noise generators to add: white, pink, brown (comma-separated)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    noise_gen: Vec<String>,
    /// Name noise types by the folder that holds each file instead of the file stem
    #[arg(long)]
    noise_type_from_dir: bool,
    /// Training SNRs in dB (comma-separated; `clean` allowed), drawn uniformly for each noisy condition
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "0,5,10,15,20")]
    snr: Vec<SnrChoice>,
    /// Noisy versions per training utterance (besides the clean one)
    #[arg(long, default_value_t = 4)]
    conditions: usize,
    /// Leave these speakers out of training (comma-separated)
    #[arg(long, value_name = "LIST", value_delimiter = ',', conflicts_with = "fold")]
    test_speakers: Vec<String>,
    /// Leave split N out (IEMOCAP session N: a split named N, else the N-th split in sorted order)
    #[arg(long, value_name = "N")]
    fold: Option<String>,
    /// Fraction of the training speakers held out for early stopping
    #[arg(long, default_value_t = 0.15)]
    val_fraction: f64,
    /// Most epochs
    #[arg(long, default_value_t = 200)]
    epochs: usize,
    /// Stop after this many epochs without a better validation UA
    #[arg(long, default_value_t = 20)]
    patience: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Adam learning rate (method spec: 1e-4)
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not keep pooled features in SER/features.safetensors (kept by default so that a rerun resumes)
    #[arg(long)]
    no_feature_cache: bool,
}

/// `--fold N`: a split named N, else the N-th (1-based) of the sorted splits.
pub fn resolve_fold(ds: &Dataset, fold: &str) -> Result<String> {
    let splits = ds.splits();
    if splits.iter().any(|s| s == fold) {
        return Ok(fold.to_string());
    }
    if let Ok(n) = fold.parse::<usize>() {
        if n >= 1 && n <= splits.len() {
            return Ok(splits[n - 1].clone());
        }
    }
    bail!(
        "--fold {fold}: {} has no such split (splits: {})",
        ds.root.display(),
        if splits.is_empty() {
            "none".to_string()
        } else {
            splits.join(", ")
        }
    )
}

/// Splits `ds` into (train, test) by `--test-speakers` or `--fold`; test is empty without either.
pub fn split_dataset<'a>(
    ds: &'a Dataset,
    test_speakers: &[String],
    fold: Option<&str>,
) -> Result<(Vec<&'a Utterance>, Vec<&'a Utterance>, serde_json::Value)> {
    if let Some(f) = fold {
        let held = resolve_fold(ds, f)?;
        let (train, test) = ds.fold(&held)?;
        return Ok((train, test, serde_json::json!({"fold": held})));
    }
    if !test_speakers.is_empty() {
        let known = ds.speakers();
        for s in test_speakers {
            if !known.contains(s) {
                bail!(
                    "--test-speakers: {s:?} is not a speaker of {} (speakers: {})",
                    ds.root.display(),
                    known.join(", ")
                );
            }
        }
        let (test, train): (Vec<&Utterance>, Vec<&Utterance>) =
            ds.utterances.iter().partition(|u| test_speakers.contains(&u.speaker));
        return Ok((train, test, serde_json::json!({"test_speakers": test_speakers})));
    }
    Ok((ds.utterances.iter().collect(), Vec::new(), serde_json::json!("all")))
}

/// Loads `--noise` folders and generators; `None` when neither is given.
pub fn load_noise(dirs: &[PathBuf], gens: &[String], from_dir: bool, seed: u64) -> Result<Option<NoiseBank>> {
    super::noise_bank(dirs, gens, from_dir, seed)
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let started = Instant::now();
    if args.out.is_file() {
        bail!(
            "--out {} is a file; give a folder for the SER model",
            args.out.display()
        );
    }
    let ds = Dataset::open(&args.data)?;
    let labels = ds.labels();
    if labels.len() < 2 {
        bail!(
            "{}: needs at least two emotion labels, found {:?}",
            args.data.display(),
            labels
        );
    }
    let class_of: BTreeMap<&str, u32> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i as u32)).collect();
    let (train_all, test, split) = split_dataset(&ds, &args.test_speakers, args.fold.as_deref())?;
    if train_all.is_empty() {
        bail!("no training utterances left after the split");
    }
    let ids: Vec<String> = train_all.iter().map(|u| u.id.clone()).collect();
    let speakers: Vec<String> = train_all.iter().map(|u| u.speaker.clone()).collect();
    let (train_ids, val_ids) = split_validation(&ids, &speakers, args.val_fraction, args.seed)?;
    let by_id: BTreeMap<&str, &Utterance> = train_all.iter().map(|u| (u.id.as_str(), *u)).collect();
    let train: Vec<&Utterance> = train_ids.iter().map(|i| by_id[i.as_str()]).collect();
    let val: Vec<&Utterance> = val_ids.iter().map(|i| by_id[i.as_str()]).collect();
    let bank = load_noise(&args.noise, &args.noise_gen, args.noise_type_from_dir, args.seed)?;
    if bank.is_some() && !args.snr.iter().any(|s| matches!(s, SnrChoice::Db(_))) {
        bail!("--snr lists no dB value, so the noise would never be mixed in");
    }
    let data_hash = ser::data_hash(&train_all)?;

    let gpu = cli.open_gpu()?;
    let upstream = Upstream::load(&gpu, &args.upstream)?;
    let every: Vec<&Utterance> = train_all.iter().chain(&test).copied().collect();
    check_utterance_audio(&gpu, upstream.config(), &args.upstream.to_string(), &every)?;
    let (l, d) = (upstream.info.feature_layers, upstream.info.hidden_size);
    eprintln!(
        "{}: {} utterances ({} train, {} validation, {} test), {} classes; upstream {} ({} feature layers of {}); \
         {} conditions per utterance; adapter {}",
        args.data.display(),
        ds.utterances.len(),
        train.len(),
        val.len(),
        test.len(),
        labels.len(),
        args.upstream,
        l,
        d,
        if bank.is_some() { args.conditions + 1 } else { 1 },
        gpu.adapter().name
    );

    let both: Vec<&Utterance> = train.iter().chain(&val).copied().collect();
    let conds: Vec<Vec<ser::Condition>> = both
        .iter()
        .map(|u| ser::training_conditions(bank.as_ref(), &args.snr, args.conditions, args.seed, &u.id))
        .collect();
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let fp = upstream.fingerprint()?;
    let noise_desc: Vec<(String, usize)> = bank
        .as_ref()
        .map(|b| b.sources.iter().map(|s| (s.name.clone(), s.samples.len())).collect())
        .unwrap_or_default();
    let key = serde_json::json!({
        "config": fp.config_sha256, "weights": fp.weights_sha256, "normalize": fp.normalize,
        "kind": upstream.info.kind, "data": data_hash, "noise": noise_desc,
        "snr": args.snr.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "conditions": args.conditions, "seed": args.seed,
    })
    .to_string();
    let mut cache = if args.no_feature_cache {
        None
    } else {
        let c = ser::FeatureCache::open(&args.out.join(FEATURE_CACHE), &key)?;
        if !c.is_empty() {
            eprintln!("resuming: {} pooled features already computed", c.len());
        }
        Some(c)
    };
    let t0 = Instant::now();
    let feats = ser::extract_training_features(&upstream, &both, &conds, bank.as_ref(), args.seed, cache.as_mut(), 64)?;
    let feature_secs = t0.elapsed().as_secs_f64();
    let mut examples: Vec<Example> = both
        .iter()
        .zip(feats)
        .map(|(u, f)| Example {
            label: class_of[u.label.as_str()],
            feats: f,
        })
        .collect();
    let val_examples = examples.split_off(train.len());
    let train_labels: Vec<u32> = examples.iter().map(|e| e.label).collect();
    let weights = ser::class_weights(&train_labels, labels.len());

    let mut model = SerModel::init(&gpu, l, d, labels.len(), args.seed)?;
    // Standardised with the training items' features, every condition included.
    let all: Vec<&[f32]> = examples
        .iter()
        .flat_map(|e| e.feats.iter().map(|f| f.as_slice()))
        .collect();
    model.fit_standardizer(&all)?;
    let cfg = TrainConfig {
        max_epochs: args.epochs,
        patience: args.patience,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
    };
    let t1 = Instant::now();
    let report = ser::train_classifier(&gpu, &model, &examples, &val_examples, &weights, &cfg, |e| {
        match e.val_ua {
            Some(ua) => eprintln!(
                "epoch {:>3}: train loss {:.4}, validation UA {:.3}",
                e.epoch, e.train_loss, ua
            ),
            None => eprintln!("epoch {:>3}: train loss {:.4}", e.epoch, e.train_loss),
        }
    })?;
    let train_secs = t1.elapsed().as_secs_f64();

    // Clean scores on the held-out test speakers or fold, when there are any.
    let test_scores = if test.is_empty() {
        None
    } else {
        let bar = ser::progress_bar(test.len() as u64, "test features (clean)");
        let mut fs = Vec::with_capacity(test.len());
        for u in &test {
            let audio = crate::data::wav::load_16k(&u.path)?;
            fs.push(
                upstream
                    .pooled(&audio)
                    .with_context(|| format!("{}: upstream features", u.path.display()))?,
            );
            bar.inc(1);
        }
        bar.finish_and_clear();
        let refs: Vec<&[f32]> = fs.iter().map(|f| f.as_slice()).collect();
        let truth: Vec<u32> = test.iter().map(|u| class_of[u.label.as_str()]).collect();
        let pred = ser::argmax_rows(&ser::predict(&gpu, &model, &refs)?);
        let s = ser::score(&truth, &pred, labels.len());
        eprintln!("test (clean, {} utterances): WA {:.3}, UA {:.3}", s.n, s.wa, s.ua);
        Some(s)
    };

    let meta = SerMeta {
        format: FORMAT.to_string(),
        version: 1,
        upstream: upstream.info.clone(),
        labels: labels.clone(),
        proj_dim: PROJ_DIM,
        training: serde_json::json!({
            "data": args.data.display().to_string(),
            "data_hash": data_hash,
            "split": split,
            "train_utterances": train.len(),
            "validation_utterances": val.len(),
            "validation_speakers": val.iter().map(|u| u.speaker.clone()).collect::<std::collections::BTreeSet<_>>(),
            "test_utterances": test.len(),
            "noise": bank.as_ref().map(|b| b.types()).unwrap_or_default(),
            "snr": args.snr.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "conditions": if bank.is_some() { args.conditions } else { 0 },
            "class_weights": weights,
            "epochs": report.epochs_run,
            "best_epoch": report.best_epoch,
            "best_val_ua": report.best_val_ua,
            "best_val_wa": report.best_val_wa,
            "test_clean": test_scores.as_ref().map(|s| serde_json::json!({"wa": s.wa, "ua": s.ua, "n": s.n})),
            "layer_weights": model.layer_weights()?,
            "optimizer": {"name": "adam", "lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "batch": args.batch},
            "seed": args.seed,
            "history": report.history,
        }),
    };
    model.save(&args.out, &meta)?;
    eprintln!(
        "saved {} (best epoch {} of {}, validation UA {}); features {:.1} s, training {:.1} s, total {:.1} s",
        args.out.display(),
        report.best_epoch,
        report.epochs_run,
        report
            .best_val_ua
            .map(|v| format!("{v:.3}"))
            .unwrap_or_else(|| "n/a".into()),
        feature_secs,
        train_secs,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
