#!/usr/bin/env bash
# MLKD on Berlin EmoDB, end to end with real speech and real noise:
#   1. cache the teacher's clean targets,
#   2. distil the student on noisy speech (training noises), validating on a held-out speaker mixed with noise
#      types the student never heard: the validation table compares, per SNR and target layer, the cosine to the
#      clean targets of the student's predictions from noisy input with the teacher's own noisy features,
#   3. (SER=1) train the emotion classifier on the teacher and on the student (multi-condition, the same
#      noises), and evaluate both on the held-out speaker with the unseen noises at clean, 0, 5, 10 and 20 dB.
#
#   examples/emodb-mlkd.sh TEACHER_DIR [WORK_DIR=emodb-mlkd] [STEPS=2000]
#
# Environment: EMODB (default ../shared/data/emodb-dev), NOISE (a folder with the noise WAVs, default
# ../shared/data/noise), TRAIN_NOISES / TEST_NOISES (file stems, comma-separated), VAL_SPEAKER (03), BATCH (8),
# CROP (2 s), SER (0|1), WGPU_MLKD (the binary). Every step resumes if interrupted: run the same command again.
set -euo pipefail
teacher=${1:?usage: examples/emodb-mlkd.sh TEACHER_DIR [WORK_DIR] [STEPS]}
work=${2:-emodb-mlkd}
steps=${3:-2000}
data=${EMODB:-../shared/data/emodb-dev}
noise=${NOISE:-../shared/data/noise}
train_noises=${TRAIN_NOISES:-babble,white,music,volvo,buccaneer1}
test_noises=${TEST_NOISES:-doing_the_dishes,running_tap,machinegun}
speaker=${VAL_SPEAKER:-03}
bin=${WGPU_MLKD:-wgpu-mlkd}
mkdir -p "$work"

noise_args() { # $1: option name, $2: comma-separated stems
    local stem
    for stem in ${2//,/ }; do printf '%s\n%s\n' "$1" "$noise/$stem.wav"; done
}
mapfile -t train_noise < <(noise_args --noise "$train_noises")
mapfile -t val_noise < <(noise_args --val-noise "$test_noises")
mapfile -t test_noise < <(noise_args --noise "$test_noises")

echo "== 1. teacher cache"
"$bin" cache-teacher --teacher "$teacher" --data "$data" --out "$work/cache"

echo "== 2. distillation ($steps steps)"
resume=()
[ -f "$work/run/run.json" ] && resume=(--resume)
"$bin" train --teacher "$teacher" --cache "$work/cache" --data "$data" --out "$work/run" "${resume[@]}" \
    "${train_noise[@]}" "${val_noise[@]}" --val-speakers "$speaker" --val-max 64 --val-snr clean,0,5,10 \
    --steps "$steps" --batch "${BATCH:-8}" --crop-seconds "${CROP:-2}" --eval-every "$((steps / 4))"
echo "validation (student vs teacher cosine to the clean targets, unseen noises): $work/run/val.jsonl"

if [ "${SER:-0}" = 1 ]; then
    echo "== 3. emotion recognition, teacher vs MLKD student"
    for up in "teacher:$teacher" "student:$work/run"; do
        name=${up%%:*}
        "$bin" ser-train --upstream "$up" --data "$data" --out "$work/ser-$name" "${train_noise[@]}" \
            --snr 0,5,10,15,20 --test-speakers "$speaker"
    done
    "$bin" eval --ser "$work/ser-teacher" --ser "$work/ser-student" --data "$data" --speakers "$speaker" \
        "${test_noise[@]}" --snr clean,0,5,10,20 --json "$work/eval.json" --plot "$work/ua.png"
fi
