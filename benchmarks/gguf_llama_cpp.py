#!/usr/bin/env python3
"""Runs Atoll's GGUF exports through llama.cpp (llama-cpp-python) and compares the next-token
top-1 and logits with the fixtures' reference logits (transformers f32, which Atoll's forward
matches within 1e-4: trainer/tests/parity.rs), with llama.cpp's default f16 KV cache and
with an f32 one.
usage: gguf_llama_cpp.py FIXTURE_DIR GGUF..."""
import sys

import llama_cpp.llama_cpp as llama_cpp_c
import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

_default_model_params = llama_cpp_c.llama_model_default_params


def _model_params_without_extra_buffers():
    # llama.cpp 0.3.36's extra CPU buffer types (AMX tiles, repacked quantized weights) crash
    # (SIGSEGV) on these fixtures' tiny widths on CPUs with AMX: q8_0 and q4_0 alike, and equally
    # with llama.cpp's own quantization of the f32 export. The plain CPU path runs everywhere and
    # gave the AMD machine's recorded q8_0 / q4_0 figures to the digit (2026-12-05).
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


# Llama() reads its model parameters from here and has no argument for this one.
llama_cpp_c.llama_model_default_params = _model_params_without_extra_buffers

fixture, ggufs = sys.argv[1], sys.argv[2:]
ref = load_file(f"{fixture}/reference.safetensors")
ids, want = ref["input_ids"].tolist(), ref["logits"]

def run(path, **kv_cache):
    llm = Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=2, **kv_cache)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)[:, : want.shape[1]]


for path in ggufs:
    got = run(path)
    # The same with an f32 KV cache (GGML_TYPE_F32 = 0): how much of the difference is the
    # default f16 cache.
    got32 = run(path, type_k=0, type_v=0)
    agree = int((got.argmax(-1) == want.argmax(-1)).sum())
    print(f"{path.rsplit('/', 1)[-1]}: top-1 agrees on {agree}/{len(ids)} positions, max |logit diff| "
          f"{np.abs(got - want).max():.3g} (f32 KV cache: {np.abs(got32 - want).max():.3g})")
