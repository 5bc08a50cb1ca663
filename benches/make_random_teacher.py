"""Writes a randomly initialised wav2vec 2.0 at base dimensions (transformers' default Wav2Vec2Config: 12 layers,
width 768, group-norm CNN) in the Hugging Face layout, for the speed comparisons (speed does not depend on the
weights' values). Used where the real wav2vec2-base cannot be downloaded, e.g. on the device machine.

    python benches/make_random_teacher.py OUT_DIR
"""
import sys

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

out = sys.argv[1] if len(sys.argv) > 1 else sys.exit(__doc__)
torch.manual_seed(0)
Wav2Vec2Model(Wav2Vec2Config()).eval().save_pretrained(out, safe_serialization=True)
print(f"wrote a random base-sized wav2vec 2.0 to {out}")
