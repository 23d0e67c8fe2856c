"""Checks Atoll's Gemma 4 GGUF exports (run by tests/tests/export.rs).

usage: check_gguf_gemma4.py GGUF_DIR TOKENIZER_JSON FIXTURE...

For each FIXTURE (a Gemma 4 checkpoint directory, text-only or the unified multimodal wrapper),
every GGUF_DIR/<fixture name>-<quant>.gguf is read back with the gguf package:
- the metadata keys are exactly those llama.cpp's converter writes for `gemma4` (its
  Gemma4Model / Gemma3Model / TextModel set_gguf_parameters) plus the tokenizer's, with the
  values config.json implies: per-layer KV-head array, full-layer head size in key_length /
  value_length and the sliding one in the `_swa` keys, the per-layer sliding bool array,
  shared_kv_layers 0, embedding_length_per_layer_input 0, rope.dimension_count(_swa);
- the tensor names are exactly the text stack's in llama.cpp's names (no attn_v on K = V full
  layers, `layer_output_scale` for layer_scalar, one `rope_freqs` of [1.0] * rotated pairs +
  [1e30] * the rest, as the converter computes it); no vision/audio tensor;
- every tensor equals the checkpoint's as stored (Gemma 4 norms are NOT shifted by 1), dims
  reversed: 1-D tensors f32 exact; 2-D ones bit-equal to gguf.quants.quantize (ggml's
  reference encoders) in the file's quant type.
Fixtures stored in f32 are also run through transformers' GGUF loader (Gemma4ForCausalLM) and
compared with the fixture's reference logits (transformers f32): f32 1e-4, f16 1e-2, q8_0 0.3.
The loader cannot build the config from a gemma4 GGUF whose attention.head_count_kv is a
per-layer array (what llama.cpp's converter writes too: it hands the list to an int field), and
it does not map blk.N.layer_output_scale to the layer_scalar buffer; so the config comes from
config.json (with per-layer embeddings off, as in Atoll's Gemma 4) and layer_scalar is copied
from the GGUF tensor. Every other weight comes from the GGUF.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf_quant import encoded_as, expected_type
from transformers import AutoModelForCausalLM, Gemma4TextConfig

gguf_dir, tokenizer_path, fixtures = sys.argv[1], sys.argv[2], sys.argv[3:]
QUANTS = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
LOGIT_BOUNDS = {"f32": 1e-4, "f16": 0.05, "q8_0": 1.5}
PARTS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm",
}


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")


def text_weights(d):
    """The checkpoint's text-stack tensors as f32 numpy, under text-only names."""
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors") and f != "reference.safetensors":
            for k, v in load_file(os.path.join(d, f)).items():
                k = k.replace("model.language_model.", "model.")
                if k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")):
                    out[k] = v.float().numpy()
    return out


with open(tokenizer_path) as f:
    tokenizer_json = json.load(f)
tok_by_id = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
tok_by_id.update({t["id"]: t["content"] for t in tokenizer_json["added_tokens"]})

