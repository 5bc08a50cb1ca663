// Appended to shaders/matmul_sg.wgsl (see `SG_F16B_SHADER` in src/ops/matmul.rs): matmul_sg_nt4_forward with
// B in f16, as shaders/matmul_f16b.wgsl does for the portable kernels (and in a module of its own for the
// same reason).

@group(0) @binding(2) var<storage, read> mm_bh: array<vec2<u32>>;   // B in f16, 4 halves per element (nt)

fn load_bh(q: u32) -> vec4<f32> {
    let v = mm_bh[q];
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

// matmul_sg_nt4_forward with B in f16 (mm_bh), unpacked to f32 on load.
@compute @workgroup_size(SG_WR * SG_WC * 8u)
fn matmul_sg_nt4_f16b_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) li: u32,
                              @builtin(subgroup_invocation_id) lane: u32) {
    let o = sg_origin(wg, nwg, li);
    let bt = min(o.x, mp.batch - 1u);
    let ar = (mp.a_off + bt * mp.a_bs + min(o.y + lane, mp.m - 1u) * mp.a_rs) / 4u;
    let b_base = mp.b_off + bt * mp.b_bs;
    let bc0 = (b_base + min(o.z, mp.n - 1u) * mp.b_cs) / 4u;
    let bc1 = (b_base + min(o.z + 1u, mp.n - 1u) * mp.b_cs) / 4u;
    let bc2 = (b_base + min(o.z + 2u, mp.n - 1u) * mp.b_cs) / 4u;
    let bc3 = (b_base + min(o.z + 3u, mp.n - 1u) * mp.b_cs) / 4u;
    var acc = array<vec4<f32>, 8>();
    let k4 = mp.k / 4u;
    for (var p = 0u; p < k4; p++) {
        let xa = mm_a4[ar + p];
        let yt = transpose(mat4x4<f32>(load_bh(bc0 + p), load_bh(bc1 + p), load_bh(bc2 + p), load_bh(bc3 + p)));
        acc[0] = fma4(acc[0], subgroupBroadcast(xa, 0u), yt);
        acc[1] = fma4(acc[1], subgroupBroadcast(xa, 1u), yt);
        acc[2] = fma4(acc[2], subgroupBroadcast(xa, 2u), yt);
        acc[3] = fma4(acc[3], subgroupBroadcast(xa, 3u), yt);
        acc[4] = fma4(acc[4], subgroupBroadcast(xa, 4u), yt);
        acc[5] = fma4(acc[5], subgroupBroadcast(xa, 5u), yt);
        acc[6] = fma4(acc[6], subgroupBroadcast(xa, 6u), yt);
        acc[7] = fma4(acc[7], subgroupBroadcast(xa, 7u), yt);
    }
    if (o.x < mp.batch) {
        for (var r = 0u; r < 8u; r++) {
            store_row(o.x, o.y + r, o.z, acc[r]);
        }
    }
}
