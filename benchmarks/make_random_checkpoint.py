#!/usr/bin/env python3
"""Writes a Gemma 3 12B-shaped text checkpoint (Gemma3ForCausalLM layout, bf16, random weights,
5 GB shards + index) tensor by tensor, for the export benchmark; memory stays at one tensor.
usage: make_random_checkpoint.py OUT_DIR [LAYERS]   (needs numpy)
LAYERS (default 48) keeps the first layers only, every tensor still of the 12B's shape, when the
disk cannot hold the whole model twice."""
import json
import os
import sys

import numpy as np

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
V, H, F, NH, KV, HD = 262208, 3840, 15360, 16, 8, 256
L = int(sys.argv[2]) if len(sys.argv) > 2 else 48
layer_types = ((["sliding_attention"] * 5 + ["full_attention"]) * 8)[:L]
config = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": V,
    "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": NH,
    "num_key_value_heads": KV, "head_dim": HD, "query_pre_attn_scalar": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "sliding_window": 1024,
    "layer_types": layer_types,
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "dtype": "bfloat16",
}
specs = [("model.embed_tokens.weight", (V, H))]
for i in range(L):
    p = f"model.layers.{i}"
    specs += [(f"{p}.self_attn.q_proj.weight", (NH * HD, H)), (f"{p}.self_attn.k_proj.weight", (KV * HD, H)),
              (f"{p}.self_attn.v_proj.weight", (KV * HD, H)), (f"{p}.self_attn.o_proj.weight", (H, NH * HD)),
              (f"{p}.self_attn.q_norm.weight", (HD,)), (f"{p}.self_attn.k_norm.weight", (HD,)),
              (f"{p}.mlp.gate_proj.weight", (F, H)), (f"{p}.mlp.up_proj.weight", (F, H)),
              (f"{p}.mlp.down_proj.weight", (H, F))]
    specs += [(f"{p}.{n}.weight", (H,)) for n in ["input_layernorm", "post_attention_layernorm",
                                                  "pre_feedforward_layernorm", "post_feedforward_layernorm"]]
specs.append(("model.norm.weight", (H,)))

rng = np.random.default_rng(0)
pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).view(np.uint32) >> 16  # bf16 bits
pool = pool.astype(np.uint16)
shards, cur, size = [], [], 0
for name, shape in specs:
    n = int(np.prod(shape)) * 2
    if cur and size + n > 5_000_000_000:
        shards.append(cur); cur, size = [], 0
    cur.append((name, shape)); size += n
shards.append(cur)
weight_map, total = {}, 0
for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    header, off = {}, 0
    for name, shape in shard:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n; weight_map[name] = fname
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(os.path.join(out, fname), "wb") as f:
        f.write(len(hb).to_bytes(8, "little")); f.write(hb)
        for name, shape in shard:
            left = int(np.prod(shape))
            while left:
                start = int(rng.integers(0, pool.size))
                take = min(left, pool.size - start)
                f.write(pool[start:start + take].tobytes())
                left -= take
    total += off
json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)
print(f"wrote {out}: {len(specs)} tensors, {total / 1e9:.1f} GB in {len(shards)} shards")
