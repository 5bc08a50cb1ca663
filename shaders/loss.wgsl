// The MLKD distillation loss pieces: L1 (mean |p - t|), per-frame cosine similarity, log-sigmoid.
// N = element count, R = rows (frames, B * T), D = feature size (the last dimension), P = partial count.
// Grids are 1-D, folded into 2-D when larger than 65535 workgroups: the linear workgroup id is
// wg.x + wg.y * num_wg.x.

const WG: u32 = 256u;

var<workgroup> tree_a: array<f32, 256>;
var<workgroup> tree_b: array<f32, 256>;
var<workgroup> tree_c: array<f32, 256>;

// Pairwise sums of tree_a (and tree_b, tree_c when `three`) over a fixed binary tree; totals end in [0].
// Every invocation of the workgroup must call it after writing its own entries.
fn tree_sum(li: u32, three: bool) {
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if (li < s) {
            tree_a[li] = tree_a[li] + tree_a[li + s];
            if (three) {
                tree_b[li] = tree_b[li] + tree_b[li + s];
                tree_c[li] = tree_c[li] + tree_c[li + s];
            }
        }
    }
    workgroupBarrier();
}

// Same layout as reduce.wgsl's PartialParams: stage 2 (the total) is reduce.wgsl's sum_final_forward.
struct PartialParams {
    n: u32,        // elements
    chunk: u32,    // elements per workgroup (a multiple of WG)
    offset: u32,   // index of the first partial written
    n_groups: u32, // partials written
}

@group(0) @binding(0) var<uniform> l1_p: PartialParams;
@group(0) @binding(1) var<storage, read> l1_pred: array<f32>;       // (N)
@group(0) @binding(2) var<storage, read> l1_target: array<f32>;     // (N)
@group(0) @binding(3) var<storage, read_write> l1_part: array<f32>; // (P)

// Stage 1 of sum |p - t|: workgroup g sums its chunk (strided runs, then the tree) into l1_part[offset + g].
@compute @workgroup_size(256)
fn l1_partial_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let g = wg.x + wg.y * nwg.x;
    if (g >= l1_p.n_groups) {
        return;
    }
    let start = g * l1_p.chunk;
    let end = min(start + l1_p.chunk, l1_p.n);
    var acc = 0.0;
    for (var i = start + li; i < end; i = i + WG) {
        acc = acc + abs(l1_pred[i] - l1_target[i]);
    }
    tree_a[li] = acc;
    tree_sum(li, false);
    if (li == 0u) {
        l1_part[l1_p.offset + g] = tree_a[0];
    }
}

struct CountParams {
    n: u32,
}

@group(0) @binding(0) var<uniform> l1bw_p: CountParams;
@group(0) @binding(1) var<storage, read> l1bw_pred: array<f32>;      // (N)
@group(0) @binding(2) var<storage, read> l1bw_target: array<f32>;    // (N)
@group(0) @binding(3) var<storage, read> l1bw_dloss: array<f32>;     // (1)
@group(0) @binding(4) var<storage, read_write> l1bw_dp: array<f32>; // (N)

// d mean|p - t| / dp = sign(p - t) / N (sign(0) = 0, as torch), times the loss gradient.
@compute @workgroup_size(256)
fn l1_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < l1bw_p.n) {
        l1bw_dp[i] = sign(l1bw_pred[i] - l1bw_target[i]) * (l1bw_dloss[0] / f32(l1bw_p.n));
    }
}

struct CosParams {
    rows: u32, // R
    d: u32,    // D
    eps: f32,  // norms are clamped to at least eps (torch: 1e-8)
}

@group(0) @binding(0) var<uniform> cos_p: CosParams;
@group(0) @binding(1) var<storage, read> cos_pred: array<f32>;          // (R, D)
@group(0) @binding(2) var<storage, read> cos_target: array<f32>;        // (R, D)
@group(0) @binding(3) var<storage, read_write> cos_out: array<f32>;     // (R)
@group(0) @binding(4) var<storage, read_write> cos_norms: array<f32>;   // (R, 2) = (|p_r|, |t_r|), unclamped

