// (No `enable subgroups;`: naga 30 accepts the subgroup builtins without it and rejects the directive.)

// Conv1d kernels for adapters whose subgroups have exactly 8 invocations (lavapipe on AVX2), the scheme of
// shaders/matmul_sg.wgsl applied to shaders/conv1d.wgsl (same layouts, packed weights and symbols; see
// there). Why: lavapipe turns each per-invocation load into a loop over the 8 SIMD lanes (~10 instructions
// per float), so loads per multiply-add set the speed, and subgroupBroadcast of a constant lane is a
// register shuffle. The 8 lanes of a subgroup share 8 rows of the product; lane l loads row l's operand
// only and broadcasts it, and each lane owns 4 columns: per 4 reduction steps 5 vec4 loads feed 128
// multiply-adds (the 4 x 4 kernels of conv1d.wgsl: 16 scalar + 4 vec4 loads for 64).
//
// Each output element sums the same products in the same order as the matching conv1d.wgsl kernel, with
// the same `acc += a * b` steps, so results are bit-identical to it (tested). Nothing returns early and
// every load index is clamped: the broadcasts need all 8 lanes. The subgroup's lanes must agree on the
// group (their broadcast operand is one group's channels), so the column chunks are per subgroup
// (`subgroup_id`), never straddling a group.

// Per lane: acc += x.x w0 + x.y w1 + x.z w2 + x.w w3, one step at a time (the old kernels' order).
fn step4(acc: vec4<f32>, x: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>) -> vec4<f32> {
    var a = acc;
    a += x.x * w0;
    a += x.y * w1;
    a += x.z * w2;
    a += x.w * w3;
    return a;
}

// ---------------------------------------------------------------------------------------------------------
// Forward, as conv1d_forward: rows = (b, t_out) linear over the batch, columns = output channels. A
// workgroup is 8 subgroups sharing 8 rows; subgroup q of all column chunks (q = tile * 8 + subgroup_id)
// covers 8 channel blocks (32 channels) of one group; lane l loads row l's input window, 4 input channels
// at a time. Needs Cg_in % 4 == 0 (vec4 loads of x).

struct SgConvParams {
    rows: u32,              // B * T_out
    t_in: u32,
    c_in: u32,
    t_out: u32,
    c_out: u32,
    k: u32,
    stride: u32,
    padding: u32,
    cg_in: u32,
    cg_out: u32,
    cb_per_group: u32,      // Cg_out_pad / 4: 4-channel blocks per group
    chunks_per_group: u32,  // ceil(cb_per_group / 8): subgroup column chunks per group
    n_chunks: u32,          // G * chunks_per_group
    row_tiles: u32,         // ceil(rows / 8)
    has_bias: u32,
    gelu: u32,
}

@group(0) @binding(0) var<uniform> sp: SgConvParams;
@group(0) @binding(1) var<storage, read> sg_x4: array<vec4<f32>>;    // (B, T, C_in)
@group(0) @binding(2) var<storage, read> sg_wt: array<vec4<f32>>;    // (G, K, Cg_in, Cg_out_pad / 4)
@group(0) @binding(3) var<storage, read> sg_bias: array<f32>;        // (C_out); any buffer when has_bias == 0
@group(0) @binding(4) var<storage, read_write> sg_y: array<f32>;     // (B, T_out, C_out)

fn sg_store_frame(row: u32, g: u32, cbl: u32, acc: vec4<f32>) {
    if (row >= sp.rows) {
        return;
    }
    let base = row * sp.c_out;
    for (var j = 0u; j < 4u; j++) {
        let col = cbl * 4u + j;
        if (col < sp.cg_out) {
            let co = g * sp.cg_out + col;
            var v = acc[j];
            if (sp.has_bias != 0u) {
                v += sg_bias[co];
            }
            if (sp.gelu != 0u) {
                v = gelu_exact(v);
            }
            sg_y[base + co] = v;
        }
    }
}

