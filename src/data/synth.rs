//! Synthetic emotional speech: a seeded source-filter voice with emotion-like prosody, for the demo (no
//! downloads) and for tests.
//!
//! # The voice
//! - **Source**: a Rosenberg glottal pulse train (its derivative, i.e. with lip radiation), period by period,
//!   with jitter (random period perturbation) and shimmer (random amplitude perturbation); the open quotient
//!   sets the voice quality (small = tense: sharp closure, more high-frequency energy; large = lax: steeper
//!   spectral tilt), and aspiration noise gated by the open phase makes it breathy.
//! - **Filter**: four Klatt resonators in cascade (the formants F1..F4 of five vowels, scaled by the speaker's
//!   vocal-tract length), their frequencies smoothed over ~12 ms so consonant-vowel transitions glide.
//! - **Syllables**: an optional consonant onset (a plosive: closure then a noise burst; a fricative: band-pass
//!   noise at 2.5-6 kHz; a nasal: weak low voiced murmur) and a vowel, with raised-cosine on/off ramps.
//!   The syllable sequence is fixed by the *text* (as EmoDB's ten sentences are spoken in every emotion), so
//!   classes cannot be told apart by content.
//!
//! # Prosody per emotion ([`Emotion::prosody`])
//! Pitch level and range (a declining phrase contour with accents on stressed syllables), tempo (syllables per
//! second), loudness and its syllable-to-syllable variability, voice quality (open quotient, breathiness,
//! jitter). The values follow the direction of the acoustic literature on vocal emotion (e.g. Banse & Scherer
//! 1996; Juslin & Laukka 2003): anger and happiness are high, wide, fast and loud (anger tense, happiness
//! widest in pitch), sadness low, narrow, slow, soft and breathy. Anger and happiness overlap on purpose, as
//! they do in real corpora. Every value varies per speaker (base pitch, vocal-tract length, speaking rate,
//! breathiness, loudness) and per utterance (random spread), so the classes are separable but not trivially.
//!
//! Everything random comes from `StdRng`s seeded by hashes of (seed, speaker, emotion, text), so an utterance
//! is a pure function of its arguments: the same seed gives identical bytes, on any machine.

use std::f64::consts::{PI, TAU};
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::wav;

/// Sample rate of the generated audio.
pub const RATE: u32 = wav::TARGET_RATE;
const FS: f64 = RATE as f64;

/// The four demo emotions (EmoDB's letters), a fair 4-class task like IEMOCAP's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Emotion {
    Anger,
    Happiness,
    Sadness,
    Neutral,
}

/// Prosody and voice quality of one emotion (class means; utterances spread around them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prosody {
    /// Multiplies the speaker's base pitch.
    pub pitch: f64,
    /// Pitch range in semitones (declination span and accent height).
    pub range_st: f64,
    /// Syllables per second (times the speaker's rate).
    pub rate: f64,
    /// Loudness re neutral, dB.
    pub level_db: f64,
    /// Standard deviation of syllable loudness, dB.
    pub level_var_db: f64,
    /// Glottal open quotient (0.4 tense .. 0.8 lax).
    pub open_quotient: f64,
    /// Aspiration noise relative to the voiced source.
    pub breath: f64,
    /// Period-to-period pitch perturbation (relative standard deviation).
    pub jitter: f64,
    /// Period-to-period amplitude perturbation (relative standard deviation).
    pub shimmer: f64,
    /// Formant frequency factor (a spread, smiling or raised vocal tract lifts formants).
    pub formant: f64,
}

impl Emotion {
    pub const ALL: [Emotion; 4] = [Emotion::Anger, Emotion::Happiness, Emotion::Sadness, Emotion::Neutral];

    /// The EmoDB emotion letter (letter 6 of a file name).
    pub fn letter(self) -> char {
        match self {
            Emotion::Anger => 'W',
            Emotion::Happiness => 'F',
            Emotion::Sadness => 'T',
            Emotion::Neutral => 'N',
        }
    }

