#!/usr/bin/env bash
# Build (or refresh) the separate virtual environment in which NRCan's geo-inference 3.2.4 runs,
# side by side with geoseg (which it must never share a venv with: it needs torch 2.14.1 and a
# large geospatial stack of its own). Idempotent: an existing venv is reused and pip only installs
# what is missing or differs from benchmarks/geoinference-constraints.txt (the exact `pip freeze`
# of a working env).
#
#   bash benchmarks/make_geoinference_env.sh [VENV_DIR]     # default: benchmarks/out/envs/geoinference
#
# torch 2.14.1 / torchvision 0.29.1 are CUDA builds (~5.5 GB, env ~6.2 GB in all); they run on CPU.
# Then run geo-inference through benchmarks/geoinference_runner.py with "$VENV_DIR/bin/python".
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="${1:-benchmarks/out/envs/geoinference}"
constraints="benchmarks/geoinference-constraints.txt"
python="${PYTHON:-python3.11}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { echo "error: $venv is not a Python 3.11 venv; remove it and rerun" >&2; exit 1; }

"$venv/bin/python" -m pip install -c "$constraints" \
    torch==2.14.1 torchvision==0.29.1 geo-inference==3.2.4
"$venv/bin/python" -c 'import geo_inference, torch, torchvision; print("geo-inference env OK: torch", torch.__version__, "torchvision", torchvision.__version__)'
