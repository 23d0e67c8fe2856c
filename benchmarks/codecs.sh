#!/usr/bin/env bash
# Wire codecs on synthetic and on real outer gradients: error, bits per value, encode and decode
# throughput on one core, and what zstd saves and costs on whole frames.
# The real values are one learner's outer gradient over H = 16 inner steps: the difference of two
# checkpoints of `gemma3-bench` (8.0M parameters) trained on Shakespeare, taken 16 steps apart.
# Usage: benchmarks/codecs.sh       (`make bench-codecs`; ZSTD=level, default 1; REPEATS)
set -euo pipefail
cd "$(dirname "$0")/.."
ATOLL=${ATOLL:-target/release/atoll}
ZSTD=${ZSTD:-1}
REPEATS=${REPEATS:-5}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cat > "$WORK/bench.yaml" <<YAML
name: codec-bench
seed: 7
model: {preset: gemma3-bench}
data: {corpus: builtin:tinyshakespeare, tokenizer: {vocab_size: 8192}, seq_len: 128}
train: {max_steps: 64, warmup_steps: 16, batch_size: 8, lr: 1.0e-3, eval_batches: 1, eval_every: 1000, device: cpu, log_every: 1000}
run: {save_final: false}
checkpoint: {every: 16, keep_last: 2}
YAML

echo "synthetic outer gradient (16 Mi values: mostly within ±0.005, one in 64 within ±0.5):"
"$ATOLL" bench codecs --zstd-level "$ZSTD" --repeats "$REPEATS"
echo
echo "training gemma3-bench for 64 steps to take a real outer gradient (steps 48 -> 64)..." >&2
"$ATOLL" train "$WORK/bench.yaml" --set "run.dir=$WORK/run" >"$WORK/train.log" 2>&1 ||
    { cat "$WORK/train.log" >&2; exit 1; }
echo "real outer gradient (gemma3-bench, step 48 - step 64 of AdamW on Shakespeare):"
"$ATOLL" bench codecs --zstd-level "$ZSTD" --repeats "$REPEATS" \
    --outer-gradient "$WORK/run/checkpoints/step-48,$WORK/run/checkpoints/step-64"