    /// The label `Dataset::open` gives the letter.
    pub fn label(self) -> &'static str {
        match self {
            Emotion::Anger => "anger",
            Emotion::Happiness => "happiness",
            Emotion::Sadness => "sadness",
            Emotion::Neutral => "neutral",
        }
    }

    pub fn prosody(self) -> Prosody {
        let neutral = Prosody {
            pitch: 1.0,
            range_st: 3.0,
            rate: 4.5,
            level_db: 0.0,
            level_var_db: 2.0,
            open_quotient: 0.6,
            breath: 0.06,
            jitter: 0.008,
            shimmer: 0.04,
            formant: 1.0,
        };
        match self {
            Emotion::Neutral => neutral,
            Emotion::Anger => Prosody {
                pitch: 1.3,
                range_st: 5.5,
                rate: 5.2,
                level_db: 7.0,
                level_var_db: 3.5,
                open_quotient: 0.45,
                breath: 0.03,
                jitter: 0.012,
                shimmer: 0.06,
                formant: 1.05,
            },
            Emotion::Happiness => Prosody {
                pitch: 1.4,
                range_st: 7.5,
                rate: 4.9,
                level_db: 4.0,
                level_var_db: 3.0,
                open_quotient: 0.55,
                breath: 0.06,
                jitter: 0.008,
                shimmer: 0.04,
                formant: 1.04,
            },
            Emotion::Sadness => Prosody {
                pitch: 0.9,
                range_st: 1.5,
                rate: 3.4,
                level_db: -6.0,
                level_var_db: 1.2,
                open_quotient: 0.75,
                breath: 0.22,
                jitter: 0.015,
                shimmer: 0.07,
                formant: 0.98,
            },
        }
    }
}

/// One synthetic talker.
#[derive(Clone, Debug, PartialEq)]
pub struct Speaker {
    pub index: usize,
    pub female: bool,
    /// Base pitch, Hz.
    pub f0: f64,
    /// Formant scale (shorter vocal tract: higher).
    pub formant_scale: f64,
    /// Speaking-rate factor.
    pub rate: f64,
    /// Added breathiness.
    pub breath: f64,
    /// Loudness offset, dB.
    pub level_db: f64,
}

impl Speaker {
    /// Speaker `index` of the population seeded by `seed`: even indices male, odd female.
    pub fn new(index: usize, seed: u64) -> Speaker {
        let mut rng = rng_for(seed, &[1, index as u64]);
        let female = index % 2 == 1;
        let (f0, formant_scale) = if female {
            (rng.gen_range(175.0..235.0), rng.gen_range(1.10..1.22))
        } else {
            (rng.gen_range(95.0..135.0), rng.gen_range(0.92..1.04))
        };
        Speaker {
            index,
            female,
            f0,
            formant_scale,
            rate: rng.gen_range(0.87..1.13),
            breath: rng.gen_range(0.0..0.08),
            level_db: rng.gen_range(-2.0..2.0),
        }
    }
}

/// An `StdRng` seeded by a hash of `seed` and `parts`, so every stream is independent.
fn rng_for(seed: u64, parts: &[u64]) -> StdRng {
    use crate::seed::{splitmix64, GOLDEN};
    let mut h = seed ^ GOLDEN;
    for &p in parts {
        // SplitMix64 over the running hash, each part mixed in first.
        h = splitmix64(h.wrapping_add(p.wrapping_mul(0xbf58_476d_1ce4_e5b9)));
    }
    StdRng::seed_from_u64(h)
}

