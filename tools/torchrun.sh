#!/usr/bin/env bash
# Runs a tool of this folder in NPROC processes with torchrun (used by dist_train.sh
# and dist_test.sh):  tools/torchrun.sh TOOL.py NPROC [tool arguments ...]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on each.
# Without CUDA the processes use gloo on the CPU (the tools set that up).
set -euo pipefail

TOOL=$1
NPROC=$2
shift 2
HERE="$(cd "$(dirname "$0")" && pwd)"
# The repository's virtual environment when there is one (as `make` builds it).
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/../.venv/bin/python" ]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON=python; fi
fi

PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$HERE/.." \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$HERE/$TOOL" "$@" --launcher pytorch
