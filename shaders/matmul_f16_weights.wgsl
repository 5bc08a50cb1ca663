// B stored as f16 (a linear layer's weight, `HalfWeight` in src/ops/matmul.rs): 4 halves per vec2<u32>,
// contiguous along k, indices as for the f32 vec4 loads (element index / 4). Unpacked to f32 on load, so the
// products and sums are the f32 kernels' over the rounded weights. Replaces the "B loads" block of
// shaders/matmul_common.wgsl in the f16-weight modules of shaders/matmul.wgsl and shaders/matmul_sg.wgsl
// (unpack2x16float needs the adapter's SHADER_F16_IN_F32, which the f32 modules must not).
@group(0) @binding(2) var<storage, read> mm_bh: array<vec2<u32>>;

fn load_b4(q: u32) -> vec4<f32> {
    let v = mm_bh[q];
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}
