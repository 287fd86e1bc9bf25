#!/usr/bin/env bash
# Multi-process testing with torchrun:
#   tools/dist_test.sh CONFIG CHECKPOINT NPROC [test.py arguments ...]
# Environment: NNODES, NODE_RANK, MASTER_ADDR, PORT (see torchrun.sh).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NPROC [test.py arguments ...]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
shift 3
exec "$(dirname "$0")/torchrun.sh" test.py "$NPROC" "$CONFIG" "$CHECKPOINT" "$@"
