// Channels-last 1-D convolution (wav2vec 2.0 feature encoder and grouped positional conv).
// Shapes: B batch, T input frames, C_in / C_out channels, K kernel taps, G groups,
// Cg_in = C_in / G, Cg_out = C_out / G, Cg_out_pad = Cg_out rounded up to a multiple of 4, T_out output frames.
// Grids are 1-D, folded into 2-D when larger than 65535 workgroups: the linear workgroup id is
// wg.x + wg.y * num_wg.x.

// ---------------------------------------------------------------------------------------------------------
// Weight packing: torch's (C_out, Cg_in, K) -> (G, K, Cg_in, Cg_out_pad), zero-padded, so that the conv reads
// 4 consecutive output channels of one tap and one input channel as a single aligned vec4. Each invocation
// writes one such vec4 (Cg_out_pad is a multiple of 4): one index computation and one store for four values
// (lavapipe pays per store, and for each integer division, lane by lane).

struct PackParams {
    n: u32,          // G * K * Cg_in * Cg_out_pad
    k: u32,
    cg_in: u32,
    cg_out: u32,
    cg_out_pad: u32,
}

@group(0) @binding(0) var<uniform> pack_p: PackParams;
@group(0) @binding(1) var<storage, read> pack_w: array<f32>;         // (C_out, Cg_in, K)
@group(0) @binding(2) var<storage, read_write> pack_wt: array<vec4<f32>>; // (G, K, Cg_in, Cg_out_pad / 4)

@compute @workgroup_size(256)
fn pack_weight(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li; // the vec4 of elements 4 i .. 4 i + 3
    if (i >= pack_p.n / 4u) {
        return;
    }
    let co = (4u * i) % pack_p.cg_out_pad;
    let r = (4u * i) / pack_p.cg_out_pad;
    let ci = r % pack_p.cg_in;
    let r2 = r / pack_p.cg_in;
    let k = r2 % pack_p.k;
    let g = r2 / pack_p.k;
    // Output channels co .. co + 3 are Cg_in * K apart in torch's layout.
    let src = ((g * pack_p.cg_out + co) * pack_p.cg_in + ci) * pack_p.k + k;
    let step = pack_p.cg_in * pack_p.k;
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (co + j < pack_p.cg_out) {
            v[j] = pack_w[src + j * step];
        }
    }
    pack_wt[i] = v;
}

// ---------------------------------------------------------------------------------------------------------
// The convolution as an implicit GEMM: rows = (b, t_out), columns = c_out, reduction over (k, ci) within the
// group. Each invocation owns a register block of 4 output frames x 4 output channels (one vec4 per frame),
// so every x value loaded feeds 4 FMAs and every vec4 of weights feeds 4 frames. No workgroup memory: on
// lavapipe shared-memory tiling measured slower than plain register blocking. Adjacent invocations take
// adjacent channel blocks, so they read the same x values and consecutive weights.

struct ConvParams {
    batch: u32,
    t_in: u32,
    c_in: u32,
    t_out: u32,
    c_out: u32,
    k: u32,
    stride: u32,
    padding: u32,
    cg_in: u32,
    cg_out: u32,
    cb_per_group: u32,  // Cg_out_pad / 4: 4-channel blocks per group
    n_cb: u32,          // G * cb_per_group
    fb_per_batch: u32,  // ceil(T_out / 4): 4-frame blocks per batch row
    n_wg_cb: u32,       // workgroups along the channel blocks
    has_bias: u32,
    gelu: u32,
}

@group(0) @binding(0) var<uniform> cp: ConvParams;
@group(0) @binding(1) var<storage, read> conv_x: array<f32>;         // (B, T, C_in)
@group(0) @binding(2) var<storage, read> conv_wt: array<vec4<f32>>;  // (G, K, Cg_in, Cg_out_pad / 4)
@group(0) @binding(3) var<storage, read> conv_bias: array<f32>;      // (C_out); any buffer when has_bias == 0
@group(0) @binding(4) var<storage, read_write> conv_y: array<f32>;   // (B, T_out, C_out)

// erfc_approx and gelu_exact: shaders/common.wgsl.

// Input row offset of tap k for output frame t (or 0 with ok = false where the tap reads padding).
struct Tap {
    base: u32,
    ok: bool,
}

