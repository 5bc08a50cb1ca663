// Batched strided matmul with a fused epilogue:
//   C[b, i, j] = act(alpha * sum_p A[b, i, p] * B[b, p, j] + bias[b * bias_bs + j])
// with A[b, i, p] = a[a_off + b * a_bs + i * a_rs + p * a_cs], B[b, p, j] and C[b, i, j] likewise
// (offsets and strides in f32 elements; the launcher checks every view stays inside its buffer).
//
// Each invocation computes a 4x4 register block of C so that every value it loads is used four times; a
// workgroup of 8x8 invocations covers a 32x32 tile. No workgroup memory: on CPU drivers (lavapipe) barriers
// cost more than the loads they save, and on GPUs the caches catch the reuse between neighbouring blocks.
// Rows and columns past the edge are clamped for loading (always in bounds) and skipped when storing.
//
// (Backward: dA = dC B^T and dB = A^T dC are the same kernels over swapped strides; only the bias gradient,
// column sums of dC, has a kernel of its own, linear_backward_bias at the end of this file.)
//
// Three entry points share the epilogue and differ only in how they load:
//   matmul_nt4_forward: A and B both contiguous along k (B is a torch [out, in] weight, or K for Q K^T),
//                       vec4 loads along k; needs k % 4 == 0 and 16-byte aligned rows.
//   matmul_nn4_forward: B contiguous along n (row-major [k, n], e.g. V), vec4 loads of B rows; needs
//                       n % 4 == 0 and 16-byte aligned B rows. A is read with scalar strided loads.
//   matmul_forward:     any strides, scalar loads.
// All three accumulate every output in k order with fused multiply-adds, so they give bit-identical
// results (and the chunking of attention cannot change a result).
//   matmul_tiled_nt4_forward, matmul_tiled_nn4_forward: the nt4 and nn4 layouts with 64 x 64 tiles staged in
//                       workgroup memory (further down), for GPUs where that beats the caches;
//   matmul_tiled8_nt4_forward, matmul_tiled8_nn4_forward: the same with 128 x 128 tiles, for large products.
// Every kernel also exists with B (a weight) stored as f16: see the "B loads" block of matmul_common.wgsl.
// Grids are 1-D over (batch, row tile, column tile), folded into 2-D when larger than 65535 workgroups: the
// linear workgroup id is wg.x + wg.y * num_wg.x.

const TILE: u32 = 32u; // rows (and columns) of C per workgroup

// FLAG_*, MatParams (`mp`), a_at, b_at, item_out, the A, bias and C bindings, the B loads block and the
// epilogue (store_row): shaders/matmul_common.wgsl, appended.
// Scalar view of B (the general path; A's scalar view mm_a is shared).
@group(0) @binding(2) var<storage, read> mm_b: array<f32>;          // B view

// erfc_approx and gelu_exact: shaders/common.wgsl.

// (batch, first row, first column) of this invocation's block; batch == mp.batch when the workgroup is
// past the end of the grid.
fn block_origin(wg: vec3<u32>, nwg: vec3<u32>, li: u32) -> vec3<u32> {
    let wid = wg.x + wg.y * nwg.x;
    let per_batch = mp.tiles_m * mp.tiles_n;
    let bt = wid / per_batch;
    let r = wid % per_batch;
    // Neighbouring invocations share A rows and step along columns.
    let i0 = (r / mp.tiles_n) * TILE + (li / 8u) * 4u;
    let j0 = (r % mp.tiles_n) * TILE + (li % 8u) * 4u;
    return vec3<u32>(bt, i0, j0);
}

// Four k steps of one row: acc[c] += x[q] * yt[q][c] for q = 0..3, fused multiply-adds in k order.
fn fma4(acc: vec4<f32>, x: vec4<f32>, yt: mat4x4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(x.w), yt[3], fma(vec4<f32>(x.z), yt[2], fma(vec4<f32>(x.y), yt[1],
        fma(vec4<f32>(x.x), yt[0], acc))));
}

fn store_block(o: vec3<u32>, acc0: vec4<f32>, acc1: vec4<f32>, acc2: vec4<f32>, acc3: vec4<f32>) {
    let out = item_out(o.x);
    store_row(out, o.y, o.z, acc0);
    store_row(out, o.y + 1u, o.z, acc1);
    store_row(out, o.y + 2u, o.z, acc2);
    store_row(out, o.y + 3u, o.z, acc3);
}

