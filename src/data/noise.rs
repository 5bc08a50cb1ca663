//! Noise for training and evaluation: noise sources (WAV recordings, resampled to 16 kHz, and the
//! seeded generators `white`, `pink`, `brown`, `babble`, `car`, `cafe`, `hum`) and mixing at a target SNR.
//!
//! Mixing (the method's definition): `noisy = clean + n * sqrt(P_clean / (P_n * 10^(s/10)))` with
//! `P` the mean square over the utterance and `n` a segment of the noise as long as the utterance,
//! starting at a random offset. A noise at least as long as the utterance gives a segment inside it;
//! a shorter one is looped (the segment may start anywhere and wraps around).
//!
//! Silence: a noise segment is **silent** when its mean square is below [`SILENCE_POWER`] or more
//! than [`SILENT_SEGMENT_DB`] dB below the whole recording's; such a segment would be scaled up
//! to (or towards) infinity, so another offset is drawn (up to [`OFFSET_TRIES`] times, then one is
//! drawn uniformly among all non-silent offsets). A noise recording that is wholly silent is an
//! error. A silent utterance (mean square below [`SILENCE_POWER`]) has no power to set a noise level
//! by, so it is returned clean, with a warning.
//!
//! Cost per mix: one pass over the noise recording (its mean square, for the silence floor) plus a
//! few passes over the utterance.
//!
//! Every random choice comes from the caller's RNG (seed it, e.g. `StdRng::seed_from_u64`), so a
//! mix is reproducible.

use std::path::{Path, PathBuf};

use std::f64::consts::TAU;

use anyhow::{bail, Context as _, Result};
use rand::{Rng, SeedableRng};

use super::wav;

/// Sample rate of every noise source.
pub const NOISE_RATE: u32 = wav::TARGET_RATE;
/// Mean square below which a signal is silent: RMS 1e-5 (-100 dBFS), under one 16-bit step.
pub const SILENCE_POWER: f64 = 1e-10;
/// A noise segment this many dB below its recording's mean square counts as silent (a pause).
pub const SILENT_SEGMENT_DB: f64 = 50.0;
/// Random offsets tried before searching all offsets for a non-silent segment.
pub const OFFSET_TRIES: usize = 32;
/// Length of a generated noise, in seconds.
pub const GENERATED_SECONDS: usize = 60;
/// RMS level of generated noise (-20 dBFS).
pub const GENERATED_RMS: f64 = 0.1;
/// Names of the built-in generators: three coloured noises and four realistic types (see [`generate`]).
pub const GENERATORS: [&str; 7] = ["white", "pink", "brown", "babble", "car", "cafe", "hum"];

#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSource {
    /// Noise type.
    pub name: String,
    /// Mono, 16 kHz.
    pub samples: Vec<f32>,
}

#[derive(Clone, Debug, Default)]
pub struct NoiseBank {
    pub sources: Vec<NoiseSource>,
}

impl NoiseBank {
    /// Loads every WAV under `dirs` (searched recursively, sorted by path; a path may also name
    /// one WAV file) and the named `generators`. A file's noise type is its stem, or with
    /// `type_from_dir` the name of the folder that holds it. Generator `g` is seeded with
    /// `seed` and its name, so each is reproducible on its own. A wholly silent file, an empty
    /// folder, an unknown generator or no sources at all is an error.
    pub fn load(dirs: &[PathBuf], generators: &[String], type_from_dir: bool, seed: u64) -> Result<NoiseBank> {
        let mut sources = Vec::new();
        for dir in dirs {
            let files = if dir.is_file() {
                vec![dir.clone()]
            } else if dir.is_dir() {
                let mut files = Vec::new();
                walk_wavs(dir, 0, &mut files)?;
                files.sort();
                if files.is_empty() {
                    bail!("{}: no .wav noise files in this folder", dir.display());
                }
                files
            } else {
                bail!("{}: noise folder not found", dir.display());
            };
            for file in files {
                sources.push(load_file(&file, type_from_dir)?);
            }
        }
        for g in generators {
            sources.push(NoiseSource {
                name: g.clone(),
                samples: generate(g, GENERATED_SECONDS * NOISE_RATE as usize, seed)?,
            });
        }
        if sources.is_empty() {
            bail!(
                "no noise sources: give noise folders or generators ({})",
                GENERATORS.join(", ")
            );
        }
        Ok(NoiseBank { sources })
    }

    /// Sorted unique noise types.
    pub fn types(&self) -> Vec<String> {
        let set: std::collections::BTreeSet<&String> = self.sources.iter().map(|s| &s.name).collect();
        set.into_iter().cloned().collect()
    }

    /// The sources of one noise type.
    pub fn of_type(&self, name: &str) -> Vec<&NoiseSource> {
        self.sources.iter().filter(|s| s.name == name).collect()
    }
}

fn walk_wavs(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if depth > 16 {
        bail!("{}: folders nested too deep (a symlink loop?)", dir.display());
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list folder", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("{}: cannot list folder", dir.display()))?
            .path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        if path.is_dir() {
            walk_wavs(&path, depth + 1, out)?;
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav")) {
            out.push(path);
        }
    }
    Ok(())
}

