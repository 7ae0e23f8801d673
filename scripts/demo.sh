#!/usr/bin/env bash
# The main job on a fresh machine: sets up .venv (CPU torch 2.13.0, and of memcore's optional
# packages only the two the demo imports, scikit-learn and tqdm), builds memcore, and runs the demo
# (scikit-learn's digits with 10% flipped labels; prints the AUROC of each score and the most
# suspicious samples) and writes every sample's scores and whether its label was flipped to
# runs/demo/scores.csv. Extra arguments go to `python -m memcore demo` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
memcore_env .venv "torch==2.13.0" "" scikit-learn tqdm
.venv/bin/python -m memcore demo "$@"
echo "[memcore] memcore is installed in .venv: 'source .venv/bin/activate' to use it (python, pip, python -m memcore);"
echo "[memcore] the experiments need the rest of the eval extra: pip install 'torch-memcore[eval]' (no rebuild)"