@compute @workgroup_size(64)
fn matmul_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let o = block_origin(wg, nwg, li);
    if (o.x >= mp.batch || o.y >= mp.m || o.z >= mp.n) {
        return;
    }
    let a_base = a_at(o.x);
    let b_base = b_at(o.x);
    let ar0 = a_base + min(o.y, mp.m - 1u) * mp.a_rs;
    let ar1 = a_base + min(o.y + 1u, mp.m - 1u) * mp.a_rs;
    let ar2 = a_base + min(o.y + 2u, mp.m - 1u) * mp.a_rs;
    let ar3 = a_base + min(o.y + 3u, mp.m - 1u) * mp.a_rs;
    let bc0 = b_base + min(o.z, mp.n - 1u) * mp.b_cs;
    let bc1 = b_base + min(o.z + 1u, mp.n - 1u) * mp.b_cs;
    let bc2 = b_base + min(o.z + 2u, mp.n - 1u) * mp.b_cs;
    let bc3 = b_base + min(o.z + 3u, mp.n - 1u) * mp.b_cs;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var p = 0u; p < mp.k; p++) {
        let ao = p * mp.a_cs;
        let bo = p * mp.b_rs;
        let x = vec4<f32>(mm_a[ar0 + ao], mm_a[ar1 + ao], mm_a[ar2 + ao], mm_a[ar3 + ao]);
        let y = vec4<f32>(mm_b[bc0 + bo], mm_b[bc1 + bo], mm_b[bc2 + bo], mm_b[bc3 + bo]);
        acc0 = fma(vec4<f32>(x.x), y, acc0);
        acc1 = fma(vec4<f32>(x.y), y, acc1);
        acc2 = fma(vec4<f32>(x.z), y, acc2);
        acc3 = fma(vec4<f32>(x.w), y, acc3);
    }
    store_block(o, acc0, acc1, acc2, acc3);
}

@compute @workgroup_size(64)
fn matmul_nt4_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let o = block_origin(wg, nwg, li);
    if (o.x >= mp.batch || o.y >= mp.m || o.z >= mp.n) {
        return;
    }
    // Element offsets of each row of A and each column of B (both contiguous along k), in vec4 units.
    let a_base = a_at(o.x);
    let b_base = b_at(o.x);
    let ar0 = (a_base + min(o.y, mp.m - 1u) * mp.a_rs) / 4u;
    let ar1 = (a_base + min(o.y + 1u, mp.m - 1u) * mp.a_rs) / 4u;
    let ar2 = (a_base + min(o.y + 2u, mp.m - 1u) * mp.a_rs) / 4u;
    let ar3 = (a_base + min(o.y + 3u, mp.m - 1u) * mp.a_rs) / 4u;
    let bc0 = (b_base + min(o.z, mp.n - 1u) * mp.b_cs) / 4u;
    let bc1 = (b_base + min(o.z + 1u, mp.n - 1u) * mp.b_cs) / 4u;
    let bc2 = (b_base + min(o.z + 2u, mp.n - 1u) * mp.b_cs) / 4u;
    let bc3 = (b_base + min(o.z + 3u, mp.n - 1u) * mp.b_cs) / 4u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let k4 = mp.k / 4u;
    for (var p = 0u; p < k4; p++) {
        let x0 = mm_a4[ar0 + p];
        let x1 = mm_a4[ar1 + p];
        let x2 = mm_a4[ar2 + p];
        let x3 = mm_a4[ar3 + p];
        let y0 = load_b4(bc0 + p);
        let y1 = load_b4(bc1 + p);
        let y2 = load_b4(bc2 + p);
        let y3 = load_b4(bc3 + p);
        // Columns of yt are B[p.., j0..j0+3] for one p each: acc_r[c] += sum_p x_r[p] * y_c[p], in order.
        let yt = transpose(mat4x4<f32>(y0, y1, y2, y3));
        acc0 = fma4(acc0, x0, yt);
        acc1 = fma4(acc1, x1, yt);
        acc2 = fma4(acc2, x2, yt);
        acc3 = fma4(acc3, x3, yt);
    }
    store_block(o, acc0, acc1, acc2, acc3);
}

