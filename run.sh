#!/usr/bin/env bash
# AlignFuse launcher.
#   bash run.sh setup              create .venv and install everything (idempotent; a second call takes seconds)
#   bash run.sh test [pytest args] setup, then the test suite
#   bash run.sh demo               setup, then the CPU demo (synthetic data, tiny model, minutes)
#   bash run.sh <Task> [args...]   launch <Task>.py through torchrun, e.g. bash run.sh Pretrain --config configs/Pretrain.yaml
#   bash run.sh malloc             print the C allocator library that demo and <Task> preload (empty: glibc's)
#   bash run.sh app --checkpoint CK [--index DIR] [--port N]   the local web demo on 127.0.0.1 (installs gradio)
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE (defaults: 1 node, one process per
# local GPU, one process on a CPU-only machine). Example: NNODES=4 NODE_RANK=0 MASTER_ADDR=10.1.1.1 bash run.sh Pretrain ...
# ALIGNFUSE_MALLOC=auto|tcmalloc|jemalloc|glibc picks the C allocator of demo and <Task> runs (auto: tcmalloc when
# installed, e.g. apt-get install libtcmalloc-minimal4; faster and leaner than glibc's for the host side, see
# benchmarks/README.md). Tests run on the system's default allocator.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${ALIGNFUSE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

setup() {
  # The stamp holds a hash of what we install: unchanged -> nothing to do. Concurrent calls (every node of a SLURM
  # job starts run.sh at once, on a shared file system) take turns on a lock in the venv folder: one installs, the
  # others wait and then find the stamp.
  local want stamp="$VENV/.alignfuse-installed"
  want="$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)"
  installed() { [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }
  installed && return 0
  mkdir -p "$VENV"
  exec 9>"$VENV/.alignfuse-setup.lock"
  if command -v flock >/dev/null 2>&1 && ! flock -n 9; then  # (no flock, e.g. macOS: no lock)
    echo "[run.sh] another setup is installing into $VENV: waiting for it"
    flock 9
  fi
  if installed; then
    exec 9>&-
    return 0
  fi
  echo "[run.sh] installing into $VENV (first time: several minutes)"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  # torch first, from the registry. The floor and the exclusion keep pip off a CPU-only torch 2.13.0 wheel that some
  # machines hold in pip's find-links: torchvision does not import with it, and timm needs torchvision.
  "$PY" -m pip install -q "torch>=2.5,!=2.13.0" torchvision
  "$PY" -m pip install -q -e ".[test]"
  # DeepSpeed's setup imports torch, so it builds against the torch installed above; ops are JIT-built when used.
  if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation deepspeed
  fi
  "$PY" -c "import torch, torchvision, timm, transformers, cv2, deepspeed; print('[run.sh] torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
  echo "$want" > "$stamp"
  exec 9>&-  # the lock goes with the descriptor
}

malloc_lib() {
  # The shared library to preload for ALIGNFUSE_MALLOC; nothing for glibc. A named allocator that is missing is an error.
  local want="${ALIGNFUSE_MALLOC:-auto}" name package lib
  case "$want" in
    glibc) return 0 ;;
    auto|tcmalloc) name=libtcmalloc_minimal.so.4 package=libtcmalloc-minimal4 ;;
    jemalloc) name=libjemalloc.so.2 package=libjemalloc2 ;;
    *) echo "run.sh: ALIGNFUSE_MALLOC must be auto, tcmalloc, jemalloc or glibc, got '$want'" >&2; return 2 ;;
  esac
  lib="$( (/sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null) | awk -v n="$name" '$1 == n && $NF ~ /^\// && !found {print $NF; found = 1}')"  # no early exit: SIGPIPE + pipefail
  if [ -z "$lib" ] && [ "$want" != auto ]; then
    echo "run.sh: ALIGNFUSE_MALLOC=$want but $name is not installed (Debian/Ubuntu: apt-get install $package)" >&2
    return 2
  fi
  [ -n "$lib" ] && echo "$lib"
  return 0
}

preload_malloc() {
  local lib
  lib="$(malloc_lib)" || exit 2
  if [ -n "$lib" ]; then
    export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
}

launch() {
  local task="$1"; shift
  [ -f "$ROOT/$task.py" ] || { echo "run.sh: no task script $task.py (tasks: $(ls "$ROOT" | sed -n 's/^\([A-Z][A-Za-z_]*\)\.py$/\1/p' | tr '\n' ' '))" >&2; exit 2; }
  local ngpu
  ngpu="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  local nproc="${NPROC_PER_NODE:-$([ "$ngpu" -gt 0 ] && echo "$ngpu" || echo 1)}"
  # engine.launch is torchrun, except that it exits 0 when a stop signal ended every rank cleanly (torchrun exits 1).
  exec "$PY" -m engine.launch \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    ${MAX_RESTARTS:+--max-restarts="$MAX_RESTARTS"} \
    "$ROOT/$task.py" "$@"
}

verb="${1:-help}"; [ $# -gt 0 ] && shift
case "$verb" in
  setup) setup ;;
  test)
    setup
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    exec "$PY" -m pytest -q "$@" ;;
  demo)
    setup
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    preload_malloc
    exec "$PY" demo.py "$@" ;;
  malloc) malloc_lib ;;
  app)
    setup
    # gradio is the optional extra [app]: installed here when missing (the test extra has it already).
    "$PY" -c "import gradio" >/dev/null 2>&1 || "$PY" -m pip install -q -e ".[app]"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    exec "$PY" -m tools.app "$@" ;;
  help|-h|--help) sed -n '2,13p' "$0" ;;
  *) setup; preload_malloc; launch "$verb" "$@" ;;
esac