fn load_file(file: &Path, type_from_dir: bool) -> Result<NoiseSource> {
    let samples = wav::load_16k(file)?;
    let power = mean_square(&samples);
    if power < SILENCE_POWER {
        bail!(
            "{}: the noise is silent (RMS {:.1e}); it cannot be scaled to an SNR",
            file.display(),
            power.sqrt()
        );
    }
    let name = if type_from_dir {
        file.parent()
            .and_then(|p| p.canonicalize().ok().or_else(|| Some(p.to_path_buf())))
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    } else {
        file.file_stem().map(|n| n.to_string_lossy().into_owned())
    };
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        bail!("{}: cannot name the noise type", file.display());
    };
    Ok(NoiseSource { name, samples })
}

/// Mean square in f64 (0 for an empty slice).
pub fn mean_square(x: &[f32]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64
}

// ---------------------------------------------------------------------------------------------
// Generators

/// `len` samples of a generated noise at [`GENERATED_RMS`], zero mean, seeded by `seed` and the name.
///
/// - `white` is Gaussian; `pink` is white through Paul Kellet's refined 7-pole filter (-3 dB/octave
///   within about 0.05 dB over all but the lowest 0.02% of the band); `brown` is white through a leaky
///   integrator `y = 0.998 y + w` (-6 dB/octave above about 5 Hz at 16 kHz).
/// - `babble`: overlapping speech, as real babble is: 8 independent synthetic talkers
///   ([`crate::data::synth`], a speaker population of its own, random emotions and texts, pauses of
///   0-0.4 s between utterances, random start offsets, levels +-3 dB), summed.
/// - `car`: an idling-to-cruising engine (firing frequency 2 x rpm / 60 for a four-stroke four-cylinder,
///   rpm drifting slowly between about 1500 and 2900, 8 harmonics falling as 1/k) plus road rumble (brown
///   noise through a 250 Hz low-pass) and faint tyre/wind hiss (pink, -30 dB): nearly all energy below 500 Hz.
/// - `cafe`: distant babble of 12 talkers (low-passed at 3 kHz: distance and absorption) plus clatter:
///   Poisson (2.5/s) impacts of cutlery and crockery, each a 1 ms click and three damped modes at 1.5-7 kHz
///   decaying in 10-60 ms, at random levels.
/// - `hum`: mains hum (50 Hz and 7 harmonics with a slow level wobble, as transformers and
///   ground loops make) plus a fan: broadband noise shaped by a 600 Hz resonance and a blade-pass tone
///   (about 170 Hz, 3 harmonics, slowly wandering).
pub fn generate(name: &str, len: usize, seed: u64) -> Result<Vec<f32>> {
    // FNV-1a of the name, so "pink" and "brown" with one seed are independent draws.
    let tag = name
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ tag);
    let mut gauss = move || gaussian(&mut rng);
    let mut y: Vec<f64> = match name {
        "white" => (0..len).map(|_| gauss()).collect(),
        "pink" => {
            let mut b = [0f64; 7];
            (0..len)
                .map(|_| {
                    let w = gauss();
                    b[0] = 0.99886 * b[0] + w * 0.0555179;
                    b[1] = 0.99332 * b[1] + w * 0.0750759;
                    b[2] = 0.96900 * b[2] + w * 0.1538520;
                    b[3] = 0.86650 * b[3] + w * 0.3104856;
                    b[4] = 0.55000 * b[4] + w * 0.5329522;
                    b[5] = -0.7616 * b[5] - w * 0.0168980;
                    let out = b[0] + b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + w * 0.5362;
                    b[6] = w * 0.115926;
                    out
                })
                .collect()
        }
        "brown" => {
            let mut acc = 0f64;
            (0..len)
                .map(|_| {
                    acc = 0.998 * acc + gauss();
                    acc
                })
                .collect()
        }
        "babble" => babble(len, 8, &mut rand::rngs::StdRng::seed_from_u64(seed ^ tag)),
        "car" => car(len, &mut rand::rngs::StdRng::seed_from_u64(seed ^ tag)),
        "cafe" => cafe(len, &mut rand::rngs::StdRng::seed_from_u64(seed ^ tag)),
        "hum" => hum(len, &mut rand::rngs::StdRng::seed_from_u64(seed ^ tag)),
        _ => bail!("unknown noise generator {name:?} (known: {})", GENERATORS.join(", ")),
    };
    if y.is_empty() {
        return Ok(Vec::new());
    }
    let n = y.len() as f64;
    let mean = y.iter().sum::<f64>() / n;
    y.iter_mut().for_each(|v| *v -= mean);
    let rms = (y.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
    let scale = if rms > 0.0 { GENERATED_RMS / rms } else { 0.0 };
    Ok(y.iter().map(|v| (v * scale) as f32).collect())
}

const FS: f64 = NOISE_RATE as f64;

