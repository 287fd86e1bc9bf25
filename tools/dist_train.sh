#!/usr/bin/env bash
# Multi-process training with torchrun:
#   tools/dist_train.sh CONFIG NPROC [train.py arguments ...]
# e.g. tools/dist_train.sh configs/demo/mask-rcnn_transnext-demo_shapes.py 2 --work-dir work_dirs/x
# Environment: NNODES, NODE_RANK, MASTER_ADDR, PORT (see torchrun.sh).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NPROC [train.py arguments ...]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
exec "$(dirname "$0")/torchrun.sh" train.py "$NPROC" "$CONFIG" "$@"
