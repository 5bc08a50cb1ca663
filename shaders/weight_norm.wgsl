// Weight normalisation over dim 2 (torch weight_norm(conv, dim=2), the positional conv of wav2vec 2.0):
//   w[o, i, k] = g[k] * v[o, i, k] / n[k],   n[k] = ||v[:, :, k]||_2.
// v, w, dv, dw: (M, K) with M = O * I rows and k fastest (torch's [O, I, K] layout); g, n, dg: (K).
// One workgroup per k reduces over the M rows in a fixed order (deterministic). The element-wise passes
// (apply, dv) also come as vec4 entries for K % 4 == 0 (four consecutive k per invocation, the same
// arithmetic per element; lavapipe pays per load instruction).

const WG: u32 = 256u;

struct Params {
    m: u32,
    k: u32,
}

var<workgroup> partial: array<f32, 256>;

fn reduce(li: u32) {
    // Tree reduction of partial[0..256] into partial[0].
    var stride = WG / 2u;
    loop {
        if (stride == 0u) { break; }
        workgroupBarrier();
        if (li < stride) {
            partial[li] = partial[li] + partial[li + stride];
        }
        stride = stride / 2u;
    }
    workgroupBarrier();
}

@group(0) @binding(0) var<uniform> fp: Params;
@group(0) @binding(1) var<storage, read> f_v: array<f32>;             // (M, K)
@group(0) @binding(2) var<storage, read_write> f_norm: array<f32>;    // (K)

@compute @workgroup_size(256)
fn weight_norm_norms_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) li: u32) {
    let k = wg.x + wg.y * nwg.x;
    if (k >= fp.k) { return; }  // uniform per workgroup
    var s = 0.0;
    for (var r = li; r < fp.m; r += WG) {
        let x = f_v[r * fp.k + k];
        s += x * x;
    }
    partial[li] = s;
    reduce(li);
    if (li == 0u) {
        f_norm[k] = sqrt(partial[0]);
    }
}

@group(0) @binding(0) var<uniform> ap: Params;
@group(0) @binding(1) var<storage, read> a_g: array<f32>;            // (K)
@group(0) @binding(2) var<storage, read> a_v: array<f32>;            // (M, K)
@group(0) @binding(3) var<storage, read> a_norm: array<f32>;         // (K)
@group(0) @binding(4) var<storage, read_write> a_w: array<f32>;      // (M, K)
@group(0) @binding(1) var<storage, read> a_g4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> a_v4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> a_norm4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> a_w4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn weight_norm_apply_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < ap.m * ap.k) {
        let k = i % ap.k;
        a_w[i] = a_g[k] * a_v[i] / a_norm[k];
    }
}

@compute @workgroup_size(256)
fn weight_norm_apply_forward4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li; // elements 4 i .. 4 i + 3
    if (i < ap.m * ap.k / 4u) {
        let k = i % (ap.k / 4u);
        a_w4[i] = a_g4[k] * a_v4[i] / a_norm4[k];
    }
}

@group(0) @binding(0) var<uniform> bp: Params;
@group(0) @binding(1) var<storage, read> b_dw: array<f32>;           // (M, K)
@group(0) @binding(2) var<storage, read> b_v: array<f32>;            // (M, K)
@group(0) @binding(3) var<storage, read> b_norm: array<f32>;         // (K)
@group(0) @binding(4) var<storage, read_write> b_dg: array<f32>;     // (K)

// dg[k] = sum_r dw[r, k] * v[r, k] / n[k]
@compute @workgroup_size(256)
fn weight_norm_dg_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) li: u32) {
    let k = wg.x + wg.y * nwg.x;
    if (k >= bp.k) { return; }
    var s = 0.0;
    for (var r = li; r < bp.m; r += WG) {
        s += b_dw[r * bp.k + k] * b_v[r * bp.k + k];
    }
    partial[li] = s;
    reduce(li);
    if (li == 0u) {
        b_dg[k] = partial[0] / b_norm[k];
    }
}

@group(0) @binding(0) var<uniform> cp: Params;
@group(0) @binding(1) var<storage, read> c_dw: array<f32>;           // (M, K)
@group(0) @binding(2) var<storage, read> c_v: array<f32>;            // (M, K)
@group(0) @binding(3) var<storage, read> c_g: array<f32>;            // (K)
@group(0) @binding(4) var<storage, read> c_norm: array<f32>;         // (K)
@group(0) @binding(5) var<storage, read> c_dg: array<f32>;           // (K)
@group(0) @binding(6) var<storage, read_write> c_dv: array<f32>;     // (M, K)
@group(0) @binding(1) var<storage, read> c_dw4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> c_v4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> c_g4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> c_norm4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> c_dg4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> c_dv4: array<vec4<f32>>;

// dv = (g / n) * (dw - dg * v / n)
@compute @workgroup_size(256)
fn weight_norm_dv_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < cp.m * cp.k) {
        let k = i % cp.k;
        let n = c_norm[k];
        c_dv[i] = (c_g[k] / n) * (c_dw[i] - c_dg[k] * c_v[i] / n);
    }
}

@compute @workgroup_size(256)
fn weight_norm_dv_backward4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li; // elements 4 i .. 4 i + 3
    if (i < cp.m * cp.k / 4u) {
        let k = i % (cp.k / 4u);
        let n = c_norm4[k];
        c_dv4[i] = (c_g4[k] / n) * (c_dw4[i] - c_dg4[k] * c_v4[i] / n);
    }
}
