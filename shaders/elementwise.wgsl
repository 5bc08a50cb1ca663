// Element-wise ops over flat f32 arrays. N = element count.
// Grids are 1-D over elements, folded into 2-D when larger than 65535 workgroups:
// the linear workgroup id is wg.x + wg.y * num_wg.x.

const WG: u32 = 256u;

struct FillParams {
    n: u32,
    value: f32,
}

struct BinaryParams {
    n: u32,
    start: u32, // the scalar add and GELU entries: the first element (the vec4 entries did those before it)
}

@group(0) @binding(0) var<uniform> fill_p: FillParams;
@group(0) @binding(1) var<storage, read_write> fill_y: array<f32>; // (N)

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < fill_p.n) {
        fill_y[i] = fill_p.value;
    }
}

@group(0) @binding(0) var<uniform> add_p: BinaryParams;
@group(0) @binding(1) var<storage, read> add_a: array<f32>;       // (N)
@group(0) @binding(2) var<storage, read> add_b: array<f32>;       // (N)
@group(0) @binding(3) var<storage, read_write> add_y: array<f32>; // (N)
@group(0) @binding(1) var<storage, read> add_a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> add_b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> add_y4: array<vec4<f32>>;

// Residual add: y = a + b; the first N / 4 * 4 elements as vec4 (lavapipe pays per load instruction), the
// rest from `start` through the scalar entry.
@compute @workgroup_size(256)
fn add_forward4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < add_p.n / 4u) {
        add_y4[i] = add_a4[i] + add_b4[i];
    }
}

@compute @workgroup_size(256)
fn add_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let i = add_p.start + (wg.x + wg.y * nwg.x) * WG + li;
    if (i < add_p.n) {
        add_y[i] = add_a[i] + add_b[i];
    }
}

// GELU and its backward in two entries each: the vec4 one for the first N / 4 * 4 elements (lavapipe pays
// per load instruction, and one vec4 load is one bounds check for four values), the scalar one from `start`
// for the rest. Both apply the same scalar function to each element, so the bits do not depend on which ran.
@group(0) @binding(0) var<uniform> gelu_p: BinaryParams;
@group(0) @binding(1) var<storage, read> gelu_x: array<f32>;       // (N)
@group(0) @binding(2) var<storage, read_write> gelu_y: array<f32>; // (N)
@group(0) @binding(1) var<storage, read> gelu_x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> gelu_y4: array<vec4<f32>>;

// erfc_approx and gelu_exact: shaders/common.wgsl.

@compute @workgroup_size(256)
fn gelu_forward4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < gelu_p.n / 4u) {
        let x = gelu_x4[i];
        gelu_y4[i] = vec4<f32>(gelu_exact(x.x), gelu_exact(x.y), gelu_exact(x.z), gelu_exact(x.w));
    }
}

@compute @workgroup_size(256)
fn gelu_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = gelu_p.start + (wg.x + wg.y * nwg.x) * WG + li;
    if (i < gelu_p.n) {
        gelu_y[i] = gelu_exact(gelu_x[i]);
    }
}

@group(0) @binding(0) var<uniform> gelu_bw_p: BinaryParams;
@group(0) @binding(1) var<storage, read> gelu_bw_x: array<f32>;        // (N) the forward's input
@group(0) @binding(2) var<storage, read> gelu_bw_dy: array<f32>;       // (N)
@group(0) @binding(3) var<storage, read_write> gelu_bw_dx: array<f32>; // (N)
@group(0) @binding(1) var<storage, read> gelu_bw_x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gelu_bw_dy4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> gelu_bw_dx4: array<vec4<f32>>;

// d/dx [x Phi(x)] = Phi(x) + x phi(x), with Phi from the same erfc as the forward (full relative precision in
// the negative tail) and phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
fn gelu_exact_grad(x: f32) -> f32 {
    let cdf = 0.5 * erfc_approx(-x * 0.70710678118654752);
    let pdf = 0.39894228040143268 * exp(-0.5 * x * x);
    return cdf + x * pdf;
}

@compute @workgroup_size(256)
fn gelu_backward4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < gelu_bw_p.n / 4u) {
        let x = gelu_bw_x4[i];
        let grad = vec4<f32>(gelu_exact_grad(x.x), gelu_exact_grad(x.y), gelu_exact_grad(x.z),
                             gelu_exact_grad(x.w));
        gelu_bw_dx4[i] = gelu_bw_dy4[i] * grad;
    }
}

@compute @workgroup_size(256)
fn gelu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = gelu_bw_p.start + (wg.x + wg.y * nwg.x) * WG + li;
    if (i < gelu_bw_p.n) {
        gelu_bw_dx[i] = gelu_bw_dy[i] * gelu_exact_grad(gelu_bw_x[i]);
    }
}

struct ScaleParams {
    n: u32,
    alpha: f32,
}

@group(0) @binding(0) var<uniform> scale_p: ScaleParams;
@group(0) @binding(1) var<storage, read> scale_x: array<f32>;       // (N)
@group(0) @binding(2) var<storage, read_write> scale_y: array<f32>; // (N)

// y = alpha * x. Its own backward too (dx = alpha * dy).
@compute @workgroup_size(256)
fn scale_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < scale_p.n) {
        scale_y[i] = scale_p.alpha * scale_x[i];
    }
}

@group(0) @binding(0) var<uniform> axpy_p: ScaleParams;
@group(0) @binding(1) var<storage, read> axpy_x: array<f32>;         // (N)
@group(0) @binding(2) var<storage, read_write> axpy_acc: array<f32>; // (N) updated in place

// acc += alpha * x (gradient accumulation). alpha = 1 gives exactly acc + x.
@compute @workgroup_size(256)
fn axpy_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i < axpy_p.n) {
        axpy_acc[i] = axpy_acc[i] + axpy_p.alpha * axpy_x[i];
    }
}