// One workgroup per row: cos = p.t / (max(|p|, eps) * max(|t|, eps)), torch's cosine_similarity.
@compute @workgroup_size(256)
fn cosine_rows_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) li: u32) {
    let r = wg.x + wg.y * nwg.x;
    if (r >= cos_p.rows) {
        return;
    }
    let base = r * cos_p.d;
    var pp = 0.0;
    var tt = 0.0;
    var pt = 0.0;
    for (var j = li; j < cos_p.d; j = j + WG) {
        let a = cos_pred[base + j];
        let b = cos_target[base + j];
        pp = pp + a * a;
        tt = tt + b * b;
        pt = pt + a * b;
    }
    tree_a[li] = pp;
    tree_b[li] = tt;
    tree_c[li] = pt;
    tree_sum(li, true);
    if (li == 0u) {
        let np = sqrt(tree_a[0]);
        let nt = sqrt(tree_b[0]);
        cos_out[r] = tree_c[0] / (max(np, cos_p.eps) * max(nt, cos_p.eps));
        cos_norms[2u * r] = np;
        cos_norms[2u * r + 1u] = nt;
    }
}

struct CosBwParams {
    n: u32,   // R * D
    d: u32,   // D
    eps: f32, // as in the forward
}

@group(0) @binding(0) var<uniform> cbw_p: CosBwParams;
@group(0) @binding(1) var<storage, read> cbw_pred: array<f32>;       // (R, D)
@group(0) @binding(2) var<storage, read> cbw_target: array<f32>;     // (R, D)
@group(0) @binding(3) var<storage, read> cbw_cos: array<f32>;        // (R) the forward's output
@group(0) @binding(4) var<storage, read> cbw_norms: array<f32>;      // (R, 2) the forward's (|p|, |t|)
@group(0) @binding(5) var<storage, read> cbw_dcos: array<f32>;       // (R)
@group(0) @binding(6) var<storage, read_write> cbw_dp: array<f32>;   // (R, D)

// dp = g * (t / (cp * ct) - cos / cp * p / |p|), cp = max(|p|, eps), ct = max(|t|, eps): torch's autograd of
// its cosine_similarity (the clamp is applied without gradient, so the norm's own derivative p / |p| stays,
// taken as 0 for p = 0).
@compute @workgroup_size(256)
fn cosine_rows_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i >= cbw_p.n) {
        return;
    }
    let r = i / cbw_p.d;
    let np = cbw_norms[2u * r];
    let cp = max(np, cbw_p.eps);
    let ct = max(cbw_norms[2u * r + 1u], cbw_p.eps);
    let g = cbw_dcos[r];
    let a = g / (cp * ct);
    let b = select(0.0, g * cbw_cos[r] / (cp * np), np > 0.0);
    cbw_dp[i] = a * cbw_target[i] - b * cbw_pred[i];
}

@group(0) @binding(0) var<uniform> ls_p: CountParams;
@group(0) @binding(1) var<storage, read> ls_x: array<f32>;       // (N)
@group(0) @binding(2) var<storage, read_write> ls_y: array<f32>; // (N)

// log(1 + z) for z in [0, 1] to full f32 relative precision without the hardware log (whose error near 1 is
// only bounded absolutely): log1p(z) = 2 atanh(s), s = z / (2 + z) <= 1/3, by its odd series to s^15
// (the next term is below 2e-9 relative).
fn log1p_unit(z: f32) -> f32 {
    let s = z / (2.0 + z);
    let s2 = s * s;
    let series = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0
        + s2 * (1.0 / 13.0 + s2 * (1.0 / 15.0)))))));
    return 2.0 * s * series;
}

// log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), stable for every x (torch's formula).
@compute @workgroup_size(256)
fn log_sigmoid_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < ls_p.n) {
        let x = ls_x[i];
        ls_y[i] = min(x, 0.0) - log1p_unit(exp(-abs(x)));
    }
}

@group(0) @binding(0) var<uniform> lsbw_p: CountParams;
@group(0) @binding(1) var<storage, read> lsbw_x: array<f32>;        // (N) the forward's input
@group(0) @binding(2) var<storage, read> lsbw_dy: array<f32>;       // (N)
@group(0) @binding(3) var<storage, read_write> lsbw_dx: array<f32>; // (N)

// d log sigmoid(x) / dx = sigmoid(-x), from e = exp(-|x|) so that nothing overflows:
// x >= 0: e / (1 + e); x < 0: 1 / (1 + e).
@compute @workgroup_size(256)
fn log_sigmoid_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < lsbw_p.n) {
        let x = lsbw_x[i];
        let e = exp(-abs(x));
        lsbw_dx[i] = lsbw_dy[i] * select(1.0, e, x >= 0.0) / (1.0 + e);
    }
}

// Weighted cross-entropy of the emotion classifier (torch's cross_entropy with `weight`, reduction "mean"):
// loss = sum_b w[y_b] * (-log softmax(x_b)[y_b]) / sum_b w[y_b]. B = rows (items), C = classes.
// A row whose label is not below C contributes nothing (a kernel cannot report an error; callers check
// labels on the host).