/// `talkers` synthetic talkers, each a stream of utterances with pauses, at random offsets and levels.
fn babble(len: usize, talkers: usize, rng: &mut impl Rng) -> Vec<f64> {
    use super::synth::{utterance, Emotion, Speaker};
    let population: u64 = rng.gen();
    let mut out = vec![0f64; len];
    for k in 0..talkers {
        let speaker = Speaker::new(k, population);
        // Start up to 2 s into the talker's stream, so talkers do not start together.
        let skip = rng.gen_range(0..2 * NOISE_RATE as usize);
        let mut stream: Vec<f32> = Vec::with_capacity(len + skip);
        while stream.len() < len + skip {
            let e = Emotion::ALL[rng.gen_range(0..Emotion::ALL.len())];
            let text = rng.gen_range(0..10_000);
            stream.extend(utterance(&speaker, e, text, rng.gen_range(1.5..4.0), population));
            let pause = rng.gen_range(0..(0.4 * FS) as usize);
            stream.extend(std::iter::repeat_n(0.0, pause));
        }
        let seg = &stream[skip..skip + len];
        let rms = mean_square(seg).sqrt().max(1e-12);
        let gain = 10f64.powf(3.0 * (rng.gen::<f64>() * 2.0 - 1.0) / 20.0) / rms;
        for (o, &v) in out.iter_mut().zip(seg) {
            *o += gain * v as f64;
        }
    }
    out
}

/// A slow random drift in [-1, 1]: two sinusoids below 0.2 Hz with random phases.
fn drift(rng: &mut impl Rng) -> impl Fn(f64) -> f64 {
    let (f1, f2) = (rng.gen_range(0.03..0.08), rng.gen_range(0.1..0.2));
    let (p1, p2) = (rng.gen_range(0.0..TAU), rng.gen_range(0.0..TAU));
    move |t: f64| 0.6 * (TAU * f1 * t + p1).sin() + 0.4 * (TAU * f2 * t + p2).sin()
}

/// One-pole low-pass coefficient for cutoff `fc`.
fn one_pole(fc: f64) -> f64 {
    (-TAU * fc / FS).exp()
}

fn car(len: usize, rng: &mut impl Rng) -> Vec<f64> {
    let rpm = drift(rng);
    let mut phase = [0f64; 8];
    let a = one_pole(250.0);
    let (mut brown, mut lp1, mut lp2) = (0f64, 0f64, 0f64);
    let mut pink = [0f64; 3];
    (0..len)
        .map(|i| {
            let t = i as f64 / FS;
            let firing = 2.0 * (2200.0 + 700.0 * rpm(t)) / 60.0;
            let mut engine = 0.0;
            for (k, ph) in phase.iter_mut().enumerate() {
                *ph = (*ph + (k + 1) as f64 * firing / FS).fract();
                engine += (TAU * *ph).sin() / (k + 1) as f64;
            }
            brown = 0.998 * brown + gaussian(rng);
            lp1 = a * lp1 + (1.0 - a) * brown;
            lp2 = a * lp2 + (1.0 - a) * lp1;
            // A 3-pole pink approximation for the hiss.
            let w = gaussian(rng);
            pink[0] = 0.99765 * pink[0] + w * 0.0990460;
            pink[1] = 0.96300 * pink[1] + w * 0.2965164;
            pink[2] = 0.57000 * pink[2] + w * 1.0526913;
            let hiss = pink[0] + pink[1] + pink[2] + w * 0.1848;
            // Levels: rumble ~ engine, hiss 30 dB below.
            0.5 * engine + 0.12 * lp2 + 0.004 * hiss
        })
        .collect()
}

fn cafe(len: usize, rng: &mut impl Rng) -> Vec<f64> {
    let mut y = babble(len, 12, rng);
    // Distance: two one-pole low-passes at 3 kHz.
    let a = one_pole(3000.0);
    let (mut s1, mut s2) = (0f64, 0f64);
    for v in y.iter_mut() {
        s1 = a * s1 + (1.0 - a) * *v;
        s2 = a * s2 + (1.0 - a) * s1;
        *v = s2;
    }
    let rms = (y.iter().map(|v| v * v).sum::<f64>() / len.max(1) as f64)
        .sqrt()
        .max(1e-12);
    y.iter_mut().for_each(|v| *v /= rms);
    // Clatter: Poisson impacts (exponential gaps, 2.5 per second).
    let mut t = 0usize;
    loop {
        t += (-(1.0 - rng.gen::<f64>()).ln() / 2.5 * FS) as usize;
        if t >= len {
            break;
        }
        let amp = 10f64.powf(rng.gen_range(0.0..12.0) / 20.0);
        let modes: Vec<(f64, f64, f64)> = (0..3)
            .map(|_| {
                (
                    rng.gen_range(1500.0..7000.0),
                    rng.gen_range(0.010..0.060),
                    rng.gen_range(0.0..TAU),
                )
            })
            .collect();
        let n = ((0.3 * FS) as usize).min(len - t);
        for j in 0..n {
            let tt = j as f64 / FS;
            let mut v: f64 = modes
                .iter()
                .map(|(f, tau, p)| (-tt / tau).exp() * (TAU * f * tt + p).sin())
                .sum();
            if j < FS as usize / 1000 {
                v += gaussian(rng);
            }
            y[t + j] += amp * v;
        }
    }
    y
}

