//! Multi-head self-attention on `[B, T, D]` Q, K, V (no kernel of its own: strided matmuls, the row
//! softmax and dropout).
//!
//! Per batch item and head h (head dim dh = D / heads, columns h*dh..(h+1)*dh), as transformers' eager path:
//! `scores = (Q_h K_h^T) * dh^-0.5`, masked keys set to -inf, softmax in f32, (dropout in training), then
//! `scores V_h`, written into the head's columns of the output. Heads are read and written in place through
//! matmul views (no permute copies). The score matrix of all heads can exceed one binding (T = 3000, 12
//! heads: 432 MB), so heads, and if needed query rows, are processed in groups whose scores fit
//! `gpu.max_binding_bytes()`; one score buffer is reused by every group.
//!
//! Inference: [`self_attention_inference`] (what the no-grad tape, so the teacher forward, calls) takes a
//! fused kernel [`self_attention_fused`] where the head dim is 64 and the adapter has one
//! ([`fused_kernel_for`]): one kernel with an online softmax and no score buffer, so its memory does not grow
//! with T^2. Where subgroups have 8 invocations (lavapipe) the subgroup kernel, 1.9-5x faster than the unfused
//! path there at T = 49..499 (benches/RESULTS.md, "lavapipe attention, session 3"); on GPUs with subgroups of
//! 4 or more the quad kernel for sequences of up to [`QUAD_LONGEST_T`] frames (1.2-1.4x the unfused path on
//! an H100 at T = 49, slower from T = 72 on), the unfused path beyond. `WGPU_MLKD_NO_FUSED_ATTENTION=1` keeps
//! the unfused path (for comparisons).
//!
//! Training: [`self_attention_train`] also returns an [`AttentionSaved`] for [`self_attention_backward`].
//! With `P = softmax(S)` and `P' = dropout(P)` per head:
//! `dV = P'^T dO`, `dP' = dO V^T`, `dP = dropout_backward(dP')`, `dS = P * (dP - rowsum(dP * P))`,
//! `dQ = dh^-0.5 dS K`, `dK = dh^-0.5 dS^T Q`, all through head views of `[B, T, D]`.
//!
//! What is saved, and its memory: when every batch item's probabilities (`heads * T^2 * 4` bytes) fit one
//! binding and all of them (`B * heads * T^2 * 4` bytes) fit `max_saved_bytes` (default
//! [`DEFAULT_MAX_SAVED_BYTES`]), the forward keeps P (before dropout) and the backward reads it: for the
//! student's shapes (B = 2..8, T ~ 100-250, 12 heads) that is 1-24 MB per layer. Otherwise nothing is
//! saved and the backward recomputes P chunk by chunk (one more `Q K^T` and softmax, about +25% backward
//! work), with the same chunking as the forward so that every buffer stays within the binding limit; the
//! sums over query rows for dK and dV are then accumulated over row chunks. Either way the backward needs
//! one (saved) or two (recompute) score-sized scratch buffers (a saving forward with dropout one, for
//! `P'`, beside the saved P), and dropout never stores a mask: it is
//! regenerated from its seed at the logical index `((b * heads + h) * T + i) * T + j` of each probability.

use anyhow::{bail, ensure, Result};

use super::dropout::{dropout_inplace_at, dropout_into_at, DropoutMask};
use super::matmul::{matmul_accumulate_into, matmul_into, MatDims, View};
use super::softmax::{softmax_backward_at, softmax_rows_at, MaskRef};
use crate::gpu::{DType, Gpu, Shader, Tensor};

/// The fused inference kernel for adapters with subgroups of exactly 8 invocations (see [`self_attention_fused`]).
static SG_SHADER: Shader = crate::shader!("attention_sg");
/// The portable fused inference kernel (workgroup memory); not chosen by default (see [`fused_kernel_for`]).
static SHADER: Shader = crate::shader!("attention");
/// The fused inference kernel for GPUs with subgroups of 4 or more (four invocations per query row).
static QUAD_SHADER: Shader = crate::shader!("attention_quad");
/// The head dimension the fused kernels are written for (wav2vec2 base and large: 768 / 12, 1024 / 16).
pub const FUSED_HEAD_DIM: usize = 64;

/// Which fused attention kernel runs ([`fused_kernel_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedKernel {
    /// `shaders/attention_sg.wgsl`: 8 query rows per subgroup of 8, keys broadcast (lavapipe).
    Subgroup,
    /// `shaders/attention.wgsl`: 64 query rows per workgroup, keys and values staged in workgroup memory.
    Portable,
    /// `shaders/attention_quad.wgsl`: 16 query rows per workgroup of 64, a quad of invocations per row
    /// sharing its dims, scores added by subgroup shuffles (subgroups of 4 or more); reads q, k, v packed too.
    Quad,
}

impl FusedKernel {
    /// (shader, entry point, query rows per workgroup), as in the shaders.
    fn kernel(self) -> (&'static Shader, &'static str, usize) {
        match self {
            FusedKernel::Subgroup => (&SG_SHADER, "attention_sg_forward", 8),
            FusedKernel::Portable => (&SHADER, "attention_fused_forward", 64),
            FusedKernel::Quad => (&QUAD_SHADER, "attention_quad_forward", 16),
        }
    }
}

/// Workgroup memory of the portable kernel: a block of 32 key rows and 32 value rows of 64 floats, and 32
/// validity flags (`kb`, `vb`, `valid` in the shader). Just over WebGPU's guaranteed 16 KiB.
const PORTABLE_WORKGROUP_BYTES: u32 = 2 * 32 * 64 * 4 + 32 * 4;

/// Whether the adapter gives a workgroup the memory the portable kernel stages its blocks in.
fn portable_fits(gpu: &Gpu) -> bool {
    gpu.limits().max_compute_workgroup_storage_size >= PORTABLE_WORKGROUP_BYTES
}

/// The fused kernel [`self_attention_inference`] takes on this adapter, if any: the subgroup one where
/// subgroups have 8 invocations (lavapipe, where it beats the unfused path), else the quad one on hardware
/// GPUs with subgroups of 4 or more (for sequences of at most [`QUAD_LONGEST_T`]: see
/// [`fused_kernel_for_len`]). Never the portable one: on an H100 it ran
/// at 0.24-0.58x of the unfused path (T = 499..49; benches/RESULTS.md, "H100"): 64 query rows per workgroup
/// left most of the GPU idle (96 workgroups for 12 heads at T = 499), and its per-invocation arrays may live
/// in local memory. The portable kernel stays for [`self_attention_fused_with`] and its tests, and for a GPU
/// where it may win.
pub fn fused_kernel_for(gpu: &Gpu) -> Option<FusedKernel> {
    if let Some(kernel) = forced_fused_kernel().filter(|&k| runs_on(gpu, k)) {
        return Some(kernel);
    }
    if gpu.subgroups_of_8() {
        Some(FusedKernel::Subgroup)
    } else if gpu.subgroup_quads() && gpu.is_hardware_gpu() {
        Some(FusedKernel::Quad)
    } else {
        None
    }
}

/// The longest sequence the quad kernel takes unless `WGPU_MLKD_FUSED_ATTENTION=quad` forces it. On an H100
/// (benches/RESULTS.md, "H100, session 10"; 12 heads) it ran at 1.19-1.39x the unfused path at T = 49 but 0.84x
/// at T = 72, 0.75x at 99 and 0.68-0.74x at 149 and 499: its 16 query rows per workgroup, each walking every
/// key, give 12 heads at T = 499 only 384 workgroups, where the unfused path's tiled products fill the GPU.
pub const QUAD_LONGEST_T: usize = 64;

/// The fused kernel [`self_attention_inference`] takes for sequences of `t` frames: [`fused_kernel_for`], but
/// not the quad kernel past [`QUAD_LONGEST_T`] unless forced (the unfused path then).
pub fn fused_kernel_for_len(gpu: &Gpu, t: usize) -> Option<FusedKernel> {
    let kernel = fused_kernel_for(gpu)?;
    takes_len(kernel, forced_fused_kernel() == Some(kernel), t).then_some(kernel)
}

/// Whether `kernel` (`forced` by the environment or not) runs sequences of `t` frames.
fn takes_len(kernel: FusedKernel, forced: bool, t: usize) -> bool {
    kernel != FusedKernel::Quad || forced || t <= QUAD_LONGEST_T
}

/// The environment variable that picks the fused kernel (`subgroup`, `quad` or `portable`) wherever the
/// adapter can run it, instead of [`fused_kernel_for`]'s rule (for measuring one kernel against another, and
/// for running a GPU's kernel on lavapipe).
pub const FUSED_ATTENTION_ENV: &str = "WGPU_MLKD_FUSED_ATTENTION";

/// The kernel `WGPU_MLKD_FUSED_ATTENTION` names, if any (read once per process).
fn forced_fused_kernel() -> Option<FusedKernel> {
    static FORCED: std::sync::OnceLock<Option<FusedKernel>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var(FUSED_ATTENTION_ENV).ok()?.trim() {
        "subgroup" => Some(FusedKernel::Subgroup),
        "quad" => Some(FusedKernel::Quad),
        "portable" => Some(FusedKernel::Portable),
        _ => None,
    })
}