/// Standard normal draw (Box-Muller).
pub(crate) fn gauss(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// Vowel formants F1..F4 (Hz, adult male; Peterson & Barney-like) and bandwidths.
const VOWELS: [[f64; 4]; 5] = [
    [730.0, 1090.0, 2440.0, 3400.0], // a
    [530.0, 1840.0, 2480.0, 3500.0], // e
    [290.0, 2250.0, 3000.0, 3700.0], // i
    [570.0, 850.0, 2410.0, 3300.0],  // o
    [320.0, 900.0, 2250.0, 3300.0],  // u
];
const BANDWIDTHS: [f64; 4] = [80.0, 100.0, 140.0, 200.0];
const NASAL: [f64; 4] = [260.0, 1100.0, 2400.0, 3300.0];

#[derive(Clone, Copy, Debug)]
enum Onset {
    None,
    /// Closure then a noise burst centred here (Hz).
    Plosive(f64),
    /// Band-pass noise centred here (Hz).
    Fricative(f64),
    Nasal,
}

#[derive(Clone, Copy, Debug)]
struct Syllable {
    onset: Onset,
    vowel: usize,
    stressed: bool,
    /// A phrase pause follows.
    pause: bool,
}

/// The syllables of text `text`: 4.5 syllables per second of `seconds` (at neutral tempo), +-20% per text.
fn text_syllables(text: usize, seconds: f64, seed: u64) -> Vec<Syllable> {
    let mut rng = rng_for(seed, &[2, text as u64]);
    let n = ((seconds * 4.5 * rng.gen_range(0.8..1.2)).round() as usize).max(2);
    (0..n)
        .map(|i| {
            let onset = match rng.gen_range(0..10) {
                0..=2 => Onset::None,
                3..=5 => Onset::Plosive(*[1500.0, 2500.0, 3500.0].get(rng.gen_range(0..3)).unwrap()),
                6..=7 => Onset::Fricative(*[2800.0, 4500.0, 6000.0].get(rng.gen_range(0..3)).unwrap()),
                _ => Onset::Nasal,
            };
            Syllable {
                onset,
                vowel: rng.gen_range(0..VOWELS.len()),
                stressed: rng.gen_bool(0.3),
                pause: i + 1 < n && i % 5 == 4 && rng.gen_bool(0.5),
            }
        })
        .collect()
}

/// Klatt resonator (unity gain at DC).
#[derive(Clone, Copy, Default)]
struct Resonator {
    a: f64,
    b: f64,
    c: f64,
    y1: f64,
    y2: f64,
}

impl Resonator {
    fn set(&mut self, f: f64, bw: f64) {
        let f = f.min(0.45 * FS);
        self.c = -(-2.0 * PI * bw / FS).exp();
        self.b = 2.0 * (-PI * bw / FS).exp() * (TAU * f / FS).cos();
        self.a = 1.0 - self.b - self.c;
    }
    /// |H| at frequency `f`.
    fn gain_at(&self, f: f64) -> f64 {
        let w = TAU * f / FS;
        let re = 1.0 - self.b * w.cos() - self.c * (2.0 * w).cos();
        let im = self.b * w.sin() + self.c * (2.0 * w).sin();
        self.a.abs() / (re * re + im * im).sqrt()
    }
    fn step(&mut self, x: f64) -> f64 {
        let y = self.a * x + self.b * self.y1 + self.c * self.y2;
        self.y2 = self.y1;
        self.y1 = y;
        y
    }
}

/// What the synthesiser draws per sample span.
#[derive(Clone, Copy)]
struct Segment {
    start: usize,
    end: usize,
    /// Voiced amplitude and formant targets.
    voice: f64,
    formants: [f64; 4],
    /// Noise amplitude, centre and bandwidth.
    noise: f64,
    noise_f: f64,
    noise_bw: f64,
    /// Pitch at the segment's end, semitones re the utterance's base.
    pitch_st: f64,
}

/// One utterance of `speaker` saying text `text` with `emotion`, about `seconds` long at neutral tempo
/// (16 kHz mono, peak below 1). A pure function of its arguments.
pub fn utterance(speaker: &Speaker, emotion: Emotion, text: usize, seconds: f64, seed: u64) -> Vec<f32> {
    let p = emotion.prosody();
    let mut rng = rng_for(seed, &[3, speaker.index as u64, emotion.letter() as u64, text as u64]);
    // Per-utterance spread around the class means.
    let spread = |rng: &mut StdRng, sd: f64| (sd * gauss(rng)).exp();
    let f0 = speaker.f0 * p.pitch * spread(&mut rng, 0.07);
    let range = p.range_st * spread(&mut rng, 0.2);
    let rate = p.rate * speaker.rate * spread(&mut rng, 0.08);
    let level_db = p.level_db + speaker.level_db + 1.5 * gauss(&mut rng);
    let oq = (p.open_quotient + 0.04 * gauss(&mut rng)).clamp(0.35, 0.85);
    let breath = (p.breath + speaker.breath) * spread(&mut rng, 0.2);
    let fscale = speaker.formant_scale * p.formant;

    let syllables = text_syllables(text, seconds, seed);
    let n_syl = syllables.len();
    let ms = |x: f64| (x * FS / 1000.0).round() as usize;
    let mut segs: Vec<Segment> = Vec::new();
    let mut t = ms(rng.gen_range(120.0..220.0));
    let mut last_formants = VOWELS[0];
    for (i, s) in syllables.iter().enumerate() {
        let dur = (1.0 / rate) * rng.gen_range(0.75..1.25) * if s.stressed { 1.2 } else { 1.0 };
        let mut n = (dur * FS) as usize;
        let amp = 10f64.powf((p.level_var_db * gauss(&mut rng) + if s.stressed { 2.0 } else { 0.0 }) / 20.0);
        // Phrase contour: declination from +range/2 to -range/2, accents on stressed syllables, jitter.
        let pos = i as f64 / (n_syl - 1).max(1) as f64;
        let accent = if s.stressed {
            range * rng.gen_range(0.5..1.0)
        } else {
            0.0
        };
        let pitch_st = range * (0.5 - pos) + accent + 0.15 * range * gauss(&mut rng);
        let vf = VOWELS[s.vowel].map(|f| f * fscale);
        let lf = last_formants;
        let quiet = move |start, end, pitch_st| Segment {
            start,
            end,
            voice: 0.0,
            formants: lf,
            noise: 0.0,
            noise_f: 1000.0,
            noise_bw: 1000.0,
            pitch_st,
        };
        let onset_len = match s.onset {
            Onset::None => 0,
            Onset::Plosive(fc) => {
                let (closure, burst) = (ms(rng.gen_range(25.0..45.0)), ms(rng.gen_range(10.0..20.0)));
                segs.push(quiet(t, t + closure, pitch_st));
                segs.push(Segment {
                    noise: 0.8 * amp,
                    noise_f: fc,
                    noise_bw: 1500.0,
                    ..quiet(t + closure, t + closure + burst, pitch_st)
                });
                closure + burst
            }
            Onset::Fricative(fc) => {
                let len = ms(rng.gen_range(60.0..100.0));
                segs.push(Segment {
                    noise: 1.0 * amp,
                    noise_f: fc,
                    noise_bw: 0.4 * fc,
                    ..quiet(t, t + len, pitch_st)
                });
                len
            }
            Onset::Nasal => {
                let len = ms(rng.gen_range(40.0..70.0));
                segs.push(Segment {
                    voice: 0.3 * amp,
                    formants: NASAL.map(|f| f * fscale),
                    ..quiet(t, t + len, pitch_st)
                });
                len
            }
        };
        t += onset_len;
        n = n.saturating_sub(onset_len).max(ms(60.0));
        segs.push(Segment {
            voice: amp,
            formants: vf,
            ..quiet(t, t + n, pitch_st)
        });
        last_formants = vf;
        t += n;
        if s.pause {
            let len = ms(rng.gen_range(120.0..250.0) * p.rate.recip() * 4.5);
            segs.push(quiet(t, t + len, pitch_st));
            t += len;
        }
    }
    let total = t + ms(rng.gen_range(150.0..250.0));
    render(&segs, total, f0, oq, breath, p.jitter, p.shimmer, level_db, &mut rng)
}

/// Renders the segments: glottal source and noise, amplitude ramps, formant cascade; scaled to the level.
#[allow(clippy::too_many_arguments)]
fn render(
    segs: &[Segment],
    total: usize,
    f0: f64,
    oq: f64,
    breath: f64,
    jitter: f64,
    shimmer: f64,
    level_db: f64,
    rng: &mut StdRng,
) -> Vec<f32> {
    let ramp = 0.012 * FS; // 12 ms on/off ramps
    let mut out = vec![0f64; total];
    let mut formant_res = [Resonator::default(); 4];
    let mut noise_res = [Resonator::default(); 2];
    let mut cur_f = segs.first().map_or(VOWELS[0], |s| s.formants);
    let smooth = 1.0 - (-1.0 / (0.012 * FS)).exp(); // ~12 ms glide
                                                    // Glottal state.
    let (mut phase, mut period_amp, mut period_f0) = (0.0f64, 1.0f64, f0);
    let mut prev_flow = 0.0f64;
    let mut prev_pitch = segs.first().map_or(0.0, |s| s.pitch_st);
    let mut prev_noise = 0.0f64;
    let (mut prev_v, mut noise_gain) = (0.0f64, 1.0f64);
    let emphasis = (1.1 - oq).clamp(0.2, 0.8);
    for s in segs {
        let len = (s.end - s.start) as f64;
        let next_pitch = s.pitch_st;
        #[allow(clippy::needless_range_loop)] // n is the sample index: it also picks the coefficient updates
        for n in s.start..s.end.min(total) {
            let x = (n - s.start) as f64;
            let env = (x / ramp).min((len - x) / ramp).clamp(0.0, 1.0);
            let env = 0.5 - 0.5 * (PI * env).cos();
            // Pitch glides linearly from the previous segment's target to this one's.
            let st = prev_pitch + (next_pitch - prev_pitch) * (x / len);
            // Glottal pulse (Rosenberg): rise over 0.6 OQ of the period, fall over 0.4 OQ, closed after.
            phase += period_f0 / FS;
            if phase >= 1.0 {
                phase -= 1.0;
                period_f0 = f0 * 2f64.powf(st / 12.0) * (1.0 + jitter * gauss(rng));
                period_amp = 1.0 + shimmer * gauss(rng);
            }
            let (tp, tn) = (0.6 * oq, 0.4 * oq);
            let flow = if phase < tp {
                0.5 * (1.0 - (PI * phase / tp).cos())
            } else if phase < tp + tn {
                (0.5 * PI * (phase - tp) / tn).cos()
            } else {
                0.0
            };
            // Derivative of the flow (lip radiation), normalised per period length so amplitude is pitch-free.
            let dflow = (flow - prev_flow) * FS / period_f0;
            prev_flow = flow;
            let w = gauss(rng);
            let open = if phase < tp + tn { 1.0 } else { 0.3 };
            let aspiration = breath * open * (w - prev_noise);
            prev_noise = w;
            let src = period_amp * dflow * 0.15 + aspiration;
            if n % 16 == 0 {
                for ((r, &f), &bw) in formant_res.iter_mut().zip(&cur_f).zip(&BANDWIDTHS) {
                    r.set(f, bw);
                }
                noise_res[0].set(s.noise_f, s.noise_bw);
                noise_res[1].set(s.noise_f, s.noise_bw);
                noise_gain = noise_res[0].gain_at(s.noise_f).powi(2).max(1e-9);
            }
            for (c, f) in cur_f.iter_mut().zip(s.formants) {
                *c += smooth * (f - *c);
            }
            let mut v = src * s.voice * env;
            for r in formant_res.iter_mut() {
                v = r.step(v);
            }
            // Tense voices are brighter: a one-zero emphasis, stronger for a small open quotient.
            let bright = v - emphasis * prev_v;
            prev_v = v;
            let mut z = gauss(rng) * s.noise * env;
            for r in noise_res.iter_mut() {
                z = r.step(z);
            }
            // Klatt resonators are unity-gain at DC: divide by the pair's gain at the centre, so the noise
            // band's level is set by `noise` alone.
            out[n] = bright + z / noise_gain;
        }
        prev_pitch = next_pitch;
    }
    // Remove DC, scale to the level: RMS 0.05 (-26 dBFS) at 0 dB over the active part, soft-limited.
    let mean = out.iter().sum::<f64>() / total.max(1) as f64;
    out.iter_mut().for_each(|v| *v -= mean);
    let peak = out.iter().fold(0f64, |m, v| m.max(v * v));
    let active: Vec<f64> = out.iter().map(|v| v * v).filter(|&e| e > 1e-4 * peak).collect();
    let rms = (active.iter().sum::<f64>() / active.len().max(1) as f64).sqrt();
    let gain = if rms > 0.0 {
        0.05 * 10f64.powf(level_db / 20.0) / rms
    } else {
        0.0
    };
    out.iter().map(|&v| (0.98 * (v * gain).tanh()) as f32).collect()
}

/// What [`write_dataset`] generates.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    /// Speakers `first_speaker .. first_speaker + speakers` (speaker ids are 2 digits, so below 100).
    pub speakers: usize,
    pub first_speaker: usize,
    /// Utterances per emotion and speaker (texts 0..per_class).
    pub per_class: usize,
    /// Approximate length at neutral tempo.
    pub seconds: f64,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            speakers: 8,
            first_speaker: 0,
            per_class: 20,
            seconds: 2.0,
            seed: 0,
        }
    }
}

