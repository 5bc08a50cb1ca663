// (No `enable subgroups;`: naga 30 accepts the subgroup builtins without it and rejects the directive.)

// Fused multi-head self-attention forward for inference on GPUs with subgroup operations (subgroups of 4 or
// more invocations, as every desktop GPU has): online softmax, no [T, T] score buffer, no workgroup memory
// and no barriers. Head dim 64.
//
// Per batch item b, head h and query row i (the head's 64 columns of q, k, v):
//   s_j = scaling * (q_i . k_j) over valid keys j, out_i = sum_j exp(s_j - max) v_j / sum_j exp(s_j - max);
// a row with no valid key gets zeros (as softmax.wgsl). Four consecutive invocations (a quad) share a query
// row, each holding 16 of its 64 dims of q and of the output in registers; a score is their four partial
// dot products added by two subgroup shuffles, so every invocation of the quad has it (the same bits in each:
// (p0 + p1) + (p2 + p3) in every lane, float addition being commutative). Keys and values are read from
// global memory, four keys per step: every quad of a workgroup reads the same key rows at the same time, so
// the caches serve them. A workgroup of 64 owns 16 query rows of one (b, h): 4x the invocations of the
// portable kernel (shaders/attention.wgsl, one row per invocation, 64 per workgroup), which left most of a
// large GPU idle, and none of its per-invocation arrays (q, the output and 32 scores), which a GPU compiler
// may put in local memory.
//
// q, k and v are read through a row stride and column offsets, so they can be three [B, T, D] tensors or
// the column blocks of one packed [B, T, 3 D] projection (the same buffer bound three times). Assumes, as
// every driver does for a 1-D workgroup, that subgroups are runs of consecutive invocation indices (so
// invocations 4r..4r+3 are one quad); the tests compare with the f64 reference on each adapter.

const LOWEST: f32 = -3.40282347e38; // the running max before any valid key
const ROWS: u32 = 16u;              // query rows per workgroup (four invocations each)

struct QuadParams {
    batch: u32,
    t: u32,
    heads: u32,
    blocks: u32,  // ceil(T / ROWS): query row blocks per (batch item, head)
    masked: u32,  // 0: no key mask (binding 4 is a dummy and never read)
    scaling: f32, // head_dim^-0.5
    row4: u32,    // vec4 between consecutive frames of q, k and v (D / 4; packed: 3 D / 4)
    q_col4: u32,  // q's first vec4 in a frame (0)
    k_col4: u32,  // k's (0; packed: D / 4)
    v_col4: u32,  // v's (0; packed: 2 D / 4)
    d4: u32,      // vec4 per frame of the output (D / 4)
}

@group(0) @binding(0) var<uniform> ap: QuadParams;
@group(0) @binding(1) var<storage, read> aq_q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> aq_k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> aq_v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> aq_mask: array<u32>;            // (B, T), 1 = valid key
@group(0) @binding(5) var<storage, read_write> aq_out: array<vec4<f32>>; // (B, T, D)

// acc + a . b as four fused multiply-adds in k order.
fn dot4(a: vec4<f32>, b: vec4<f32>, acc: f32) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
}

// The quad's score of the key row starting at vec4 `kq` (this invocation's 16 dims of it), unscaled.
fn quad_score(kq: u32, q0: vec4<f32>, q1: vec4<f32>, q2: vec4<f32>, q3: vec4<f32>) -> f32 {
    var s = dot4(q3, aq_k[kq + 3u], dot4(q2, aq_k[kq + 2u], dot4(q1, aq_k[kq + 1u], dot4(q0, aq_k[kq], 0.0))));
    s += subgroupShuffleXor(s, 1u);
    s += subgroupShuffleXor(s, 2u);
    return s;
}

// o + p_c v_c over the four keys (rows r_c), in key order, for vec4 `q` of this invocation's 16 dims.
fn add_values(o: vec4<f32>, p0: f32, p1: f32, p2: f32, p3: f32, r0: u32, r1: u32, r2: u32, r3: u32,
              q: u32) -> vec4<f32> {
    let c = ap.v_col4 + q;
    var acc = fma(vec4<f32>(p0), aq_v[r0 + c], o);
    acc = fma(vec4<f32>(p1), aq_v[r1 + c], acc);
    acc = fma(vec4<f32>(p2), aq_v[r2 + c], acc);
    return fma(vec4<f32>(p3), aq_v[r3 + c], acc);
}