@compute @workgroup_size(64)
fn conv1d_sg_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(subgroup_id) sgid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let wid = wg.x + wg.y * nwg.x;
    let row0 = (wid % sp.row_tiles) * 8u;  // row tiles fastest: concurrent workgroups share weights
    let q = (wid / sp.row_tiles) * 8u + sgid;
    let qc = min(q, sp.n_chunks - 1u);
    let g = qc / sp.chunks_per_group;
    let cbl = (qc % sp.chunks_per_group) * 8u + lane;
    let cbc = min(cbl, sp.cb_per_group - 1u);
    // This lane's row, whose input window it loads for the whole subgroup.
    let r = min(row0 + lane, sp.rows - 1u);
    let b = r / sp.t_out;
    let t = r % sp.t_out;
    let cg4 = sp.cg_in / 4u;
    let xc = (g * sp.cg_in) / 4u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    let wstep = sp.cb_per_group;
    for (var k = 0u; k < sp.k; k++) {
        let tin = i32(t * sp.stride + k) - i32(sp.padding);
        let ok = tin >= 0 && tin < i32(sp.t_in);
        let xr = ((b * sp.t_in + u32(clamp(tin, 0, i32(sp.t_in) - 1))) * sp.c_in) / 4u + xc;
        var wi = (g * sp.k + k) * sp.cg_in * wstep + cbc;
        for (var p = 0u; p < cg4; p++) {
            let xa = select(vec4<f32>(0.0), sg_x4[xr + p], ok);
            let w0 = sg_wt[wi];
            let w1 = sg_wt[wi + wstep];
            let w2 = sg_wt[wi + 2u * wstep];
            let w3 = sg_wt[wi + 3u * wstep];
            wi += 4u * wstep;
            acc0 = step4(acc0, subgroupBroadcast(xa, 0u), w0, w1, w2, w3);
            acc1 = step4(acc1, subgroupBroadcast(xa, 1u), w0, w1, w2, w3);
            acc2 = step4(acc2, subgroupBroadcast(xa, 2u), w0, w1, w2, w3);
            acc3 = step4(acc3, subgroupBroadcast(xa, 3u), w0, w1, w2, w3);
            acc4 = step4(acc4, subgroupBroadcast(xa, 4u), w0, w1, w2, w3);
            acc5 = step4(acc5, subgroupBroadcast(xa, 5u), w0, w1, w2, w3);
            acc6 = step4(acc6, subgroupBroadcast(xa, 6u), w0, w1, w2, w3);
            acc7 = step4(acc7, subgroupBroadcast(xa, 7u), w0, w1, w2, w3);
        }
    }
    if (q < sp.n_chunks && cbl < sp.cb_per_group) {
        sg_store_frame(row0 + 0u, g, cbl, acc0);
        sg_store_frame(row0 + 1u, g, cbl, acc1);
        sg_store_frame(row0 + 2u, g, cbl, acc2);
        sg_store_frame(row0 + 3u, g, cbl, acc3);
        sg_store_frame(row0 + 4u, g, cbl, acc4);
        sg_store_frame(row0 + 5u, g, cbl, acc5);
        sg_store_frame(row0 + 6u, g, cbl, acc6);
        sg_store_frame(row0 + 7u, g, cbl, acc7);
    }
}

// ---------------------------------------------------------------------------------------------------------
// dx, as conv1d_backward_input: the subgroup's 8 rows are 8 input frames of one stride phase,
// t_j = phase + s (m0 + j), so they share the taps k = k0, k0 + s, ...; lane l loads the dy row that tap k
// reads for frame t_l, 4 output channels at a time, and owns 4 input channels. Needs Cg_out % 4 == 0.

struct SgDxParams {
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
    cib_per_group: u32,     // Cg_in_pad / 4: 4-channel blocks per group
    chunks_per_group: u32,  // ceil(cib_per_group / 8)
    n_chunks: u32,          // G * chunks_per_group
    mb_per_phase: u32,      // ceil(ceil(T / s) / 8): 8-frame blocks per (batch row, phase)
    n_fb: u32,              // B * s * mb_per_phase
}

@group(0) @binding(0) var<uniform> sdx: SgDxParams;
@group(0) @binding(1) var<storage, read> sdx_dy4: array<vec4<f32>>;   // (B, T_out, C_out)
@group(0) @binding(2) var<storage, read> sdx_wt: array<vec4<f32>>;    // (G, K, Cg_out, Cg_in_pad / 4)
@group(0) @binding(3) var<storage, read_write> sdx_out: array<f32>;   // (B, T, C_in)

fn sg_store_dx(b: u32, t: u32, g: u32, cbl: u32, acc: vec4<f32>) {
    if (t >= sdx.t_in) {
        return;
    }
    let row = (b * sdx.t_in + t) * sdx.c_in + g * sdx.cg_in;
    for (var j = 0u; j < 4u; j++) {
        let ci = cbl * 4u + j;
        if (ci < sdx.cg_in) {
            sdx_out[row + ci] = acc[j];
        }
    }
}

