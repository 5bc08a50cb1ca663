//! The training-data pipeline of `wgpu-mlkd train`: batches of equal-length, stride-aligned crops of the
//! training utterances, with noise mixed in at a random SNR, and the teacher's cached clean targets for
//! exactly the frames the student computes on each crop.
//!
//! # Choices
//! - **Crop length per batch.** The student's batch is `[B, L, 1]`, so every item of a batch has the same
//!   length `L = min(crop_samples, shortest item of the batch)`: an utterance at most `L` long is taken
//!   whole, longer ones are cropped to `L`. (One short utterance shortens its whole batch; with EmoDB and
//!   IEMOCAP crops of a few seconds this is rare, and it needs no length buckets that would bias the order.)
//! - **Alignment.** A crop starts at a multiple `s` of the CNN's total stride `S`, drawn uniformly from
//!   every such start that keeps the crop inside the utterance. Frame `f` of the crop then sees exactly
//!   the samples of frame `s / S + f` of the whole utterance, so its targets are the cached frames
//!   `[s / S, s / S + T)` with `T = config.frames(L)` (checked to lie inside the cache).
//! - **Noise.** With probability `clean_fraction` an item stays clean; otherwise an SNR is drawn uniformly
//!   from `snrs` (a [`SnrChoice::Clean`] entry also means clean) and a noise source uniformly from the bank,
//!   and [`mix_at_snr_detail`] mixes a random segment of it into the clean crop (the SNR is measured over
//!   the crop, i.e. the audio the student sees). Silent speech is left clean (reported as clean).
//! - **Normalisation.** When `normalize`, the (noisy) crop is normalised to zero mean, unit variance after
//!   mixing, as the teacher's input was: the student sees normalised noisy audio, while the targets come from
//!   the teacher on the normalised clean *whole* utterance (the cache). The normalisation draws nothing
//!   random, so the same seed gives the same crops and noise with or without it.
//! - **Reproducibility and resume.** Every random choice is derived from `(seed, epoch, position)` by a
//!   counter-based hash that seeds a fresh `StdRng`: epoch `e`'s order is a shuffle seeded by `(seed, e)`,
//!   and the item at position `p` of epoch `e` draws its crop and noise from `(seed, e, p)`. The sampler's
//!   whole state is therefore `(epoch, position)` ([`SamplerState`]). An epoch is `n / batch` full batches;
//!   the last `n % batch` items of its order are left for that epoch (they are other items next epoch).
//!   Results are reproducible for one build (`StdRng`'s algorithm may change between `rand` versions).
//! - **Audio.** Decoded 16 kHz clean waveforms are kept in memory after their first use
//!   ([`TrainDataConfig::cache_audio`], on by default: EmoDB is ~100 MB as f32), or decoded per batch.
//!   A decoded length other than the one the cache recorded is an error (the file changed since caching).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::cache::{TeacherCache, SAMPLE_RATE};
use crate::data::dataset::Utterance;
use crate::data::noise::{mix_at_snr_detail, NoiseBank};
use crate::data::wav;
use crate::model::Wav2Vec2Config;

/// One entry of the SNR list: clean input, or noise at this many dB.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum SnrChoice {
    Clean,
    Db(f64),
}

impl std::fmt::Display for SnrChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnrChoice::Clean => f.write_str("clean"),
            SnrChoice::Db(db) => write!(f, "{db}"),
        }
    }
}

impl std::str::FromStr for SnrChoice {
    type Err = anyhow::Error;
    /// `clean`, or a finite number of dB (`10`, `-5`, `2.5`).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("clean") {
            return Ok(SnrChoice::Clean);
        }
        match t.parse::<f64>() {
            Ok(db) if db.is_finite() => Ok(SnrChoice::Db(db)),
            _ => bail!("SNR {s:?}: expected a number of dB or \"clean\""),
        }
    }
}

/// What the sampler draws.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainDataConfig {
    /// Longest crop, in seconds at 16 kHz (rounded to whole samples).
    pub crop_seconds: f64,
    /// Items per batch.
    pub batch: usize,
    /// SNRs drawn uniformly for the noisy items.
    pub snrs: Vec<SnrChoice>,
    /// Probability that an item stays clean before any SNR is drawn.
    pub clean_fraction: f64,
    pub seed: u64,
    /// Normalise each (noisy) crop to zero mean, unit variance, as the teacher's input.
    pub normalize: bool,
    /// Keep decoded waveforms in memory after their first use.
    pub cache_audio: bool,
}

