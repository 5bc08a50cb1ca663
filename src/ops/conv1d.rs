//! Channels-last 1-D convolution (`shaders/conv1d.wgsl`), as wav2vec 2.0 uses it: the feature-encoder convs
//! (C_in = 1, K = 10, stride 5; then 512 -> 512, K = 3 or 2, stride 2) and the grouped positional conv
//! (C = 768, K = 128, groups = 16, padding 64).
//!
//! `x` is `[B, T, C_in]`, the weight is torch's `[C_out, C_in / groups, K]`, the output `[B, T_out, C_out]`
//! with `T_out = (T + 2 * padding - K) / stride + 1` (zero padding on both sides). The kernel is an implicit
//! GEMM (no im2col buffer) over a weight repacked to `[groups, K, C_in / groups, C_out / groups]` (channel
//! blocks padded to 4); [`Conv1dWeight::pack`] does that once, [`conv1d`] does it on every call.
//!
//! Training: [`conv1d_backward`] gives dx (a gather-form transposed conv), dw (a GEMM over the B * T_out rows,
//! reduced in row splits whose partials a second pass adds in order) and db, all deterministic (no atomics).
//! Where the pre-activation is needed, training runs [`conv1d`] then a separate GELU (no fused backward).
//!
//! On adapters with subgroups of exactly 8 invocations (lavapipe), the forward, dx and dw run the kernels of
//! `shaders/conv1d_sg.wgsl` where the shape allows (see [`ConvKernel`]); they give the same bits as the
//! 4 x 4 kernels. `WGPU_MLKD_NO_CONV_SUBGROUPS=1` keeps the 4 x 4 conv kernels (to compare them),
//! `WGPU_MLKD_NO_SUBGROUPS=1` turns off every subgroup kernel (matmul too).

use anyhow::{bail, ensure, Result};

use crate::gpu::{DType, Shader, Tensor};

static SHADER: Shader = crate::shader!("conv1d");
static SG_SHADER: Shader = crate::shader!("conv1d_sg");

/// Output frames and channel blocks per invocation (a 4 x 4 register block).
const BLOCK: usize = 4;
/// Invocations per workgroup along channel blocks and frame blocks (`@workgroup_size(16, 4)`).
const WG_CB: usize = 16;
const WG_FB: usize = 4;
/// Lanes per subgroup, and subgroups per workgroup, of the subgroup kernels (`@workgroup_size(64)`).
const SG_LANES: usize = 8;
const SG_PER_WG: usize = 8;

/// Which kernels run a conv (the forward, dx and dw each choose; see [`choose_conv_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// `shaders/conv1d.wgsl`: a 4 x 4 register block per invocation; any shape.
    Block4,
    /// `shaders/conv1d_sg.wgsl`: the 8 lanes of a subgroup share 8 rows (frames or output channels) and
    /// broadcast their operand (adapters with subgroups of exactly 8). Needs the vec4-loaded channels per
    /// group (C_in / groups for the forward and dw, C_out / groups for dx) to be a multiple of 4.
    Subgroup,
    /// The forward as strided matmuls (`src/ops/matmul.rs`): the receptive fields of a channels-last input
    /// are rows of one view (row stride `stride * C_in`, K * C_in contiguous columns) and the packed weight is
    /// `[K * C_in, C_out]`, so the GPU's matmul kernels run the feature encoder. With groups or padding the
    /// input is first copied group-major and zero-padded (`[B, G, T + 2 P, C_in / G]`, `conv1d_group_pad`) and
    /// each batch item is one matmul batched over the groups (each group its own fields, weight block, output
    /// columns and bias slice; split along k like any product, `split_k_for`): where the tiled matmul is
    /// chosen, [`conv1d_packed`] takes this route for every convolution it fits, [`conv1d_backward`] (dw from
    /// tap-major products, dx by col2im) whenever it needs dx. Needs C_out / groups % 4 == 0 (and
    /// C_in / groups for the backward).
    Matmul,
}

/// The forward shapes [`ConvKernel::Matmul`] can run.
fn matmul_fits(w: &Conv1dWeight) -> bool {
    (w.c_out / w.groups) % BLOCK == 0
}

/// Channels per group, along the product's columns, below which the subgroup kernels leave too many lanes
/// idle to pay (a subgroup spans 32 channels of one group; a workgroup 8 subgroups).
const SG_MIN_COLS: usize = 32;

/// True when the adapter has subgroups of exactly 8 and `WGPU_MLKD_NO_CONV_SUBGROUPS` is unset.
fn conv_subgroups(gpu: &crate::gpu::Gpu) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    gpu.subgroups_of_8() && !*OFF.get_or_init(|| std::env::var_os("WGPU_MLKD_NO_CONV_SUBGROUPS").is_some())
}

/// The subgroup kernel where the adapter has it, the shape fits it (`vec4_channels`, the channels per group
/// the kernel loads as vec4, a multiple of 4) and the columns (`col_channels` per group) fill its lanes.
pub fn choose_conv_kernel(gpu: &crate::gpu::Gpu, vec4_channels: usize, col_channels: usize) -> ConvKernel {
    if conv_subgroups(gpu) && vec4_channels % 4 == 0 && col_channels >= SG_MIN_COLS {
        ConvKernel::Subgroup
    } else {
        ConvKernel::Block4
    }
}

fn check_kernel(op: &str, gpu: &crate::gpu::Gpu, kernel: ConvKernel, vec4_channels: usize) -> Result<()> {
    if kernel == ConvKernel::Subgroup {
        ensure!(
            gpu.subgroups_of_8(),
            "{op}: the subgroup kernel needs an adapter with subgroups of exactly 8 invocations"
        );
        ensure!(
            vec4_channels % 4 == 0,
            "{op}: the subgroup kernel needs a multiple of 4 channels per group, got {vec4_channels}"
        );
    }
    Ok(())
}

/// A conv weight in the kernel's layout `[groups, K, C_in / groups, C_out / groups rounded up to 4]`.
#[derive(Clone, Debug)]
pub struct Conv1dWeight {
    packed: Tensor,
    c_out: usize,
    cg_in: usize,
    k: usize,
    groups: usize,
}

impl Conv1dWeight {
    /// Repacks a torch-layout weight `[C_out, C_in / groups, K]` (recorded on the GPU, no readback).
    pub fn pack(w: &Tensor, groups: usize) -> Result<Conv1dWeight> {
        let &[c_out, cg_in, k] = w.shape() else {
            bail!("conv1d: weight must be [C_out, C_in/groups, K], got {:?}", w.shape());
        };
        ensure!(
            w.dtype() == DType::F32,
            "conv1d: weight must be f32, got {:?}",
            w.dtype()
        );
        ensure!(groups > 0, "conv1d: groups must be at least 1");
        ensure!(c_out > 0 && cg_in > 0 && k > 0, "conv1d: empty weight {:?}", w.shape());
        ensure!(
            c_out % groups == 0,
            "conv1d: C_out = {c_out} is not divisible by groups = {groups}"
        );
        let cg_out = c_out / groups;
        let cg_out_pad = cg_out.div_ceil(BLOCK) * BLOCK;
        let n = groups * k * cg_in * cg_out_pad;
        let packed = Tensor::empty(w.gpu(), &[groups, k, cg_in, cg_out_pad], DType::F32)?;
        w.gpu().dispatch(
            &SHADER,
            "pack_weight",
            &[w.buffer(), packed.buffer()],
            &[n as u32, k as u32, cg_in as u32, cg_out as u32, cg_out_pad as u32],
            (n / 4).div_ceil(256) as u32, // one vec4 per invocation (the padded channels make n % 4 == 0)
        )?;
        Ok(Conv1dWeight {
            packed,
            c_out,
            cg_in,
            k,
            groups,
        })
    }

    pub fn c_out(&self) -> usize {
        self.c_out
    }

    pub fn c_in(&self) -> usize {
        self.cg_in * self.groups
    }

    pub fn kernel_size(&self) -> usize {
        self.k
    }

    pub fn groups(&self) -> usize {
        self.groups
    }
}

/// `T_out = (T + 2 * padding - K) / stride + 1`, or an error when the padded input is shorter than the kernel.
pub fn conv1d_output_len(t: usize, k: usize, stride: usize, padding: usize) -> Result<usize> {
    ensure!(stride > 0, "conv1d: stride must be at least 1");
    let padded = t + 2 * padding;
    ensure!(
        padded >= k,
        "conv1d: input of {t} frames (+ 2 x {padding} padding = {padded}) is shorter than the kernel size {k}"
    );
    Ok((padded - k) / stride + 1)
}

/// y = conv1d(x, w) + bias. `x` `[B, T, C_in]`, `w` `[C_out, C_in / groups, K]`, `bias` `[C_out]`.
pub fn conv1d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<Tensor> {
    conv1d_packed(x, &Conv1dWeight::pack(w, groups)?, bias, stride, padding, false)
}

/// y = gelu(conv1d(x, w) + bias) with exact (erf) GELU, fused into the same kernel.
pub fn conv1d_gelu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Result<Tensor> {
    conv1d_packed(x, &Conv1dWeight::pack(w, groups)?, bias, stride, padding, true)
}