@compute @workgroup_size(64)
fn matmul_nn4_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let o = block_origin(wg, nwg, li);
    if (o.x >= mp.batch || o.y >= mp.m || o.z >= mp.n) {
        return;
    }
    let a_base = a_at(o.x);
    let ar0 = a_base + min(o.y, mp.m - 1u) * mp.a_rs;
    let ar1 = a_base + min(o.y + 1u, mp.m - 1u) * mp.a_rs;
    let ar2 = a_base + min(o.y + 2u, mp.m - 1u) * mp.a_rs;
    let ar3 = a_base + min(o.y + 3u, mp.m - 1u) * mp.a_rs;
    // n % 4 == 0 and o.z < n, so the 4 columns o.z.. are inside the row; vec4 units.
    let bcol = (b_at(o.x) + o.z) / 4u;
    let brs = mp.b_rs / 4u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var p = 0u; p < mp.k; p++) {
        let ao = p * mp.a_cs;
        let y = load_b4(bcol + p * brs);
        acc0 = fma(vec4<f32>(mm_a[ar0 + ao]), y, acc0);
        acc1 = fma(vec4<f32>(mm_a[ar1 + ao]), y, acc1);
        acc2 = fma(vec4<f32>(mm_a[ar2 + ao]), y, acc2);
        acc3 = fma(vec4<f32>(mm_a[ar3 + ao]), y, acc3);
    }
    store_block(o, acc0, acc1, acc2, acc3);
}

// ---- Workgroup-memory tiled kernels, for GPUs with fast shared memory (chosen in src/ops/matmul.rs) ----
// A workgroup of 16 x 16 invocations computes a 64 x 64 tile of C, each invocation a 4 x 4 block as above.
// For every chunk of WT_K k steps the workgroup first stages A[64 rows, WT_K] and B[WT_K, 64 columns] in
// workgroup memory (each invocation loads one vec4, or four scalars, of each), so each element read from global
// memory serves 64 multiply-adds instead of 4. Same k order and fused multiply-adds as the kernels above, so
// the results are bit-identical to them. Staged transposed: wt_a[p * 16 + q] holds A rows 4q..4q+3 at k
// step p, wt_b[p * 16 + q] B columns 4q..4q+3, so the inner loop reads one vec4 of each per k step.

const WT: u32 = 64u;   // rows and columns of C per workgroup (Kernel::Tiled* in src/ops/matmul.rs)
const WT_K: u32 = 16u; // k steps per staged chunk

var<workgroup> wt_a: array<vec4<f32>, 256>; // (WT_K, WT / 4)
var<workgroup> wt_b: array<vec4<f32>, 256>; // (WT_K, WT / 4)

// (batch, first row, first column) of the workgroup's tile.
fn tiled_origin(wg: vec3<u32>, nwg: vec3<u32>) -> vec3<u32> {
    let wid = wg.x + wg.y * nwg.x;
    let per_batch = mp.tiles_m * mp.tiles_n;
    let r = wid % per_batch;
    return vec3<u32>(wid / per_batch, (r / mp.tiles_n) * WT, (r % mp.tiles_n) * WT);
}

// Stage one row-quad's four k values (a vec4 along k) transposed: k step p0 + c goes to wt[(p0 + c) * 16 + row / 4].
fn stage_a_along_k(row: u32, p0: u32, v: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        wt_a[(p0 + c) * 16u + row / 4u][row % 4u] = v[c];
    }
}

fn stage_b_along_k(col: u32, p0: u32, v: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        wt_b[(p0 + c) * 16u + col / 4u][col % 4u] = v[c];
    }
}

// Multiply-adds over the staged chunk (kn <= WT_K steps) into one invocation's 4 x 4 block.
fn tiled_chunk(kn: u32, ty: u32, tx: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var p = 0u; p < kn; p++) {
        let x = wt_a[p * 16u + ty];
        let y = wt_b[p * 16u + tx];
        (*acc)[0] = fma(vec4<f32>(x.x), y, (*acc)[0]);
        (*acc)[1] = fma(vec4<f32>(x.y), y, (*acc)[1]);
        (*acc)[2] = fma(vec4<f32>(x.z), y, (*acc)[2]);
        (*acc)[3] = fma(vec4<f32>(x.w), y, (*acc)[3]);
    }
}

