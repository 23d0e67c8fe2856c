"""A GGUF export of a Gemma 3 whose query_pre_attn_scalar differs from head_dim (run by
tests/tests/export.rs). usage: check_gguf_fold.py FIXTURE GGUF_DIR (holding tiny.gguf)

- q_norm read back with the gguf package equals (1 + w) * sqrt(head_dim / query_pre_attn_scalar)
  (f32 rounding: 1e-6 relative), every other norm 1 + w exactly;
- transformers' GGUF loader, given the config fields it does not read from GGUF and with the
  fold undone, reproduces the fixture's transformers logits within 1e-4.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM

fixture, gguf_dir = sys.argv[1:3]
cfg_json = json.load(open(os.path.join(fixture, "config.json")))
weights = {k: v.float().numpy() for k, v in load_file(os.path.join(fixture, "model.safetensors")).items()}
scale = math.sqrt(cfg_json["head_dim"] / cfg_json["query_pre_attn_scalar"])
assert abs(scale - 1) > 0.05, "the fixture must exercise the fold"
reader = GGUFReader(os.path.join(gguf_dir, "tiny.gguf"))
read = {t.name: np.asarray(t.data) for t in reader.tensors}
for i in range(cfg_json["num_hidden_layers"]):
    w = weights[f"model.layers.{i}.self_attn.q_norm.weight"]
    got = read[f"blk.{i}.attn_q_norm.weight"]
    want = (w + 1) * scale
    assert np.allclose(got, want, rtol=1e-6, atol=0), f"layer {i} q_norm"
    assert np.array_equal(read[f"blk.{i}.attn_k_norm.weight"], weights[f"model.layers.{i}.self_attn.k_norm.weight"] + np.float32(1))
    assert np.array_equal(read[f"blk.{i}.attn_norm.weight"], weights[f"model.layers.{i}.input_layernorm.weight"] + np.float32(1))
assert np.array_equal(read["output_norm.weight"], weights["model.norm.weight"] + np.float32(1))

cfg = AutoConfig.from_pretrained(gguf_dir, gguf_file="tiny.gguf")
for key in ["layer_types", "rope_parameters", "query_pre_attn_scalar"]:
    setattr(cfg, key, cfg_json[key])
m = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="tiny.gguf", config=cfg, dtype=torch.float32,
                                         attn_implementation="eager").eval()
with torch.no_grad():
    for layer in m.model.layers:
        layer.self_attn.q_norm.weight.copy_((layer.self_attn.q_norm.weight + 1) / scale - 1)
    ref = load_file(os.path.join(fixture, "reference.safetensors"))
    logits = m(input_ids=ref["input_ids"][None]).logits[0]
d = (logits - ref["logits"]).abs().max().item()
print(f"q_norm fold x{scale:.4f}; transformers from GGUF vs reference logits: {d:.3g} (bound 1e-4)")
assert d <= 1e-4, d
print("ok")
