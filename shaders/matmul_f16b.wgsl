// Appended to shaders/matmul.wgsl (see `F16B_SHADER` in src/ops/matmul.rs; line numbers in naga's messages
// count from the start of matmul.wgsl): the nt4 kernels with B, a linear layer's weight, stored as f16
// (`HalfWeight`, 4 halves per vec2<u32>) and unpacked to f32 on load, so the products and sums are those of
// the f32 kernels over the rounded weights. A module of its own because unpack2x16float needs the adapter's
// SHADER_F16_IN_F32 (every native backend, except lavapipe without shader-f16), which the f32 kernels must not.

// B stored as f16 (weights of `linear_half`), 4 halves per vec2<u32>, contiguous along k; indices as for mm_b4
// (element index / 4). Unpacked to f32 on load: the products and sums stay f32.
@group(0) @binding(2) var<storage, read> mm_bh: array<vec2<u32>>;

fn load_bh(q: u32) -> vec4<f32> {
    let v = mm_bh[q];
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

// matmul_nt4_forward with B in f16 (mm_bh): the same loop, B quads unpacked on load.
@compute @workgroup_size(64)
fn matmul_nt4_f16b_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) li: u32) {
    let o = block_origin(wg, nwg, li);
    if (o.x >= mp.batch || o.y >= mp.m || o.z >= mp.n) {
        return;
    }
    let a_base = mp.a_off + o.x * mp.a_bs;
    let b_base = mp.b_off + o.x * mp.b_bs;
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
        let yt = transpose(mat4x4<f32>(load_bh(bc0 + p), load_bh(bc1 + p), load_bh(bc2 + p), load_bh(bc3 + p)));
        acc0 = fma4(acc0, mm_a4[ar0 + p], yt);
        acc1 = fma4(acc1, mm_a4[ar1 + p], yt);
        acc2 = fma4(acc2, mm_a4[ar2 + p], yt);
        acc3 = fma4(acc3, mm_a4[ar3 + p], yt);
    }
    store_block(o, acc0, acc1, acc2, acc3);
}

// matmul_tiled_nt4_forward with B in f16 (mm_bh), unpacked to f32 as it is staged.
@compute @workgroup_size(256)
fn matmul_tiled_nt4_f16b_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) li: u32) {
    let o = tiled_origin(wg, nwg);
    if (o.x >= mp.batch) {
        return;
    }
    let lr = li / 4u;
    let lq = (li % 4u) * 4u;
    let a_row = (mp.a_off + o.x * mp.a_bs + min(o.y + lr, mp.m - 1u) * mp.a_rs) / 4u;
    let b_col = (mp.b_off + o.x * mp.b_bs + min(o.z + lr, mp.n - 1u) * mp.b_cs) / 4u;
    let ty = li / 16u;
    let tx = li % 16u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < mp.k; k0 += WT_K) {
        var va = vec4<f32>(0.0);
        var vb = vec4<f32>(0.0);
        if (k0 + lq < mp.k) {
            va = mm_a4[a_row + (k0 + lq) / 4u];
            vb = load_bh(b_col + (k0 + lq) / 4u);
        }
        stage_a_along_k(lr, lq, va);
        stage_b_along_k(lr, lq, vb);
        workgroupBarrier();
        tiled_chunk(min(WT_K, mp.k - k0), ty, tx, &acc);
        workgroupBarrier();
    }
    store_block(vec3<u32>(o.x, o.y + 4u * ty, o.z + 4u * tx), acc[0], acc[1], acc[2], acc[3]);
}
