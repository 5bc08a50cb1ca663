//! The emotion classifier's data and training (`ser-train`, `eval`, `infer`): noise conditions, pooled upstream
//! features (with an on-disk cache so an interrupted run resumes), class weights, the training loop with early
//! stopping, and the WA / UA metrics.
//!
//! # Multi-condition protocol (method spec)
//! Every training utterance gets condition 0 (clean) and `conditions` noisy versions, each with a noise type
//! and an SNR drawn uniformly from the training noises and SNRs, seeded by `(seed, utterance id, k)`; the
//! upstream's pooled features are computed once per (utterance, condition). Each epoch draws one condition per
//! utterance (seeded by `(seed, epoch, utterance)`), so the classifier sees clean and noisy speech alike. The
//! validation utterances (held-out speakers) are scored on all their conditions.
//!
//! # Evaluation mixtures
//! [`mix_for_eval`] seeds each mixture by `(seed, utterance id, noise type, SNR)` alone, so every model
//! evaluated (in one run or another) hears identical audio.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::data::dataset::Utterance;
use crate::data::noise::{mix_at_snr_detail, NoiseBank};
use crate::gpu::{Gpu, Tensor};
use crate::model::classifier::SerModel;
use crate::model::upstream::Upstream;
use crate::ops::adamw::{AdamW, AdamWConfig};
use crate::tape::Tape;
use crate::train::SnrChoice;

/// A 64-bit seed from a list of parts (SHA-256 of their lengths and bytes): stable across builds and
/// platforms, unlike `std`'s hashers.
pub fn seed_of(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// One input condition: clean, or a noise type at an SNR.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Condition {
    pub noise: Option<String>,
    pub snr: Option<f64>,
}

impl Condition {
    pub fn clean() -> Condition {
        Condition { noise: None, snr: None }
    }

    pub fn label(&self) -> String {
        match (&self.noise, self.snr) {
            (Some(n), Some(s)) => format!("{n}@{s}dB"),
            _ => "clean".to_string(),
        }
    }
}

/// Mixes a segment of a source of `noise_type` into `clean` at `snr` dB, from `rng` (source, then offset).
/// Silent speech stays clean.
fn mix_with(clean: &[f32], bank: &NoiseBank, noise_type: &str, snr: f64, rng: &mut StdRng) -> Result<Vec<f32>> {
    let sources = bank.of_type(noise_type);
    if sources.is_empty() {
        bail!("no noise of type {noise_type:?} (types: {})", bank.types().join(", "));
    }
    let src = sources[rng.gen_range(0..sources.len())];
    Ok(mix_at_snr_detail(clean, src, snr, rng)?.samples)
}

/// The evaluation mixture of utterance `id` with `noise_type` at `snr`: seeded by those alone (and `seed`).
pub fn mix_for_eval(
    clean: &[f32],
    bank: &NoiseBank,
    seed: u64,
    id: &str,
    noise_type: &str,
    snr: f64,
) -> Result<Vec<f32>> {
    let key = seed_of(&["eval", &seed.to_string(), id, noise_type, &format!("{snr}")]);
    mix_with(clean, bank, noise_type, snr, &mut StdRng::seed_from_u64(key))
}

/// The training conditions of utterance `id`: clean, then `n` draws of (noise type, SNR) from `bank` and the dB
/// entries of `snrs` (a `clean` entry of `snrs` draws a clean copy). Only clean without a bank.
pub fn training_conditions(
    bank: Option<&NoiseBank>,
    snrs: &[SnrChoice],
    n: usize,
    seed: u64,
    id: &str,
) -> Vec<Condition> {
    let mut out = vec![Condition::clean()];
    let Some(bank) = bank else { return out };
    if snrs.is_empty() {
        return out;
    }
    let types = bank.types();
    for k in 0..n {
        let mut rng = StdRng::seed_from_u64(seed_of(&["train", &seed.to_string(), id, &k.to_string()]));
        let snr = snrs[rng.gen_range(0..snrs.len())];
        let noise = types[rng.gen_range(0..types.len())].clone();
        out.push(match snr {
            SnrChoice::Clean => Condition::clean(),
            SnrChoice::Db(db) => Condition {
                noise: Some(noise),
                snr: Some(db),
            },
        });
    }
    out
}

