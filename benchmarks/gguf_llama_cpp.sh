#!/usr/bin/env bash
# Atoll's GGUF exports of the Gemma 3 and Gemma 4 fixtures run through llama.cpp (llama-cpp-python in
# LLAMA_PYTHON's venv): top-1 next tokens and logits vs the fixtures' reference logits.
# The MTP drafter fixture's export drafts beside its target (benchmarks/gguf_drafter_llama_cpp.py).
set -euo pipefail
ATOLL=${ATOLL:-target/release/atoll}
LLAMA_PYTHON=${LLAMA_PYTHON:-$HOME/.cache/atoll/llama-venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# 256 byte-level tokens: the fixtures' ids are compared directly, the tokenizer only has to load.
"$LLAMA_PYTHON" - "$WORK/tokenizer.json" <<'PY'
import json, sys
bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
json.dump({"version": "1.0", "added_tokens": [], "pre_tokenizer": {"type": "ByteLevel"},
           "model": {"type": "BPE", "vocab": {chr(c): i for i, c in enumerate(cs)}, "merges": []}},
          open(sys.argv[1], "w"))
PY
# The MTP drafter fixture (it drafts for gemma4-tiny) as llama.cpp's gemma4-assistant, run beside its
# target: drafted tokens and logits vs transformers' chain (the fixture's reference.safetensors).
"$ATOLL" export tests/fixtures/gemma4-tiny --format gguf --quant f32 --tokenizer "$WORK/tokenizer.json" \
  --out "$WORK/target-f32.gguf" > /dev/null
drafters=()
for q in f32 f16 q8_0; do
  "$ATOLL" export tests/fixtures/gemma4-assistant-tiny --format drafter-gguf --quant $q \
    --tokenizer "$WORK/tokenizer.json" --out "$WORK/gemma4-assistant-tiny-$q.gguf" > /dev/null
  drafters+=("$WORK/gemma4-assistant-tiny-$q.gguf")
done
"$LLAMA_PYTHON" benchmarks/gguf_drafter_llama_cpp.py tests/fixtures/gemma4-assistant-tiny "$WORK/target-f32.gguf" "${drafters[@]}"
for fixture in gemma3-tiny gemma3-multimodal-tiny gemma4-tiny gemma4-tiny-no-keqv; do
  files=()
  for q in f32 f16 q8_0 q4_0; do
    "$ATOLL" export "tests/fixtures/$fixture" --format gguf --quant $q --tokenizer "$WORK/tokenizer.json" \
      --out "$WORK/$fixture-$q.gguf" > /dev/null
    files+=("$WORK/$fixture-$q.gguf")
  done
  "$LLAMA_PYTHON" benchmarks/gguf_llama_cpp.py "tests/fixtures/$fixture" "${files[@]}"
done