fn tap(b: u32, t: u32, k: u32, c0: u32) -> Tap {
    let tin = i32(t * cp.stride + k) - i32(cp.padding);
    let ok = t < cp.t_out && tin >= 0 && tin < i32(cp.t_in);
    return Tap(select(0u, (b * cp.t_in + u32(max(tin, 0))) * cp.c_in + c0, ok), ok);
}

fn store_frame(b: u32, t: u32, g: u32, cbl: u32, acc: vec4<f32>) {
    if (t >= cp.t_out) {
        return;
    }
    let row = (b * cp.t_out + t) * cp.c_out;
    for (var j = 0u; j < 4u; j++) {
        let col = cbl * 4u + j;
        if (col < cp.cg_out) {
            let co = g * cp.cg_out + col;
            var v = acc[j];
            if (cp.has_bias != 0u) {
                v += conv_bias[co];
            }
            if (cp.gelu != 0u) {
                v = gelu_exact(v);
            }
            conv_y[row + co] = v;
        }
    }
}

@compute @workgroup_size(16, 4)
fn conv1d_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let wid = wg.x + wg.y * nwg.x;
    let cb = (wid % cp.n_wg_cb) * 16u + lid.x;  // channel block over all groups
    let fb = (wid / cp.n_wg_cb) * 4u + lid.y;   // frame block over all batch rows
    if (cb >= cp.n_cb || fb >= cp.batch * cp.fb_per_batch) {
        return;
    }
    let g = cb / cp.cb_per_group;
    let cbl = cb % cp.cb_per_group;
    let b = fb / cp.fb_per_batch;
    let t0 = (fb % cp.fb_per_batch) * 4u;
    let c0 = g * cp.cg_in;

    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var k = 0u; k < cp.k; k++) {
        let p0 = tap(b, t0, k, c0);
        let p1 = tap(b, t0 + 1u, k, c0);
        let p2 = tap(b, t0 + 2u, k, c0);
        let p3 = tap(b, t0 + 3u, k, c0);
        var wi = (g * cp.k + k) * cp.cg_in * cp.cb_per_group + cbl;
        for (var ci = 0u; ci < cp.cg_in; ci++) {
            let w = conv_wt[wi];
            wi += cp.cb_per_group;
            a0 += select(0.0, conv_x[p0.base + ci], p0.ok) * w;
            a1 += select(0.0, conv_x[p1.base + ci], p1.ok) * w;
            a2 += select(0.0, conv_x[p2.base + ci], p2.ok) * w;
            a3 += select(0.0, conv_x[p3.base + ci], p3.ok) * w;
        }
    }
    store_frame(b, t0, g, cbl, a0);
    store_frame(b, t0 + 1u, g, cbl, a1);
    store_frame(b, t0 + 2u, g, cbl, a2);
    store_frame(b, t0 + 3u, g, cbl, a3);
}

// =========================================================================================================
// Backward. With dy = dL/dy (B, T_out, C_out):
//   dx[b, t, g Cg_in + ci] = sum over taps k with t + P - k = s * to, 0 <= to < T_out, and co in group g of
//                            dy[b, to, g Cg_out + co] * w[g Cg_out + co, ci, k]          (transposed conv)
//   dw[g Cg_out + co, ci, k] = sum over (b, to) of dy[b, to, g Cg_out + co] * x[b, to s + k - P, g Cg_in + ci]
//   db[co] = sum over (b, to) of dy[b, to, co]
// All three are written by plain stores (no atomics): dx gathers, dw and db reduce rows in a fixed order, in
// row chunks ("splits") whose partial sums a second pass adds in split order, so results are reproducible.

// ---------------------------------------------------------------------------------------------------------
// Weight packing for dx: torch's (C_out, Cg_in, K) -> (G, K, Cg_out, Cg_in_pad), zero-padded, so that the
// transposed conv reads 4 consecutive input channels of one tap and one output channel as an aligned vec4.
// One vec4 per invocation, as pack_weight.

struct PackBwdParams {
    n: u32,          // G * K * Cg_out * Cg_in_pad
    k: u32,
    cg_in: u32,
    cg_out: u32,
    cg_in_pad: u32,
}