/// The audio of a training condition `k` of utterance `id` (see [`training_conditions`]).
pub fn training_audio(
    clean: &[f32],
    bank: Option<&NoiseBank>,
    cond: &Condition,
    seed: u64,
    id: &str,
    k: usize,
) -> Result<Vec<f32>> {
    match (bank, &cond.noise, cond.snr) {
        (Some(bank), Some(noise), Some(snr)) => {
            let key = seed_of(&["train-mix", &seed.to_string(), id, &k.to_string()]);
            mix_with(clean, bank, noise, snr, &mut StdRng::seed_from_u64(key))
        }
        _ => Ok(clean.to_vec()),
    }
}

/// sha256 over the sorted (id, label, file size) of `utts`: identifies the training data.
pub fn data_hash(utts: &[&Utterance]) -> Result<String> {
    let mut rows: Vec<(String, String, u64)> = Vec::with_capacity(utts.len());
    for u in utts {
        let size = std::fs::metadata(&u.path)
            .with_context(|| format!("{}: cannot read", u.path.display()))?
            .len();
        rows.push((u.id.clone(), u.label.clone(), size));
    }
    rows.sort();
    let mut h = Sha256::new();
    for (id, label, size) in rows {
        h.update(format!("{id}\t{label}\t{size}\n").as_bytes());
    }
    Ok(crate::data::cache::hex(&h.finalize()))
}

/// Pooled features kept on disk by name, for one `key` (the upstream, data and conditions they belong to):
/// a safetensors file written atomically whenever [`FeatureCache::save`] is called. A file made for another
/// key is ignored (and replaced).
pub struct FeatureCache {
    path: PathBuf,
    key: String,
    map: HashMap<String, Vec<f32>>,
    dirty: usize,
}

