#!/usr/bin/env bash
# Runs a command with LIBTORCH pointing at libtorch 2.11: the user's own (LIBTORCH already set, or
# LIBTORCH_USE_PYTORCH=1), or the cached copy that scripts/setup-libtorch.sh builds from PyPI.
set -euo pipefail
if [[ -z "${LIBTORCH:-}" && -z "${LIBTORCH_USE_PYTORCH:-}" ]]; then
    LIBTORCH="$("$(dirname "$0")/setup-libtorch.sh")"
    export LIBTORCH
fi
exec "$@"
