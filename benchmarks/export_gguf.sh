#!/usr/bin/env bash
# `atoll export --format gguf --quant f16` of a Gemma 3 12B-shaped checkpoint (random bf16
# weights, 5 GB shards): wall time, MB/s of GGUF written, peak RSS (GNU time). Needs ~50 GB of
# free disk under WORK (deleted at the end) and numpy (PYTHON); LAYERS=16 (~19 GB) keeps the
# first 16 layers, every tensor still of the 12B's shape.
set -euo pipefail
ATOLL=${ATOLL:-target/release/atoll}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d -p "${WORK:-${TMPDIR:-/tmp}}" atoll-export-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" benchmarks/make_random_checkpoint.py "$WORK/ckpt" "${LAYERS:-48}"
# A byte-level tokenizer (256 tokens); the export pads the vocabulary to the model's 262208.
"$PYTHON" benchmarks/byte_level_tokenizer.py "$WORK/tokenizer.json"
sync
/usr/bin/time -v "$ATOLL" export "$WORK/ckpt" --format gguf --quant "${QUANT:-f16}" \
  --tokenizer "$WORK/tokenizer.json" --out "$WORK/model.gguf" 2> "$WORK/time.txt"
largest=$((262208 * 3840 * 2))
bytes=$(stat -c %s "$WORK/model.gguf")
wall=$(grep "Elapsed (wall clock)" "$WORK/time.txt" | awk '{print $NF}')
secs=$(echo "$wall" | awk -F: '{ if (NF == 3) print $1*3600 + $2*60 + $3; else print $1*60 + $2 }')
rss_kb=$(grep "Maximum resident set size" "$WORK/time.txt" | awk '{print $NF}')
echo "gguf ${QUANT:-f16}: $bytes bytes in ${secs}s = $(echo "$bytes $secs" | awk '{printf "%.0f", $1 / $2 / 1e6}') MB/s"
cpu=$(grep -E "(User|System) time" "$WORK/time.txt" | awk '{s += $NF} END {print s}')
echo "CPU time ${cpu}s = $(echo "$bytes $cpu" | awk '{printf "%.0f", $1 / $2 / 1e6}') MB per CPU-second"
echo "peak RSS: $((rss_kb / 1024)) MiB (largest tensor, token_embd in bf16: $((largest / 1048576)) MiB)"