/// The convolution with an already packed weight; `gelu` applies exact GELU to the output.
pub fn conv1d_packed(
    x: &Tensor,
    w: &Conv1dWeight,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    gelu: bool,
) -> Result<Tensor> {
    // Where the tiled matmul is chosen (GPUs with shared memory), the convolutions go through it: the feature
    // encoder's at 1.6-1.8x the 4 x 4 kernel on an H100 (benches/RESULTS.md). The grouped, padded positional
    // conv too, as one product per batch item batched over its groups and split along its long k (K x C_in /
    // groups = 6144 for wav2vec2-base); one product per group in turn, the route's first form, ran at
    // 0.52-0.54x of the 4 x 4 kernel there, as 16 small dispatches in a row on a GPU of 132 compute units;
    // batched and split it is one pass (48 columns per group: the 32 x 32 register-blocked kernel, 16 groups
    // x 16 x 2 tiles x 8 slices = 4096 workgroups at 499 frames). Not yet measured on a GPU:
    // `WGPU_MLKD_NO_GROUPED_CONV_MATMUL=1` keeps the 4 x 4 kernel for it, and the GPU kit compares both. On
    // adapters with subgroups of 8 (lavapipe), a plain convolution whose input channels the subgroup conv
    // kernel cannot load as vec4 (the first layer: one channel, the waveform) takes the subgroup matmul
    // instead of the 4 x 4 conv kernel: 1.7-2.1x there, with the same bits (the same multiply-adds in the
    // same order; tested).
    let plain = w.groups == 1 && padding == 0;
    let gpu = x.gpu();
    let narrow_on_subgroups = gpu.subgroups_of_8() && w.cg_in % 4 != 0;
    let on_tiled = crate::ops::matmul::tiled_wanted(gpu) && (plain || grouped_conv_matmul_enabled());
    let kernel = if matmul_fits(w) && (on_tiled || (plain && narrow_on_subgroups)) {
        ConvKernel::Matmul
    } else {
        choose_conv_kernel(x.gpu(), w.cg_in, w.c_out / w.groups)
    };
    conv1d_packed_with(kernel, x, w, bias, stride, padding, gelu)
}

/// Whether [`conv1d_packed`] may take the matmul route for a grouped or padded convolution where the tiled
/// matmul is chosen: unset `WGPU_MLKD_NO_GROUPED_CONV_MATMUL` (any value keeps the 4 x 4 conv kernel, for
/// comparisons; read once per process).
fn grouped_conv_matmul_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("WGPU_MLKD_NO_GROUPED_CONV_MATMUL").is_none())
}

/// [`conv1d_packed`] with the kernel given (tests and benches compare them).
pub(crate) fn conv1d_packed_with(
    kernel: ConvKernel,
    x: &Tensor,
    w: &Conv1dWeight,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    gelu: bool,
) -> Result<Tensor> {
    check_kernel("conv1d", x.gpu(), kernel, w.cg_in)?;
    let &[batch, t, c_in] = x.shape() else {
        bail!("conv1d: input must be [B, T, C_in], got {:?}", x.shape());
    };
    ensure!(
        x.dtype() == DType::F32,
        "conv1d: input must be f32, got {:?}",
        x.dtype()
    );
    ensure!(
        c_in == w.c_in(),
        "conv1d: input has {c_in} channels but the weight expects {} ({} groups x {})",
        w.c_in(),
        w.groups,
        w.cg_in
    );
    if let Some(b) = bias {
        ensure!(
            b.shape() == [w.c_out] && b.dtype() == DType::F32,
            "conv1d: bias must be f32 [{}], got {:?} {:?}",
            w.c_out,
            b.shape(),
            b.dtype()
        );
    }
    let t_out = conv1d_output_len(t, w.k, stride, padding)?;
    let y = Tensor::empty(x.gpu(), &[batch, t_out, w.c_out], DType::F32)?;
    ensure!(
        x.numel() < u32::MAX as usize && y.numel() < u32::MAX as usize,
        "conv1d: tensors beyond 2^32 elements need 64-bit indexing; split the input in time"
    );
    if batch == 0 {
        return Ok(y);
    }
    if kernel == ConvKernel::Matmul {
        ensure!(
            matmul_fits(w),
            "conv1d: the matmul route needs C_out / groups % 4 == 0 (got C_out {}, groups {})",
            w.c_out,
            w.groups
        );
        conv1d_via_matmul(x, w, &y, bias, stride, padding, gelu)?;
        return Ok(y);
    }
    let cg_out = w.c_out / w.groups;
    let cb_per_group = cg_out.div_ceil(BLOCK);
    // Without a bias the binding still needs a buffer; the kernel never reads it.
    let bias_buf = bias.map_or(x.buffer(), |b| b.buffer());
    if kernel == ConvKernel::Subgroup {
        let chunks_per_group = cb_per_group.div_ceil(SG_LANES);
        let n_chunks = w.groups * chunks_per_group;
        let rows = batch * t_out;
        let row_tiles = rows.div_ceil(SG_LANES);
        let params = [
            rows,
            t,
            c_in,
            t_out,
            w.c_out,
            w.k,
            stride,
            padding,
            w.cg_in,
            cg_out,
            cb_per_group,
            chunks_per_group,
            n_chunks,
            row_tiles,
            bias.is_some() as usize,
            gelu as usize,
        ]
        .map(|v| v as u32);
        x.gpu().dispatch(
            &SG_SHADER,
            "conv1d_sg_forward",
            &[x.buffer(), w.packed.buffer(), bias_buf, y.buffer()],
            &params,
            (row_tiles * n_chunks.div_ceil(SG_PER_WG)) as u32,
        )?;
        return Ok(y);
    }
    let n_cb = w.groups * cb_per_group;
    let fb_per_batch = t_out.div_ceil(BLOCK);
    let n_wg_cb = n_cb.div_ceil(WG_CB);
    let n_wg_fb = (batch * fb_per_batch).div_ceil(WG_FB);
    let params = [
        batch,
        t,
        c_in,
        t_out,
        w.c_out,
        w.k,
        stride,
        padding,
        w.cg_in,
        cg_out,
        cb_per_group,
        n_cb,
        fb_per_batch,
        n_wg_cb,
        bias.is_some() as usize,
        gelu as usize,
    ]
    .map(|v| v as u32);
    x.gpu().dispatch(
        &SHADER,
        "conv1d_forward",
        &[x.buffer(), w.packed.buffer(), bias_buf, y.buffer()],
        &params,
        (n_wg_cb * n_wg_fb) as u32,
    )?;
    Ok(y)
}

/// Rows (b, t_out) per split of the dw reduction at least, so that each partial amortises its store.
const DW_MIN_ROWS: usize = 64;
/// Workgroups the dw kernel aims for: when the output alone gives fewer (layer 0: 512 x 10 weights), the
/// rows are split to keep the GPU busy.
const DW_TARGET_WG: usize = 1024;
/// Rows per split of the db reduction.
const DB_ROWS: usize = 256;

/// Gradients of [`conv1d`]: `dx` `[B, T, C_in]` (when asked for), `dw` `[C_out, C_in / groups, K]` (torch
/// layout, like the weight), `db` `[C_out]`.
#[derive(Debug)]
pub struct Conv1dGrads {
    pub dx: Option<Tensor>,
    pub dw: Tensor,
    pub db: Tensor,
}

/// Backward of `y = conv1d(x, w) + b`: given `dy` `[B, T_out, C_out]`, the forward's input `x` `[B, T, C_in]`
/// and torch-layout weight `w` `[C_out, C_in / groups, K]` (not a [`Conv1dWeight`]: the backward needs the
/// weight transposed per tap, which it packs itself), returns fresh gradient tensors. `need_dx = false` skips
/// dx (feature-encoder layer 0, whose input is the waveform). Deterministic: no atomics, fixed reduction
/// order for a given shape.
pub fn conv1d_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
    need_dx: bool,
) -> Result<Conv1dGrads> {
    conv1d_backward_with(None, dy, x, w, stride, padding, groups, need_dx)
}