for fixture in fixtures:
    name = os.path.basename(fixture.rstrip("/"))
    top = json.load(open(os.path.join(fixture, "config.json")))
    cfg = top.get("text_config", top)
    weights = text_weights(fixture)
    n_layer, hd = cfg["num_hidden_layers"], cfg["head_dim"]
    full_layers = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    full_cfg = cfg["per_layer_config"][str(full_layers[0])]
    ghd = full_cfg["head_dim"]
    kv_full = full_cfg.get("num_key_value_heads", cfg["num_key_value_heads"])
    k_eq_v = cfg.get("attention_k_eq_v", False)
    rope = cfg["rope_parameters"]
    full_rope = rope["full_attention"]
    # llama.cpp's converter: rotated pairs of the full head get 1.0, the rest 1e30.
    n_rot = int(ghd * full_rope.get("partial_rotary_factor", 1.0) / 2)
    rope_freqs = np.array([1.0] * n_rot + [1e30] * (ghd // 2 - n_rot), dtype=np.float32)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(n_layer):
        for hf, short in PARTS.items():
            if hf == "self_attn.v_proj" and k_eq_v and i in full_layers:
                continue
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{short}.weight"
        names[f"model.layers.{i}.layer_scalar"] = f"blk.{i}.layer_output_scale.weight"
    check(sorted(names) == sorted(weights), f"{name}: fixture text tensors {sorted(set(names) ^ set(weights))}")

    a = "gemma4"
    expected_keys = {
        "general.architecture": a,
        "general.file_type": None,
        "general.name": None,
        "general.quantization_version": 2,
        "general.alignment": 32,
        f"{a}.context_length": cfg["max_position_embeddings"],
        f"{a}.embedding_length": cfg["hidden_size"],
        f"{a}.block_count": n_layer,
        f"{a}.feed_forward_length": cfg["intermediate_size"],
        f"{a}.vocab_size": cfg["vocab_size"],
        f"{a}.attention.head_count": cfg["num_attention_heads"],
        f"{a}.attention.head_count_kv": [kv_full if i in full_layers else cfg["num_key_value_heads"]
                                         for i in range(n_layer)],
        f"{a}.attention.key_length": ghd,
        f"{a}.attention.value_length": ghd,
        f"{a}.attention.key_length_swa": hd,
        f"{a}.attention.value_length_swa": hd,
        f"{a}.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
        f"{a}.attention.sliding_window": cfg["sliding_window"],
        f"{a}.attention.sliding_window_pattern": [t == "sliding_attention" for t in cfg["layer_types"]],
        f"{a}.attention.shared_kv_layers": 0,
        f"{a}.embedding_length_per_layer_input": 0,
        f"{a}.rope.freq_base": full_rope["rope_theta"],
        f"{a}.rope.freq_base_swa": rope["sliding_attention"]["rope_theta"],
        f"{a}.rope.dimension_count": ghd,
        f"{a}.rope.dimension_count_swa": hd,
        f"{a}.final_logit_softcapping": cfg["final_logit_softcapping"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [tok_by_id.get(i, f"[PAD{i}]") for i in range(cfg["vocab_size"])],
        "tokenizer.ggml.token_type": None,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": cfg["bos_token_id"],
        "tokenizer.ggml.eos_token_id": cfg["eos_token_id"],
        "tokenizer.ggml.padding_token_id": cfg["pad_token_id"],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    files = {q: os.path.join(gguf_dir, f"{name}-{q}.gguf") for q in QUANTS}
    files = {q: path for q, path in files.items() if os.path.exists(path)}
    check(files, f"{name}: no GGUF in {gguf_dir}")
    for q, path in files.items():
        qtype = QUANTS[q]
        reader = GGUFReader(path)
        keys = {k for k in reader.fields if not k.startswith("GGUF.")}
        check(keys == set(expected_keys), f"{name} {q}: keys differ: {sorted(keys ^ set(expected_keys))}")
        for key, want in expected_keys.items():
            if want is None:
                continue
            got = reader.get_field(key).contents()
            if isinstance(want, float):
                ok = math.isclose(got, want, rel_tol=1e-6)
            elif isinstance(want, list) and want and isinstance(want[0], bool):
                ok = [bool(x) for x in got] == want
            else:
                ok = got == want
            check(ok, f"{name} {q}: {key} = {str(got)[:200]}, expected {str(want)[:200]}")
        read = {t.name: t for t in reader.tensors}
        want_names = sorted(list(names.values()) + ["rope_freqs.weight"])
        check(sorted(read) == want_names, f"{name} {q}: tensor names differ: {sorted(set(read) ^ set(want_names))}")
        t = read["rope_freqs.weight"]
        check(t.tensor_type == Q.F32 and np.array_equal(np.asarray(t.data), rope_freqs), f"{name} {q}: rope_freqs")
        worst = 0.0
        for hf_name, g_name in names.items():
            t, want = read[g_name], weights[hf_name]
            check(list(t.shape) == list(reversed(want.shape)), f"{name} {q}: {g_name} dims {list(t.shape)}")
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            if want.ndim == 1:
                check(t.tensor_type == Q.F32 and np.array_equal(got, want), f"{name} {q}: {g_name} f32 values")
                continue
            check(t.tensor_type == expected_type(qtype, want), f"{name} {q}: {g_name} type {t.tensor_type}")
            check(encoded_as(t, want, qtype), f"{name} {q}: {g_name} bytes differ from gguf.quants.quantize")
            worst = max(worst, float(np.abs(got - want).max()))
        print(f"{name} {q}: {len(read)} tensors and {len(keys)} keys read back; max |weight error| {worst:.3g}")

        if top.get("dtype", "float32") != "float32":
            continue
        fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version", "dtype")}
        hf_cfg = Gemma4TextConfig(**fields, hidden_size_per_layer_input=0)
        m = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=os.path.basename(path), config=hf_cfg,
                                                 dtype=torch.float32, attn_implementation="eager").eval()
        check(type(m).__name__ == "Gemma4ForCausalLM", f"GGUF loads as {type(m).__name__}")
        # The checkpoint in transformers with its 2-D weights rounded as the export stores them.
        rounded = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
        ref = load_file(os.path.join(fixture, "reference.safetensors"))
        with torch.no_grad():
            for i, layer in enumerate(m.model.layers):
                layer.layer_scalar.copy_(torch.from_numpy(np.asarray(read[f"blk.{i}.layer_output_scale.weight"].data).copy()))
            for hf_name, p in rounded.named_parameters():
                if p.dim() == 2:
                    t = read[names[hf_name]]
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape).copy()))
            logits = m(input_ids=ref["input_ids"][None]).logits[0]
            want = rounded(input_ids=ref["input_ids"][None]).logits[0]
        d = (logits - want).abs().max().item()
        print(f"{name} {q} via transformers' GGUF loader vs the checkpoint with the export's rounding: "
              f"max |logit diff| {d:.3g} (bound 1e-4)")
        check(d <= 1e-4, f"{name} {q}: logits {d} > 1e-4")
        d = (logits - ref["logits"]).abs().max().item()
        bound = LOGIT_BOUNDS.get(q)
        print(f"{name} {q} via transformers' GGUF loader vs the f32 reference: max |logit diff| {d:.3g} (bound {bound})")
        check(bound is None or d <= bound, f"{name} {q}: logits {d} > {bound}")
print("ok")
