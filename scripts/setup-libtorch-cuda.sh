#!/usr/bin/env bash
# The CUDA half of scripts/setup-libtorch.sh, which runs it (with ATOLL_CUDA=1 or when a GPU is
# present): a libtorch directory made of the torch wheel's whole torch/lib (libtorch_cuda.so,
# libc10_cuda.so, the real libtorch.so, ...) and the shared libraries of the nvidia cu13 wheels
# that the torch wheel pins (its METADATA, and cuda-toolkit's for the toolkit extras it names),
# flat in one lib/ directory: every one of them finds its neighbours through an $ORIGIN rpath,
# so binaries linked against it need no LD_LIBRARY_PATH. Only libcuda.so.1 comes from the
# machine (the NVIDIA driver).
# Usage: scripts/setup-libtorch-cuda.sh TORCH_VERSION DEST WHEELS_DIR
set -euo pipefail

TORCH_VERSION="$1"
DEST="$2"
WHEELS="$3"
log() { echo "setup-libtorch: $*" >&2; }
PY="${PYTHON:-python3}"

log "downloading torch==$TORCH_VERSION and the nvidia cu13 wheels it pins into $WHEELS (once; about 3 GB)"
mkdir -p "$(dirname "$DEST")"
TMP="$(mktemp -d "$(dirname "$DEST")/.libtorch-cuda-tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

"$PY" - "$TORCH_VERSION" "$WHEELS" "$TMP" <<'PYEOF'
import glob, os, re, subprocess, sys, zipfile

version, wheels, out = sys.argv[1:4]


def log(msg):
    print(f"setup-libtorch: {msg}", file=sys.stderr, flush=True)


def pip_download(specs):
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--only-binary=:all:", "-d", wheels, *specs],
        check=True, stdout=sys.stderr,
    )


def wheel_for(spec):
    """The downloaded wheel of a `name==version` or `name==version.*` pin."""
    name, pin = spec.split("==")
    name = re.sub(r"\[.*\]", "", name)
    stem = re.sub(r"[-_.]+", "_", name).lower()
    pin = pin.removesuffix(".*")
    found = sorted(w for w in glob.glob(f"{wheels}/{stem}-{pin}*.whl")
                   if re.fullmatch(rf"{re.escape(stem)}-{re.escape(pin)}(\.[0-9]+)*-.*\.whl",
                                   os.path.basename(w)))
    if not found:
        sys.exit(f"setup-libtorch: no wheel for {spec} in {wheels}")
    return found[-1]


def requirements(whl):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                spec, _, marker = line.split(":", 1)[1].partition(";")
                yield spec.replace(" ", ""), marker.strip()


pip_download([f"torch=={version}"])
torch_whl = wheel_for(f"torch=={version}")

# The nvidia wheels torch pins directly, and the toolkit extras of its cuda-toolkit pin.
nvidia, toolkit = [], None
for spec, marker in requirements(torch_whl):
    if "extra ==" in marker or (marker and "Linux" not in marker):
        continue
    if spec.startswith("nvidia-") and "==" in spec:
        nvidia.append(spec)
    elif spec.startswith("cuda-toolkit["):
        toolkit = spec
if toolkit is None:
    sys.exit(f"setup-libtorch: {os.path.basename(torch_whl)} pins no cuda-toolkit; not a CUDA wheel?")
extras = set(re.search(r"\[(.*)\]", toolkit).group(1).split(","))
toolkit_spec = re.sub(r"\[.*\]", "", toolkit)
pip_download([toolkit_spec])
for spec, marker in requirements(wheel_for(toolkit_spec)):
    extra = re.search(r"extra == '([^']+)'", marker)
    if extra and extra.group(1) in extras and "linux" in marker:
        nvidia.append(spec)
log("nvidia wheels: " + " ".join(nvidia))
pip_download(nvidia)

os.makedirs(f"{out}/lib", exist_ok=True)
shared = re.compile(r"[^/]+\.so(\.[0-9]+)*$")
with zipfile.ZipFile(torch_whl) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("torch/include/") and not name.endswith("/"):
            z.extract(name, out)
        elif name.startswith("torch/lib/") and shared.fullmatch(base) and base != "libtorch_python.so":
            # libtorch_python.so needs libpython; everything else tch may load is kept.
            with open(f"{out}/lib/{base}", "wb") as f:
                f.write(z.read(name))
        elif name == "torch/version.py":
            with open(f"{out}/version.py", "wb") as f:
                f.write(z.read(name))
os.rename(f"{out}/torch/include", f"{out}/include")
os.rmdir(f"{out}/torch")
for spec in nvidia:
    whl = wheel_for(spec)
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if re.match(r"nvidia/[^/]+/lib/", name) and shared.fullmatch(base):
                target = f"{out}/lib/{base}"
                if os.path.exists(target):
                    sys.exit(f"setup-libtorch: {base} is in two wheels ({whl})")
                with open(target, "wb") as f:
                    f.write(z.read(name))
PYEOF

# Every library libtorch_cuda.so (and so the atoll binary) loads must resolve inside lib/.
missing="$(ldd "$TMP/lib/libtorch.so" "$TMP/lib/libtorch_cuda.so" | grep 'not found' | sort -u || true)"
if [[ -n "$missing" ]]; then
    log "libtorch_cuda.so does not resolve:"
    echo "$missing" >&2
    exit 1
fi
# cudarc (the NCCL collective) opens NCCL by the development name libnccl.so.
ln -s libnccl.so.2 "$TMP/lib/libnccl.so"
echo "$TORCH_VERSION" > "$TMP/build-version"
echo "cu130" > "$TMP/build-variant"
rm -rf "$DEST"
chmod 755 "$TMP"
mv "$TMP" "$DEST"
trap - EXIT
touch "$DEST/.atoll-complete"
log "CUDA libtorch $TORCH_VERSION ready in $DEST ($(du -sh "$DEST" | cut -f1))"
echo "$DEST"
