#!/usr/bin/env bash
# Testing under Slurm (one task per GPU):
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#       tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py arguments ...]
# The srun command line is built by slurm.sh.
set -euo pipefail

if [ $# -lt 4 ]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py arguments ...]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
shift 4
exec "$(dirname "$0")/slurm.sh" test.py "$PARTITION" "$JOB_NAME" "$CONFIG" "$CHECKPOINT" "$@"
