//! The wav2vec 2.0 forward pass, as transformers' `Wav2Vec2Model(...).eval()` computes it
//! (`../shared/docs/wav2vec2-reference.md`). Both architectures: group norm + post-LN (base, original large)
//! and layer norm + pre-LN "stable layer norm" (lv60, XLS-R).
//!
//! One implementation serves the frozen teacher (a no-grad [`Tape`]: fused kernels, nothing saved) and the
//! trained student (a recording tape). Parameters carry their checkpoint names. Activations are
//! channels-last: `[B, T, C]`. Dimension letters: B batch, L samples, T frames, C conv channels, D hidden
//! size, F FFN size.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context as _, Result};

use super::config::{FeatExtractNorm, Wav2Vec2Config};
use super::weights::Checkpoint;
use crate::gpu::{DType, Gpu, Tensor};
use crate::ops::attention;
use crate::ops::conv1d::{self, Conv1dWeight};
use crate::ops::matmul::{linear_half, Activation, HalfWeight};
use crate::ops::norm::{self, ChannelStats};
use crate::tape::{Param, Tape, Var};

fn load_param(gpu: &Gpu, ck: &mut Checkpoint, name: &str, shape: &[usize]) -> Result<Arc<Param>> {
    Ok(Param::new(name, Tensor::from_slice(gpu, &ck.take(name, shape), shape)?))
}

/// `nn.Linear`: weight [out, in] (torch layout), bias [out].
pub struct Linear {
    pub weight: Arc<Param>,
    pub bias: Option<Arc<Param>>,
    /// The weight in f16, for inference only ([`Linear::to_half`]); the f32 weight is then dropped.
    pub half: Option<HalfWeight>,
}

impl Linear {
    pub fn load(gpu: &Gpu, ck: &mut Checkpoint, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: load_param(gpu, ck, &format!("{name}.weight"), &[out, inp])?,
            bias: if bias {
                Some(load_param(gpu, ck, &format!("{name}.bias"), &[out])?)
            } else {
                None
            },
            half: None,
        })
    }

    pub fn out_features(&self) -> usize {
        self.half
            .as_ref()
            .map_or_else(|| self.weight.value().shape()[0], |h| h.out_features())
    }

    /// Stores the weight in f16 and frees the f32 one (a one-element placeholder keeps the parameter's
    /// name): half the weight memory, products still summed in f32 (error bound at [`HalfWeight`]). The
    /// layer then runs forward without gradients only.
    pub fn to_half(&mut self) -> Result<()> {
        if self.half.is_none() {
            self.half = Some(HalfWeight::from_f32(self.weight.value(), &self.weight.name)?);
            self.weight = placeholder(&self.weight)?;
        }
        Ok(())
    }

    fn forward_act(&self, tape: &Tape, x: &Var, act: Activation) -> Result<Var> {
        let b = self.bias.as_ref().map(|b| tape.param(b));
        if let Some(h) = &self.half {
            ensure!(
                !tape.is_recording(),
                "{}: an f16 layer runs forward without gradients only",
                self.weight.name
            );
            return Ok(tape.constant(linear_half(x.value(), h, b.as_ref().map(|b| b.value()), act)?));
        }
        match act {
            Activation::None => tape.linear(x, &tape.param(&self.weight), b.as_ref()),
            Activation::Gelu => tape.linear_gelu(x, &tape.param(&self.weight), b.as_ref()),
        }
    }

    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        self.forward_act(tape, x, Activation::None)
    }

    pub fn forward_gelu(&self, tape: &Tape, x: &Var) -> Result<Var> {
        self.forward_act(tape, x, Activation::Gelu)
    }

    pub fn parameters(&self) -> Vec<Arc<Param>> {
        std::iter::once(self.weight.clone()).chain(self.bias.clone()).collect()
    }
}

/// A one-element stand-in for a parameter whose values were moved elsewhere (f16, a packed projection): keeps
/// the name, frees the memory.
fn placeholder(p: &Param) -> Result<Arc<Param>> {
    Ok(Param::new(p.name.clone(), Tensor::zeros(p.value().gpu(), &[1])?))
}

/// `nn.LayerNorm` / `nn.GroupNorm` affine parameters, [C] each.
pub struct Norm {
    pub weight: Arc<Param>,
    pub bias: Arc<Param>,
}

