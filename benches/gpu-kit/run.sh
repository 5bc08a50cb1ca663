#!/usr/bin/env bash
# The device checks of issue 8, as one script for a machine with a GPU (see pack.sh, which builds the kit here):
#   1. the adapter wgpu sees;
#   2. the whole test suite on that GPU (every test binary, each under a time limit);
#   3. the matmul kernels per model shape (register-blocked; workgroup-memory tiled 64 x 64 and 128 x 128, each
#      with split-K; f16 weights), the inference attention unfused against the fused kernels, and the
#      convolutions' kernels against their matmul route (GPU_KIT_KERNEL_BENCHES picks among matmul attention
#      conv);
#   4. the teacher forward (10 s) and the training step (batch 2 x 2 s) with the kernels chosen by default and
#      with each choice forced the other way (submission chunks, fused attention, the positional conv's route,
#      q/k/v packing, bind group reuse, tiling); the teacher with f16 linear weights;
#      then PyTorch eager on the same GPU (f32, GPU_KIT_TORCH_ROUNDS times but once in quick mode, and f16 for
#      the teacher forward);
#   5. one profiled run of each, for where the time goes (GPU time per kernel from timestamp queries).
# Results go to $OUT (default ./gpu-kit-out): summary.txt, and every log in logs.tar.gz (the device tool brings
# back at most 8 files). Each step has a time limit so that the whole fits one device call (about 7 minutes on
# an H100 is the aim).
set -u
cd "$(dirname "$0")/../.."
root=$PWD
out=${OUT:-$root/gpu-kit-out}
mkdir -p "$out"
summary=$out/summary.txt
: > "$summary"
logs=$(mktemp -d /tmp/gpu-kit-logs.XXXXXX)
trap 'cp "$summary" "$logs/" 2>/dev/null; tar -C "$logs" -czf "$out/logs.tar.gz" .' EXIT
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$summary"; }
kit=$root/.gpu-kit
[ -f "$kit/bin.tar.xz" ] || { say "no $kit/bin.tar.xz: run benches/gpu-kit/pack.sh first and carry .gpu-kit"; exit 2; }
say "kit built from $(tr '\n' ' ' < "$kit/commit")"

# The Vulkan loader and the GL/EGL libraries (glvnd) that NVIDIA's Vulkan driver (libGLX_nvidia) needs: without
# them its vk_icdGetInstanceProcAddr returns nothing and no adapter is found (seen on the H100 image).
if [ -z "${GPU_KIT_ALLOW_CPU:-}" ]; then
    for f in "$kit"/debs/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$icd" ] && [ -z "${VK_DRIVER_FILES:-}" ] && export VK_DRIVER_FILES=$icd
egl=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[ -f "$egl" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$egl
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}

# The binaries, where the test binaries expect them: they were built in /work/main (fixtures and the CLI
# binary are found through that path).
mkdir -p target/release
kbin=$(mktemp -d /tmp/gpu-kit-bin.XXXXXX)
tar -C "$kbin" -xJf "$kit/bin.tar.xz"
cp "$kbin/bin/wgpu-mlkd" target/release/wgpu-mlkd
if [ "$(readlink -f /work/main 2>/dev/null)" != "$(readlink -f "$root")" ]; then
    if [ -e /work/main ]; then
        say "warning: /work/main exists and is not this checkout; the tests that read fixtures will fail"
    else
        mkdir -p /work && ln -s "$root" /work/main
    fi
fi
bin=$root/target/release/wgpu-mlkd

say "== 1. adapter"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$summary"
"$bin" devices > "$logs/devices.txt" 2>&1
cat "$logs/devices.txt" >> "$summary"
if ! grep -q "^selected:" "$logs/devices.txt" || { [ -z "${GPU_KIT_ALLOW_CPU:-}" ] && grep -q "^selected: llvmpipe" "$logs/devices.txt"; }; then
    say "no hardware GPU adapter selected: stopping (see devices.txt)"
    exit 1
fi

# GPU_KIT_QUICK=1: no tests and no kernel benches; the whole workloads with the quick list of variants and
# with the tiled matmul off, beside PyTorch f32 (for a last check when little device time is left).
quick=${GPU_KIT_QUICK:-}
if [ -z "$quick" ]; then
say "== 2. tests on the GPU"
# Each suite under TEST_LIMIT_S, and all of them under TEST_BUDGET_S, so that a hang leaves time for the benches.
test_end=$(( $(date +%s) + ${TEST_BUDGET_S:-200} ))
for t in "$kbin"/bin/test-*; do
    name=${t##*/test-}
    log=$logs/test-$name.log
    left=$(( test_end - $(date +%s) ))
    limit=$(( left < ${TEST_LIMIT_S:-100} ? left : ${TEST_LIMIT_S:-100} ))
    if [ "$limit" -le 0 ]; then say "$name: SKIPPED (the tests' time budget is spent)"; continue; fi
    timeout "$limit" "$t" > "$log" 2>&1
    rc=$?
    result=$(grep -E "^test result:" "$log" | tail -1)
    failed=$(grep -E "^test .* FAILED$" "$log" | sed 's/^test //; s/ \.\.\. FAILED$//' | tr '\n' ' ')
    case $rc in
        0) say "$name: ${result:-no result line}" ;;
        124) say "$name: TIMED OUT after $limit s ($(grep -c '\.\.\. ok$' "$log") passed before)" ;;
        *) say "$name: FAILED (rc $rc) ${result} ${failed}" ;;
    esac
