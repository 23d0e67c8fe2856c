#!/usr/bin/env bash
# Writes random checkpoints with `atoll model init` (Gemma 3 f32, Gemma 4 sharded bf16), probes
# them with `atoll logits`, and checks transformers loads them to the same logits (<= 1e-4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
ATOLL="${ATOLL:-target/release/atoll}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
IDS="$(seq -s, 2 97)"   # 96 tokens: longer than the tiny presets' sliding window (64)
"$ATOLL" model init gemma3-tiny --out "$WORK/g3" --seed 1 >/dev/null
"$ATOLL" model init gemma4-tiny --out "$WORK/g4" --seed 2 --dtype bf16 --max-shard-bytes 400000 >/dev/null
for m in g3 g4; do
    "$ATOLL" logits --model "$WORK/$m" --ids "$IDS" --out "$WORK/$m.safetensors" >/dev/null
    "$PYTHON" scripts/check_with_transformers.py "$WORK/$m" "$WORK/$m.safetensors" "$IDS" 2>/dev/null
done