struct CeParams {
    rows: u32,    // B
    classes: u32, // C
}

@group(0) @binding(0) var<uniform> cer_p: CeParams;
@group(0) @binding(1) var<storage, read> cer_logits: array<f32>;       // (B, C)
@group(0) @binding(2) var<storage, read> cer_labels: array<u32>;       // (B)
@group(0) @binding(3) var<storage, read> cer_weights: array<f32>;      // (C)
@group(0) @binding(4) var<storage, read_write> cer_probs: array<f32>;  // (B, C) softmax, for the backward
@group(0) @binding(5) var<storage, read_write> cer_terms: array<f32>;  // (B, 2) = (w_y * nll, w_y)

// Stage 1, one invocation per row: log-sum-exp with the max subtracted, the softmax, and the row's weighted
// negative log-likelihood lse - x_y.
@compute @workgroup_size(256)
fn cross_entropy_rows_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) li: u32) {
    let r = (wg.x + wg.y * nwg.x) * WG + li;
    if (r >= cer_p.rows) {
        return;
    }
    let c = cer_p.classes;
    let base = r * c;
    var m = cer_logits[base];
    for (var j = 1u; j < c; j = j + 1u) {
        m = max(m, cer_logits[base + j]);
    }
    var z = 0.0;
    for (var j = 0u; j < c; j = j + 1u) {
        z = z + exp(cer_logits[base + j] - m);
    }
    for (var j = 0u; j < c; j = j + 1u) {
        cer_probs[base + j] = exp(cer_logits[base + j] - m) / z;
    }
    let y = cer_labels[r];
    var nll = 0.0;
    var w = 0.0;
    if (y < c) {
        w = cer_weights[y];
        nll = w * (m + log(z) - cer_logits[base + y]);
    }
    cer_terms[2u * r] = nll;
    cer_terms[2u * r + 1u] = w;
}

@group(0) @binding(0) var<uniform> cet_p: CeParams;
@group(0) @binding(1) var<storage, read> cet_terms: array<f32>;        // (B, 2)
@group(0) @binding(2) var<storage, read_write> cet_loss: array<f32>;   // (1)
@group(0) @binding(3) var<storage, read_write> cet_wsum: array<f32>;   // (1) sum_b w_y, for the backward

// Stage 2, one workgroup: the two sums over rows (strided runs, then the fixed tree), then their ratio
// (0 when every row's weight is 0, rather than 0 / 0).
@compute @workgroup_size(256)
fn cross_entropy_total_forward(@builtin(local_invocation_index) li: u32) {
    var nll = 0.0;
    var w = 0.0;
    for (var r = li; r < cet_p.rows; r = r + WG) {
        nll = nll + cet_terms[2u * r];
        w = w + cet_terms[2u * r + 1u];
    }
    tree_a[li] = nll;
    tree_b[li] = w;
    tree_c[li] = 0.0;
    tree_sum(li, true);
    if (li == 0u) {
        let total_w = tree_b[0];
        cet_loss[0] = select(0.0, tree_a[0] / total_w, total_w != 0.0);
        cet_wsum[0] = total_w;
    }
}

@group(0) @binding(0) var<uniform> cebw_p: CeParams;
@group(0) @binding(1) var<storage, read> cebw_probs: array<f32>;       // (B, C) the forward's softmax
@group(0) @binding(2) var<storage, read> cebw_labels: array<u32>;      // (B)
@group(0) @binding(3) var<storage, read> cebw_weights: array<f32>;     // (C)
@group(0) @binding(4) var<storage, read> cebw_wsum: array<f32>;        // (1) the forward's sum_b w_y
@group(0) @binding(5) var<storage, read> cebw_dloss: array<f32>;       // (1)
@group(0) @binding(6) var<storage, read_write> cebw_dx: array<f32>;    // (B, C)

// dlogits[b, c] = dloss * w_{y_b} / sum w * (softmax(x_b)_c - [c == y_b]).
@compute @workgroup_size(256)
fn cross_entropy_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i >= cebw_p.rows * cebw_p.classes) {
        return;
    }
    let r = i / cebw_p.classes;
    let j = i % cebw_p.classes;
    let y = cebw_labels[r];
    let total_w = cebw_wsum[0];
    var g = 0.0;
    if (y < cebw_p.classes && total_w != 0.0) {
        let onehot = select(0.0, 1.0, j == y);
        g = cebw_dloss[0] * cebw_weights[y] / total_w * (cebw_probs[i] - onehot);
    }
    cebw_dx[i] = g;
}