/// Whether the adapter can run the kernel.
fn runs_on(gpu: &Gpu, kernel: FusedKernel) -> bool {
    match kernel {
        FusedKernel::Subgroup => gpu.subgroups_of_8(),
        FusedKernel::Quad => gpu.subgroup_quads(),
        FusedKernel::Portable => portable_fits(gpu),
    }
}

/// Whether the kernel can read q, k, v through a row stride and column offsets (a packed QKV projection).
fn reads_packed(kernel: FusedKernel) -> bool {
    kernel == FusedKernel::Quad
}

/// Default limit on the probabilities one [`self_attention_train`] call keeps for its backward.
pub const DEFAULT_MAX_SAVED_BYTES: u64 = 256 << 20;

/// Self-attention of `q, k, v` (each `[B, T, D]`) with `heads` heads; `key_mask` `[B, T]` u32 (1 = valid,
/// 0 = padded key). Returns `[B, T, D]`. A query whose keys are all masked gets a zero output.
pub fn self_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, key_mask: Option<&Tensor>) -> Result<Tensor> {
    let budget = q.gpu().max_binding_bytes();
    self_attention_chunked(q, k, v, heads, key_mask, budget)
}

/// True when [`self_attention_fused`] can run `heads` heads over a model dimension `d` on this adapter:
/// a fused kernel for it ([`fused_kernel_for`]) and a head dimension of [`FUSED_HEAD_DIM`].
pub fn fused_attention_supported(gpu: &Gpu, d: usize, heads: usize) -> bool {
    fused_kernel_for(gpu).is_some() && heads > 0 && d == heads * FUSED_HEAD_DIM
}

/// Whether [`self_attention_inference`] may take the fused kernel: unset `WGPU_MLKD_NO_FUSED_ATTENTION`
/// (any value turns it off, for A/B comparisons; read once per process).
fn fused_attention_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("WGPU_MLKD_NO_FUSED_ATTENTION").is_none())
}

/// Whether [`self_attention_inference`] can run a fused kernel for `heads` heads over `d` on this adapter (else
/// the unfused path), for some sequence length.
pub fn inference_is_fused(gpu: &Gpu, d: usize, heads: usize) -> bool {
    fused_attention_enabled() && fused_attention_supported(gpu, d, heads)
}

/// The fused kernel [`self_attention_inference`] runs for `heads` heads over `d` and `t` frames, if any.
fn inference_kernel(gpu: &Gpu, d: usize, heads: usize, t: usize) -> Option<FusedKernel> {
    fused_kernel_for_len(gpu, t).filter(|_| inference_is_fused(gpu, d, heads))
}

/// Whether the inference attention for `heads` heads over `d` on this adapter can read q, k, v as the column
/// blocks of one packed projection ([`self_attention_packed`]): the unfused path's matmul views and the quad
/// kernel can; the subgroup kernel (lavapipe) reads `[B, T, D]` tensors.
pub fn inference_reads_packed(gpu: &Gpu, d: usize, heads: usize) -> bool {
    !inference_is_fused(gpu, d, heads) || fused_kernel_for(gpu).is_some_and(reads_packed)
}

/// Self-attention for inference (no gradient): [`self_attention_fused`] where it is supported and
/// enabled, else [`self_attention`]. Same result to rounding (see [`self_attention_fused`]); not
/// bit-identical to the training forward, so training never uses it.
pub fn self_attention_inference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let d = q.shape().last().copied().unwrap_or(0);
    let t = q.shape().get(1).copied().unwrap_or(0);
    if inference_kernel(q.gpu(), d, heads, t).is_some() {
        self_attention_fused(q, k, v, heads, key_mask)
    } else {
        self_attention(q, k, v, heads, key_mask)
    }
}

/// [`self_attention`] in one kernel, the one [`fused_kernel_for`] picks (`shaders/attention_sg.wgsl`: an
/// online softmax over blocks of 8 keys per 8 query rows; `shaders/attention_quad.wgsl`: four keys per step,
/// four invocations per query row), with no `[T, T]` score buffer, so its memory is only q, k, v and the
/// output at any T. Needs [`fused_attention_supported`] (else an error). The softmax is normalised at the end
/// and rescaled as the running max grows (and the quad kernel adds each score's four partial dot products
/// in a tree), so the output differs from [`self_attention`]'s by rounding (a few ulp of the largest output;
/// tested to `Tol::KERNEL`).
pub fn self_attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(kernel) = fused_kernel_for(q.gpu()) else {
        bail!(
            "fused attention: no fused kernel is chosen on this adapter (the subgroup one needs subgroups of exactly \
             8 invocations, the quad one a GPU with subgroups of 4 or more)"
        );
    };
    self_attention_fused_with(kernel, q, k, v, heads, key_mask)
}

/// [`self_attention_fused`] with the kernel given (tests run the portable one on every adapter).
pub fn self_attention_fused_with(
    kernel: FusedKernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let what = "fused attention";
    let (b, t, d) = check_inputs(what, q, k, v, heads, key_mask)?;
    fused_forward(what, kernel, Inputs::separate(q, k, v, d), (b, t, d), heads, key_mask)
}

/// The fused kernel over checked inputs of shape `[B, T, D]` (`inputs` may be packed only for a kernel that
/// [`reads_packed`]).
fn fused_forward(
    what: &str,
    kernel: FusedKernel,
    inputs: Inputs,
    (b, t, d): (usize, usize, usize),
    heads: usize,
    key_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let gpu = inputs.q.gpu();
    if !runs_on(gpu, kernel) {
        match kernel {
            FusedKernel::Subgroup => {
                bail!("{what}: the subgroup kernel needs an adapter with subgroups of exactly 8 invocations")
            }
            FusedKernel::Quad => {
                bail!("{what}: the quad kernel needs an adapter with subgroup operations on subgroups of 4 or more")
            }
            FusedKernel::Portable => bail!(
                "{what}: the portable kernel needs {PORTABLE_WORKGROUP_BYTES} bytes of workgroup memory, this \
                 adapter gives {}",
                gpu.limits().max_compute_workgroup_storage_size
            ),
        }
    }
    let packed = inputs.row_stride != d || inputs.cols != [0; 3];
    ensure!(
        !packed || reads_packed(kernel),
        "{what}: the {kernel:?} kernel reads q, k, v as [B, T, D] tensors, not packed"
    );
    let (shader, entry, rows) = kernel.kernel();
    if d != heads * FUSED_HEAD_DIM {
        bail!("{what}: needs a head dimension of {FUSED_HEAD_DIM}, got D = {d} over {heads} heads");
    }
    let out = Tensor::empty(gpu, &[b, t, d], DType::F32)?;
    if b == 0 || t == 0 {
        return Ok(out);
    }
    if (b * t * inputs.row_stride) as u128 > u32::MAX as u128 {
        bail!(
            "{what}: [B, T, D] = [{b}, {t}, {}] is beyond 32-bit indexing",
            inputs.row_stride
        );
    }
    let blocks = t.div_ceil(rows);
    let groups = b as u128 * heads as u128 * blocks as u128;
    if groups > u32::MAX as u128 {
        bail!("{what}: {groups} workgroups is too many for one dispatch");
    }
    let scaling = (FUSED_HEAD_DIM as f64).powf(-0.5) as f32;
    let Inputs {
        q,
        k,
        v,
        row_stride,
        cols,
    } = inputs;
    // Without a mask the shader never reads binding 4; q's buffer stands in.
    let mask_buf = key_mask.map_or(q.buffer(), |m| m.buffer());
    let u = |x: usize| x as u32;
    let masked = u32::from(key_mask.is_some());
    let params: Vec<u32> = if kernel == FusedKernel::Quad {
        // Strides and offsets in vec4 (every one a multiple of 4: D = heads x 64).
        let [qc, kc, vc] = cols.map(|c| u(c / 4));
        vec![
            u(b),
            u(t),
            u(heads),
            u(blocks),
            masked,
            scaling.to_bits(),
            u(row_stride / 4),
            qc,
            kc,
            vc,
            u(d / 4),
        ]
    } else {
        vec![u(b), u(t), u(d), u(heads), u(blocks), masked, scaling.to_bits()]
    };
    gpu.dispatch(
        shader,
        entry,
        &[q.buffer(), k.buffer(), v.buffer(), mask_buf, out.buffer()],
        &params,
        groups as u32,
    )?;
    Ok(out)
}

/// How many heads and query rows one score buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunks {
    heads: usize,
    rows: usize,
}

fn plan_chunks(heads: usize, t: usize, max_score_bytes: u64) -> Result<Chunks> {
    let row_bytes = t as u64 * 4;
    let max_rows = max_score_bytes / row_bytes;
    if max_rows == 0 {
        bail!(
            "attention: one score row of T = {t} keys ({row_bytes} bytes) exceeds the score budget of \
             {max_score_bytes} bytes"
        );
    }
    let per_head = t as u64;
    Ok(if max_rows >= heads as u64 * per_head {
        Chunks { heads, rows: t }
    } else if max_rows >= per_head {
        Chunks {
            heads: (max_rows / per_head) as usize,
            rows: t,
        }
    } else {
        Chunks {
            heads: 1,
            rows: max_rows as usize,
        }
    })
}

