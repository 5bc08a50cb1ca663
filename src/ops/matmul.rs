//! Batched strided matmul (`shaders/matmul.wgsl`) with a fused epilogue (scale, bias, exact GELU), and the
//! linear layers built on it.
//!
//! The general launcher [`matmul_into`] reads A, B and writes C through [`View`]s (offset and three strides
//! in elements), so attention reads per-head slices of `[T, D]` Q/K/V buffers and writes the per-head output
//! straight into its columns, with no permute copies (K^T is just a stride choice).
//! The kernel is picked by layout: A and B contiguous along k (linear layers, Q K^T) take a vec4 path, B
//! contiguous along n (P V) another, everything else a scalar strided path; then by adapter
//! ([`choose_kernel_for`]): subgroup kernels where subgroups have 8 invocations (lavapipe), 64 x 64 tiles staged
//! in workgroup memory on other hardware GPUs (128 x 128 for tall products, [`matmul_into_tall`]), 4 x 4
//! register blocks elsewhere. All compute the same sums, bit for bit. On the GPUs that take the tiled kernels,
//! products with a long k are also cut along it into slices (an outer batch of the same dispatch) whose
//! partial products a second pass adds in order (split-K, [`split_k_for`]): that changes the rounding, never
//! the determinism. [`linear_half`] runs the
//! same kernels over weights stored in f16 ([`HalfWeight`]).

use std::sync::LazyLock;

use anyhow::{bail, Result};

use crate::gpu::{DType, Shader, Tensor};

static SHADER: Shader = crate::shader!("matmul", "matmul_common");
/// Split-K's second pass ([`split_k_for`]).
static SPLIT_K_SHADER: Shader = crate::shader!("matmul_split_k");
/// Kernels that need subgroups of exactly 8 invocations; compiled only on such adapters.
static SG_SHADER: Shader = crate::shader!("matmul_sg", "matmul_common");
/// The two modules above with B stored as f16 ([`HalfWeight`]; [`f16_weight_module`]). They need
/// [`crate::gpu::Gpu::unpacks_f16`].
static F16B_SHADER: LazyLock<Shader> = LazyLock::new(|| Shader {
    name: "matmul_f16_weights",
    source: Box::leak(f16_weight_module(SHADER.source).into_boxed_str()),
});
static SG_F16B_SHADER: LazyLock<Shader> = LazyLock::new(|| Shader {
    name: "matmul_sg_f16_weights",
    source: Box::leak(f16_weight_module(SG_SHADER.source).into_boxed_str()),
});

/// The f16 B loads that replace a matmul module's "B loads" block.
const F16_WEIGHT_LOADS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/matmul_f16_weights.wgsl"));

/// A matmul module (`shaders/matmul.wgsl` or `matmul_sg.wgsl`, each with `matmul_common.wgsl` appended) with
/// its "B loads" block (in `matmul_common.wgsl`), the only place that reads B, replaced by
/// `shaders/matmul_f16_weights.wgsl`: every kernel of the module then reads B as packed f16 pairs, with the same loop and the same f32 sums. One kernel source serves both precisions.
pub fn f16_weight_module(source: &str) -> String {
    const START: &str = "// -- B loads:";
    const END: &str = "// -- end of B loads";
    let (head, rest) = source.split_once(START).expect("a matmul module has a B loads block");
    let (_, tail) = rest.split_once(END).expect("the B loads block is closed");
    format!("{head}{F16_WEIGHT_LOADS}{tail}")
}
/// Rows (and columns) of C per workgroup, as `TILE` in the shader.
const TILE: usize = 32;
/// Rows (and columns) of C per workgroup of the workgroup-memory kernels, as `WT` in the shader.
const TILED: usize = 64;
/// The same for the 128 x 128 ones, as `WT8` in the shader.
const TILED8: usize = 128;
const FLAG_BIAS: u32 = 1;
const FLAG_GELU: u32 = 2;
const FLAG_ACCUMULATE: u32 = 4;
/// Columns per workgroup of the column-sum kernel, as `CS_COLS` in the shader.
const CS_COLS: usize = 32;

/// Where a batch of matrices lies in a flat buffer, in elements:
/// `X[b, i, j] = buf[offset + b * batch_stride + i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub offset: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// Contiguous row-major `[batch, rows, cols]`.
    pub fn row_major(rows: usize, cols: usize) -> View {
        View {
            offset: 0,
            batch_stride: rows * cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a contiguous row-major `[batch, cols, rows]`, seen as `[batch, rows, cols]`.
    pub fn transposed(rows: usize, cols: usize) -> View {
        View {
            offset: 0,
            batch_stride: rows * cols,
            row_stride: 1,
            col_stride: rows,
        }
    }

    pub fn at(self, offset: usize) -> View {
        View { offset, ..self }
    }

    /// The transposed view: `[batch, rows, cols]` seen as `[batch, cols, rows]` (strides swapped, no copy).
    pub fn t(self) -> View {
        View {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The largest element index the view touches over `[batch, rows, cols]` (all non-zero).
    fn last_index(&self, batch: usize, rows: usize, cols: usize) -> u128 {
        self.offset as u128
            + (batch as u128 - 1) * self.batch_stride as u128
            + (rows as u128 - 1) * self.row_stride as u128
            + (cols as u128 - 1) * self.col_stride as u128
    }

    /// Strides of size-1 dimensions never matter; zeroing them keeps every shader parameter in u32 range
    /// and lets the alignment checks ignore them.
    fn normalized(self, batch: usize, rows: usize, cols: usize) -> View {
        View {
            offset: self.offset,
            batch_stride: if batch > 1 { self.batch_stride } else { 0 },
            row_stride: if rows > 1 { self.row_stride } else { 0 },
            col_stride: if cols > 1 { self.col_stride } else { 0 },
        }
    }
}

/// C[batch, m, n] = A[batch, m, k] · B[batch, k, n].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatDims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// The bias of a product's epilogue: batch item `b`'s column `j` adds `tensor[b * batch_stride + j]`. A batch
/// stride of 0 (the usual case, [`Bias::shared`]) adds one bias to every item; a grouped convolution run as
/// one product over its groups gives each group its own slice of the bias.
#[derive(Clone, Copy, Debug)]
pub struct Bias<'a> {
    pub tensor: &'a Tensor,
    pub batch_stride: usize,
}

impl<'a> Bias<'a> {
    /// One bias `[n]` for every batch item.
    pub fn shared(tensor: &'a Tensor) -> Bias<'a> {
        Bias {
            tensor,
            batch_stride: 0,
        }
    }
}

/// What the epilogue applies after `alpha * A·B + bias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    None,
    /// Exact erf GELU (torch.nn.GELU's default).
    Gelu,
}

/// Which kernel runs a matmul (chosen by layout; see [`choose_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Any strides, scalar loads.
    General,
    /// A and B contiguous along k, vec4 loads along k.
    Nt4,
    /// B contiguous along n, vec4 loads of B rows.
    Nn4,
    /// The layout of `Nt4`, for adapters with subgroups of exactly 8 (`shaders/matmul_sg.wgsl`).
    SgNt4(SgTile),
    /// The layout of `Nn4`, for adapters with subgroups of exactly 8.
    SgNn4(SgTile),
    /// The layout of `Nt4`, 64 x 64 tiles staged in workgroup memory (GPUs with fast shared memory).
    TiledNt4,
    /// The layout of `Nn4`, 64 x 64 tiles staged in workgroup memory.
    TiledNn4,
    /// The layouts of `Nt4` and `Nn4` with 128 x 128 tiles (8 x 8 outputs per invocation), for large products.
    Tiled8Nt4,
    Tiled8Nn4,
    /// `Nt4`, `TiledNt4`, `Tiled8Nt4` and `SgNt4` with B stored as f16 ([`HalfWeight`]; `linear_half`).
    Nt4F16b,
    TiledNt4F16b,
    Tiled8Nt4F16b,
    SgNt4F16b(SgTile),
}

/// How the subgroups of a subgroup kernel's workgroup are arranged: each subgroup covers 8 rows x 32
/// columns of C, a workgroup `rows` x `cols` subgroups (the shader's `SG_WR` x `SG_WC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgTile {
    pub rows: u8,
    pub cols: u8,
}

impl SgTile {
    /// 8 rows x 256 columns: wide products (linear layers).
    pub const WIDE: SgTile = SgTile { rows: 1, cols: 8 };
    /// One subgroup per workgroup, 8 rows x 32 columns: narrow products (the attention's Q K^T with
    /// n = T and P V with n = 64), where a wider workgroup leaves lanes idle past the last column.
    pub const ONE: SgTile = SgTile { rows: 1, cols: 1 };
    /// 32 rows x 64 columns: products with n = 64 (the attention's P V).
    pub const TALL: SgTile = SgTile { rows: 4, cols: 2 };
}

impl Kernel {
    fn entry(self) -> &'static str {
        match self {
            Kernel::General => "matmul_forward",
            Kernel::Nt4 => "matmul_nt4_forward",
            Kernel::Nn4 => "matmul_nn4_forward",
            Kernel::SgNt4(_) => "matmul_sg_nt4_forward",
            Kernel::SgNn4(_) => "matmul_sg_nn4_forward",
            Kernel::TiledNt4 => "matmul_tiled_nt4_forward",
            Kernel::TiledNn4 => "matmul_tiled_nn4_forward",
            Kernel::Tiled8Nt4 => "matmul_tiled8_nt4_forward",
            Kernel::Tiled8Nn4 => "matmul_tiled8_nn4_forward",
            // The same entry points in the f16-weight modules.
            Kernel::Nt4F16b => "matmul_nt4_forward",
            Kernel::TiledNt4F16b => "matmul_tiled_nt4_forward",
            Kernel::Tiled8Nt4F16b => "matmul_tiled8_nt4_forward",
            Kernel::SgNt4F16b(_) => "matmul_sg_nt4_forward",
        }
    }

    /// (rows, columns) of C per workgroup, as in the shader.
    fn tile(self) -> (usize, usize) {
        match self {
            Kernel::General | Kernel::Nt4 | Kernel::Nn4 | Kernel::Nt4F16b => (TILE, TILE),
            Kernel::SgNt4(t) | Kernel::SgNn4(t) | Kernel::SgNt4F16b(t) => (8 * t.rows as usize, 32 * t.cols as usize),
            Kernel::TiledNt4 | Kernel::TiledNn4 | Kernel::TiledNt4F16b => (TILED, TILED),
            Kernel::Tiled8Nt4 | Kernel::Tiled8Nn4 | Kernel::Tiled8Nt4F16b => (TILED8, TILED8),
        }
    }

    /// The pipeline constants of the kernel's shader.
    fn constants(self) -> Vec<(&'static str, f64)> {
        match self {
            Kernel::SgNt4(t) | Kernel::SgNn4(t) | Kernel::SgNt4F16b(t) => {
                vec![("SG_WR", t.rows as f64), ("SG_WC", t.cols as f64)]
            }
            _ => Vec::new(),
        }
    }

    fn needs_subgroups_of_8(self) -> bool {
        matches!(self, Kernel::SgNt4(_) | Kernel::SgNn4(_) | Kernel::SgNt4F16b(_))
    }

    /// The 64 x 64 workgroup-memory kernel of the `Nt4` and `Nn4` layouts.
    fn tiled(self) -> Option<Kernel> {
        match self {
            Kernel::Nt4 => Some(Kernel::TiledNt4),
            Kernel::Nn4 => Some(Kernel::TiledNn4),
            _ => None,
        }
    }

    /// A 64 x 64 tiled kernel's 128 x 128 twin (the same sums, bit for bit); any other kernel unchanged.
    fn with_large_tiles(self) -> Kernel {
        match self {
            Kernel::TiledNt4 => Kernel::Tiled8Nt4,
            Kernel::TiledNn4 => Kernel::Tiled8Nn4,
            other => other,
        }
    }

    /// The same kernel reading B as a [`HalfWeight`]'s packed f16 pairs (the nt4 layouts only).
    fn with_f16_b(self) -> Option<Kernel> {
        match self {
            Kernel::Nt4 => Some(Kernel::Nt4F16b),
            Kernel::TiledNt4 => Some(Kernel::TiledNt4F16b),
            Kernel::Tiled8Nt4 => Some(Kernel::Tiled8Nt4F16b),
            Kernel::SgNt4(t) => Some(Kernel::SgNt4F16b(t)),
            _ => None,
        }
    }

    /// B is a [`HalfWeight`]'s packed f16 pairs instead of f32.
    fn b_is_f16(self) -> bool {
        matches!(
            self,
            Kernel::Nt4F16b | Kernel::TiledNt4F16b | Kernel::Tiled8Nt4F16b | Kernel::SgNt4F16b(_)
        )
    }

    fn shader(self) -> &'static Shader {
        match (self.needs_subgroups_of_8(), self.b_is_f16()) {
            (false, false) => &SHADER,
            (true, false) => &SG_SHADER,
            (false, true) => &F16B_SHADER,
            (true, true) => &SG_F16B_SHADER,
        }
    }
}

fn aligned(v: &View) -> bool {
    v.offset % 4 == 0 && v.batch_stride % 4 == 0
}

/// The fastest kernel whose alignment needs the (normalized) views meet.
pub fn choose_kernel(a: View, b: View, dims: MatDims) -> Kernel {
    if dims.k == 0 {
        return Kernel::General; // C = bias only; nothing to load
    }
    let a = a.normalized(dims.batch, dims.m, dims.k);
    let b = b.normalized(dims.batch, dims.k, dims.n);
    // After normalization a unit stride means the dimension is longer than 1, so "contiguous" is exact.
    let a_k_contig = a.col_stride == 1 || dims.k == 1;
    if dims.k % 4 == 0
        && a_k_contig
        && aligned(&a)
        && a.row_stride % 4 == 0
        && b.row_stride == 1
        && aligned(&b)
        && b.col_stride % 4 == 0
    {
        return Kernel::Nt4;
    }
    if dims.n % 4 == 0 && b.col_stride == 1 && aligned(&b) && b.row_stride % 4 == 0 {
        return Kernel::Nn4;
    }
    Kernel::General
}

