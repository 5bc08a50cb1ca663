// Split-K's second pass (src/ops/matmul.rs, `split_k_for`): a product whose k range was cut into S slices,
// each slice's partial product computed by the one-pass kernels (alpha 1, no epilogue) into P [S, batch, M, N],
// is finished here with the one-pass kernels' epilogue (scale, bias, previous C, exact GELU):
//   C[b, i, j] = act(alpha * (P[0, b, i, j] + P[1, b, i, j] + ... + P[S-1, b, i, j]) + bias[b * bias_bs + j]).
// The slices are added in order, so the result is deterministic; it differs from the one-pass kernels' by
// rounding only (they sum k in one chain). Splitting gives small products (a few hundred rows) enough
// workgroups to fill a large GPU.

const FLAG_BIAS: u32 = 1u;
const FLAG_GELU: u32 = 2u;
const FLAG_ACCUMULATE: u32 = 4u;
const WG: u32 = 256u;

struct SplitParams {
    batch: u32,
    m: u32,
    n: u32,
    splits: u32,
    c_off: u32,
    c_bs: u32,
    c_rs: u32,
    c_cs: u32,
    alpha: f32,
    flags: u32, // FLAG_BIAS | FLAG_GELU | FLAG_ACCUMULATE, as in matmul.wgsl
    bias_bs: u32, // bias elements between batch items (0: one bias for all)
}

@group(0) @binding(0) var<uniform> sk_p: SplitParams;
@group(0) @binding(1) var<storage, read> sk_part: array<f32>;        // P (S, batch, M, N), contiguous
@group(0) @binding(2) var<storage, read> sk_bias: array<f32>;        // bias[b * bias_bs + j], or a dummy when !FLAG_BIAS
@group(0) @binding(3) var<storage, read_write> sk_c: array<f32>;     // C view

// One invocation per element of C; adjacent invocations on adjacent columns (coalesced reads of P).
@compute @workgroup_size(256)
fn matmul_split_k_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) li: u32) {
    let e = (wg.x + wg.y * nwg.x) * WG + li;
    let per_slice = sk_p.batch * sk_p.m * sk_p.n;
    if (e >= per_slice) {
        return;
    }
    var acc = sk_part[e];
    for (var s = 1u; s < sk_p.splits; s++) {
        acc += sk_part[s * per_slice + e];
    }
    let b = e / (sk_p.m * sk_p.n);
    let i = (e / sk_p.n) % sk_p.m;
    let j = e % sk_p.n;
    var v = sk_p.alpha * acc;
    if ((sk_p.flags & FLAG_BIAS) != 0u) {
        v = v + sk_bias[b * sk_p.bias_bs + j];
    }
    let idx = sk_p.c_off + b * sk_p.c_bs + i * sk_p.c_rs + j * sk_p.c_cs;
    if ((sk_p.flags & FLAG_ACCUMULATE) != 0u) {
        v = v + sk_c[idx];
    }
    if ((sk_p.flags & FLAG_GELU) != 0u) {
        v = gelu_exact(v);
    }
    sk_c[idx] = v;
}
