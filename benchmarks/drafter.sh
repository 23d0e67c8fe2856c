#!/usr/bin/env bash
# MTP drafter acceptance: trains the tiny Gemma 4 base (recipes/drafter-base.yaml), then a drafter
# against it with the base frozen (recipes/drafter-tiny.yaml), then measures the acceptance rate
# of greedy speculative verification on held-out Shakespeare before and after drafter training.
# Usage: benchmarks/drafter.sh          (WORK=DIR keeps the runs in DIR; an existing base is reused)
#        K=3 PROMPTS=32 benchmarks/drafter.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ATOLL="${ATOLL:-target/release/atoll}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
EVAL=(--prompts "${PROMPTS:-16}" --prompt-len "${PROMPT_LEN:-32}" --new-tokens "${NEW_TOKENS:-64}")
[[ -n "${K:-}" ]] && EVAL+=(--k "$K")

if [[ ! -f "$WORK/base/final/model.safetensors" ]]; then
    "$ATOLL" train recipes/drafter-base.yaml --set "run.dir=$WORK/base" > "$WORK/base.json"
fi
if [[ ! -f "$WORK/drafter/final/drafter/model.safetensors" ]]; then
    "$ATOLL" train recipes/drafter-tiny.yaml --set "run.dir=$WORK/drafter" \
        --set "model.init_from=$WORK/base/final" > "$WORK/drafter.json"
fi
"$ATOLL" eval drafter "$WORK/drafter" "${EVAL[@]}" > "$WORK/eval.json"
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
base, drafter, ev = (json.load(open(f"{work}/{n}.json")) for n in ("base", "drafter", "eval"))
print(f"base: gemma4-tiny, {base['parameters']} parameters, {base['steps']} steps, eval loss {base['final_eval_loss']:.3f}")
print(f"drafter: {drafter['parameters']} parameters, {drafter['steps']} steps, distillation eval loss {drafter['initial_eval_loss']:.3f} -> {drafter['final_eval_loss']:.3f}")
print(f"greedy verification, k = {ev['k']}, {ev['prompts']} held-out prompts of {ev['prompt_len']} tokens, {ev['new_tokens']} new tokens each")
print("                     acceptance rate   accepted per round   drafted")
for phase in ("before", "after"):
    s = ev[phase]
    print(f"  {phase + ' training':<18} {s['acceptance_rate']:>15.3f} {s['mean_accepted_per_round']:>20.2f} {s['drafted']:>9}")
PY
echo "runs in $WORK"