impl SynthConfig {
    pub fn validate(&self) -> Result<()> {
        if self.speakers == 0 || self.per_class == 0 {
            bail!("need at least one speaker and one utterance per class");
        }
        if self.first_speaker + self.speakers > 100 {
            bail!(
                "speakers {}..{} do not fit EmoDB's 2-digit speaker ids (at most 100)",
                self.first_speaker,
                self.first_speaker + self.speakers
            );
        }
        if self.per_class > 26 * 100 {
            bail!("at most 2600 utterances per class (EmoDB text codes a00..z99)");
        }
        if !(self.seconds.is_finite() && (0.5..=30.0).contains(&self.seconds)) {
            bail!("utterance length must be 0.5 to 30 seconds, got {}", self.seconds);
        }
        Ok(())
    }
}

/// EmoDB-style file stem: speaker (2 digits), text code (letter + 2 digits), emotion letter, version `a`.
pub fn file_stem(speaker: usize, text: usize, emotion: Emotion) -> String {
    let letter = (b'a' + (text / 100) as u8) as char;
    format!("{speaker:02}{letter}{:02}{}a", text % 100, emotion.letter())
}

/// Every utterance of the configuration as (file stem, speaker, emotion, text), in a fixed order.
pub fn plan(cfg: &SynthConfig) -> Vec<(String, Speaker, Emotion, usize)> {
    let mut out = Vec::new();
    for s in cfg.first_speaker..cfg.first_speaker + cfg.speakers {
        let speaker = Speaker::new(s, cfg.seed);
        for e in Emotion::ALL {
            for text in 0..cfg.per_class {
                out.push((file_stem(s, text, e), speaker.clone(), e, text));
            }
        }
    }
    out
}

