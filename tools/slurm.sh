#!/usr/bin/env bash
# Runs a tool of this folder under Slurm, one task per GPU (used by slurm_train.sh
# and slurm_test.sh):  tools/slurm.sh TOOL.py PARTITION JOB_NAME [tool arguments ...]
# Environment: GPUS (tasks in all, 8), GPUS_PER_NODE (8), CPUS_PER_TASK (5),
# SRUN_ARGS (more srun options), PYTHON (default: the repository's .venv, else python).
# MMEngine's slurm launcher reads SLURM_PROCID / SLURM_NTASKS / SLURM_NODELIST and
# picks MASTER_PORT (29500 unless set).
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 TOOL.py PARTITION JOB_NAME [tool arguments ...]" >&2
    exit 2
fi
TOOL=$1
PARTITION=$2
JOB_NAME=$3
shift 3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
HERE="$(cd "$(dirname "$0")" && pwd)"
# The repository's virtual environment when there is one (as `make` builds it).
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/../.venv/bin/python" ]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON=python; fi
fi

export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$HERE/.."
# shellcheck disable=SC2086
exec srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    $SRUN_ARGS \
    "$PYTHON" -u "$HERE/$TOOL" "$@" --launcher slurm