/// The shape `[B, T, D]` after checking q, k, v, heads and the mask.
fn check_inputs(
    what: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
) -> Result<(usize, usize, usize)> {
    let [b, t, d] = *q.shape() else {
        bail!("{what}: q must be [B, T, D], got {:?}", q.shape());
    };
    if k.shape() != q.shape() || v.shape() != q.shape() {
        bail!(
            "{what}: q, k, v must have the same shape [B, T, D], got {:?}, {:?}, {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if x.dtype() != DType::F32 {
            bail!("{what}: {name} must be f32, got {:?}", x.dtype());
        }
    }
    check_heads_and_mask(what, b, t, d, heads, key_mask)?;
    Ok((b, t, d))
}

fn check_heads_and_mask(
    what: &str,
    b: usize,
    t: usize,
    d: usize,
    heads: usize,
    key_mask: Option<&Tensor>,
) -> Result<()> {
    if heads == 0 || d % heads != 0 {
        bail!("{what}: {heads} heads do not divide the model dimension D = {d}");
    }
    if let Some(m) = key_mask {
        if m.dtype() != DType::U32 || m.shape() != [b, t] {
            bail!(
                "{what}: key_mask must be u32 [B, T] = [{b}, {t}], got {:?} {:?}",
                m.dtype(),
                m.shape()
            );
        }
    }
    Ok(())
}

/// q, k and v as the forward reads them: three `[B, T, D]` tensors, or one packed `[B, T, 3D]` tensor (a fused
/// QKV projection's output; q, k, v are its column blocks), through views, with nothing copied.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    /// Elements between consecutive rows (frames) of each.
    row_stride: usize,
    /// The first column of q, k and v in their rows.
    cols: [usize; 3],
}

impl<'a> Inputs<'a> {
    fn separate(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, d: usize) -> Inputs<'a> {
        Inputs {
            q,
            k,
            v,
            row_stride: d,
            cols: [0; 3],
        }
    }

    fn packed(qkv: &'a Tensor, d: usize) -> Inputs<'a> {
        Inputs {
            q: qkv,
            k: qkv,
            v: qkv,
            row_stride: 3 * d,
            cols: [0, d, 2 * d],
        }
    }
}

/// Views of one group of heads `h0..` and query rows `t0..` of batch item `bi` (`[B, T, D]` tensors seen as
/// `[heads, T, dh]`), and of its scores in a dense `[hn, tn, T]` block.
#[derive(Clone, Copy)]
struct Group {
    t: usize,
    d: usize,
    dh: usize,
    bi: usize, // the batch item
    h0: usize,
    t0: usize,
    hn: usize,
    tn: usize,
}

impl Group {
    /// The group's query rows of a `[B, T, D]` Q (or of dQ, the output, dO): `[hn, tn, dh]`.
    fn rows(&self) -> View {
        self.rows_in(self.d, 0)
    }

    /// All T rows of a `[B, T, D]` K or V (or dK, dV) for the group's heads: `[hn, T, dh]`.
    fn keys(&self) -> View {
        self.keys_in(self.d, 0)
    }

    /// [`Group::rows`] of a tensor whose rows are `stride` apart, its heads starting at column `col`.
    fn rows_in(&self, stride: usize, col: usize) -> View {
        self.heads_from(self.t0, stride, col)
    }

    /// [`Group::keys`] of a tensor whose rows are `stride` apart, its heads starting at column `col`.
    fn keys_in(&self, stride: usize, col: usize) -> View {
        self.heads_from(0, stride, col)
    }

    /// The group's heads `[hn, .., dh]` of batch item `bi` from row `first_row` on.
    fn heads_from(&self, first_row: usize, stride: usize, col: usize) -> View {
        View {
            offset: (self.bi * self.t + first_row) * stride + col + self.h0 * self.dh,
            batch_stride: self.dh,
            row_stride: stride,
            col_stride: 1,
        }
    }

    /// A dense score block `[hn, tn, T]` from element `offset`.
    fn scores(&self, offset: usize) -> View {
        View {
            offset,
            batch_stride: self.tn * self.t,
            row_stride: self.t,
            col_stride: 1,
        }
    }

    fn score_len(&self) -> usize {
        self.hn * self.tn * self.t
    }

    /// S = scaling * Q K^T into `scores` at `offset`, then the masked softmax there.
    fn probabilities(
        &self,
        inputs: &Inputs,
        scores: &Tensor,
        offset: usize,
        scaling: f32,
        mask: Option<MaskRef>,
    ) -> Result<()> {
        // scores[h, i, j] = scaling * sum_p Q[t0 + i, h*dh + p] K[j, h*dh + p]
        let dims = MatDims {
            batch: self.hn,
            m: self.tn,
            n: self.t,
            k: self.dh,
        };
        let Inputs {
            q, k, row_stride, cols, ..
        } = *inputs;
        matmul_into(
            scores,
            self.scores(offset),
            q,
            self.rows_in(row_stride, cols[0]),
            k,
            self.keys_in(row_stride, cols[1]).t(),
            dims,
            None,
            scaling,
        )?;
        softmax_rows_at(scores, offset, self.hn * self.tn, self.t, mask)
    }
}

/// [`self_attention`] with the score buffer limited to `max_score_bytes` (also capped by the device's
/// binding limit). Results do not depend on the chunking: every score row is computed the same way.
pub fn self_attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
    max_score_bytes: u64,
) -> Result<Tensor> {
    let what = "attention";
    let dims = check_inputs(what, q, k, v, heads, key_mask)?;
    let inputs = Inputs::separate(q, k, v, dims.2);
    let (out, _) = forward(inputs, dims, heads, key_mask, None, false, max_score_bytes)?;
    Ok(out)
}

/// [`self_attention_inference`] of a fused QKV projection's output `qkv` `[B, T, 3 D]`, whose column blocks
/// `0..D`, `D..2 D` and `2 D..3 D` are q, k and v, read in place: by the quad kernel where inference takes it,
/// else by the unfused path's strided views (bit-identical to [`self_attention`] of the three blocks: the
/// same products in the same order), also where inference takes a kernel that reads `[B, T, D]` tensors
/// only (which is why `freeze` packs only where [`inference_reads_packed`]).
pub fn self_attention_packed(qkv: &Tensor, heads: usize, key_mask: Option<&Tensor>) -> Result<Tensor> {
    let what = "attention (packed q, k, v)";
    let [b, t, d3] = *qkv.shape() else {
        bail!("{what}: qkv must be [B, T, 3 D], got {:?}", qkv.shape());
    };
    ensure!(
        d3 % 3 == 0 && qkv.dtype() == DType::F32,
        "{what}: qkv must be f32 [B, T, 3 D], got {:?} {:?}",
        qkv.dtype(),
        qkv.shape()
    );
    let d = d3 / 3;
    check_heads_and_mask(what, b, t, d, heads, key_mask)?;
    let gpu = qkv.gpu();
    if let Some(kernel) = inference_kernel(gpu, d, heads, t).filter(|&k| reads_packed(k)) {
        return fused_forward(what, kernel, Inputs::packed(qkv, d), (b, t, d), heads, key_mask);
    }
    let budget = gpu.max_binding_bytes();
    let (out, _) = forward(Inputs::packed(qkv, d), (b, t, d), heads, key_mask, None, false, budget)?;
    Ok(out)
}

/// What [`self_attention_backward`] needs besides q, k, v and the key mask (which the caller keeps).
#[derive(Debug)]
pub struct AttentionSaved {
    /// Softmax probabilities before dropout, one `[heads, T, T]` tensor per batch item; empty when the
    /// backward recomputes them.
    probs: Vec<Tensor>,
    dropout: Option<DropoutMask>,
}

impl AttentionSaved {
    /// True when the probabilities were kept (else the backward recomputes them).
    pub fn saves_probs(&self) -> bool {
        !self.probs.is_empty()
    }

    /// Bytes of GPU memory held.
    pub fn saved_bytes(&self) -> u64 {
        self.probs.iter().map(|p| p.numel() as u64 * 4).sum()
    }

    /// The dropout applied to the probabilities, if any.
    pub fn dropout(&self) -> Option<DropoutMask> {
        self.dropout
    }
}

/// Training forward: [`self_attention`] with optional dropout on the probabilities (as transformers'
/// `attention_dropout`; `None` or p = 0 for none), returning what the backward needs. Saves the
/// probabilities when they fit [`DEFAULT_MAX_SAVED_BYTES`] (see the module notes). Without dropout the
/// output is bit-identical to [`self_attention`]'s.
pub fn self_attention_train(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
    dropout: Option<DropoutMask>,
) -> Result<(Tensor, AttentionSaved)> {
    let budget = q.gpu().max_binding_bytes();
    self_attention_train_with(q, k, v, heads, key_mask, dropout, DEFAULT_MAX_SAVED_BYTES, budget)
}