fn hum(len: usize, rng: &mut impl Rng) -> Vec<f64> {
    let wobble = drift(rng);
    let wander = drift(rng);
    let mains_phase: Vec<f64> = (0..8).map(|_| rng.gen_range(0.0..TAU)).collect();
    let blade = rng.gen_range(150.0..190.0);
    let mut blade_phase = 0f64;
    let mut fan = [0f64; 2];
    let (c, b) = {
        // Resonator at 600 Hz, 800 Hz bandwidth.
        let (f, bw) = (600.0, 800.0);
        (
            -(-TAU * bw / FS).exp(),
            2.0 * (-std::f64::consts::PI * bw / FS).exp() * (TAU * f / FS).cos(),
        )
    };
    (0..len)
        .map(|i| {
            let t = i as f64 / FS;
            let level = 1.0 + 0.1 * wobble(t);
            let mains: f64 = (0..8)
                .map(|k| {
                    // Odd harmonics stronger (transformer saturation), falling with order.
                    let a = if k % 2 == 0 { 1.0 } else { 0.5 } / (1.0 + k as f64);
                    a * (TAU * 50.0 * (k + 1) as f64 * t + mains_phase[k]).sin()
                })
                .sum();
            blade_phase = (blade_phase + blade * (1.0 + 0.02 * wander(t)) / FS).fract();
            let tone: f64 = (1..=3).map(|h| (TAU * h as f64 * blade_phase).sin() / h as f64).sum();
            let w = gaussian(rng);
            let y = (1.0 - b - c) * w + b * fan[0] + c * fan[1];
            fan[1] = fan[0];
            fan[0] = y;
            level * mains + 0.15 * tone + 0.6 * y
        })
        .collect()
}

/// Standard normal draw (Box-Muller).
fn gaussian(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1], so ln is finite
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

// ---------------------------------------------------------------------------------------------
// Mixing

/// One mix and how it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct Mix {
    pub samples: Vec<f32>,
    /// Where the noise segment starts in the noise source.
    pub offset: usize,
    /// The factor the noise segment was scaled by (0 for silent speech).
    pub gain: f64,
    /// The utterance was silent, so it was returned clean.
    pub silent_speech: bool,
}

/// Mixes `noise` into `clean` at `snr_db` (see the module docs); a silent utterance is returned
/// clean with a warning on stderr.
pub fn mix_at_snr(clean: &[f32], noise: &NoiseSource, snr_db: f64, rng: &mut impl Rng) -> Result<Vec<f32>> {
    let mix = mix_at_snr_detail(clean, noise, snr_db, rng)?;
    if mix.silent_speech {
        eprintln!(
            "warning: silent utterance ({} samples, RMS below {:.0e}) left clean instead of \
             mixing {} noise at {snr_db} dB",
            clean.len(),
            SILENCE_POWER.sqrt(),
            noise.name
        );
    }
    Ok(mix.samples)
}

/// As [`mix_at_snr`], saying where the segment came from and whether the speech was silent
/// (printing nothing).
pub fn mix_at_snr_detail(clean: &[f32], noise: &NoiseSource, snr_db: f64, rng: &mut impl Rng) -> Result<Mix> {
    if !snr_db.is_finite() {
        bail!("SNR must be a finite number of dB, got {snr_db}");
    }
    if clean.is_empty() {
        bail!("cannot mix noise into an empty utterance");
    }
    if let Some(i) = clean.iter().position(|v| !v.is_finite()) {
        bail!("utterance sample {i} is {}; cannot mix", clean[i]);
    }
    let nn = noise.samples.len();
    if nn == 0 {
        bail!("noise {:?} has no samples", noise.name);
    }
    let p_clean = mean_square(clean);
    if p_clean < SILENCE_POWER {
        return Ok(Mix {
            samples: clean.to_vec(),
            offset: 0,
            gain: 0.0,
            silent_speech: true,
        });
    }
    let len = clean.len();
    let p_file = mean_square(&noise.samples);
    if p_file < SILENCE_POWER {
        bail!(
            "noise {:?} is silent (RMS {:.1e}); it cannot be scaled to an SNR",
            noise.name,
            p_file.sqrt()
        );
    }
    let floor = SILENCE_POWER.max(p_file * 10f64.powf(-SILENT_SEGMENT_DB / 10.0));
    // Offsets: inside the noise when it is long enough, anywhere (looping) when it is shorter.
    let n_offsets = if nn >= len { nn - len + 1 } else { nn };
    let power_at = |off: usize| segment_energy(&noise.samples, off, len) / len as f64;
    let mut chosen = None;
    for _ in 0..OFFSET_TRIES {
        let off = rng.gen_range(0..n_offsets);
        let p = power_at(off);
        if p >= floor {
            chosen = Some((off, p));
            break;
        }
    }
    let (offset, p_noise) = match chosen {
        Some(c) => c,
        None => {
            // Mostly silent noise: list every usable offset (prefix sums make each O(1)).
            let energies = all_segment_energies(&noise.samples, len, n_offsets);
            let ok: Vec<usize> = (0..n_offsets).filter(|&o| energies[o] / len as f64 >= floor).collect();
            if ok.is_empty() {
                bail!(
                    "noise {:?}: every {len}-sample segment is silent (more than {SILENT_SEGMENT_DB} dB \
                     below the recording's level)",
                    noise.name
                );
            }
            let off = ok[rng.gen_range(0..ok.len())];
            (off, power_at(off))
        }
    };
    let gain = (p_clean / (p_noise * 10f64.powf(snr_db / 10.0))).sqrt();
    let samples = clean
        .iter()
        .enumerate()
        .map(|(i, &c)| (c as f64 + gain * noise.samples[(offset + i) % nn] as f64) as f32)
        .collect();
    Ok(Mix {
        samples,
        offset,
        gain,
        silent_speech: false,
    })
}

