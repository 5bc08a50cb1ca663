// Row softmax, in place, numerically stable: y = exp(x - max) / sum(exp(x - max)) over each row of N,
// rows starting at element x_off. Backward (softmax_backward, at the end): g <- y * (g - sum(g * y)).
// Optional key mask: column j of a row in batch item b is a valid key when
// mask[mask_off + b * N + j] != 0, with b = row / rows_per_batch. Masked keys get exactly 0 (torch's -inf);
// a row with no valid key becomes all zeros (torch would give NaN; our models never produce such rows).
// One workgroup per row; the grid is folded into 2-D when larger than 65535 workgroups: the row is
// wg.x + wg.y * num_wg.x.

const WG: u32 = 128u;
// The lowest finite f32: the max of a row with no valid key.
const LOWEST: f32 = -3.40282347e38;

struct SoftmaxParams {
    rows: u32,
    n: u32,
    masked: u32, // 0: no mask (binding 2 is a dummy and never read)
    mask_off: u32,
    rows_per_batch: u32,
    x_off: u32, // first element of row 0
}

@group(0) @binding(0) var<uniform> sp: SoftmaxParams;
@group(0) @binding(1) var<storage, read_write> sm_x: array<f32>; // (rows, N) at x_off, overwritten with y
@group(0) @binding(2) var<storage, read> sm_mask: array<u32>;    // (B, N) at mask_off, 1 = valid key

var<workgroup> red: array<f32, WG>;

fn key_valid(mask_row: u32, j: u32) -> bool {
    return sp.masked == 0u || sm_mask[mask_row + j] != 0u;
}

@compute @workgroup_size(128)
fn softmax_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (row >= sp.rows) {
        return;
    }
    let base = sp.x_off + row * sp.n;
    var mask_row = 0u;
    if (sp.masked != 0u) {
        mask_row = sp.mask_off + (row / sp.rows_per_batch) * sp.n;
    }

    // Row max over valid keys.
    var m = LOWEST;
    for (var j = li; j < sp.n; j += WG) {
        if (key_valid(mask_row, j)) {
            m = max(m, sm_x[base + j]);
        }
    }
    red[li] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] = max(red[li], red[li + s]);
        }
        workgroupBarrier();
    }
    let row_max = red[0];
    workgroupBarrier(); // everyone has read red[0] before it is reused

    // exp(x - max), stored in place, and its sum. Each invocation later rereads only what it wrote.
    var sum = 0.0;
    for (var j = li; j < sp.n; j += WG) {
        var e = 0.0;
        if (key_valid(mask_row, j)) {
            e = exp(sm_x[base + j] - row_max);
        }
        sm_x[base + j] = e;
        sum += e;
    }
    red[li] = sum;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // No valid key: every e is 0 already; leave zeros instead of 0/0.
    if (total > 0.0) {
        for (var j = li; j < sp.n; j += WG) {
            sm_x[base + j] = sm_x[base + j] / total;
        }
    }
}

// ---- Backward: dx = y * (dy - sum_j dy_j y_j) per row, in place over dy. ----
// Masked keys have y = 0, so they get 0 with no mask needed; an all-masked row (y = 0) gets zeros.
// One workgroup per row, as the forward.

struct SoftmaxBwdParams {
    rows: u32,
    n: u32,
    y_off: u32, // first element of row 0 in sb_y
    g_off: u32, // first element of row 0 in sb_g
}

@group(0) @binding(0) var<uniform> sbp: SoftmaxBwdParams;
@group(0) @binding(1) var<storage, read> sb_y: array<f32>;       // (rows, N) at y_off: the softmax output
@group(0) @binding(2) var<storage, read_write> sb_g: array<f32>; // (rows, N) at g_off: dL/dy in, dL/dx out

@compute @workgroup_size(128)
fn softmax_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (row >= sbp.rows) {
        return;
    }
    let yb = sbp.y_off + row * sbp.n;
    let gb = sbp.g_off + row * sbp.n;
    var dot = 0.0;
    for (var j = li; j < sbp.n; j += WG) {
        dot = fma(sb_g[gb + j], sb_y[yb + j], dot);
    }
    red[li] = dot;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // Each invocation rewrites only the elements it read.
    for (var j = li; j < sbp.n; j += WG) {
        sb_g[gb + j] = sb_y[yb + j] * (sb_g[gb + j] - total);
    }
}