impl Default for TrainDataConfig {
    /// The method's noise defaults (SNRs {0, 5, 10, 15, 20} dB, 10% clean); crop and batch are placeholders
    /// for the training command's own defaults.
    fn default() -> Self {
        TrainDataConfig {
            crop_seconds: 4.0,
            batch: 8,
            snrs: [0.0, 5.0, 10.0, 15.0, 20.0].map(SnrChoice::Db).to_vec(),
            clean_fraction: 0.1,
            seed: 0,
            normalize: true,
            cache_audio: true,
        }
    }
}

impl TrainDataConfig {
    /// `crop_seconds` in 16 kHz samples.
    pub fn crop_samples(&self) -> usize {
        (self.crop_seconds * SAMPLE_RATE as f64).round() as usize
    }
}

/// One batch, ready for the student: `waves` is `[B, L]` (the student's `[B, L, 1]`), `targets[j]` is
/// `[B, T, D]` for the cache's `j`-th layer ([`TeacherCache::layers`] order).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub ids: Vec<String>,
    /// `[B * L]`, item after item.
    pub waves: Vec<f32>,
    /// `L`.
    pub samples: usize,
    /// Per cached layer, `[B * T * D]`.
    pub targets: Vec<Vec<f32>>,
    /// `T = config.frames(L)`.
    pub frames: usize,
    /// Per item, the SNR mixed at; `None` when clean.
    pub snr: Vec<Option<f64>>,
    /// Per item, the noise source's name; `None` when clean.
    pub noise: Vec<Option<String>>,
    /// Per item, the crop's first sample in the utterance (a multiple of the total stride).
    pub starts: Vec<usize>,
    /// The epoch the batch belongs to.
    pub epoch: u64,
}

/// Where a [`BatchSampler`] is: enough to continue exactly (`--resume`). `seed` and `items` are there to
/// refuse a state from a different run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    pub items: usize,
    pub epoch: u64,
    /// Items of this epoch's order already used.
    pub position: usize,
}

struct Item {
    id: String,
    path: PathBuf,
    samples: usize,
    frames: usize,
}

/// Draws [`Batch`]es from the training utterances; see the module documentation for what it draws.
pub struct BatchSampler<'a> {
    cache: &'a TeacherCache,
    noise: &'a NoiseBank,
    model: Wav2Vec2Config,
    cfg: TrainDataConfig,
    stride: usize,
    crop: usize,
    /// Sorted by id, so the caller's order of `ids` does not matter.
    items: Vec<Item>,
    audio: Vec<Option<Arc<Vec<f32>>>>,
    /// The order of `epoch` (rebuilt when the epoch changes).
    order: Vec<usize>,
    epoch: u64,
    position: usize,
}

