// Fused multi-head self-attention forward for inference (online softmax, no [T, T] score buffer), portable:
// workgroup memory instead of subgroup broadcasts (shaders/attention_sg.wgsl is the lavapipe variant). Head
// dim 64. Not chosen by default: on an H100 it ran at 0.24-0.67x of the unfused path (64 query rows per
// workgroup leave most of a large GPU idle); src/ops/attention.rs keeps it for tests and forced use.
//
// Per batch item b, head h and query row i (columns h*64..h*64+64 of the [B, T, D] q, k, v, out):
//   s_j = scaling * (q_i . k_j) over valid keys j, out_i = sum_j exp(s_j - max) v_j / sum_j exp(s_j - max);
// a row with no valid key gets zeros (as softmax.wgsl). A workgroup owns 64 query rows of one (b, h), one per
// invocation, each holding its query row, running max m, running sum l and output row in registers. Keys and
// values stream through workgroup memory in blocks of 32 rows (16 KiB): every invocation loads 8 vec4 of
// each block, then each computes its row's 32 scores (fused multiply-adds in k order times the scaling, as
// the matmul kernels compute S, so the scores are bit-identical to the unfused path's), rescales by
// exp(m_old - m_new) when the max grows, and adds p_j v_j. Each key and value element is read from global
// memory once per 64 query rows.

const LOWEST: f32 = -3.40282347e38; // the running max before any valid key
const ROWS: u32 = 64u;    // query rows per workgroup (one per invocation)
const KB: u32 = 32u;      // keys per staged block

struct AttnParams {
    batch: u32,
    t: u32,
    d: u32,       // model dim D = heads * 64
    heads: u32,
    blocks: u32,  // ceil(T / ROWS): query row blocks per (batch item, head)
    masked: u32,  // 0: no key mask (binding 4 is a dummy and never read)
    scaling: f32, // head_dim^-0.5
}

@group(0) @binding(0) var<uniform> ap: AttnParams;
@group(0) @binding(1) var<storage, read> at_q: array<vec4<f32>>;        // (B, T, D)
@group(0) @binding(2) var<storage, read> at_k: array<vec4<f32>>;        // (B, T, D)
@group(0) @binding(3) var<storage, read> at_v: array<vec4<f32>>;        // (B, T, D)
@group(0) @binding(4) var<storage, read> at_mask: array<u32>;           // (B, T), 1 = valid key
@group(0) @binding(5) var<storage, read_write> at_out: array<vec4<f32>>; // (B, T, D)

var<workgroup> kb: array<vec4<f32>, 512>;   // (KB, 16): the block's key rows of this head
var<workgroup> vb: array<vec4<f32>, 512>;   // (KB, 16): its value rows
var<workgroup> valid: array<u32, 32>;       // (KB): 1 where the key exists and the mask allows it

// acc + a . b as four fused multiply-adds in k order (as the matmul kernels' fma4).
fn dot4(a: vec4<f32>, b: vec4<f32>, acc: f32) -> f32 {
    return fma(a.w, b.w, fma(a.z, b.z, fma(a.y, b.y, fma(a.x, b.x, acc))));
}

@compute @workgroup_size(64)
fn attention_fused_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) li: u32) {
    let wid = wg.x + wg.y * nwg.x;
    if (wid >= ap.batch * ap.heads * ap.blocks) {
        return; // the whole workgroup is past the end of a folded grid (uniform: no barrier is skipped by some)
    }
    let rb = wid % ap.blocks;
    let h = (wid / ap.blocks) % ap.heads;
    let b = wid / (ap.blocks * ap.heads);
    let d4 = ap.d / 4u;
    let item = b * ap.t;
    let col4 = h * 16u;
    let i = rb * ROWS + li; // this invocation's query row (rows past T compute on a clamped row, store nothing)

    var q: array<vec4<f32>, 16>;
    let qrow = (item + min(i, ap.t - 1u)) * d4 + col4;
    for (var p = 0u; p < 16u; p++) {
        q[p] = at_q[qrow + p];
    }
    var o: array<vec4<f32>, 16>;
    var m = LOWEST;
    var l = 0.0;
    for (var j0 = 0u; j0 < ap.t; j0 += KB) {
        // Stage the block: element e = li + 64 n of the (KB, 16) tiles, key row e / 16 (clamped), quad e % 16.
        for (var n = 0u; n < 8u; n++) {
            let e = li + ROWS * n;
            let src = (item + min(j0 + e / 16u, ap.t - 1u)) * d4 + col4 + e % 16u;
            kb[e] = at_k[src];
            vb[e] = at_v[src];
        }
        if (li < KB) {
            let j = j0 + li;
            var ok = j < ap.t;
            if (ok && ap.masked != 0u) {
                ok = at_mask[item + j] != 0u;
            }
            valid[li] = select(0u, 1u, ok);
        }
        workgroupBarrier();
        var s: array<f32, 32>;
        var m_new = m;
        for (var c = 0u; c < KB; c++) {
            var acc = 0.0;
            for (var p = 0u; p < 16u; p++) {
                acc = dot4(q[p], kb[c * 16u + p], acc);
            }
            s[c] = ap.scaling * acc;
            if (valid[c] != 0u) {
                m_new = max(m_new, s[c]);
            }
        }
        let alpha = exp(m - m_new); // 1 while no valid key has been seen (m = m_new = LOWEST)
        for (var p = 0u; p < 16u; p++) {
            o[p] *= alpha;
        }
        var sum = 0.0;
        for (var c = 0u; c < KB; c++) {
            let pc = select(0.0, exp(s[c] - m_new), valid[c] != 0u);
            sum += pc;
            for (var p = 0u; p < 16u; p++) {
                o[p] = fma(vec4<f32>(pc), vb[c * 16u + p], o[p]);
            }
        }
        l = fma(l, alpha, sum);
        m = m_new;
        workgroupBarrier();
    }
    if (i < ap.t) {
        // No valid key: l = 0 and o = 0; store zeros rather than 0/0.
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let dst = (item + i) * d4 + col4;
        for (var p = 0u; p < 16u; p++) {
            at_out[dst + p] = o[p] * inv;
        }
    }
}