@compute @workgroup_size(64)
fn conv1d_sg_backward_input(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(subgroup_id) sgid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let wid = wg.x + wg.y * nwg.x;
    let fb = wid % sdx.n_fb;
    let q = (wid / sdx.n_fb) * 8u + sgid;
    let qc = min(q, sdx.n_chunks - 1u);
    let g = qc / sdx.chunks_per_group;
    let cbl = (qc % sdx.chunks_per_group) * 8u + lane;
    let cbc = min(cbl, sdx.cib_per_group - 1u);
    let m0 = (fb % sdx.mb_per_phase) * 8u;
    let r = fb / sdx.mb_per_phase;
    let phase = r % sdx.stride;
    let b = r / sdx.stride;
    let s = i32(sdx.stride);
    let co4 = sdx.cg_out / 4u;
    let yc = (g * sdx.cg_out) / 4u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    let wstep = sdx.cib_per_group;
    for (var k = (phase + sdx.padding) % sdx.stride; k < sdx.k; k += sdx.stride) {
        // Exact division: phase + P - k is a multiple of s (possibly negative).
        let to = i32(m0 + lane) + (i32(phase + sdx.padding) - i32(k)) / s;
        let ok = to >= 0 && to < i32(sdx.t_out);
        let yr = ((b * sdx.t_out + u32(clamp(to, 0, i32(sdx.t_out) - 1))) * sdx.c_out) / 4u + yc;
        var wi = (g * sdx.k + k) * sdx.cg_out * wstep + cbc;
        for (var p = 0u; p < co4; p++) {
            let ya = select(vec4<f32>(0.0), sdx_dy4[yr + p], ok);
            let w0 = sdx_wt[wi];
            let w1 = sdx_wt[wi + wstep];
            let w2 = sdx_wt[wi + 2u * wstep];
            let w3 = sdx_wt[wi + 3u * wstep];
            wi += 4u * wstep;
            acc0 = step4(acc0, subgroupBroadcast(ya, 0u), w0, w1, w2, w3);
            acc1 = step4(acc1, subgroupBroadcast(ya, 1u), w0, w1, w2, w3);
            acc2 = step4(acc2, subgroupBroadcast(ya, 2u), w0, w1, w2, w3);
            acc3 = step4(acc3, subgroupBroadcast(ya, 3u), w0, w1, w2, w3);
            acc4 = step4(acc4, subgroupBroadcast(ya, 4u), w0, w1, w2, w3);
            acc5 = step4(acc5, subgroupBroadcast(ya, 5u), w0, w1, w2, w3);
            acc6 = step4(acc6, subgroupBroadcast(ya, 6u), w0, w1, w2, w3);
            acc7 = step4(acc7, subgroupBroadcast(ya, 7u), w0, w1, w2, w3);
        }
    }
    if (q < sdx.n_chunks && cbl < sdx.cib_per_group) {
        let t0 = phase + sdx.stride * m0;
        sg_store_dx(b, t0, g, cbl, acc0);
        sg_store_dx(b, t0 + sdx.stride, g, cbl, acc1);
        sg_store_dx(b, t0 + 2u * sdx.stride, g, cbl, acc2);
        sg_store_dx(b, t0 + 3u * sdx.stride, g, cbl, acc3);
        sg_store_dx(b, t0 + 4u * sdx.stride, g, cbl, acc4);
        sg_store_dx(b, t0 + 5u * sdx.stride, g, cbl, acc5);
        sg_store_dx(b, t0 + 6u * sdx.stride, g, cbl, acc6);
        sg_store_dx(b, t0 + 7u * sdx.stride, g, cbl, acc7);
    }
}

// ---------------------------------------------------------------------------------------------------------
// dw, as conv1d_backward_weight: dW[co, n] = sum over one split's rows (b, to), in order, of
// dy[row, co] X[row, n], n = k Cg_in + ci, X[row, n] = x[b, to s + k - P, g Cg_in + ci] (0 in the padding).
// A workgroup's 8 subgroups share 8 output channels of one group (the rows of this product): lane l loads
// dy[row, co0 + l] and broadcasts it; each invocation owns 4 consecutive columns (one tap, 4 input
// channels: one vec4 load of x), 256 columns per workgroup. Needs Cg_in % 4 == 0. Same row splits as the
// old kernel (the launcher passes them), so the partials and their sum are the same bits.

struct SgDwParams {
    t_in: u32,
    c_in: u32,
    t_out: u32,
    c_out: u32,
    k: u32,
    stride: u32,
    padding: u32,
    cg_in: u32,
    cg_out: u32,
    n_cols: u32,              // K * Cg_in
    co_tiles_per_group: u32,  // ceil(Cg_out / 8)
    n_co_tiles: u32,          // G * co_tiles_per_group
    n_col_tiles: u32,         // ceil(n_cols / 256)
    rows: u32,                // B * T_out
    rows_per_split: u32,
    n_split: u32,
}