impl<'a> BatchSampler<'a> {
    /// A sampler over the utterances `ids` (the training split) of `utterances` (a dataset's list), with
    /// targets from `cache` and noise from `noise` (which may be empty when every item is clean). `model` is
    /// the student's (= the teacher's) configuration: its CNN must be the cache's.
    pub fn new(
        utterances: &[Utterance],
        cache: &'a TeacherCache,
        noise: &'a NoiseBank,
        model: &Wav2Vec2Config,
        cfg: TrainDataConfig,
        ids: &[String],
    ) -> Result<BatchSampler<'a>> {
        let teacher = &cache.manifest().teacher;
        if teacher.total_stride != model.total_stride() || teacher.receptive_field != model.receptive_field() {
            bail!(
                "the cache {} was made with a CNN of stride {} and receptive field {}, the model has {} and {}",
                cache.dir().display(),
                teacher.total_stride,
                teacher.receptive_field,
                model.total_stride(),
                model.receptive_field()
            );
        }
        if cfg.batch == 0 {
            bail!("the batch size must be at least 1");
        }
        if !(cfg.crop_seconds.is_finite() && cfg.crop_seconds > 0.0) {
            bail!(
                "the crop length must be a positive number of seconds, got {}",
                cfg.crop_seconds
            );
        }
        let crop = cfg.crop_samples();
        if model.frames(crop) == 0 {
            bail!(
                "a crop of {} s ({crop} samples) is shorter than one frame ({} samples)",
                cfg.crop_seconds,
                model.receptive_field()
            );
        }
        if !(0.0..=1.0).contains(&cfg.clean_fraction) {
            bail!("the clean fraction must be in [0, 1], got {}", cfg.clean_fraction);
        }
        if let Some(SnrChoice::Db(db)) = cfg
            .snrs
            .iter()
            .find(|s| matches!(s, SnrChoice::Db(d) if !d.is_finite()))
        {
            bail!("SNR {db} dB is not a finite number");
        }
        let needs_noise = cfg.clean_fraction < 1.0 && cfg.snrs.iter().any(|s| matches!(s, SnrChoice::Db(_)));
        if cfg.clean_fraction < 1.0 && cfg.snrs.is_empty() {
            bail!("no SNRs to draw from (give at least one, or a clean fraction of 1)");
        }
        if needs_noise && noise.sources.is_empty() {
            bail!("the noise bank is empty but noisy inputs are asked for");
        }
        if ids.is_empty() {
            bail!("no training utterances");
        }
        let by_id: HashMap<&str, &Utterance> = utterances.iter().map(|u| (u.id.as_str(), u)).collect();
        let cached_samples: HashMap<&str, u64> = cache
            .manifest()
            .utterances
            .iter()
            .map(|u| (u.id.as_str(), u.samples))
            .collect();
        let mut sorted: Vec<&String> = ids.iter().collect();
        sorted.sort();
        let mut items = Vec::with_capacity(sorted.len());
        for (k, id) in sorted.iter().enumerate() {
            if k > 0 && sorted[k - 1] == *id {
                bail!("utterance {id:?} is listed twice in the training split");
            }
            let u = by_id
                .get(id.as_str())
                .ok_or_else(|| anyhow!("training utterance {id:?} is not in the dataset"))?;
            let (Some(frames), Some(&samples)) = (cache.frames(id), cached_samples.get(id.as_str())) else {
                bail!(
                    "training utterance {id:?} is not in the teacher cache {} (run cache-teacher on it)",
                    cache.dir().display()
                );
            };
            let samples = samples as usize;
            if frames == 0 || model.frames(samples) != frames {
                bail!(
                    "the cache has {frames} frames for {id:?} ({samples} samples), the model computes {}",
                    model.frames(samples)
                );
            }
            items.push(Item {
                id: id.to_string(),
                path: u.path.clone(),
                samples,
                frames,
            });
        }
        if items.len() < cfg.batch {
            bail!(
                "{} training utterances cannot fill one batch of {}",
                items.len(),
                cfg.batch
            );
        }
        let audio = vec![None; items.len()];
        let mut sampler = BatchSampler {
            cache,
            noise,
            model: model.clone(),
            stride: model.total_stride(),
            crop,
            cfg,
            items,
            audio,
            order: Vec::new(),
            epoch: 0,
            position: 0,
        };
        sampler.order = sampler.epoch_order(0);
        Ok(sampler)
    }

    /// Training utterances.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Full batches per epoch (`n / batch`).
    pub fn batches_per_epoch(&self) -> usize {
        self.items.len() / self.cfg.batch
    }

    /// The longest crop, in samples.
    pub fn crop_samples(&self) -> usize {
        self.crop
    }

    /// The layers of [`Batch::targets`], in order.
    pub fn layers(&self) -> &[usize] {
        self.cache.layers()
    }

    pub fn config(&self) -> &TrainDataConfig {
        &self.cfg
    }

    /// The epoch the next batch comes from when the current one still has a full batch left, else the
    /// one that follows.
    pub fn epoch(&self) -> u64 {
        if self.position + self.cfg.batch > self.items.len() {
            self.epoch + 1
        } else {
            self.epoch
        }
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.cfg.seed,
            items: self.items.len(),
            epoch: self.epoch,
            position: self.position,
        }
    }

    /// Continues from `state` (of a sampler with the same seed and training split).
    pub fn restore(&mut self, state: SamplerState) -> Result<()> {
        if state.seed != self.cfg.seed || state.items != self.items.len() {
            bail!(
                "the saved data sampler state is for seed {} and {} training utterances, this run has seed {} \
                 and {}",
                state.seed,
                state.items,
                self.cfg.seed,
                self.items.len()
            );
        }
        if state.position > self.items.len() {
            bail!(
                "the saved data sampler position {} is past the {} training utterances",
                state.position,
                self.items.len()
            );
        }
        if state.epoch != self.epoch || self.order.is_empty() {
            self.order = self.epoch_order(state.epoch);
        }
        self.epoch = state.epoch;
        self.position = state.position;
        Ok(())
    }

    /// The next batch (moving to the next epoch when this one has no full batch left).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let b = self.cfg.batch;
        if self.position + b > self.items.len() {
            self.epoch += 1;
            self.position = 0;
            self.order = self.epoch_order(self.epoch);
        }
        let picks: Vec<usize> = self.order[self.position..self.position + b].to_vec();
        let len = picks
            .iter()
            .map(|&i| self.items[i].samples)
            .min()
            .expect("batch >= 1")
            .min(self.crop);
        let frames = self.model.frames(len);
        if frames == 0 {
            bail!("a crop of {len} samples is shorter than one frame");
        }
        let layers = self.cache.layers().to_vec();
        let d = self.cache.hidden_size();
        let mut batch = Batch {
            ids: Vec::with_capacity(b),
            waves: Vec::with_capacity(b * len),
            samples: len,
            targets: vec![Vec::with_capacity(b * frames * d); layers.len()],
            frames,
            snr: Vec::with_capacity(b),
            noise: Vec::with_capacity(b),
            starts: Vec::with_capacity(b),
            epoch: self.epoch,
        };
        for (k, &i) in picks.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(key(self.cfg.seed, self.epoch, (self.position + k) as u64));
            let item = &self.items[i];
            let starts = (item.samples - len) / self.stride + 1;
            let start = self.stride * rng.gen_range(0..starts);
            let first = start / self.stride;
            if first + frames > item.frames {
                bail!(
                    "crop {start}..{} of {:?} needs frames {first}..{} but the cache has {}",
                    start + len,
                    item.id,
                    first + frames,
                    item.frames
                );
            }
            let audio = self.audio(i)?;
            let mut crop = audio[start..start + len].to_vec();
            let (snr, noise) = self.add_noise(&mut crop, &mut rng)?;
            if self.cfg.normalize {
                wav::normalize(&mut crop);
            }
            let item = &self.items[i];
            for (t, &l) in batch.targets.iter_mut().zip(&layers) {
                t.extend(self.cache.targets_range(&item.id, l, first..first + frames)?);
            }
            batch.waves.extend(crop);
            batch.ids.push(item.id.clone());
            batch.snr.push(snr);
            batch.noise.push(noise);
            batch.starts.push(start);
        }
        self.position += b;
        Ok(batch)
    }

    /// Mixes noise into `crop` as drawn from `rng` (or leaves it clean): the SNR and the source's name.
    fn add_noise(&self, crop: &mut Vec<f32>, rng: &mut StdRng) -> Result<(Option<f64>, Option<String>)> {
        // Always the same draws in the same order, whatever the outcome, so items stay independent.
        let clean = rng.gen::<f64>() < self.cfg.clean_fraction;
        if clean || self.cfg.snrs.is_empty() {
            return Ok((None, None));
        }
        let SnrChoice::Db(db) = self.cfg.snrs[rng.gen_range(0..self.cfg.snrs.len())] else {
            return Ok((None, None));
        };
        let source = &self.noise.sources[rng.gen_range(0..self.noise.sources.len())];
        let mix = mix_at_snr_detail(crop, source, db, rng)?;
        if mix.silent_speech {
            return Ok((None, None));
        }
        *crop = mix.samples;
        Ok((Some(db), Some(source.name.clone())))
    }

    /// Item `i`'s decoded clean waveform (kept when `cache_audio`).
    fn audio(&mut self, i: usize) -> Result<Arc<Vec<f32>>> {
        if let Some(a) = &self.audio[i] {
            return Ok(a.clone());
        }
        let item = &self.items[i];
        let samples = wav::load_16k(&item.path)
            .with_context(|| format!("utterance {:?}: cannot load {}", item.id, item.path.display()))?;
        if samples.len() != item.samples {
            bail!(
                "{} decodes to {} samples, the teacher cache recorded {}: the file changed since caching \
                 (rerun cache-teacher)",
                item.path.display(),
                samples.len(),
                item.samples
            );
        }
        let samples = Arc::new(samples);
        if self.cfg.cache_audio {
            self.audio[i] = Some(samples.clone());
        }
        Ok(samples)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(key(self.cfg.seed, epoch, u64::MAX)));
        order
    }
}

