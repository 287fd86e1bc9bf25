#!/usr/bin/env bash
# Run the whole test suite against another torch, in a side environment built the way a
# user of an existing OpenMMLab stack would have it:
#   torch==TORCH from the package index, the numpy that torch was built against, mmcv 2.1.0
#   compiled against that torch, mmengine/mmdet/mmseg, and mmtransnext as a wheel built
#   there (`pip wheel --no-build-isolation`, its op compiled for that torch) and
#   installed non-editably. The tests run from outside the source tree, so they import
#   the installed package.
#
# Usage: tools/test_compat.sh TORCH_VERSION [PYTHON]
#   e.g. tools/test_compat.sh 2.1.2 /root/.pyenv/versions/3.9.18/bin/python
# Environment: COMPAT_DIR (default .venv-compat) holds one venv per torch/Python pair;
# the third-party part is built once per venv (mmcv takes ~6 min on 2 cores), the
# package and the suite on every run. PYTEST_ARGS replaces the default '-q -rs'.
# MMCV_CACHE_DIR: pip's cache for the mmcv build (default: one per torch and Python
# under COMPAT_DIR; pip keys cached wheels by name and version only, so a shared cache
# could hand over an mmcv compiled against another torch).
set -euo pipefail

main() {

TORCH=${1:?usage: tools/test_compat.sh TORCH_VERSION [PYTHON]}
PYTHON=${2:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
COMPAT_DIR=${COMPAT_DIR:-$REPO/.venv-compat}

PY_TAG=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV=$COMPAT_DIR/torch-$TORCH-py$PY_TAG
PY=$VENV/bin/python
PIP="$PY -m pip"
CONSTRAINTS=$VENV/constraints.txt
DEPS_STAMP=$VENV/.deps-done

if [ ! -f "$DEPS_STAMP" ]; then
    echo "== test-compat: building $VENV (torch $TORCH, Python $PY_TAG)"
    "$PYTHON" -m venv "$VENV"
    $PIP install -q --upgrade pip
    # Every later install must keep this torch, and keep numpy on the ABI that torch was
    # built against: torch wheels before 2.3 were built against numpy 1 ("Failed to
    # initialize NumPy" under numpy 2), and mmengine/opencv would otherwise upgrade it.
    echo "torch==$TORCH" > "$CONSTRAINTS"
    if "$PYTHON" - "$TORCH" <<'EOF'
import sys
major, minor = (int(p) for p in sys.argv[1].split('.')[:2])
sys.exit(0 if (major, minor) < (2, 3) else 1)
EOF
    then
        echo 'numpy<2' >> "$CONSTRAINTS"
    fi
    $PIP install -q -c "$CONSTRAINTS" "torch==$TORCH"
    $PIP install -q -c "$CONSTRAINTS" -r "$REPO/requirements/build.txt"
    # mmcv 2.1.0 compiled against this torch (see MMCV_CACHE_DIR above), its ops
    # loaded once to prove it.
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PIP install \
        --cache-dir "${MMCV_CACHE_DIR:-$COMPAT_DIR/pip-cache-torch-$TORCH-py$PY_TAG}" \
        --no-build-isolation -c "$CONSTRAINTS" mmcv==2.1.0
    $PY -c 'import mmcv.ops'
    $PIP install -q -c "$CONSTRAINTS" -r "$REPO/requirements/runtime.txt" \
        -r "$REPO/requirements/tests.txt"
    # As the Makefile does: Triton for the interpreter tests, unless this torch brought its own.
    $PY -c 'import triton' 2>/dev/null || $PIP install -q -c "$CONSTRAINTS" triton==3.9.0
    touch "$DEPS_STAMP"
fi

# Build the wheel from a copy of the tracked (and new, unignored) files, so neither this
# tree's build/ nor its in-place .so from `make ext` (compiled against another torch)
# can leak into it.
SRC=$VENV/src
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$SRC" -xf -
rm -rf "$VENV/dist"
MAX_JOBS=${MAX_JOBS:-2} $PIP wheel --no-build-isolation --no-deps -w "$VENV/dist" "$SRC"
# Installed with its declared dependencies resolved against what is there (the
# constraints keep torch and numpy as they are).
$PIP uninstall -q -y mmtransnext 2>/dev/null || true
$PIP install -q -c "$CONSTRAINTS" "$VENV"/dist/mmtransnext-*.whl

# From outside the source tree from here on, so `import mmtransnext` finds the
# installed package.
cd "$VENV"
echo "== test-compat: versions"
$PY - "$REPO" <<'EOF'
import importlib, os, platform, subprocess, sys
import torch
from importlib.metadata import version
names = ['numpy', 'mmengine', 'mmcv', 'mmdet', 'mmsegmentation', 'mmtransnext']
compiler = subprocess.run(['c++', '--version'], capture_output=True, text=True).stdout
print(f'python {platform.python_version()}  torch {torch.__version__} '
      f'(CUDA {torch.version.cuda})  compiler: {compiler.splitlines()[0]}')
print('  '.join(f'{n} {version(n)}' for n in names))
import mmtransnext.ops.sliding_window as sw
package = importlib.import_module('mmtransnext').__file__
print('mmtransnext from', package, '| compiled op on cpu:', sw.extension_available('cpu'))
if package.startswith(os.path.join(sys.argv[1], 'mmtransnext', '')):
    sys.exit('test-compat: the source tree shadows the installed mmtransnext')
EOF
# shellcheck disable=SC2086
$PY -m pytest "$REPO/tests" -p no:cacheprovider ${PYTEST_ARGS:--q -rs}
}

# The whole script is parsed before it runs, so editing it during a run is harmless.
main "$@"
