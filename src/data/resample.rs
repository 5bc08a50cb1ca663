//! Band-limited sample-rate conversion: a Kaiser-windowed sinc evaluated through polyphase tables.
//!
//! Output sample `n` is the band-limited input evaluated at time `n / to_hz` (input index
//! `t = n * from_hz / to_hz`): `y[n] = sum_k x[k] * h(t - k)`, with `h` centred and symmetric, so
//! there is no delay. Samples outside the signal count as zeros. The output holds
//! `round(len * to_hz / from_hz)` samples (half rounds up); equal rates return the input unchanged.
//!
//! Filter, relative to the lower of the two Nyquist frequencies `fN`: passband up to `0.9 fN`,
//! stopband from `1.0 fN` (nothing at or above the output Nyquist survives, so nothing aliases),
//! cutoff `0.95 fN`, Kaiser window designed for 90 dB (beta 8.96, half-width 57.2 samples at the
//! lower rate). Measured by this module's tests (sinusoid sweeps): passband ripple below 0.001 dB,
//! stopband (aliases and images) below -88 dB.
//!
//! Tables: for the reduced ratio `to/from = up/down` there are `up` distinct fractional input
//! positions, so one exact row of taps per phase. When `up * taps` would exceed [`MAX_TABLE`]
//! coefficients (odd rates with a large `up`, e.g. 44101 -> 16000), the kernel is instead tabulated
//! on a grid of 1024 phases per lower-rate sample and the output is interpolated linearly between
//! the two neighbouring phases (two dot products). That equals evaluating the band-limited signal on
//! the fine grid and interpolating linearly, whose error for a passband tone is at most
//! `(2 pi 0.45 / 1024)^2 / 8 = 9.5e-6` (-100 dB). The interpolated table holds about
//! `1024 s * 115 / s`, i.e. 120k coefficients whatever the ratio; building a table costs about 50 ns
//! per coefficient (so at most ~0.1 s for the largest exact table, a few ms for common rates).
//!
//! Cost: the kernel spans `115 / s` input samples, where `s = min(1, to/from)`, so it is about
//! 115 multiply-adds per input sample when downsampling (whatever the ratio: 10 MHz -> 16 kHz costs
//! per input sample what 48 kHz -> 16 kHz does) and about 115 per output sample when upsampling.
//! Memory is the output plus the table. Single-threaded. [`Resampler`] takes the signal in pieces and gives
//! bit-identical output in memory that does not grow with the signal.

/// Passband edge, as a fraction of the lower Nyquist frequency.
const PASS_EDGE: f64 = 0.90;
/// Stopband edge, as a fraction of the lower Nyquist frequency.
const STOP_EDGE: f64 = 1.00;
/// Kaiser design attenuation in dB (sets the window's beta and length).
const ATTEN_DB: f64 = 90.0;
/// Most coefficients an exact polyphase table may hold (f32, so 8 MiB).
pub const MAX_TABLE: usize = 1 << 21;
/// Phases per lower-rate sample in the interpolated table.
const INTERP_PHASES: f64 = 1024.0;

/// Resamples `x` from `from_hz` to `to_hz` (see the module docs for the filter and the timing).
///
/// # Panics
/// If either rate is 0 (`wav::read_wav` rejects such files, so this is a caller bug).
pub fn resample(x: &[f32], from_hz: u32, to_hz: u32) -> Vec<f32> {
    resample_impl(x, from_hz, to_hz, false)
}