/// The seed of the random draws at `(seed, epoch, index)` (`index = u64::MAX`: the epoch's shuffle).
fn key(seed: u64, epoch: u64, index: u64) -> u64 {
    use crate::seed::splitmix64;
    splitmix64(splitmix64(splitmix64(seed ^ 0x6d6c6b64_74726169) ^ epoch) ^ index)
}

/// Splits `ids` (with `speakers[i]` the speaker of `ids[i]`) into training and validation ids, in input
/// order. With at least 3 speakers whole speakers are held out: `round(fraction * speakers)` of them,
/// at least 1 and at most all but 1, chosen by a seeded shuffle of the sorted speaker names (so that the
/// validation loss measures unseen voices, as the test folds do). With fewer speakers single utterances are
/// held out: `round(fraction * n)`, at least 1 (when `fraction > 0`) and at most `n - 1`. `fraction = 0`
/// holds nothing out. Deterministic in `(ids, speakers, fraction, seed)`.
pub fn split_validation(
    ids: &[String],
    speakers: &[String],
    fraction: f64,
    seed: u64,
) -> Result<(Vec<String>, Vec<String>)> {
    if ids.len() != speakers.len() {
        bail!("{} utterance ids but {} speakers", ids.len(), speakers.len());
    }
    if !(0.0..1.0).contains(&fraction) {
        bail!("the validation fraction must be in [0, 1), got {fraction}");
    }
    let mut seen = HashSet::new();
    if let Some(dup) = ids.iter().find(|id| !seen.insert(id.as_str())) {
        bail!("utterance {dup:?} is listed twice");
    }
    if fraction == 0.0 || ids.is_empty() {
        return Ok((ids.to_vec(), Vec::new()));
    }
    let mut rng = StdRng::seed_from_u64(key(seed, 0x76616c, 0));
    let by_speaker: BTreeMap<&str, ()> = speakers.iter().map(|s| (s.as_str(), ())).collect();
    let held: Vec<bool> = if by_speaker.len() >= 3 {
        let mut names: Vec<&str> = by_speaker.into_keys().collect();
        let k = ((fraction * names.len() as f64).round() as usize).clamp(1, names.len() - 1);
        names.shuffle(&mut rng);
        let out: HashSet<&str> = names[..k].iter().copied().collect();
        speakers.iter().map(|s| out.contains(s.as_str())).collect()
    } else {
        if ids.len() < 2 {
            bail!("cannot hold out a validation utterance from a single utterance");
        }
        let k = ((fraction * ids.len() as f64).round() as usize).clamp(1, ids.len() - 1);
        let mut idx: Vec<usize> = (0..ids.len()).collect();
        idx.shuffle(&mut rng);
        let mut held = vec![false; ids.len()];
        idx[..k].iter().for_each(|&i| held[i] = true);
        held
    };
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (id, h) in ids.iter().zip(held) {
        if h { &mut val } else { &mut train }.push(id.clone());
    }
    Ok((train, val))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::cache::{CacheDType, Manifest, PlannedUtterance, ShardWriter, TeacherInfo, UtteranceEntry};
    use crate::data::noise::{generate, mean_square, NoiseSource};
    use std::path::Path;

    const LAYERS: [usize; 2] = [1, 3];
    const D: usize = 3;
    /// Lengths in samples; the crop is 1280 (0.08 s), 700 is shorter than it.
    const LENGTHS: [usize; 8] = [1000, 1333, 2000, 2600, 700, 3001, 1500, 1777];

    /// A recognisable target value: utterance `u`, layer `l`, frame `f`, channel `c`.
    fn enc(u: usize, l: usize, f: usize, c: usize) -> f32 {
        (u * 100_000 + l * 10_000 + f * 4 + c) as f32
    }

    struct Fixture {
        dir: PathBuf,
        model: Wav2Vec2Config,
        utterances: Vec<Utterance>,
        ids: Vec<String>,
        cache: TeacherCache,
        noise: NoiseBank,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Generated WAVs and a teacher cache of encoded targets for them (the CNN of `base_group`: stride 40,
    /// receptive field 60).
    fn fixture(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-train-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache_dir = dir.join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/base_group/config.json");
        let model = Wav2Vec2Config::from_file(&fx).unwrap();
        let mut utterances = Vec::new();
        let mut plan = Vec::new();
        let mut values = Vec::new();
        for (u, &n) in LENGTHS.iter().enumerate() {
            let id = format!("03a0{u}Fa");
            let path = dir.join(format!("{id}.wav"));
            let samples = crate::ops::testing::random_vec(100 + u as u64, n, 0.3);
            wav::write_wav_f32(&path, &samples, SAMPLE_RATE).unwrap();
            let frames = model.frames(n);
            for l in LAYERS {
                for f in 0..frames {
                    values.extend((0..D).map(|c| enc(u, l, f, c)));
                }
            }
            plan.push(PlannedUtterance { id: id.clone(), frames });
            utterances.push(Utterance {
                id,
                path,
                label: "anger".into(),
                speaker: format!("s{}", u % 3),
                split: None,
            });
        }
        let mut w = ShardWriter::create(&cache_dir, 0, CacheDType::F32, &LAYERS, D, &plan).unwrap();
        let offsets = w.offsets().to_vec();
        w.write_values(&values).unwrap();
        let info = TeacherInfo {
            config_sha256: "c".repeat(64),
            weights_sha256: "w".repeat(64),
            num_hidden_layers: 3,
            hidden_size: D,
            receptive_field: model.receptive_field(),
            total_stride: model.total_stride(),
            normalize: true,
            f16_weights: false,
        };
        let mut m = Manifest::new(info, LAYERS.to_vec(), CacheDType::F32, None);
        for (i, p) in plan.iter().enumerate() {
            m.utterances.push(UtteranceEntry {
                id: p.id.clone(),
                audio_sha256: String::new(),
                samples: LENGTHS[i] as u64,
                frames: p.frames,
                shard: 0,
                offset: offsets[i],
            });
        }
        m.shards.push(w.finish().unwrap());
        m.write(&cache_dir).unwrap();
        let cache = TeacherCache::open(&cache_dir).unwrap();
        let noise = NoiseBank {
            sources: ["white", "pink"]
                .iter()
                .map(|g| NoiseSource {
                    name: g.to_string(),
                    samples: generate(g, 3000, 7).unwrap(),
                })
                .collect(),
        };
        let ids = utterances.iter().map(|u| u.id.clone()).collect();
        Fixture {
            dir,
            model,
            utterances,
            ids,
            cache,
            noise,
        }
    }

    fn config(seed: u64, clean_fraction: f64, normalize: bool) -> TrainDataConfig {
        TrainDataConfig {
            crop_seconds: 0.08,
            batch: 3,
            snrs: vec![
                SnrChoice::Db(0.0),
                SnrChoice::Db(5.0),
                SnrChoice::Db(20.0),
                SnrChoice::Clean,
            ],
            clean_fraction,
            seed,
            normalize,
            cache_audio: true,
        }
    }

    impl Fixture {
        fn sampler(&self, cfg: TrainDataConfig) -> BatchSampler<'_> {
            BatchSampler::new(&self.utterances, &self.cache, &self.noise, &self.model, cfg, &self.ids).unwrap()
        }

        fn index(&self, id: &str) -> usize {
            self.ids.iter().position(|i| i == id).unwrap()
        }

        fn clean(&self, id: &str) -> Vec<f32> {
            wav::load_16k(&self.utterances[self.index(id)].path).unwrap()
        }
    }

    fn take(s: &mut BatchSampler, n: usize) -> Vec<Batch> {
        (0..n).map(|_| s.next_batch().unwrap()).collect()
    }

    #[test]
    fn crops_are_stride_aligned_equal_length_and_targets_are_the_cached_frames() {
        let fx = fixture("align");
        let stride = fx.model.total_stride();
        assert_eq!(stride, 40);
        let mut s = fx.sampler(config(1, 1.0, false));
        assert_eq!(
            (s.crop_samples(), s.batches_per_epoch(), s.layers()),
            (1280, 2, &LAYERS[..])
        );
        let (mut saw_short, mut saw_cropped) = (false, false);
        for batch in take(&mut s, 12) {
            let b = batch.ids.len();
            let len = batch.samples;
            let shortest = batch.ids.iter().map(|id| LENGTHS[fx.index(id)]).min().unwrap();
            assert_eq!(len, shortest.min(1280));
            assert_eq!(batch.frames, fx.model.frames(len));
            assert_eq!(batch.waves.len(), b * len);
            assert_eq!(batch.targets.len(), LAYERS.len());
            for (k, id) in batch.ids.iter().enumerate() {
                let u = fx.index(id);
                let start = batch.starts[k];
                assert_eq!(start % stride, 0);
                assert!(start + len <= LENGTHS[u]);
                saw_short |= LENGTHS[u] == 700;
                saw_cropped |= start > 0;
                // Clean and not normalised: exactly the file's samples.
                assert_eq!(&batch.waves[k * len..(k + 1) * len], &fx.clean(id)[start..start + len]);
                assert_eq!((batch.snr[k], batch.noise[k].as_deref()), (None, None));
                // Frame f of the crop is cached frame start / stride + f: the same samples.
                let first = start / stride;
                assert_eq!(fx.model.frames(start + len), first + batch.frames);
                for (j, &l) in LAYERS.iter().enumerate() {
                    let got = &batch.targets[j][k * batch.frames * D..(k + 1) * batch.frames * D];
                    let want: Vec<f32> = (0..batch.frames)
                        .flat_map(|f| (0..D).map(move |c| enc(u, l, first + f, c)))
                        .collect();
                    assert_eq!(got, &want[..]);
                    assert_eq!(
                        got,
                        &fx.cache.targets_range(id, l, first..first + batch.frames).unwrap()[..]
                    );
                }
            }
        }
        assert!(saw_short && saw_cropped);
        // Normalised: the per-crop normalisation of the same crops.
        let raw = take(&mut fx.sampler(config(1, 1.0, false)), 4);
        let norm = take(&mut fx.sampler(config(1, 1.0, true)), 4);
        for (r, n) in raw.iter().zip(&norm) {
            assert_eq!((&r.ids, &r.starts, &r.targets), (&n.ids, &n.starts, &n.targets));
            for k in 0..r.ids.len() {
                let mut want = r.waves[k * r.samples..(k + 1) * r.samples].to_vec();
                wav::normalize(&mut want);
                assert_eq!(&n.waves[k * n.samples..(k + 1) * n.samples], &want[..]);
            }
        }
    }

    #[test]
    fn epochs_visit_every_utterance_and_seeds_reproduce() {
        let fx = fixture("seeds");
        let a = take(&mut fx.sampler(config(5, 0.3, true)), 7);
        let b = take(&mut fx.sampler(config(5, 0.3, true)), 7);
        assert_eq!(a, b);
        let c = take(&mut fx.sampler(config(6, 0.3, true)), 7);
        assert_ne!(a, c);
        // 8 items, batches of 3: 2 batches per epoch, no item twice within an epoch.
        let epochs: Vec<u64> = a.iter().map(|b| b.epoch).collect();
        assert_eq!(epochs, [0, 0, 1, 1, 2, 2, 3]);
        for e in 0..3 {
            let mut ids: Vec<&String> = a[2 * e..2 * e + 2].iter().flat_map(|b| &b.ids).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 6);
        }
        // The caller's order of ids does not matter.
        let mut rev = fx.ids.clone();
        rev.reverse();
        let mut s = BatchSampler::new(
            &fx.utterances,
            &fx.cache,
            &fx.noise,
            &fx.model,
            config(5, 0.3, true),
            &rev,
        )
        .unwrap();
        assert_eq!(take(&mut s, 7), a);
    }

    #[test]
    fn resume_continues_exactly() {
        let fx = fixture("resume");
        let cfg = config(9, 0.2, true);
        let whole = take(&mut fx.sampler(cfg.clone()), 9);
        for n in [0, 1, 2, 5] {
            let mut s = fx.sampler(cfg.clone());
            let first = take(&mut s, n);
            let json = serde_json::to_string(&s.state()).unwrap();
            drop(s);
            let mut s = fx.sampler(cfg.clone());
            s.restore(serde_json::from_str(&json).unwrap()).unwrap();
            let rest = take(&mut s, 9 - n);
            assert_eq!([first, rest].concat(), whole, "resumed after {n}");
        }
        let mut s = fx.sampler(cfg.clone());
        let mut other = s.state();
        other.seed += 1;
        assert!(s.restore(other).is_err());
    }

    #[test]
    fn noisy_items_are_mixed_at_the_drawn_snr() {
        let fx = fixture("snr");
        let raw = take(&mut fx.sampler(config(3, 0.0, false)), 8);
        let (mut noisy, mut clean) = (0, 0);
        for batch in &raw {
            let len = batch.samples;
            for (k, id) in batch.ids.iter().enumerate() {
                let start = batch.starts[k];
                let speech = &fx.clean(id)[start..start + len];
                let got = &batch.waves[k * len..(k + 1) * len];
                match batch.snr[k] {
                    None => {
                        clean += 1;
                        assert_eq!(batch.noise[k], None);
                        assert_eq!(got, speech);
                    }
                    Some(db) => {
                        noisy += 1;
                        assert!([0.0, 5.0, 20.0].contains(&db));
                        assert!(["white", "pink"].contains(&batch.noise[k].as_deref().unwrap()));
                        let n: Vec<f32> = got.iter().zip(speech).map(|(g, s)| g - s).collect();
                        let achieved = 10.0 * (mean_square(speech) / mean_square(&n)).log10();
                        assert!((achieved - db).abs() < 0.1, "{id}: {achieved} dB, drew {db}");
                    }
                }
            }
        }
        assert!(noisy > 0 && clean > 0, "{noisy} noisy, {clean} clean");
        // The normalised run draws the same noise.
        let norm = take(&mut fx.sampler(config(3, 0.0, true)), 8);
        for (r, n) in raw.iter().zip(&norm) {
            assert_eq!((&r.snr, &r.noise, &r.starts), (&n.snr, &n.noise, &n.starts));
            let mut want = r.waves[..r.samples].to_vec();
            wav::normalize(&mut want);
            assert_eq!(&n.waves[..n.samples], &want[..]);
        }
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let fx = fixture("errors");
        let new = |cfg: TrainDataConfig, ids: &[String], noise: &NoiseBank| {
            BatchSampler::new(&fx.utterances, &fx.cache, noise, &fx.model, cfg, ids)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        let cfg = config(0, 0.5, true);
        let err = new(cfg.clone(), &["nope".to_string()], &fx.noise);
        assert!(err.contains("nope"), "{err}");
        let err = new(cfg.clone(), &fx.ids[..2], &fx.noise);
        assert!(err.contains("batch"), "{err}");
        let err = new(cfg.clone(), &[&fx.ids[..3], &fx.ids[..1]].concat(), &fx.noise);
        assert!(err.contains("twice"), "{err}");
        let err = new(
            TrainDataConfig {
                crop_seconds: 0.003,
                ..cfg.clone()
            },
            &fx.ids,
            &fx.noise,
        );
        assert!(err.contains("shorter than one frame"), "{err}");
        let err = new(cfg.clone(), &fx.ids, &NoiseBank::default());
        assert!(err.contains("noise bank is empty"), "{err}");
        // All clean: no noise needed.
        assert_eq!(
            new(
                TrainDataConfig {
                    clean_fraction: 1.0,
                    ..cfg.clone()
                },
                &fx.ids,
                &NoiseBank::default()
            ),
            ""
        );
        let mut other = fx.model.clone();
        other.conv_stride[0] += 1;
        let err = BatchSampler::new(&fx.utterances, &fx.cache, &fx.noise, &other, cfg.clone(), &fx.ids)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("stride"), "{err}");
        // A file that no longer decodes is an error naming it.
        let bad = &fx.utterances[0].path;
        std::fs::write(bad, b"not a wav").unwrap();
        let mut s = fx.sampler(TrainDataConfig { batch: 8, ..cfg });
        let err = format!("{:#}", s.next_batch().unwrap_err());
        assert!(err.contains(&bad.display().to_string()), "{err}");
    }

    #[test]
    fn validation_split_holds_out_speakers_or_utterances() {
        let ids: Vec<String> = (0..20).map(|i| format!("u{i:02}")).collect();
        let speakers: Vec<String> = (0..20).map(|i| format!("s{}", i % 5)).collect();
        let (train, val) = split_validation(&ids, &speakers, 0.2, 1).unwrap();
        assert_eq!(
            split_validation(&ids, &speakers, 0.2, 1).unwrap(),
            (train.clone(), val.clone())
        );
        assert_eq!((train.len(), val.len()), (16, 4));
        let held: HashSet<&String> = val
            .iter()
            .map(|v| &speakers[ids.iter().position(|i| i == v).unwrap()])
            .collect();
        assert_eq!(held.len(), 1, "one whole speaker held out");
        for t in &train {
            assert!(!held.contains(&speakers[ids.iter().position(|i| i == t).unwrap()]));
        }
        // Other seeds hold out other speakers (5 choices).
        let picks: HashSet<Vec<String>> = (0..10)
            .map(|s| split_validation(&ids, &speakers, 0.2, s).unwrap().1)
            .collect();
        assert!(picks.len() > 1);
        // A tiny fraction still holds out one speaker, a huge one keeps one for training.
        assert_eq!(split_validation(&ids, &speakers, 0.01, 1).unwrap().1.len(), 4);
        assert_eq!(split_validation(&ids, &speakers, 0.99, 1).unwrap().0.len(), 4);
        // Two speakers: by utterance.
        let two: Vec<String> = (0..20).map(|i| format!("s{}", i % 2)).collect();
        let (train, val) = split_validation(&ids, &two, 0.25, 1).unwrap();
        assert_eq!((train.len(), val.len()), (15, 5));
        let mut all = [train, val].concat();
        all.sort();
        assert_eq!(all, ids);
        assert_eq!(split_validation(&ids, &two, 0.0, 1).unwrap(), (ids.clone(), vec![]));
        assert!(split_validation(&ids, &two, 1.0, 1).is_err());
        assert!(split_validation(&ids[..3], &two, 0.5, 1).is_err());
    }
}