/// [`conv1d_backward`] with the kernels forced (tests and benches): `Some(Block4)` runs the 4 x 4 kernels
/// only, `Some(Subgroup)` the subgroup kernels for dx and dw wherever their channel counts allow (also
/// where they are too narrow to pay), `None` chooses as [`conv1d_backward`] does.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv1d_backward_with(
    forced: Option<ConvKernel>,
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
    need_dx: bool,
) -> Result<Conv1dGrads> {
    let op = "conv1d_backward";
    let &[batch, t, c_in] = x.shape() else {
        bail!("{op}: input must be [B, T, C_in], got {:?}", x.shape());
    };
    let &[c_out, cg_in, k] = w.shape() else {
        bail!("{op}: weight must be [C_out, C_in/groups, K], got {:?}", w.shape());
    };
    for (what, tensor) in [("dy", dy), ("input", x), ("weight", w)] {
        ensure!(
            tensor.dtype() == DType::F32,
            "{op}: {what} must be f32, got {:?}",
            tensor.dtype()
        );
        ensure!(
            tensor.numel() < u32::MAX as usize,
            "{op}: {what} {:?} is beyond 2^32 elements (32-bit indexing); split it in time",
            tensor.shape()
        );
    }
    ensure!(groups > 0, "{op}: groups must be at least 1");
    ensure!(c_out > 0 && cg_in > 0 && k > 0, "{op}: empty weight {:?}", w.shape());
    ensure!(
        c_out % groups == 0,
        "{op}: C_out = {c_out} is not divisible by groups = {groups}"
    );
    ensure!(
        c_in == cg_in * groups,
        "{op}: input has {c_in} channels but the weight expects {} ({groups} groups x {cg_in})",
        cg_in * groups
    );
    let t_out = conv1d_output_len(t, k, stride, padding)?;
    ensure!(
        dy.shape() == [batch, t_out, c_out],
        "{op}: dy must be [{batch}, {t_out}, {c_out}] (the output of input {:?}, weight {:?}, stride {stride}, \
         padding {padding}), got {:?}",
        x.shape(),
        w.shape(),
        dy.shape()
    );
    let gpu = x.gpu();
    let cg_out = c_out / groups;
    let vec4_channels = cg_out % BLOCK == 0 && cg_in % BLOCK == 0;
    let via_matmul = match forced {
        Some(ConvKernel::Matmul) => {
            ensure!(
                vec4_channels,
                "{op}: the matmul route needs C_in / groups and C_out / groups % 4 == 0 (got {cg_in} and {cg_out})"
            );
            true
        }
        // With dx (every layer but the first, whose input is the waveform): 1.03-1.24x the 4 x 4 kernels for
        // the feature encoder and 2.8x for the positional conv at 99 frames on an H100 (0.86x at 499); dw
        // alone ties or loses (0.28-1.24x), so it keeps them.
        None => {
            need_dx
                && vec4_channels
                && crate::ops::matmul::tiled_wanted(gpu)
                && backward_scratch_fits(gpu, x.shape(), k, padding, groups, t_out)
        }
        Some(_) => false,
    };
    // dx loads dy (C_out / groups channels) as vec4, its columns are input channels; dw the reverse.
    let pick = |vec4_channels: usize, col_channels: usize| match forced {
        None => choose_conv_kernel(gpu, vec4_channels, col_channels),
        Some(ConvKernel::Subgroup) if vec4_channels % 4 == 0 => ConvKernel::Subgroup,
        Some(_) => ConvKernel::Block4,
    };
    let (dx_kernel, dw_kernel) = (pick(cg_out, cg_in), pick(cg_in, cg_out));
    if forced == Some(ConvKernel::Subgroup) {
        check_kernel(op, gpu, ConvKernel::Subgroup, 4)?;
    }
    let dw = Tensor::empty(gpu, &[c_out, cg_in, k], DType::F32)?;
    let db = Tensor::empty(gpu, &[c_out], DType::F32)?;
    let dx = need_dx
        .then(|| Tensor::empty(gpu, &[batch, t, c_in], DType::F32))
        .transpose()?;
    if batch == 0 {
        dw.fill(0.0)?;
        db.fill(0.0)?;
        return Ok(Conv1dGrads { dx, dw, db });
    }
    let rows = batch * t_out;
    if via_matmul {
        let geometry = (stride, padding, groups, t_out);
        backward_via_matmul(dy, x, w, geometry, dx.as_ref(), &dw)?;
        conv1d_backward_db(gpu, dy, &db, c_out, rows)?;
        return Ok(Conv1dGrads { dx, dw, db });
    }
    // dx: pack the weight per tap as (G, K, Cg_out, Cg_in_pad), then gather.
    if let Some(dx) = &dx {
        let cg_in_pad = cg_in.div_ceil(BLOCK) * BLOCK;
        let n = groups * k * cg_out * cg_in_pad;
        let wt = Tensor::empty(gpu, &[groups, k, cg_out, cg_in_pad], DType::F32)?;
        gpu.dispatch(
            &SHADER,
            "conv1d_backward_pack_weight",
            &[w.buffer(), wt.buffer()],
            &[n as u32, k as u32, cg_in as u32, cg_out as u32, cg_in_pad as u32],
            (n / 4).div_ceil(256) as u32, // one vec4 per invocation (the padded channels make n % 4 == 0)
        )?;
        let cib_per_group = cg_in_pad / BLOCK;
        if dx_kernel == ConvKernel::Subgroup {
            let chunks_per_group = cib_per_group.div_ceil(SG_LANES);
            let n_chunks = groups * chunks_per_group;
            let mb_per_phase = t.div_ceil(stride).div_ceil(SG_LANES);
            let n_fb = batch * stride * mb_per_phase;
            let params = [
                batch,
                t,
                c_in,
                t_out,
                c_out,
                k,
                stride,
                padding,
                cg_in,
                cg_out,
                cib_per_group,
                chunks_per_group,
                n_chunks,
                mb_per_phase,
                n_fb,
            ]
            .map(|v| v as u32);
            gpu.dispatch(
                &SG_SHADER,
                "conv1d_sg_backward_input",
                &[dy.buffer(), wt.buffer(), dx.buffer()],
                &params,
                (n_fb * n_chunks.div_ceil(SG_PER_WG)) as u32,
            )?;
        } else {
            let n_cib = groups * cib_per_group;
            let mb_per_phase = t.div_ceil(stride).div_ceil(BLOCK);
            let n_fb = batch * stride * mb_per_phase;
            let n_wg_cb = n_cib.div_ceil(WG_CB);
            let params = [
                batch,
                t,
                c_in,
                t_out,
                c_out,
                k,
                stride,
                padding,
                cg_in,
                cg_out,
                cib_per_group,
                n_cib,
                mb_per_phase,
                n_fb,
                n_wg_cb,
            ]
            .map(|v| v as u32);
            gpu.dispatch(
                &SHADER,
                "conv1d_backward_input",
                &[dy.buffer(), wt.buffer(), dx.buffer()],
                &params,
                (n_wg_cb * n_fb.div_ceil(WG_FB)) as u32,
            )?;
        }
    }

    // dw: row splits of the GEMM, then their sum (skipped with one split, which stores into dw directly).
    let n_cols = k * cg_in;
    let cb_per_group = cg_out.div_ceil(BLOCK);
    let n_cb = groups * cb_per_group;
    let n_wg_cb = n_cb.div_ceil(WG_CB);
    let n_wg_col = n_cols.div_ceil(BLOCK * WG_FB);
    let n_wg = n_wg_cb * n_wg_col;
    let per_split_bytes = (c_out * n_cols * 4) as u64;
    let max_split_mem = (gpu.max_binding_bytes() / per_split_bytes).max(1) as usize;
    let max_split = rows.div_ceil(DW_MIN_ROWS).min(max_split_mem).max(1);
    let rows_per_split = rows.div_ceil(DW_TARGET_WG.div_ceil(n_wg).clamp(1, max_split));
    let n_split = rows.div_ceil(rows_per_split);
    let dw_part = if n_split > 1 {
        Tensor::empty(gpu, &[n_split, c_out, cg_in, k], DType::F32)?
    } else {
        dw.clone()
    };
    if dw_kernel == ConvKernel::Subgroup {
        // The same splits as the 4 x 4 kernel (computed from its grid above), so the same bits.
        let co_tiles_per_group = cg_out.div_ceil(SG_LANES);
        let n_co_tiles = groups * co_tiles_per_group;
        let n_col_tiles = n_cols.div_ceil(BLOCK * SG_LANES * SG_PER_WG);
        let params = [
            t,
            c_in,
            t_out,
            c_out,
            k,
            stride,
            padding,
            cg_in,
            cg_out,
            n_cols,
            co_tiles_per_group,
            n_co_tiles,
            n_col_tiles,
            rows,
            rows_per_split,
            n_split,
        ]
        .map(|v| v as u32);
        gpu.dispatch(
            &SG_SHADER,
            "conv1d_sg_backward_weight",
            &[dy.buffer(), x.buffer(), dw_part.buffer()],
            &params,
            (n_co_tiles * n_col_tiles * n_split) as u32,
        )?;
    } else {
        let params = [
            t,
            c_in,
            t_out,
            c_out,
            k,
            stride,
            padding,
            cg_in,
            cg_out,
            n_cols,
            cb_per_group,
            n_cb,
            n_wg_cb,
            n_wg_col,
            rows,
            rows_per_split,
            n_split,
        ]
        .map(|v| v as u32);
        gpu.dispatch(
            &SHADER,
            "conv1d_backward_weight",
            &[dy.buffer(), x.buffer(), dw_part.buffer()],
            &params,
            (n_wg * n_split) as u32,
        )?;
    }
    if n_split > 1 {
        sum_splits(gpu, &dw_part, &dw, c_out * n_cols, n_split)?;
    }

    conv1d_backward_db(gpu, dy, &db, c_out, rows)?;
    Ok(Conv1dGrads { dx, dw, db })
}

/// db: column sums of dy over its `rows` rows, in row splits whose partials a second pass adds in order.
fn conv1d_backward_db(gpu: &crate::gpu::Gpu, dy: &Tensor, db: &Tensor, c_out: usize, rows: usize) -> Result<()> {
    let db_split = rows.div_ceil(DB_ROWS);
    let db_part = if db_split > 1 {
        Tensor::empty(gpu, &[db_split, c_out], DType::F32)?
    } else {
        db.clone()
    };
    let entries = ("conv1d_backward_bias4", "conv1d_backward_bias");
    let (entry, per_invocation) = super::vec4_or_scalar(c_out, entries);
    gpu.dispatch(
        &SHADER,
        entry,
        &[dy.buffer(), db_part.buffer()],
        &[c_out, rows, DB_ROWS, db_split].map(|v| v as u32),
        (db_split * c_out / per_invocation).div_ceil(64) as u32,
    )?;
    if db_split > 1 {
        sum_splits(gpu, &db_part, db, c_out, db_split)?;
    }
    Ok(())
}

/// `out[i] = part[0, i] + part[1, i] + ...` over `n_split` row splits of `n` values each, in split order.
fn sum_splits(gpu: &crate::gpu::Gpu, part: &Tensor, out: &Tensor, n: usize, n_split: usize) -> Result<()> {
    let entries = ("conv1d_backward_sum_splits4", "conv1d_backward_sum_splits");
    let (entry, per_invocation) = super::vec4_or_scalar(n, entries);
    gpu.dispatch(
        &SHADER,
        entry,
        &[part.buffer(), out.buffer()],
        &[n as u32, n_split as u32],
        (n / per_invocation).div_ceil(256) as u32,
    )
}

/// Whether the matmul route's scratch for a backward with dx (the padded input copy; dy times the weight, one
/// row of K * C_in per output frame) stays within half a storage binding each.
fn backward_scratch_fits(
    gpu: &crate::gpu::Gpu,
    x_shape: &[usize],
    k: usize,
    padding: usize,
    groups: usize,
    t_out: usize,
) -> bool {
    let &[b, t, c_in] = x_shape else { return false };
    let half = gpu.max_binding_bytes() / 2;
    let copy = if groups > 1 || padding > 0 {
        b * (t + 2 * padding) * c_in * 4
    } else {
        0
    };
    let cols = b * t_out * c_in * k * 4;
    copy as u64 <= half && cols as u64 <= half
}

/// The input's receptive fields for the matmul route: `(tensor, elements per batch item, per group, per
/// frame)`; the input itself without groups and padding, else its group-major zero-padded copy.
fn receptive_fields(x: &Tensor, groups: usize, padding: usize) -> Result<(Tensor, usize, usize, usize)> {
    let &[batch, t, c_in] = x.shape() else {
        bail!("conv1d: input must be [B, T, C_in], got {:?}", x.shape());
    };
    if groups == 1 && padding == 0 {
        return Ok((x.clone(), t * c_in, 0, c_in));
    }
    let cg_in = c_in / groups;
    let t_pad = t + 2 * padding;
    let xg = Tensor::empty(x.gpu(), &[batch, groups, t_pad, cg_in], DType::F32)?;
    let n = xg.numel();
    ensure!(
        n < u32::MAX as usize,
        "conv1d: the padded input copy is beyond 2^32 elements"
    );
    x.gpu().dispatch(
        &SHADER,
        "conv1d_group_pad",
        &[x.buffer(), xg.buffer()],
        &[n, t, c_in, cg_in, groups, t_pad, padding].map(|v| v as u32),
        n.div_ceil(256) as u32,
    )?;
    Ok((xg, groups * t_pad * cg_in, t_pad * cg_in, cg_in))
}