/// Narrowest C (columns) for the 256-column subgroup workgroup ([`SgTile::WIDE`]); narrower products take
/// one subgroup per workgroup ([`SgTile::ONE`], 8 x 32), which leaves fewer lanes idle past the last
/// column. Measured on lavapipe (benches/RESULTS.md, "lavapipe attention, session 3"): the attention
/// products with n = 64 or T = 49..149 ran 1.3-2.4x faster with ONE than with the kernels chosen before (the
/// 4 x 4 ones for n < 128, WIDE above); at n = 499 ONE and WIDE tie; the linear layers (n >= 768) keep WIDE.
const SG_WIDE_MIN_N: usize = 256;

/// The environment variable that forces the workgroup-memory tiled matmul kernels on (`1`) or off (`0`)
/// instead of choosing by adapter (for measuring one against the other on a new GPU).
pub const TILED_ENV: &str = "WGPU_MLKD_MATMUL_TILED";

/// Smallest C (rows and columns per batch item) for the 64 x 64 tiled kernels in a batched product: below it
/// most of a tile would be idle, and the 32 x 32 register-blocked kernels leave fewer invocations without work
/// (the attention's products at T = 49 on an H100). A product of one batch item takes them at any height: its
/// k slices (split-K) make up for the idle rows (49 x 768 x 768 on an H100: 2x the register-blocked kernel).
const TILED_MIN_DIM: usize = 64;

/// Whether the tiled kernels are used on this adapter: `WGPU_MLKD_MATMUL_TILED` if set, else on GPUs
/// (discrete or integrated) without subgroups of 8. Not on CPU drivers: on lavapipe the register-blocked
/// kernels beat workgroup-memory tiling (barriers cost more than the loads they save; benches/RESULTS.md);
/// GPUs have shared memory an order of magnitude faster than their caches, which is what tiling uses.
/// (Not yet measured on a GPU: the device checks of issue 8 compare both with this variable.)
pub(crate) fn tiled_wanted(gpu: &crate::gpu::Gpu) -> bool {
    use std::sync::OnceLock;
    static FORCED: OnceLock<Option<bool>> = OnceLock::new();
    let forced = *FORCED.get_or_init(|| match std::env::var(TILED_ENV).ok()?.trim() {
        "1" | "on" | "true" => Some(true),
        "0" | "off" | "false" => Some(false),
        _ => None,
    });
    forced.unwrap_or_else(|| gpu.is_hardware_gpu() && !gpu.subgroups_of_8())
}

/// The environment variable that picks the tiles of the workgroup-memory kernels: `128` for the 128 x 128
/// ones, anything else the 64 x 64 ones.
pub const TILE_ENV: &str = "WGPU_MLKD_MATMUL_TILE";

/// Whether every tiled product takes 128 x 128 tiles: only when `WGPU_MLKD_MATMUL_TILE=128`. By default only
/// tall products do ([`matmul_into_tall`]): for one utterance's linear layers the 64 x 64 tiles with split-K
/// were as fast or faster on an H100 (benches/RESULTS.md, "H100").
fn large_tiles_wanted() -> bool {
    use std::sync::OnceLock;
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var(TILE_ENV).is_ok_and(|v| v.trim() == "128"))
}

/// [`choose_kernel`], then the variant for this adapter: the workgroup-memory tiled kernels where
/// [`tiled_wanted`] and the product is at least 64 x 64, else the subgroup kernels where the adapter has
/// subgroups of 8, with a workgroup shape that fits the product's width.
pub fn choose_kernel_for(gpu: &crate::gpu::Gpu, a: View, b: View, dims: MatDims) -> Kernel {
    let kernel = choose_kernel(a, b, dims);
    let tall_enough = dims.m >= TILED_MIN_DIM || dims.batch == 1;
    if tall_enough && dims.n >= TILED_MIN_DIM && tiled_wanted(gpu) {
        if let Some(tiled) = kernel.tiled() {
            return if large_tiles_wanted() {
                tiled.with_large_tiles()
            } else {
                tiled
            };
        }
    }
    if !gpu.subgroups_of_8() {
        return kernel;
    }
    let tile = if dims.n >= SG_WIDE_MIN_N {
        SgTile::WIDE
    } else {
        SgTile::ONE
    };
    match kernel {
        Kernel::Nt4 => Kernel::SgNt4(tile),
        Kernel::Nn4 => Kernel::SgNn4(tile),
        other => other,
    }
}

/// The environment variable that forces split-K (`N`: k cut into N slices where it has at least 4 N steps; `1`
/// or `0`: never) instead of [`split_k_for`]'s rule, for measuring on a new GPU.
pub const SPLIT_K_ENV: &str = "WGPU_MLKD_MATMUL_SPLIT_K";

/// Split-K cuts k into slices of at least this many steps, as many slices as that allows up to
/// [`SPLIT_K_MAX`]. On an H100 (benches/RESULTS.md, "H100") one utterance's linear layers (a few hundred rows
/// x 768 columns: under 100 tiles of 64 x 64 for 132 compute units) ran 1.4-3.3x faster in slices of 192-384
/// steps; products that fill the GPU by their rows lose by it (the feature encoder's convolutions 9% in 8
/// slices), so those go through [`matmul_into_tall`], which never splits.
const SPLIT_K_MIN_DEPTH: usize = 192;
const SPLIT_K_MAX: usize = 8;

/// Into how many k slices [`matmul_into_with`] cuts a product (1: not split): on adapters that take the
/// tiled kernels ([`tiled_wanted`]), the most slices (up to [`SPLIT_K_MAX`]) of at least
/// [`SPLIT_K_MIN_DEPTH`] k steps, each starting on a vec4 boundary (the last may be shorter). A batched
/// product (attention heads, a grouped convolution's groups) is split alike, its slices an outer batch of
/// the same dispatch. The count depends on k alone, never on the number of rows or items, so a product
/// computed in row chunks (long inputs) gives the same bits as in one piece; except that the slices' partial
/// sums (`[slices, batch, m, n]`) must fit one storage binding, so a product too large for that takes fewer
/// slices ([`split_k_within`]). `WGPU_MLKD_MATMUL_SPLIT_K` overrides the rule (within the same bound).
pub fn split_k_for(gpu: &crate::gpu::Gpu, dims: MatDims) -> usize {
    use std::sync::OnceLock;
    static FORCED: OnceLock<Option<usize>> = OnceLock::new();
    let forced = *FORCED.get_or_init(|| std::env::var(SPLIT_K_ENV).ok()?.trim().parse().ok());
    if !tiled_wanted(gpu) {
        return 1;
    }
    split_k_within(split_k_count(dims, forced), dims, gpu.max_binding_bytes())
}

/// At most `s` slices, as many as keep the partial sums (`[slices, batch, m, n]` f32) within `max_binding_bytes`
/// and k cut into whole vec4 slices; 1 (no split, no partial sums) where not even two fit.
fn split_k_within(s: usize, dims: MatDims, max_binding_bytes: u64) -> usize {
    let slice_bytes = (dims.batch as u64 * dims.m as u64 * dims.n as u64 * 4).max(1);
    let mut s = s.min((max_binding_bytes / slice_bytes).min(usize::MAX as u64) as usize);
    while s > 1 && !split_k_fits(dims.k, s) {
        s -= 1;
    }
    s.max(1)
}

/// [`split_k_for`]'s count on an adapter that takes the tiled kernels, with the override given (`None`: the
/// rule).
fn split_k_count(dims: MatDims, forced: Option<usize>) -> usize {
    if let Some(s) = forced {
        return if s > 1 && split_k_fits(dims.k, s) { s } else { 1 };
    }
    let s = (dims.k / SPLIT_K_MIN_DEPTH).clamp(1, SPLIT_K_MAX);
    // Slices of >= 192 steps rounded up to vec4 always come out at s (checked anyway).
    if split_k_fits(dims.k, s) {
        s
    } else {
        1
    }
}

/// Whether k can be cut into `s` slices of whole vec4 (each but the last `split_k_slice` long; the last may be
/// shorter).
fn split_k_fits(k: usize, s: usize) -> bool {
    s >= 1 && k >= 4 * s && k.div_ceil(split_k_slice(k, s)) == s
}

/// The k steps of each slice but the last: k / s rounded up to a multiple of 4, so that every slice starts
/// on a vec4 boundary.
fn split_k_slice(k: usize, s: usize) -> usize {
    k.div_ceil(s).div_ceil(4) * 4
}

/// True when no two (batch, row, col) positions of the view share an element: sorted by stride, every
/// stride must step past everything the smaller ones span. (Sufficient, and holds for every real layout.)
fn non_overlapping(v: &View, batch: usize, rows: usize, cols: usize) -> bool {
    let mut dims: Vec<(u128, u128)> = [(batch, v.batch_stride), (rows, v.row_stride), (cols, v.col_stride)]
        .into_iter()
        .filter(|(size, _)| *size > 1)
        .map(|(size, stride)| (size as u128, stride as u128))
        .collect();
    dims.sort_by_key(|d| d.1);
    let mut span = 0u128; // largest offset the smaller dimensions reach
    for (size, stride) in dims {
        if stride <= span {
            return false;
        }
        span += (size - 1) * stride;
    }
    true
}

fn check_view(what: &str, t: &Tensor, v: &View, batch: usize, rows: usize, cols: usize) -> Result<()> {
    if t.dtype() != DType::F32 {
        bail!("matmul: {what} must be f32, got {:?}", t.dtype());
    }
    let last = v.last_index(batch, rows, cols);
    if last >= t.numel() as u128 {
        bail!(
            "matmul: {what} view {v:?} over [batch, rows, cols] = [{batch}, {rows}, {cols}] reaches element \
             {last}, but the {what} tensor {:?} has {} elements",
            t.shape(),
            t.numel()
        );
    }
    if last > u32::MAX as u128 {
        bail!("matmul: {what} view reaches element {last}, beyond 32-bit indexing");
    }
    Ok(())
}

/// `C = alpha * A·B + bias[j]` over views of `out`, `a` and `b` (see [`View`]); `bias` has `n` elements.
/// `out` must not share a buffer with the inputs, and its view must not overlap itself.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into(
    out: &Tensor,
    out_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    bias: Option<&Tensor>,
    alpha: f32,
) -> Result<()> {
    let bias = bias.map(Bias::shared);
    matmul_into_with(out, out_view, a, a_view, b, b_view, dims, bias, alpha, Activation::None)
}

/// [`matmul_into`] with an activation fused on the output, `C = act(alpha * A·B + bias[j])`, and the bias
/// shared by every batch item or one per item ([`Bias`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_into_with(
    out: &Tensor,
    out_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    bias: Option<Bias>,
    alpha: f32,
    act: Activation,
) -> Result<()> {
    let kernel = choose_kernel_for(out.gpu(), a_view, b_view, dims);
    let views = (out_view, a_view, b_view);
    let split = split_k_for(out.gpu(), dims);
    launch(kernel, split, out, a, b, views, dims, bias, alpha, act, false)
}

/// [`matmul_into_with`] for a product known to be tall (a convolution over frames: thousands of rows that
/// fill a GPU by themselves): never split-K (8 slices cost the feature encoder's convolutions 9% and a
/// scratch of 8 x C on an H100), and the 128 x 128 tiles where the tiled kernels are taken and there are at
/// least [`TALL_MIN_ROWS`] rows (1.2-1.3x the 64 x 64 ones for those convolutions). Bit-identical to
/// [`matmul_into_with`] without split-K, at any number of rows.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into_tall(
    out: &Tensor,
    out_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    bias: Option<Bias>,
    act: Activation,
) -> Result<()> {
    let mut kernel = choose_kernel_for(out.gpu(), a_view, b_view, dims);
    if dims.m >= TALL_MIN_ROWS {
        kernel = kernel.with_large_tiles();
    }
    let views = (out_view, a_view, b_view);
    launch(kernel, 1, out, a, b, views, dims, bias, 1.0, act, false)
}

/// Rows from which [`matmul_into_tall`] takes the 128 x 128 tiles.
pub const TALL_MIN_ROWS: usize = 2048;

/// `C += alpha * A·B` over views (same rules as [`matmul_into`]). For sums built up chunk by chunk inside one
/// backward (attention over query-row chunks), always into a tensor that backward owns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_accumulate_into(
    out: &Tensor,
    out_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    alpha: f32,
) -> Result<()> {
    let kernel = choose_kernel_for(out.gpu(), a_view, b_view, dims);
    let views = (out_view, a_view, b_view);
    let split = split_k_for(out.gpu(), dims);
    launch(
        kernel,
        split,
        out,
        a,
        b,
        views,
        dims,
        None,
        alpha,
        Activation::None,
        true,
    )
}

/// [`matmul_into_with`] with the kernel given and never split (tests force the general path with it).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_with_kernel(
    kernel: Kernel,
    out: &Tensor,
    out_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    bias: Option<&Tensor>,
    alpha: f32,
    act: Activation,
) -> Result<()> {
    let views = (out_view, a_view, b_view);
    launch(
        kernel,
        1,
        out,
        a,
        b,
        views,
        dims,
        bias.map(Bias::shared),
        alpha,
        act,
        false,
    )
}