/// Writes `out/wav/<stem>.wav` (16-bit PCM, 16 kHz) for every utterance of `cfg` and a `README.txt`
/// saying how they were made; returns the number of files and of seconds. Files already there are
/// overwritten. Runs on all CPU threads.
pub fn write_dataset(out: &Path, cfg: &SynthConfig, progress: impl Fn(usize) + Sync) -> Result<(usize, f64)> {
    cfg.validate()?;
    let wav_dir = out.join("wav");
    std::fs::create_dir_all(&wav_dir).with_context(|| format!("cannot create {}", wav_dir.display()))?;
    let items = plan(cfg);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let samples = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((stem, speaker, e, text)) = items.get(i) else {
                            return Ok(());
                        };
                        let x = utterance(speaker, *e, *text, cfg.seconds, cfg.seed);
                        samples.fetch_add(x.len(), std::sync::atomic::Ordering::Relaxed);
                        wav::write_wav_i16(&wav_dir.join(format!("{stem}.wav")), &x, RATE)?;
                        progress(1);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a synthesis thread panicked"))??;
        }
        Ok(())
    })?;
    let readme = format!(
        "Synthetic emotional speech made by wgpu-mlkd's seeded generator (src/data/synth.rs):\n\
         wgpu-mlkd synth-data --out DIR --speakers {} --first-speaker {} --per-class {} --seconds {} --seed {}\n\
         EmoDB-style names: speaker (2 digits), text code, emotion letter (W anger, F happiness, T sadness, \
         N neutral), version.\n",
        cfg.speakers, cfg.first_speaker, cfg.per_class, cfg.seconds, cfg.seed
    );
    crate::fsutil::atomic_write(&out.join("README.txt"), readme.as_bytes())?;
    let secs = samples.into_inner() as f64 / FS;
    Ok((items.len(), secs))
}