impl Norm {
    pub fn load(gpu: &Gpu, ck: &mut Checkpoint, name: &str, c: usize) -> Result<Norm> {
        Ok(Norm {
            weight: load_param(gpu, ck, &format!("{name}.weight"), &[c])?,
            bias: load_param(gpu, ck, &format!("{name}.bias"), &[c])?,
        })
    }

    pub fn layer_norm(&self, tape: &Tape, x: &Var, eps: f32) -> Result<Var> {
        tape.layer_norm(x, &tape.param(&self.weight), &tape.param(&self.bias), eps)
    }

    /// LayerNorm(x + residual) (post-LN residual connections; one kernel for inference).
    pub fn add_layer_norm(&self, tape: &Tape, x: &Var, residual: &Var, eps: f32) -> Result<Var> {
        tape.add_layer_norm(x, residual, &tape.param(&self.weight), &tape.param(&self.bias), eps)
    }

    pub fn parameters(&self) -> Vec<Arc<Param>> {
        vec![self.weight.clone(), self.bias.clone()]
    }
}

/// `feature_extractor.conv_layers.{i}`: Conv1d (no padding), optional norm, GELU.
pub struct ConvLayer {
    pub weight: Arc<Param>,
    pub bias: Option<Arc<Param>>,
    pub norm: Option<Norm>,
    pub kernel: usize,
    pub stride: usize,
    /// The weight packed once, for inference, when the model is frozen ([`Wav2Vec2::freeze`]).
    frozen: Option<Conv1dWeight>,
}

impl ConvLayer {
    fn conv(&self, tape: &Tape, x: &Var, gelu: bool) -> Result<Var> {
        let b = self.bias.as_ref().map(|b| tape.param(b));
        if let (Some(w), false) = (&self.frozen, tape.is_recording()) {
            let bias = b.as_ref().map(|b| b.value());
            return Ok(tape.constant(conv1d::conv1d_packed(x.value(), w, bias, self.stride, 0, gelu)?));
        }
        tape.conv1d(x, &tape.param(&self.weight), b.as_ref(), self.stride, 0, 1, gelu)
    }

    fn parameters(&self) -> Vec<Arc<Param>> {
        let mut p = vec![self.weight.clone()];
        p.extend(self.bias.clone());
        p.extend(self.norm.iter().flat_map(|n| n.parameters()));
        p
    }
}

/// `encoder.layers.{n}`, shared by the teacher and the student.
pub struct EncoderLayer {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm: Norm,
    pub intermediate_dense: Linear,
    pub output_dense: Linear,
    pub final_layer_norm: Norm,
    pub heads: usize,
    pub eps: f32,
    pub stable: bool,
    /// q, k and v as one `[3 D, D]` projection, for inference where the attention reads them packed
    /// ([`EncoderLayer::pack_qkv`]); the three projections' own weights are then freed.
    qkv_packed: Option<Linear>,
}

