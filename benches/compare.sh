#!/usr/bin/env bash
# The performance comparison of issue 8: the teacher forward and the MLKD training step in wgpu-mlkd (on the
# selected adapter: WGPU_BACKEND, WGPU_ADAPTER_NAME) beside burn's wgpu backend (when its bench binary is built,
# see benches/burn-compare/README.md) and PyTorch on the same machine, as ratios (other time / wgpu-mlkd time:
# above 1 means wgpu-mlkd is faster).
#
#   benches/compare.sh TEACHER_DIR [SECONDS=10] [BATCH=2] [CROP_SECONDS=2] [REPEAT=5]
#
# Environment: PYTHON (default python3; needs torch + transformers; skipped with a message where missing),
# TORCH_DEVICE (cpu or cuda, default cpu), TORCH_THREADS (default 2), WGPU_MLKD (the binary, default
# target/release/wgpu-mlkd, built if missing), BURN_COMPARE (burn's bench binary, default
# benches/burn-compare/target/release/burn-compare; skipped with a message where missing, never built here).
set -euo pipefail
cd "$(dirname "$0")/.."
teacher=${1:?usage: benches/compare.sh TEACHER_DIR [SECONDS] [BATCH] [CROP_SECONDS] [REPEAT]}
seconds=${2:-10}
batch=${3:-2}
crop=${4:-2}
repeat=${5:-5}
py=${PYTHON:-python3}
device=${TORCH_DEVICE:-cpu}
threads=${TORCH_THREADS:-2}
bin=${WGPU_MLKD:-target/release/wgpu-mlkd}
[ -x "$bin" ] || cargo build --release --bin wgpu-mlkd

value() { grep -E "^$1=" | tail -1 | cut -d= -f2; }

echo "== wgpu-mlkd: teacher forward, $seconds s"
ours_teacher_out=$("$bin" bench teacher --teacher "$teacher" --seconds "$seconds" --repeat "$repeat")
echo "$ours_teacher_out"
echo "== wgpu-mlkd: training step, batch $batch x $crop s"
ours_train_out=$("$bin" bench train --teacher "$teacher" --batch "$batch" --crop-seconds "$crop" --repeat "$repeat")
echo "$ours_train_out"
ours_teacher=$(value teacher_forward_seconds_per_audio_second <<<"$ours_teacher_out")
ours_train=$(value student_train_step_seconds <<<"$ours_train_out")

burn=${BURN_COMPARE:-benches/burn-compare/target/release/burn-compare}
if [ -x "$burn" ]; then
    echo "== burn (wgpu backend): teacher forward, $seconds s"
    burn_teacher_out=$("$burn" teacher --seconds "$seconds" --repeat "$repeat")
    echo "$burn_teacher_out"
    echo "== burn (wgpu backend): training step, batch $batch x $crop s"
    burn_train_out=$("$burn" train --batch "$batch" --crop-seconds "$crop" --repeat "$repeat")
    echo "$burn_train_out"
    burn_teacher=$(value teacher_forward_seconds_per_audio_second <<<"$burn_teacher_out")
    burn_train=$(value student_train_step_seconds <<<"$burn_train_out")
    echo "== ratios (burn time / wgpu-mlkd time; > 1: wgpu-mlkd faster)"
    awk -v a="$burn_teacher" -v b="$ours_teacher" 'BEGIN { printf "teacher forward: %.3fx\n", a / b }'
    awk -v a="$burn_train" -v b="$ours_train" 'BEGIN { printf "training step:   %.3fx\n", a / b }'
else
    echo "== burn baseline skipped: no $burn (build it: see benches/burn-compare/README.md)"
fi

if ! "$py" -c "import torch, transformers" 2>/dev/null; then
    echo "== PyTorch baseline skipped: $py cannot import torch and transformers (set PYTHON)"
    exit 0
fi
echo "== PyTorch ($device, $threads threads): teacher forward"
torch_teacher_out=$("$py" benches/pytorch_teacher.py --teacher "$teacher" --seconds "$seconds" --repeat "$repeat" \
    --threads "$threads" --device "$device")
echo "$torch_teacher_out"
echo "== PyTorch ($device, $threads threads): training step"
torch_train_out=$("$py" benches/pytorch_train_step.py --teacher "$teacher" --batch "$batch" --seconds "$crop" \
    --repeat "$repeat" --threads "$threads" --device "$device")
echo "$torch_train_out"
torch_teacher=$(value teacher_forward_seconds_per_audio_second <<<"$torch_teacher_out")
torch_train=$(value student_train_step_seconds <<<"$torch_train_out")

echo "== ratios (PyTorch time / wgpu-mlkd time; > 1: wgpu-mlkd faster)"
awk -v a="$torch_teacher" -v b="$ours_teacher" 'BEGIN { printf "teacher forward: %.3fx\n", a / b }'
awk -v a="$torch_train" -v b="$ours_train" 'BEGIN { printf "training step:   %.3fx\n", a / b }'
