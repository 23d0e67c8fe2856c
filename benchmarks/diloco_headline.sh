#!/usr/bin/env bash
# The headline experiment: the same tiny Gemma, the same token budget and seed, trained by
# data-parallel, classic DiLoCo and Decoupled DiLoCo (M = 4, 4-bit wire), plus ablations, all in
# `atoll simulate` over simulated 2 Gbps / 20 ms links. Prints one table.
# Usage: benchmarks/diloco_headline.sh            (about 20 minutes on 2 cores; WORK=DIR reuses
#                                                  the finished runs in DIR)
#        STEPS=100 benchmarks/diloco_headline.sh  (a quicker, noisier look)
set -euo pipefail
cd "$(dirname "$0")/.."
ATOLL="${ATOLL:-target/release/atoll}"
RECIPE="${RECIPE:-recipes/decoupled-tiny.yaml}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
EXTRA=()
[[ -n "${STEPS:-}" ]] && EXTRA+=(--set "train.max_steps=$STEPS")

run() {  # directory slug, display name, then --set arguments; a finished run in WORK is reused
    local slug="$1" name="$2"; shift 2
    if [[ ! -f "$WORK/$slug/summary.json" ]]; then
        rm -rf "${WORK:?}/$slug"
        "$ATOLL" simulate "$RECIPE" "${EXTRA[@]}" --set "run.dir=$WORK/$slug" "$@" >/dev/null 2>"$WORK/$slug.log" \
            || { echo "run $name failed, see $WORK/$slug.log" >&2; exit 1; }
    fi
    printf '%s\t%s\n' "$slug" "$name" >> "$WORK/order"
}

rm -f "$WORK/order"
run dp          "data-parallel"              --set sync.mode=ddp
run diloco      "classic DiLoCo (f32)"       --set sync.mode=diloco --set sync.codec=f32
run decoupled   "Decoupled M=4, e3m0"        --set sync.mode=decoupled
run mean-merge  "  ablation: mean merge"     --set sync.merge=mean
run bf16        "  ablation: bf16 wire"      --set sync.codec=bf16
run int2        "  ablation: int2 wire"      --set sync.codec=int2
run half-speed  "  ablation: 1 learner 0.5x" --set "sync.speeds=[1.0, 1.0, 1.0, 0.5]"

python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
order = [l.rstrip("\n").split("\t") for l in open(f"{work}/order")]
names = [name for _, name in order]
rows = {name: json.load(open(f"{work}/{slug}/summary.json")) for slug, name in order}
dp = rows[names[0]]
print(f"{'run':<28} {'eval loss':>9} {'gap to DP':>9} {'MB/learner':>11} {'bytes vs DP':>11} {'wall @2Gbps':>11} {'goodput':>8}")
for n in names:
    r = rows[n]
    gap = (r["final_eval_loss"] - dp["final_eval_loss"]) / dp["final_eval_loss"] * 100
    ratio = dp["bytes_per_learner"] / r["bytes_per_learner"]
    print(f"{n:<28} {r['final_eval_loss']:>9.4f} {gap:>+8.2f}% {r['bytes_per_learner']/1e6:>11.1f} {ratio:>10.0f}x {r['sim_wall_clock_s']:>10.0f}s {r['goodput']:>8.2f}")
print(f"(tokens per run: {dp['tokens']}; initial eval loss {dp['initial_eval_loss']:.4f}; run directories in {work})")
PY