/// Checks and records one matmul; `views` are (C, A, B); `accumulate` adds C's previous contents; `split`
/// > 1 cuts k into that many slices (split-K, see [`split_k_for`]; at least 4 k steps a slice).
#[allow(clippy::too_many_arguments)]
fn launch(
    kernel: Kernel,
    split: usize,
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    (out_view, a_view, b_view): (View, View, View),
    dims: MatDims,
    bias: Option<Bias>,
    alpha: f32,
    act: Activation,
    accumulate: bool,
) -> Result<()> {
    let MatDims { batch, m, n, k } = dims;
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    check_view("output", out, &out_view, batch, m, n)?;
    if !non_overlapping(&out_view, batch, m, n) {
        bail!("matmul: output view {out_view:?} over [{batch}, {m}, {n}] writes some elements twice");
    }
    if k > 0 {
        check_view("A", a, &a_view, batch, m, k)?;
        if kernel.b_is_f16() {
            // Two f16 per u32 element: the view counts halves.
            let last = b_view.last_index(batch, k, n);
            if b.dtype() != DType::U32 || last >= 2 * b.numel() as u128 || last > u32::MAX as u128 {
                bail!(
                    "matmul: the f16 B view {b_view:?} does not fit the packed tensor {:?}",
                    b.shape()
                );
            }
        } else {
            check_view("B", b, &b_view, batch, k, n)?;
        }
    }
    if out.buffer() == a.buffer() || out.buffer() == b.buffer() {
        bail!("matmul: the output must not share a buffer with A or B");
    }
    // A batch stride 0 (or one batch item) is one bias of exactly n; otherwise the last item's must fit.
    let bias_batch_stride = bias.map_or(0, |b| if batch > 1 { b.batch_stride } else { 0 });
    if let Some(Bias { tensor: bias, .. }) = bias {
        let needed = (batch as u128 - 1) * bias_batch_stride as u128 + n as u128;
        let fits = if bias_batch_stride == 0 {
            bias.numel() == n
        } else {
            needed <= bias.numel() as u128
        };
        if bias.dtype() != DType::F32 || !fits {
            bail!(
                "matmul: bias must be f32 with n = {n} elements (batch stride {bias_batch_stride} over {batch} \
                 items: {needed}), got {:?} {:?}",
                bias.dtype(),
                bias.shape()
            );
        }
        if bias.buffer() == out.buffer() {
            bail!("matmul: the output must not share a buffer with the bias");
        }
    }
    if k == 0 && kernel != Kernel::General {
        bail!("matmul: the {kernel:?} kernel needs k > 0");
    }
    if kernel.needs_subgroups_of_8() && !out.gpu().subgroups_of_8() {
        bail!("matmul: the {kernel:?} kernel needs an adapter with subgroups of exactly 8 invocations");
    }
    if let Kernel::SgNt4(t) | Kernel::SgNn4(t) | Kernel::SgNt4F16b(t) = kernel {
        if t.rows == 0 || t.cols == 0 || t.rows as usize * t.cols as usize * 8 > 256 {
            bail!("matmul: subgroup tile {t:?} must have 1 to 32 subgroups");
        }
    }
    let (av, bv, cv) = (
        a_view.normalized(batch, m, k.max(1)),
        b_view.normalized(batch, k.max(1), n),
        out_view.normalized(batch, m, n),
    );
    let flags = if bias.is_some() { FLAG_BIAS } else { 0 }
        | if act == Activation::Gelu { FLAG_GELU } else { 0 }
        | if accumulate { FLAG_ACCUMULATE } else { 0 };
    let bias = bias.map(|b| (b.tensor, bias_batch_stride));
    if split > 1 {
        if !split_k_fits(k, split) {
            bail!("matmul: split-K into {split} slices needs k cut into {split} slices of whole vec4, got {dims:?}");
        }
        return launch_split_k(kernel, split, out, a, b, (cv, av, bv), dims, bias, alpha, flags);
    }
    record(kernel, out, a, b, (cv, av, bv), dims, KSlices::ONE, bias, alpha, flags)
}

/// Split-K's k slices as an outer batch of a product (the shaders' `items`, `a_ks`, `b_ks`, `c_ks`):
/// `count` slices, each `a`, `b`, `c` elements further into A, B and C than the one before.
#[derive(Clone, Copy)]
struct KSlices {
    count: usize,
    a: usize,
    b: usize,
    c: usize,
}

impl KSlices {
    /// The whole product as one slice.
    const ONE: KSlices = KSlices {
        count: 1,
        a: 0,
        b: 0,
        c: 0,
    };
}

/// Records one matmul dispatch over checked, normalized views (every index was checked to fit u32): `dims`
/// per slice, `slices.count` slices of `dims.batch` items each; `bias` is (tensor, batch stride).
#[allow(clippy::too_many_arguments)]
fn record(
    kernel: Kernel,
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    (cv, av, bv): (View, View, View),
    dims: MatDims,
    slices: KSlices,
    bias: Option<(&Tensor, usize)>,
    alpha: f32,
    flags: u32,
) -> Result<()> {
    let MatDims { batch, m, n, k } = dims;
    let (tile_m, tile_n) = kernel.tile();
    let tiles_m = m.div_ceil(tile_m);
    let tiles_n = n.div_ceil(tile_n);
    let items = slices.count as u128 * batch as u128;
    let groups = items * tiles_m as u128 * tiles_n as u128;
    if groups > u32::MAX as u128 {
        bail!("matmul: {groups} workgroups for {dims:?} is too many for one dispatch");
    }
    let u = |x: usize| x as u32; // the caller checked every value fits
    let params = [
        items as u32,
        u(m),
        u(n),
        u(k),
        u(av.offset),
        u(av.batch_stride),
        u(av.row_stride),
        u(av.col_stride),
        u(bv.offset),
        u(bv.batch_stride),
        u(bv.row_stride),
        u(bv.col_stride),
        u(cv.offset),
        u(cv.batch_stride),
        u(cv.row_stride),
        u(cv.col_stride),
        u(tiles_m),
        u(tiles_n),
        alpha.to_bits(),
        flags,
        u(bias.map_or(0, |(_, stride)| stride)),
        u(batch),
        u(slices.a),
        u(slices.b),
        u(slices.c),
    ];
    // Without a bias the shader never reads binding 3; A's buffer stands in (read-only twice is allowed).
    let bias_buf = bias.map_or(a.buffer(), |(t, _)| t.buffer());
    out.gpu().dispatch_with(
        kernel.shader(),
        kernel.entry(),
        &kernel.constants(),
        &[a.buffer(), b.buffer(), bias_buf, out.buffer()],
        &params,
        groups as u32,
    )
}

/// Split-K over checked, normalized views: the `split` slices of k as an outer batch of partial products
/// (alpha 1, no epilogue) into a scratch `[split, batch, M, N]`, then `shaders/matmul_split_k.wgsl` adds them
/// in order and applies the epilogue into C.
#[allow(clippy::too_many_arguments)]
fn launch_split_k(
    kernel: Kernel,
    split: usize,
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    (cv, av, bv): (View, View, View),
    dims: MatDims,
    bias: Option<(&Tensor, usize)>,
    alpha: f32,
    flags: u32,
) -> Result<()> {
    let MatDims { batch, m, n, k } = dims;
    let slice = split_k_slice(k, split);
    let (full, rest) = (k / slice, k % slice);
    let elements = batch * m * n;
    if split as u128 * elements as u128 > u32::MAX as u128 - 256 {
        bail!("matmul: split-K into {split} slices of {batch} x {m} x {n} outputs is beyond 32-bit indexing");
    }
    let partial = Tensor::empty(out.gpu(), &[split, batch, m, n], DType::F32)?;
    // Slice s of A is columns s*slice.., of B rows s*slice.., of the scratch item block s. The full slices
    // are one dispatch; a shorter last slice is one more.
    let parts = View::row_major(m, n);
    let step = KSlices {
        count: full,
        a: slice * av.col_stride,
        b: slice * bv.row_stride,
        c: elements,
    };
    let per_slice = MatDims { k: slice, ..dims };
    record(kernel, &partial, a, b, (parts, av, bv), per_slice, step, None, 1.0, 0)?;
    if rest > 0 {
        let last = (
            parts.at(full * elements),
            av.at(av.offset + full * step.a),
            bv.at(bv.offset + full * step.b),
        );
        let dims = MatDims { k: rest, ..dims };
        record(kernel, &partial, a, b, last, dims, KSlices::ONE, None, 1.0, 0)?;
    }
    let u = |x: usize| x as u32; // launch checked that C's view fits u32 indexing
    let params = [
        u(batch),
        u(m),
        u(n),
        u(split),
        u(cv.offset),
        u(cv.batch_stride),
        u(cv.row_stride),
        u(cv.col_stride),
        alpha.to_bits(),
        flags,
        u(bias.map_or(0, |(_, stride)| stride)),
    ];
    let bias_buf = bias.map_or(partial.buffer(), |(t, _)| t.buffer());
    out.gpu().dispatch(
        &SPLIT_K_SHADER,
        "matmul_split_k_reduce",
        &[partial.buffer(), bias_buf, out.buffer()],
        &params,
        elements.div_ceil(256) as u32,
    )
}

fn linear_impl(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    let (Some(&d_in), [d_out, w_in]) = (x.shape().last(), w.shape()) else {
        bail!(
            "linear: x must be [.., in] and w [out, in], got {:?} and {:?}",
            x.shape(),
            w.shape()
        );
    };
    let (d_out, w_in) = (*d_out, *w_in);
    if w_in != d_in {
        bail!(
            "linear: x {:?} has {d_in} features but w {:?} expects {w_in}",
            x.shape(),
            w.shape()
        );
    }
    if let Some(b) = bias {
        if b.shape() != [d_out] {
            bail!("linear: bias must be [{d_out}], got {:?}", b.shape());
        }
    }
    let rows: usize = x.shape()[..x.shape().len() - 1].iter().product();
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("x has a last dimension") = d_out;
    let y = Tensor::empty(x.gpu(), &shape, DType::F32)?;
    // y = x W^T: B[p, j] = w[j, p], contiguous along k.
    matmul_into_with(
        &y,
        View::row_major(rows, d_out),
        x,
        View::row_major(rows, d_in),
        w,
        View::transposed(d_in, d_out),
        MatDims {
            batch: 1,
            m: rows,
            n: d_out,
            k: d_in,
        },
        bias.map(Bias::shared),
        1.0,
        act,
    )?;
    Ok(y)
}

/// A torch `nn.Linear`: `y = x W^T + b` with `x` `[.., in]`, `w` `[out, in]`, `b` `[out]`; y is `[.., out]`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, bias, Activation::None)
}

/// `gelu(x W^T + b)` with exact erf GELU fused on the output (the FFN's intermediate layer).
pub fn linear_gelu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, bias, Activation::Gelu)
}

/// A linear layer's weight `[out, in]` stored as f16 (round to nearest even), two per u32, for inference with
/// half the weight memory and bandwidth. The products and sums stay f32 ([`linear_half`]): the only error is
/// the weights' rounding, at most 2^-11 of each weight, so `|y - y_f32| <= 2^-11 * sum_p |x_p w_jp|` plus f32
/// rounding (tested). Needs an adapter that can unpack f16 in shaders ([`crate::gpu::Gpu::unpacks_f16`]: WGSL's
/// `unpack2x16float`, every native backend); `in` must be a multiple of 4.
#[derive(Clone, Debug)]
pub struct HalfWeight {
    packed: Tensor,
    out: usize,
    inp: usize,
}

/// Largest finite f16.
const F16_MAX: f32 = 65504.0;

impl HalfWeight {
    /// Rounds an f32 weight `[out, in]` to f16 (read back once, rounded on the CPU so every adapter gets the
    /// same bits). A value beyond f16's range is an error naming `what`.
    pub fn from_f32(w: &Tensor, what: &str) -> Result<HalfWeight> {
        let &[out, inp] = w.shape() else {
            bail!("{what}: an f16 weight must be [out, in], got {:?}", w.shape());
        };
        if w.dtype() != DType::F32 || inp % 4 != 0 || out == 0 {
            bail!(
                "{what}: an f16 weight must be f32 [out, in] with in % 4 == 0, got {:?} {:?}",
                w.dtype(),
                w.shape()
            );
        }
        if !w.gpu().unpacks_f16() {
            bail!(
                "{what}: this adapter ({}) cannot unpack f16 in shaders (lavapipe needs shader-f16, which \
                 Mesa 25's has); run in f32",
                w.gpu().adapter().name
            );
        }
        let values = w.to_vec()?;
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| v.is_nan() || v.abs() > F16_MAX) {
            bail!(
                "{what}: weight [{}, {}] is {v}, which f16 cannot hold (largest {F16_MAX}); run in f32",
                i / inp,
                i % inp
            );
        }
        let packed: Vec<u32> = values
            .chunks_exact(2)
            .map(|p| half::f16::from_f32(p[0]).to_bits() as u32 | (half::f16::from_f32(p[1]).to_bits() as u32) << 16)
            .collect();
        Ok(HalfWeight {
            packed: Tensor::from_u32(w.gpu(), &packed, &[out, inp / 2])?,
            out,
            inp,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// GPU bytes the weight holds (half of the f32 weight's).
    pub fn bytes(&self) -> usize {
        self.packed.numel() * 4
    }
}

/// The kernel for `x W^T` with an f16 `W`: the one [`choose_kernel_for`] picks for the f32 weight, reading f16.
fn choose_half_kernel(gpu: &crate::gpu::Gpu, w: &HalfWeight, dims: MatDims) -> Result<Kernel> {
    let (_, x_view, w_view) = half_views(w, dims);
    let kernel = choose_kernel_for(gpu, x_view, w_view, dims);
    kernel
        .with_f16_b()
        .ok_or_else(|| anyhow::anyhow!("linear_half: no f16-weight variant of {kernel:?} for {dims:?}"))
}

/// The (y, x, W^T) views of `x W^T` over `dims.m` rows.
fn half_views(w: &HalfWeight, dims: MatDims) -> (View, View, View) {
    (
        View::row_major(dims.m, w.out),
        View::row_major(dims.m, w.inp),
        View::transposed(w.inp, w.out),
    )
}

/// [`linear`] (or [`linear_gelu`] with `act`) with an f16 weight.
pub fn linear_half(x: &Tensor, w: &HalfWeight, bias: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    let dims = half_dims(x, w, bias)?;
    let kernel = choose_half_kernel(x.gpu(), w, dims)?;
    linear_half_split(kernel, split_k_for(x.gpu(), dims), x, w, bias, act)
}

fn half_dims(x: &Tensor, w: &HalfWeight, bias: Option<&Tensor>) -> Result<MatDims> {
    let d_in = x.shape().last().copied().unwrap_or(0);
    if d_in != w.inp || x.dtype() != DType::F32 {
        bail!(
            "linear: x {:?} ({:?}) does not match the f16 weight [{}, {}]",
            x.shape(),
            x.dtype(),
            w.out,
            w.inp
        );
    }
    if let Some(b) = bias {
        if b.shape() != [w.out] {
            bail!("linear: bias must be [{}], got {:?}", w.out, b.shape());
        }
    }
    Ok(MatDims {
        batch: 1,
        m: x.numel() / d_in,
        n: w.out,
        k: d_in,
    })
}

/// [`linear_half`] with the kernel given and never split (tests compare them).
#[cfg(test)]
pub(crate) fn linear_half_with(
    kernel: Kernel,
    x: &Tensor,
    w: &HalfWeight,
    bias: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    linear_half_split(kernel, 1, x, w, bias, act)
}

fn linear_half_split(
    kernel: Kernel,
    split: usize,
    x: &Tensor,
    w: &HalfWeight,
    bias: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    if !kernel.b_is_f16() {
        bail!("linear_half: {kernel:?} does not read f16 weights");
    }
    let dims = half_dims(x, w, bias)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("x has a last dimension") = w.out;
    let y = Tensor::empty(x.gpu(), &shape, DType::F32)?;
    launch(
        kernel,
        split,
        &y,
        x,
        &w.packed,
        half_views(w, dims),
        dims,
        bias.map(Bias::shared),
        1.0,
        act,
        false,
    )?;
    Ok(y)
}

/// `a [B, M, K] · b [B, K, N] -> [B, M, N]`; 2-D inputs are one batch (`[M, K] · [K, N] -> [M, N]`).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (batch, m, k, kb, n, two_d) = match (a.shape(), b.shape()) {
        ([ba, m, k], [bb, kb, n]) if ba == bb => (*ba, *m, *k, *kb, *n, false),
        ([m, k], [kb, n]) => (1, *m, *k, *kb, *n, true),
        _ => bail!(
            "matmul: want [B, M, K] and [B, K, N] (or [M, K] and [K, N]), got {:?} and {:?}",
            a.shape(),
            b.shape()
        ),
    };
    if k != kb {
        bail!("matmul: inner dimensions differ: {:?} · {:?}", a.shape(), b.shape());
    }
    let shape: Vec<usize> = if two_d { vec![m, n] } else { vec![batch, m, n] };
    let c = Tensor::empty(a.gpu(), &shape, DType::F32)?;
    matmul_into(
        &c,
        View::row_major(m, n),
        a,
        View::row_major(m, k),
        b,
        View::row_major(k, n),
        MatDims { batch, m, n, k },
        None,
        1.0,
    )?;
    Ok(c)
}