impl EncoderLayer {
    pub fn load(gpu: &Gpu, ck: &mut Checkpoint, name: &str, cfg: &Wav2Vec2Config) -> Result<EncoderLayer> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(EncoderLayer {
            q_proj: Linear::load(gpu, ck, &format!("{name}.attention.q_proj"), d, d, true)?,
            k_proj: Linear::load(gpu, ck, &format!("{name}.attention.k_proj"), d, d, true)?,
            v_proj: Linear::load(gpu, ck, &format!("{name}.attention.v_proj"), d, d, true)?,
            out_proj: Linear::load(gpu, ck, &format!("{name}.attention.out_proj"), d, d, true)?,
            layer_norm: Norm::load(gpu, ck, &format!("{name}.layer_norm"), d)?,
            intermediate_dense: Linear::load(gpu, ck, &format!("{name}.feed_forward.intermediate_dense"), f, d, true)?,
            output_dense: Linear::load(gpu, ck, &format!("{name}.feed_forward.output_dense"), d, f, true)?,
            final_layer_norm: Norm::load(gpu, ck, &format!("{name}.final_layer_norm"), d)?,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            stable: cfg.do_stable_layer_norm,
            qkv_packed: None,
        })
    }

    /// Packs the q, k and v projections into one `[3 D, D]` linear layer (weights stacked, biases
    /// concatenated), so that inference runs one product of 3 D columns instead of three of D and the
    /// inference attention reads its output in place ([`attention::self_attention_packed`]); the projections'
    /// results are bit-identical (each output column is the same sum). The three f32 weights are freed (one-element placeholders keep
    /// their names): the layer then runs forward without gradients only. A no-op for layers already in f16 or
    /// without the three biases.
    pub fn pack_qkv(&mut self) -> Result<()> {
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        if self.qkv_packed.is_some() || parts.iter().any(|l| l.half.is_some() || l.bias.is_none()) {
            return Ok(());
        }
        let w = self.q_proj.weight.value().clone();
        let (gpu, &[d, d_in]) = (w.gpu(), w.shape()) else {
            bail!(
                "{}: expected a [out, in] weight, got {:?}",
                self.q_proj.weight.name,
                w.shape()
            );
        };
        for l in parts {
            ensure!(
                l.weight.value().shape() == [d, d_in],
                "{}: {:?} differs from q_proj's [{d}, {d_in}]; cannot pack q, k, v",
                l.weight.name,
                l.weight.value().shape()
            );
        }
        let weight = Tensor::empty(gpu, &[3 * d, d_in], DType::F32)?;
        let bias = Tensor::empty(gpu, &[3 * d], DType::F32)?;
        for (i, l) in parts.iter().enumerate() {
            weight.copy_from(i * d * d_in, l.weight.value(), 0, d * d_in)?;
            let b = l.bias.as_ref().expect("checked above");
            bias.copy_from(i * d, b.value(), 0, d)?;
        }
        let name = self.q_proj.weight.name.replace("q_proj.weight", "qkv_proj");
        self.qkv_packed = Some(Linear {
            weight: Param::new(format!("{name}.weight"), weight),
            bias: Some(Param::new(format!("{name}.bias"), bias)),
            half: None,
        });
        for l in [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj] {
            l.weight = placeholder(&l.weight)?;
            if let Some(b) = &mut l.bias {
                *b = placeholder(b)?;
            }
        }
        Ok(())
    }

    pub fn parameters(&self) -> Vec<Arc<Param>> {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
            .iter()
            .flat_map(|l| l.parameters())
            .chain(self.layer_norm.parameters())
            .chain(self.intermediate_dense.parameters())
            .chain(self.output_dense.parameters())
            .chain(self.final_layer_norm.parameters())
            .collect()
    }

    fn attention(&self, tape: &Tape, x: &Var, key_mask: Option<&Tensor>, dropout: f32) -> Result<Var> {
        if let Some(qkv) = &self.qkv_packed {
            ensure!(
                !tape.is_recording(),
                "{}: q, k and v were packed for inference (a frozen model); it runs forward without gradients only",
                qkv.weight.name
            );
            let qkv = qkv.forward(tape, x)?;
            let a = tape.constant(attention::self_attention_packed(qkv.value(), self.heads, key_mask)?);
            return self.out_proj.forward(tape, &a); // dropout is a no-op without gradients
        }
        let q = self.q_proj.forward(tape, x)?;
        let k = self.k_proj.forward(tape, x)?;
        let v = self.v_proj.forward(tape, x)?;
        let a = tape.self_attention(&q, &k, &v, self.heads, key_mask, dropout)?;
        tape.dropout(&self.out_proj.forward(tape, &a)?, dropout)
    }

    fn feed_forward(&self, tape: &Tape, x: &Var, dropout: f32) -> Result<Var> {
        // The intermediate activation [rows, F] is the largest tensor of a layer; without gradients, long
        // inputs run it in row chunks that stay within half a storage binding.
        let f = self.intermediate_dense.out_features();
        let max_rows = (x.value().gpu().max_binding_bytes() / 2) as usize / (f * 4);
        if !tape.is_recording() {
            return Ok(tape.constant(self.feed_forward_rows(x.value(), max_rows.max(1))?));
        }
        let h = tape.dropout(&self.intermediate_dense.forward_gelu(tape, x)?, dropout)?;
        tape.dropout(&self.output_dense.forward(tape, &h)?, dropout)
    }

    /// The inference feed-forward over at most `max_rows` rows (frames of every batch item) at a time.
    pub fn feed_forward_rows(&self, x: &Tensor, max_rows: usize) -> Result<Tensor> {
        let tape = Tape::no_grad();
        let d = *x.shape().last().expect("[B, T, D]");
        let rows = x.numel() / d;
        let ff = |piece: &Tensor| -> Result<Tensor> {
            let h = self
                .intermediate_dense
                .forward_gelu(&tape, &tape.constant(piece.clone()))?;
            Ok(self.output_dense.forward(&tape, &h)?.value().clone())
        };
        if rows <= max_rows {
            return ff(x);
        }
        let out = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
        for r0 in (0..rows).step_by(max_rows) {
            let n = max_rows.min(rows - r0);
            let piece = Tensor::empty(x.gpu(), &[n, d], DType::F32)?;
            piece.copy_from(0, x, r0 * d, n * d)?;
            out.copy_from(r0 * d, &ff(&piece)?, 0, n * d)?;
        }
        Ok(out)
    }

    /// h: [B, T, D] -> [B, T, D]. `dropout` applies after the attention output and in the feed-forward
    /// (transformers' hidden and activation dropout); it is a no-op on a no-grad tape.
    pub fn forward(&self, tape: &Tape, h: &Var, key_mask: Option<&Tensor>, dropout: f32) -> Result<Var> {
        if self.stable {
            // Pre-LN: h + Attn(LN1(h)), then h + FFN(LN2(h)).
            let a = self.attention(tape, &self.layer_norm.layer_norm(tape, h, self.eps)?, key_mask, dropout)?;
            let h = tape.add(h, &a)?;
            let f = self.feed_forward(tape, &self.final_layer_norm.layer_norm(tape, &h, self.eps)?, dropout)?;
            tape.add(&h, &f)
        } else {
            // Post-LN: LN1(h + Attn(h)), then LN2(h + FFN(h)).
            let a = self.attention(tape, h, key_mask, dropout)?;
            let h = self.layer_norm.add_layer_norm(tape, h, &a, self.eps)?;
            let f = self.feed_forward(tape, &h, dropout)?;
            self.final_layer_norm.add_layer_norm(tape, &h, &f, self.eps)
        }
    }
}