/// Measurements used by the tests and by `synth-data`'s summary.
pub mod measure {
    /// Mean F0 (Hz) over voiced 40 ms frames (normalised autocorrelation peak above 0.6 for lags of
    /// 60..500 Hz), or None when no frame is voiced.
    pub fn mean_f0(x: &[f32]) -> Option<f64> {
        let (win, hop) = (640, 320);
        let (lo, hi) = (16000 / 500, 16000 / 60);
        let mut f0s = Vec::new();
        let mut i = 0;
        while i + win + hi <= x.len() {
            let a = &x[i..i + win + hi];
            let e0: f64 = a[..win].iter().map(|&v| v as f64 * v as f64).sum();
            if e0 > 1e-6 * win as f64 {
                let mut best = (0.0, 0);
                for lag in lo..=hi {
                    let (mut num, mut e1) = (0.0f64, 0.0f64);
                    for j in 0..win {
                        num += a[j] as f64 * a[j + lag] as f64;
                        e1 += a[j + lag] as f64 * a[j + lag] as f64;
                    }
                    let r = num / (e0 * e1).sqrt().max(1e-30);
                    if r > best.0 {
                        best = (r, lag);
                    }
                }
                if best.0 > 0.6 {
                    f0s.push(16000.0 / best.1 as f64);
                }
            }
            i += hop;
        }
        (!f0s.is_empty()).then(|| f0s.iter().sum::<f64>() / f0s.len() as f64)
    }

