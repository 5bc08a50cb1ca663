// Channels-last 1-D convolution (wav2vec 2.0 feature encoder and grouped positional conv).
// Shapes: B batch, T input frames, C_in / C_out channels, K kernel taps, G groups,
// Cg_in = C_in / G, Cg_out = C_out / G, Cg_out_pad = Cg_out rounded up to a multiple of 4, T_out output frames.
// Grids are 1-D, folded into 2-D when larger than 65535 workgroups: the linear workgroup id is
// wg.x + wg.y * num_wg.x.

// ---------------------------------------------------------------------------------------------------------
// Weight packing: torch's (C_out, Cg_in, K) -> (G, K, Cg_in, Cg_out_pad), zero-padded, so that the conv reads
// 4 consecutive output channels of one tap and one input channel as a single aligned vec4.

struct PackParams {
    n: u32,          // G * K * Cg_in * Cg_out_pad
    k: u32,
    cg_in: u32,
    cg_out: u32,
    cg_out_pad: u32,
}

@group(0) @binding(0) var<uniform> pack_p: PackParams;
@group(0) @binding(1) var<storage, read> pack_w: array<f32>;         // (C_out, Cg_in, K)
@group(0) @binding(2) var<storage, read_write> pack_wt: array<f32>;  // (G, K, Cg_in, Cg_out_pad)

@compute @workgroup_size(256)
fn pack_weight(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * 256u + li;
    if (i >= pack_p.n) {
        return;
    }
    let co = i % pack_p.cg_out_pad;
    let r = i / pack_p.cg_out_pad;
    let ci = r % pack_p.cg_in;
    let r2 = r / pack_p.cg_in;
    let k = r2 % pack_p.k;
    let g = r2 / pack_p.k;
    var v = 0.0;
    if (co < pack_p.cg_out) {
        v = pack_w[((g * pack_p.cg_out + co) * pack_p.cg_in + ci) * pack_p.k + k];
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

// erfc(z), relative error < 1.2e-7 for every z (Numerical Recipes' Chebyshev fit `erfcc`).
// Copied from elementwise.wgsl (WGSL has no includes).
fn erfc_approx(z: f32) -> f32 {
    let a = abs(z);
    let t = 1.0 / (1.0 + 0.5 * a);
    let r = t * exp(-a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    return select(2.0 - r, r, z >= 0.0);
}

// Exact (erf) GELU, as torch.nn.GELU() by default: x * Phi(x) = 0.5 * x * erfc(-x / sqrt(2)).
fn gelu_exact(x: f32) -> f32 {
    return 0.5 * x * erfc_approx(-x * 0.70710678118654752);
}

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
