"""The CUDA kernels compile (sm_80 and sm_90 objects), checked on machines without a GPU.

Runs ``tools/compile_cuda.py``, which needs ``nvcc``; skipped where it is missing.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_sources_compile(tmp_path):
    if shutil.which('nvcc') is None:
        pytest.skip('nvcc not found: the CUDA toolkit is not on PATH, so the .cu kernels '
                    'cannot be compiled here')
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'compile_cuda.py'), '--out-dir',
         str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f'nvcc failed:\n{proc.stdout}\n{proc.stderr}'
    objects = list(tmp_path.glob('*.o'))
    assert objects and all(o.stat().st_size > 0 for o in objects), proc.stdout
