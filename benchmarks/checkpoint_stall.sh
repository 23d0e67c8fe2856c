#!/usr/bin/env bash
# Checkpoint stall and upload throughput: the same run of `gemma3-bench` (8.0M parameters; a
# checkpoint is 32 MB of weights + 64 MB of AdamW state) without checkpoints, with checkpoints to
# a local directory, and to an S3-protocol server (moto on loopback). Prints one table.
# Usage: benchmarks/checkpoint_stall.sh     (MOTO_SERVER=path/to/moto_server; STEPS, EVERY, THREADS)
set -euo pipefail
cd "$(dirname "$0")/.."
ATOLL=${ATOLL:-target/release/atoll}
MOTO_SERVER=${MOTO_SERVER:-$HOME/.cache/atoll/s3-venv/bin/moto_server}
STEPS=${STEPS:-40}
EVERY=${EVERY:-10}
THREADS=${THREADS:-2}
WORK=$(mktemp -d)
MOTO_PID=
cleanup() { [[ -n $MOTO_PID ]] && kill "$MOTO_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

cat > "$WORK/bench.yaml" <<YAML
name: checkpoint-bench
seed: 7
model: {preset: gemma3-bench}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 8192}, seq_len: 256}
train: {max_steps: $STEPS, batch_size: 8, lr: 1.0e-3, eval_batches: 1, threads: $THREADS, device: cpu, log_every: 1000}
run: {save_final: false}
YAML

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO_SERVER" -H 127.0.0.1 -p "$PORT" > "$WORK/moto.log" 2>&1 &
MOTO_PID=$!
for _ in $(seq 100); do curl -s "http://127.0.0.1:$PORT" >/dev/null && break; sleep 0.1; done
curl -s -X PUT "http://127.0.0.1:$PORT/bench" >/dev/null
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1

run() { # NAME ARGS...
  local name=$1; shift
  "$ATOLL" train "$WORK/bench.yaml" --set "run.dir=$WORK/$name" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err" \
    || { echo "$name failed:"; tail -5 "$WORK/$name.err"; exit 1; }
}
echo "running: no checkpoints, local directory, S3 (moto) — $STEPS steps, a checkpoint every $EVERY" >&2
run none
run local --set checkpoint.every=$EVERY
run s3 --set checkpoint.every=$EVERY --set checkpoint.url=s3://bench/ckpt --set checkpoint.part_size_mib=8

python3 - "$WORK" "$STEPS" "$EVERY" <<'PY'
import json, sys
work, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = {n: json.load(open(f"{work}/{n}/summary.json")) for n in ("none", "local", "s3")}
base = s["none"]["step_time_s"]
print(f"checkpoint stall, gemma3-bench (8.0M params, 96 MB per checkpoint), {steps} steps, every {every}")
print(f"{'target':<18}{'ckpts':>6}{'step ms':>9}{'stall/ckpt ms':>15}{'stall/step':>11}{'share @every':>13}{'share @100':>11}{'upload MB/s':>12}")
print(f"{'none (baseline)':<18}{0:>6}{base*1e3:>9.0f}{'-':>15}{'-':>11}{'-':>13}{'-':>11}{'-':>12}")
for n in ("local", "s3"):
    r = s[n]
    per = r["checkpoint_stall_per_checkpoint_s"]
    step = r["step_time_s"]
    print(f"{n:<18}{r['checkpoints']:>6}{step*1e3:>9.0f}{per*1e3:>15.1f}{per/base:>10.1%}{per/(every*base):>13.2%}{per/(100*base):>11.3%}{r['checkpoint_upload_mb_per_s']:>12.0f}")
print("stall = snapshot to host memory + wait for the previous upload, on the training thread;")
print("step ms excludes the stall (the background upload shares the 2 cores with training).")
PY
