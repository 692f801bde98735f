#!/usr/bin/env bash
# Create .venv and install softcache into it (with the extras given as arguments, e.g. `dev`).
#
# Without an NVIDIA GPU, install the CPU build of torch first: an unpinned `torch` on Linux pulls a
# multi-GB CUDA build that such a machine cannot use. With a GPU, pip's default torch (CUDA) is right.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" "torch>=2.3"
    else
        "${PIP[@]}" "torch==${SOFTCACHE_CPU_TORCH:-2.13.0}"
    fi
fi
extras="pipelines${1:+,$1}"
"${PIP[@]}" -e ".[${extras}]"
# zarrs (the fast extra) reads stores faster; where it cannot install, softcache reads without it.
"${PIP[@]}" "zarrs>=0.2" || echo "setup: zarrs did not install; stores are read with zarr-python" >&2
# numba (the fast extra) compiles the CPU top-k loss; where it cannot install, torch ops compute it.
"${PIP[@]}" "numba>=0.59" || echo "setup: numba did not install; the top-k loss runs as torch ops" >&2
