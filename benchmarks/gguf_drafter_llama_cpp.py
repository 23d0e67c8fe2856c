#!/usr/bin/env python3
"""Runs Atoll's GGUF export of an MTP drafter in llama.cpp (llama-cpp-python 0.3.36) beside its
target, the way llama.cpp's speculative decoding drives a Gemma 4 assistant
(`common/speculative.cpp`, `common_speculative_impl_draft_mtp` with the target's K/V shared), and
compares its draft chain with transformers' (the fixture's reference.safetensors):

- the target's context decodes the fixture's ids at positions 0..c-1 with next-token embeddings
  on, which gives its final hidden state h_{c-1};
- the drafter's context, attached to the target's (`ctx_other`: its graph reads the target's
  K/V cache and token embedding), decodes the token x_c at position c with h_{c-1} as its
  embedding, then each step the token it drafted with its own projected state, at the same
  position, as the assistant is run in transformers.

Per context length c and weight type: the drafted tokens against transformers' greedy chain and
the largest logit difference. Inside the sliding window (c <= sliding_window, where llama.cpp and
transformers mask alike) every drafted token must agree, or the script exits with an error. llama.cpp checks the file's keys, tensor names and shapes, the target
width (`embedding_length_out`) and layer count (`nextn_predict_layers`) when it loads it.
usage: gguf_drafter_llama_cpp.py DRAFTER_FIXTURE_DIR TARGET_GGUF DRAFTER_GGUF...
"""
import ctypes
import json
import sys

import numpy as np
import llama_cpp as L
from llama_cpp import llama_cpp as lib
from safetensors.numpy import load_file

fixture, target_path, drafters = sys.argv[1], sys.argv[2], sys.argv[3:]
ref = load_file(f"{fixture}/reference.safetensors")
ids = ref["input_ids"].tolist()
contexts = sorted(int(k[1:].split(".")[0]) for k in ref if k.endswith(".tokens"))

# Silences llama.cpp's log; the callback must outlive every call that may log.
QUIET = L.llama_log_callback(lambda level, text, data: None)
L.llama_log_set(QUIET, None)
L.llama_backend_init()

# The next-token embedding calls are C++ symbols (src/llama-ext.h), not in the Python bindings.
set_embeddings_nextn = getattr(lib._lib, "_Z26llama_set_embeddings_nextnP13llama_contextbb")
set_embeddings_nextn.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool]
set_embeddings_nextn.restype = None
get_embeddings_nextn_ith = getattr(lib._lib, "_Z30llama_get_embeddings_nextn_ithP13llama_contexti")
get_embeddings_nextn_ith.argtypes = [ctypes.c_void_p, ctypes.c_int32]
get_embeddings_nextn_ith.restype = ctypes.POINTER(ctypes.c_float)


def load(path):
    params = L.llama_model_default_params()
    params.use_extra_bufts = False  # as benchmarks/gguf_llama_cpp.py: AMX / repack crash on tiny widths
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        sys.exit(f"FAIL: llama.cpp could not load {path}")
    return model


def context(model, ctx_other=None):
    params = L.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 64
    params.n_threads = params.n_threads_batch = 2
    params.type_k = params.type_v = 0  # f32 K/V: the comparison is of the weights, not the cache
    if ctx_other is not None:
        params.ctx_other = ctx_other
        params.ctx_type = L.LLAMA_CONTEXT_TYPE_MTP
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        sys.exit("FAIL: llama.cpp could not create the context")
    return ctx


def decode(ctx, entries):
    """Decodes (token, position, embedding or None) entries; returns their batch indices."""
    batch = L.llama_batch_ext_init(ctx)
    keep, indices = [], []
    for token, pos, embd in entries:
        i = L.llama_batch_ext_add_token(batch, 0, token)
        L.llama_batch_ext_set_pos(batch, i, (L.llama_pos * 1)(pos))
        if embd is not None:
            data = np.ascontiguousarray(embd, dtype=np.float32)
            keep.append(data)
            view = L.llama_embd(data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, data.size)
            assert L.llama_batch_ext_set_embd_token(batch, i, view)
        L.llama_batch_ext_set_output_logits(batch, i, True)
        indices.append(i)
    rc = L.llama_process(ctx, L.LLAMA_PROCESS_TYPE_DECODE, batch)
    L.llama_batch_ext_free(batch)
    if rc != 0:
        sys.exit(f"FAIL: llama_process returned {rc}")
    return indices


with open(f"{fixture}/config.json") as f:
    window = json.load(f)["text_config"]["sliding_window"]
failures = []

target = load(target_path)
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(target))
for path in drafters:
    drafter = load(path)
    width = L.llama_model_n_embd_out(drafter)
    # Both contexts first, as llama.cpp's speculative decoding creates them: creating the drafter's
    # context resets the target's cache it shares.
    ctx_t = context(target)
    ctx_d = context(drafter, ctx_t)
    set_embeddings_nextn(ctx_t, True, False)
    set_embeddings_nextn(ctx_d, True, True)
    lines = []
    for c in contexts:
        worst = 0.0
        want_tokens, want_logits = ref[f"c{c}.tokens"], ref[f"c{c}.logits"]
        L.llama_memory_clear(L.llama_get_memory(ctx_t), True)
        decode(ctx_t, [(t, p, None) for p, t in enumerate(ids[:c])])
        h = np.ctypeslib.as_array(get_embeddings_nextn_ith(ctx_t, c - 1), shape=(width,)).copy()
        token, drafted = ids[c], []
        for step in range(len(want_tokens)):
            (i,) = decode(ctx_d, [(token, c, h)])
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx_d, i), shape=(n_vocab,)).copy()
            h = np.ctypeslib.as_array(get_embeddings_nextn_ith(ctx_d, i), shape=(width,)).copy()
            worst = max(worst, float(np.abs(logits[: want_logits.shape[1]] - want_logits[step]).max()))
            token = int(logits.argmax())
            drafted.append(token)
        agree = sum(a == b for a, b in zip(drafted, want_tokens.tolist()))
        if c <= window and agree < len(drafted):
            failures.append(f"{path}: c={c} inside the window, {agree}/{len(drafted)} tokens agree")
        lines.append(f"c={c}: {agree}/{len(drafted)} (max |logit diff| {worst:.3g})")
    L.llama_free(ctx_d)
    L.llama_free(ctx_t)
    print(f"{path.rsplit('/', 1)[-1]}: drafted tokens equal transformers' at {', '.join(lines)}")
if failures:
    sys.exit("FAIL: " + "; ".join(failures))