/// `round(len * to / from)`, half up, in exact integer arithmetic.
pub fn output_len(len: usize, from_hz: u32, to_hz: u32) -> usize {
    assert!(from_hz > 0 && to_hz > 0, "resample: sample rates must be > 0");
    ((len as u128 * to_hz as u128 + from_hz as u128 / 2) / from_hz as u128) as usize
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The continuous kernel `h(d)`, `d` in input samples.
struct Kernel {
    /// Lower rate over input rate: converts input samples to lower-rate samples.
    s: f64,
    /// Half-width in lower-rate samples.
    half_width: f64,
    beta: f64,
    inv_i0_beta: f64,
}

impl Kernel {
    fn new(from_hz: u32, to_hz: u32) -> Kernel {
        let s = (to_hz as f64 / from_hz as f64).min(1.0);
        // Kaiser's design formulas; transition width in cycles per lower-rate sample.
        let transition = (STOP_EDGE - PASS_EDGE) * 0.5;
        let length = (ATTEN_DB - 7.95) / (2.285 * 2.0 * std::f64::consts::PI * transition);
        let beta = 0.1102 * (ATTEN_DB - 8.7);
        Kernel {
            s,
            half_width: length / 2.0,
            beta,
            inv_i0_beta: 1.0 / bessel_i0(beta),
        }
    }

    /// Half-width in input samples.
    fn half_width_in(&self) -> f64 {
        self.half_width / self.s
    }

    fn eval(&self, d: f64) -> f64 {
        let u = d * self.s;
        let r = u / self.half_width;
        if r.abs() >= 1.0 {
            return 0.0;
        }
        // Cutoff midway through the transition band; `cut * s` is the gain that makes DC pass at 1.
        let cut = (PASS_EDGE + STOP_EDGE) * 0.5;
        let window = bessel_i0(self.beta * (1.0 - r * r).sqrt()) * self.inv_i0_beta;
        cut * self.s * sinc(cut * u) * window
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = std::f64::consts::PI * x;
        px.sin() / px
    }
}

/// Modified Bessel function of the first kind, order 0 (power series; fine for the betas used).
fn bessel_i0(x: f64) -> f64 {
    let q = x * x / 4.0;
    let (mut term, mut sum, mut k) = (1.0f64, 1.0f64, 1.0f64);
    while term > sum * 1e-17 {
        term *= q / (k * k);
        sum += term;
        k += 1.0;
    }
    sum
}

/// Rows of taps: row `p` holds `h(p / phases + reach - j)` for `j in 0..taps`, i.e. the weights of
/// inputs `i - reach ..= i + reach + 1` for an output at input time `i + p / phases`.
struct Table {
    taps: usize,
    reach: usize,
    coeffs: Vec<f32>,
}

impl Table {
    /// `rows` may be `phases + 1` so that interpolation can read the row at fraction 1.
    fn new(kernel: &Kernel, phases: usize, rows: usize) -> Table {
        let reach = kernel.half_width_in().ceil() as usize;
        let taps = 2 * reach + 2;
        let mut coeffs = Vec::with_capacity(rows * taps);
        for p in 0..rows {
            let frac = p as f64 / phases as f64;
            for j in 0..taps {
                coeffs.push(kernel.eval(frac + reach as f64 - j as f64) as f32);
            }
        }
        Table { taps, reach, coeffs }
    }

    fn row(&self, p: usize) -> &[f32] {
        &self.coeffs[p * self.taps..(p + 1) * self.taps]
    }

    /// Filter output for input time `i + p / phases`, zeros outside `x`.
    #[inline]
    fn apply(&self, x: &[f32], i: usize, p: usize) -> f32 {
        let row = self.row(p);
        let lo = i as isize - self.reach as isize;
        let j0 = (-lo).max(0) as usize;
        let j1 = (x.len() as isize - lo).clamp(0, self.taps as isize) as usize;
        if j0 >= j1 {
            return 0.0;
        }
        let start = (lo + j0 as isize) as usize;
        dot(&x[start..start + (j1 - j0)], &row[j0..j1])
    }
}

/// f32 dot product with 16 independent accumulators so the compiler vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const W: usize = 16;
    let mut acc = [0f32; W];
    let (ca, cb) = (a.chunks_exact(W), b.chunks_exact(W));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (u, v) in ca.zip(cb) {
        for l in 0..W {
            acc[l] += u[l] * v[l];
        }
    }
    let mut tail = 0f32;
    for (u, v) in ra.iter().zip(rb) {
        tail += u * v;
    }
    acc.iter().sum::<f32>() + tail
}

