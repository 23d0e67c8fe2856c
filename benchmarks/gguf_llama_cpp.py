#!/usr/bin/env python3
"""Runs Atoll's GGUF exports through llama.cpp (llama-cpp-python) and compares the next-token
top-1 and logits with the fixtures' reference logits (transformers f32, which Atoll's forward
matches within 1e-4: trainer/tests/parity.rs).
usage: gguf_llama_cpp.py FIXTURE_DIR GGUF..."""
import sys

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

fixture, ggufs = sys.argv[1], sys.argv[2:]
ref = load_file(f"{fixture}/reference.safetensors")
ids, want = ref["input_ids"].tolist(), ref["logits"]
for path in ggufs:
    llm = Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)[:, : want.shape[1]]
    agree = int((got.argmax(-1) == want.argmax(-1)).sum())
    print(f"{path}: top-1 agrees on {agree}/{len(ids)} positions, max |logit diff| {np.abs(got - want).max():.3g}")
