// Column slices of row-major matrices: y[r, c] = x[r, offset + c] and its backward.
// R rows, W = x's row width, N = slice width. Used to split the student's fused head projection [rows, H*D]
// into per-head inputs.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    width: u32,  // W
    offset: u32,
    n: u32,      // N
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;       // forward: x (R, W); backward: dy (R, N)
@group(0) @binding(2) var<storage, read_write> dst: array<f32>; // forward: y (R, N); backward: dx (R, W)

@compute @workgroup_size(256)
fn narrow_cols_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < p.rows * p.n) {
        let r = i / p.n;
        let c = i % p.n;
        dst[i] = src[r * p.width + p.offset + c];
    }
}

// dx has zeros outside the slice: every element of dx is written exactly once.
@compute @workgroup_size(256)
fn narrow_cols_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < p.rows * p.width) {
        let r = i / p.width;
        let c = i % p.width;
        var v = 0.0;
        if (c >= p.offset && c < p.offset + p.n) {
            v = src[r * p.n + c - p.offset];
        }
        dst[i] = v;
    }
}
