#!/usr/bin/env bash
# llama.cpp picks Gemma 3's attention scale by layer count (62 layers: 1/sqrt(hidden/heads), as for
# the 27B; otherwise 1/sqrt(head_dim)) and ignores query_pre_attn_scalar; Atoll's GGUF export folds
# the difference into q_norm. Two tiny random Gemma 3s, one on each side of that rule
# (benchmarks/gguf_attention_scale.py), exported and run through llama.cpp: top-1 tokens and
# logits against transformers'.
set -euo pipefail
ATOLL=${ATOLL:-target/release/atoll}
PYTHON=${PYTHON:-$HOME/.cache/atoll/reference-venv/bin/python}
LLAMA_PYTHON=${LLAMA_PYTHON:-$HOME/.cache/atoll/llama-venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" benchmarks/gguf_attention_scale.py "$WORK" > /dev/null 2>&1
"$LLAMA_PYTHON" benchmarks/byte_level_tokenizer.py "$WORK/tokenizer.json"
for layers in 62 60; do
  model="$WORK/gemma3-$layers-layers"
  "$ATOLL" export "$model" --format gguf --quant f32 --tokenizer "$WORK/tokenizer.json" \
    --out "$WORK/gemma3-$layers-layers-f32.gguf" 2>&1 | grep -i "q_norm" || echo "gemma3-$layers-layers: no q_norm fold"
  "$LLAMA_PYTHON" benchmarks/gguf_llama_cpp.py "$model" "$WORK/gemma3-$layers-layers-f32.gguf"
done