/// Backward of `C = alpha * A·B` over views (as [`matmul_into`]): writes `dA = alpha * dC·B^T` into the
/// view `da.1` of `da.0` (`[batch, m, k]`) and `dB = alpha * A^T·dC` into `db.1` of `db.0` (`[batch, k, n]`),
/// whichever is asked for. The products read `A`, `B` and `dC` through transposed views, so nothing is
/// copied. Outputs are overwritten, not accumulated; a view that repeats elements (a batch stride of 0, a
/// matrix shared by every batch) would need a sum over the batch and is refused as overlapping.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward_into(
    da: Option<(&Tensor, View)>,
    db: Option<(&Tensor, View)>,
    dc: &Tensor,
    dc_view: View,
    a: &Tensor,
    a_view: View,
    b: &Tensor,
    b_view: View,
    dims: MatDims,
    alpha: f32,
) -> Result<()> {
    let MatDims { batch, m, n, k } = dims;
    if let Some((da, da_view)) = da {
        // dA[i, p] = alpha * sum_j dC[i, j] B[p, j]
        let d = MatDims { batch, m, n: k, k: n };
        matmul_into(da, da_view, dc, dc_view, b, b_view.t(), d, None, alpha)?;
    }
    if let Some((db, db_view)) = db {
        // dB[p, j] = alpha * sum_i A[i, p] dC[i, j]
        let d = MatDims { batch, m: k, n, k: m };
        matmul_into(db, db_view, a, a_view.t(), dc, dc_view, d, None, alpha)?;
    }
    Ok(())
}

/// Backward of [`matmul`]: `(dA, dB)` for `C = A·B` with `dc` shaped like C; either can be skipped.
pub fn matmul_backward(
    dc: &Tensor,
    a: &Tensor,
    b: &Tensor,
    need_da: bool,
    need_db: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (batch, m, k, n) = match (a.shape(), b.shape()) {
        ([ba, m, k], [bb, kb, n]) if ba == bb && k == kb => (*ba, *m, *k, *n),
        ([m, k], [kb, n]) if k == kb => (1, *m, *k, *n),
        _ => bail!(
            "matmul_backward: want [B, M, K] and [B, K, N] (or [M, K] and [K, N]), got {:?} and {:?}",
            a.shape(),
            b.shape()
        ),
    };
    let c_shape: Vec<usize> = if a.shape().len() == 2 {
        vec![m, n]
    } else {
        vec![batch, m, n]
    };
    if dc.shape() != c_shape {
        bail!("matmul_backward: dC must be {c_shape:?} like C, got {:?}", dc.shape());
    }
    let gpu = a.gpu();
    let da = need_da.then(|| Tensor::empty(gpu, a.shape(), DType::F32)).transpose()?;
    let db = need_db.then(|| Tensor::empty(gpu, b.shape(), DType::F32)).transpose()?;
    let (av, bv) = (View::row_major(m, k), View::row_major(k, n));
    matmul_backward_into(
        da.as_ref().map(|t| (t, av)),
        db.as_ref().map(|t| (t, bv)),
        dc,
        View::row_major(m, n),
        a,
        av,
        b,
        bv,
        MatDims { batch, m, n, k },
        1.0,
    )?;
    Ok((da, db))
}

/// Gradients of a linear layer `y = x W^T + b`.
#[derive(Debug)]
pub struct LinearGrads {
    /// `[.., in]`, shaped like x; `None` when not asked for (the layer's input needs no gradient).
    pub dx: Option<Tensor>,
    /// `[out, in]`.
    pub dw: Tensor,
    /// `[out]`.
    pub db: Tensor,
}

/// Backward of [`linear`] (and of the unfused training path): with `dy` `[.., out]`, `x` `[.., in]` (the
/// forward's input) and `w` `[out, in]`: `dx = dy·W`, `dW = dy^T·x` (summed over every row), `db` = column
/// sums of dy. Deterministic: every output element is summed in a fixed order.
pub fn linear_backward(dy: &Tensor, x: &Tensor, w: &Tensor, need_dx: bool) -> Result<LinearGrads> {
    let [d_out, d_in] = *w.shape() else {
        bail!("linear_backward: w must be [out, in], got {:?}", w.shape());
    };
    let (Some((&x_in, x_lead)), Some((&y_out, y_lead))) = (x.shape().split_last(), dy.shape().split_last()) else {
        bail!(
            "linear_backward: x and dy must be [.., in] and [.., out], got {:?} and {:?}",
            x.shape(),
            dy.shape()
        );
    };
    if x_in != d_in || y_out != d_out || x_lead != y_lead {
        bail!(
            "linear_backward: for w {:?} want x [.., {d_in}] and dy [.., {d_out}] with the same leading \
             dimensions, got x {:?} and dy {:?}",
            w.shape(),
            x.shape(),
            dy.shape()
        );
    }
    for (name, t) in [("dy", dy), ("x", x), ("w", w)] {
        if t.dtype() != DType::F32 {
            bail!("linear_backward: {name} must be f32, got {:?}", t.dtype());
        }
    }
    let rows: usize = x_lead.iter().product();
    let gpu = x.gpu();
    let dx = need_dx.then(|| Tensor::empty(gpu, x.shape(), DType::F32)).transpose()?;
    let dw = Tensor::empty(gpu, &[d_out, d_in], DType::F32)?;
    if let Some(dx) = &dx {
        // dx[r, i] = sum_o dy[r, o] w[o, i]: both read row-major.
        let dims = MatDims {
            batch: 1,
            m: rows,
            n: d_in,
            k: d_out,
        };
        let (dyv, wv) = (View::row_major(rows, d_out), View::row_major(d_out, d_in));
        matmul_into(dx, View::row_major(rows, d_in), dy, dyv, w, wv, dims, None, 1.0)?;
    }
    // dW[o, i] = sum_r dy[r, o] x[r, i]: dy read transposed, written row-major as the weight is stored.
    let dims = MatDims {
        batch: 1,
        m: d_out,
        n: d_in,
        k: rows,
    };
    let (dyt, xv) = (View::row_major(rows, d_out).t(), View::row_major(rows, d_in));
    matmul_into(&dw, View::row_major(d_out, d_in), dy, dyt, x, xv, dims, None, 1.0)?;
    let db = column_sums(&dy.reshape(&[rows, d_out])?)?;
    Ok(LinearGrads { dx, dw, db })
}

/// Sums over every leading dimension of `x` `[.., N]`, giving `[N]` (a bias gradient). Deterministic.
pub fn column_sums(x: &Tensor) -> Result<Tensor> {
    let Some(&cols) = x.shape().last() else {
        bail!("column_sums: x must have at least one dimension");
    };
    if x.dtype() != DType::F32 {
        bail!("column_sums: x must be f32, got {:?}", x.dtype());
    }
    if x.numel() > u32::MAX as usize {
        bail!("column_sums: x {:?} is beyond 32-bit indexing", x.shape());
    }
    let rows = x.numel().checked_div(cols).unwrap_or(0);
    let y = Tensor::empty(x.gpu(), &[cols], DType::F32)?;
    if cols == 0 {
        return Ok(y);
    }
    if rows == 0 {
        y.fill(0.0)?;
        return Ok(y);
    }
    x.gpu().dispatch(
        &SHADER,
        "linear_backward_bias",
        &[x.buffer(), y.buffer()],
        &[rows as u32, cols as u32],
        cols.div_ceil(CS_COLS) as u32,
    )?;
    Ok(y)
}

/// CPU references, f64 accumulation. Generic over f32 and f64 inputs (f64 for finite-difference checks).
pub mod reference {
    use super::{Activation, MatDims, View};

    fn at<T: Copy + Into<f64>>(buf: &[T], v: &View, b: usize, i: usize, j: usize) -> f64 {
        buf[v.offset + b * v.batch_stride + i * v.row_stride + j * v.col_stride].into()
    }