@group(0) @binding(0) var<uniform> sdw: SgDwParams;
@group(0) @binding(1) var<storage, read> sdw_dy: array<f32>;          // (B, T_out, C_out)
@group(0) @binding(2) var<storage, read> sdw_x4: array<vec4<f32>>;    // (B, T, C_in)
@group(0) @binding(3) var<storage, read_write> sdw_part: array<f32>;  // (n_split, C_out, Cg_in, K)

fn sg_store_dw(base: u32, co: u32, ci: u32, kk: u32, acc: vec4<f32>) {
    if (co >= sdw.cg_out) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        sdw_part[base + (co * sdw.cg_in + ci + j) * sdw.k + kk] = acc[j];
    }
}

@compute @workgroup_size(64)
fn conv1d_sg_backward_weight(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) li: u32,
                             @builtin(subgroup_invocation_id) lane: u32) {
    let wid = wg.x + wg.y * nwg.x;
    // Channel tiles fastest: concurrent workgroups read the same x columns.
    let ct = wid % sdw.n_co_tiles;
    let r = wid / sdw.n_co_tiles;
    let n0 = (r % sdw.n_col_tiles) * 256u + li * 4u;
    let split = min(r / sdw.n_col_tiles, sdw.n_split);
    let g = ct / sdw.co_tiles_per_group;
    let co0 = (ct % sdw.co_tiles_per_group) * 8u;
    // This lane's dy channel (clamped; the extra channels are dropped at the store).
    let dyc = g * sdw.cg_out + min(co0 + lane, sdw.cg_out - 1u);
    // n_cols % 4 == 0: the 4 columns n0.. lie in one tap whenever n0 < n_cols; past the edge, the last 4.
    let nc = min(n0, sdw.n_cols - 4u);
    let kk = nc / sdw.cg_in;
    let ci = nc % sdw.cg_in;
    let off = i32(kk) - i32(sdw.padding);
    let xo = (g * sdw.cg_in + ci) / 4u;
    let c_in4 = sdw.c_in / 4u;
    let t_in = i32(sdw.t_in);

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    // This split's rows in order, one batch row's frame range [ta, tb) at a time.
    let sc = min(split, sdw.n_split - 1u);
    let r1 = min(sdw.rows, (sc + 1u) * sdw.rows_per_split);
    var row = sc * sdw.rows_per_split;
    while (row < r1) {
        let b = row / sdw.t_out;
        let ta = row % sdw.t_out;
        let tb = min(sdw.t_out, ta + (r1 - row));
        var yi = row * sdw.c_out + dyc;
        for (var to = ta; to < tb; to++) {
            let d = sdw_dy[yi];
            yi += sdw.c_out;
            let tin = i32(to * sdw.stride) + off;
            let ok = tin >= 0 && tin < t_in;
            let xv = select(vec4<f32>(0.0), sdw_x4[(b * sdw.t_in + u32(clamp(tin, 0, t_in - 1))) * c_in4 + xo], ok);
            acc0 += subgroupBroadcast(d, 0u) * xv;
            acc1 += subgroupBroadcast(d, 1u) * xv;
            acc2 += subgroupBroadcast(d, 2u) * xv;
            acc3 += subgroupBroadcast(d, 3u) * xv;
            acc4 += subgroupBroadcast(d, 4u) * xv;
            acc5 += subgroupBroadcast(d, 5u) * xv;
            acc6 += subgroupBroadcast(d, 6u) * xv;
            acc7 += subgroupBroadcast(d, 7u) * xv;
        }
        row += tb - ta;
    }
    if (split < sdw.n_split && n0 < sdw.n_cols) {
        let base = split * sdw.c_out * sdw.n_cols + g * sdw.cg_out * sdw.n_cols;
        sg_store_dw(base, co0 + 0u, ci, kk, acc0);
        sg_store_dw(base, co0 + 1u, ci, kk, acc1);
        sg_store_dw(base, co0 + 2u, ci, kk, acc2);
        sg_store_dw(base, co0 + 3u, ci, kk, acc3);
        sg_store_dw(base, co0 + 4u, ci, kk, acc4);
        sg_store_dw(base, co0 + 5u, ci, kk, acc5);
        sg_store_dw(base, co0 + 6u, ci, kk, acc6);
        sg_store_dw(base, co0 + 7u, ci, kk, acc7);
    }
}
