#!/usr/bin/env bash
# The main job on a fresh machine: sets up .venv (CPU torch 2.13.0), builds memcore, and runs the
# demo (scikit-learn digits with 10% flipped labels; prints the AUROC of each score and the most
# suspicious samples) and writes every sample's scores to runs/demo/scores.csv. Extra arguments go to
# `python -m memcore demo` (see `python -m memcore demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
MEMCORE_PROFILE=demo memcore_env .venv "torch==2.13.0"
.venv/bin/python -m memcore demo "$@"
