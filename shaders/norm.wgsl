// Normalisations over channels-last activations.
// LayerNorm: x (R, C), normalised over C per row. GroupNorm(C groups) over time: x (B, T, C), normalised
// per (b, c) over the T frames, built from moments_partial -> moments_combine -> moments_finalize ->
// normalize_channels.
// Grids are 1-D, folded into 2-D when larger than 65535 workgroups: the linear workgroup id is
// wg.x + wg.y * num_wg.x.
//
// Accuracy: every mean is taken of values shifted by a sample of the same row / channel (x - x[first]),
// which is exact in f32 when the two are within a factor of 2 (Sterbenz) and leaves O(std) numbers to sum,
// so a large common offset (mean 100, std 1) costs no precision. Variances are then centred second passes,
// never E[x^2] - E[x]^2.

// erfc_approx and gelu_exact: shaders/common.wgsl.

// ---------------------------------------------------------------------------------------------------------
// LayerNorm: one workgroup per row. Three passes over the row (sum of shifted values, centred sum of squares,
// output); the row is re-read from memory each time, where it sits in cache (C <= a few thousand). With
// `residual`, the row normalised is ln_x + ln_r (a post-LN transformer's LN(h + sublayer(h)) in one kernel),
// summed in f32 exactly as the add kernel sums it, so the output has the same bits as add then LayerNorm. The
// first pass keeps the sum in ln_y (each invocation re-reads only what it wrote), so the other two passes
// load one value per element, not two.

const LN_WG: u32 = 64u;

struct LnParams {
    rows: u32,
    c: u32,
    eps: f32,
    gelu: u32,
    residual: u32,
}

@group(0) @binding(0) var<uniform> ln_p: LnParams;
@group(0) @binding(1) var<storage, read> ln_x: array<f32>;        // (R, C)
@group(0) @binding(2) var<storage, read> ln_gamma: array<f32>;    // (C)
@group(0) @binding(3) var<storage, read> ln_beta: array<f32>;     // (C)
@group(0) @binding(4) var<storage, read_write> ln_y: array<f32>;  // (R, C)
@group(0) @binding(5) var<storage, read> ln_r: array<f32>;        // (R, C), read only with `residual`

var<workgroup> ln_red: array<f32, LN_WG>;

// Sum of `v` over the workgroup (tree reduction); every invocation gets the total.
fn ln_workgroup_sum(v: f32, li: u32) -> f32 {
    ln_red[li] = v;
    workgroupBarrier();
    for (var s = LN_WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            ln_red[li] += ln_red[li + s];
        }
        workgroupBarrier();
    }
    let total = ln_red[0];
    workgroupBarrier(); // ln_red is reused by the next reduction
    return total;
}

// Element i of the rows normalised, after the first pass: x, or the sum x + r that pass left in ln_y.
fn ln_in(i: u32) -> f32 {
    if (ln_p.residual != 0u) {
        return ln_y[i];
    }
    return ln_x[i];
}

// Normalises one row into ln_y and returns its (mean, rstd). Uniform control flow: called by the whole
// workgroup.
fn layer_norm_row(row: u32, li: u32) -> vec2<f32> {
    let c = ln_p.c;
    let base = row * c;
    let residual = ln_p.residual != 0u;
    var shift = ln_x[base];
    if (residual) {
        shift += ln_r[base];
    }
    var s = 0.0;
    for (var i = li; i < c; i += LN_WG) {
        var v = ln_x[base + i];
        if (residual) {
            v += ln_r[base + i];
            ln_y[base + i] = v;
        }
        s += v - shift;
    }
    // mean = shift + d, kept split so that x - mean = (x - shift) - d loses nothing to the offset.
    let d = ln_workgroup_sum(s, li) / f32(c);
    var q = 0.0;
    for (var i = li; i < c; i += LN_WG) {
        let v = (ln_in(base + i) - shift) - d;
        q += v * v;
    }
    let rstd = 1.0 / sqrt(ln_workgroup_sum(q, li) / f32(c) + ln_p.eps);
    for (var i = li; i < c; i += LN_WG) {
        var v = ((ln_in(base + i) - shift) - d) * rstd * ln_gamma[i] + ln_beta[i];
        if (ln_p.gelu != 0u) {
            v = gelu_exact(v);
        }
        ln_y[base + i] = v;
    }
    return vec2<f32>(shift + d, rstd);
}

@compute @workgroup_size(64)
fn layer_norm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= ln_p.rows) {
        return; // uniform across the workgroup
    }
    layer_norm_row(row, li);
}

