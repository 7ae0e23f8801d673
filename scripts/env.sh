# Sourced by the scripts in this folder: creates a virtual environment with torch and memcore's
# dependencies and builds memcore into it. Idempotent: a second run only rebuilds when csrc/,
# setup.py or the torch version changed.
#   memcore_env VENV TORCH_SPEC [extra pip packages...]

# everything the tests, demo and benchmarks use besides torch: the core needs numpy only; the extras
# eval (scikit-learn tqdm matplotlib pandas), export (pandas pyarrow), test (pytest pytest-benchmark
# hypothesis ruff), hf, lightning; cleanlab for the confident-learning baseline; setuptools >= 77 reads
# pyproject's SPDX license string
MEMCORE_DEPS=(numpy scikit-learn tqdm matplotlib ninja pytest pytest-benchmark hypothesis ruff "setuptools>=77"
  wheel pandas pyarrow cleanlab lightning transformers "accelerate>=1.1.0")

# runs a pip command without the local index's "Location ... is ignored" chatter, keeping its status
memcore_pip() {
  "$@" 2>&1 | { grep -v "is ignored" || true; }
  return "${PIPESTATUS[0]}"
}

memcore_env() {
  local venv="$1" torch_spec="$2"
  shift 2
  case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac  # imports below run from /tmp
  local py="${PYTHON:-python3}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[memcore] creating $venv"
    "$py" -m venv "$venv"
  fi
  # torch first, pinned (and pinned again below) so no other package pulls a different, multi-GB build
  memcore_pip "$venv/bin/pip" install -q --disable-pip-version-check "$torch_spec" numpy || {
    echo "[memcore] torch failed to install ($torch_spec)"; return 1; }
  memcore_pip "$venv/bin/pip" install -q --disable-pip-version-check "${MEMCORE_DEPS[@]}" "$torch_spec" "$@" || {
    echo "[memcore] dependencies failed to install"; return 1; }
  local stamp
  stamp="$(cat setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-16)-$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  if [ "$(cat "$venv/.memcore-build" 2>/dev/null)" != "$stamp" ] || ! (cd /tmp && "$venv/bin/python" -c "import memcore") 2>/dev/null; then
    echo "[memcore] building memcore (pip install --no-build-isolation -e .)"
    memcore_pip "$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps -e . || {
      echo "[memcore] build failed"; return 1; }
    (cd /tmp && "$venv/bin/python" -c "import memcore") || { echo "[memcore] memcore does not import"; return 1; }
    echo "$stamp" > "$venv/.memcore-build"
  fi
}