/// Sum of squares of the `len`-sample segment starting at `off`, looping.
fn segment_energy(noise: &[f32], off: usize, len: usize) -> f64 {
    let nn = noise.len();
    (0..len)
        .map(|i| {
            let v = noise[(off + i) % nn] as f64;
            v * v
        })
        .sum()
}

/// [`segment_energy`] for offsets `0..n_offsets`, from prefix sums of squares.
fn all_segment_energies(noise: &[f32], len: usize, n_offsets: usize) -> Vec<f64> {
    let nn = noise.len();
    let mut prefix = Vec::with_capacity(nn + 1);
    prefix.push(0f64);
    for &v in noise {
        prefix.push(prefix.last().unwrap() + v as f64 * v as f64);
    }
    let total = prefix[nn];
    // Energy of noise[a..a+k] for a + k <= 2 nn, wrapping once.
    let range = |a: usize, k: usize| -> f64 {
        if a + k <= nn {
            prefix[a + k] - prefix[a]
        } else {
            (total - prefix[a]) + prefix[a + k - nn]
        }
    };
    let (laps, rest) = (len / nn, len % nn);
    (0..n_offsets).map(|o| laps as f64 * total + range(o, rest)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;

    fn snr_of(clean: &[f32], noisy: &[f32]) -> f64 {
        let pn = clean
            .iter()
            .zip(noisy)
            .map(|(&c, &y)| {
                let d = y as f64 - c as f64;
                d * d
            })
            .sum::<f64>()
            / clean.len() as f64;
        10.0 * (mean_square(clean) / pn).log10()
    }

    /// A speech-like test signal: a tone with a syllable-rate envelope.
    fn speech(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len)
            .map(|i| {
                let t = i as f64 / 16000.0;
                let env = 0.5 + 0.5 * (std::f64::consts::TAU * 4.0 * t).sin();
                (0.2 * env * (std::f64::consts::TAU * 220.0 * t).sin() + 0.01 * gaussian(&mut rng)) as f32
            })
            .collect()
    }

    fn src(name: &str, samples: Vec<f32>) -> NoiseSource {
        NoiseSource {
            name: name.into(),
            samples,
        }
    }

    #[test]
    fn achieved_snr_is_the_target() {
        let clean = speech(16000 * 2 + 37, 1);
        let noise = src("pink", generate("pink", 16000 * 5, 7).unwrap());
        let mut rng = StdRng::seed_from_u64(42);
        for snr in [-5.0, 0.0, 10.0, 20.0] {
            for _ in 0..5 {
                let y = mix_at_snr(&clean, &noise, snr, &mut rng).unwrap();
                assert_eq!(y.len(), clean.len());
                let got = snr_of(&clean, &y);
                eprintln!("target {snr:>5.1} dB: achieved {got:.6} dB");
                assert!((got - snr).abs() < 0.1, "target {snr}, got {got}");
                // f32 rounding is all that separates them.
                assert!((got - snr).abs() < 1e-4, "target {snr}, got {got}");
            }
        }
    }

    #[test]
    fn mixing_is_reproducible_with_a_seed() {
        let clean = speech(8000, 2);
        let noise = src("white", generate("white", 48000, 3).unwrap());
        let a = mix_at_snr(&clean, &noise, 5.0, &mut StdRng::seed_from_u64(9)).unwrap();
        let b = mix_at_snr(&clean, &noise, 5.0, &mut StdRng::seed_from_u64(9)).unwrap();
        let c = mix_at_snr(&clean, &noise, 5.0, &mut StdRng::seed_from_u64(10)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(generate("pink", 1000, 5).unwrap(), generate("pink", 1000, 5).unwrap());
        assert_ne!(generate("pink", 1000, 5).unwrap(), generate("pink", 1000, 6).unwrap());
        assert_ne!(generate("white", 1000, 5).unwrap(), generate("pink", 1000, 5).unwrap());
        let b1 = NoiseBank::load(&[], &["brown".into(), "white".into()], false, 3).unwrap();
        let b2 = NoiseBank::load(&[], &["brown".into(), "white".into()], false, 3).unwrap();
        assert_eq!(b1.sources, b2.sources);
        assert_eq!(b1.types(), ["brown", "white"]);
        assert_eq!(b1.sources[0].samples.len(), 60 * 16000);
    }

    #[test]
    fn short_noise_is_looped() {
        let clean = speech(5000, 3);
        let noise = src("short", generate("white", 1000, 4).unwrap());
        let mut rng = StdRng::seed_from_u64(1);
        let mut offsets = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let m = mix_at_snr_detail(&clean, &noise, 0.0, &mut rng).unwrap();
            assert!(m.offset < 1000);
            offsets.insert(m.offset);
            for (i, (&y, &c)) in m.samples.iter().zip(&clean).enumerate() {
                let want = c as f64 + m.gain * noise.samples[(m.offset + i) % 1000] as f64;
                assert!((y as f64 - want).abs() < 1e-6, "sample {i}");
            }
            assert!((snr_of(&clean, &m.samples) - 0.0).abs() < 1e-4);
        }
        assert!(offsets.len() > 10, "offsets should vary: {offsets:?}");
        // A long noise: the segment lies inside it.
        let long = src("long", generate("white", 6000, 4).unwrap());
        for _ in 0..50 {
            let m = mix_at_snr_detail(&clean, &long, 0.0, &mut rng).unwrap();
            assert!(m.offset + 5000 <= 6000, "{}", m.offset);
        }
    }

    #[test]
    fn silent_noise_segments_are_never_used() {
        // 0.1 s of noise, then 3 s of digital silence.
        let mut samples = generate("white", 1600, 5).unwrap();
        samples.extend(std::iter::repeat_n(0.0, 48000));
        let noise = src("gappy", samples.clone());
        let clean = speech(8000, 4);
        let p_file = mean_square(&samples);
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let m = mix_at_snr_detail(&clean, &noise, 10.0, &mut rng).unwrap();
            let seg = segment_energy(&samples, m.offset, 8000) / 8000.0;
            assert!(seg >= p_file * 1e-5, "offset {} gives a silent segment", m.offset);
            assert!(m.offset < 1600);
            assert!((snr_of(&clean, &m.samples) - 10.0).abs() < 1e-4);
        }
        // Looping a mostly silent short noise.
        let mut short = vec![0.0f32; 900];
        short[450] = 0.5;
        let noise = src("click", short);
        let m = mix_at_snr_detail(&clean, &noise, 0.0, &mut rng).unwrap();
        assert!((snr_of(&clean, &m.samples)).abs() < 1e-4);
    }

    #[test]
    fn silent_noise_is_an_error_and_silent_speech_stays_clean() {
        let clean = speech(4000, 5);
        let silent = src("silence", vec![0.0; 16000]);
        let err = format!(
            "{:#}",
            mix_at_snr(&clean, &silent, 0.0, &mut StdRng::seed_from_u64(0)).unwrap_err()
        );
        assert!(err.contains("silent"), "{err}");
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-noise-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("hush.wav");
        wav::write_wav_i16(&p, &[0.0; 8000], 8000).unwrap();
        let err = format!(
            "{:#}",
            NoiseBank::load(std::slice::from_ref(&dir), &[], false, 0).unwrap_err()
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("hush.wav") && err.contains("silent"), "{err}");

        let noise = src("white", generate("white", 16000, 1).unwrap());
        let quiet = vec![0.0f32; 4000];
        let m = mix_at_snr_detail(&quiet, &noise, 0.0, &mut StdRng::seed_from_u64(0)).unwrap();
        assert!(m.silent_speech);
        assert_eq!(m.samples, quiet);
        // The plain call warns on stderr and returns the clean signal too.
        assert_eq!(
            mix_at_snr(&quiet, &noise, 0.0, &mut StdRng::seed_from_u64(0)).unwrap(),
            quiet
        );

        let mut rng = StdRng::seed_from_u64(0);
        assert!(mix_at_snr(&[], &noise, 0.0, &mut rng).is_err());
        assert!(mix_at_snr(&clean, &noise, f64::NAN, &mut rng).is_err());
        assert!(mix_at_snr(&clean, &src("empty", vec![]), 0.0, &mut rng).is_err());
        assert!(generate("purple", 10, 0).is_err());
        assert!(NoiseBank::load(&[], &[], false, 0).is_err());
        assert!(NoiseBank::load(&[PathBuf::from("/nonexistent/noise")], &[], false, 0).is_err());
    }

    // -------- spectra, for the generators' slopes

    /// In-place radix-2 FFT (length a power of two).
    fn fft(re: &mut [f64], im: &mut [f64]) {
        let n = re.len();
        let mut j = 0;
        for i in 1..n {
            let mut bit = n >> 1;
            while j & bit != 0 {
                j ^= bit;
                bit >>= 1;
            }
            j |= bit;
            if i < j {
                re.swap(i, j);
                im.swap(i, j);
            }
        }
        let mut size = 2;
        while size <= n {
            let ang = -std::f64::consts::TAU / size as f64;
            for start in (0..n).step_by(size) {
                for k in 0..size / 2 {
                    let (s, c) = (ang * k as f64).sin_cos();
                    let (a, b) = (start + k, start + k + size / 2);
                    let tr = re[b] * c - im[b] * s;
                    let ti = re[b] * s + im[b] * c;
                    re[b] = re[a] - tr;
                    im[b] = im[a] - ti;
                    re[a] += tr;
                    im[a] += ti;
                }
            }
            size <<= 1;
        }
    }

    /// Welch PSD (Hann, 4096 points, half overlap), per bin of 16000/4096 Hz.
    fn psd(x: &[f32]) -> Vec<f64> {
        let n = 4096;
        let win: Vec<f64> = (0..n)
            .map(|i| 0.5 - 0.5 * (std::f64::consts::TAU * i as f64 / n as f64).cos())
            .collect();
        let mut acc = vec![0f64; n / 2];
        let mut count = 0;
        let mut start = 0;
        while start + n <= x.len() {
            let mut re: Vec<f64> = (0..n).map(|i| x[start + i] as f64 * win[i]).collect();
            let mut im = vec![0f64; n];
            fft(&mut re, &mut im);
            for k in 0..n / 2 {
                acc[k] += re[k] * re[k] + im[k] * im[k];
            }
            count += 1;
            start += n / 2;
        }
        acc.iter().map(|v| v / count as f64).collect()
    }

    /// Least-squares slope of the mean PSD per octave band (125-250 ... 2-4 kHz), in dB/octave.
    fn octave_slope(x: &[f32]) -> f64 {
        let p = psd(x);
        let hz = 16000.0 / 4096.0;
        let bands: Vec<f64> = (0..5)
            .map(|b| {
                let lo = 125.0 * 2f64.powi(b);
                let (k0, k1) = ((lo / hz).ceil() as usize, ((2.0 * lo) / hz).floor() as usize);
                let mean = p[k0..k1].iter().sum::<f64>() / (k1 - k0) as f64;
                10.0 * mean.log10()
            })
            .collect();
        let xm = 2.0;
        let ym = bands.iter().sum::<f64>() / 5.0;
        let num: f64 = bands.iter().enumerate().map(|(i, y)| (i as f64 - xm) * (y - ym)).sum();
        num / 10.0
    }

    #[test]
    fn generator_spectral_slopes() {
        for (name, want) in [("white", 0.0), ("pink", -3.0), ("brown", -6.0)] {
            let x = generate(name, 16000 * 20, 11).unwrap();
            let rms = mean_square(&x).sqrt();
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
            let slope = octave_slope(&x);
            eprintln!("{name:>5}: {slope:+.2} dB/octave (want {want:+.0}), RMS {rms:.4}, mean {mean:.1e}");
            assert!((slope - want).abs() < 0.5, "{name}: slope {slope}");
            assert!((rms - GENERATED_RMS).abs() < 1e-4);
            assert!(mean.abs() < 1e-6);
        }
    }

    /// Fraction of the long-term power between `lo` and `hi` Hz, and the frequency of the spectral peak.
    fn band_fraction(x: &[f32], lo: f64, hi: f64) -> (f64, f64) {
        let p = crate::data::mel::average_spectrum(x, 1024);
        let hz = 16000.0 / 1024.0;
        let total: f64 = p.iter().sum();
        let band: f64 = p
            .iter()
            .enumerate()
            .filter(|(k, _)| (lo..hi).contains(&(*k as f64 * hz)))
            .map(|(_, v)| v)
            .sum();
        let peak = (1..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
        (band / total, peak as f64 * hz)
    }

    /// Envelope modulation: power of the 20 ms log-energy series at 2-8 Hz (syllable rates) over
    /// 16-22 Hz, per Hz, from its averaged spectrum (4 s segments).
    fn syllable_modulation(x: &[f32]) -> f64 {
        let env: Vec<f32> = x
            .chunks_exact(320)
            .map(|c| (10.0 * (mean_square(c) + 1e-12).log10()) as f32)
            .collect();
        let mean = env.iter().sum::<f32>() / env.len() as f32;
        let env: Vec<f32> = env.iter().map(|v| v - mean).collect();
        let p = crate::data::mel::average_spectrum(&env, 256); // 50 Hz frame rate: 0.195 Hz bins
        let hz = 50.0 / 256.0;
        let band = |lo: f64, hi: f64| {
            let k: Vec<f64> = (0..p.len())
                .filter(|&k| (lo..hi).contains(&(k as f64 * hz)))
                .map(|k| p[k])
                .collect();
            k.iter().sum::<f64>() / k.len() as f64
        };
        band(2.0, 8.0) / band(16.0, 22.0)
    }

    #[test]
    fn realistic_generators_have_their_spectral_character() {
        let t0 = std::time::Instant::now();
        let len = 16000 * 10;
        let gen = |name: &str| {
            let x = generate(name, len, 3).unwrap();
            assert_eq!(x.len(), len);
            assert!((mean_square(&x).sqrt() - GENERATED_RMS).abs() < 1e-4, "{name}");
            assert_eq!(x, generate(name, len, 3).unwrap(), "{name} is not reproducible");
            x
        };
        let white = gen("white");
        let babble = gen("babble");
        let car = gen("car");
        let cafe = gen("cafe");
        let hum = gen("hum");
        eprintln!("generated 4 x 10 s in {:.2} s", t0.elapsed().as_secs_f64());

        // Babble: speech band, syllable-rate envelope fluctuation (white noise has a flat one).
        let (speech, peak) = band_fraction(&babble, 100.0, 4000.0);
        let (m_babble, m_white) = (syllable_modulation(&babble), syllable_modulation(&white));
        eprintln!("babble: {:.1}% in 100-4000 Hz, peak {peak:.0} Hz, modulation 2-8/16-22 Hz {m_babble:.1} (white {m_white:.1})", 100.0 * speech);
        assert!(speech > 0.9 && (80.0..1000.0).contains(&peak));
        assert!(m_babble > 3.0 && m_white < 2.0);

        // Car: nearly all energy below 500 Hz, the engine's firing frequency near 50-100 Hz.
        let (low, peak) = band_fraction(&car, 0.0, 500.0);
        eprintln!("car: {:.1}% below 500 Hz, peak {peak:.0} Hz", 100.0 * low);
        assert!(low > 0.95 && peak < 200.0);

        // Cafe: speech band plus clatter: 10 ms high-band (> 2 kHz, by first differences) energy peaks far
        // above its median, unlike babble's.
        let peakiness = |x: &[f32]| {
            let d: Vec<f32> = x.windows(3).map(|w| w[2] - 2.0 * w[1] + w[0]).collect();
            let mut e: Vec<f64> = d.chunks_exact(160).map(mean_square).collect();
            e.sort_by(f64::total_cmp);
            10.0 * (e[e.len() - 1 - e.len() / 200] / e[e.len() / 2]).log10()
        };
        let (speech, _) = band_fraction(&cafe, 100.0, 4000.0);
        let (p_cafe, p_babble) = (peakiness(&cafe), peakiness(&babble));
        eprintln!("cafe: {:.1}% in 100-4000 Hz, high-band 99.5th percentile {p_cafe:.1} dB over median (babble {p_babble:.1})", 100.0 * speech);
        assert!(speech > 0.5 && p_cafe > 20.0 && p_cafe > p_babble + 6.0);

        // Hum: lines at 50 Hz and 100 Hz, 20 dB above the spectrum between them.
        let p = crate::data::mel::average_spectrum(&hum, 8192);
        let at = |f: f64| p[(f * 8192.0 / 16000.0).round() as usize];
        let (l50, l100, gap) = (at(50.0), at(100.0), at(75.0));
        eprintln!(
            "hum: 50 Hz {:+.1} dB, 100 Hz {:+.1} dB re 75 Hz",
            10.0 * (l50 / gap).log10(),
            10.0 * (l100 / gap).log10()
        );
        assert!(l50 > 100.0 * gap && l100 > 100.0 * gap);
        let (_, peak) = band_fraction(&hum, 0.0, 8000.0);
        assert!(peak < 120.0, "hum peak {peak}");
    }

    #[test]
    fn real_noises_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/noise");
        if !dir.is_dir() {
            eprintln!("SKIPPED: {} is absent (the shared development data)", dir.display());
            return;
        }
        let bank = NoiseBank::load(std::slice::from_ref(&dir), &["pink".into()], false, 0).unwrap();
        assert_eq!(
            bank.types(),
            [
                "babble",
                "buccaneer1",
                "doing_the_dishes",
                "machinegun",
                "music",
                "pink",
                "running_tap",
                "volvo",
                "white"
            ]
        );
        let clean = speech(32000, 6);
        let mut rng = StdRng::seed_from_u64(8);
        for s in &bank.sources {
            let secs = s.samples.len() as f64 / 16000.0;
            let p = mean_square(&s.samples);
            // How much of the recording is near-silent, in 2 s windows.
            let win = 32000;
            let n_off = s.samples.len().saturating_sub(win) + 1;
            let energies = all_segment_energies(&s.samples, win, n_off);
            let quietest = energies.iter().step_by(160).fold(f64::INFINITY, |m, &e| m.min(e)) / win as f64;
            eprintln!(
                "{:>17}: {secs:7.2} s, RMS {:.4}, quietest 2 s window {:+.1} dB re file",
                s.name,
                p.sqrt(),
                10.0 * (quietest / p).log10()
            );
            let want = match s.name.as_str() {
                "machinegun" | "doing_the_dishes" | "running_tap" | "pink" => 60.0,
                "babble" => 17.72,
                "white" => 15.20,
                "music" => 14.78,
                _ => 20.0,
            };
            assert!((secs - want).abs() < 0.01, "{}: {secs} s", s.name);
            for snr in [0.0, 10.0] {
                let y = mix_at_snr(&clean, s, snr, &mut rng).unwrap();
                assert!((snr_of(&clean, &y) - snr).abs() < 0.1);
            }
        }
        let mg = &bank.of_type("machinegun")[0].samples;
        // 8-bit unsigned decodes centred on 0.
        let mean = mg.iter().map(|&v| v as f64).sum::<f64>() / mg.len() as f64;
        assert!(mean.abs() < 0.01, "machinegun mean {mean}");

        // Noise type from the folder: every file is of type "noise".
        let bank = NoiseBank::load(&[dir], &[], true, 0).unwrap();
        assert_eq!(bank.types(), ["noise"]);
        assert_eq!(bank.sources.len(), 8);
    }
}