impl FeatureCache {
    pub fn open(path: &Path, key: &str) -> Result<FeatureCache> {
        let mut map = HashMap::new();
        if path.is_file() {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            match safetensors::SafeTensors::read_metadata(&bytes) {
                Ok((_, meta)) if meta.metadata().as_ref().and_then(|m| m.get("key")) == Some(&key.to_string()) => {
                    let st = safetensors::SafeTensors::deserialize(&bytes)
                        .with_context(|| format!("{}: unreadable feature cache", path.display()))?;
                    for (name, view) in st.tensors() {
                        map.insert(name, crate::model::weights::to_f32(view.dtype(), view.data())?);
                    }
                }
                _ => eprintln!(
                    "{}: features of another upstream, data or noise setup; recomputing",
                    path.display()
                ),
            }
        }
        Ok(FeatureCache {
            path: path.to_path_buf(),
            key: key.to_string(),
            map,
            dirty: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Vec<f32>> {
        self.map.get(name)
    }

    pub fn insert(&mut self, name: String, v: Vec<f32>) {
        self.map.insert(name, v);
        self.dirty += 1;
    }

    /// Unsaved entries.
    pub fn dirty(&self) -> usize {
        self.dirty
    }

    pub fn save(&mut self) -> Result<()> {
        if self.dirty == 0 {
            return Ok(());
        }
        let mut names: Vec<&String> = self.map.keys().collect();
        names.sort();
        let data: Vec<(String, Vec<usize>, Vec<f32>)> = names
            .into_iter()
            .map(|n| (n.clone(), vec![self.map[n].len()], self.map[n].clone()))
            .collect();
        let meta = HashMap::from([("key".to_string(), self.key.clone())]);
        crate::fsutil::atomic_write(&self.path, &crate::model::student::serialize_f32(&data, meta)?)?;
        self.dirty = 0;
        Ok(())
    }
}

/// A progress bar in the style of `cache-teacher`.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} ETA {eta_precise} | {msg}",
        )
        .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar
}

/// Pooled features of every (utterance, condition): `out[i][k]` for `utts[i]` and `conds[i][k]`, from `cache`
/// when there, saved to it every `save_every` new entries (or an eighth of its size, when larger) and at the
/// end. All are kept in memory (`L * D * 4` bytes each: 40 KB for wav2vec2-base).
pub fn extract_training_features(
    upstream: &Upstream,
    utts: &[&Utterance],
    conds: &[Vec<Condition>],
    bank: Option<&NoiseBank>,
    seed: u64,
    mut cache: Option<&mut FeatureCache>,
    save_every: usize,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let total: usize = conds.iter().map(|c| c.len()).sum();
    let bar = progress_bar(total as u64, "pooled upstream features");
    let mut out = Vec::with_capacity(utts.len());
    for (u, cs) in utts.iter().zip(conds) {
        let mut clean: Option<Vec<f32>> = None;
        let mut feats = Vec::with_capacity(cs.len());
        for (k, cond) in cs.iter().enumerate() {
            let name = format!("{}#{k}", u.id);
            if let Some(f) = cache.as_ref().and_then(|c| c.get(&name)) {
                feats.push(f.clone());
                bar.inc(1);
                continue;
            }
            if clean.is_none() {
                clean = Some(crate::data::wav::load_16k(&u.path)?);
            }
            let audio = training_audio(clean.as_ref().expect("loaded"), bank, cond, seed, &u.id, k)
                .with_context(|| format!("{}: mixing {}", u.path.display(), cond.label()))?;
            let f = upstream
                .pooled(&audio)
                .with_context(|| format!("{}: upstream features ({})", u.path.display(), cond.label()))?;
            if let Some(c) = cache.as_deref_mut() {
                c.insert(name, f.clone());
                // Every `save_every` new entries, and at least an eighth of the cache's size, so that the
                // rewrites of a large cache add up to a bounded multiple of its final size.
                if c.dirty() >= save_every.max(c.len() / 8) {
                    c.save()?;
                }
            }
            feats.push(f);
            bar.inc(1);
        }
        out.push(feats);
    }
    if let Some(c) = cache {
        c.save()?;
    }
    bar.finish_and_clear();
    Ok(out)
}

/// "Balanced" class weights `n / (C n_c)` over the training labels (0 for a class with no utterance).
pub fn class_weights(labels: &[u32], classes: usize) -> Vec<f32> {
    let mut counts = vec![0usize; classes];
    for &y in labels {
        counts[y as usize] += 1;
    }
    counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                labels.len() as f32 / (classes * c) as f32
            }
        })
        .collect()
}

/// WA, UA and the confusion matrix of one test condition.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scores {
    /// Accuracy.
    pub wa: f64,
    /// Mean per-class recall over the classes present in the truth.
    pub ua: f64,
    pub n: usize,
    /// Rows = true class, columns = predicted.
    pub confusion: Vec<Vec<usize>>,
}

pub fn score(truth: &[u32], pred: &[u32], classes: usize) -> Scores {
    let mut confusion = vec![vec![0usize; classes]; classes];
    for (&t, &p) in truth.iter().zip(pred) {
        confusion[t as usize][p as usize] += 1;
    }
    let n = truth.len();
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    let recalls: Vec<f64> = confusion
        .iter()
        .enumerate()
        .filter(|(_, row)| row.iter().sum::<usize>() > 0)
        .map(|(c, row)| row[c] as f64 / row.iter().sum::<usize>() as f64)
        .collect();
    Scores {
        wa: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
        ua: if recalls.is_empty() {
            0.0
        } else {
            recalls.iter().sum::<f64>() / recalls.len() as f64
        },
        n,
        confusion,
    }
}

/// The most probable class of each row.
pub fn argmax_rows(probs: &[Vec<f32>]) -> Vec<u32> {
    probs
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(
                    (0usize, f32::NEG_INFINITY),
                    |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                )
                .0 as u32
        })
        .collect()
}

/// Class probabilities of many pooled feature rows (each `L * D` values), in GPU batches.
pub fn predict(gpu: &Gpu, model: &SerModel, feats: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(feats.len());
    for chunk in feats.chunks(256) {
        let flat: Vec<f32> = chunk.iter().flat_map(|f| f.iter().copied()).collect();
        out.extend(model.probabilities(gpu, &flat, chunk.len())?);
    }
    Ok(out)
}

