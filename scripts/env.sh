# Sourced by the scripts in this folder: creates a virtual environment with torch and memcore's
# dependencies and builds memcore into it. Idempotent: a second run only rebuilds when csrc/,
# setup.py or the torch version changed.
#   memcore_env VENV TORCH_SPEC [extra pip packages...]
# MEMCORE_PROFILE=demo installs only what the demo needs (default: all)

# What a profile installs besides torch. "demo": the core (numpy) + the eval extra (scikit-learn tqdm
# matplotlib pandas) + the build tools: all the demo needs, and the fastest first run. "all" adds
# the test extra (pytest pytest-benchmark hypothesis ruff), export (pyarrow), cleanlab for the
# confident-learning baseline and the integrations' frameworks. setuptools >= 77 reads pyproject's
# SPDX license string.
MEMCORE_DEMO_DEPS=(numpy scikit-learn tqdm matplotlib pandas ninja "setuptools>=77" wheel)
MEMCORE_DEPS=("${MEMCORE_DEMO_DEPS[@]}" pytest pytest-benchmark hypothesis ruff pyarrow cleanlab lightning
  transformers "accelerate>=1.1.0")

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
  local t0=$SECONDS deps=("${MEMCORE_DEPS[@]}")
  [ "${MEMCORE_PROFILE:-all}" = demo ] && deps=("${MEMCORE_DEMO_DEPS[@]}")
  echo "[memcore] installing $torch_spec and ${#deps[@]} packages into $venv (first run: a few minutes)"
  memcore_pip "$venv/bin/pip" install -q --disable-pip-version-check "$torch_spec" numpy || {
    echo "[memcore] torch failed to install ($torch_spec)"; return 1; }
  memcore_pip "$venv/bin/pip" install -q --disable-pip-version-check "${deps[@]}" "$torch_spec" "$@" || {
    echo "[memcore] dependencies failed to install"; return 1; }
  echo "[memcore] packages ready ($((SECONDS - t0)) s)"
  local stamp
  stamp="$(cat setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-16)-$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  if [ "$(cat "$venv/.memcore-build" 2>/dev/null)" != "$stamp" ] || ! (cd /tmp && "$venv/bin/python" -c "import memcore") 2>/dev/null; then
    echo "[memcore] building memcore (pip install --no-build-isolation -e .)"
    # -v so setup.py's own progress lines ([memcore] ..., ninja's [k/n] steps) reach the terminal;
    # the rest of pip's verbose output goes to build.log, shown whole if the build fails
    local log="$venv/build.log"
    "$venv/bin/pip" install -v --disable-pip-version-check --no-build-isolation --no-deps -e . >"$log" 2>&1 &
    local pid=$!
    tail -n +1 -f "$log" --pid=$pid 2>/dev/null | grep --line-buffered -E '^ *\[memcore\]|^ *\[[0-9]+/[0-9]+\] ' \
      | sed -u -E 's/^ +//; s/^(\[[0-9]+\/[0-9]+\]) .* -c ([^ ]+) .*/\1 compiling \2/'
    wait $pid || { cat "$log"; echo "[memcore] build failed (log: $log)"; return 1; }
    (cd /tmp && "$venv/bin/python" -c "import memcore") || { echo "[memcore] memcore does not import"; return 1; }
    echo "$stamp" > "$venv/.memcore-build"
  fi
}