// A and B contiguous along k (the layout of matmul_nt4_forward).
@compute @workgroup_size(256)
fn matmul_tiled_nt4_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) li: u32) {
    let o = tiled_origin(wg, nwg);
    if (o.x >= mp.batch) {
        return; // the whole workgroup is past the end of a folded grid (uniform: no barrier is skipped by some)
    }
    // Loading role: row (or column) li / 4 of the tile, k quad li % 4 of the chunk.
    let lr = li / 4u;
    let lq = (li % 4u) * 4u;
    let a_row = (a_at(o.x) + min(o.y + lr, mp.m - 1u) * mp.a_rs) / 4u;
    let b_col = (b_at(o.x) + min(o.z + lr, mp.n - 1u) * mp.b_cs) / 4u;
    // Computing role: rows o.y + 4 ty.., columns o.z + 4 tx...
    let ty = li / 16u;
    let tx = li % 16u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    // The next chunk's values are loaded into registers before the current chunk's multiply-adds, so their
    // global-memory latency overlaps the arithmetic instead of stalling at the barrier.
    var va = vec4<f32>(0.0);
    var vb = vec4<f32>(0.0);
    if (lq < mp.k) { // k % 4 == 0: a quad is wholly inside or outside
        va = mm_a4[a_row + lq / 4u];
        vb = load_b4(b_col + lq / 4u);
    }
    for (var k0 = 0u; k0 < mp.k; k0 += WT_K) {
        stage_a_along_k(lr, lq, va);
        stage_b_along_k(lr, lq, vb);
        workgroupBarrier();
        let next = k0 + WT_K + lq;
        va = vec4<f32>(0.0);
        vb = vec4<f32>(0.0);
        if (next < mp.k) {
            va = mm_a4[a_row + next / 4u];
            vb = load_b4(b_col + next / 4u);
        }
        tiled_chunk(min(WT_K, mp.k - k0), ty, tx, &acc);
        workgroupBarrier();
    }
    store_block(vec3<u32>(o.x, o.y + 4u * ty, o.z + 4u * tx), acc[0], acc[1], acc[2], acc[3]);
}

// Four k steps p0..p0+3 of one A row (any strides; zero past k).
fn tiled_nn4_load_a(a_row: u32, p0: u32) -> vec4<f32> {
    var va = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        let p = p0 + c;
        if (p < mp.k) {
            va[c] = mm_a[a_row + p * mp.a_cs];
        }
    }
    return va;
}

// B contiguous along n (the layout of matmul_nn4_forward); A with any strides.
@compute @workgroup_size(256)
fn matmul_tiled_nn4_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) li: u32) {
    let o = tiled_origin(wg, nwg);
    if (o.x >= mp.batch) {
        return;
    }
    // A: row li / 4, k steps lq..lq+3 of the chunk, scalar loads. B: k step li / 16 of the chunk, columns
    // 4 (li % 16).. (n % 4 == 0: a quad past the edge is clamped to the last one, never stored).
    let lr = li / 4u;
    let lq = (li % 4u) * 4u;
    let a_row = a_at(o.x) + min(o.y + lr, mp.m - 1u) * mp.a_rs;
    let bp = li / 16u;
    let bq = li % 16u;
    let b_quad = (b_at(o.x) + min(o.z + 4u * bq, mp.n - 4u)) / 4u;
    let brs = mp.b_rs / 4u;
    let ty = li / 16u;
    let tx = li % 16u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    // Loads one step ahead of the multiply-adds, as in matmul_tiled_nt4_forward.
    var va = tiled_nn4_load_a(a_row, lq);
    var vb = vec4<f32>(0.0);
    if (bp < mp.k) {
        vb = load_b4(b_quad + bp * brs);
    }
    for (var k0 = 0u; k0 < mp.k; k0 += WT_K) {
        stage_a_along_k(lr, lq, va);
        wt_b[bp * 16u + bq] = vb;
        workgroupBarrier();
        let next = k0 + WT_K;
        va = tiled_nn4_load_a(a_row, next + lq);
        vb = vec4<f32>(0.0);
        if (next + bp < mp.k) {
            vb = load_b4(b_quad + (next + bp) * brs);
        }
        tiled_chunk(min(WT_K, mp.k - k0), ty, tx, &acc);
        workgroupBarrier();
    }
    store_block(vec3<u32>(o.x, o.y + 4u * ty, o.z + 4u * tx), acc[0], acc[1], acc[2], acc[3]);
}