done

# GPU_KIT_KERNEL_BENCHES: which of the kernel benches (matmul attention conv) step 3 runs.
kernel_benches=${GPU_KIT_KERNEL_BENCHES-matmul attention conv} # set but empty: none
if [[ " $kernel_benches " == *" matmul "* ]]; then
# GPU_KIT_MATMUL_ENVS: one run per setting ("default", or VAR=value), e.g. to compare kernel versions; BENCH_ONLY
# (a part of a case name) picks cases.
for setting in ${GPU_KIT_MATMUL_ENVS:-default}; do
say "== 3. matmul kernels per shape (GFLOP/s; the first column is the register-blocked kernel; $setting)"
(
    [ "$setting" = default ] || export "${setting?}"
    BENCH_ROUNDS=5 BENCH_MIN_GFLOP=${BENCH_MIN_GFLOP:-20} timeout 120 "$kbin/bin/test-lib" --ignored --nocapture \
        --exact ops::matmul::tests::bench_kernels_model_shapes
) > "$logs/matmul-$setting.log" 2>&1
grep "GFLOP" "$logs/matmul-$setting.log" >> "$summary"
done
fi

if [[ " $kernel_benches " == *" attention "* ]]; then
say "== 3b. attention for inference: unfused against the fused kernels (ms; GFLOP/s)"
BENCH_T=${BENCH_T:-49,72,99,149,499} BENCH_MIN_GFLOP=${BENCH_ATTENTION_MIN_GFLOP:-2} timeout 60 "$kbin/bin/test-lib" --ignored --nocapture --exact \
    ops::attention::tests::bench_attention_fused_vs_unfused > "$logs/attention.log" 2>&1
grep "attention B=" "$logs/attention.log" >> "$summary"
fi

if [[ " $kernel_benches " == *" conv "* ]]; then
say "== 3c. convolutions: the 4 x 4 kernels against the matmul route (GFLOP/s)"
BENCH_MIN_GFLOP=${BENCH_CONV_MIN_GFLOP:-2} timeout 90 "$kbin/bin/test-lib" --ignored --nocapture --exact \
    ops::conv1d::timing::bench_conv_kernels_model_shapes > "$logs/conv.log" 2>&1
grep "GFLOP" "$logs/conv.log" >> "$summary"
fi

fi # not quick