/// Everything a forward pass produces, on the GPU. Read back only what is needed.
pub struct Wav2Vec2Output {
    /// LayerNorm'd CNN features, [B, T, C].
    pub extract_features: Tensor,
    /// transformers' numbering: 0 is the input of the first layer, n the output of layer n. [B, T, D] each.
    pub hidden_states: Vec<Tensor>,
    /// Equals hidden_states[N] for post-LN; the final encoder LayerNorm of it for the stable variant.
    pub last_hidden_state: Tensor,
}

/// The same on a tape, for training.
pub struct Wav2Vec2Vars {
    pub extract_features: Var,
    pub hidden_states: Vec<Var>,
    pub last_hidden_state: Var,
}

/// Training-time switches; the defaults are inference.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainOptions {
    /// Dropout in the transformer layers (DistilHuBERT: 0.1).
    pub dropout: f32,
    /// Gradient multiplier on the CNN output (DistilHuBERT's feature_grad_mult: 0.1); None = 1.
    pub feature_grad_mult: Option<f32>,
}

pub struct Wav2Vec2 {
    pub config: Wav2Vec2Config,
    pub gpu: Gpu,
    pub conv_layers: Vec<ConvLayer>,
    /// `feature_projection.layer_norm` and `.projection`.
    pub projection_norm: Norm,
    pub projection: Linear,
    /// `encoder.pos_conv_embed.conv`: weight-norm g [1, 1, K] and v [D, D/G, K], and the bias [D].
    pub pos_conv_g: Arc<Param>,
    pub pos_conv_v: Arc<Param>,
    pub pos_conv_bias: Arc<Param>,
    /// `encoder.layer_norm`.
    pub encoder_norm: Norm,
    pub layers: Vec<EncoderLayer>,
    /// The positional conv's weight (weight norm applied) packed once, for inference, when frozen.
    pos_conv_frozen: Option<Conv1dWeight>,
}

const POS_G: &str = "encoder.pos_conv_embed.conv.parametrizations.weight.original0";
const POS_V: &str = "encoder.pos_conv_embed.conv.parametrizations.weight.original1";

impl Wav2Vec2 {
    /// Loads `dir/config.json` and its safetensors weights; any missing, mis-shaped or unexpected tensor
    /// is an error that lists each one.
    pub fn load(gpu: &Gpu, dir: &Path) -> Result<Wav2Vec2> {
        let config = Wav2Vec2Config::from_file(&dir.join("config.json"))?;
        let mut ck = Checkpoint::open(dir)?;
        let model = Self::from_checkpoint(gpu, config, &mut ck)?;
        ck.finish()?;
        Ok(model)
    }

