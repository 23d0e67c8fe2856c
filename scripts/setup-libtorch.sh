#!/usr/bin/env bash
# Builds a libtorch 2.11.0 directory (what tch 0.24 links against) from PyPI wheels, because the
# PyTorch download site is not reachable from our build machines.
# Usage: scripts/setup-libtorch.sh [DEST]    (prints the directory on stdout when done)
# CPU build (default): DEST ${ATOLL_CACHE:-$HOME/.cache/atoll}/libtorch-2.11.0.
# CUDA build, when ATOLL_CUDA=1 or `nvidia-smi -L` lists a GPU (ATOLL_CUDA=0 forces the CPU one):
# DEST .../libtorch-2.11.0-cu130, the torch wheel's whole torch/lib plus the nvidia cu13 wheels it
# pins, all in one lib/ directory (their rpaths say $ORIGIN), about 5 GB.
# Idempotent: a complete DEST is reused.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDART_VERSION=13.0.96   # libtorch_cpu.so links libcudart.so.13 and libcupti.so.13 even on CPU
CUPTI_VERSION=13.0.85
CACHE="${ATOLL_CACHE:-$HOME/.cache/atoll}"

case "${ATOLL_CUDA:-}" in
    1) CUDA=1 ;;
    0) CUDA=0 ;;
    "") if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then CUDA=1; else CUDA=0; fi ;;
    *) echo "setup-libtorch: ATOLL_CUDA must be 1 or 0, not '$ATOLL_CUDA'" >&2; exit 1 ;;
esac

if [[ "$CUDA" == 1 ]]; then
    DEST="${1:-$CACHE/libtorch-$TORCH_VERSION-cu130}"
else
    DEST="${1:-$CACHE/libtorch-$TORCH_VERSION}"
fi
STAMP="$DEST/.atoll-complete"

if [[ -f "$STAMP" ]]; then
    echo "$DEST"
    exit 0
fi

log() { echo "setup-libtorch: $*" >&2; }
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { log "python3 is required to download wheels from PyPI"; exit 1; }

WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS"

if [[ "$CUDA" == 1 ]]; then
    exec "$(dirname "$0")/setup-libtorch-cuda.sh" "$TORCH_VERSION" "$DEST" "$WHEELS"
fi
log "downloading torch==$TORCH_VERSION and the CUDA runtime wheels into $WHEELS (once)"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDART_VERSION" "nvidia-cuda-cupti==$CUPTI_VERSION" \
    -d "$WHEELS" >&2

TMP="$(mktemp -d "$CACHE/.libtorch-tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
log "extracting torch/lib and torch/include"
"$PY" - "$WHEELS" "$TMP" "$TORCH_VERSION" <<'PYEOF'
import glob, os, sys, zipfile
wheels, out, version = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(f"{out}/lib", exist_ok=True)
torch_whl = sorted(glob.glob(f"{wheels}/torch-{version}-*.whl"))[-1]
keep_libs = {"libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libshm.so", "libtorch_global_deps.so"}
with zipfile.ZipFile(torch_whl) as z:
    for name in z.namelist():
        if name.startswith("torch/include/") and not name.endswith("/"):
            z.extract(name, out)
        elif name.startswith("torch/lib/") and os.path.basename(name) in keep_libs:
            with open(f"{out}/lib/{os.path.basename(name)}", "wb") as f:
                f.write(z.read(name))
    # Keep version metadata so tch's version check and users can see what this is.
    for name in z.namelist():
        if name == "torch/version.py":
            with open(f"{out}/version.py", "wb") as f:
                f.write(z.read(name))
os.rename(f"{out}/torch/include", f"{out}/include")
os.rmdir(f"{out}/torch")
for pattern, lib in (("nvidia_cuda_runtime-*.whl", "libcudart.so.13"), ("nvidia_cuda_cupti-*.whl", "libcupti.so.13")):
    whl = sorted(glob.glob(f"{wheels}/{pattern}"))[-1]
    with zipfile.ZipFile(whl) as z:
        members = [n for n in z.namelist() if os.path.basename(n) == lib]
        if not members:
            sys.exit(f"{lib} not found in {whl}")
        with open(f"{out}/lib/{lib}", "wb") as f:
            f.write(z.read(members[0]))
PYEOF

# The CUDA wheel's libtorch.so only forwards to libtorch_cuda.so; a CPU build links an empty one instead.
log "creating an empty libtorch.so"
echo "" > "$TMP/empty.c"
cc -shared -fPIC -o "$TMP/lib/libtorch.so" "$TMP/empty.c"
rm "$TMP/empty.c"
echo "$TORCH_VERSION" > "$TMP/build-version"

rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
chmod 755 "$TMP"
mv "$TMP" "$DEST"
trap - EXIT
touch "$STAMP"
log "libtorch $TORCH_VERSION ready in $DEST"
echo "$DEST"
