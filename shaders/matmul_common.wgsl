// The parameters, bindings, B loads and epilogue that shaders/matmul.wgsl and shaders/matmul_sg.wgsl share:
// appended to each of them (`shader!("matmul", "matmul_common")` in src/ops/matmul.rs), so the two modules read
// one MatParams (the launcher's `params` in src/ops/matmul.rs, `record`) and store through one epilogue, and
// the f16-weight modules replace one B loads block.

const FLAG_BIAS: u32 = 1u;
const FLAG_GELU: u32 = 2u;
const FLAG_ACCUMULATE: u32 = 4u; // add the result to what C holds (attention backward sums over row chunks)

struct MatParams {
    batch: u32,
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    a_bs: u32,
    a_rs: u32,
    a_cs: u32,
    b_off: u32,
    b_bs: u32,
    b_rs: u32,
    b_cs: u32,
    c_off: u32,
    c_bs: u32,
    c_rs: u32,
    c_cs: u32,
    tiles_m: u32,
    tiles_n: u32,
    alpha: f32,
    flags: u32, // FLAG_BIAS | FLAG_GELU | FLAG_ACCUMULATE
    bias_bs: u32, // bias elements between batch items (0: one bias for all)
    // Split-K's slices as an outer batch (src/ops/matmul.rs, `launch_split_k`): batch item bt is item
    // bt % items of k slice bt / items, whose A, B and C start a_ks, b_ks, c_ks elements after slice 0's.
    // One slice (items = batch, strides 0) for every other product.
    items: u32,
    a_ks: u32,
    b_ks: u32,
    c_ks: u32,
}

@group(0) @binding(0) var<uniform> mp: MatParams;

// Where batch item bt's A, B and C start (see `items` above).
fn a_at(bt: u32) -> u32 {
    return mp.a_off + (bt / mp.items) * mp.a_ks + (bt % mp.items) * mp.a_bs;
}
fn b_at(bt: u32) -> u32 {
    return mp.b_off + (bt / mp.items) * mp.b_ks + (bt % mp.items) * mp.b_bs;
}
// (where its C starts, where its bias starts), computed once per block: the epilogue's stores add rows and
// columns to these.
fn item_out(bt: u32) -> vec2<u32> {
    return vec2<u32>(mp.c_off + (bt / mp.items) * mp.c_ks + (bt % mp.items) * mp.c_bs, (bt % mp.items) * mp.bias_bs);
}
// bias[(b % items) * bias_bs + j], or a dummy when !FLAG_BIAS
@group(0) @binding(3) var<storage, read> mm_bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> mm_c: array<f32>;    // C view
@group(0) @binding(1) var<storage, read> mm_a: array<f32>;          // A view (scalar loads)
// vec4 views (fast paths); indices are element indices / 4.
@group(0) @binding(1) var<storage, read> mm_a4: array<vec4<f32>>;   // A view, contiguous along k
// -- B loads: the f16-weight variant of a matmul module swaps this block for shaders/matmul_f16_weights.wgsl
// (`f16_weight_module` in src/ops/matmul.rs), so every kernel also runs with B stored as f16.
@group(0) @binding(2) var<storage, read> mm_b4: array<vec4<f32>>;   // B view, contiguous along k (nt4) or n (nn4)

fn load_b4(q: u32) -> vec4<f32> {
    return mm_b4[q];
}
// -- end of B loads

// The epilogue for one row of the block: scale, bias, previous C, activation, store inside the matrix only.
fn store_row(out: vec2<u32>, i: u32, j0: u32, acc: vec4<f32>) {
    if (i >= mp.m) {
        return;
    }
    let base = out.x + i * mp.c_rs;
    for (var c = 0u; c < 4u; c++) {
        let j = j0 + c;
        if (j < mp.n) {
            var v = mp.alpha * acc[c];
            if ((mp.flags & FLAG_BIAS) != 0u) {
                v = v + mm_bias[out.y + j];
            }
            let idx = base + j * mp.c_cs;
            if ((mp.flags & FLAG_ACCUMULATE) != 0u) {
                v = v + mm_c[idx];
            }
            if ((mp.flags & FLAG_GELU) != 0u) {
                v = gelu_exact(v);
            }
            mm_c[idx] = v;
        }
    }
}
