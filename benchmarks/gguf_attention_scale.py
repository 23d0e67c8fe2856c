#!/usr/bin/env python3
"""Writes two tiny random Gemma 3 checkpoints that tell llama.cpp's two attention-scale rules
apart, with transformers' f32 reference logits (scripts/make_fixtures.py's layout):

- `gemma3-62-layers`: 62 layers, the layer count llama.cpp takes for Gemma 3 27B, which it
  scales by 1/sqrt(hidden_size / num_attention_heads) = 1/sqrt(16); query_pre_attn_scalar 16, as
  the 27B's 168 = 5376 / 32, and head_dim 24 (so 1/sqrt(head_dim) would be wrong).
- `gemma3-60-layers`: the same with 60 layers, which llama.cpp scales by 1/sqrt(head_dim).

Run by benchmarks/gguf_attention_scale.sh with the reference venv. usage: gguf_attention_scale.py OUT
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import make_fixtures as fx  # noqa: E402
import torch  # noqa: E402
from transformers import Gemma3ForCausalLM  # noqa: E402

fx.OUT = sys.argv[1]
for layers in (62, 60):
    # llama.cpp hard-codes Gemma 3's pattern of five sliding layers to one full one.
    pattern = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6)
    pattern += ["sliding_attention"] * (layers - len(pattern))
    config = fx.gemma3_config(num_hidden_layers=layers, layer_types=pattern, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    fx.randomize(model, 62)
    fx.save(model, f"gemma3-{layers}-layers", seed=162)
