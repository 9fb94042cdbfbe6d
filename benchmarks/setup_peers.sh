#!/usr/bin/env bash
# Make the virtual environment that holds the peers run.py measures against and that the
# project's own environment does not carry: mergekit (task_arithmetic, ties, extract-lora).
#
#     bash benchmarks/setup_peers.sh [VENV]        # default /work/venvs/bench-mergekit
#     python benchmarks/run.py --mergekit-venv VENV ...
#
# torch is pinned and installed first: mergekit's own requirement would otherwise pull the
# newest torch, which on Linux is the multi-GB CUDA build. The CPU wheel is the one to take
# on a machine without a GPU (pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu where that index is reachable; here pip's
# find-links already serves 2.13.0+cpu). mergekit 0.1.5 is the release whose merge methods
# issue 14 follows; MERGEKIT_VERSION overrides it.
set -euo pipefail

VENV=${1:-/work/venvs/bench-mergekit}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MERGEKIT_VERSION=${MERGEKIT_VERSION:-0.1.5}
PYTHON=${PYTHON:-python3}

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
# the constraint keeps mergekit from replacing the torch just installed
TORCH_INSTALLED=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
echo "torch==$TORCH_INSTALLED" > "$VENV/torch-constraint.txt"
"$VENV/bin/python" -m pip install --quiet -c "$VENV/torch-constraint.txt" \
    "mergekit==$MERGEKIT_VERSION"

# What run.py needs from it: the mergekit-yaml entry point, and the versions for the report.
test -x "$VENV/bin/mergekit-yaml"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for d in ("mergekit", "torch", "transformers", "safetensors"):
    print(f"{d} {md.version(d)}")
EOF
echo "peers ready in $VENV (python benchmarks/run.py --mergekit-venv $VENV ...)"
