#!/usr/bin/env bash
# The headline experiment: the same tiny Gemma, the same token budget and seed, trained by
# data-parallel, classic DiLoCo and Decoupled DiLoCo (M = 4, 4-bit wire), plus ablations, all in
# `atoll simulate` over simulated 2 Gbps / 20 ms links. Prints one table.
# Usage: benchmarks/diloco_headline.sh            (about 20 minutes on 2 cores)
#        STEPS=100 benchmarks/diloco_headline.sh  (a quicker, noisier look)
set -euo pipefail
cd "$(dirname "$0")/.."
ATOLL="${ATOLL:-target/release/atoll}"
RECIPE="${RECIPE:-recipes/decoupled-tiny.yaml}"
WORK="${WORK:-$(mktemp -d)}"
EXTRA=()
[[ -n "${STEPS:-}" ]] && EXTRA+=(--set "train.max_steps=$STEPS")

run() {  # name, then --set arguments
    local name="$1"; shift
    "$ATOLL" simulate "$RECIPE" "${EXTRA[@]}" --set "run.dir=$WORK/$name" "$@" >/dev/null 2>"$WORK/$name.log" \
        || { echo "run $name failed, see $WORK/$name.log" >&2; exit 1; }
    echo "$name" >> "$WORK/order"
}

rm -f "$WORK/order"
run "data-parallel"               --set sync.mode=ddp
run "classic DiLoCo (f32)"        --set sync.mode=diloco --set sync.codec=f32
run "Decoupled M=4, e3m0"         --set sync.mode=decoupled
run "  ablation: mean merge"      --set sync.merge=mean
run "  ablation: bf16 wire"       --set sync.codec=bf16
run "  ablation: int2 wire"       --set sync.codec=int2
run "  ablation: 1 learner 0.5x"  --set "sync.speeds=[1.0, 1.0, 1.0, 0.5]"

python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
names = [l.rstrip("\n") for l in open(f"{work}/order")]
rows = {n: json.load(open(f"{work}/{n}/summary.json")) for n in names}
dp = rows[names[0]]
print(f"{'run':<28} {'eval loss':>9} {'gap to DP':>9} {'MB/learner':>11} {'bytes vs DP':>11} {'wall @2Gbps':>11} {'goodput':>8}")
for n in names:
    r = rows[n]
    gap = (r["final_eval_loss"] - dp["final_eval_loss"]) / dp["final_eval_loss"] * 100
    ratio = dp["bytes_per_learner"] / r["bytes_per_learner"]
    print(f"{n:<28} {r['final_eval_loss']:>9.4f} {gap:>+8.2f}% {r['bytes_per_learner']/1e6:>11.1f} {ratio:>10.0f}x {r['sim_wall_clock_s']:>10.0f}s {r['goodput']:>8.2f}")
print(f"(tokens per run: {dp['tokens']}; initial eval loss {dp['initial_eval_loss']:.4f}; run directories in {work})")
PY
