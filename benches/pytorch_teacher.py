"""Baseline for benches/teacher.rs: transformers' Wav2Vec2Model at wav2vec2-base dimensions (random weights),
eval mode, float32, on the CPU with 2 threads; prints audio seconds per second (median of N runs after a warm-up).

    python benches/pytorch_teacher.py [--seconds 1] [--repeat 5] [--threads 2]
"""
import argparse
import statistics
import time

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=float, default=1.0)
p.add_argument("--repeat", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
model = Wav2Vec2Model(Wav2Vec2Config()).eval()
x = torch.sin(torch.arange(int(a.seconds * 16000), dtype=torch.float32) * 0.01)[None] * 0.5
with torch.no_grad():
    model(x)
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        model(x).last_hidden_state.numpy()
        times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"torch {torch.__version__}, {a.threads} threads, {a.seconds} s audio: median {med:.3f} s "
      f"-> {a.seconds / med:.2f} audio seconds per second")