    /// Takes the model's tensors from `ck` (the caller decides what else the checkpoint may hold).
    pub fn from_checkpoint(gpu: &Gpu, config: Wav2Vec2Config, ck: &mut Checkpoint) -> Result<Wav2Vec2> {
        let cfg = &config;
        let mut conv_layers = Vec::new();
        let mut c_in = 1;
        for (i, ((&c, &k), &s)) in cfg
            .conv_dim
            .iter()
            .zip(&cfg.conv_kernel)
            .zip(&cfg.conv_stride)
            .enumerate()
        {
            let name = format!("feature_extractor.conv_layers.{i}");
            let weight = load_param(gpu, ck, &format!("{name}.conv.weight"), &[c, c_in, k])?;
            let bias = if cfg.conv_bias {
                Some(load_param(gpu, ck, &format!("{name}.conv.bias"), &[c])?)
            } else {
                None
            };
            let has_norm = cfg.feat_extract_norm == FeatExtractNorm::Layer || i == 0;
            let norm = if has_norm {
                Some(Norm::load(gpu, ck, &format!("{name}.layer_norm"), c)?)
            } else {
                None
            };
            conv_layers.push(ConvLayer {
                weight,
                bias,
                norm,
                kernel: k,
                stride: s,
                frozen: None,
            });
            c_in = c;
        }
        let (d, kpos, g) = (
            cfg.hidden_size,
            cfg.num_conv_pos_embeddings,
            cfg.num_conv_pos_embedding_groups,
        );
        let projection_norm = Norm::load(gpu, ck, "feature_projection.layer_norm", c_in)?;
        let projection = Linear::load(gpu, ck, "feature_projection.projection", d, c_in, true)?;

        // Older checkpoints name the weight-norm parts weight_g / weight_v; parameters keep the new names.
        let pos = "encoder.pos_conv_embed.conv";
        let wg = ck.take_any(&[POS_G, &format!("{pos}.weight_g")], &[1, 1, kpos]);
        let wv = ck.take_any(&[POS_V, &format!("{pos}.weight_v")], &[d, d / g, kpos]);
        let pos_conv_g = Param::new(POS_G, Tensor::from_slice(gpu, &wg, &[1, 1, kpos])?);
        let pos_conv_v = Param::new(POS_V, Tensor::from_slice(gpu, &wv, &[d, d / g, kpos])?);
        let pos_conv_bias = load_param(gpu, ck, &format!("{pos}.bias"), &[d])?;
        let encoder_norm = Norm::load(gpu, ck, "encoder.layer_norm", d)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|n| EncoderLayer::load(gpu, ck, &format!("encoder.layers.{n}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Wav2Vec2 {
            gpu: gpu.clone(),
            conv_layers,
            projection_norm,
            projection,
            pos_conv_g,
            pos_conv_v,
            pos_conv_bias,
            encoder_norm,
            layers,
            config,
            pos_conv_frozen: None,
        })
    }

    /// For a model whose weights will not change again (a teacher, a frozen upstream): packs every
    /// convolution's weight into the kernels' layout once, the positional conv's after its weight norm, so
    /// inference skips that work on every forward (8.6% of the kernel time of a 1.5 s forward in lavapipe's
    /// profile; the wall-time gain there is within run-to-run noise, `benches/RESULTS.md`); and where the
    /// inference attention can read them packed, packs each layer's q, k and v into one projection
    /// ([`EncoderLayer::pack_qkv`]).
    /// Results are bit-identical (the same kernels on the same packed values). Passes that record gradients still pack
    /// the current weights every time, but a frozen model's inference would not see a later change to its
    /// weights: do not train one.
    pub fn freeze(&mut self) -> Result<()> {
        // Where the inference attention can read them in place (GPUs: the quad kernel or the unfused path's
        // matmuls; not lavapipe's subgroup kernel), q, k and v become one product (3 dispatches -> 1, or 6 -> 2
        // with split-K). `WGPU_MLKD_NO_QKV_PACKING` (any value) keeps them apart, for measuring what packing gives.
        let d = self.config.hidden_size;
        let packable = attention::inference_reads_packed(&self.gpu, d, self.config.num_attention_heads);
        if packable && std::env::var_os("WGPU_MLKD_NO_QKV_PACKING").is_none() {
            self.pack_qkv()?;
        }
        for layer in &mut self.conv_layers {
            layer.frozen = Some(Conv1dWeight::pack(layer.weight.value(), 1)?);
        }
        let tape = Tape::no_grad();
        let w = tape.weight_norm(&tape.param(&self.pos_conv_g), &tape.param(&self.pos_conv_v))?;
        self.pos_conv_frozen = Some(Conv1dWeight::pack(
            w.value(),
            self.config.num_conv_pos_embedding_groups,
        )?);
        Ok(())
    }

