#!/usr/bin/env bash
# One LoRA training step (forward + backward + clip + AdamW on the adapters; rank R on all seven
# projections, frozen f32 base) of the same tiny Gemma 3 in Atoll and in peft + transformers eager,
# same weights, same thread count, same machine, one run. Prints both and the ratio
# (peft time / Atoll time; >= 1.0 means Atoll is at least as fast).
# Usage: PYTHON=/path/to/venv/python benchmarks/lora_step.sh   (or `make bench-lora`)
# Env: THREADS (default: all cores), BATCH (8), SEQ (256), RANK (16), STEPS (10),
# PRESET (gemma3-bench), ROUNDS (3): the implementations alternate ROUNDS times and each keeps its
# best median.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
ATOLL="${ATOLL:-target/release/atoll}"
THREADS="${THREADS:-$(nproc)}"
BATCH="${BATCH:-8}"; SEQ="${SEQ:-256}"; RANK="${RANK:-16}"; STEPS="${STEPS:-10}"; PRESET="${PRESET:-gemma3-bench}"; ROUNDS="${ROUNDS:-3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$ATOLL" model init "$PRESET" --out "$WORK/model" --seed 0 >/dev/null
for round in $(seq "$ROUNDS"); do
    "$ATOLL" bench lora-step --preset "$PRESET" --batch "$BATCH" --seq "$SEQ" --rank "$RANK" --steps "$STEPS" --threads "$THREADS" 2>/dev/null >> "$WORK/ours.jsonl"
    "$PYTHON" benchmarks/lora_step.py --model "$WORK/model" --batch "$BATCH" --seq "$SEQ" --rank "$RANK" --steps "$STEPS" --threads "$THREADS" 2>/dev/null | tail -1 >> "$WORK/theirs.jsonl"
done

"$PYTHON" - "$WORK/ours.jsonl" "$WORK/theirs.jsonl" "$PRESET" <<'PY'
import json, sys
def best(path):
    runs = [json.loads(l) for l in open(path)]
    return min(runs, key=lambda r: r["median_ms"]), [round(r["median_ms"]) for r in runs]
(ours, ours_all), (theirs, theirs_all), preset = best(sys.argv[1]), best(sys.argv[2]), sys.argv[3]
print(f"LoRA step, preset {preset}: r={ours['rank']} on 7 projections, batch {ours['batch']} x seq {ours['seq']},"
      f" {ours['threads']} threads, best of {len(ours_all)} alternating rounds of {ours['steps']} timed steps (median per round)")
print(f"  per-round medians, ms: atoll {ours_all}, peft {theirs_all}")
print(f"  {'implementation':<70} {'ms/step':>10} {'tokens/s':>10}")
print(f"  {'atoll (tch, libtorch 2.11)':<70} {ours['median_ms']:>10.1f} {ours['tokens_per_s']:>10.0f}")
print(f"  {theirs['impl']:<70} {theirs['median_ms']:>10.1f} {theirs['tokens_per_s']:>10.0f}")
print(f"  ratio (peft ms / atoll ms): {theirs['median_ms'] / ours['median_ms']:.2f}")
PY