/// How to compute output `n`: the table, and the exact step from one output's input time to the next.
struct Plan {
    table: Table,
    up: u64,
    /// Output `n + 1` sits `step_i + step_p / up` input samples after output `n`.
    step_i: usize,
    step_p: u64,
    /// `Some((phases, phases / up))` for the interpolated table (`phases + 1` rows).
    interp: Option<(usize, f64)>,
}

impl Plan {
    /// Only for different rates (equal rates copy the input).
    fn new(from_hz: u32, to_hz: u32, force_interp: bool) -> Plan {
        let g = gcd(from_hz as u64, to_hz as u64);
        let (up, down) = (to_hz as u64 / g, from_hz as u64 / g);
        let kernel = Kernel::new(from_hz, to_hz);
        let taps = 2 * kernel.half_width_in().ceil() as usize + 2;
        let interp_phases = (INTERP_PHASES * kernel.s).ceil() as u64;
        let exact = !force_interp && (up <= interp_phases || (up as u128) * (taps as u128) <= MAX_TABLE as u128);
        let (table, interp) = if exact {
            (Table::new(&kernel, up as usize, up as usize), None)
        } else {
            let phases = interp_phases as usize;
            (
                Table::new(&kernel, phases, phases + 1),
                Some((phases, phases as f64 / up as f64)),
            )
        };
        Plan {
            table,
            up,
            step_i: (down / up) as usize,
            step_p: down % up,
            interp,
        }
    }

    /// The output at input time `i + p / up`, `x` holding the input from index 0 (zeros outside it).
    #[inline]
    fn at(&self, x: &[f32], i: usize, p: u64) -> f32 {
        match self.interp {
            None => self.table.apply(x, i, p as usize),
            Some((phases, scale)) => {
                let pos = p as f64 * scale;
                let q = (pos as usize).min(phases - 1);
                let a = (pos - q as f64) as f32;
                let lo = self.table.apply(x, i, q);
                let hi = self.table.apply(x, i, q + 1);
                lo + a * (hi - lo)
            }
        }
    }

    /// Steps `(i, p)` to the next output's input time, exactly.
    #[inline]
    fn advance(&self, i: &mut usize, p: &mut u64) {
        *i += self.step_i;
        *p += self.step_p;
        if *p >= self.up {
            *p -= self.up;
            *i += 1;
        }
    }
}

/// `resample`, optionally forcing the interpolated table (so tests can cover it at common rates).
fn resample_impl(x: &[f32], from_hz: u32, to_hz: u32, force_interp: bool) -> Vec<f32> {
    let out_len = output_len(x.len(), from_hz, to_hz);
    if from_hz == to_hz {
        return x.to_vec();
    }
    if out_len == 0 {
        return Vec::new();
    }
    let plan = Plan::new(from_hz, to_hz, force_interp);
    let mut out = Vec::with_capacity(out_len);
    let (mut i, mut p) = (0usize, 0u64);
    for _ in 0..out_len {
        out.push(plan.at(x, i, p));
        plan.advance(&mut i, &mut p);
    }
    out
}

/// [`resample`] on a signal that arrives in pieces, with output bit-identical to `resample` on the whole
/// signal whatever the pieces. Memory: the table, plus the filter's span of input (`2 * reach + 2` samples)
/// and the latest piece; nothing grows with the signal's length.
///
/// An output is computed as soon as every input under its kernel has arrived and the signal is known to be
/// long enough to have it (`output_len` only grows with the length); the last few, whose kernels reach past
/// the end, come from [`Resampler::finish`], which knows where the signal ends.
pub struct Resampler {
    from_hz: u32,
    to_hz: u32,
    /// `None` for equal rates (a copy).
    plan: Option<Plan>,
    /// Input samples `buf_start..received`.
    buf: Vec<f32>,
    buf_start: usize,
    received: usize,
    /// The next output: its index and its input time `i + p / up`.
    n: usize,
    i: usize,
    p: u64,
}

impl Resampler {
    /// # Panics
    /// If either rate is 0 (as [`resample`]).
    pub fn new(from_hz: u32, to_hz: u32) -> Resampler {
        Resampler::with_mode(from_hz, to_hz, false)
    }

