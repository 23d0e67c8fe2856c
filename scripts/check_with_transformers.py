#!/usr/bin/env python3
"""Loads an Atoll-written checkpoint with transformers and compares its logits to `atoll logits`.

Usage: check_with_transformers.py CHECKPOINT_DIR ATOLL_LOGITS.safetensors IDS
Exit 0 when max |Δlogit| <= 1e-4 (f32).
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ckpt, logits_path, ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    ref = model(input_ids=torch.tensor([ids])).logits[0]
ours = load_file(logits_path)["logits"]
err = (ref - ours).abs().max().item()
print(f"{type(model).__name__}: max |Δlogit| = {err:.3e}")
sys.exit(0 if err <= 1e-4 else 1)
