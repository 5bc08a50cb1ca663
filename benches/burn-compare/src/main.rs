//! The issue-8 comparison in burn's wgpu backend: the same workloads `wgpu-mlkd bench teacher|train` time, and
//! the model's matmul shapes, written with burn's own modules (random weights: speed does not depend on the
//! values). What is timed mirrors src/cli/bench.rs: one warm-up run (which also compiles the kernels and runs
//! burn's autotune), then the median of `--repeat` runs, each ending with its result read back and the device
//! synchronised. The last line carries the same key as ours, so benches/compare.sh reads both.
//!
//!   burn-compare matmul [--repeat N]
//!   burn-compare teacher [--seconds S] [--repeat N]
//!   burn-compare train [--batch B] [--crop-seconds S] [--student-layers K] [--repeat N]
//!
//! The graphics API follows WGPU_BACKEND as ours does (vulkan, gl, metal, dx12; unset: burn's own choice);
//! the adapter within it is cubecl's default (a GPU before a software one; CUBECL_WGPU_DEFAULT_DEVICE overrides,
//! e.g. `Cpu`). The chosen adapter is printed first.

use std::time::Instant;

use anyhow::{bail, Result};
use burn::module::Param;
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::nn::{
    Dropout, DropoutConfig, GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::{gelu, log_sigmoid};
use burn::tensor::module::conv1d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::wgpu::WgpuBackend;
use burn::tensor::Distribution;

// wav2vec2-base dimensions (transformers' Wav2Vec2Config defaults, facebook/wav2vec2-base).
const CONV_DIM: usize = 512;
const CONV_KERNEL: [usize; 7] = [10, 3, 3, 3, 3, 2, 2];
const CONV_STRIDE: [usize; 7] = [5, 2, 2, 2, 2, 2, 2];
const HIDDEN: usize = 768;
const HEADS: usize = 12;
const FFN: usize = 3072;
const POS_KERNEL: usize = 128;
const POS_GROUPS: usize = 16;
const TEACHER_LAYERS: usize = 12;
const EPS: f64 = 1e-5;
const SAMPLE_RATE: f64 = 16000.0;

// ---------------------------------------------------------------------------------------------------------
// Command line (a few flags, so no argument-parsing dependency)

struct Flags(Vec<String>);

impl Flags {
    fn take<T: std::str::FromStr>(&mut self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let Some(i) = self.0.iter().position(|a| a == name) else {
            return Ok(default);
        };
        let Some(v) = self.0.get(i + 1).cloned() else {
            bail!("{name} needs a value");
        };
        self.0.drain(i..=i + 1);
        v.parse().map_err(|e| anyhow::anyhow!("{name} {v}: {e}"))
    }

    fn done(self) -> Result<()> {
        if let Some(a) = self.0.first() {
            bail!("unknown argument {a:?} (see the usage in the crate's README)");
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        bail!(
            "usage: burn-compare matmul [--repeat N] | teacher [--seconds S] [--repeat N] | \
             train [--batch B] [--crop-seconds S] [--student-layers K] [--repeat N]"
        );
    }
    let what = args.remove(0);
    let mut flags = Flags(args);
    match what.as_str() {
        "matmul" => {
            let repeat = flags.take("--repeat", 5usize)?;
            flags.done()?;
            bench_matmul(check_repeat(repeat)?)
        }
        "teacher" => {
            let seconds = flags.take("--seconds", 10.0f64)?;
            let repeat = flags.take("--repeat", 5usize)?;
            flags.done()?;
            bench_teacher(seconds, check_repeat(repeat)?)
        }
        "train" => {
            let batch = flags.take("--batch", 2usize)?;
            let seconds = flags.take("--crop-seconds", 2.0f64)?;
            let layers = flags.take("--student-layers", 2usize)?;
            let repeat = flags.take("--repeat", 5usize)?;
            flags.done()?;
            if batch == 0 {
                bail!("--batch must be at least 1");
            }
            bench_train(batch, seconds, layers, check_repeat(repeat)?)
        }
        other => bail!("unknown workload {other:?}: matmul, teacher or train"),
    }
}

fn check_repeat(repeat: usize) -> Result<usize> {
    if repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    Ok(repeat)
}

fn samples_of(seconds: f64) -> Result<usize> {
    if !(seconds.is_finite() && seconds > 0.0) {
        bail!("the audio length must be a positive number of seconds, got {seconds}");
    }
    let samples = (seconds * SAMPLE_RATE).round() as usize;
    if frames(samples) == 0 {
        bail!("{seconds} s is shorter than one frame (400 samples)");
    }
    Ok(samples)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

// ---------------------------------------------------------------------------------------------------------
// Device

/// burn's wgpu device on the graphics API WGPU_BACKEND names, with the adapter printed.
fn open_device() -> Result<Device> {
    let api = match std::env::var("WGPU_BACKEND").ok().as_deref().map(str::to_lowercase).as_deref() {
        None | Some("") => WgpuBackend::Auto,
        Some("vulkan") => WgpuBackend::Vulkan,
        Some("gl") | Some("opengl") => WgpuBackend::Gl,
        Some("metal") => WgpuBackend::Metal,
        Some("dx12") => WgpuBackend::Dx12,
        Some(other) => bail!("WGPU_BACKEND={other}: expected vulkan, gl, metal or dx12"),
    };
    let mut options = Device::wgpu_options();
    if api != WgpuBackend::Auto {
        options = options.graphics_api(api);
    }
    let (device, setup) = options
        .init_with_setup()
        .map_err(|e| anyhow::anyhow!("opening burn's wgpu device ({api:?}): {e:?}"))?;
    let info = setup.adapter.get_info();
    println!(
        "adapter: {} ({:?}, {:?}); driver: {} {}",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    );
    println!("burn 0.22.1 (wgpu backend, fusion + autotune on), f32");
    Ok(device)
}

fn sync(device: &Device) -> Result<()> {
    device.sync().map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
}

// ---------------------------------------------------------------------------------------------------------
// Matmul

fn bench_matmul(repeat: usize) -> Result<()> {
    let device = open_device()?;
    let uniform = || Distribution::Uniform(-1.0, 1.0);
    // (name, batch, m, k, n, b transposed): a linear is x [m, k] times burn's weight layout [k, n]; the
    // attention products are burn's MultiHeadAttention ones (q k^T with k transposed as a view, then p v).
    let cases: [(&str, usize, usize, usize, usize, bool); 6] = [
        ("linear 149x768->3072", 1, 149, 768, 3072, false),
        ("linear 149x3072->768", 1, 149, 3072, 768, false),
        ("linear 49x768->768", 1, 49, 768, 768, false),
        ("linear 499x768->768", 1, 499, 768, 768, false),
        ("QK^T 12x149x149, k=64", 12, 149, 64, 149, true),
        ("PV 12x149x64, k=149", 12, 149, 149, 64, false),
    ];
    let mut rates = Vec::new();
    for (name, batch, m, k, n, bt) in cases {
        let a = Tensor::<3>::random([batch, m, k], uniform(), &device);
        let b = if bt {
            Tensor::<3>::random([batch, n, k], uniform(), &device)
        } else {
            Tensor::<3>::random([batch, k, n], uniform(), &device)
        };
        sync(&device)?;
        let run = || -> Result<f64> {
            let t0 = Instant::now();
            let rhs = if bt { b.clone().swap_dims(1, 2) } else { b.clone() };
            let c = a.clone().matmul(rhs);
            // Read back one element: forces the product to run and waits for it, like our sync.
            c.slice(s![0..1, 0..1, 0..1]).into_data();
            sync(&device)?;
            Ok(t0.elapsed().as_secs_f64())
        };
        run()?; // compile + autotune
        let times = (0..repeat).map(|_| run()).collect::<Result<Vec<_>>>()?;
        let best = times.iter().cloned().fold(f64::MAX, f64::min);
        let t = median(times);
        let flop = 2.0 * (batch * m * n * k) as f64;
        println!(
            "{name}: median of {repeat} {:.2} ms -> {:.2} GFLOP/s (best {:.2})",
            t * 1e3,
            flop / t / 1e9,
            flop / best / 1e9
        );
        rates.push(flop / t / 1e9);
    }
    println!("matmul_gflops_median={:.3}", median(rates));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// The model

/// Frames of the CNN for `samples` input samples.
fn frames(samples: usize) -> usize {
    let mut t = samples;
    for (&k, &s) in CONV_KERNEL.iter().zip(&CONV_STRIDE) {
        if t < k {
            return 0;
        }
        t = (t - k) / s + 1;
    }
    t
}

/// Wav2Vec2Config::forward_flops of wgpu-mlkd at base dimensions with `layers` transformer layers.
fn forward_flops(samples: usize, layers: usize) -> f64 {
    let mut flops = 0.0;
    let (mut t, mut c_in) = (samples, 1);
    for (&k, &s) in CONV_KERNEL.iter().zip(&CONV_STRIDE) {
        t = (t - k) / s + 1;
        flops += 2.0 * (t * CONV_DIM * c_in * k) as f64;
        c_in = CONV_DIM;
    }
    let (t, d, f) = (t as f64, HIDDEN as f64, FFN as f64);
    flops += 2.0 * t * c_in as f64 * d;
    flops += 2.0 * t * d * (d / POS_GROUPS as f64) * POS_KERNEL as f64;
    flops + layers as f64 * (2.0 * t * (4.0 * d * d + 2.0 * d * f) + 4.0 * t * t * d)
}

/// The CNN: 7 convolutions without bias, GroupNorm (one group per channel) after the first, GELU after each.
#[derive(Module, Debug)]
struct FeatureEncoder {
    convs: Vec<Conv1d>,
    norm: GroupNorm,
}

impl FeatureEncoder {
    fn new(device: &Device) -> Self {
        let convs = (0..CONV_KERNEL.len())
            .map(|i| {
                let c_in = if i == 0 { 1 } else { CONV_DIM };
                Conv1dConfig::new(c_in, CONV_DIM, CONV_KERNEL[i])
                    .with_stride(CONV_STRIDE[i])
                    .with_bias(false)
                    .init(device)
            })
            .collect();
        FeatureEncoder {
            convs,
            norm: GroupNormConfig::new(CONV_DIM, CONV_DIM).init(device),
        }
    }

    /// wave [B, L] -> features [B, T, 512].
    fn forward(&self, wave: Tensor<2>) -> Tensor<3> {
        let mut x: Tensor<3> = wave.unsqueeze_dim(1);
        for (i, conv) in self.convs.iter().enumerate() {
            x = conv.forward(x);
            if i == 0 {
                x = self.norm.forward(x);
            }
            x = gelu(x);
        }
        x.swap_dims(1, 2)
    }
}

/// The positional convolution: weight-normed (over all dims but the kernel's, as transformers' weight_norm
/// with dim=2), grouped, padding K/2 each side and the last frame dropped (K even), then GELU.
#[derive(Module, Debug)]
struct PositionalConv {
    v: Param<Tensor<3>>,
    g: Param<Tensor<3>>,
    bias: Param<Tensor<1>>,
}

impl PositionalConv {
    fn new(device: &Device) -> Self {
        let fan_in = (HIDDEN / POS_GROUPS * POS_KERNEL) as f64;
        let bound = 1.0 / fan_in.sqrt();
        PositionalConv {
            v: Param::from_tensor(Tensor::random(
                [HIDDEN, HIDDEN / POS_GROUPS, POS_KERNEL],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            g: Param::from_tensor(Tensor::ones([1, 1, POS_KERNEL], device)),
            bias: Param::from_tensor(Tensor::random([HIDDEN], Distribution::Uniform(-bound, bound), device)),
        }
    }

    /// h [B, T, D] -> [B, T, D].
    fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        let t = h.dims()[1];
        let v = self.v.val();
        let norm = v.clone().square().sum_dim(0).sum_dim(1).sqrt(); // [1, 1, K]
        let weight = v * (self.g.val() / norm);
        let pad = POS_KERNEL / 2;
        let y = conv1d(
            h.swap_dims(1, 2),
            weight,
            Some(self.bias.val()),
            ConvOptions::new([1], [pad], [1], POS_GROUPS),
        );
        gelu(y.narrow(2, 0, t)).swap_dims(1, 2)
    }
}

/// A post-LN transformer layer (transformers' Wav2Vec2EncoderLayer, do_stable_layer_norm false).
#[derive(Module, Debug)]
struct EncoderLayer {
    attention: MultiHeadAttention,
    attention_dropout: Dropout,
    layer_norm: LayerNorm,
    fc1: Linear,
    activation_dropout: Dropout,
    fc2: Linear,
    hidden_dropout: Dropout,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn new(device: &Device, dropout: f64) -> Self {
        EncoderLayer {
            attention: MultiHeadAttentionConfig::new(HIDDEN, HEADS)
                .with_dropout(dropout)
                .init(device),
            attention_dropout: DropoutConfig::new(dropout).init(),
            layer_norm: LayerNormConfig::new(HIDDEN).with_epsilon(EPS).init(device),
            fc1: LinearConfig::new(HIDDEN, FFN).init(device),
            activation_dropout: DropoutConfig::new(dropout).init(),
            fc2: LinearConfig::new(FFN, HIDDEN).init(device),
            hidden_dropout: DropoutConfig::new(dropout).init(),
            final_layer_norm: LayerNormConfig::new(HIDDEN).with_epsilon(EPS).init(device),
        }
    }

    fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        let a = self.attention.forward(MhaInput::self_attn(h.clone())).context;
        let h = self.layer_norm.forward(h + self.attention_dropout.forward(a));
        let f = self.activation_dropout.forward(gelu(self.fc1.forward(h.clone())));
        let f = self.hidden_dropout.forward(self.fc2.forward(f));
        self.final_layer_norm.forward(h + f)
    }
}

/// wav2vec 2.0 base-shaped: CNN, feature projection (LayerNorm + Linear 512 -> 768), positional conv,
/// encoder LayerNorm, `layers` transformer layers. Dropout acts only on an autodiff device.
#[derive(Module, Debug)]
struct Wav2Vec2 {
    cnn: FeatureEncoder,
    projection_norm: LayerNorm,
    projection: Linear,
    pos_conv: PositionalConv,
    encoder_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
}

impl Wav2Vec2 {
    fn new(device: &Device, layers: usize, dropout: f64) -> Self {
        Wav2Vec2 {
            cnn: FeatureEncoder::new(device),
            projection_norm: LayerNormConfig::new(CONV_DIM).with_epsilon(EPS).init(device),
            projection: LinearConfig::new(CONV_DIM, HIDDEN).init(device),
            pos_conv: PositionalConv::new(device),
            encoder_norm: LayerNormConfig::new(HIDDEN).with_epsilon(EPS).init(device),
            layers: (0..layers).map(|_| EncoderLayer::new(device, dropout)).collect(),
        }
    }

    /// wave [B, L] -> last hidden state [B, T, 768].
    fn forward(&self, wave: Tensor<2>) -> Tensor<3> {
        let features = self.cnn.forward(wave);
        let h = self.projection.forward(self.projection_norm.forward(features));
        let h = h.clone() + self.pos_conv.forward(h);
        let mut h = self.encoder_norm.forward(h);
        for layer in &self.layers {
            h = layer.forward(h);
        }
        h
    }
}

/// The MLKD student: the encoder plus one prediction head per target layer, sharing the first projection:
/// Linear(D, N D) -> GELU -> for head n, columns n D..(n+1) D -> Linear(D, D) (as wgpu-mlkd's Student and
/// benches/pytorch_train_step.py).
#[derive(Module, Debug)]
struct Student {
    encoder: Wav2Vec2,
    proj: Linear,
    heads: Vec<Linear>,
}

impl Student {
    fn new(device: &Device, layers: usize, heads: usize) -> Self {
        Student {
            encoder: Wav2Vec2::new(device, layers, 0.1),
            proj: LinearConfig::new(HIDDEN, HIDDEN * heads).init(device),
            heads: (0..heads).map(|_| LinearConfig::new(HIDDEN, HIDDEN).init(device)).collect(),
        }
    }

    /// The distillation loss: per head mean|p - t| + mean over frames of -log sigmoid(cos(p, t)), averaged
    /// over heads (lambda 1).
    fn loss(&self, wave: Tensor<2>, targets: &[Tensor<3>]) -> Tensor<1> {
        let h = self.encoder.forward(wave);
        let z = gelu(self.proj.forward(h));
        let mut total: Option<Tensor<1>> = None;
        for (n, (head, target)) in self.heads.iter().zip(targets).enumerate() {
            let p = head.forward(z.clone().narrow(2, n * HIDDEN, HIDDEN));
            let l1 = (p.clone() - target.clone()).abs().mean();
            // torch's cosine_similarity: x.y / max(|x| |y|, 1e-8).
            let dot = (p.clone() * target.clone()).sum_dim(2);
            let norms = p.square().sum_dim(2).sqrt() * target.clone().square().sum_dim(2).sqrt();
            let cos = dot / norms.clamp_min(1e-8);
            let term = l1 - log_sigmoid(cos).mean();
            total = Some(match total {
                None => term,
                Some(acc) => acc + term,
            });
        }
        total.expect("at least one head").div_scalar(self.heads.len() as f32)
    }
}

/// The same deterministic speech-like waveform as `wgpu-mlkd bench` (src/cli/bench.rs).
fn waveform(n: usize, phase: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = (i + phase) as f32 / 16000.0;
            0.4 * (2.0 * std::f32::consts::PI * 140.0 * t).sin() + 0.2 * (2.0 * std::f32::consts::PI * 910.0 * t).sin()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Teacher forward

fn bench_teacher(seconds: f64, repeat: usize) -> Result<()> {
    let samples = samples_of(seconds)?;
    let device = open_device()?;
    let model = Wav2Vec2::new(&device, TEACHER_LAYERS, 0.0);
    let wave = Tensor::<2>::from_data(TensorData::new(waveform(samples, 0), [1, samples]), &device);
    sync(&device)?;
    let run = || -> Result<f64> {
        let t0 = Instant::now();
        let out = model.forward(wave.clone());
        out.into_data();
        sync(&device)?;
        Ok(t0.elapsed().as_secs_f64())
    };
    run()?;
    let times = (0..repeat).map(|_| run()).collect::<Result<Vec<_>>>()?;
    let t = median(times);
    let flops = forward_flops(samples, TEACHER_LAYERS);
    println!(
        "teacher: {TEACHER_LAYERS} layers, width {HIDDEN}, {:.1} M parameters, {seconds} s of audio ({} frames)",
        model.num_params() as f64 / 1e6,
        frames(samples)
    );
    println!("model GFLOPs per forward: {:.2}", flops / 1e9);
    println!(
        "median of {repeat}: {t:.4} s -> {:.2} GFLOP/s effective",
        flops / t / 1e9
    );
    println!("teacher_forward_seconds_per_audio_second={:.6}", t / seconds);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Student training step

fn bench_train(batch: usize, seconds: f64, layers: usize, repeat: usize) -> Result<()> {
    let samples = samples_of(seconds)?;
    let device = open_device()?.autodiff();
    // wgpu-mlkd's default targets for a 12-layer teacher: layers 4, 8, 12.
    let n_heads = 3;
    let mut student = Student::new(&device, layers, n_heads);
    let n_params = student.num_params();
    let t = frames(samples);
    let wave: Vec<f32> = (0..batch).flat_map(|b| waveform(samples, 977 * b)).collect();
    let wave = Tensor::<2>::from_data(TensorData::new(wave, [batch, samples]), &device);
    let targets: Vec<Tensor<3>> = (0..n_heads)
        .map(|n| {
            let v: Vec<f32> = (0..batch * t * HIDDEN)
                .map(|i| ((i * (n + 1)) as f32 * 1e-3).cos())
                .collect();
            Tensor::<3>::from_data(TensorData::new(v, [batch, t, HIDDEN]), &device)
        })
        .collect();
    // wgpu-mlkd's AdamWConfig::default(): betas (0.9, 0.98), eps 1e-6, weight decay 1e-6, clip norm 5.
    let mut opt = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.98)
        .with_epsilon(1e-6)
        .with_weight_decay(1e-6)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(5.0)))
        .init();
    sync(&device)?;
    let mut step = |student: Student| -> Result<(Student, f64, f32)> {
        let t0 = Instant::now();
        let loss = student.loss(wave.clone(), &targets);
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        let student = opt.step(2e-4, student, grads);
        let value: f32 = loss.into_scalar();
        // The update has been queued after the loss: wait for it too (ours reads back after the AdamW kernels).
        sync(&device)?;
        Ok((student, t0.elapsed().as_secs_f64(), value))
    };
    let (s, _, first_loss) = step(student)?;
    student = s;
    let mut times = Vec::with_capacity(repeat);
    let mut last_loss = first_loss;
    for _ in 0..repeat {
        let (s, time, loss) = step(student)?;
        student = s;
        times.push(time);
        last_loss = loss;
    }
    if !last_loss.is_finite() {
        bail!("the loss is not finite ({last_loss}): the step is broken");
    }
    let time = median(times);
    let d = HIDDEN as f64;
    let head_flops = 2.0 * (t as f64) * d * d * n_heads as f64 * 2.0;
    let flops = 3.0 * batch as f64 * (forward_flops(samples, layers) + head_flops);
    println!(
        "student: {layers} layers, width {HIDDEN}, {n_heads} heads, {:.1} M parameters; batch {batch} x {seconds} s \
         ({t} frames); loss {first_loss:.4} -> {last_loss:.4}",
        n_params as f64 / 1e6
    );
    println!("model GFLOPs per step (3x forward): {:.2}", flops / 1e9);
    println!(
        "median of {repeat}: {time:.4} s -> {:.2} GFLOP/s effective",
        flops / time / 1e9
    );
    println!("student_train_step_seconds={time:.6}");
    Ok(())
}