/// One labelled utterance's pooled features under each of its conditions (index 0 clean).
pub struct Example {
    pub label: u32,
    pub feats: Vec<Vec<f32>>,
}

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation UA.
    pub patience: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    /// The method spec's Adam at lr 1e-4.
    fn default() -> Self {
        TrainConfig {
            max_epochs: 200,
            patience: 20,
            batch: 32,
            lr: 1e-4,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_ua: Option<f64>,
    pub val_wa: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub epochs_run: usize,
    /// The epoch whose parameters were kept (1-based).
    pub best_epoch: usize,
    pub best_val_ua: Option<f64>,
    pub best_val_wa: Option<f64>,
    pub history: Vec<EpochLog>,
}

/// Scores `examples` on every condition they have.
pub fn score_examples(gpu: &Gpu, model: &SerModel, examples: &[Example]) -> Result<Scores> {
    let mut feats: Vec<&[f32]> = Vec::new();
    let mut truth = Vec::new();
    for e in examples {
        for f in &e.feats {
            feats.push(f);
            truth.push(e.label);
        }
    }
    let pred = argmax_rows(&predict(gpu, model, &feats)?);
    Ok(score(&truth, &pred, model.classes))
}

/// Trains `model` on `train` with Adam (betas 0.9, 0.999, eps 1e-8, no weight decay: torch's Adam) and the
/// class-weighted cross-entropy; each epoch draws one condition per example. With validation examples, keeps
/// the parameters of the epoch with the best validation UA and stops after `patience` epochs without a better
/// one; without, trains `max_epochs` and keeps the last. `log` receives one line per epoch.
pub fn train_classifier(
    gpu: &Gpu,
    model: &SerModel,
    train: &[Example],
    val: &[Example],
    weights: &[f32],
    cfg: &TrainConfig,
    mut log: impl FnMut(&EpochLog),
) -> Result<TrainReport> {
    if train.is_empty() {
        bail!("no training utterances");
    }
    if cfg.batch == 0 || cfg.max_epochs == 0 {
        bail!("batch size and epochs must be at least 1");
    }
    let (l, d) = (model.layers, model.hidden);
    for e in train.iter().chain(val) {
        if e.feats.is_empty() || e.feats.iter().any(|f| f.len() != l * d) {
            bail!("internal: an example's features are not {l} x {d}");
        }
    }
    let weights_t = Tensor::from_slice(gpu, weights, &[weights.len()])?;
    let params = model.parameters();
    let values: Vec<&Tensor> = params.iter().map(|p| p.value()).collect();
    let mut opt = AdamW::new(
        &values,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: None,
        },
    )?;
    let mut best: Option<(f64, f64, usize, Vec<Vec<f32>>)> = None;
    let mut history = Vec::new();
    let mut since_best = 0;
    for epoch in 1..=cfg.max_epochs {
        let mut rng = StdRng::seed_from_u64(seed_of(&["epoch", &cfg.seed.to_string(), &epoch.to_string()]));
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rng);
        let mut losses = Vec::new();
        for batch in order.chunks(cfg.batch) {
            let mut x = Vec::with_capacity(batch.len() * l * d);
            let mut labels = Vec::with_capacity(batch.len());
            for &i in batch {
                let e = &train[i];
                x.extend_from_slice(&e.feats[rng.gen_range(0..e.feats.len())]);
                labels.push(e.label);
            }
            model.standardize(&mut x);
            let tape = Tape::new();
            let input = tape.constant(Tensor::from_slice(gpu, &x, &[batch.len(), l, d])?);
            let logits = model.forward(&tape, &input)?;
            let (loss, _) = tape.cross_entropy(&logits, &labels, &weights_t)?;
            tape.backward(&loss)?;
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| {
                    p.grad()
                        .ok_or_else(|| anyhow::anyhow!("internal: {} got no gradient", p.name))
                })
                .collect::<Result<_>>()?;
            let grad_refs: Vec<&Tensor> = grads.iter().collect();
            opt.step(&values, &grad_refs, cfg.lr)?;
            params.iter().for_each(|p| p.zero_grad());
            losses.push((loss.value().clone(), batch.len()));
        }
        let mut total = 0.0;
        for (t, n) in &losses {
            total += t.to_vec()?[0] as f64 * *n as f64;
        }
        let train_loss = total / train.len() as f64;
        if !train_loss.is_finite() {
            bail!("the training loss became {train_loss} at epoch {epoch}");
        }
        let (val_ua, val_wa) = if val.is_empty() {
            (None, None)
        } else {
            let s = score_examples(gpu, model, val)?;
            (Some(s.ua), Some(s.wa))
        };
        let entry = EpochLog {
            epoch,
            train_loss,
            val_ua,
            val_wa,
        };
        log(&entry);
        history.push(entry);
        if let (Some(ua), Some(wa)) = (val_ua, val_wa) {
            if best.as_ref().is_none_or(|b| ua > b.0) {
                best = Some((ua, wa, epoch, model.snapshot()?));
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= cfg.patience {
                    break;
                }
            }
        }
    }
    let epochs_run = history.len();
    Ok(match best {
        Some((ua, wa, epoch, values)) => {
            model.restore(&values)?;
            TrainReport {
                epochs_run,
                best_epoch: epoch,
                best_val_ua: Some(ua),
                best_val_wa: Some(wa),
                history,
            }
        }
        None => TrainReport {
            epochs_run,
            best_epoch: epochs_run,
            best_val_ua: None,
            best_val_wa: None,
            history,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::model::classifier::PROJ_DIM;

    #[test]
    fn scores_follow_their_definitions() {
        // Class 0: 3 of 4 right; class 1: 1 of 2; class 2 absent from the truth.
        let s = score(&[0, 0, 0, 0, 1, 1], &[0, 0, 0, 2, 1, 0], 3);
        assert!((s.wa - 4.0 / 6.0).abs() < 1e-12);
        assert!((s.ua - (0.75 + 0.5) / 2.0).abs() < 1e-12);
        assert_eq!(s.confusion, vec![vec![3, 0, 1], vec![1, 1, 0], vec![0, 0, 0]]);
        assert_eq!(class_weights(&[0, 0, 0, 1], 3), vec![4.0 / 9.0, 4.0 / 3.0, 0.0]);
    }

    #[test]
    fn conditions_are_seeded_and_clean_first() {
        let bank = NoiseBank::load(&[], &["white".to_string(), "pink".to_string()], false, 1).unwrap();
        let snrs = [SnrChoice::Db(0.0), SnrChoice::Db(10.0)];
        let a = training_conditions(Some(&bank), &snrs, 4, 7, "u1");
        assert_eq!(a, training_conditions(Some(&bank), &snrs, 4, 7, "u1"));
        assert_eq!(a.len(), 5);
        assert_eq!(a[0], Condition::clean());
        assert!(a[1..].iter().all(|c| c.noise.is_some()));
        assert_eq!(training_conditions(None, &snrs, 4, 7, "u1"), vec![Condition::clean()]);
        let clean: Vec<f32> = (0..4000).map(|i| (i as f32 * 0.01).sin()).collect();
        let m1 = mix_for_eval(&clean, &bank, 3, "u1", "pink", 5.0).unwrap();
        assert_eq!(m1, mix_for_eval(&clean, &bank, 3, "u1", "pink", 5.0).unwrap());
        assert_ne!(m1, mix_for_eval(&clean, &bank, 3, "u2", "pink", 5.0).unwrap());
    }

    /// The spec's per-frame formulation in f64: per frame t, z_t = W (sum_l a_l h_{l,t}) + b; then the mean of
    /// z_t over frames; then the output layer.
    #[allow(clippy::too_many_arguments)]
    fn per_frame_logits(
        h: &[f64], // [L, T, D]
        t: usize,
        mix: &[f32],
        w1: &[f32],
        b1: &[f32],
        w2: &[f32],
        b2: &[f32],
        (l, d, c): (usize, usize, usize),
    ) -> Vec<f64> {
        let a = crate::ops::layer_mix::reference::softmax(mix);
        let mut pooled = vec![0f64; PROJ_DIM];
        for ti in 0..t {
            for (o, acc) in pooled.iter_mut().enumerate() {
                let mut z = b1[o] as f64;
                for di in 0..d {
                    let x: f64 = (0..l).map(|li| a[li] * h[(li * t + ti) * d + di]).sum();
                    z += w1[o * d + di] as f64 * x;
                }
                *acc += z / t as f64;
            }
        }
        (0..c)
            .map(|k| {
                b2[k] as f64
                    + (0..PROJ_DIM)
                        .map(|o| w2[k * PROJ_DIM + o] as f64 * pooled[o])
                        .sum::<f64>()
            })
            .collect()
    }

    #[test]
    fn pooled_classifier_equals_the_per_frame_formulation() {
        let gpu = test_gpu();
        let (l, t, d, c) = (4, 9, 6, 3);
        let model = SerModel::init(gpu, l, d, c, 5).unwrap();
        // Non-uniform layer weights.
        let mix = crate::ops::testing::random_vec(1, l, 1.0);
        model
            .mix
            .value()
            .copy_from(0, &Tensor::from_slice(gpu, &mix, &[l]).unwrap(), 0, l)
            .unwrap();
        let h: Vec<f32> = crate::ops::testing::random_vec(2, l * t * d, 1.0);
        let pooled: Vec<f32> = (0..l * d)
            .map(|i| {
                let (li, di) = (i / d, i % d);
                ((0..t).map(|ti| h[(li * t + ti) * d + di] as f64).sum::<f64>() / t as f64) as f32
            })
            .collect();
        let tape = Tape::no_grad();
        let logits = model
            .forward(
                &tape,
                &tape.constant(Tensor::from_slice(gpu, &pooled, &[1, l, d]).unwrap()),
            )
            .unwrap()
            .value()
            .to_vec()
            .unwrap();
        let v = |p: &std::sync::Arc<crate::tape::Param>| p.value().to_vec().unwrap();
        let want = per_frame_logits(
            &crate::ops::testing::to_f64(&h),
            t,
            &mix,
            &v(&model.proj.weight),
            &v(model.proj.bias.as_ref().unwrap()),
            &v(&model.out.weight),
            &v(model.out.bias.as_ref().unwrap()),
            (l, d, c),
        );
        crate::ops::testing::assert_close(
            "pooled classifier vs per-frame",
            &logits,
            &want,
            crate::ops::testing::Tol::KERNEL,
        );
    }

    #[test]
    fn classifier_learns_separable_pooled_features() {
        let gpu = test_gpu();
        let (l, d, c) = (3, 8, 3);
        let mut rng = StdRng::seed_from_u64(9);
        // Class k: a bump on channel k of layer 1, plus noise; two conditions per example.
        let mut make = |n: usize| -> Vec<Example> {
            (0..n)
                .map(|i| {
                    let label = (i % c) as u32;
                    let feats = (0..2)
                        .map(|_| {
                            (0..l * d)
                                .map(|j| {
                                    let bump = if j == d + label as usize { 2.0 } else { 0.0 };
                                    bump + rng.gen_range(-0.5..0.5)
                                })
                                .collect()
                        })
                        .collect();
                    Example { label, feats }
                })
                .collect()
        };
        let (train, val) = (make(60), make(30));
        let model = SerModel::init(gpu, l, d, c, 1).unwrap();
        let before = score_examples(gpu, &model, &val).unwrap();
        let cfg = TrainConfig {
            max_epochs: 40,
            patience: 40,
            batch: 16,
            lr: 1e-3,
            seed: 3,
        };
        let report = train_classifier(gpu, &model, &train, &val, &class_weights(&[0, 1, 2], c), &cfg, |_| {}).unwrap();
        let first = report.history.first().unwrap().train_loss;
        let last = report.history.last().unwrap().train_loss;
        let after = score_examples(gpu, &model, &val).unwrap();
        eprintln!(
            "separable features: loss {first:.3} -> {last:.3}, val UA {:.3} -> {:.3} (best epoch {})",
            before.ua, after.ua, report.best_epoch
        );
        assert!(last < 0.5 * first, "loss {first} -> {last}");
        assert!(after.ua > 0.9, "UA {}", after.ua);
        assert_eq!(Some(after.ua), report.best_val_ua);
    }
}