@group(0) @binding(0) var<uniform> pkb_p: PackBwdParams;
@group(0) @binding(1) var<storage, read> pkb_w: array<f32>;         // (C_out, Cg_in, K)
@group(0) @binding(2) var<storage, read_write> pkb_wt: array<vec4<f32>>; // (G, K, Cg_out, Cg_in_pad / 4)

@compute @workgroup_size(256)
fn conv1d_backward_pack_weight(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li; // the vec4 of elements 4 i .. 4 i + 3
    if (i >= pkb_p.n / 4u) {
        return;
    }
    let ci = (4u * i) % pkb_p.cg_in_pad;
    let r = (4u * i) / pkb_p.cg_in_pad;
    let co = r % pkb_p.cg_out;
    let r2 = r / pkb_p.cg_out;
    let k = r2 % pkb_p.k;
    let g = r2 / pkb_p.k;
    // Input channels ci .. ci + 3 are K apart in torch's layout.
    let src = ((g * pkb_p.cg_out + co) * pkb_p.cg_in + ci) * pkb_p.k + k;
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (ci + j < pkb_p.cg_in) {
            v[j] = pkb_w[src + j * pkb_p.k];
        }
    }
    pkb_wt[i] = v;
}

// ---------------------------------------------------------------------------------------------------------
// dx as a gather (transposed conv). Input frames are taken in 4-frame blocks of one stride phase,
// t_j = phase + s * (m0 + j): for such frames the taps that reach an output frame are exactly
// k = k0, k0 + s, ... with k0 = (phase + P) mod s, and they read 4 consecutive output frames
// to_j = m0 + j + (phase + P - k) / s, so no FMA is spent on taps that miss. Each invocation owns a register
// block of 4 frames x 4 input channels (one vec4 per frame), like the forward.

struct DxParams {
    batch: u32,
    t_in: u32,
    c_in: u32,
    t_out: u32,
    c_out: u32,
    k: u32,
    stride: u32,
    padding: u32,
    cg_in: u32,
    cg_out: u32,
    cib_per_group: u32,  // Cg_in_pad / 4: 4-channel blocks per group
    n_cib: u32,          // G * cib_per_group
    mb_per_phase: u32,   // ceil(ceil(T / s) / 4): 4-frame blocks per (batch row, phase)
    n_fb: u32,           // B * s * mb_per_phase
    n_wg_cb: u32,        // workgroups along the channel blocks
}

@group(0) @binding(0) var<uniform> dxp: DxParams;
@group(0) @binding(1) var<storage, read> dx_dy: array<f32>;         // (B, T_out, C_out)
@group(0) @binding(2) var<storage, read> dx_wt: array<vec4<f32>>;   // (G, K, Cg_out, Cg_in_pad / 4)
@group(0) @binding(3) var<storage, read_write> dx_out: array<f32>;  // (B, T, C_in)

// dy row offset (channel 0 of group g) of output frame `to` (clamped in range; ok = false when outside).
struct DyRow {
    base: u32,
    ok: bool,
}

fn dy_row(b: u32, to: i32, g: u32) -> DyRow {
    let ok = to >= 0 && to < i32(dxp.t_out);
    let tc = u32(clamp(to, 0, i32(dxp.t_out) - 1));
    return DyRow((b * dxp.t_out + tc) * dxp.c_out + g * dxp.cg_out, ok);
}

fn store_dx(b: u32, t: u32, g: u32, cbl: u32, acc: vec4<f32>) {
    if (t >= dxp.t_in) {
        return;
    }
    let row = (b * dxp.t_in + t) * dxp.c_in + g * dxp.cg_in;
    for (var j = 0u; j < 4u; j++) {
        let ci = cbl * 4u + j;
        if (ci < dxp.cg_in) {
            dx_out[row + ci] = acc[j];
        }
    }
}