    /// [`Wav2Vec2::freeze`], and with `f16_weights` every linear layer's weight (the transformer's projections
    /// and feed-forwards, the feature projection) stored in f16 with its f32 copy freed: the weights then take
    /// about 55% of their f32 memory, inference only. The products still sum in f32; the hidden states move
    /// by the weights' rounding (the bound at [`HalfWeight`]; measured against transformers in
    /// tests/wav2vec2_fixtures.rs).
    pub fn freeze_with(&mut self, f16_weights: bool) -> Result<()> {
        self.freeze()?;
        if !f16_weights {
            return Ok(());
        }
        self.projection.to_half()?;
        for l in &mut self.layers {
            if let Some(qkv) = &mut l.qkv_packed {
                qkv.to_half()?;
            } else {
                for lin in [&mut l.q_proj, &mut l.k_proj, &mut l.v_proj] {
                    lin.to_half()?;
                }
            }
            for lin in [&mut l.out_proj, &mut l.intermediate_dense, &mut l.output_dense] {
                lin.to_half()?;
            }
        }
        Ok(())
    }

    /// [`EncoderLayer::pack_qkv`] for every layer (which [`Wav2Vec2::freeze`] does where the inference attention
    /// reads them packed; tests call it to check the packed path on any adapter). Inference only afterwards.
    pub fn pack_qkv(&mut self) -> Result<()> {
        self.layers.iter_mut().try_for_each(EncoderLayer::pack_qkv)
    }

    /// Every parameter, named as in the checkpoint, in a fixed order.
    pub fn parameters(&self) -> Vec<Arc<Param>> {
        let mut p: Vec<Arc<Param>> = self.conv_layers.iter().flat_map(|c| c.parameters()).collect();
        p.extend(self.projection_norm.parameters());
        p.extend(self.projection.parameters());
        p.extend([
            self.pos_conv_g.clone(),
            self.pos_conv_v.clone(),
            self.pos_conv_bias.clone(),
        ]);
        p.extend(self.encoder_norm.parameters());
        p.extend(self.layers.iter().flat_map(|l| l.parameters()));
        p
    }

    fn eps(&self) -> f32 {
        self.config.layer_norm_eps as f32
    }

    /// The longest input [`Wav2Vec2::forward`] takes on this GPU, in 16 kHz samples
    /// ([`Wav2Vec2Config::max_samples`] at this GPU's binding limit).
    pub fn max_samples(&self) -> usize {
        self.config.max_samples(self.gpu.max_binding_bytes())
    }

    fn check_length(&self, samples: usize, frames: usize) -> Result<()> {
        let max = self.max_samples();
        if samples > max {
            let max_bytes = self.gpu.max_binding_bytes();
            bail!(
                "audio of {samples} samples ({:.1} s = {:.1} min at 16 kHz, {frames} frames) is longer than this \
                 GPU can take in one piece: at most {max} samples ({:.1} s = {:.1} min), set by its largest storage \
                 binding of {} bytes ({:.0} MiB); split the file into shorter pieces (`infer` classifies a long \
                 recording segment by segment)",
                samples as f64 / 16000.0,
                samples as f64 / 16000.0 / 60.0,
                max as f64 / 16000.0,
                max as f64 / 16000.0 / 60.0,
                max_bytes,
                max_bytes as f64 / 1048576.0
            );
        }
        Ok(())
    }

    /// Runs the model on one utterance (already normalised if the checkpoint expects it), without gradients.
    pub fn forward(&self, samples: &[f32]) -> Result<Wav2Vec2Output> {
        let frames = self.config.frames(samples.len());
        if frames == 0 {
            bail!(
                "audio of {} samples is shorter than the model's receptive field ({} samples = {:.1} ms at 16 kHz)",
                samples.len(),
                self.config.receptive_field(),
                self.config.receptive_field() as f64 / 16.0
            );
        }
        self.check_length(samples.len(), frames)?;
        let wave = Tensor::from_slice(&self.gpu, samples, &[1, samples.len(), 1])?;
        let features = self.feature_encoder(&wave).context("feature encoder")?;
        let tape = Tape::no_grad();
        let out = self.encode(&tape, &tape.constant(features), None, TrainOptions::default())?;
        Ok(Wav2Vec2Output {
            extract_features: out.extract_features.value().clone(),
            hidden_states: out.hidden_states.iter().map(|h| h.value().clone()).collect(),
            last_hidden_state: out.last_hidden_state.value().clone(),
        })
    }