/// dw (and dx) of [`ConvKernel::Matmul`] (checked shapes): per batch item, one product batched over the
/// groups: dw += dy^T times the receptive fields (tap-major, then rearranged to torch's layout), and
/// dx = col2im(dy times the weight).
fn backward_via_matmul(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    (stride, padding, groups, t_out): (usize, usize, usize, usize),
    dx: Option<&Tensor>,
    dw: &Tensor,
) -> Result<()> {
    use crate::ops::matmul::{matmul_accumulate_into, matmul_into, MatDims, View};
    let gpu = x.gpu();
    let (&[batch, t, c_in], &[c_out, cg_in, k]) = (x.shape(), w.shape()) else {
        bail!("conv1d_backward: bad shapes {:?} {:?}", x.shape(), w.shape());
    };
    let cg_out = c_out / groups;
    let (fields, per_item, per_group, per_frame) = receptive_fields(x, groups, padding)?;
    // dw, tap-major: D[g, o, kk * Cg_in + c] = sum over items and frames of dy[b, t, g, o] * fields[b, g, t, kk, c];
    // one product per batch item (the items add up), batched over the groups.
    let taps = Tensor::empty(gpu, &[c_out, k * cg_in], DType::F32)?;
    let dims = MatDims {
        batch: groups,
        m: cg_out,
        n: k * cg_in,
        k: t_out,
    };
    let out = View {
        batch_stride: cg_out * k * cg_in,
        ..View::row_major(cg_out, k * cg_in)
    };
    for b in 0..batch {
        let dy_t = View {
            offset: b * t_out * c_out,
            batch_stride: cg_out,
            row_stride: 1,
            col_stride: c_out,
        };
        let windows = View {
            offset: b * per_item,
            batch_stride: per_group,
            row_stride: stride * per_frame,
            col_stride: 1,
        };
        if b == 0 {
            matmul_into(&taps, out, dy, dy_t, &fields, windows, dims, None, 1.0)?;
        } else {
            matmul_accumulate_into(&taps, out, dy, dy_t, &fields, windows, dims, 1.0)?;
        }
    }
    let n = dw.numel();
    let params = |n: usize| [n, t, c_in, cg_in, groups, k, stride, padding, t_out].map(|v| v as u32);
    gpu.dispatch(
        &SHADER,
        "conv1d_dw_from_taps",
        &[taps.buffer(), dw.buffer()],
        &params(n),
        n.div_ceil(256) as u32,
    )?;
    let Some(dx) = dx else { return Ok(()) };
    // G[b, g, t, c * K + kk] = sum over o of dy[b, t, g, o] * w[g, o, c, kk] (torch's weight as it is); one
    // product per batch item, batched over the groups.
    let row = cg_in * k;
    let cols = Tensor::empty(gpu, &[batch, groups, t_out, row], DType::F32)?;
    let dims = MatDims {
        batch: groups,
        m: t_out,
        n: row,
        k: cg_out,
    };
    let weight = View::row_major(cg_out, row);
    for b in 0..batch {
        let dy_v = View {
            offset: b * t_out * c_out,
            batch_stride: cg_out,
            row_stride: c_out,
            col_stride: 1,
        };
        let out = View::row_major(t_out, row).at(b * groups * t_out * row);
        matmul_into(&cols, out, dy, dy_v, w, weight, dims, None, 1.0)?;
    }
    let n = dx.numel();
    gpu.dispatch(
        &SHADER,
        "conv1d_col2im",
        &[cols.buffer(), dx.buffer()],
        &params(n),
        n.div_ceil(256) as u32,
    )
}

/// [`ConvKernel::Matmul`]: `y` (`[B, T_out, C_out]`) from `x` through strided matmuls (checked shapes).
fn conv1d_via_matmul(
    x: &Tensor,
    w: &Conv1dWeight,
    y: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    gelu: bool,
) -> Result<()> {
    use crate::ops::matmul::{matmul_into_tall, matmul_into_with, Activation, Bias, MatDims, View};
    let &[batch, t, c_in] = x.shape() else {
        bail!("conv1d: input must be [B, T, C_in], got {:?}", x.shape());
    };
    let (groups, cg_in, k) = (w.groups, w.cg_in, w.k);
    let (cg_out, c_out) = (w.c_out / groups, w.c_out);
    let cg_out_pad = cg_out.div_ceil(BLOCK) * BLOCK;
    let t_out = y.shape()[1];
    let act = if gelu { Activation::Gelu } else { Activation::None };
    if groups == 1 && padding == 0 {
        // The receptive fields are rows of the input itself; all batch items in one product.
        let windows = View {
            offset: 0,
            batch_stride: t * c_in,
            row_stride: stride * c_in,
            col_stride: 1,
        };
        let weight = View {
            batch_stride: 0,
            ..View::row_major(k * c_in, c_out)
        };
        let out = View::row_major(t_out, c_out);
        let dims = MatDims {
            batch,
            m: t_out,
            n: c_out,
            k: k * c_in,
        };
        return matmul_into_tall(y, out, x, windows, &w.packed, weight, dims, bias.map(Bias::shared), act);
    }
    let (fields, per_item, per_group, per_frame) = receptive_fields(x, groups, padding)?;
    // One product per batch item, batched over the groups: group g reads its own fields, weight block, output
    // columns and slice of the bias.
    let weight = View {
        offset: 0,
        batch_stride: k * cg_in * cg_out_pad,
        row_stride: cg_out_pad,
        col_stride: 1,
    };
    let dims = MatDims {
        batch: groups,
        m: t_out,
        n: cg_out,
        k: k * cg_in,
    };
    let bias = bias.map(|tensor| Bias {
        tensor,
        batch_stride: cg_out,
    });
    for b in 0..batch {
        let windows = View {
            offset: b * per_item,
            batch_stride: per_group,
            row_stride: stride * per_frame,
            col_stride: 1,
        };
        let out = View {
            offset: b * t_out * c_out,
            batch_stride: cg_out,
            row_stride: c_out,
            col_stride: 1,
        };
        // Not tall: a few hundred frames per group, each with a long k (K x C_in / groups), so split-K's rule
        // applies (the groups' row tiles alone leave a large GPU mostly idle; k slices fill it).
        matmul_into_with(y, out, &fields, windows, &w.packed, weight, dims, bias, 1.0, act)?;
    }
    Ok(())
}

/// CPU references, f64 accumulation.
pub mod reference {
    use crate::ops::elementwise::reference::gelu_f64;

