#!/usr/bin/env bash
# Atoll's GGUF exports of the Gemma 3 and Gemma 4 fixtures run through llama.cpp (llama-cpp-python in
# LLAMA_PYTHON's venv): top-1 next tokens and logits vs the fixtures' reference logits.
# The MTP drafter fixture's export drafts beside its target (benchmarks/gguf_drafter_llama_cpp.py).
set -euo pipefail
ATOLL=${ATOLL:-target/release/atoll}
LLAMA_PYTHON=${LLAMA_PYTHON:-$HOME/.cache/atoll/llama-venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$LLAMA_PYTHON" benchmarks/byte_level_tokenizer.py "$WORK/tokenizer.json"
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
