"""Checks `atoll export` outputs with the libraries users load them with (run by tests/tests/export.rs).

usage: check_export.py SOURCE TRAINED ATOLL_LOGITS HF_FULL HF_TEXT GGUF_DIR

SOURCE        the multimodal fixture training started from (Gemma3ForConditionalGeneration)
TRAINED       Atoll's saved checkpoint after training (run/final)
ATOLL_LOGITS  safetensors with `input_ids` [T] and Atoll's `logits` [T, vocab] for TRAINED
HF_FULL       `atoll export --format hf`
HF_TEXT       `atoll export --format hf --text-only`
GGUF_DIR      holds model-{f32,f16,bf16,q8_0,q4_0}.gguf from `atoll export --format gguf`

Tolerances (max |logit difference| against Atoll's f32 logits; logits are O(5)):
  HF exports in transformers (f32, eager): 1e-4
  GGUF via transformers' GGUF loader: f32 1e-4, f16 1e-2, q8_0 0.3 (the tiny model's weights
  are wide random values: 8-bit blocks move its O(5) logits by ~0.2; llama.cpp shows the same)
  GGUF tensors read back with the gguf package, against Atoll's weights transformed as llama.cpp
  expects (norms 1 + w, dims reversed): f32 exact, f16/bf16 bit-equal to numpy's rounding,
  q8_0/q4_0 bit-equal to gguf.quants.quantize (ggml's reference quantisers).
"""
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import gguf
from gguf import GGUFReader, GGMLQuantizationType
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
)

source, trained, atoll_logits, hf_full, hf_text, gguf_dir = sys.argv[1:7]
ref = load_file(atoll_logits)
ids, expected = ref["input_ids"][None], ref["logits"]


def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors") and f != "reference.safetensors":
            with safe_open(os.path.join(d, f), "pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
    return out


def config(d):
    with open(os.path.join(d, "config.json")) as f:
        return json.load(f)


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")


def max_diff(model, what, bound):
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits[0].float()
    d = (got - expected).abs().max().item()
    print(f"{what}: max |logit diff| {d:.3g} (bound {bound})")
    check(d <= bound, f"{what}: {d} > {bound}")
    return d


# --- HF full export: untouched tensors bit for bit, config fields, original class -------------
src, full = tensors(source), tensors(hf_full)
check(sorted(src) == sorted(full), "HF export has the source's tensor names")
untrained = [k for k in src if not k.startswith("language_model.")]
check(len(untrained) > 10, "fixture has a vision tower and projector")
for k in untrained:
    check(torch.equal(src[k].view(torch.uint8), full[k].view(torch.uint8)) and src[k].dtype == full[k].dtype,
          f"{k} changed")
check(config(hf_full) == config(source), "HF export keeps config.json")
trained_t = tensors(trained)
for k in full:
    check(torch.equal(full[k], trained_t[k]), f"HF export {k} equals the trained checkpoint")
m = Gemma3ForConditionalGeneration.from_pretrained(hf_full, dtype=torch.float32, attn_implementation="eager")
max_diff(m, "HF full as Gemma3ForConditionalGeneration", 1e-4)
m = AutoModelForCausalLM.from_pretrained(hf_full, dtype=torch.float32, attn_implementation="eager")
check(type(m).__name__ == "Gemma3ForConditionalGeneration", f"AutoModelForCausalLM gave {type(m).__name__}")
m = Gemma3ForCausalLM.from_pretrained(hf_text, dtype=torch.float32, attn_implementation="eager")
max_diff(m, "HF text-only as Gemma3ForCausalLM", 1e-4)
tok = AutoTokenizer.from_pretrained(hf_full)
check(tok.bos_token_id == 2 and tok.eos_token_id == 1, "tokenizer special tokens")
sample = "To be, or not to be"
check(tok(sample)["input_ids"][0] == 2, "tokenizer adds <bos>")

# --- GGUF read back by the gguf package -----------------------------------------------------
text_cfg = config(hf_text)
with open(os.path.join(trained, "tokenizer.json")) as f:
    tokenizer_json = json.load(f)
hd, qpas = text_cfg["head_dim"], text_cfg["query_pre_attn_scalar"]
q_scale = math.sqrt(hd / qpas)
weights = {k.replace("language_model.model.", "model."): v.float().numpy() for k, v in trained_t.items()
           if k.startswith("language_model.")}
names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
parts = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm",
}
for i in range(text_cfg["num_hidden_layers"]):
    for hf, short in parts.items():
        names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{short}.weight"


def llama_cpp_value(hf_name, w):
    if hf_name.endswith("norm.weight"):
        w = (w + 1.0).astype(np.float32)
        if hf_name.endswith("q_norm.weight"):
            w = (w * np.float32(q_scale)).astype(np.float32)
    return w


def field(reader, key):
    f = reader.get_field(key)
    check(f is not None, f"GGUF key {key} present")
    return f.contents()