    /// `x` `[b, t, c_in]`, `w` `[c_out, c_in / groups, k]`, output `[b, t_out, c_out]`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d(
        x: &[f32],
        [b, t, c_in]: [usize; 3],
        w: &[f32],
        [c_out, cg_in, k]: [usize; 3],
        bias: Option<&[f32]>,
        stride: usize,
        padding: usize,
        groups: usize,
        gelu: bool,
    ) -> Vec<f64> {
        let f = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let bias = bias.map(f);
        let y = conv1d_f64(
            &f(x),
            [b, t, c_in],
            &f(w),
            [c_out, cg_in, k],
            bias.as_deref(),
            stride,
            padding,
            groups,
        );
        if gelu {
            y.into_iter().map(gelu_f64).collect()
        } else {
            y
        }
    }

    /// The convolution on f64 inputs (the oracle of the finite-difference gradient tests).
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d_f64(
        x: &[f64],
        [b, t, c_in]: [usize; 3],
        w: &[f64],
        [c_out, cg_in, k]: [usize; 3],
        bias: Option<&[f64]>,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Vec<f64> {
        assert_eq!(cg_in * groups, c_in);
        let cg_out = c_out / groups;
        let t_out = (t + 2 * padding - k) / stride + 1;
        let mut y = vec![0f64; b * t_out * c_out];
        for bi in 0..b {
            for to in 0..t_out {
                for co in 0..c_out {
                    let g = co / cg_out;
                    let mut acc = bias.map_or(0.0, |bb| bb[co]);
                    for kk in 0..k {
                        let tin = (to * stride + kk) as isize - padding as isize;
                        if tin < 0 || tin >= t as isize {
                            continue;
                        }
                        let xrow = (bi * t + tin as usize) * c_in + g * cg_in;
                        for ci in 0..cg_in {
                            acc += x[xrow + ci] * w[(co * cg_in + ci) * k + kk];
                        }
                    }
                    y[(bi * t_out + to) * c_out + co] = acc;
                }
            }
        }
        y
    }

    /// Gradients (dx `[b, t, c_in]`, dw `[c_out, cg_in, k]`, db `[c_out]`) of `sum(dy * conv1d(x, w) + b)`,
    /// written directly from the forward's index relation (each term's contribution scattered back).
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d_backward(
        dy: &[f64],
        x: &[f64],
        [b, t, c_in]: [usize; 3],
        w: &[f64],
        [c_out, cg_in, k]: [usize; 3],
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        assert_eq!(cg_in * groups, c_in);
        let cg_out = c_out / groups;
        let t_out = (t + 2 * padding - k) / stride + 1;
        assert_eq!(dy.len(), b * t_out * c_out);
        let (mut dx, mut dw, mut db) = (vec![0f64; x.len()], vec![0f64; w.len()], vec![0f64; c_out]);
        for bi in 0..b {
            for to in 0..t_out {
                for co in 0..c_out {
                    let g = co / cg_out;
                    let d = dy[(bi * t_out + to) * c_out + co];
                    db[co] += d;
                    for kk in 0..k {
                        let tin = (to * stride + kk) as isize - padding as isize;
                        if tin < 0 || tin >= t as isize {
                            continue;
                        }
                        let xrow = (bi * t + tin as usize) * c_in + g * cg_in;
                        for ci in 0..cg_in {
                            let wi = (co * cg_in + ci) * k + kk;
                            dx[xrow + ci] += d * w[wi];
                            dw[wi] += d * x[xrow + ci];
                        }
                    }
                }
            }
        }
        (dx, dw, db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, assert_close_f64, central_differences, dot_f64, random_vec, to_f64, Tol};

    #[test]
    fn hand_checked_strided_padded_case() {
        // x = [1 2 3 4 5], padded [0 1 2 3 4 5 0], w = [1 2], stride 2, bias 0.5:
        // windows (0,1) (2,3) (4,5) -> 2, 8, 14 -> 2.5, 8.5, 14.5.
        let gpu = test_gpu();
        let x = Tensor::from_slice(gpu, &[1., 2., 3., 4., 5.], &[1, 5, 1]).unwrap();
        let w = Tensor::from_slice(gpu, &[1., 2.], &[1, 1, 2]).unwrap();
        let b = Tensor::from_slice(gpu, &[0.5], &[1]).unwrap();
        let y = conv1d(&x, &w, Some(&b), 2, 1, 1).unwrap();
        assert_eq!(y.shape(), [1, 3, 1]);
        assert_eq!(y.to_vec().unwrap(), [2.5, 8.5, 14.5]);
    }

    #[test]
    fn hand_checked_grouped_case() {
        // Two groups of one channel each: channel 0 sums neighbours, channel 1 differences them.
        let gpu = test_gpu();
        let x = Tensor::from_slice(gpu, &[1., 10., 2., 20., 4., 40.], &[1, 3, 2]).unwrap();
        let w = Tensor::from_slice(gpu, &[1., 1., -1., 1.], &[2, 1, 2]).unwrap();
        let y = conv1d(&x, &w, None, 1, 0, 2).unwrap();
        assert_eq!(y.shape(), [1, 2, 2]);
        assert_eq!(y.to_vec().unwrap(), [3., 10., 6., 20.]);
    }

    /// (B, T, C_in, C_out, K, stride, padding, groups, bias, gelu)
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize, bool, bool);

    /// A case's seeded inputs, as host values (for the references) and tensors: x `[B, T, C_in]`, w
    /// `[C_out, C_in / G, K]` at PyTorch's init scale, bias `[C_out]` and dy `[B, T_out, C_out]`.
    struct Inputs {
        xv: Vec<f32>,
        wv: Vec<f32>,
        bv: Vec<f32>,
        dyv: Vec<f32>,
        x: Tensor,
        w: Tensor,
        bias: Tensor,
        dy: Tensor,
    }

    fn inputs(seed: u64, (b, t, c_in, c_out, k, s, p, g): GradCase) -> Inputs {
        let gpu = test_gpu();
        let cg_in = c_in / g;
        let t_out = (t + 2 * p - k) / s + 1;
        let xv = random_vec(seed, b * t * c_in, 1.0);
        let wv = random_vec(seed + 1, c_out * cg_in * k, 1.0 / ((cg_in * k) as f32).sqrt());
        let bv = random_vec(seed + 2, c_out, 0.5);
        let dyv = random_vec(seed + 3, b * t_out * c_out, 1.0);
        Inputs {
            x: Tensor::from_slice(gpu, &xv, &[b, t, c_in]).unwrap(),
            w: Tensor::from_slice(gpu, &wv, &[c_out, cg_in, k]).unwrap(),
            bias: Tensor::from_slice(gpu, &bv, &[c_out]).unwrap(),
            dy: Tensor::from_slice(gpu, &dyv, &[b, t_out, c_out]).unwrap(),
            xv,
            wv,
            bv,
            dyv,
        }
    }

    /// The forward's geometry of a case (its bias and GELU flags aside).
    fn geometry(case: Case) -> GradCase {
        let (b, t, c_in, c_out, k, s, p, g, _, _) = case;
        (b, t, c_in, c_out, k, s, p, g)
    }

    /// The f64 reference's forward of `inputs` for `case`.
    fn forward_reference(inp: &Inputs, case: Case) -> Vec<f64> {
        let (b, t, c_in, c_out, k, s, p, g, with_bias, gelu) = case;
        let bias = with_bias.then_some(&inp.bv[..]);
        reference::conv1d(
            &inp.xv,
            [b, t, c_in],
            &inp.wv,
            [c_out, c_in / g, k],
            bias,
            s,
            p,
            g,
            gelu,
        )
    }

    /// dw, db and (where computed) dx against the f64 reference, shapes included.
    fn assert_grads_match_reference(name: &str, got: &Conv1dGrads, inp: &Inputs, case: GradCase) {
        let (b, t, c_in, c_out, k, s, p, g) = case;
        let (xs, ws) = ([b, t, c_in], [c_out, c_in / g, k]);
        let (dx, dw, db) =
            reference::conv1d_backward(&to_f64(&inp.dyv), &to_f64(&inp.xv), xs, &to_f64(&inp.wv), ws, s, p, g);
        assert_eq!(got.dw.shape(), ws, "{name}");
        assert_eq!(got.db.shape(), [c_out], "{name}");
        assert_close(&format!("{name} dw"), &got.dw.to_vec().unwrap(), &dw, Tol::KERNEL);
        assert_close(&format!("{name} db"), &got.db.to_vec().unwrap(), &db, Tol::KERNEL);
        if let Some(gdx) = &got.dx {
            assert_eq!(gdx.shape(), xs, "{name}");
            assert_close(&format!("{name} dx"), &gdx.to_vec().unwrap(), &dx, Tol::KERNEL);
        }
    }

    fn check(name: &str, seed: u64, case: Case, tol: Tol) {
        let (b, t, _, c_out, k, stride, padding, groups, with_bias, gelu) = case;
        let inp = inputs(seed, geometry(case));
        let bias = with_bias.then_some(&inp.bias);
        let y = if gelu {
            conv1d_gelu(&inp.x, &inp.w, bias, stride, padding, groups)
        } else {
            conv1d(&inp.x, &inp.w, bias, stride, padding, groups)
        }
        .unwrap();
        let want = forward_reference(&inp, case);
        let t_out = (t + 2 * padding - k) / stride + 1;
        assert_eq!(y.shape(), [b, t_out, c_out], "{name}");
        assert_close(name, &y.to_vec().unwrap(), &want, tol);
    }

    #[test]
    fn random_shapes_match_reference() {
        let cases: [(&str, Case); 10] = [
            // Feature-encoder layer 0 in miniature: C_in = 1, K = 10, stride 5.
            ("layer0-like", (1, 203, 1, 13, 10, 5, 0, 1, false, true)),
            ("layer0-like b2", (2, 97, 1, 8, 10, 5, 0, 1, true, false)),
            ("stride2 k3", (2, 61, 12, 12, 3, 2, 0, 1, true, false)),
            ("stride2 k2 gelu", (1, 50, 20, 28, 2, 2, 0, 1, false, true)),
            ("grouped k4 pad", (2, 45, 12, 12, 4, 1, 2, 3, true, true)),
            ("grouped cg_out 3", (1, 37, 12, 9, 5, 1, 2, 3, false, false)),
            ("odd channels", (2, 9, 5, 7, 3, 1, 1, 1, true, false)),
            // Kernel longer than the input, made valid by padding.
            ("k > t", (1, 3, 4, 6, 7, 1, 3, 1, true, true)),
            ("stride5 pad", (2, 31, 3, 5, 4, 5, 3, 1, false, false)),
            // Positional conv in miniature: 16 groups, K even, padding K/2.
            ("pos-conv-like", (1, 33, 48, 48, 16, 1, 8, 16, true, true)),
        ];
        for (i, (name, case)) in cases.into_iter().enumerate() {
            check(name, 100 + 10 * i as u64, case, Tol::KERNEL);
        }
    }

    /// The forward as strided matmuls (GPUs with the tiled matmul take it), on the feature encoder's shapes in
    /// miniature and grouped or padded ones (sizes not multiples of the tiles, with bias and GELU), against the
    /// f64 reference and the 4 x 4 conv kernel, whichever matmul kernel this adapter picks for it.
    #[test]
    fn matmul_route_matches_reference() {
        let gpu = test_gpu();
        // Without groups and padding the input is read in place; with them, through a group-major padded copy
        // and one matmul per item, batched over the groups.
        // (b, t, c_in, c_out, k, stride, padding, groups, bias, gelu)
        for (i, (b, t, c_in, c_out, k, s, p, g, with_bias, gelu)) in [
            (
                2usize, 403usize, 1usize, 68usize, 10usize, 5usize, 0usize, 1usize, true, true,
            ), // layer 0: 79 frames
            (1, 301, 20, 132, 3, 2, 0, 1, false, true), // 150 frames, k = 60
            (3, 70, 12, 8, 2, 2, 0, 1, true, false),    // short: fewer than 64 rows
            (1, 2, 512, 4, 2, 2, 0, 1, false, false),   // one frame, k = 1024
            (2, 37, 48, 48, 16, 1, 8, 4, true, true),
            (1, 61, 32, 64, 128, 1, 64, 16, true, true), // the positional conv's taps, padding and groups
            (3, 20, 8, 12, 5, 2, 2, 1, false, false),    // padding alone
            (1, 9, 12, 24, 3, 3, 0, 3, true, false),     // groups alone, stride 3
            (2, 45, 64, 32, 64, 1, 32, 4, true, true),   // k = 1024: 5 k slices where split-K is taken
        ]
        .into_iter()
        .enumerate()
        {
            let cg_in = c_in / g;
            let xv = random_vec(330 + i as u64, b * t * c_in, 1.0);
            let wv = random_vec(340 + i as u64, c_out * cg_in * k, 1.0 / ((cg_in * k) as f32).sqrt());
            let bv = random_vec(350 + i as u64, c_out, 0.5);
            let x = Tensor::from_slice(gpu, &xv, &[b, t, c_in]).unwrap();
            let w = Conv1dWeight::pack(&Tensor::from_slice(gpu, &wv, &[c_out, cg_in, k]).unwrap(), g).unwrap();
            let bias = Tensor::from_slice(gpu, &bv, &[c_out]).unwrap();
            let bias = with_bias.then_some(&bias);
            let run = |kern| {
                conv1d_packed_with(kern, &x, &w, bias, s, p, gelu)
                    .unwrap()
                    .to_vec()
                    .unwrap()
            };
            let want = reference::conv1d(
                &xv,
                [b, t, c_in],
                &wv,
                [c_out, cg_in, k],
                with_bias.then_some(&bv[..]),
                s,
                p,
                g,
                gelu,
            );
            let name = format!("matmul route case {i}");
            let (via_matmul, block4) = (run(ConvKernel::Matmul), run(ConvKernel::Block4));
            assert_close(&name, &via_matmul, &want, Tol::KERNEL);
            assert_close(&name, &block4, &want, Tol::KERNEL);
            if c_in == 1 && gpu.subgroups_of_8() {
                // The first layer's shape, which subgroup adapters send through the matmul: the same bits
                // there (the conv kernel's `a += x * w` compiles to the matmul's fused multiply-add on
                // lavapipe; another compiler may round it apart, which the reference check above allows).
                assert!(
                    via_matmul == block4,
                    "{name}: the matmul route changed the bits of a 1-channel conv"
                );
                let default = conv1d_packed(&x, &w, bias, s, p, gelu).unwrap().to_vec().unwrap();
                assert!(default == block4, "{name}: the default route changed the bits");
            }
        }
        // Shapes it cannot run are refused, not miscomputed.
        let x = Tensor::from_slice(gpu, &[0.0; 24], &[1, 6, 4]).unwrap();
        let w = Conv1dWeight::pack(&Tensor::from_slice(gpu, &[0.5; 24], &[6, 2, 2]).unwrap(), 2).unwrap();
        let e = conv1d_packed_with(ConvKernel::Matmul, &x, &w, None, 1, 0, false).unwrap_err();
        assert!(format!("{e:#}").contains("C_out / groups % 4 == 0"), "{e:#}");
    }

    #[test]
    fn long_reductions_match_reference() {
        // 512 x 3 = 1536 terms per output (feature-encoder layers 1-4) and 6 x 128 = 768 (positional conv
        // shape with fewer channels). Weights are scaled by 1/sqrt(terms), so outputs are O(1) and
        // f32 rounding grows like sqrt(terms) * 2^-24 ~ 2e-6; KERNEL holds.
        check("c512 k3 s2", 7, (1, 23, 512, 20, 3, 2, 0, 1, false, true), Tol::KERNEL);
        check(
            "pos k128 g16",
            8,
            (1, 70, 96, 96, 128, 1, 64, 16, true, true),
            Tol::KERNEL,
        );
    }

    #[test]
    fn packed_weight_is_reusable() {
        let gpu = test_gpu();
        let wv = random_vec(5, 6 * 2 * 3, 0.5);
        let w = Tensor::from_slice(gpu, &wv, &[6, 2, 3]).unwrap();
        let packed = Conv1dWeight::pack(&w, 2).unwrap();
        assert_eq!(
            (packed.c_out(), packed.c_in(), packed.kernel_size(), packed.groups()),
            (6, 4, 3, 2)
        );
        for (seed, t) in [(11u64, 8usize), (12, 19)] {
            let xv = random_vec(seed, 2 * t * 4, 1.0);
            let x = Tensor::from_slice(gpu, &xv, &[2, t, 4]).unwrap();
            let y = conv1d_packed(&x, &packed, None, 1, 1, false).unwrap();
            let want = reference::conv1d(&xv, [2, t, 4], &wv, [6, 2, 3], None, 1, 1, 2, false);
            assert_close("packed reuse", &y.to_vec().unwrap(), &want, Tol::KERNEL);
        }
    }

    #[test]
    fn grad_hand_checked_strided_padded_case() {
        // The forward case above with dy = [1 10 100]: y0 = 1 w1, y1 = 2 w0 + 3 w1, y2 = 4 w0 + 5 w1 (+ b).
        let gpu = test_gpu();
        let x = Tensor::from_slice(gpu, &[1., 2., 3., 4., 5.], &[1, 5, 1]).unwrap();
        let w = Tensor::from_slice(gpu, &[1., 2.], &[1, 1, 2]).unwrap();
        let dy = Tensor::from_slice(gpu, &[1., 10., 100.], &[1, 3, 1]).unwrap();
        let g = conv1d_backward(&dy, &x, &w, 2, 1, 1, true).unwrap();
        assert_eq!(g.dw.shape(), [1, 1, 2]);
        assert_eq!(g.dw.to_vec().unwrap(), [420., 531.]);
        assert_eq!(g.db.to_vec().unwrap(), [111.]);
        assert_eq!(g.dx.unwrap().to_vec().unwrap(), [2., 10., 20., 100., 200.]);
    }

    /// (B, T, C_in, C_out, K, stride, padding, groups)
    type GradCase = (usize, usize, usize, usize, usize, usize, usize, usize);

    fn grad_cases() -> Vec<(&'static str, GradCase)> {
        vec![
            ("layer0-like", (2, 53, 1, 5, 10, 5, 0, 1)),
            ("stride2 k3", (2, 13, 4, 3, 3, 2, 0, 1)),
            ("stride2 k2 pad", (1, 10, 3, 5, 2, 2, 1, 1)),
            ("grouped k4 pad", (2, 9, 6, 4, 4, 1, 2, 2)),
            ("stride3 k7 grouped", (1, 17, 6, 9, 7, 3, 2, 3)),
            ("k > t", (1, 3, 2, 3, 7, 1, 3, 1)),
            ("stride5 k4 < s", (2, 21, 3, 2, 4, 5, 3, 1)),
        ]
    }

    #[test]
    fn conv1d_reference_grad_matches_finite_differences() {
        for (i, (name, (b, t, c_in, c_out, k, s, p, g))) in grad_cases().into_iter().enumerate() {
            let seed = 300 + 10 * i as u64;
            let cg_in = c_in / g;
            let t_out = (t + 2 * p - k) / s + 1;
            let xs = [b, t, c_in];
            let ws = [c_out, cg_in, k];
            let x = to_f64(&random_vec(seed, b * t * c_in, 1.0));
            let w = to_f64(&random_vec(seed + 1, c_out * cg_in * k, 0.5));
            let bias = to_f64(&random_vec(seed + 2, c_out, 0.5));
            let dy = to_f64(&random_vec(seed + 3, b * t_out * c_out, 1.0));
            let loss = |x: &[f64], w: &[f64], bias: &[f64]| {
                dot_f64(&dy, &reference::conv1d_f64(x, xs, w, ws, Some(bias), s, p, g))
            };
            let (dx, dw, db) = reference::conv1d_backward(&dy, &x, xs, &w, ws, s, p, g);
            let h = 1e-6;
            let fx = central_differences(&x, h, |v| loss(v, &w, &bias));
            let fw = central_differences(&w, h, |v| loss(&x, v, &bias));
            let fb = central_differences(&bias, h, |v| loss(&x, &w, v));
            assert_close_f64(&format!("{name} ref dx vs fd"), &dx, &fx, Tol::FINITE_DIFF);
            assert_close_f64(&format!("{name} ref dw vs fd"), &dw, &fw, Tol::FINITE_DIFF);
            assert_close_f64(&format!("{name} ref db vs fd"), &db, &fb, Tol::FINITE_DIFF);
        }
    }

    fn check_grad(name: &str, seed: u64, case: GradCase, need_dx: bool) -> Conv1dGrads {
        let (_, _, _, _, _, s, p, g) = case;
        let inp = inputs(seed, case);
        let grads = conv1d_backward(&inp.dy, &inp.x, &inp.w, s, p, g, need_dx).unwrap();
        assert_eq!(grads.dx.is_some(), need_dx, "{name}: dx computed iff asked for");
        assert_grads_match_reference(name, &grads, &inp, case);
        grads
    }

    #[test]
    fn conv1d_grad_matches_reference() {
        let mut cases = grad_cases();
        cases.extend([
            ("stride2 k3 wider", (2, 61, 12, 10, 3, 2, 0, 1)),
            ("grouped cg_in 3 k5", (1, 37, 15, 10, 5, 1, 2, 5)),
            ("odd channels stride3", (2, 40, 5, 7, 7, 3, 2, 1)),
            // Positional conv in miniature: 16 groups, K even, padding K/2.
            ("pos-conv-like", (1, 33, 48, 48, 16, 1, 8, 16)),
            ("pos-conv-like b2", (2, 20, 32, 32, 8, 1, 4, 16)),
        ]);
        for (i, (name, case)) in cases.into_iter().enumerate() {
            check_grad(name, 500 + 10 * i as u64, case, true);
        }
        // Layer 0 as training calls it: no gradient for the waveform.
        check_grad("layer0-like no dx", 600, (2, 103, 1, 13, 10, 5, 0, 1), false);
    }

    #[test]
    fn conv1d_grad_long_reductions_match_reference() {
        // dw over 1000 rows (several splits) and dx over 40 x 3 / 2 terms; layer 0 over 2 x 399 rows
        // (many splits: its 13 x 10 weights alone give one workgroup); the positional conv's K = 128,
        // 16 groups. Values are O(1) and f32 rounding ~ sqrt(terms) 2^-24; KERNEL holds.
        check_grad("c64 k3 s2 t1001", 700, (2, 1001, 64, 40, 3, 2, 0, 1), true);
        check_grad("layer0 t2003", 710, (2, 2003, 1, 13, 10, 5, 0, 1), false);
        check_grad("pos k128 g16", 720, (1, 70, 96, 96, 128, 1, 64, 16), true);
    }

    fn same_bits(what: &str, a: &Tensor, b: &Tensor) {
        let (a, b) = (a.to_vec().unwrap(), b.to_vec().unwrap());
        assert_eq!(a.len(), b.len(), "{what}");
        let diff = a.iter().zip(&b).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        assert_eq!(
            diff,
            0,
            "{what}: {diff} of {} values differ between the kernels",
            a.len()
        );
    }

    /// The subgroup kernels against the 4 x 4 ones (bit for bit: same products, same order) and against the
    /// f64 reference, on shapes whose frames and channels are not multiples of 8, 32 or 256.
    #[test]
    fn subgroup_kernels_match_block4_bitwise() {
        let gpu = test_gpu();
        if !gpu.subgroups_of_8() {
            eprintln!("adapter without subgroups of 8: nothing to compare");
            return;
        }
        let cases: [(&str, Case); 7] = [
            ("c12 k3 s2", (2, 37, 12, 44, 3, 2, 0, 1, true, false)),
            ("c36 k2 s2 pad gelu", (1, 29, 36, 40, 2, 2, 1, 1, false, true)),
            ("c20 out 300 k3", (1, 19, 20, 300, 3, 2, 0, 1, true, true)),
            ("grouped cg 4 x 5", (1, 25, 32, 40, 5, 1, 2, 8, true, false)),
            ("grouped cg 12 k9 pad", (2, 21, 48, 48, 9, 1, 4, 4, true, true)),
            ("c512 -> 20 k3", (1, 23, 512, 20, 3, 2, 0, 1, false, false)),
            ("k > t", (1, 3, 4, 6, 7, 1, 3, 1, true, true)),
        ];
        for (i, (name, case)) in cases.into_iter().enumerate() {
            let (_, _, _, _, _, s, p, g, with_bias, gelu) = case;
            let inp = inputs(900 + 10 * i as u64, geometry(case));
            let bias = with_bias.then_some(&inp.bias);
            let packed = Conv1dWeight::pack(&inp.w, g).unwrap();
            let run = |kern| conv1d_packed_with(kern, &inp.x, &packed, bias, s, p, gelu).unwrap();
            let (old, new) = (run(ConvKernel::Block4), run(ConvKernel::Subgroup));
            let want = forward_reference(&inp, case);
            assert_close(
                &format!("{name} sg forward"),
                &new.to_vec().unwrap(),
                &want,
                Tol::KERNEL,
            );
            same_bits(&format!("{name} forward"), &old, &new);

            let grads = |kern| conv1d_backward_with(Some(kern), &inp.dy, &inp.x, &inp.w, s, p, g, true).unwrap();
            let (old, new) = (grads(ConvKernel::Block4), grads(ConvKernel::Subgroup));
            assert!(new.dx.is_some(), "{name}: sg grad without dx");
            assert_grads_match_reference(&format!("{name} sg grad"), &new, &inp, geometry(case));
            same_bits(
                &format!("{name} grad dx"),
                old.dx.as_ref().unwrap(),
                new.dx.as_ref().unwrap(),
            );
            same_bits(&format!("{name} grad dw"), &old.dw, &new.dw);
        }
    }

    /// The matmul route's backward (dw from tap-major products, dx by col2im) against the f64 reference, on
    /// shapes with groups, padding, strides, K > T and the positional conv's taps.
    #[test]
    fn matmul_backward_matches_reference() {
        let gpu = test_gpu();
        let cases: [(&str, Case); 6] = [
            ("c12 k3 s2", (2, 37, 12, 44, 3, 2, 0, 1, false, false)),
            ("c36 k2 s2 pad", (1, 29, 36, 40, 2, 2, 1, 1, false, false)),
            ("grouped cg 12 k9 pad", (2, 21, 48, 48, 9, 1, 4, 4, false, false)),
            (
                "positional k128 g16 pad 64",
                (2, 19, 64, 64, 128, 1, 64, 16, false, false),
            ),
            ("k > t", (1, 3, 4, 8, 7, 1, 3, 1, false, false)),
            ("stride 3 g2", (2, 50, 8, 16, 4, 3, 1, 2, false, false)),
        ];
        for (i, (name, case)) in cases.into_iter().enumerate() {
            let (_, _, _, _, _, s, p, g, _, _) = case;
            let inp = inputs(1700 + 10 * i as u64, geometry(case));
            let grads =
                |need_dx| conv1d_backward_with(Some(ConvKernel::Matmul), &inp.dy, &inp.x, &inp.w, s, p, g, need_dx);
            let got = grads(true).unwrap();
            assert!(got.dx.is_some(), "{name}: matmul grad without dx");
            assert_grads_match_reference(&format!("{name} matmul"), &got, &inp, geometry(case));
            let no_dx = grads(false).unwrap();
            assert!(no_dx.dx.is_none());
            same_bits(&format!("{name} dw without dx"), &got.dw, &no_dx.dw);
        }
        // Channel counts the route cannot load as vec4 are refused, not miscomputed.
        let x = Tensor::zeros(gpu, &[1, 8, 6]).unwrap();
        let w = Tensor::zeros(gpu, &[4, 6, 3]).unwrap();
        let dy = Tensor::zeros(gpu, &[1, 6, 4]).unwrap();
        let e = conv1d_backward_with(Some(ConvKernel::Matmul), &dy, &x, &w, 1, 0, 1, true).unwrap_err();
        assert!(format!("{e:#}").contains("% 4 == 0"), "{e:#}");
    }

    #[test]
    fn subgroup_dw_with_row_splits_matches_block4_bitwise() {
        // 2 x 1001 rows in several splits (the 4 x 4 kernel's grid is small here), padding at both ends.
        let gpu = test_gpu();
        if !gpu.subgroups_of_8() {
            return;
        }
        let (b, t, c_in, c_out, k, s, p) = (2, 1001, 20, 12, 3, 2, 1);
        let t_out = (t + 2 * p - k) / s + 1;
        let x = Tensor::from_slice(gpu, &random_vec(31, b * t * c_in, 1.0), &[b, t, c_in]).unwrap();
        let w = Tensor::from_slice(gpu, &random_vec(32, c_out * c_in * k, 0.2), &[c_out, c_in, k]).unwrap();
        let dy = Tensor::from_slice(gpu, &random_vec(33, b * t_out * c_out, 1.0), &[b, t_out, c_out]).unwrap();
        let grads = |kern| conv1d_backward_with(Some(kern), &dy, &x, &w, s, p, 1, true).unwrap();
        let (old, new) = (grads(ConvKernel::Block4), grads(ConvKernel::Subgroup));
        same_bits("split dw", &old.dw, &new.dw);
        same_bits("split dx", old.dx.as_ref().unwrap(), new.dx.as_ref().unwrap());
    }

    #[test]
    fn narrow_or_unaligned_shapes_keep_the_block4_kernels() {
        let gpu = test_gpu();
        // Layer 0 (C_in = 1: no vec4 loads) and narrow outputs keep the 4 x 4 kernels; a forced subgroup
        // forward refuses channels per group that are not a multiple of 4.
        assert_eq!(choose_conv_kernel(gpu, 1, 512), ConvKernel::Block4);
        assert_eq!(choose_conv_kernel(gpu, 512, 8), ConvKernel::Block4);
        let want = if conv_subgroups(gpu) {
            ConvKernel::Subgroup
        } else {
            ConvKernel::Block4
        };
        assert_eq!(choose_conv_kernel(gpu, 512, 512), want);
        let x = Tensor::zeros(gpu, &[1, 8, 6]).unwrap();
        let w = Conv1dWeight::pack(&Tensor::zeros(gpu, &[4, 6, 3]).unwrap(), 1).unwrap();
        let e = conv1d_packed_with(ConvKernel::Subgroup, &x, &w, None, 1, 0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("subgroup"), "{e}");
    }

    #[test]
    fn conv1d_grad_is_deterministic() {
        let case = (2, 1001, 64, 40, 3, 2, 0, 1);
        let a = check_grad("determinism run 1", 800, case, true);
        let b = check_grad("determinism run 2", 800, case, true);
        for (what, x, y) in [
            ("dw", &a.dw, &b.dw),
            ("db", &a.db, &b.db),
            ("dx", a.dx.as_ref().unwrap(), b.dx.as_ref().unwrap()),
        ] {
            let (x, y) = (x.to_vec().unwrap(), y.to_vec().unwrap());
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{what} differs between runs"
            );
        }
    }

    #[test]
    fn grad_bad_shapes_are_clear_errors() {
        let gpu = test_gpu();
        let x = Tensor::zeros(gpu, &[1, 8, 4]).unwrap();
        let w = Tensor::zeros(gpu, &[6, 2, 3]).unwrap();
        let dy = Tensor::zeros(gpu, &[1, 6, 6]).unwrap();
        let err = |r: Result<Conv1dGrads>| r.unwrap_err().to_string();
        assert!(conv1d_backward(&dy, &x, &w, 1, 0, 2, true).is_ok());
        let e = err(conv1d_backward(&dy, &x, &w, 2, 0, 2, true));
        assert!(e.contains("dy must be [1, 3, 6]"), "{e}");
        assert!(err(conv1d_backward(&dy, &x, &w, 1, 0, 1, true)).contains("channels"));
        assert!(err(conv1d_backward(&dy, &x, &w, 1, 0, 4, true)).contains("divisible"));
        assert!(err(conv1d_backward(&dy, &x, &w, 0, 0, 2, true)).contains("stride"));
        let flat = Tensor::zeros(gpu, &[32]).unwrap();
        assert!(err(conv1d_backward(&dy, &flat, &w, 1, 0, 2, true)).contains("[B, T, C_in]"));
    }

    #[test]
    fn bad_shapes_are_clear_errors() {
        let gpu = test_gpu();
        let x = Tensor::zeros(gpu, &[1, 4, 6]).unwrap();
        let w = Tensor::zeros(gpu, &[4, 3, 3]).unwrap();
        let err = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(err(conv1d(&x, &w, None, 1, 0, 1)).contains("channels"));
        assert!(err(conv1d(&x, &w, None, 0, 0, 2)).contains("stride"));
        assert!(err(conv1d(&x, &w, None, 1, 0, 3)).contains("divisible"));
        let long = Tensor::zeros(gpu, &[4, 3, 9]).unwrap();
        let e = err(conv1d(&x, &long, None, 1, 2, 2));
        assert!(e.contains("shorter than the kernel"), "{e}");
        let b = Tensor::zeros(gpu, &[5]).unwrap();
        assert!(err(conv1d(&x, &w, Some(&b), 1, 0, 2)).contains("bias"));
        let flat = Tensor::zeros(gpu, &[24]).unwrap();
        assert!(err(conv1d(&flat, &w, None, 1, 0, 2)).contains("[B, T, C_in]"));
        assert!(err(conv1d(&x, &flat, None, 1, 0, 2)).contains("[C_out, C_in/groups, K]"));
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{calls_per_timing, random_vec};

    /// User + system CPU time of this process (lavapipe's threads included), from /proc/self/stat.
    fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, r)| r.split_whitespace().collect());
        let ticks: f64 = fields
            .get(11..13)
            .map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
        ticks / 100.0
    }

    /// wav2vec2-base shapes for 1 s of audio. `cargo test --release --lib conv1d_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn conv1d_timing() {
        let gpu = test_gpu();
        let cases = [
            (
                "layer0 T=16000",
                16000usize,
                1usize,
                512usize,
                10usize,
                5usize,
                0usize,
                1usize,
            ),
            ("layer1 T=3199", 3199, 512, 512, 3, 2, 0, 1),
            ("layer6 T=99", 99, 512, 512, 2, 2, 0, 1),
            ("pos conv T=49", 49, 768, 768, 128, 1, 64, 16),
        ];
        for (name, t, c_in, c_out, k, s, p, g) in cases {
            let x = Tensor::from_slice(gpu, &random_vec(1, t * c_in, 1.0), &[1, t, c_in]).unwrap();
            let w = Tensor::from_slice(gpu, &random_vec(2, c_out * c_in / g * k, 0.1), &[c_out, c_in / g, k]).unwrap();
            let wp = Conv1dWeight::pack(&w, g).unwrap();
            conv1d_packed(&x, &wp, None, s, p, true).unwrap();
            gpu.sync().unwrap();
            let n = 3;
            let cpu0 = cpu_seconds();
            let start = std::time::Instant::now();
            for _ in 0..n {
                conv1d_packed(&x, &wp, None, s, p, true).unwrap();
            }
            gpu.sync().unwrap();
            let dt = start.elapsed().as_secs_f64() / n as f64;
            let cpu = (cpu_seconds() - cpu0) / n as f64;
            let t_out = (t + 2 * p - k) / s + 1;
            let flops = 2.0 * (t_out * c_out * (c_in / g) * k) as f64;
            eprintln!(
                "{name}: {:.1} ms wall, {:.1} ms CPU, {:.2} GFLOP/s",
                dt * 1e3,
                cpu * 1e3,
                flops / dt / 1e9
            );
        }
    }

    /// The 4 x 4 kernels against the subgroup kernels at wav2vec2-base's conv shapes for a 2 s input (one batch
    /// row), timed interleaved in one process (A, B, A, B, .., best of 5; the machine is shared): GFLOP/s of
    /// the forward, of dw + db (`need_dx = false`) and of the whole backward, and the new / old speed ratio.
    /// `cargo test --release --lib bench_conv_kernels_model_shapes -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_conv_kernels_model_shapes() {
        let gpu = test_gpu();
        // (name, T_in, C_in, C_out, K, stride, padding, groups)
        let cases = [
            ("layer0 32000 -> 6399 k10 s5", 32000, 1, 512, 10, 5, 0, 1),
            (
                "layer1 6399 -> 3199 k3",
                6399usize,
                512usize,
                512usize,
                3usize,
                2usize,
                0usize,
                1usize,
            ),
            ("layer3 1599 -> 799 k3", 1599, 512, 512, 3, 2, 0, 1),
            ("layer5 399 -> 199 k2", 399, 512, 512, 2, 2, 0, 1),
            ("layer6 199 -> 99 k2", 199, 512, 512, 2, 2, 0, 1),
            ("pos conv 99, k128 g16", 99, 768, 768, 128, 1, 64, 16),
            ("pos conv 499, k128 g16", 499, 768, 768, 128, 1, 64, 16),
        ];
        // The 4 x 4 kernels first (the baseline), then the subgroup ones where the adapter has them, then the
        // matmul route.
        let mut kernels = vec![ConvKernel::Block4];
        if gpu.subgroups_of_8() {
            kernels.push(ConvKernel::Subgroup);
        }
        kernels.push(ConvKernel::Matmul);
        let only = std::env::var("BENCH_ONLY").ok(); // a part of a case name
        for (name, t, c_in, c_out, k, s, p, g) in cases {
            if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                continue;
            }
            let t_out = (t + 2 * p - k) / s + 1;
            let x = Tensor::from_slice(gpu, &random_vec(1, t * c_in, 1.0), &[1, t, c_in]).unwrap();
            let wv = random_vec(2, c_out * c_in / g * k, 0.1);
            let w = Tensor::from_slice(gpu, &wv, &[c_out, c_in / g, k]).unwrap();
            let wp = Conv1dWeight::pack(&w, g).unwrap();
            let dy = Tensor::from_slice(gpu, &random_vec(3, t_out * c_out, 1.0), &[1, t_out, c_out]).unwrap();
            let gflop = 2.0 * (t_out * c_out * (c_in / g) * k) as f64 / 1e9;
            type Part<'a> = (&'a str, f64, &'a dyn Fn(ConvKernel));
            let parts: [Part; 3] = [
                ("forward", gflop, &|kern| {
                    conv1d_packed_with(kern, &x, &wp, None, s, p, false).unwrap();
                }),
                ("dw+db", gflop, &|kern| {
                    conv1d_backward_with(Some(kern), &dy, &x, &w, s, p, g, false).unwrap();
                }),
                ("dx+dw+db", 2.0 * gflop, &|kern| {
                    conv1d_backward_with(Some(kern), &dy, &x, &w, s, p, g, true).unwrap();
                }),
            ];
            for (part, flop, run) in parts {
                // What each kernel can run: the subgroup forward and the matmul route's backward load the input
                // channels as vec4 (not the first layer's one channel).
                let vec4_in = (c_in / g) % 4 == 0;
                let kernels: Vec<ConvKernel> = kernels
                    .iter()
                    .copied()
                    .filter(|&k| vec4_in || !matches!((k, part), (ConvKernel::Subgroup, "forward")))
                    .filter(|&k| vec4_in || !(k == ConvKernel::Matmul && part != "forward"))
                    .collect();
                let reps = calls_per_timing(flop * 1e9); // `flop` counts GFLOP here
                let time = |kern| {
                    let start = std::time::Instant::now();
                    for _ in 0..reps {
                        run(kern);
                    }
                    gpu.sync().unwrap();
                    start.elapsed().as_secs_f64() / reps as f64
                };
                for &kern in &kernels {
                    time(kern); // compiles the pipelines
                }
                let mut best = vec![f64::MAX; kernels.len()];
                for _ in 0..5 {
                    for (i, &kern) in kernels.iter().enumerate() {
                        best[i] = best[i].min(time(kern));
                    }
                }
                let line: Vec<String> = kernels
                    .iter()
                    .zip(&best)
                    .map(|(kern, t)| format!("{kern:?} {:.2} GFLOP/s ({:.2}x)", flop / t, best[0] / t))
                    .collect();
                eprintln!("{name} {part}: {}", line.join(", "));
            }
        }
    }

    /// Backward at wav2vec2-base shapes, one batch row:
    /// `cargo test --release --lib conv1d_grad_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn conv1d_grad_timing() {
        let gpu = test_gpu();
        let cases = [
            (
                "layer1 T_out=3199",
                6399usize,
                512usize,
                512usize,
                3usize,
                2usize,
                0usize,
                1usize,
            ),
            ("layer0 T_out=6399 (2 s)", 32000, 1, 512, 10, 5, 0, 1),
            ("pos conv T=99", 99, 768, 768, 128, 1, 64, 16),
        ];
        for (name, t, c_in, c_out, k, s, p, g) in cases {
            let t_out = (t + 2 * p - k) / s + 1;
            let x = Tensor::from_slice(gpu, &random_vec(1, t * c_in, 1.0), &[1, t, c_in]).unwrap();
            let w = Tensor::from_slice(gpu, &random_vec(2, c_out * c_in / g * k, 0.1), &[c_out, c_in / g, k]).unwrap();
            let dy = Tensor::from_slice(gpu, &random_vec(3, t_out * c_out, 1.0), &[1, t_out, c_out]).unwrap();
            let flops = 2.0 * (t_out * c_out * (c_in / g) * k) as f64;
            // (wall, CPU) seconds of one call, the faster of 2; CPU time is the steadier figure on a shared
            // machine. dx is timed as (everything) - (dw + db).
            let time = |need_dx: bool| {
                conv1d_backward(&dy, &x, &w, s, p, g, need_dx).unwrap();
                gpu.sync().unwrap();
                let mut best = (f64::MAX, f64::MAX);
                for _ in 0..2 {
                    let (start, cpu0) = (std::time::Instant::now(), cpu_seconds());
                    conv1d_backward(&dy, &x, &w, s, p, g, need_dx).unwrap();
                    gpu.sync().unwrap();
                    best.0 = best.0.min(start.elapsed().as_secs_f64());
                    best.1 = best.1.min(cpu_seconds() - cpu0);
                }
                best
            };
            let dw = time(false);
            eprintln!(
                "{name}: dw+db {:.0} ms wall, {:.0} ms CPU ({:.2} GFLOP/s wall)",
                dw.0 * 1e3,
                dw.1 * 1e3,
                flops / dw.0 / 1e9
            );
            if c_in > 1 {
                let all = time(true);
                eprintln!(
                    "{name}: dx+dw+db {:.0} ms wall, {:.0} ms CPU; dx ~ {:.0} ms wall, {:.0} ms CPU",
                    all.0 * 1e3,
                    all.1 * 1e3,
                    (all.0 - dw.0) * 1e3,
                    (all.1 - dw.1) * 1e3
                );
            }
        }
    }
}
