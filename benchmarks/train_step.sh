#!/usr/bin/env bash
# One training step (forward + backward + clip + AdamW) of the same tiny Gemma 3 in Atoll and in
# transformers eager, same weights, same thread count, same machine, one run. Prints both and
# the ratio (transformers time / Atoll time; >= 1.0 means Atoll is at least as fast).
# Usage: PYTHON=/path/to/venv/python benchmarks/train_step.sh   (or `make bench-train-step`)
# Env: THREADS (default: all cores), BATCH (8), SEQ (256), STEPS (10), PRESET (gemma3-bench),
# ROUNDS (3): the two implementations run alternately ROUNDS times (which goes first alternates
# too) and each keeps its best median, so a background hiccup on a shared machine does not decide
# the ratio; each round's own ratio and their median are printed beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
ATOLL="${ATOLL:-target/release/atoll}"
THREADS="${THREADS:-$(nproc)}"
BATCH="${BATCH:-8}"; SEQ="${SEQ:-256}"; STEPS="${STEPS:-10}"; PRESET="${PRESET:-gemma3-bench}"; ROUNDS="${ROUNDS:-3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$ATOLL" model init "$PRESET" --out "$WORK/model" --seed 0 >/dev/null
ours() { "$ATOLL" bench train-step --preset "$PRESET" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --threads "$THREADS" 2>/dev/null >> "$WORK/ours.jsonl"; }
theirs() { "$PYTHON" benchmarks/train_step.py --model "$WORK/model" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --threads "$THREADS" 2>/dev/null | tail -1 >> "$WORK/theirs.jsonl"; }
# Which side goes first alternates too, so neither always runs on the machine the other warmed.
for round in $(seq "$ROUNDS"); do
    if (( round % 2 )); then ours; theirs; else theirs; ours; fi
done

"$PYTHON" - "$WORK/ours.jsonl" "$WORK/theirs.jsonl" "$PRESET" <<'PY'
import json, statistics, sys
def load_runs(path):
    return [json.loads(l) for l in open(path)]
ours_runs, theirs_runs, preset = load_runs(sys.argv[1]), load_runs(sys.argv[2]), sys.argv[3]
ours, theirs = (min(runs, key=lambda r: r["median_ms"]) for runs in (ours_runs, theirs_runs))
ours_all, theirs_all = ([round(r["median_ms"]) for r in runs] for runs in (ours_runs, theirs_runs))
print(f"training step, preset {preset}: batch {ours['batch']} x seq {ours['seq']}, {ours['threads']} threads,"
      f" best of {len(ours_all)} alternating rounds of {ours['steps']} timed steps (median per round)")
print(f"  per-round medians, ms: atoll {ours_all}, transformers {theirs_all}")
print(f"  {'implementation':<50} {'ms/step':>10} {'tokens/s':>10}")
print(f"  {'atoll (tch, libtorch 2.11)':<50} {ours['median_ms']:>10.1f} {ours['tokens_per_s']:>10.0f}")
print(f"  {theirs['impl']:<50} {theirs['median_ms']:>10.1f} {theirs['tokens_per_s']:>10.0f}")
print(f"  ratio (transformers ms / atoll ms): {theirs['median_ms'] / ours['median_ms']:.2f}")
# Both sides of one round share the machine's state at that time, so the per-round ratio is
# less exposed to drift between rounds than the ratio of the two bests.
paired = sorted(t["median_ms"] / o["median_ms"] for o, t in zip(ours_runs, theirs_runs))
print(f"  per-round ratios: {[round(r, 2) for r in paired]}, median {statistics.median(paired):.2f}")
PY