    fn with_mode(from_hz: u32, to_hz: u32, force_interp: bool) -> Resampler {
        assert!(from_hz > 0 && to_hz > 0, "resample: sample rates must be > 0");
        Resampler {
            from_hz,
            to_hz,
            plan: (from_hz != to_hz).then(|| Plan::new(from_hz, to_hz, force_interp)),
            buf: Vec::new(),
            buf_start: 0,
            received: 0,
            n: 0,
            i: 0,
            p: 0,
        }
    }

    /// Input samples taken so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Output samples given so far.
    pub fn produced(&self) -> usize {
        self.n
    }

    /// Takes the next piece of input and appends to `out` every output that it completes.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) {
        self.received += input.len();
        let Some(plan) = &self.plan else {
            out.extend_from_slice(input);
            self.n += input.len();
            return;
        };
        self.buf.extend_from_slice(input);
        let reach = plan.table.reach;
        let known = output_len(self.received, self.from_hz, self.to_hz);
        // Output at input time i reads inputs i - reach ..= i + reach + 1.
        while self.n < known && self.i + reach + 2 <= self.received {
            // `buf_start <= i - reach` when i >= reach, else 0: `at` trims exactly as on the whole signal.
            out.push(plan.at(&self.buf, self.i - self.buf_start, self.p));
            plan.advance(&mut self.i, &mut self.p);
            self.n += 1;
        }
        // Inputs before the next output's kernel are never read again.
        let keep_from = self.i.saturating_sub(reach).min(self.received);
        if keep_from > self.buf_start {
            self.buf.drain(..keep_from - self.buf_start);
            self.buf_start = keep_from;
        }
    }

    /// The signal has ended: appends the remaining outputs (`output_len(received)` in all).
    pub fn finish(mut self, out: &mut Vec<f32>) {
        let Some(plan) = &self.plan else { return };
        let total = output_len(self.received, self.from_hz, self.to_hz);
        while self.n < total {
            out.push(plan.at(&self.buf, self.i - self.buf_start, self.p));
            plan.advance(&mut self.i, &mut self.p);
            self.n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    fn sine(len: usize, rate: u32, freq: f64, phase: f64) -> Vec<f32> {
        (0..len)
            .map(|k| (2.0 * PI * freq * k as f64 / rate as f64 + phase).sin() as f32)
            .collect()
    }

    /// Samples of the output far enough from both ends that the zero padding does not reach them.
    fn middle(out_len: usize, from_hz: u32, to_hz: u32) -> std::ops::Range<usize> {
        let k = Kernel::new(from_hz, to_hz);
        let margin = (k.half_width_in() * to_hz as f64 / from_hz as f64).ceil() as usize + 2;
        margin..out_len - margin
    }

    struct Fit {
        /// Gain of the fitted tone in dB.
        gain_db: f64,
        /// Largest |y - fitted tone| relative to the input amplitude, in dB.
        residual_db: f64,
        /// Largest |y - analytic tone at n / to_hz|.
        err_vs_analytic: f64,
    }

    /// Least-squares fit of `a sin(w n) + b cos(w n)` to `y` over `range`.
    fn fit(y: &[f32], range: std::ops::Range<usize>, rate: u32, freq: f64, phase: f64) -> Fit {
        let w = 2.0 * PI * freq / rate as f64;
        let (mut ss, mut sc, mut cc, mut ys, mut yc) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for n in range.clone() {
            let (s, c) = (w * n as f64).sin_cos();
            let v = y[n] as f64;
            ss += s * s;
            sc += s * c;
            cc += c * c;
            ys += v * s;
            yc += v * c;
        }
        let det = ss * cc - sc * sc;
        let a = (ys * cc - yc * sc) / det;
        let b = (yc * ss - ys * sc) / det;
        let (mut residual, mut err) = (0f64, 0f64);
        for n in range {
            let t = w * n as f64;
            let v = y[n] as f64;
            residual = residual.max((v - a * t.sin() - b * t.cos()).abs());
            err = err.max((v - (t + phase).sin()).abs());
        }
        Fit {
            gain_db: 20.0 * a.hypot(b).log10(),
            residual_db: 20.0 * residual.max(1e-12).log10(),
            err_vs_analytic: err,
        }
    }

    const PAIRS: &[(u32, u32)] = &[
        (8000, 16000),
        (11025, 16000),
        (12345, 16000),
        (19980, 16000),
        (22050, 16000),
        (32000, 16000),
        (44100, 16000),
        (48000, 16000),
        (96000, 16000),
        (16000, 8000),
    ];

    fn lower_nyquist(from_hz: u32, to_hz: u32) -> f64 {
        from_hz.min(to_hz) as f64 / 2.0
    }

    /// Passband: gain and phase of tones up to 0.9 fN; stopband: whatever comes out of tones from
    /// 1.0 fN to the input Nyquist (aliases when downsampling), and images of passband tones when
    /// upsampling (the fit residual). Returns (worst passband |gain| dB, worst error against the
    /// analytic tone, worst stopband level dB).
    fn sweep(from_hz: u32, to_hz: u32, force_interp: bool) -> (f64, f64, f64) {
        let len = from_hz as usize / 4; // 0.25 s
        let f_n = lower_nyquist(from_hz, to_hz);
        let (mut ripple, mut err, mut stop) = (0f64, 0f64, f64::NEG_INFINITY);
        let mut pass: Vec<f64> = (1..=24).map(|k| 0.9 * f_n * k as f64 / 24.0).collect();
        pass.push(1000.0);
        for (idx, &f) in pass.iter().enumerate() {
            let phase = 0.3 + idx as f64;
            let y = resample_impl(&sine(len, from_hz, f, phase), from_hz, to_hz, force_interp);
            let r = middle(y.len(), from_hz, to_hz);
            let fit = fit(&y, r, to_hz, f, phase);
            ripple = ripple.max(fit.gain_db.abs());
            err = err.max(fit.err_vs_analytic);
            stop = stop.max(fit.residual_db);
        }
        let f_in_nyq = from_hz as f64 / 2.0;
        if from_hz > to_hz {
            let steps = 40;
            for k in 0..steps {
                let f = f_n + (f_in_nyq - f_n) * (k as f64 + 0.5) / steps as f64;
                let y = resample_impl(&sine(len, from_hz, f, 0.7), from_hz, to_hz, force_interp);
                let peak = y[middle(y.len(), from_hz, to_hz)]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                stop = stop.max(20.0 * (peak as f64).max(1e-12).log10());
            }
            // Exactly at the lower Nyquist (the stopband edge).
            let y = resample_impl(&sine(len, from_hz, f_n, 0.7), from_hz, to_hz, force_interp);
            let peak = y[middle(y.len(), from_hz, to_hz)]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            stop = stop.max(20.0 * (peak as f64).max(1e-12).log10());
        }
        (ripple, err, stop)
    }

    fn check_sweeps(force_interp: bool, label: &str) {
        for &(from, to) in PAIRS {
            let (ripple, err, stop) = sweep(from, to, force_interp);
            eprintln!(
                "{label} {from} -> {to}: passband |gain| <= {ripple:.2e} dB, \
                 |y - analytic| <= {err:.2e}, stopband <= {stop:.1} dB"
            );
            assert!(ripple < 0.01, "{from} -> {to}: passband ripple {ripple} dB");
            assert!(err < 2e-4, "{from} -> {to}: error vs analytic {err}");
            assert!(stop < -85.0, "{from} -> {to}: stopband {stop} dB");
        }
    }

    #[test]
    fn passband_and_stopband_exact_tables() {
        check_sweeps(false, "exact");
    }

    #[test]
    fn passband_and_stopband_interpolated_tables() {
        check_sweeps(true, "interp");
    }

    #[test]
    fn tone_above_lower_nyquist_is_suppressed() {
        // 9 kHz at 44.1 kHz would alias to 7 kHz at 16 kHz.
        let y = resample(&sine(44100, 44100, 9000.0, 0.2), 44100, 16000);
        let peak = y[middle(y.len(), 44100, 16000)]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        let db = 20.0 * (peak as f64).log10();
        eprintln!("9 kHz @ 44.1 kHz -> 16 kHz: {db:.1} dB");
        assert!(db < -60.0, "9 kHz leaks at {db} dB");
    }

    #[test]
    fn output_length_is_rounded_ratio() {
        let cases = [
            (0, 44100, 16000, 0),
            (1, 44100, 16000, 0),
            (2, 44100, 16000, 1),
            (1, 8000, 16000, 2),
            (2, 16000, 8000, 1),
            (3, 16000, 8000, 2), // 1.5 rounds up
            (1, 48000, 16000, 0),
            (2, 48000, 16000, 1), // 0.667
            (44100, 44100, 16000, 16000),
            (44101, 44100, 16000, 16000),
            (1000, 12345, 16000, 1296), // 1296.07
            (5, 16000, 16000, 5),
        ];
        for (len, from, to, want) in cases {
            assert_eq!(output_len(len, from, to), want, "{len} @ {from} -> {to}");
            let y = resample(&vec![0.5; len], from, to);
            assert_eq!(y.len(), want, "{len} @ {from} -> {to}");
            let y = resample_impl(&vec![0.5; len], from, to, true);
            assert_eq!(y.len(), want, "{len} @ {from} -> {to} (interpolated)");
        }
    }

    #[test]
    fn impulse_response_is_centred() {
        // Downsampling 48 kHz -> 16 kHz: an impulse at input 300 (time 300/48000 = output 100)
        // comes out centred on output 100 and symmetric around it.
        let mut x = vec![0f32; 600];
        x[300] = 1.0;
        let y = resample(&x, 48000, 16000);
        let peak = (0..y.len()).max_by(|&a, &b| y[a].total_cmp(&y[b])).unwrap();
        assert_eq!(peak, 100);
        for m in 1..60 {
            assert!((y[100 + m] - y[100 - m]).abs() < 1e-6, "asymmetric at {m}");
        }
        // Upsampling 8 kHz -> 16 kHz: impulse at 50 -> centred on output 100; the taps between the
        // input samples are symmetric too.
        let mut x = vec![0f32; 200];
        x[50] = 1.0;
        let y = resample(&x, 8000, 16000);
        assert!((y[100] - 0.95).abs() < 1e-6, "peak {}", y[100]);
        for m in 1..100 {
            assert!((y[100 + m] - y[100 - m]).abs() < 1e-6, "asymmetric at {m}");
        }
        // The original samples survive at even outputs (zeros of the sinc, up to the window).
        assert!(y[102].abs() < 0.06);
    }

    #[test]
    fn equal_rates_are_identity() {
        let x = sine(1234, 16000, 440.0, 0.1);
        assert_eq!(resample(&x, 16000, 16000), x);
    }

    #[test]
    fn dc_passes_at_unit_gain() {
        for &(from, to) in PAIRS {
            let y = resample(&vec![1.0; from as usize / 10], from, to);
            let r = middle(y.len(), from, to);
            let worst = y[r].iter().fold(0f32, |m, v| m.max((v - 1.0).abs()));
            assert!(worst < 1e-4, "{from} -> {to}: DC off by {worst}");
        }
    }

    #[test]
    fn large_downsampling_ratios() {
        // 10 MHz (exact single-phase table, 71k taps) and 1_000_003 Hz (prime: interpolated table).
        for from in [10_000_000u32, 1_000_003] {
            let len = from as usize / 20; // 50 ms
            let mut x = sine(len, from, 1000.0, 0.4);
            let hf = sine(len, from, 123_456.0, 0.0);
            x.iter_mut().zip(&hf).for_each(|(a, b)| *a += b);
            let y = resample(&x, from, 16000);
            assert_eq!(y.len(), output_len(len, from, 16000));
            let r = middle(y.len(), from, 16000);
            let fit = fit(&y, r, 16000, 1000.0, 0.4);
            eprintln!(
                "{from} -> 16000: gain {:.2e} dB, |y - analytic| {:.2e}, residual {:.1} dB",
                fit.gain_db, fit.err_vs_analytic, fit.residual_db
            );
            assert!(fit.err_vs_analytic < 2e-4);
            assert!(fit.residual_db < -85.0);
        }
    }

    /// A tone plus seeded noise, so that every output depends on every tap.
    fn test_signal(len: usize, rate: u32) -> Vec<f32> {
        let mut seed = 12345u32;
        sine(len, rate, 440.0, 0.3)
            .into_iter()
            .map(|v| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                0.5 * v + 0.25 * ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            })
            .collect()
    }

    /// `x` through a [`Resampler`] in pieces of `sizes` (cycled); checks the buffer stays bounded.
    fn streamed(x: &[f32], from: u32, to: u32, force_interp: bool, sizes: &[usize]) -> Vec<f32> {
        let mut r = Resampler::with_mode(from, to, force_interp);
        let mut out = Vec::new();
        let (mut at, mut k) = (0, 0);
        while at < x.len() {
            let n = sizes[k % sizes.len()].min(x.len() - at);
            r.push(&x[at..at + n], &mut out);
            at += n;
            k += 1;
            if let Some(plan) = &r.plan {
                // The kernel's span, the piece just taken, and one output step's worth of input.
                let bound = plan.table.taps + n + plan.step_i + 1;
                assert!(r.buf.len() <= bound, "{from} -> {to}: buffer {} > {bound}", r.buf.len());
            }
            assert_eq!(r.received(), at);
        }
        r.finish(&mut out);
        out
    }

    #[test]
    fn streaming_is_bit_identical_to_the_whole_signal() {
        let pairs: &[(u32, u32)] = &[
            (44100, 16000),
            (48000, 16000),
            (8000, 16000),
            (22050, 16000),
            (11025, 16000),
            (12345, 16000),
            (44101, 16000), // interpolated table without forcing
            (16000, 8000),
            (16000, 16000),
            (10_000_000, 16000),
        ];
        let chunkings: &[&[usize]] = &[&[1], &[7], &[1000], &[4097], &[3, 1, 250, 17, 9999], &[usize::MAX]];
        for &(from, to) in pairs {
            let len = (from as usize / 10).min(300_000); // 0.1 s; 30 ms at 10 MHz
            let x = test_signal(len, from);
            for force_interp in [false, true] {
                let whole = resample_impl(&x, from, to, force_interp);
                for sizes in chunkings {
                    if from >= 1_000_000 && sizes[0] == 1 {
                        continue; // a million single-sample pushes prove nothing more
                    }
                    let got = streamed(&x, from, to, force_interp, sizes);
                    assert_eq!(got.len(), whole.len(), "{from} -> {to} in {sizes:?}");
                    let same = got.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{from} -> {to} (interp {force_interp}) in {sizes:?}: not bit-identical"
                    );
                }
            }
            // Short signals, where the kernel overhangs both ends at once.
            for len in [0, 1, 2, 3, 7, 20, 39] {
                let x = test_signal(len, from);
                let want = resample(&x, from, to);
                for sizes in [&[1usize][..], &[usize::MAX]] {
                    let got = streamed(&x, from, to, false, sizes);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{len} samples {from} -> {to} in {sizes:?}"
                    );
                }
            }
        }
    }

    /// `cargo test --release --lib resample::tests::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn speed_10_minutes_48k() {
        let x = sine(48000 * 600, 48000, 440.0, 0.0);
        for (from, to) in [(48000, 16000), (44100, 16000), (8000, 16000), (44101, 16000)] {
            let x = &x[..from as usize * 600];
            let t = std::time::Instant::now();
            let y = resample(x, from, to);
            eprintln!(
                "10 min {from} -> {to}: {:.2} s ({} outputs)",
                t.elapsed().as_secs_f64(),
                y.len()
            );
        }
        // Table construction dominates for short inputs at odd rates.
        for from in [12345, 15999, 19980, 44101] {
            let t = std::time::Instant::now();
            resample(&x[..from as usize], from, 16000);
            eprintln!("1 s {from} -> 16000: {:.3} s", t.elapsed().as_secs_f64());
        }
    }
}