    /// The whole forward on a tape: waveforms [B, L, 1] of equal length (a training batch of crops).
    pub fn forward_tape(&self, tape: &Tape, wave: &Var, opts: TrainOptions) -> Result<Wav2Vec2Vars> {
        let mut features = self.cnn(tape, wave, None)?;
        if let Some(m) = opts.feature_grad_mult {
            features = tape.scale_grad(&features, m);
        }
        self.encode(tape, &features, None, opts)
    }

    /// The CNN feature encoder without gradients: samples [B, L, 1] -> features [B, T, C].
    ///
    /// The CNN is local in time except for the group norm's statistics, so audio whose activations would
    /// exceed a GPU binding is processed in chunks of output frames (each chunk's input starts at a multiple
    /// of the total stride, so frames line up exactly), with the group-norm statistics gathered over the whole
    /// input first. The result does not depend on the chunking beyond f32 rounding of those statistics.
    pub fn feature_encoder(&self, wave: &Tensor) -> Result<Tensor> {
        self.feature_encoder_chunked(wave, self.max_chunk_frames())
    }

    /// Output frames per chunk such that no CNN activation of a chunk exceeds half a storage binding
    /// (at most 128 MiB), which also bounds memory on GPUs with huge bindings.
    fn max_chunk_frames(&self) -> usize {
        let budget = (self.gpu.max_binding_bytes() / 2).min(128 << 20) as usize;
        let total = self.config.total_stride();
        let mut stride = 1;
        let mut worst = 1;
        for (c, s) in self.config.conv_dim.iter().zip(&self.config.conv_stride) {
            stride *= s;
            worst = worst.max((total / stride + 1) * c * 4);
        }
        (budget / worst).max(1)
    }

    /// [`Wav2Vec2::feature_encoder`] with an explicit chunk size in output frames (exposed for tests).
    pub fn feature_encoder_chunked(&self, wave: &Tensor, chunk_frames: usize) -> Result<Tensor> {
        let &[b, len, 1] = wave.shape() else {
            bail!("feature encoder input must be [B, L, 1], got {:?}", wave.shape())
        };
        let tape = Tape::no_grad();
        let t = self.config.frames(len);
        if t <= chunk_frames {
            return Ok(self.cnn(&tape, &tape.constant(wave.clone()), None)?.value().clone());
        }
        let c = self.config.conv_out();
        let (stride, rf) = (self.config.total_stride(), self.config.receptive_field());
        let out = Tensor::empty(&self.gpu, &[b, t, c], DType::F32)?;
        for item in 0..b {
            let one = slice_time(wave, item, 0, len)?;
            let stats = match self.config.feat_extract_norm {
                FeatExtractNorm::Group => Some(self.first_layer_stats(&one, chunk_frames * stride)?),
                FeatExtractNorm::Layer => None,
            };
            for f0 in (0..t).step_by(chunk_frames) {
                let f1 = (f0 + chunk_frames).min(t);
                let piece = slice_time(&one, 0, f0 * stride, (f1 - f0 - 1) * stride + rf)?;
                let y = self.cnn(&tape, &tape.constant(piece), stats.as_ref())?;
                out.copy_from((item * t + f0) * c, y.value(), 0, (f1 - f0) * c)?;
            }
        }
        Ok(out)
    }

    /// The conv stack. `first_norm_stats` (no-grad only) replaces the first layer's group-norm statistics
    /// (mean, rstd per channel) when the input is a chunk of a longer one.
    fn cnn(&self, tape: &Tape, wave: &Var, first_norm_stats: Option<&Tensor>) -> Result<Var> {
        let mut x = wave.clone();
        for layer in &self.conv_layers {
            x = match (&layer.norm, self.config.feat_extract_norm) {
                (None, _) => layer.conv(tape, &x, true)?,
                // GroupNorm(C, C): each channel over time, eps fixed at torch's 1e-5.
                (Some(n), FeatExtractNorm::Group) => {
                    let y = layer.conv(tape, &x, false)?;
                    match first_norm_stats {
                        Some(st) if !tape.is_recording() => tape.constant(norm::normalize_channels(
                            y.value(),
                            st,
                            n.weight.value(),
                            n.bias.value(),
                            true,
                        )?),
                        Some(_) => bail!("chunked group-norm statistics are for inference only"),
                        None => tape.group_norm_time_gelu(&y, &tape.param(&n.weight), &tape.param(&n.bias), 1e-5)?,
                    }
                }
                // The conv layers' LayerNorm also uses torch's default eps, not layer_norm_eps.
                (Some(n), FeatExtractNorm::Layer) => {
                    let y = layer.conv(tape, &x, false)?;
                    tape.layer_norm_gelu(&y, &tape.param(&n.weight), &tape.param(&n.bias), 1e-5)?
                }
            };
        }
        Ok(x)
    }