    /// `act(alpha * A·B + bias)` over views, returned dense as `[batch, m, n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_strided<T: Copy + Into<f64>>(
        a: &[T],
        av: View,
        b: &[T],
        bv: View,
        dims: MatDims,
        bias: Option<&[T]>,
        alpha: f32,
        act: Activation,
    ) -> Vec<f64> {
        let MatDims { batch, m, n, k } = dims;
        let mut out = Vec::with_capacity(batch * m * n);
        for bt in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let s: f64 = (0..k).map(|p| at(a, &av, bt, i, p) * at(b, &bv, bt, p, j)).sum();
                    let v = alpha as f64 * s + bias.map_or(0.0, |bb| bb[j].into());
                    out.push(match act {
                        Activation::None => v,
                        Activation::Gelu => crate::ops::elementwise::reference::gelu_f64(v),
                    });
                }
            }
        }
        out
    }

    /// Backward of `C = alpha * A·B` (no bias, no activation) with `dc` dense `[batch, m, n]`:
    /// `(dA, dB)` dense `[batch, m, k]` and `[batch, k, n]`, per position of the views.
    pub fn matmul_backward<T: Copy + Into<f64>>(
        dc: &[T],
        a: &[T],
        av: View,
        b: &[T],
        bv: View,
        dims: MatDims,
        alpha: f32,
    ) -> (Vec<f64>, Vec<f64>) {
        let MatDims { batch, m, n, k } = dims;
        let alpha = alpha as f64;
        let dcv = View::row_major(m, n);
        let mut da = vec![0f64; batch * m * k];
        let mut db = vec![0f64; batch * k * n];
        for bt in 0..batch {
            for i in 0..m {
                for p in 0..k {
                    let s: f64 = (0..n).map(|j| at(dc, &dcv, bt, i, j) * at(b, &bv, bt, p, j)).sum();
                    da[(bt * m + i) * k + p] = alpha * s;
                }
            }
            for p in 0..k {
                for j in 0..n {
                    let s: f64 = (0..m).map(|i| at(a, &av, bt, i, p) * at(dc, &dcv, bt, i, j)).sum();
                    db[(bt * k + p) * n + j] = alpha * s;
                }
            }
        }
        (da, db)
    }

    /// `x [rows, in] · w[out, in]^T + b`, dense `[rows, out]`.
    pub fn linear<T: Copy + Into<f64>>(x: &[T], w: &[T], bias: Option<&[T]>, d_in: usize, d_out: usize) -> Vec<f64> {
        let rows = x.len() / d_in;
        matmul_strided(
            x,
            View::row_major(rows, d_in),
            w,
            View::transposed(d_in, d_out),
            MatDims {
                batch: 1,
                m: rows,
                n: d_out,
                k: d_in,
            },
            bias,
            1.0,
            Activation::None,
        )
    }

    /// Backward of [`linear`]: `(dx [rows, in], dw [out, in], db [out])` for `dy` `[rows, out]`.
    pub fn linear_backward<T: Copy + Into<f64>>(
        dy: &[T],
        x: &[T],
        w: &[T],
        d_in: usize,
        d_out: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let rows = x.len() / d_in;
        let dims = MatDims {
            batch: 1,
            m: rows,
            n: d_out,
            k: d_in,
        };
        let (dx, dwt) = matmul_backward(
            dy,
            x,
            View::row_major(rows, d_in),
            w,
            View::transposed(d_in, d_out),
            dims,
            1.0,
        );
        // dB of the product is dW^T ([in, out]); the weight is stored [out, in].
        let dw = (0..d_out * d_in).map(|e| dwt[(e % d_in) * d_out + e / d_in]).collect();
        let db = (0..d_out)
            .map(|o| (0..rows).map(|r| dy[r * d_out + o].into()).sum())
            .collect();
        (dx, dw, db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, calls_per_timing, check_grad_fd, random_vec, Tol};

    /// Every subgroup workgroup shape the tests compare with the other kernels.
    const SG_TILES: [SgTile; 3] = [SgTile::WIDE, SgTile::TALL, SgTile::ONE];

    fn upload(data: &[f32]) -> Tensor {
        Tensor::from_slice(test_gpu(), data, &[data.len()]).unwrap()
    }

    /// Runs one strided matmul with `kernel` (or the chosen one) against the reference and checks that
    /// output elements outside the view are untouched.
    #[allow(clippy::too_many_arguments)]
    fn check_strided(
        name: &str,
        seed: u64,
        dims: MatDims,
        av: View,
        bv: View,
        cv: View,
        with_bias: bool,
        alpha: f32,
        act: Activation,
        kernel: Option<Kernel>,
        tol: Tol,
    ) -> Vec<f32> {
        let views = (cv, av, bv);
        check_strided_split(name, seed, dims, views, with_bias, alpha, act, kernel, 1, tol)
    }

    /// [`check_strided`] with k cut into `split` slices (split-K; 1: one pass).
    #[allow(clippy::too_many_arguments)]
    fn check_strided_split(
        name: &str,
        seed: u64,
        dims: MatDims,
        (cv, av, bv): (View, View, View),
        with_bias: bool,
        alpha: f32,
        act: Activation,
        kernel: Option<Kernel>,
        split: usize,
        tol: Tol,
    ) -> Vec<f32> {
        let MatDims { batch, m, n, k } = dims;
        let a_len = (av.last_index(batch, m, k) + 1) as usize + 3;
        let b_len = (bv.last_index(batch, k, n) + 1) as usize + 5;
        let c_len = (cv.last_index(batch, m, n) + 1) as usize + 2;
        let a = random_vec(seed, a_len, 1.0);
        let b = random_vec(seed + 1, b_len, 1.0);
        let bias = random_vec(seed + 2, n, 1.0);
        let (ta, tb, tbias) = (upload(&a), upload(&b), upload(&bias));
        let sentinel = -777.0f32;
        let tc = Tensor::empty(test_gpu(), &[c_len], DType::F32).unwrap();
        tc.fill(sentinel).unwrap();
        let kernel = kernel.unwrap_or_else(|| choose_kernel(av, bv, dims));
        let bias_t = with_bias.then_some(Bias::shared(&tbias));
        launch(
            kernel,
            split,
            &tc,
            &ta,
            &tb,
            (cv, av, bv),
            dims,
            bias_t,
            alpha,
            act,
            false,
        )
        .unwrap();
        let c = tc.to_vec().unwrap();
        let want = reference::matmul_strided(&a, av, &b, bv, dims, with_bias.then_some(&bias[..]), alpha, act);
        let mut got = Vec::with_capacity(want.len());
        let mut inside = vec![false; c_len];
        for bt in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let idx = cv.offset + bt * cv.batch_stride + i * cv.row_stride + j * cv.col_stride;
                    inside[idx] = true;
                    got.push(c[idx]);
                }
            }
        }
        assert_close(
            &format!("{name} [{kernel:?}, split {split}] {dims:?}"),
            &got,
            &want,
            tol,
        );
        for (idx, v) in c.iter().enumerate() {
            if !inside[idx] {
                assert_eq!(
                    *v, sentinel,
                    "{name}: element {idx} outside the output view was written"
                );
            }
        }
        got
    }

    #[test]
    fn hand_checked_2x3_times_3x2() {
        let gpu = test_gpu();
        let a = Tensor::from_slice(gpu, &[1., 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
        let b = Tensor::from_slice(gpu, &[7., 8., 9., 10., 11., 12.], &[3, 2]).unwrap();
        // [1 2 3; 4 5 6] · [7 8; 9 10; 11 12] = [58 64; 139 154]
        assert_eq!(matmul(&a, &b).unwrap().to_vec().unwrap(), vec![58., 64., 139., 154.]);
        // linear with w = b^T = [7 9 11; 8 10 12] and bias [1, -1].
        let w = Tensor::from_slice(gpu, &[7., 9., 11., 8., 10., 12.], &[2, 3]).unwrap();
        let bias = Tensor::from_slice(gpu, &[1., -1.], &[2]).unwrap();
        let y = linear(&a, &w, Some(&bias)).unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_eq!(y.to_vec().unwrap(), vec![59., 63., 140., 153.]);
        // k = 0: an empty sum, so C = bias.
        let empty = Tensor::zeros(gpu, &[1]).unwrap();
        let c = Tensor::zeros(gpu, &[2, 2]).unwrap();
        let dims = MatDims {
            batch: 1,
            m: 2,
            n: 2,
            k: 0,
        };
        let (av, bv) = (View::row_major(2, 0), View::row_major(0, 2));
        matmul_into(
            &c,
            View::row_major(2, 2),
            &empty,
            av,
            &empty,
            bv,
            dims,
            Some(&bias),
            1.0,
        )
        .unwrap();
        assert_eq!(c.to_vec().unwrap(), vec![1., -1., 1., -1.]);
    }

    #[test]
    fn general_path_edge_sizes_and_odd_strides() {
        // Sizes that are not multiples of the 4x4 block or the 32x32 tile, every layout transposed or padded.
        let sizes = [(1, 1, 1), (3, 49, 67), (67, 3, 130), (49, 130, 3), (130, 67, 49)];
        for (s, &(m, n, k)) in sizes.iter().enumerate() {
            let batch = 2;
            let dims = MatDims { batch, m, n, k };
            // A transposed ([k, m] storage) with a padded batch stride and an offset.
            let av = View {
                offset: 5,
                batch_stride: m * k + 7,
                row_stride: 1,
                col_stride: m,
            };
            // B row-major with padded rows.
            let bv = View {
                offset: 3,
                batch_stride: k * (n + 2) + 1,
                row_stride: n + 2,
                col_stride: 1,
            };
            // C written transposed into a wider buffer.
            let cv = View {
                offset: 2,
                batch_stride: 1,
                row_stride: batch,
                col_stride: batch * m + 1,
            };
            check_strided(
                "general",
                10 + s as u64,
                dims,
                av,
                bv,
                cv,
                s % 2 == 0,
                0.75,
                Activation::None,
                None,
                Tol::KERNEL,
            );
        }
    }

    #[test]
    fn fast_paths_match_reference_and_general_path() {
        for (s, &(m, n, k)) in [(1, 4, 4), (49, 130, 68), (67, 36, 132), (3, 4, 8), (133, 258, 52)]
            .iter()
            .enumerate()
        {
            let batch = 3;
            let dims = MatDims { batch, m, n, k };
            // nt4: A row-major with padded rows, B = weight [n, k] (B transposed), offsets multiple of 4.
            let av = View::row_major(m, k + 4).at(8);
            let av = View {
                batch_stride: m * (k + 4) + 4,
                ..av
            };
            let bv = View {
                offset: 4,
                batch_stride: n * k,
                row_stride: 1,
                col_stride: k,
            };
            assert_eq!(choose_kernel(av, bv, dims), Kernel::Nt4);
            let cv = View::row_major(m, n);
            // Same k order and fused multiply-adds in every kernel: bit-identical results.
            let [fast, general] = [None, Some(Kernel::General)].map(|kernel| {
                check_strided(
                    "nt4",
                    30 + s as u64,
                    dims,
                    av,
                    bv,
                    cv,
                    true,
                    1.0,
                    Activation::None,
                    kernel,
                    Tol::KERNEL,
                )
            });
            assert!(fast == general, "nt4 and general paths differ");
            for other in SG_TILES
                .map(Kernel::SgNt4)
                .into_iter()
                .chain([Kernel::TiledNt4, Kernel::Tiled8Nt4])
            {
                if other.needs_subgroups_of_8() && !test_gpu().subgroups_of_8() {
                    continue;
                }
                let got = check_strided(
                    "nt4",
                    30 + s as u64,
                    dims,
                    av,
                    bv,
                    cv,
                    true,
                    1.0,
                    Activation::None,
                    Some(other),
                    Tol::KERNEL,
                );
                assert!(got == general, "{other:?} and general paths differ");
            }
            // nn4: B row-major [k, n] with n % 4 == 0, A transposed (scalar loads).
            let n = n.div_ceil(4) * 4;
            let dims = MatDims { batch, m, n, k };
            let cv = View::row_major(m, n);
            let av = View::transposed(m, k);
            let bv = View::row_major(k, n + 4).at(4);
            assert_eq!(choose_kernel(av, bv, dims), Kernel::Nn4);
            let [fast, general] = [None, Some(Kernel::General)].map(|kernel| {
                check_strided(
                    "nn4",
                    40 + s as u64,
                    dims,
                    av,
                    bv,
                    cv,
                    false,
                    0.5,
                    Activation::None,
                    kernel,
                    Tol::KERNEL,
                )
            });
            assert!(fast == general, "nn4 and general paths differ");
            for other in SG_TILES
                .map(Kernel::SgNn4)
                .into_iter()
                .chain([Kernel::TiledNn4, Kernel::Tiled8Nn4])
            {
                if other.needs_subgroups_of_8() && !test_gpu().subgroups_of_8() {
                    continue;
                }
                let got = check_strided(
                    "nn4",
                    40 + s as u64,
                    dims,
                    av,
                    bv,
                    cv,
                    false,
                    0.5,
                    Activation::None,
                    Some(other),
                    Tol::KERNEL,
                );
                assert!(got == general, "{other:?} and general paths differ");
            }
        }
    }

    #[test]
    fn subgroup_workgroup_shape_follows_the_width() {
        let gpu = test_gpu();
        let head = View {
            offset: 0,
            batch_stride: 64,
            row_stride: 768,
            col_stride: 1,
        };
        let d = |n, k| MatDims {
            batch: 12,
            m: 149,
            n,
            k,
        };
        // Q K^T (n = T) and P V (n = 64) of 12 heads, and a linear layer 768 -> 3072.
        let qk = choose_kernel_for(gpu, head, head.t(), d(149, 64));
        let pv = choose_kernel_for(gpu, View::row_major(149, 149), head, d(64, 149));
        let lin = choose_kernel_for(
            gpu,
            View::row_major(149, 768),
            View::transposed(768, 3072),
            d(3072, 768),
        );
        if tiled_wanted(gpu) {
            // Q K^T and the linear are >= 64 x 64; P V has n = 64 too.
            assert_eq!((qk, pv, lin), (Kernel::TiledNt4, Kernel::TiledNn4, Kernel::TiledNt4));
            let small = choose_kernel_for(
                gpu,
                head,
                head.t(),
                MatDims {
                    m: 49,
                    n: 49,
                    ..d(49, 64)
                },
            );
            assert!(!matches!(small, Kernel::TiledNt4), "{small:?} for 49 x 49");
        } else if gpu.subgroups_of_8() {
            assert_eq!(
                (qk, pv, lin),
                (
                    Kernel::SgNt4(SgTile::ONE),
                    Kernel::SgNn4(SgTile::ONE),
                    Kernel::SgNt4(SgTile::WIDE)
                )
            );
        } else {
            assert_eq!((qk, pv, lin), (Kernel::Nt4, Kernel::Nn4, Kernel::Nt4));
        }
    }

    #[test]
    fn misaligned_views_fall_back_to_general() {
        let dims = MatDims {
            batch: 1,
            m: 5,
            n: 8,
            k: 8,
        };
        let nt = View {
            offset: 0,
            batch_stride: 0,
            row_stride: 1,
            col_stride: 8,
        };
        assert_eq!(choose_kernel(View::row_major(5, 8), nt, dims), Kernel::Nt4);
        // A misaligned by one element; B not contiguous along n either.
        assert_eq!(choose_kernel(View::row_major(5, 8).at(1), nt, dims), Kernel::General);
        let k6 = MatDims { k: 6, ..dims };
        assert_eq!(
            choose_kernel(View::row_major(5, 6), View::row_major(6, 8).at(2), k6),
            Kernel::General
        );
        check_strided(
            "misaligned",
            50,
            k6,
            View::row_major(5, 6).at(1),
            View::row_major(6, 8).at(2),
            View::row_major(5, 8),
            true,
            1.0,
            Activation::None,
            None,
            Tol::KERNEL,
        );
    }

    #[test]
    fn linear_matches_reference_at_model_like_sizes() {
        let gpu = test_gpu();
        // [T x 768] -> 768 with T = 49, and a K that is not a multiple of 4 (general path).
        for (seed, t, d_in, d_out) in [(60u64, 49usize, 768usize, 768usize), (61, 13, 67, 130)] {
            let x = random_vec(seed, t * d_in, 1.0);
            let w = random_vec(seed + 1, d_out * d_in, 0.05);
            let b = random_vec(seed + 2, d_out, 0.1);
            let y = linear(
                &Tensor::from_slice(gpu, &x, &[1, t, d_in]).unwrap(),
                &Tensor::from_slice(gpu, &w, &[d_out, d_in]).unwrap(),
                Some(&Tensor::from_slice(gpu, &b, &[d_out]).unwrap()),
            )
            .unwrap();
            assert_eq!(y.shape(), &[1, t, d_out]);
            assert_close(
                &format!("linear [{t}x{d_in}] -> {d_out}"),
                &y.to_vec().unwrap(),
                &reference::linear(&x, &w, Some(&b), d_in, d_out),
                Tol::KERNEL,
            );
        }
    }

    #[test]
    fn linear_gelu_fuses_exact_gelu() {
        let gpu = test_gpu();
        let (t, d_in, d_out) = (37, 96, 130);
        let x = random_vec(70, t * d_in, 1.0);
        let w = random_vec(71, d_out * d_in, 0.3);
        let b = random_vec(72, d_out, 0.5);
        let y = linear_gelu(
            &Tensor::from_slice(gpu, &x, &[t, d_in]).unwrap(),
            &Tensor::from_slice(gpu, &w, &[d_out, d_in]).unwrap(),
            Some(&Tensor::from_slice(gpu, &b, &[d_out]).unwrap()),
        )
        .unwrap();
        let want: Vec<f64> = reference::linear(&x, &w, Some(&b), d_in, d_out)
            .into_iter()
            .map(crate::ops::elementwise::reference::gelu_f64)
            .collect();
        assert_close("linear_gelu", &y.to_vec().unwrap(), &want, Tol::KERNEL);
    }

    #[test]
    fn batched_matmul_convenience() {
        let gpu = test_gpu();
        let (bt, m, k, n) = (2, 7, 5, 3);
        let a = random_vec(80, bt * m * k, 1.0);
        let b = random_vec(81, bt * k * n, 1.0);
        let c = matmul(
            &Tensor::from_slice(gpu, &a, &[bt, m, k]).unwrap(),
            &Tensor::from_slice(gpu, &b, &[bt, k, n]).unwrap(),
        )
        .unwrap();
        assert_eq!(c.shape(), &[bt, m, n]);
        let want = reference::matmul_strided(
            &a,
            View::row_major(m, k),
            &b,
            View::row_major(k, n),
            MatDims { batch: bt, m, n, k },
            None,
            1.0,
            Activation::None,
        );
        assert_close("matmul [2,7,5]x[2,5,3]", &c.to_vec().unwrap(), &want, Tol::KERNEL);
    }

    #[test]
    fn bad_inputs_give_clear_errors() {
        let gpu = test_gpu();
        let a = Tensor::zeros(gpu, &[4, 3]).unwrap();
        let b = Tensor::zeros(gpu, &[5, 2]).unwrap();
        let err = matmul(&a, &b).unwrap_err().to_string();
        assert!(err.contains("inner dimensions"), "{err}");
        let err = linear(&a, &b, None).unwrap_err().to_string();
        assert!(err.contains("expects"), "{err}");
        let out = Tensor::zeros(gpu, &[8]).unwrap();
        let dims = MatDims {
            batch: 1,
            m: 4,
            n: 2,
            k: 3,
        };
        // A view runs past the end of its tensor.
        let err = matmul_into(
            &out,
            View::row_major(4, 2),
            &a,
            View::row_major(4, 3).at(1),
            &b,
            View::row_major(3, 2),
            dims,
            None,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("A view") && err.contains("reaches element 12"), "{err}");
        // Output view writing one element twice.
        let err = matmul_into(
            &out,
            View {
                offset: 0,
                batch_stride: 0,
                row_stride: 1,
                col_stride: 1,
            },
            &a,
            View::row_major(4, 3),
            &b,
            View::row_major(3, 2),
            dims,
            None,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("twice"), "{err}");
        // Output aliasing an input.
        let err = matmul_into(
            &a,
            View::row_major(4, 2),
            &a,
            View::row_major(4, 3),
            &b,
            View::row_major(3, 2),
            dims,
            None,
            1.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("share a buffer"), "{err}");
    }

    /// CPU time of every thread of this process (lavapipe's workers included), from /proc.
    fn cpu_secs() -> f64 {
        let mut ns = 0u64;
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for e in dir.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                    ns += s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
                }
            }
        }
        ns as f64 * 1e-9
    }

    /// Throughput of the FFN's first linear at T = 149, per kernel (prints, never asserts; run with
    /// --ignored). Best of several rounds; CPU time (all threads, lavapipe's included) is printed too since
    /// wall time on a shared machine says little.
    #[test]
    #[ignore]
    fn bench_linear_149x768x3072() {
        let gpu = test_gpu();
        let (t, d_in, d_out) = (149, 768, 3072);
        let x = Tensor::from_slice(gpu, &random_vec(90, t * d_in, 1.0), &[t, d_in]).unwrap();
        let w = Tensor::from_slice(gpu, &random_vec(91, d_out * d_in, 0.05), &[d_out, d_in]).unwrap();
        let b = Tensor::from_slice(gpu, &random_vec(92, d_out, 0.1), &[d_out]).unwrap();
        let flop = 2.0 * (t * d_in * d_out) as f64;
        // (name, kernel, act): the weight as stored ([out, in], nt4), the same product through the general
        // path, and with fused GELU. (nn4 would need the weight transposed to [in, out].)
        let cases = [
            ("linear nt4", Kernel::Nt4, Activation::None),
            ("linear general", Kernel::General, Activation::None),
            ("linear_gelu nt4", Kernel::Nt4, Activation::Gelu),
        ];
        let run = |kernel: Kernel, act: Activation| {
            let y = Tensor::empty(gpu, &[t, d_out], DType::F32).unwrap();
            matmul_with_kernel(
                kernel,
                &y,
                View::row_major(t, d_out),
                &x,
                View::row_major(t, d_in),
                &w,
                View::transposed(d_in, d_out),
                MatDims {
                    batch: 1,
                    m: t,
                    n: d_out,
                    k: d_in,
                },
                Some(&b),
                1.0,
                act,
            )
            .unwrap();
            y
        };
        for &(_, kernel, act) in &cases {
            run(kernel, act).to_vec().unwrap(); // compiles the pipeline
        }
        let mut best = vec![(f64::MAX, f64::MAX); cases.len()];
        for _round in 0..5 {
            for (ci, &(_, kernel, act)) in cases.iter().enumerate() {
                let c0 = cpu_secs();
                let start = std::time::Instant::now();
                let _y = run(kernel, act);
                gpu.sync().unwrap();
                best[ci].0 = best[ci].0.min(start.elapsed().as_secs_f64());
                best[ci].1 = best[ci].1.min(cpu_secs() - c0);
            }
        }
        for (ci, (name, _, _)) in cases.iter().enumerate() {
            let (wall, cpu) = best[ci];
            eprintln!(
                "{name} [{t}x{d_in}] x [{d_in}->{d_out}]: {:.1} ms = {:.2} GFLOP/s wall; \
                 {:.1} ms CPU = {:.2} GFLOP per CPU-second",
                wall * 1e3,
                flop / wall / 1e9,
                cpu * 1e3,
                flop / cpu / 1e9
            );
        }
    }

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Gathers a dense `[batch, rows, cols]` from a view (a buffer-shaped gradient for the finite-difference
    /// checks, or an output read back from the GPU).
    fn gather<T: Copy>(buf: &[T], v: View, batch: usize, rows: usize, cols: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(batch * rows * cols);
        for b in 0..batch {
            for i in 0..rows {
                for j in 0..cols {
                    out.push(buf[v.offset + b * v.batch_stride + i * v.row_stride + j * v.col_stride]);
                }
            }
        }
        out
    }

    /// The inverse of [`gather`] for a non-overlapping view: a dense gradient per position placed in a
    /// buffer of `len` (elements outside the view get 0).
    fn scatter(dense: &[f64], v: View, batch: usize, rows: usize, cols: usize, len: usize) -> Vec<f64> {
        let mut out = vec![0f64; len];
        let mut e = 0;
        for b in 0..batch {
            for i in 0..rows {
                for j in 0..cols {
                    out[v.offset + b * v.batch_stride + i * v.row_stride + j * v.col_stride] = dense[e];
                    e += 1;
                }
            }
        }
        out
    }

    #[test]
    fn grad_matmul_reference_matches_finite_differences() {
        // A read transposed from an offset, B a head-like view (batch stride inside a row).
        let dims = MatDims {
            batch: 2,
            m: 3,
            n: 4,
            k: 5,
        };
        let av = View {
            offset: 2,
            batch_stride: 15,
            row_stride: 1,
            col_stride: 3,
        };
        let bv = View {
            offset: 1,
            batch_stride: 4,
            row_stride: 9,
            col_stride: 1,
        };
        let a_len = (av.last_index(2, 3, 5) + 1) as usize;
        let b_len = (bv.last_index(2, 5, 4) + 1) as usize;
        let a = to64(&random_vec(1, a_len, 1.0));
        let b = to64(&random_vec(2, b_len, 1.0));
        let g = to64(&random_vec(3, 2 * 3 * 4, 1.0));
        let alpha = 0.7;
        let (da, db) = reference::matmul_backward(&g, &a, av, &b, bv, dims, alpha);
        let fwd = |a: &[f64], b: &[f64]| {
            dot(
                &reference::matmul_strided(a, av, b, bv, dims, None, alpha, Activation::None),
                &g,
            )
        };
        check_grad_fd("matmul dA", &scatter(&da, av, 2, 3, 5, a_len), &a, |x| fwd(x, &b));
        check_grad_fd("matmul dB", &scatter(&db, bv, 2, 5, 4, b_len), &b, |x| fwd(&a, x));
    }

    #[test]
    fn grad_linear_reference_matches_finite_differences() {
        let (rows, d_in, d_out) = (4, 3, 5);
        let x = to64(&random_vec(4, rows * d_in, 1.0));
        let w = to64(&random_vec(5, d_out * d_in, 1.0));
        let bias = to64(&random_vec(6, d_out, 1.0));
        let g = to64(&random_vec(7, rows * d_out, 1.0));
        let (dx, dw, db) = reference::linear_backward(&g, &x, &w, d_in, d_out);
        let fwd = |x: &[f64], w: &[f64], b: &[f64]| dot(&reference::linear(x, w, Some(b), d_in, d_out), &g);
        check_grad_fd("linear dx", &dx, &x, |v| fwd(v, &w, &bias));
        check_grad_fd("linear dw", &dw, &w, |v| fwd(&x, v, &bias));
        check_grad_fd("linear db", &db, &bias, |v| fwd(&x, &w, v));
    }

    #[test]
    fn grad_linear_backward_hand_checked() {
        let gpu = test_gpu();
        // x = [1 2; 3 4], w = [1 0; 0 1; 1 1] (out 3, in 2), dy = [1 0 1; 0 2 0].
        let x = Tensor::from_slice(gpu, &[1., 2., 3., 4.], &[2, 2]).unwrap();
        let w = Tensor::from_slice(gpu, &[1., 0., 0., 1., 1., 1.], &[3, 2]).unwrap();
        let dy = Tensor::from_slice(gpu, &[1., 0., 1., 0., 2., 0.], &[2, 3]).unwrap();
        let g = linear_backward(&dy, &x, &w, true).unwrap();
        // dx = dy w = [2 1; 0 2]; dW = dy^T x = [1 2; 6 8; 1 2]; db = [1 2 1].
        assert_eq!(g.dx.unwrap().to_vec().unwrap(), vec![2., 1., 0., 2.]);
        assert_eq!(g.dw.to_vec().unwrap(), vec![1., 2., 6., 8., 1., 2.]);
        assert_eq!(g.db.to_vec().unwrap(), vec![1., 2., 1.]);
    }

    #[test]
    fn grad_linear_backward_matches_reference() {
        let gpu = test_gpu();
        // (leading dims, in, out): vec4 paths (in % 4 == 0), the general path (in = 7), one row, and
        // enough rows that every lane of the bias reduction sums many.
        for (seed, lead, d_in, d_out) in [
            (10u64, vec![2usize, 37], 20usize, 13usize),
            (20, vec![301], 7, 33),
            (30, vec![1], 12, 5),
            (40, vec![3, 1, 347], 36, 70),
        ] {
            let rows: usize = lead.iter().product();
            let x = random_vec(seed, rows * d_in, 1.0);
            let w = random_vec(seed + 1, d_out * d_in, 1.0);
            let dy = random_vec(seed + 2, rows * d_out, 1.0);
            let shape = |c: usize| [lead.clone(), vec![c]].concat();
            let tx = Tensor::from_slice(gpu, &x, &shape(d_in)).unwrap();
            let tw = Tensor::from_slice(gpu, &w, &[d_out, d_in]).unwrap();
            let tdy = Tensor::from_slice(gpu, &dy, &shape(d_out)).unwrap();
            let g = linear_backward(&tdy, &tx, &tw, true).unwrap();
            let (dx, dw, db) = reference::linear_backward(&dy, &x, &w, d_in, d_out);
            let name = format!("linear_backward {lead:?} x {d_in} -> {d_out}");
            let gdx = g.dx.expect("dx was asked for");
            assert_eq!(gdx.shape(), tx.shape());
            assert_close(&format!("{name} dx"), &gdx.to_vec().unwrap(), &dx, Tol::KERNEL);
            assert_close(&format!("{name} dw"), &g.dw.to_vec().unwrap(), &dw, Tol::KERNEL);
            assert_close(&format!("{name} db"), &g.db.to_vec().unwrap(), &db, Tol::KERNEL);
            // Without dx, the same parameter gradients, bit for bit.
            let g2 = linear_backward(&tdy, &tx, &tw, false).unwrap();
            assert!(g2.dx.is_none());
            assert_eq!(g2.dw.to_vec().unwrap(), g.dw.to_vec().unwrap());
            assert_eq!(g2.db.to_vec().unwrap(), g.db.to_vec().unwrap());
        }
    }

    #[test]
    fn grad_matmul_backward_matches_reference() {
        let gpu = test_gpu();
        // Dense batched (vec4 paths), attention-like head views with offsets, and odd sizes (general path).
        let dense = |r, c| View::row_major(r, c);
        let head = |offset, dh, d| View {
            offset,
            batch_stride: dh,
            row_stride: d,
            col_stride: 1,
        };
        let cases = [
            (
                MatDims {
                    batch: 3,
                    m: 33,
                    n: 36,
                    k: 20,
                },
                dense(33, 20),
                dense(20, 36),
                dense(33, 36),
            ),
            (
                MatDims {
                    batch: 5,
                    m: 37,
                    n: 8,
                    k: 37,
                },
                dense(37, 37).at(3),
                head(40, 8, 40 + 4),
                head(8, 8, 40 + 4),
            ),
            (
                MatDims {
                    batch: 2,
                    m: 7,
                    n: 5,
                    k: 9,
                },
                dense(9, 7).t(),
                dense(5, 9).t().at(1),
                dense(7, 5),
            ),
        ];
        for (ci, (dims, av, bv, cv)) in cases.into_iter().enumerate() {
            let MatDims { batch, m, n, k } = dims;
            let seed = 50 + 10 * ci as u64;
            let a = random_vec(seed, (av.last_index(batch, m, k) + 1) as usize, 1.0);
            let b = random_vec(seed + 1, (bv.last_index(batch, k, n) + 1) as usize, 1.0);
            let dc = random_vec(seed + 2, (cv.last_index(batch, m, n) + 1) as usize, 1.0);
            let dc_dense = gather(&dc, cv, batch, m, n);
            let alpha = 0.375;
            let (want_da, want_db) = reference::matmul_backward(&dc_dense, &a, av, &b, bv, dims, alpha);
            let (ta, tb, tdc) = (upload(&a), upload(&b), upload(&dc));
            // Gradients are written through the inputs' own views into buffers shaped like the inputs.
            let da = Tensor::zeros(gpu, &[a.len()]).unwrap();
            let db = Tensor::zeros(gpu, &[b.len()]).unwrap();
            matmul_backward_into(
                Some((&da, av)),
                Some((&db, bv)),
                &tdc,
                cv,
                &ta,
                av,
                &tb,
                bv,
                dims,
                alpha,
            )
            .unwrap();
            let got_da = gather(&da.to_vec().unwrap(), av, batch, m, k);
            let got_db = gather(&db.to_vec().unwrap(), bv, batch, k, n);
            assert_close(&format!("matmul_backward dA {dims:?}"), &got_da, &want_da, Tol::KERNEL);
            assert_close(&format!("matmul_backward dB {dims:?}"), &got_db, &want_db, Tol::KERNEL);
        }
        // The plain form, 2-D.
        let (a, b, dc) = (
            random_vec(90, 6 * 5, 1.0),
            random_vec(91, 5 * 3, 1.0),
            random_vec(92, 6 * 3, 1.0),
        );
        let (da, db) = matmul_backward(
            &Tensor::from_slice(gpu, &dc, &[6, 3]).unwrap(),
            &Tensor::from_slice(gpu, &a, &[6, 5]).unwrap(),
            &Tensor::from_slice(gpu, &b, &[5, 3]).unwrap(),
            true,
            true,
        )
        .unwrap();
        let dims = MatDims {
            batch: 1,
            m: 6,
            n: 3,
            k: 5,
        };
        let (want_da, want_db) = reference::matmul_backward(&dc, &a, dense(6, 5), &b, dense(5, 3), dims, 1.0);
        let (da, db) = (da.unwrap(), db.unwrap());
        assert_eq!((da.shape(), db.shape()), (&[6, 5][..], &[5, 3][..]));
        assert_close("matmul_backward 2-D dA", &da.to_vec().unwrap(), &want_da, Tol::KERNEL);
        assert_close("matmul_backward 2-D dB", &db.to_vec().unwrap(), &want_db, Tol::KERNEL);
    }

    /// f16 weights: every kernel that reads them gives the same bits, matches the f64 reference over the
    /// rounded weights at the kernel tolerance, and stays within the stated bound of the f32 layer:
    /// |y - y_f32| <= 2^-11 * sum_p |x_p w_jp| (+ f32 rounding). Sizes are not multiples of any tile.
    #[test]
    fn half_weights_match_reference_within_the_stated_bound() {
        let gpu = test_gpu();
        if !gpu.unpacks_f16() {
            eprintln!("skipped: this adapter cannot unpack f16 in shaders");
            return;
        }
        for (case, (rows, d_in, d_out, act)) in [
            (74usize, 68usize, 130usize, Activation::None),
            (9, 36, 260, Activation::Gelu),
            (70, 132, 66, Activation::None),
        ]
        .into_iter()
        .enumerate()
        {
            let xv = random_vec(500 + case as u64, rows * d_in, 1.0);
            let wv = random_vec(510 + case as u64, d_out * d_in, 1.0 / (d_in as f32).sqrt());
            let bv = random_vec(520 + case as u64, d_out, 0.5);
            let x = upload(&xv).reshape(&[rows, d_in]).unwrap();
            let w32 = upload(&wv).reshape(&[d_out, d_in]).unwrap();
            let bias = upload(&bv);
            let w = HalfWeight::from_f32(&w32, "test").unwrap();
            assert_eq!(
                (w.out_features(), w.in_features(), w.bytes()),
                (d_out, d_in, d_out * d_in * 2)
            );
            let mut kernels = vec![Kernel::Nt4F16b, Kernel::TiledNt4F16b, Kernel::Tiled8Nt4F16b];
            if gpu.subgroups_of_8() {
                kernels.extend([Kernel::SgNt4F16b(SgTile::WIDE), Kernel::SgNt4F16b(SgTile::ONE)]);
            }
            let outs: Vec<Vec<f32>> = kernels
                .iter()
                .map(|&k| linear_half_with(k, &x, &w, Some(&bias), act).unwrap().to_vec().unwrap())
                .collect();
            for (k, o) in kernels.iter().zip(&outs) {
                assert!(o == &outs[0], "case {case}: {k:?} and {:?} differ", kernels[0]);
            }
            assert!(linear_half(&x, &w, Some(&bias), act).unwrap().to_vec().unwrap() == outs[0]);
            let rounded: Vec<f32> = wv.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            let gelu = |v: f64| {
                if act == Activation::Gelu {
                    crate::ops::elementwise::reference::gelu_f64(v)
                } else {
                    v
                }
            };
            let want: Vec<f64> = reference::linear(&xv, &rounded, Some(&bv), d_in, d_out)
                .into_iter()
                .map(gelu)
                .collect();
            assert_close(&format!("f16 weights, case {case}"), &outs[0], &want, Tol::KERNEL);
            if act == Activation::None {
                let exact = reference::linear(&xv, &wv, Some(&bv), d_in, d_out);
                let mut worst = 0.0f64;
                for (i, (&got, &e)) in outs[0].iter().zip(&exact).enumerate() {
                    let (r, j) = (i / d_out, i % d_out);
                    let mass: f64 = (0..d_in)
                        .map(|p| (xv[r * d_in + p] as f64 * wv[j * d_in + p] as f64).abs())
                        .sum();
                    let bound = mass / 2048.0 + 1e-6 * (mass + 1.0);
                    worst = worst.max((got as f64 - e).abs() / bound);
                    assert!(
                        (got as f64 - e).abs() <= bound,
                        "case {case} [{r}, {j}]: {got} vs {e}, bound {bound:.3e}"
                    );
                }
                eprintln!("case {case}: worst error at {:.2} of the f16 bound", worst);
            }
        }
    }

    #[test]
    fn half_weights_refuse_what_f16_cannot_hold() {
        let gpu = test_gpu();
        if !gpu.unpacks_f16() {
            let w = Tensor::from_slice(gpu, &[0.0; 8], &[2, 4]).unwrap();
            let e = format!("{:#}", HalfWeight::from_f32(&w, "w").unwrap_err());
            assert!(e.contains("cannot unpack f16"), "{e}");
            return;
        }
        let mut wv = vec![0.5f32; 3 * 8];
        wv[13] = 1.0e5;
        let w = Tensor::from_slice(gpu, &wv, &[3, 8]).unwrap();
        let e = format!("{:#}", HalfWeight::from_f32(&w, "layers.0.fc").unwrap_err());
        assert!(
            e.contains("layers.0.fc") && e.contains("[1, 5]") && e.contains("65504"),
            "{e}"
        );
        wv[13] = f32::NAN;
        let w = Tensor::from_slice(gpu, &wv, &[3, 8]).unwrap();
        assert!(HalfWeight::from_f32(&w, "w").is_err());
        let odd = Tensor::from_slice(gpu, &[0.0; 6], &[2, 3]).unwrap();
        assert!(format!("{:#}", HalfWeight::from_f32(&odd, "w").unwrap_err()).contains("in % 4 == 0"));
        // A mismatched input is refused.
        let w = HalfWeight::from_f32(&Tensor::from_slice(gpu, &[0.0; 8], &[2, 4]).unwrap(), "w").unwrap();
        let x = Tensor::from_slice(gpu, &[0.0; 8], &[1, 8]).unwrap();
        assert!(linear_half(&x, &w, None, Activation::None).is_err());
    }

    #[test]
    fn split_k_matches_reference_on_every_kernel() {
        // m and n not multiples of any tile; k = 96 splits into 2, 3, 4 or 6 aligned slices (and 8: 12 each).
        let (m, n, k) = (70, 100, 96);
        let dims = MatDims { batch: 1, m, n, k };
        // C written through a strided view (padded rows), so the second pass's indexing is checked too.
        let cv = View::row_major(m, n + 3).at(5);
        let nt = (View::row_major(m, k), View::transposed(k, n));
        let nn = (View::row_major(m, k + 4).at(4), View::row_major(k, n));
        let mut cases = vec![
            (Kernel::Nt4, nt),
            (Kernel::TiledNt4, nt),
            (Kernel::Nn4, nn),
            (Kernel::TiledNn4, nn),
            (Kernel::Tiled8Nt4, nt),
            (Kernel::Tiled8Nn4, nn),
        ];
        if test_gpu().subgroups_of_8() {
            cases.push((Kernel::SgNt4(SgTile::WIDE), nt));
            cases.push((Kernel::SgNn4(SgTile::ONE), nn));
        }
        for (kernel, (av, bv)) in cases {
            for (i, split) in [2, 3, 4, 6, 8].into_iter().enumerate() {
                let act = if i % 2 == 0 { Activation::Gelu } else { Activation::None };
                let run = || {
                    let views = (cv, av, bv);
                    check_strided_split(
                        "split-K",
                        70,
                        dims,
                        views,
                        i % 3 != 0,
                        0.75,
                        act,
                        Some(kernel),
                        split,
                        Tol::KERNEL,
                    )
                };
                let first = run();
                assert!(run() == first, "split-K {kernel:?}/{split} is not deterministic");
            }
        }
        // k that the slices do not divide: a shorter last slice (97 = 36 + 36 + 25, = 6 * 16 + 1; 96 = 4 * 20 + 16).
        let odd = MatDims { k: 97, ..dims };
        let nn_odd = (View::row_major(m, 97), View::row_major(97, n));
        for (kernel, split, dims, (av, bv)) in [
            (Kernel::TiledNn4, 3, odd, nn_odd),
            (Kernel::General, 7, odd, nn_odd),
            (Kernel::TiledNt4, 5, dims, nt),
        ] {
            let views = (cv, av, bv);
            check_strided_split(
                "split-K",
                71,
                dims,
                views,
                true,
                1.0,
                Activation::None,
                Some(kernel),
                split,
                Tol::KERNEL,
            );
        }
        // More slices than k has vec4 is refused with a clear error.
        let (a, b) = (upload(&[0.0; 70 * 96]), upload(&[0.0; 96 * 100]));
        let c = Tensor::empty(test_gpu(), &[70 * 100], DType::F32).unwrap();
        let views = (View::row_major(m, n), nt.0, nt.1);
        let small = MatDims { k: 8, ..dims };
        let err = launch(
            Kernel::Nt4,
            3,
            &c,
            &a,
            &b,
            views,
            small,
            None,
            1.0,
            Activation::None,
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("slices of whole vec4"), "{err}");
    }

    #[test]
    fn split_k_partial_sums_stay_within_one_binding() {
        let d = |m, k, n| MatDims { batch: 1, m, n, k };
        let mib = 1u64 << 20;
        // A minute of audio through wav2vec2-base's FFN (2999 x 768 -> 3072): 4 slices of 36 MiB each.
        let ffn = d(2999, 768, 3072);
        let slice = 2999 * 3072 * 4;
        assert_eq!(split_k_count(ffn, None), 4);
        assert_eq!(split_k_within(4, ffn, 4096 * mib), 4);
        assert_eq!(split_k_within(4, ffn, 128 * mib), 3); // lavapipe's binding: 3 x 36 MiB
        assert_eq!(split_k_within(4, ffn, 2 * slice), 2);
        assert_eq!(split_k_within(4, ffn, 2 * slice - 1), 1);
        assert_eq!(split_k_within(4, ffn, 1), 1);
        // Fewer slices must still cut k into whole vec4: k = 20 cuts into 5 or 3 slices, not 4.
        let small = d(10, 20, 10);
        assert!(split_k_fits(20, 5) && !split_k_fits(20, 4) && split_k_fits(20, 3));
        assert_eq!(split_k_within(5, small, 4 * 10 * 10 * 4), 3);
        for max in [0, 1, 1 << 40] {
            for s in 1..=8 {
                let got = split_k_within(s, ffn, max);
                assert!(
                    got >= 1 && got <= s && (got == 1 || split_k_fits(ffn.k, got)),
                    "{s} {max} -> {got}"
                );
                assert!(got == 1 || got as u64 * slice <= max, "{s} {max} -> {got}");
            }
        }
    }

    #[test]
    fn split_k_rule_depends_on_k_alone() {
        let d = |m, n, k| MatDims { batch: 1, m, n, k };
        let rule = |dims| split_k_count(dims, None);
        // As many slices of >= 192 steps as k holds, up to 8 (the last may be shorter).
        assert_eq!(rule(d(499, 768, 768)), 4);
        assert_eq!(rule(d(499, 768, 3072)), 8);
        assert_eq!(rule(d(15999, 512, 1536)), 8);
        assert_eq!(rule(d(499, 768, 512)), 2);
        assert_eq!(rule(d(512, 1536, 3199)), 8); // a conv's weight gradient: k = frames
        assert_eq!(rule(d(499, 768, 383 * 4)), 7); // 1532 / 192
        assert_eq!(rule(d(499, 768, 380)), 1); // too shallow to split

        // Rows, columns and batch items never change it (row chunks of a long input give the same bits).
        for m in [1, 7, 63, 64, 499, 100_000] {
            assert_eq!(rule(d(m, 3072, 768)), 4);
            assert_eq!(rule(d(m, 4, 768)), 4);
            for batch in [2, 12, 16] {
                assert_eq!(
                    rule(MatDims {
                        batch,
                        ..d(m, 48, 6144)
                    }),
                    8
                ); // the positional conv's groups
                assert_eq!(rule(MatDims { batch, ..d(m, 64, 499) }), 2); // P V of 12 heads at T = 499
            }
        }
        // The batched partial sums count against the binding as well.
        let heads = MatDims {
            batch: 12,
            ..d(499, 64, 499)
        };
        assert_eq!(split_k_within(2, heads, 2 * 12 * 499 * 64 * 4), 2);
        assert_eq!(split_k_within(2, heads, 2 * 12 * 499 * 64 * 4 - 1), 1);
        // The override: exactly N where it fits, else one pass.
        assert_eq!(split_k_count(d(499, 3072, 768), Some(4)), 4);
        assert_eq!(split_k_count(d(499, 768, 768), Some(5)), 5);
        assert_eq!(split_k_count(d(499, 768, 8), Some(3)), 1);
        assert_eq!(split_k_count(d(499, 768, 768), Some(1)), 1);
        // Adapters without the tiled kernels (lavapipe) never split.
        if !tiled_wanted(test_gpu()) {
            assert_eq!(split_k_for(test_gpu(), d(499, 768, 768)), 1);
        }
    }

    #[test]
    fn accumulate_adds_to_the_output() {
        let dims = MatDims {
            batch: 2,
            m: 9,
            n: 12,
            k: 8,
        };
        let (a, b, c0) = (
            random_vec(60, 2 * 9 * 8, 1.0),
            random_vec(61, 2 * 8 * 12, 1.0),
            random_vec(62, 2 * 9 * 12, 1.0),
        );
        let c = upload(&c0);
        let (av, bv, cv) = (View::row_major(9, 8), View::row_major(8, 12), View::row_major(9, 12));
        matmul_accumulate_into(&c, cv, &upload(&a), av, &upload(&b), bv, dims, 0.5).unwrap();
        let prod = reference::matmul_strided(&a, av, &b, bv, dims, None, 0.5, Activation::None);
        let want: Vec<f64> = prod.iter().zip(&c0).map(|(p, c)| p + *c as f64).collect();
        assert_close("matmul accumulate", &c.to_vec().unwrap(), &want, Tol::KERNEL);
    }

    /// A bias with a batch stride (each item its own slice: a grouped convolution batched over its groups)
    /// on every kernel this adapter runs, both layouts, with GELU, against the f64 reference item by item; and
    /// a bias too short for its stride is refused.
    #[test]
    fn per_item_bias_matches_reference() {
        let gpu = test_gpu();
        let (batch, m, n, k) = (3, 67, 36, 132);
        let dims = MatDims { batch, m, n, k };
        let stride = n + 5; // gaps between the items' slices must never be read
        let a = random_vec(70, batch * m * k, 1.0);
        let b = random_vec(71, batch * k * n, 1.0);
        let bias = random_vec(72, (batch - 1) * stride + n, 1.0);
        let (ta, tb, tbias) = (upload(&a), upload(&b), upload(&bias));
        let av = View::row_major(m, k);
        let nt = View {
            batch_stride: n * k,
            ..View::transposed(k, n)
        };
        let nn = View::row_major(k, n);
        assert_eq!(
            (choose_kernel(av, nt, dims), choose_kernel(av, nn, dims)),
            (Kernel::Nt4, Kernel::Nn4)
        );
        let sg = |f: fn(SgTile) -> Kernel| SG_TILES.map(f).into_iter().filter(|_| gpu.subgroups_of_8());
        let nt_kernels = [Kernel::Nt4, Kernel::TiledNt4, Kernel::Tiled8Nt4]
            .into_iter()
            .chain(sg(Kernel::SgNt4));
        let nn_kernels = [Kernel::Nn4, Kernel::TiledNn4, Kernel::Tiled8Nn4]
            .into_iter()
            .chain(sg(Kernel::SgNn4));
        let runs = nt_kernels
            .map(|kern| (kern, nt))
            .chain(nn_kernels.map(|kern| (kern, nn)))
            .chain([(Kernel::General, nt), (Kernel::General, nn)]);
        let per_item = Bias {
            tensor: &tbias,
            batch_stride: stride,
        };
        // Unsplit, and split-K with the slices an outer batch, into a contiguous C (k = 132: 68 + 64; 4 x 28 + 20,
        // a shorter last slice) and into C laid out as a grouped convolution's output, the items side by side in
        // each row (3 x 44, no shorter slice; 4 x 36 + 24). Split runs also add to what C holds (accumulate).
        let prev = random_vec(73, batch * m * n, 1.0);
        let contiguous = View::row_major(m, n);
        let side_by_side = View {
            offset: 0,
            batch_stride: n,
            row_stride: batch * n,
            col_stride: 1,
        };
        let layouts = [(contiguous, [1, 2, 5]), (side_by_side, [1, 3, 4])];
        for (kernel, bv) in runs {
            for (cv, splits) in layouts {
                for split in splits {
                    let accumulate = split > 2;
                    let act = if accumulate { Activation::None } else { Activation::Gelu };
                    let c = upload(&prev);
                    let views = (cv, av, bv);
                    launch(
                        kernel,
                        split,
                        &c,
                        &ta,
                        &tb,
                        views,
                        dims,
                        Some(per_item),
                        1.0,
                        act,
                        accumulate,
                    )
                    .unwrap();
                    let mut want: Vec<f64> = prev.iter().map(|&p| if accumulate { p as f64 } else { 0.0 }).collect();
                    for i in 0..batch {
                        let item = |v: View| View {
                            offset: v.offset + i * v.batch_stride,
                            ..v
                        };
                        let one = MatDims { batch: 1, ..dims };
                        let slice = &bias[i * stride..i * stride + n];
                        let got = reference::matmul_strided(&a, item(av), &b, item(bv), one, Some(slice), 1.0, act);
                        for (e, w) in got.into_iter().enumerate() {
                            want[i * cv.batch_stride + (e / n) * cv.row_stride + e % n] += w;
                        }
                    }
                    assert_close(
                        &format!("per-item bias {kernel:?}, split {split}, C {cv:?}"),
                        &c.to_vec().unwrap(),
                        &want,
                        Tol::KERNEL,
                    );
                }
            }
        }
        let short = upload(&bias[..(batch - 1) * stride + n - 1]);
        let c = Tensor::empty(gpu, &[batch * m * n], DType::F32).unwrap();
        let views = (View::row_major(m, n), av, nn);
        let too_short = Bias {
            tensor: &short,
            batch_stride: stride,
        };
        let e = launch(
            Kernel::Nn4,
            1,
            &c,
            &ta,
            &tb,
            views,
            dims,
            Some(too_short),
            1.0,
            Activation::None,
            false,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("batch stride 41 over 3 items"), "{e:#}");
    }

    #[test]
    fn linear_backward_shape_errors() {
        let gpu = test_gpu();
        let x = Tensor::zeros(gpu, &[4, 3]).unwrap();
        let w = Tensor::zeros(gpu, &[2, 3]).unwrap();
        let dy = Tensor::zeros(gpu, &[4, 2]).unwrap();
        assert!(linear_backward(&dy, &x, &w, true).is_ok());
        let bad_dy = Tensor::zeros(gpu, &[5, 2]).unwrap();
        let err = linear_backward(&bad_dy, &x, &w, true).unwrap_err().to_string();
        assert!(err.contains("same leading"), "{err}");
        let err = linear_backward(&dy, &x, &x, true).unwrap_err().to_string();
        assert!(err.contains("want x [.., 3] and dy [.., 4]"), "{err}");
        let err = matmul_backward(&dy, &x, &w, true, true).unwrap_err().to_string();
        assert!(err.contains("want [B, M, K]"), "{err}");
    }

    /// Every kernel that can run each model-shaped product, timed interleaved in one process (A, B, A, B..,
    /// best of N, since the machine is shared): prints GFLOP/s per kernel and the ratio to the chosen one.
    /// Run with --ignored --nocapture.
    #[test]
    #[ignore]
    fn bench_kernels_model_shapes() {
        let gpu = test_gpu();
        let rm = View::row_major;
        let d = |batch, m, n, k| MatDims { batch, m, n, k };
        // Per-head views of a [T, 768] buffer with 12 heads of 64.
        let head = View {
            offset: 0,
            batch_stride: 64,
            row_stride: 768,
            col_stride: 1,
        };
        // The linear layers x W^T (rows, in, out) of the teacher (T = 49, 149, 499) and the student (2 x 99).
        let linears = [
            (149, 768, 3072),
            (149, 3072, 768),
            (49, 768, 768),
            (499, 768, 768),
            (499, 768, 3072),
            (499, 3072, 768),
            (198, 768, 768),
        ];
        let mut cases: Vec<(String, MatDims, View, View)> = linears
            .into_iter()
            .map(|(m, i, o)| {
                (
                    format!("linear {m}x{i}->{o}"),
                    d(1, m, o, i),
                    rm(m, i),
                    View::transposed(i, o),
                )
            })
            .collect();
        // A linear's backward: dx = dy W (nn) and dW = dy^T x (tn).
        cases.push((
            "dx 298x3072->768 (nn)".into(),
            d(1, 298, 768, 3072),
            rm(298, 3072),
            rm(3072, 768),
        ));
        cases.push((
            "dW 3072x768 k=298 (tn)".into(),
            d(1, 3072, 768, 298),
            rm(298, 3072).t(),
            rm(298, 768),
        ));
        // The feature encoder's 512-channel convolutions (kernel 3, stride 2) as strided matmuls, as
        // conv1d's matmul route runs them: rows are receptive fields of the channels-last input.
        for t_out in [15999, 3999] {
            let windows = View {
                offset: 0,
                batch_stride: 0,
                row_stride: 2 * 512,
                col_stride: 1,
            };
            let weight = View {
                batch_stride: 0,
                ..rm(1536, 512)
            };
            cases.push((
                format!("conv {t_out}x1536->512 (nn)"),
                d(1, t_out, 512, 1536),
                windows,
                weight,
            ));
        }
        // Attention per batch item: the teacher's utterances (T = 49, 149, 499) and the student's 2 s crops
        // (T = 99), whose training also runs the backward products (dO V^T has the shape of Q K^T).
        for t in [49, 99, 149, 499] {
            cases.push((format!("QK^T 12x{t}x{t}x64"), d(12, t, t, 64), head, head.t()));
            cases.push((format!("PV 12x{t}x64x{t}"), d(12, t, 64, t), rm(t, t), head));
        }
        let t = 99;
        cases.push((
            format!("dV = P^T dO 12x{t}x64x{t} (tn)"),
            d(12, t, 64, t),
            rm(t, t).t(),
            head,
        ));
        // BENCH_ONLY=<part of a case name> picks cases; BENCH_ROUNDS the rounds (default 5); BENCH_MIN_GFLOP
        // the work per timing (default 0.2; a fast GPU needs ~20 for the submission's latency not to count).
        let only = std::env::var("BENCH_ONLY").ok();
        let rounds: usize = std::env::var("BENCH_ROUNDS").map_or(5, |r| r.parse().unwrap());
        for (name, dims, av, bv) in cases {
            if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                continue;
            }
            let MatDims { batch, m, n, k } = dims;
            let a = upload(&random_vec(1, (av.last_index(batch, m, k) + 1) as usize, 1.0));
            let b = upload(&random_vec(2, (bv.last_index(batch, k, n) + 1) as usize, 1.0));
            let c = Tensor::empty(gpu, &[batch * m * n], DType::F32).unwrap();
            let cv = View::row_major(m, n);
            let chosen = choose_kernel(av, bv, dims);
            let sg_tiles = [
                SgTile::WIDE,
                SgTile::TALL,
                SgTile { rows: 2, cols: 2 },
                SgTile { rows: 2, cols: 1 },
                SgTile::ONE,
            ];
            // (kernel, split-K slices)
            let mut kernels = vec![(chosen, 1)];
            let tiled = chosen.tiled();
            for tiled in [tiled, tiled.map(Kernel::with_large_tiles)].into_iter().flatten() {
                kernels.push((tiled, 1));
                // Every count that cuts k into vec4 slices whose partial sums fit one binding (batched
                // products too: the attention's P V at T = 499 has 96 tiles of 64 x 64 for a whole GPU).
                let max_binding = gpu.max_binding_bytes();
                let splits = [2, 3, 4, 6, 8]
                    .into_iter()
                    .filter(|&s| split_k_within(s, dims, max_binding) == s);
                kernels.extend(splits.map(|s| (tiled, s)));
            }
            if gpu.subgroups_of_8() {
                match chosen {
                    Kernel::Nt4 => kernels.extend(sg_tiles.map(|t| (Kernel::SgNt4(t), 1))),
                    Kernel::Nn4 => kernels.extend(sg_tiles.map(|t| (Kernel::SgNn4(t), 1))),
                    _ => {}
                }
            }
            let picked = choose_kernel_for(gpu, av, bv, dims);
            let picked = (picked, split_k_for(gpu, dims));
            let flop = 2.0 * (batch * m * n * k) as f64;
            let reps = calls_per_timing(flop);
            let run = |(kern, split): (Kernel, usize)| {
                for _ in 0..reps {
                    let views = (cv, av, bv);
                    launch(kern, split, &c, &a, &b, views, dims, None, 1.0, Activation::None, false).unwrap();
                }
                gpu.sync().unwrap();
            };
            for &kern in &kernels {
                run(kern); // compiles the pipeline
            }
            let mut best = vec![f64::MAX; kernels.len()];
            for _ in 0..rounds {
                for (i, &kern) in kernels.iter().enumerate() {
                    let start = std::time::Instant::now();
                    run(kern);
                    best[i] = best[i].min(start.elapsed().as_secs_f64());
                }
            }
            let flop = flop * reps as f64;
            let line: Vec<String> = kernels
                .iter()
                .zip(&best)
                .map(|((kern, split), t)| {
                    let split = if *split > 1 {
                        format!("/split{split}")
                    } else {
                        String::new()
                    };
                    format!("{kern:?}{split} {:.2} GFLOP/s ({:.2}x)", flop / t / 1e9, best[0] / t)
                })
                .collect();
            eprintln!("{name} (picked {picked:?}, {reps} per timing): {}", line.join(", "));
            // The linear layers again with the weight in f16 (the kernel linear_half picks), against the
            // f32 kernel picked above.
            if name.starts_with("linear") && gpu.unpacks_f16() {
                let x = a.reshape(&[m, k]).unwrap();
                let w = HalfWeight::from_f32(&b.reshape(&[n, k]).unwrap(), "bench").unwrap();
                let half = choose_half_kernel(gpu, &w, dims).unwrap();
                let f16_run = || {
                    for _ in 0..reps {
                        linear_half_split(half, picked.1, &x, &w, None, Activation::None).unwrap();
                    }
                    gpu.sync().unwrap();
                };
                let once = |f: &dyn Fn()| {
                    let start = std::time::Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                };
                // Compile the pipeline, then time interleaved, as above: the machine's drift hits both alike.
                f16_run();
                let (mut f32_time, mut f16_time) = (f64::MAX, f64::MAX);
                for _ in 0..rounds {
                    f32_time = f32_time.min(once(&|| run(picked)));
                    f16_time = f16_time.min(once(&f16_run));
                }
                eprintln!(
                    "{name} with f16 weights: {half:?} {:.2} GFLOP/s, {:.2}x the f32 {picked:?}",
                    flop / f16_time / 1e9,
                    f32_time / f16_time
                );
            }
        }
    }

    /// linear_backward for the FFN's first linear with B = 2, T = 149 (prints, never asserts; --ignored).
    #[test]
    #[ignore]
    fn bench_linear_backward_298x768x3072() {
        let gpu = test_gpu();
        let (rows, d_in, d_out) = (2 * 149, 768, 3072);
        let x = Tensor::from_slice(gpu, &random_vec(93, rows * d_in, 1.0), &[2, 149, d_in]).unwrap();
        let w = Tensor::from_slice(gpu, &random_vec(94, d_out * d_in, 0.05), &[d_out, d_in]).unwrap();
        let dy = Tensor::from_slice(gpu, &random_vec(95, rows * d_out, 1.0), &[2, 149, d_out]).unwrap();
        let run = |need_dx| {
            let g = linear_backward(&dy, &x, &w, need_dx).unwrap();
            gpu.sync().unwrap();
            g
        };
        run(true); // compiles the pipelines
        let flop = 2.0 * (rows * d_in * d_out) as f64;
        for (name, need_dx, products) in [("dx + dW + db", true, 2.0), ("dW + db", false, 1.0)] {
            let mut best = (f64::MAX, f64::MAX);
            for _ in 0..3 {
                let c0 = cpu_secs();
                let start = std::time::Instant::now();
                run(need_dx);
                best.0 = best.0.min(start.elapsed().as_secs_f64());
                best.1 = best.1.min(cpu_secs() - c0);
            }
            eprintln!(
                "linear_backward {name} [{rows}x{d_in}] -> {d_out}: {:.1} ms = {:.2} GFLOP/s wall; {:.1} ms CPU",
                best.0 * 1e3,
                products * flop / best.0 / 1e9,
                best.1 * 1e3
            );
        }
    }
}
