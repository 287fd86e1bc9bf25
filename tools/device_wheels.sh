#!/usr/bin/env bash
# Fill .whl/ with what tools/device_check.sh installs on a GPU machine that has torch but
# no OpenMMLab packages and no network: Python 3.12 wheels of mmengine, mmdet, mmseg and
# the pure-Python or manylinux packages they import that such a machine lacks, mmcv as a
# pure-Python wheel without ops (enough for the backbone and the op tests), and mmcv's
# source archive (its CUDA ops are compiled there, against that machine's torch and nvcc).
#
# With CUDA_TORCH_PYTHON set to a Python 3.12 whose torch is the GPU machine's (e.g. a venv
# with the index's torch 2.11.0+cu130), it also builds mmcv with its CUDA ops for
# TORCH_CUDA_ARCH_LIST (default 9.0) into DIR/mmcv-ops/, so that the device check need not
# compile it there (about 25 minutes on 2 cores here; nvcc and the wheel's CUDA headers).
#
# Usage: tools/device_wheels.sh [DIR]   (default .whl; run from anywhere, needs pip and
# network here). Prints the folder's size: everything that travels must stay < 64 MiB.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.whl}
PY=${PYTHON:-python3}
MMCV=2.1.0
"$PY" -c 'import pkg_resources' 2>/dev/null || {
    echo "device_wheels: $PY lacks pkg_resources (setuptools<70), which mmcv's setup.py" \
        'imports; set PYTHON to one that has it' >&2
    exit 2
}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/*.tar.gz

# Wheels for CPython 3.12 on x86-64 Linux, whatever Python runs this script.
fetch() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$@"
}
# The stack itself (versions of requirements/runtime.txt).
fetch mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2
# What they import that the GPU image lacks (it has numpy, scipy, matplotlib, opencv,
# pyyaml, rich, packaging, pillow, regex, six, tqdm, pytest, hypothesis).
fetch addict termcolor yapf platformdirs pycocotools shapely terminaltables \
    prettytable wcwidth ftfy
# mmcv's setup.py imports pkg_resources, which newer setuptools no longer ship.
fetch 'setuptools<70'

# mmcv: its sdist, and a pure-Python wheel built from it without ops.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
    -d "$DEST" "mmcv==$MMCV"
tar -xzf "$DEST/mmcv-$MMCV.tar.gz" -C "$work"
(cd "$work/mmcv-$MMCV" && MMCV_WITH_OPS=0 "$PY" -m pip wheel -q --no-deps \
    --no-build-isolation -w "$DEST" .)

if [[ -n ${CUDA_TORCH_PYTHON:-} ]]; then
    # torch takes CUDA_HOME from nvcc's folder when it is unset, which is wrong for an nvcc
    # that is a wrapper script elsewhere (/usr/local/bin/nvcc: the host compiler then
    # misses crt/host_defines.h); nvcc names its real folder in a dry run.
    if [[ -z ${CUDA_HOME:-} ]]; then
        echo > "$work/empty.cu"
        nvcc_bin=$(nvcc --dryrun "$work/empty.cu" 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
        [[ -n $nvcc_bin ]] && export CUDA_HOME=$(cd "$nvcc_bin/.." && pwd)
        echo "device_wheels: CUDA_HOME=${CUDA_HOME:-unset}"
    fi
    # The CUDA wheels of torch carry the headers and runtime that nvcc's toolkit may lack
    # (cusparse.h, a linkable libcudart.so).
    cuda_dir=$("$CUDA_TORCH_PYTHON" -c 'import nvidia, os; p = os.path.dirname(nvidia.__path__[0] + "/"); print(next(os.path.join(p, d) for d in ("cu13", "cuda_runtime") if os.path.isdir(os.path.join(p, d))))')
    ln -sf "$(ls "$cuda_dir"/lib/libcudart.so* | head -n 1)" "$work/libcudart.so"
    rm -rf "$DEST/mmcv-ops"
    (cd "$work/mmcv-$MMCV" && rm -rf build &&
        CPATH=$cuda_dir/include LIBRARY_PATH=$work MMCV_WITH_OPS=1 FORCE_CUDA=1 \
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$CUDA_TORCH_PYTHON" -m pip wheel -q --no-deps --no-index --no-build-isolation \
        -w "$work/mmcv-ops" .)
    # Without its debug sections the library shrinks from about 110 MB to 27 MB (the
    # wheel from 38 MB to 6 MB), which the 64 MiB that travel need.
    (cd "$work" && "$CUDA_TORCH_PYTHON" -m wheel unpack -d unpacked mmcv-ops/mmcv-*.whl &&
        strip --strip-debug unpacked/mmcv-*/mmcv/_ext*.so && mkdir -p "$DEST/mmcv-ops" &&
        "$CUDA_TORCH_PYTHON" -m wheel pack -d "$DEST/mmcv-ops" unpacked/mmcv-*)
fi

ls -la "$DEST" "$DEST"/mmcv-ops 2>/dev/null
du -sh "$DEST"