/// [`self_attention_train`] with the limits given: probabilities are saved only when all of them fit
/// `max_saved_bytes` (0: never) and each batch item's fit one binding; when they are not saved, score
/// buffers are limited to `max_score_bytes` as in [`self_attention_chunked`].
#[allow(clippy::too_many_arguments)]
pub fn self_attention_train_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<&Tensor>,
    dropout: Option<DropoutMask>,
    max_saved_bytes: u64,
    max_score_bytes: u64,
) -> Result<(Tensor, AttentionSaved)> {
    let what = "attention (training)";
    let (b, t, _) = check_inputs(what, q, k, v, heads, key_mask)?;
    let item_bytes = heads as u128 * t as u128 * t as u128 * 4;
    let save = item_bytes <= q.gpu().max_binding_bytes() as u128
        && item_bytes * b as u128 <= max_saved_bytes as u128
        && item_bytes > 0;
    let dropout = dropout.filter(|m| !m.is_identity());
    if let Some(m) = &dropout {
        DropoutMask::new(m.p, m.seed, m.stream)?;
    }
    let inputs = Inputs::separate(q, k, v, q.shape()[2]);
    let dims = (b, t, q.shape()[2]);
    let (out, probs) = forward(inputs, dims, heads, key_mask, dropout.as_ref(), save, max_score_bytes)?;
    Ok((out, AttentionSaved { probs, dropout }))
}

/// The forward behind every unfused entry point, over inputs the caller checked (`[B, T, D]` each as
/// `(b, t, d)`). With `save`, each batch item's probabilities are computed into a
/// tensor of their own (returned) instead of the shared score buffer.
#[allow(clippy::too_many_arguments)]
fn forward(
    inputs: Inputs,
    (b, t, d): (usize, usize, usize),
    heads: usize,
    key_mask: Option<&Tensor>,
    dropout: Option<&DropoutMask>,
    save: bool,
    max_score_bytes: u64,
) -> Result<(Tensor, Vec<Tensor>)> {
    let gpu = inputs.q.gpu();
    let out = Tensor::empty(gpu, &[b, t, d], DType::F32)?;
    if b == 0 || t == 0 || d == 0 {
        return Ok((out, Vec::new()));
    }
    let dh = d / heads;
    let chunks = if save {
        Chunks { heads, rows: t }
    } else {
        plan_chunks(heads, t, max_score_bytes.min(gpu.max_binding_bytes()))?
    };
    // Saving: probabilities go to per-item tensors, and with dropout P' needs a buffer of its own.
    // Not saving: one buffer holds the scores, then P, then P' (in place).
    let scratch = if !save || dropout.is_some() {
        Some(Tensor::empty(gpu, &[chunks.heads * chunks.rows, t], DType::F32)?)
    } else {
        None
    };
    let mut saved = Vec::new();
    // transformers: head_dim ** -0.5 in Python (f64), applied to the f32 scores as an f32 scalar.
    let scaling = (dh as f64).powf(-0.5) as f32;
    for bi in 0..b {
        let item_probs = if save {
            Some(Tensor::empty(gpu, &[heads, t, t], DType::F32)?)
        } else {
            None
        };
        for h0 in (0..heads).step_by(chunks.heads) {
            let hn = chunks.heads.min(heads - h0);
            for t0 in (0..t).step_by(chunks.rows) {
                let tn = chunks.rows.min(t - t0);
                let g = Group {
                    t,
                    d,
                    dh,
                    bi,
                    h0,
                    t0,
                    hn,
                    tn,
                };
                // Every row of this group belongs to batch item bi.
                let mask = key_mask.map(|m| MaskRef {
                    mask: m,
                    offset: bi * t,
                    rows_per_batch: hn * tn,
                });
                let (p_buf, p_off) = match &item_probs {
                    Some(p) => (p, h0 * t * t),
                    None => (scratch.as_ref().expect("a score buffer when not saving"), 0),
                };
                g.probabilities(&inputs, p_buf, p_off, scaling, mask)?;
                // Logical index of the group's first probability in [B, heads, T, T] (contiguous: a group
                // is either whole heads or row chunks of a single head).
                let index = ((bi * heads + h0) * t + t0) as u64 * t as u64;
                let (pv_buf, pv_off) = match (dropout, &item_probs) {
                    (None, _) => (p_buf, p_off),
                    (Some(m), None) => {
                        dropout_inplace_at(p_buf, p_off, g.score_len(), index, m)?;
                        (p_buf, p_off)
                    }
                    (Some(m), Some(p)) => {
                        let s = scratch.as_ref().expect("a dropout buffer when saving");
                        dropout_into_at(p, p_off, s, 0, g.score_len(), index, m)?;
                        (s, 0)
                    }
                };
                // out[t0 + i, h*dh + j] = sum_p P'[h, i, p] V[p, h*dh + j]
                let dims = MatDims {
                    batch: hn,
                    m: tn,
                    n: dh,
                    k: t,
                };
                let v_view = g.keys_in(inputs.row_stride, inputs.cols[2]);
                matmul_into(
                    &out,
                    g.rows(),
                    pv_buf,
                    g.scores(pv_off),
                    inputs.v,
                    v_view,
                    dims,
                    None,
                    1.0,
                )?;
            }
        }
        saved.extend(item_probs);
    }
    Ok((out, saved))
}

/// Backward of [`self_attention_train`]: `(dq, dk, dv)`, each `[B, T, D]`, for `dout` `[B, T, D]`, from the
/// same `q, k, v, heads, key_mask` and the forward's `saved`.
pub fn self_attention_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    saved: &AttentionSaved,
    heads: usize,
    key_mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let budget = q.gpu().max_binding_bytes();
    self_attention_backward_chunked(dout, q, k, v, saved, heads, key_mask, budget)
}

/// [`self_attention_backward`] with the score buffers of the recomputing path limited to
/// `max_score_bytes` (also capped by the binding limit); ignored when the probabilities were saved.
#[allow(clippy::too_many_arguments)]
pub fn self_attention_backward_chunked(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    saved: &AttentionSaved,
    heads: usize,
    key_mask: Option<&Tensor>,
    max_score_bytes: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let what = "attention backward";
    let (b, t, d) = check_inputs(what, q, k, v, heads, key_mask)?;
    if dout.shape() != q.shape() || dout.dtype() != DType::F32 {
        bail!(
            "{what}: dout must be f32 [B, T, D] = {:?} like q, got {:?} {:?}",
            q.shape(),
            dout.dtype(),
            dout.shape()
        );
    }
    if saved.saves_probs() && (saved.probs.len() != b || saved.probs.iter().any(|p| p.shape() != [heads, t, t])) {
        bail!(
            "{what}: the saved probabilities ({} tensors of {:?}) are not from a forward with B = {b}, \
             {heads} heads, T = {t}",
            saved.probs.len(),
            saved.probs.first().map(|p| p.shape().to_vec())
        );
    }
    let gpu = q.gpu();
    let (dq, dk, dv) = (
        Tensor::empty(gpu, &[b, t, d], DType::F32)?,
        Tensor::empty(gpu, &[b, t, d], DType::F32)?,
        Tensor::empty(gpu, &[b, t, d], DType::F32)?,
    );
    if b == 0 || t == 0 || d == 0 {
        return Ok((dq, dk, dv));
    }
    let dh = d / heads;
    let chunks = if saved.saves_probs() {
        Chunks { heads, rows: t }
    } else {
        plan_chunks(heads, t, max_score_bytes.min(gpu.max_binding_bytes()))?
    };
    let len = chunks.heads * chunks.rows * t;
    // grad: P' (with dropout), then dP', dP and dS, in place. probs: recomputed P when not saved.
    let grad = Tensor::empty(gpu, &[len], DType::F32)?;
    let probs = if saved.saves_probs() {
        None
    } else {
        Some(Tensor::empty(gpu, &[len], DType::F32)?)
    };
    let scaling = (dh as f64).powf(-0.5) as f32;
    let dropout = saved.dropout.as_ref();
    for bi in 0..b {
        for h0 in (0..heads).step_by(chunks.heads) {
            let hn = chunks.heads.min(heads - h0);
            for t0 in (0..t).step_by(chunks.rows) {
                let tn = chunks.rows.min(t - t0);
                let g = Group {
                    t,
                    d,
                    dh,
                    bi,
                    h0,
                    t0,
                    hn,
                    tn,
                };
                let (p_buf, p_off) = match &probs {
                    Some(p) => {
                        let mask = key_mask.map(|m| MaskRef {
                            mask: m,
                            offset: bi * t,
                            rows_per_batch: hn * tn,
                        });
                        g.probabilities(&Inputs::separate(q, k, v, d), p, 0, scaling, mask)?;
                        (p, 0)
                    }
                    None => (&saved.probs[bi], h0 * t * t),
                };
                let index = ((bi * heads + h0) * t + t0) as u64 * t as u64;
                // The later row chunks of a head add their part of the sums over query rows.
                let first = t0 == 0;
                // dV[j, c] (+)= sum_i P'[i, j] dO[i, c]
                let (pv_buf, pv_off) = match dropout {
                    None => (p_buf, p_off),
                    Some(m) => {
                        dropout_into_at(p_buf, p_off, &grad, 0, g.score_len(), index, m)?;
                        (&grad, 0)
                    }
                };
                let dims = MatDims {
                    batch: hn,
                    m: t,
                    n: dh,
                    k: tn,
                };
                let pt = g.scores(pv_off).t();
                if first {
                    matmul_into(&dv, g.keys(), pv_buf, pt, dout, g.rows(), dims, None, 1.0)?;
                } else {
                    matmul_accumulate_into(&dv, g.keys(), pv_buf, pt, dout, g.rows(), dims, 1.0)?;
                }
                // dP'[i, j] = sum_c dO[i, c] V[j, c], then dP = dropout_backward(dP'), dS = softmax_backward.
                let dims = MatDims {
                    batch: hn,
                    m: tn,
                    n: t,
                    k: dh,
                };
                matmul_into(&grad, g.scores(0), dout, g.rows(), v, g.keys().t(), dims, None, 1.0)?;
                if let Some(m) = dropout {
                    dropout_inplace_at(&grad, 0, g.score_len(), index, m)?;
                }
                softmax_backward_at(p_buf, p_off, &grad, 0, hn * tn, t)?;
                // dQ[i, c] = scaling * sum_j dS[i, j] K[j, c]
                let dims = MatDims {
                    batch: hn,
                    m: tn,
                    n: dh,
                    k: t,
                };
                matmul_into(&dq, g.rows(), &grad, g.scores(0), k, g.keys(), dims, None, scaling)?;
                // dK[j, c] (+)= scaling * sum_i dS[i, j] Q[i, c]
                let dims = MatDims {
                    batch: hn,
                    m: t,
                    n: dh,
                    k: tn,
                };
                let st = g.scores(0).t();
                if first {
                    matmul_into(&dk, g.keys(), &grad, st, q, g.rows(), dims, None, scaling)?;
                } else {
                    matmul_accumulate_into(&dk, g.keys(), &grad, st, q, g.rows(), dims, scaling)?;
                }
            }
        }
    }
    Ok((dq, dk, dv))
}

