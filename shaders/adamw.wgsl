// AdamW update of one parameter tensor, torch.optim.AdamW's single-tensor path operation for operation
// (torch 2.15 optim/adam.py `_single_tensor_adam` with decoupled_weight_decay=True), with
// torch.nn.utils.clip_grad_norm_'s scaling folded in. N = elements of the parameter.
// Grids are 1-D, folded into 2-D when larger than 65535 workgroups: the linear workgroup id is
// wg.x + wg.y * num_wg.x.

const WG: u32 = 256u;

// Scalars are computed on the CPU in f64 and rounded to f32 once, as torch does with Python-float scalars.
struct AdamWParams {
    n: u32,
    clip: u32,        // 1: scale the gradient by min(max_norm / (norm + 1e-6), 1) first
    decay: f32,       // 1 - lr * weight_decay
    w1: f32,          // 1 - beta1 (the lerp weight)
    beta2: f32,
    w2: f32,          // 1 - beta2
    bc2_sqrt: f32,    // sqrt(1 - beta2^step)
    eps: f32,
    neg_step: f32,    // -lr / (1 - beta1^step)
    max_norm: f32,
    start: u32,       // adamw_update: the first element it updates
}

@group(0) @binding(0) var<uniform> ap: AdamWParams;
// adamw_update4: four elements per invocation, loaded and stored as vec4 (lavapipe pays per load: 2.1x the
// scalar kernel's speed there); elements 0 .. 4 * (N / 4).
@group(0) @binding(1) var<storage, read_write> param4: array<vec4<f32>>; // (N) updated in place
@group(0) @binding(2) var<storage, read> grad4: array<vec4<f32>>;        // (N)
@group(0) @binding(3) var<storage, read_write> m4: array<vec4<f32>>;     // (N) exp_avg, updated in place
@group(0) @binding(4) var<storage, read_write> v4: array<vec4<f32>>;     // (N) exp_avg_sq, updated in place
// adamw_update: one element per invocation, elements `start` .. N (the last N % 4).
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> norm: array<f32>;        // (1) global gradient norm (read if clip)

struct AdamWState {
    p: vec4<f32>,
    m: vec4<f32>,
    v: vec4<f32>,
}

// The update of four elements (component-wise, so a scalar goes through it as one lane with the same bits).
fn adamw(p0: vec4<f32>, g0: vec4<f32>, m0: vec4<f32>, v0: vec4<f32>) -> AdamWState {
    var g = g0;
    if (ap.clip != 0u) {
        // clip_grad_norm_: grads *= clamp(max_norm / (total_norm + 1e-6), max=1).
        g = g * min(ap.max_norm / (norm[0] + 1e-6), 1.0);
    }
    // param.mul_(1 - lr * wd)
    let p = p0 * ap.decay;
    // exp_avg.lerp_(grad, 1 - beta1): torch's lerp for a weight < 0.5 is self + w * (end - self).
    let m1 = select(g - (g - m0) * (1.0 - ap.w1), m0 + ap.w1 * (g - m0), ap.w1 < 0.5);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v1 = v0 * ap.beta2 + ap.w2 * g * g;
    // denom = exp_avg_sq.sqrt() / sqrt(bias_correction2) + eps; param.addcdiv_(exp_avg, denom, -step_size)
    let denom = sqrt(v1) / ap.bc2_sqrt + ap.eps;
    return AdamWState(p + ap.neg_step * m1 / denom, m1, v1);
}

@compute @workgroup_size(256)
fn adamw_update4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let i = (wg.x + wg.y * nwg.x) * WG + li;
    if (i >= ap.n / 4u) {
        return;
    }
    let s = adamw(param4[i], grad4[i], m4[i], v4[i]);
    m4[i] = s.m;
    v4[i] = s.v;
    param4[i] = s.p;
}

@compute @workgroup_size(256)
fn adamw_update(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = ap.start + (wg.x + wg.y * nwg.x) * WG + li;
    if (i >= ap.n) {
        return;
    }
    let s = adamw(vec4<f32>(param[i]), vec4<f32>(grad[i]), vec4<f32>(m[i]), vec4<f32>(v[i]));
    m[i] = s.m.x;
    v[i] = s.v.x;
    param[i] = s.p.x;
}
