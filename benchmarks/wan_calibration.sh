#!/usr/bin/env bash
# The planner against a real job: `atoll run` of a two-region Decoupled DiLoCo job through
# emulated 200 Mbit/s / 40 ms / 0.1% links (recipes/wan-two-regions.yaml), then `atoll plan` of
# the same recipe given the step time the learners measured. Prints both side by side.
# Usage: benchmarks/wan_calibration.sh     (about a minute on 2 cores; WORK=DIR keeps the runs)
set -euo pipefail
cd "$(dirname "$0")/.."
ATOLL="${ATOLL:-target/release/atoll}"
RECIPE="${RECIPE:-recipes/wan-two-regions.yaml}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"

"$ATOLL" run "$RECIPE" --set "run.dir=$WORK/job" >"$WORK/run.log" 2>&1 \
    || { echo "atoll run failed, see $WORK/run.log" >&2; exit 1; }

# Seconds per inner step, as the learners measured them (tokens per step / tokens per second),
# leaving out the first steps (start-up).
STEP_TIME=$(python3 - "$WORK/job" <<'PY'
import json, pathlib, sys
job = pathlib.Path(sys.argv[1])
summary = json.load(open(job / "summary.json"))
tokens_per_step = summary["tokens"] / sum(summary["learner_steps"].values())
times = []
for metrics in sorted(job.glob("learner-*/metrics.jsonl")):
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    times += [tokens_per_step / r["tokens_per_s"] for r in rows[3:] if r["tokens_per_s"] > 0]
print(f"{sum(times) / len(times):.6f}")
PY
)
"$ATOLL" plan "$RECIPE" --step-time "$STEP_TIME" --mtbi none --out "$WORK/plan" >"$WORK/plan.log" 2>&1 \
    || { echo "atoll plan failed, see $WORK/plan.log" >&2; exit 1; }

python3 - "$WORK" "$STEP_TIME" <<'PY'
import datetime, json, pathlib, re, sys
work, step_time = pathlib.Path(sys.argv[1]), float(sys.argv[2])
job = work / "job"
summary = json.load(open(job / "summary.json"))
plan = {m["mode"]: m for m in json.load(open(work / "plan" / "plan.json"))["modes"]}["decoupled"]

def stamp(line):
    return datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()

# Training span: the first learner caught up with the global model .. the last one's last step.
starts, ends, round_trips = [], [], []
for region in summary["learner_steps"]:
    lines = (job / f"learner-{region}.log").read_text().splitlines()
    starts += [stamp(l) for l in lines if "caught up with the global model" in l][:1]
    ends += [stamp(l) for l in lines if re.search(r"step (\d+)/\1 ", l)][-1:]
    s = json.load(open(job / f"learner-{region}" / "summary.json"))
    round_trips.append(s["fragment_round_trip_s_mean"])
span = max(ends) - min(starts)
regions = list(summary["wan"])
link = lambda d: sum(summary["wan"][r][d]["forwarded_bytes"] for r in regions) / len(regions)
app_per_link = summary["bytes_per_learner"]
rt = sum(round_trips) / len(round_trips)
merges = [json.loads(l) for l in open(job / "coordinator" / "merges.jsonl") if l.strip()]
share = sum(len(m["contributors"]) for m in merges) / (len(merges) * len(regions))
rows = [
    ("seconds per inner step", f"{step_time:.3f}", f"{plan['step_time_s']:.3f} (given)"),
    ("training wall clock", f"{span:.1f} s", f"{plan['wall_clock_s']:.1f} s"),
    ("MB up per link", f"{link('up') / 1e6:.1f} (UDP)", f"{plan['bytes_up_per_link'] / 1e6:.1f}"),
    ("MB down per link", f"{link('down') / 1e6:.1f} (UDP)", f"{plan['bytes_down_per_link'] / 1e6:.1f}"),
    ("MB per link, data-plane payload", f"{app_per_link / 1e6:.1f}", f"{plan['bytes_per_link'] / 1e6:.1f}"),
    ("mean Mbit/s per link", f"{(link('up') + link('down')) * 8 / span / 1e6:.1f}", f"{plan['avg_gbps_per_link'] * 1e3:.1f}"),
    ("learners merged per fragment round", f"{share * len(regions):.2f} of {len(regions)} ({len(merges)} rounds)", f"all {len(regions)}"),
    ("fragment round trip (pull to merged)", f"{rt:.2f} s = {rt / step_time:.1f} steps", f"{plan['sync_lag_steps']} steps"),
]
print(f"{'':<38} {'atoll run (measured)':>24} {'atoll plan':>18}")
for name, measured, planned in rows:
    print(f"{name:<38} {measured:>24} {planned:>18}")
for w in plan["warnings"]:
    print(f"planner warning: {w}")
print(f"(run and plan in {work})")
PY