// The training forward also saves each row's (mean, rstd) for layer_norm_backward (gelu and residual 0).
@group(0) @binding(6) var<storage, read_write> ln_stats: array<f32>;  // (R, 2): mean, rstd

@compute @workgroup_size(64)
fn layer_norm_train_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= ln_p.rows) {
        return; // uniform across the workgroup
    }
    let stats = layer_norm_row(row, li);
    if (li == 0u) {
        ln_stats[2u * row] = stats.x;
        ln_stats[2u * row + 1u] = stats.y;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Per-channel moments over time. Partial pass: one invocation per (b, chunk of CH frames, channel), adjacent
// invocations on adjacent channels. It stores the chunk's mean of (x - x[b, 0, c]) and its centred sum of
// squares (two passes over the chunk, which stays in cache).

struct MomParams {
    batch: u32,
    t: u32,
    c: u32,
    chunk: u32,     // CH, frames per partial
    n_chunks: u32,  // ceil(T / CH)
    n_wg_c: u32,    // workgroups along the channels: ceil(C / 64)
}

@group(0) @binding(0) var<uniform> mp_p: MomParams;
@group(0) @binding(1) var<storage, read> mp_x: array<f32>;            // (B, T, C)
@group(0) @binding(2) var<storage, read_write> mp_part: array<f32>;   // (B, n_chunks, 2, C): shifted mean, M2

@compute @workgroup_size(64)
fn moments_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let wid = wg.x + wg.y * nwg.x;
    let c = (wid % mp_p.n_wg_c) * 64u + li;
    let r = wid / mp_p.n_wg_c;
    let chunk = r % mp_p.n_chunks;
    let b = r / mp_p.n_chunks;
    if (c >= mp_p.c || b >= mp_p.batch) {
        return;
    }
    let shift = mp_x[b * mp_p.t * mp_p.c + c];
    let t0 = chunk * mp_p.chunk;
    let t1 = min(mp_p.t, t0 + mp_p.chunk);
    var s = 0.0;
    for (var t = t0; t < t1; t++) {
        s += mp_x[(b * mp_p.t + t) * mp_p.c + c] - shift;
    }
    let d = s / f32(t1 - t0);
    var q = 0.0;
    for (var t = t0; t < t1; t++) {
        let v = (mp_x[(b * mp_p.t + t) * mp_p.c + c] - shift) - d;
        q += v * v;
    }
    let o = (b * mp_p.n_chunks + chunk) * 2u * mp_p.c + c;
    mp_part[o] = d;
    mp_part[o + mp_p.c] = q;
}

// Combine pass: one invocation per (b, c) folds the chunk partials with the exact parallel formula
// (Chan et al.): mean offset dbar = sum(n_i d_i) / N, M2 = sum(M2_i + n_i (d_i - dbar)^2), in two passes
// over the partials so that nothing is updated incrementally around a large mean.

@group(0) @binding(0) var<uniform> mc_p: MomParams;
@group(0) @binding(1) var<storage, read> mc_x: array<f32>;              // (B, T, C): for the shift only
@group(0) @binding(2) var<storage, read> mc_part: array<f32>;           // (B, n_chunks, 2, C)
@group(0) @binding(3) var<storage, read_write> mc_out: array<f32>;      // (B, 2, C): mean, M2

@compute @workgroup_size(64)
fn moments_combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + li;
    if (i >= mc_p.batch * mc_p.c) {
        return;
    }
    let b = i / mc_p.c;
    let c = i % mc_p.c;
    let shift = mc_x[b * mc_p.t * mc_p.c + c];
    let stride = 2u * mc_p.c;
    let first = b * mc_p.n_chunks * stride + c;
    let last_n = f32(mc_p.t - (mc_p.n_chunks - 1u) * mc_p.chunk);
    let full_n = f32(mc_p.chunk);
    var s = 0.0;
    for (var k = 0u; k < mc_p.n_chunks; k++) {
        let n = select(full_n, last_n, k + 1u == mc_p.n_chunks);
        s += n * mc_part[first + k * stride];
    }
    let dbar = s / f32(mc_p.t);
    var m2 = 0.0;
    for (var k = 0u; k < mc_p.n_chunks; k++) {
        let n = select(full_n, last_n, k + 1u == mc_p.n_chunks);
        let dd = mc_part[first + k * stride] - dbar;
        m2 += mc_part[first + k * stride + mc_p.c] + n * dd * dd;
    }
    let o = b * 2u * mc_p.c + c;
    mc_out[o] = shift + dbar;
    mc_out[o + mc_p.c] = m2;
}