@compute @workgroup_size(16, 4)
fn conv1d_backward_input(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_id) lid: vec3<u32>) {
    let wid = wg.x + wg.y * nwg.x;
    let cb = (wid % dxp.n_wg_cb) * 16u + lid.x;  // input-channel block over all groups
    let fb = (wid / dxp.n_wg_cb) * 4u + lid.y;   // frame block over (batch row, phase, block)
    if (cb >= dxp.n_cib || fb >= dxp.n_fb) {
        return;
    }
    let g = cb / dxp.cib_per_group;
    let cbl = cb % dxp.cib_per_group;
    let m0 = (fb % dxp.mb_per_phase) * 4u;
    let r = fb / dxp.mb_per_phase;
    let phase = r % dxp.stride;
    let b = r / dxp.stride;

    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var k = (phase + dxp.padding) % dxp.stride; k < dxp.k; k += dxp.stride) {
        // Exact division: phase + P - k is a multiple of s (possibly negative).
        let to0 = i32(m0) + (i32(phase + dxp.padding) - i32(k)) / i32(dxp.stride);
        let p0 = dy_row(b, to0, g);
        let p1 = dy_row(b, to0 + 1, g);
        let p2 = dy_row(b, to0 + 2, g);
        let p3 = dy_row(b, to0 + 3, g);
        var wi = (g * dxp.k + k) * dxp.cg_out * dxp.cib_per_group + cbl;
        for (var co = 0u; co < dxp.cg_out; co++) {
            let w = dx_wt[wi];
            wi += dxp.cib_per_group;
            a0 += select(0.0, dx_dy[p0.base + co], p0.ok) * w;
            a1 += select(0.0, dx_dy[p1.base + co], p1.ok) * w;
            a2 += select(0.0, dx_dy[p2.base + co], p2.ok) * w;
            a3 += select(0.0, dx_dy[p3.base + co], p3.ok) * w;
        }
    }
    let t0 = phase + dxp.stride * m0;
    store_dx(b, t0, g, cbl, a0);
    store_dx(b, t0 + dxp.stride, g, cbl, a1);
    store_dx(b, t0 + 2u * dxp.stride, g, cbl, a2);
    store_dx(b, t0 + 3u * dxp.stride, g, cbl, a3);
}

// ---------------------------------------------------------------------------------------------------------
// dw as a GEMM per group: dW[co, n] = sum over rows (b, to) of dy[row, co] * X[row, n], with columns
// n = k * Cg_in + ci and X[row, n] = x[b, to s + k - P, g Cg_in + ci] (zero in the padding), read in place.
// The mapping mirrors the forward: each invocation owns a 4 x 4 register block, 4 consecutive output
// channels (adjacent invocations take adjacent channel blocks, across groups) x 4 consecutive columns
// (a column block per lid.y), and sums one split's rows in order: per batch row, frames whose 4 taps all
// fall inside the input run without bounds checks, the few at the padded edges with them. It stores its partial in torch layout; with one
// split the partial is dw itself.

struct DwParams {
    t_in: u32,
    c_in: u32,
    t_out: u32,
    c_out: u32,
    k: u32,
    stride: u32,
    padding: u32,
    cg_in: u32,
    cg_out: u32,
    n_cols: u32,          // K * Cg_in
    cb_per_group: u32,    // ceil(Cg_out / 4)
    n_cb: u32,            // G * cb_per_group
    n_wg_cb: u32,         // ceil(n_cb / 16): workgroups along the channel blocks
    n_wg_col: u32,        // ceil(n_cols / 16): workgroups along the columns
    rows: u32,            // B * T_out
    rows_per_split: u32,
    n_split: u32,
}

@group(0) @binding(0) var<uniform> dwp: DwParams;
@group(0) @binding(1) var<storage, read> dw_dy: array<f32>;          // (B, T_out, C_out)
@group(0) @binding(2) var<storage, read> dw_x: array<f32>;           // (B, T, C_in)
@group(0) @binding(3) var<storage, read_write> dw_part: array<f32>;  // (n_split, C_out, Cg_in, K)

// The invocation's 4 x 4 block: dw_acc_j[i] accumulates (channel co0 + i, column j).
var<private> dw_acc0: vec4<f32>;
var<private> dw_acc1: vec4<f32>;
var<private> dw_acc2: vec4<f32>;
var<private> dw_acc3: vec4<f32>;

