#!/usr/bin/env bash
# alignpipe launcher: creates/updates a local virtual environment, then runs a recipe or the test suite.
#
#   ./launch.sh recipes/quickstart.yaml [KEY=VALUE ...] [alignpipe run options]   run a recipe end to end
#   ./launch.sh --test [pytest arguments]                                       run the test suite
#
# Environment: ALIGNPIPE_VENV (default .venv), PYTHON (interpreter used to create the venv, default python3),
# TORCH_SPEC (default torch==2.13.0; set it to the build you want, e.g. a CUDA wheel, before the first run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${ALIGNPIPE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

ensure_env() {
  local stamp="$VENV/.alignpipe-installed"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[launch] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[launch] installing alignpipe and its dependencies into $VENV (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first, so the pinned build is used rather than whatever a dependency would pull in.
    "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    touch "$stamp"
  fi
}

case "${1:-}" in
  ""|-h|--help)
    usage
    exit 0
    ;;
  --test)
    shift
    ensure_env
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  -*)
    echo "launch.sh: unknown option '$1'" >&2
    usage >&2
    exit 2
    ;;
  *)
    ensure_env
    recipe="$1"
    shift
    command=("$VENV/bin/alignpipe" run "$recipe" "$@")
    echo "[launch] ${command[*]}"
    exec "${command[@]}"
    ;;
esac