// ---------------------------------------------------------------------------------------------------------
// (mean, M2) over `count` frames -> (mean, 1 / sqrt(M2 / count + eps)), biased variance as torch.

struct FinParams {
    n: u32,       // B * C
    c: u32,
    count: f32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> mf_p: FinParams;
@group(0) @binding(1) var<storage, read> mf_m: array<f32>;              // (B, 2, C): mean, M2
@group(0) @binding(2) var<storage, read_write> mf_out: array<f32>;      // (B, 2, C): mean, rstd

@compute @workgroup_size(64)
fn moments_finalize(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + li;
    if (i >= mf_p.n) {
        return;
    }
    let o = (i / mf_p.c) * 2u * mf_p.c + i % mf_p.c;
    mf_out[o] = mf_m[o];
    mf_out[o + mf_p.c] = 1.0 / sqrt(mf_m[o + mf_p.c] / mf_p.count + mf_p.eps);
}

// ---------------------------------------------------------------------------------------------------------
// y = (x - mean[b, c]) * rstd[b, c] * gamma[c] + beta[c], then optionally exact GELU. One invocation per element.

struct NcParams {
    n: u32,  // B * T * C
    t: u32,
    c: u32,
    gelu: u32,
}

@group(0) @binding(0) var<uniform> nc_p: NcParams;
@group(0) @binding(1) var<storage, read> nc_x: array<f32>;         // (B, T, C)
@group(0) @binding(2) var<storage, read> nc_mr: array<f32>;        // (B, 2, C): mean, rstd
@group(0) @binding(3) var<storage, read> nc_gamma: array<f32>;     // (C)
@group(0) @binding(4) var<storage, read> nc_beta: array<f32>;      // (C)
@group(0) @binding(5) var<storage, read_write> nc_y: array<f32>;   // (B, T, C)
// The same bindings as vec4, for normalize_channels_forward4 (C % 4 == 0).
@group(0) @binding(1) var<storage, read> nc_x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> nc_mr4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> nc_gamma4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> nc_beta4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> nc_y4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn normalize_channels_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li;
    if (i >= nc_p.n) {
        return;
    }
    let c = i % nc_p.c;
    let b = i / (nc_p.t * nc_p.c);
    let o = b * 2u * nc_p.c + c;
    var v = (nc_x[i] - nc_mr[o]) * nc_mr[o + nc_p.c] * nc_gamma[c] + nc_beta[c];
    if (nc_p.gelu != 0u) {
        v = gelu_exact(v);
    }
    nc_y[i] = v;
}

// Four channels per invocation where C % 4 == 0: the same arithmetic per element, one vec4 load per operand
// instead of four (lavapipe pays per load instruction) and a quarter of the index arithmetic.
@compute @workgroup_size(256)
fn normalize_channels_forward4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li; // elements 4 i .. 4 i + 3
    let c4 = nc_p.c / 4u;
    if (i >= nc_p.n / 4u) {
        return;
    }
    let c = i % c4;
    let b = i / (nc_p.t * c4);
    let o = b * 2u * c4 + c;
    var v = (nc_x4[i] - nc_mr4[o]) * nc_mr4[o + c4] * nc_gamma4[c] + nc_beta4[c];
    if (nc_p.gelu != 0u) {
        v = vec4<f32>(gelu_exact(v.x), gelu_exact(v.y), gelu_exact(v.z), gelu_exact(v.w));
    }
    nc_y4[i] = v;
}

// =========================================================================================================
// Backward. With xhat = (x - mean) * rstd, y = xhat * gamma + beta and dy = dL/dy, over the n values that
// share one (mean, rstd) (a row of C for LayerNorm, a channel's T frames for group norm):
//   dx = rstd * (gamma dy - mean(gamma dy) - xhat * mean(gamma dy * xhat))
//   dgamma[c] = sum of dy * xhat,  dbeta[c] = sum of dy   (over every row / batch row and frame)
// The parameter gradients are reduced without atomics: fixed chunks of rows (frames) give partial sums, which
// a second pass adds in chunk order, so results are reproducible for a given shape.

// ---------------------------------------------------------------------------------------------------------
// LayerNorm dx: one workgroup per row, both means in one tree reduction.

struct LnbParams {
    rows: u32,
    c: u32,
}

@group(0) @binding(0) var<uniform> lnb_p: LnbParams;
@group(0) @binding(1) var<storage, read> lnb_dy: array<f32>;         // (R, C)
@group(0) @binding(2) var<storage, read> lnb_x: array<f32>;          // (R, C)
@group(0) @binding(3) var<storage, read> lnb_stats: array<f32>;      // (R, 2): mean, rstd
@group(0) @binding(4) var<storage, read> lnb_gamma: array<f32>;      // (C)
@group(0) @binding(5) var<storage, read_write> lnb_dx: array<f32>;   // (R, C)