    /// Group-norm statistics of the first conv layer's output over a whole [1, L, 1] input, gathered in
    /// pieces of about `piece_samples` samples and combined in f64 (Chan's formula).
    fn first_layer_stats(&self, wave: &Tensor, piece_samples: usize) -> Result<Tensor> {
        let tape = Tape::no_grad();
        let layer = &self.conv_layers[0];
        let len = wave.shape()[1];
        let t0 = (len - layer.kernel) / layer.stride + 1;
        let per_piece = (piece_samples / layer.stride).max(1);
        let mut total: Option<ChannelStats> = None;
        for a in (0..t0).step_by(per_piece) {
            let b = (a + per_piece).min(t0);
            let piece = slice_time(wave, 0, a * layer.stride, (b - a - 1) * layer.stride + layer.kernel)?;
            let y = layer.conv(&tape, &tape.constant(piece), false)?;
            let stats = ChannelStats::from_moments(&norm::channel_moments(y.value())?, b - a)?;
            match &mut total {
                None => total = Some(stats),
                Some(t) => t.combine(&stats)?,
            }
        }
        total.expect("at least one frame").mean_rstd(&self.gpu, 1e-5)
    }

    /// From CNN features [B, T, C] to every hidden state.
    pub fn encode(
        &self,
        tape: &Tape,
        features: &Var,
        key_mask: Option<&Tensor>,
        opts: TrainOptions,
    ) -> Result<Wav2Vec2Vars> {
        let eps = self.eps();
        let extract_features = self.projection_norm.layer_norm(tape, features, eps)?;
        let h = self.projection.forward(tape, &extract_features)?;
        let pos = self.positional_embedding(tape, &h)?;
        let stable = self.config.do_stable_layer_norm;
        let mut h = if stable {
            tape.add(&h, &pos)?
        } else {
            self.encoder_norm.add_layer_norm(tape, &h, &pos, eps)?
        };
        let mut hidden_states = vec![h.clone()];
        for layer in &self.layers {
            h = layer.forward(tape, &h, key_mask, opts.dropout)?;
            hidden_states.push(h.clone());
        }
        // transformers 5.x: hidden_states[N] is taken before the stable variant's final LayerNorm.
        let last_hidden_state = if stable {
            self.encoder_norm.layer_norm(tape, &h, eps)?
        } else {
            h
        };
        Ok(Wav2Vec2Vars {
            extract_features,
            hidden_states,
            last_hidden_state,
        })
    }

    /// GELU(SamePad(grouped Conv1d(h))): padding K/2 on both sides, the last frame dropped when K is even.
    /// The weight is g * v / ||v|| (weight norm), recomputed each forward so a trained g, v is always current
    /// (once, at [`Wav2Vec2::freeze`], for a frozen model's inference).
    fn positional_embedding(&self, tape: &Tape, h: &Var) -> Result<Var> {
        let cfg = &self.config;
        let k = cfg.num_conv_pos_embeddings;
        let b = tape.param(&self.pos_conv_bias);
        let pos = match (&self.pos_conv_frozen, tape.is_recording()) {
            (Some(w), false) => tape.constant(conv1d::conv1d_packed(h.value(), w, Some(b.value()), 1, k / 2, true)?),
            _ => {
                let w = tape.weight_norm(&tape.param(&self.pos_conv_g), &tape.param(&self.pos_conv_v))?;
                tape.conv1d(h, &w, Some(&b), 1, k / 2, cfg.num_conv_pos_embedding_groups, true)?
            }
        };
        if k % 2 == 1 {
            return Ok(pos);
        }
        tape.drop_last_frame(&pos)
    }
}

/// Frames `[start, start + len)` of batch item `item` of a [B, T, C] tensor, as a new [1, len, C] tensor.
fn slice_time(x: &Tensor, item: usize, start: usize, len: usize) -> Result<Tensor> {
    let &[_, t, c] = x.shape() else {
        bail!("slice_time needs [B, T, C], got {:?}", x.shape())
    };
    let out = Tensor::empty(x.gpu(), &[1, len, c], DType::F32)?;
    out.copy_from(0, x, (item * t + start) * c, len * c)?;
    Ok(out)
}
