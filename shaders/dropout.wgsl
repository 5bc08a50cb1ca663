// Dropout (torch semantics: zero with probability p, scale kept elements by 1 / (1 - p)) whose mask is a pure
// function of (seed, stream, element index), from a counter-based RNG: Philox4x32-10 (Salmon et al., SC'11;
// as Random123). The backward regenerates the same mask from the same numbers; no mask buffer exists.
//
// Element e of a launch has the logical index idx = idx_base + e (64-bit, carried in two words) and is kept
// when r >= threshold, with r = word 0 of philox4x32_10(counter = (idx_lo, idx_hi, stream_lo, stream_hi),
// key = (seed_lo, seed_hi)) and threshold = round(p * 2^32): P(keep) = 1 - p to within 2^-32. Callers give a
// chunked tensor its logical indices, so a mask never depends on how the work was split.
// N = elements of one launch. Grids are 1-D over elements, folded into 2-D when larger than 65535
// workgroups: the linear workgroup id is wg.x + wg.y * num_wg.x.

const WG: u32 = 256u;

struct DropoutParams {
    n: u32,         // N
    x_off: u32,     // first element read
    y_off: u32,     // first element written (out-of-place entries)
    idx_lo: u32,    // logical index of element 0, low word
    idx_hi: u32,    // and high word
    seed_lo: u32,   // Philox key
    seed_hi: u32,
    stream_lo: u32, // counter words 2 and 3: which dropout call (layer, step)
    stream_hi: u32,
    threshold: u32, // drop when r < threshold
    scale: f32,     // 1 / (1 - p) in f32 (0 when p = 1)
}

@group(0) @binding(0) var<uniform> dp: DropoutParams;
// Out-of-place entries (dropout_forward, dropout_backward).
@group(0) @binding(1) var<storage, read> dr_x: array<f32>;       // (N) at x_off: x, or dy
@group(0) @binding(2) var<storage, read_write> dr_y: array<f32>; // (N) at y_off: y, or dx
// In place (dropout_inplace: attention's probabilities and their gradient).
@group(0) @binding(1) var<storage, read_write> dr_z: array<f32>; // (N) at x_off

// High 32 bits of the 64-bit product a * b, from 16-bit halves (WGSL has no 64-bit integers).
fn mul_hi(a: u32, b: u32) -> u32 {
    let a_lo = a & 0xffffu;
    let a_hi = a >> 16u;
    let b_lo = b & 0xffffu;
    let b_hi = b >> 16u;
    let lo_hi = a_lo * b_hi;
    let hi_lo = a_hi * b_lo;
    // (lo*lo >> 16) + low half of hi_lo + lo_hi < 2^32: no overflow.
    let mid = ((a_lo * b_lo) >> 16u) + (hi_lo & 0xffffu) + lo_hi;
    return a_hi * b_hi + (hi_lo >> 16u) + (mid >> 16u);
}

// Word 0 of Philox4x32-10 of counter c under key k.
fn philox_word0(c_in: vec4<u32>, k_in: vec2<u32>) -> u32 {
    var c = c_in;
    var k = k_in;
    for (var r = 0u; r < 10u; r++) {
        if (r > 0u) {
            k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let hi0 = mul_hi(0xD2511F53u, c.x);
        let lo0 = 0xD2511F53u * c.x;
        let hi1 = mul_hi(0xCD9E8D57u, c.z);
        let lo1 = 0xCD9E8D57u * c.z;
        c = vec4<u32>(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c.x;
}

// The kept-and-scaled factor of element e: scale or 0.
fn mask_factor(e: u32) -> f32 {
    let lo = dp.idx_lo + e;
    let hi = dp.idx_hi + select(0u, 1u, lo < e); // carry
    let r = philox_word0(vec4<u32>(lo, hi, dp.stream_lo, dp.stream_hi), vec2<u32>(dp.seed_lo, dp.seed_hi));
    return select(0.0, dp.scale, r >= dp.threshold);
}

fn element(wg: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * WG + li;
}

// y = x * (mask * scale), as torch multiplies (a dropped NaN stays NaN, which keeps bad inputs visible).
@compute @workgroup_size(256)
fn dropout_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let e = element(wg, nwg, li);
    if (e < dp.n) {
        let f = mask_factor(e);
        dr_y[dp.y_off + e] = dr_x[dp.x_off + e] * f;
    }
}

// dx = dy * mask * scale: the same map, regenerated from the same (seed, stream, index).
@compute @workgroup_size(256)
fn dropout_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let e = element(wg, nwg, li);
    if (e < dp.n) {
        let f = mask_factor(e);
        dr_y[dp.y_off + e] = dr_x[dp.x_off + e] * f;
    }
}

// z = z * mask * scale in place (forward on probabilities, backward on their gradient).
@compute @workgroup_size(256)
fn dropout_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let e = element(wg, nwg, li);
    if (e < dp.n) {
        let f = mask_factor(e);
        dr_z[dp.x_off + e] = dr_z[dp.x_off + e] * f;
    }
}
