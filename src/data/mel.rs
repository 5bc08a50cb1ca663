//! Log-mel spectrograms on the CPU (radix-2 FFT, Hann window, HTK mel scale, triangular filters), framed
//! like the wav2vec 2.0 CNN: frame `t` is the window `[t * hop, t * hop + win)`, so with `hop` = the total
//! stride and `win` = the receptive field there is exactly one mel frame per model frame
//! (`config.frames(L)` of them). Used as the demo teacher's self-supervised target and for noise tests.

use std::f64::consts::{PI, TAU};

/// In-place radix-2 complex FFT; `re.len()` must be a power of two.
pub fn fft(re: &mut [f64], im: &mut [f64]) {
    let n = re.len();
    assert!(
        n.is_power_of_two() && im.len() == n,
        "fft: length must be a power of two"
    );
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
    let mut len = 2;
    while len <= n {
        let (wr, wi) = ((-TAU / len as f64).cos(), (-TAU / len as f64).sin());
        for start in (0..n).step_by(len) {
            let (mut cr, mut ci) = (1.0, 0.0);
            for k in 0..len / 2 {
                let (a, b) = (start + k, start + k + len / 2);
                let tr = re[b] * cr - im[b] * ci;
                let ti = re[b] * ci + im[b] * cr;
                re[b] = re[a] - tr;
                im[b] = im[a] - ti;
                re[a] += tr;
                im[a] += ti;
                let nr = cr * wr - ci * wi;
                ci = cr * wi + ci * wr;
                cr = nr;
            }
        }
        len <<= 1;
    }
}

/// Power spectrum `|X_k|^2`, k = 0..=n/2, of `x` zero-padded (or cut) to `n` (a power of two).
pub fn power_spectrum(x: &[f64], n: usize) -> Vec<f64> {
    let mut re = vec![0.0; n];
    let mut im = vec![0.0; n];
    for (r, &v) in re.iter_mut().zip(x) {
        *r = v;
    }
    fft(&mut re, &mut im);
    (0..=n / 2).map(|k| re[k] * re[k] + im[k] * im[k]).collect()
}

/// Long-term average power spectrum of `x` (Hann-windowed frames of `n` samples, hop n/2), k = 0..=n/2.
pub fn average_spectrum(x: &[f32], n: usize) -> Vec<f64> {
    let w = hann(n);
    let mut acc = vec![0.0; n / 2 + 1];
    let mut frames = 0;
    let mut i = 0;
    while i + n <= x.len() {
        let f: Vec<f64> = x[i..i + n].iter().zip(&w).map(|(&v, &w)| v as f64 * w).collect();
        for (a, p) in acc.iter_mut().zip(power_spectrum(&f, n)) {
            *a += p;
        }
        frames += 1;
        i += n / 2;
    }
    acc.iter_mut().for_each(|a| *a /= frames.max(1) as f64);
    acc
}

/// Periodic Hann window.
pub fn hann(n: usize) -> Vec<f64> {
    (0..n).map(|i| 0.5 - 0.5 * (TAU * i as f64 / n as f64).cos()).collect()
}

fn hz_to_mel(f: f64) -> f64 {
    2595.0 * (1.0 + f / 700.0).log10()
}

fn mel_to_hz(m: f64) -> f64 {
    700.0 * (10f64.powf(m / 2595.0) - 1.0)
}

/// A log-mel front end.
#[derive(Clone, Debug)]
pub struct LogMel {
    pub win: usize,
    pub hop: usize,
    pub n_fft: usize,
    pub n_mels: usize,
    window: Vec<f64>,
    /// Per mel band: (first FFT bin, weights).
    filters: Vec<(usize, Vec<f64>)>,
}

impl LogMel {
    /// `n_mels` triangular bands between 0 Hz and half the sample rate, windows of `win` samples every `hop`.
    pub fn new(win: usize, hop: usize, n_mels: usize, sample_rate: f64) -> LogMel {
        let n_fft = win.next_power_of_two();
        let top = hz_to_mel(sample_rate / 2.0);
        let edges: Vec<f64> = (0..n_mels + 2)
            .map(|i| mel_to_hz(top * i as f64 / (n_mels + 1) as f64))
            .collect();
        let bin_hz = sample_rate / n_fft as f64;
        let filters = (0..n_mels)
            .map(|m| {
                let (lo, mid, hi) = (edges[m], edges[m + 1], edges[m + 2]);
                let first = (lo / bin_hz).floor() as usize;
                let last = ((hi / bin_hz).ceil() as usize).min(n_fft / 2);
                let w = (first..=last)
                    .map(|k| {
                        let f = k as f64 * bin_hz;
                        let v = if f <= mid {
                            (f - lo) / (mid - lo)
                        } else {
                            (hi - f) / (hi - mid)
                        };
                        v.max(0.0)
                    })
                    .collect();
                (first, w)
            })
            .collect();
        // Symmetric Hann over the window (not zero at both ends only matters little; keep it periodic).
        let window = (0..win)
            .map(|i| 0.5 - 0.5 * (2.0 * PI * i as f64 / win as f64).cos())
            .collect();
        LogMel {
            win,
            hop,
            n_fft,
            n_mels,
            window,
            filters,
        }
    }

    /// Frames `0..frames` of `x` as `ln(mel power + 1e-6)`, row-major `[frames, n_mels]`. A window running
    /// past the end of `x` is zero-padded.
    pub fn compute(&self, x: &[f32], frames: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(frames * self.n_mels);
        let mut buf = vec![0.0; self.win];
        for t in 0..frames {
            let start = t * self.hop;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = x.get(start + i).map_or(0.0, |&v| v as f64) * self.window[i];
            }
            let p = power_spectrum(&buf, self.n_fft);
            for (first, w) in &self.filters {
                let e: f64 = w.iter().enumerate().map(|(j, w)| w * p[first + j]).sum();
                out.push((e + 1e-6).ln() as f32);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fft_matches_a_naive_dft() {
        let n = 64;
        let x: Vec<f64> = (0..n).map(|i| ((i * 7 % 13) as f64 - 6.0) / 6.0).collect();
        let p = power_spectrum(&x, n);
        for (k, &pk) in p.iter().enumerate() {
            let (mut r, mut i) = (0.0, 0.0);
            for (t, &v) in x.iter().enumerate() {
                r += v * (TAU * (k * t) as f64 / n as f64).cos();
                i -= v * (TAU * (k * t) as f64 / n as f64).sin();
            }
            assert!((pk - (r * r + i * i)).abs() < 1e-9 * (1.0 + pk), "bin {k}");
        }
    }

    #[test]
    fn a_tone_lands_in_its_mel_band() {
        let mel = LogMel::new(400, 320, 40, 16000.0);
        let x: Vec<f32> = (0..16000)
            .map(|i| (TAU * 1000.0 * i as f64 / 16000.0).sin() as f32)
            .collect();
        let frames = 49;
        let m = mel.compute(&x, frames);
        assert_eq!(m.len(), frames * 40);
        let row = &m[10 * 40..11 * 40];
        let best = (0..40).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        // The band whose centre is nearest 1 kHz.
        let top = hz_to_mel(8000.0);
        let centre = |b: usize| mel_to_hz(top * (b + 1) as f64 / 41.0);
        let want = (0..40)
            .min_by(|&a, &b| (centre(a) - 1000.0).abs().total_cmp(&(centre(b) - 1000.0).abs()))
            .unwrap();
        assert!(best.abs_diff(want) <= 1, "peak band {best}, want {want}");
    }
}
