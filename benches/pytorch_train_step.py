"""Baseline for benches/train_step.rs: the same MLKD student step in PyTorch on the CPU (2 threads):
transformers' Wav2Vec2Model at base dimensions truncated to 2 layers, prediction heads Linear(768, 3*768) -> GELU
-> 3 x Linear(768, 768), loss mean|p - t| + mean(-logsigmoid(cos)) averaged over heads, backward, AdamW
(lr 2e-4, betas (0.9, 0.98), eps 1e-6, wd 1e-6) with grad clipping at 5; dropout 0.1. Median of N steps after
one warm-up; prints seconds per step and the peak of torch's CPU allocator is not tracked (see RESULTS.md).

    python benches/pytorch_train_step.py [--batch 2] [--seconds 2] [--repeat 5] [--threads 2]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=2)
p.add_argument("--seconds", type=float, default=2.0)
p.add_argument("--repeat", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = Wav2Vec2Config(num_hidden_layers=2, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                     mask_time_prob=0.0, layerdrop=0.0)
model = Wav2Vec2Model(cfg).train()
d, n = cfg.hidden_size, 3
proj = torch.nn.Linear(d, d * n)
outs = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(n)])
params = list(model.parameters()) + list(proj.parameters()) + list(outs.parameters())
opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-6)
x = torch.sin(torch.arange(a.batch * int(a.seconds * 16000), dtype=torch.float32) * 0.013).view(a.batch, -1) * 0.5
frames = model._get_feat_extract_output_lengths(torch.tensor(x.shape[1])).item()
targets = [torch.cos(torch.arange(a.batch * frames * d, dtype=torch.float32) * 0.001 * (i + 1)).view(a.batch, frames, d)
           for i in range(n)]


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


step()
times = []
for _ in range(a.repeat):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch} x {a.seconds} s: "
      f"median {statistics.median(times):.3f} s per step")
