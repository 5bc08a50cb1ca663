//! The wav2vec 2.0 forward pass, as transformers' `Wav2Vec2Model(...).eval()` computes it
//! (`../shared/docs/wav2vec2-reference.md`). Both architectures: group norm + post-LN (base, original large)
//! and layer norm + pre-LN "stable layer norm" (lv60, XLS-R).
//!
//! Tensor names mirror the checkpoint's module paths. Activations are channels-last: `[B, T, C]`.
//! Dimension letters: B batch, L samples, T frames, C conv channels, D hidden size, F FFN size.

use std::path::Path;

use anyhow::{bail, Context as _, Result};

use super::config::{FeatExtractNorm, Wav2Vec2Config};
use super::weights::{fold_weight_norm, Checkpoint};
use crate::gpu::{Gpu, Tensor};
use crate::ops::conv1d::Conv1dWeight;
use crate::ops::norm::ChannelStats;
use crate::ops::{attention, conv1d, elementwise, matmul, norm};

/// `nn.Linear`: weight [out, in] (torch layout), bias [out].
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    fn load(gpu: &Gpu, ck: &mut Checkpoint, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = upload(gpu, ck.take(&format!("{name}.weight"), &[out, inp]), &[out, inp])?;
        let bias = if bias {
            Some(upload(gpu, ck.take(&format!("{name}.bias"), &[out]), &[out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul::linear(x, &self.weight, self.bias.as_ref())
    }

    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        matmul::linear_gelu(x, &self.weight, self.bias.as_ref())
    }
}

/// `nn.LayerNorm` / `nn.GroupNorm` affine parameters, [C] each.
pub struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Norm {
    fn load(gpu: &Gpu, ck: &mut Checkpoint, name: &str, c: usize) -> Result<Norm> {
        Ok(Norm {
            weight: upload(gpu, ck.take(&format!("{name}.weight"), &[c]), &[c])?,
            bias: upload(gpu, ck.take(&format!("{name}.bias"), &[c]), &[c])?,
        })
    }

    pub fn layer_norm(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        norm::layer_norm(x, &self.weight, &self.bias, eps)
    }
}

fn upload(gpu: &Gpu, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_slice(gpu, &data, shape)
}

/// `feature_extractor.conv_layers.{i}`: Conv1d (no padding), optional norm, GELU.
pub struct ConvLayer {
    /// Packed once at load into the conv kernel's layout.
    pub conv_weight: Conv1dWeight,
    pub conv_bias: Option<Tensor>,
    pub norm: Option<Norm>,
    pub kernel: usize,
    pub stride: usize,
}

impl ConvLayer {
    fn conv(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        conv1d::conv1d_packed(x, &self.conv_weight, self.conv_bias.as_ref(), self.stride, 0, gelu)
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
        })
    }

    fn attention(&self, x: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let a = attention::self_attention(&q, &k, &v, self.heads, key_mask)?;
        self.out_proj.forward(&a)
    }

    fn feed_forward(&self, x: &Tensor) -> Result<Tensor> {
        self.output_dense.forward(&self.intermediate_dense.forward_gelu(x)?)
    }

    /// h: [B, T, D] -> [B, T, D].
    pub fn forward(&self, h: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        if self.stable {
            // Pre-LN: h + Attn(LN1(h)), then h + FFN(LN2(h)).
            let a = self.attention(&self.layer_norm.layer_norm(h, self.eps)?, key_mask)?;
            let h = elementwise::add(h, &a)?;
            let f = self.feed_forward(&self.final_layer_norm.layer_norm(&h, self.eps)?)?;
            elementwise::add(&h, &f)
        } else {
            // Post-LN: LN1(h + Attn(h)), then LN2(h + FFN(h)).
            let a = self.attention(h, key_mask)?;
            let h = self.layer_norm.layer_norm(&elementwise::add(h, &a)?, self.eps)?;
            let f = self.feed_forward(&h)?;
            self.final_layer_norm.layer_norm(&elementwise::add(&h, &f)?, self.eps)
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

pub struct Wav2Vec2 {
    pub config: Wav2Vec2Config,
    pub gpu: Gpu,
    pub conv_layers: Vec<ConvLayer>,
    /// `feature_projection.layer_norm` and `.projection`.
    pub projection_norm: Norm,
    pub projection: Linear,
    /// `encoder.pos_conv_embed.conv`, weight norm folded at load, packed: [D, D/G, K].
    pub pos_conv_weight: Conv1dWeight,
    pub pos_conv_bias: Tensor,
    /// `encoder.layer_norm`.
    pub encoder_norm: Norm,
    pub layers: Vec<EncoderLayer>,
}

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
            let w = upload(
                gpu,
                ck.take(&format!("{name}.conv.weight"), &[c, c_in, k]),
                &[c, c_in, k],
            )?;
            let conv_weight = Conv1dWeight::pack(&w, 1)?;
            let conv_bias = if cfg.conv_bias {
                Some(upload(gpu, ck.take(&format!("{name}.conv.bias"), &[c]), &[c])?)
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
                conv_weight,
                conv_bias,
                norm,
                kernel: k,
                stride: s,
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

        let pos = "encoder.pos_conv_embed.conv";
        let wg = ck.take_any(
            &[
                &format!("{pos}.weight_g"),
                &format!("{pos}.parametrizations.weight.original0"),
            ],
            &[1, 1, kpos],
        );
        let wv = ck.take_any(
            &[
                &format!("{pos}.weight_v"),
                &format!("{pos}.parametrizations.weight.original1"),
            ],
            &[d, d / g, kpos],
        );
        let pos_conv_weight = Conv1dWeight::pack(
            &upload(gpu, fold_weight_norm(&wg, &wv, d, d / g, kpos), &[d, d / g, kpos])?,
            g,
        )?;
        let pos_conv_bias = upload(gpu, ck.take(&format!("{pos}.bias"), &[d]), &[d])?;
        let encoder_norm = Norm::load(gpu, ck, "encoder.layer_norm", d)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|n| EncoderLayer::load(gpu, ck, &format!("encoder.layers.{n}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Wav2Vec2 {
            gpu: gpu.clone(),
            conv_layers,
            projection_norm,
            projection,
            pos_conv_weight,
            pos_conv_bias,
            encoder_norm,
            layers,
            config,
        })
    }

    fn eps(&self) -> f32 {
        self.config.layer_norm_eps as f32
    }

    /// The CNN feature encoder: samples [B, L, 1] -> features [B, T, C].
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
        let t = self.config.frames(len);
        if t <= chunk_frames {
            return self.cnn(wave, None);
        }
        let c = self.config.conv_out();
        let (stride, rf) = (self.config.total_stride(), self.config.receptive_field());
        let out = Tensor::empty(&self.gpu, &[b, t, c], crate::gpu::DType::F32)?;
        for item in 0..b {
            let one = slice_time(wave, item, 0, len)?;
            let stats = match self.config.feat_extract_norm {
                FeatExtractNorm::Group => Some(self.first_layer_stats(&one, chunk_frames * stride)?),
                FeatExtractNorm::Layer => None,
            };
            for f0 in (0..t).step_by(chunk_frames) {
                let f1 = (f0 + chunk_frames).min(t);
                let piece = slice_time(&one, 0, f0 * stride, (f1 - f0 - 1) * stride + rf)?;
                let y = self.cnn(&piece, stats.as_ref())?;
                out.copy_from((item * t + f0) * c, &y, 0, (f1 - f0) * c)?;
            }
        }
        Ok(out)
    }

    /// The conv stack on one piece of audio. `first_norm_stats` replaces the first layer's group-norm
    /// statistics (mean, rstd per channel) when the piece is a chunk of a longer input.
    fn cnn(&self, wave: &Tensor, first_norm_stats: Option<&Tensor>) -> Result<Tensor> {
        let mut x = wave.clone();
        for layer in &self.conv_layers {
            x = match (&layer.norm, self.config.feat_extract_norm) {
                (None, _) => layer.conv(&x, true)?,
                // GroupNorm(C, C): each channel over time, eps fixed at torch's 1e-5.
                (Some(n), FeatExtractNorm::Group) => match first_norm_stats {
                    Some(st) => norm::normalize_channels(&layer.conv(&x, false)?, st, &n.weight, &n.bias, true)?,
                    None => norm::group_norm_time_gelu(&layer.conv(&x, false)?, &n.weight, &n.bias, 1e-5)?,
                },
                // The conv layers' LayerNorm also uses torch's default eps, not layer_norm_eps.
                (Some(n), FeatExtractNorm::Layer) => {
                    norm::layer_norm_gelu(&layer.conv(&x, false)?, &n.weight, &n.bias, 1e-5)?
                }
            };
        }
        Ok(x)
    }

    /// Group-norm statistics of the first conv layer's output over a whole [1, L, 1] input, gathered in
    /// pieces of about `piece_samples` samples and combined in f64 (Chan's formula).
    fn first_layer_stats(&self, wave: &Tensor, piece_samples: usize) -> Result<Tensor> {
        let layer = &self.conv_layers[0];
        let len = wave.shape()[1];
        let t0 = (len - layer.kernel) / layer.stride + 1;
        let per_piece = (piece_samples / layer.stride).max(1);
        let mut total: Option<ChannelStats> = None;
        for a in (0..t0).step_by(per_piece) {
            let b = (a + per_piece).min(t0);
            let piece = slice_time(wave, 0, a * layer.stride, (b - a - 1) * layer.stride + layer.kernel)?;
            let moments = norm::channel_moments(&layer.conv(&piece, false)?)?;
            let stats = ChannelStats::from_moments(&moments, b - a)?;
            match &mut total {
                None => total = Some(stats),
                Some(t) => t.combine(&stats)?,
            }
        }
        total.expect("at least one frame").mean_rstd(&self.gpu, 1e-5)
    }

    /// Runs the model on one utterance (already normalised if the checkpoint expects it).
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
        let wave = Tensor::from_slice(&self.gpu, samples, &[1, samples.len(), 1])?;
        let features = self.feature_encoder(&wave).context("feature encoder")?;
        self.encode(&features, None)
    }

    /// From CNN features [B, T, C] to every hidden state.
    pub fn encode(&self, features: &Tensor, key_mask: Option<&Tensor>) -> Result<Wav2Vec2Output> {
        let eps = self.eps();
        let extract_features = self.projection_norm.layer_norm(features, eps)?;
        let h = self.projection.forward(&extract_features)?;
        let pos = self.positional_embedding(&h)?;
        let stable = self.config.do_stable_layer_norm;
        let mut h = elementwise::add(&h, &pos)?;
        if !stable {
            h = self.encoder_norm.layer_norm(&h, eps)?;
        }
        let mut hidden_states = vec![h.clone()];
        for layer in &self.layers {
            h = layer.forward(&h, key_mask)?;
            hidden_states.push(h.clone());
        }
        // transformers 5.x: hidden_states[N] is taken before the stable variant's final LayerNorm.
        let last_hidden_state = if stable {
            self.encoder_norm.layer_norm(&h, eps)?
        } else {
            h
        };
        Ok(Wav2Vec2Output {
            extract_features,
            hidden_states,
            last_hidden_state,
        })
    }

    /// GELU(SamePad(grouped Conv1d(h))): padding K/2 on both sides, the last frame dropped when K is even.
    fn positional_embedding(&self, h: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let k = cfg.num_conv_pos_embeddings;
        let pos = conv1d::conv1d_packed(h, &self.pos_conv_weight, Some(&self.pos_conv_bias), 1, k / 2, true)?;
        if k % 2 == 1 {
            return Ok(pos);
        }
        let (b, t, d) = (h.shape()[0], h.shape()[1], h.shape()[2]);
        let out = Tensor::empty(&self.gpu, &[b, t, d], crate::gpu::DType::F32)?;
        for i in 0..b {
            out.copy_from(i * t * d, &pos, i * (t + 1) * d, t * d)?;
        }
        Ok(out)
    }
}

/// Frames `[start, start + len)` of batch item `item` of a [B, T, C] tensor, as a new [1, len, C] tensor.
fn slice_time(x: &Tensor, item: usize, start: usize, len: usize) -> Result<Tensor> {
    let &[_, t, c] = x.shape() else {
        bail!("slice_time needs [B, T, C], got {:?}", x.shape())
    };
    let out = Tensor::empty(x.gpu(), &[1, len, c], crate::gpu::DType::F32)?;
    out.copy_from(0, x, (item * t + start) * c, len * c)?;
    Ok(out)
}