// ---- 128 x 128 tiles (Kernel::Tiled8* in src/ops/matmul.rs), for large products on GPUs ----
// A workgroup of 16 x 16 invocations computes a 128 x 128 tile of C; each invocation four 4 x 4 blocks, at rows
// 4 ty.. and 64 + 4 ty.. and columns 4 tx.. and 64 + 4 tx.. (so that neighbouring invocations read adjacent
// vec4 of the staged tiles): 64 multiply-adds per four vec4 reads of workgroup memory, twice the reuse of the
// 64 x 64 kernels, and each staged element serves 128 of them. Staged as there (transposed, WT8_K k steps per
// chunk, the next chunk loaded into registers during the multiply-adds); same k order and fused multiply-adds,
// so the results are bit-identical to every other kernel here.

const WT8: u32 = 128u;
const WT8_K: u32 = 16u;

var<workgroup> w8_a: array<vec4<f32>, 512>; // (WT8_K, WT8 / 4): A rows 4q..4q+3 at k step p in [p * 32 + q]
var<workgroup> w8_b: array<vec4<f32>, 512>; // (WT8_K, WT8 / 4): B columns 4q..4q+3 likewise

fn tiled8_origin(wg: vec3<u32>, nwg: vec3<u32>) -> vec3<u32> {
    let wid = wg.x + wg.y * nwg.x;
    let per_batch = mp.tiles_m * mp.tiles_n;
    let r = wid % per_batch;
    return vec3<u32>(wid / per_batch, (r / mp.tiles_n) * WT8, (r % mp.tiles_n) * WT8);
}

fn stage8_a(row: u32, p0: u32, v: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        w8_a[(p0 + c) * 32u + row / 4u][row % 4u] = v[c];
    }
}

fn stage8_b(col: u32, p0: u32, v: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        w8_b[(p0 + c) * 32u + col / 4u][col % 4u] = v[c];
    }
}

// The accumulators are 16 named vec4 (c[2 r + h]: row r of the invocation's 8, 0..3 at 4 ty.. and 4..7 at
// 64 + 4 ty.., column half h) rather than an array: an array indexed in a loop went to local memory on an H100
// (the first version of these kernels ran 7-10x slower than the 64 x 64 ones). So both entry points below
// spell out the same 32 multiply-adds per k step: a helper taking them by pointer or in a struct is the
// obvious refactor, but whether a driver keeps those in registers needs a GPU to confirm.

