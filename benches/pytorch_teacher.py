"""Baseline for benches/teacher.rs: transformers' Wav2Vec2Model at wav2vec2-base dimensions (random weights),
eval mode, float32, on the CPU with 2 threads; prints audio seconds per second (median of N runs after a warm-up).

    python benches/pytorch_teacher.py [--teacher DIR] [--seconds 1] [--repeat 5] [--threads 2] [--device cpu|cuda]
        [--dtype float32|float16]

With --teacher it loads that Hugging Face folder (the model `wgpu-mlkd bench teacher` times). The last line is
`teacher_forward_seconds_per_audio_second=X`, as the wgpu-mlkd command prints (benches/compare.sh reads both).
"""
import argparse
import os
import resource
import statistics
import time

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=float, default=1.0)
p.add_argument("--repeat", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--teacher", default=None)
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", default="float32")
# TF32 (tensor cores at a 10-bit mantissa) is PyTorch's default for cuDNN convolutions; --no-tf32 keeps every
# product in f32, as the WGSL kernels compute.
p.add_argument("--no-tf32", action="store_true")
a = p.parse_args()
if a.no_tf32:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
torch.set_num_threads(a.threads)
torch.manual_seed(0)
dtype = getattr(torch, a.dtype)
if a.teacher:
    model = Wav2Vec2Model.from_pretrained(a.teacher)
else:
    model = Wav2Vec2Model(Wav2Vec2Config())
model = model.eval().to(a.device, dtype)
x = (torch.sin(torch.arange(int(a.seconds * 16000), dtype=torch.float32) * 0.01)[None] * 0.5).to(a.device, dtype)
if a.device == "cuda":
    torch.cuda.reset_peak_memory_stats()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


rss_loaded = rss_bytes() if a.device == "cpu" and os.path.exists("/proc/self/statm") else None
peak_loading = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.no_grad():
    model(x)
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        model(x).last_hidden_state.float().cpu().numpy()
        times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"torch {torch.__version__}, {a.device} {a.dtype}, {a.threads} threads, {a.seconds} s audio: median {med:.3f} s "
      f"-> {a.seconds / med:.2f} audio seconds per second")
if a.device == "cuda":
    print(f"peak GPU bytes: {torch.cuda.max_memory_allocated()}")
elif rss_loaded is not None:
    # No allocator statistics on the CPU: the parameters plus how far the process's peak resident memory rose
    # above what it held with the model loaded (an upper bound on the forward's own peak; Linux only).
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rise = max(peak_rss - rss_loaded, 0)
    masked = " (a lower bound: loading peaked higher)" if peak_loading >= peak_rss else ""
    print(f"parameters: {params} bytes; peak resident memory {rise} bytes above the loaded model{masked}: "
          f"{params + rise} bytes together")
print(f"teacher_forward_seconds_per_audio_second={med / a.seconds:.6f}")