var<workgroup> lnb_red: array<vec2<f32>, LN_WG>;

@compute @workgroup_size(64)
fn layer_norm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    if (row >= lnb_p.rows) {
        return; // uniform across the workgroup
    }
    let c = lnb_p.c;
    let base = row * c;
    let mean = lnb_stats[2u * row];
    let rstd = lnb_stats[2u * row + 1u];
    var s = vec2<f32>(0.0);
    for (var i = li; i < c; i += LN_WG) {
        let xhat = (lnb_x[base + i] - mean) * rstd;
        let dn = lnb_dy[base + i] * lnb_gamma[i];
        s += vec2<f32>(dn, dn * xhat);
    }
    lnb_red[li] = s;
    workgroupBarrier();
    for (var h = LN_WG / 2u; h > 0u; h >>= 1u) {
        if (li < h) {
            lnb_red[li] += lnb_red[li + h];
        }
        workgroupBarrier();
    }
    let m = lnb_red[0] / f32(c);
    for (var i = li; i < c; i += LN_WG) {
        let xhat = (lnb_x[base + i] - mean) * rstd;
        let dn = lnb_dy[base + i] * lnb_gamma[i];
        lnb_dx[base + i] = (dn - m.x - xhat * m.y) * rstd;
    }
}

// LayerNorm dgamma / dbeta partials: one invocation per (chunk of rows, channel), adjacent invocations on
// adjacent channels; it sums its chunk's rows in order.

struct LnpParams {
    rows: u32,
    c: u32,
    rows_per_chunk: u32,
    n_chunks: u32,
    n_wg_c: u32,  // ceil(C / 64)
}

@group(0) @binding(0) var<uniform> lnp_p: LnpParams;
@group(0) @binding(1) var<storage, read> lnp_dy: array<f32>;           // (R, C)
@group(0) @binding(2) var<storage, read> lnp_x: array<f32>;            // (R, C)
@group(0) @binding(3) var<storage, read> lnp_stats: array<f32>;        // (R, 2): mean, rstd
@group(0) @binding(4) var<storage, read_write> lnp_part: array<f32>;   // (n_chunks, 2, C): dgamma, dbeta

@compute @workgroup_size(64)
fn layer_norm_backward_params(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) li: u32) {
    let wid = wg.x + wg.y * nwg.x;
    let c = (wid % lnp_p.n_wg_c) * 64u + li;
    let chunk = wid / lnp_p.n_wg_c;
    if (c >= lnp_p.c || chunk >= lnp_p.n_chunks) {
        return;
    }
    let r0 = chunk * lnp_p.rows_per_chunk;
    let r1 = min(lnp_p.rows, r0 + lnp_p.rows_per_chunk);
    var dg = 0.0;
    var db = 0.0;
    for (var r = r0; r < r1; r++) {
        let i = r * lnp_p.c + c;
        let d = lnp_dy[i];
        dg += d * (lnp_x[i] - lnp_stats[2u * r]) * lnp_stats[2u * r + 1u];
        db += d;
    }
    let o = chunk * 2u * lnp_p.c + c;
    lnp_part[o] = dg;
    lnp_part[o + lnp_p.c] = db;
}

// ---------------------------------------------------------------------------------------------------------
// Second stage of the reductions: out[b, i] = sum over chunks k, in order, of part[b, k, i].

struct SumParams {
    batch: u32,
    n_chunks: u32,
    w: u32,  // values per chunk
}

@group(0) @binding(0) var<uniform> sum_p: SumParams;
@group(0) @binding(1) var<storage, read> sum_part: array<f32>;        // (B, n_chunks, W)
@group(0) @binding(2) var<storage, read_write> sum_out: array<f32>;   // (B, W)

@compute @workgroup_size(64)
fn norm_backward_sum_chunks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + li;
    if (i >= sum_p.batch * sum_p.w) {
        return;
    }
    let b = i / sum_p.w;
    let first = b * sum_p.n_chunks * sum_p.w + i % sum_p.w;
    var s = 0.0;
    for (var k = 0u; k < sum_p.n_chunks; k++) {
        s += sum_part[first + k * sum_p.w];
    }
    sum_out[i] = s;
}

// ---------------------------------------------------------------------------------------------------------
// Group norm over time, partial sums: one invocation per (b, chunk of CH frames, channel) stores the chunk's
// (sum dy * xhat, sum dy), as moments_partial does for the forward.

