// (No `enable subgroups;`: naga 30 accepts the subgroup builtins without it and rejects the directive.)

// Matmul kernels for adapters whose subgroups have exactly 8 invocations (lavapipe on AVX2, where the 8
// invocations of a subgroup are the 8 SIMD lanes of one register). Same parameters, bindings, epilogue
// and result bits as shaders/matmul.wgsl (see there); only the way A reaches the lanes differs.
//
// Why: lavapipe turns each per-invocation load into a loop over lanes with a mask test, a bounds check and
// an insert per lane (~10 instructions per float), so loads, not multiply-adds, set the speed. Here the 8
// lanes of a subgroup share 8 rows of C: lane l loads row l's A values only, and subgroupBroadcast (a
// register shuffle) hands them to the other lanes. Each lane owns 4 columns; per 4 k steps it makes 5
// vec4 loads for 128 fused multiply-adds (the 4 x 4 kernel: 8 loads for 64).
// A subgroup covers 8 rows x 32 columns of C; a workgroup is SG_WR x SG_WC subgroups (pipeline constants):
// 1 x 8 (8 rows x 256 columns) for wide products, narrower shapes for the attention products (n = 64 or
// T), whose columns would leave most of a 256-wide workgroup idle. Row tiles vary fastest, so the
// workgroups that run together read the same B columns while they are in cache.
// Nothing returns early and every load index is clamped: the broadcasts need all 8 lanes.

override SG_WR: u32 = 1u;   // subgroups per workgroup down the rows of C
override SG_WC: u32 = 8u;   // subgroups per workgroup across the columns of C
// FLAG_*, MatParams (`mp`), a_at, b_at, item_out, the bindings, the B loads block and the epilogue
// (store_row): shaders/matmul_common.wgsl, appended.

fn fma4(acc: vec4<f32>, x: vec4<f32>, yt: mat4x4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(x.w), yt[3], fma(vec4<f32>(x.z), yt[2], fma(vec4<f32>(x.y), yt[1],
        fma(vec4<f32>(x.x), yt[0], acc))));
}

// (batch, first row of the subgroup, first column of this invocation); batch == mp.batch past the grid.
// Subgroup s = li / 8 of the workgroup sits at (s / SG_WC, s % SG_WC) in its SG_WR x SG_WC grid.
fn sg_origin(wg: vec3<u32>, nwg: vec3<u32>, li: u32) -> vec3<u32> {
    let wid = wg.x + wg.y * nwg.x;
    let per_batch = mp.tiles_m * mp.tiles_n;
    let bt = min(wid / per_batch, mp.batch);
    let r = wid % per_batch;
    let s = li / 8u;
    let row = (r % mp.tiles_m) * (8u * SG_WR) + (s / SG_WC) * 8u;
    let col = (r / mp.tiles_m) * (32u * SG_WC) + (s % SG_WC) * 32u + (li % 8u) * 4u;
    return vec3<u32>(bt, row, col);
}
// The epilogue for a lane's 8 rows o.y.. at columns o.z.. (nothing past the grid's last batch item).
fn store_rows8(o: vec3<u32>, acc0: vec4<f32>, acc1: vec4<f32>, acc2: vec4<f32>, acc3: vec4<f32>,
               acc4: vec4<f32>, acc5: vec4<f32>, acc6: vec4<f32>, acc7: vec4<f32>) {
    if (o.x >= mp.batch) {
        return;
    }
    let out = item_out(o.x);
    store_row(out, o.y + 0u, o.z, acc0);
    store_row(out, o.y + 1u, o.z, acc1);
    store_row(out, o.y + 2u, o.z, acc2);
    store_row(out, o.y + 3u, o.z, acc3);
    store_row(out, o.y + 4u, o.z, acc4);
    store_row(out, o.y + 5u, o.z, acc5);
    store_row(out, o.y + 6u, o.z, acc6);
    store_row(out, o.y + 7u, o.z, acc7);
}