say "== 4. whole workloads"
teacher=/tmp/gpu-kit-teacher
python3 benches/make_random_teacher.py "$teacher" > "$logs/make_teacher.log" 2>&1 || say "making the teacher failed"
# The figure a bench printed last, or the end of its log when it printed none.
value() { grep -E "^$1=" "$2" | tail -1 | cut -d= -f2 | grep . || echo "(none: $(tail -2 "$2" | tr '\n' ' '))"; }
# The kernels chosen by default, then with one choice forced at a time: one submission per run instead of one
# every 32 commands (the GPU then starts only once the host has recorded everything), the quad attention kernel
# at every length (by default only up to T = 64), the positional conv on the 4 x 4 conv kernel instead of the
# (batched, split) matmul route, q, k, v as three products (the frozen teacher's packing off), a fresh bind
# group for every dispatch (the host's cost before bind groups were reused), and the tiled matmul off.
# (Session 6 measured tile size and split-K: WGPU_MLKD_MATMUL_TILE=128 and WGPU_MLKD_MATMUL_SPLIT_K=1 still
# force them; GPU_KIT_VARIANTS replaces the list.)
variants=${GPU_KIT_VARIANTS:-"default WGPU_MLKD_SUBMIT_EVERY=0 WGPU_MLKD_FUSED_ATTENTION=quad WGPU_MLKD_NO_GROUPED_CONV_MATMUL=1 WGPU_MLKD_NO_QKV_PACKING=1 WGPU_MLKD_NO_BIND_GROUP_CACHE=1 WGPU_MLKD_MATMUL_TILED=0"}
[ -n "$quick" ] && variants=${GPU_KIT_VARIANTS:-"default WGPU_MLKD_SUBMIT_EVERY=0 WGPU_MLKD_FUSED_ATTENTION=quad WGPU_MLKD_NO_BIND_GROUP_CACHE=1"}
for variant in $variants; do
    log=$logs/ours-$variant.log
    (
        [ "$variant" = default ] || export "${variant?}"
        timeout 90 "$bin" bench teacher --teacher "$teacher" --seconds 10 --repeat ${REPEAT:-20}
        timeout 90 "$bin" bench train --teacher "$teacher" --batch 2 --crop-seconds 2 --repeat ${REPEAT:-20}
    ) > "$log" 2>&1
    say "wgpu-mlkd ($variant): teacher 10 s $(value teacher_forward_seconds_per_audio_second "$log") s/audio-s, \
train step $(value student_train_step_seconds "$log") s; $(grep -E "GFLOP/s effective|peak GPU|^host per" "$log" | tr '\n' ' ')"
done
[ -z "$quick" ] && {
log=$logs/ours-f16.log
timeout 90 "$bin" bench teacher --teacher "$teacher" --seconds 10 --repeat ${REPEAT:-20} --f16 > "$log" 2>&1
say "wgpu-mlkd, f16 linear weights: teacher 10 s $(value teacher_forward_seconds_per_audio_second "$log") s/audio-s; \
$(grep -E "GFLOP/s effective|peak GPU" "$log" | tr '\n' ' ')"
}
# GPU_KIT_TORCH_ROUNDS: how many times the f32 teacher runs (PyTorch eager is host-bound here, and its figure
# ranged over 7.2-11.8 ms across processes in session 10).
dtypes=()
for _ in $(seq "${GPU_KIT_TORCH_ROUNDS:-1}"); do dtypes+=(float32); done
dtypes+=(float16 "float32 --no-tf32")
[ -n "$quick" ] && dtypes=(float32 "float32 --no-tf32")
for dtype in "${dtypes[@]}"; do
    log=$logs/torch-teacher-${dtype// /}-$(date +%s%N).log
    # shellcheck disable=SC2086 # "float32 --no-tf32" is two arguments
    timeout 90 python3 benches/pytorch_teacher.py --teacher "$teacher" --seconds 10 --repeat ${REPEAT:-20} --device cuda \
        --dtype $dtype > "$log" 2>&1
    say "PyTorch CUDA teacher 10 s, $dtype: $(value teacher_forward_seconds_per_audio_second "$log") s/audio-s; \
$(grep -E "peak GPU" "$log" | tr '\n' ' ')"
done
tf32s=("" --no-tf32)
[ -n "$quick" ] && tf32s=("")
for tf32 in "${tf32s[@]}"; do
    log=$logs/torch-train$tf32.log
    # shellcheck disable=SC2086
    timeout 90 python3 benches/pytorch_train_step.py --teacher "$teacher" --batch 2 --seconds 2 --repeat ${REPEAT:-20} \
        --device cuda $tf32 > "$log" 2>&1
    say "PyTorch CUDA train step $tf32: $(value student_train_step_seconds "$log") s; $(grep -E "peak GPU" "$log" | tr '\n' ' ')"
done

if [ -n "$quick" ]; then
    log=$logs/ours-WGPU_MLKD_MATMUL_TILED=0.log
    (
        export WGPU_MLKD_MATMUL_TILED=0
        timeout 90 "$bin" bench teacher --teacher "$teacher" --seconds 10 --repeat ${REPEAT:-20}
        timeout 90 "$bin" bench train --teacher "$teacher" --batch 2 --crop-seconds 2 --repeat ${REPEAT:-20}
    ) > "$log" 2>&1
    say "wgpu-mlkd (WGPU_MLKD_MATMUL_TILED=0): teacher 10 s $(value teacher_forward_seconds_per_audio_second "$log") \
s/audio-s, train step $(value student_train_step_seconds "$log") s"
    exit 0
fi
say "== 5. profiles (each kernel submitted and waited for alone; GPU times from timestamp queries where the adapter has them)"
WGPU_MLKD_PROFILE=1 timeout 60 "$bin" bench teacher --teacher "$teacher" --seconds 10 --repeat 1 \
    > "$logs/profile-teacher.log" 2>&1
WGPU_MLKD_PROFILE=1 timeout 60 "$bin" bench train --teacher "$teacher" --batch 2 --crop-seconds 2 --repeat 1 \
    > "$logs/profile-train.log" 2>&1
for w in teacher train; do
    echo "-- $w: $(grep -E "^median" "$logs/profile-$w.log")" >> "$summary"
    sed -n '/^kernel profile/,/^GPU busy/p' "$logs/profile-$w.log" | head -40 >> "$summary"
done
say "done; profiles in profile-teacher.log and profile-train.log"