@group(0) @binding(0) var<uniform> gnp_p: MomParams;
@group(0) @binding(1) var<storage, read> gnp_dy: array<f32>;           // (B, T, C)
@group(0) @binding(2) var<storage, read> gnp_x: array<f32>;            // (B, T, C)
@group(0) @binding(3) var<storage, read> gnp_mr: array<f32>;           // (B, 2, C): mean, rstd
@group(0) @binding(4) var<storage, read_write> gnp_part: array<f32>;   // (B, n_chunks, 2, C)

@compute @workgroup_size(64)
fn group_norm_time_backward_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                    @builtin(local_invocation_index) li: u32) {
    let wid = wg.x + wg.y * nwg.x;
    let c = (wid % gnp_p.n_wg_c) * 64u + li;
    let r = wid / gnp_p.n_wg_c;
    let chunk = r % gnp_p.n_chunks;
    let b = r / gnp_p.n_chunks;
    if (c >= gnp_p.c || b >= gnp_p.batch) {
        return;
    }
    let o = b * 2u * gnp_p.c + c;
    let mean = gnp_mr[o];
    let rstd = gnp_mr[o + gnp_p.c];
    let t0 = chunk * gnp_p.chunk;
    let t1 = min(gnp_p.t, t0 + gnp_p.chunk);
    var dg = 0.0;
    var db = 0.0;
    for (var t = t0; t < t1; t++) {
        let i = (b * gnp_p.t + t) * gnp_p.c + c;
        let d = gnp_dy[i];
        dg += d * (gnp_x[i] - mean) * rstd;
        db += d;
    }
    let p = (b * gnp_p.n_chunks + chunk) * 2u * gnp_p.c + c;
    gnp_part[p] = dg;
    gnp_part[p + gnp_p.c] = db;
}

// Group norm dx, one invocation per element: dx = rstd gamma (dy - sum(dy) / T - xhat sum(dy xhat) / T)
// with the per-(b, c) sums from the partials.

struct GnbParams {
    n: u32,  // B * T * C
    t: u32,
    c: u32,
}

@group(0) @binding(0) var<uniform> gnb_p: GnbParams;
@group(0) @binding(1) var<storage, read> gnb_dy: array<f32>;         // (B, T, C)
@group(0) @binding(2) var<storage, read> gnb_x: array<f32>;          // (B, T, C)
@group(0) @binding(3) var<storage, read> gnb_mr: array<f32>;         // (B, 2, C): mean, rstd
@group(0) @binding(4) var<storage, read> gnb_gamma: array<f32>;      // (C)
@group(0) @binding(5) var<storage, read> gnb_sums: array<f32>;       // (B, 2, C): sum dy xhat, sum dy
@group(0) @binding(6) var<storage, read_write> gnb_dx: array<f32>;   // (B, T, C)
// The same bindings as vec4, for group_norm_time_backward_input4 (C % 4 == 0).
@group(0) @binding(1) var<storage, read> gnb_dy4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gnb_x4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> gnb_mr4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> gnb_gamma4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> gnb_sums4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> gnb_dx4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn group_norm_time_backward_input(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                  @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li;
    if (i >= gnb_p.n) {
        return;
    }
    let c = i % gnb_p.c;
    let b = i / (gnb_p.t * gnb_p.c);
    let o = b * 2u * gnb_p.c + c;
    let rstd = gnb_mr[o + gnb_p.c];
    let xhat = (gnb_x[i] - gnb_mr[o]) * rstd;
    let inv_t = 1.0 / f32(gnb_p.t);
    gnb_dx[i] = rstd * gnb_gamma[c] * (gnb_dy[i] - gnb_sums[o + gnb_p.c] * inv_t - xhat * gnb_sums[o] * inv_t);
}

// Four channels per invocation where C % 4 == 0 (as normalize_channels_forward4).
@compute @workgroup_size(256)
fn group_norm_time_backward_input4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                   @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li; // elements 4 i .. 4 i + 3
    let c4 = gnb_p.c / 4u;
    if (i >= gnb_p.n / 4u) {
        return;
    }
    let c = i % c4;
    let b = i / (gnb_p.t * c4);
    let o = b * 2u * c4 + c;
    let rstd = gnb_mr4[o + c4];
    let xhat = (gnb_x4[i] - gnb_mr4[o]) * rstd;
    let inv_t = 1.0 / f32(gnb_p.t);
    gnb_dx4[i] = rstd * gnb_gamma4[c] * (gnb_dy4[i] - gnb_sums4[o + c4] * inv_t - xhat * gnb_sums4[o] * inv_t);
}