/// CPU references, f64 throughout. Generic over f32 and f64 inputs (f64 for finite-difference checks).
pub mod reference {
    use crate::ops::dropout::{reference::keep, DropoutMask};

    /// Naive attention over `[B, T, D]` inputs; masked keys are excluded (a fully masked row gives zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn self_attention<T: Copy + Into<f64>>(
        q: &[T],
        k: &[T],
        v: &[T],
        b: usize,
        t: usize,
        d: usize,
        heads: usize,
        key_mask: Option<&[u32]>,
    ) -> Vec<f64> {
        self_attention_train(q, k, v, b, t, d, heads, key_mask, None)
    }

    /// The probabilities `[B, heads, T, T]` (masked keys 0; a fully masked row all 0).
    #[allow(clippy::too_many_arguments)]
    pub fn probabilities<T: Copy + Into<f64>>(
        q: &[T],
        k: &[T],
        b: usize,
        t: usize,
        d: usize,
        heads: usize,
        key_mask: Option<&[u32]>,
    ) -> Vec<f64> {
        let dh = d / heads;
        let scale = (dh as f64).powf(-0.5);
        let at = |x: &[T], bi: usize, ti: usize, c: usize| -> f64 { x[(bi * t + ti) * d + c].into() };
        let mut p = vec![0f64; b * heads * t * t];
        for bi in 0..b {
            let valid = |j: usize| key_mask.is_none_or(|m| m[bi * t + j] != 0);
            for h in 0..heads {
                for i in 0..t {
                    let s: Vec<f64> = (0..t)
                        .map(|j| {
                            (0..dh)
                                .map(|c| at(q, bi, i, h * dh + c) * at(k, bi, j, h * dh + c))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = (0..t)
                        .filter(|&j| valid(j))
                        .map(|j| s[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = (0..t)
                        .map(|j| if valid(j) { (s[j] - max).exp() } else { 0.0 })
                        .collect();
                    let sum: f64 = e.iter().sum();
                    if sum == 0.0 {
                        continue;
                    }
                    let row = ((bi * heads + h) * t + i) * t;
                    for j in 0..t {
                        p[row + j] = e[j] / sum;
                    }
                }
            }
        }
        p
    }

    /// The factor dropout multiplies probability `index` of `[B, heads, T, T]` by (1 without dropout).
    fn drop_factor(dropout: Option<&DropoutMask>, index: usize) -> f64 {
        dropout.map_or(1.0, |m| if keep(m, index as u64) { m.scale() as f64 } else { 0.0 })
    }

    /// Training attention: dropout (regenerated as the GPU does) on the probabilities before `P V`.
    #[allow(clippy::too_many_arguments)]
    pub fn self_attention_train<T: Copy + Into<f64>>(
        q: &[T],
        k: &[T],
        v: &[T],
        b: usize,
        t: usize,
        d: usize,
        heads: usize,
        key_mask: Option<&[u32]>,
        dropout: Option<&DropoutMask>,
    ) -> Vec<f64> {
        let dh = d / heads;
        let p = probabilities(q, k, b, t, d, heads, key_mask);
        let mut out = vec![0f64; b * t * d];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..t {
                    let row = ((bi * heads + h) * t + i) * t;
                    for c in 0..dh {
                        out[(bi * t + i) * d + h * dh + c] = (0..t)
                            .map(|j| {
                                p[row + j] * drop_factor(dropout, row + j) * v[(bi * t + j) * d + h * dh + c].into()
                            })
                            .sum();
                    }
                }
            }
        }
        out
    }

    /// Backward of [`self_attention_train`]: `(dq, dk, dv)` for `dout`, all `[B, T, D]`.
    #[allow(clippy::too_many_arguments)]
    pub fn self_attention_backward<T: Copy + Into<f64>>(
        dout: &[T],
        q: &[T],
        k: &[T],
        v: &[T],
        b: usize,
        t: usize,
        d: usize,
        heads: usize,
        key_mask: Option<&[u32]>,
        dropout: Option<&DropoutMask>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let dh = d / heads;
        let scale = (dh as f64).powf(-0.5);
        let p = probabilities(q, k, b, t, d, heads, key_mask);
        let at = |x: &[T], bi: usize, ti: usize, c: usize| -> f64 { x[(bi * t + ti) * d + c].into() };
        let (mut dq, mut dk, mut dv) = (vec![0f64; b * t * d], vec![0f64; b * t * d], vec![0f64; b * t * d]);
        for bi in 0..b {
            for h in 0..heads {
                let col = |c: usize| h * dh + c;
                for i in 0..t {
                    let row = ((bi * heads + h) * t + i) * t;
                    // dP[j] = drop(j) * dO_i . V_j;  dS = P * (dP - sum(P dP))
                    let dp: Vec<f64> = (0..t)
                        .map(|j| {
                            let dpp: f64 = (0..dh).map(|c| at(dout, bi, i, col(c)) * at(v, bi, j, col(c))).sum();
                            dpp * drop_factor(dropout, row + j)
                        })
                        .collect();
                    let dot: f64 = (0..t).map(|j| p[row + j] * dp[j]).sum();
                    for j in 0..t {
                        let pd = p[row + j] * drop_factor(dropout, row + j);
                        let ds = p[row + j] * (dp[j] - dot);
                        for c in 0..dh {
                            dv[(bi * t + j) * d + col(c)] += pd * at(dout, bi, i, col(c));
                            dq[(bi * t + i) * d + col(c)] += scale * ds * at(k, bi, j, col(c));
                            dk[(bi * t + j) * d + col(c)] += scale * ds * at(q, bi, i, col(c));
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, calls_per_timing, check_grad_fd, random_vec, Tol};

    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        tq: Tensor,
        tk: Tensor,
        tv: Tensor,
    }

    fn case(seed: u64, b: usize, t: usize, d: usize) -> Case {
        let gpu = test_gpu();
        let n = b * t * d;
        // Scale 2 so that softmax rows are far from uniform.
        let (q, k, v) = (
            random_vec(seed, n, 2.0),
            random_vec(seed + 1, n, 2.0),
            random_vec(seed + 2, n, 1.0),
        );
        let up = |x: &[f32]| Tensor::from_slice(gpu, x, &[b, t, d]).unwrap();
        Case {
            tq: up(&q),
            tk: up(&k),
            tv: up(&v),
            q,
            k,
            v,
        }
    }

    #[test]
    fn matches_naive_reference() {
        // dh = 4 and 8 take the vec4 matmul paths, dh = 5 the general one.
        for b in [1, 2] {
            for (d, heads) in [(12, 3), (40, 5), (15, 3)] {
                for t in [1, 7, 37, 130] {
                    let c = case(100 + (b * 1000 + d * 10 + t) as u64, b, t, d);
                    let y = self_attention(&c.tq, &c.tk, &c.tv, heads, None).unwrap();
                    assert_eq!(y.shape(), &[b, t, d]);
                    let want = reference::self_attention(&c.q, &c.k, &c.v, b, t, d, heads, None);
                    assert_close(
                        &format!("attention B={b} T={t} D={d} heads={heads}"),
                        &y.to_vec().unwrap(),
                        &want,
                        Tol::KERNEL,
                    );
                }
            }
        }
    }

    #[test]
    fn padded_keys_are_ignored() {
        let gpu = test_gpu();
        let (b, t, d, heads) = (3, 37, 40, 5);
        let c = case(200, b, t, d);
        // Item 0 unpadded, item 1 has 20 valid frames, item 2 only one.
        let mut mask = vec![1u32; b * t];
        mask[t + 20..2 * t].fill(0);
        mask[2 * t + 1..].fill(0);
        let m = Tensor::from_u32(gpu, &mask, &[b, t]).unwrap();
        let y = self_attention(&c.tq, &c.tk, &c.tv, heads, Some(&m))
            .unwrap()
            .to_vec()
            .unwrap();
        let want = reference::self_attention(&c.q, &c.k, &c.v, b, t, d, heads, Some(&mask));
        assert_close("attention with key mask", &y, &want, Tol::KERNEL);
        // Item 2 attends only to key 0, so every query's output is V[2, 0].
        for i in 0..t {
            for ch in 0..d {
                let got = y[(2 * t + i) * d + ch];
                let v0 = c.v[2 * t * d + ch];
                assert!(
                    (got - v0).abs() <= 1e-6 * v0.abs().max(1.0),
                    "query {i} ch {ch}: {got} vs {v0}"
                );
            }
        }
    }

    #[test]
    fn chunked_scores_give_identical_results() {
        let gpu = test_gpu();
        for (d, heads) in [(40, 5), (15, 3)] {
            let (b, t) = (2, 37);
            let c = case(300 + d as u64, b, t, d);
            let mut mask = vec![1u32; b * t];
            mask[t + 30..].fill(0);
            let m = Tensor::from_u32(gpu, &mask, &[b, t]).unwrap();
            let full = self_attention(&c.tq, &c.tk, &c.tv, heads, Some(&m))
                .unwrap()
                .to_vec()
                .unwrap();
            let row = (t * 4) as u64;
            // 2 heads per group (last group smaller); then 5 query rows of 1 head; then a single row.
            for budget in [2 * t as u64 * row + 7, 5 * row, row] {
                let got = self_attention_chunked(&c.tq, &c.tk, &c.tv, heads, Some(&m), budget)
                    .unwrap()
                    .to_vec()
                    .unwrap();
                assert!(got == full, "D={d}: budget {budget} bytes changed the result");
            }
        }
    }

    /// q, k, v packed as the column blocks of one `[B, T, 3 D]` tensor (a fused QKV projection) give the bits of
    /// the three tensors apart, with a key mask, on head widths that take the vec4 (dh 8) and general (dh 5)
    /// matmul paths; a packed tensor whose width is not 3 D is refused.
    #[test]
    fn packed_qkv_gives_the_bits_of_separate_tensors() {
        let gpu = test_gpu();
        for (d, heads) in [(40, 5), (15, 3)] {
            let (b, t) = (2, 37);
            let c = case(700 + d as u64, b, t, d);
            let packed: Vec<f32> = (0..b * t)
                .flat_map(|row| [&c.q, &c.k, &c.v].map(|x| &x[row * d..(row + 1) * d]).concat())
                .collect();
            let qkv = Tensor::from_slice(gpu, &packed, &[b, t, 3 * d]).unwrap();
            let mut mask = vec![1u32; b * t];
            mask[t + 30..].fill(0);
            let m = Tensor::from_u32(gpu, &mask, &[b, t]).unwrap();
            let apart = self_attention(&c.tq, &c.tk, &c.tv, heads, Some(&m)).unwrap();
            let got = self_attention_packed(&qkv, heads, Some(&m)).unwrap();
            assert_eq!(got.shape(), &[b, t, d]);
            let bits = |x: &Tensor| x.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(&got) == bits(&apart), "D = {d}: packed q, k, v changed the result");
        }
        let odd = Tensor::zeros(gpu, &[1, 4, 10]).unwrap();
        let e = self_attention_packed(&odd, 2, None).unwrap_err();
        assert!(format!("{e:#}").contains("[B, T, 3 D]"), "{e:#}");
    }

    /// Packed q, k, v at head dim 64 on either side of `QUAD_LONGEST_T`: where the length takes a fused kernel
    /// that reads them packed (the quad kernel on GPUs), the result is the unfused one's to the kernels'
    /// tolerance; elsewhere (longer sequences on GPUs; lavapipe, whose subgroup kernel reads separate tensors)
    /// it is the unfused path, bit for bit.
    #[test]
    fn packed_attention_takes_the_kernel_its_length_calls_for() {
        let gpu = test_gpu();
        let (b, d, heads) = (1, 128, 2);
        for t in [QUAD_LONGEST_T, QUAD_LONGEST_T + 1] {
            let c = case(900 + t as u64, b, t, d);
            let packed: Vec<f32> = (0..b * t)
                .flat_map(|row| [&c.q, &c.k, &c.v].map(|x| &x[row * d..(row + 1) * d]).concat())
                .collect();
            let qkv = Tensor::from_slice(gpu, &packed, &[b, t, 3 * d]).unwrap();
            let got = self_attention_packed(&qkv, heads, None).unwrap().to_vec().unwrap();
            let unfused = self_attention(&c.tq, &c.tk, &c.tv, heads, None)
                .unwrap()
                .to_vec()
                .unwrap();
            let kernel = inference_kernel(gpu, d, heads, t).filter(|&k| reads_packed(k));
            eprintln!("T = {t}: {kernel:?}");
            if kernel.is_some() {
                let want: Vec<f64> = unfused.iter().map(|&v| v as f64).collect();
                assert_close(&format!("packed, fused, T = {t}"), &got, &want, Tol::KERNEL);
            } else {
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&got) == bits(&unfused),
                    "T = {t}: the packed unfused path changed the result"
                );
            }
            if t > QUAD_LONGEST_T && forced_fused_kernel().is_none() {
                assert_ne!(kernel, Some(FusedKernel::Quad), "T = {t}");
            }
        }
    }

    #[test]
    fn chunk_plan() {
        // T = 3000, 12 heads, 128 MiB: 3 heads of 36 MB each fit.
        let c = plan_chunks(12, 3000, 128 << 20).unwrap();
        assert_eq!(c, Chunks { heads: 3, rows: 3000 });
        assert_eq!(plan_chunks(12, 10, 1 << 20).unwrap(), Chunks { heads: 12, rows: 10 });
        assert_eq!(plan_chunks(12, 100, 400 * 7).unwrap(), Chunks { heads: 1, rows: 7 });
        assert!(plan_chunks(12, 100, 399).is_err());
    }

    #[test]
    fn bad_inputs_give_clear_errors() {
        let c = case(400, 1, 5, 12);
        let err = self_attention(&c.tq, &c.tk, &c.tv, 5, None).unwrap_err().to_string();
        assert!(err.contains("do not divide"), "{err}");
        let m = Tensor::from_u32(test_gpu(), &[1; 4], &[1, 4]).unwrap();
        let err = self_attention(&c.tq, &c.tk, &c.tv, 3, Some(&m))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key_mask"), "{err}");
        let k2 = Tensor::zeros(test_gpu(), &[1, 6, 12]).unwrap();
        let err = self_attention(&c.tq, &k2, &c.tv, 3, None).unwrap_err().to_string();
        assert!(err.contains("same shape"), "{err}");
    }

    /// Wall time of one wav2vec2-base attention (T = 149, D = 768, 12 heads); prints, never asserts.
    #[test]
    #[ignore]
    fn bench_attention_149x768() {
        let gpu = test_gpu();
        let (b, t, d, heads) = (1, 149, 768, 12);
        let c = case(500, b, t, d);
        self_attention(&c.tq, &c.tk, &c.tv, heads, None)
            .unwrap()
            .to_vec()
            .unwrap();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            let _y = self_attention(&c.tq, &c.tk, &c.tv, heads, None).unwrap();
            gpu.sync().unwrap();
            best = best.min(start.elapsed().as_secs_f64());
        }
        let flop = 4.0 * (b * heads * t * t * (d / heads)) as f64;
        eprintln!(
            "attention B={b} T={t} D={d} heads={heads}: {:.1} ms ({:.2} GFLOP/s in its matmuls)",
            best * 1e3,
            flop / best / 1e9
        );
    }

    #[test]
    fn fused_matches_reference_and_unfused() {
        let gpu = test_gpu();
        // The portable kernel runs on every adapter (forced here); the subgroup and quad ones where they can.
        let mut kernels = vec![FusedKernel::Portable];
        if gpu.subgroups_of_8() {
            kernels.push(FusedKernel::Subgroup);
        }
        if gpu.subgroup_quads() {
            kernels.push(FusedKernel::Quad);
        }
        // T around and not multiples of the 8- and 64-row, 8- and 32-key blocks; masks: none, ragged, one item
        // all padded.
        for (kernel, (b, heads, t)) in kernels.iter().flat_map(|&k| {
            [
                (1, 1, 1),
                (2, 2, 7),
                (1, 1, 8),
                (2, 3, 9),
                (3, 2, 37),
                (2, 1, 130),
                (1, 2, 65),
            ]
            .map(|c| (k, c))
        }) {
            let d = heads * FUSED_HEAD_DIM;
            let c = case(1200 + (b * 1000 + heads * 100 + t) as u64, b, t, d);
            let mut all_padded = vec![1u32; b * t];
            all_padded[(b - 1) * t..].fill(0);
            let masks = [None, Some(ragged_mask(b, t)), Some(all_padded)];
            for (mi, mask) in masks.iter().enumerate() {
                let tm = mask.as_ref().map(|m| Tensor::from_u32(gpu, m, &[b, t]).unwrap());
                let got = self_attention_fused_with(kernel, &c.tq, &c.tk, &c.tv, heads, tm.as_ref())
                    .unwrap()
                    .to_vec()
                    .unwrap();
                let name = format!("fused attention ({kernel:?}) b={b} heads={heads} t={t} mask {mi}");
                let want = reference::self_attention(&c.q, &c.k, &c.v, b, t, d, heads, mask.as_deref());
                assert_close(&name, &got, &want, Tol::KERNEL);
                let unfused = self_attention(&c.tq, &c.tk, &c.tv, heads, tm.as_ref())
                    .unwrap()
                    .to_vec()
                    .unwrap();
                assert_close(&format!("{name} vs unfused"), &got, &to64(&unfused), Tol::KERNEL);
                if mi == 2 {
                    // The fully padded item gets exact zeros, as the unfused path.
                    assert!(got[(b - 1) * t * d..].iter().all(|&x| x == 0.0), "{name}");
                }
                if reads_packed(kernel) {
                    // q, k, v as the column blocks of one [B, T, 3 D] tensor: the same bits.
                    let packed: Vec<f32> = (0..b * t)
                        .flat_map(|row| [&c.q, &c.k, &c.v].map(|x| &x[row * d..(row + 1) * d]).concat())
                        .collect();
                    let qkv = Tensor::from_slice(gpu, &packed, &[b, t, 3 * d]).unwrap();
                    let inputs = Inputs::packed(&qkv, d);
                    let from_packed = fused_forward("test", kernel, inputs, (b, t, d), heads, tm.as_ref())
                        .unwrap()
                        .to_vec()
                        .unwrap();
                    assert!(from_packed == got, "{name}: packed q, k, v changed the result");
                }
            }
        }
    }

    /// The quad kernel takes sequences up to `QUAD_LONGEST_T` frames unless forced; the others take any.
    #[test]
    fn quad_kernel_takes_short_sequences_unless_forced() {
        for t in [1, 49, QUAD_LONGEST_T] {
            assert!(takes_len(FusedKernel::Quad, false, t), "T = {t}");
        }
        for t in [QUAD_LONGEST_T + 1, 499] {
            assert!(!takes_len(FusedKernel::Quad, false, t), "T = {t}");
            assert!(takes_len(FusedKernel::Quad, true, t), "T = {t}, forced");
            assert!(takes_len(FusedKernel::Subgroup, false, t) && takes_len(FusedKernel::Portable, false, t));
        }
    }

    /// The workgroup memory the portable kernel is chosen by is what its shader declares.
    #[test]
    fn portable_workgroup_memory_is_what_the_shader_declares() {
        let module = naga::front::wgsl::parse_str(SHADER.source).unwrap();
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        let bytes: u32 = module
            .global_variables
            .iter()
            .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
            .map(|(_, g)| layouter[g.ty].size)
            .sum();
        assert_eq!(bytes, PORTABLE_WORKGROUP_BYTES);
    }

    #[test]
    fn fused_bad_inputs_give_clear_errors() {
        let gpu = test_gpu();
        let c = case(1300, 1, 5, 12);
        let err = self_attention_fused(&c.tq, &c.tk, &c.tv, 3, None)
            .unwrap_err()
            .to_string();
        let want = if fused_kernel_for(gpu).is_some() {
            "head dimension of 64"
        } else {
            "subgroups"
        };
        assert!(err.contains(want), "{err}");
        // The inference entry point falls back to the unfused path where the fused one cannot run.
        let y = self_attention_inference(&c.tq, &c.tk, &c.tv, 3, None)
            .unwrap()
            .to_vec()
            .unwrap();
        let want = self_attention(&c.tq, &c.tk, &c.tv, 3, None).unwrap().to_vec().unwrap();
        assert!(y == want);
    }

    /// Unfused and fused inference attention (each fused kernel this adapter can run) interleaved, best of 5
    /// each, for B = 1, 12 heads of 64 and T = 49, 149, 499 (prints, never asserts; --ignored).
    #[test]
    #[ignore]
    fn bench_attention_fused_vs_unfused() {
        let gpu = test_gpu();
        let ts: Vec<usize> = std::env::var("BENCH_T")
            .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect())
            .unwrap_or(vec![49, 149, 499]);
        for t in ts {
            let (b, d, heads) = (1, 768, 12);
            let c = case(600 + t as u64, b, t, d);
            let flop = 4.0 * (b * heads * t * t * (d / heads)) as f64;
            let reps = calls_per_timing(flop);
            // None: unfused; then each fused kernel.
            let run = |kernel: Option<FusedKernel>| {
                let start = std::time::Instant::now();
                for _ in 0..reps {
                    let y = match kernel {
                        Some(k) => self_attention_fused_with(k, &c.tq, &c.tk, &c.tv, heads, None),
                        None => self_attention(&c.tq, &c.tk, &c.tv, heads, None),
                    };
                    y.unwrap();
                }
                gpu.sync().unwrap();
                start.elapsed().as_secs_f64() / reps as f64
            };
            let mut kernels = vec![None, Some(FusedKernel::Portable)];
            if gpu.subgroups_of_8() {
                kernels.push(Some(FusedKernel::Subgroup));
            }
            if gpu.subgroup_quads() {
                kernels.push(Some(FusedKernel::Quad));
            }
            for &k in &kernels {
                run(k); // compiles the pipelines
            }
            let mut best = vec![f64::MAX; kernels.len()];
            for _ in 0..5 {
                for (i, &k) in kernels.iter().enumerate() {
                    best[i] = best[i].min(run(k));
                }
            }
            let line: Vec<String> = kernels
                .iter()
                .zip(&best)
                .map(|(k, &s)| {
                    let name = k.map_or("unfused".to_string(), |k| format!("{k:?}"));
                    format!(
                        "{name} {:.2} ms ({:.2} GFLOP/s, {:.2}x)",
                        s * 1e3,
                        flop / s / 1e9,
                        best[0] / s
                    )
                })
                .collect();
            eprintln!(
                "attention B={b} T={t} D={d} heads={heads} ({reps} per timing): {}",
                line.join(", ")
            );
        }
    }

    /// A key mask for B items of T frames: item b has `T - b * T / 4` valid frames (at least one).
    fn ragged_mask(b: usize, t: usize) -> Vec<u32> {
        let mut mask = vec![1u32; b * t];
        for bi in 1..b {
            let valid = (t - bi * t / 4).max(1);
            mask[bi * t + valid..(bi + 1) * t].fill(0);
        }
        mask
    }

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    #[test]
    fn grad_attention_reference_matches_finite_differences() {
        let (b, t, d, heads) = (2, 5, 6, 2);
        let n = b * t * d;
        let mut mask = vec![1u32; b * t];
        mask[t + 3..].fill(0);
        let (q, k, v) = (
            to64(&random_vec(1, n, 1.5)),
            to64(&random_vec(2, n, 1.5)),
            to64(&random_vec(3, n, 1.0)),
        );
        let g = to64(&random_vec(4, n, 1.0));
        for dropout in [None, Some(DropoutMask::new(0.3, 11, 4).unwrap())] {
            let dm = dropout.as_ref();
            let (dq, dk, dv) = reference::self_attention_backward(&g, &q, &k, &v, b, t, d, heads, Some(&mask), dm);
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                reference::self_attention_train(q, k, v, b, t, d, heads, Some(&mask), dm)
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a * b)
                    .sum()
            };
            let name = |x: &str| format!("attention {x} (dropout {})", dropout.is_some());
            check_grad_fd(&name("dq"), &dq, &q, |x| loss(x, &k, &v));
            check_grad_fd(&name("dk"), &dk, &k, |x| loss(&q, x, &v));
            check_grad_fd(&name("dv"), &dv, &v, |x| loss(&q, &k, x));
        }
    }

    /// Runs the training forward and the backward on the GPU against the references; returns the GPU's
    /// (y, dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    fn check_backward(
        name: &str,
        seed: u64,
        (b, t, d, heads): (usize, usize, usize, usize),
        mask: Option<&[u32]>,
        dropout: Option<DropoutMask>,
        max_saved_bytes: u64,
        max_score_bytes: u64,
    ) -> [Vec<f32>; 4] {
        let gpu = test_gpu();
        let c = case(seed, b, t, d);
        let dout = random_vec(seed + 3, b * t * d, 1.0);
        let tdout = Tensor::from_slice(gpu, &dout, &[b, t, d]).unwrap();
        let tm = mask.map(|m| Tensor::from_u32(gpu, m, &[b, t]).unwrap());
        let (y, saved) = self_attention_train_with(
            &c.tq,
            &c.tk,
            &c.tv,
            heads,
            tm.as_ref(),
            dropout,
            max_saved_bytes,
            max_score_bytes,
        )
        .unwrap();
        assert_eq!(saved.saves_probs(), max_saved_bytes > 0, "{name}: saving decision");
        let dm = dropout.as_ref();
        let want_y = reference::self_attention_train(&c.q, &c.k, &c.v, b, t, d, heads, mask, dm);
        let y = y.to_vec().unwrap();
        assert_close(&format!("{name} forward"), &y, &want_y, Tol::KERNEL);
        let (dq, dk, dv) =
            self_attention_backward_chunked(&tdout, &c.tq, &c.tk, &c.tv, &saved, heads, tm.as_ref(), max_score_bytes)
                .unwrap();
        let (want_dq, want_dk, want_dv) =
            reference::self_attention_backward(&dout, &c.q, &c.k, &c.v, b, t, d, heads, mask, dm);
        let (dq, dk, dv) = (dq.to_vec().unwrap(), dk.to_vec().unwrap(), dv.to_vec().unwrap());
        assert_close(&format!("{name} dq"), &dq, &want_dq, Tol::KERNEL);
        assert_close(&format!("{name} dk"), &dk, &want_dk, Tol::KERNEL);
        assert_close(&format!("{name} dv"), &dv, &want_dv, Tol::KERNEL);
        [y, dq, dk, dv]
    }

    #[test]
    fn grad_attention_backward_matches_reference() {
        // Saved probabilities; dh = 4 and 8 take the vec4 matmul paths, dh = 5 the general one.
        for b in [1, 2] {
            for (d, heads) in [(12, 3), (40, 5), (15, 3)] {
                for t in [1, 7, 37, 130] {
                    let mask = ragged_mask(b, t);
                    let seed = 600 + (b * 1000 + d * 10 + t) as u64;
                    let name = format!("attention backward B={b} T={t} D={d} heads={heads}");
                    let mask = (b > 1).then_some(&mask[..]);
                    check_backward(&name, seed, (b, t, d, heads), mask, None, u64::MAX, u64::MAX);
                }
            }
        }
    }

    #[test]
    fn grad_attention_backward_recomputed_in_chunks_matches_reference() {
        for (d, heads) in [(40, 5), (15, 3)] {
            let (b, t) = (2, 37);
            let mask = ragged_mask(b, t);
            let shape = (b, t, d, heads);
            let seed = 700 + d as u64;
            let [y_saved, dq_saved, ..] = check_backward("saved", seed, shape, Some(&mask), None, u64::MAX, u64::MAX);
            let row = (t * 4) as u64;
            // All heads at once; 2 heads per group; 5 query rows of one head (dK, dV summed over 8 chunks);
            // a single row (one shape only: 111 chunks per item is slow on lavapipe).
            let mut budgets = vec![u64::MAX, 2 * t as u64 * row + 7, 5 * row];
            if heads == 3 {
                budgets.push(row);
            }
            for budget in budgets {
                let name = format!("attention backward recomputed D={d} budget={budget}");
                let [y, dq, ..] = check_backward(&name, seed, shape, Some(&mask), None, 0, budget);
                // Each row of P and dS is computed the same way however the work is split.
                assert!(y == y_saved, "{name}: forward differs from the saved path");
                assert!(dq == dq_saved, "{name}: dq differs from the saved path");
            }
        }
    }

    #[test]
    fn grad_attention_backward_with_dropout_matches_reference() {
        let dropout = DropoutMask::new(0.2, 0x5eed, 17).unwrap();
        for (b, t, d, heads) in [(2, 37, 40, 5), (2, 130, 12, 3)] {
            let mask = ragged_mask(b, t);
            let seed = 800 + t as u64;
            let shape = (b, t, d, heads);
            let name = format!("attention dropout B={b} T={t} D={d}");
            let [y_saved, ..] = check_backward(&name, seed, shape, Some(&mask), Some(dropout), u64::MAX, u64::MAX);
            let budget = 5 * (t * 4) as u64;
            let name = format!("{name} recomputed in 5-row chunks");
            let [y, ..] = check_backward(&name, seed, shape, Some(&mask), Some(dropout), 0, budget);
            assert!(y == y_saved, "{name}: the dropout mask depends on the chunking");
        }
    }

    #[test]
    fn training_forward_without_dropout_is_the_inference_forward() {
        let gpu = test_gpu();
        let (b, t, d, heads) = (2, 37, 40, 5);
        let c = case(900, b, t, d);
        let m = Tensor::from_u32(gpu, &ragged_mask(b, t), &[b, t]).unwrap();
        let want = self_attention(&c.tq, &c.tk, &c.tv, heads, Some(&m))
            .unwrap()
            .to_vec()
            .unwrap();
        let p0 = DropoutMask::new(0.0, 1, 2).unwrap();
        for (dropout, max_saved) in [(None, u64::MAX), (Some(p0), u64::MAX), (None, 0)] {
            let (y, saved) =
                self_attention_train_with(&c.tq, &c.tk, &c.tv, heads, Some(&m), dropout, max_saved, u64::MAX).unwrap();
            assert!(
                y.to_vec().unwrap() == want,
                "dropout {dropout:?}, max_saved {max_saved}"
            );
            assert_eq!(saved.dropout(), None, "p = 0 is no dropout");
            let bytes = if max_saved > 0 {
                (b * heads * t * t * 4) as u64
            } else {
                0
            };
            assert_eq!(saved.saved_bytes(), bytes);
        }
        // The default budget keeps the student's largest probabilities (B = 8, T = 250, 12 heads: 24 MB).
        const { assert!(8 * 12 * 250 * 250 * 4 <= DEFAULT_MAX_SAVED_BYTES) };
    }

    #[test]
    fn backward_bad_inputs_give_clear_errors() {
        let gpu = test_gpu();
        let c = case(950, 2, 5, 12);
        let (_, saved) = self_attention_train(&c.tq, &c.tk, &c.tv, 3, None, None).unwrap();
        let dout = Tensor::zeros(gpu, &[2, 5, 12]).unwrap();
        assert!(self_attention_backward(&dout, &c.tq, &c.tk, &c.tv, &saved, 3, None).is_ok());
        let bad = Tensor::zeros(gpu, &[2, 6, 12]).unwrap();
        let err = self_attention_backward(&bad, &c.tq, &c.tk, &c.tv, &saved, 3, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dout"), "{err}");
        let err = self_attention_backward(&dout, &c.tq, &c.tk, &c.tv, &saved, 4, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("saved probabilities"), "{err}");
        let err = self_attention_train(&c.tq, &c.tk, &c.tv, 5, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not divide"), "{err}");
    }

    /// Training forward and backward of one wav2vec2-base attention, B = 2, T = 149, D = 768, 12 heads
    /// (prints, never asserts; --ignored).
    #[test]
    #[ignore]
    fn bench_attention_backward_2x149x768() {
        let gpu = test_gpu();
        let (b, t, d, heads) = (2, 149, 768, 12);
        let c = case(501, b, t, d);
        let dout = Tensor::from_slice(gpu, &random_vec(502, b * t * d, 1.0), &[b, t, d]).unwrap();
        let dropout = DropoutMask::new(0.1, 3, 4).unwrap();
        for (name, drop, max_saved) in [
            ("saved P", None, DEFAULT_MAX_SAVED_BYTES),
            ("saved P, dropout 0.1", Some(dropout), DEFAULT_MAX_SAVED_BYTES),
            ("recomputed P", None, 0),
        ] {
            let budget = gpu.max_binding_bytes();
            let fwd = || {
                let r = self_attention_train_with(&c.tq, &c.tk, &c.tv, heads, None, drop, max_saved, budget).unwrap();
                gpu.sync().unwrap();
                r
            };
            let bwd = |saved: &AttentionSaved| {
                let r = self_attention_backward(&dout, &c.tq, &c.tk, &c.tv, saved, heads, None).unwrap();
                gpu.sync().unwrap();
                r
            };
            let (_, saved) = fwd(); // compiles the pipelines
            bwd(&saved);
            let (mut best_f, mut best_b) = (f64::MAX, f64::MAX);
            for _ in 0..3 {
                let start = std::time::Instant::now();
                let (_, saved) = fwd();
                best_f = best_f.min(start.elapsed().as_secs_f64());
                let start = std::time::Instant::now();
                bwd(&saved);
                best_b = best_b.min(start.elapsed().as_secs_f64());
            }
            let flop = 2.0 * (b * heads * t * t * (d / heads)) as f64; // one T x T x dh product
            eprintln!(
                "attention B={b} T={t} D={d} heads={heads}, {name}: forward {:.1} ms, backward {:.1} ms \
                 ({:.2} GFLOP/s in its matmuls); {:.1} MB saved",
                best_f * 1e3,
                best_b * 1e3,
                (if max_saved > 0 { 4.0 } else { 5.0 }) * flop / best_b / 1e9,
                saved.saved_bytes() as f64 / 1e6
            );
        }
    }
}
