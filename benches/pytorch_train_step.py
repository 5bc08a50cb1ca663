"""Baseline for benches/train_step.rs: the same MLKD student step in PyTorch on the CPU (2 threads):
transformers' Wav2Vec2Model at base dimensions truncated to 2 layers, prediction heads Linear(768, 3*768) -> GELU
-> 3 x Linear(768, 768), loss mean|p - t| + mean(-logsigmoid(cos)) averaged over heads, backward, AdamW
(lr 2e-4, betas (0.9, 0.98), eps 1e-6, wd 1e-6) with grad clipping at 5; dropout 0.1. Median of N steps after
one warm-up; prints seconds per step, and the peak memory (on CUDA torch's allocator peak; on the CPU the
parameters plus the rise of the process's peak resident memory over the steps: gradients, AdamW moments and
activations, an upper bound since it counts allocator caches too).

    python benches/pytorch_train_step.py [--teacher DIR] [--batch 2] [--seconds 2] [--repeat 5] [--threads 2]
        [--device cpu|cuda]

With --teacher the student is that folder's model truncated to --student-layers (the work `wgpu-mlkd bench
train` times). The last line is `student_train_step_seconds=X`, as the wgpu-mlkd command prints.
"""
import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=2)
p.add_argument("--seconds", type=float, default=2.0)
p.add_argument("--repeat", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--teacher", default=None)
p.add_argument("--student-layers", type=int, default=2)
p.add_argument("--device", default="cpu")
# TF32 (tensor cores at a 10-bit mantissa) is PyTorch's default for cuDNN convolutions; --no-tf32 keeps every
# product in f32, as the WGSL kernels compute.
p.add_argument("--no-tf32", action="store_true")
a = p.parse_args()
if a.no_tf32:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
torch.set_num_threads(a.threads)
torch.manual_seed(0)
over = dict(num_hidden_layers=a.student_layers, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
            mask_time_prob=0.0, layerdrop=0.0)
if a.teacher:
    cfg = Wav2Vec2Config.from_pretrained(a.teacher, **over)
    n_teacher = Wav2Vec2Config.from_pretrained(a.teacher).num_hidden_layers
    model = Wav2Vec2Model.from_pretrained(a.teacher, config=cfg)
else:
    cfg = Wav2Vec2Config(**over)
    n_teacher = 12
    model = Wav2Vec2Model(cfg)
model = model.train().to(a.device)
model.feature_extractor._requires_grad = True
d = cfg.hidden_size
n = len(sorted({-(-n_teacher // 3), -(-2 * n_teacher // 3), n_teacher}))
proj = torch.nn.Linear(d, d * n).to(a.device)
outs = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(n)]).to(a.device)
params = list(model.parameters()) + list(proj.parameters()) + list(outs.parameters())
opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-6)
x = (torch.sin(torch.arange(a.batch * int(a.seconds * 16000), dtype=torch.float32) * 0.013).view(a.batch, -1) * 0.5
     ).to(a.device)
frames = model._get_feat_extract_output_lengths(torch.tensor(x.shape[1])).item()
targets = [torch.cos(torch.arange(a.batch * frames * d, dtype=torch.float32) * 0.001 * (i + 1)).view(a.batch, frames, d)
           .to(a.device) for i in range(n)]


def step():
    h = model(x).last_hidden_state
    z = F.gelu(proj(h))
    loss = 0
    for i in range(n):
        pr = outs[i](z[..., i * d:(i + 1) * d])
        loss = loss + (pr - targets[i]).abs().mean() - F.logsigmoid(F.cosine_similarity(pr, targets[i], dim=-1)).mean()
    loss = loss / n
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    opt.step()
    return loss.item()


def sync():
    if a.device == "cuda":
        torch.cuda.synchronize()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


rss_before = rss_bytes() if a.device == "cpu" and os.path.exists("/proc/self/statm") else None
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
step()
if a.device == "cuda":
    torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(a.repeat):
    t0 = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"torch {torch.__version__}, {a.device}, {a.threads} threads, batch {a.batch} x {a.seconds} s: "
      f"median {med:.3f} s per step")
if a.device == "cuda":
    print(f"peak GPU bytes: {torch.cuda.max_memory_allocated()}")
elif rss_before is not None:
    p_bytes = sum(t.numel() * t.element_size() for t in params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rise = max(peak - rss_before, 0)
    masked = " (a lower bound: loading peaked higher)" if peak_before >= peak else ""
    print(f"parameters: {p_bytes} bytes; peak resident memory {rise} bytes above the loaded model{masked}: "
          f"{p_bytes + rise} bytes together")
print(f"student_train_step_seconds={med:.6f}")