// Column j of output frame `to` reads input frame to * s + off[j] at offset xo[j] within the frame; the dy
// channels are dyc. Rows (b, ta .. tb), checking each frame against the padding.
fn dw_rows_checked(b: u32, ta: u32, tb: u32, dyc: vec4<u32>, off: vec4<i32>, xo: vec4<u32>) {
    let t_in = i32(dwp.t_in);
    for (var to = ta; to < tb; to++) {
        let yb = (b * dwp.t_out + to) * dwp.c_out;
        let d = vec4<f32>(dw_dy[yb + dyc.x], dw_dy[yb + dyc.y], dw_dy[yb + dyc.z], dw_dy[yb + dyc.w]);
        let tin = vec4<i32>(i32(to * dwp.stride)) + off;
        let ok = (tin >= vec4<i32>(0)) & (tin < vec4<i32>(t_in));
        let xb = (vec4<u32>(b * dwp.t_in) + vec4<u32>(clamp(tin, vec4<i32>(0), vec4<i32>(t_in - 1)))) * dwp.c_in
            + xo;
        dw_acc0 += d * select(0.0, dw_x[xb.x], ok.x);
        dw_acc1 += d * select(0.0, dw_x[xb.y], ok.y);
        dw_acc2 += d * select(0.0, dw_x[xb.z], ok.z);
        dw_acc3 += d * select(0.0, dw_x[xb.w], ok.w);
    }
}

// The same for rows whose 4 frames all lie inside the input (every row when P = 0): plain strided reads.
fn dw_rows_inside(b: u32, ta: u32, tb: u32, dyc: vec4<u32>, off: vec4<i32>, xo: vec4<u32>) {
    var yb = (b * dwp.t_out + ta) * dwp.c_out;
    var xb = vec4<u32>(vec4<i32>(i32(b * dwp.t_in + ta * dwp.stride)) + off) * dwp.c_in + xo;
    let step = dwp.stride * dwp.c_in;
    for (var to = ta; to < tb; to++) {
        let d = vec4<f32>(dw_dy[yb + dyc.x], dw_dy[yb + dyc.y], dw_dy[yb + dyc.z], dw_dy[yb + dyc.w]);
        dw_acc0 += d * dw_x[xb.x];
        dw_acc1 += d * dw_x[xb.y];
        dw_acc2 += d * dw_x[xb.z];
        dw_acc3 += d * dw_x[xb.w];
        yb += dwp.c_out;
        xb += vec4<u32>(step);
    }
}