quant_types = {
    "f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
}
rope = text_cfg["rope_parameters"]
expected_keys = {
    "general.architecture": "gemma3",
    "gemma3.context_length": text_cfg["max_position_embeddings"],
    "gemma3.embedding_length": text_cfg["hidden_size"],
    "gemma3.block_count": text_cfg["num_hidden_layers"],
    "gemma3.feed_forward_length": text_cfg["intermediate_size"],
    "gemma3.attention.head_count": text_cfg["num_attention_heads"],
    "gemma3.attention.head_count_kv": text_cfg["num_key_value_heads"],
    "gemma3.attention.key_length": hd,
    "gemma3.attention.value_length": hd,
    "gemma3.attention.sliding_window": text_cfg["sliding_window"],
    "gemma3.attention.sliding_window_pattern": text_cfg["layer_types"].index("full_attention") + 1,
    "gemma3.rope.freq_base": rope["full_attention"]["rope_theta"],
    "gemma3.rope.freq_base_swa": rope["sliding_attention"]["rope_theta"],
    "gemma3.rope.scaling.type": "linear",
    "gemma3.rope.scaling.factor": rope["full_attention"]["factor"],
    "gemma3.attention.layer_norm_rms_epsilon": text_cfg["rms_norm_eps"],
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.bos_token_id": 2,
    "tokenizer.ggml.eos_token_id": 1,
    "tokenizer.ggml.padding_token_id": 0,
}
vocab = text_cfg["vocab_size"]
tok_by_id = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
tok_by_id.update({t["id"]: t["content"] for t in tokenizer_json["added_tokens"]})
for q, qtype in quant_types.items():
    path = os.path.join(gguf_dir, f"model-{q}.gguf")
    reader = GGUFReader(path)
    for key, value in expected_keys.items():
        got = field(reader, key)
        ok = math.isclose(got, value, rel_tol=1e-6) if isinstance(value, float) else got == value
        check(ok, f"{q}: {key} = {got}, expected {value}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    check(len(tokens) == vocab, f"{q}: {len(tokens)} tokens for a vocabulary of {vocab}")
    for i in range(vocab):
        check(tokens[i] == tok_by_id.get(i, f"[PAD{i}]"), f"{q}: token {i}")
    merges = field(reader, "tokenizer.ggml.merges")
    src_merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    check(merges == src_merges, f"{q}: merges")
    types = field(reader, "tokenizer.ggml.token_type")
    check(all(types[i] == 3 for i in range(4)), f"{q}: special tokens are control tokens")
    read = {t.name: t for t in reader.tensors}
    check(sorted(read) == sorted(names.values()), f"{q}: tensor names {sorted(set(read) ^ set(names.values()))}")
    worst = 0.0
    for hf_name, g_name in names.items():
        t = read[g_name]
        want = llama_cpp_value(hf_name, weights[hf_name])
        check(list(t.shape) == list(reversed(want.shape)), f"{q}: {g_name} dims {list(t.shape)}")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            check(t.tensor_type == GGMLQuantizationType.F32, f"{q}: {g_name} is f32")
            check(np.array_equal(got, want), f"{q}: {g_name} values")
            continue
        check(t.tensor_type == qtype, f"{q}: {g_name} type {t.tensor_type}")
        # Atoll's encoding is bit-equal to the gguf package's reference encoder.
        ref_bytes = gguf.quants.quantize(want, qtype)
        check(np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ref_bytes.view(np.uint8).reshape(-1)),
              f"{q}: {g_name} bytes differ from gguf.quants.quantize")
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"gguf {q}: {len(read)} tensors and {len(expected_keys)} keys read back; max |weight error| {worst:.3g}")

# --- GGUF through transformers' GGUF loader --------------------------------------------------
# The loader maps context/embedding/block/head counts, key_length, rms eps, sliding_window and
# rope.freq_base; it does not read the layer pattern, rope scaling, freq_base_swa or
# query_pre_attn_scalar (llama.cpp hard-codes or reads those itself), so they come from the HF
# config; everything else, including every weight, comes from the GGUF.
for q, bound in [("f32", 1e-4), ("f16", 1e-2), ("q8_0", 0.3)]:
    name = f"model-{q}.gguf"
    cfg = AutoConfig.from_pretrained(gguf_dir, gguf_file=name)
    for key in ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "sliding_window", "max_position_embeddings"]:
        check(getattr(cfg, key) == text_cfg[key], f"{q}: transformers reads {key} = {getattr(cfg, key)}")
    cfg.layer_types = text_cfg["layer_types"]
    cfg.rope_parameters = text_cfg["rope_parameters"]
    cfg.query_pre_attn_scalar = qpas
    cfg.vocab_size = vocab
    m = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, config=cfg, dtype=torch.float32,
                                             attn_implementation="eager")
    check(type(m).__name__ == "Gemma3ForCausalLM", f"GGUF loads as {type(m).__name__}")
    if qpas != hd:
        # transformers applies query_pre_attn_scalar itself: undo the fold llama.cpp needs.
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.q_norm.weight.copy_((layer.self_attn.q_norm.weight + 1) / q_scale - 1)
    max_diff(m, f"GGUF {q} via transformers", bound)
print("ok")