    /// RMS in dBFS over the whole signal.
    pub fn level_db(x: &[f32]) -> f64 {
        10.0 * (super::super::noise::mean_square(x).max(1e-20)).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_seed_differs() {
        let s = Speaker::new(3, 7);
        let a = utterance(&s, Emotion::Anger, 2, 1.0, 7);
        let b = utterance(&s, Emotion::Anger, 2, 1.0, 7);
        assert_eq!(a, b);
        let c = utterance(&Speaker::new(3, 8), Emotion::Anger, 2, 1.0, 8);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| v.is_finite() && v.abs() < 1.0));
        assert_eq!(file_stem(3, 2, Emotion::Anger), "03a02Wa");
        assert_eq!(file_stem(12, 105, Emotion::Sadness), "12b05Ta");
        assert!(crate::data::dataset::parse_emodb_name("12b05Ta").is_ok());
    }

    /// Class means over speakers and texts move in the designed directions: pitch, loudness, duration.
    #[test]
    fn emotions_differ_in_pitch_level_and_tempo() {
        let mut stats = Vec::new();
        let t0 = std::time::Instant::now();
        let mut n_samples = 0;
        for e in Emotion::ALL {
            let (mut f0, mut lvl, mut dur, mut n) = (0.0, 0.0, 0.0, 0.0);
            for s in 0..4 {
                let sp = Speaker::new(s, 1);
                for text in 0..3 {
                    let x = utterance(&sp, e, text, 1.5, 1);
                    n_samples += x.len();
                    // Pitch relative to the speaker's base, so male and female speakers average fairly.
                    f0 += (measure::mean_f0(&x).unwrap() / sp.f0).ln();
                    lvl += measure::level_db(&x);
                    dur += x.len() as f64 / 16000.0;
                    n += 1.0;
                }
            }
            eprintln!(
                "{:>9}: pitch x{:.2} of base, level {:.1} dBFS, duration {:.2} s",
                e.label(),
                (f0 / n).exp(),
                lvl / n,
                dur / n
            );
            stats.push(((f0 / n).exp(), lvl / n, dur / n));
        }
        eprintln!(
            "synthesis: {:.2} ms per second of audio (with the pitch tracker)",
            t0.elapsed().as_secs_f64() * 1000.0 / (n_samples as f64 / 16000.0)
        );
        let [anger, happy, sad, neutral] = [stats[0], stats[1], stats[2], stats[3]];
        // Pitch: happiness > anger > neutral > sadness.
        assert!(
            happy.0 > anger.0 && anger.0 > neutral.0 && neutral.0 > sad.0,
            "{stats:?}"
        );
        // Loudness: anger > happiness > neutral > sadness.
        assert!(
            anger.1 > happy.1 && happy.1 > neutral.1 && neutral.1 > sad.1,
            "{stats:?}"
        );
        // Tempo (same texts): sadness slowest, anger fastest.
        assert!(sad.2 > neutral.2 && neutral.2 > anger.2, "{stats:?}");
    }

    #[test]
    fn written_folder_opens_as_emodb() {
        let dir = std::env::temp_dir().join(format!("wgpu-mlkd-synth-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = SynthConfig {
            speakers: 2,
            first_speaker: 10,
            per_class: 2,
            seconds: 0.6,
            seed: 5,
        };
        let (n, secs) = write_dataset(&dir, &cfg, |_| {}).unwrap();
        assert_eq!(n, 16);
        assert!(secs > 8.0, "{secs}");
        let ds = crate::data::dataset::Dataset::open(&dir).unwrap();
        assert_eq!(ds.kind, crate::data::dataset::DatasetKind::EmoDb);
        assert_eq!(ds.utterances.len(), 16);
        assert_eq!(ds.labels(), ["anger", "happiness", "neutral", "sadness"]);
        assert_eq!(ds.speakers(), ["10", "11"]);
        let first = std::fs::read(&ds.utterances[0].path).unwrap();
        write_dataset(&dir, &cfg, |_| {}).unwrap();
        assert_eq!(first, std::fs::read(&ds.utterances[0].path).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