// A and B contiguous along k (the layout of matmul_nt4_forward).
@compute @workgroup_size(256)
fn matmul_tiled8_nt4_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) li: u32) {
    let o = tiled8_origin(wg, nwg);
    if (o.x >= mp.batch) {
        return; // uniform across the workgroup
    }
    // Loading role: row (or column) li / 2 of the tile, k steps lq..lq+7 of the chunk (two vec4).
    let lr = li / 2u;
    let lq = (li % 2u) * 8u;
    let a_row = (a_at(o.x) + min(o.y + lr, mp.m - 1u) * mp.a_rs) / 4u;
    let b_col = (b_at(o.x) + min(o.z + lr, mp.n - 1u) * mp.b_cs) / 4u;
    let ty = li / 16u;
    let tx = li % 16u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    var c8 = vec4<f32>(0.0);
    var c9 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c12 = vec4<f32>(0.0);
    var c13 = vec4<f32>(0.0);
    var c14 = vec4<f32>(0.0);
    var c15 = vec4<f32>(0.0);
    var va0 = vec4<f32>(0.0);
    var va1 = vec4<f32>(0.0);
    var vb0 = vec4<f32>(0.0);
    var vb1 = vec4<f32>(0.0);
    if (lq < mp.k) { // k % 4 == 0: a quad is wholly inside or outside
        va0 = mm_a4[a_row + lq / 4u];
        vb0 = load_b4(b_col + lq / 4u);
    }
    if (lq + 4u < mp.k) {
        va1 = mm_a4[a_row + lq / 4u + 1u];
        vb1 = load_b4(b_col + lq / 4u + 1u);
    }
    for (var k0 = 0u; k0 < mp.k; k0 += WT8_K) {
        stage8_a(lr, lq, va0);
        stage8_a(lr, lq + 4u, va1);
        stage8_b(lr, lq, vb0);
        stage8_b(lr, lq + 4u, vb1);
        workgroupBarrier();
        let next = k0 + WT8_K + lq;
        va0 = vec4<f32>(0.0);
        va1 = vec4<f32>(0.0);
        vb0 = vec4<f32>(0.0);
        vb1 = vec4<f32>(0.0);
        if (next < mp.k) {
            va0 = mm_a4[a_row + next / 4u];
            vb0 = load_b4(b_col + next / 4u);
        }
        if (next + 4u < mp.k) {
            va1 = mm_a4[a_row + next / 4u + 1u];
            vb1 = load_b4(b_col + next / 4u + 1u);
        }
        let kn = min(WT8_K, mp.k - k0);
        for (var p = 0u; p < kn; p++) {
            let x0 = w8_a[p * 32u + ty];
            let x1 = w8_a[p * 32u + 16u + ty];
            let y0 = w8_b[p * 32u + tx];
            let y1 = w8_b[p * 32u + 16u + tx];
            c0 = fma(vec4<f32>(x0.x), y0, c0);
            c1 = fma(vec4<f32>(x0.x), y1, c1);
            c2 = fma(vec4<f32>(x0.y), y0, c2);
            c3 = fma(vec4<f32>(x0.y), y1, c3);
            c4 = fma(vec4<f32>(x0.z), y0, c4);
            c5 = fma(vec4<f32>(x0.z), y1, c5);
            c6 = fma(vec4<f32>(x0.w), y0, c6);
            c7 = fma(vec4<f32>(x0.w), y1, c7);
            c8 = fma(vec4<f32>(x1.x), y0, c8);
            c9 = fma(vec4<f32>(x1.x), y1, c9);
            c10 = fma(vec4<f32>(x1.y), y0, c10);
            c11 = fma(vec4<f32>(x1.y), y1, c11);
            c12 = fma(vec4<f32>(x1.z), y0, c12);
            c13 = fma(vec4<f32>(x1.z), y1, c13);
            c14 = fma(vec4<f32>(x1.w), y0, c14);
            c15 = fma(vec4<f32>(x1.w), y1, c15);
        }
        workgroupBarrier();
    }
    let r0 = o.y + 4u * ty;
    let col0 = o.z + 4u * tx;
    store_block(vec3<u32>(o.x, r0, col0), c0, c2, c4, c6);
    store_block(vec3<u32>(o.x, r0, col0 + 64u), c1, c3, c5, c7);
    store_block(vec3<u32>(o.x, r0 + 64u, col0), c8, c10, c12, c14);
    store_block(vec3<u32>(o.x, r0 + 64u, col0 + 64u), c9, c11, c13, c15);
}

