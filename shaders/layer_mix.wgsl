// The emotion classifier's learnable layer mix: y[b, d] = sum_l softmax(w)_l x[b, l, d].
// B = items, L = layers (hidden states mixed), D = feature size, N = B * D, M = B * L * D.
// Every invocation recomputes softmax(w) (L is a few dozen at most), so no pass writes it: the forward is one
// dispatch, and the order of every sum is fixed by the sizes alone (no atomics), so results are reproducible.
// Grids are 1-D, folded into 2-D when larger than 65535 workgroups: the linear workgroup id is
// wg.x + wg.y * num_wg.x.

const WG: u32 = 256u;

var<workgroup> tree: array<f32, 256>;

struct MixParams {
    b: u32, // B
    l: u32, // L
    d: u32, // D
}

@group(0) @binding(0) var<uniform> mix_p: MixParams;
@group(0) @binding(1) var<storage, read> mix_x: array<f32>;       // (B, L, D)
@group(0) @binding(2) var<storage, read> mix_w: array<f32>;       // (L) logits
@group(0) @binding(3) var<storage, read_write> mix_y: array<f32>; // (B, D)

// One invocation per output element (b, d).
@compute @workgroup_size(256)
fn layer_mix_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i >= mix_p.b * mix_p.d) {
        return;
    }
    let b = i / mix_p.d;
    let d = i % mix_p.d;
    // The largest logit, for a stable softmax.
    var m = mix_w[0];
    for (var k = 1u; k < mix_p.l; k = k + 1u) {
        m = max(m, mix_w[k]);
    }
    var z = 0.0;
    var acc = 0.0;
    for (var k = 0u; k < mix_p.l; k = k + 1u) {
        let e = exp(mix_w[k] - m);
        z = z + e;
        acc = acc + e * mix_x[(b * mix_p.l + k) * mix_p.d + d];
    }
    mix_y[i] = acc / z;
}

@group(0) @binding(0) var<uniform> dots_p: MixParams;
@group(0) @binding(1) var<storage, read> dots_x: array<f32>;       // (B, L, D)
@group(0) @binding(2) var<storage, read> dots_dy: array<f32>;      // (B, D)
@group(0) @binding(3) var<storage, read_write> dots_g: array<f32>; // (L)

// Backward, stage 1: g[l] = sum over (b, d) of dy[b, d] x[b, l, d], one workgroup per layer l (strided runs,
// then a fixed binary tree).
@compute @workgroup_size(256)
fn layer_mix_backward_dots(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) li: u32) {
    let l = wg.x + wg.y * nwg.x;
    if (l >= dots_p.l) {
        return;
    }
    let n = dots_p.b * dots_p.d;
    var acc = 0.0;
    for (var i = li; i < n; i = i + WG) {
        let b = i / dots_p.d;
        let d = i % dots_p.d;
        acc = acc + dots_dy[i] * dots_x[(b * dots_p.l + l) * dots_p.d + d];
    }
    tree[li] = acc;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if (li < s) {
            tree[li] = tree[li] + tree[li + s];
        }
    }
    if (li == 0u) {
        dots_g[l] = tree[0];
    }
}

@group(0) @binding(0) var<uniform> dw_p: MixParams;
@group(0) @binding(1) var<storage, read> dw_w: array<f32>;        // (L) logits
@group(0) @binding(2) var<storage, read> dw_g: array<f32>;        // (L) from layer_mix_backward_dots
@group(0) @binding(3) var<storage, read_write> dw_out: array<f32>; // (L)

// Backward, stage 2: the softmax's Jacobian, dw_l = a_l (g_l - sum_k a_k g_k) with a = softmax(w). One
// invocation per layer.
@compute @workgroup_size(256)
fn layer_mix_backward_weights(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) li: u32) {
    let l = (wg.x + wg.y * nwg.x) * WG + li;
    if (l >= dw_p.l) {
        return;
    }
    // The largest logit, for a stable softmax.
    var m = dw_w[0];
    for (var k = 1u; k < dw_p.l; k = k + 1u) {
        m = max(m, dw_w[k]);
    }
    var z = 0.0;
    var ag = 0.0;
    for (var k = 0u; k < dw_p.l; k = k + 1u) {
        let e = exp(dw_w[k] - m);
        z = z + e;
        ag = ag + e * dw_g[k];
    }
    let a = exp(dw_w[l] - m) / z;
    dw_out[l] = a * (dw_g[l] - ag / z);
}

@group(0) @binding(0) var<uniform> dx_p: MixParams;
@group(0) @binding(1) var<storage, read> dx_w: array<f32>;        // (L) logits
@group(0) @binding(2) var<storage, read> dx_dy: array<f32>;       // (B, D)
@group(0) @binding(3) var<storage, read_write> dx_out: array<f32>; // (B, L, D)

// Backward for the input: dx[b, l, d] = a_l dy[b, d]. One invocation per element of x.
@compute @workgroup_size(256)
fn layer_mix_backward_input(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i >= dx_p.b * dx_p.l * dx_p.d) {
        return;
    }
    let d = i % dx_p.d;
    let l = (i / dx_p.d) % dx_p.l;
    let b = i / (dx_p.d * dx_p.l);
    // The largest logit, for a stable softmax.
    var m = dx_w[0];
    for (var k = 1u; k < dx_p.l; k = k + 1u) {
        m = max(m, dx_w[k]);
    }
    var z = 0.0;
    for (var k = 0u; k < dx_p.l; k = k + 1u) {
        z = z + exp(dx_w[k] - m);
    }
    dx_out[i] = exp(dx_w[l] - m) / z * dx_dy[b * dx_p.d + d];
}
