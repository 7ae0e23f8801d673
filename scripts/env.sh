# Sourced by the scripts in this folder: a virtual environment with torch, memcore's dependencies and
# memcore built into it (an editable install). A rerun takes seconds: pip runs only when the list of
# packages changed, the build only when csrc/, setup.py, pyproject.toml or torch changed.
#   memcore_env VENV TORCH_SPEC EXTRAS [pip requirements...]
# EXTRAS: extras of pyproject.toml, comma-separated ("all": every one; "": none), whose packages are
# installed with the core's, torch pinned in the same pip call so that nothing pulls another torch.

# Prints "[memcore] ..." lines from a pip (or build) command's output: what it downloads and
# installs, setup.py's own lines, errors; and a line after each 25 s without one (setup.py has its
# own every 20 s while it compiles). Everything goes to LOG too.
memcore_show() {
  local label="$1" log="$2" t0=$SECONDS line rc
  while true; do
    IFS= read -r -t 25 line
    rc=$?
    if [ $rc -gt 128 ]; then
      echo "[memcore]   $label: still working ($((SECONDS - t0)) s)"
      continue
    fi
    [ $rc -ne 0 ] && [ -z "$line" ] && break
    printf '%s\n' "$line" >>"$log"
    line="${line#"${line%%[![:space:]]*}"}" # leading blanks: pip indents the build's output
    case "$line" in
      "[memcore]"*) echo "$line" ;;
      Downloading\ *|"Installing collected packages:"*|"Successfully installed"*|ERROR*)
        echo "[memcore]   $line" ;;
    esac
  done
}

# Runs a pip command, showing its progress as memcore_show does; its status is pip's.
memcore_pip() {
  local label="$1" log="$2"
  shift 2
  "$@" 2>&1 | memcore_show "$label" "$log"
  return "${PIPESTATUS[0]}"
}

# Creates VENV and installs TORCH_SPEC, the core's and EXTRAS' packages and the extra requirements.
memcore_install() {
  local venv="$1" torch_spec="$2" extras="$3"
  shift 3
  local py="${PYTHON:-python3}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[memcore] creating $venv"
    "$py" -m venv "$venv" || return 1
  fi
  local reqs
  reqs=$("$venv/bin/python" scripts/requirements.py --build ${extras//,/ }) || return 1
  # shellcheck disable=SC2206  # one requirement a line, none with blanks
  local pkgs=($reqs "$@" "$torch_spec")
  local stamp
  stamp="$("$venv/bin/python" --version 2>&1) ${pkgs[*]}"
  if [ "$(cat "$venv/.memcore-packages" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  local t0=$SECONDS
  echo "[memcore] installing into $venv: $torch_spec and ${#pkgs[@]} requirements (${extras:-no} extras): ${pkgs[*]}"
  # --no-compile: no .pyc for the thousands of modules never imported (saves CPU time; the
  # first import writes those it needs)
  memcore_pip "pip" "$venv/pip.log" "$venv/bin/pip" install --no-compile --disable-pip-version-check \
    --progress-bar off "${pkgs[@]}" || {
    echo "[memcore] pip failed (log: $venv/pip.log)"
    return 1
  }
  echo "$stamp" >"$venv/.memcore-packages"
  echo "[memcore] packages ready ($((SECONDS - t0)) s)"
}

memcore_env() {
  local venv="$1" torch_spec="$2" extras="$3"
  shift 3
  case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac # imports below run from /tmp
  memcore_install "$venv" "$torch_spec" "$extras" "$@" || return 1
  # neither check imports torch (seconds): its version from its metadata, memcore only found
  local stamp
  stamp="$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -c1-16)-$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
  if [ "$(cat "$venv/.memcore-build" 2>/dev/null)" = "$stamp" ] && ls memcore/_C*.so >/dev/null 2>&1 &&
    (cd /tmp && "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('memcore') is None)"); then
    return 0
  fi
  echo "[memcore] building memcore into $venv (pip install --no-build-isolation --no-deps -e .; objects kept in build/)"
  # -v so that setup.py's lines reach memcore_show; the rest of pip's output goes to build.log only
  local log="$venv/build.log"
  : >"$log"
  memcore_pip "build" "$log" "$venv/bin/pip" install -v --disable-pip-version-check --no-build-isolation \
    --no-deps -e . || {
    cat "$log"
    echo "[memcore] build failed (log: $log)"
    return 1
  }
  (cd /tmp && "$venv/bin/python" -c "import memcore") || {
    echo "[memcore] memcore does not import"
    return 1
  }
  echo "$stamp" >"$venv/.memcore-build"
}
