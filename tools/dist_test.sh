#!/usr/bin/env bash
# Multi-process testing on one machine with torchrun:
#   tools/dist_test.sh CONFIG CHECKPOINT NPROC [test.py arguments ...]
# Several machines: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on each.
# Without CUDA the processes use gloo on the CPU (test.py sets that up).
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NPROC [test.py arguments ...]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
shift 3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
HERE="$(cd "$(dirname "$0")" && pwd)"
# The repository's virtual environment when there is one (as `make` builds it).
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/../.venv/bin/python" ]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON=python; fi
fi

PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$HERE/.." \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$NPROC" \
    "$HERE/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