@compute @workgroup_size(16, 4)
fn conv1d_backward_weight(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_id) lid: vec3<u32>) {
    let wid = wg.x + wg.y * nwg.x;
    let cb = (wid % dwp.n_wg_cb) * 16u + lid.x;
    let r = wid / dwp.n_wg_cb;
    let n0 = ((r % dwp.n_wg_col) * 4u + lid.y) * 4u;
    let split = r / dwp.n_wg_col;
    if (split >= dwp.n_split || cb >= dwp.n_cb || n0 >= dwp.n_cols) {
        return;
    }
    let g = cb / dwp.cb_per_group;
    let co0 = (cb % dwp.cb_per_group) * 4u;
    // Out-of-range channels and columns are clamped to valid ones (harmless reads) and dropped at the store.
    let dyc = vec4<u32>(min(vec4<u32>(co0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(dwp.cg_out - 1u)))
        + g * dwp.cg_out;
    let n = vec4<u32>(n0) + vec4<u32>(0u, 1u, 2u, 3u);
    let nc = min(n, vec4<u32>(dwp.n_cols - 1u));
    let kk = nc / dwp.cg_in;
    let ci = nc % dwp.cg_in;
    let off = vec4<i32>(kk) - i32(dwp.padding);
    let xo = ci + g * dwp.cg_in;
    // Output frames [lo, hi) read inside the input for all 4 columns: 0 <= to * s + off[j] <= T - 1.
    let s = i32(dwp.stride);
    let lo_j = max(-off + vec4<i32>(s - 1), vec4<i32>(0)) / s;
    let top = vec4<i32>(i32(dwp.t_in) - 1) - off;
    let hi_j = select(vec4<i32>(0), top / s + vec4<i32>(1), top >= vec4<i32>(0));
    let lo = u32(max(max(lo_j.x, lo_j.y), max(lo_j.z, lo_j.w)));
    let hi = max(lo, u32(min(min(hi_j.x, hi_j.y), min(hi_j.z, hi_j.w))));

    dw_acc0 = vec4<f32>(0.0);
    dw_acc1 = vec4<f32>(0.0);
    dw_acc2 = vec4<f32>(0.0);
    dw_acc3 = vec4<f32>(0.0);
    // This split's rows in order, one batch row's frame range [ta, tb) at a time.
    let r1 = min(dwp.rows, (split + 1u) * dwp.rows_per_split);
    var row = split * dwp.rows_per_split;
    while (row < r1) {
        let b = row / dwp.t_out;
        let ta = row % dwp.t_out;
        let tb = min(dwp.t_out, ta + (r1 - row));
        let a = clamp(lo, ta, tb);
        let z = clamp(hi, ta, tb);
        dw_rows_checked(b, ta, a, dyc, off, xo);
        dw_rows_inside(b, a, z, dyc, off, xo);
        dw_rows_checked(b, z, tb, dyc, off, xo);
        row += tb - ta;
    }
    let base = split * dwp.c_out * dwp.n_cols;
    var acc = array<vec4<f32>, 4>(dw_acc0, dw_acc1, dw_acc2, dw_acc3);
    for (var j = 0u; j < 4u; j++) {
        if (n[j] < dwp.n_cols) {
            for (var i = 0u; i < 4u; i++) {
                let co = co0 + i;
                if (co < dwp.cg_out) {
                    dw_part[base + ((g * dwp.cg_out + co) * dwp.cg_in + ci[j]) * dwp.k + kk[j]] = acc[j][i];
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// db partials: one invocation per (split, co) sums its split's rows of dy in order.

struct DbParams {
    c_out: u32,
    rows: u32,
    rows_per_split: u32,
    n_split: u32,
}

@group(0) @binding(0) var<uniform> dbp: DbParams;
@group(0) @binding(1) var<storage, read> db_dy: array<f32>;          // (B * T_out, C_out)
@group(0) @binding(2) var<storage, read_write> db_part: array<f32>;  // (n_split, C_out)
@group(0) @binding(1) var<storage, read> db_dy4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> db_part4: array<vec4<f32>>;

@compute @workgroup_size(64)
fn conv1d_backward_bias(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + li;
    if (i >= dbp.n_split * dbp.c_out) {
        return;
    }
    let co = i % dbp.c_out;
    let split = i / dbp.c_out;
    let r0 = split * dbp.rows_per_split;
    let r1 = min(dbp.rows, r0 + dbp.rows_per_split);
    var s = 0.0;
    for (var row = r0; row < r1; row++) {
        s += db_dy[row * dbp.c_out + co];
    }
    db_part[i] = s;
}

// Four output channels per invocation where C_out % 4 == 0: the same sums, one vec4 load per row.
@compute @workgroup_size(64)
fn conv1d_backward_bias4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + li;
    let c4 = dbp.c_out / 4u;
    if (i >= dbp.n_split * c4) {
        return;
    }
    let co = i % c4;
    let split = i / c4;
    let r0 = split * dbp.rows_per_split;
    let r1 = min(dbp.rows, r0 + dbp.rows_per_split);
    var s = vec4<f32>(0.0);
    for (var row = r0; row < r1; row++) {
        s += db_dy4[row * c4 + co];
    }
    db_part4[i] = s;
}

// ---------------------------------------------------------------------------------------------------------
// Second stage of the dw / db reductions: out[i] = sum over splits, in split order, of part[split, i].

struct SumParams {
    n: u32,        // elements per split
    n_split: u32,
}

@group(0) @binding(0) var<uniform> sum_p: SumParams;
@group(0) @binding(1) var<storage, read> sum_part: array<f32>;          // (n_split, n)
@group(0) @binding(2) var<storage, read_write> sum_out: array<f32>;     // (n)
@group(0) @binding(1) var<storage, read> sum_part4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> sum_out4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn conv1d_backward_sum_splits(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li;
    if (i >= sum_p.n) {
        return;
    }
    var s = 0.0;
    for (var k = 0u; k < sum_p.n_split; k++) {
        s += sum_part[k * sum_p.n + i];
    }
    sum_out[i] = s;
}

// Four values per invocation where n % 4 == 0: the same sums in the same order, vec4 loads.
@compute @workgroup_size(256)
fn conv1d_backward_sum_splits4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li;
    let n4 = sum_p.n / 4u;
    if (i >= n4) {
        return;
    }
    var s = vec4<f32>(0.0);
    for (var k = 0u; k < sum_p.n_split; k++) {
        s += sum_part4[k * n4 + i];
    }
    sum_out4[i] = s;
}

// ---------------------------------------------------------------------------------------------------------
// Group-major zero-padded copy of the input, for the matmul route of grouped or padded convolutions
// (ConvKernel::Matmul in src/ops/conv1d.rs): x (B, T, C_in) -> xg (B, G, T + 2 P, Cg_in), zeros outside the
// input, so that the receptive fields of one group are the rows of one strided view (row stride
// stride * Cg_in, K * Cg_in contiguous columns) and the group's conv is a matmul with its packed weight.

struct GroupPadParams {
    n: u32,          // B * G * T_pad * Cg_in
    t: u32,
    c_in: u32,
    cg_in: u32,
    groups: u32,
    t_pad: u32,      // T + 2 P
    padding: u32,
}

@group(0) @binding(0) var<uniform> gp_p: GroupPadParams;
@group(0) @binding(1) var<storage, read> gp_x: array<f32>;          // (B, T, C_in)
@group(0) @binding(2) var<storage, read_write> gp_out: array<f32>;  // (B, G, T_pad, Cg_in)

@compute @workgroup_size(256)
fn conv1d_group_pad(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li;
    if (i >= gp_p.n) {
        return;
    }
    let c = i % gp_p.cg_in;
    let r = i / gp_p.cg_in;
    let tp = r % gp_p.t_pad;
    let r2 = r / gp_p.t_pad;
    let g = r2 % gp_p.groups;
    let b = r2 / gp_p.groups;
    var v = 0.0;
    if (tp >= gp_p.padding && tp < gp_p.padding + gp_p.t) {
        v = gp_x[(b * gp_p.t + tp - gp_p.padding) * gp_p.c_in + g * gp_p.cg_in + c];
    }
    gp_out[i] = v;
}

// ---------------------------------------------------------------------------------------------------------
// The matmul route's backward (ConvKernel::Matmul in src/ops/conv1d.rs): the products run in the matmul
// kernels; these two kernels rearrange their results.
//
// conv1d_dw_from_taps: the weight gradient came out tap-major, D (C_out, K, Cg_in) (the receptive-field
// columns' order); dw is torch's (C_out, Cg_in, K).
// conv1d_col2im: dx from G (B, G, T_out, Cg_in * K) = dy times the weight per group, in torch's column order
// (c, k): dx[b, t, g Cg_in + c] = sum over taps k with t + P - k = stride * to, 0 <= to < T_out, of
// G[b, g, to, c K + k], in tap order (deterministic).

struct RearrangeParams {
    n: u32,
    t: u32,         // input frames (conv1d_col2im)
    c_in: u32,
    cg_in: u32,
    groups: u32,
    k: u32,
    stride: u32,
    padding: u32,
    t_out: u32,
}

@group(0) @binding(0) var<uniform> ra_p: RearrangeParams;
@group(0) @binding(1) var<storage, read> ra_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> ra_dst: array<f32>;

@compute @workgroup_size(256)
fn conv1d_dw_from_taps(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li; // (o, c, k) in dw
    if (i >= ra_p.n) {
        return;
    }
    let k = i % ra_p.k;
    let c = (i / ra_p.k) % ra_p.cg_in;
    let o = i / (ra_p.k * ra_p.cg_in);
    ra_dst[i] = ra_src[(o * ra_p.k + k) * ra_p.cg_in + c];
}

@compute @workgroup_size(256)
fn conv1d_col2im(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li; // (b, t, channel) in dx
    if (i >= ra_p.n) {
        return;
    }
    let ch = i % ra_p.c_in;
    let t = (i / ra_p.c_in) % ra_p.t;
    let b = i / (ra_p.c_in * ra_p.t);
    let g = ch / ra_p.cg_in;
    let c = ch % ra_p.cg_in;
    let row = ra_p.cg_in * ra_p.k;
    let base = (b * ra_p.groups + g) * ra_p.t_out;
    var s = 0.0;
    for (var k = 0u; k < ra_p.k; k++) {
        let tp = i32(t + ra_p.padding) - i32(k);
        if (tp >= 0 && u32(tp) % ra_p.stride == 0u) {
            let to = u32(tp) / ra_p.stride;
            if (to < ra_p.t_out) {
                s += ra_src[(base + to) * row + c * ra_p.k + k];
            }
        }
    }
    ra_dst[i] = s;
}