// A and B contiguous along k (x W^T with W [n, k]; Q K^T); needs k % 4 == 0 and 16-byte alignment.
@compute @workgroup_size(SG_WR * SG_WC * 8u)
fn matmul_sg_nt4_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) li: u32,
                         @builtin(subgroup_invocation_id) lane: u32) {
    let o = sg_origin(wg, nwg, li);
    let bt = min(o.x, mp.batch - 1u);
    // This lane loads row o.y + lane of A for the whole subgroup.
    let ar = (a_at(bt) + min(o.y + lane, mp.m - 1u) * mp.a_rs) / 4u;
    let b_base = b_at(bt);
    let bc0 = (b_base + min(o.z, mp.n - 1u) * mp.b_cs) / 4u;
    let bc1 = (b_base + min(o.z + 1u, mp.n - 1u) * mp.b_cs) / 4u;
    let bc2 = (b_base + min(o.z + 2u, mp.n - 1u) * mp.b_cs) / 4u;
    let bc3 = (b_base + min(o.z + 3u, mp.n - 1u) * mp.b_cs) / 4u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    let k4 = mp.k / 4u;
    for (var p = 0u; p < k4; p++) {
        let xa = mm_a4[ar + p];
        let yt = transpose(mat4x4<f32>(load_b4(bc0 + p), load_b4(bc1 + p), load_b4(bc2 + p), load_b4(bc3 + p)));
        acc0 = fma4(acc0, subgroupBroadcast(xa, 0u), yt);
        acc1 = fma4(acc1, subgroupBroadcast(xa, 1u), yt);
        acc2 = fma4(acc2, subgroupBroadcast(xa, 2u), yt);
        acc3 = fma4(acc3, subgroupBroadcast(xa, 3u), yt);
        acc4 = fma4(acc4, subgroupBroadcast(xa, 4u), yt);
        acc5 = fma4(acc5, subgroupBroadcast(xa, 5u), yt);
        acc6 = fma4(acc6, subgroupBroadcast(xa, 6u), yt);
        acc7 = fma4(acc7, subgroupBroadcast(xa, 7u), yt);
    }
    store_rows8(o, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7);
}

// B contiguous along n (row-major [k, n]); needs n % 4 == 0 and 16-byte alignment. A is read with scalar
// strided loads, four k steps per load round so each lane's 4 loads are broadcast together.
@compute @workgroup_size(SG_WR * SG_WC * 8u)
fn matmul_sg_nn4_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) li: u32,
                         @builtin(subgroup_invocation_id) lane: u32) {
    let o = sg_origin(wg, nwg, li);
    let bt = min(o.x, mp.batch - 1u);
    let ar = a_at(bt) + min(o.y + lane, mp.m - 1u) * mp.a_rs;
    // n % 4 == 0: the 4 columns o.z.. lie inside a row whenever o.z < n; past the edge, the last 4.
    let bcol = (b_at(bt) + min(o.z, mp.n - 4u)) / 4u;
    let brs = mp.b_rs / 4u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    for (var p = 0u; p < mp.k; p++) {
        let xa = mm_a[ar + p * mp.a_cs];
        let y = load_b4(bcol + p * brs);
        acc0 = fma(vec4<f32>(subgroupBroadcast(xa, 0u)), y, acc0);
        acc1 = fma(vec4<f32>(subgroupBroadcast(xa, 1u)), y, acc1);
        acc2 = fma(vec4<f32>(subgroupBroadcast(xa, 2u)), y, acc2);
        acc3 = fma(vec4<f32>(subgroupBroadcast(xa, 3u)), y, acc3);
        acc4 = fma(vec4<f32>(subgroupBroadcast(xa, 4u)), y, acc4);
        acc5 = fma(vec4<f32>(subgroupBroadcast(xa, 5u)), y, acc5);
        acc6 = fma(vec4<f32>(subgroupBroadcast(xa, 6u)), y, acc6);
        acc7 = fma(vec4<f32>(subgroupBroadcast(xa, 7u)), y, acc7);
    }
    store_rows8(o, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7);
}
