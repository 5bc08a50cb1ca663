// Deterministic reductions: every sum is taken in a fixed order that depends only on the sizes (per-thread
// strided runs, then fixed-shape workgroup trees), never on scheduling, and no atomics are used, so results
// are bit-identical run to run.
// N = element count, P = partial count, R = rows, C = columns (the last dimension), K = row chunks.
// Grids are 1-D, folded into 2-D when larger than 65535 workgroups: the linear workgroup id is
// wg.x + wg.y * num_wg.x.

const WG: u32 = 256u;

// Square each element before summing (sum of squares, for gradient norms).
override SQUARE: bool = false;

var<workgroup> tree: array<f32, 256>;

// Sums tree[0..256) pairwise (a fixed binary tree); the total ends in tree[0]. Every invocation of the
// workgroup must call it, after writing its own tree[li].
fn tree_sum(li: u32) {
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if (li < s) {
            tree[li] = tree[li] + tree[li + s];
        }
    }
    workgroupBarrier();
}

struct PartialParams {
    n: u32,        // elements in x
    chunk: u32,    // elements per workgroup (a multiple of WG)
    offset: u32,   // index of this call's first partial in `part_out`
    n_groups: u32, // partials written by this call
}

@group(0) @binding(0) var<uniform> part_p: PartialParams;
@group(0) @binding(1) var<storage, read> part_x: array<f32>;         // (N)
@group(0) @binding(2) var<storage, read_write> part_out: array<f32>; // (>= offset + n_groups)

// Stage 1 of a full sum: workgroup g sums x[g * chunk .. (g + 1) * chunk) (each invocation a strided run of
// chunk / WG elements, then the tree) into part_out[offset + g].
@compute @workgroup_size(256)
fn sum_partial_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) li: u32) {
    let g = wg.x + wg.y * nwg.x;
    if (g >= part_p.n_groups) {
        return;
    }
    let start = g * part_p.chunk;
    let end = min(start + part_p.chunk, part_p.n);
    var acc = 0.0;
    for (var i = start + li; i < end; i = i + WG) {
        let v = part_x[i];
        acc = acc + select(v, v * v, SQUARE);
    }
    tree[li] = acc;
    tree_sum(li);
    if (li == 0u) {
        part_out[part_p.offset + g] = tree[0];
    }
}

struct FinalParams {
    count: u32,   // partials to sum (P)
    divisor: f32, // the total is divided by this (1 for a sum, N for a mean)
    root: u32,    // 1: take the square root of the result (a norm)
}

@group(0) @binding(0) var<uniform> fin_p: FinalParams;
@group(0) @binding(1) var<storage, read> fin_part: array<f32>;      // (P)
@group(0) @binding(2) var<storage, read_write> fin_out: array<f32>; // (1)

// Stage 2: one workgroup sums the P partials (strided runs, then the tree) into one value.
@compute @workgroup_size(256)
fn sum_final_forward(@builtin(local_invocation_index) li: u32) {
    var acc = 0.0;
    for (var i = li; i < fin_p.count; i = i + WG) {
        acc = acc + fin_part[i];
    }
    tree[li] = acc;
    tree_sum(li);
    if (li == 0u) {
        let v = tree[0] / fin_p.divisor;
        fin_out[0] = select(v, sqrt(v), fin_p.root != 0u);
    }
}

struct BroadcastParams {
    n: u32,
    divisor: f32,
}

@group(0) @binding(0) var<uniform> bc_p: BroadcastParams;
@group(0) @binding(1) var<storage, read> bc_dy: array<f32>;        // (1)
@group(0) @binding(2) var<storage, read_write> bc_dx: array<f32>;  // (N)

// Backward of sum_all / mean_all: dx[i] = dy / divisor (1 for a sum, N for a mean).
@compute @workgroup_size(256)
fn sum_all_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < bc_p.n) {
        bc_dx[i] = bc_dy[0] / bc_p.divisor;
    }
}

struct RowsParams {
    rows: u32,     // R
    cols: u32,     // C
    chunk: u32,    // rows per partial
    n_chunks: u32, // K = ceil(R / chunk)
    n_wg_c: u32,   // column tiles of WG columns: ceil(C / WG)
}

@group(0) @binding(0) var<uniform> rows_p: RowsParams;
@group(0) @binding(1) var<storage, read> rows_x: array<f32>;            // (R, C)
@group(0) @binding(2) var<storage, read_write> rows_part: array<f32>;   // (K, C)

// Stage 1 of the column sums: workgroup (k, tile) sums rows [k * chunk, (k + 1) * chunk) of its WG columns,
// one column per invocation (coalesced across the invocations).
@compute @workgroup_size(256)
fn sum_rows_partial_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) li: u32) {
    let g = wg.x + wg.y * nwg.x;
    let k = g / rows_p.n_wg_c;
    let c = (g % rows_p.n_wg_c) * WG + li;
    if (k >= rows_p.n_chunks || c >= rows_p.cols) {
        return;
    }
    let r_end = min((k + 1u) * rows_p.chunk, rows_p.rows);
    var acc = 0.0;
    for (var r = k * rows_p.chunk; r < r_end; r = r + 1u) {
        acc = acc + rows_x[r * rows_p.cols + c];
    }
    rows_part[k * rows_p.cols + c] = acc;
}

@group(0) @binding(0) var<uniform> comb_p: RowsParams;
@group(0) @binding(1) var<storage, read> comb_part: array<f32>;      // (K, C)
@group(0) @binding(2) var<storage, read_write> comb_y: array<f32>;   // (C)

// Stage 2: y[c] = sum over the K partials of column c, in order.
@compute @workgroup_size(256)
fn sum_rows_combine_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) li: u32) {
    let c = (wg.x + wg.y * nwg.x) * WG + li;
    if (c >= comb_p.cols) {
        return;
    }
    var acc = 0.0;
    for (var k = 0u; k < comb_p.n_chunks; k = k + 1u) {
        acc = acc + comb_part[k * comb_p.cols + c];
    }
    comb_y[c] = acc;
}

@group(0) @binding(0) var<uniform> rbw_p: RowsParams;
@group(0) @binding(1) var<storage, read> rbw_dy: array<f32>;        // (C)
@group(0) @binding(2) var<storage, read_write> rbw_dx: array<f32>;  // (R, C)

// Backward of sum_rows: every row of dx is dy.
@compute @workgroup_size(256)
fn sum_rows_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < rbw_p.rows * rbw_p.cols) {
        rbw_dx[i] = rbw_dy[i % rbw_p.cols];
    }
}