fn key_valid(item: u32, j: u32) -> bool {
    return j < ap.t && (ap.masked == 0u || aq_mask[item + j] != 0u); // && short-circuits: j < T when read
}

@compute @workgroup_size(64)
fn attention_quad_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) li: u32) {
    let wid = wg.x + wg.y * nwg.x;
    if (wid >= ap.batch * ap.heads * ap.blocks) {
        return; // the whole workgroup is past the end of a folded grid (uniform: no shuffle loses a partner)
    }
    let rb = wid % ap.blocks;
    let h = (wid / ap.blocks) % ap.heads;
    let b = wid / (ap.blocks * ap.heads);
    let item = b * ap.t;
    let dims = h * 16u + (li % 4u) * 4u; // this invocation's first vec4 of the head's 16
    let i = rb * ROWS + li / 4u;         // its query row (rows past T compute on a clamped row, store nothing)

    let qq = (item + min(i, ap.t - 1u)) * ap.row4 + ap.q_col4 + dims;
    let q0 = aq_q[qq];
    let q1 = aq_q[qq + 1u];
    let q2 = aq_q[qq + 2u];
    let q3 = aq_q[qq + 3u];
    var o0 = vec4<f32>(0.0);
    var o1 = vec4<f32>(0.0);
    var o2 = vec4<f32>(0.0);
    var o3 = vec4<f32>(0.0);
    var m = LOWEST;
    var l = 0.0;
    // Four keys per step (clamped rows past T, excluded as invalid): one rescale of the output per four.
    // Named values rather than arrays indexed in a loop, which a GPU compiler may put in local memory.
    for (var j = 0u; j < ap.t; j += 4u) {
        let r0 = (item + min(j, ap.t - 1u)) * ap.row4 + dims;
        let r1 = (item + min(j + 1u, ap.t - 1u)) * ap.row4 + dims;
        let r2 = (item + min(j + 2u, ap.t - 1u)) * ap.row4 + dims;
        let r3 = (item + min(j + 3u, ap.t - 1u)) * ap.row4 + dims;
        let s0 = ap.scaling * quad_score(r0 + ap.k_col4, q0, q1, q2, q3);
        let s1 = ap.scaling * quad_score(r1 + ap.k_col4, q0, q1, q2, q3);
        let s2 = ap.scaling * quad_score(r2 + ap.k_col4, q0, q1, q2, q3);
        let s3 = ap.scaling * quad_score(r3 + ap.k_col4, q0, q1, q2, q3);
        let ok0 = key_valid(item, j);
        let ok1 = key_valid(item, j + 1u);
        let ok2 = key_valid(item, j + 2u);
        let ok3 = key_valid(item, j + 3u);
        var m_new = m;
        m_new = select(m_new, max(m_new, s0), ok0);
        m_new = select(m_new, max(m_new, s1), ok1);
        m_new = select(m_new, max(m_new, s2), ok2);
        m_new = select(m_new, max(m_new, s3), ok3);
        let alpha = exp(m - m_new); // 1 while no valid key has been seen (m = m_new = LOWEST)
        let p0 = select(0.0, exp(s0 - m_new), ok0);
        let p1 = select(0.0, exp(s1 - m_new), ok1);
        let p2 = select(0.0, exp(s2 - m_new), ok2);
        let p3 = select(0.0, exp(s3 - m_new), ok3);
        o0 = add_values(o0 * alpha, p0, p1, p2, p3, r0, r1, r2, r3, 0u);
        o1 = add_values(o1 * alpha, p0, p1, p2, p3, r0, r1, r2, r3, 1u);
        o2 = add_values(o2 * alpha, p0, p1, p2, p3, r0, r1, r2, r3, 2u);
        o3 = add_values(o3 * alpha, p0, p1, p2, p3, r0, r1, r2, r3, 3u);
        l = fma(l, alpha, ((p0 + p1) + p2) + p3);
        m = m_new;
    }
    if (i < ap.t) {
        // No valid key: l = 0 and o = 0; store zeros rather than 0/0.
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let dst = (item + i) * ap.d4 + dims;
        aq_out[dst] = o0 * inv;
        aq_out[dst + 1u] = o1 * inv;
        aq_out[dst + 2u] = o2 * inv;
        aq_out[dst + 3u] = o3 * inv;
    }
}
