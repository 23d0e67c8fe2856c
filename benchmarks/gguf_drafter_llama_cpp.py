#!/usr/bin/env python3
"""Loads Atoll's GGUF export of an MTP drafter into llama.cpp (llama-cpp-python's low-level API)
beside its target, as llama.cpp's speculative decoding does: the target's model and context, then
the drafter's model and a context attached to the target's (`ctx_other`), whose graph reads the
target's K/V cache and hidden state. llama.cpp checks the drafter's keys, every tensor's name and
shape, the target width (`embedding_length_out`) and the layer count (`nextn_predict_layers`)
on the way, and fails on any mismatch.
usage: gguf_drafter_llama_cpp.py TARGET_GGUF DRAFTER_GGUF..."""
import ctypes
import sys

import llama_cpp as L

target_path, drafters = sys.argv[1], sys.argv[2:]
# Silences llama.cpp's loading log; the callback must outlive every call that may log.
QUIET = L.llama_log_callback(lambda level, text, data: None)
L.llama_log_set(QUIET, None)
L.llama_backend_init()


def context(model, ctx_other=None):
    params = L.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 64
    if ctx_other is not None:
        params.ctx_other = ctx_other
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        sys.exit("FAIL: llama.cpp could not create the context")
    return ctx


target = L.llama_model_load_from_file(target_path.encode(), L.llama_model_default_params())
if not target:
    sys.exit(f"FAIL: llama.cpp could not load {target_path}")
target_ctx = context(target)
for path in drafters:
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        sys.exit(f"FAIL: llama.cpp could not load {path}")
    context(model, target_ctx)
    # llama.cpp counts a drafter's layers as next-token-prediction layers, not trunk layers.
    buf = ctypes.create_string_buffer(64)
    L.llama_model_meta_val_str(model, b"gemma4-assistant.nextn_predict_layers", buf, len(buf))
    print(f"{path.rsplit('/', 1)[-1]}: loads as a drafter of {buf.value.decode()} layers, width "
          f"{L.llama_model_n_embd(model)}, trunk layers {L.llama_model_n_layer(model)}, reading a "
          f"width-{L.llama_model_n_embd_out(model)} target; its context attached to "
          f"{target_path.rsplit('/', 1)[-1]}'s")