// B contiguous along n (the layout of matmul_nn4_forward); A with any strides.
@compute @workgroup_size(256)
fn matmul_tiled8_nn4_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) li: u32) {
    let o = tiled8_origin(wg, nwg);
    if (o.x >= mp.batch) {
        return;
    }
    // A: row li / 2, k steps lq..lq+7 of the chunk, scalar loads. B: k steps bp and bp + 8 of the chunk,
    // columns 4 bq.. (n % 4 == 0: a quad past the edge is clamped to the last one, never stored).
    let lr = li / 2u;
    let lq = (li % 2u) * 8u;
    let a_row = a_at(o.x) + min(o.y + lr, mp.m - 1u) * mp.a_rs;
    let bp = li / 32u;
    let bq = li % 32u;
    let b_quad = (b_at(o.x) + min(o.z + 4u * bq, mp.n - 4u)) / 4u;
    let brs = mp.b_rs / 4u;
    let ty = li / 16u;
    let tx = li % 16u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    var c8 = vec4<f32>(0.0);
    var c9 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c12 = vec4<f32>(0.0);
    var c13 = vec4<f32>(0.0);
    var c14 = vec4<f32>(0.0);
    var c15 = vec4<f32>(0.0);
    var va0 = tiled_nn4_load_a(a_row, lq);
    var va1 = tiled_nn4_load_a(a_row, lq + 4u);
    var vb0 = vec4<f32>(0.0);
    var vb1 = vec4<f32>(0.0);
    if (bp < mp.k) {
        vb0 = load_b4(b_quad + bp * brs);
    }
    if (bp + 8u < mp.k) {
        vb1 = load_b4(b_quad + (bp + 8u) * brs);
    }
    for (var k0 = 0u; k0 < mp.k; k0 += WT8_K) {
        stage8_a(lr, lq, va0);
        stage8_a(lr, lq + 4u, va1);
        w8_b[bp * 32u + bq] = vb0;
        w8_b[(bp + 8u) * 32u + bq] = vb1;
        workgroupBarrier();
        let next = k0 + WT8_K;
        va0 = tiled_nn4_load_a(a_row, next + lq);
        va1 = tiled_nn4_load_a(a_row, next + lq + 4u);
        vb0 = vec4<f32>(0.0);
        vb1 = vec4<f32>(0.0);
        if (next + bp < mp.k) {
            vb0 = load_b4(b_quad + (next + bp) * brs);
        }
        if (next + bp + 8u < mp.k) {
            vb1 = load_b4(b_quad + (next + bp + 8u) * brs);
        }
        let kn = min(WT8_K, mp.k - k0);
        for (var p = 0u; p < kn; p++) {
            let x0 = w8_a[p * 32u + ty];
            let x1 = w8_a[p * 32u + 16u + ty];
            let y0 = w8_b[p * 32u + tx];
            let y1 = w8_b[p * 32u + 16u + tx];
            c0 = fma(vec4<f32>(x0.x), y0, c0);
            c1 = fma(vec4<f32>(x0.x), y1, c1);
            c2 = fma(vec4<f32>(x0.y), y0, c2);
            c3 = fma(vec4<f32>(x0.y), y1, c3);
            c4 = fma(vec4<f32>(x0.z), y0, c4);
            c5 = fma(vec4<f32>(x0.z), y1, c5);
            c6 = fma(vec4<f32>(x0.w), y0, c6);
            c7 = fma(vec4<f32>(x0.w), y1, c7);
            c8 = fma(vec4<f32>(x1.x), y0, c8);
            c9 = fma(vec4<f32>(x1.x), y1, c9);
            c10 = fma(vec4<f32>(x1.y), y0, c10);
            c11 = fma(vec4<f32>(x1.y), y1, c11);
            c12 = fma(vec4<f32>(x1.z), y0, c12);
            c13 = fma(vec4<f32>(x1.z), y1, c13);
            c14 = fma(vec4<f32>(x1.w), y0, c14);
            c15 = fma(vec4<f32>(x1.w), y1, c15);
        }
        workgroupBarrier();
    }
    let r0 = o.y + 4u * ty;
    let col0 = o.z + 4u * tx;
    store_block(vec3<u32>(o.x, r0, col0), c0, c2, c4, c6);
    store_block(vec3<u32>(o.x, r0, col0 + 64u), c1, c3, c5, c7);
    store_block(vec3<u32>(o.x, r0 + 64u, col0), c8, c10, c12, c14);
    store_block(vec3<u32>(o.x, r0 + 64u, col0 + 64u), c9, c11, c13, c15);
}

// ---- Bias gradient of a linear layer: column sums db[j] = sum_r dy[r, j] over R rows of N. ----
// Deterministic (no atomics): a workgroup owns CS_COLS adjacent columns (coalesced row reads) and CS_LANES
// lanes per column; lane l sums rows l, l + CS_LANES, ... in order, then lane 0 adds the lanes' partial sums
// in lane order. Same inputs, same bits, on every run.

const CS_COLS: u32 = 32u;
const CS_LANES: u32 = 8u;

struct ColSumParams {
    rows: u32, // R
    cols: u32, // N
}

@group(0) @binding(0) var<uniform> csp: ColSumParams;
@group(0) @binding(1) var<storage, read> cs_dy: array<f32>;       // (R, N)
@group(0) @binding(2) var<storage, read_write> cs_db: array<f32>; // (N)

var<workgroup> cs_part: array<f32, 256>; // (CS_LANES, CS_COLS) partial sums

@compute @workgroup_size(256)
fn linear_backward_bias(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) li: u32) {
    let c = (wg.x + wg.y * nwg.x) * CS_COLS + li % CS_COLS;
    let lane = li / CS_COLS;
    var s = 0.0;
    if (c < csp.cols) {
        for (var r = lane; r < csp.rows; r += CS_LANES) {
            s += cs_dy[r * csp.cols + c];
        }
    }
    cs_part[li] = s;
    workgroupBarrier();
    if (lane == 0u && c < csp.cols) {
        var t = cs_part[li];
        for (var l = 1u; l < CS_LANES; l++) {
            t += cs_part[l * CS_COLS + li];
        }
        cs_db[c] = t;
    }
}
